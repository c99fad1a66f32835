"""Preemption inside a job of Hydra's submitit launcher (`hydra/launcher=slurm` or `=local`).

submitit warns a job before its time limit with its own signal (USR2 unless the
SUBMITIT_PREEMPT_SIGNAL environment variable names another; SLURM gets
`--signal=USR2@<signal_delay_s>`) and installs a handler for it in the job process:
the handler pickles the job again (Hydra's launcher has the `checkpoint()` method
that resubmits the same sweep job), requeues it (`scontrol requeue` on SLURM, exit
code 144 that the local controller restarts on) and exits. Left alone, that handler
would run in the middle of a training step and lose everything since the last
checkpoint. So the trainer treats the signal like SIGUSR1 (finish the step, save
last.pt) and only then hands the job to submitit's handler; the requeued job runs
the same overrides in the same folder and `trainer.resume=auto` continues it.

SIGTERM and SIGINT still stop the run (saved, exit 75) but do not requeue: like
submitit itself, which ignores SIGTERM, they may come from `scancel` or Ctrl-C.
No torch import here: `resnet_cli.train` imports this module at start-up.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("resnet_cli")

_EXECUTOR_ENV = "SUBMITIT_EXECUTOR"  # set by submitit in every job it runs ("slurm", "local")
_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own setting; USR2 by default


def preempt_signal() -> str | None:
    """The signal name (e.g. "SIGUSR2") submitit sends this process before a timeout; None outside a submitit job."""
    if not os.environ.get(_EXECUTOR_ENV):
        return None
    name = os.environ.get(_SIGNAL_ENV, "USR2").upper()
    return name if name.startswith("SIG") else f"SIG{name}"


def requeue(signal_name: str | None) -> None:
    """Hand a stopped job (last.pt already saved) to submitit's requeue handler if `signal_name` was submitit's.

    Returns without doing anything outside a submitit job, for other signals, or when
    submitit's handler is not installed; otherwise submitit requeues the job and exits
    (SystemExit), or raises its UncompletedJobError when the job timed out too often.
    """
    name = preempt_signal()
    if name is None or signal_name != name:
        return
    sig = getattr(signal, name, None)
    handler = signal.getsignal(sig) if sig is not None else None
    owner = getattr(handler, "__self__", None)
    # Only ever call submitit's own handler (a bound method of its SignalHandler), never a foreign one.
    if not callable(handler) or not type(owner).__module__.startswith("submitit."):
        return
    log.info("%s: last.pt saved; submitit requeues this job (trainer.resume=auto continues it)", name)
    handler(sig, None)
