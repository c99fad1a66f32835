"""The mechanics of training and evaluation: one optimizer step at a time, one pass over a split.

No logging, files or signals here: `train_steps` yields what each step did and the Trainer
(resnet_cli/trainer.py) decides what follows.
"""

from __future__ import annotations

from collections import deque
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from resnet_cli.errors import Diverged
from resnet_cli.optim import lr_by_role
from resnet_cli.runtime import Runtime


class NonFiniteLoss(Diverged):
    """The loss became NaN or infinite and no more bad steps may be skipped."""


@dataclass(frozen=True)
class Settings:
    """How every optimizer step of a run is taken: fixed for the whole run."""

    rt: Runtime
    interval: str = "epoch"  # when a time-based scheduler steps: "step" (here, after each update) or "epoch"
    accum_steps: int = 1  # micro-batches per optimizer step
    grad_clip_value: float = 0.0  # 0 = off
    grad_clip_norm: float = 0.0  # 0 = off


@dataclass
class Parts:
    """The objects a run trains, and whose state a checkpoint holds."""

    model: nn.Module  # what runs the forward pass (may be DDP- or compile-wrapped)
    raw_model: nn.Module  # the bare module: its state_dict is what checkpoints and exports hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    ema: torch.optim.swa_utils.AveragedModel | None = None


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

    def add(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count one micro-batch (its mean loss, its hits) without a sync."""
        n = logits.shape[0]
        self.loss += loss.detach().double() * n
        self.correct += (logits.detach().argmax(1) == _hard(targets)).sum()
        self.count += n

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


@dataclass
class Progress:
    """Where a run stands: what a checkpoint carries besides the parts' own state and the RNGs."""

    epoch: int = 0  # epochs fully completed (the one under way, mid-epoch)
    step_in_epoch: int = 0  # batches done in the current epoch (0 at an epoch boundary)
    global_step: int = 0  # optimizer steps since the start of the run
    bad_steps: int = 0  # non-finite steps skipped so far (trainer.max_bad_steps)
    best_value: float | None = None  # the monitored metric's best value, and its epoch (1-based)
    best_epoch: int = -1
    best_detail: dict = field(default_factory=dict)  # per-class metrics and top confusions at the best epoch
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    running: Running | None = None  # the current epoch's sums, so a mid-epoch resume reports the same means

    def state_dict(self) -> dict:
        """The progress entries of a checkpoint (see docs/ARCHITECTURE.md)."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                "bad_steps": self.bad_steps,
                "best": {"value": self.best_value, "epoch": self.best_epoch, "detail": self.best_detail},
                "running": self.running.state_dict() if self.running is not None else None,
                "history": self.history}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        """Take the progress entries of a checkpoint (its running sums onto `device`)."""
        best = state.get("best", {})
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.bad_steps = int(state["global_step"]), int(state.get("bad_steps", 0))
        self.best_value, self.best_epoch = best.get("value"), best.get("epoch", -1)
        self.best_detail = dict(best.get("detail") or {})
        self.history = list(state.get("history", []))
        self.running = Running.from_state(state["running"], device) if state.get("running") else None


class LossGuard:
    """The non-finite-loss policy, in one place.

    With trainer.max_bad_steps=N a bad micro-batch is skipped (its gradients dropped) until N
    were; the next one stops the run. Skipping needs the verdict before the update: one sync per
    step, by request. Without a budget no step waits: on the CPU a step's flag is read at once
    (a bad step never updates the weights); on CUDA it travels to pinned host memory and is read
    once it has landed, so a bad step stops the run one step later at most. The caller reads
    pending verdicts at steps that sync anyway (`check`), and every stop names the last good
    checkpoint; `check_weights` keeps non-finite weights out of every checkpoint.
    """

    def __init__(self, max_bad_steps: int, progress: Progress,
                 last_good: Callable[[], Path | None] = lambda: None):
        self.max_bad_steps, self.progress, self.last_good = max_bad_steps, progress, last_good
        # "Loss is finite" flags of recent steps, oldest first: (flag, CUDA event or None, epoch, step).
        self.pending: deque = deque()

    def skip(self, finite: torch.Tensor, epoch: int, step: int) -> bool:
        """Whether to drop the gradients of a micro-batch (1-based epoch and step) whose loss was not finite."""
        if not self.max_bad_steps:
            self._queue(finite, epoch, step)
            self.check()
            return False
        if bool(finite):
            return False
        self.progress.bad_steps += 1
        if self.progress.bad_steps > self.max_bad_steps:
            raise self._stop(epoch, step)
        return True

    def check(self, wait: bool = False) -> None:
        """Raise NonFiniteLoss for the first queued step whose loss was not finite.

        CPU flags are read at once. CUDA flags are read when their copy has landed; without
        `wait` the host waits only for the previous step's flag while the current step is
        already queued, so the device never idles.
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
                raise self._stop(epoch, step)

    def check_weights(self, state_dict: dict) -> None:
        """Refuse weights that are not finite (a finite loss can still overflow in the update)."""
        if not all(torch.isfinite(t).all() for t in state_dict.values()
                   if torch.is_tensor(t) and t.is_floating_point()):
            raise Diverged(f"weights became non-finite; kept the last good checkpoint {self.last_good() or 'none'}")

    def _queue(self, finite: torch.Tensor, epoch: int, step: int) -> None:
        event = None
        if finite.device.type == "cuda":
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(finite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            finite = host
        self.pending.append((finite, event, epoch, step))

    def _stop(self, epoch: int, step: int) -> NonFiniteLoss:
        # A plain message argument keeps the exception picklable (joblib sends it between processes).
        return NonFiniteLoss(f"non-finite loss at epoch {epoch}, step {step}; last good checkpoint: "
                             f"{self.last_good() or 'none'} (lower the learning rate, set trainer.grad_clip_norm, "
                             f"or trainer.max_bad_steps=N to skip bad steps)")


@dataclass(frozen=True)
class Step:
    """What one optimizer step did."""

    batch: int  # batches of the epoch done, this step's included
    loss: torch.Tensor  # its last micro-batch's loss, still on the device (reading it syncs)
    lrs: dict[str, float]  # the learning rates it used (optim.lr_by_role)


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


def train_steps(parts: Parts, settings: Settings, batches: Iterable, *, epoch: int, start: int = 0,
                running: Running | None = None, guard: LossGuard | None = None) -> Iterator[Step]:
    """Train over `batches` (already positioned at batch `start` of 0-based `epoch`); yield after each update.

    Nothing here waits for the device (unless the guard skips bad steps): the caller decides
    when a loss is read, what is logged and when to checkpoint or stop. `running` collects the
    epoch's sums in place.
    """
    model, opt, rt, accum = parts.model, parts.optimizer, settings.rt, settings.accum_steps
    running = running if running is not None else Running.zeros(rt.device)
    guard = guard if guard is not None else LossGuard(0, Progress())
    model.train()
    guard.pending.clear()
    # Gradients left by a previous epoch's incomplete accumulation window are dropped:
    # an epoch always starts a fresh window, so a resumed run sees the same windows.
    opt.zero_grad(set_to_none=True)
    for i, batch in enumerate(batches, start=start):
        images, targets = to_device(batch, rt)
        # Windows count from the epoch's first batch, so a resume (always at a window's end) keeps them.
        window_ends = (i + 1) % accum == 0
        # Under DDP, all-reduce gradients only on the window's last micro-batch.
        with nullcontext() if window_ends or not hasattr(model, "no_sync") else model.no_sync():
            logits, loss = compute_loss(model, images, targets, parts.criterion, rt)
            parts.scaler.scale(loss / accum if accum > 1 else loss).backward()
        if guard.skip(_finite_everywhere(loss), epoch + 1, i + 1):  # 1-based, as the console shows them
            opt.zero_grad(set_to_none=True)
            continue
        running.add(loss, logits, targets)
        if window_ends:
            lrs = _optimizer_step(parts, settings)
            yield Step(i + 1, loss.detach(), lrs)
    guard.check(wait=True)


def _finite_everywhere(loss: torch.Tensor) -> torch.Tensor:
    finite = torch.isfinite(loss.detach())
    if dist.is_available() and dist.is_initialized():
        # Ranks must agree on a bad step, to skip it or stop together (not hang in the next
        # collective); NCCL queues this on the stream without a host sync.
        finite = finite.to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite = finite.bool()
    return finite


def _optimizer_step(parts: Parts, settings: Settings) -> dict[str, float]:
    opt, scaler = parts.optimizer, parts.scaler
    if settings.grad_clip_value or settings.grad_clip_norm:
        scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        if settings.grad_clip_value:
            torch.nn.utils.clip_grad_value_(params, settings.grad_clip_value)
        if settings.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip_norm)
    lrs = lr_by_role(opt)  # before a per-step schedule moves on: the rates this update uses
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    if parts.ema is not None:
        parts.ema.update_parameters(parts.raw_model)
    if settings.interval == "step":
        parts.scheduler.step()
    return lrs


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterable, rt: Runtime, *, limit: int = 0, num_classes: int = 0,
             collect: bool = False, keep_wrong: int = 16) -> dict:
    """Loss, top-1 (and top-5 when there are more than 5 classes) over a split.

    With `collect`, also returns per-sample predictions, targets, confidences and losses (for the
    confusion matrix, the per-class metrics and misclassified.csv, in the split's order) and the
    `keep_wrong` most confidently misclassified images.
    """
    model.eval()
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    correct = torch.zeros((), device=rt.device, dtype=torch.int64)
    correct5 = torch.zeros((), device=rt.device, dtype=torch.int64)
    count = 0
    preds, targs, confs, losses = [], [], [], []
    wrong = {"conf": torch.empty(0), "pred": torch.empty(0, dtype=torch.long),
             "target": torch.empty(0, dtype=torch.long), "images": None}
    for i, batch in enumerate(batches):
        if limit and i >= limit:
            break
        images, targets = to_device(batch, rt)
        with rt.autocast():
            logits = model(images)
        logits = logits.float()
        each = nn.functional.cross_entropy(logits, targets, reduction="none")
        loss_sum += each.sum().double()
        pred = logits.argmax(1)
        correct += (pred == targets).sum()
        if num_classes > 5:
            correct5 += (logits.topk(5, dim=1).indices == targets[:, None]).any(1).sum()
        count += images.shape[0]
        if collect:
            conf = logits.softmax(1).max(1).values
            preds.append(pred.cpu()), targs.append(targets.cpu())
            confs.append(conf.cpu()), losses.append(each.cpu())
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
        out["conf"], out["sample_loss"] = torch.cat(confs), torch.cat(losses)
        out["wrong"] = wrong
    return out


def gather_samples(out: dict, rt: Runtime) -> dict:
    """The per-sample results of every rank's val shard, in the split's order (rank r held r, r+W, r+2W, ...).

    A no-op in one process; under torchrun every rank must call it (a collective) after evaluate(collect=True).
    """
    if not rt.distributed or "pred" not in out:
        return out
    keys = ("pred", "target", "conf", "sample_loss")
    mine = [out[k] for k in keys]
    parts: list = [None] * rt.world_size
    dist.all_gather_object(parts, mine)
    total = sum(len(p[0]) for p in parts)
    merged = {k: torch.empty(total, dtype=mine[i].dtype) for i, k in enumerate(keys)}
    for rank, part in enumerate(parts):
        for i, k in enumerate(keys):
            merged[k][rank::rt.world_size] = part[i]
    return {**out, **merged}


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


def calibration_images(asked: int, train_images: int) -> int:
    """How many training images re-estimate BatchNorm: `asked`, at most a quarter of the training set (but 64).

    A forward pass over 256 images cost a third of a training epoch over 320 (measured at 224 px:
    2.6 s against 8.4 s); the cap keeps it near a tenth of an epoch on small folders, and leaves
    folders of 1,024 images or more at `asked`.
    """
    return min(asked, train_images, max(64, train_images // 4))


def recalibrate_bn(model: nn.Module, batches: Iterable, rt: Runtime) -> bool:
    """Re-estimate every BatchNorm's running statistics from `batches` with the current weights (bare module).

    Running statistics are an average over the last ~10 training steps, taken while the weights
    moved; early in a short run (high learning rate, few steps per epoch) they no longer describe
    the model, and validation collapses (measured: 0.66 against 0.93 on the same weights).
    torch's update_bn replaces them by an exact average over the given batches; training itself
    only uses batch statistics, so nothing but evaluation changes. Returns False without BatchNorm.
    """
    from torch.optim.swa_utils import update_bn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return False
    with rt.autocast():
        update_bn((to_device(batch, rt)[0] for batch in batches), model)  # restores train/eval mode itself
    return True
