"""Checkpoints: atomic save, safe (weights_only) load, RNG capture, resume discovery."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from resnet_cli.errors import UserError

FORMAT = "resnet-cli/1"
LAST, BEST = "last.pt", "best.pt"


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write obj with torch.save to path so that a crash never leaves a partial file.

    The bytes go to a temporary file in the same folder (same filesystem, so the
    rename is atomic), are flushed and fsynced, and only then replace `path`.
    Any failure (a full disk, an exception while pickling) leaves the previous
    file untouched and removes the temporary one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    # Make the rename itself durable (a no-op where directories cannot be opened).
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a resnet-cli checkpoint safely; one-line UserError for bad files."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        # weights_only=True: tensors and plain containers only; a pickled code payload is refused.
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc).lower():
            raise UserError(f"refused to load {path}: it holds objects other than tensors and plain data "
                            f"(possibly code); only load checkpoints you trust") from exc
        raise UserError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({_first_line(exc)})") from exc
    except Exception as exc:  # noqa: BLE001 - a foreign file fails in many ways (KeyError, EOFError, zip errors)
        raise UserError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({_first_line(exc)})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a resnet-cli checkpoint (no 'model' entry)")
    return ckpt


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    # torch's messages run on with advice that does not fit one line: keep the first sentence.
    return text[0].split(". ")[0][:200] if text else type(exc).__name__


def rng_state() -> dict:
    """Every RNG the run draws from, in a form weights_only loading accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() captured (from a checkpoint loaded onto any device)."""
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].cpu().numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    # RNG states must be CPU byte tensors, even when the checkpoint was mapped onto a GPU.
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuplify(value: Any) -> Any:
    # random.setstate wants tuples; the checkpoint may hand back lists.
    if isinstance(value, (list, tuple)):
        return tuple(_tuplify(v) for v in value)
    return value


def is_finite_state(state_dict: dict) -> bool:
    """Whether every floating tensor of a state_dict is finite (guards last.pt and best.pt)."""
    return all(torch.isfinite(t).all() for t in state_dict.values() if torch.is_tensor(t) and t.is_floating_point())


def comparable_config(config: dict) -> dict:
    """The parts of a config that must match for trainer.resume=auto to continue a run."""
    config = {k: v for k, v in config.items() if k not in ("output_root",)}
    trainer = dict(config.get("trainer", {}))
    for volatile in ("resume", "progress", "dry_run"):
        trainer.pop(volatile, None)
    config["trainer"] = trainer
    return config


def find_resumable(root: str | os.PathLike, config: dict, exclude: Path | None = None) -> Path | None:
    """The newest run folder under root whose last.pt is unfinished and was made by the same config."""
    root = Path(root)
    if not root.is_dir():
        return None
    want = comparable_config(config)
    candidates = sorted(root.rglob(LAST), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if exclude is not None and path.parent == exclude:
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable candidate is simply not resumable
            continue
        if not ckpt.get("finished") and comparable_config(ckpt.get("config", {})) == want:
            return path.parent
    return None
