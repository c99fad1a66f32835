"""Augmentation and loaders: determinism across workers and resume, no global RNG use, path equivalence, memory."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from archives import make_cifar10_archive, write_class_folders
from conftest import read_metrics
from resnet_cli.data import cifar10, imagefolder, shapes
from resnet_cli.data.pipeline import ArraySplit, make_bundle
from resnet_cli.errors import UserError


def batches(src, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """All batches from `start`, detached copies."""
    return [(x.clone(), y.clone()) for x, y in src.iter_from(start)]


def same(a: list, b: list) -> bool:
    """Bitwise-equal batch lists."""
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def rng_states() -> tuple:
    """The global torch, numpy and python RNG states."""
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def assert_rng_untouched(before: tuple) -> None:
    """Fail if any global RNG moved since `before`."""
    after = rng_states()
    assert torch.equal(before[0], after[0]), "torch global RNG consumed"
    assert np.array_equal(before[1], after[1]), "numpy global RNG consumed"
    assert before[2] == after[2], "python global RNG consumed"


def test_imagefolder_dataloader_workers_resume_and_global_rng(tmp_path):
    root = write_class_folders(tmp_path / "img", per_class=12, size=24, classes=["a", "b", "c"])
    kw = dict(root=str(root), image_size=16, resize=18, batch_size=5, seed=3, augment="randaugment+randomerasing",
              mixup_alpha=0.4, cutmix_alpha=1.0)
    before = rng_states()
    b0, b2 = imagefolder(num_workers=0, **kw), imagefolder(num_workers=2, **kw)
    for b in (b0, b2):
        b.train.set_epoch(2)
    full0, full2 = batches(b0.train), batches(b2.train)
    assert same(full0, full2)  # any number of workers: the same batches
    assert same(full0[3:], batches(b2.train, 3))  # resume mid-epoch: exactly the rest of the epoch
    assert full0[0][1].shape == (5, 3)  # mixup/cutmix: soft targets [N, C]
    assert same(batches(b0.val), batches(b2.val))
    b0.train.set_epoch(3)
    assert not torch.equal(batches(b0.train)[0][0], full0[0][0])  # a new epoch draws anew
    assert_rng_untouched(before)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_cifar10_resume_workers_and_no_global_rng(tmp_path, loader):
    url, md5 = make_cifar10_archive(tmp_path / "served", n_train=120, n_test=30)
    kw = dict(root=str(tmp_path / "data"), url=url, md5=md5, batch_size=16, seed=7, loader=loader, cutout=8)
    before = rng_states()
    b0 = cifar10(num_workers=0, **kw)
    b2 = cifar10(num_workers=2, **kw)
    b0.train.set_epoch(1), b2.train.set_epoch(1)
    full = batches(b0.train)
    assert same(full, batches(b2.train)) and same(full[4:], batches(b2.train, 4))
    assert_rng_untouched(before)


def test_cifar10_recipe_and_memory_holds_uint8_once(tmp_path):
    """Issue 2: crop 32 pad 4 + flip, CIFAR mean/std; val normalize only; images stored once as uint8."""
    url, md5 = make_cifar10_archive(tmp_path / "served", n_train=100, n_test=40)
    b = cifar10(root=str(tmp_path / "data"), url=url, md5=md5, batch_size=20, seed=0)
    src = b.train
    assert src.images.dtype == torch.uint8 and src.images.shape == (100, 3, 32, 32)
    assert src.images.untyped_storage().nbytes() == 100 * 3 * 32 * 32  # one uint8 copy, no float cache
    assert (src.pad, src.pad_mode, src.flip, src.size) == (4, "reflect", True, 32)
    assert b.eval_spec == {"resize": 32, "crop": 32, "mean": [0.4914, 0.4822, 0.4465], "std": [0.247, 0.2435, 0.2616],
                           "channels": 3}
    mean, std = torch.tensor(b.eval_spec["mean"]).view(3, 1, 1), torch.tensor(b.eval_spec["std"]).view(3, 1, 1)
    x, _ = next(b.val.iter_from(0))
    raw = b.val.images[b.val.order[:20]].float() / 255
    assert torch.allclose(x, (raw - mean) / std, atol=1e-5)  # val: normalize only


def position_images(n: int, size: int = 32) -> ArraySplit:
    """Images whose pixels encode their own row (channel 0) and column (channel 1)."""
    ar = torch.arange(size) * 7 + 10
    img = torch.stack([ar.view(-1, 1).expand(size, size), ar.view(1, -1).expand(size, size), torch.zeros(size, size, dtype=torch.long)])
    return ArraySplit(img.to(torch.uint8).expand(n, -1, -1, -1).contiguous(), torch.zeros(n, dtype=torch.long))


def crop_stats(bundle) -> tuple[np.ndarray, np.ndarray, float]:
    """Histograms of the vertical/horizontal crop offsets and the flip rate, read back from the pixels."""
    x = torch.cat([x for x, _ in bundle.train.iter_from(0)])
    centre = (x[:, :, 16, 16] * 255).round().long()  # mean 0, std 1: pixel values come back exactly
    dy, dx = (centre[:, 0] - 10) // 7 - 16 + 4, (centre[:, 1] - 10) // 7 - 16 + 4
    flipped = x[:, 1, 16, 17] < x[:, 1, 16, 15]
    dx = torch.where(flipped, dx + 1, dx)  # flipped: the centre column reads source column 15, not 16
    return np.bincount(dy, minlength=9), np.bincount(dx, minlength=9), flipped.float().mean().item()


def test_memory_and_dataloader_paths_draw_the_same_augmentation_distribution():
    n = 2000
    split = position_images(n)
    kw = dict(batch_size=500, image_size=32, pad=4, pad_mode="reflect", mean=(0, 0, 0), std=(1, 1, 1), seed=1,
              num_workers=0)
    mem = crop_stats(make_bundle(["x"], split, split, loader="memory", **kw))
    per = crop_stats(make_bundle(["x"], split, split, loader="dataloader", **kw))
    for hist_m, hist_p in zip(mem[:2], per[:2]):
        assert hist_m.sum() == hist_p.sum() == n and len(hist_m) == len(hist_p) == 9  # offsets 0..8 (pad 4 each side)
        expected = n / 9
        for h in (hist_m, hist_p):  # both uniform over the 9 offsets (chi-square, 8 dof, p ~ 0.001)
            assert ((h - expected) ** 2 / expected).sum() < 26.1, h
    assert abs(mem[2] - 0.5) < 0.05 and abs(per[2] - 0.5) < 0.05


def test_memory_path_refuses_per_image_policies():
    with pytest.raises(UserError, match="needs dataset.loader=dataloader"):
        shapes(num_train=32, num_val=8, augment="trivialaugment", loader="memory")


ACC_EPOCHS = ["trainer.epochs=2", "dataset.num_train=800", "dataset.num_val=400", "dataset.batch_size=32",
              "model=resnet20", "optimizer=sgd", "optimizer.lr=0.1"]



def test_both_loader_paths_train_the_embedded_dataset_to_the_same_band(train_inproc):
    accs = {}
    for loader in ("memory", "dataloader"):
        best, run = train_inproc(*ACC_EPOCHS, f"dataset.loader={loader}", "dataset.num_workers=0")
        accs[loader] = best
    print(accs)
    assert min(accs.values()) > 0.3, accs  # 10 classes: chance is 0.1
    assert abs(accs["memory"] - accs["dataloader"]) < 0.15, accs


def test_mixup_and_cutmix_train_through_the_runner(train_inproc):
    _, run = train_inproc("model=resnet20", "dataset.mixup_alpha=0.2", "dataset.cutmix_alpha=1.0",
                          "trainer.label_smoothing=0.1")
    hist = read_metrics(run)["history"][0]
    assert np.isfinite(hist["train_loss"]) and 0.0 <= hist["train_acc"] <= 1.0
