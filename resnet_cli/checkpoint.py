"""Checkpoints: what one holds, atomic save (last, best, top-k), weights_only load, RNG capture."""

from __future__ import annotations

import io
import logging
import os
import pickletools
import random
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from resnet_cli.errors import UserError, first_line, one_line
from resnet_cli.fileio import atomic_link, atomic_write, regular_file
from resnet_cli.runfolder import BEST, LAST

if TYPE_CHECKING:
    from resnet_cli.engine import Parts, Progress

log = logging.getLogger(__name__)

FORMAT = "resnet-cli/1"


def contents(parts: "Parts", progress: "Progress", identity: dict, *, finished: bool, metrics: dict) -> dict:
    """The checkpoint dict (schema in docs/ARCHITECTURE.md): every part's state, the progress, the RNGs.

    `identity` holds what names the run and what tools need from it: config, class_names, eval_spec.
    """
    return {
        "format": FORMAT,
        "model": parts.raw_model.state_dict(),
        "optimizer": parts.optimizer.state_dict(),
        "scheduler": parts.scheduler.state_dict(),
        "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None,
        "ema": parts.ema.state_dict() if parts.ema is not None else None,
        **progress.state_dict(),  # epoch, step_in_epoch, global_step, bad_steps, best, running, history
        "rng": rng_state(),
        "finished": finished,
        **identity,
        "metrics": metrics,
    }


def restore(ck: dict, parts: "Parts", progress: "Progress", source: str | os.PathLike,
            device: torch.device | str = "cpu") -> None:
    """Load a checkpoint made by contents() into the parts, the progress and the RNGs; one line if it does not fit."""
    config = ck.get("config") if isinstance(ck.get("config"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    made_by = model.get("name", "another model")
    context = f"trainer.resume={source}: it was made by {made_by} with other settings and does not fit this model"
    load_weights(parts.raw_model, ck["model"], context)
    try:
        parts.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{context}'s optimizer ({first_line(exc, 160)})") from exc
    # The rest is a file's word too (a checkpoint may come from anywhere): a damaged entry is one line.
    entry = "scheduler"
    try:
        parts.scheduler.load_state_dict(ck["scheduler"])
        entry = "scaler"
        if ck.get("scaler"):
            parts.scaler.load_state_dict(ck["scaler"])
        entry = "ema"
        if parts.ema is not None and ck.get("ema"):
            parts.ema.load_state_dict(ck["ema"])
        entry = "progress (epoch, step, best, history)"
        for key in ("epoch", "step_in_epoch", "global_step"):
            if not isinstance(ck.get(key), int) or isinstance(ck.get(key), bool) or ck[key] < 0:
                raise ValueError(f"{key}={ck.get(key)!r} is not a count")
        progress.load_state_dict(ck, torch.device(device))
        entry = "rng"
        set_rng_state(ck["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise UserError(f"trainer.resume={source}: its {entry} entry is damaged ({first_line(exc, 160)}); "
                        f"resume from another checkpoint") from exc


class CheckpointWriter:
    """Writes a run's last.pt, best.pt (a second name for the same file) and top-k files, each atomically."""

    def __init__(self, run_dir: str | os.PathLike, *, top_k: int = 0, higher_is_better: bool = True,
                 last_good: Path | None = None):
        self.run_dir, self.top_k, self.higher_is_better = Path(run_dir), top_k, higher_is_better
        self.last_good = last_good  # the newest complete checkpoint: what a stopped run names

    def save(self, ck: dict, *, best: bool = False, epoch: int | None = None, value: float | None = None) -> None:
        """Replace last.pt (and best.pt, and enter top-k with `value` at `epoch`); one-line UserError on failure."""
        target = self.run_dir / LAST
        try:
            atomic_save(ck, target)
            self.last_good = target
            if best:
                target = self.run_dir / BEST
                try:  # best.pt is this very checkpoint: a second name for last.pt, not a second 100 MB write
                    atomic_link(self.run_dir / LAST, target)
                except OSError:
                    atomic_save(ck, target)
            if self.top_k and epoch is not None and value is not None:
                target = self.run_dir / "topk"
                self._top_k(ck, epoch, value)
        except OSError as exc:
            # The save is atomic: the file being replaced is still the previous, complete one.
            where = exc if exc.filename else OSError(exc.errno, exc.strerror, str(target))
            kept = f"the previous {self.last_good} is intact" if self.last_good else "no checkpoint was saved"
            raise UserError(f"cannot save a checkpoint: {one_line(where)} ({kept}; then rerun with "
                            f"trainer.resume=auto)") from exc

    def _top_k(self, ck: dict, epoch: int, value: float) -> None:
        folder = self.run_dir / "topk"
        folder.mkdir(exist_ok=True)
        score = value if self.higher_is_better else -value

        def kept() -> list[tuple[float, Path]]:
            return sorted(((float(p.stem.split("_")[-1]), p) for p in folder.glob("epoch*_*.pt")), reverse=True)

        if len(kept()) < self.top_k or score > kept()[-1][0]:
            atomic_save(ck, folder / f"epoch{epoch:03d}_{score:.6f}.pt")
            for _, path in kept()[self.top_k:]:
                path.unlink()


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write obj with torch.save to path so that a crash never leaves a partial file (fileio.atomic_write)."""
    # torch.save is looked up at call time, so a test can make it fail midway.
    atomic_write(path, lambda fh: torch.save(obj, fh))


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a resnet-cli checkpoint safely; one-line UserError for bad files."""
    path = Path(path)
    if path.is_dir():
        path = path / LAST
    regular_file(path, "checkpoint")  # a FIFO or device named *.pt would block torch.load forever
    try:
        with warnings.catch_warnings():
            # torch warns about pickle protocols on stderr; the outcome is reported below in one line.
            warnings.simplefilter("ignore", UserWarning)
            # weights_only=True: tensors and plain containers only; a pickled code payload is refused.
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - a foreign file fails in many ways (KeyError, EOFError, zip errors)
        forbidden = forbidden_global(path)
        if forbidden:
            raise UserError(f"refused to load {path}: it holds objects other than tensors and plain data "
                            f"({forbidden}, possibly code); only load checkpoints you trust") from exc
        raise UserError(f"cannot read checkpoint {path}: truncated or not a PyTorch file ({first_line(exc)})") from exc
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path} is not a resnet-cli checkpoint (no 'model' entry)")
    return ckpt


# Opcodes that push a string: candidates for the module and name a STACK_GLOBAL takes off the stack.
_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def forbidden_global(path: str | os.PathLike) -> str | None:
    """The first callable a checkpoint's pickle names that weights_only loading does not allow, else None.

    Only a complete, well-formed pickle counts: random bytes, text or a truncated file fail
    to parse and are called corrupt, not code. The pickle is only read (pickletools), never run.
    """
    try:
        allowed = set(_allowed_globals())
        with _pickle_stream(Path(path)) as stream:
            strings: list[str] = []
            memo: dict[int, str] = {}
            for op, arg, _ in pickletools.genops(stream):
                name = None
                if op.name in _STRING_OPS:
                    strings.append(str(arg))
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[int(arg)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and int(arg) in memo:
                    strings.append(memo[int(arg)])
                elif op.name in ("GLOBAL", "INST"):
                    name = str(arg).replace(" ", ".")
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    name = f"{strings[-2]}.{strings[-1]}"
                if name is not None and name not in allowed:
                    return name
    except Exception:  # noqa: BLE001 - not a complete pickle: corrupt or foreign bytes, not code
        return None
    return None


def _allowed_globals() -> list[str]:
    # torch's own allow-list of the weights_only unpickler (plus globals a user registered as safe).
    from torch import _weights_only_unpickler as wou

    names = list(wou._get_allowed_globals())
    for obj in torch.serialization.get_safe_globals():
        obj = obj[0] if isinstance(obj, tuple) else obj
        names.append(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}")
    return names


def _pickle_stream(path: Path):
    # torch.save writes a zip whose <archive>/data.pkl holds the object tree; older files are a bare pickle.
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            return io.BytesIO(archive.read(name))  # the tree only (tensors are separate members): small
    return open(path, "rb")


def load_weights(model: torch.nn.Module, state: dict, context: str) -> None:
    """Load a state_dict into model, or raise one UserError line: `context` plus what does not fit.

    torch's own message lists every mismatched tensor over dozens of lines; this names
    the counts and one example of each kind (shape, missing, unknown).
    """
    try:
        model.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"{context} ({mismatch(model, state) or first_line(exc)})") from exc


def mismatch(model: torch.nn.Module, state: Any, optional: Callable[[str], bool] = lambda key: False) -> str:
    """How a state_dict differs from a model's own, in one line ('' when the keys and shapes agree).

    Keys of the model for which `optional(key)` is true may be absent from `state`.
    """
    if not isinstance(state, dict):
        return f"the weights are a {type(state).__name__}, not a state_dict"
    own = model.state_dict()
    shapes = [k for k in state if k in own and tuple(getattr(state[k], "shape", ())) != tuple(own[k].shape)]
    missing = [k for k in own if k not in state and not optional(k)]
    unexpected = [k for k in state if k not in own]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} shape mismatch(es), e.g. {k} is {list(getattr(state[k], 'shape', ()))} in the "
                     f"file but {list(own[k].shape)} in the model")
    if missing:
        parts.append(f"{len(missing)} weight(s) missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unknown weight(s), e.g. {unexpected[0]}")
    return "; ".join(parts)


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
