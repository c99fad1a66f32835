"""flip: auto, decided from the data: are the classes mirror-symmetric, i.e. is a mirrored image still of its class?

A mirrored 7 is not a 7 and a mirrored word is no word, but a mirrored shirt, cat or car is
still a shirt, a cat, a car. The test asks the training images themselves, with the cheapest
classifier there is: on a sample of them, downsampled, each image and its mirror are classified
by the nearest class mean (leave-one-out, so an image never votes for itself). If mirroring
drops that accuracy measurably (by a share of its margin over chance) and significantly
(McNemar's paired test over the same images), the classes are not mirror-symmetric and a
random horizontal flip would teach the network wrong labels: flip off. Otherwise flip on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from resnet_cli.data.contract import generator
from resnet_cli.data.loader import BadSample
from resnet_cli.data.transforms import to_rgb

# The sample: at most this many training images (fewer where each must be decoded from its file),
# resampled to SIDE x SIDE grey levels. Sides 12 to 32 and samples of 500 to 2,000 images gave the
# same decisions on every set measured (docs/DATA.md).
MAX_IMAGES = 2000
MAX_DECODED = 500
SIDE = 16
# Mirrored images must lose at least this share of the originals' margin over chance. Measured: digits
# and letters, where most classes are chiral, lose 0.64-0.70; Fashion-MNIST, where only the shoes (all
# facing left) are, 0.19-0.32 (samples of 200-2,000); shapes and clip art 0.00-0.13. The threshold sits
# in the middle of the gap.
MIN_DROP = 0.45
# ... with the paired difference this many standard errors from zero (McNemar: b - c over sqrt(b + c);
# one-sided p < 0.0014), so that a small folder's noise does not turn the flip off. 70 rendered digits
# give z = 4; 1,800 give 25-30.
MIN_Z = 3.0
CHUNK = 256  # images resampled at a time: a 2,000-image sample at 256 px never exists as floats at once
KEY = 0x111AA0  # the sample does not depend on the training seed


@dataclass(frozen=True)
class MirrorTest:
    """The nearest-class-mean accuracies of a sample of training images and of their mirrors."""

    images: int
    classes: int
    acc: float  # originals
    acc_mirror: float  # mirrors, classified against the originals' class means
    chance: float  # the majority class's share of the sample
    z: float  # McNemar's statistic of the paired difference (positive: the mirrors lose)
    seconds: float

    @property
    def drop(self) -> float:
        """The share of the originals' margin over chance that mirroring loses (0: none, 1: all)."""
        margin = self.acc - self.chance
        return (self.acc - self.acc_mirror) / margin if margin > 0 else 0.0

    @property
    def symmetric(self) -> bool:
        """True unless mirroring makes a measurable and significant drop."""
        return not (self.drop >= MIN_DROP and self.z >= MIN_Z)

    def reason(self) -> str:
        """The decision in words with its numbers, for the plan line."""
        if self.classes < 2:
            return "auto: one class, no label a mirror could change"
        numbers = (f"nearest class mean of {self.images} train images at {SIDE} px {self.acc:.2f}, mirrored "
                   f"{self.acc_mirror:.2f}, chance {self.chance:.2f}, z={self.z:.1f}")
        if not self.symmetric:
            return (f"auto: the classes are not mirror-symmetric, mirroring loses {self.drop:.0%} of the accuracy "
                    f"above chance: {numbers}")
        if self.z < MIN_Z:
            return f"auto: mirrored images are classified as well as the originals: {numbers}"
        return (f"auto: mirror-symmetric but for a few classes, mirroring loses {self.drop:.0%} < {MIN_DROP:.0%} "
                f"of the accuracy above chance: {numbers}")


def features(images: torch.Tensor, side: int = SIDE) -> torch.Tensor:
    """uint8 or float NCHW images -> [N, side*side] grey levels, each image standardised (zero mean, unit norm).

    Standardising removes brightness and contrast, which mirroring does not change; the sign is set so
    that the border is darker than the centre, so light-on-dark and dark-on-light glyphs look alike.
    """
    if len(images) > CHUNK:
        return torch.cat([features(images[i:i + CHUNK], side) for i in range(0, len(images), CHUNK)])
    x = images.float()
    if x.shape[1] == 3:
        x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    else:
        x = x.mean(1, keepdim=True)
    x = F.interpolate(x, size=(side, side), mode="area") if x.shape[-1] >= side and x.shape[-2] >= side else \
        F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    x = x.flatten(1)
    x = x - x.mean(1, keepdim=True)
    border = torch.ones(side, side, dtype=torch.bool, device=x.device)
    border[1:-1, 1:-1] = False
    sign = torch.where(x[:, border.flatten()].mean(1) > 0, -1.0, 1.0)
    x = x * sign[:, None]
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-6)


def sample_indices(n: int, limit: int = MAX_IMAGES) -> torch.Tensor:
    """At most `limit` of the indices 0..n-1, drawn once from a fixed key (sorted: files are read in order)."""
    if n <= limit:
        return torch.arange(n)
    return torch.randperm(n, generator=generator(KEY, n))[:limit].sort().values


def measure_arrays(images: torch.Tensor, labels: torch.Tensor, limit: int = MAX_IMAGES) -> MirrorTest:
    """The mirror test on a fixed sample of uint8 NCHW `images` (on any device) and their labels."""
    start = time.perf_counter()
    idx = sample_indices(len(labels), limit)
    picked = images[idx.to(images.device)]
    return mirror_test(picked, labels.cpu()[idx], start=start)


def measure_dataset(dataset: Sequence, limit: int = MAX_DECODED) -> MirrorTest:
    """The mirror test on a fixed sample of a map-style dataset of (PIL image or uint8 CHW tensor, label).

    Each sampled image is decoded (that is the cost: the seconds are in the result) and resized to
    a fixed square; items that fail to decode (a BadSample) are left out, the loader reports them.
    """
    start = time.perf_counter()
    order = sample_indices(len(dataset), limit)
    to_square = v2.Compose([v2.ToImage(), v2.Resize((4 * SIDE, 4 * SIDE), antialias=True)])
    images, kept = [], []
    for i in order.tolist():
        item = dataset[i]
        if isinstance(item, BadSample):  # the loader reports it, by dataset.on_bad_image, when it reaches it
            continue
        img, label = item
        x = to_square(to_rgb(img) if isinstance(img, Image.Image) else img)
        images.append(x.expand(3, -1, -1) if x.shape[0] == 1 else x[:3])
        kept.append(int(label))
    if not images:
        return MirrorTest(0, 0, 0.0, 0.0, 1.0, 0.0, time.perf_counter() - start)
    return mirror_test(torch.stack(images), torch.tensor(kept), start=start)


def mirror_test(images: torch.Tensor, labels: torch.Tensor, side: int = SIDE,
                start: float | None = None) -> MirrorTest:
    """Classify `images` and their horizontal mirrors by the nearest leave-one-out class mean of the originals."""
    start = time.perf_counter() if start is None else start
    labels = labels.to(torch.long).cpu()
    if len(labels) < 2 or int(labels.max()) == int(labels.min()):  # one class: nothing to confuse a mirror with
        return MirrorTest(len(labels), 1, 1.0, 1.0, 1.0, 0.0, time.perf_counter() - start)
    x = features(images, side).cpu()
    m = features(images.flip(-1), side).cpu()
    classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=classes).float()
    sums = torch.zeros(classes, x.shape[1]).index_add_(0, labels, x)
    keep = counts[labels] >= 2  # a class of one image has no mean without it
    means = sums / counts.clamp_min(1)[:, None]

    def predict(v: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(v, means) ** 2
        # The own class's mean without the image itself: the original must not vote for itself.
        own = (sums[labels] - x) / (counts[labels] - 1).clamp_min(1)[:, None]
        d[torch.arange(len(v)), labels] = ((v - own) ** 2).sum(1)
        d[:, counts < 1] = math.inf
        return d.argmin(1)

    right = (predict(x) == labels)[keep]
    right_m = (predict(m) == labels)[keep]
    n = int(keep.sum())
    b = int((right & ~right_m).sum())  # only the original is right
    c = int((~right & right_m).sum())  # only the mirror is right
    z = (b - c) / math.sqrt(b + c) if b + c else 0.0
    chance = float(counts.max() / counts.sum())
    acc = float(right.float().mean()) if n else 0.0
    acc_m = float(right_m.float().mean()) if n else 0.0
    return MirrorTest(n, classes, acc, acc_m, chance, z, time.perf_counter() - start)
