"""The train/val split of one set of class folders, made once and saved as a manifest next to the data.

A folder without a held-out split is split per class (seeded shuffle, stratified) into
<root>/split-val<fraction>-seed<split_seed>.json, so the split never changes between runs: files
added later are left out (and said), files gone are skipped, and a class folder added later is
refused (it would train with no images). The manifest also keeps what was computed once from the
train images (`mean: auto`); a tree with its own val/ folder keeps that in <root>/manifest.json.

A manifest is a file the user owns, next to the data: it is checked when read, and anything
malformed (not a JSON object, a wrong type, a path outside the data folder, a file in both splits)
stops the run in one line naming it. A manifest.json that is not resnet-cli's (no "version" key:
a dataset may ship its own) is left alone and never written over.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from resnet_cli.data.contract import mix_seed
from resnet_cli.data.images import Item
from resnet_cli.errors import UserError
from resnet_cli.fileio import is_regular_file, write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
STATS_KEYS = {"version", "mean", "std"}  # all a manifest.json of ours holds (a val/ tree's `mean: auto`)


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


def shown(names: list[str], limit: int = 5) -> str:
    """'a, b, c' or 'a, b, c, ... (12 more)': a list of names bounded for one line."""
    return ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def split_items(manifest: dict, files: dict[str, list[str]], depth: int, *, val_fraction: float, split_seed: int,
                manifest_path: Path) -> tuple[dict, list[Item], list[Item], list[str]]:
    """(manifest, train items, val items, notes) of the class folders `files` (class -> paths, in label order).

    The saved split is kept when `manifest` has one, else a new one is made (and saved by the caller once the
    data has loaded: a failed run leaves nothing in the data folder). A path's class is its folder `depth`
    parts below the data folder ("<class>/..." or "train/<class>/..."). A class folder the saved split does not
    know is refused: its images are in neither split, so it would train on none.
    """
    if manifest.get("train") is None:
        train_files, val_files = stratified_split(files, val_fraction, split_seed)
        manifest = {"version": MANIFEST_VERSION, "val_fraction": val_fraction, "split_seed": split_seed,
                    "classes": list(files), "train": train_files, "val": val_files}
    known = manifest.get("classes")
    if known is None:  # a manifest written without its classes: those its files are in
        known = {PurePosixPath(p).parts[depth] for p in manifest["train"] + manifest["val"]
                 if len(PurePosixPath(p).parts) > depth}
    new = [c for c in files if c not in set(known)]
    if new:
        raise UserError(f"{manifest_path}: class folder{'s' if len(new) > 1 else ''} {shown(new)} added after this "
                        f"split was saved (its images are in neither split); delete the manifest to re-split")
    notes = []
    on_disk = {p for paths in files.values() for p in paths}
    listed = set(manifest["train"]) | set(manifest["val"])
    gone = [c for c in known if c not in files]
    if gone:
        notes.append(f"class folders of the split manifest gone: {shown(sorted(gone))}")
    if listed - on_disk:
        notes.append(f"{len(listed - on_disk)} files of the split manifest are gone")
    if on_disk - listed:
        notes.append(f"{len(on_disk - listed)} new files not in {manifest_path.name} ignored (delete it to re-split)")
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


def read_manifest(path: Path, *, split: bool) -> dict | None:
    """The saved manifest, checked; None when there is none (or, for manifest.json, when it is not ours).

    `split`: a split manifest (split-val<f>-seed<s>.json, train and val lists required); else the
    manifest.json of a tree with its own val/ folder. Anything malformed is a one-line UserError.
    """
    if not os.path.lexists(path):
        return None
    again = "delete it to re-split" if split else "delete it to compute it again"
    if not is_regular_file(path):  # a FIFO would block the read, a folder or dangling link cannot be read
        if not split:  # manifest.json: a name a dataset may use for something of its own
            log.warning("%s is not a regular file: left alone (dataset.mean=auto is computed each run)", path)
            return None
        raise UserError(f"{path}: not a regular file; {again}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # UnicodeDecodeError, JSONDecodeError: ValueErrors
        if not split:
            log.warning("%s is not a resnet-cli manifest (%s): left alone (dataset.mean=auto is computed each run)",
                        path, type(exc).__name__)
            return None
        raise UserError(f"{path}: unreadable ({str(exc).splitlines()[0][:120]}); {again}") from None
    if not split and not (isinstance(data, dict) and "version" in data and set(data) <= STATS_KEYS):
        log.warning("%s is not a resnet-cli manifest: left alone (dataset.mean=auto is computed each run)", path)
        return None
    problem = manifest_problem(data, split=split)
    if problem:
        raise UserError(f"{path}: {problem}; {again}")
    return data


def manifest_problem(data: Any, *, split: bool) -> str | None:
    """What is wrong with a manifest's content (None when nothing is)."""
    if not isinstance(data, dict):
        return f"not a JSON object but a {type(data).__name__}"
    if data.get("version") != MANIFEST_VERSION:
        return f"version {data.get('version')!r}, not {MANIFEST_VERSION} (written by another resnet-cli)"
    if "val_fraction" in data and not _number(data["val_fraction"]):
        return "val_fraction is not a number"
    if "split_seed" in data and not (isinstance(data["split_seed"], int) and not isinstance(data["split_seed"], bool)):
        return "split_seed is not an integer"
    for key in ("mean", "std"):
        if key in data and not (isinstance(data[key], list) and len(data[key]) == 3 and all(map(_number, data[key]))
                                and (key == "mean" or all(v > 0 for v in data[key]))):
            return f"{key} is not a list of 3 {'positive ' if key == 'std' else ''}numbers"
    if "classes" in data and not _names(data["classes"]):
        return "classes is not a list of distinct folder names"
    for key in ("train", "val"):
        if split and key not in data:
            return f"no {key} list"
        if key in data:
            problem = _paths_problem(data[key])
            if problem:
                return f"{key}: {problem}"
    both = set(data.get("train", ())) & set(data.get("val", ()))
    if both:
        return f"{len(both)} files in both train and val (e.g. {_quoted(sorted(both)[0])})"
    return None


def _quoted(v: Any, limit: int = 80) -> str:
    # A value from the file, quoted and cut: the error stays one readable line whatever the file holds.
    text = repr(v)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _names(v: Any) -> bool:
    return (isinstance(v, list) and all(isinstance(c, str) and c and "/" not in c and c not in (".", "..") for c in v)
            and len(set(v)) == len(v))


def _paths_problem(paths: Any) -> str | None:
    # Paths relative to the data folder, as the scan writes them: never absolute, never climbing out.
    if not isinstance(paths, list):
        return f"not a list but a {type(paths).__name__}"
    for p in paths:
        if not isinstance(p, str) or not p:
            return f"{_quoted(p)} is not a file path"
        if PurePosixPath(p).is_absolute() or ".." in PurePosixPath(p).parts or "\0" in p:
            return f"{_quoted(p)} is not a path inside the data folder"
    seen: set[str] = set()
    for p in paths:
        if p in seen:
            return f"{_quoted(p)} is listed twice"
        seen.add(p)
    return None
