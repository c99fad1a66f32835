"""DataLoader path: per-image torchvision transforms in worker processes, seeded per sample so any worker count gives the same batches."""

from __future__ import annotations

import atexit
import logging
import signal
import weakref
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from resnet_cli.data.contract import Batch, epoch_order, mix_seed, num_batches, sample_seeds, shard
from resnet_cli.data.transforms import BatchMixer
from resnet_cli.errors import UserError

log = logging.getLogger(__name__)


# The signals a scheduler or a terminal sends to the whole process group to stop a run.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader worker_init_fn: the worker ignores SIGTERM, SIGUSR1 and SIGINT.

    SLURM, `timeout` and supervisors signal the whole process group. A worker that died of
    the signal would make the main process fail with "DataLoader worker is killed by signal"
    before it could save; ignoring it leaves the decision to the main process, which
    finishes the step, saves last.pt and shuts the workers down itself (LoaderSource.close).
    It draws no random numbers: batches stay seeded per sample, as before.
    """
    for name in STOP_SIGNALS:
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


_OPEN: "weakref.WeakSet[LoaderSource]" = weakref.WeakSet()


@atexit.register
def _close_open_sources() -> None:
    # Registered after torch and multiprocessing, so it runs before them at exit: workers that
    # ignore SIGTERM must be shut down here, or multiprocessing's exit handler would wait on them.
    for source in list(_OPEN):
        source.close()


class BadSample(NamedTuple):
    """Marker a dataset returns instead of raising, so no worker dies on a bad image."""

    path: str
    reason: str


class BadImagePolicy:
    """What to do when an image cannot be read: 'error' stops at once, 'skip' counts up to a budget."""

    def __init__(self, on_bad_image: str = "error", max_bad_images: int = 0) -> None:
        self.mode, self.budget = on_bad_image, max_bad_images
        self.skipped: dict[str, str] = {}

    def __call__(self, path: str, reason: str) -> None:
        """Record one bad file: raise (error mode, or budget spent) or log it once and count it."""
        if self.mode == "error":
            raise UserError(f"bad image {path}: {reason} (fix or delete it, or set dataset.on_bad_image=skip)")
        if path in self.skipped:
            return
        self.skipped[path] = reason
        log.warning("skipping bad image %s: %s", path, reason)
        if len(self.skipped) > self.budget:
            raise UserError(
                f"{len(self.skipped)} bad images exceed dataset.max_bad_images={self.budget} "
                f"(last: {path}: {reason}); fix the data or raise the budget"
            )


class SeededDataset(Dataset):
    """Wraps a (image, label) dataset: item (index, seed) -> transform(image) drawn from that seed alone.

    The base dataset decodes fully inside its __getitem__ and returns a BadSample
    instead of raising, so decoding errors never escape a worker.
    """

    def __init__(self, base: Any, transform: Callable) -> None:
        self.base, self.transform = base, transform

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int] | BadSample:
        index, seed = key
        item = self.base[index]
        if isinstance(item, BadSample):
            return item
        image, label = item
        # v2 transforms draw from the global CPU generator: fork it, seed it from the
        # sample alone, and the draw no longer depends on which worker ran it or when.
        threads = torch.get_num_threads()
        try:
            # One image is too small to split across threads; with num_workers=0 on a busy machine
            # the intra-op thread handshake alone costs milliseconds per op (workers already use 1).
            torch.set_num_threads(1)
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also seeds every accelerator
                return self.transform(image), label
        finally:
            torch.set_num_threads(threads)


class EpochBatchSampler(Sampler):
    """Batches of (index, sample_seed) for this rank: order from (seed, epoch), entered at any batch."""

    def __init__(self, num: int, batch_size: int, *, shuffle: bool, seed: int, rank: int, world_size: int, drop_last: bool,
                 weights: torch.Tensor | None = None) -> None:
        self.num, self.batch_size, self.shuffle, self.seed = num, batch_size, shuffle, seed
        self.weights = weights.double().cpu() if weights is not None and shuffle else None  # balance=sampler
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.start = 0, 0
        self.num_samples = len(shard(torch.arange(num), rank, world_size, equal=shuffle))

    def total(self) -> int:
        """Batches in a whole epoch."""
        return num_batches(self.num_samples, self.batch_size, self.drop_last, train=self.shuffle)

    def __len__(self) -> int:
        return max(0, self.total() - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        positions = shard(torch.arange(self.num), self.rank, self.world_size, equal=self.shuffle)
        order = epoch_order(self.num, self.shuffle, self.seed, self.epoch, self.weights)[positions].numpy()
        # A sample's augmentation seed follows its index; with draws of replacement (balance=sampler) its
        # position in the epoch, so a sample drawn twice is augmented two ways.
        seeds = sample_seeds(mix_seed(self.seed, self.epoch), positions.numpy() if self.weights is not None else order)
        for b in range(self.start, self.total()):
            sl = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield list(zip(order[sl].tolist(), seeds[sl].tolist()))


def collate_good(samples: list) -> tuple[torch.Tensor | None, torch.Tensor | None, list[BadSample]]:
    """Collate the good samples and pass the bad markers through, so the main process decides."""
    bad = [s for s in samples if isinstance(s, BadSample)]
    good = [s for s in samples if not isinstance(s, BadSample)]
    if not good:
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad


class LoaderSource:
    """A BatchSource over a torch DataLoader with deterministic, resumable, rank-sharded order."""

    def __init__(
        self,
        dataset: Any,
        transform: Callable,
        *,
        batch_size: int,
        train: bool,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        mixer: BatchMixer | None = None,
        bad_policy: BadImagePolicy | None = None,
        weights: torch.Tensor | None = None,
    ) -> None:
        self.dataset = SeededDataset(dataset, transform)
        self.sampler = EpochBatchSampler(
            len(dataset), batch_size, shuffle=train, seed=seed, rank=rank, world_size=world_size,
            drop_last=drop_last and train, weights=weights,
        )
        self.batch_size, self.num_samples, self.seed, self.rank = batch_size, self.sampler.num_samples, seed, rank
        self.mixer, self.train = (mixer if train else None), train
        self.bad_policy = bad_policy or BadImagePolicy()
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self._loader: DataLoader | None = None

    def __len__(self) -> int:
        return self.sampler.total()

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle from (seed, epoch)."""
        self.sampler.epoch = epoch

    def _make_loader(self) -> DataLoader:
        # Built once: persistent workers re-read the sampler's epoch/start at every iter().
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            num_workers=self.num_workers,
            collate_fn=collate_good,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            worker_init_fn=ignore_stop_signals if self.num_workers > 0 else None,
            # Without its own generator a DataLoader draws its base seed from the global RNG,
            # which would shift the training RNG stream and break exact resume.
            generator=torch.Generator().manual_seed(mix_seed(self.seed, self.rank, 0xD1)),
        )

    def iter_from(self, start: int = 0) -> Iterator[Batch]:
        """Batches start..len-1 of the current epoch; bad images are reported here, in the main process."""
        if self._loader is None:
            self._loader = self._make_loader()
            if self.num_workers > 0:
                _OPEN.add(self)
        self.sampler.start = start
        for b, (images, targets, bad) in enumerate(self._loader, start):
            for sample in bad:
                self.bad_policy(sample.path, sample.reason)
            if images is None or (self.train and bad and len(images) == 1):
                continue  # skipped images left nothing, or one image BatchNorm cannot train on
            if self.mixer is not None:
                images, targets = self.mixer(images, targets, mix_seed(self.seed, self.sampler.epoch, self.rank, b))
            yield images, targets

    def __iter__(self) -> Iterator[Batch]:
        return self.iter_from(0)

    def close(self) -> None:
        """Shut the worker processes down (they ignore stop signals, so exit must not rely on terminating them)."""
        loader, self._loader = self._loader, None
        _OPEN.discard(self)
        iterator = getattr(loader, "_iterator", None) if loader is not None else None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        for worker in getattr(iterator, "_workers", []) or []:
            if worker.is_alive():  # still busy after torch's graceful shutdown: SIGTERM is ignored, so kill
                worker.kill()
                worker.join(timeout=5)

