"""Multiruns end with a summary of every job: Optuna search, joblib launcher, failed jobs listed."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from conftest import TINY, read_metrics

SMALL = [*TINY, "model=resnet20", "dataset.num_train=64", "dataset.num_val=32"]


def summary(out: Path) -> list[dict]:
    """The rows of the single sweep_summary.csv under `out`."""
    found = list(out.rglob("sweep_summary.csv"))
    assert len(found) == 1, found
    with found[0].open() as fh:
        return list(csv.DictReader(fh))


def test_optuna_search_of_three_trials_leaves_the_summary(cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    out = tmp_path / "outputs"
    res = cli("hparams_search=optuna", "hydra.sweeper.n_trials=3", *SMALL, f"output_root={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = summary(out)
    assert [r["job"] for r in rows] == ["0", "1", "2"]
    for row in rows:
        assert row["status"] == "ok" and row["error"] == ""
        assert float(row["best_val_acc"]) == pytest.approx(read_metrics(Path(row["run_dir"]))["best_val_acc"],
                                                           abs=1e-4)
        assert row["epochs"] == "1"
        keys = {o.partition("=")[0] for o in row["overrides"].split()}
        assert {"optimizer", "optimizer.lr", "optimizer.weight_decay"} <= keys, row["overrides"]
    assert "sweep summary:" in res.stdout and "best_val_acc" in res.stdout
    results = list(out.rglob("optimization_results.yaml"))
    assert results and "best_value" in results[0].read_text()


def test_joblib_sweep_of_two_jobs_leaves_the_summary(cli, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    out = tmp_path / "outputs"
    res = cli("-m", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2", *SMALL, f"output_root={out}",
              "optimizer=adam,sgd", "scheduler=step")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = summary(out)
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [("0", "ok", "optimizer=adam"),
                                                                       ("1", "ok", "optimizer=sgd")]
    for row in rows:
        assert float(row["best_val_acc"]) == pytest.approx(read_metrics(Path(row["run_dir"]))["best_val_acc"],
                                                           abs=1e-4)
        assert float(row["wall_s"]) > 0


def test_a_failed_job_is_listed_with_its_error(cli, tmp_path):
    out = tmp_path / "outputs"
    res = cli("-m", *SMALL, f"output_root={out}", "dataset.num_train=0,64")
    assert res.returncode != 0  # Hydra stops the sweep at the failed batch
    rows = summary(out)
    assert [(r["job"], r["status"]) for r in rows] == [("0", "failed"), ("1", "ok")]
    assert "dataset.num_train" in rows[0]["error"] and rows[0]["best_val_acc"] == ""
    assert rows[1]["best_val_acc"] != ""
    assert "failed" in res.stderr and "sweep summary:" in res.stderr  # printed even though the sweep aborted


# Without an extra: the override that needs it, the module(s) hidden as if not installed, the extra named.
MISSING_EXTRAS = [
    (["-m", "hparams_search=optuna"], "hydra_plugins.hydra_optuna_sweeper", "sweep"),
    (["hparams_search=optuna"], "optuna", "sweep"),  # the plugin without the library it drives
    (["-m", "hydra/launcher=parallel", "optimizer=sgd,adam"], "hydra_plugins.hydra_joblib_launcher", "sweep"),
    (["-m", "hydra/launcher=slurm", "optimizer=sgd,adam"], "hydra_plugins.hydra_submitit_launcher", "slurm"),
    (["-m", "hydra/launcher=local", "optimizer=sgd,adam"], "submitit", "slurm"),
]
HIDE_SHIM = Path(__file__).resolve().parent / "shims" / "hide_modules"


@pytest.mark.parametrize("args, hidden, extra", MISSING_EXTRAS, ids=[f"{h} {a[-1]}" for a, h, _ in MISSING_EXTRAS])
def test_a_missing_extra_is_one_line_naming_what_to_install(cli, tmp_path, args, hidden, extra):
    import os

    path = os.pathsep.join(filter(None, [str(HIDE_SHIM), os.environ.get("PYTHONPATH")]))
    res = cli(*args, f"output_root={tmp_path / 'outputs'}", env={"PYTHONPATH": path, "RESNET_CLI_TEST_HIDE": hidden})
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert lines[0].startswith(f"resnet-train: error: {args[1] if args[0] == '-m' else args[0]} needs the `{extra}`")
    assert lines[0].endswith(f"pip install 'resnet-cli[{extra}]'")
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


def test_hydras_missing_plugin_config_names_the_extra_wherever_it_was_chosen():
    """An option chosen in a config file, not on the command line, reaches Hydra's error: one_line names the extra."""
    from hydra.errors import MissingConfigException

    from resnet_cli.errors import one_line

    exc = MissingConfigException("In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'.\n"
                                 "Config search path:\n\tprovider=hydra, path=pkg://hydra.conf", "x")
    assert one_line(exc) == ("hydra/launcher=slurm needs the `slurm` extra (its Hydra plugin is not installed): "
                             "pip install 'resnet-cli[slurm]'")
    exc = MissingConfigException("In 'hydra/config': Could not find 'hydra/sweeper/optuna'\n\nAvailable options in "
                                 "'hydra/sweeper':\n\tbasic", "x")
    assert one_line(exc).startswith("hydra/sweeper=optuna needs the `sweep` extra")
