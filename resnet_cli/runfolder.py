"""The run-folder guard: a folder that holds a run is written again only to resume that run, or on request.

A run folder is chosen before any data is read, and often by hand (`hydra.run.dir=...`,
a fixed folder per SLURM job). Starting another run there would replace its checkpoints,
metrics and class names. So a folder that holds last.pt or metrics.json is refused unless
the new run resumes it (`trainer.resume=auto` with the same config, or an explicit
`trainer.resume=<that folder>`) or `trainer.overwrite=true` asks to replace it.

No torch at import: the guard also runs as a Hydra callback before Hydra writes anything
into the folder; torch is imported only to read an existing last.pt.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from resnet_cli.errors import UserError

log = logging.getLogger("resnet_cli")

LAST = "last.pt"
MARKERS = (LAST, "metrics.json")  # either one means the folder holds a run
# What a run writes into its folder; trainer.overwrite=true removes these before the new run starts.
ARTIFACTS = ("last.pt", "best.pt", "metrics.json", "class_names.json", "resumed_into.txt", "topk")


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
        diff = differing_keys(checkpoint.comparable_config(ck.get("config", {})),
                              checkpoint.comparable_config(plain))
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


def resume_target(cfg: DictConfig, plain: dict, run_dir: Path, rt: Any) -> tuple[Path | None, Path]:
    """Which checkpoint to continue from (None: a fresh start) and which run folder to write into.

    Rank 0 decides (it alone reads the folders) and tells the others. A run resumed from another
    folder continues there, so checkpoints and the TensorBoard step axis stay in one run.
    """
    # A folder that holds a run is written only to resume that run (or with trainer.overwrite=true).
    in_place = check_run_folder(cfg, plain, run_dir) if rt.is_main else False
    request = cfg.trainer.resume
    if not request:
        return None, run_dir
    found: Path | None = None
    if rt.is_main:
        if str(request) == "auto":
            if in_place:
                found = run_dir  # a fixed hydra.run.dir (e.g. a requeued SLURM job) resumes in place
            else:
                from resnet_cli.checkpoint import find_resumable

                found = find_resumable(cfg.output_root, plain, exclude=run_dir)
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
        return None, run_dir
    ckpt_file = found / LAST if found.is_dir() else found
    new_dir = ckpt_file.parent
    if rt.is_main and new_dir.resolve() != run_dir.resolve():
        # Our log lines go to the original folder's train.log too (resumed_into.txt is left in the new
        # folder once the checkpoint has loaded).
        handler = logging.FileHandler(new_dir / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        log.info("resuming %s in %s", ckpt_file, new_dir)
    return ckpt_file, new_dir


def _broadcast(value: Any, rt: Any) -> Any:
    if not rt.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
