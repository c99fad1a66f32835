"""What a run records: TensorBoard events, metrics.json, class names, the epoch table."""

from __future__ import annotations

import logging
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
