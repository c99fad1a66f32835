"""The class-folder datasets (flower_photos, Oxford 102 Flowers, any ImageFolder tree) as DataBundles.

The builders put the parts together: scan.py finds the classes and checks every file at
start-up, split.py makes (once) and keeps the train/val split, images.py opens and decodes the
files; here the geometry and the loader are resolved and the decoded cache is used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Sequence

import torch

from resnet_cli.data.cache import FolderCache, stamp
from resnet_cli.data.contract import DataBundle
from resnet_cli.data.download import fetch_and_extract
from resnet_cli.data.images import ImageFiles, Item, channel_stats, decode_split
from resnet_cli.data.images import decode  # noqa: F401  public here too (imported from this module)
from resnet_cli.data.loader import BadImagePolicy
from resnet_cli.data.pipeline import ArraySplit, device_memory, make_bundle
from resnet_cli.data.policy import choose_loader, resolve_geometry
from resnet_cli.data.scan import check_decodes, check_headers, per_class, resolve_layout, scan, size_range
from resnet_cli.data.split import MANIFEST_VERSION, read_manifest, shown, split_items, split_name, write_manifest
from resnet_cli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, parse_augment
from resnet_cli.errors import UserError

log = logging.getLogger(__name__)

# Log lines that name files or classes one by one stop here (then one line counts the rest): a folder of
# 10,000 classes or stray files must not write 10,000 start-up lines.
MAX_NAMED_LINES = 10


def _stats_manifest(path: Path, options: dict) -> dict | None:
    """The manifest.json keeping `mean: auto` of a tree with its own val/ folder, read only when that is asked."""
    wanted = options.get("mean") == "auto" or options.get("std") == "auto"
    return read_manifest(path, split=False) if wanted else None


def _listed(names: list[str], limit: int = 5) -> str:
    # ['a', 'b'] or ['a', ..., 'e'] and 7 more: a one-line error stays one readable line.
    if not names:
        return "none"
    return repr(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _warn_each(template: str, names: list, *, more: str) -> None:
    """One warning per name up to MAX_NAMED_LINES, then one line for the rest."""
    for name in names[:MAX_NAMED_LINES]:
        log.warning(template, name)
    if len(names) > MAX_NAMED_LINES:
        log.warning("... and %d more %s", len(names) - MAX_NAMED_LINES, more)


def folder_bundle(
    name: str,
    root: Path,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    **options: Any,
) -> DataBundle:
    """Scan, check, split (once, saved as a manifest) and wrap class folders under `root` as a DataBundle."""
    train_dir, val_dir, test_dir = resolve_layout(root)
    tscan = scan(train_dir, root)
    notes: list[str] = []
    if val_dir is not None:
        vscan = scan(val_dir, root)
        _same_classes(train_dir, tscan, val_dir, vscan)
        manifest_path = root / "manifest.json"
        if val_dir.name != "val":
            notes.append(f"validating on {val_dir.name}/ (no val/ folder)")
    else:
        vscan = None
        manifest_path = root / split_name(val_fraction, split_seed)
    # A class with no images in train cannot be learned: drop it (and its val images) and say so.
    classes = [c for c in tscan.classes if c not in tscan.empty]
    if not classes:
        raise UserError(f"{train_dir}: every class folder is empty; put images in {train_dir}/<class>/")
    _warn_each("empty class folder %s dropped", [train_dir / c for c in tscan.empty], more="empty class folders")
    if tscan.empty:
        notes.append(f"empty class folders dropped: {shown(tscan.empty)}")
    test_scan = scan(test_dir, root) if test_dir is not None else None
    if test_scan is not None:
        _same_classes(train_dir, tscan, test_dir, test_scan)
        notes.append(f"{test_dir.name}/ held out: evaluated once at the end")
    runs = tscan.runs + (vscan.runs if vscan is not None else [])
    if runs:
        log.warning("%s: not classes: %s hold resnet-cli run folders (is output_root inside dataset.root?)",
                    train_dir, shown(runs))
        notes.append(f"run folders ignored: {shown(runs)}")
    # A split manifest is always needed; a val/ tree's manifest.json only for `mean: auto` (a name a dataset may
    # use for a file of its own: left unread otherwise).
    saved = read_manifest(manifest_path, split=True) if vscan is None else _stats_manifest(manifest_path, options)
    manifest = saved or {}
    if vscan is None:
        depth = len(train_dir.relative_to(root).parts)  # paths are "<class>/..." or "train/<class>/..."
        manifest, train_items, val_items, split_notes = split_items(
            manifest, {c: tscan.files[c] for c in classes}, depth, val_fraction=val_fraction, split_seed=split_seed,
            manifest_path=manifest_path)
        notes += split_notes
    else:
        index = {c: i for i, c in enumerate(classes)}
        train_items = [(p, index[c]) for c in classes for p in tscan.files[c]]
        val_items = [(p, index[c]) for c in classes for p in vscan.files[c]]
        if vscan.empty:
            notes.append(f"empty val class folders: {shown(vscan.empty)}")
    if len(classes) < 2:
        raise UserError(f"{train_dir}: only one class folder with images ({classes[0]}); a classifier needs at least "
                        f"two, one folder of images per class")
    non_images = tscan.non_images + (vscan.non_images if vscan else []) + (test_scan.non_images if test_scan else [])
    if non_images:
        _warn_each("ignoring non-image file %s", [root / p for p in non_images], more="non-image files")
        notes.append(f"{len(non_images)} non-image files ignored")
    test_items = None
    if test_scan is not None:
        index = {c: i for i, c in enumerate(classes)}
        test_items = [(p, index[c]) for c in classes for p in test_scan.files[c]]
    return files_bundle(name, root, classes, train_items, val_items, manifest=manifest, manifest_path=manifest_path,
                        saved_manifest=saved, notes=notes, test_items=test_items, **options)


def _same_classes(train_dir: Path, tscan: Any, other_dir: Path, other: Any) -> None:
    # A held-out split of other classes cannot be scored by this classifier.
    if set(tscan.classes) != set(other.classes):
        only_t = sorted(set(tscan.classes) - set(other.classes))
        only_o = sorted(set(other.classes) - set(tscan.classes))
        raise UserError(f"{train_dir} and {other_dir} hold different classes (only in {train_dir.name}: "
                        f"{_listed(only_t)}; only in {other_dir.name}: {_listed(only_o)}); make the class folders match")


def files_bundle(
    name: str,
    root: Path,
    classes: list[str],
    train_items: list[Item],
    val_items: list[Item],
    *,
    manifest: dict | None = None,
    manifest_path: Path | None = None,
    saved_manifest: dict | None = None,
    notes: list[str] | None = None,
    test_items: list[Item] | None = None,
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
    """Check the listed image files (headers, optionally full decodes), resolve the geometry, build either loader.

    `manifest` is what to keep next to the data (`saved_manifest`, the checked file as read, plus anything new);
    it is written only over a file that was ours or none.
    """
    policy = BadImagePolicy(on_bad_image, max_bad_images)
    notes, manifest = list(notes or []), dict(manifest or {})
    # The stamp covers the test files too: their decoded array is cached under it.
    cache = FolderCache(manifest_path.parent if manifest_path else root,
                        stamp(root, train_items, val_items, *([test_items] if test_items else [])))
    scanned = None if verify_images else cache.scanned(root, train_items, val_items)
    if scanned:  # nothing changed since a run saved this scan: no header is read again
        train_items, val_items, train_sizes = scanned["train"], scanned["val"], scanned["sizes"]
        for path, reason in scanned["skipped"].items():
            policy(path, reason)
    else:
        train_items, train_sizes = check_headers(root, train_items, policy)
        val_items, _ = check_headers(root, val_items, policy)
        if verify_images:
            train_items, val_items = (check_decodes(root, items, policy) for items in (train_items, val_items))
    if not train_items:
        raise UserError(f"{root}: no readable training images")
    if not val_items:
        raise UserError(f"{root}: the validation split is empty; add images or raise dataset.val_fraction")
    if test_items is not None:  # evaluated once: its headers are checked each run, not cached
        test_items, _ = check_headers(root, test_items, policy)
        if not test_items:
            raise UserError(f"{root}: the test split holds no readable image; add images or remove test/")

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
    cache_bytes = (len(train_items) + len(val_items) + len(test_items or ())) * 3 * side * side
    loader, loader_why = choose_loader(loader, names, cache_bytes, memory_budget, dev, device_memory(dev))
    fresh: dict[str, ArraySplit] = {}  # decoded by this run: saved to the cache once the bundle is built
    if loader == "memory":
        train_set, val_set = (_decoded(cache, root, split, items, side, policy, fresh)
                              for split, items in (("train", train_items), ("val", val_items)))
        test_set = _decoded(cache, root, "test", test_items, side, policy, fresh) if test_items else None
        notes.append(f"decoded cache {side} px: " + (f"miss, decoded {', '.join(fresh)}" if fresh else "hit, no image opened"))
        # What the arrays hold: a file whose header read but whose body did not decode is not in them.
        train_labels, val_labels = train_set.labels.tolist(), val_set.labels.tolist()
    else:
        train_set, val_set = ImageFiles(root, train_items), ImageFiles(root, val_items)
        test_set = ImageFiles(root, test_items) if test_items else None
        train_labels, val_labels = [c for _, c in train_items], [c for _, c in val_items]
    if policy.skipped:
        notes.append(f"{len(policy.skipped)} bad images skipped")
    if not train_labels or not val_labels:
        raise UserError(f"{root}: no {'training' if not train_labels else 'validation'} image decodes")
    tested = f" / test {len(test_set.labels) if hasattr(test_set, 'labels') else len(test_items)}" if test_items else ""
    summary = (f"{name}: {len(classes)} classes, train {len(train_labels)} / val {len(val_labels)}{tested} images, "
               f"{size_range(train_sizes)}; {per_class(classes, train_labels, val_labels)}"
               + "".join(f"; {n}" for n in notes))
    # The val files in the order validation sees them (a file that did not decode is not in the arrays).
    val_files = [rel for rel, _ in val_items if str(root / rel) not in policy.skipped]
    bundle = make_bundle(classes, train_set, val_set, loader=loader, device=device, geometry=geometry,
                         loader_why=loader_why, mean=mean, std=std, augment=augment, memory_budget=memory_budget,
                         bad_policy=policy, summary=summary, val_files=val_files, test=test_set, **options)
    # Written only now that the data has loaded, so a failed start leaves the data folder as it was; never over a
    # file that is not ours (a dataset's own manifest.json).
    ours = saved_manifest is not None or (manifest_path is not None and not os.path.lexists(manifest_path))
    if manifest_path is not None and manifest and manifest != saved_manifest and ours:
        write_manifest(manifest_path, manifest)
    if not scanned:
        cache.save_scan({"train": train_items, "val": val_items, "sizes": train_sizes, "skipped": dict(policy.skipped)})
    for split, arr in fresh.items():
        cache.save_array(split, side, arr.images)
    return bundle


def _decoded(cache: FolderCache, root: Path, split: str, items: list[Item], side: int, policy: BadImagePolicy,
             fresh: dict[str, ArraySplit]) -> ArraySplit:
    """A split's uint8 images from the cache, or decoded now (then listed in `fresh` when every item decoded)."""
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    images = cache.array(split, side, len(items))
    if images is not None:
        return ArraySplit(images, labels)
    arr = decode_split(root, items, side, policy)
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
    saved = _stats_manifest(base / "manifest.json", options)
    return files_bundle("flowers102", base, classes, items["train"], items[val_split], manifest=saved,
                        manifest_path=base / "manifest.json", saved_manifest=saved, **options)
