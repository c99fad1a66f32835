"""What a run leaves in TensorBoard, read back with TensorBoard's own event reader."""

from __future__ import annotations

import re

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from conftest import TINY, fit_inproc, read_metrics
from resnet_cli.runtime import resolve_precision

OVERRIDES = ["model=resnet20", "optimizer=adam", "optimizer.lr=0.003", "trainer.epochs=2",
             "dataset.num_train=128", "dataset.num_val=64"]


def _typed(text: str):
    try:
        return float(text)
    except ValueError:
        return text


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny 2-epoch run, trained once for the whole module; returns (run_dir, accumulator)."""
    root = tmp_path_factory.mktemp("tb")
    run_dir = root / "run"
    fit_inproc(run_dir, [*TINY, f"output_root={root / 'outputs'}", *OVERRIDES])
    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return run_dir, acc


STEPS_PER_EPOCH = 128 // 32


def session_hparams(acc: EventAccumulator) -> tuple[str, dict]:
    """The HParams row a run wrote: (trial name, {key: value})."""
    content = acc.PluginTagToContent("hparams")
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    return start.group_name, {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}


def test_scalars_cover_loss_lr_speed_grad_norm_top5_and_per_class(run):
    run_dir, acc = run
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss_step", "train/lr", "train/images_per_sec", "train/grad_norm", "val/acc", "val/top5",
                "val_per_class/circle", "val_per_class/dots"):
        assert tag in tags, sorted(tags)
    norms = [e.value for e in acc.Scalars("train/grad_norm")]
    assert norms and all(n > 0 for n in norms)
    history = read_metrics(run_dir)["history"]
    assert [e.value for e in acc.Scalars("val/top5")] == pytest.approx([r["val_top5"] for r in history])


def test_lr_is_logged_at_every_optimizer_step(run):
    _, acc = run
    lrs = acc.Scalars("train/lr")
    # log_every_n_steps=2, yet every one of the 2 x 4 steps has its lr: OneCycle's start and end are drawn.
    assert [e.step for e in lrs] == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    assert lrs[0].value < max(e.value for e in lrs) and lrs[-1].value < lrs[0].value
    assert [e.step for e in acc.Scalars("train/loss_step")] == list(range(2, 2 * STEPS_PER_EPOCH + 1, 2))


def test_train_and_val_loss_share_one_chart_and_their_groups_come_first(run):
    _, acc = run
    from tensorboard.plugins.custom_scalar import layout_pb2

    train, val = acc.Scalars("train/loss"), acc.Scalars("val/loss")
    assert [e.step for e in train] == [e.step for e in val] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]  # per epoch
    layout = layout_pb2.Layout()
    layout.ParseFromString(acc.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    for title, tags in (("loss: train vs val", ("train/loss", "val/loss")),
                        ("acc: train vs val", ("train/acc", "val/acc"))):
        assert all(any(re.fullmatch(rx, tag) for rx in charts[title]) for tag in tags), charts
    # TensorBoard sorts chart groups by the tag's prefix: train and val first, no single-point hparam charts.
    tags = acc.Tags()["scalars"] + acc.Tags()["images"]
    groups = sorted({t.split("/")[0] for t in tags})
    assert all("/" in t for t in tags), tags  # no ungrouped chart (lr lives in train/)
    assert groups[:2] == ["train", "val"], groups
    assert not [t for t in tags if t.startswith("hparam")]


def test_images_augmented_grid_confusion_matrix_and_misclassified(run):
    run_dir, acc = run
    images = set(acc.Tags()["images"])
    assert {"train/augmented_batch", "val/confusion_matrix", "val/misclassified", "train/curves"} <= images, images
    grid = acc.Images("train/augmented_batch")
    assert len(grid) == 1  # logged once
    # 32 tiles of 16 px shown at 64 px with a line of class name under each (16 px), 8 per row, 2 px padding;
    # a tile is as wide as its widest class name, at least 64 px.
    assert grid[0].height == 4 * (64 + 16 + 2) + 2
    assert (grid[0].width - 2) % 8 == 0 and (grid[0].width - 2) // 8 - 2 >= 64
    cm = acc.Images("val/confusion_matrix")[-1]
    assert cm.width > 10 * 20 and cm.height > 10 * 20  # ten classes, one readable cell each
    wrong = acc.Images("val/misclassified")
    assert wrong[-1].width >= 64 and wrong[-1].height >= 64
    # Logged at the best epoch: the last image's step is the step of the best val/acc; both images at once.
    best_epoch = read_metrics(run_dir)["best_epoch"]
    steps = [e.step for e in acc.Scalars("val/acc")]
    assert cm.step == steps[best_epoch - 1]
    assert [e.step for e in wrong] == [e.step for e in acc.Images("val/confusion_matrix")]
    text = acc.Tensors("val/per_class_accuracy/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "circle" in text and "dots" in text


def test_misclassified_is_logged_even_without_errors():
    from resnet_cli import reports

    class Sink:
        enabled = True

        def __init__(self):
            self.images = {}

        def image(self, tag, img, step):
            self.images[tag] = (img, step)

        def scalars(self, values, step):
            pass

        def text(self, tag, text, step):
            pass

    sink = Sink()
    val = {"pred": torch.tensor([0, 1, 1]), "target": torch.tensor([0, 1, 1]),
           "wrong": {"images": None, "conf": torch.empty(0), "pred": torch.empty(0), "target": torch.empty(0)}}
    reports.log_evaluation(sink, val, ["a", "b"], {"mean": [0.5] * 3, "std": [0.5] * 3}, step=7)
    img, step = sink.images["val/misclassified"]
    assert step == sink.images["val/confusion_matrix"][1] == 7
    assert img.shape[0] == 3 and (img < 0.5).any()  # a tile with writing on it ("no errors ...")


def test_hparams_hold_the_settings_overrides_and_final_metrics(run):
    run_dir, acc = run
    trial, hparams = session_hparams(acc)
    assert trial == run_dir.name  # readable: the run folder (here outside output_root: its name)
    for item in OVERRIDES:
        key, _, value = item.partition("=")
        assert hparams.get(key) == _typed(value), (key, sorted(hparams))
    # The settings that define a run, overridden or not; image size and precision as resolved.
    expected = {"model": "resnet20", "dataset": "shapes", "optimizer": "adam", "scheduler": "onecycle",
                "scheduler.max_lr": pytest.approx(0.003), "dataset.batch_size": 32, "trainer.epochs": 2,
                "dataset.augment": "standard", "image_size": 16, "trainer.seed": 42, "name": "default",
                "precision": resolve_precision("auto", torch.device("cpu"))}  # bf16 on AVX-512 BF16 CPUs, else fp32
    for key, value in expected.items():
        assert hparams.get(key) == value, (key, hparams.get(key))
    content = acc.PluginTagToContent("hparams")
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    assert set(hparams) <= {h.name for h in experiment.hparam_infos}
    # What the user set comes first, marked as differing (TensorBoard shows those columns first), but for
    # paths and how the run is watched.
    from resnet_cli.config import UNLABELLED

    typed = [k.partition("=")[0] for k in [*TINY, *OVERRIDES]]
    marked = [h.name for h in experiment.hparam_infos if h.differs]
    assert set(marked) == set(typed) - UNLABELLED and "trainer.device" not in marked
    assert [h.name for h in experiment.hparam_infos][:len(marked)] == marked
    # No value domains: TensorBoard reads one run's experiment for a whole sweep folder.
    assert not any(h.HasField("domain_discrete") for h in experiment.hparam_infos)
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert {"val/best_acc", "val/acc", "val/loss", "train/loss"} <= metrics
    assert not [m for m in metrics if "epochs" in m]  # a setting, not a metric
    # The metrics are per-epoch charts; HParams shows their last value.
    assert acc.Scalars("val/best_acc")[-1].value == pytest.approx(read_metrics(run_dir)["best_val_acc"])
    assert acc.Scalars("val/acc")[-1].value == pytest.approx(read_metrics(run_dir)["final_val_acc"])


def test_a_two_job_sweep_shows_two_rows_that_differ_in_the_swept_column(cli, tmp_path):
    out = tmp_path / "outputs"
    # The swept key typed first, as in the README: the folder name (cut at 80 characters) starts with it.
    res = cli("-m", "optimizer=adam,sgd", *TINY, "model=resnet20", "dataset.num_train=64", "dataset.num_val=32",
              f"output_root={out}", "scheduler=step")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = {}
    for metrics in sorted(out.rglob("metrics.json")):
        acc = EventAccumulator(str(metrics.parent), size_guidance={"tensors": 0, "scalars": 0})
        acc.Reload()
        trial, hparams = session_hparams(acc)
        # The row is named by its folder (which names the job's overrides) and the sweep's folder.
        folder = metrics.parent
        assert trial == f"{folder.name} ({folder.parent.relative_to(out)})" and "multirun/" in trial, trial
        assert f"optimizer={hparams['optimizer']}" in folder.name
        rows[hparams["optimizer"]] = hparams
    assert set(rows) == {"adam", "sgd"}
    assert set(rows["adam"]) == set(rows["sgd"])  # the same columns
    # The swept key alone is marked as differing, so TensorBoard shows its column first, without a click.
    experiment = hp_metadata.parse_experiment_plugin_data(acc.PluginTagToContent("hparams")[hp_metadata.EXPERIMENT_TAG])
    assert [h.name for h in experiment.hparam_infos if h.differs] == ["optimizer"]
    differ = {k for k in rows["adam"] if rows["adam"][k] != rows["sgd"][k]}
    # Only the optimizer (and the lr its config file brings along) tells the two apart.
    assert differ <= {"optimizer", "optimizer.lr", "optimizer.weight_decay"} and "optimizer" in differ, differ


def test_run_folders_are_labelled_with_the_name_and_key_overrides():
    from resnet_cli.config import LABEL_MAX, run_label

    assert run_label("demo", []) == "_demo"
    assert run_label("default", []) == ""
    label = run_label("default", ["trainer.epochs=3", "optimizer=adam", "dataset.root=/data/x", "output_root=o",
                                  "trainer.device=cpu", "model=resnet50"])
    assert label == "_trainer.epochs=3,optimizer=adam,model=resnet50"  # as typed; paths, watching left out
    long = run_label("x", [f"dataset.k{i}=123456789" for i in range(30)])
    assert len(long) <= LABEL_MAX + 1 and long.endswith("=123456789")  # whole items only
    assert "/" not in run_label("n", ["model.name=a:b c"])


def test_dry_run_prints_the_plan_and_trains_nothing(train_inproc, tmp_path, caplog):
    caplog.set_level("INFO", logger="resnet_cli")
    best, run_dir = train_inproc("model=resnet20", "trainer.dry_run=true")
    assert best == 0.0
    out = tmp_path
    text = caplog.text
    assert "parameters: " in text and "MACs" in text
    assert "8 steps/epoch" in text  # 256 samples / batch 32
    assert "device cpu" in text and "precision" in text and "memory format" in text
    assert not list(out.rglob("*.pt")) and not list(out.rglob("metrics.json"))
