"""Contract tests: shapes and cifar10 build a DataBundle on both loader paths, resumable and worker-independent."""

from __future__ import annotations

import torch
from hydra.utils import instantiate

from resnet_cli.data import BatchSource, DataBundle, build_eval_transform, cifar10, shapes
from archives import make_cifar10_archive
from conftest import dataset_config


def _batches(src: BatchSource, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in src.iter_from(start)]


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


def test_shapes_bundle_contract() -> None:
    b = shapes(num_train=300, num_val=100, image_size=16, batch_size=32, seed=1)
    assert isinstance(b, DataBundle) and isinstance(b.train, BatchSource)
    assert len(b.class_names) == 10 and len(set(b.class_names)) == 10
    assert len(b.train) == 300 // 32 and b.train.num_samples == 300 and b.val.num_samples == 100
    x, y = next(b.train.iter_from(0))
    assert x.shape == (32, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    seen = torch.cat([y for _, y in b.val.iter_from(0)])
    assert len(seen) == 100  # val drops nothing
    assert b.eval_spec == {"resize": 16, "crop": 16, "mean": [0.5] * 3, "std": [0.3] * 3, "channels": 3}


def test_shapes_is_deterministic_and_seed_independent() -> None:
    a = shapes(num_train=64, num_val=32, seed=1, augment="none")
    b = shapes(num_train=64, num_val=32, seed=2, augment="none")
    va, vb = _batches(a.val), _batches(b.val)
    assert _same(va, vb)


def test_memory_resume_and_epochs() -> None:
    b = shapes(num_train=256, num_val=64, batch_size=32, seed=3, cutout=6)
    b.train.set_epoch(2)
    full = _batches(b.train)
    assert _same(full[3:], _batches(b.train, 3))
    b.train.set_epoch(3)
    assert not torch.equal(full[0][0], _batches(b.train)[0][0])


def test_dataloader_workers_and_resume_identical() -> None:
    kw = dict(num_train=128, num_val=40, batch_size=16, seed=5, loader="dataloader", augment="trivialaugment+randomerasing")
    b0, b2 = shapes(num_workers=0, **kw), shapes(num_workers=2, **kw)
    for b in (b0, b2):
        b.train.set_epoch(1)
    full0, full2 = _batches(b0.train), _batches(b2.train)
    assert _same(full0, full2)
    assert _same(full0[5:], _batches(b2.train, 5))
    assert _same(_batches(b0.val), _batches(b2.val))


def test_cifar10_download_verify_extract(tmp_path) -> None:
    url, md5 = make_cifar10_archive(tmp_path / "src", n_train=50, n_test=20)
    b = cifar10(root=str(tmp_path / "data"), url=url, md5=md5, batch_size=10, seed=0)
    assert b.class_names[0] == "airplane" and len(b.class_names) == 10
    assert b.train.num_samples == 50 and b.val.num_samples == 20
    x, _ = next(b.train.iter_from(0))
    assert x.shape == (10, 3, 32, 32)
    # Second build reuses the extracted folder (no download).
    b2 = cifar10(root=str(tmp_path / "data"), url="file:///nonexistent.tar.gz", md5=md5, batch_size=10, seed=0)
    assert _same(_batches(b.val), _batches(b2.val))


def test_yaml_instantiates(tmp_path, monkeypatch) -> None:
    url, md5 = make_cifar10_archive(tmp_path / "src")
    monkeypatch.setenv("RESNET_DATA", str(tmp_path / "data"))
    from omegaconf import OmegaConf

    for name, extra in (("shapes", {"num_train": 64, "num_val": 16}), ("cifar10", {"url": url, "md5": md5})):
        cfg = OmegaConf.merge(dataset_config(name), extra)
        bundle = instantiate(cfg)(device="cpu", seed=0, rank=0, world_size=1)
        assert isinstance(bundle, DataBundle) and bundle.summary.startswith(name)


def test_eval_transform_on_pil() -> None:
    from PIL import Image

    tf = build_eval_transform(resize=36, crop=32, mean=[0.5] * 3, std=[0.5] * 3)
    out = tf(Image.new("RGBA", (50, 40), (255, 0, 0, 0)))
    assert out.shape == (3, 32, 32) and torch.allclose(out, torch.ones_like(out))  # transparent -> white
