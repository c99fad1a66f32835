"""dataset=mnist / fashion_mnist / kmnist: the idx files in both offline layouts, the md5-checked download, one-line
errors for a missing or damaged file, and a 1-channel run from the files to resnet-predict on a PNG.

The idx files are built here in the real on-disk format (tests/archives.py: big-endian magic 2051/2049,
gzip'd or raw) and read through the real builders; the download is served from a file:// URL with the md5
computed here. The real Fashion-MNIST files (Debian's dataset-fashion-mnist) are read where present.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from archives import IDX_FILES, write_idx_files
from conftest import compose, fit_inproc, read_metrics
from test_reliability import assert_one_line

DEBIAN = Path("/work/data/fashion-deb/usr/share/datasets/fashion-mnist")  # a copy of the package's files, if any
QUIET = ["trainer.device=cpu", "trainer.progress=false"]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every entry under folder -> (size, mtime in ns): what reading it must leave unchanged."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


def as_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """A MemorySource's stored uint8 images and labels."""
    return split.images.cpu().numpy(), split.labels.cpu().numpy()


# --- (1) the offline layouts --------------------------------------------------------------------------------------

def test_debian_flat_gzip_layout_loads_read_only_as_one_channel_uint8(tmp_path):
    """Debian's layout: the four .gz files directly in root, a read-only folder: read, nothing written there."""
    from torchvision.datasets import FashionMNIST

    from resnet_cli.data import fashion_mnist

    files = write_idx_files(tmp_path / "fashion-mnist", n_train=60, n_test=30)
    folder = tmp_path / "fashion-mnist"
    os.chmod(folder, 0o555)
    before = snapshot(folder)
    try:
        bundle = fashion_mnist(root=str(folder), download=True, batch_size=16)
    finally:
        os.chmod(folder, 0o755)
    assert snapshot(folder) == before  # no extracted copy, no cache, no download folder
    images, labels = as_arrays(bundle.val)  # the official test set is the held-out split
    assert images.dtype == np.uint8 and images.shape == (30, 1, 28, 28)  # one channel, stored once
    assert np.array_equal(images[:, 0], files["test_images"]["array"])
    assert np.array_equal(labels, files["test_labels"]["array"])
    train_images, _ = as_arrays(bundle.train)
    assert np.array_equal(train_images[:, 0], files["train_images"]["array"])
    assert bundle.class_names == FashionMNIST.classes
    assert bundle.eval_spec == {"resize": 28, "crop": 28, "mean": [0.286], "std": [0.353], "channels": 1}
    x, y = next(iter(bundle.train.iter_from(0)))
    assert x.shape == (16, 1, 28, 28) and x.dtype == torch.float32


@pytest.mark.parametrize("gz", [False, True])
def test_torchvisions_layout_raw_or_gzip_is_read_and_preferred_over_files_in_root(tmp_path, gz):
    """<root>/MNIST/raw/ (what torchvision downloads) wins over another set of files lying directly in root."""
    from resnet_cli.data import mnist

    own = write_idx_files(tmp_path / "data" / "MNIST" / "raw", n_train=40, n_test=20, gz=gz, seed=1)
    write_idx_files(tmp_path / "data", n_train=50, n_test=25, seed=2)  # e.g. Fashion-MNIST's, flat in a shared root
    bundle = mnist(root=str(tmp_path / "data"), download=False)
    images, labels = as_arrays(bundle.val)
    assert np.array_equal(images[:, 0], own["test_images"]["array"])
    assert np.array_equal(labels, own["test_labels"]["array"])
    assert bundle.train.num_samples == 40 and bundle.class_names[0] == "0 - zero"
    assert "from " + str(tmp_path / "data" / "MNIST" / "raw") in bundle.summary


def test_num_train_and_num_val_take_the_first_images(tmp_path):
    from resnet_cli.data import kmnist

    files = write_idx_files(tmp_path, n_train=50, n_test=30)
    bundle = kmnist(root=str(tmp_path), download=False, num_train=20, num_val=7)
    images, labels = as_arrays(bundle.val)
    assert np.array_equal(images[:, 0], files["test_images"]["array"][:7]) and labels.tolist() == \
        files["test_labels"]["array"][:7].tolist()
    assert bundle.train.num_samples == 20 and bundle.class_names == ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya",
                                                                       "re", "wo"]


def test_the_dataloader_path_keeps_one_channel_and_validates_what_the_memory_path_does(tmp_path):
    """loader=dataloader (per-image policies such as trivialaugment): the same 1-channel eval batches as in memory."""
    from resnet_cli.data import mnist

    write_idx_files(tmp_path, n_train=40, n_test=20)
    memory = mnist(root=str(tmp_path), download=False, val_batch_size=20)
    loader = mnist(root=str(tmp_path), download=False, val_batch_size=20, loader="dataloader", num_workers=0,
                   augment="trivialaugment", batch_size=8)
    (want, want_y), (got, got_y) = next(iter(memory.val.iter_from(0))), next(iter(loader.val.iter_from(0)))
    assert got.shape == (20, 1, 28, 28) and torch.equal(got_y, want_y)
    assert torch.allclose(got, want, atol=1e-5)
    x, _ = next(iter(loader.train.iter_from(0)))
    assert x.shape == (8, 1, 28, 28) and loader.eval_spec == memory.eval_spec


# --- (2) the download: torchvision's names and md5s by default, the real fetch + md5 code served from file:// --------

def test_null_mirrors_and_md5s_mean_torchvisions_own():
    from torchvision.datasets import MNIST, FashionMNIST

    from resnet_cli.data.mnist import _resources

    for cls in (MNIST, FashionMNIST):
        got = _resources(cls, None, {"train_images": None})
        assert [(name, md5) for name, md5, _ in got.values()] == cls.resources
        assert got["train_images"][2] == [f"{m.rstrip('/')}/train-images-idx3-ubyte.gz" for m in cls.mirrors]
    for name in ("mnist", "fashion_mnist", "kmnist"):
        dataset = compose([f"dataset={name}"]).dataset
        assert dataset.mirrors is None and set(dataset.md5s.values()) == {None}


def download_overrides(served: Path, files: dict, root: Path) -> list[str]:
    """resnet-train keys that point the download at `served` (a dead mirror first) with the md5s of `files`."""
    return [f"dataset.root={root}", f"dataset.mirrors=[{(served / 'gone').as_uri()}/,{served.as_uri()}/]",
            *(f"dataset.md5s.{role}={f['md5']}" for role, f in files.items())]


def test_download_from_a_mirror_is_md5_checked_into_torchvisions_layout_and_trains(cli, tmp_path):
    served = tmp_path / "mirror"
    files = write_idx_files(served, n_train=64, n_test=32)
    root = tmp_path / "data"
    res = cli("dataset=mnist", *download_overrides(served, files, root), "model=simple_cnn", "trainer.epochs=1",
              "dataset.batch_size=32", *QUIET)
    assert res.returncode == 0, res.stderr[-2000:]
    raw = root / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{n}.gz" for n in IDX_FILES.values())  # nothing partial
    for role, f in files.items():
        assert (raw / f["path"].name).read_bytes() == f["path"].read_bytes(), role
    assert "from " + str(raw) in res.stdout + res.stderr


def test_a_download_failing_its_md5_is_one_line_and_keeps_nothing(tmp_path):
    from resnet_cli.data import mnist
    from resnet_cli.errors import UserError

    served = tmp_path / "mirror"
    files = write_idx_files(served, n_train=64, n_test=32)
    md5s = {role: f["md5"] for role, f in files.items()} | {"test_labels": "0" * 32}
    root = tmp_path / "data"
    with pytest.raises(UserError) as refused:
        mnist(root=str(root), mirrors=[(served / "gone").as_uri(), served.as_uri()], md5s=md5s)
    line = str(refused.value)
    assert "\n" not in line and "t10k-labels-idx1-ubyte.gz" in line and f"md5 check (expected {'0' * 32})" in line
    assert "also tried 1 other mirror" in line
    assert not (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").exists()
    assert not [p for p in (root / "MNIST" / "raw").iterdir() if p.name.startswith(".download")]


# --- (3) a missing or damaged file: one line naming it, exit 2 ------------------------------------------------------

def damage(folder: Path, how: str) -> str:
    """Damage one idx file of folder; returns the name the error must give."""
    if how == "missing":
        (folder / "t10k-labels-idx1-ubyte.gz").unlink()
        return "t10k-labels-idx1-ubyte"
    if how == "bad magic":
        path = folder / "train-images-idx3-ubyte.gz"
        data = bytearray(gzip.decompress(path.read_bytes()))
        data[2:4] = (2049).to_bytes(2, "big")  # a labels magic on an images file
        path.write_bytes(gzip.compress(bytes(data)))
        return "train-images-idx3-ubyte.gz"
    if how == "truncated":  # uncompressed and cut short: the header promises more images than the file holds
        path = folder / "t10k-images-idx3-ubyte.gz"
        data = gzip.decompress(path.read_bytes())
        path.unlink()
        (folder / "t10k-images-idx3-ubyte").write_bytes(data[:-100])
        return "t10k-images-idx3-ubyte"
    if how == "truncated gzip":
        path = folder / "train-labels-idx1-ubyte.gz"
        path.write_bytes(path.read_bytes()[:-20])
        return "train-labels-idx1-ubyte.gz"
    if how == "wrong count":  # a labels file of another size
        (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(
            gzip.compress(b"\x00\x00\x08\x01" + (31).to_bytes(4, "big") + bytes(31)))
        return "t10k-labels-idx1-ubyte.gz"
    raise ValueError(how)


DAMAGE = {
    "missing": "not found; put the four idx files there",
    "bad magic": "magic number 2049 where idx images have 2051",
    "truncated": "truncated or damaged",
    "truncated gzip": "not a complete gzip file",
    "wrong count": "31 labels for the 32 images",
}


@pytest.mark.parametrize("how", ["missing", "bad magic", "truncated"])
def test_a_missing_or_damaged_idx_file_is_one_line_naming_it(cli, tmp_path, how):
    folder = tmp_path / "fashion"
    write_idx_files(folder, n_train=64, n_test=32)
    name = damage(folder, how)
    res = cli("dataset=fashion_mnist", f"dataset.root={folder}", "dataset.download=false", "trainer.dry_run=true",
              *QUIET)
    line = assert_one_line(res, str(folder / name), DAMAGE[how])
    # ... and what to do: where the files go, or that a download fetches them
    assert "dataset.download=true" in line and len(line.replace(str(folder), "")) < 300, line
    assert not (tmp_path / "outputs").exists() or not list((tmp_path / "outputs").rglob("*.pt"))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_every_kind_of_damage_is_one_user_error_naming_the_file(tmp_path, how):
    """The same faults and more, in-process (the entry point prints a UserError as its one line, as above)."""
    from resnet_cli.data import fashion_mnist
    from resnet_cli.errors import UserError

    write_idx_files(tmp_path, n_train=64, n_test=32)
    name = damage(tmp_path, how)
    with pytest.raises(UserError) as refused:
        fashion_mnist(root=str(tmp_path), download=False)
    line = str(refused.value)
    assert "\n" not in line and str(tmp_path / name) in line and DAMAGE[how] in line and "dataset.download=true" in line


def test_the_channel_keys_are_checked_before_any_data():
    from resnet_cli.errors import UserError
    from resnet_cli.validate import validate

    validate(compose(["dataset=mnist", "model=resnet20"]))
    for overrides, named in ((["dataset.channels=3"], "dataset.channels=3"),
                             (["model.in_channels=3"], "model.in_channels=3"),
                             (["dataset.mean=[0.5,0.5,0.5]"], "dataset.mean=[0.5,0.5,0.5] must have 1 number"),
                             (["dataset.md5s.train_images=abc"], "dataset.md5s.train_images=abc"),
                             (["dataset.mirrors=[]"], "dataset.mirrors=[]"),
                             (["dataset.num_train=0"], "dataset.num_train=0")):
        with pytest.raises(UserError, match=named.replace("[", r"\[").replace("]", r"\]")):
            validate(compose(["dataset=mnist", *overrides]))
    with pytest.raises(UserError, match="dataset.mean=.* must have 3 numbers"):  # the RGB datasets keep 3
        validate(compose(["dataset=cifar10", "dataset.mean=[0.5]"]))


# --- (4) a 1-channel run: any model, one epoch, the test set evaluated, a PNG predicted --------------------------

@pytest.mark.parametrize("model", ["simple_cnn", "resnet9", "resnet20", "preact_resnet164", "resnet18", "resnet50",
                                   "attention56_cifar", "resnest50"])
def test_any_model_on_mnist_builds_a_one_channel_stem(model):
    from resnet_cli.build import build_model

    cfg = compose([f"dataset=mnist", f"model={model}"])
    assert cfg.model.in_channels == 1 and compose([f"model={model}"]).model.in_channels == 3
    net = build_model(cfg.model, 10, 28).eval()
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert first.in_channels == 1
    with torch.no_grad():
        assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_the_bf16_probe_feeds_a_one_channel_model_its_own_input():
    """runtime.bf16_grad_hazard runs the model once: on a 1-channel stem too, finding the same 1x1-map conv."""
    from resnet_cli.models import create_model
    from resnet_cli.runtime import bf16_grad_hazard

    for channels in (1, 3):
        net = create_model("resnet18", 10, image_size=16, in_channels=channels, stem="imagenet")
        assert bf16_grad_hazard(net, 16, torch.device("cpu")) == "layer4.0.conv1"


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """resnet20 trained one epoch on tiny MNIST-format files: (run folder, the files)."""
    root = tmp_path_factory.mktemp("mnist")
    files = write_idx_files(root / "data", n_train=400, n_test=200)
    run = root / "run"
    fit_inproc(run, ["dataset=mnist", f"dataset.root={root / 'data'}", "dataset.num_val=100", "model=resnet20",
                     "trainer.epochs=1", "dataset.batch_size=32", "dataset.val_batch_size=50",
                     f"output_root={root / 'outputs'}", *QUIET])
    return run, files


def test_mnist_trains_one_epoch_and_evaluates_the_official_test_set(mnist_run):
    from resnet_cli.evaluate import evaluate_checkpoint

    run, files = mnist_run
    metrics = read_metrics(run)
    assert metrics["epochs"] == 1 and metrics["best_val_acc"] > 0.2, metrics  # chance: 0.1
    report, _ = evaluate_checkpoint(run, tta="off")  # the bare model, as validation measured it
    truth = np.bincount(files["test_labels"]["array"][:100], minlength=10)
    assert report["samples"] == 100 and np.array(report["confusion_matrix"]).sum(1).tolist() == truth.tolist()
    assert report["accuracy"] == pytest.approx(metrics["final_val_acc"], abs=1e-6)
    ckpt = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ckpt["eval_spec"]["channels"] == 1 and ckpt["config"]["model"]["in_channels"] == 1
    assert ckpt["model"]["conv1.weight"].shape[1] == 1


def test_fashion_mnist_trains_on_a_slice(tmp_path):
    files = write_idx_files(tmp_path / "data", n_train=200, n_test=100)
    # Three epochs, not one: after four steps the first epoch's accuracy spreads 0.09..0.53 over seeds (a
    # coin flip against 0.2); under a three-epoch schedule it measured 0.35..0.46 over seeds 0-3.
    fit_inproc(tmp_path / "run", ["dataset=fashion_mnist", f"dataset.root={tmp_path / 'data'}", "dataset.num_train=128",
                                  "model=simple_cnn", "trainer.epochs=3", "dataset.batch_size=32",
                                  f"output_root={tmp_path / 'outputs'}", *QUIET])
    metrics = read_metrics(tmp_path / "run")
    assert metrics["history"][0]["val_acc"] > 0.2, metrics
    names = json.loads((tmp_path / "run" / "class_names.json").read_text())
    assert names[0] == "T-shirt/top" and len(files["test_labels"]["array"]) == 100


def test_resnet_predict_classifies_png_digits_as_the_run_validated_them(mnist_run, tmp_path):
    """PNGs of test images (grayscale, and one saved as RGB) through resnet-predict: the same classes and
    probabilities as the model gives the stored 1-channel test images, normalized as validation did."""
    from PIL import Image

    from resnet_cli.inference import load_trained

    run, files = mnist_run
    images = files["test_images"]["array"][:6]
    pngs = []
    for i, img in enumerate(images):
        pngs.append(tmp_path / f"digit{i}.png")
        Image.fromarray(img, "L").save(pngs[-1])
    Image.fromarray(images[0], "L").convert("RGB").save(tmp_path / "digit0_rgb.png")
    script = Path(sys.executable).parent / "resnet-predict"
    res = subprocess.run([str(script), str(run), *map(str, pngs), str(tmp_path / "digit0_rgb.png"), "--topk", "3",
                          "--json", str(tmp_path / "preds.json"), "--tta", "off"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    preds = {Path(p["file"]).name: p["top"] for p in json.loads((tmp_path / "preds.json").read_text())}

    trained = load_trained(run, tta="off")
    model, ckpt = trained.model, trained.ckpt
    (mean,), (std,) = ckpt["eval_spec"]["mean"], ckpt["eval_spec"]["std"]
    x = torch.from_numpy(images).float().div(255).sub(mean).div(std)[:, None]
    with torch.inference_mode():
        probs = model(x).softmax(1)
    names = ckpt["class_names"]
    for i in range(len(images)):
        top = preds[f"digit{i}.png"]
        assert top[0]["class"] == names[int(probs[i].argmax())]
        assert top[0]["prob"] == pytest.approx(float(probs[i].max()), abs=1e-5)
    assert preds["digit0_rgb.png"] == preds["digit0.png"]  # an RGB file of a grey digit: the same input


def test_an_eval_spec_without_channels_still_means_rgb():
    """Checkpoints written before the eval spec had `channels`: the transform gives 3 channels, as it always did."""
    from PIL import Image

    from resnet_cli.data import build_eval_transform

    img = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), "L")
    old = build_eval_transform(resize=28, crop=28, mean=[0.5] * 3, std=[0.5] * 3)(img)
    gray = build_eval_transform(resize=28, crop=28, mean=[0.5], std=[0.5], channels=1)(img)
    assert old.shape == (3, 28, 28) and gray.shape == (1, 28, 28)
    assert torch.equal(gray[0], old[0])  # a grey image's grayscale is each of its RGB channels


# --- (5) the real Debian Fashion-MNIST files ---------------------------------------------------------------------

@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist files are not on this machine")
def test_the_real_debian_fashion_mnist_folder_loads_as_the_official_splits():
    from resnet_cli.data import fashion_mnist
    from resnet_cli.data.mnist import STATS

    before = snapshot(DEBIAN)
    bundle = fashion_mnist(root=str(DEBIAN), download=False)
    assert snapshot(DEBIAN) == before
    train, train_labels = as_arrays(bundle.train)
    _, test_labels = as_arrays(bundle.val)
    assert train.shape == (60000, 1, 28, 28) and len(test_labels) == 10000
    assert np.bincount(train_labels).tolist() == [6000] * 10 and np.bincount(test_labels).tolist() == [1000] * 10
    # The constants' recipe (x / 255: mean, std) from the exact histogram of the 47M pixel values.
    counts, values = np.bincount(train.ravel(), minlength=256), np.arange(256) / 255
    mean_all = float(counts @ values / counts.sum())
    std_all = float(np.sqrt(counts @ values**2 / counts.sum() - mean_all**2))
    (mean,), (std,) = STATS["fashion_mnist"]
    assert mean_all == pytest.approx(mean, abs=5e-5) and std_all == pytest.approx(std, abs=5e-5)
    assert compose(["dataset=fashion_mnist"]).dataset.mean == [mean]


# --- README ----------------------------------------------------------------------------------------------------

def test_the_readme_offline_command_trains_from_a_read_only_flat_folder(cli, tmp_path):
    """README's offline command, verbatim but for the folder (a tiny one in Debian's layout) and tiny sizes."""
    from conftest import REPO

    command = "resnet-train dataset=fashion_mnist dataset.root=/usr/share/datasets/fashion-mnist"
    assert f"\n{command}\n" in (REPO / "README.md").read_text()
    folder = tmp_path / "usr" / "share" / "datasets" / "fashion-mnist"
    write_idx_files(folder, n_train=64, n_test=32)
    before = snapshot(folder)
    args = [a.replace("/usr/share/datasets/fashion-mnist", str(folder)) for a in command.split()[1:]]
    res = cli(*args, "model=simple_cnn", "trainer.epochs=1", "dataset.batch_size=32", *QUIET)
    assert res.returncode == 0, res.stderr[-2000:]
    assert snapshot(folder) == before
    (metrics,) = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("metrics.json")]
    assert metrics["epochs"] == 1 and metrics["finished"]
