"""The data layer's contract: DataBundle, the BatchSource protocol, seed mixing and rank sharding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

Batch = tuple[torch.Tensor, torch.Tensor]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_U64 = (1 << 64) - 1


@runtime_checkable
class BatchSource(Protocol):
    """An epoch of batches that can be reseeded per epoch and entered at any batch (resume)."""

    batch_size: int
    num_samples: int

    def __len__(self) -> int: ...

    def set_epoch(self, epoch: int) -> None: ...

    def iter_from(self, start: int = 0) -> Iterator[Batch]: ...


@dataclass
class DataBundle:
    """What a dataset builder hands the runner."""

    class_names: list[str]
    train: BatchSource
    val: BatchSource
    eval_spec: dict
    summary: str
    plan: str = ""  # the resolved geometry and loader, each `auto` with its reason (start-up summary)
    workers: int = 0  # DataLoader worker processes per loader (0 on the in-memory path)
    # calibration(k): k fixed training images in the eval view, the same on every rank and epoch
    # (no augmentation, no random draw), for re-estimating BatchNorm statistics before validation.
    calibration: Callable[[int], BatchSource] | None = None
    class_counts: list[int] = field(default_factory=list)  # training images per class (imbalance, monitor auto)
    val_files: list[str] | None = None  # the val samples' files in val order (folders); None: arrays (by index)
    test: BatchSource | None = None  # a held-out test split (a test/ folder beside val/), evaluated once at the end
    val_is_test: bool = False  # the validation split is the dataset's official test set (CIFAR, MNIST)
    mirror_ok: bool | None = None  # whether mirroring keeps the classes (dataset.flip resolved); None: unknown
    balance: str = "off"  # dataset.balance resolved: off | sampler (in the train source) | loss (the criterion)


def _splitmix(x: np.ndarray) -> np.ndarray:
    # splitmix64: a bijective 64-bit mixer; numpy arrays wrap on overflow without warnings.
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MUL1
    x = (x ^ (x >> np.uint64(27))) * _MUL2
    return x ^ (x >> np.uint64(31))


def mix_seed(*keys: int) -> int:
    """A 63-bit seed that depends only on the integer keys (seed, epoch, index, ...), on any platform."""
    h = np.zeros(1, dtype=np.uint64)
    for key in keys:
        h = _splitmix(h ^ np.array([int(key) & _U64], dtype=np.uint64))
    return int(h[0]) >> 1


def sample_seeds(base: int, indices: np.ndarray) -> np.ndarray:
    """Per-sample 63-bit seeds from a base seed and sample indices (vectorised mix_seed(base, i))."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    h = _splitmix(np.full(idx.shape, int(base) & _U64, dtype=np.uint64) ^ idx)
    return (h >> np.uint64(1)).astype(np.int64)


def generator(*keys: int) -> torch.Generator:
    """A CPU torch.Generator seeded from mix_seed(*keys); CPU so every device draws the same numbers."""
    return torch.Generator().manual_seed(mix_seed(*keys))


def epoch_order(num: int, shuffle: bool, seed: int, epoch: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """The epoch's global sample order: a permutation seeded by (seed, epoch), or 0..num-1.

    With per-sample `weights` (dataset.balance=sampler) it is `num` draws with replacement in proportion
    to them instead, so every class is drawn about equally often.
    """
    if not shuffle:
        return torch.arange(num)
    g = generator(seed, epoch, 0x5EED)
    if weights is not None:
        return torch.multinomial(weights, num, replacement=True, generator=g)
    return torch.randperm(num, generator=g)


def shard(order: torch.Tensor, rank: int, world_size: int, equal: bool) -> torch.Tensor:
    """This rank's slice of the order: equal shares (train; the tail is dropped) or uneven (val).

    Uneven sharding pads nothing, so the val shards of all ranks together cover every
    sample exactly once; metrics must be summed across ranks, not averaged.
    """
    if world_size == 1:
        return order
    stop = len(order) // world_size * world_size if equal else len(order)
    return order[rank:stop:world_size]


def num_batches(num: int, batch_size: int, drop_last: bool, *, train: bool = False) -> int:
    """Batches in an epoch of `num` samples; a training epoch never ends on a remainder batch of one sample.

    BatchNorm cannot train on one sample (torch raises mid-epoch once its maps are 1x1, and one image's
    statistics are noise anyway), so under drop_last=false a final train batch of one is dropped.
    """
    full, rest = divmod(num, batch_size)
    if drop_last:
        return full
    return full + int(rest > (1 if train else 0))
