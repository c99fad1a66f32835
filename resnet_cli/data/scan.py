"""What a folder tree holds: its class folders and their images, the held-out split, and the start-up check.

Every listed file's header is read before training (and, with verify_images, every file is
decoded), so an empty, truncated or non-image file is reported by name at start-up, through
the bad-image policy, instead of stopping a run hours in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import find_classes

from resnet_cli.data.images import Item, decode, is_image_name, read_size, reason
from resnet_cli.data.loader import BadImagePolicy
from resnet_cli.errors import UserError

# Folders that hold the held-out split, in the order they are looked for (fast.ai's layout uses test/).
VAL_FOLDERS = ("val", "valid", "validation", "test")


@dataclass
class Scan:
    """What is in one set of class folders."""

    classes: list[str]
    files: dict[str, list[str]]  # class -> image paths relative to the data folder, sorted
    empty: list[str] = field(default_factory=list)
    non_images: list[str] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)  # folders of resnet-cli runs: never a class


# What a resnet-cli run folder holds (Hydra's record and the run lock): found under a class folder, it is
# not a class.
RUN_MARKS = {".hydra", ".resnet-cli.lock"}


def scan(folder: Path, rel_to: Path) -> Scan:
    """Class folders under `folder`: images per class (images.IMAGE_SUFFIXES), empty classes, other files."""
    try:
        classes, _ = find_classes(str(folder))
    except FileNotFoundError:
        raise UserError(f"{folder} holds no class folders; put one folder of images per class there") from None
    classes = [c for c in classes if not c.startswith(".")]  # .git, .ipynb_checkpoints, ...: never a class
    files: dict[str, list[str]] = {}
    result = Scan(classes, files)
    for name in list(classes):
        found, others = [], []
        for dirpath, dirnames, filenames in os.walk(folder / name):
            if RUN_MARKS & {*dirnames, *filenames}:
                # A resnet-cli run folder (output_root inside dataset.root, e.g. `outputs/` under `.`): its
                # curves.png would train as images of a class named after the output folder.
                classes.remove(name)
                result.runs.append(name)
                break
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in filenames:
                if fn.startswith("."):
                    continue
                rel = Path(dirpath, fn).relative_to(rel_to).as_posix()
                (found if is_image_name(fn) else others).append(rel)
        else:
            files[name] = sorted(found)
            result.non_images += others
            if not found:
                result.empty.append(name)
    return result


def resolve_layout(root: Path) -> tuple[Path, Path | None, Path | None]:
    """(train folder, val folder or None when the set must be split, test folder or None).

    train/ + val/ + test/ is the usual three-way layout: test/ is then held out, evaluated once at the
    end. Without a val-like folder a test/ is what validates (fast.ai's layout), and there is no test split.
    """
    if (root / "train").is_dir():
        held_out = next((root / name for name in VAL_FOLDERS if (root / name).is_dir()), None)
        test = root / "test"
        has_test = held_out is not None and held_out.name != "test" and test.is_dir()
        return root / "train", held_out, test if has_test else None
    return root, None, None


def check_headers(root: Path, items: list[Item], policy: BadImagePolicy) -> tuple[list[Item], list[tuple[int, int]]]:
    """The items whose header reads, with their (width, height); each other file goes to the policy."""
    kept, sizes = [], []
    for rel, label in items:
        try:
            sizes.append(read_size(root / rel))
            kept.append((rel, label))
        except Exception as exc:  # noqa: BLE001  reported through the policy with the file name
            policy(str(root / rel), reason(exc))
    return kept, sizes


def check_decodes(root: Path, items: list[Item], policy: BadImagePolicy) -> list[Item]:
    """The items that decode completely (dataset.verify_images); each other file goes to the policy."""
    kept = []
    for rel, label in items:
        try:
            decode(root / rel)
            kept.append((rel, label))
        except Exception as exc:  # noqa: BLE001
            policy(str(root / rel), reason(exc))
    return kept


def size_range(sizes: list[tuple[int, int]]) -> str:
    """'sizes WxH', 'sizes WxH, WxH' (up to three distinct sizes) or 'widths A..B, heights C..D px'.

    Never a made-up size: phone photos of 4032x3024 and 3024x4032 are those two sizes, not "3024x3024..4032x4032".
    """
    if not sizes:
        return "no readable images"
    distinct, counts = np.unique(np.array(sizes), axis=0, return_counts=True)
    if len(distinct) <= 3:
        return "sizes " + ", ".join(f"{w}x{h}" for w, h in distinct[np.argsort(-counts, kind="stable")])
    w, h = distinct.T
    return f"widths {w.min()}..{w.max()}, heights {h.min()}..{h.max()} px"


def per_class(classes: list[str], train: list[int], val: list[int], limit: int = 8) -> str:
    """'train/val per class: a 10/2, b 9/3, ...' from the labels of each split: the first `limit` classes."""
    counts = [np.bincount(np.asarray(s, dtype=np.int64), minlength=len(classes)) for s in (train, val)]
    parts = [f"{_short(n)} {counts[0][i]}/{counts[1][i]}" for i, n in enumerate(classes[:limit])]
    more = f", ... ({len(classes) - limit} more)" if len(classes) > limit else ""
    return f"train/val per class: {', '.join(parts)}{more}"


def _short(name: str, limit: int = 40) -> str:
    # A class folder's name can be 255 characters: the summary line stays readable.
    return name if len(name) <= limit else name[:limit - 3] + "..."
