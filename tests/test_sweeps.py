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
