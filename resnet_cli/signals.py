"""Stopping a run early: stop signals become a flag the Trainer reads between steps (no torch import here)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from resnet_cli import submitit_requeue

STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Preempted(Exception):
    """A stop signal arrived; the state was saved and the run can be resumed."""

    @classmethod
    def after(cls, signal_name: str, run_dir: Path) -> "Preempted":
        """The exception for a run stopped by `signal_name` once last.pt in run_dir was saved."""
        # A plain message argument keeps the exception picklable (joblib sends it between processes).
        exc = cls(f"received {signal_name}; saved {Path(run_dir) / 'last.pt'}; rerun the same command with "
                  f"trainer.resume=auto to continue")
        exc.signal_name = signal_name  # which signal decides whether a submitit job is requeued
        return exc


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C: stop at once; the message names the last checkpoint on disk."""


class StopFlag:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag the Trainer checks after each step.

    `checkpoints` is anything with a `last_good` path (the checkpoint writer): a second Ctrl-C names it.
    """

    def __init__(self, checkpoints: Any = None):
        self.signal: str | None = None
        self.checkpoints = checkpoints
        self._previous: dict = {}
        # In a submitit job its preemption signal (USR2) also stops at a step boundary; see submitit_requeue.
        for name in (*STOP_SIGNALS, *filter(None, [submitit_requeue.preempt_signal()])):
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. some launchers): no handler
                    pass

    def agree(self, rt: Any) -> bool:
        """Whether any process was told to stop: one collective under DDP (a process stopped by a peer says "peer")."""
        if rt.distributed and _any_rank(self.signal is not None, rt):
            self.signal = self.signal or "peer"
        return self.signal is not None

    def close(self) -> None:
        """Give the signals back to their previous handlers (in-process callers keep their Ctrl-C)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signal.Signals(signum).name == "SIGINT":
            # A second Ctrl-C stops at once, mid-step, so nothing more is saved; name what is on disk.
            last = getattr(self.checkpoints, "last_good", None)
            raise Interrupted(f"stopped at once by a second Ctrl-C; last checkpoint: {last or 'none'}"
                              + (" (rerun with trainer.resume=auto to continue from it)" if last else ""))
        self.signal = signal.Signals(signum).name


def _any_rank(flag: bool, rt: Any) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())
