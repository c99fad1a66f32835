"""Datasets for resnet-cli: builders that return a DataBundle of train/val BatchSources.

Each dataset YAML names a builder here (`_target_: resnet_cli.data.<builder>`,
`_partial_: true`); the runner calls it with device, seed, rank and world_size.
"""

from __future__ import annotations

from resnet_cli.data.cifar import cifar10, cifar100
from resnet_cli.data.contract import Batch, BatchSource, DataBundle
from resnet_cli.data.imagefolder import flowers, flowers102, imagefolder
from resnet_cli.data.mnist import fashion_mnist, kmnist, mnist
from resnet_cli.data.synthetic import shapes
from resnet_cli.data.transforms import build_eval_transform, to_rgb

__all__ = [
    "Batch", "BatchSource", "DataBundle", "build_eval_transform", "to_rgb",
    "cifar10", "cifar100", "fashion_mnist", "flowers", "flowers102", "imagefolder", "kmnist", "mnist", "shapes",
]
