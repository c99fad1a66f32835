"""Test fixtures: tiny archives in the exact official on-disk formats, served from file:// URLs."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

# The four files of MNIST's format (and Fashion-MNIST's, KMNIST's), by the role resnet_cli.data.mnist gives them.
IDX_FILES = {"train_images": "train-images-idx3-ubyte", "train_labels": "train-labels-idx1-ubyte",
             "test_images": "t10k-images-idx3-ubyte", "test_labels": "t10k-labels-idx1-ubyte"}
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FLOWER_CLASSES = ["daisy", "dandelion", "roses", "sunflowers", "tulips"]


def _class_images(labels: np.ndarray, size: int, classes: int, rng: np.random.RandomState) -> np.ndarray:
    # Noisy images whose mean colour depends on the class, so a model can learn them.
    hue = np.stack([np.linspace(30, 225, classes), np.linspace(225, 30, classes), (np.arange(classes) * 97) % 196 + 30], 1)
    base = hue[labels][:, :, None, None]
    noise = rng.normal(0, 25, size=(len(labels), 3, size, size))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _tar_gz(path: Path, members: dict[str, bytes]) -> None:
    # mtime=0 everywhere so the same inputs give the same bytes (and the same checksum).
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def _digest(path: Path, algo: str) -> str:
    return hashlib.new(algo, path.read_bytes()).hexdigest()


def _batch(labels: np.ndarray, images: np.ndarray, label_key: bytes, extra: dict | None = None) -> bytes:
    d = {
        b"batch_label": b"fixture batch",
        label_key: labels.tolist(),
        b"data": images.reshape(len(labels), 3072),
        b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(labels))],
        **(extra or {}),
    }
    return pickle.dumps(d, protocol=2)


def make_cifar10_archive(directory: str | Path, n_train: int = 50, n_test: int = 20, seed: int = 0) -> tuple[str, str]:
    """cifar-10-python.tar.gz with cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}; returns (url, md5)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    labels = np.arange(n_train + n_test) % 10
    rng.shuffle(labels)
    images = _class_images(labels, 32, 10, rng)
    top = "cifar-10-batches-py"
    members = {f"{top}/readme.html": b"<html>fixture</html>\n"}
    per = np.array_split(np.arange(n_train), 5)
    for i, idx in enumerate(per, 1):
        members[f"{top}/data_batch_{i}"] = _batch(labels[idx], images[idx], b"labels")
    test = np.arange(n_train, n_train + n_test)
    members[f"{top}/test_batch"] = _batch(labels[test], images[test], b"labels")
    meta = {b"num_cases_per_batch": len(per[0]), b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072}
    members[f"{top}/batches.meta"] = pickle.dumps(meta, protocol=2)
    path = directory / "cifar-10-python.tar.gz"
    _tar_gz(path, members)
    return path.resolve().as_uri(), _digest(path, "md5")


def make_cifar100_archive(directory: str | Path, n_train: int = 200, n_test: int = 100, seed: int = 0) -> tuple[str, str]:
    """cifar-100-python.tar.gz with cifar-100-python/{train,test,meta}; returns (url, md5)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    fine = np.arange(n_train + n_test) % 100
    rng.shuffle(fine)
    images = _class_images(fine, 32, 100, rng)
    top = "cifar-100-python"
    members = {}
    for name, idx in (("train", np.arange(n_train)), ("test", np.arange(n_train, n_train + n_test))):
        members[f"{top}/{name}"] = _batch(fine[idx], images[idx], b"fine_labels", {b"coarse_labels": (fine[idx] // 5).tolist()})
    meta = {
        b"fine_label_names": [f"fine_{i:02d}".encode() for i in range(100)],
        b"coarse_label_names": [f"coarse_{i:02d}".encode() for i in range(20)],
    }
    members[f"{top}/meta"] = pickle.dumps(meta, protocol=2)
    path = directory / "cifar-100-python.tar.gz"
    _tar_gz(path, members)
    return path.resolve().as_uri(), _digest(path, "md5")


def jpeg_bytes(color: tuple[int, int, int], size: int | tuple[int, int] = 40, seed: int = 0) -> bytes:
    """A real JPEG of a noisy image around `color`."""
    w, h = (size, size) if isinstance(size, int) else size
    rng = np.random.RandomState(seed)
    a = np.clip(np.array(color)[None, None, :] + rng.normal(0, 20, size=(h, w, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def class_color(c: int) -> tuple[int, int, int]:
    """A distinct colour for class index c."""
    return ((60 + 70 * c) % 256, (200 - 45 * c) % 256, (40 + 110 * c) % 256)


def make_flowers_archive(directory: str | Path, per_class: int = 6, size: int = 40, classes: list[str] | None = None) -> tuple[str, str]:
    """flower_photos.tgz: flower_photos/<class>/<n>.jpg (real JPEGs) + LICENSE.txt; returns (url, sha256)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    members = {"flower_photos/LICENSE.txt": b"fixture photos, CC-BY\n"}
    for c, name in enumerate(classes or FLOWER_CLASSES):
        for i in range(per_class):
            members[f"flower_photos/{name}/{1000 + i}_{name}.jpg"] = jpeg_bytes(class_color(c), (size + 8 * (i % 3), size), seed=c * 100 + i)
    path = directory / "flower_photos.tgz"
    _tar_gz(path, members)
    return path.resolve().as_uri(), _digest(path, "sha256")


def write_class_folders(root: str | Path, per_class: int = 6, size: int = 40, classes: list[str] | None = None) -> Path:
    """Class folders of real JPEGs under `root` (an imagefolder layout); returns root."""
    root = Path(root)
    for c, name in enumerate(classes or FLOWER_CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(jpeg_bytes(class_color(c), size, seed=c * 100 + i))
    return root


def idx_bytes(array: np.ndarray) -> bytes:
    """Unsigned bytes in the idx format: a big-endian magic 0x0000_08_<ndim> (2051 for images, 2049 for
    labels), each dimension as a big-endian uint32, then the data row-major."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def gray_images(labels: np.ndarray, size: int = 28, seed: int = 0) -> np.ndarray:
    """uint8 [N, size, size] glyphs a small net learns at once: a bright bar, its row and level set by the class."""
    rng = np.random.RandomState(seed)
    images = rng.normal(20, 12, size=(len(labels), size, size))
    rows = (2 + labels * (size - 6) // 9).astype(int)
    for i, (label, row) in enumerate(zip(labels, rows)):
        images[i, row:row + 3, 3:size - 3] = 120 + 13 * label
    return np.clip(images, 0, 255).astype(np.uint8)


def write_idx_files(folder: str | Path, n_train: int = 200, n_test: int = 100, *, gz: bool = True, size: int = 28,
                    seed: int = 0) -> dict[str, dict]:
    """The four idx files in `folder`, gzip'd (mtime 0, so the same bytes every time) or raw.

    Returns role -> {"path", "md5" (of the file as written), "array" (its content)}.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(seed)
    train_labels, test_labels = rng.randint(0, 10, n_train), rng.randint(0, 10, n_test)
    arrays = {"train_images": gray_images(train_labels, size, seed), "train_labels": train_labels,
              "test_images": gray_images(test_labels, size, seed + 1), "test_labels": test_labels}
    out = {}
    for role, array in arrays.items():
        data = idx_bytes(array)
        path = folder / (IDX_FILES[role] + (".gz" if gz else ""))
        if gz:
            with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
                f.write(data)
        else:
            path.write_bytes(data)
        out[role] = {"path": path, "md5": _digest(path, "md5"), "array": array.astype(np.uint8)}
    return out
