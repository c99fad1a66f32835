"""A user's own image folder, as a new user runs it: auto geometry, the default recipe, the decoded cache.

The folders are digits rendered from the machine's fonts (bench/folders.py), at native sizes
a user brings, not the embedded shapes.
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO, fit_inproc, read_metrics

sys.path.insert(0, str(REPO / "bench"))
from folders import FolderSpec, build_folder  # noqa: E402

from resnet_cli.data import imagefolder  # noqa: E402
from resnet_cli.data.policy import resolve_geometry  # noqa: E402
from resnet_cli.errors import UserError  # noqa: E402
from resnet_cli.runtime import resolve_precision  # noqa: E402

QUICK = ["trainer.device=cpu", "trainer.progress=false", "trainer.log_every_n_steps=1"]


def digits(tmp_path: Path, size, train: int, val: int = 0, fmt: str = "png", name: str = "digits") -> Path:
    """A folder of rendered digits: train/ and val/ when val > 0, else one set of class folders."""
    spec = FolderSpec(name, "digits", size, train, val, split=val > 0, fmt=fmt)
    return build_folder(tmp_path, spec)


def test_image_size_auto_is_the_folders_native_size(tmp_path):
    small = imagefolder(root=str(digits(tmp_path, 32, 20, 10)), batch_size=4)
    assert small.eval_spec["crop"] == 32 and small.eval_spec["resize"] == 32  # validated on the whole image
    assert "size 32 px (auto: median short side 32 px)" in small.plan and "pad 4 + random crop" in small.plan
    # A user who says dataset.image_size=32 gets exactly what auto chose (resize and crop follow the size).
    told = imagefolder(root=str(tmp_path / "digits"), batch_size=4, image_size=32)
    assert told.eval_spec == small.eval_spec and told.plan == small.plan.replace("auto: median short side 32 px", "set")
    photos = imagefolder(root=str(digits(tmp_path, (400, 600), 20, fmt="jpg", name="photos")), batch_size=2)
    assert photos.eval_spec["crop"] == 224 and photos.eval_spec["resize"] == 256
    assert "capped at auto_max_size=224" in photos.plan and "random resized crop" in photos.plan
    assert photos.train.images.shape[1:] == (3, 256, 256)  # decoded once at the eval view's size


def test_batch_auto_keeps_enough_steps_per_epoch():
    from resnet_cli.data.policy import resolve_batch

    assert [resolve_batch("auto", n)[0] for n in (50, 300, 600, 1000, 1438, 50000)] == [16, 16, 32, 32, 64, 64]
    assert resolve_batch(100, 10) == (100, "set")


def test_geometry_rules_and_explicit_values(caplog):
    g = resolve_geometry(64, native=[(64, 64)])
    assert (g.image_size, g.crop, g.resize, g.pad) == (64, "pad", 64, 8)
    g = resolve_geometry(128)
    assert (g.crop, g.resize) == ("resized", 146)
    with caplog.at_level(logging.WARNING):
        resolve_geometry(32, resize=256)  # validates on the middle 1/64 of each image: allowed, but said
    assert "central 2% of each image" in caplog.text
    with pytest.raises(UserError, match="dataset.resize=16 is smaller than dataset.image_size=32"):
        resolve_geometry(32, resize=16)
    with pytest.raises(UserError, match="dataset.crop=zoom"):
        resolve_geometry(32, crop="zoom")


@pytest.mark.parametrize("size", [32, 64])
def test_a_trained_model_evaluates_as_its_last_epoch(tmp_path, size):
    from resnet_cli.evaluate import evaluate_checkpoint

    root = digits(tmp_path, size, 40, 20)
    run = tmp_path / "run"
    fit_inproc(run, ["dataset=imagefolder", f"dataset.root={root}", "model=resnet20", "dataset.batch_size=16",
                     "trainer.epochs=1", f"output_root={tmp_path / 'out'}", *QUICK])
    report, _ = evaluate_checkpoint(run / "last.pt", device="cpu")
    assert report["accuracy"] == pytest.approx(read_metrics(run)["final_val_acc"], abs=1e-9)
    assert report["samples"] == 20


def test_optimizer_lr_sets_the_default_schedule(tmp_path):
    root = digits(tmp_path, 32, 20, 10)
    lrs = {}
    for lr in (1e-3, 3e-4):
        run = tmp_path / f"lr{lr}"
        fit_inproc(run, ["dataset=imagefolder", f"dataset.root={root}", "model=simple_cnn", "dataset.batch_size=4",
                         "trainer.epochs=2", f"optimizer.lr={lr}", f"output_root={tmp_path / 'out'}", *QUICK])
        lrs[lr] = [r["lr"] for r in read_metrics(run)["history"]]
    # The default schedule (one-cycle) peaks at optimizer.lr, so every lr it uses scales with it.
    assert all(a / b == pytest.approx(1e-3 / 3e-4) for a, b in zip(lrs[1e-3], lrs[3e-4], strict=True))


def test_startup_names_size_crop_rule_and_recipe_in_one_line(cli, tmp_path):
    root = digits(tmp_path, 32, 70, 10)
    res = cli("dataset=imagefolder", f"dataset.root={root}", "trainer.dry_run=true", "trainer.device=cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    plan = [line for line in res.stdout.splitlines() if "plan: " in line]
    assert len(plan) == 1, res.stdout
    # Digits are not mirror-symmetric: flip auto turns the flip off and says why (tests/test_flip.py has the rule).
    for phrase in ("size 32 px (auto: median short side 32 px)", "train pad 4 + random crop (auto: 32 px <= 64",
                   "flip off (auto: the classes are not mirror-symmetric",
                   "eval whole image", "loader memory (auto:", "recipe: AdamW lr 0.003", "OneCycleLR peak 0.003", "batch 16, 10 epochs x 4 steps",
                   "batch 16 (auto: 70 images, 4 steps per epoch)"):
        assert phrase in plan[0], plan[0]
    runtime = next(line for line in res.stdout.splitlines() if "runtime: " in line)
    # The precision auto picks depends on the CPU: bf16 with AVX-512 BF16 or AMX, else fp32.
    expected = resolve_precision("auto", torch.device("cpu"))
    assert "memory format channels_last (auto:" in runtime and f"precision {expected} (auto:" in runtime


def test_decoded_cache_is_reused_and_follows_every_change(tmp_path, monkeypatch):
    import importlib

    files_module = importlib.import_module("resnet_cli.data.images")  # where every image file is opened

    root = digits(tmp_path, 32, 30, 10)
    first = imagefolder(root=str(root), batch_size=4)
    assert "decoded cache 32 px: miss" in first.summary

    def no_reads(*a, **k):
        raise AssertionError("an image was opened although nothing changed")

    with monkeypatch.context() as m:  # a second run opens no image: headers and pixels come from the cache
        m.setattr(files_module, "_open_regular", no_reads)
        second = imagefolder(root=str(root), batch_size=4)
    assert "decoded cache 32 px: hit, no image opened" in second.summary
    assert torch.equal(first.train.images, second.train.images) and torch.equal(first.val.images, second.val.images)

    # Changed pixels (same name), an added file and a removed file each rebuild the cache from the files.
    changed = root / "train" / "digit_3" / "00003.png"
    Image.fromarray(np.full((32, 32, 3), 77, np.uint8)).save(changed)
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(root / "train" / "digit_3" / "extra.png")
    (root / "val" / "digit_0" / "00000.png").unlink()
    third = imagefolder(root=str(root), batch_size=4)
    assert "miss" in third.summary
    assert third.train.num_samples == 31 and third.val.num_samples == 9
    images = torch.cat([third.train.images, third.val.images])
    assert (images == 77).flatten(1).all(1).sum() == 1 and (images == 200).flatten(1).all(1).sum() == 1
    fourth = imagefolder(root=str(root), batch_size=4)
    assert "hit" in fourth.summary and torch.equal(fourth.train.images, third.train.images)
    # The cache lives outside the data folder, which torchvision's ImageFolder still reads as before.
    from torchvision.datasets import ImageFolder

    from resnet_cli.data.cache import cache_root

    assert not [p for p in root.rglob("*") if p.is_dir() and p.name.startswith(".")]
    assert any(cache_root().rglob("*.npy"))
    assert len(ImageFolder(str(root / "train")).classes) == 10


def test_memory_resized_crop_draws_torchvisions_distribution():
    from scipy.stats import ks_2samp
    from torchvision.transforms import RandomResizedCrop

    from resnet_cli.data.contract import generator
    from resnet_cli.data.memory import _resized_crop_boxes

    h = w = 100
    scale, ratio = (0.3, 1.0), (3 / 4, 4 / 3)
    boxes = _resized_crop_boxes(4000, h, w, scale, ratio, generator(1, 2))
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(3, h, w), list(scale), list(ratio))
                        for _ in range(4000)], dtype=torch.float32)  # (top, left, height, width)
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    for ours, theirs in ((bw * bh / (h * w), ref[:, 2] * ref[:, 3] / (h * w)), (bw / bh, ref[:, 3] / ref[:, 2]),
                         (boxes[:, 0] + bw / 2, ref[:, 1] + ref[:, 3] / 2)):
        assert ks_2samp(ours.numpy(), theirs.numpy()).pvalue > 1e-3


def test_memory_resized_crop_of_the_whole_image_is_the_image():
    from resnet_cli.data.memory import MemorySource

    images = torch.randint(0, 256, (6, 3, 20, 20), dtype=torch.uint8)
    src = MemorySource(images, torch.arange(6), batch_size=6, train=True, seed=0, crop="resized", scale=(1, 1),
                       ratio=(1, 1), image_size=20, mean=(0, 0, 0), std=(1, 1, 1))
    x, y = next(iter(src))
    expected = images[y].float() / 255
    flipped = src.flipped[y]
    expected[flipped] = expected[flipped].flip(3)
    assert torch.allclose(x, expected, atol=1e-5)


def test_a_folder_with_one_class_is_refused(tmp_path):
    root = digits(tmp_path, 32, 10)
    for p in root.iterdir():
        if p.is_dir() and p.name != "digit_0":
            for f in p.iterdir():
                f.unlink()
            p.rmdir()
    with pytest.raises(UserError, match="only one class folder with images"):
        imagefolder(root=str(root))


def test_resnet9_one_epoch_on_a_real_looking_folder_learns(tmp_path):
    """model=resnet9 for one epoch on ~1.4k 32-px images of handwriting-like digits (chance is 0.10)."""
    root = build_folder(tmp_path, FolderSpec("gray32", "digits", 32, 1438, 359, gray=True))
    run = tmp_path / "run"
    fit_inproc(run, ["dataset=imagefolder", f"dataset.root={root}", "model=resnet9", "trainer.epochs=1",
                     f"output_root={tmp_path / 'out'}", "trainer.device=cpu", "trainer.progress=false",
                     "trainer.log_every_n_steps=1"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run)).Reload()
    losses = [e.value for e in acc.Scalars("train/loss_step")]
    assert all(math.isfinite(v) for v in losses)
    k = len(losses) // 4
    assert np.mean(losses[-k:]) < np.mean(losses[:k]) - 0.2
    assert read_metrics(run)["final_val_acc"] > 0.3


def test_train_and_test_folders_validate_on_test(tmp_path):
    """fast.ai's layout (the ResNet-9 tutorial's): train/ and test/, no val/. test/ is the validation split."""
    root = digits(tmp_path, 32, 30, 20)
    (root / "val").rename(root / "test")
    bundle = imagefolder(root=str(root), batch_size=4)
    assert bundle.val.num_samples == 20 and bundle.train.num_samples == 30  # nothing of train/ split off
    assert "validating on test/ (no val/ folder)" in bundle.summary
