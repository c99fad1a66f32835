"""Data-loading throughput: the in-memory CIFAR pipeline vs torchvision's PIL-per-image DataLoader, and vs training.

    python bench/bench_data.py [--images 50000] [--baseline-images 10000] [--batch-size 128]

Prints images/s and two ratios (targets: memory/PIL >= 5x, memory/resnet18-training >= 10x).
Offline: synthetic CIFAR-shaped uint8 data, CPU only.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from resnet_cli.data.pipeline import ArraySplit, make_bundle
from resnet_cli.data.transforms import CIFAR10_MEAN, CIFAR10_STD


class PilCifar(Dataset):
    """What torchvision.datasets.CIFAR10 does per item: a PIL image from the uint8 HWC array, then the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def rate(batches, limit: int) -> float:
    """Images/s over the first `limit` images of an iterable of (x, y) batches (first batch excluded: warm-up)."""
    it = iter(batches)
    next(it)
    seen, start = 0, time.perf_counter()
    for x, _ in it:
        seen += len(x)
        if seen >= limit:
            break
    return seen / (time.perf_counter() - start)


def main() -> None:
    """Run the three measurements and print the ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50000)
    ap.add_argument("--baseline-images", type=int, default=10000, help="images timed on the (slow) PIL path")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-steps", type=int, default=4)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.images,), generator=g)
    bs = args.batch_size

    bundle = make_bundle([str(i) for i in range(10)], ArraySplit(images, labels), ArraySplit(images[:1000], labels[:1000]),
                         loader="memory", batch_size=bs, image_size=32, pad=4, pad_mode="reflect",
                         mean=CIFAR10_MEAN, std=CIFAR10_STD, seed=0)
    assert bundle.train.images.dtype == torch.uint8
    memory = rate(bundle.train.iter_from(0), args.images)

    pil_tf = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(),
                         v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    ds = PilCifar(images.permute(0, 2, 3, 1).numpy(), labels.numpy(), pil_tf)
    loader = DataLoader(ds, batch_size=bs, shuffle=True, num_workers=2, drop_last=True,
                        generator=torch.Generator().manual_seed(0), persistent_workers=False)
    pil = rate(loader, args.baseline_images)

    from resnet_cli.models import create_model

    model = create_model("resnet18", num_classes=10, image_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    x, y = next(bundle.train.iter_from(0))
    model.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(args.train_steps):
        step()
    train = args.train_steps * bs / (time.perf_counter() - start)

    print(f"threads {torch.get_num_threads()}, batch {bs}, {args.images} synthetic CIFAR images (uint8, "
          f"{bundle.train.images.numel() / 2**20:.0f} MiB held once)")
    print(f"{'in-memory batch pipeline':<44}{memory:>10.0f} images/s")
    print(f"{'torchvision PIL per-image, num_workers=2':<44}{pil:>10.0f} images/s")
    print(f"{'resnet18 (CIFAR stem) training step':<44}{train:>10.0f} images/s")
    print(f"ratio memory / PIL DataLoader   = {memory / pil:6.1f}x  (target >= 5x)")
    print(f"ratio memory / resnet18 training = {memory / train:6.1f}x  (target >= 10x)")


if __name__ == "__main__":
    main()
