"""The training and evaluation loops: one step, one epoch, one pass over a split."""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

from resnet_cli.runtime import Runtime


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite (and no more bad steps may be skipped)."""

    def __init__(self, epoch: int, step: int):
        # epoch: 1-based (as in the console table); step: 1-based batch within that epoch.
        super().__init__(f"non-finite loss at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


@dataclass
class Loop:
    """Everything one optimizer step needs, plus the counters that survive a resume."""

    model: nn.Module  # what runs the forward pass (may be DDP- or compile-wrapped)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    interval: str  # when the scheduler steps: "step" or "epoch"
    scaler: torch.amp.GradScaler
    rt: Runtime
    criterion: nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None = None
    grad_clip_value: float = 0.0
    grad_clip_norm: float = 0.0
    accum_steps: int = 1
    max_bad_steps: int = 0
    log_every: int = 20
    global_step: int = 0
    bad_steps: int = 0
    last_lr: float = 0.0  # the lr the latest optimizer step used (what logs should show)
    # "Loss is finite" flags of recent steps, oldest first: (flag, CUDA event or None, epoch, step).
    pending: deque = field(default_factory=deque)

    def note_finite(self, finite: torch.Tensor, epoch: int, step: int) -> None:
        """Queue a step's finiteness flag; on CUDA it travels to pinned host memory without a sync."""
        event = None
        if finite.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            finite = host
        self.pending.append((finite, event, epoch, step))

    def check_finite(self, wait: bool = False) -> None:
        """Raise NonFiniteLoss for the first queued step whose loss was not finite.

        CPU flags are read at once (no asynchrony to lose). CUDA flags are read when
        their copy has landed; without `wait` the host waits only for the previous
        step's flag while the current step is already queued, so the device never
        idles and a bad step stops the run one step later at most.
        """
        while self.pending:
            flag, event, epoch, step = self.pending[0]
            if event is not None and not wait and len(self.pending) <= 1 and not event.query():
                return
            if event is not None:
                event.synchronize()
            self.pending.popleft()
            if not bool(flag):
                self.pending.clear()
                raise NonFiniteLoss(epoch, step)


@dataclass
class Running:
    """Sums over the part of an epoch done so far, kept on the device (no per-step sync)."""

    loss: torch.Tensor
    correct: torch.Tensor
    count: int = 0
    extra: dict = field(default_factory=dict)

    @classmethod
    def zeros(cls, device: torch.device) -> "Running":
        """Empty sums on `device`."""
        return cls(torch.zeros((), device=device, dtype=torch.float64),
                   torch.zeros((), device=device, dtype=torch.int64))

    def state_dict(self) -> dict:
        """Plain form for the checkpoint."""
        return {"loss": self.loss.detach().cpu(), "correct": self.correct.detach().cpu(), "count": self.count}

    @classmethod
    def from_state(cls, state: dict | None, device: torch.device) -> "Running":
        """Inverse of state_dict (empty sums when there is none)."""
        if not state:
            return cls.zeros(device)
        return cls(state["loss"].to(device), state["correct"].to(device), int(state["count"]))

    def summary(self) -> dict:
        """Mean loss and accuracy over every process (one sync)."""
        t = torch.stack([self.loss, self.correct.double(), torch.tensor(float(self.count), device=self.loss.device,
                                                                       dtype=torch.float64)])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(t)
        loss, correct, count = t.tolist()
        count = max(count, 1.0)
        return {"loss": loss / count, "acc": correct / count}


def compute_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, criterion: nn.Module,
                 rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward pass under autocast; returns (logits, loss)."""
    with rt.autocast():
        logits = model(images)
        loss = criterion(logits, targets)
    return logits, loss


def to_device(batch: tuple[torch.Tensor, torch.Tensor], rt: Runtime) -> tuple[torch.Tensor, torch.Tensor]:
    """Move a batch to the device in the run's memory format (no-op when already there)."""
    images, targets = batch
    images = images.to(rt.device, non_blocking=True, memory_format=rt.memory_format)
    return images, targets.to(rt.device, non_blocking=True)


def _hard(targets: torch.Tensor) -> torch.Tensor:
    # Mixup/CutMix give soft targets: count a prediction right when it hits the dominant class.
    return targets.argmax(1) if targets.ndim == 2 else targets


def train_one_epoch(loop: Loop, batches: Iterable, epoch: int, *, start: int = 0, running: Running | None = None,
                    on_step: Callable[[int, Running, torch.Tensor], bool] | None = None,
                    progress=None) -> Running:
    """Train over `batches` (already positioned at batch `start`); returns the epoch's sums.

    `on_step(batches_done, running, loss)` runs after every optimizer step and may
    return True to stop early (preemption); it is where logging and mid-epoch
    checkpoints happen, so this function stays free of host-device syncs.
    """
    model, opt, rt = loop.model, loop.optimizer, loop.rt
    model.train()
    running = running or Running.zeros(rt.device)
    loop.pending.clear()
    # Gradients left by a previous epoch's incomplete accumulation window are dropped:
    # an epoch always starts a fresh window, so a resumed run sees the same windows.
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches, start=start):
        images, targets = to_device(batch, rt)
        # Windows count from the epoch's first batch, so a resume (always at a window's end) keeps them.
        window_ends = (i + 1) % loop.accum_steps == 0
        # Under DDP, all-reduce gradients only on the window's last micro-batch.
        with nullcontext() if window_ends or not hasattr(model, "no_sync") else model.no_sync():
            logits, loss = compute_loss(model, images, targets, loop.criterion, rt)
            loop.scaler.scale(loss / loop.accum_steps if loop.accum_steps > 1 else loss).backward()
        finite = torch.isfinite(loss.detach())
        if dist.is_available() and dist.is_initialized():
            # Ranks must agree on a bad step, to skip it or stop together (not hang in the next
            # collective); NCCL queues this on the stream without a host sync.
            finite = finite.to(torch.int32)
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            finite = finite.bool()
        if loop.max_bad_steps:
            # Skipping a bad step needs its verdict before the update: one sync per step, by request.
            if not bool(finite):
                loop.bad_steps += 1
                opt.zero_grad(set_to_none=True)
                if loop.bad_steps > loop.max_bad_steps:
                    raise NonFiniteLoss(epoch + 1, i + 1)
                continue
        else:
            # No per-step sync: on CUDA the flag is read once it has reached the host (see check_finite);
            # on the CPU it is read now, so a bad step never updates the weights.
            loop.note_finite(finite, epoch + 1, i + 1)  # 1-based, as the console shows them
            loop.check_finite()
        running.loss += loss.detach().double() * images.shape[0]
        running.correct += (logits.detach().argmax(1) == _hard(targets)).sum()
        running.count += images.shape[0]
        if not window_ends:
            continue
        _optimizer_step(loop)
        if progress is not None:
            progress.update(loop.accum_steps)
        if on_step is not None and on_step(i + 1, running, loss.detach()):
            break
    loop.check_finite(wait=True)
    return running


def _optimizer_step(loop: Loop) -> None:
    opt, scaler = loop.optimizer, loop.scaler
    if loop.grad_clip_value or loop.grad_clip_norm:
        scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        if loop.grad_clip_value:
            torch.nn.utils.clip_grad_value_(params, loop.grad_clip_value)
        if loop.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, loop.grad_clip_norm)
    loop.last_lr = opt.param_groups[0]["lr"]
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if loop.ema is not None:
        loop.ema.update_parameters(_unwrap(loop.model))
    if loop.interval == "step":
        loop.scheduler.step()
    loop.global_step += 1


def _unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DistributedDataParallel


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, rt: Runtime, *, limit: int = 0, num_classes: int = 0,
             collect: bool = False, keep_wrong: int = 16) -> dict:
    """Loss, top-1 (and top-5 when there are more than 5 classes) over a split.

    With `collect`, also returns per-sample predictions and targets (for the
    confusion matrix) and the `keep_wrong` most confidently misclassified images.
    """
    model.eval()
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    correct5 = torch.zeros((), device=rt.device, dtype=torch.int64)
    count = 0
    preds, targs = [], []
    wrong = {"conf": torch.empty(0), "pred": torch.empty(0, dtype=torch.long),
             "target": torch.empty(0, dtype=torch.long), "images": None}
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        images, targets = to_device(batch, rt)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
        pred = logits.argmax(1)
        correct += (pred == targets).sum()
        if num_classes > 5:
            correct5 += (logits.topk(5, dim=1).indices == targets[:, None]).any(1).sum()
        count += images.shape[0]
        if collect:
            conf = logits.softmax(1).max(1).values
            preds.append(pred.cpu()), targs.append(targets.cpu())
            _keep_most_confident_wrong(wrong, images, conf, pred, targets, keep_wrong)
    t = torch.stack([loss_sum, correct.double(), correct5.double(),
                     torch.tensor(float(count), device=rt.device, dtype=torch.float64)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    loss, c1, c5, n = t.tolist()
    n = max(n, 1.0)
    out = {"loss": loss / n, "acc": c1 / n}
    if num_classes > 5:
        out["top5"] = c5 / n
    if collect and preds:
        out["pred"], out["target"] = torch.cat(preds), torch.cat(targs)
        out["wrong"] = wrong
    return out


def _keep_most_confident_wrong(wrong: dict, images, conf, pred, targets, k: int) -> None:
    miss = (pred != targets).nonzero().flatten()
    if miss.numel() == 0:
        return
    imgs = images[miss].float().cpu()
    merged_conf = torch.cat([wrong["conf"], conf[miss].float().cpu()])
    merged_imgs = imgs if wrong["images"] is None else torch.cat([wrong["images"], imgs])
    order = merged_conf.argsort(descending=True)[:k]
    wrong["conf"] = merged_conf[order]
    wrong["pred"] = torch.cat([wrong["pred"], pred[miss].cpu()])[order]
    wrong["target"] = torch.cat([wrong["target"], targets[miss].cpu()])[order]
    wrong["images"] = merged_imgs[order]


def recalibrate_bn(model: nn.Module, batches: Iterable, rt: Runtime) -> bool:
    """Re-estimate every BatchNorm's running statistics from `batches` with the current weights.

    Running statistics are an average over the last ~10 training steps, taken while the weights
    moved; early in a short run (high learning rate, few steps per epoch) they no longer describe
    the model, and validation collapses (measured: 0.66 against 0.93 on the same weights).
    torch's update_bn replaces them by an exact average over the given batches; training itself
    only uses batch statistics, so nothing but evaluation changes. Returns False without BatchNorm.
    """
    from torch.optim.swa_utils import update_bn

    model = _unwrap(model)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    with rt.autocast():
        update_bn((to_device(batch, rt)[0] for batch in batches), model)  # restores train/eval mode itself
    return True
