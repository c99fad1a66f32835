"""Two processes under torchrun (Gloo on CPU) train like one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, only_run_dir, read_metrics

# BN-free model: per-rank batch statistics cannot differ, so two processes with 16 images each
# take the same steps as one with 32, up to float summation order in the gradient all-reduce.
# fp32: splitting a batch over ranks is exact only up to fp32 rounding (bf16, auto on AVX-512 BF16 CPUs, is not).
COMMON = ["model=simple_cnn", "trainer.epochs=2", "optimizer=sgd", "scheduler=cosine", "trainer.precision=fp32"]
# Stated tolerance: validation accuracy within one image of 128; weights within WEIGHT_ATOL.
ACC_TOL = 1 / 128
# 2e-3: the noise floor of summation order. On an AVX-512 CPU the same single-process run with 1 and with 2
# threads ends 8.3e-4 apart after these 16 SGD steps (under 1e-4 on AVX2); the train loss still agrees to 1e-4.
WEIGHT_ATOL = 2e-3


def _overrides(**extra: str) -> list[str]:
    merged = {**dict(item.split("=", 1) for item in [*TINY, *COMMON]), **extra}
    return [f"{k}={v}" for k, v in merged.items()]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m resnet_cli.train ARGS` (a free port is picked)."""
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*cmd, "--standalone", "--nproc_per_node", "2", "-m", "resnet_cli.train", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(loader, train_inproc, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    extra = {"dataset.loader": loader, "dataset.num_workers": "0"}
    res = torchrun(_overrides(**extra, **{"dataset.batch_size": "16", "output_root": str(work / "outputs")}), work)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "rank 0/2" in res.stdout + res.stderr
    # Rank 0 alone wrote: one run folder, nothing else in the working directory.
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
    run = only_run_dir(work / "outputs")
    assert (run / "last.pt").is_file() and len(list(run.glob("events.out.tfevents.*"))) == 1

    _, single = train_inproc(*_overrides(**extra, **{"dataset.batch_size": "32"}))
    two, one = read_metrics(run), read_metrics(single)
    assert two["epochs"] == one["epochs"] == 2
    # Metrics are reduced over both ranks: every train and val sample is counted once.
    assert abs(two["final_val_acc"] - one["final_val_acc"]) <= ACC_TOL, (two["final_val_acc"], one["final_val_acc"])
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-4)
    a = torch.load(run / "last.pt", weights_only=True)
    b = torch.load(single / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"]
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=0, atol=WEIGHT_ATOL, msg=lambda m, k=key: f"{k}: {m}")
