"""Crash safety and exact resume through the real `resnet-train`, with real signals in subprocesses."""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import TINY, only_run_dir, read_metrics, resnet_train_cmd

# 128 images in batches of 16: 8 steps per epoch, two epochs; a checkpoint after every step,
# so the kill can land after any of them. EMA on, so its state is compared too.
BASE = {
    **dict(item.split("=", 1) for item in TINY),
    "model": "resnet20", "dataset.num_train": "128", "dataset.batch_size": "16", "trainer.epochs": "2",
    "trainer.deterministic": "true", "trainer.ema_decay": "0.9", "trainer.log_every_n_steps": "3",
    "optimizer": "adamw", "scheduler": "cosine", "trainer.resume": "auto",
}
STEPS_PER_EPOCH = 8
LOADERS = {
    "memory": {},  # the default in-memory loader: no worker processes
    "workers0": {"dataset.loader": "dataloader", "dataset.num_workers": "0"},
    "workers2": {"dataset.loader": "dataloader", "dataset.num_workers": "2"},
}
CKPT_LINE = re.compile(r"checkpoint: epoch (\d+) step (\d+)")


def overrides(**extra: str) -> list[str]:
    """BASE with `extra` applied, as key=value arguments (each key once)."""
    return [f"{k}={v}" for k, v in {**BASE, **extra}.items()]


def _env() -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def train(args: list[str], root: Path) -> subprocess.CompletedProcess:
    """Run resnet-train to completion with output_root=root."""
    return subprocess.run([*resnet_train_cmd(), *args, f"output_root={root}"], cwd=root.parent, env=_env(),
                          capture_output=True, text=True, timeout=600)


def start(args: list[str], root: Path) -> subprocess.Popen:
    """Start resnet-train with its log (stdout and stderr) on one pipe."""
    root.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([*resnet_train_cmd(), *args, f"output_root={root}"], cwd=root.parent, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, pattern: re.Pattern | str) -> list[str]:
    """The process's output lines up to and including the first that matches pattern."""
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(pattern, line):
            return lines
    proc.wait()
    err = proc.stderr.read() if proc.stderr else ""
    pytest.fail(f"exited ({proc.returncode}) before printing {pattern!r}:\n{''.join(lines)[-3000:]}\n{err[-3000:]}")


def assert_same_tensors(a, b, where: str = "") -> None:
    """Nested dicts/lists of tensors and numbers are bitwise equal."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_final_state(run: Path, ref: Path) -> None:
    """last.pt of both runs holds bitwise-equal model, optimizer and EMA state."""
    got = torch.load(run / "last.pt", weights_only=True)
    want = torch.load(ref / "last.pt", weights_only=True)
    assert got["finished"] and got["global_step"] == want["global_step"] == 2 * STEPS_PER_EPOCH
    for key in ("model", "optimizer", "ema", "scheduler"):
        assert_same_tensors(got[key], want[key], key)


def scalar_steps(run: Path) -> dict[str, list[int]]:
    """TensorBoard scalar steps per tag, as TensorBoard itself reads them back."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run))
    acc.Reload()
    return {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of BASE + a loader setting, in-process (one per module and loader).

    In-process saves a torch start-up per loader; the same code on the same threads gives the
    same bits as a subprocess, which is what the resumed subprocess runs are compared with.
    """
    from conftest import fit_inproc

    done: dict[str, Path] = {}

    def get(loader: str) -> Path:
        if loader not in done:
            run = tmp_path_factory.mktemp(f"ref-{loader}")
            fit_inproc(run, [*overrides(**LOADERS[loader]), f"output_root={run / 'outputs'}"])
            done[loader] = run
        return done[loader]

    return get


@pytest.mark.parametrize("loader", list(LOADERS))
def test_sigkill_at_a_random_mid_epoch_step_then_resume_auto_is_bitwise_exact(loader, reference, tmp_path):
    # Kill right after a randomly chosen (but reproducible) mid-epoch checkpoint line.
    epoch, step = random.Random(loader).choice([(e, s) for e in (1, 2) for s in range(1, STEPS_PER_EPOCH)])
    args = overrides(**LOADERS[loader], **{"trainer.checkpoint_every_n_steps": "1"})
    root = tmp_path / "outputs"
    proc = start(args, root)
    read_until(proc, rf"checkpoint: epoch {epoch} step {step} ")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    res = train(args, root)  # the same command again: trainer.resume=auto finds the killed run
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = re.search(r"resumed from \S+ at epoch (\d+), batch (\d+)", res.stdout + res.stderr)
    assert resumed, (res.stdout + res.stderr)[-3000:]
    # The kill lands just after the chosen checkpoint; the process may have written a few more.
    assert (int(resumed[1]), int(resumed[2])) >= (epoch - 1, step)
    run = only_run_dir(root)
    assert_same_final_state(run, reference(loader))
    assert [r["val_acc"] for r in read_metrics(run)["history"]] == \
        [r["val_acc"] for r in read_metrics(reference(loader))["history"]]
    # The TensorBoard step axis continues: every tag has exactly the reference's steps, none twice.
    assert scalar_steps(run) == scalar_steps(reference(loader))


def test_sigterm_mid_epoch_saves_exits_75_and_resume_continues(reference, tmp_path):
    args = overrides()
    root = tmp_path / "outputs"
    proc = start(args, root)
    read_until(proc, r"epoch\s+train_loss")  # the table header: the stop handler is installed, training starts
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-3000:]
    assert CKPT_LINE.search(out) and "trainer.resume=auto" in out
    assert "Error executing job" not in out and "Traceback" not in out
    run = next(root.rglob("last.pt")).parent
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and 1 <= ck["step_in_epoch"] <= STEPS_PER_EPOCH and not ck["finished"]

    res = train(args, root)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stdout + res.stderr
    assert read_metrics(run)["epochs"] == 2
    assert_same_final_state(run, reference("memory"))


def test_truncated_checkpoint_gives_one_line_naming_it(cli, tmp_path):
    from resnet_cli import checkpoint

    good = tmp_path / "good.pt"
    checkpoint.atomic_save({"model": {"w": torch.ones(4096)}}, good)
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    res = cli(*TINY, "model=resnet20", f"trainer.resume={bad}", f"output_root={tmp_path / 'out'}")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0], res.stderr


def test_foreign_file_is_a_one_line_user_error(tmp_path):
    from resnet_cli import checkpoint
    from resnet_cli.errors import UserError

    path = tmp_path / "notes.pt"
    path.write_text("not a checkpoint\n")
    with pytest.raises(UserError, match=re.escape(str(path))) as info:
        checkpoint.load(path)
    assert "\n" not in str(info.value)


class _Payload:
    """Unpickling this would create a folder: the stand-in for arbitrary code in a checkpoint."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.mkdir, (str(self.target),)


def test_checkpoint_with_a_code_payload_is_refused_without_running_it(cli, tmp_path):
    from resnet_cli import checkpoint
    from resnet_cli.errors import UserError

    target = tmp_path / "payload-ran"
    evil = tmp_path / "evil" / "last.pt"
    evil.parent.mkdir()
    torch.save({"model": {}, "extra": _Payload(target)}, evil)
    with pytest.raises(UserError, match="refused to load"):
        checkpoint.load(evil)
    assert not target.exists()
    # The same through the entry point, given the run folder.
    res = cli(*TINY, "model=resnet20", f"trainer.resume={evil.parent}", f"output_root={tmp_path / 'out'}")
    assert res.returncode == 2 and "refused to load" in res.stderr and str(evil) in res.stderr
    assert not target.exists()


def _failing_save(fh_obj, fh):
    fh.write(b"PK\x03\x04 half a checkpoint")
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("failure", ["torch.save", "fsync", "replace"])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(failure, tmp_path, monkeypatch):
    from resnet_cli import checkpoint

    path = tmp_path / "last.pt"
    checkpoint.atomic_save({"model": {"w": torch.zeros(3)}, "epoch": 1}, path)

    def enospc(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    target = {"torch.save": (checkpoint.torch, "save", _failing_save), "fsync": (checkpoint.os, "fsync", enospc),
              "replace": (checkpoint.os, "replace", enospc)}[failure]
    with monkeypatch.context() as m:
        m.setattr(*target)
        with pytest.raises(OSError) as info:
            checkpoint.atomic_save({"model": {"w": torch.ones(3)}, "epoch": 2}, path)
    assert info.value.errno == errno.ENOSPC
    ck = checkpoint.load(path)
    assert ck["epoch"] == 1 and torch.equal(ck["model"]["w"], torch.zeros(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # no temporary file left behind


def test_resume_from_an_explicit_checkpoint_path_continues_its_epochs(train_inproc, tmp_path):
    from resnet_cli.errors import UserError

    _, first = train_inproc("model=simple_cnn", "scheduler=step")
    _, later = train_inproc("model=simple_cnn", "scheduler=step", "trainer.epochs=2",
                            f"trainer.resume={first / 'last.pt'}", run_dir=tmp_path / "new")
    assert (later / "resumed_into.txt").read_text().strip() == str(first.resolve())
    history = read_metrics(first)["history"]
    assert [r["epoch"] for r in history] == [1, 2]
    assert torch.load(first / "last.pt", weights_only=True)["global_step"] == 2 * (256 // 32)
    # Another model's checkpoint is a one-line error naming the file and the model that made it.
    with pytest.raises(UserError, match=r"trainer.resume=\S*last.pt: it was made by simple_cnn"):
        train_inproc("model=resnet20", f"trainer.resume={first / 'last.pt'}", run_dir=tmp_path / "other-model")
    # OneCycle cannot be stretched: a longer run from its checkpoint is refused up front, in one line.
    _, cycle = train_inproc("model=simple_cnn", "scheduler=onecycle")
    with pytest.raises(UserError, match=r"trainer.resume=.*OneCycleLR spans 8 steps.*trainer.epochs=3"):
        train_inproc("model=simple_cnn", "scheduler=onecycle", "trainer.epochs=3", f"trainer.resume={cycle}",
                     run_dir=tmp_path / "longer")


def test_resume_auto_picks_the_unfinished_run_of_the_same_config(train_inproc, tmp_path, monkeypatch):
    from resnet_cli import engine

    common = ("model=simple_cnn", "trainer.checkpoint_every_n_steps=2")
    _, finished = train_inproc(*common, run_dir=tmp_path / "outputs" / "finished")
    _, other = train_inproc(*common, "optimizer.lr=0.01", run_dir=tmp_path / "outputs" / "other-config")
    real, calls = engine.compute_loss, {"n": 0}

    def crash_at_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "compute_loss", crash_at_5)
    with pytest.raises(RuntimeError):
        train_inproc(*common, run_dir=tmp_path / "outputs" / "crashed")
    monkeypatch.setattr(engine, "compute_loss", real)
    # Make the other-config run the newest candidate: only the config must decide, not the age.
    os.utime(other / "last.pt")
    _, new = train_inproc(*common, "trainer.resume=auto", run_dir=tmp_path / "outputs" / "new")
    crashed = tmp_path / "outputs" / "crashed"
    assert (new / "resumed_into.txt").read_text().strip() == str(crashed.resolve())
    ck = torch.load(crashed / "last.pt", weights_only=True)
    assert ck["finished"] and ck["global_step"] == 256 // 32
    assert torch.load(finished / "last.pt", weights_only=True)["finished"]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_stop_signals_set_the_flag_and_handlers_are_given_back(name):
    from resnet_cli.signals import StopFlag

    sig = getattr(signal, name)
    before = signal.getsignal(sig)
    flag = StopFlag()
    try:
        os.kill(os.getpid(), sig)
        assert flag.signal == name
    finally:
        flag.close()
    assert signal.getsignal(sig) is before
