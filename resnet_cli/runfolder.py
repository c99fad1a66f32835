"""The run-folder guard: one writer per run folder, and a folder that holds a run is written again only to resume it.

A run folder is chosen before any data is read, and often by hand (`hydra.run.dir=...`,
a fixed folder per SLURM job). Starting another run there would replace its checkpoints,
metrics and class names. So a folder that holds last.pt or metrics.json is refused unless
the new run resumes it (`trainer.resume=auto` with the same config, or an explicit
`trainer.resume=<that folder>` of the same model and data) or `trainer.overwrite=true` asks to
replace it. And while a run is alive its folder is locked (`hold()`: a POSIX lock on
`.resnet-cli.lock` that the kernel drops when the process dies, however it dies), so a second
run, an overwrite or a resume of that live run is refused, naming who holds it.

No torch at import: the guard also runs as a Hydra callback before Hydra writes anything
into the folder; torch is imported only to read an existing last.pt.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from resnet_cli.errors import UserError

log = logging.getLogger("resnet_cli")

LAST, BEST = "last.pt", "best.pt"
MARKERS = (LAST, "metrics.json")  # either one means the folder holds a run
# What a run writes into its folder; trainer.overwrite=true removes these before the new run starts.
ARTIFACTS = ("last.pt", "best.pt", "metrics.json", "class_names.json", "resumed_into.txt", "topk", "results.csv",
             "misclassified.csv", "curves.png")


LOCK = ".resnet-cli.lock"
# resolved run folder -> the open, locked descriptor of its lock file (this process). A POSIX lock is
# lost when its process closes *any* descriptor of the file, so holder() never opens one of these.
_HELD: dict[str, int] = {}


def holder(run_dir: str | os.PathLike) -> str | None:
    """Who holds run_dir's lock ('pid 123 on host, since ...'), or None when no live process does."""
    path = Path(run_dir) / LOCK
    key = _key(run_dir)
    if key in _HELD:
        return f"this process (pid {os.getpid()})"
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None  # no lock file (or not one we could open): nobody holds it
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return _describe(fd)
    else:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _describe(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace") or "{}")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["started"])))
        return f"pid {int(info['pid'])} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _key(run_dir: str | os.PathLike) -> str:
    return os.path.realpath(run_dir)


def hold(run_dir: str | os.PathLike, key: str = "hydra.run.dir") -> bool:
    """Lock run_dir for this process's lifetime (or until release()); a one-line UserError if a live run holds it.

    Returns False when this process holds it already. The lock is a POSIX record lock (lockf): it
    belongs to this process alone (DataLoader workers forked later do not inherit it, so they cannot
    keep a killed run's folder locked) and the kernel drops it when the process exits or is killed,
    so a crashed run never blocks the next one. It works on NFS too (through its lock manager).
    """
    run_dir = Path(run_dir)
    if _key(run_dir) in _HELD:
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        who = _describe(fd)
        os.close(fd)
        raise UserError(f"{key}={run_dir} is in use by a run that is still going ({who}); wait for it to end, or "
                        f"choose another folder") from None
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv[:8]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
    _HELD[_key(run_dir)] = fd
    return True


def held_folders() -> list[str]:
    """The run folders this process holds (resolved paths), in the order it took them."""
    return list(_HELD)


def release(run_dir: str | os.PathLike) -> None:
    """Give up this process's lock on run_dir (a sweep worker goes on to its next job)."""
    fd = _HELD.pop(_key(run_dir), None)
    if fd is not None:
        fcntl.lockf(fd, fcntl.LOCK_UN)
        os.close(fd)


def held_run(run_dir: str | os.PathLike) -> list[str]:
    """The marker files in run_dir that show it already holds a run (lexists: a FIFO or dangling link counts too)."""
    run_dir = Path(run_dir)
    try:
        return [name for name in MARKERS if os.path.lexists(run_dir / name)]
    except OSError:
        return []


def check_run_folder(cfg: DictConfig, plain: dict, run_dir: str | os.PathLike) -> bool:
    """Whether run_dir is to be resumed in place; a one-line UserError when the run would replace another.

    `plain` is the resolved task config (what checkpoints store). Returns True only for
    `trainer.resume=auto` on a folder whose last.pt was written by the same config.
    """
    run_dir = Path(run_dir)
    held = held_run(run_dir)
    if not held:
        return False
    tcfg = cfg.trainer
    request = tcfg.get("resume")
    if tcfg.get("overwrite"):
        return False  # replaced by clear_run() just before the new run writes its first file
    where = f"hydra.run.dir={run_dir}"
    if str(request) == "auto":
        if LAST not in held:
            raise UserError(f"{where} holds {', '.join(held)} but no {LAST} to resume; choose another hydra.run.dir, "
                            f"or set trainer.overwrite=true to replace that run")
        from resnet_cli import checkpoint

        ck = checkpoint.load(run_dir / LAST, map_location="cpu")
        diff = differing_keys(comparable_config(ck.get("config", {})), comparable_config(plain))
        if not diff:
            return True
        shown = ", ".join(diff[:4]) + (f" and {len(diff) - 4} more" if len(diff) > 4 else "")
        raise UserError(f"{where} holds a run of another config (differs in {shown}); trainer.resume=auto continues "
                        f"only the same config: choose another hydra.run.dir, or set trainer.overwrite=true to "
                        f"replace that run")
    if request:
        target = Path(str(request))
        ckpt_file = target / LAST if target.is_dir() else target
        if _same(ckpt_file.parent, run_dir):
            return False  # an explicit resume of this very folder continues it
    raise UserError(f"{where} already holds a run ({', '.join(held)}); rerun with trainer.resume=auto to continue it, "
                    f"choose another hydra.run.dir, or set trainer.overwrite=true to replace it")


def differing_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (sorted)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b), key=str):
            out += differing_keys(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def _same(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def clear_run(run_dir: str | os.PathLike) -> None:
    """Remove a previous run's checkpoints, metrics, class names and events (trainer.overwrite=true).

    Called as late as possible, once the new run has its data and model, so a run that
    fails on start-up leaves the old one in place.
    """
    run_dir = Path(run_dir)
    if not held_run(run_dir):
        return
    log.warning("trainer.overwrite=true: replacing the previous run in %s", run_dir)
    for name in ARTIFACTS:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()
    for events in run_dir.glob("events.out.tfevents.*"):
        events.unlink()


@dataclass(frozen=True)
class Resume:
    """What a run continues from: the checkpoint (None: a fresh start), the folder it writes, the classes it had."""

    checkpoint: Path | None
    run_dir: Path
    class_names: tuple[str, ...] = ()

    def check_classes(self, names: list[str]) -> None:
        """Refuse (one line) to continue a checkpoint whose classes are not the data's, before anything is written."""
        if self.checkpoint is None or not self.class_names or list(self.class_names) == list(names):
            return
        old, new = list(self.class_names), list(names)
        gone, added = [c for c in old if c not in new], [c for c in new if c not in old]
        what = (f"classes only in the checkpoint: {gone[:3]}; only in the data: {added[:3]}" if gone or added
                else "the same classes in another order")
        raise UserError(f"trainer.resume={self.checkpoint}: it was trained on other classes ({what}); resuming it "
                        f"would write this data's run into {self.run_dir}: point dataset.root at the data it was "
                        f"trained on, or start a new run with model.pretrained={self.checkpoint}")

    def claim(self) -> None:
        """Lock the folder this run continues in (one writer, or a one-line refusal naming the live one)."""
        if self.checkpoint is not None:
            hold(self.run_dir, key="trainer.resume")

    def follow_log(self, hydra_dir: Path) -> None:
        """Send our log lines to the resumed folder's train.log too (it continues there, not in hydra_dir)."""
        if self.checkpoint is None or _key(self.run_dir) == _key(hydra_dir):
            return
        handler = logging.FileHandler(self.run_dir / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        log.info("resuming %s in %s", self.checkpoint, self.run_dir)


# The keys a resumed checkpoint must share with the run that continues it: the model it was made by
# (but where its first weights came from) and the data (builder and folder). Everything else, the
# epochs to run above all, may change.
_MODEL_FREE = ("pretrained",)
_DATASET_IDENTITY = ("_target_", "root", "labels", "val_split")


def _identity(config: Any) -> dict:
    config = config if isinstance(config, dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    dataset = config.get("dataset") if isinstance(config.get("dataset"), dict) else {}
    data = {k: dataset[k] for k in _DATASET_IDENTITY if k in dataset}
    if isinstance(data.get("root"), str):
        data["root"] = os.path.normpath(os.path.expanduser(data["root"]))
    return {"model": {k: v for k, v in model.items() if k not in _MODEL_FREE}, "dataset": data}


def check_identity(ckpt: dict, plain: dict, source: Any) -> None:
    """Refuse (one line) to resume a checkpoint made by another model or from other data than `plain` describes."""
    was = _identity(ckpt.get("config"))
    diff = differing_keys(was, _identity(plain))
    if not diff:
        return
    shown = ", ".join(diff[:3]) + (f" and {len(diff) - 3} more" if len(diff) > 3 else "")
    made_by = was["model"].get("name", "another model")
    data = str(was["dataset"].get("_target_", "other data")).rsplit(".", 1)[-1]
    root = f" ({was['dataset']['root']})" if was["dataset"].get("root") else ""
    raise UserError(f"trainer.resume={source}: it was made by {made_by} on {data}{root}, which this run does not "
                    f"match (differs in {shown}); resume continues the same model on the same data: set those keys "
                    f"as the run had them, or start a new run with model.pretrained={source}")


def resume_target(cfg: DictConfig, plain: dict, run_dir: Path, rt: Any) -> Resume:
    """Which checkpoint to continue from and which run folder to write into, checked and locked.

    Rank 0 decides (it alone reads the folders) and tells the others. A run resumed from another
    folder continues there, so checkpoints and the TensorBoard step axis stay in one run. A checkpoint
    of another model or data is refused; its classes are checked once the data is built
    (Resume.check_classes), and only then is its folder locked (Resume.claim). Nothing is written here.
    """
    # A folder that holds a run is written only to resume that run (or with trainer.overwrite=true).
    in_place = check_run_folder(cfg, plain, run_dir) if rt.is_main else False
    request = cfg.trainer.resume
    if not request:
        return Resume(None, run_dir)
    found: Path | None = None
    if rt.is_main:
        if str(request) == "auto":
            found = run_dir if in_place else find_resumable(cfg.output_root, plain, exclude=run_dir)
            if found is None:
                log.info("trainer.resume=auto: no unfinished run of this config under %s; starting fresh",
                         cfg.output_root)
        else:
            path = Path(str(request))
            if not path.exists():
                raise UserError(f"trainer.resume={request}: no such checkpoint or run folder")
            found = path
    found = _broadcast(found, rt)
    if found is None:
        return Resume(None, run_dir)
    ckpt_file = found / LAST if found.is_dir() else found
    new_dir = ckpt_file.parent
    names: tuple[str, ...] = ()
    if rt.is_main:
        from resnet_cli import checkpoint

        ck = checkpoint.load(ckpt_file, map_location="cpu")
        check_identity(ck, plain, request if str(request) != "auto" else ckpt_file)
        stored = ck.get("class_names")
        names = tuple(stored) if isinstance(stored, list) and all(isinstance(n, str) for n in stored) else ()
    return Resume(ckpt_file, new_dir, names)


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
    import torch

    from resnet_cli.fileio import is_regular_file

    root = Path(root)
    if not root.is_dir():
        return None
    want = comparable_config(config)
    found = list(root.rglob(LAST))
    # Only regular files are opened: a FIFO named last.pt would block the load forever.
    for path in found:
        if not is_regular_file(path):
            log.warning("trainer.resume=auto: skipped %s: not a regular file", path)
    candidates = sorted((p for p in found if is_regular_file(p)), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        if exclude is not None and path.parent == exclude:
            continue
        who = holder(path.parent)
        if who is not None:  # its run is still going: continuing it too would make two writers
            log.warning("trainer.resume=auto: skipped %s: in use by %s", path.parent, who)
            continue
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an unreadable candidate is simply not resumable
            continue
        if not ckpt.get("finished") and comparable_config(ckpt.get("config", {})) == want:
            return path.parent
    return None


def _broadcast(value: Any, rt: Any) -> Any:
    if not rt.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
