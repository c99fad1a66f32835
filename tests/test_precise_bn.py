"""BatchNorm statistics re-estimated before validation (trainer.precise_bn_images)."""

from __future__ import annotations

import torch
from torch import nn

from resnet_cli import checkpoint, engine
from resnet_cli.data.synthetic import shapes
from resnet_cli.inference import rebuild
from resnet_cli.runtime import Runtime

CPU = Runtime(torch.device("cpu"), "fp32", False)


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running_" in k}


def test_recalibration_is_the_average_of_the_calibration_batches():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)
    model = nn.Sequential(conv, bn, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    bn.running_mean.fill_(50.0)  # stale statistics, as after a few high-lr steps
    bn.running_var.fill_(1e-4)
    batches = [(torch.randn(8, 3, 10, 10) * (i + 1), torch.zeros(8, dtype=torch.long)) for i in range(3)]

    assert engine.recalibrate_bn(model, batches, CPU)

    with torch.no_grad():
        feats = [conv(x) for x, _ in batches]
    mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
    var = torch.stack([f.transpose(0, 1).flatten(1).var(1) for f in feats]).mean(0)  # unbiased, per batch
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-5)
    assert not model.training  # the caller's mode is kept


def test_a_model_without_batchnorm_is_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert not engine.recalibrate_bn(model, [(torch.randn(2, 3, 5, 5), torch.zeros(2))], CPU)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_images_are_fixed_unaugmented_and_the_same_on_every_rank_and_path():
    kw = dict(num_train=96, num_val=16, image_size=16, batch_size=16, val_batch_size=32, seed=3)
    mem = shapes(loader="memory", **kw)
    ranks = [shapes(loader="memory", rank=r, world_size=2, **kw) for r in (0, 1)]
    dl = shapes(loader="dataloader", num_workers=0, **kw)
    batches = lambda b: torch.cat([x for x, _ in b.calibration(40).iter_from(0)])  # noqa: E731
    ref = batches(mem)
    assert ref.shape == (40, 3, 16, 16)
    mem.train.set_epoch(5)  # the training epoch does not move them
    torch.testing.assert_close(batches(mem), ref)
    for other in (*ranks, dl):
        torch.testing.assert_close(batches(other), ref, rtol=0, atol=1e-6)
    # The eval view: the whole (unpadded, unflipped) training image, normalised as validation is.
    train_images = torch.cat([x for x, _ in shapes(loader="memory", augment="none", drop_last=False,
                                                   **kw).train.iter_from(0)])
    assert all(any(torch.allclose(img, t, atol=1e-6) for t in train_images) for img in ref[:5])


def _recalibrated(run_dir, images: int) -> tuple[dict, dict]:
    """The checkpoint's BN buffers, and those recomputed from its weights on `images` calibration images."""
    from hydra.utils import instantiate

    ckpt = checkpoint.load(run_dir / "last.pt", map_location="cpu")
    model = rebuild(ckpt, run_dir)[0].to(memory_format=torch.channels_last)
    saved = _bn_buffers(model)
    config = ckpt["config"]
    bundle = instantiate(config["dataset"])(device="cpu", seed=int(config["trainer"]["seed"]))
    engine.recalibrate_bn(model, bundle.calibration(images).iter_from(0), Runtime(torch.device("cpu"), "fp32", True))
    return saved, _bn_buffers(model)


def test_the_saved_weights_carry_the_statistics_they_were_validated_with(train_inproc):
    # fp32, as the recomputation below: the statistics are compared to 1e-4.
    _, run = train_inproc("model=resnet20", "trainer.limit_train_batches=3", "trainer.precise_bn_images=48",
                          "trainer.precision=fp32")
    saved, recomputed = _recalibrated(run, 48)
    for key in saved:
        torch.testing.assert_close(saved[key], recomputed[key], rtol=1e-4, atol=1e-5)

    _, run = train_inproc("model=resnet20", "trainer.limit_train_batches=3", "trainer.precise_bn_images=0",
                          "trainer.precision=fp32")
    saved, recomputed = _recalibrated(run, 48)
    assert not all(torch.allclose(saved[k], recomputed[k], rtol=1e-4, atol=1e-5) for k in saved)


def test_calibration_is_at_most_a_quarter_of_a_small_training_set():
    # The re-estimate is a forward pass: over 256 of 320 images it cost a third of the epoch's training.
    assert engine.calibration_images(256, 320) == 80
    assert engine.calibration_images(256, 1024) == 256 and engine.calibration_images(256, 50_000) == 256
    assert engine.calibration_images(256, 100) == 64 and engine.calibration_images(256, 40) == 40
    assert engine.calibration_images(48, 256) == 48 and engine.calibration_images(0, 5000) == 0
