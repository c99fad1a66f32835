"""Imbalanced classes: dataset.balance=auto balances a 10:1 folder and picks best.pt by balanced accuracy.

The folder is built here: three classes of noisy colour squares whose colours overlap, 10:1 in
train and balanced in val, so a model that favours the common class loses balanced accuracy.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from conftest import fit_inproc, read_metrics

SMALL = ["trainer.device=cpu", "trainer.progress=false", "model=simple_cnn", "trainer.epochs=3",
         "dataset.image_size=16", "trainer.seed=0"]


def _uneven(root: Path, train: dict[str, int], val: int, seed: int = 0) -> Path:
    """train/ (counts per class) and val/ (`val` per class) of noisy squares around overlapping colours."""
    from PIL import Image

    rng = random.Random(seed)
    colours = {"ash": (130, 110, 110), "elm": (110, 130, 110), "oak": (110, 110, 130)}
    for split, counts in (("train", train), ("val", dict.fromkeys(colours, val))):
        for name, n in counts.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                # The colour varies per image (the classes overlap: no weights get them all right), and a
                # little per pixel, so the prior that unbalanced training learns costs the rare classes.
                tint = [c + rng.gauss(0, 14) for c in colours[name]]
                img = Image.new("RGB", (16, 16))
                img.putdata([tuple(max(0, min(255, round(c + rng.gauss(0, 6)))) for c in tint) for _ in range(256)])
                img.save(folder / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    return _uneven(tmp_path_factory.mktemp("uneven"), {"ash": 300, "elm": 30, "oak": 30}, val=40)


def test_auto_resolves_by_the_ratio_of_the_training_classes_and_an_explicit_setting_wins():
    from resnet_cli.data.policy import IMBALANCE_RATIO, resolve_balance
    from resnet_cli.errors import UserError

    assert resolve_balance("auto", [300, 30, 30])[0] == "sampler"
    assert resolve_balance("auto", [100, 100, 100 / IMBALANCE_RATIO + 1])[0] == "off"
    assert resolve_balance("auto", [50, 0, 50])[0] == "off"  # an empty class has no ratio
    assert resolve_balance("loss", [300, 30, 30]) == ("loss", "set")
    assert resolve_balance("off", [300, 30, 30]) == ("off", "set")
    with pytest.raises(UserError, match="dataset.balance=weighted"):
        resolve_balance("weighted", [1, 2])


def test_a_10_to_1_folder_gets_the_sampler_and_ends_with_higher_balanced_accuracy_than_without(uneven, tmp_path,
                                                                                              caplog):
    import logging

    common = [*SMALL, "dataset=imagefolder", f"dataset.root={uneven}", f"output_root={tmp_path / 'outputs'}"]
    with caplog.at_level(logging.INFO, logger="resnet_cli"):
        fit_inproc(tmp_path / "auto", common)
    plan = next(r.getMessage() for r in caplog.records if "balance" in r.getMessage())
    assert "balance sampler (auto: classes 10.0:1" in plan, plan
    fit_inproc(tmp_path / "off", [*common, "dataset.balance=off"])
    auto, off = read_metrics(tmp_path / "auto"), read_metrics(tmp_path / "off")
    assert auto["monitor"] == off["monitor"] == "val_balanced_acc"  # chosen by the train counts, not balance
    best = lambda m: max(r["val_balanced_acc"] for r in m["history"])  # noqa: E731
    assert best(auto) > best(off) + 0.05, (best(auto), best(off))


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_the_sampler_draws_every_class_about_equally_often_and_a_repeat_is_augmented_anew(uneven, loader):
    from conftest import compose
    from resnet_cli.build import build_data
    from resnet_cli.runtime import setup

    cfg = compose([*SMALL, "dataset=imagefolder", f"dataset.root={uneven}", f"dataset.loader={loader}",
                   "dataset.num_workers=0", "dataset.batch_size=30", "dataset.flip=true"])
    data = build_data(cfg, setup(cfg.trainer))
    assert data.balance == "sampler"
    seen, images = torch.zeros(3), []
    for epoch in range(4):
        data.train.set_epoch(epoch)
        for x, y in data.train:
            seen += torch.bincount(y, minlength=3)
            images.append(x)
    share = seen / seen.sum()
    assert share.min() > 0.25, share  # unweighted, the small classes would get 1/12 each
    # The 30 oak images are drawn about 120 times each epoch: the draws must not be copies of each other.
    flat = torch.cat(images).flatten(1)
    assert len(torch.unique(flat, dim=0)) > 0.9 * len(flat)


def test_balance_loss_weights_the_classes_like_scikit_learns_balanced_rule(uneven):
    from conftest import compose
    from resnet_cli.build import build_data, class_loss_weights
    from resnet_cli.runtime import setup

    cfg = compose([*SMALL, "dataset=imagefolder", f"dataset.root={uneven}", "dataset.balance=loss"])
    data = build_data(cfg, setup(cfg.trainer))
    counts = [300, 30, 30]
    assert data.class_counts == counts and data.balance == "loss"
    assert class_loss_weights(data) == pytest.approx([360 / (3 * c) for c in counts])
    assert "balance loss (set)" in data.plan
