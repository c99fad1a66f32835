"""Class-folder image datasets (flower_photos, any ImageFolder tree): scan, check, split once, decode safely."""

from __future__ import annotations

import json
import logging
import os
import stat
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, has_file_allowed_extension
from torchvision.transforms import v2

from resnet_cli.data.cache import FolderCache, stamp
from resnet_cli.data.contract import DataBundle, mix_seed
from resnet_cli.data.download import fetch_and_extract
from resnet_cli.data.loader import BadImagePolicy, BadSample
from resnet_cli.data.pipeline import ArraySplit, device_memory, make_bundle
from resnet_cli.data.policy import choose_loader, resolve_geometry
from resnet_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, parse_augment, to_rgb
from resnet_cli.errors import UserError
from resnet_cli.fileio import is_regular_file, kind_of, write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
Item = tuple[str, int]  # (path relative to the data folder, class index)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


def _open_regular(path: str | os.PathLike) -> Image.Image:
    # A FIFO, socket or device named like an image would block the read: only regular files are opened.
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise OSError(f"not a regular file but {kind_of(mode)}")
    return Image.open(path)


def decode(path: str | os.PathLike) -> Image.Image:
    """Fully decode an image file into RGB (raises on unreadable, corrupt, truncated or non-regular files)."""
    with _open_regular(path) as img:
        img.load()  # decode now, inside the caller's error handling, not lazily in a transform
        return to_rgb(img)


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
        except Exception as exc:  # noqa: BLE001  any decoder failure is a property of the file, reported by the main process
            return BadSample(str(path), _reason(exc))


@dataclass
class Scan:
    """What is in one set of class folders."""

    classes: list[str]
    files: dict[str, list[str]]  # class -> image paths relative to the data folder, sorted
    empty: list[str] = field(default_factory=list)
    non_images: list[str] = field(default_factory=list)


def scan(folder: Path, rel_to: Path) -> Scan:
    """Class folders under `folder`: images per class (torchvision's IMG_EXTENSIONS), empty classes, other files."""
    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError:
        raise UserError(f"{folder} holds no class folders; put one folder of images per class there") from None
    classes = [c for c in classes if not c.startswith(".")]  # .git, .ipynb_checkpoints, ...: never a class
    files: dict[str, list[str]] = {}
    result = Scan(classes, files)
    for name in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(folder / name):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                rel = Path(dirpath, fn).relative_to(rel_to).as_posix()
                (found if has_file_allowed_extension(fn, IMG_EXTENSIONS) else result.non_images).append(rel)
        files[name] = sorted(found)
        if not found:
            result.empty.append(name)
    return result


def stratified_split(files: dict[str, list[str]], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Per class, a seeded shuffle then the first round(fraction * n) files (at least 1 when n >= 2) go to val."""
    train, val = [], []
    for name, paths in files.items():
        # Seeded by the class name, not its position, so adding a class leaves the others' split alone.
        rng = np.random.default_rng(mix_seed(seed, zlib.crc32(name.encode())))
        order = rng.permutation(len(paths))
        k = min(len(paths) - 1, max(1, round(val_fraction * len(paths)))) if len(paths) >= 2 and val_fraction > 0 else 0
        val += [paths[i] for i in sorted(order[:k])]
        train += [paths[i] for i in sorted(order[k:])]
    return train, val


def _write_json(path: Path, data: dict) -> bool:
    try:
        write_json(path, data, durable=False)  # a lost manifest is recomputed identically, no fsync needed
        return True
    except OSError as exc:
        log.warning("cannot write %s (%s); the split is recomputed (identically) each run", path, exc)
        return False


def _read_json(path: Path) -> dict | None:
    if not is_regular_file(path):  # absent, or a FIFO that would block the read
        return None
    try:
        data = json.loads(path.read_text())
        return data if data.get("version") == MANIFEST_VERSION else None
    except (OSError, ValueError):
        return None


def _header(path: Path) -> tuple[int, int]:
    with _open_regular(path) as img:  # reads the header only: cheap enough for every file at start-up
        return img.size


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


def _sizes(root: Path, items: list[Item], policy: BadImagePolicy) -> tuple[list[Item], list[tuple[int, int]]]:
    # Read every header: catches empty, non-image and unreadable files before training starts.
    kept, sizes = [], []
    for rel, label in items:
        try:
            sizes.append(_header(root / rel))
            kept.append((rel, label))
        except Exception as exc:  # noqa: BLE001  reported through the policy with the file name
            policy(str(root / rel), _reason(exc))
    return kept, sizes


def _size_range(sizes: list[tuple[int, int]]) -> str:
    if not sizes:
        return "no readable images"
    w, h = np.array(sizes).T
    lo, hi = f"{w.min()}x{h.min()}", f"{w.max()}x{h.max()}"
    return f"sizes {lo}" if lo == hi else f"sizes {lo}..{hi}"


def _verify(root: Path, items: list[Item], policy: BadImagePolicy) -> list[Item]:
    kept = []
    for rel, label in items:
        try:
            decode(root / rel)
            kept.append((rel, label))
        except Exception as exc:  # noqa: BLE001
            policy(str(root / rel), _reason(exc))
    return kept


def _cache(root: Path, items: list[Item], size: int, policy: BadImagePolicy) -> ArraySplit:
    """Decode once into uint8 [N,3,size,size] (shorter side resized to `size`, centre crop) for the memory loader."""
    tf = v2.Compose([v2.PILToTensor(), v2.Resize(size, antialias=True), v2.CenterCrop(size)])
    images, labels = [], []
    for rel, label in items:
        try:
            images.append(tf(decode(root / rel)))
            labels.append(label)
        except Exception as exc:  # noqa: BLE001
            policy(str(root / rel), _reason(exc))
    if not images:
        return ArraySplit(torch.empty(0, 3, size, size, dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    return ArraySplit(torch.stack(images), torch.tensor(labels, dtype=torch.long))


# Folders that hold the held-out split, in the order they are looked for (fast.ai's layout uses test/).
VAL_FOLDERS = ("val", "valid", "validation", "test")


def _resolve_layout(root: Path) -> tuple[Path, Path | None]:
    """(train folder, val folder or None when the set must be split)."""
    if (root / "train").is_dir():
        held_out = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
        return root / "train", held_out
    return root, None


def _per_class(classes: list[str], train: list[Item], val: list[Item]) -> str:
    counts = [(np.bincount([c for _, c in s], minlength=len(classes))) for s in (train, val)]
    parts = [f"{n} {counts[0][i]}/{counts[1][i]}" for i, n in enumerate(classes)]
    shown = ", ".join(parts[:8]) + (f", ... ({len(parts) - 8} more)" if len(parts) > 8 else "")
    return f"train/val per class: {shown}"


def folder_bundle(
    name: str,
    root: Path,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    **options: Any,
) -> DataBundle:
    """Scan, check, split (once, saved as a manifest) and wrap class folders under `root` as a DataBundle."""
    train_dir, val_dir = _resolve_layout(root)
    tscan = scan(train_dir, root)
    notes: list[str] = []
    if val_dir is not None:
        vscan = scan(val_dir, root)
        if set(tscan.classes) != set(vscan.classes):
            only_t = sorted(set(tscan.classes) - set(vscan.classes))
            only_v = sorted(set(vscan.classes) - set(tscan.classes))
            raise UserError(
                f"{train_dir} and {val_dir} hold different classes (only in train: {only_t or 'none'}; "
                f"only in val: {only_v or 'none'}); make the class folders match"
            )
        manifest_path = root / "manifest.json"
        if val_dir.name != "val":
            notes.append(f"validating on {val_dir.name}/ (no val/ folder)")
    else:
        vscan = None
        manifest_path = root / f"split-val{val_fraction:g}-seed{split_seed}.json"
    # A class with no images in train cannot be learned: drop it (and its val images) and say so.
    classes = [c for c in tscan.classes if c not in tscan.empty]
    if not classes:
        raise UserError(f"{train_dir}: every class folder is empty; put images in {train_dir}/<class>/")
    for c in tscan.empty:
        log.warning("empty class folder %s dropped", train_dir / c)
    if tscan.empty:
        notes.append(f"empty class folders dropped: {', '.join(tscan.empty)}")
    index = {c: i for i, c in enumerate(classes)}
    manifest = _read_json(manifest_path) or {}
    if vscan is None:
        if manifest.get("train") is None:
            train_files, val_files = stratified_split({c: tscan.files[c] for c in classes}, val_fraction, split_seed)
            # Saved by files_bundle once the data has loaded: a failed run leaves nothing in the data folder.
            manifest = {"version": MANIFEST_VERSION, "val_fraction": val_fraction, "split_seed": split_seed,
                        "classes": classes, "train": train_files, "val": val_files}
        on_disk = {p for c in classes for p in tscan.files[c]}
        listed = set(manifest["train"]) | set(manifest["val"])
        if listed - on_disk:
            notes.append(f"{len(listed - on_disk)} files of the split manifest are gone")
        if on_disk - listed:
            notes.append(f"{len(on_disk - listed)} new files not in {manifest_path.name} ignored (delete it to re-split)")
        depth = len(train_dir.relative_to(root).parts)  # paths are "<class>/..." or "train/<class>/..."
        label = lambda p: index.get(Path(p).parts[depth])  # noqa: E731
        train_items = [(p, label(p)) for p in manifest["train"] if p in on_disk and label(p) is not None]
        val_items = [(p, label(p)) for p in manifest["val"] if p in on_disk and label(p) is not None]
    else:
        train_items = [(p, index[c]) for c in classes for p in tscan.files[c]]
        val_items = [(p, index[c]) for c in classes for p in vscan.files[c]]
        if vscan.empty:
            notes.append(f"empty val class folders: {', '.join(vscan.empty)}")
    if len(classes) < 2:
        raise UserError(f"{train_dir}: only one class folder with images ({classes[0]}); a classifier needs at least "
                        f"two, one folder of images per class")
    non_images = tscan.non_images + (vscan.non_images if vscan else [])
    if non_images:
        for p in non_images:
            log.warning("ignoring non-image file %s", root / p)
        notes.append(f"{len(non_images)} non-image files ignored")
    return files_bundle(name, root, classes, train_items, val_items, manifest=manifest, manifest_path=manifest_path,
                        notes=notes, **options)


def files_bundle(
    name: str,
    root: Path,
    classes: list[str],
    train_items: list[Item],
    val_items: list[Item],
    *,
    manifest: dict | None = None,
    manifest_path: Path | None = None,
    notes: list[str] | None = None,
    on_bad_image: str = "error",
    max_bad_images: int = 0,
    verify_images: bool = False,
    loader: str = "auto",
    image_size: int | str = "auto",
    auto_max_size: int = 224,
    resize: int | str | None = "auto",
    crop: str = "auto",
    pad: int | str = "auto",
    cache_size: int | None = None,
    augment: str = "standard",
    memory_budget: float = 0.25,
    mean: Sequence[float] | str = IMAGENET_MEAN,
    std: Sequence[float] | str = IMAGENET_STD,
    device: Any = "cpu",
    **options: Any,
) -> DataBundle:
    """Check the listed image files (headers, optionally full decodes), resolve the geometry, build either loader."""
    policy = BadImagePolicy(on_bad_image, max_bad_images)
    notes, manifest = list(notes or []), dict(manifest or {})
    saved_manifest = _read_json(manifest_path) if manifest_path is not None else None
    cache = FolderCache(manifest_path.parent if manifest_path else root,
                        stamp(root, train_items, val_items))
    scanned = None if verify_images else cache.scanned()
    if scanned:  # nothing changed since a run saved this scan: no header is read again
        train_items, val_items = [tuple(i) for i in scanned["train"]], [tuple(i) for i in scanned["val"]]
        train_sizes = [tuple(s) for s in scanned["sizes"]]
        for path, reason in scanned["skipped"].items():
            policy(path, reason)
    else:
        train_items, train_sizes = _sizes(root, train_items, policy)
        val_items, _ = _sizes(root, val_items, policy)
        if verify_images:
            train_items, val_items = _verify(root, train_items, policy), _verify(root, val_items, policy)
    if not train_items:
        raise UserError(f"{root}: no readable training images")
    if not val_items:
        raise UserError(f"{root}: the validation split is empty; add images or raise dataset.val_fraction")

    if mean == "auto" or std == "auto":
        if manifest.get("mean") is None:
            manifest["mean"], manifest["std"] = channel_stats(root, [p for p, _ in train_items])
            manifest.setdefault("version", MANIFEST_VERSION)
        mean = manifest["mean"] if mean == "auto" else mean
        std = manifest["std"] if std == "auto" else std

    geometry = resolve_geometry(image_size, resize=resize, crop=crop, pad=pad, native=train_sizes,
                                auto_max_size=auto_max_size)
    side = int(cache_size) if cache_size else geometry.cache_size
    names = parse_augment(augment)
    dev = torch.device(device)
    cache_bytes = (len(train_items) + len(val_items)) * 3 * side * side
    loader, loader_why = choose_loader(loader, names, cache_bytes, memory_budget, dev, device_memory(dev))
    fresh: dict[str, ArraySplit] = {}  # decoded by this run: saved to the cache once the bundle is built
    if loader == "memory":
        train_set, val_set = (_decoded(cache, root, split, items, side, policy, fresh)
                              for split, items in (("train", train_items), ("val", val_items)))
        notes.append(f"decoded cache {side} px: " + (f"miss, decoded {', '.join(fresh)}" if fresh else "hit, no image opened"))
    else:
        train_set, val_set = ImageFiles(root, train_items), ImageFiles(root, val_items)
    if policy.skipped:
        notes.append(f"{len(policy.skipped)} bad images skipped")
    summary = (f"{name}: {len(classes)} classes, train {len(train_items)} / val {len(val_items)} images, "
               f"{_size_range(train_sizes)}; {_per_class(classes, train_items, val_items)}"
               + "".join(f"; {n}" for n in notes))
    bundle = make_bundle(classes, train_set, val_set, loader=loader, device=device, geometry=geometry,
                         loader_why=loader_why, mean=mean, std=std, augment=augment, memory_budget=memory_budget,
                         bad_policy=policy, summary=summary, **options)
    # Written only now that the data has loaded, so a failed start leaves the data folder as it was.
    if manifest_path is not None and manifest and manifest != saved_manifest:
        _write_json(manifest_path, manifest)
    if not scanned:
        cache.save_scan({"train": train_items, "val": val_items, "sizes": train_sizes, "skipped": dict(policy.skipped)})
    for split, arr in fresh.items():
        cache.save_array(split, side, arr.images)
    return bundle


def _decoded(cache: FolderCache, root: Path, split: str, items: list[Item], side: int, policy: BadImagePolicy,
             fresh: dict[str, ArraySplit]) -> ArraySplit:
    """A split's uint8 images from the cache, or decoded now (then listed in `fresh` when every item decoded)."""
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    images = cache.array(split, side)
    if images is not None and len(images) == len(items):
        return ArraySplit(images, labels)
    arr = _cache(root, items, side, policy)
    if len(arr.labels) == len(items):  # a file that failed to decode is skipped, not cached
        fresh[split] = arr
    return arr


def imagefolder(*, root: str | None = None, **options: Any) -> DataBundle:
    """Your own images: `root` holds train/ and val/ class folders, or one set of class folders to split."""
    if not root:
        raise UserError("dataset.root is not set; run with dataset=imagefolder dataset.root=PATH (PATH/<class>/*.jpg)")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise UserError(
            f"dataset.root={root}: no such folder; point it at a folder holding train/ and val/ class folders "
            f"or one folder per class"
        )
    return folder_bundle("imagefolder", path, **options)


def flowers(
    *,
    root: str = "data/flowers",
    url: str = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz",
    sha256: str | None = None,
    download: bool = True,
    **options: Any,
) -> DataBundle:
    """TensorFlow's flower_photos (5 classes, 3,670 JPEGs), downloaded with a checksum and split once."""
    folder = fetch_and_extract(url, root, "flower_photos", sha256=sha256, download=download)
    return folder_bundle("flowers", folder, **options)


def flowers102(
    *,
    root: str = "data/flowers102",
    url_prefix: str = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/",
    download: bool = True,
    val_split: str = "val",
    **options: Any,
) -> DataBundle:
    """Oxford 102 Flowers with its official splits (train 1,020; val 1,020; test 6,149), read by torchvision.

    The three files are fetched by our atomic, md5-checked download (torchvision's own md5 list)
    and extracted with our path filter; torchvision's Flowers102 then reads the labels and splits.
    """
    from torchvision.datasets import Flowers102

    from resnet_cli.data.download import fetch

    base = Path(root) / "flowers-102"
    for key, (filename, md5) in Flowers102._file_dict.items():
        if key == "image":
            fetch_and_extract(url_prefix + filename, base, "jpg", md5=md5, download=download)
        else:
            fetch(url_prefix + filename, base / filename, md5=md5, download=download)
    try:
        import scipy.io  # noqa: F401  (torchvision reads the .mat label files with it)
    except ImportError:
        raise UserError("dataset=flowers102 needs scipy to read its .mat label files: pip install scipy") from None
    splits = {s: Flowers102(str(root), split=s, download=False) for s in ("train", val_split)}
    items = {s: [(Path(f).relative_to(base).as_posix(), int(y)) for f, y in zip(ds._image_files, ds._labels)]
             for s, ds in splits.items()}
    classes = list(getattr(splits["train"], "classes", [f"class_{i:03d}" for i in range(102)]))
    return files_bundle("flowers102", base, classes, items["train"], items[val_split],
                        manifest_path=base / "manifest.json", **options)
