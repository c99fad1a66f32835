"""Turns a dataset's splits plus the common YAML keys into a DataBundle on the memory or DataLoader path."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, NamedTuple, Sequence

import torch
from torch.utils.data import Dataset, Subset

from resnet_cli.data import mirror
from resnet_cli.data.contract import BatchSource, DataBundle, generator
from resnet_cli.data.loader import BadImagePolicy, LoaderSource
from resnet_cli.data.memory import MemorySource
from resnet_cli.data.policy import (Geometry, choose_loader, resolve_balance, resolve_batch, resolve_flips,
                                    resolve_geometry, usable_cores)
from resnet_cli.data.transforms import build_eval_transform, build_train_transform, make_mixer, parse_augment
from resnet_cli.errors import UserError

log = logging.getLogger(__name__)


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
    batch_size: int | str = 128,
    val_batch_size: int | None = None,
    num_workers: int | str = "auto",
    image_size: int | str = 32,
    loader: str = "auto",
    augment: str = "standard",
    flip: str | bool = "auto",
    vflip: str | bool = False,
    crop: str = "auto",
    pad: int | str = "auto",
    pad_mode: str = "reflect",
    scale: Sequence[float] = (0.5, 1.0),
    resize: int | str | None = "auto",
    cutout: int = 0,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
    drop_last: bool = True,
    memory_budget: float = 0.25,
    geometry: Geometry | None = None,
    loader_why: str | None = None,
    bad_policy: BadImagePolicy | None = None,
    summary: str = "",
    val_files: list[str] | None = None,
    test: ArraySplit | Dataset | None = None,
    balance: str = "auto",
) -> DataBundle:
    """Build the train/val BatchSources for `loader` and wrap them with the eval spec and summary.

    `geometry` and `loader` (with `loader_why`) come resolved from builders that needed them
    before decoding (image folders); for in-memory arrays they are resolved here. `flip: auto`
    is resolved here for every dataset, from the training images (resnet_cli.data.mirror).
    """
    arrays = isinstance(train, ArraySplit) and isinstance(val, ArraySplit)
    batch_size, batch_why = resolve_batch(batch_size, len(train.labels) if arrays else len(train))
    names = parse_augment(augment)
    device = torch.device(device)
    if geometry is None:
        native = [tuple(train.images.shape[:1:-1])] if arrays else []
        geometry = resolve_geometry(image_size, resize=resize, crop=crop, pad=pad, native=native)
    held = train.images.numel() + val.images.numel() if arrays else 0
    if loader_why is None:  # not yet chosen by a builder that had to decide before decoding
        loader, loader_why = choose_loader(loader, names, held, memory_budget, device, device_memory(device))
    if loader == "memory" and not arrays:
        raise UserError("dataset.loader=memory needs a dataset that can be cached in memory")
    augmenting = names != ["none"]
    geometry = with_flips(geometry, flip, vflip, train if augmenting else None)
    labels = train.labels if arrays else getattr(train, "labels", None)
    if labels is None:  # a map-style dataset of files: ImageFiles keeps (path, label) items
        labels = [label for _, label in getattr(train, "items", [])]
    labels = torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(labels, minlength=len(class_names))
    balance, balance_why = resolve_balance(balance, counts.tolist())
    # balance=sampler: each sample drawn in inverse proportion to its class's size (every class equally often).
    weights = (1.0 / counts.double().clamp(min=1))[labels] if balance == "sampler" else None
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    channels = int(train.images.shape[1]) if arrays else 3  # image files decode to RGB
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"dataset.mean and dataset.std need {channels} numbers each, one per image channel "
                        f"(got {len(mean)} and {len(std)})")
    size = geometry.image_size
    mixer = make_mixer(len(class_names), mixup_alpha, cutmix_alpha)
    common = dict(seed=seed, rank=rank, world_size=world_size)
    calib_batch = max(2, val_batch_size or batch_size)  # update_bn trains BatchNorm: never a batch of one
    if loader == "memory":
        kw = dict(image_size=size, crop=geometry.crop, scale=scale, mean=mean, std=std, **common)
        train_src = MemorySource(
            train.images.to(device), train.labels, batch_size=batch_size, train=True, drop_last=drop_last,
            augment=augmenting, pad=geometry.pad, pad_mode=pad_mode, flip=geometry.hflip, vflip=geometry.vflip,
            cutout=cutout, mixer=mixer, weights=weights, **kw,
        )
        val_src = MemorySource(val.images.to(device), val.labels, batch_size=val_batch_size or batch_size, train=False, **kw)
        test_src = (MemorySource(test.images.to(device), test.labels, batch_size=val_batch_size or batch_size,
                                 train=False, **kw) if isinstance(test, ArraySplit) else None)
        workers = 0

        def calibration(k: int) -> BatchSource:
            idx = calibration_indices(len(train.labels), without_lone_tail(k, calib_batch), seed).to(train_src.device)
            kw_one = {**kw, "rank": 0, "world_size": 1}  # every rank sees the same images: identical BN buffers
            return MemorySource(train_src.images[idx], train_src.labels[idx], batch_size=calib_batch,
                                train=False, **kw_one)
    else:
        workers = resolve_workers(num_workers)
        kw = dict(num_workers=workers, pin_memory=device.type == "cuda", bad_policy=bad_policy, **common)
        train_tf = build_train_transform(
            names, image_size=size, crop=geometry.crop, pad=geometry.pad, pad_mode=pad_mode, scale=scale,
            cutout=cutout, mean=mean, std=std, hflip=geometry.hflip, vflip=geometry.vflip,
        )
        val_tf = build_eval_transform(geometry.resize, size, mean, std, channels)
        as_ds = lambda s: TensorImages(s) if isinstance(s, ArraySplit) else s  # noqa: E731
        train_src = LoaderSource(as_ds(train), train_tf, batch_size=batch_size, train=True, drop_last=drop_last,
                                 mixer=mixer, weights=weights, **kw)
        val_src = LoaderSource(as_ds(val), val_tf, batch_size=val_batch_size or batch_size, train=False, **kw)
        test_src = (LoaderSource(as_ds(test), val_tf, batch_size=val_batch_size or batch_size, train=False, **kw)
                    if test is not None else None)

        def calibration(k: int) -> BatchSource:
            ds = as_ds(train)
            idx = calibration_indices(len(ds), without_lone_tail(k, calib_batch), seed).tolist()
            return LoaderSource(Subset(ds, idx), val_tf, batch_size=calib_batch, train=False,
                                **{**kw, "rank": 0, "world_size": 1})
    eval_spec = {"resize": int(geometry.resize), "crop": int(size), "mean": mean, "std": std, "channels": channels}
    per_image = [n for n in names if n not in ("none", "standard")]
    plan = (f"{geometry.describe(augmenting, scale)}" + (f", + {'+'.join(per_image)} (set)" if per_image else "")
            + f"; batch {batch_size} ({batch_why}); balance {balance} ({balance_why}); loader {loader} ({loader_why})"
            + (f", {workers} workers" if loader == "dataloader" else ""))
    # Whether mirroring keeps the classes, for flip TTA: what the user set or the mirror test found
    # (unknown when flip=auto had no augmentation to decide for, so the test did not run).
    mirror_ok = geometry.hflip if augmenting or str(flip).lower() != "auto" else None
    return DataBundle(list(class_names), train_src, val_src, eval_spec, summary, plan=plan, workers=workers,
                      calibration=calibration, class_counts=counts.tolist(), val_files=val_files,
                      mirror_ok=mirror_ok, test=test_src, balance=balance)


def without_lone_tail(k: int, batch_size: int) -> int:
    """k, less one when k images in batches of `batch_size` would end on a batch of one.

    update_bn runs the model in train mode, where BatchNorm cannot take one sample at 1x1 maps.
    """
    return k - 1 if k > 1 and k % batch_size == 1 else k


def with_flips(geometry: Geometry, flip: str | bool, vflip: str | bool, train: ArraySplit | Dataset | None) -> Geometry:
    """`geometry` with dataset.flip / vflip resolved; flip=auto asks the training images (None: not augmenting)."""

    def test() -> mirror.MirrorTest:
        if isinstance(train, ArraySplit):
            result = mirror.measure_arrays(train.images, train.labels)
        else:
            result = mirror.measure_dataset(train)
        # The cost stays out of the plan line, which is the same for the same data.
        log.debug("flip auto: mirror test of %d train images in %.2f s", result.images, result.seconds)
        return result

    hflip, vertical, why = resolve_flips(flip, vflip, test if train is not None else None)
    return replace(geometry, hflip=hflip, vflip=vertical, flip_reason=why)


def calibration_indices(n: int, k: int, seed: int) -> torch.Tensor:
    """k of n training indices drawn once from `seed` (sorted: files are read in order)."""
    return torch.randperm(n, generator=generator(seed, 0xCA1B))[:k].sort().values


def device_memory(device: torch.device) -> int:
    """Bytes of memory on a CUDA device (0 for the CPU: the caller uses RAM)."""
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).total_memory


def resolve_workers(num_workers: int | str) -> int:
    """dataset.num_workers: auto = one worker per usable core beyond the first, at most 8."""
    if str(num_workers).lower() == "auto":
        return min(8, max(0, usable_cores() - 1))
    return int(num_workers)




def array_summary(name: str, train: ArraySplit, val: ArraySplit, classes: int) -> str:
    """One line: split sizes, classes and image size."""
    n, c, h, w = train.images.shape
    return f"{name}: train {n} / val {len(val.labels)} images, {classes} classes, {h}x{w}"
