"""Reading image files safely: regular files only, fully decoded to RGB as displayed, in the caller's error handling.

The one place an image file is opened: the map-style dataset of (path, label) items the DataLoader
path reads, the decode of a whole split into the uint8 arrays of the memory path, the header read
of the start-up check, and the per-channel statistics of `mean: auto`. Every read applies the
EXIF orientation (a phone photo is stored sideways with a tag saying how to turn it), so training,
the decoded cache, the start-up sizes and prediction all see the image as a viewer shows it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset
from torchvision.transforms import v2

from resnet_cli.data.loader import BadImagePolicy, BadSample
from resnet_cli.data.pipeline import ArraySplit
from resnet_cli.data.transforms import to_rgb
from resnet_cli.errors import UserError
from resnet_cli.fileio import kind_of

Item = tuple[str, int]  # (path relative to the data folder, class index)

# The image files a class folder, resnet-predict and --annotate take: torchvision's IMG_EXTENSIONS plus .gif
# (PIL decodes its first frame), so what predict accepts is never dropped from training.
IMAGE_SUFFIXES = (".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")

_ORIENTATION = 0x0112  # EXIF Orientation: 5..8 turn the image a quarter, so width and height swap
_QUARTER_TURNS = (5, 6, 7, 8)
# Pillow's TIFF reader applies the orientation itself: its header size is already the displayed one.
_ORIENTED_BY_PILLOW = ("TIFF",)


def reason(exc: BaseException) -> str:
    """An exception as a short phrase for a bad-image line: its type and the first line of its message."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _open_regular(path: str | os.PathLike) -> Image.Image:
    # A FIFO, socket or device named like an image would block the read: only regular files are opened.
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file but {kind_of(mode)}")
    return Image.open(path)


def is_image_name(name: str) -> bool:
    """Whether a file name has one of IMAGE_SUFFIXES (any case)."""
    return name.lower().endswith(IMAGE_SUFFIXES)


def _orientation(img: Image.Image) -> int:
    # The EXIF orientation from what the header put in img.info (the base getexif: PNG's own would decode
    # the whole file to look for a late eXIf chunk). Unreadable EXIF means "as stored", as viewers do.
    try:
        return int(Image.Image.getexif(img).get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001  a malformed EXIF block is not a bad image
        return 1


def decode(path: str | os.PathLike) -> Image.Image:
    """Fully decode an image file into RGB as displayed (EXIF orientation applied); raises on unreadable,
    corrupt, truncated or non-regular files."""
    with _open_regular(path) as img:
        img.load()  # decode now, inside the caller's error handling, not lazily in a transform
        if _orientation(img) != 1:
            try:
                ImageOps.exif_transpose(img, in_place=True)  # in place: no copy of the (usual) unturned image
            except Exception:  # noqa: BLE001  malformed EXIF: as stored, as read_size said
                pass
        return to_rgb(img)


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) as displayed (EXIF orientation applied), from the header alone: cheap for every file."""
    with _open_regular(path) as img:
        w, h = img.size
        if img.format not in _ORIENTED_BY_PILLOW and _orientation(img) in _QUARTER_TURNS:
            return h, w
        return w, h


class ImageFiles(Dataset):
    """(path, label) items as a map-style dataset of (RGB PIL image, label); a bad file gives a BadSample."""

    def __init__(self, root: Path, items: list[Item]) -> None:
        self.root, self.items = Path(root), list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Image.Image, int] | BadSample:
        rel, label = self.items[index]
        path = self.root / rel
        try:
            return decode(path), label
        except Exception as exc:  # noqa: BLE001  a decoder failure is the file's: the main process reports it
            return BadSample(str(path), reason(exc))


def decode_split(root: Path, items: list[Item], size: int, policy: BadImagePolicy) -> ArraySplit:
    """Decode once into uint8 [N,3,size,size] (shorter side resized to `size`, centre crop) for the memory loader."""
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    images, labels = [], []
    for rel, label in items:
        try:
            images.append(tf(decode(root / rel)))
            labels.append(label)
        except Exception as exc:  # noqa: BLE001
            policy(str(root / rel), reason(exc))
    if not images:
        return ArraySplit(torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    return ArraySplit(torch.stack(images), torch.tensor(labels, dtype=torch.long))


def channel_stats(root: Path, paths: list[str], size: int = 64) -> tuple[list[float], list[float]]:
    """Per-channel mean/std over the train images (decoded, RGB, shorter side `size`), in 0..1 units."""
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.ToDtype(torch.float64, scale=True)])
    total = torch.zeros(3, dtype=torch.float64)
    sq, count = torch.zeros(3, dtype=torch.float64), 0
    for rel in paths:
        try:
            x = tf(decode(root / rel)).flatten(1)
        except Exception:  # noqa: BLE001  bad files were already reported by the scan / verify step
            continue
        total += x.sum(1)
        sq += (x**2).sum(1)
        count += x.shape[1]
    if not count:
        raise UserError(f"dataset.mean=auto: no readable train image under {root}")
    mean = total / count
    std = (sq / count - mean**2).clamp_min(1e-12).sqrt()
    return [round(float(m), 4) for m in mean], [round(float(s), 4) for s in std]
