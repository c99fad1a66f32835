"""The decoded-image cache of a folder dataset: header sizes and uint8 arrays, reused while the files are unchanged.

A run on a folder reads every header (sizes, bad files) and, on the in-memory path, decodes
every image. Both are saved in the user's cache folder (`$RESNET_CLI_CACHE`, else
`$XDG_CACHE_HOME/resnet-cli`, else `~/.cache/resnet-cli`), one subfolder per data folder,
keyed by a stamp of the file list (path, label, byte size, modification time), and reused
while the stamp is unchanged: a second run starts training without opening an image. Not
inside the data folder: a hidden folder there would be taken for a class by torchvision's
ImageFolder and other tools. Arrays are memory-mapped (copy-on-write), so a cache larger
than free RAM still pages in on demand. A cache that cannot be written simply is not kept
(said once in the log).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from resnet_cli.fileio import atomic_write, is_regular_file

log = logging.getLogger(__name__)

CACHE_VERSION = 1
Item = tuple[str, int]


def stamp(root: Path, *splits: Sequence[Item]) -> str:
    """A digest of (split, path, label, size, mtime) of every listed file: changes when any file changes."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for number, items in enumerate(splits):
        for rel, label in items:
            try:
                st = os.stat(root / rel)
                h.update(f"{number}\0{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            except OSError:
                h.update(f"{number}\0{rel}\0{label}\0missing\n".encode())
    return h.hexdigest()


def cache_root() -> Path:
    """Where decoded caches live: $RESNET_CLI_CACHE, else $XDG_CACHE_HOME/resnet-cli, else ~/.cache/resnet-cli."""
    if os.environ.get("RESNET_CLI_CACHE"):
        return Path(os.environ["RESNET_CLI_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "resnet-cli"


def _folder_id(folder: Path) -> str:
    # One subfolder per data folder: its name for a reader, a digest of its absolute path for uniqueness.
    resolved = folder.expanduser().resolve()
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:12]
    return f"{resolved.name or 'root'}-{digest}"


class FolderCache:
    """Header sizes and decoded arrays of one folder's splits, valid for one stamp."""

    def __init__(self, folder: Path, key: str) -> None:
        self.dir, self.key = cache_root() / _folder_id(Path(folder)), key
        self.index_path = self.dir / "index.json"
        self.writable = True
        self.index = self._read_index()

    def _read_index(self) -> dict:
        if not is_regular_file(self.index_path):
            return {}
        try:
            data = json.loads(self.index_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if data.get("version") == CACHE_VERSION and data.get("stamp") == self.key else {}

    def scanned(self) -> dict | None:
        """The saved header scan ({'train': items, 'val': items, 'sizes': ..., 'skipped': ...}) or None."""
        return self.index.get("scan")

    def save_scan(self, scan: dict) -> None:
        """Remember the header scan for this stamp (drops arrays of any older stamp)."""
        if not self.index:
            self.index = {"version": CACHE_VERSION, "stamp": self.key, "arrays": {}}
            self._prune()
        self.index["scan"] = scan
        self._write_index()

    def array(self, split: str, side: int) -> torch.Tensor | None:
        """The cached uint8 [N, 3, side, side] images of a split, memory-mapped, or None."""
        name = self.index.get("arrays", {}).get(f"{split}-{side}")
        if not name:
            return None
        try:
            # Copy-on-write: pages load on demand, nothing ever writes back to the file.
            return torch.from_numpy(np.load(self.dir / name, mmap_mode="c"))
        except (OSError, ValueError) as exc:
            log.warning("decoded cache %s unreadable (%s); decoding again", self.dir / name, exc)
            return None

    def save_array(self, split: str, side: int, images: torch.Tensor) -> None:
        """Save a split's decoded images for this stamp (atomic: a crash leaves no half file)."""
        if not self.index or not self.writable:
            return
        name = f"{split}-{side}px-{self.key[:12]}.npy"
        try:
            atomic_write(self.dir / name, lambda f: np.save(f, images.numpy()), durable=False)
        except OSError as exc:
            self._give_up(exc)
            return
        self.index.setdefault("arrays", {})[f"{split}-{side}"] = name
        self._write_index()

    def _prune(self) -> None:
        # Arrays of an older stamp can never be used again.
        for old in self.dir.glob("*.npy") if self.dir.is_dir() else []:
            try:
                old.unlink()
            except OSError:
                pass

    def _write_index(self) -> None:
        if not self.writable:
            return
        try:
            atomic_write(self.index_path, json.dumps(self.index) + "\n", durable=False)
        except OSError as exc:
            self._give_up(exc)

    def _give_up(self, exc: OSError) -> None:
        self.writable = False
        log.warning("cannot write the decoded-image cache in %s (%s); images are decoded on every run",
                    self.dir, exc.strerror or exc)
