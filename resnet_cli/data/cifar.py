"""CIFAR-10 and CIFAR-100 from the official python-format archives into uint8 tensors."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_cli.data.contract import DataBundle
from resnet_cli.data.download import fetch_and_extract
from resnet_cli.data.pipeline import ArraySplit, array_summary, make_bundle
from resnet_cli.data.transforms import CIFAR10_MEAN, CIFAR10_STD
from resnet_cli.errors import UserError

# name -> (folder in the archive, train files, test files, meta file, label key, names key)
LAYOUTS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names"),
}
# The only globals a CIFAR pickle needs (numpy 1 and 2 spell the module differently).
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    # A pickle can run any code; the CIFAR files need nothing beyond numpy arrays.
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected global {module}.{name}")
        return super().find_class(module, name)


def read_pickle(path: Path) -> dict[str, Any]:
    """A CIFAR batch/meta pickle as a dict with str keys (Python 2 pickles included)."""
    try:
        with open(path, "rb") as f:
            raw = _ArrayUnpickler(f, encoding="latin1").load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise UserError(f"cannot read {path} ({exc}); delete its folder and run again to re-extract") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def load_cifar(folder: Path, files: list[str], label_key: str) -> ArraySplit:
    """Concatenate batch files into uint8 [N,3,32,32] images and int64 labels."""
    images, labels = [], []
    for name in files:
        batch = read_pickle(folder / name)
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return ArraySplit(torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)))


def _cifar(name: str, *, root: str, url: str, md5: str, download: bool, loader: str, device: Any, labels: str, **options: Any) -> DataBundle:
    folder_name, train_files, test_files, meta_file, label_key, names_key = LAYOUTS[name]
    if labels == "coarse":
        label_key, names_key = "coarse_labels", "coarse_label_names"
    options = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD, **options}
    folder = fetch_and_extract(url, root, folder_name, md5=md5, download=download)
    class_names = [_text(n) for n in read_pickle(folder / meta_file)[names_key]]
    train, val = load_cifar(folder, train_files, label_key), load_cifar(folder, test_files, label_key)
    summary = array_summary(name, train, val, len(class_names))
    bundle = make_bundle(class_names, train, val, loader=loader, device=device, summary=summary, **options)
    bundle.val_is_test = True  # validated on the official test set: the run's test numbers are its final epoch's
    return bundle


def cifar10(
    *,
    root: str = "data/cifar10",
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5: str = "c58f30108f718f92721af3b95e74349a",
    download: bool = True,
    loader: str = "memory",
    device: Any = "cpu",
    **options: Any,
) -> DataBundle:
    """CIFAR-10 (train 50k / test 10k as val); `options` are the common dataset keys (see make_bundle)."""
    return _cifar("cifar10", root=root, url=url, md5=md5, download=download, loader=loader, device=device, labels="fine", **options)


def cifar100(
    *,
    root: str = "data/cifar100",
    url: str = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5: str = "eb9058c3a382ffc7106e4002c42a8d85",
    download: bool = True,
    labels: str = "fine",
    loader: str = "memory",
    device: Any = "cpu",
    **options: Any,
) -> DataBundle:
    """CIFAR-100 with its 100 fine labels (or `labels: coarse`, the 20 superclasses)."""
    return _cifar("cifar100", root=root, url=url, md5=md5, download=download, loader=loader, device=device, labels=labels, **options)
