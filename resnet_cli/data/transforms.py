"""Image transforms: colour-mode normalisation, torchvision v2 augmentation presets, eval and batch mixing."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SIXTEEN_BIT = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA = {"RGBA", "LA", "La", "RGBa", "PA"}


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB, the same way every time.

    16-bit (and 32-bit "I") images keep their top 8 bits; float images are clipped
    to 0..255; transparency (RGBA, LA, palette or grey with a transparent colour) is
    composited on white, so a transparent background never turns black.
    """
    if img.mode == "RGB":
        return img
    if img.mode in _SIXTEEN_BIT:
        a = np.clip(np.asarray(img, dtype=np.int64), 0, 65535) >> 8
        img = Image.fromarray(a.astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode in _ALPHA or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img.convert("RGB")


def _rgb_if_pil(img):
    # Module-level (not a lambda) so the transform pickles into spawned DataLoader workers.
    return to_rgb(img) if isinstance(img, Image.Image) else img


def _normalize(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_eval_transform(resize: int, crop: int, mean: Sequence[float], std: Sequence[float],
                         channels: int = 3) -> Callable:
    """PIL image (any mode) or uint8 CHW tensor -> the normalized float tensor the model was evaluated on.

    `channels` is the model's input: 3 (RGB) or 1, where a PIL image becomes grayscale (PIL's own
    conversion, exact for a grey image) and a 1-channel tensor stays as it is. Checkpoints written
    before the eval spec had `channels` were all RGB, hence the default.
    """
    return v2.Compose([
        v2.Lambda(_rgb_if_pil),
        *([v2.Grayscale(1)] if int(channels) == 1 else []),  # before ToImage: on the PIL image
        v2.ToImage(),
        v2.Resize(resize, antialias=True),
        v2.CenterCrop(crop),
        *_normalize(mean, std),
    ])


# Policy presets: name -> (transforms before normalisation, transforms after it).
# The geometry (crop + flips) comes first and is shared by every preset but "none".
def _autoaugment(size: int) -> v2.Transform:
    policy = v2.AutoAugmentPolicy.CIFAR10 if size <= 64 else v2.AutoAugmentPolicy.IMAGENET
    return v2.AutoAugment(policy)


PRESETS: dict[str, Callable[[int], tuple[list, list]]] = {
    "none": lambda size: ([], []),
    "standard": lambda size: ([], []),
    "trivialaugment": lambda size: ([v2.TrivialAugmentWide()], []),
    "randaugment": lambda size: ([v2.RandAugment()], []),
    "autoaugment": lambda size: ([_autoaugment(size)], []),
    "colorjitter": lambda size: ([v2.ColorJitter(0.4, 0.4, 0.4)], []),
    "randomerasing": lambda size: ([], [v2.RandomErasing(p=0.25)]),
}


def parse_augment(augment: str) -> list[str]:
    """Split 'a+b' into preset names (validate.py has checked each against PRESETS)."""
    return [n.strip().lower() for n in str(augment).split("+") if n.strip()] or ["none"]


def build_train_transform(
    names: list[str],
    *,
    image_size: int,
    crop: str,
    pad: int,
    pad_mode: str,
    scale: Sequence[float],
    cutout: int,
    mean: Sequence[float],
    std: Sequence[float],
    hflip: bool = True,
    vflip: bool = False,
) -> v2.Compose:
    """Per-image train transform (DataLoader path): geometry, preset policies, normalize, erasing.

    `crop: pad` is the CIFAR recipe (pad, random crop); `crop: resized` is RandomResizedCrop;
    then a random horizontal flip when `hflip` (dataset.flip, resolved), a vertical one when
    `vflip`. `cutout` (pixels) maps to a fixed-size square RandomErasing.
    """
    pre: list = [v2.ToImage()]
    if names != ["none"]:
        if crop == "pad":
            pre += [v2.RandomCrop(image_size, padding=pad or None, padding_mode=pad_mode, pad_if_needed=True)]
        else:  # resized (the geometry has resolved crop=auto)
            pre += [v2.RandomResizedCrop(image_size, scale=tuple(scale), antialias=True)]
        pre += [v2.RandomHorizontalFlip()] if hflip else []
        pre += [v2.RandomVerticalFlip()] if vflip else []
    else:
        pre += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    post: list = []
    for name in names:
        before, after = PRESETS[name](image_size)
        pre += before
        post += after
    if cutout:
        area = min(1.0, (cutout / image_size) ** 2)
        post.append(v2.RandomErasing(p=1.0, scale=(area, area), ratio=(1.0, 1.0), value=0))
    return v2.Compose([*pre, *_normalize(mean, std), *post])


class BatchMixer:
    """MixUp and/or CutMix on whole batches (torchvision v2), seeded per batch; targets become soft [N, C]."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> None:
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.op = ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix one batch; the draws depend only on `seed`, never on the global RNG state."""
        # v2.MixUp/CutMix draw from the global CPU generator; fork it so training RNG is untouched.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds (and traces) every accelerator
            return self.op(images, targets)


def make_mixer(num_classes: int, mixup_alpha: float, cutmix_alpha: float) -> BatchMixer | None:
    """A BatchMixer, or None when both alphas are 0."""
    if not (mixup_alpha or cutmix_alpha):
        return None
    return BatchMixer(num_classes, mixup_alpha, cutmix_alpha)
