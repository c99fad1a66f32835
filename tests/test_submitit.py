"""A sweep through Hydra's submitit launcher for real (submitit's local executor), with a requeue.

`hydra/launcher=local` is the same plugin and submitit code as `hydra/launcher=slurm` (pickled
jobs, a controller per job, the preemption signal and the requeue), run as local processes.
"""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY, read_metrics, resnet_train_cmd
from procs import (TAG_ENV, Follower, Tracked, assert_no_leftovers, cmdline, holding_open, kill_tree, needs_proc,
                   new_tag, tagged, wait_for_file_line)
from test_resume import assert_same_tensors

from resnet_cli.config import run_label

# 128 images in batches of 16: 8 steps per epoch, two epochs, a checkpoint line after every step.
# Deterministic and without BatchNorm (simple_cnn), so the requeued job can be compared bitwise.
RUN = {**dict(item.split("=", 1) for item in TINY), "model": "simple_cnn", "dataset.num_train": "128",
       "dataset.num_val": "64", "dataset.batch_size": "16", "trainer.epochs": "2", "scheduler": "cosine",
       "trainer.deterministic": "true", "trainer.checkpoint_every_n_steps": "1", "trainer.log_every_n_steps": "1",
       "trainer.resume": "auto"}
STEPS = 2 * 128 // 16
SWEEP_TIMEOUT_S = 300  # a bound, not a wait: the sweep takes ~40 s here
# Job folders are named by run_label (job number, then the key overrides); the test waits for job 0's
# train.log before the folder exists, so it names the folders the same way.
JOB_FOLDER = {0: "0" + run_label("default", [f"{k}={v}" for k, v in RUN.items()] + ["optimizer=adam"]),
              1: "1" + run_label("default", [f"{k}={v}" for k, v in RUN.items()] + ["optimizer=sgd"])}


@pytest.fixture
def tracked():
    """This test's tag and process groups; afterwards none of its processes may be left (checked in /proc)."""
    run = Tracked(new_tag())
    yield run
    assert_no_leftovers(run.tag, run.pgids)


def summary(sweep: Path) -> list[dict]:
    """The rows of the sweep's sweep_summary.csv."""
    with (sweep / "sweep_summary.csv").open() as fh:
        return list(csv.DictReader(fh))


def job_log_tails(sweep: Path, chars: int = 2000) -> str:
    """The end of every submitit job log in the sweep, each headed by its job id (for failure messages)."""
    return "\n".join(f"--- submitit job {p.parent.name} ({p.name}) ---\n{p.read_text()[-chars:]}"
                     for p in sorted((sweep / ".submitit").glob("*/*_log.*")))


@needs_proc
def test_submitit_local_sweep_runs_both_jobs_and_requeues_a_preempted_one(tracked, train_inproc, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")  # the `slurm` extra, which CI installs
    sweep, out = tmp_path / "sweep", tmp_path / "outputs"
    args = ["-m", "hydra/launcher=local", *(f"{k}={v}" for k, v in RUN.items()), "optimizer=adam,sgd",
            f"hydra.sweep.dir={sweep}", f"output_root={out}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", TAG_ENV: tracked.tag}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.Popen([*resnet_train_cmd(), *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    launcher = Follower("the sweep (resnet-train -m hydra/launcher=local)", proc)
    tracked.pgids.add(proc.pid)  # submitit's controllers and job processes stay in this group
    try:
        # Job 0 gets submitit's preemption signal (what SLURM sends at --signal=USR2@signal_delay_s)
        # once it has written a mid-epoch checkpoint.
        wait_for_file_line(sweep / JOB_FOLDER[0] / "train.log", r"checkpoint: epoch 1 step 3 ", SWEEP_TIMEOUT_S,
                           launcher, "job 0")
        tasks = [pid for pid in tagged(tracked.tag) if "submitit.core._submit" in cmdline(pid)]
        job0 = holding_open(tasks, sweep / JOB_FOLDER[0] / "train.log")
        assert len(job0) == 1, f"job 0's process among {[(p, cmdline(p)) for p in tasks]}: {job0}"
        os.kill(job0[0], signal.SIGUSR2)
        code = launcher.wait(SWEEP_TIMEOUT_S)
        assert code == 0, f"the sweep exited {code}\n{launcher.tail()}\n{job_log_tails(sweep)}"
    finally:
        kill_tree(tracked.tag, tracked.pgids)  # on failure too: no job outlives the test (asserted at teardown)

    # Both jobs finished, each in its own folder, and the summary lists both.
    rows = summary(sweep)
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [("0", "ok", "optimizer=adam"),
                                                                       ("1", "ok", "optimizer=sgd")], \
        f"{rows}\n{job_log_tails(sweep)}"
    for row in rows:
        run = Path(row["run_dir"])
        assert run == sweep / JOB_FOLDER[int(row["job"])], row
        assert row["epochs"] == "2" and float(row["best_val_acc"]) == pytest.approx(
            read_metrics(run)["best_val_acc"], abs=1e-4), row
    # Job 0 saved and was requeued by submitit (same job id, same folder), and its second attempt resumed.
    logs = list((sweep / ".submitit").glob("*/*_0_log.out"))
    job0_log = next((p.read_text() for p in logs if f"run folder: {sweep / JOB_FOLDER[0]}" in p.read_text()), "")
    assert "SIGUSR2: last.pt saved; submitit requeues this job" in job0_log, job0_log[-3000:]
    assert "Calling checkpoint method" in job0_log and "Requeued job" in job0_log, job0_log[-3000:]
    resumed = re.search(r"resumed from \S+ at epoch (\d+), batch (\d+)",
                        (sweep / JOB_FOLDER[0] / "train.log").read_text())
    assert resumed and (int(resumed[1]), int(resumed[2])) >= (0, 3), job0_log[-3000:]
    # ... to the very end, with the weights of a run that was never stopped.
    _, ref = train_inproc(*(f"{k}={v}" for k, v in RUN.items()), "optimizer=adam")
    got = torch.load(sweep / JOB_FOLDER[0] / "last.pt", weights_only=True)
    want = torch.load(ref / "last.pt", weights_only=True)
    assert got["finished"] and got["global_step"] == want["global_step"] == STEPS
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(got[key], want[key], key)


def test_requeue_only_hands_submitits_own_signal_to_submitits_own_handler(monkeypatch):
    from resnet_cli import submitit_requeue

    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert submitit_requeue.preempt_signal() is None  # outside a submitit job nothing changes
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "local")
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert submitit_requeue.preempt_signal() == "SIGUSR2"
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert submitit_requeue.preempt_signal() == "SIGUSR1"
    calls = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: calls.append(a))
    try:
        submitit_requeue.requeue("SIGTERM")  # not submitit's signal: no requeue
        submitit_requeue.requeue("SIGUSR1")  # submitit's signal, but a foreign handler: never called
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert calls == []
