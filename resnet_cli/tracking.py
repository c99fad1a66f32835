"""What a run records: TensorBoard events, metrics.json, class names, the epoch table."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from resnet_cli.fileio import write_json

log = logging.getLogger(__name__)

# (name, width, format): one aligned row per epoch, nanoGPT/airbench style.
_COLUMNS = (("epoch", 5, "d"), ("train_loss", 10, ".4f"), ("train_acc", 9, ".4f"), ("val_loss", 8, ".4f"),
            ("val_acc", 7, ".4f"), ("lr", 9, ".2e"), ("img/s", 8, ".0f"), ("time_s", 6, ".1f"))


def table_header() -> str:
    """The header of the per-epoch console table."""
    return "  ".join(name.rjust(width) for name, width, _ in _COLUMNS)


def table_row(row: dict) -> str:
    """One aligned row of the per-epoch console table."""
    return "  ".join(format(row[name], f">{width}{fmt}") if name in row else "-".rjust(width)
                     for name, width, fmt in _COLUMNS)


def _hparam_value(value: Any) -> Any:
    """An override's text as the number or bool it means, so the HParams table sorts and filters it."""
    if isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    try:
        return float(text)
    except ValueError:
        return text


class Tracker:
    """TensorBoard writer and run-folder files; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, purge_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote past the checkpoint we resume from,
            # so the step axis continues without duplicate points.
            self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Log scalars at a global step."""
        if self.writer is None:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def image(self, tag: str, image, step: int) -> None:
        """Log one CHW float image in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def text(self, tag: str, text: str, step: int) -> None:
        """Log a markdown text."""
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def graph(self, model, example) -> None:
        """Log the model graph (traced on one example batch)."""
        if self.writer is not None:
            self.writer.add_graph(model, example)

    def hparams(self, hparams: dict[str, Any], metric_tags: Sequence[str], trial_id: str,
                differs: Sequence[str] = ()) -> None:
        """Log the run's settings to the HParams tab, its metrics being the last values of `metric_tags`.

        Written into the run's own folder, so `tensorboard --logdir <sweep folder>`
        shows every job of a sweep as one row of the same table. The metrics are
        per-epoch scalars the run logs anyway (TensorBoard shows their last value), so
        no single-point charts appear. `trial_id` names the row. The experiment record
        lists the keys without value domains: TensorBoard reads it from one run only,
        and SummaryWriter.add_hparams would pin each string key to that run's single
        value, hiding the other jobs' rows behind its filter. Keys in `differs` (what
        the user set, so what a sweep varies) are marked so: TensorBoard lists them
        first and shows the first five columns without a click.
        """
        if self.writer is None:
            return
        from tensorboard.compat.proto import summary_pb2
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams import summary_v2 as hp

        clean = {k: _hparam_value(v) for k, v in hparams.items()}
        order = [k for k in differs if k in clean] + [k for k in clean if k not in differs]
        experiment = api_pb2.Experiment(
            hparam_infos=[api_pb2.HParamInfo(name=k, differs=k in differs) for k in order],
            metric_infos=[api_pb2.MetricInfo(name=api_pb2.MetricName(tag=t)) for t in metric_tags])
        fw = self.writer.file_writer

        def plugin_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
            return summary_pb2.Summary(value=[summary_pb2.Summary.Value(
                tag=tag, metadata=metadata.create_summary_metadata(data), tensor=metadata.NULL_TENSOR)])

        fw.add_summary(plugin_summary(metadata.EXPERIMENT_TAG,
                                      plugin_data_pb2.HParamsPluginData(experiment=experiment)))
        fw.add_summary(hp.hparams_pb(clean, trial_id=trial_id))
        fw.add_summary(plugin_summary(metadata.SESSION_END_INFO_TAG, plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS))))

    def layout(self, charts: dict[str, list[str]], category: str = "train vs val") -> None:
        """Custom Scalars layout: one multiline chart per entry, overlaying the tags its regexes match."""
        if self.writer is None:
            return
        self.writer.add_custom_scalars({category: {title: ["Multiline", regexes]
                                                   for title, regexes in charts.items()}})

    def read_scalars(self, tag: str) -> list[tuple[int, float]]:
        """(step, value) of `tag` in the events already in the run folder (e.g. before a resume)."""
        if not self.enabled:
            return []
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(self.run_dir), size_guidance={"scalars": 0, "images": 1, "tensors": 1})
        acc.Reload()
        if tag not in acc.Tags().get("scalars", []):
            return []
        return [(e.step, e.value) for e in acc.Scalars(tag)]

    def write_json(self, name: str, data: Any) -> None:
        """Write a JSON file into the run folder (rank 0 only)."""
        if self.enabled:
            write_json(self.run_dir / name, data)

    def flush(self) -> None:
        """Flush events to disk."""
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        """Flush and close the writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# Custom Scalars charts (tag regexes): what the tutorials plot together.
CHARTS = {"loss: train vs val": ["^train/loss$", "^val/loss$", "^val_ema/loss$"],
          "acc: train vs val": ["^train/acc$", "^val/acc$", "^val_ema/acc$"],
          "lr per step": ["^train/lr$"]}
# HParams metrics: the last values of per-epoch scalars (no single-point hparam/* charts).
HPARAM_METRICS = ("val/best_acc", "val/acc", "val/loss", "train/loss", "train/acc")


def write_metrics(tracker: Tracker, history: list[dict], best_epoch: int, *, finished: bool, seconds: float,
                  monitor: str, detail: dict | None = None, test: dict | None = None,
                  tta: dict | None = None) -> None:
    """metrics.json: the best and final values, whether the run finished, and every epoch's row.

    `detail` is the best epoch's per-class metrics (metrics.classification plus confused_pairs); `test`
    the held-out test split's, measured once with the weights the run kept; `tta` what flip TTA did on val.
    """
    row = history[-1]
    best_row = next((r for r in history if r["epoch"] == best_epoch), row)
    detail = detail or {}
    tracker.write_json("metrics.json", {
        "best_val_acc": max(r["val_acc"] for r in history),
        "best_epoch": best_epoch,
        "monitor": monitor,
        "best_val_loss": min(r["val_loss"] for r in history),
        "best_monitored_row": best_row,
        **({"best_val_balanced_acc": detail["balanced_accuracy"], "best_val_macro_f1": detail["macro_f1"],
            "best_val_per_class": detail["per_class"], "best_val_confused_pairs": detail["confused_pairs"]}
           if detail else {}),
        **({f"test_{k}": v for k, v in test.items()} if test else {}),
        **({"tta": tta} if tta else {}),
        "final_val_acc": row["val_acc"],
        "final_val_loss": row["val_loss"],
        "epochs": len(history),
        "finished": finished,
        "seconds_this_session": round(seconds, 3),
        "history": history,
    })


def tensorboard_logdir(run_dir: Path, output_root: str) -> Path:
    """The folder to point TensorBoard at: output_root when it holds the run, else the run folder's parent."""
    root = Path(str(output_root)).resolve()
    run = Path(run_dir).resolve()
    return Path(str(output_root)) if run.is_relative_to(root) else run.parent


def run_settings(cfg: Any, *, image_size: int, precision: str) -> dict[str, Any]:
    """The settings that define a run (HParams columns): groups, lr, peak, batch, epochs, augmentation, size, seed."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    try:
        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not under Hydra (programmatic use)
        choices = {}

    def target(node) -> str:
        return str(node.get("_target_", "")).rsplit(".", 1)[-1].lower()

    hp: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model.get("name", choices.get("model", "")),
        "dataset": choices.get("dataset") or target(cfg.dataset),
        "optimizer": choices.get("optimizer") or target(cfg.optimizer),
        "optimizer.lr": cfg.optimizer.get("lr"),
        "optimizer.weight_decay": cfg.optimizer.get("weight_decay"),
        "scheduler": choices.get("scheduler") or target(cfg.scheduler),
        "scheduler.max_lr": cfg.scheduler.get("max_lr"),
        "dataset.batch_size": cfg.dataset.get("batch_size"),
        "trainer.epochs": cfg.trainer.epochs,
        "dataset.augment": cfg.dataset.get("augment"),
        "image_size": image_size,  # resolved: dataset.image_size may say auto
        "precision": precision,  # resolved: trainer.precision may say auto
        "trainer.seed": cfg.trainer.seed,
    }
    return {k: v for k, v in hp.items() if v is not None and not OmegaConf.is_config(v)}


def final_hparams(cfg: Any, tracker: Tracker, run_dir: Path, *, image_size: int, precision: str) -> None:
    """The run's HParams row: its settings, every key the user set (as typed), the per-epoch metrics."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from resnet_cli.callbacks import read_swept_keys
    from resnet_cli.config import UNLABELLED

    overrides: list[str] = []
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (programmatic use)
        pass
    hp = run_settings(cfg, image_size=image_size, precision=precision)
    typed = []
    for item in overrides:  # every key the user set, as typed
        key, _, value = item.partition("=")
        typed.append(key.lstrip("+~"))
        hp[typed[-1]] = value
    # The row's name is the run folder (what TensorBoard's legend shows; its own name first, as the
    # table cuts long names), never a hash of the values.
    root, here = Path(str(cfg.output_root)).resolve(), Path(run_dir).resolve()
    parent = here.parent.relative_to(root) if here.is_relative_to(root) else None
    trial = f"{here.name} ({parent})" if parent is not None and str(parent) != "." else here.name
    # Marked as differing, TensorBoard shows these columns first: in a sweep the keys it varies, else what
    # the user set (paths and how the run is watched aside).
    swept = None
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            swept = read_swept_keys(Path(str(HydraConfig.get().sweep.dir)))
    except ValueError:  # not under Hydra
        pass
    differs = swept if swept else [k for k in typed if k not in UNLABELLED]
    tracker.hparams(hp, HPARAM_METRICS, trial_id=trial, differs=differs)


def progress_mode(setting: str) -> str | None:
    """'bar' (tqdm), 'lines' (log lines, where tqdm would be hidden) or None, from trainer.progress."""
    setting = str(setting).lower()
    if setting == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    if setting == "lines":
        return "lines"
    return "bar" if setting in ("true", "1", "yes") else None


def progress_bar(enabled: bool, total: int, start: int, epoch: int, epochs: int):
    """A tqdm bar over an epoch's batches (None when not enabled); it disappears when the epoch ends."""
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                dynamic_ncols=True)


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_every(setting: int, log_every: int, steps_per_epoch: int) -> int:
    """Optimizer steps between progress lines: a multiple of log_every (those steps sync anyway).

    0 asks for about ten lines per epoch.
    """
    every = setting if setting > 0 else max(1, steps_per_epoch // 10)
    return max(log_every, -(-every // log_every) * log_every)


def progress_line(epoch: int, epochs: int, done: int, total: int, *, loss: float, acc: float, lr: float,
                  images_per_sec: float, epoch_elapsed: float, epoch_done: int, steps_left_after: int) -> str:
    """One progress line for logs without a progress bar: position, loss, accuracy, lr, speed, ETA.

    `epoch_done` batches took `epoch_elapsed` seconds this epoch; the ETA extrapolates that pace to
    the rest of the epoch and to the `steps_left_after` batches of later epochs (validation excluded).
    """
    per_batch = epoch_elapsed / max(epoch_done, 1)
    return (f"epoch {epoch}/{epochs} batch {done}/{total} ({done / max(total, 1):.0%})  loss {loss:.4f}  "
            f"acc {acc:.4f}  lr {lr:.2e}  img/s {images_per_sec:.0f}  eta epoch {_clock(per_batch * (total - done))}"
            f" run {_clock(per_batch * (total - done + steps_left_after))}")
