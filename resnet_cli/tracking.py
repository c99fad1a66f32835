"""What a run records: TensorBoard events, metrics.json, class names, the epoch table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

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

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        """Log the run's hyperparameters and final metrics to the HParams tab.

        Written into the run's own folder, so `tensorboard --logdir <sweep folder>`
        shows every job of a sweep as one row of the same table. The experiment
        record lists the keys without value domains: TensorBoard reads it from one
        run only, and SummaryWriter.add_hparams would pin each string key to that
        run's single value, hiding the other jobs' rows behind its filter.
        """
        if self.writer is None:
            return
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from tensorboard.plugins.hparams import summary_v2 as hp
        from tensorboard.compat.proto import summary_pb2

        clean = {k: _hparam_value(v) for k, v in hparams.items()}
        tags = {f"hparam/{k}": float(v) for k, v in metrics.items()}
        for tag, value in tags.items():
            self.writer.add_scalar(tag, value, 0)
        fw = self.writer.file_writer
        fw.add_summary(hp.hparams_config_pb([hp.HParam(k) for k in clean], [hp.Metric(t) for t in tags]))
        fw.add_summary(hp.hparams_pb(clean))
        end = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(status=api_pb2.STATUS_SUCCESS))
        fw.add_summary(summary_pb2.Summary(value=[summary_pb2.Summary.Value(
            tag=metadata.SESSION_END_INFO_TAG, metadata=metadata.create_summary_metadata(end),
            tensor=metadata.NULL_TENSOR)]))

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
