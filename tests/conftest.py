"""Shared fixtures: run the real entry point (in a subprocess or in-process) on tiny data."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

# Tests run torch on one thread: on a shared 2-core machine a 2-thread op waits for a busy core
# (one training test: 97 s on two threads, 11 s on one). Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Decoded-image caches of test folders go to a scratch folder, never to the user's ~/.cache.
os.environ.setdefault("RESNET_CLI_CACHE", tempfile.mkdtemp(prefix="resnet-cli-cache-"))

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/archives.py and friends

# Tiny, fast, CPU-only settings shared by the end-to-end tests.
TINY = [
    "dataset=shapes", "dataset.num_train=256", "dataset.num_val=128", "dataset.image_size=16",
    "dataset.batch_size=32", "dataset.val_batch_size=64", "trainer.device=cpu", "trainer.epochs=1",
    "trainer.progress=false", "trainer.log_every_n_steps=2",
]


def resnet_train_cmd() -> list[str]:
    """The installed `resnet-train` console script (falls back to `python -m` from a source tree)."""
    script = Path(sys.executable).parent / "resnet-train"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "resnet_cli.train"]


@pytest.fixture
def cli(tmp_path):
    """Run `resnet-train ARGS` in a subprocess from a scratch working directory."""

    def run(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        full_env.pop("HYDRA_FULL_ERROR", None)
        return subprocess.run([*resnet_train_cmd(), *args], cwd=cwd or tmp_path, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    return run


def compose(overrides: list[str]):
    """Compose configs/train.yaml with overrides exactly as `resnet-train` does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    import resnet_cli.config  # noqa: F401  (registers the schemas, as the entry point does)
    from resnet_cli import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = hydra_compose("train", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return cfg


def apply(cfg, overrides: list[str]):
    """Hydra's own override step (ConfigLoaderImpl._apply_overrides_to_config) on a copy of cfg."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser

    cfg = copy.deepcopy(cfg)
    parsed = OverridesParser.create().parse_overrides(overrides)
    ConfigLoaderImpl._apply_overrides_to_config(parsed, cfg)
    return cfg


def dataset_config(name: str):
    """The dataset node of `dataset=<name>` as resnet-train composes it: the YAML over its schema's defaults."""
    return compose([f"dataset={name}"]).dataset


def fit_inproc(run_dir: Path, overrides: list[str]) -> float:
    """Compose the real config with overrides and run the training task in-process into run_dir."""
    from omegaconf import open_dict

    from resnet_cli.train import fit

    cfg = compose(overrides)
    with open_dict(cfg):
        del cfg["hydra"]  # Hydra's own node is not part of the run's config
    run_dir.mkdir(parents=True, exist_ok=True)
    return fit(cfg, run_dir)


@pytest.fixture
def train_inproc(tmp_path):
    """Run the training task in-process on TINY data (no torch re-import), returning (best_acc, run_dir)."""
    counter = {"n": 0}

    def run(*overrides: str, run_dir: Path | None = None):
        counter["n"] += 1
        run_dir = run_dir or tmp_path / f"run{counter['n']}"
        return fit_inproc(run_dir, [*TINY, f"output_root={tmp_path / 'outputs'}", *overrides]), run_dir

    return run


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of a run folder."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def only_run_dir(root: Path) -> Path:
    """The single run folder (the one holding metrics.json) under root."""
    found = [p.parent for p in Path(root).rglob("metrics.json")]
    assert len(found) == 1, found
    return found[0]


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """Hydra's job logging replaces the root handlers (pointing them at captured streams): put them back after."""
    import logging

    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture
def keep_logging():
    """The root logger's handlers as they were before the test (see logging_restored)."""
    with logging_restored():
        yield
