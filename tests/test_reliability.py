"""Every bad input ends in one line, nothing hangs, nothing already written is lost: on the real entry points.

The cases are counted for the README's reliability table (see test_readme_reliability_table_counts_these_cases).
"""

from __future__ import annotations

import errno
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, fit_inproc, read_metrics, resnet_train_cmd
from test_resume import assert_same_tensors, read_until

REPO = Path(__file__).resolve().parents[1]


def err_lines(res) -> list[str]:
    """The non-empty lines a process wrote to stderr."""
    return [ln for ln in res.stderr.splitlines() if ln.strip()]


def assert_one_line(res, *named: str, code: int = 2) -> str:
    """Exit `code`, exactly one stderr line, naming everything in `named`, and no traceback anywhere."""
    lines = err_lines(res)
    assert res.returncode == code, (res.returncode, res.stderr[-2000:])
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stdout + res.stderr
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under folder (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def tool(name: str, *args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run an installed console script of this package (or its module) to completion."""
    path = Path(sys.executable).parent / name
    module = {"resnet-predict": "predict", "resnet-eval": "evaluate", "resnet-export": "export",
              "resnet-lr-find": "lr_find", "resnet-train": "train"}[name]
    cmd = [str(path)] if path.exists() else [sys.executable, "-m", f"resnet_cli.{module}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([*cmd, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A resnet20 run folder on 16 px shapes, trained once for the module."""
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    fit_inproc(run, [*TINY, "model=resnet20", f"output_root={root / 'outputs'}"])
    return run


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory) -> dict[str, Path]:
    """Bad and good inputs for the tools: a FIFO, random bytes, a mis-configured checkpoint, images."""
    from PIL import Image

    from resnet_cli.checkpoint import atomic_save

    root = tmp_path_factory.mktemp("inputs")
    fifo = root / "fifo" / "best.pt"
    fifo.parent.mkdir()
    os.mkfifo(fifo)
    noise = root / "noise.pt"
    noise.write_bytes(random.Random(0).randbytes(4096))
    ck = torch.load(trained / "best.pt", weights_only=True)
    ck["config"]["model"]["name"] = "resnet32"  # more blocks than the weights: they do not fit
    misfit = root / "misfit" / "best.pt"
    atomic_save(ck, misfit)
    images = root / "images"
    images.mkdir()
    for i in range(3):
        Image.new("RGB", (16, 16), (40 * i, 200, 90)).save(images / f"good{i}.png")
    (images / "broken.png").write_bytes(b"not an image at all")
    fifo_png = root / "pipe.png"
    os.mkfifo(fifo_png)
    return {"fifo": fifo, "noise": noise, "misfit": misfit, "images": images, "good": images / "good0.png",
            "fifo_png": fifo_png}


# ---------------------------------------------------------------------------------------------
# resnet-train: bad values, unknown keys and relations stop before any run folder exists.
# ---------------------------------------------------------------------------------------------

CLI_CASES = [
    (["trainer.grad_clip_norm=-1"], "trainer.grad_clip_norm"),  # defect 2: trained backwards, exit 0
    (["trainer.grad_clip_value=-1"], "trainer.grad_clip_value"),
    (["trainer.epochs=0"], "trainer.epochs"),  # defect 6: exit 0, no checkpoint, "best ... (epoch -1)"
    (["trainer.epochs=-3"], "trainer.epochs"),
    (["+trainer.epoch=3"], "did you mean 'epochs'"),  # '+' slipped past the typed schema
    (["+trainer.foo=1"], "trainer.foo"),
    (["++trainer.foo=1"], "trainer.foo"),
    (["+foo=1"], "'foo'"),
    (["trainer.label_smoothing=1.0"], "trainer.label_smoothing"),
    (["trainer.ema_decay=nan"], "trainer.ema_decay"),
    (["trainer.grad_accum_steps=0"], "trainer.grad_accum_steps"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps"),
    (["trainer.device=nonsense"], "trainer.device"),
    (["trainer.warmup_epochs=20"], "trainer.warmup_epochs"),  # relation: never ends within 10 epochs
    (["trainer.overwrite=true", "trainer.resume=auto"], "trainer.overwrite"),
    (["dataset=shapes", "dataset.batch_size=0"], "dataset.batch_size"),
    (["dataset=shapes", "dataset.batch_size=abc"], "dataset.batch_size"),
    (["dataset=shapes", "dataset.num_workers=-1"], "dataset.num_workers"),
    (["dataset=shapes", "dataset.mixup_alpha=-0.5"], "dataset.mixup_alpha"),
    (["dataset=imagefolder", "dataset.val_fraction=1.0"], "dataset.val_fraction"),
    (["dataset=imagefolder", "dataset.scale=[0.9,0.1]"], "dataset.scale"),
    (["optimizer.lr=0"], "optimizer.lr"),
    (["optimizer.momentum=1.0"], "optimizer.momentum"),
    (["scheduler.pct_start=1.5"], "scheduler.pct_start"),
    (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size"),
]


@pytest.mark.parametrize("args, named", CLI_CASES, ids=[" ".join(a) for a, _ in CLI_CASES])
def test_bad_config_is_one_line_exit_2_and_creates_nothing(cli, tmp_path, args, named):
    out = tmp_path / "outputs"
    data = [f"dataset.root={tmp_path / 'never-read'}"] if "dataset=imagefolder" in args else []
    res = cli(*args, *data, f"output_root={out}")
    assert_one_line(res, named)
    assert not out.exists() and not (tmp_path / "never-read").exists()


# ---------------------------------------------------------------------------------------------
# Defect 1: a run folder that holds a run is never replaced by a different run.
# ---------------------------------------------------------------------------------------------

def test_a_new_run_never_replaces_the_run_in_its_folder(cli, tmp_path):
    run = tmp_path / "elsewhere" / "run"
    common = [*TINY, f"hydra.run.dir={run}", f"output_root={tmp_path / 'outputs'}"]
    first = cli(*common, "model=resnet20")
    assert first.returncode == 0, first.stderr[-3000:]
    # The hint names a folder that holds the run (hydra.run.dir is outside output_root here).
    logdir = Path(re.search(r"tensorboard --logdir (\S+)", first.stdout + first.stderr)[1])
    assert run.resolve().is_relative_to(logdir.resolve()) and list(run.glob("events.out.tfevents.*"))
    before = snapshot(run)
    assert {"last.pt", "best.pt", "metrics.json", "class_names.json", ".hydra/config.yaml"} <= set(before)
    for extra in (["model=simple_cnn"],  # another model, no resume
                  ["model=simple_cnn", "trainer.resume=auto"],  # resume=auto, but another config
                  ["model=resnet20"]):  # the same config without trainer.resume
        res = cli(*common, *extra)
        line = assert_one_line(res, f"hydra.run.dir={run}", "trainer.overwrite=true")
        assert snapshot(run) == before, (extra, line)  # byte for byte, .hydra/ and train.log included
    replaced = cli(*common, "model=simple_cnn", "trainer.overwrite=true")
    assert replaced.returncode == 0, replaced.stderr[-3000:]
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["config"]["model"]["name"] == "simple_cnn" and len(list(run.glob("events.out.tfevents.*"))) == 1


# ---------------------------------------------------------------------------------------------
# Defect 3: FIFOs are never opened.
# ---------------------------------------------------------------------------------------------

def test_a_fifo_named_last_pt_never_blocks_resume(cli, tmp_path):
    root = tmp_path / "outputs"
    fifo = root / "old" / "run" / "last.pt"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)
    args = [*TINY, "model=simple_cnn", f"output_root={root}", "trainer.resume=auto"]
    res = cli(*args, timeout=300)  # a blocked open would hang here (the timeout only bounds a failure)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"skipped {fifo}: not a regular file" in res.stdout + res.stderr
    # Resuming that folder in place, or naming the FIFO, is one line naming it.
    res = cli(*args, f"hydra.run.dir={fifo.parent}", timeout=300)
    assert_one_line(res, str(fifo), "FIFO")
    res = cli(*args[:-1], f"trainer.resume={fifo}", timeout=300)
    assert_one_line(res, str(fifo), "FIFO")


# ---------------------------------------------------------------------------------------------
# Defect 4: OneCycleLR over very few steps.
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("three_phase", [False, True])
@pytest.mark.parametrize("total", [1, 2, 3, 4, 5, 6])
def test_onecycle_runs_any_number_of_steps_within_its_bounds(total, three_phase):
    import functools

    from resnet_cli import optim

    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr_scale": 1.0}], lr=0.1, momentum=0.9)
    factory = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, pct_start=0.25,
                                three_phase=three_phase, div_factor=25.0, final_div_factor=1e4)
    sched = optim.build_scheduler(factory, opt, interval="step", steps_per_epoch=total, epochs=1)
    lrs = []
    for step in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if step < total - 1:
            sched.step()
    floor = 0.1 / 25 / 1e4
    assert all(floor * 0.999 <= lr <= 0.1 * 1.001 for lr in lrs), lrs
    assert lrs[-1] == pytest.approx(floor)  # it ends at its floor, as a one-cycle promises
    if total >= (4 if three_phase else 3):
        assert max(lrs) == pytest.approx(0.1)  # and the warm-up reaches max_lr


def test_default_onecycle_trains_with_four_batches(train_inproc):
    best, run = train_inproc("model=simple_cnn", "trainer.limit_train_batches=4")  # ZeroDivisionError before
    assert read_metrics(run)["finished"] and torch.load(run / "last.pt", weights_only=True)["global_step"] == 4


# ---------------------------------------------------------------------------------------------
# Defect 5 and the tools: the same checkpoint checks as training, one-line argument errors.
# ---------------------------------------------------------------------------------------------

TOOL_CASES = [
    ("resnet-predict", ["{ckpt}", "{good}", "--batch-size", "0"], "--batch-size"),
    ("resnet-predict", ["{ckpt}", "{good}", "--batch-size", "abc"], "--batch-size"),
    ("resnet-predict", ["{ckpt}", "{good}", "--topk", "0"], "--topk"),
    ("resnet-predict", ["{ckpt}", "{good}", "--device", "nonsense"], "--device nonsense"),
    ("resnet-predict", ["{ckpt}", "{good}", "--on-bad-image", "ignore"], "--on-bad-image"),
    ("resnet-predict", ["{ckpt}", "{broken}"], "broken.png"),  # default policy: error, naming the file
    ("resnet-predict", ["{ckpt}", "{fifo_png}"], "FIFO"),
    ("resnet-predict", ["{fifo}", "{good}"], "FIFO"),
    ("resnet-predict", ["{fifo_dir}", "{good}"], "skipped best.pt"),
    ("resnet-predict", ["{noise}", "{good}"], "truncated or not a PyTorch file"),
    ("resnet-predict", ["{misfit}", "{good}"], "do not fit"),  # defect 5
    ("resnet-eval", ["{misfit}"], "do not fit"),
    ("resnet-export", ["{misfit}", "--formats", "safetensors"], "do not fit"),
    ("resnet-eval", ["{fifo}"], "FIFO"),
    ("resnet-eval", ["{noise}"], "truncated or not a PyTorch file"),
    ("resnet-eval", ["{ckpt}", "--limit-batches", "-1"], "--limit-batches"),
    ("resnet-eval", ["{ckpt}", "--device", "nonsense"], "--device nonsense"),
    ("resnet-eval", ["{ckpt}", "--split", "test"], "--split"),
    ("resnet-export", ["{fifo}"], "FIFO"),
    ("resnet-export", ["{ckpt}", "--atol", "-1"], "--atol"),
    ("resnet-export", ["{ckpt}", "--formats", "pdf"], "--formats"),
    ("resnet-export", ["{ckpt}", "--out", "{good}", "--formats", "safetensors"], "is a file, not a folder"),
    ("resnet-lr-find", ["--steps", "abc"], "--steps"),
    ("resnet-lr-find", ["--smoothing", "0"], "--smoothing"),
    ("resnet-lr-find", ["trainer.epochs=0"], "trainer.epochs"),
]


@pytest.mark.parametrize("name, args, named", TOOL_CASES, ids=[f"{n} {' '.join(a)}" for n, a, _ in TOOL_CASES])
def test_tool_errors_are_one_line_exit_2(trained, files, tmp_path, name, args, named):
    where = {"ckpt": trained / "best.pt", "fifo_dir": files["fifo"].parent, "broken": files["images"] / "broken.png",
             **files}
    res = tool(name, *(a.format(**where) for a in args), cwd=tmp_path)
    line = assert_one_line(res, named)
    assert "possibly code" not in line
    if "{misfit}" in args:
        assert str(files["misfit"]) in line and ("shape mismatch" in line or "missing" in line), line


def test_predict_skips_bad_images_on_request_and_names_them(trained, files, tmp_path):
    out = tmp_path / "preds.json"
    res = tool("resnet-predict", str(trained), str(files["images"]), "--on-bad-image", "skip", "--json", str(out),
               cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    import json

    preds = json.loads(out.read_text())
    assert sorted(Path(p["file"]).name for p in preds) == ["good0.png", "good1.png", "good2.png"]
    assert "skipped: cannot read image" in res.stderr and "broken.png" in res.stderr
    assert "1 of 4 image(s) skipped" in res.stderr


def test_failed_resume_is_one_line_and_leaves_no_pointer(files, train_inproc, tmp_path):
    from resnet_cli.errors import UserError

    run = tmp_path / "new"
    with pytest.raises(UserError, match=r"trainer.resume=\S+: it was made by resnet32 .* does not fit") as info:
        # The file holds resnet20 weights under a resnet32 config: a resnet32 cannot take them.
        train_inproc("model=resnet32", f"trainer.resume={files['misfit']}", run_dir=run)
    assert "\n" not in str(info.value) and ("shape mismatch" in str(info.value) or "missing" in str(info.value))
    assert not (run / "resumed_into.txt").exists()
    with pytest.raises(UserError, match="truncated or not a PyTorch file") as info:
        train_inproc("model=resnet20", f"trainer.resume={files['noise']}", run_dir=tmp_path / "noise")
    assert "possibly code" not in str(info.value)
    assert not (tmp_path / "noise" / "resumed_into.txt").exists()


# ---------------------------------------------------------------------------------------------
# Operating-system errors on the output side.
# ---------------------------------------------------------------------------------------------

def test_output_root_that_is_a_file_is_one_line(cli, tmp_path):
    blocker = tmp_path / "outputs"
    blocker.write_text("a file where the output folder should be\n")
    res = cli(*TINY, "model=simple_cnn", f"output_root={blocker}")
    assert_one_line(res, str(blocker), "is a file, not a folder")
    assert blocker.read_text() == "a file where the output folder should be\n"


def run_main(monkeypatch, *args: str) -> int:
    """resnet-train's console entry point in-process; returns its exit code."""
    from resnet_cli import train

    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["resnet-train", *args])
    with pytest.raises(SystemExit) as info:
        train.main()
    return info.value.code


def test_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys, keep_logging):
    locked = tmp_path / "locked"
    real_mkdir = os.mkdir

    def mkdir(path, *args, **kwargs):  # what a read-only folder answers (root ignores chmod, so it is simulated)
        if str(path).startswith(str(locked)):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    code = run_main(monkeypatch, *TINY, "model=simple_cnn", f"hydra.run.dir={locked / 'run'}",
                    f"output_root={tmp_path / 'outputs'}")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and str(locked) in err[0] and "permission denied" in err[0], err


def test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(tmp_path, monkeypatch, capsys,
                                                                         keep_logging):
    run = tmp_path / "run"
    real_fsync, kept = os.fsync, {}

    def fsync(fd):  # the disk fills up once the first checkpoint is on it
        if (run / "last.pt").exists():
            kept.setdefault("last", (run / "last.pt").read_bytes())
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    code = run_main(monkeypatch, *TINY, "model=simple_cnn", "trainer.checkpoint_every_n_steps=2",
                    f"hydra.run.dir={run}", f"output_root={tmp_path / 'outputs'}")
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1, err
    assert str(run / "last.pt") in err[0] and "no space left on device" in err[0] and "intact" in err[0], err
    assert (run / "last.pt").read_bytes() == kept["last"]
    assert torch.load(run / "last.pt", weights_only=True)["step_in_epoch"] == 2
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Defect 7: stop signals sent to the whole process group while DataLoader workers run.
# ---------------------------------------------------------------------------------------------

def write_pngs(root: Path, per_class: int = 40, val: int = 8) -> None:
    """Two classes of small PNGs in train/ and val/ (red-ish and blue-ish squares with noise)."""
    from PIL import Image

    rng = random.Random(0)
    for split, n in (("train", per_class), ("val", val)):
        for c, base in enumerate(((200, 40, 40), (40, 40, 200))):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = Image.new("RGB", (16, 16), tuple(min(255, v + rng.randrange(40)) for v in base))
                img.save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def pngs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    write_pngs(root)
    return root


def signal_args(pngs: Path, root: Path) -> list[str]:
    """80 training images in batches of 8 through 2 DataLoader workers: 10 steps per epoch, two epochs."""
    return ["dataset=imagefolder", f"dataset.root={pngs}", "dataset.image_size=16", "dataset.resize=16",
            "dataset.batch_size=8", "dataset.val_batch_size=16", "dataset.loader=dataloader",
            "dataset.num_workers=2", "model=simple_cnn", "optimizer=adamw", "scheduler=cosine",
            "trainer.device=cpu", "trainer.epochs=2", "trainer.deterministic=true", "trainer.progress=false",
            "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=1", "trainer.resume=auto",
            f"output_root={root}"]


def start_in_own_group(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen([*resnet_train_cmd(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def children(pid: int) -> list[int]:
    """Child process ids (Linux /proc)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(pngs, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("reference")
    fit_inproc(run, [*signal_args(pngs, run / "outputs")])
    return run


@pytest.mark.parametrize("name", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_stop_signal_to_the_process_group_saves_exits_75_and_resumes_bitwise(name, pngs, uninterrupted,
                                                                            tmp_path):
    root = tmp_path / "outputs"
    args = signal_args(pngs, root)
    proc = start_in_own_group(args, tmp_path)
    read_until(proc, r"checkpoint: epoch 1 step 3 ")
    assert len(children(proc.pid)) >= 2  # the DataLoader workers are running
    os.killpg(proc.pid, getattr(signal, name))  # what SLURM, timeout and supervisors do
    out, err = proc.communicate(timeout=300)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line(res, f"received {name}", "trainer.resume=auto", code=75)
    assert "killed by signal" not in out + err
    run = next(root.rglob("last.pt")).parent
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["epoch"] == 0 and ck["step_in_epoch"] >= 3 and not ck["finished"]
    if name != "SIGTERM":
        return  # the same stop path: the bitwise resume is checked once
    again = subprocess.run([*resnet_train_cmd(), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                           env={k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"})
    assert again.returncode == 0, again.stderr[-3000:]
    got = torch.load(run / "last.pt", weights_only=True)
    want = torch.load(uninterrupted / "last.pt", weights_only=True)
    assert got["finished"] and got["global_step"] == want["global_step"] == 20
    for key in ("model", "optimizer", "scheduler"):
        assert_same_tensors(got[key], want[key], key)


def test_ctrl_c_twice_to_the_group_is_one_line(pngs, tmp_path):
    root = tmp_path / "outputs"
    proc = start_in_own_group(signal_args(pngs, root), tmp_path)
    read_until(proc, r"checkpoint: epoch 1 step 2 ")
    os.killpg(proc.pid, signal.SIGINT)
    os.killpg(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    # Either the first Ctrl-C's save finished before the second arrived (75) or the second stopped it (130).
    assert proc.returncode in (75, 130), (proc.returncode, err[-2000:])
    line = assert_one_line(res, code=proc.returncode)
    assert ("Ctrl-C" if proc.returncode == 130 else "received SIGINT") in line, line
    assert "killed by signal" not in out + err
    torch.load(next(root.rglob("last.pt")), weights_only=True)  # what is on disk is a whole checkpoint


def test_second_ctrl_c_names_the_last_checkpoint_and_exits_130(tmp_path, monkeypatch, capsys):
    from resnet_cli import signals, train

    saver = type("S", (), {"last_good": tmp_path / "last.pt"})()
    flag = signals.StopFlag(saver)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert flag.signal == "SIGINT"
        with pytest.raises(signals.Interrupted, match=re.escape(str(tmp_path / "last.pt"))) as info:
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        flag.close()

    def interrupted():
        raise info.value

    monkeypatch.setattr(train, "hydra_main", interrupted)
    monkeypatch.setattr(sys, "argv", ["resnet-train"])
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert exit_info.value.code == 130 and len(err) == 1 and str(tmp_path / "last.pt") in err[0], err


# ---------------------------------------------------------------------------------------------
# The README's reliability table counts the cases above.
# ---------------------------------------------------------------------------------------------

# Scenario tests and the distinct bad inputs each one tries.
SCENARIOS = {
    "test_a_new_run_never_replaces_the_run_in_its_folder": 3,
    "test_a_fifo_named_last_pt_never_blocks_resume": 3,
    "test_default_onecycle_trains_with_four_batches": 1,
    "test_predict_skips_bad_images_on_request_and_names_them": 1,
    "test_failed_resume_is_one_line_and_leaves_no_pointer": 2,
    "test_output_root_that_is_a_file_is_one_line": 1,
    "test_read_only_output_folder_is_one_line": 1,
    "test_disk_full_at_a_checkpoint_is_one_line_and_keeps_the_previous_one": 1,
    "test_stop_signal_to_the_process_group_saves_exits_75_and_resumes_bitwise": 3,
    "test_ctrl_c_twice_to_the_group_is_one_line": 1,
    "test_second_ctrl_c_names_the_last_checkpoint_and_exits_130": 1,
}
ENTRY_POINT_CASES = len(CLI_CASES) + len(TOOL_CASES) + sum(SCENARIOS.values())


def test_readme_reliability_table_counts_these_cases():
    assert all(name in globals() and callable(globals()[name]) for name in SCENARIOS)
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    row = re.search(r"\| bad inputs tried on the entry points \| (\d+) \|", section)
    assert row and int(row[1]) == ENTRY_POINT_CASES, (row and row[1], ENTRY_POINT_CASES)
