"""Turns a dataset's splits plus the common YAML keys into a DataBundle on the memory or DataLoader path."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch.utils.data import Dataset

from resnet_cli.data.contract import DataBundle
from resnet_cli.data.loader import BadImagePolicy, LoaderSource
from resnet_cli.data.memory import MemorySource
from resnet_cli.data.transforms import build_eval_transform, build_train_transform, make_mixer, parse_augment
from resnet_cli.errors import UserError

LOADERS = ("memory", "dataloader")


class ArraySplit(NamedTuple):
    """A split held as uint8 NCHW images and int64 labels (CPU)."""

    images: torch.Tensor
    labels: torch.Tensor


class TensorImages(Dataset):
    """An ArraySplit as a map-style dataset of (uint8 CHW tensor, label) for the DataLoader path."""

    def __init__(self, split: ArraySplit) -> None:
        self.images, self.labels = split.images.cpu(), split.labels.cpu().tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.labels[index]


def make_bundle(
    class_names: list[str],
    train: ArraySplit | Dataset,
    val: ArraySplit | Dataset,
    *,
    device: Any = "cpu",
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    batch_size: int = 128,
    val_batch_size: int | None = None,
    num_workers: int = 2,
    image_size: int = 32,
    loader: str = "memory",
    augment: str = "standard",
    crop: str = "pad",
    pad: int = 4,
    pad_mode: str = "reflect",
    scale: Sequence[float] = (0.08, 1.0),
    resize: int | None = None,
    cutout: int = 0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    drop_last: bool = True,
    bad_policy: BadImagePolicy | None = None,
    summary: str = "",
) -> DataBundle:
    """Build the train/val BatchSources for `loader` and wrap them with the eval spec and summary."""
    if loader not in LOADERS:
        raise UserError(f"dataset.loader: unknown value '{loader}'; use memory or dataloader")
    if batch_size < 1 or (val_batch_size is not None and val_batch_size < 1):
        raise UserError("dataset.batch_size and dataset.val_batch_size must be >= 1")
    names = parse_augment(augment, loader)
    device = torch.device(device)
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    resize = resize or image_size
    mixer = make_mixer(len(class_names), mixup_alpha, cutmix_alpha)
    common = dict(seed=seed, rank=rank, world_size=world_size)
    if loader == "memory":
        if not (isinstance(train, ArraySplit) and isinstance(val, ArraySplit)):
            raise UserError("dataset.loader=memory needs a dataset that can be cached in memory")
        kw = dict(image_size=image_size, mean=mean, std=std, **common)
        train_src = MemorySource(
            train.images.to(device), train.labels, batch_size=batch_size, train=True, drop_last=drop_last,
            augment=names != ["none"], pad=pad, pad_mode=pad_mode, cutout=cutout, mixer=mixer, **kw,
        )
        val_src = MemorySource(val.images.to(device), val.labels, batch_size=val_batch_size or batch_size, train=False, **kw)
    else:
        kw = dict(num_workers=num_workers, pin_memory=device.type == "cuda", bad_policy=bad_policy, **common)
        train_tf = build_train_transform(
            names, image_size=image_size, crop=crop, pad=pad, pad_mode=pad_mode, scale=scale,
            cutout=cutout, mean=mean, std=std,
        )
        val_tf = build_eval_transform(resize, image_size, mean, std)
        as_ds = lambda s: TensorImages(s) if isinstance(s, ArraySplit) else s  # noqa: E731
        train_src = LoaderSource(as_ds(train), train_tf, batch_size=batch_size, train=True, drop_last=drop_last, mixer=mixer, **kw)
        val_src = LoaderSource(as_ds(val), val_tf, batch_size=val_batch_size or batch_size, train=False, **kw)
    eval_spec = {"resize": int(resize), "crop": int(image_size), "mean": mean, "std": std}
    return DataBundle(list(class_names), train_src, val_src, eval_spec, summary)


def array_summary(name: str, train: ArraySplit, val: ArraySplit, classes: int, loader: str, device: Any) -> str:
    """One line: split sizes, image size, loader and the bytes the uint8 images hold."""
    n, c, h, w = train.images.shape
    held = (train.images.numel() + val.images.numel()) / 2**20
    where = f"memory loader on {torch.device(device)}, uint8 {held:.0f} MiB" if loader == "memory" else "dataloader"
    return f"{name}: train {n} / val {len(val.labels)} images, {classes} classes, {h}x{w}, {where}"
