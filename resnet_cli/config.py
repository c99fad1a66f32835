"""Typed schemas for the top-level and trainer config nodes (no torch import).

The schemas are registered in Hydra's ConfigStore and named first in
``configs/train.yaml``'s defaults list, so a misspelled key, a wrong type or an
invalid choice fails while Hydra composes the config, before any data is read.
The swappable groups (model, dataset, optimizer, scheduler) stay untyped: their
keys are the keyword arguments of the ``_target_`` they feed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


class Precision(str, Enum):
    """Autocast precision; auto = bf16 where the device supports it, else fp16 on CUDA, else fp32."""

    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Monitor(str, Enum):
    """The validation metric that picks best.pt and drives early stopping."""

    val_acc = "val_acc"
    val_loss = "val_loss"


@dataclass
class TrainerConfig:
    """How to train: device, precision, loop options, checkpoints, resume."""

    epochs: int = 10
    seed: int = 42
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: Precision = Precision.auto
    channels_last: str = "auto"  # auto | true | false
    num_threads: str = "auto"  # CPU compute threads: auto (cores minus loader workers, or OMP_NUM_THREADS) | N
    compile: bool = False  # torch.compile the model (opt-in: compile time dominates short runs)
    deterministic: bool = False  # deterministic algorithms; bitwise-repeatable runs on CPU
    grad_clip_value: float = 0.0  # clip each gradient element to +-value; 0 = off
    grad_clip_norm: float = 0.0  # clip the global L2 norm; 0 = off
    grad_accum_steps: int = 1  # micro-batches per optimizer step
    label_smoothing: float = 0.0
    ema_decay: float = 0.0  # weight EMA per optimizer step; 0 = off, e.g. 0.999
    precise_bn_images: int = 256  # before each validation, BatchNorm statistics from this many train images; 0 = off
    warmup_epochs: float = 0.0  # linear warm-up before an epoch/step schedule (not OneCycle)
    weight_decay_norm_bias: bool = True  # false = no weight decay on norm weights and biases
    backbone_lr_scale: float = 1.0  # lr multiplier for everything but the classifier (fine-tuning)
    monitor: Monitor = Monitor.val_acc
    early_stop_patience: int = 0  # epochs without improvement before stopping; 0 = off
    log_every_n_steps: int = 20  # the only steps that synchronise host and device
    progress_every_n_steps: int = 0  # without a progress bar: a log line every N steps; 0 = about 10 per epoch
    checkpoint_every_n_steps: int = 0  # mid-epoch checkpoints; 0 = at epoch ends only
    save_top_k: int = 0  # keep the k best epochs as topk/*.pt besides best.pt; 0 = off
    resume: Optional[str] = None  # null | auto | path to a checkpoint or run folder
    overwrite: bool = False  # true: a new run may replace the run already in hydra.run.dir
    max_bad_steps: int = 0  # skip up to N steps with a non-finite loss; 0 = stop at the first
    limit_train_batches: int = 0  # batches per epoch; 0 = all (for smoke tests)
    limit_val_batches: int = 0
    sync_batchnorm: bool = False  # SyncBatchNorm under torchrun
    log_graph: bool = False  # write the model graph to TensorBoard
    progress: str = "auto"  # auto (a bar on a terminal, else log lines) | true (bar) | lines | false
    dry_run: bool = False  # build data and model, print the plan, do not train


@dataclass
class TrainConfig:
    """The composed run: one node per config group plus run-level keys."""

    model: Any = MISSING
    dataset: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output_root: str = "outputs"  # where run folders go; trainer.resume=auto searches here
    name: str = "resnet"  # a label for the run (TensorBoard hparams, sweep summaries)


# Overrides that say where or how a run is watched, not what it trains: left out of run folder names.
UNLABELLED = {"output_root", "trainer.device", "trainer.progress", "trainer.progress_every_n_steps",
               "trainer.log_every_n_steps", "trainer.resume", "trainer.num_threads", "trainer.dry_run",
               "trainer.checkpoint_every_n_steps", "dataset.root", "dataset.url", "dataset.md5", "dataset.sha256",
               "dataset.num_workers", "dataset.download"}
LABEL_MAX = 80  # characters of a run folder's label (file names stop at 255 bytes)


def run_label(name: Any, overrides: Any) -> str:
    """'_<name>,<key overrides>' for a run folder name (so TensorBoard's legend tells runs apart), or ''.

    The overrides keep their command-line order (what a sweep varies is usually typed first); those
    of paths and of how the run is watched are left out, characters unsafe in a folder name are replaced, and the
    label keeps the whole items that fit in LABEL_MAX characters.
    """
    items = []
    for item in list(overrides or ()):
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if key in UNLABELLED or key.startswith("hydra") or "/" in value or "\\" in value:
            continue
        if key == "name" or (key == "experiment" and value == str(name)):
            continue  # the name leads the label already
        items.append(f"{key}={value}")
    parts = ([] if str(name) in ("", "default") else [str(name)]) + items
    label = ",".join(parts)
    label = "".join(c if c.isalnum() or c in "=,.-+_" else "_" for c in label)
    if len(label) > LABEL_MAX:  # whole items only, as many as fit
        cut = label.rfind(",", 0, LABEL_MAX + 1)
        label = label[:cut] if cut > 0 else label[:LABEL_MAX]
    return f"_{label}" if label else ""


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore and the run_label resolver (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("run_label"):
        OmegaConf.register_new_resolver("run_label", run_label)


register_configs()
