"""The train/val split of one set of class folders, made once and saved as a manifest next to the data.

A folder without a held-out split is split per class (seeded shuffle, stratified) into
<root>/split-val<fraction>-seed<split_seed>.json, so the split never changes between runs: files
added later are left out (and said), files gone are skipped. The manifest also keeps what was
computed once from the train images (`mean: auto`); a tree with its own val/ folder keeps that
in <root>/manifest.json.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import numpy as np

from resnet_cli.data.contract import mix_seed
from resnet_cli.data.images import Item
from resnet_cli.fileio import is_regular_file, write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1


def split_name(val_fraction: float, split_seed: int) -> str:
    """The manifest file of one split: a new fraction or seed gives a new file, never a changed one."""
    return f"split-val{val_fraction:g}-seed{split_seed}.json"


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


def split_items(manifest: dict, files: dict[str, list[str]], depth: int, *, val_fraction: float, split_seed: int,
                manifest_name: str) -> tuple[dict, list[Item], list[Item], list[str]]:
    """(manifest, train items, val items, notes) of the class folders `files` (class -> paths, in label order).

    The saved split is kept when `manifest` has one, else a new one is made (and saved by the caller once the
    data has loaded: a failed run leaves nothing in the data folder). A path's class is its folder `depth`
    parts below the data folder ("<class>/..." or "train/<class>/...").
    """
    if manifest.get("train") is None:
        train_files, val_files = stratified_split(files, val_fraction, split_seed)
        manifest = {"version": MANIFEST_VERSION, "val_fraction": val_fraction, "split_seed": split_seed,
                    "classes": list(files), "train": train_files, "val": val_files}
    notes = []
    on_disk = {p for paths in files.values() for p in paths}
    listed = set(manifest["train"]) | set(manifest["val"])
    if listed - on_disk:
        notes.append(f"{len(listed - on_disk)} files of the split manifest are gone")
    if on_disk - listed:
        notes.append(f"{len(on_disk - listed)} new files not in {manifest_name} ignored (delete it to re-split)")
    index = {c: i for i, c in enumerate(files)}
    label = lambda p: index.get(Path(p).parts[depth])  # noqa: E731
    train_items = [(p, label(p)) for p in manifest["train"] if p in on_disk and label(p) is not None]
    val_items = [(p, label(p)) for p in manifest["val"] if p in on_disk and label(p) is not None]
    return manifest, train_items, val_items, notes


def write_manifest(path: Path, data: dict) -> bool:
    """Save the manifest; a folder that cannot be written to only costs recomputing it (one warning)."""
    try:
        write_json(path, data, durable=False)  # a lost manifest is recomputed identically, no fsync needed
        return True
    except OSError as exc:
        log.warning("cannot write %s (%s); the split is recomputed (identically) each run", path, exc)
        return False


def read_manifest(path: Path) -> dict | None:
    """The saved manifest, or None when there is none (or it is unreadable, or of another version)."""
    if not is_regular_file(path):  # absent, or a FIFO that would block the read
        return None
    try:
        data = json.loads(path.read_text())
        return data if data.get("version") == MANIFEST_VERSION else None
    except (OSError, ValueError):
        return None
