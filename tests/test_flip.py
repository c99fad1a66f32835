"""dataset.flip auto|true|false and dataset.vflip: decided from the data, honoured by both loader paths, in the plan.

Real data both ways: scikit-learn's bundled handwritten digits (UCI optical digits, 8x8 scans)
written as PNG folders, and 300 real Fashion-MNIST images (the first 300 of the official train
set, Zalando, MIT licence) kept in tests/data/fashion_mnist_300.npz.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO
from test_reliability import assert_one_line

from resnet_cli.data import imagefolder, mirror
from resnet_cli.data.pipeline import ArraySplit, make_bundle

FASHION = REPO / "tests" / "data" / "fashion_mnist_300.npz"


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, names: list[str], val_every: int = 5) -> Path:
    """uint8 [N, H, W] grey images as root/train/<class>/*.png and root/val/<class>/*.png (every 5th image)."""
    for i, (img, label) in enumerate(zip(images, labels)):
        split = "val" if i % val_every == 0 else "train"
        path = root / split / names[int(label)] / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(path)
    return root


@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory) -> Path:
    """scikit-learn's 1,797 real handwritten digits, 8 px at 17 grey levels, upscaled to 24 px PNGs."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.stack([np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((24, 24), Image.BICUBIC))
                       for im in d.images[:600]])
    return write_folder(tmp_path_factory.mktemp("digits"), images, d.target[:600], [f"digit_{k}" for k in range(10)])


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory) -> Path:
    """300 real Fashion-MNIST images (clothes, shoes, bags) at their native 28 px."""
    data = np.load(FASHION)
    names = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
    return write_folder(tmp_path_factory.mktemp("fashion"), data["images"], data["labels"], names)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_flip_auto_is_off_for_real_digits_and_on_for_clothes(digits_folder, fashion_folder, loader):
    kw = dict(batch_size=16, loader=loader, num_workers=0)
    digits = imagefolder(root=str(digits_folder), **kw)
    assert "flip off (auto: the classes are not mirror-symmetric" in digits.plan, digits.plan
    clothes = imagefolder(root=str(fashion_folder), **kw)
    assert "flip on (auto: mirror" in clothes.plan, clothes.plan
    if loader == "memory":
        assert (digits.train.flip, clothes.train.flip) == (False, True)
    else:  # the per-image transform: a RandomHorizontalFlip only where the data allows it
        def flips(bundle) -> list[str]:
            return [type(t).__name__ for t in bundle.train.dataset.transform.transforms if "Flip" in type(t).__name__]
        assert flips(digits) == [] and flips(clothes) == ["RandomHorizontalFlip"]


def test_mirror_rule_statistics_on_real_data(digits_folder):
    """The numbers behind the decision: the rule is a paired comparison, not a guess from the folder's name."""
    data = np.load(FASHION)
    clothes = mirror.measure_arrays(torch.from_numpy(data["images"])[:, None], torch.from_numpy(data["labels"]))
    from sklearn.datasets import load_digits

    d = load_digits()
    scans = mirror.measure_arrays(torch.from_numpy((d.images * 255 / 16).astype(np.uint8))[:, None],
                                  torch.from_numpy(d.target))
    # Digits: most classes are chiral, a mirrored digit loses most of what makes it its class.
    assert scans.drop > 0.6 and scans.z > 20 and not scans.symmetric
    # Clothes: only the shoes (all facing left) lose some; the mirrors keep most of the margin over chance.
    assert clothes.drop < mirror.MIN_DROP and clothes.symmetric
    assert clothes.acc > clothes.chance + 0.3  # the test could have seen an asymmetry: it is far above chance


def asymmetric_images(n: int, size: int = 16) -> ArraySplit:
    """Images whose pixels encode their own row (channel 0) and column (channel 1): any flip is visible."""
    ar = torch.arange(size) * 15 + 10
    img = torch.stack([ar.view(-1, 1).expand(size, size), ar.view(1, -1).expand(size, size),
                       torch.zeros(size, size, dtype=torch.long)])
    labels = torch.arange(n) % 2
    return ArraySplit(img.to(torch.uint8).expand(n, -1, -1, -1).contiguous(), labels)


@pytest.mark.parametrize("loader", ["memory", "dataloader"])
def test_flips_as_set_reach_the_augmented_batches(loader):
    split = asymmetric_images(256)
    # pad 0 and the image's own size: the random crop is the whole image, only a flip can move a pixel.
    kw = dict(batch_size=64, image_size=16, pad=0, mean=(0, 0, 0), std=(1, 1, 1), seed=3, loader=loader,
              num_workers=0)
    original = split.images.float()

    def mirrored(**flips) -> tuple[float, float]:
        """(share of training images flipped left-right, share flipped upside down) in one epoch's batches."""
        bundle = make_bundle(["a", "b"], split, split, **kw, **flips)
        x = (torch.cat([b for b, _ in bundle.train.iter_from(0)]) * 255).round()  # mean 0, std 1: exact pixels
        seen = {dims: (x == original[:1].flip(dims) if dims else x == original[:1]).flatten(1).all(1)
                for dims in ((), (3,), (2,), (2, 3))}
        assert bool(torch.stack(list(seen.values())).any(0).all())  # every image is the original or a flip of it
        share = {dims: seen[dims].float().mean().item() for dims in seen}
        return share[(3,)] + share[(2, 3)], share[(2,)] + share[(2, 3)]

    h_off, v_off = mirrored(flip="false")
    assert (h_off, v_off) == (0.0, 0.0)  # flip=false: not one mirrored image, and no vertical flip unless asked
    h_on, v_on = mirrored(flip="true")
    assert 0.3 < h_on < 0.7 and v_on == 0.0  # flip=true: about half (the check above can fail)
    h_v, v_v = mirrored(flip=False, vflip=True)
    assert h_v == 0.0 and 0.3 < v_v < 0.7


def test_flip_auto_on_array_datasets_is_decided_from_their_images():
    """CIFAR arrays, the embedded shapes and any make_bundle caller: one rule, from the training images."""
    from resnet_cli.data import shapes

    bundle = shapes(num_train=400, num_val=50, batch_size=50)
    assert "flip on (auto: mirrored images are classified as well as the originals" in bundle.plan, bundle.plan
    assert bundle.train.flip
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images[:400] * 255 / 16).astype(np.uint8))[:, None].expand(-1, 3, -1, -1).contiguous()
    small = torch.nn.functional.interpolate(x.float(), size=16).to(torch.uint8)
    split = ArraySplit(small, torch.from_numpy(d.target[:400]))
    arrays = make_bundle([str(k) for k in range(10)], split, split, image_size=16, batch_size=50)
    assert "flip off (auto: the classes are not mirror-symmetric" in arrays.plan and not arrays.train.flip


def test_start_up_plan_names_the_flip_and_its_reason(cli, digits_folder, tmp_path):
    res = cli("dataset=imagefolder", f"dataset.root={digits_folder}", "trainer.dry_run=true", "trainer.device=cpu")
    assert res.returncode == 0, res.stderr[-2000:]
    plan = next(line for line in res.stdout.splitlines() if "plan: " in line)
    assert "flip off (auto: the classes are not mirror-symmetric, mirroring loses" in plan, plan
    assert "nearest class mean of 480 train images at 16 px" in plan and "chance 0.1" in plan, plan
    # false as the command line parses it (a bool) is the word false; an explicit value is said to be set.
    res = cli("dataset=imagefolder", f"dataset.root={digits_folder}", "trainer.dry_run=true", "trainer.device=cpu",
              "dataset.flip=true", "dataset.vflip=true")
    assert res.returncode == 0, res.stderr[-2000:]
    plan = next(line for line in res.stdout.splitlines() if "plan: " in line)
    assert "flip on (set), vertical flip on" in plan, plan


def test_bad_flip_values_stop_in_one_line_before_any_data(cli, tmp_path):
    assert_one_line(cli("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.flip=sometimes"),
                    "dataset.flip=sometimes", "auto, true, false")
    assert_one_line(cli("dataset=imagefolder", f"dataset.root={tmp_path}", "dataset.vflip=auto"),
                    "dataset.vflip=auto", "true or false")
