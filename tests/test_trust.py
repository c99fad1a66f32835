"""Trust: a file from someone else runs no code, every tool works on every kind of run, nothing of yours is replaced.

The user's path, end to end: train on a folder of one's own (auto size), an archive or an array dataset,
then predict, eval, export (every format, verified) and lr-find on the result; open a checkpoint or run
folder a colleague sent, which may say anything. Each finding of the adversarial review that led here
has a test below asserting the outcome: exit code, one stderr line naming the file or key, inputs and
other files byte-identical, no marker of code that should not have run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from archives import make_flowers_archive, write_class_folders
from conftest import TINY, fit_inproc, read_metrics, resnet_train_cmd
from test_reliability import assert_one_line, snapshot, tool
from test_resume import read_until

SMALL = ["trainer.device=cpu", "trainer.epochs=1", "trainer.progress=false", "trainer.log_every_n_steps=2",
         "model=resnet20"]


def run_tool(main, argv: list[str], capsys) -> tuple[int, list[str], str]:
    """Run a tool's main() in-process: (exit code, non-empty stderr lines, stdout)."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, [ln for ln in out.err.splitlines() if ln.strip()], out.out


def refused(code: int, lines: list[str], *named: str) -> str:
    """Exit 2 with exactly one stderr line naming everything in `named`."""
    assert code == 2, (code, lines)
    assert len(lines) == 1, lines
    for text in named:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------------------
# Every tool on every kind of run
# ---------------------------------------------------------------------------------------------

def _folder(root: Path) -> list[str]:
    # Sizes differ per image, so image_size=auto has something to resolve (the export crash of review item 2).
    from PIL import Image

    from archives import class_color

    for c, name in enumerate(("ant", "bee", "cat")):
        for i in range(14):
            d = root / name
            d.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (18 + i % 5, 20 + i % 3), class_color(c)).save(d / f"{i}.png")
    return ["dataset=imagefolder", f"dataset.root={root}"]


def _flowers(root: Path) -> list[str]:
    url, sha256 = make_flowers_archive(root / "served", per_class=6, size=24)
    return ["dataset=flowers", f"dataset.root={root / 'data'}", f"dataset.url={url}", f"dataset.sha256={sha256}"]


def _array(root: Path) -> list[str]:
    return ["dataset=shapes", "dataset.num_train=128", "dataset.num_val=64", "dataset.image_size=16"]


def _idx(root: Path) -> list[str]:
    from archives import write_idx_files

    write_idx_files(root / "idx", n_train=160, n_test=64)  # MNIST's own format: one channel to the model
    return ["dataset=mnist", f"dataset.root={root / 'idx'}", "dataset.batch_size=32"]


KINDS = {"imagefolder-auto-size": lambda root: _folder(root / "folder"), "mnist-idx-1-channel": _idx, "flowers-archive": _flowers, "array-shapes": _array}


@pytest.fixture(scope="module", params=list(KINDS))
def kind_run(request, tmp_path_factory) -> tuple[str, Path, list[str]]:
    """(kind, run folder, the dataset overrides) of a one-epoch resnet20 run on that kind of data."""
    root = tmp_path_factory.mktemp(request.param)
    data = KINDS[request.param](root)
    run = root / "run"
    fit_inproc(run, [*SMALL, *data, f"output_root={root / 'outputs'}"])
    return request.param, run, data


def test_every_tool_works_on_every_kind_of_run(kind_run, tmp_path, capsys):
    from resnet_cli import evaluate, export, predict

    kind, run, data = kind_run
    ck = torch.load(run / "best.pt", weights_only=True)
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (21 + i, 19), (30 * i, 90, 200)).save(pictures / f"p{i}.png")

    code, err, out = run_tool(predict.main, [run, pictures, "--topk", "2", "--json", tmp_path / "p.json"], capsys)
    assert code == 0, err
    preds = json.loads((tmp_path / "p.json").read_text())
    assert len(preds) == 3 and all(p["top"][0]["class"] in ck["class_names"] for p in preds)

    code, err, out = run_tool(evaluate.main, [run, "--json", tmp_path / "e.json", "--no-tensorboard"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    m = read_metrics(run)  # what training measured for the weights and the flip TTA the tools use
    want = m["tta"]["val_acc_flip"] if m.get("tta", {}).get("flip") else m["best_val_acc"]
    assert report["accuracy"] == pytest.approx(want, abs=1e-9)

    code, err, out = run_tool(export.main, [run, "--out", tmp_path / "exported"], capsys)
    assert code == 0, err
    exported = sorted(p.name for p in (tmp_path / "exported").iterdir())
    assert exported == ["resnet20.onnx", "resnet20.safetensors", "resnet20.torchscript.pt"]
    assert out.count("max |diff| vs PyTorch") == 3  # every format reloaded and compared (onnxruntime is installed)

    res = tool("resnet-lr-find", "--steps", "8", "--start-lr", "1e-4", "--end-lr", "1", *SMALL, *data,
               f"output_root={tmp_path / 'lr'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list((tmp_path / "lr").rglob("lr_find.json"))) == 1


# ---------------------------------------------------------------------------------------------
# Files from others are data, never code
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A resnet20 run on an image folder (auto size), trained once for the module."""
    root = tmp_path_factory.mktemp("trust")
    run = root / "run"
    fit_inproc(run, [*SMALL, *_folder(root / "folder"), f"output_root={root / 'outputs'}"])
    return run


def _sent(trained: Path, folder: Path, change) -> Path:
    """A copy of the run's best.pt, changed by `change(ckpt)`, as a colleague's run folder would arrive."""
    ck = torch.load(trained / "best.pt", weights_only=True)
    change(ck)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(ck, folder / "best.pt")
    return folder


def _hub(tmp: Path) -> tuple[dict, Path]:
    # What the review did: torch.hub.load with source=local imports the hubconf.py the folder carries.
    marker = tmp / "PWNED"
    (tmp / "evil").mkdir(exist_ok=True)
    (tmp / "evil" / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                             "def net(**kw):\n    import torch\n    return torch.nn.Identity()\n")
    return {"_target_": "torch.hub.load", "_partial_": True, "repo_or_dir": str(tmp / "evil"), "model": "net",
            "source": "local"}, marker


ATTACKS = {
    # section -> what the file says; every one must be refused naming the target, before anything runs.
    "model-hub": ("model", None),
    "model-open-for-write": ("model", {"_target_": "builtins.open", "_partial_": True, "file": "VICTIM", "mode": "w"}),
    "model-unlink": ("model", {"_target_": "pathlib.Path.unlink", "_args_": ["VICTIM"]}),
    "model-torch-load": ("model", {"_target_": "torch.load", "_partial_": True, "f": "VICTIM",
                                   "weights_only": False}),
    "dataset-open-for-write": ("dataset", {"_target_": "builtins.open", "_partial_": True, "file": "VICTIM",
                                           "mode": "w"}),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("name", ["predict", "eval", "export"])
def test_a_stored_target_is_refused_and_runs_nothing(trained, tmp_path, capsys, attack, name):
    from resnet_cli import evaluate, export, predict

    section, node = ATTACKS[attack]
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    marker = tmp_path / "PWNED"
    if node is None:
        node, marker = _hub(tmp_path)
    node = json.loads(json.dumps(node).replace("VICTIM", str(victim)))

    def change(ck):
        ck["config"][section] = node

    sent = _sent(trained, tmp_path / "sent", change)
    image = next((trained.parent / "folder" / "ant").glob("*.png"))
    argv = {"predict": [sent, image], "eval": [sent, "--no-tensorboard"], "export": [sent, "--out", tmp_path / "x"]}
    main = {"predict": predict.main, "eval": evaluate.main, "export": export.main}[name]
    code, err, _ = run_tool(main, argv[name], capsys)
    if section == "dataset" and name != "eval":
        assert code == 0, err  # predict and export never read the dataset section
    else:
        refused(code, err, str(sent), "refused", repr(node["_target_"]))
        assert not (tmp_path / "x").exists()
    assert victim.read_text() == "precious\n" and not marker.exists()


def test_resume_of_a_hostile_checkpoint_runs_nothing(trained, tmp_path):
    node, marker = _hub(tmp_path)
    sent = _sent(trained, tmp_path / "sent", lambda ck: ck["config"].__setitem__("model", node))
    os.replace(sent / "best.pt", sent / "last.pt")  # what a resume continues
    before = snapshot(sent)
    with pytest.raises(Exception) as info:
        fit_inproc(tmp_path / "new", [*SMALL, *_folder(trained.parent / "folder"), f"trainer.resume={sent}",
                                      f"output_root={tmp_path / 'outputs'}"])
    assert "trainer.resume" in str(info.value) and not marker.exists()
    assert snapshot(sent) == before


@pytest.mark.parametrize("entry,value", [("epoch", "x"), ("global_step", -3), ("rng", {"python": 5}),
                                         ("scheduler", [1]), ("history", 7)])
def test_resume_of_a_damaged_checkpoint_is_one_line_and_writes_nothing(trained, tmp_path, entry, value):
    from resnet_cli.errors import UserError

    sent = _sent(trained, tmp_path / "sent", lambda ck: ck.__setitem__(entry, value))
    os.replace(sent / "best.pt", sent / "last.pt")
    before = snapshot(sent)
    with pytest.raises(UserError, match=rf"trainer.resume={sent}.*(damaged|does not fit)"):
        fit_inproc(tmp_path / "new", [*SMALL, *_folder(trained.parent / "folder"), f"trainer.resume={sent}",
                                      f"output_root={tmp_path / 'outputs'}"])
    # The lock of the run that tried, and its log lines (train.log follows the folder a resume writes): no more.
    assert {k: v for k, v in snapshot(sent).items() if k not in (".resnet-cli.lock", "train.log")} == before


@pytest.mark.parametrize("entry,value,named", [
    ("config.model.name", "${oc.env:HOME}", "interpolation"),
    ("config.model.name", "no_such_net", "unknown model"),
    ("config.model.stem", "sideways", "model.stem"),
    ("config.model.depth_of_evil", 3, "model.depth_of_evil"),
    ("eval_spec.resize", 10**9, "eval_spec.resize"),
    ("eval_spec.crop", "32", "eval_spec.crop"),
    ("eval_spec.mean", [float("nan"), 0.5, 0.5], "eval_spec.mean"),
    ("eval_spec.std", [0.0, 1.0, 1.0], "eval_spec.std"),
    ("class_names", "cats", "class_names"),
    ("class_names", [], "class_names"),
    ("model", {"conv1.weight": "not a tensor"}, "raw weights"),
    ("config", [1, 2], "model section"),
])
def test_every_stored_value_a_tool_uses_is_checked(trained, tmp_path, capsys, entry, value, named):
    from resnet_cli import predict

    def change(ck):
        *path, last = entry.split(".")
        node = ck
        for key in path:
            node = node[key]
        node[last] = value

    sent = _sent(trained, tmp_path / "sent", change)
    image = next((trained.parent / "folder" / "ant").glob("*.png"))
    refused(*run_tool(predict.main, [sent, image], capsys)[:2], str(sent), named)


def test_a_stored_trainer_section_is_typed_for_eval(trained, tmp_path, capsys):
    from resnet_cli import evaluate

    sent = _sent(trained, tmp_path / "sent", lambda ck: ck["config"]["trainer"].__setitem__("precision", "fp64"))
    refused(*run_tool(evaluate.main, [sent, "--no-tensorboard"], capsys)[:2], str(sent), "trainer.precision")


def test_a_hostile_hydra_folder_is_never_read(trained, tmp_path, capsys):
    """The tools read the checkpoint only: a run folder's .hydra/config.yaml is not a source of anything."""
    from resnet_cli import predict

    marker = tmp_path / "PWNED"
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes((trained / "best.pt").read_bytes())
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(f"model:\n  _target_: builtins.open\n  file: {marker}\n  mode: w\n")
    image = next((trained.parent / "folder" / "ant").glob("*.png"))
    code, err, out = run_tool(predict.main, [run, image], capsys)
    assert code == 0, err
    assert not marker.exists()


def test_eval_of_a_sent_checkpoint_never_downloads(trained, tmp_path, capsys):
    """A colleague's config may name a URL and a folder of yours: eval reads, never fetches and extracts there."""
    from resnet_cli import evaluate

    target = tmp_path / "yours"
    url, sha256 = make_flowers_archive(tmp_path / "served", per_class=2, size=16)

    def change(ck):
        ck["config"]["dataset"] = {**ck["config"]["dataset"], "_target_": "resnet_cli.data.flowers",
                                   "root": str(target), "url": url, "sha256": sha256, "download": True}

    sent = _sent(trained, tmp_path / "sent", change)
    code, err, _ = run_tool(evaluate.main, [sent, "--no-tensorboard"], capsys)
    refused(code, err, "not found", "dataset.download=true")
    assert not target.exists() or not any(target.iterdir())


# ---------------------------------------------------------------------------------------------
# Non-finite is an error, never a result
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["nan-weights", "inf-outputs"])
def test_non_finite_is_an_error_in_every_tool(trained, tmp_path, capsys, how):
    from resnet_cli import evaluate, export, predict

    def change(ck):
        if how == "nan-weights":
            ck["model"]["conv1.weight"].fill_(float("nan"))
        else:  # finite weights whose logits overflow: the outputs, not the file, are what is checked
            ck["model"]["fc.weight"].fill_(3e38)

    sent = _sent(trained, tmp_path / "sent", change)
    image = next((trained.parent / "folder" / "ant").glob("*.png"))
    named = "not finite"
    refused(*run_tool(predict.main, [sent, image, "--json", tmp_path / "p.json"], capsys)[:2], named)
    refused(*run_tool(evaluate.main, [sent, "--no-tensorboard", "--json", tmp_path / "e.json"], capsys)[:2], named)
    refused(*run_tool(export.main, [sent, "--out", tmp_path / "x"], capsys)[:2], named)
    assert not (tmp_path / "p.json").exists() and not (tmp_path / "e.json").exists()
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


# ---------------------------------------------------------------------------------------------
# A tool never replaces a file it did not write in this call
# ---------------------------------------------------------------------------------------------

def test_annotate_into_the_input_folder_is_refused_and_the_photos_stay(trained, tmp_path, capsys):
    from PIL import Image

    from resnet_cli import predict

    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(photos / "photo.png")
    Image.new("RGB", (24, 20), (10, 200, 10)).save(photos / "photo.jpg")  # its annotation would be photo.png
    before = snapshot(photos)
    refused(*run_tool(predict.main, [trained, photos, "--annotate", photos], capsys)[:2], "inside the input folder")
    refused(*run_tool(predict.main, [trained, photos, "--annotate", photos / "sub"], capsys)[:2], "inside")
    refused(*run_tool(predict.main, [trained, photos, "--json", photos / "photo.png", "--overwrite"], capsys)[:2],
            "is one of the inputs")
    assert snapshot(photos) == before


def test_outputs_that_exist_are_replaced_only_with_overwrite_and_inputs_never(trained, tmp_path, capsys):
    from PIL import Image

    from resnet_cli import evaluate, export, predict

    photo = tmp_path / "in" / "photo.jpg"
    photo.parent.mkdir()
    Image.new("RGB", (20, 20), (200, 10, 10)).save(photo)
    out = tmp_path / "out"
    out.mkdir()
    (out / "photo.png").write_bytes(b"the user's own picture")
    (tmp_path / "preds.json").write_text("mine\n")
    refused(*run_tool(predict.main, [trained, photo, "--annotate", out], capsys)[:2], "already exists", "--overwrite")
    refused(*run_tool(predict.main, [trained, photo, "--json", tmp_path / "preds.json"], capsys)[:2], "--json")
    assert (out / "photo.png").read_bytes() == b"the user's own picture"
    assert (tmp_path / "preds.json").read_text() == "mine\n"
    code, err, _ = run_tool(predict.main, [trained, photo, "--annotate", out, "--overwrite"], capsys)
    assert code == 0, err
    assert (out / "photo.png").read_bytes()[:4] == b"\x89PNG"
    # A second name of an input (a hard link) is still the input: never replaced, --overwrite or not.
    os.link(photo, out / "linked.png")
    refused(*run_tool(predict.main, [trained, photo, "--json", out / "linked.png", "--overwrite"], capsys)[:2],
            "is one of the inputs")
    (tmp_path / "eval.json").write_text("mine\n")
    refused(*run_tool(evaluate.main, [trained, "--json", tmp_path / "eval.json", "--no-tensorboard"], capsys)[:2],
            "already exists")
    assert (tmp_path / "eval.json").read_text() == "mine\n"
    code, err, _ = run_tool(export.main, [trained, "--out", tmp_path / "x", "--formats", "torchscript"], capsys)
    assert code == 0, err
    first = (tmp_path / "x" / "resnet20.torchscript.pt").read_bytes()
    refused(*run_tool(export.main, [trained, "--out", tmp_path / "x", "--formats", "torchscript"], capsys)[:2],
            "already exists", "--overwrite")
    assert (tmp_path / "x" / "resnet20.torchscript.pt").read_bytes() == first


def test_an_export_that_fails_its_check_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    from resnet_cli import export

    monkeypatch.setattr(export, "_check_safetensors", lambda path, x: torch.full((x.shape[0], 3), 7.0))
    code, err, out = run_tool(export.main, [trained, "--out", tmp_path / "x", "--formats", "safetensors"], capsys)
    refused(code, err, "resnet20.safetensors", "differ from PyTorch")
    assert list((tmp_path / "x").iterdir()) == []  # neither the file nor its temporary


@pytest.mark.parametrize("argv,named", [
    (["--formats", ""], "--formats"),
    (["--formats", ",,"], "--formats"),
    (["--formats", "onnx,pickle"], "pickle"),
])
def test_export_formats_are_checked(trained, tmp_path, capsys, argv, named):
    from resnet_cli import export

    refused(*run_tool(export.main, [trained, "--out", tmp_path / "x", *argv], capsys)[:2], named)
    assert not (tmp_path / "x").exists()


def test_a_url_is_named_as_a_url(trained, tmp_path, capsys):
    from resnet_cli import predict

    refused(*run_tool(predict.main, [trained, "https://example.com/cat.jpg"], capsys)[:2], "a URL",
            "https://example.com/cat.jpg")


# ---------------------------------------------------------------------------------------------
# One writer per run folder
# ---------------------------------------------------------------------------------------------

def _holder_process(folder: Path) -> subprocess.Popen:
    """A process that holds folder's lock (as a live run does) and waits on its stdin."""
    code = ("import sys; from resnet_cli import runfolder; runfolder.hold(sys.argv[1]); print('held', flush=True); "
            "sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_in_a_live_run_folder_is_refused_naming_its_holder(cli, tmp_path):
    run = tmp_path / "run"
    holder = _holder_process(run)
    try:
        before = snapshot(run)
        res = cli(*TINY, f"hydra.run.dir={run}")
        line = assert_one_line(res, f"hydra.run.dir={run}", "in use", f"pid {holder.pid}")
        assert "wait for it" in line
        assert snapshot(run) == before  # not even Hydra's .hydra/ or log was written
        res = cli(*TINY, f"hydra.run.dir={run}", "trainer.overwrite=true")
        assert_one_line(res, "in use")
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with the process (SIGKILL, no clean-up): the folder is free again.
    res = cli(*TINY, f"hydra.run.dir={run}")
    assert res.returncode == 0, res.stderr[-2000:]
    assert (run / "last.pt").is_file()


def test_two_runs_started_together_leave_one_run_in_the_folder(tmp_path):
    """The review's race, made deterministic: run A is stopped (SIGSTOP) once it holds the folder."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    a = subprocess.Popen([*resnet_train_cmd(), *TINY, "model=simple_cnn", f"hydra.run.dir={run}"], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        read_until(a, r"run folder: ")
        a.send_signal(signal.SIGSTOP)
        b = subprocess.run([*resnet_train_cmd(), *TINY, "model=resnet20", f"hydra.run.dir={run}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
        assert_one_line(b, "in use", f"pid {a.pid}")
    finally:
        a.send_signal(signal.SIGCONT)
    a.communicate(timeout=300)
    assert a.returncode == 0
    config = (run / ".hydra" / "config.yaml").read_text()
    ck = torch.load(run / "last.pt", weights_only=True)
    assert "name: simple_cnn" in config and ck["config"]["model"]["name"] == "simple_cnn"


def test_resume_auto_never_continues_a_live_run(cli, tmp_path):
    out = tmp_path / "outputs"
    args = [*TINY, "model=simple_cnn", f"output_root={out}"]
    first = tmp_path / "first"
    fit_inproc(first, args)
    ck = torch.load(first / "last.pt", weights_only=True)
    ck["finished"] = False  # a run that has not ended: resume=auto would continue it
    torch.save(ck, first / "last.pt")
    live = out / "live"
    live.parent.mkdir(parents=True)
    os.replace(first, live)
    holder = _holder_process(live)  # that run is still going
    try:
        before = snapshot(live)
        res = cli(*args, "trainer.resume=auto")
        assert res.returncode == 0, res.stderr[-2000:]
        assert f"skipped {live}: in use by pid {holder.pid}" in res.stdout + res.stderr
        assert "starting fresh" in res.stdout + res.stderr
        assert snapshot(live) == before
    finally:
        holder.kill()
        holder.wait()
    res = cli(*args, "trainer.resume=auto")  # once it has ended, the same command continues it
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout + res.stderr and (live / "metrics.json").is_file()


# ---------------------------------------------------------------------------------------------
# Resume checks identity
# ---------------------------------------------------------------------------------------------

def test_resume_on_other_data_is_refused_before_anything_is_written(tmp_path):
    from resnet_cli.errors import UserError

    first = tmp_path / "first"
    fit_inproc(first, [*TINY, f"output_root={tmp_path / 'o'}"])  # shapes: 10 classes
    before = snapshot(first)
    folder = write_class_folders(tmp_path / "ten", per_class=3, size=16, classes=[f"c{i}" for i in range(10)])
    with pytest.raises(UserError, match=r"trainer.resume=.*made by resnet18 on shapes.*dataset._target_"):
        fit_inproc(tmp_path / "second", [*SMALL, "model=resnet18", "dataset=imagefolder", f"dataset.root={folder}",
                                         f"trainer.resume={first}", f"output_root={tmp_path / 'o'}"])
    assert snapshot(first) == before


def test_resume_with_other_classes_in_the_same_folder_is_refused(tmp_path):
    from resnet_cli.errors import UserError

    data = tmp_path / "data"
    for split in ("train", "val"):
        write_class_folders(data / split, per_class=16, size=16, classes=["ant", "bee"])
    args = [*SMALL, "dataset=imagefolder", f"dataset.root={data}", "model=simple_cnn", f"output_root={tmp_path / 'o'}"]
    first = tmp_path / "first"
    fit_inproc(first, args)
    before = snapshot(first)
    for split in ("train", "val"):
        os.replace(data / split / "bee", data / split / "wasp")
    with pytest.raises(UserError, match=r"other classes.*'bee'.*'wasp'"):
        fit_inproc(tmp_path / "second", [*args, "trainer.epochs=2", f"trainer.resume={first}"])
    assert snapshot(first) == before


# ---------------------------------------------------------------------------------------------
# Start-up writes, and every tool's arguments, in one line
# ---------------------------------------------------------------------------------------------

def test_a_full_disk_at_start_up_is_one_line_naming_the_run_folder(cli, tmp_path):
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full")
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").symlink_to("/dev/full")  # every write there: ENOSPC, as on a full disk
    res = cli(*TINY, f"hydra.run.dir={run}")
    assert_one_line(res, str(run), "no space left on device")


@pytest.mark.parametrize("keys,named", [
    (["num_classes=abc"], "num_classes=abc"),
    (["head=bogus"], "model.head"),
    (["stem=["], "stem=["),
    (["groups=2"], "model.groups"),
    (["drop_rate=x"], "model.drop_rate"),
    (["justaword"], "key=value"),
])
def test_resnet_models_keys_are_one_line(tmp_path, keys, named):
    res = subprocess.run([str(Path(sys.executable).parent / "resnet-models"), "resnet18", "--summary", "--size", "32",
                          *keys], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert_one_line(res, named)


def test_lr_find_help_is_its_own(tmp_path):
    res = tool("resnet-lr-find", "--help", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout.startswith("usage: resnet-lr-find")
    for flag in ("--steps", "--start-lr", "--end-lr", "--smoothing", "--diverge", "resnet-train --help"):
        assert flag in res.stdout
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------------------------------------
# Drawn hostile checkpoints and tool arguments (property-based)
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ENTRIES = [("config", "model", "name"), ("config", "model", "_target_"), ("config", "model", "stem"),
           ("config", "model", "shortcut"), ("config", "model", "in_channels"), ("config", "model", "head"),
           ("config", "dataset", "_target_"), ("config", "dataset", "root"), ("config", "dataset", "image_size"),
           ("config", "trainer", "precision"), ("config", "trainer", "device"), ("config", "trainer", "ema_decay"),
           ("eval_spec", "resize"), ("eval_spec", "crop"), ("eval_spec", "mean"), ("eval_spec", "std"),
           ("eval_spec", "channels"), ("class_names",), ("metrics", "val_acc"), ("metrics", "epoch"), ("ema",),
           ("model",), ("config",), ("config", "model"), ("config", "dataset")]
VALUES = [None, True, 0, -1, 3, 10**9, 1.5, float("nan"), float("inf"), "", "auto", "resnet18", "resnet56",
          "${oc.env:HOME}", "os.system", "builtins.exec", "resnet_cli.data.shapes", "resnet_cli.models.create_model",
          [], [1, 2, 3], [0.5, 0.5, 0.5], ["a"], ["ant", "bee"], {}, {"x": 1}, "../../etc/passwd", "VICTIM",
          "<delete>"]
FLAGS = {
    "predict": [["--topk", st.sampled_from(["1", "3", "0", "-2", "x", "100"])],
                ["--weights", st.sampled_from(["auto", "ema", "raw", "bogus"])],
                ["--batch-size", st.sampled_from(["1", "2", "0"])], ["--on-bad-image", st.sampled_from(["skip"])],
                ["--device", st.sampled_from(["cpu", "cuda:7", "gpu"])]],
    "eval": [["--split", st.sampled_from(["val", "train", "test", "bogus"])],
             ["--limit-batches", st.sampled_from(["0", "1", "-1"])],
             ["--weights", st.sampled_from(["auto", "raw", "ema"])], ["--device", st.sampled_from(["cpu", "tpu"])]],
    "export": [["--formats", st.sampled_from(["torchscript", "safetensors", "torchscript,safetensors", "", "jpg"])],
               ["--atol", st.sampled_from(["0", "1e-4", "-1", "nan"])], ["--name", st.sampled_from(["net", "a b"])]],
}


@st.composite
def hostile(draw):
    """A few changed entries of a real checkpoint, a tool and some of its flags."""
    changes = draw(st.lists(st.tuples(st.sampled_from(ENTRIES), st.sampled_from(VALUES)), min_size=0, max_size=3))
    name = draw(st.sampled_from(sorted(FLAGS)))
    flags = []
    for flag, values in draw(st.lists(st.sampled_from(FLAGS[name]), max_size=2, unique_by=lambda f: f[0])):
        flags += [flag, draw(values)]
    return changes, name, flags


DRAWN = 60
OUTCOMES: dict[str, int] = {}  # exit code -> draws (checked by the test after the property test)


@settings(derandomize=True, max_examples=DRAWN, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(hostile())
def test_drawn_hostile_checkpoints_and_flags_end_in_a_result_or_one_line(trained, tmp_path_factory, capsys, case):
    """Whatever a checkpoint says and whatever flags are given: a finite result or one line, nothing else touched."""
    from resnet_cli import evaluate, export, predict

    changes, name, flags = case
    tmp = tmp_path_factory.mktemp("drawn")
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")

    def change(ck):
        for entry, value in changes:
            value = str(victim) if value == "VICTIM" else value
            node = ck
            for key in entry[:-1]:
                node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                continue
            if value == "<delete>":
                node.pop(entry[-1], None)
            else:
                node[entry[-1]] = value

    sent = _sent(trained, tmp / "sent", change)
    image = next((trained.parent / "folder" / "ant").glob("*.png"))
    out = tmp / "out"
    argv = {"predict": [sent, image, "--json", out / "p.json"],
            "eval": [sent, "--no-tensorboard", "--json", out / "e.json"],
            "export": [sent, "--out", out]}[name] + flags
    out.mkdir()
    before = snapshot(tmp)
    main = {"predict": predict.main, "eval": evaluate.main, "export": export.main}[name]
    code, err, _ = run_tool(main, argv, capsys)  # an unexpected exception fails the test here: a traceback
    assert code in (0, 2), (code, err)
    OUTCOMES[f"{name}:{code}"] = OUTCOMES.get(f"{name}:{code}", 0) + 1
    if code == 2:
        assert len(err) == 1 and err[0].startswith(f"resnet-{name}: error: "), err
    written = {k for k in snapshot(tmp) if k.startswith("out/")} | {k for k in before if k.startswith("out/")}
    assert {k: v for k, v in snapshot(tmp).items() if k not in written} == \
        {k: v for k, v in before.items() if k not in written}  # nothing but the named outputs changed
    assert victim.read_text() == "precious\n"
    for result in out.glob("*.json"):
        json.loads(result.read_text(), parse_constant=lambda c: pytest.fail(f"{result} holds {c}"))


def test_the_drawn_cases_reach_both_results_and_refusals_of_every_tool():
    """The draws above are worth something only if some end in a result and some in a refusal, per tool."""
    if not OUTCOMES:
        pytest.skip("runs after the property test in the same process (pytest -n: a file per worker)")
    for name in FLAGS:
        assert OUTCOMES.get(f"{name}:0", 0) >= 2 and OUTCOMES.get(f"{name}:2", 0) >= 2, OUTCOMES


def test_runs_written_inside_the_data_folder_are_not_a_class(cli, tmp_path, capsys, monkeypatch):
    """`cd photos && resnet-train dataset=imagefolder dataset.root=.`: outputs/ lands in the data folder."""
    from resnet_cli import evaluate

    data = write_class_folders(tmp_path / "photos", per_class=12, size=16, classes=["ant", "bee"])
    args = ["dataset=imagefolder", "dataset.root=.", *SMALL[:-1], "model=simple_cnn"]
    first = cli(*args, cwd=data)
    assert first.returncode == 0, first.stderr[-2000:]
    second = cli(*args, cwd=data)  # outputs/ (with curves.png) now sits beside ant/ and bee/
    assert second.returncode == 0, second.stderr[-2000:]
    assert "run folders ignored: outputs" in second.stdout + second.stderr
    runs = sorted(p.parent for p in (data / "outputs").rglob("last.pt"))
    assert [json.loads((r / "class_names.json").read_text()) for r in runs] == [["ant", "bee"]] * 2
    monkeypatch.chdir(data)  # the stored root is relative, as typed
    code, err, _ = run_tool(evaluate.main, [runs[0], "--no-tensorboard"], capsys)
    assert code == 0, err
