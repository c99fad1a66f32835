"""Per-class precision, recall, F1 and support, macro-F1 and balanced accuracy, against the confusion matrix by hand."""

from __future__ import annotations

import pytest
import torch

from resnet_cli import metrics


def by_hand(cm: list[list[int]]) -> dict:
    """The textbook definitions, one class at a time, from a dense confusion matrix (rows true)."""
    n = len(cm)
    out = {}
    for c in range(n):
        tp = cm[c][c]
        support = sum(cm[c])
        predicted = sum(cm[r][c] for r in range(n))
        p = tp / predicted if predicted else 0.0
        r = tp / support if support else 0.0
        f = 2 * p * r / (p + r) if p + r else 0.0
        out[c] = (p, r, f, support)
    present = [c for c in range(n) if out[c][3]]
    return {"per_class": out, "balanced": sum(out[c][1] for c in present) / len(present),
            "macro_f1": sum(out[c][2] for c in present) / len(present),
            "accuracy": sum(cm[c][c] for c in range(n)) / sum(map(sum, cm))}


@pytest.mark.parametrize("seed", range(5))
def test_per_class_metrics_equal_a_hand_computation_from_the_confusion_matrix(seed):
    g = torch.Generator().manual_seed(seed)
    n = 6
    # Imbalanced truth, a biased classifier, and a class (5) that is predicted but never true.
    target = torch.multinomial(torch.tensor([40.0, 20, 10, 5, 2, 0]), 300, replacement=True, generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.6, target, torch.randint(0, n, (300,), generator=g))
    cm = [[0] * n for _ in range(n)]
    for t, p in zip(target.tolist(), pred.tolist()):
        cm[t][p] += 1
    names = [f"c{i}" for i in range(n)]
    got = metrics.classification(pred, target, names)
    want = by_hand(cm)
    for c in range(n):
        row = got["per_class"][names[c]]
        assert (row["precision"], row["recall"], row["f1"]) == pytest.approx(want["per_class"][c][:3], abs=1e-12)
        assert row["support"] == want["per_class"][c][3]
    assert got["balanced_accuracy"] == pytest.approx(want["balanced"], abs=1e-12)
    assert got["macro_f1"] == pytest.approx(want["macro_f1"], abs=1e-12)
    assert got["accuracy"] == pytest.approx(want["accuracy"], abs=1e-12)
    assert got["per_class"]["c5"]["support"] == 0  # not in the split: left out of the macro means


def test_a_model_that_predicts_the_common_class_is_exposed_by_balanced_accuracy():
    target = torch.tensor([0] * 90 + [1] * 10)
    pred = torch.zeros(100, dtype=torch.long)
    got = metrics.classification(pred, target, ["common", "rare"])
    assert got["accuracy"] == pytest.approx(0.9)
    assert got["balanced_accuracy"] == pytest.approx(0.5)
    assert got["macro_f1"] == pytest.approx((2 * 0.9 / 1.9) / 2)


def test_confused_pairs_and_misclassified_rows_list_exactly_the_mistakes():
    target = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 1, 1, 1])
    names = ["ant", "bee", "cat"]
    pairs = metrics.confused_pairs(pred, target, names)
    assert pairs[0] == {"true": "cat", "predicted": "bee", "count": 3, "share": 0.75}
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs[1:]] == [("ant", "bee", 2), ("bee", "ant", 1)]
    conf = torch.linspace(0.1, 0.9, 9)
    out = {"pred": pred, "target": target, "conf": conf, "sample_loss": torch.arange(9.0)}
    files = [f"f{i}.png" for i in range(9)]
    rows = metrics.misclassified_rows(out, names, files)
    assert [r["file"] for r in rows] == ["f8.png", "f7.png", "f6.png", "f4.png", "f2.png", "f1.png"]
    assert rows[0] == {"file": "f8.png", "true": "cat", "predicted": "bee", "confidence": 0.9, "loss": 8.0}
    text = metrics.csv_text(rows)
    assert text.splitlines()[0] == "file,true,predicted,confidence,loss" and len(text.splitlines()) == 7
