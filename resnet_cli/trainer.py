"""The Trainer: one run's epochs, from a fresh start or a checkpoint, to the last epoch or a stop.

`prepare` builds what a run needs (resnet_cli.build) and `Trainer.fit` reads as the run's steps:
restore, open the records, then per epoch train, validate and close the epoch. The optimizer step
itself is engine.train_steps; what each step leads to (the non-finite-loss checks, logging, the
stop vote, mid-epoch checkpoints) is decided in one place, `Trainer.train_epoch`.
"""

from __future__ import annotations

import itertools
import logging
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from omegaconf import DictConfig, OmegaConf

from resnet_cli import build, checkpoint, engine, heldout, metrics, reports, tracking
from resnet_cli.errors import UserError
from resnet_cli.fileio import atomic_write, write_json
from resnet_cli.optim import lr_by_role, steps_on_metric
from resnet_cli.runfolder import clear_run, resume_target
from resnet_cli.runtime import teardown
from resnet_cli.signals import Preempted, StopFlag
from resnet_cli.tracking import Tracker, table_header, table_row

log = logging.getLogger("resnet_cli")

RESULTS = "results.csv"  # one row per epoch: the columns of the epoch table and the metrics beside it
MISCLASSIFIED = "misclassified.csv"  # at the best epoch: every val image the kept weights get wrong
MISCLASSIFIED_COLUMNS = ("file", "true", "predicted", "confidence", "loss")


def _columns(history: list[dict]) -> list[str]:
    # Every key any row has, in first-seen order (EMA or top-5 columns appear with the runs that have them).
    return list(dict.fromkeys(k for row in history for k in row))


@dataclass(frozen=True)
class Plan:
    """The run's schedule and stopping rules, resolved once from trainer.* and the data."""

    epochs: int
    batches_per_epoch: int  # a whole number of accumulation windows
    steps_per_epoch: int  # optimizer steps
    log_every: int  # optimizer steps between logged (synced) steps
    checkpoint_every: int  # optimizer steps between mid-epoch checkpoints (0: at epoch ends only)
    monitor: str  # val_acc | val_loss | val_balanced_acc | val_macro_f1: picks best.pt, early stops, a schedule
    patience: int  # epochs without improvement before an early stop (0: never)
    limit_val_batches: int  # 0: the whole split

    @classmethod
    def of(cls, tcfg: Any, train_batches: int, batch_size: int, samples: int, monitor: str) -> "Plan":
        """The plan for `train_batches` batches per epoch on this process; one-line UserError when no step fits.

        `monitor` is trainer.monitor resolved for the data (metrics.resolve_monitor).
        """
        accum = max(1, int(tcfg.grad_accum_steps))
        batches = min(train_batches, tcfg.limit_train_batches) if tcfg.limit_train_batches else train_batches
        if batches == 0:
            raise UserError(f"dataset.batch_size={batch_size} leaves 0 training batches for the {samples} training "
                            f"samples of this process; lower dataset.batch_size")
        if batches // accum < 1:
            raise UserError(f"trainer.grad_accum_steps={accum} is more than the {batches} batches per epoch")
        steps = batches // accum  # an incomplete last window would be dropped anyway
        return cls(epochs=int(tcfg.epochs), batches_per_epoch=steps * accum, steps_per_epoch=steps,
                   log_every=max(1, int(tcfg.log_every_n_steps)), checkpoint_every=int(tcfg.checkpoint_every_n_steps),
                   monitor=monitor, patience=int(tcfg.early_stop_patience),
                   limit_val_batches=int(tcfg.limit_val_batches))

    def monitored(self, val: dict) -> float:
        """The monitored metric of a validation result."""
        return metrics.monitored_value(self.monitor, val)

    @property
    def rises(self) -> bool:
        """Whether a better value of the monitored metric is a higher one (all but the loss)."""
        return self.monitor != "val_loss"

    def improved(self, value: float, best: float | None) -> bool:
        """Whether `value` of the monitored metric beats `best` (any value beats none)."""
        return best is None or (value > best if self.rises else value < best)


@contextmanager
def prepare(cfg: DictConfig, run_dir: Path) -> Iterator["Trainer"]:
    """Build what the run needs (runtime, resume target, data, model, parts); tear it down afterwards."""
    rt = build.build_runtime(cfg.trainer)
    data = None
    try:
        plain = to_plain(cfg)
        resume = resume_target(cfg, plain, run_dir, rt)  # checked (model, data) and locked; nothing written
        data = build.build_data(cfg, rt)
        if rt.is_main:
            resume.check_classes(data.class_names)  # still before anything is written into its folder
            resume.claim()
            resume.follow_log(run_dir)
            log.info("run folder: %s", resume.run_dir.resolve())
            if data.summary:
                log.info("data: %s", data.summary)
        monitor, monitor_why = metrics.resolve_monitor(str(cfg.trainer.monitor), data.class_counts)
        plan = Plan.of(cfg.trainer, len(data.train), data.train.batch_size, data.train.num_samples, monitor)
        raw, model = build.build_training_model(cfg, rt, len(data.class_names), data.eval_spec["crop"])
        if rt.is_main:  # after the model: its shapes can overrule precision auto (build._avoid_bf16_grad_hazard)
            log.info("runtime: %s", rt.describe())
        parts = build.build_parts(cfg, rt, raw, model, steps_per_epoch=plan.steps_per_epoch,
                                  class_weights=build.class_loss_weights(data))
        settings = build.build_settings(cfg, rt)
        if rt.is_main:
            from resnet_cli.optim import describe_recipe

            batch = data.train.batch_size * settings.accum_steps * rt.world_size
            log.info("plan: %s; recipe: %s; best.pt by %s (%s)", data.plan,
                     describe_recipe(parts.optimizer, parts.scheduler, batch, plan.epochs, plan.steps_per_epoch),
                     plan.monitor, monitor_why)
        yield Trainer(cfg, resume.run_dir, data, parts, settings, plan, resume_from=resume.checkpoint,
                      hydra_dir=run_dir)
    finally:
        # DataLoader workers ignore stop signals (so a signal to the process group cannot kill them
        # mid-batch); they are shut down here, before interpreter exit tries to terminate them.
        build.close_data(data)
        teardown(rt)


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python data (what checkpoints and resume compare)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


class _Pace:
    """An epoch's wall clock: its start, and the images per second since the last logged step."""

    def __init__(self, count: int):
        self.start = self.t = time.perf_counter()
        self.first = self.n = count

    def images_per_sec(self, count: int) -> float:
        """This process's images per second since the previous call."""
        now = time.perf_counter()
        rate = (count - self.n) / max(now - self.t, 1e-9)
        self.t, self.n = now, count
        return rate

    def elapsed(self) -> float:
        """Seconds since the epoch (or this session's part of it) began."""
        return time.perf_counter() - self.start


class Trainer:
    """Trains one run: its parts, the progress a checkpoint carries, and what each step leads to."""

    def __init__(self, cfg: DictConfig, run_dir: Path, data: Any, parts: engine.Parts, settings: engine.Settings,
                 plan: Plan, *, resume_from: Path | None = None, hydra_dir: Path | None = None):
        self.cfg, self.run_dir, self.data = cfg, Path(run_dir), data
        self.parts, self.settings, self.plan, self.rt = parts, settings, plan, settings.rt
        self.progress = engine.Progress()
        self.resume_from, self.hydra_dir = resume_from, Path(hydra_dir or run_dir)
        self.class_names = list(data.class_names)
        self.identity = {"config": to_plain(cfg), "class_names": self.class_names, "eval_spec": data.eval_spec}
        self.writer = checkpoint.CheckpointWriter(self.run_dir, top_k=int(cfg.trainer.save_top_k),
                                                  higher_is_better=plan.rises, last_good=resume_from)
        self.guard = engine.LossGuard(int(cfg.trainer.max_bad_steps), self.progress, lambda: self.writer.last_good)
        self.lrs = lr_by_role(parts.optimizer)  # the rates the latest step used (what the logs show)
        self.lr_steps = array("d")  # the lr of every step (8 bytes each), for curves.png
        self.tracker: Tracker | None = None
        self.stop: StopFlag | None = None
        self.grad_norm: reports.GradNormProbe | None = None
        self.show_bar, self.lines_every = False, 0  # rank 0 shows progress (open_run)
        self.pace, self.started = _Pace(0), time.perf_counter()
        # Fixed training images (eval view) that re-estimate BatchNorm statistics before each validation.
        train_images = data.train.num_samples * self.rt.world_size
        calib = engine.calibration_images(int(cfg.trainer.precise_bn_images), train_images)
        self.calibration = data.calibration(calib) if calib > 0 and data.calibration is not None else None

    # -- the run ---------------------------------------------------------------------------------

    def fit(self) -> float:
        """Train from where the run stands to its last epoch or an early stop; returns the best val accuracy."""
        try:
            self.restore()
            self.open_run()
            for epoch in range(self.progress.epoch, self.plan.epochs):
                train = self.train_epoch(epoch)
                val = self.validate()
                if self.end_of_epoch(epoch, train, val):
                    break
            return self.finish()
        finally:
            self.close()

    def restore(self) -> None:
        """Continue from the resume checkpoint, if any: parts, progress and RNGs as they were saved."""
        if self.resume_from is None:
            return
        path, p = self.resume_from, self.progress
        checkpoint.restore(checkpoint.load(path, map_location=self.rt.device), self.parts, p, path, self.rt.device)
        self.lrs = lr_by_role(self.parts.optimizer)
        if self.rt.is_main:
            log.info("resumed from %s at epoch %d, batch %d (global step %d)", path, p.epoch, p.step_in_epoch,
                     p.global_step)
            if self.run_dir.resolve() != self.hydra_dir.resolve():
                # Written only once the checkpoint has loaded: a failed resume leaves no pointer behind.
                atomic_write(self.hydra_dir / "resumed_into.txt", f"{self.run_dir.resolve()}\n")
        # A restored OneCycleLR keeps its own length and cannot step past it: say so now, not mid-run.
        span = getattr(self.parts.scheduler, "total_steps", None)
        if span is not None and span < self.plan.epochs * self.plan.steps_per_epoch:
            raise UserError(f"trainer.resume={path}: its {type(self.parts.scheduler).__name__} spans {span} steps, "
                            f"fewer than trainer.epochs={self.plan.epochs} x {self.plan.steps_per_epoch} steps; "
                            f"resume with the run's own trainer.epochs and batch size")

    def open_run(self) -> None:
        """Open the run's records (TensorBoard continues a resumed run's step axis) and the stop signals."""
        rt, p, resumed = self.rt, self.progress, self.resume_from is not None
        self.started = time.perf_counter()
        if rt.is_main and self.cfg.trainer.overwrite and not resumed:
            clear_run(self.run_dir)  # as late as possible: a run that failed to start left the old one whole
        # Events a killed run wrote after its checkpoint (steps > global_step) are dropped, so the
        # step axis continues without duplicate points; those up to the checkpoint are kept.
        self.tracker = Tracker(self.run_dir, rt.is_main, purge_step=p.global_step + 1 if resumed else None)
        self.stop = StopFlag(self.writer)
        if not rt.is_main:
            return
        write_json(self.run_dir / "class_names.json", self.class_names)
        if resumed:  # curves.png plots every step's lr from step 1: the earlier steps come from the events
            self.lr_steps.extend(v for s, v in self.tracker.read_scalars("train/lr") if s <= p.global_step)
        else:
            self.tracker.layout(tracking.CHARTS)  # Custom Scalars: train and val loss (and accuracy) on one chart
            reports.log_augmented_batch(self.tracker, self.data)  # once: what the augmentation does to the inputs
            if self.cfg.trainer.log_graph:
                images, _ = engine.to_device(next(iter(self.data.val.iter_from(0))), rt)
                self.tracker.graph(self.parts.raw_model, images[:1])
        self.grad_norm = reports.GradNormProbe(self.parts.optimizer, p, self.plan.log_every)
        mode = tracking.progress_mode(self.cfg.trainer.progress)
        self.show_bar = mode == "bar"
        # A log line every `lines_every` steps where no bar is shown (SLURM, CI, nohup): a logged step syncs anyway.
        self.lines_every = tracking.progress_every(int(self.cfg.trainer.progress_every_n_steps), self.plan.log_every,
                                                   self.plan.steps_per_epoch) if mode == "lines" else 0
        log.info("%s", table_header())
        for row in p.history:
            log.info("%s", table_row(row))

    def train_epoch(self, epoch: int) -> dict:
        """Train one epoch from where the run stands; returns its mean loss and accuracy, speed and time."""
        p, plan, rt = self.progress, self.plan, self.rt
        start = p.step_in_epoch
        running = p.running = p.running or engine.Running.zeros(rt.device)
        self.data.train.set_epoch(epoch)
        batches = itertools.islice(self.data.train.iter_from(start), max(0, plan.batches_per_epoch - start))
        self.pace = _Pace(running.count)
        bar = tracking.progress_bar(rt.is_main and self.show_bar, plan.batches_per_epoch, start, epoch, plan.epochs)
        try:
            for step in engine.train_steps(self.parts, self.settings, batches, epoch=epoch, start=start,
                                           running=running, guard=self.guard):
                p.global_step, p.step_in_epoch, self.lrs = p.global_step + 1, step.batch, step.lrs
                self.tracker.scalars({f"train/{k}": v for k, v in step.lrs.items()}, p.global_step)  # no sync
                self.lr_steps.append(step.lrs["lr"])
                if bar is not None:
                    bar.update(self.settings.accum_steps)
                logged = p.global_step % plan.log_every == 0
                if logged:
                    self.guard.check()  # this step syncs anyway: a bad loss is never logged as a point
                    self._log_step(epoch, start, step, bar)
                # Under DDP the ranks vote (a collective) only at logged steps, so they stop at the same one.
                stop = self.stop.agree(rt) if logged or not rt.distributed else False
                due = plan.checkpoint_every and p.global_step % plan.checkpoint_every == 0
                if stop or (due and step.batch < plan.batches_per_epoch):
                    self.guard.check()  # name the bad step rather than refuse its weights
                    self._save()
                    if rt.is_main:  # one line per mid-epoch checkpoint: tests and job scripts follow progress
                        log.info("checkpoint: epoch %d step %d (global step %d) -> %s", epoch + 1, step.batch,
                                 p.global_step, self.run_dir / checkpoint.LAST)
                if stop:
                    raise Preempted.after(self.stop.signal, self.run_dir)
        finally:
            if bar is not None:
                bar.close()
        seconds = self.pace.elapsed()
        images = (running.count - self.pace.first) * rt.world_size
        return {**running.summary(), "img/s": images / max(seconds, 1e-9), "time_s": seconds}

    def validate(self) -> dict:
        """Loss and accuracy on the validation split (with the EMA weights' under "ema", when there are any)."""
        if self.calibration is not None:  # statistics of the weights about to be validated (and saved)
            for net in (self.parts.raw_model, self.parts.ema.module if self.parts.ema is not None else None):
                if net is not None:
                    engine.recalibrate_bn(net, self.calibration.iter_from(0), self.rt)
        # Per-sample results on every rank (a collective gathers them): the per-class metrics need them all.
        val = engine.gather_samples(engine.evaluate(self.parts.model, self.data.val.iter_from(0), self.rt,
                                                    limit=self.plan.limit_val_batches,
                                                    num_classes=len(self.class_names), collect=True), self.rt)
        val["classes"] = metrics.classification(val["pred"], val["target"], self.class_names)
        if self.parts.ema is not None:
            val["ema"] = engine.evaluate(self.parts.ema.module, self.data.val.iter_from(0), self.rt,
                                         limit=self.plan.limit_val_batches, num_classes=len(self.class_names))
        return val

    def end_of_epoch(self, epoch: int, train: dict, val: dict) -> bool:
        """Step an epoch schedule, record and checkpoint the epoch; returns whether the run is over."""
        p, plan, rt = self.progress, self.plan, self.rt
        value = plan.monitored(val)
        self._step_schedule(value)
        row = self._row(epoch, train, val)
        p.history.append(row)
        self.tracker.scalars(self._epoch_scalars(row, val), p.global_step)
        improved = plan.improved(value, p.best_value)
        if improved:
            p.best_value, p.best_epoch = value, epoch + 1
            p.best_detail = {**val["classes"], "confused_pairs": metrics.confused_pairs(val["pred"], val["target"],
                                                                                        self.class_names)}
            if rt.is_main:  # confusion matrix, per-class accuracy, most confident mistakes at the best epoch
                reports.log_evaluation(self.tracker, val, self.class_names, self.data.eval_spec, p.global_step)
                rows = metrics.misclassified_rows(val, self.class_names, self.data.val_files)
                atomic_write(self.run_dir / MISCLASSIFIED, metrics.csv_text(rows, MISCLASSIFIED_COLUMNS),
                             durable=False)
        if rt.is_main:
            log.info("%s%s", table_row(row), "  *" if improved else "")
        early = bool(plan.patience) and p.best_epoch > 0 and len(p.history) - p.best_epoch >= plan.patience
        finished = epoch + 1 == plan.epochs or early
        p.epoch, p.step_in_epoch, p.running = epoch + 1, 0, None
        self._save(finished=finished, metrics=row, best=improved, value=value)
        tracking.write_metrics(self.tracker, p.history, p.best_epoch, finished=finished,
                               seconds=time.perf_counter() - self.started, monitor=plan.monitor, detail=p.best_detail)
        if rt.is_main:  # the epoch table as a file (Keras' and Lightning's CSVLogger, ultralytics' results.csv)
            atomic_write(self.run_dir / RESULTS, metrics.csv_text(p.history, _columns(p.history)), durable=False)
        # curves.png after every epoch, so a stopped run has its figure too; TensorBoard gets the last one.
        reports.write_curves(self.tracker, p.history, self.lr_steps, p.global_step if finished else None)
        self.tracker.flush()
        if not finished and self.stop.agree(rt):
            raise Preempted.after(self.stop.signal, self.run_dir)  # it came during evaluation: last.pt has the epoch
        if early and rt.is_main:
            log.info("early stop: %s did not improve for %d epochs", plan.monitor, plan.patience)
        return finished

    def finish(self) -> float:
        """Measure TTA and the test split, log the HParams row and where to look; returns the best val accuracy."""
        p, rt = self.progress, self.rt
        best = max((r["val_acc"] for r in p.history), default=0.0)
        final = heldout.measure(self)  # every rank: evaluation is a collective
        if rt.is_main and final:
            self._record_final(final)
        if rt.is_main and p.history:
            tracking.final_hparams(self.cfg, self.tracker, self.run_dir, image_size=int(self.data.eval_spec["crop"]),
                                   precision=rt.precision)
        if rt.is_main:
            log.info("done: best val acc %.4f (epoch %d); run folder %s; view with: tensorboard --logdir %s", best,
                     p.best_epoch, self.run_dir.resolve(), tracking.tensorboard_logdir(self.run_dir,
                                                                                      self.cfg.output_root))
        return best

    def _record_final(self, final: dict) -> None:
        """metrics.json, TensorBoard and the log get what heldout.measure found (rank 0)."""
        p, test, tta = self.progress, final.get("test"), final.get("tta")
        tracking.write_metrics(self.tracker, p.history, p.best_epoch, finished=True,
                               seconds=time.perf_counter() - self.started, monitor=self.plan.monitor,
                               detail=p.best_detail, test=test, tta=tta)
        if tta and tta.get("mirror"):
            log.info("flip TTA on val with best.pt's weights: acc %.4f without, %.4f with: %s", tta["val_acc"],
                     tta["val_acc_flip"], "the tools use it (--tta auto)" if tta["flip"] else "not used")
        if test:
            self.tracker.scalars({f"test/{k}": test[k] for k in ("acc", "loss", "balanced_acc", "macro_f1")},
                                 p.global_step)
            log.info("test: acc %.4f, balanced acc %.4f, macro-F1 %.4f, loss %.4f (%s)", test["acc"],
                     test["balanced_acc"], test["macro_f1"], test["loss"], test["weights"])

    def close(self) -> None:
        """Give the signals back and close the events (also on a stop or a divergence: up to the checkpoint)."""
        if self.stop is not None:
            self.stop.close()
        if self.tracker is not None:
            self.tracker.close()
        close = getattr(self.calibration, "close", None)
        if close is not None:
            close()  # its DataLoader workers, like the train and val loaders' (build.close_data)

    def dry_run(self) -> float:
        """Print the plan (parameters, MACs, steps, device, precision, memory format) and stop."""
        model, data = self.parts.raw_model, self.data
        n_params = sum(q.numel() for q in model.parameters())
        size = int(data.eval_spec.get("crop", 32))
        try:
            from resnet_cli.models import count_macs

            macs = f"{count_macs(model, size) / 1e9:.3f} GMACs at {size}px"
        except Exception as exc:  # noqa: BLE001 - MACs are informative only
            macs = f"MACs unavailable ({type(exc).__name__})"
        lines = [f"model: {self.cfg.model.name}  parameters: {n_params:,}  {macs}",
                 f"data: {len(data.class_names)} classes, {data.train.num_samples} train / {data.val.num_samples} "
                 f"val samples, batch {data.train.batch_size}, {self.plan.steps_per_epoch} steps/epoch",
                 self.rt.describe()]
        for line in lines:
            log.info("dry run: %s", line)
        return 0.0

    # -- what a step and an epoch lead to ----------------------------------------------------------

    def _log_step(self, epoch: int, start: int, step: engine.Step, bar: Any) -> None:
        """A logged step: loss, speed and gradient norm to TensorBoard, then the bar's postfix or a progress line."""
        p, plan, running = self.progress, self.plan, self.progress.running
        ips = self.pace.images_per_sec(running.count) * self.rt.world_size
        # Per-step values carry _step or per-second names; train/loss is the epoch mean.
        values = {"train/loss_step": float(step.loss), "train/images_per_sec": ips}
        norm = self.grad_norm.pop() if self.grad_norm is not None else None
        if norm is not None:
            values["train/grad_norm"] = norm
        self.tracker.scalars(values, p.global_step)
        line = bool(self.rt.is_main and self.lines_every) and p.global_step % self.lines_every == 0 \
            and step.batch < plan.batches_per_epoch  # at the epoch's last batch the table row follows
        if bar is None and not line:
            return
        acc = float(running.correct) / max(running.count, 1)  # this rank's epoch so far: the step synced anyway
        if bar is not None:
            bar.set_postfix(loss=f"{values['train/loss_step']:.3f}", acc=f"{acc:.3f}", lr=f"{self.lrs['lr']:.2e}",
                            img_s=f"{ips:.0f}")
        else:
            log.info("%s", tracking.progress_line(
                epoch + 1, plan.epochs, step.batch, plan.batches_per_epoch, loss=values["train/loss_step"], acc=acc,
                lr=self.lrs["lr"], images_per_sec=ips, epoch_elapsed=self.pace.elapsed(),
                epoch_done=step.batch - start, steps_left_after=(plan.epochs - epoch - 1) * plan.batches_per_epoch))

    def _step_schedule(self, value: float) -> None:
        # Step-interval schedules step with the optimizer (engine); the others once per epoch, a
        # metric-driven one (ReduceLROnPlateau) on the monitored validation metric.
        scheduler = self.parts.scheduler
        if steps_on_metric(scheduler):
            scheduler.step(value)
        elif self.settings.interval == "epoch":
            scheduler.step()

    def _row(self, epoch: int, train: dict, val: dict) -> dict:
        """The epoch's row: console table, metrics.json history, curves.png."""
        row = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val["loss"],
               "val_acc": val["acc"], **self.lrs, "img/s": train["img/s"], "time_s": train["time_s"]}
        if "top5" in val:
            row["val_top5"] = val["top5"]
        if "ema" in val:
            row["ema_val_acc"] = val["ema"]["acc"]
        row["val_balanced_acc"] = val["classes"]["balanced_accuracy"]
        row["val_macro_f1"] = val["classes"]["macro_f1"]
        return row

    def _epoch_scalars(self, row: dict, val: dict) -> dict:
        # Per-epoch means at the epoch's last step: train/loss and val/loss share one x axis (tracking.CHARTS).
        scalars = {"train/loss": row["train_loss"], "train/acc": row["train_acc"], "val/loss": row["val_loss"],
                   "val/acc": row["val_acc"], "train/epoch_images_per_sec": row["img/s"],
                   "val/best_acc": max(r["val_acc"] for r in self.progress.history)}
        if "top5" in val:
            scalars["val/top5"] = val["top5"]
        if "ema" in val:
            scalars.update({"val_ema/loss": val["ema"]["loss"], "val_ema/acc": val["ema"]["acc"]})
        scalars.update({"val/balanced_acc": row["val_balanced_acc"], "val/macro_f1": row["val_macro_f1"]})
        return scalars

    def _save(self, *, finished: bool = False, metrics: dict | None = None, best: bool = False,
              value: float | None = None) -> None:
        """Checkpoint the run as it stands (rank 0); mid-epoch saves carry no metrics and no top-k entry."""
        if not self.rt.is_main:
            return
        ck = checkpoint.contents(self.parts, self.progress, self.identity, finished=finished, metrics=metrics or {})
        self.guard.check_weights(ck["model"])
        self.writer.save(ck, best=best, epoch=self.progress.epoch if value is not None else None, value=value)
