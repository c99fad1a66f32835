"""Two torchrun nodes on loopback (Gloo, CPU): the same run as one process, and a node killed then resumed.

Each node is its own `torchrun --nnodes=2 --node_rank=N` with its own working directory, as on
two machines; the run folder (hydra.run.dir) is the "shared filesystem". Static rendezvous
(--node_rank, --master_addr) makes node 0 hold rank 0, so the test knows which node writes.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, read_metrics
from procs import TAG_ENV, Follower, assert_no_leftovers, children, free_port, needs_proc, new_tag
from test_resume import assert_same_tensors

pytestmark = needs_proc

# simple_cnn has no BatchNorm: per-rank batch statistics cannot differ, so two nodes with 16 images
# each take the same steps as one process with 32 (up to summation order in the all-reduce), and a
# resumed two-node run is bitwise equal to an uninterrupted one (trainer.deterministic=true; the
# two-operand Gloo sum is exact, and the memory loader seeds every sample's augmentation itself).
# 256 images / (2 x 16) = 8 steps per epoch, 2 epochs; a checkpoint (and its log line) after every step.
RUN = {**dict(item.split("=", 1) for item in TINY), "model": "simple_cnn", "trainer.epochs": "2",
       "optimizer": "sgd", "scheduler": "cosine", "dataset.batch_size": "16", "trainer.deterministic": "true",
       "trainer.checkpoint_every_n_steps": "1", "trainer.log_every_n_steps": "1",
       "trainer.precision": "fp32"}  # the equalities hold up to fp32 rounding; bf16 (auto on some CPUs) rounds coarser
STEPS = 2 * 256 // 32
ACC_TOL = 1 / 128  # validation accuracy within one image of 128
# 2e-3: the noise floor of summation order. On an AVX-512 CPU the same single-process run with 1 and with 2
# threads ends 8.3e-4 apart after these 16 SGD steps (under 1e-4 on AVX2); the train loss still agrees to 1e-4.
WEIGHT_ATOL = 2e-3
# Bounds, not sleeps: the whole two-node run takes ~20 s here; a dead peer is noticed in seconds.
RUN_TIMEOUT_S = 240
SURVIVOR_TIMEOUT_S = 90


def node_flags(node_rank: int, port: int) -> list[str]:
    """One node's torchrun flags and module, as the README shows them (without the training overrides).

    --max_restarts=0: a lost node ends the run (resume restarts it); --rdzv_conf=timeout=60: a node
    whose peer never comes fails after 60 s instead of torchrun's 600; --monitor_interval=1: the
    agent notices a failed worker within a second. A dead peer's Gloo sockets close, so the
    surviving worker's next all-reduce fails at once ("Connection closed by peer").
    """
    return ["--nnodes=2", f"--node_rank={node_rank}", "--nproc_per_node=1", "--master_addr=127.0.0.1",
            f"--master_port={port}", "--max_restarts=0", "--monitor_interval=1", "--rdzv_conf=timeout=60",
            "-m", "resnet_cli.train"]


def torchrun_cmd(node_rank: int, port: int) -> list[str]:
    """The installed torchrun (or `python -m torch.distributed.run`) with one node's flags."""
    exe = Path(sys.executable).parent / "torchrun"
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, *node_flags(node_rank, port)]


class Cluster:
    """Two nodes started together, each followed line by line; every process group they make is recorded."""

    def __init__(self, tmp: Path, tag: str):
        self.tmp, self.tag = tmp, tag
        self.pgids: set[int] = set()

    def start(self, overrides: dict[str, str], label: str) -> list[Follower]:
        """Launch node 0 and node 1 on a fresh port, each in a working directory of its own."""
        port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", TAG_ENV: self.tag}
        env.pop("HYDRA_FULL_ERROR", None)
        args = [f"{k}={v}" for k, v in overrides.items()]
        nodes = []
        for rank in (0, 1):
            cwd = self.tmp / f"node{rank}"
            cwd.mkdir(exist_ok=True)
            proc = subprocess.Popen([*torchrun_cmd(rank, port), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            self.pgids.add(proc.pid)  # start_new_session: the agent leads its own group
            nodes.append(Follower(f"node{rank} ({label})", proc))
        return nodes

    def kill_node(self, node: Follower) -> None:
        """SIGKILL a node: its torchrun's process group and the group of each worker (torchrun gives each its own)."""
        groups = {node.proc.pid}
        for pid in children(node.proc.pid):
            try:
                groups.add(os.getpgid(pid))
            except ProcessLookupError:
                pass  # that worker already ended
        self.pgids |= groups
        for pgid in groups:
            os.killpg(pgid, signal.SIGKILL)
        node.wait(timeout=30)

    def finish(self, nodes: list[Follower], timeout: float = RUN_TIMEOUT_S) -> None:
        """Both nodes exit 0; a failure names the node and shows both logs."""
        codes = [node.wait(timeout) for node in nodes]
        for node, code in zip(nodes, codes):
            assert code == 0, f"{node.name} exited {code}\n" + "\n".join(n.tail() for n in nodes)


def final_state(run: Path) -> dict:
    """last.pt of a run folder."""
    return torch.load(run / "last.pt", weights_only=True)


@pytest.fixture
def cluster(tmp_path):
    """A Cluster; afterwards every process it started is killed and none may be left (checked in /proc)."""
    nodes = Cluster(tmp_path, new_tag())
    try:
        yield nodes
    finally:
        assert_no_leftovers(nodes.tag, nodes.pgids)


def test_two_nodes_train_like_one_process_and_a_killed_node_resumes_exactly(cluster, train_inproc, tmp_path):
    shared = tmp_path / "shared"
    # 1. Two nodes, uninterrupted.
    full = shared / "full"
    nodes = cluster.start({**RUN, "hydra.run.dir": str(full), "output_root": str(shared / "outputs-full")}, "full")
    cluster.finish(nodes)
    assert "rank 0/2" in nodes[0].text(), nodes[0].tail()
    # Rank 0 (node 0) alone wrote, and only into the run folder: both working directories stay empty.
    for rank in (0, 1):
        assert not list((tmp_path / f"node{rank}").iterdir()), f"node{rank} wrote into its working directory"
    assert (full / "last.pt").is_file() and len(list(full.glob("events.out.tfevents.*"))) == 1
    assert (full / ".hydra" / "config.yaml").is_file() and "run folder" in (full / "train.log").read_text()

    # The same global batch (32) in one process: metrics reduced over both nodes, the same steps.
    _, single = train_inproc(*[f"{k}={v}" for k, v in {**RUN, "dataset.batch_size": "32"}.items()])
    two, one = read_metrics(full), read_metrics(single)
    assert two["epochs"] == one["epochs"] == 2
    assert abs(two["final_val_acc"] - one["final_val_acc"]) <= ACC_TOL, (two["final_val_acc"],
                                                                          one["final_val_acc"])
    assert two["history"][0]["train_loss"] == pytest.approx(one["history"][0]["train_loss"], rel=1e-4)
    a, b = final_state(full), final_state(single)
    assert a["global_step"] == b["global_step"] == STEPS
    for key, value in b["model"].items():
        torch.testing.assert_close(a["model"][key], value, rtol=0, atol=WEIGHT_ATOL, msg=lambda m, k=key: f"{k}: {m}")

    # 2. The same run with trainer.resume=auto; node 0 (rank 0, and the rendezvous store) is killed
    # right after the mid-epoch checkpoint of epoch 1 step 5.
    run = shared / "resumed"
    overrides = {**RUN, "hydra.run.dir": str(run), "output_root": str(shared / "outputs-resumed"),
                 "trainer.resume": "auto"}
    nodes = cluster.start(overrides, "killed")
    nodes[0].wait_for(r"checkpoint: epoch 1 step 5 ", RUN_TIMEOUT_S)
    cluster.kill_node(nodes[0])
    # The survivor must not hang: its next all-reduce fails, torchrun stops it and exits non-zero.
    code = nodes[1].wait(SURVIVOR_TIMEOUT_S)
    assert code != 0, f"node1 exited {code} although node0 was killed\n{nodes[1].tail()}"
    killed_at = final_state(run)
    assert not killed_at["finished"] and killed_at["global_step"] < STEPS, killed_at["global_step"]

    # 3. Both nodes again, the same lines on a new port: rank 0 finds last.pt in the fixed folder.
    nodes = cluster.start(overrides, "resumed")
    cluster.finish(nodes)
    resumed = re.search(r"resumed from \S+ at epoch (\d+), batch (\d+)", nodes[0].text())
    assert resumed, nodes[0].tail()
    assert (int(resumed[1]), int(resumed[2])) >= (0, 5), resumed[0]
    got, want = final_state(run), final_state(full)
    assert got["finished"] and got["global_step"] == want["global_step"] == STEPS
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(got[key], want[key], key)
    assert [r["val_acc"] for r in read_metrics(run)["history"]] == [r["val_acc"] for r in two["history"]]



def test_readme_shows_the_two_node_lines_this_test_runs():
    """The README's "two nodes on one box" lines are this test's torchrun lines (port 29500)."""
    readme = (REPO / "README.md").read_text()
    lines = [ln.strip() for ln in readme.splitlines() if ln.strip().startswith("torchrun --nnodes=2 --node_rank=")]
    for rank in (0, 1):
        want = " ".join(["torchrun", *node_flags(rank, 29500), "trainer.device=cpu"])
        assert any(ln.startswith(want) for ln in lines), (want, lines)
