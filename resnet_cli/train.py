"""`resnet-train`: the command. Hydra's entry point, exit codes, and every error as one line.

Only Hydra and OmegaConf are imported at module level: `--help`, `--cfg job` and shell
completion never pay for torch. The run itself is resnet_cli.trainer, imported inside `fit`.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from resnet_cli import config as _schemas  # noqa: F401  (registers the typed schemas)
from resnet_cli import config_dir, submitit_requeue
from resnet_cli.errors import Diverged, Refused, UserError, one_line
from resnet_cli.extras import require_extras
from resnet_cli.signals import Preempted

EXIT_USER_ERROR = 2  # bad config, missing data, unreadable file: fix and run again
EXIT_DIVERGED = 3  # non-finite loss: the last good checkpoint is named in the message
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1/SIGINT after saving last.pt: rerun with trainer.resume=auto
EXIT_INTERRUPTED = 130  # a second Ctrl-C stopped the run at once (the shell's code for SIGINT)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra's task function: one training run in its own run folder."""
    hc = HydraConfig.get()
    try:
        return fit(cfg, Path(hc.runtime.output_dir))
    except UserError as exc:
        if hc.mode != RunMode.RUN:
            raise  # in a sweep, Hydra records the failed job and the others go on
        # A single run: report here, before Hydra adds its own "Error executing job" line.
        _report(exc)
    except Preempted as exc:
        if hc.mode != RunMode.RUN:
            # A submitit job stopped by submitit's own signal: requeue it now that last.pt is saved.
            submitit_requeue.requeue(getattr(exc, "signal_name", None))
            raise
        _preempted(exc)


def main() -> None:
    """Console entry point: run Hydra, and turn user-caused errors into one line and an exit code."""
    # Let errors reach us instead of Hydra's multi-line report, so they print as one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _quiet_other_ranks()
    try:  # the outer try also catches a Ctrl-C that lands while an inner handler reports
        try:
            require_extras(sys.argv[1:])  # a missing plugin's extra, named before Hydra reports it its own way
            hydra_main()
        except Preempted as exc:
            _preempted(exc)
        except Refused as exc:
            _report(exc.error)  # refused before Hydra wrote anything (run-folder guard)
        except (UserError, HydraException, OmegaConfBaseException) as exc:
            _report(exc)
        except OSError as exc:
            if not exc.filename:
                exc = _name_run_folder(exc)  # Hydra's own writes (.hydra/, the log) name no file: name the folder
            _report(exc)  # read-only folder, a file where a folder should be, a full disk: one line naming it
    except KeyboardInterrupt as exc:
        _interrupted(exc)


# What a failed write can say without naming its file: the disk, not the program, is at fault.
_DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO)


def _name_run_folder(exc: OSError) -> OSError:
    """The same error naming the run folder Hydra was writing into; re-raised if it is not about the disk."""
    if exc.errno not in _DISK_ERRNOS:
        raise exc
    from resnet_cli.runfolder import held_folders

    folders = held_folders()  # the run folder RunFolderGuard locked before Hydra wrote into it
    return OSError(exc.errno, exc.strerror, folders[0] if folders else os.getcwd())


def _preempted(exc: Preempted) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # saved and leaving: a late second Ctrl-C changes nothing
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 saved the checkpoint; it alone says where
        print(f"resnet-train: {exc} (exit code {EXIT_PREEMPTED})", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


def _interrupted(exc: KeyboardInterrupt) -> None:
    # A second Ctrl-C stops at once (mid-step: its state is not saved); say what is on disk instead of a traceback.
    if int(os.environ.get("RANK", "0")) == 0:
        detail = str(exc) or "rerun with trainer.resume=auto to continue from the last checkpoint, if any"
        print(f"resnet-train: interrupted by Ctrl-C; {detail}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def _report(exc: BaseException) -> None:
    print(f"resnet-train: error: {one_line(exc)}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED if isinstance(exc, Diverged) else EXIT_USER_ERROR)


def _quiet_other_ranks() -> None:
    # Under torchrun every process runs Hydra; only rank 0 may create a run folder.
    if int(os.environ.get("RANK", "0")) != 0 and len(sys.argv) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


def fit(cfg: DictConfig, run_dir: Path) -> float:
    """Train as configured, writing into run_dir; returns the best validation accuracy."""
    from resnet_cli.validate import validate

    validate(cfg)  # every key's range and relations: before torch, data or the run folder are touched
    from resnet_cli import runfolder
    from resnet_cli.trainer import prepare

    # One writer per run folder. A single run holds it already (RunFolderGuard, before Hydra wrote
    # there); a sweep job takes it here and gives it back when done (a launcher's worker runs on).
    mine = runfolder.hold(run_dir) if int(os.environ.get("RANK", "0")) == 0 else False
    try:
        with prepare(cfg, run_dir) as trainer:
            return trainer.dry_run() if cfg.trainer.dry_run else trainer.fit()
    finally:
        if mine:
            runfolder.release(run_dir)


if __name__ == "__main__":
    main()
