"""The training engine's recipe features and guarantees, on tiny data through the real runner."""

from __future__ import annotations

import functools
import logging
import math
import os
import sys

import pytest
import torch

from conftest import TINY, read_metrics

STEPS = 256 // 32  # optimizer steps per epoch with TINY


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def poison_loss(monkeypatch, at_call: int, before=None) -> None:
    """Make engine.compute_loss return NaN on its `at_call`-th call (1-based); `before()` runs just then."""
    from resnet_cli import engine

    real, calls = engine.compute_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        logits, loss = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            if before is not None:
                before()
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(engine, "compute_loss", poisoned)


def test_nan_at_step_k_stops_with_exit_3_naming_it_and_checkpoints_untouched(tmp_path, monkeypatch, capsys,
                                                                             keep_logging):
    from resnet_cli import train

    run = tmp_path / "run"
    k = 3  # the 3rd step of epoch 2
    snapshot = {}
    poison_loss(monkeypatch, STEPS + k, lambda: snapshot.update(
        best=(run / "best.pt").read_bytes(), last=(run / "last.pt").read_bytes()))
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    monkeypatch.setattr(sys, "argv", ["resnet-train", *TINY, "model=simple_cnn", "trainer.epochs=2",
                                      f"hydra.run.dir={run}", f"output_root={tmp_path / 'outputs'}"])
    with pytest.raises(SystemExit) as info:
        train.main()
    assert info.value.code == train.EXIT_DIVERGED == 3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and f"non-finite loss at epoch 2, step {k};" in err[0] and str(run / "last.pt") in err[0], err
    # Non-finite weights reached neither file: both hold epoch 1 byte for byte.
    assert (run / "best.pt").read_bytes() == snapshot["best"]
    assert (run / "last.pt").read_bytes() == snapshot["last"]


def test_nan_at_a_checkpoint_step_is_named_and_never_saved(train_inproc, monkeypatch, tmp_path):
    from resnet_cli.train import Diverged

    run = tmp_path / "nan"
    poison_loss(monkeypatch, 4)
    with pytest.raises(Diverged, match=r"non-finite loss at epoch 1, step 4;.*last good checkpoint: \S*last.pt"):
        train_inproc("model=simple_cnn", "trainer.checkpoint_every_n_steps=2", run_dir=run)
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["global_step"] == 2 and _all_finite(ck["model"])  # the step-2 checkpoint, not step 4's weights
    assert not (run / "best.pt").exists()


def test_max_bad_steps_skips_bad_steps_and_finishes(train_inproc, monkeypatch):
    poison_loss(monkeypatch, 5)
    _, run = train_inproc("model=simple_cnn", "trainer.max_bad_steps=1")
    ck = torch.load(run / "last.pt", weights_only=True)
    assert ck["finished"] and ck["bad_steps"] == 1
    assert ck["global_step"] == STEPS - 1  # the bad batch made no optimizer step
    assert _all_finite(ck["model"])


def test_ema_is_checkpointed_evaluated_and_logged(train_inproc):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = train_inproc("model=resnet20", "trainer.ema_decay=0.5", "trainer.epochs=2")
    ck = torch.load(run / "last.pt", weights_only=True)
    ema = ck["ema"]
    assert int(ema["n_averaged"]) == 2 * STEPS
    # The EMA lags the weights (parameters and, with use_buffers, BN statistics alike).
    assert not torch.equal(ema["module.fc.weight"], ck["model"]["fc.weight"])
    assert not torch.equal(ema["module.bn1.running_mean"], ck["model"]["bn1.running_mean"])
    history = read_metrics(run)["history"]
    assert all(0.0 <= r["ema_val_acc"] <= 1.0 for r in history)
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val_ema/acc")] == pytest.approx([r["ema_val_acc"] for r in history])


def test_grad_accumulation_matches_the_doubled_batch(train_inproc):
    """accum 2 x batch 16 == batch 32 on a BN-free model: the same samples, the same updates."""
    # fp32: the two are equal up to fp32 rounding; bf16 (auto on AVX-512 BF16 CPUs) rounds each half-batch apart.
    common = ("model=simple_cnn", "trainer.deterministic=true", "optimizer=sgd", "scheduler=cosine",
              "trainer.precision=fp32")
    _, big = train_inproc(*common, "dataset.batch_size=32")
    _, acc = train_inproc(*common, "dataset.batch_size=16", "trainer.grad_accum_steps=2")
    a = torch.load(big / "last.pt", weights_only=True)
    b = torch.load(acc / "last.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == STEPS
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert read_metrics(acc)["history"][0]["train_loss"] == pytest.approx(read_metrics(big)["history"][0]["train_loss"],
                                                                        rel=1e-5)


def _lrs(scheduler, optimizer, n: int) -> list[float]:
    out = []
    for _ in range(n):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_linear_warmup_then_the_schedule():
    from resnet_cli.optim import build_scheduler

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    factory = functools.partial(torch.optim.lr_scheduler.CosineAnnealingLR, eta_min=0.0)
    sched = build_scheduler(factory, opt, interval="step", steps_per_epoch=4, epochs=3, warmup_epochs=1)
    lrs = _lrs(sched, opt, 12)
    warm = [0.1 * (1e-3 + (1 - 1e-3) * i / 4) for i in range(4)]
    cosine = [0.05 * (1 + math.cos(math.pi * j / 8)) for j in range(8)]
    assert lrs == pytest.approx(warm + cosine, rel=1e-6, abs=1e-9)

    # An epoch-interval schedule warms up in epochs.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    step = functools.partial(torch.optim.lr_scheduler.StepLR, step_size=2, gamma=0.5)
    sched = build_scheduler(step, opt, interval="epoch", steps_per_epoch=4, epochs=6, warmup_epochs=2)
    assert _lrs(sched, opt, 6) == pytest.approx([1e-4, 0.1 * (1e-3 + (1 - 1e-3) / 2), 0.1, 0.1, 0.05, 0.05])


def test_no_weight_decay_on_norm_and_bias_parameters(train_inproc):
    from resnet_cli.models import create_model
    from resnet_cli.optim import param_groups

    model = create_model("resnet20", num_classes=10, image_size=16)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, weight_decay_norm_bias=False, backbone_lr_scale=1.0)
    no_decay = [names[id(p)] for g in groups if g.get("weight_decay") == 0.0 for p in g["params"]]
    decay = [names[id(p)] for g in groups if "weight_decay" not in g for p in g["params"]]
    assert "bn1.weight" in no_decay and "fc.bias" in no_decay and "fc.weight" in decay
    assert all(model.get_parameter(n).ndim <= 1 for n in no_decay)
    assert all(model.get_parameter(n).ndim > 1 for n in decay)
    assert sorted(no_decay + decay) == sorted(names.values())

    # Through the runner: the optimizer's groups carry weight decay 0 for exactly those parameters.
    _, run = train_inproc("model=resnet20", "optimizer=sgd", "optimizer.weight_decay=0.01",
                          "trainer.weight_decay_norm_bias=false", "trainer.limit_train_batches=1")
    saved = torch.load(run / "last.pt", weights_only=True)["optimizer"]["param_groups"]
    assert {g["weight_decay"]: len(g["params"]) for g in saved} == {0.0: len(no_decay), 0.01: len(decay)}


def test_early_stopping_after_patience_epochs_without_improvement(train_inproc):
    # An lr far below float resolution (optimizer.lr=0 is refused): the weights never change, so only the
    # first epoch improves.
    _, run = train_inproc("model=simple_cnn", "optimizer=sgd", "optimizer.lr=1e-30", "scheduler=none",
                          "trainer.epochs=10", "trainer.early_stop_patience=2", "trainer.monitor=val_loss")
    metrics = read_metrics(run)
    assert metrics["epochs"] == 3 and metrics["best_epoch"] == 1 and metrics["finished"]
    assert torch.load(run / "last.pt", weights_only=True)["finished"]


def test_top_k_keeps_the_k_best_epochs(train_inproc):
    _, run = train_inproc("model=simple_cnn", "optimizer=adam", "scheduler=none", "trainer.epochs=3",
                          "trainer.save_top_k=2", "trainer.monitor=val_loss")
    history = read_metrics(run)["history"]
    best_two = sorted(history, key=lambda r: r["val_loss"])[:2]
    kept = sorted((run / "topk").glob("*.pt"))
    assert len(kept) == 2
    got = {torch.load(p, weights_only=True)["epoch"] for p in kept}
    assert got == {r["epoch"] for r in best_two}


def test_precision_and_memory_format_auto_follow_the_hardware(monkeypatch):
    from resnet_cli import runtime
    from resnet_cli.errors import UserError

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)
    assert runtime.resolve_precision("auto", cpu) == "bf16"
    assert runtime.resolve_channels_last("auto", cpu, "bf16") is True
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: False)
    assert runtime.resolve_precision("auto", cpu) == "fp32"
    assert runtime.resolve_channels_last("auto", cpu, "fp32") is True  # oneDNN: NHWC is faster in fp32 too (bench_memory_format)
    assert runtime.resolve_channels_last("true", cpu, "fp32") is True
    with pytest.raises(UserError, match="trainer.precision=fp16"):
        runtime.resolve_precision("fp16", cpu)
    rt = runtime.Runtime(cpu, "bf16", True)
    assert "precision bf16" in rt.describe() and "channels_last" in rt.describe()
    with rt.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


def test_label_smoothing_raises_the_loss_floor():
    """CrossEntropyLoss(label_smoothing) as the runner builds it: a perfect prediction still costs."""
    from resnet_cli import engine
    from resnet_cli.runtime import Runtime

    rt = Runtime(torch.device("cpu"), "fp32", False)
    logits = torch.tensor([[20.0, 0.0, 0.0]])
    model = lambda x: logits  # noqa: E731
    _, plain = engine.compute_loss(model, None, torch.tensor([0]), torch.nn.CrossEntropyLoss(), rt)
    _, smooth = engine.compute_loss(model, None, torch.tensor([0]),
                                    torch.nn.CrossEntropyLoss(label_smoothing=0.3), rt)
    assert plain.item() < 1e-6 < 1.0 < smooth.item()


def test_tensorboard_steps_continue_without_duplicates_after_a_crash_and_resume(train_inproc, monkeypatch, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resnet_cli import engine

    real, calls = engine.compute_loss, {"n": 0}

    def crash_at_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # steps 1..6 are logged, the last checkpoint is step 4
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    run = tmp_path / "crashy"
    args = ("model=simple_cnn", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=4")
    monkeypatch.setattr(engine, "compute_loss", crash_at_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_inproc(*args, run_dir=run)
    assert torch.load(run / "last.pt", weights_only=True)["global_step"] == 4
    monkeypatch.setattr(engine, "compute_loss", real)
    # TensorBoard orders event files by name (start time, host, pid, counter). A resumed process starts
    # later; in this one process, make the second file's name say so instead of sleeping.
    import types

    import tensorboard.summary.writer.event_file_writer as efw

    later = efw.time.time
    monkeypatch.setattr(efw, "time", types.SimpleNamespace(time=lambda: later() + 3600))
    train_inproc(*args, "trainer.resume=auto", run_dir=run)
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss_step")] == list(range(1, STEPS + 1))
    assert [e.step for e in acc.Scalars("val/acc")] == [STEPS]


class _FakeEvent:
    """Stands in for torch.cuda.Event: a flag copy that has or has not reached the host yet."""

    def __init__(self, ready: bool):
        self.ready, self.waited = ready, False

    def query(self) -> bool:
        return self.ready

    def synchronize(self) -> None:
        self.waited = self.ready = True


def test_device_finiteness_flags_are_read_without_waiting_until_one_step_late():
    from resnet_cli import engine

    guard = engine.LossGuard(0, engine.Progress())
    bad = _FakeEvent(ready=False)
    guard.pending.append((torch.tensor(False), bad, 2, 3))
    guard.check()  # the copy has not landed and only one step is queued: no wait, no verdict yet
    assert not bad.waited and len(guard.pending) == 1
    guard.pending.append((torch.tensor(True), _FakeEvent(ready=False), 2, 4))
    with pytest.raises(engine.NonFiniteLoss, match="epoch 2, step 3"):
        guard.check()  # the next step is queued: now the previous flag is awaited
    assert bad.waited and not guard.pending
    guard.pending.append((torch.tensor(False), _FakeEvent(ready=False), 3, 1))
    with pytest.raises(engine.NonFiniteLoss, match="epoch 3, step 1"):
        guard.check(wait=True)  # a logged step syncs anyway


def test_best_is_a_second_name_for_last_and_keeps_its_bytes(train_inproc):
    """best.pt is hard-linked to the last.pt it equals (one write, not two) and outlives last.pt's replacement."""
    from resnet_cli.fileio import atomic_link, atomic_write

    _, run = train_inproc("model=simple_cnn", "trainer.epochs=1")
    assert os.path.samefile(run / "best.pt", run / "last.pt")
    before = (run / "best.pt").read_bytes()
    atomic_write(run / "last.pt", b"a later epoch")
    assert (run / "best.pt").read_bytes() == before and (run / "last.pt").read_bytes() == b"a later epoch"
    atomic_link(run / "last.pt", run / "best.pt")
    assert (run / "best.pt").read_bytes() == b"a later epoch"


def test_bf16_auto_is_off_when_onednn_is_capped_below_avx512_bf16(monkeypatch):
    from resnet_cli import runtime

    # A CPU without AVX-512 BF16 (or one whose oneDNN kernels are pinned below it) must train in fp32:
    # emulated bf16 convolutions are several times slower than fp32 ones.
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert runtime.cpu_supports_bf16() is False
    assert runtime.resolve_precision("auto", torch.device("cpu")) == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert runtime.cpu_supports_bf16() is native  # a cap at or above bf16 leaves the hardware's answer


def test_bf16_auto_falls_back_to_fp32_where_a_strided_conv_sees_1x1_maps(train_inproc, monkeypatch, caplog):
    from resnet_cli import runtime
    from resnet_cli.models import create_model

    cpu = torch.device("cpu")
    # The ImageNet stem at 16 px leaves layer4's stride-2 3x3 conv a 1x1 map: oneDNN's bf16 weight
    # gradient there comes out NaN now and then. At 32 px, or with the CIFAR stem, nothing is flagged.
    assert runtime.bf16_grad_hazard(create_model("resnet50", 10, image_size=16, stem="imagenet"), 16, cpu) == \
        "layer4.0.conv2"
    assert runtime.bf16_grad_hazard(create_model("resnet50", 10, image_size=32, stem="imagenet"), 32, cpu) is None
    assert runtime.bf16_grad_hazard(create_model("resnet18", 10, image_size=32), 32, cpu) is None
    monkeypatch.setattr(runtime, "cpu_supports_bf16", lambda: True)  # as on an AVX-512 BF16 CPU, on any CPU
    caplog.set_level(logging.INFO, logger="resnet_cli")
    _, run = train_inproc("model=resnet50", "model.stem=imagenet", "dataset.num_train=16", "dataset.num_val=8",
                          "dataset.batch_size=4", "trainer.limit_train_batches=2")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("runtime: "))
    assert "precision fp32 (auto: CPU bf16 weight gradients of layer4.0.conv2 on 1x1 maps at 16 px" in line, line
    assert all(math.isfinite(r["train_loss"]) for r in read_metrics(run)["history"])
