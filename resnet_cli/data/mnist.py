"""MNIST, Fashion-MNIST and KMNIST from their four idx files into 1-channel uint8 tensors, via torchvision.

torchvision's dataset classes give the mirrors, the pinned md5s and the class names, and its
`read_image_file` / `read_label_file` parse the files. What is ours: where the files may lie (a
folder holding them directly, gzip'd or not, as Debian's `dataset-fashion-mnist` installs them
under /usr/share/datasets, or torchvision's <root>/<Class>/raw/), reading .gz files without
writing next to them (decompressed into a temporary folder), an atomic md5-checked download of the
missing ones (resnet_cli.data.download.fetch: torchvision's own download needs an HTTP
Content-Length and writes straight to the final name), and one line naming the file when one is
missing or damaged.
"""

from __future__ import annotations

import gzip
import math
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torchvision.datasets import KMNIST, MNIST, FashionMNIST
from torchvision.datasets.mnist import read_image_file, read_label_file
from torchvision.datasets.utils import extract_archive

from resnet_cli.data.contract import DataBundle
from resnet_cli.data.download import fetch
from resnet_cli.data.pipeline import ArraySplit, array_summary, make_bundle
from resnet_cli.errors import UserError
from resnet_cli.fileio import regular_file

# Role (the dataset.md5s key) -> the file's name in the format, without .gz (torchvision's `resources` add it).
FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# The idx magic number: 0x08 (unsigned bytes) << 8 | the number of dimensions.
MAGIC = {"images": 0x0803, "labels": 0x0801}  # 2051, 2049
DATASETS: dict[str, type[MNIST]] = {"mnist": MNIST, "fashion_mnist": FashionMNIST, "kmnist": KMNIST}
# The pixel mean and std (in [0, 1]) over each dataset's 60,000 training images (x / 255: x.mean(), x.std()).
# Fashion-MNIST's computed once from Debian's copy; MNIST's as PyTorch's MNIST example uses them; KMNIST's as
# published with the dataset. The YAMLs in configs/dataset/ hold the same numbers.
STATS: dict[str, tuple[tuple[float], tuple[float]]] = {
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "kmnist": ((0.1918,), (0.3483,)),
}


def _present(folder: Path, stem: str) -> Path | None:
    """The file `stem` or `stem.gz` in folder (the uncompressed one first), or None; a FIFO is refused unopened."""
    for path in (folder / stem, folder / f"{stem}.gz"):
        if os.path.lexists(path):
            return regular_file(path, "idx file")
    return None


def _resources(cls: type[MNIST], mirrors: Sequence[str] | None, md5s: Mapping[str, Any] | None) -> dict:
    """role -> (file name, md5, [urls]): torchvision's mirrors and md5s, each replaced where the config gives one."""
    pinned = dict(cls.resources)
    prefixes = list(mirrors) if mirrors else list(cls.mirrors)
    out = {}
    for role, stem in FILES.items():
        name = f"{stem}.gz"
        md5 = (md5s or {}).get(role) or pinned[name]
        out[role] = (name, str(md5), [f"{prefix.rstrip('/')}/{name}" for prefix in prefixes])
    return out


def locate(name: str, root: str | os.PathLike, *, download: bool, mirrors: Sequence[str] | None = None,
           md5s: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """role -> path of the four idx files of dataset `name` under root, downloading the missing ones if allowed.

    The first of <root>/<Class>/raw/ (torchvision's layout, one folder per dataset) and <root> itself
    that holds all four files is used; otherwise a download fills <root>/<Class>/raw/ with the .gz files.
    """
    cls = DATASETS[name]
    root = Path(root).expanduser()
    raw = root / cls.__name__ / "raw"
    found = {folder: {role: _present(folder, stem) for role, stem in FILES.items()} for folder in (raw, root)}
    for files in found.values():
        if all(files.values()):
            return files  # type: ignore[return-value]
    if not download:
        # Name the folder that holds the most of them (the one the user meant), root on a tie.
        folder = max((root, raw), key=lambda f: sum(p is not None for p in found[f].values()))
        missing = next(stem for role, stem in FILES.items() if found[folder][role] is None)
        raise UserError(f"{name}: {folder / missing}(.gz) not found; put the four idx files there, gzip'd or not "
                        f"({', '.join(FILES.values())}), or set dataset.download=true to fetch them when online")
    files = dict(found[raw])
    for role, (filename, md5, urls) in _resources(cls, mirrors, md5s).items():
        if files[role] is None:
            files[role] = _download(urls, raw / filename, md5)
    return files  # type: ignore[return-value]


def _download(urls: list[str], dest: Path, md5: str) -> Path:
    """dest, fetched (atomically, md5-checked) from the first of urls that works."""
    errors: list[str] = []
    for url in urls:
        try:
            return fetch(url, dest, md5=md5)
        except UserError as exc:
            errors.append(str(exc))
        except OSError as exc:  # the folder cannot be made or written: no other mirror would help
            raise UserError(f"cannot download into {dest.parent} ({exc.strerror or exc}); put {dest.name} there by "
                            f"hand, or point dataset.root at a folder you can write to") from None
    tried = f" (also tried {len(urls) - 1} other mirror{'s' * (len(urls) > 2)})" if len(urls) > 1 else ""
    raise UserError(f"{errors[-1]}{tried}")


def _diagnosis(plain: Path, kind: str, decompressed: bool) -> str:
    """What is wrong with an idx file torchvision's reader refused, in words (for the error line)."""
    size = plain.stat().st_size
    with open(plain, "rb") as f:
        head = f.read(16)
    holds = f"{'its decompressed content is' if decompressed else 'it is'} {size} bytes"
    if len(head) < 4:
        return f"{holds}, too short for an idx header"
    magic = int.from_bytes(head[:4], "big")
    if magic != MAGIC[kind]:
        return f"magic number {magic} where idx {kind} have {MAGIC[kind]}: not an idx {kind} file"
    ndim = magic & 0xFF
    if len(head) < 4 * (ndim + 1):
        return f"{holds}, too short for its header"
    dims = [int.from_bytes(head[4 * (i + 1):4 * (i + 2)], "big") for i in range(ndim)]
    need = 4 * (ndim + 1) + math.prod(dims)
    return f"{holds} where its header ({' x '.join(map(str, dims))}) needs {need}: truncated or damaged"


def read_idx(path: Path, kind: str, fix: str) -> torch.Tensor:
    """An idx images ([N, H, W] uint8) or labels ([N] int64) file, gzip'd or not, by torchvision's readers.

    A .gz file is decompressed into a temporary folder (never beside it: the data folder may be
    read-only, like /usr/share/datasets); any fault is one UserError naming the file, ending in `fix`.
    """
    reader = read_image_file if kind == "images" else read_label_file
    with tempfile.TemporaryDirectory(prefix="resnet-cli-idx-") as tmp:
        plain = path
        if path.name.endswith(".gz"):
            try:
                plain = Path(extract_archive(str(path), tmp))
            except EOFError:
                raise UserError(f"{path}: not a complete gzip file (it ends early); {fix}") from None
            except (gzip.BadGzipFile, zlib.error) as exc:  # other OSErrors name their file themselves
                raise UserError(f"{path}: not a valid gzip file ({exc}); {fix}") from None
        try:
            return reader(str(plain))
        except (AssertionError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            # torchvision's reader says little (a bare assert, a shape error): say what is wrong with the file.
            raise UserError(f"{path}: {_diagnosis(plain, kind, plain is not path)}; {fix}") from exc


def load_split(files: Mapping[str, Path], split: str, classes: int, limit: int | None, fix: str) -> ArraySplit:
    """One split ("train" or "test") as uint8 [N, 1, H, W] images and int64 labels, the first `limit` if given."""
    images_path, labels_path = files[f"{split}_images"], files[f"{split}_labels"]
    images = read_idx(images_path, "images", fix)
    labels = read_idx(labels_path, "labels", fix)
    if len(images) != len(labels):
        raise UserError(f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}; "
                        f"{fix}")
    if len(labels) and int(labels.max()) >= classes:
        raise UserError(f"{labels_path}: label {int(labels.max())} is outside 0..{classes - 1}; {fix}")
    if limit is not None and limit < len(labels):
        # A copy: a slice would keep the whole decoded file alive.
        images, labels = images[:limit].clone(), labels[:limit].clone()
    return ArraySplit(images.unsqueeze(1), labels)  # one channel, kept as one until the model


def _idx_dataset(name: str, *, root: str, download: bool, mirrors: Sequence[str] | None,
                 md5s: Mapping[str, Any] | None, num_train: int | None, num_val: int | None, channels: int,
                 loader: str, device: Any, **options: Any) -> DataBundle:
    cls = DATASETS[name]
    if int(channels) != 1:
        raise UserError(f"dataset.channels={channels}: the idx files hold 1-channel (grayscale) images; leave it at 1")
    mean, std = STATS[name]
    options = {"mean": mean, "std": std, "image_size": "auto", **options}  # auto: the files' own 28 px
    files = locate(name, root, download=download, mirrors=mirrors, md5s=md5s)
    fix = (f"replace it with the original {cls.__name__} file, or delete it: dataset.download=true fetches it "
           f"when online")
    classes = list(cls.classes)
    train = load_split(files, "train", len(classes), num_train, fix)
    val = load_split(files, "test", len(classes), num_val, fix)
    if train.images.shape[2:] != val.images.shape[2:]:
        size = "x".join(map(str, train.images.shape[2:]))
        raise UserError(f"{files['test_images']}: its images are not {size} like those of "
                        f"{files['train_images'].name}; {fix}")
    summary = f"{array_summary(name, train, val, len(classes))}, 1 channel, from {files['train_images'].parent}"
    bundle = make_bundle(classes, train, val, loader=loader, device=device, summary=summary, **options)
    bundle.val_is_test = True  # validated on the official test set: the run's test numbers are its final epoch's
    return bundle


def _builder(name: str):
    def build(*, root: str = f"data/{name}", download: bool = True, mirrors: Sequence[str] | None = None,
              md5s: Mapping[str, Any] | None = None, num_train: int | None = None, num_val: int | None = None,
              channels: int = 1, loader: str = "memory", device: Any = "cpu", **options: Any) -> DataBundle:
        return _idx_dataset(name, root=root, download=download, mirrors=mirrors, md5s=md5s, num_train=num_train,
                            num_val=num_val, channels=channels, loader=loader, device=device, **options)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{DATASETS[name].__name__} (train 60k / the official test 10k as val) as 1-channel uint8 "
                     f"arrays; `options` are the common dataset keys (see make_bundle).")
    return build


mnist = _builder("mnist")
fashion_mnist = _builder("fashion_mnist")
kmnist = _builder("kmnist")
