"""Builds a run's parts from config nodes: the one place train, lr-find, the tools, tests and benchmarks get them.

    rt = build_runtime(cfg.trainer)                      # device, precision, memory format, seeds, processes
    data = build_data(cfg, rt)                            # the dataset's DataBundle (and the thread budget)
    raw, model = build_training_model(cfg, rt, classes, size)   # or build_model(...) for inference
    parts = build_parts(cfg, rt, raw, model, steps_per_epoch=n)  # optimizer, scheduler, scaler, loss, EMA
    settings = build_settings(cfg, rt)                    # how each optimizer step is taken
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from torch import nn

if TYPE_CHECKING:
    import torch

    from resnet_cli.data import DataBundle
    from resnet_cli.engine import Parts, Settings
    from resnet_cli.runtime import Runtime


def build_runtime(trainer_cfg: Any) -> "Runtime":
    """Resolve where and how the run executes (device, precision, memory format, seed); joins torchrun's group."""
    from resnet_cli import runtime

    return runtime.setup(trainer_cfg)


def build_data(cfg: Any, rt: "Runtime") -> "DataBundle":
    """The configured dataset's train and val sources for this process; sets the compute threads beside its workers."""
    from hydra.utils import instantiate

    from resnet_cli.runtime import resolve_threads

    bundle = instantiate(cfg.dataset)(device=rt.device, seed=int(cfg.trainer.seed), rank=rt.rank,
                                      world_size=rt.world_size)
    _, rt.why["threads"] = resolve_threads(cfg.trainer.num_threads, bundle.workers)
    return bundle


def close_data(bundle: "DataBundle | None") -> None:
    """Shut down a bundle's DataLoader workers (they ignore stop signals, so they never die mid-batch)."""
    for source in (getattr(bundle, "train", None), getattr(bundle, "val", None), getattr(bundle, "test", None)):
        close = getattr(source, "close", None)
        if close is not None:
            close()


def build_model(model_cfg: Mapping[str, Any], num_classes: int, image_size: int | None = None,
                *, fetch_weights: bool = True) -> nn.Module:
    """Instantiate the model node with `num_classes` outputs.

    `image_size` is the resolved training size (the config may say `auto`, which only the
    data can resolve); it reaches builders that read it (stem=auto). Without `fetch_weights`
    the pretrained source is not loaded (a checkpoint's own weights follow).
    """
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    # enum_to_str: a typed node's choices (stem, shortcut, head, ...) reach the builders as the plain words.
    cfg = (OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True) if isinstance(model_cfg, DictConfig)
           else dict(model_cfg))
    if image_size is not None and "image_size" in cfg:
        cfg["image_size"] = int(image_size)
    if not fetch_weights and cfg.get("pretrained"):
        cfg["pretrained"] = False
    return instantiate(cfg)(num_classes=num_classes)


def build_training_model(cfg: Any, rt: "Runtime", num_classes: int, image_size: int) -> tuple[nn.Module, nn.Module]:
    """The model to train on the run's device and memory format: (the bare module, what runs the forward pass).

    The second is the first wrapped as configured: SyncBatchNorm and DDP under torchrun, torch.compile.
    """
    import torch

    from resnet_cli.errors import UserError

    tcfg = cfg.trainer
    raw = build_model(cfg.model, num_classes, image_size).to(rt.device, memory_format=rt.memory_format)
    _avoid_bf16_grad_hazard(raw, rt, image_size, tcfg.precision)
    if rt.distributed and tcfg.sync_batchnorm:
        if rt.device.type != "cuda":
            raise UserError("trainer.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm has no "
                            "CPU/Gloo kernel); set it to false on CPU")
        raw = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw)
    model = raw
    if rt.distributed:
        ids = [rt.device.index] if rt.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if tcfg.compile:
        model = torch.compile(model)
    _refuse_batch_of_one(cfg, raw)
    return raw, model


def _refuse_batch_of_one(cfg: Any, raw: nn.Module) -> None:
    # BatchNorm cannot train on one image per batch (torch raises mid-epoch at 1x1 maps; elsewhere the
    # statistics of one image are noise): an explicit batch of one is refused at start-up, not hours in.
    from resnet_cli.errors import UserError

    if str(cfg.dataset.get("batch_size")) == "1" and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in raw.modules()):
        raise UserError(f"dataset.batch_size=1: model={cfg.model.get('name', '?')} has BatchNorm layers, which "
                        f"cannot train on one image per batch; use dataset.batch_size=2 or more")


def _avoid_bf16_grad_hazard(raw: nn.Module, rt: "Runtime", image_size: int, asked: Any) -> None:
    # CPU bf16 gives NaN weight gradients for strided convs on 1x1 maps (runtime.bf16_grad_hazard):
    # `auto` trains such a net in fp32 and says why; an explicit bf16 is kept, with a warning.
    import logging

    from resnet_cli.runtime import bf16_grad_hazard

    if rt.precision != "bf16" or rt.device.type != "cpu":
        return
    conv = bf16_grad_hazard(raw, image_size, rt.device)
    if conv is None:
        return
    if str(getattr(asked, "value", asked)) == "auto":
        rt.precision = "fp32"
        rt.why["precision"] = f"auto: CPU bf16 weight gradients of {conv} on 1x1 maps at {image_size} px are unreliable"
    else:
        logging.getLogger("resnet_cli").warning(
            "trainer.precision=bf16: %s sees 1x1 maps at %d px, where CPU bf16 weight gradients can come out NaN; "
            "use trainer.precision=auto (fp32 here) or a larger dataset.image_size", conv, image_size)


def build_optimizer(cfg: Any, model: nn.Module) -> "torch.optim.Optimizer":
    """The configured optimizer over the model's parameter groups (no-decay norms/biases, backbone lr scale)."""
    from hydra.utils import instantiate

    from resnet_cli import optim

    groups = optim.param_groups(model, weight_decay_norm_bias=cfg.trainer.weight_decay_norm_bias,
                                backbone_lr_scale=cfg.trainer.backbone_lr_scale)
    return optim.build_optimizer(instantiate(cfg.optimizer), groups)


def build_scheduler(cfg: Any, optimizer: "torch.optim.Optimizer", steps_per_epoch: int) -> Any:
    """The configured schedule (with trainer.warmup_epochs), its length in the units of scheduler.interval."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from resnet_cli import optim

    tcfg = cfg.trainer
    node = OmegaConf.to_container(cfg.scheduler, resolve=True)
    interval = node.pop("interval", "epoch")
    return optim.build_scheduler(instantiate(node), optimizer, interval=interval, steps_per_epoch=steps_per_epoch,
                                 epochs=int(tcfg.epochs), warmup_epochs=float(tcfg.warmup_epochs),
                                 goal=_goal(tcfg.monitor))


def build_parts(cfg: Any, rt: "Runtime", raw_model: nn.Module, model: nn.Module, *, steps_per_epoch: int,
                schedule: Callable[["torch.optim.Optimizer"], Any] | None = None, ema: bool = True,
                class_weights: "Sequence[float] | None" = None) -> "Parts":
    """Optimizer, scheduler, loss scaler, loss and EMA for a model (from build_training_model).

    `schedule(optimizer)` replaces the configured scheduler (the LR finder's sweep); `ema=False` skips
    the averaged copy where nothing evaluates it; `class_weights` weight the loss (dataset.balance=loss:
    class_loss_weights of the data).
    """
    import torch

    from resnet_cli.engine import Parts

    tcfg = cfg.trainer
    optimizer = build_optimizer(cfg, raw_model)
    scheduler = schedule(optimizer) if schedule is not None else build_scheduler(cfg, optimizer, steps_per_epoch)
    averaged = None
    if ema and tcfg.ema_decay:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        averaged = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(float(tcfg.ema_decay)),
                                 use_buffers=True)
    return Parts(model=model, raw_model=raw_model, optimizer=optimizer, scheduler=scheduler,
                 scaler=torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16"),
                 criterion=torch.nn.CrossEntropyLoss(
                     weight=torch.tensor(class_weights, dtype=torch.float32, device=rt.device) if class_weights else None,
                     label_smoothing=float(tcfg.label_smoothing)), ema=averaged)


def class_loss_weights(data: "DataBundle") -> list[float] | None:
    """dataset.balance=loss: each class weighted n / (classes x its count) (scikit-learn's "balanced"), else None."""
    if data.balance != "loss":
        return None
    counts = [max(int(c), 1) for c in data.class_counts]
    return [sum(counts) / (len(counts) * c) for c in counts]


def build_settings(cfg: Any, rt: "Runtime", *, interval: str | None = None) -> "Settings":
    """How each optimizer step is taken: accumulation, clipping, when a time-based schedule steps."""
    from resnet_cli.engine import Settings

    tcfg = cfg.trainer
    return Settings(rt=rt, interval=interval or str(cfg.scheduler.get("interval", "epoch")),
                    accum_steps=max(1, int(tcfg.grad_accum_steps)), grad_clip_value=float(tcfg.grad_clip_value),
                    grad_clip_norm=float(tcfg.grad_clip_norm))


def _goal(monitor: Any) -> str:
    # Accuracies should rise, the loss fall (auto resolves to an accuracy).
    from resnet_cli.config import Monitor

    return Monitor(str(monitor)).goal
