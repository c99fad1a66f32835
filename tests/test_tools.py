"""resnet-predict, resnet-eval, resnet-export and resnet-lr-find on a model trained once in this module."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, fit_inproc, read_metrics

TRAIN = [*TINY, "model=resnet20", "optimizer=adam", "scheduler=onecycle", "scheduler.max_lr=0.01",
         "dataset.num_train=1000", "dataset.num_val=200", "dataset.batch_size=50", "dataset.val_batch_size=100",
         "trainer.epochs=3", "trainer.log_every_n_steps=10"]


def script(name: str) -> list[str]:
    """An installed console script of this package (or its module, from a plain source tree)."""
    path = Path(sys.executable).parent / name
    module = {"resnet-predict": "predict", "resnet-eval": "evaluate", "resnet-export": "export",
              "resnet-lr-find": "lr_find"}[name]
    return [str(path)] if path.exists() else [sys.executable, "-m", f"resnet_cli.{module}"]


def run_script(name: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*script(name), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A resnet20 trained on 16 px shapes, once for the module: its run folder."""
    root = tmp_path_factory.mktemp("tools")
    run_dir = root / "run"
    fit_inproc(run_dir, [*TRAIN, f"output_root={root / 'outputs'}"])
    return run_dir


@pytest.fixture(scope="module")
def val_pngs(trained):
    """The first 20 validation images of the embedded dataset as PNG files, with their true class names."""
    from torchvision.transforms.v2.functional import to_pil_image

    from resnet_cli.data.synthetic import CLASS_NAMES, generate_shapes

    folder = trained.parent / "pngs"
    folder.mkdir()
    split = generate_shapes(200, 16, 1)  # the val split's key, as synthetic.shapes draws it
    truth = {}
    for i in range(20):
        path = folder / f"img{i:02d}.png"
        to_pil_image(split.images[i]).save(path)
        truth[str(path)] = CLASS_NAMES[int(split.labels[i])]
    return folder, truth


def test_predict_names_the_right_class_for_most_images(trained, val_pngs, tmp_path):
    folder, truth = val_pngs
    out = tmp_path / "preds.json"
    res = run_script("resnet-predict", str(trained), str(folder), "--topk", "3", "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    preds = json.loads(out.read_text())
    assert [p["file"] for p in preds] == sorted(truth)
    assert all(len(p["top"]) == 3 and p["top"][0]["prob"] >= p["top"][1]["prob"] for p in preds)
    right = sum(p["top"][0]["class"] == truth[p["file"]] for p in preds)
    acc = read_metrics(trained)["best_val_acc"]
    assert right / len(preds) > 0.5, (right, acc)
    first = preds[0]
    assert first["file"] in res.stdout and first["top"][0]["class"] in res.stdout  # the terminal table


def test_predict_annotate_draws_each_image_with_its_classes(trained, val_pngs, tmp_path):
    from PIL import Image

    from resnet_cli.predict import annotate

    folder, truth = val_pngs
    names = json.loads((trained / "class_names.json").read_text())
    indices = tmp_path / "class_indices.json"  # the tutorials' format, here with upper-case names
    indices.write_text(json.dumps({str(i): n.upper() for i, n in enumerate(names)}))
    out, annotated = tmp_path / "preds.json", tmp_path / "annotated"
    res = run_script("resnet-predict", str(trained), str(folder), "--topk", "3", "--class-names", str(indices),
                     "--annotate", str(annotated), "--json", str(out), cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    preds = json.loads(out.read_text())
    right = sum(p["top"][0]["class"] == truth[p["file"]].upper() for p in preds)
    assert right / len(preds) > 0.5  # the names came from class_indices.json, in its order
    assert (annotated / "grid.png").is_file()
    for p in preds:
        assert Path(p["annotated"]) == annotated / (Path(p["file"]).stem + ".png") and Path(p["annotated"]).is_file()
    first = preds[0]
    with Image.open(first["file"]) as src, Image.open(first["annotated"]) as drawn:
        src, drawn = src.convert("RGB"), drawn.convert("RGB")
        # The photo (16 px, scaled 20x) on top, unchanged; the classes written under it.
        photo = src.resize((320, 320), Image.Resampling.NEAREST)
        x0 = (drawn.width - 320) // 2
        assert drawn.crop((x0, 0, x0 + 320, 320)).tobytes() == photo.tobytes()
        assert drawn.height > 320 + 3 * 18 and drawn.size != src.size
        caption = drawn.crop((0, 320, drawn.width, drawn.height))
        assert min(caption.convert("L").tobytes()) < 80  # dark text on white
    # The top-1 name is what is drawn: another name gives other caption pixels and the same photo.
    other = annotate(first["file"], [{**first["top"][0], "class": "SOMETHING ELSE"}, *first["top"][1:]])
    again = annotate(first["file"], first["top"])
    assert again.tobytes() == Image.open(first["annotated"]).convert("RGB").tobytes()
    assert other.crop((0, 320, other.width, 350)).tobytes() != again.crop((0, 320, again.width, 350)).tobytes()
    assert other.crop((0, 0, other.width, 320)).tobytes() == again.crop((0, 0, again.width, 320)).tobytes()


def test_class_names_files_of_both_formats_are_read(tmp_path):
    from resnet_cli.errors import UserError
    from resnet_cli.predict import read_class_names

    (tmp_path / "a.json").write_text('["daisy", "dandelion"]')
    (tmp_path / "b.json").write_text('{"1": "dandelion", "0": "daisy"}')
    (tmp_path / "c.json").write_text('{"0": "daisy", "2": "roses"}')
    assert read_class_names(tmp_path / "a.json") == read_class_names(tmp_path / "b.json") == ["daisy", "dandelion"]
    with pytest.raises(UserError, match="indices 0..n-1"):
        read_class_names(tmp_path / "c.json")


def test_predict_csv_matches_json(trained, val_pngs, tmp_path):
    from resnet_cli.inference import load_trained
    from resnet_cli.predict import find_images, predict, to_csv

    folder, _ = val_pngs
    results = predict(load_trained(trained), find_images([str(folder)])[:4], topk=2)
    rows = to_csv(results).strip().splitlines()
    assert rows[0] == "file,rank,class,index,prob" and len(rows) == 1 + 4 * 2
    assert rows[1].split(",")[2] == results[0]["top"][0]["class"]


def test_predict_bad_path_is_one_line_and_nonzero(trained, tmp_path):
    res = run_script("resnet-predict", str(trained), str(tmp_path / "missing.png"), cwd=tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing.png" in lines[0], res.stderr
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    res = run_script("resnet-predict", str(trained), str(bad), cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "broken.png" in res.stderr


def test_eval_reproduces_the_accuracy_in_metrics_json(trained, tmp_path):
    out = tmp_path / "eval.json"
    res = run_script("resnet-eval", str(trained / "best.pt"), "--json", str(out), "--tta", "off", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    metrics = read_metrics(trained)
    assert report["accuracy"] == pytest.approx(metrics["best_val_acc"], abs=1e-9)
    # By default (--tta auto) it measures what the tools run: with flip TTA where training found it helped.
    auto = tmp_path / "auto.json"
    res_auto = run_script("resnet-eval", str(trained / "best.pt"), "--json", str(auto), "--no-tensorboard",
                          cwd=tmp_path)
    assert res_auto.returncode == 0, res_auto.stderr[-2000:]
    tta = metrics["tta"]
    want = tta["val_acc_flip"] if tta["flip"] else metrics["best_val_acc"]
    assert json.loads(auto.read_text())["accuracy"] == pytest.approx(want, abs=1e-9)
    assert report["samples"] == 200
    cm = torch.tensor(report["confusion_matrix"])
    assert int(cm.trace()) == round(report["accuracy"] * 200)
    assert len(report["per_class_accuracy"]) == 10
    assert "confusion matrix" in res.stdout and f"{report['accuracy']:.4f}" in res.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(trained / "eval_val"), size_guidance={"images": 0})
    acc.Reload()
    assert "eval_val/confusion_matrix" in acc.Tags()["images"]
    assert acc.Scalars("eval_val/acc")[0].value == pytest.approx(report["accuracy"])


def test_eval_bad_override_names_the_key(trained, tmp_path):
    res = run_script("resnet-eval", str(trained), "dataset.no_such_key=1", cwd=tmp_path)
    assert res.returncode == 2 and "dataset.no_such_key" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def trained_ema(tmp_path_factory):
    """A run with trainer.ema_decay: 2 short epochs, so the average and the raw weights still differ."""
    root = tmp_path_factory.mktemp("tools_ema")
    run_dir = root / "run"
    fit_inproc(run_dir, [*TINY, "model=resnet20", "trainer.epochs=2", "trainer.ema_decay=0.9",
                         f"output_root={root / 'outputs'}"])
    return run_dir


def test_tools_use_the_ema_weights_training_validated(trained_ema, val_pngs, tmp_path, capsys):
    from safetensors.torch import load_file

    from resnet_cli import evaluate, export, inference, predict

    last = trained_ema / "last.pt"
    ck = torch.load(last, map_location="cpu", weights_only=True)
    ema = {k.removeprefix("module."): v for k, v in ck["ema"].items() if k.startswith("module.")}
    assert any(not torch.equal(ema[k], v) for k, v in ck["model"].items())  # two different sets of weights
    logged = read_metrics(trained_ema)["history"][-1]

    # resnet-eval (the console script) measures the EMA weights: the accuracy training logged for them.
    out = tmp_path / "eval.json"
    res = run_script("resnet-eval", str(last), "--json", str(out), "--no-tensorboard", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["weights"] == "ema" and report["accuracy"] == pytest.approx(logged["ema_val_acc"], abs=1e-9)
    assert f"weights: ema (trainer.ema_decay=0.9; validated at epoch 2: acc {logged['ema_val_acc']:.4f})" in res.stdout
    raw, _ = evaluate.evaluate_checkpoint(last, weights="raw")
    assert raw["weights"] == "raw" and raw["accuracy"] == pytest.approx(logged["val_acc"], abs=1e-9)
    if logged["val_acc"] != logged["ema_val_acc"]:
        assert raw["accuracy"] != report["accuracy"]

    # resnet-predict: the probabilities of the EMA model, not of the raw one.
    folder, _ = val_pngs
    files = predict.find_images([str(folder)])[:8]
    preds = tmp_path / "preds.json"
    predict.main([str(last), *map(str, files), "--topk", "10", "--json", str(preds), "--tta", "off"])
    assert "resnet-predict: weights: ema (" in capsys.readouterr().err
    got = json.loads(preds.read_text())

    def probs(state: dict) -> torch.Tensor:
        model = inference.rebuild({**ck, "model": state}, last)[0].eval()
        from resnet_cli.data.transforms import build_eval_transform

        transform = build_eval_transform(**ck["eval_spec"])
        with torch.inference_mode():
            return model(torch.stack([predict._read(f, transform) for f in files])).softmax(1)

    want, other = probs(ema), probs(ck["model"])
    printed = torch.tensor([[t["prob"] for t in sorted(r["top"], key=lambda t: t["index"])] for r in got])
    torch.testing.assert_close(printed, want, rtol=0, atol=1e-5)
    assert not torch.allclose(printed, other, atol=1e-5)

    # resnet-export: the EMA weights in the file, and the exported model computes what the EMA model does.
    lines: list[str] = []
    results = export.export(last, tmp_path / "exported", ["safetensors", "torchscript"], log=lines.append)
    assert lines[0].startswith("weights: ema (")
    saved = load_file(results["safetensors"]["path"])
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in ema)
    assert results["torchscript"]["verified"]


def test_weights_ema_without_an_ema_is_one_line(trained, tmp_path):
    res = run_script("resnet-eval", str(trained), "--weights", "ema", "--no-tensorboard", cwd=tmp_path)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--weights ema" in res.stderr and "no EMA weights" in res.stderr


def test_lr_find_writes_the_curve_and_suggests_overrides(tmp_path):
    res = run_script("resnet-lr-find", "--steps", "30", "--start-lr", "1e-4", "--end-lr", "10", *TINY,
                     "model=resnet20", f"output_root={tmp_path / 'out'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "optimizer.lr=" in res.stdout and "scheduler.max_lr=" in res.stdout
    found = list((tmp_path / "out" / "lr_find").rglob("lr_find.json"))
    assert len(found) == 1
    data = json.loads(found[0].read_text())
    lrs = data["lrs"]
    assert lrs[0] == pytest.approx(1e-4) and 5 <= len(lrs) <= 30
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert ratios == pytest.approx([(10 / 1e-4) ** (1 / 29)] * len(ratios))  # exponential steps
    assert lrs[0] <= data["lr"] <= lrs[-1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(found[0].parent), size_guidance={"images": 0})
    acc.Reload()
    assert "lr_find/loss_vs_lr" in acc.Tags()["images"] and "lr_find/loss" in acc.Tags()["scalars"]
