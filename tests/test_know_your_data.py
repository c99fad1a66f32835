"""What a run tells about the data and its mistakes: a held-out test split, per-class metrics, the wrong files.

On folders built here, through the real entry point: train/ val/ test/ evaluates test/ once with the
weights the run kept (equal to resnet-eval --split test on best.pt); misclassified.csv lists exactly
the val images those weights get wrong; results.csv has one row per epoch matching metrics.json;
flip test-time augmentation is recorded in best.pt and used by the tools only where it helped.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import fit_inproc, read_metrics

SMALL = ["trainer.device=cpu", "trainer.progress=false", "trainer.log_every_n_steps=2", "model=resnet20"]


def _three_way(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    """train/ val/ test/ of noisy colour squares, one colour per class (learnable, not perfectly)."""
    import random

    from PIL import Image

    rng = random.Random(seed)
    colours = {"cat": (200, 60, 60), "dog": (60, 200, 60), "fox": (60, 60, 200)}
    for split, n in per_class.items():
        for name, colour in colours.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = [tuple(max(0, min(255, c + rng.randrange(-120, 120))) for c in colour) for _ in range(256)]
                img = Image.new("RGB", (16, 16))
                img.putdata(pixels)
                img.save(folder / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def three_way_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("know")
    data = _three_way(root / "data", {"train": 40, "val": 12, "test": 12})
    run = root / "run"
    fit_inproc(run, [*SMALL, "dataset=imagefolder", f"dataset.root={data}", "trainer.epochs=3",
                     f"output_root={root / 'outputs'}"])
    return run


def test_the_test_split_is_evaluated_once_with_the_kept_weights_as_resnet_eval_measures_it(three_way_run):
    from resnet_cli.evaluate import evaluate_checkpoint

    m = read_metrics(three_way_run)
    assert {"test_acc", "test_loss", "test_balanced_acc", "test_macro_f1", "test_per_class"} <= set(m)
    report, _ = evaluate_checkpoint(three_way_run / "best.pt", split="test")
    assert report["samples"] == 36
    assert report["accuracy"] == pytest.approx(m["test_acc"], abs=1e-9)
    assert report["loss"] == pytest.approx(m["test_loss"], abs=1e-6)
    log = (three_way_run / "train.log").read_text() if (three_way_run / "train.log").exists() else ""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(three_way_run))
    acc.Reload()
    assert [e.value for e in acc.Scalars("test/acc")] == [pytest.approx(m["test_acc"])]  # once, at the end
    assert log.count("test: acc") <= 1


def test_misclassified_csv_lists_exactly_the_val_images_the_kept_weights_get_wrong(three_way_run):
    from resnet_cli.inference import load_trained
    from resnet_cli.predict import find_images, predict

    data = Path(json.loads(json.dumps(torch.load(three_way_run / "best.pt", weights_only=True)["config"]["dataset"]
                                      ["root"])))
    trained = load_trained(three_way_run / "best.pt", tta="off")
    files = find_images([str(data / "val")])
    wrong = {str(Path(r["file"]).relative_to(data)) for r in predict(trained, files, topk=1)
             if r["top"][0]["class"] != Path(r["file"]).parent.name}
    with open(three_way_run / "misclassified.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["file"] for r in rows} == wrong
    assert all(r["true"] != r["predicted"] and 0 < float(r["confidence"]) <= 1 for r in rows)
    m = read_metrics(three_way_run)
    assert len(rows) == round((1 - m["best_monitored_row"]["val_acc"]) * 36)


def test_results_csv_has_one_row_per_epoch_matching_metrics_json(three_way_run):
    with open(three_way_run / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    history = read_metrics(three_way_run)["history"]
    assert len(rows) == len(history) == 3
    for row, want in zip(rows, history):
        assert set(row) == set(want)
        for key, value in want.items():
            assert float(row[key]) == pytest.approx(value, rel=1e-12), key


def test_best_epoch_per_class_metrics_are_in_metrics_json(three_way_run):
    m = read_metrics(three_way_run)
    per = m["best_val_per_class"]
    assert sorted(per) == ["cat", "dog", "fox"] and all(per[c]["support"] == 12 for c in per)
    recalls = [per[c]["recall"] for c in per]
    assert m["best_val_balanced_acc"] == pytest.approx(sum(recalls) / 3)
    assert m["best_val_macro_f1"] == pytest.approx(sum(per[c]["f1"] for c in per) / 3)


def test_flip_tta_is_measured_into_best_pt_and_used_by_the_tools_only_where_it_helped(three_way_run, tmp_path):
    from resnet_cli import inference
    from resnet_cli.errors import UserError

    ck = torch.load(three_way_run / "best.pt", weights_only=True)
    tta = ck["tta"]
    assert tta["mirror"] is True and tta["flip"] == (tta["val_acc_flip"] > tta["val_acc"])
    assert read_metrics(three_way_run)["tta"] == tta

    # A checkpoint that says flip helped: the tools average each image with its mirror.
    helped = tmp_path / "helped.pt"
    torch.save({**ck, "tta": {**tta, "flip": True}}, helped)
    plain, averaged = inference.load_trained(helped, tta="off"), inference.load_trained(helped)
    assert averaged.tta and "tta: flip" in averaged.line()
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        want = (plain.model(x) + plain.model(x.flip(3))) / 2
        torch.testing.assert_close(averaged.model(x), want)
    # Where mirroring changes the class (digits), TTA is never used, and asking for it is refused.
    mirrored = tmp_path / "digits.pt"
    torch.save({**ck, "tta": {"mirror": False, "flip": False}}, mirrored)
    assert not inference.load_trained(mirrored).tta
    with pytest.raises(UserError, match="--tta on"):
        inference.load_trained(mirrored, tta="on")


def test_an_exported_graph_carries_the_flip_average(three_way_run, tmp_path):
    from resnet_cli import export, inference

    ck = torch.load(three_way_run / "best.pt", weights_only=True)
    helped = tmp_path / "run" / "best.pt"
    helped.parent.mkdir()
    torch.save({**ck, "tta": {**ck["tta"], "flip": True}}, helped)
    results = export.export(helped, tmp_path / "out", ["torchscript", "safetensors"], log=lambda line: None)
    assert results["torchscript"]["verified"] and results["safetensors"]["verified"]
    scripted = torch.jit.load(results["torchscript"]["path"])
    plain = inference.load_trained(helped, tta="off").model
    x = torch.randn(2, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(scripted(x), (plain(x) + plain(x.flip(3))) / 2, atol=1e-5, rtol=0)
