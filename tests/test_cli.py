"""The command line: config errors, --help/--cfg without torch, installs, sweeps."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics


@pytest.mark.parametrize(
    "override, named",
    [
        ("trainer.epoch=3", "trainer.epoch"),  # typo of an existing key
        ("trainer.epochs=abc", "trainer.epochs"),  # wrong type
        ("model=resnet5", "resnet5"),  # unknown group option
        ("trainer.precision=fp8", "trainer.precision"),  # invalid choice
    ],
)
def test_bad_override_is_one_line_and_reads_no_data(cli, tmp_path, override, named):
    data_root = tmp_path / "never-created"
    res = cli("dataset=cifar10", f"dataset.root={data_root}", override)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("resnet-train: error:") and named in lines[0]
    assert "Traceback" not in res.stderr
    assert not data_root.exists() and not (tmp_path / "outputs").exists()


def test_typo_suggests_the_real_key(cli):
    res = cli("trainer.epoch=3")
    assert "did you mean 'epochs'" in res.stderr


_PROBE = textwrap.dedent(
    """
    import sys
    sys.argv = ["resnet-train", *sys.argv[1:]]
    from resnet_cli.train import main
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    print("TORCH_IMPORTED=" + str("torch" in sys.modules), "EXIT=" + str(code))
    """
)


@pytest.mark.parametrize("args", [["--help"], ["--cfg", "job"], ["--cfg", "job", "model=resnet50", "dataset=flowers"]])
def test_help_and_cfg_never_import_torch(tmp_path, args):
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=tmp_path, capture_output=True, text=True)
    assert "TORCH_IMPORTED=False EXIT=0" in res.stdout, res.stdout + res.stderr
    if args[0] == "--help":
        assert "model: " in res.stdout and "resnet50" in res.stdout  # lists the group options
    else:
        assert "_target_: resnet_cli.models.create_model" in res.stdout


def test_editable_install_finds_configs_from_any_directory(cli, tmp_path):
    import resnet_cli

    assert Path(resnet_cli.__file__).resolve().is_relative_to(REPO)
    res = cli("--cfg", "job", "model=resnet50", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "name: resnet50" in res.stdout


@pytest.mark.slow
def test_wheel_install_finds_configs_from_any_directory(tmp_path):
    """Build and install the wheel (non-editable) into a target folder and run from elsewhere."""
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                            str(REPO)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    assert (target / "resnet_cli" / "configs" / "train.yaml").is_file()
    probe = "import resnet_cli, sys; print(resnet_cli.__file__); sys.argv=['resnet-train','--cfg','job']; " \
            "from resnet_cli.train import main; main()"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    res = subprocess.run([sys.executable, "-c", probe], cwd=elsewhere, capture_output=True, text=True,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith(str(target))
    assert "_target_: resnet_cli.models.create_model" in res.stdout


def test_two_job_sweep_leaves_two_complete_run_folders(cli, tmp_path):
    out = tmp_path / "outputs"
    res = cli("-m", *TINY, "model=resnet20", "dataset.num_train=64", "dataset.num_val=32", f"output_root={out}",
              "optimizer=adam,sgd", "scheduler=step")
    assert res.returncode == 0, res.stderr[-3000:]
    runs = sorted(p.parent for p in out.rglob("metrics.json"))
    assert len(runs) == 2
    optimizers = set()
    for run in runs:
        for name in ("last.pt", "best.pt", "class_names.json", ".hydra/config.yaml"):
            assert (run / name).is_file(), run / name
        assert list(run.glob("events.out.tfevents.*"))
        assert 0.0 <= read_metrics(run)["best_val_acc"] <= 1.0
        optimizers.add((run / ".hydra" / "overrides.yaml").read_text().count("optimizer=adam"))
    assert optimizers == {0, 1}


def test_batch_larger_than_the_dataset_is_one_line(cli, tmp_path):
    res = cli("dataset=shapes", "dataset.num_train=64", "dataset.num_val=32", "dataset.image_size=16",
              "dataset.batch_size=128", "model=resnet20", "trainer.device=cpu", f"output_root={tmp_path / 'o'}")
    assert res.returncode == 2
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("resnet-train: error: dataset.batch_size=128") and "Traceback" not in res.stderr


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_names_itself(name):
    """Each recipe is a valid composition of real options that passes the schema."""
    from conftest import compose

    cfg = compose([f"experiment={name}"])
    assert cfg.name == name
    assert cfg.model.name and cfg.dataset._target_.startswith("resnet_cli.data.")
