"""What a split's predictions say beyond accuracy: per-class precision, recall, F1, support; the files it got wrong.

Everything comes from the confusion matrix's non-zero cells (memory in the samples, not in the
square of the classes) and follows scikit-learn's definitions: precision = TP / predicted,
recall = TP / support, F1 = their harmonic mean (0 where both are 0); balanced accuracy = the
mean recall and macro-F1 = the mean F1, both over the classes the split holds (support > 0).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any, Sequence

import torch

from resnet_cli.data.policy import IMBALANCE_RATIO, imbalance


def cells(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """The confusion matrix's non-zero cells as (true, predicted, count) tensors."""
    flat = target.long().cpu() * num_classes + pred.long().cpu()
    found, counts = torch.unique(flat, return_counts=True)
    return found // num_classes, found % num_classes, counts


def classification(pred: torch.Tensor, target: torch.Tensor, class_names: Sequence[str]) -> dict[str, Any]:
    """accuracy, balanced_accuracy, macro_f1 and per_class {name: precision, recall, f1, support} of predictions."""
    n = len(class_names)
    true, guess, count = cells(pred, target, n)
    count = count.double()
    hit = true == guess
    tp = torch.bincount(true[hit], weights=count[hit], minlength=n)
    support = torch.bincount(true, weights=count, minlength=n)
    predicted = torch.bincount(guess, weights=count, minlength=n)
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros(n, dtype=torch.double))
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.zeros(n, dtype=torch.double))
    both = precision + recall
    f1 = torch.where(both > 0, 2 * precision * recall / both.clamp(min=1e-300), torch.zeros(n, dtype=torch.double))
    present = support > 0
    total = float(support.sum())
    return {
        "accuracy": float(tp.sum()) / max(total, 1.0),
        "balanced_accuracy": float(recall[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
    }


def confused_pairs(pred: torch.Tensor, target: torch.Tensor, class_names: Sequence[str],
                   limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent mistakes, largest first: [{true, predicted, count, share of the true class}]."""
    n = len(class_names)
    true, guess, count = cells(pred, target, n)
    support = torch.bincount(true, weights=count.double(), minlength=n)
    off = (true != guess).nonzero().flatten()
    order = off[torch.argsort(count[off], descending=True, stable=True)][:limit]
    return [{"true": class_names[int(true[i])], "predicted": class_names[int(guess[i])], "count": int(count[i]),
             "share": float(count[i]) / float(support[true[i]])} for i in order.tolist()]


def misclassified_rows(out: dict, class_names: Sequence[str], files: Sequence[str] | None) -> list[dict[str, Any]]:
    """One row per wrongly predicted sample: its file (or index), true and predicted class, confidence, loss.

    `out` is engine.evaluate's result with collect=True (per-sample pred, target, conf, sample_loss), in
    the split's order; most confident mistakes first.
    """
    if files is not None and len(files) != len(out["pred"]):
        files = None  # a val file dropped mid-run (skip mode) would shift every name after it: use indices
    wrong = (out["pred"] != out["target"]).nonzero().flatten()
    order = wrong[torch.argsort(out["conf"][wrong], descending=True, stable=True)].tolist()
    return [{"file": files[i] if files is not None else f"#{i}", "true": class_names[int(out["target"][i])],
             "predicted": class_names[int(out["pred"][i])], "confidence": round(float(out["conf"][i]), 6),
             "loss": round(float(out["sample_loss"][i]), 6)} for i in order]


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Rows of dicts as CSV text (columns: the given ones, else those of the first row); non-finite as empty."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    return buf.getvalue()


def resolve_monitor(asked: str, counts: Sequence[int]) -> tuple[str, str]:
    """trainer.monitor (auto or a metric name) for training classes of these sizes: (metric, reason)."""
    if asked != "auto":
        return asked, "set"
    ratio = imbalance(counts)
    if ratio >= IMBALANCE_RATIO:
        return "val_balanced_acc", (f"auto: classes imbalanced {ratio:.1f}:1 (>= {IMBALANCE_RATIO:g}:1), so the "
                                    f"mean per-class recall, which the common classes cannot carry alone")
    return "val_acc", f"auto: classes within {ratio:.1f}:1"


def monitored_value(monitor: str, val: dict) -> float:
    """The value of metric `monitor` in an evaluation result (engine.evaluate plus `classes`)."""
    if monitor == "val_loss":
        return val["loss"]
    if monitor == "val_acc":
        return val["acc"]
    return val["classes"]["balanced_accuracy" if monitor == "val_balanced_acc" else "macro_f1"]
