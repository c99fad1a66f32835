"""Image-folder datasets (flowers, imagefolder): download -> verify -> extract -> split -> train, and start-up checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from archives import FLOWER_CLASSES, make_flowers_archive, write_class_folders
from conftest import dataset_config, fit_inproc, only_run_dir, read_metrics

MODEL = "model=resnet20"  # the real CIFAR ResNet config: small and quick at 32 px



def train_here(tmp_path: Path, *overrides: str) -> tuple[float, Path]:
    """Run the training task in-process on any dataset (conftest's train_inproc is tied to shapes)."""
    run = tmp_path / f"run{len(list(tmp_path.glob('run*')))}"
    return fit_inproc(run, [f"output_root={tmp_path / 'outputs'}", *overrides]), run


SMALL = ["dataset.image_size=32", "dataset.resize=36", "dataset.batch_size=4", "dataset.val_batch_size=8",
         "trainer=debug", "trainer.limit_train_batches=3", "trainer.progress=false"]


def test_flowers_download_verify_extract_split_train(cli, tmp_path):
    url, sha256 = make_flowers_archive(tmp_path / "served", per_class=6, size=40)
    out, data = tmp_path / "outputs", tmp_path / "data"
    args = ["dataset=flowers", f"dataset.root={data}", f"dataset.url={url}", f"dataset.sha256={sha256}",
            "dataset.num_workers=0", *SMALL, MODEL]
    res = cli(*args, f"output_root={out}")
    assert res.returncode == 0, res.stderr[-3000:]
    run = only_run_dir(out)
    assert json.loads((run / "class_names.json").read_text()) == FLOWER_CLASSES
    ck = torch.load(run / "last.pt", map_location="cpu", weights_only=True)
    assert ck["eval_spec"] == {"resize": 36, "crop": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                               "channels": 3}
    manifest = json.loads((data / "flower_photos" / "split-val0.1-seed0.json").read_text())
    assert len(manifest["train"]) == 25 and len(manifest["val"]) == 5  # 6 per class: 1 of each class in val
    assert {p.split("/")[0] for p in manifest["val"]} == set(FLOWER_CLASSES)
    assert not set(manifest["train"]) & set(manifest["val"])
    # A second run with another training seed reuses the archive and the saved split unchanged.
    (data / "flower_photos.tgz").unlink()
    train_here(tmp_path, *args, "trainer.seed=9")
    assert json.loads((data / "flower_photos" / "split-val0.1-seed0.json").read_text()) == manifest


def test_flowers_without_a_checksum_refuses_to_download(cli, tmp_path):
    url, _ = make_flowers_archive(tmp_path / "served", per_class=2, size=16)
    res = cli("dataset=flowers", f"dataset.root={tmp_path / 'data'}", f"dataset.url={url}", "dataset.sha256=null",
              "trainer=debug")
    assert res.returncode == 2
    assert "no checksum configured" in res.stderr and "dataset.sha256" in res.stderr
    assert not (tmp_path / "data" / "flower_photos.tgz").exists()


def test_imagefolder_missing_root_is_one_line(cli, tmp_path):
    res = cli("dataset=imagefolder", f"dataset.root={tmp_path / 'nope'}", "trainer=debug")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1].startswith("resnet-train: error: dataset.root=") and "nope" in lines[-1]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("layout", ["presplit", "single"])
def test_imagefolder_trains_both_layouts(tmp_path, layout):
    root = tmp_path / "images"
    if layout == "presplit":
        write_class_folders(root / "train", per_class=5, size=24, classes=["a", "b", "c"])
        write_class_folders(root / "val", per_class=2, size=24, classes=["a", "b", "c"])
    else:
        write_class_folders(root, per_class=10, size=24, classes=["a", "b", "c"])
    best, run = train_here(tmp_path, "dataset=imagefolder", f"dataset.root={root}", "dataset.num_workers=0",
                             *SMALL, MODEL)
    assert json.loads((run / "class_names.json").read_text()) == ["a", "b", "c"]
    assert 0.0 <= read_metrics(run)["best_val_acc"] <= 1.0
    split = list(root.glob("split-*.json"))
    assert (len(split) == 1) == (layout == "single")


def test_mean_auto_is_computed_once_and_cached_with_the_split(tmp_path):
    from resnet_cli.data import imagefolder

    root = write_class_folders(tmp_path / "img", per_class=6, size=20, classes=["a", "b"])
    kw = dict(root=str(root), image_size=16, resize=16, batch_size=4, num_workers=0, seed=0, mean="auto", std="auto")
    b = imagefolder(**kw)
    manifest_path = root / "split-val0.1-seed0.json"
    manifest = json.loads(manifest_path.read_text())
    assert b.eval_spec["mean"] == manifest["mean"] and b.eval_spec["std"] == manifest["std"]
    # The colours of archives.class_color(0/1) dominate: a sanity check that the numbers are real statistics.
    assert 0.1 < manifest["mean"][0] < 0.6 and all(0.0 < s < 0.5 for s in manifest["std"])
    manifest["mean"] = [0.25, 0.5, 0.75]
    manifest_path.write_text(json.dumps(manifest))
    assert imagefolder(**kw).eval_spec["mean"] == [0.25, 0.5, 0.75]  # read from the cache, not recomputed


def test_imagefolder_memory_loader_caches_uint8_once_and_resumes(tmp_path):
    from resnet_cli.data import imagefolder

    root = write_class_folders(tmp_path / "img", per_class=10, size=30, classes=["a", "b"])
    b = imagefolder(root=str(root), loader="memory", image_size=16, resize=20, batch_size=4, seed=1)
    imgs = b.train.images
    assert imgs.dtype == torch.uint8 and imgs.shape == (18, 3, 20, 20)  # cached at `resize`, cropped per batch
    assert b.eval_spec["resize"] == 20 and b.eval_spec["crop"] == 16
    b.train.set_epoch(4)
    full = [x for x, _ in b.train.iter_from(0)]
    rest = [x for x, _ in b.train.iter_from(2)]
    assert full[0].shape == (4, 3, 16, 16) and all(torch.equal(a, c) for a, c in zip(full[2:], rest, strict=True))


def _flowers102_fixture(tmp_path: Path, monkeypatch, mat: dict[str, bytes]) -> dict:
    """102flowers.tgz with jpg/image_0000k.jpg and the two .mat files, pinned by our own md5s."""
    import hashlib
    import tarfile

    from torchvision.datasets import Flowers102

    from archives import jpeg_bytes

    served = tmp_path / "served"
    (served / "jpg").mkdir(parents=True)
    for k in range(1, 7):
        (served / "jpg" / f"image_{k:05d}.jpg").write_bytes(jpeg_bytes((40 * k, 200 - 30 * k, 90), 20, seed=k))
    with tarfile.open(served / "102flowers.tgz", "w:gz") as tar:
        tar.add(served / "jpg", arcname="jpg")
    for name, data in mat.items():
        (served / name).write_bytes(data)
    files = {key: (name, hashlib.md5((served / name).read_bytes()).hexdigest())
             for key, name in (("image", "102flowers.tgz"), ("label", "imagelabels.mat"), ("setid", "setid.mat"))}
    monkeypatch.setattr(Flowers102, "_file_dict", files)
    return {"root": str(tmp_path / "data"), "url_prefix": served.resolve().as_uri() + "/"}


def test_flowers102_official_splits(tmp_path, monkeypatch):
    sio = pytest.importorskip("scipy.io")
    import io

    import numpy as np

    from resnet_cli.data import flowers102

    mats = {}
    for name, data in (("imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 1, 2]])}),
                       ("setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]), "tstid": np.array([[5, 6]])})):
        buf = io.BytesIO()
        sio.savemat(buf, data)
        mats[name] = buf.getvalue()
    kw = _flowers102_fixture(tmp_path, monkeypatch, mats)
    b = flowers102(**kw, image_size=16, resize=16, batch_size=2, num_workers=0, seed=0)
    assert len(b.class_names) == 102 and b.train.num_samples == 2 and b.val.num_samples == 2


def test_flowers102_without_scipy_says_what_to_install(tmp_path, monkeypatch):
    try:
        import scipy.io  # noqa: F401
        pytest.skip("scipy is installed: test_flowers102_official_splits covers the real path")
    except ImportError:
        pass
    from resnet_cli.data import flowers102
    from resnet_cli.errors import UserError

    kw = _flowers102_fixture(tmp_path, monkeypatch, {"imagelabels.mat": b"labels", "setid.mat": b"splits"})
    with pytest.raises(UserError, match="needs scipy"):
        flowers102(**kw)
    assert (tmp_path / "data" / "flowers-102" / "jpg" / "image_00006.jpg").is_file()  # fetched, verified, extracted


IDX = ("mnist", "fashion_mnist", "kmnist")  # the 1-channel datasets


def test_every_dataset_yaml_builds_a_bundle(tmp_path, monkeypatch):
    """Each configs/dataset/*.yaml, as shipped (only the data source pointed at a fixture), feeds its builder."""
    import io

    import numpy as np
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from archives import make_cifar10_archive, make_cifar100_archive, write_idx_files
    from resnet_cli import config_dir
    from resnet_cli.data import DataBundle

    monkeypatch.setenv("RESNET_DATA", str(tmp_path / "data"))
    url10, md5_10 = make_cifar10_archive(tmp_path / "s10", n_train=20, n_test=10)
    url100, md5_100 = make_cifar100_archive(tmp_path / "s100", n_train=100, n_test=100)
    furl, fsha = make_flowers_archive(tmp_path / "sf", per_class=3, size=20)
    extra = {
        "cifar10": {"url": url10, "md5": md5_10},
        "cifar100": {"url": url100, "md5": md5_100},
        "flowers": {"url": furl, "sha256": fsha},
        "imagefolder": {"root": str(write_class_folders(tmp_path / "img", per_class=3, size=20))},
        "shapes": {"num_train": 40, "num_val": 10},
        **{name: {"root": str(write_idx_files(tmp_path / name, 20, 10)["test_images"]["path"].parent)} for name in IDX},
    }
    try:
        import scipy.io as sio

        mats = {}
        for name, data in (("imagelabels.mat", {"labels": np.array([[1, 2, 1, 2, 1, 2]])}),
                           ("setid.mat", {"trnid": np.array([[1, 2]]), "valid": np.array([[3, 4]]),
                                          "tstid": np.array([[5, 6]])})):
            buf = io.BytesIO()
            sio.savemat(buf, data)
            mats[name] = buf.getvalue()
        extra["flowers102"] = _flowers102_fixture(tmp_path / "f102", monkeypatch, mats)
    except ImportError:
        pass
    shipped = sorted(p.stem for p in Path(config_dir(), "dataset").glob("*.yaml"))
    assert set(extra) - {"flowers102"} <= set(shipped)
    for name in shipped:
        if name not in extra:
            continue
        cfg = OmegaConf.merge(dataset_config(name), extra[name], {"num_workers": 0})
        bundle = instantiate(cfg)(device="cpu", seed=0, rank=0, world_size=1)
        assert isinstance(bundle, DataBundle) and bundle.summary.startswith(name), name
        assert set(bundle.eval_spec) == {"resize", "crop", "mean", "std", "channels"}
        assert bundle.eval_spec["channels"] == (1 if name in IDX else 3)


def test_flowers_pinned_checksum_rejects_another_archive(cli, tmp_path):
    """The shipped sha256 is the real archive's: any other file at the URL is refused and removed."""
    url, _ = make_flowers_archive(tmp_path / "served", per_class=2, size=16)
    res = cli("dataset=flowers", f"dataset.root={tmp_path / 'data'}", f"dataset.url={url}", "trainer=debug")
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "flower_photos.tgz" in res.stderr.splitlines()[-1]
    assert not (tmp_path / "data" / "flower_photos").exists()
    assert not (tmp_path / "data" / "flower_photos.tgz").exists()
