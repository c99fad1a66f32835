"""Start-up choices that depend on the data: training size, crop rule, flips, eval resize, padding and loader.

Every `auto` setting of a dataset is resolved here, once, from what the run can see (the
images' native sizes, the cache's bytes, the memory present), and each choice comes back
with its reason so the start-up summary can say what was chosen and why. Explicit values
always win; a combination of explicit values that validates on a small part of the image
is allowed but warned about.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

from resnet_cli.errors import UserError

if TYPE_CHECKING:
    from resnet_cli.data.mirror import MirrorTest

log = logging.getLogger(__name__)

# Up to this side, images are treated like CIFAR: trained at full scale with pad-and-random-crop
# (a random resized crop of a 32-px digit throws the digit away); above it, RandomResizedCrop.
SMALL_IMAGE_MAX = 64
# The eval resize for larger images: centre crop = 87.5% of the resized side (ImageNet practice).
CROP_FRACTION = 0.875
CROPS = ("auto", "pad", "resized")
# Presets the in-memory batch path implements (geometry and cutout); others run per image.
MEMORY_AUGMENT = ("none", "standard")


def _auto(value: object) -> bool:
    return value is None or str(value).lower() == "auto"


def _int(value: object, key: str, low: int = 1) -> int:
    try:
        out = int(value)
        if out != float(value):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"dataset.{key}={value}: expected a whole number of pixels or auto") from None
    if out < low:
        raise UserError(f"dataset.{key}={value}: must be >= {low}")
    return out


@dataclass(frozen=True)
class Geometry:
    """The resolved image geometry of a run: what training crops and what evaluation sees."""

    image_size: int  # the side the network sees, in training and evaluation
    crop: str  # pad | resized
    resize: int  # eval: shorter side resized to this, then centre crop image_size
    pad: int  # crop=pad: padding before the random crop
    reason: str  # one phrase for the start-up summary: why this size
    crop_reason: str = "set"  # why this crop rule
    hflip: bool = True  # random horizontal flip in training
    vflip: bool = False  # random vertical flip in training
    flip_reason: str = "set"  # why hflip is on or off (flip=auto: the mirror test's numbers)

    @property
    def cache_size(self) -> int:
        """Side of the decoded uint8 cache of the memory loader: the eval view, so its centre crop is validation."""
        return self.resize

    def describe(self, augment: bool = True, scale: Sequence[float] = (0.5, 1.0)) -> str:
        """e.g. 'size 32 px (auto: ...), train pad 4 + random crop (auto: ...), flip off (auto: ...), eval whole image'.

        Every augmentation that can change what an image shows is named with the reason it is on.
        `augment=False` (dataset.augment=none): training sees the eval view, no crop, no flip.
        """
        ev = ("whole image" if self.resize == self.image_size
              else f"resize {self.resize} + centre crop {self.image_size}")
        if not augment:
            return f"size {self.image_size} px ({self.reason}), train and eval {ev} (augment none)"
        if self.crop == "pad":
            train = f"pad {self.pad} + random crop ({self.crop_reason})"
        else:  # the scale range says how much the crops enlarge the object: near the eval view's 1/0.875 or not
            train = (f"random resized crop area [{scale[0]:g}, {scale[1]:g}] ({self.crop_reason}; mean magnification "
                     f"{mean_magnification(scale):.2f}, the eval centre crop's {1 / CROP_FRACTION:.2f})")
        flips = f"flip {'on' if self.hflip else 'off'} ({self.flip_reason})"
        flips += ", vertical flip on" if self.vflip else ""
        return f"size {self.image_size} px ({self.reason}), train {train}, {flips}, eval {ev}"


def median_short_side(sizes: Sequence[tuple[int, int]]) -> int:
    """The median of min(width, height) over (width, height) pairs."""
    shorts = sorted(min(w, h) for w, h in sizes)
    if not shorts:
        raise UserError("dataset.image_size=auto: no readable image to measure")
    return shorts[len(shorts) // 2]


def resolve_geometry(
    image_size: int | str | None,
    *,
    resize: int | str | None = "auto",
    crop: str = "auto",
    pad: int | str | None = "auto",
    native: Sequence[tuple[int, int]] = (),
    auto_max_size: int = 224,
) -> Geometry:
    """Resolve image_size, crop, resize and pad (each may be `auto`) into one consistent Geometry.

    Rules (docs/DATA.md): image_size auto = the median short side of the images, capped at
    `auto_max_size`; crop auto = pad up to 64 px, resized above; resize auto = image_size
    for padded crops (validate on the whole image, as trained) and image_size / 0.875 for
    resized crops; pad auto = image_size / 8 (4 at 32 px).
    """
    crop = str(crop).lower()
    if crop not in CROPS:
        raise UserError(f"dataset.crop={crop}: unknown value; use {', '.join(CROPS)}")
    if _auto(image_size):
        if not native:
            raise UserError("dataset.image_size=auto needs images to measure; set dataset.image_size=N")
        short = median_short_side(native)
        cap = _int(auto_max_size, "auto_max_size", 8)
        size = min(short, cap)
        reason = f"auto: median short side {short} px" + (f", capped at auto_max_size={cap}" if short > cap else "")
    else:
        size = _int(image_size, "image_size", 8)
        reason = "set"
    crop_reason = "set"
    if crop == "auto":
        crop = "pad" if size <= SMALL_IMAGE_MAX else "resized"
        crop_reason = (f"auto: {size} px <= {SMALL_IMAGE_MAX}, at full scale: a resized crop would cut a small "
                       f"image's object away" if crop == "pad" else f"auto: {size} px > {SMALL_IMAGE_MAX}")
    if _auto(resize):
        resize_px = size if crop == "pad" else round(size / CROP_FRACTION)
    else:
        resize_px = _int(resize, "resize")
        if resize_px < size:
            raise UserError(f"dataset.resize={resize_px} is smaller than dataset.image_size={size}: the centre crop "
                            f"would not fit; set resize >= image_size or resize=auto")
        kept = (size / resize_px) ** 2
        if kept < 0.5:
            log.warning("dataset.resize=%d with dataset.image_size=%d validates on the central %.0f%% of each image; "
                        "set dataset.resize=auto unless that is what you want", resize_px, size, 100 * kept)
    pad_px = round(size / 8) if _auto(pad) else _int(pad, "pad", 0)
    return Geometry(size, crop, resize_px, pad_px, reason, crop_reason)


def mean_magnification(scale: Sequence[float]) -> float:
    """E[1/sqrt(s)] for a crop of area fraction s ~ U(scale): how much a random resized crop enlarges the object."""
    lo, hi = float(scale[0]), float(scale[1])
    return 1 / math.sqrt(lo) if hi - lo < 1e-9 else 2 * (math.sqrt(hi) - math.sqrt(lo)) / (hi - lo)


FLIPS = ("auto", "true", "false")


def _switch(value: object, key: str, words: Sequence[str]) -> str:
    word = str(value).lower()
    if word not in words:
        raise UserError(f"dataset.{key}={value}: must be one of {', '.join(words)}")
    return word


def resolve_flips(flip: object, vflip: object, test: Callable[[], "MirrorTest"] | None) -> tuple[bool, bool, str]:
    """dataset.flip (auto|true|false) and dataset.vflip (true|false) -> (hflip, vflip, why hflip).

    flip=auto runs `test` (resnet_cli.data.mirror: are the classes mirror-symmetric?) and flips
    only if they are; without a test (no training images to ask) it keeps the flip on.
    """
    flip_word = _switch(flip, "flip", FLIPS)
    v = _switch(vflip, "vflip", ("true", "false")) == "true"
    if flip_word != "auto":
        return flip_word == "true", v, "set"
    if test is None:
        return True, v, "auto: no training images to test"
    result = test()
    return result.symmetric, v, result.reason()


# Training classes this uneven (largest / smallest) make plain accuracy and plain cross-entropy reward the
# common classes: `auto` then balances the classes (dataset.balance) and picks best.pt by balanced accuracy.
IMBALANCE_RATIO = 3.0
BALANCES = ("auto", "off", "sampler", "loss")
# What balance=auto does above IMBALANCE_RATIO: the sampler beat the class-weighted loss on a 10:1 folder
# (balanced val acc 0.75 against 0.71, mean of three seeds; 0.64 with neither).
AUTO_BALANCE = "sampler"


def imbalance(counts: Sequence[int]) -> float:
    """Largest over smallest class count among the classes with any training images (1.0 for none or one)."""
    held = [int(c) for c in counts if int(c) > 0]
    return max(held) / min(held) if len(held) > 1 else 1.0


def resolve_balance(balance: object, counts: Sequence[int]) -> tuple[str, str]:
    """dataset.balance (auto|off|sampler|loss) for training classes of these sizes: (mode, reason)."""
    word = str(balance).lower()
    if word not in BALANCES:
        raise UserError(f"dataset.balance={balance}: use {', '.join(BALANCES)}")
    if word != "auto":
        return word, "set"
    ratio = imbalance(counts)
    if ratio < IMBALANCE_RATIO:
        return "off", f"auto: classes within {ratio:.1f}:1"
    return AUTO_BALANCE, f"auto: classes {ratio:.1f}:1 (>= {IMBALANCE_RATIO:g}:1): each class drawn equally often"


# batch_size: auto. Small folders need optimizer steps more than they need big batches: the
# largest power of two up to BATCH_MAX that still gives MIN_STEPS steps per epoch, at least BATCH_MIN.
BATCH_MAX, BATCH_MIN, MIN_STEPS = 64, 16, 16


def resolve_batch(batch_size: int | str, num_train: int) -> tuple[int, str]:
    """dataset.batch_size (auto|N) for `num_train` training images; returns (batch, reason)."""
    if not _auto(batch_size):
        return _int(batch_size, "batch_size"), "set"
    batch = BATCH_MAX
    while batch > BATCH_MIN and num_train // batch < MIN_STEPS:
        batch //= 2
    return batch, f"auto: {num_train} images, {num_train // batch} steps per epoch"


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 when it cannot be read)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def choose_loader(loader: str, augment: Sequence[str], cache_bytes: int, budget: float, device: object,
                  device_bytes: int = 0) -> tuple[str, str]:
    """Resolve dataset.loader (auto|memory|dataloader) and say why.

    auto takes the in-memory batch path when every augmentation preset runs on whole batches
    and the decoded uint8 cache fits `budget` x the memory of the device that will hold it.
    """
    loader = str(loader).lower()
    per_image = [n for n in augment if n not in MEMORY_AUGMENT]
    if loader == "memory" and per_image:
        raise UserError(f"dataset.augment={'+'.join(augment)} runs per image and needs dataset.loader=dataloader "
                        f"(or auto); the in-memory path offers {', '.join(MEMORY_AUGMENT)} plus dataset.cutout, "
                        f"mixup_alpha and cutmix_alpha")
    if loader != "auto":
        return loader, "set"
    if per_image:
        return "dataloader", f"auto: augment {'+'.join(per_image)} runs per image"
    total = device_bytes or physical_memory()
    mib = cache_bytes / 2**20
    if not total:
        return "dataloader", "auto: memory size unknown"
    where = "GPU memory" if str(device).startswith("cuda") else "RAM"
    if cache_bytes <= budget * total:
        return "memory", f"auto: {mib:.0f} MiB uint8 cache fits memory_budget={budget:g} of {where}"
    return "dataloader", f"auto: {mib:.0f} MiB cache exceeds memory_budget={budget:g} of {where}"
