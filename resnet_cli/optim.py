"""Optimizer parameter groups and learning-rate schedules built from config factories."""

from __future__ import annotations

import functools
import inspect
import logging
from typing import Any, Callable

import torch
from torch import nn

from resnet_cli.errors import UserError, first_line

log = logging.getLogger(__name__)

# Runtime arguments a scheduler may need, filled in when its constructor takes them
# and the config left them out. Units follow the scheduler's `interval`.
_LENGTH_ARGS = ("total_steps", "T_max", "total_iters")


def param_groups(model: nn.Module, *, weight_decay_norm_bias: bool, backbone_lr_scale: float) -> list[dict]:
    """Split parameters into groups: optional no-decay for norms/biases, optional backbone lr scale."""
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    head = {id(p) for p in _classifier(model).parameters()} if backbone_lr_scale != 1.0 else set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if not p.requires_grad:
                continue
            # Norm scales and biases are 1-D; decaying them only fights the normalisation.
            no_decay = not weight_decay_norm_bias and p.ndim <= 1
            in_backbone = bool(head) and id(p) not in head
            groups.setdefault((no_decay, in_backbone), []).append(p)
    out = []
    for (no_decay, in_backbone), params in groups.items():
        group: dict = {"params": params, "lr_scale": backbone_lr_scale if in_backbone else 1.0}
        if no_decay:
            group["weight_decay"] = 0.0
        out.append(group)
    return out


def _classifier(model: nn.Module) -> nn.Module:
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Module):
        raise ValueError(f"{type(model).__name__} has no `fc` classifier; trainer.backbone_lr_scale needs one")
    return fc


def plain_factory(factory: Callable) -> Callable:
    """The factory with OmegaConf lists and dicts among its keywords turned into plain Python ones.

    Optimizers keep some arguments as given (torch 2.6 stores Adam's `betas` ListConfig in its
    param_groups, later releases a tuple), and a checkpoint must hold only what weights_only loading accepts.
    """
    if not isinstance(factory, functools.partial):
        return factory
    from omegaconf import Container, OmegaConf

    keywords = {k: OmegaConf.to_container(v, resolve=True) if isinstance(v, Container) else v
                for k, v in factory.keywords.items()}
    return functools.partial(factory.func, *factory.args, **keywords)


def build_optimizer(factory: Callable, groups: list[dict]) -> torch.optim.Optimizer:
    """Call the optimizer factory (a functools.partial from the config) on the param groups."""
    factory = plain_factory(factory)
    base_lr = _keyword(factory, "lr")
    if base_lr is not None:
        for g in groups:
            if g["lr_scale"] != 1.0:
                g["lr"] = base_lr * g["lr_scale"]
    return factory(groups)


def build_scheduler(factory: Callable, optimizer: torch.optim.Optimizer, *, interval: str,
                    steps_per_epoch: int, epochs: int, warmup_epochs: float = 0.0, goal: str = "max"):
    """Build the schedule in units of `interval` (step|epoch), with an optional linear warm-up.

    `goal` (max|min) is whether the monitored metric should rise or fall: a metric-driven
    schedule (ReduceLROnPlateau) takes it as its `mode` unless the config sets one.
    """
    if interval not in ("step", "epoch"):
        raise ValueError(f"scheduler.interval must be step or epoch, got {interval!r}")
    factory = plain_factory(factory)  # e.g. MultiStepLR's milestones: into the checkpoint as a plain list
    per_epoch = steps_per_epoch if interval == "step" else 1
    total = max(1, epochs * per_epoch)
    warmup = int(round(warmup_epochs * per_epoch))
    func = getattr(factory, "func", factory)
    params = inspect.signature(func).parameters
    kwargs = {name: max(1, total - warmup) for name in _LENGTH_ARGS
              if name in params and _keyword(factory, name) is None}
    if steps_on_metric(func):
        kwargs.update(_metric_mode(factory, func, interval, warmup, goal))
    max_lr = _keyword(factory, "max_lr")
    if max_lr is not None and any(g.get("lr_scale", 1.0) != 1.0 for g in optimizer.param_groups):
        kwargs["max_lr"] = [max_lr * g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    if warmup and "max_lr" in params:
        log.warning("trainer.warmup_epochs is ignored: %s has its own warm-up phase", func.__name__)
        warmup = 0
        kwargs = {k: (total if k in _LENGTH_ARGS else v) for k, v in kwargs.items()}
    if "pct_start" in params and "three_phase" in params:  # OneCycleLR and its subclasses
        span = kwargs.get("total_steps") or _keyword(factory, "total_steps") or \
            (_keyword(factory, "epochs") or 0) * (_keyword(factory, "steps_per_epoch") or 0)
        pct = _keyword(factory, "pct_start")
        pct = float(pct if pct is not None else params["pct_start"].default)
        safe = one_cycle_pct_start(int(span), pct, bool(_keyword(factory, "three_phase")))
        if safe is not None:
            log.warning("scheduler.pct_start=%g leaves a warm-up of %.2f steps in a one-cycle of %d steps; using "
                        "pct_start=%.4f (%s)", pct, pct * span, span, safe,
                        "a warm-up of %d steps" % round(safe * span) if safe * span >= 1 else "annealing only")
            kwargs["pct_start"] = safe
    try:
        main = factory(optimizer, **kwargs)
    except (ValueError, TypeError) as exc:  # torch checks its own arguments (e.g. ReduceLROnPlateau's factor < 1)
        raise UserError(f"scheduler: {func.__name__} refused its arguments: {first_line(exc)}") from exc
    if not warmup:
        return main
    start = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1e-3, end_factor=1.0, total_iters=warmup)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [start, main], milestones=[warmup])


def steps_on_metric(scheduler: Any) -> bool:
    """Whether a scheduler (class or instance) steps on a validation metric, as ReduceLROnPlateau does."""
    step = getattr(scheduler, "step", None)
    return step is not None and "metrics" in inspect.signature(step).parameters


def _metric_mode(factory: Callable, func: Callable, interval: str, warmup: int, goal: str) -> dict:
    # The metric exists once per epoch, and SequentialLR (the warm-up) steps its parts without one.
    name = func.__name__
    if interval != "epoch":
        raise UserError(f"scheduler.interval={interval}: {name} steps on the validation metric, which exists "
                        f"once per epoch; set scheduler.interval=epoch")
    if warmup:
        raise UserError(f"trainer.warmup_epochs cannot precede {name} (it steps on the validation metric); "
                        f"set trainer.warmup_epochs=0")
    mode = _keyword(factory, "mode")
    if mode is not None and mode != goal:
        raise UserError(f"scheduler.mode={mode} contradicts the monitored metric, which should "
                        f"{'rise' if goal == 'max' else 'fall'} (mode {goal}); leave scheduler.mode out: it "
                        f"follows trainer.monitor")
    return {"mode": goal} if "mode" in inspect.signature(func).parameters else {}


def lr_by_role(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The learning rates to log: `lr` is the head's; under trainer.backbone_lr_scale also lr/backbone and lr/head.

    A group's role is read from its `lr_scale` (1 for the head), which checkpoints keep.
    """
    head = backbone = None
    for g in optimizer.param_groups:
        if g.get("lr_scale", 1.0) == 1.0:
            head = g["lr"] if head is None else head
        elif backbone is None:
            backbone = g["lr"]
    if head is None or backbone is None:
        return {"lr": head if head is not None else backbone}
    return {"lr": head, "lr/backbone": backbone, "lr/head": head}


def one_cycle_pct_start(total: int, pct: float, three_phase: bool = False) -> float | None:
    """A pct_start for OneCycleLR that gives each phase at least one step of `total`, or None when `pct` does.

    torch's OneCycleLR ends the warm-up at step pct*total - 1 (three-phase: the second phase at
    2*pct*total - 2, the last at total - 1) and divides by each phase's length: a warm-up of
    exactly one step (pct*total == 1, e.g. 4 steps at the default 0.25) is a ZeroDivisionError,
    and a shorter one never reaches max_lr. So the warm-up gets a whole number of steps, at least
    2 (its first step runs at the initial lr, its last at max_lr), with room for the rest. A run
    too short even for that (2 steps; 3 with three phases) anneals only: the warm-up ends before
    step 0, the lr starts near max_lr and ends at the floor, as the schedule promises.
    """
    if total < 1:
        return None
    warm = pct * total
    tail = total + 1 - 2 * warm if three_phase else total - warm  # the last phase's length
    if warm >= 2 and tail > 0:
        return None
    longest = total // 2 if three_phase else total - 1
    if longest >= 2:
        return min(max(round(warm), 2), longest) / total
    return 0.5 / total  # warm-up ends at step -0.5: annealing only, no phase of zero length


def _keyword(factory: Callable, name: str):
    return getattr(factory, "keywords", {}).get(name)


def describe_recipe(optimizer: torch.optim.Optimizer, scheduler, batch: int, epochs: int, steps_per_epoch: int) -> str:
    """One phrase: optimizer, its lr and weight decay, the schedule and its peak, batch, epochs and steps."""
    defaults = optimizer.defaults
    main = getattr(scheduler, "_schedulers", [scheduler])[-1]  # SequentialLR: the schedule after warm-up
    # OneCycleLR keeps its peak in each group's max_lr; every scheduler keeps the start in initial_lr.
    peak = max(g.get("max_lr", g.get("initial_lr", g["lr"])) for g in optimizer.param_groups)
    return (f"{type(optimizer).__name__} lr {defaults.get('lr', 0.0):g} wd {defaults.get('weight_decay', 0.0):g}, "
            f"{type(main).__name__} peak {peak:g}, batch {batch}, {epochs} epochs x {steps_per_epoch} steps")
