"""End-to-end training through the real entry point and configs, on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archives import make_cifar10_archive, make_flowers_archive
from conftest import TINY, only_run_dir, read_metrics

RUN_FILES = ("last.pt", "best.pt", "class_names.json", "metrics.json", ".hydra/config.yaml")


def assert_complete_run(run: Path, class_names: list[str] | None = None) -> dict:
    """Every file a run folder promises, with the right content."""
    for name in RUN_FILES:
        assert (run / name).is_file(), f"missing {name} in {run}"
    assert list(run.glob("events.out.tfevents.*")), "no TensorBoard events"
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    for key in ("model", "optimizer", "scheduler", "epoch", "config", "class_names", "rng", "global_step"):
        assert key in ckpt, key
    names = json.loads((run / "class_names.json").read_text())
    assert names == ckpt["class_names"]
    if class_names is not None:
        assert names == class_names
    metrics = read_metrics(run)
    for key in ("best_val_acc", "best_epoch", "final_val_acc", "epochs"):
        assert key in metrics, key
    assert 0.0 <= metrics["best_val_acc"] <= 1.0
    return metrics


def test_cifar10_end_to_end_from_the_official_archive_format(cli, tmp_path):
    url, md5 = make_cifar10_archive(tmp_path / "served", n_train=64, n_test=32)
    out = tmp_path / "outputs"
    res = cli("dataset=cifar10", f"dataset.root={tmp_path / 'data'}", f"dataset.url={url}", f"dataset.md5={md5}",
              "dataset.batch_size=16", "model=resnet18", "trainer=debug", f"output_root={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run_dir(out)
    assert_complete_run(run, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                              "truck"])
    assert (tmp_path / "data" / "cifar-10-batches-py" / "data_batch_5").is_file() or \
        any((tmp_path / "data").rglob("data_batch_5"))


def test_resnet50_on_flowers_end_to_end_from_the_official_archive_format(cli, tmp_path):
    url, sha256 = make_flowers_archive(tmp_path / "served", per_class=6, size=48)
    out = tmp_path / "outputs"
    res = cli("model=resnet50", "dataset=flowers", f"dataset.root={tmp_path / 'data'}", f"dataset.url={url}",
              f"dataset.sha256={sha256}", "dataset.batch_size=4", "dataset.val_batch_size=4",
              "dataset.num_workers=0", "trainer=debug", "trainer.limit_train_batches=2",
              "trainer.limit_val_batches=1", f"output_root={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run_dir(out)
    assert_complete_run(run, ["daisy", "dandelion", "roses", "sunflowers", "tulips"])
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["model"]["fc.weight"].shape == (5, 2048)  # resnet50 head sized from the dataset
    assert ckpt["model"]["conv1.weight"].shape[-1] == 7  # 224 px picks the ImageNet stem


DEMO_EPOCHS = 4
DEMO_MIN_ACC = 0.90  # 10 classes: chance is 0.10; measured 1.00 (README quick start)


def test_demo_learns_the_embedded_dataset_well_above_chance(cli, tmp_path):
    """The README's quick start, `resnet-train experiment=demo`, reaches DEMO_MIN_ACC in DEMO_EPOCHS epochs."""
    out = tmp_path / "outputs"
    res = cli("experiment=demo", f"output_root={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run_dir(out)
    metrics = assert_complete_run(run)
    assert metrics["epochs"] == DEMO_EPOCHS
    assert metrics["best_val_acc"] >= DEMO_MIN_ACC, metrics
    history = metrics["history"]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    console = res.stdout + res.stderr
    assert str(run.resolve()) in console and "tensorboard --logdir" in console  # says where the logs are


def test_same_seed_twice_gives_identical_metrics_and_weights(train_inproc):
    args = ("model=resnet20", "trainer.epochs=2", "trainer.deterministic=true")
    _, run_a = train_inproc(*args)
    _, run_b = train_inproc(*args)
    hist_a, hist_b = read_metrics(run_a)["history"], read_metrics(run_b)["history"]
    for a, b in zip(hist_a, hist_b, strict=True):
        for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
            assert a[key] == b[key], key
    wa = torch.load(run_a / "last.pt", weights_only=True)["model"]
    wb = torch.load(run_b / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    _, run_c = train_inproc(*args, "trainer.seed=7")
    assert read_metrics(run_c)["history"][0]["train_loss"] != hist_a[0]["train_loss"]


def test_tensorboard_scalars_and_the_curves_png_are_written(train_inproc):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = train_inproc("model=resnet20", "trainer.epochs=2")
    acc = EventAccumulator(str(run))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/loss_step", "train/acc", "val/loss", "val/acc", "train/lr",
                "train/images_per_sec"):
        assert tag in tags, tags
    history = read_metrics(run)["history"]
    val_acc = [e.value for e in acc.Scalars("val/acc")]
    assert val_acc == pytest.approx([r["val_acc"] for r in history])
    # train/loss is the epoch mean (the table's train_loss), at the same steps as val/loss: one x axis.
    assert [e.value for e in acc.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in history])
    assert [e.step for e in acc.Scalars("train/loss")] == [e.step for e in acc.Scalars("val/loss")]
    # The tutorials' figure: loss and accuracy per epoch, lr per step, as a PNG and in TensorBoard.
    with Image.open(run / "curves.png") as img:
        assert img.format == "PNG" and img.width >= 900 and img.height >= 200
        assert len(img.convert("RGB").getcolors(1 << 20)) > 10  # drawn, not blank
    assert "train/curves" in acc.Tags()["images"]


def test_step_scheduler_divides_the_lr_every_step_size_epochs(train_inproc):
    _, run = train_inproc("model=resnet20", "optimizer=adam", "optimizer.lr=0.009", "scheduler=step",
                          "scheduler.step_size=1", "scheduler.gamma=0.333", "trainer.epochs=3")
    lrs = [r["lr"] for r in read_metrics(run)["history"]]
    assert lrs == pytest.approx([0.009, 0.009 * 0.333, 0.009 * 0.333**2])


def test_onecycle_spans_exactly_the_run(train_inproc):
    """total_steps comes from the loader: the last step runs at the schedule's floor."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = train_inproc("model=resnet20", "scheduler=onecycle", "scheduler.max_lr=0.1", "trainer.epochs=2",
                          "trainer.log_every_n_steps=1")
    acc = EventAccumulator(str(run))
    acc.Reload()
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert len(lrs) == 2 * (256 // 32)  # every optimizer step of both epochs
    assert max(lrs) == pytest.approx(0.1, rel=0.05)
    assert lrs[-1] == pytest.approx(0.1 / 25 / 1e4, rel=1e-3)


def test_plateau_scheduler_lowers_the_lr_once_the_monitored_metric_stalls(train_inproc):
    """ReduceLROnPlateau steps once per epoch on the monitored metric; its mode follows trainer.monitor."""
    from resnet_cli.errors import UserError

    # An absolute threshold no accuracy can clear: epoch 1 sets the best, every later epoch is a plateau.
    plateau = ("model=simple_cnn", "optimizer=adam", "optimizer.lr=0.001", "scheduler=plateau",
               "scheduler.patience=0", "scheduler.factor=0.5", "scheduler.threshold_mode=abs",
               "scheduler.threshold=10")
    _, run = train_inproc(*plateau, "trainer.epochs=3")
    lrs = [r["lr"] for r in read_metrics(run)["history"]]
    assert lrs == pytest.approx([0.001, 0.001, 0.0005])  # the lr each epoch's steps used
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["scheduler"]["mode"] == "max"  # trainer.monitor=auto (an accuracy): higher is better
    assert ck["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.00025)  # dropped again after epoch 3
    # The default monitor is `auto` (val_acc, or val_balanced_acc on imbalanced classes): both rise.
    with pytest.raises(UserError, match=r"scheduler.mode=min contradicts trainer.monitor=auto"):
        train_inproc(*plateau, "+scheduler.mode=min")
    with pytest.raises(UserError, match=r"scheduler.mode=min contradicts trainer.monitor=val_acc"):
        train_inproc(*plateau, "trainer.monitor=val_acc", "+scheduler.mode=min")


def test_backbone_lr_scale_logs_the_head_lr_as_lr_and_each_group(train_inproc):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = train_inproc("model=simple_cnn", "optimizer=adam", "optimizer.lr=0.002", "scheduler=none",
                          "trainer.backbone_lr_scale=0.1", "trainer.limit_train_batches=2")
    row = read_metrics(run)["history"][0]
    assert row["lr"] == row["lr/head"] == pytest.approx(0.002) and row["lr/backbone"] == pytest.approx(0.0002)
    acc = EventAccumulator(str(run))
    acc.Reload()
    for tag, lr in (("train/lr", 0.002), ("train/lr/head", 0.002), ("train/lr/backbone", 0.0002)):
        assert [e.value for e in acc.Scalars(tag)] == pytest.approx([lr, lr]), tag


def test_gradient_clipping_by_value_and_norm_bounds_the_update():
    """With SGD (lr 1, no momentum) the update equals the clipped gradient."""
    from resnet_cli import engine
    from resnet_cli.runtime import Runtime

    rt = Runtime(torch.device("cpu"), "fp32", False)
    for clip_value, clip_norm in ((0.1, 0.0), (0.0, 0.5)):
        model = torch.nn.Linear(4, 3)
        before = [p.detach().clone() for p in model.parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0)
        parts = engine.Parts(model, model, opt, sched, torch.amp.GradScaler("cpu", enabled=False),
                             torch.nn.CrossEntropyLoss())
        settings = engine.Settings(rt, grad_clip_value=clip_value, grad_clip_norm=clip_norm)
        x, y = torch.randn(8, 4) * 100, torch.randint(0, 3, (8,))
        list(engine.train_steps(parts, settings, [(x, y)], epoch=0))
        deltas = [(b - p.detach()) for b, p in zip(before, model.parameters())]
        if clip_value:
            assert max(d.abs().max().item() for d in deltas) <= clip_value + 1e-6
            assert max(d.abs().max().item() for d in deltas) == pytest.approx(clip_value)
        else:
            total = torch.sqrt(sum((d**2).sum() for d in deltas)).item()
            assert total == pytest.approx(clip_norm, rel=1e-4)


def test_a_run_without_a_terminal_logs_progress_lines_inside_each_epoch(cli, tmp_path):
    """stderr is a pipe here, as under SLURM, CI or nohup: no tqdm bar, but a progress line every N steps."""
    out = tmp_path / "outputs"
    res = cli(*TINY, "model=resnet20", f"output_root={out}", "trainer.progress=auto",
              "trainer.progress_every_n_steps=3")  # rounded up to 4, a multiple of log_every_n_steps=2
    assert res.returncode == 0, res.stderr[-3000:]
    log_lines = (only_run_dir(out) / "train.log").read_text().splitlines()
    lines = [line for line in log_lines if " batch " in line and " eta " in line]
    assert len(lines) == 1, log_lines[-30:]  # batch 4 of 8; the epoch's row stands for batch 8
    assert "epoch 1/1 batch 4/8 (50%)" in lines[0]
    for word in ("loss ", "acc ", "lr ", "img/s ", "eta epoch ", " run "):
        assert word in lines[0], lines[0]
    header = next(i for i, line in enumerate(log_lines) if "train_loss" in line)
    row = next(i for i, line in enumerate(log_lines) if line.rstrip().endswith("*"))  # epoch 1's row (best)
    assert header < log_lines.index(lines[0]) < row  # inside the epoch
    assert "\r" not in res.stderr and "batch/s" not in res.stderr  # no tqdm bar in a non-terminal log
