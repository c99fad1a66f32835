"""What a run leaves in TensorBoard, read back with TensorBoard's own event reader."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hp_metadata

from conftest import TINY, fit_inproc, read_metrics

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


def test_scalars_cover_loss_lr_speed_grad_norm_top5_and_per_class(run):
    run_dir, acc = run
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "lr", "train/images_per_sec", "train/grad_norm", "val/acc", "val/top5",
                "val_per_class/circle", "val_per_class/dots"):
        assert tag in tags, sorted(tags)
    norms = [e.value for e in acc.Scalars("train/grad_norm")]
    assert norms and all(n > 0 for n in norms)
    history = read_metrics(run_dir)["history"]
    assert [e.value for e in acc.Scalars("val/top5")] == pytest.approx([r["val_top5"] for r in history])


def test_images_augmented_grid_confusion_matrix_and_misclassified(run):
    run_dir, acc = run
    images = set(acc.Tags()["images"])
    assert {"train/augmented_batch", "val/confusion_matrix", "val/misclassified"} <= images, images
    grid = acc.Images("train/augmented_batch")
    assert len(grid) == 1  # logged once
    # 32 tiles of 16 px, 8 per row with 2 px padding: 4 rows x 8 columns.
    assert (grid[0].width, grid[0].height) == (8 * 18 + 2, 4 * 18 + 2)
    cm = acc.Images("val/confusion_matrix")[-1]
    assert cm.width > 10 * 20 and cm.height > 10 * 20  # ten classes, one readable cell each
    wrong = acc.Images("val/misclassified")[-1]
    assert wrong.width >= 64 and wrong.height >= 64
    # Logged at the best epoch: the last image's step is the step of the best val/acc.
    best_epoch = read_metrics(run_dir)["best_epoch"]
    steps = [e.step for e in acc.Scalars("val/acc")]
    assert cm.step == steps[best_epoch - 1]
    text = acc.Tensors("val/per_class_accuracy/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "circle" in text and "dots" in text


def test_hparams_hold_the_overridden_keys_and_final_metrics(run):
    run_dir, acc = run
    content = acc.PluginTagToContent("hparams")
    start = hp_metadata.parse_session_start_info_plugin_data(content[hp_metadata.SESSION_START_INFO_TAG])
    hparams = dict(start.hparams)
    for item in OVERRIDES:
        key, _, value = item.partition("=")
        assert key in hparams, sorted(hparams)
        got = hparams[key]
        assert getattr(got, got.WhichOneof("kind")) == _typed(value), key
    experiment = hp_metadata.parse_experiment_plugin_data(content[hp_metadata.EXPERIMENT_TAG])
    names = {h.name for h in experiment.hparam_infos}
    assert {k.partition("=")[0] for k in OVERRIDES} <= names
    # No value domains: TensorBoard reads one run's experiment for a whole sweep folder.
    assert not any(h.HasField("domain_discrete") for h in experiment.hparam_infos)
    metrics = {m.name.tag for m in experiment.metric_infos}
    assert "hparam/best_val_acc" in metrics
    best = acc.Scalars("hparam/best_val_acc")[-1].value
    assert best == pytest.approx(read_metrics(run_dir)["best_val_acc"])


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
