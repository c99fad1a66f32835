"""`resnet-train`: compose the config, build data, model and optimizer, fit, return the metric.

Only Hydra and OmegaConf are imported at module level: `--help`, `--cfg job` and
shell completion never pay for torch. Everything heavy is imported inside `fit`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from resnet_cli import config as _schemas  # noqa: F401  (registers the typed schemas)
from resnet_cli import config_dir, submitit_requeue
from resnet_cli.errors import Refused, UserError, one_line
from resnet_cli.extras import require_extras
from resnet_cli.fileio import atomic_link, atomic_write, write_json
from resnet_cli.runfolder import check_run_folder, clear_run

log = logging.getLogger("resnet_cli")

EXIT_USER_ERROR = 2  # bad config, missing data, unreadable file: fix and run again
EXIT_DIVERGED = 3  # non-finite loss: the last good checkpoint is named in the message
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1/SIGINT after saving last.pt: rerun with trainer.resume=auto
EXIT_INTERRUPTED = 130  # a second Ctrl-C stopped the run at once (the shell's code for SIGINT)
_STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


class Diverged(UserError):
    """Training produced a non-finite loss."""


class Interrupted(KeyboardInterrupt):
    """A second Ctrl-C: stop at once; the message names the last checkpoint on disk."""


class Preempted(Exception):
    """A stop signal arrived; the state was saved and the run can be resumed."""

    @classmethod
    def after(cls, signal_name: str, run_dir: Path) -> "Preempted":
        """The exception for a run stopped by `signal_name` once last.pt in run_dir was saved."""
        # A plain message argument keeps the exception picklable (joblib sends it between processes).
        exc = cls(f"received {signal_name}; saved {run_dir / 'last.pt'}; rerun the same command with "
                  f"trainer.resume=auto to continue (exit code {EXIT_PREEMPTED})")
        exc.signal_name = signal_name  # which signal decides whether a submitit job is requeued
        return exc


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra's task function: one training run in its own run folder."""
    hc = HydraConfig.get()
    try:
        return fit(cfg, Path(hc.runtime.output_dir))
    except UserError as exc:
        if hc.mode != RunMode.RUN:
            raise  # in a sweep, Hydra records the failed job and the others go on
        # A single run: report here, before Hydra adds its own "Error executing job" line.
        _report(exc)
    except Preempted as exc:
        if hc.mode != RunMode.RUN:
            # A submitit job stopped by submitit's own signal: requeue it now that last.pt is saved.
            submitit_requeue.requeue(getattr(exc, "signal_name", None))
            raise
        _preempted(exc)


def main() -> None:
    """Console entry point: run Hydra, and turn user-caused errors into one line and an exit code."""
    # Let errors reach us instead of Hydra's multi-line report, so they print as one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    _quiet_other_ranks()
    try:  # the outer try also catches a Ctrl-C that lands while an inner handler reports
        try:
            require_extras(sys.argv[1:])  # a missing plugin's extra, named before Hydra reports it its own way
            hydra_main()
        except Preempted as exc:
            _preempted(exc)
        except Refused as exc:
            _report(exc.error)  # refused before Hydra wrote anything (run-folder guard)
        except (UserError, HydraException, OmegaConfBaseException) as exc:
            _report(exc)
        except OSError as exc:
            if not exc.filename:
                raise  # no path to name: not an error of the user's making
            _report(exc)  # read-only folder, a file where a folder should be, a full disk: one line naming it
    except KeyboardInterrupt as exc:
        _interrupted(exc)


def _preempted(exc: Preempted) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # saved and leaving: a late second Ctrl-C changes nothing
    if int(os.environ.get("RANK", "0")) == 0:  # rank 0 saved the checkpoint; it alone says where
        print(f"resnet-train: {exc}", file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


def _interrupted(exc: KeyboardInterrupt) -> None:
    # A second Ctrl-C stops at once (mid-step: its state is not saved); say what is on disk instead of a traceback.
    if int(os.environ.get("RANK", "0")) == 0:
        detail = str(exc) or "rerun with trainer.resume=auto to continue from the last checkpoint, if any"
        print(f"resnet-train: interrupted by Ctrl-C; {detail}", file=sys.stderr)
    sys.exit(EXIT_INTERRUPTED)


def _report(exc: BaseException) -> None:
    print(f"resnet-train: error: {one_line(exc)}", file=sys.stderr)
    sys.exit(EXIT_DIVERGED if isinstance(exc, Diverged) else EXIT_USER_ERROR)


def _quiet_other_ranks() -> None:
    # Under torchrun every process runs Hydra; only rank 0 may create a run folder.
    if int(os.environ.get("RANK", "0")) != 0 and len(sys.argv) > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


def to_plain(cfg: DictConfig) -> dict:
    """The resolved config as plain Python data (what checkpoints and resume compare)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def fit(cfg: DictConfig, run_dir: Path) -> float:
    """Train as configured, writing into run_dir; returns the best validation accuracy."""
    from resnet_cli.validate import validate

    validate(cfg)  # every key's range and relations: before torch, data or the run folder are touched
    import torch
    from hydra.utils import instantiate

    from resnet_cli import checkpoint as ckpt_io
    from resnet_cli import engine, optim, runtime
    from resnet_cli.build import build_model
    from resnet_cli.tracking import Tracker, table_header, table_row

    tcfg = cfg.trainer
    rt = runtime.setup(tcfg)
    bundle = None
    try:
        plain = to_plain(cfg)
        hydra_dir = run_dir
        resume_from, run_dir = _resolve_resume(cfg, plain, run_dir, rt, ckpt_io)
        if rt.is_main:
            log.info("run folder: %s", run_dir.resolve())

        bundle = instantiate(cfg.dataset)(device=rt.device, seed=int(tcfg.seed), rank=rt.rank,
                                          world_size=rt.world_size)
        class_names = list(bundle.class_names)
        _, rt.why["threads"] = runtime.resolve_threads(tcfg.num_threads, bundle.workers)
        if rt.is_main:
            if bundle.summary:
                log.info("data: %s", bundle.summary)
            log.info("runtime: %s", rt.describe())
        raw_model = build_model(cfg.model, len(class_names), bundle.eval_spec["crop"])
        raw_model = raw_model.to(rt.device, memory_format=rt.memory_format)
        if rt.distributed and tcfg.sync_batchnorm:
            if rt.device.type != "cuda":
                raise UserError("trainer.sync_batchnorm=true needs CUDA devices (PyTorch's SyncBatchNorm has no "
                                "CPU/Gloo kernel); set it to false on CPU")
            raw_model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(raw_model)
        model = raw_model
        if rt.distributed:
            ids = [rt.device.index] if rt.device.type == "cuda" else None
            model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if tcfg.compile:
            model = torch.compile(model)

        groups = optim.param_groups(raw_model, weight_decay_norm_bias=tcfg.weight_decay_norm_bias,
                                    backbone_lr_scale=tcfg.backbone_lr_scale)
        optimizer = optim.build_optimizer(instantiate(cfg.optimizer), groups)
        sched_cfg = OmegaConf.to_container(cfg.scheduler, resolve=True)
        interval = sched_cfg.pop("interval", "epoch")
        accum = max(1, int(tcfg.grad_accum_steps))
        batches_per_epoch = _limit(len(bundle.train), tcfg.limit_train_batches)
        if batches_per_epoch == 0:
            raise UserError(f"dataset.batch_size={bundle.train.batch_size} leaves 0 training batches for the "
                            f"{bundle.train.num_samples} training samples of this process; lower dataset.batch_size")
        steps_per_epoch = batches_per_epoch // accum
        if steps_per_epoch < 1:
            raise UserError(f"trainer.grad_accum_steps={accum} is more than the {batches_per_epoch} batches per epoch")
        batches_per_epoch = steps_per_epoch * accum  # an incomplete last window would be dropped anyway
        scheduler = optim.build_scheduler(instantiate(sched_cfg), optimizer, interval=interval,
                                          steps_per_epoch=steps_per_epoch, epochs=int(tcfg.epochs),
                                          warmup_epochs=float(tcfg.warmup_epochs))
        ema = None
        if tcfg.ema_decay:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            ema = AveragedModel(raw_model, multi_avg_fn=get_ema_multi_avg_fn(float(tcfg.ema_decay)),
                                use_buffers=True)
        scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=float(tcfg.label_smoothing))
        loop = engine.Loop(model, optimizer, scheduler, interval, scaler, rt, criterion, ema,
                           grad_clip_value=float(tcfg.grad_clip_value), grad_clip_norm=float(tcfg.grad_clip_norm),
                           accum_steps=accum, max_bad_steps=int(tcfg.max_bad_steps),
                           log_every=max(1, int(tcfg.log_every_n_steps)))

        if rt.is_main:
            log.info("plan: %s; recipe: %s", bundle.plan,
                     optim.describe_recipe(optimizer, scheduler, bundle.train.batch_size * accum * rt.world_size,
                                           int(tcfg.epochs), steps_per_epoch))
        if tcfg.dry_run:
            return _dry_run(raw_model, bundle, rt, steps_per_epoch, cfg)

        state = _State(best_value=None, best_epoch=-1, history=[], start_epoch=0, start_batch=0, running=None)
        if resume_from is not None:
            state = _restore(resume_from, raw_model, loop, state, ckpt_io, rt)
            if rt.is_main and run_dir.resolve() != hydra_dir.resolve():
                # Written only once the checkpoint has loaded: a failed resume leaves no pointer behind.
                atomic_write(hydra_dir / "resumed_into.txt", f"{run_dir.resolve()}\n")
            # A restored OneCycleLR keeps its own length and cannot step past it: say so now, not mid-run.
            span = getattr(loop.scheduler, "total_steps", None)
            if span is not None and span < int(tcfg.epochs) * steps_per_epoch:
                raise UserError(f"trainer.resume={resume_from}: its {type(loop.scheduler).__name__} spans {span} "
                                f"steps, fewer than trainer.epochs={tcfg.epochs} x {steps_per_epoch} steps; resume "
                                f"with the run's own trainer.epochs and batch size")
        # Events a killed run wrote after its checkpoint (steps > global_step) are dropped, so the
        # step axis continues without duplicate points; those up to the checkpoint are kept.
        if rt.is_main and tcfg.overwrite and resume_from is None:
            clear_run(run_dir)  # as late as possible: a run that failed to start left the old one whole
        tracker = Tracker(run_dir, rt.is_main, purge_step=loop.global_step + 1 if resume_from else None)
        if resume_from is None:
            tracker.layout(_CHARTS)  # Custom Scalars: train and val loss (and accuracy) on one chart
        if rt.is_main:
            write_json(run_dir / "class_names.json", class_names)
        saver = _Saver(run_dir, rt, ckpt_io, raw_model, loop, plain, class_names, bundle.eval_spec, tcfg)
        saver.last_good = resume_from
        stopper = _StopFlag(saver)
        if rt.is_main and resume_from is None:
            from resnet_cli.reports import log_augmented_batch

            log_augmented_batch(tracker, bundle)  # once: what the augmentation does to the inputs
        if tcfg.log_graph and rt.is_main and resume_from is None:
            images, _ = engine.to_device(next(iter(bundle.val.iter_from(0))), rt)
            tracker.graph(raw_model, images[:1])

        try:
            best = _run_epochs(cfg, loop, bundle, state, tracker, saver, stopper, engine, batches_per_epoch,
                               table_header, table_row, class_names)
            if rt.is_main:
                log.info("done: best val acc %.4f (epoch %d); run folder %s; view with: tensorboard --logdir %s",
                         best, state.best_epoch, run_dir.resolve(), _logdir(run_dir, cfg.output_root))
            return best
        finally:
            stopper.close()
            tracker.close()  # also on preemption/divergence: the events up to the checkpoint reach the disk
    finally:
        _close_loaders(bundle)
        runtime.teardown(rt)


def _logdir(run_dir: Path, output_root: str) -> Path:
    """The folder to point TensorBoard at: output_root when it holds the run, else the run folder's parent."""
    root = Path(str(output_root)).resolve()
    run = run_dir.resolve()
    return Path(str(output_root)) if run.is_relative_to(root) else run.parent


def _close_loaders(bundle) -> None:
    # DataLoader workers ignore stop signals (so a signal to the process group cannot kill them
    # mid-batch); they are shut down here, before interpreter exit tries to terminate them.
    for source in (getattr(bundle, "train", None), getattr(bundle, "val", None)):
        close = getattr(source, "close", None)
        if close is not None:
            close()


class _State:
    """Progress that a checkpoint carries between processes."""

    def __init__(self, **kw: Any):
        self.__dict__.update(kw)


def _limit(n: int, limit: int) -> int:
    return min(n, limit) if limit else n


def _resolve_resume(cfg: DictConfig, plain: dict, run_dir: Path, rt, ckpt_io) -> tuple[Path | None, Path]:
    """Which checkpoint to continue from (if any) and which run folder to write into."""
    # A folder that holds a run is written only to resume that run (or with trainer.overwrite=true).
    in_place = check_run_folder(cfg, plain, run_dir) if rt.is_main else False
    request = cfg.trainer.resume
    if not request:
        return None, run_dir
    found: Path | None = None
    if rt.is_main:
        if str(request) == "auto":
            if in_place:
                found = run_dir  # a fixed hydra.run.dir (e.g. a requeued SLURM job) resumes in place
            else:
                found = ckpt_io.find_resumable(cfg.output_root, plain, exclude=run_dir)
            if found is None:
                log.info("trainer.resume=auto: no unfinished run of this config under %s; starting fresh",
                         cfg.output_root)
        else:
            path = Path(str(request))
            if not path.exists():
                raise UserError(f"trainer.resume={request}: no such checkpoint or run folder")
            found = path
    found = _broadcast(found, rt)
    if found is None:
        return None, run_dir
    ckpt_file = found / ckpt_io.LAST if found.is_dir() else found
    new_dir = ckpt_file.parent
    if rt.is_main and new_dir.resolve() != run_dir.resolve():
        # Continue in the original folder so checkpoints and the TensorBoard step axis stay in one run
        # (resumed_into.txt is left in the new folder once the checkpoint has loaded).
        handler = logging.FileHandler(new_dir / "train.log")
        handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(handler)
        log.info("resuming %s in %s", ckpt_file, new_dir)
    return ckpt_file, new_dir


def _broadcast(value: Any, rt) -> Any:
    if not rt.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _restore(path: Path, raw_model, loop, state: _State, ckpt_io, rt) -> _State:
    """Load a checkpoint into the model, optimizer, scheduler, scaler, EMA and RNGs."""
    ck = ckpt_io.load(path, map_location=rt.device)
    made_by = ck.get("config", {}).get("model", {}).get("name", "another model")
    context = f"trainer.resume={path}: it was made by {made_by} with other settings and does not fit this model"
    ckpt_io.load_weights(raw_model, ck["model"], context)
    try:
        loop.optimizer.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise UserError(f"{context}'s optimizer ({str(exc).strip().splitlines()[0][:160]})") from exc
    loop.scheduler.load_state_dict(ck["scheduler"])
    if ck.get("scaler"):
        loop.scaler.load_state_dict(ck["scaler"])
    if loop.ema is not None and ck.get("ema"):
        loop.ema.load_state_dict(ck["ema"])
    loop.global_step = int(ck["global_step"])
    loop.bad_steps = int(ck.get("bad_steps", 0))
    ckpt_io.set_rng_state(ck["rng"])
    best = ck.get("best", {})
    if rt.is_main:
        log.info("resumed from %s at epoch %d, batch %d (global step %d)", path, ck["epoch"], ck["step_in_epoch"],
                 loop.global_step)
    return _State(best_value=best.get("value"), best_epoch=best.get("epoch", -1), history=list(ck.get("history", [])),
                  start_epoch=int(ck["epoch"]), start_batch=int(ck["step_in_epoch"]), running=ck.get("running"))


class _StopFlag:
    """Turns SIGTERM/SIGUSR1/SIGINT into a flag the loop checks after each step."""

    def __init__(self, saver: "_Saver | None" = None):
        self.signal: str | None = None
        self.saver = saver
        self._previous: dict = {}
        # In a submitit job its preemption signal (USR2) also stops at a step boundary; see submitit_requeue.
        for name in (*_STOP_SIGNALS, *filter(None, [submitit_requeue.preempt_signal()])):
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._previous[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread (e.g. some launchers): no handler
                    pass

    def close(self) -> None:
        """Give the signals back to their previous handlers (in-process callers keep their Ctrl-C)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signal.Signals(signum).name == "SIGINT":
            # A second Ctrl-C stops at once, mid-step, so nothing more is saved; name what is on disk.
            last = self.saver.last_good if self.saver is not None else None
            raise Interrupted(f"stopped at once by a second Ctrl-C; last checkpoint: {last or 'none'}"
                              + (" (rerun with trainer.resume=auto to continue from it)" if last else ""))
        self.signal = signal.Signals(signum).name


class _Saver:
    """Writes last/best/top-k checkpoints; refuses non-finite weights."""

    def __init__(self, run_dir, rt, ckpt_io, raw_model, loop, plain, class_names, eval_spec, tcfg):
        self.run_dir, self.rt, self.io, self.model, self.loop = Path(run_dir), rt, ckpt_io, raw_model, loop
        self.plain, self.class_names, self.eval_spec = plain, class_names, eval_spec
        self.top_k = int(tcfg.save_top_k)
        self.last_good: Path | None = None

    def state(self, epoch: int, step_in_epoch: int, running, st: _State, finished: bool, metrics: dict) -> dict:
        """The checkpoint dict (see docs/ARCHITECTURE.md)."""
        loop = self.loop
        return {
            "format": self.io.FORMAT,
            "model": self.model.state_dict(),
            "optimizer": loop.optimizer.state_dict(),
            "scheduler": loop.scheduler.state_dict(),
            "scaler": loop.scaler.state_dict() if loop.scaler.is_enabled() else None,
            "ema": loop.ema.state_dict() if loop.ema is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": loop.global_step,
            "bad_steps": loop.bad_steps,
            "rng": self.io.rng_state(),
            "best": {"value": st.best_value, "epoch": st.best_epoch},
            "running": running.state_dict() if running is not None else None,
            "history": st.history,
            "finished": finished,
            "config": self.plain,
            "class_names": self.class_names,
            "eval_spec": self.eval_spec,
            "metrics": metrics,
        }

    def save(self, ck: dict, *, best: bool = False, epoch: int | None = None, value: float | None = None) -> None:
        """Write last.pt (and best.pt / top-k) atomically, never with non-finite weights."""
        if not self.rt.is_main:
            return
        if not self.io.is_finite_state(ck["model"]):
            raise Diverged(f"weights became non-finite; kept the last good checkpoint {self.last_good or 'none'}")
        target = self.run_dir / self.io.LAST
        try:
            self.io.atomic_save(ck, target)
            self.last_good = target
            if best:
                target = self.run_dir / self.io.BEST
                try:  # best.pt is this very checkpoint: a second name for last.pt, not a second 100 MB write
                    atomic_link(self.run_dir / self.io.LAST, target)
                except OSError:
                    self.io.atomic_save(ck, target)
            if self.top_k and epoch is not None and value is not None:
                target = self.run_dir / "topk"
                self._top_k(ck, epoch, value)
        except OSError as exc:
            # The save is atomic: the file being replaced is still the previous, complete one.
            where = exc if exc.filename else OSError(exc.errno, exc.strerror, str(target))
            kept = f"the previous {self.last_good} is intact" if self.last_good else "no checkpoint was saved"
            raise UserError(f"cannot save a checkpoint: {one_line(where)} ({kept}; then rerun with "
                            f"trainer.resume=auto)") from exc

    def _top_k(self, ck: dict, epoch: int, value: float) -> None:
        folder = self.run_dir / "topk"
        folder.mkdir(exist_ok=True)
        kept = sorted(((float(p.stem.split("_")[-1]), p) for p in folder.glob("epoch*_*.pt")), reverse=True)
        score = value if self.plain["trainer"]["monitor"] == "val_acc" else -value
        if len(kept) < self.top_k or score > kept[-1][0]:
            self.io.atomic_save(ck, folder / f"epoch{epoch:03d}_{score:.6f}.pt")
            for _, path in sorted(((float(p.stem.split("_")[-1]), p) for p in folder.glob("epoch*_*.pt")),
                                  reverse=True)[self.top_k:]:
                path.unlink()


def _improved(monitor: str, value: float, best: float | None) -> bool:
    if best is None:
        return True
    return value > best if monitor == "val_acc" else value < best


def _run_epochs(cfg, loop, bundle, st: _State, tracker, saver: _Saver, stopper: _StopFlag, engine,
                batches_per_epoch: int, table_header, table_row, class_names) -> float:
    """The epoch loop: train, evaluate, log, checkpoint, stop early or on a signal."""
    import itertools
    from array import array

    tcfg, rt = cfg.trainer, loop.rt
    monitor = getattr(tcfg.monitor, "value", str(tcfg.monitor))
    epochs = int(tcfg.epochs)
    ckpt_every = int(tcfg.checkpoint_every_n_steps)
    patience = int(tcfg.early_stop_patience)
    mode = _progress_mode(tcfg.progress) if rt.is_main else None
    show_progress = mode == "bar"
    from resnet_cli import reports
    from resnet_cli.tracking import progress_every, progress_line

    # A log line every `lines_every` steps where no bar is shown (SLURM, CI, nohup): a logged step syncs anyway.
    lines_every = progress_every(int(tcfg.progress_every_n_steps), loop.log_every,
                                 batches_per_epoch // loop.accum_steps) if mode == "lines" else 0
    # The lr of every optimizer step (8 bytes each: 4 MB per 500k steps), for curves.png, from step 1;
    # a resumed run reads its earlier steps back from its events.
    lr_steps = array("d")
    if rt.is_main and st.start_epoch + st.start_batch > 0:
        lr_steps.extend(v for s, v in tracker.read_scalars("train/lr") if s <= loop.global_step)

    grad_norm = reports.GradNormProbe(loop, loop.log_every) if rt.is_main else None
    calib_images = min(int(tcfg.precise_bn_images), bundle.train.num_samples * rt.world_size)
    calib = bundle.calibration(calib_images) if calib_images > 0 and bundle.calibration is not None else None
    if rt.is_main:
        log.info("%s", table_header())
        for row in st.history:
            log.info("%s", table_row(row))
    t_run = time.perf_counter()
    epoch = st.start_epoch
    for epoch in range(st.start_epoch, epochs):
        start = st.start_batch if epoch == st.start_epoch else 0
        running = engine.Running.from_state(st.running if epoch == st.start_epoch else None, rt.device)
        bundle.train.set_epoch(epoch)
        batches = itertools.islice(bundle.train.iter_from(start), max(0, batches_per_epoch - start))
        t0, n0 = time.perf_counter(), running.count
        progress = _progress_bar(show_progress, batches_per_epoch, start, epoch, epochs)
        window = {"t": time.perf_counter(), "n": running.count}

        def on_step(done: int, run, loss) -> bool:
            step = loop.global_step
            # Every step: the lr is a Python float (no sync), so OneCycle's first and last steps are drawn.
            tracker.scalars({"train/lr": loop.last_lr}, step)
            if rt.is_main:
                lr_steps.append(loop.last_lr)
            if step % loop.log_every == 0:
                loop.check_finite()  # this step syncs anyway: a bad loss is never logged as a point
                now = time.perf_counter()
                ips = (run.count - window["n"]) * rt.world_size / max(now - window["t"], 1e-9)
                window.update(t=now, n=run.count)
                # Per-step values carry _step or per-second names; train/loss is the epoch mean.
                values = {"train/loss_step": float(loss), "train/images_per_sec": ips}
                norm = grad_norm.pop() if grad_norm is not None else None
                if norm is not None:
                    values["train/grad_norm"] = norm
                tracker.scalars(values, step)
                if progress is not None or (lines_every and step % lines_every == 0):
                    # Running accuracy of this rank's epoch so far: a logged step syncs anyway.
                    acc = float(run.correct) / max(run.count, 1)
                if progress is not None:
                    progress.set_postfix(loss=f"{values['train/loss_step']:.3f}", acc=f"{acc:.3f}",
                                         lr=f"{loop.last_lr:.2e}", img_s=f"{ips:.0f}")
                elif lines_every and step % lines_every == 0 and done < batches_per_epoch:  # the row follows
                    log.info("%s", progress_line(
                        epoch + 1, epochs, done, batches_per_epoch, loss=values["train/loss_step"], acc=acc,
                        lr=loop.last_lr, images_per_sec=ips, epoch_elapsed=time.perf_counter() - t0,
                        epoch_done=done - start, steps_left_after=(epochs - epoch - 1) * batches_per_epoch))
                if rt.distributed and _any_rank(stopper.signal is not None, rt):
                    stopper.signal = stopper.signal or "peer"
            # Under DDP the ranks agree on a signal only at logged steps (see above), so they stop together.
            stop = stopper.signal is not None and (not rt.distributed or step % loop.log_every == 0)
            if stop or (ckpt_every and step % ckpt_every == 0 and done < batches_per_epoch):
                loop.check_finite()  # name the bad step rather than refuse its weights
                saver.save(saver.state(epoch, done, run, st, False, {}))
                if rt.is_main:
                    # One line per mid-epoch checkpoint: tests and job scripts can follow progress.
                    log.info("checkpoint: epoch %d step %d (global step %d) -> %s", epoch + 1, done, step,
                             saver.run_dir / saver.io.LAST)
            return stop

        try:
            running = engine.train_one_epoch(loop, batches, epoch, start=start, running=running, on_step=on_step,
                                              progress=progress)
        except engine.NonFiniteLoss as exc:
            raise Diverged(f"non-finite loss at epoch {exc.epoch}, step {exc.step}; last good checkpoint: "
                           f"{saver.last_good or 'none'} (lower the learning rate, set trainer.grad_clip_norm, "
                           f"or trainer.max_bad_steps=N to skip bad steps)") from exc
        finally:
            if progress is not None:
                progress.close()
        if stopper.signal is not None:
            raise Preempted.after(stopper.signal, saver.run_dir)
        if loop.interval == "epoch":
            loop.scheduler.step()
        train = running.summary()
        seconds = time.perf_counter() - t0
        if calib is not None:  # BatchNorm statistics of the weights about to be validated (and saved)
            for net in (loop.model, loop.ema.module if loop.ema is not None else None):
                if net is not None:
                    engine.recalibrate_bn(net, calib.iter_from(0), rt)
        val = engine.evaluate(loop.model, bundle.val.iter_from(0), rt, limit=int(tcfg.limit_val_batches),
                              num_classes=len(class_names), collect=rt.is_main)
        row = {"epoch": epoch + 1, "train_loss": train["loss"], "train_acc": train["acc"], "val_loss": val["loss"],
               "val_acc": val["acc"], "lr": loop.last_lr,
               "img/s": (running.count - n0) * rt.world_size / max(seconds, 1e-9), "time_s": seconds}
        if "top5" in val:
            row["val_top5"] = val["top5"]
        # Per-epoch means at the epoch's last step: train/loss and val/loss share one x axis (see _CHARTS).
        metrics = {"train/loss": train["loss"], "train/acc": train["acc"], "val/loss": val["loss"],
                   "val/acc": val["acc"], "train/epoch_images_per_sec": row["img/s"],
                   "val/best_acc": max([r["val_acc"] for r in st.history] + [val["acc"]])}
        if "top5" in val:
            metrics["val/top5"] = val["top5"]
        if loop.ema is not None:
            ema_val = engine.evaluate(loop.ema.module, bundle.val.iter_from(0), rt,
                                      limit=int(tcfg.limit_val_batches), num_classes=len(class_names))
            row["ema_val_acc"] = ema_val["acc"]
            metrics.update({"val_ema/loss": ema_val["loss"], "val_ema/acc": ema_val["acc"]})
        tracker.scalars(metrics, loop.global_step)
        st.history.append(row)
        value = val["acc"] if monitor == "val_acc" else val["loss"]
        improved = _improved(monitor, value, st.best_value)
        if improved:
            st.best_value, st.best_epoch = value, epoch + 1
            if rt.is_main:  # confusion matrix, per-class accuracy, most confident mistakes at the best epoch
                reports.log_evaluation(tracker, val, class_names, bundle.eval_spec, loop.global_step)
        if rt.is_main:
            log.info("%s%s", table_row(row), "  *" if improved else "")
        stale = len(st.history) - st.best_epoch if st.best_epoch > 0 else 0
        early = bool(patience) and stale >= patience
        finished = epoch + 1 == epochs or early
        saver.save(saver.state(epoch + 1, 0, None, st, finished, row), best=improved, epoch=epoch + 1, value=value)
        _write_metrics(tracker, st, row, finished, time.perf_counter() - t_run, monitor)
        # curves.png after every epoch, so a stopped run has its figure too; TensorBoard gets the last one.
        reports.write_curves(tracker, st.history, lr_steps, loop.global_step if finished else None)
        tracker.flush()
        if not finished and (_any_rank(stopper.signal is not None, rt) if rt.distributed else stopper.signal):
            # The signal came during evaluation: last.pt already holds this whole epoch.
            stopper.signal = stopper.signal or "peer"
            raise Preempted.after(stopper.signal, saver.run_dir)
        if early:
            if rt.is_main:
                log.info("early stop: %s did not improve for %d epochs", monitor, patience)
            break
    if rt.is_main and st.history:
        _final_hparams(cfg, tracker, saver.run_dir, image_size=int(bundle.eval_spec["crop"]),
                       precision=rt.precision)
    return max((r["val_acc"] for r in st.history), default=0.0)  # what sweepers optimise


def _write_metrics(tracker, st: _State, row: dict, finished: bool, seconds: float, monitor: str) -> None:
    best_row = next((r for r in st.history if r["epoch"] == st.best_epoch), row)
    tracker.write_json("metrics.json", {
        "best_val_acc": max(r["val_acc"] for r in st.history),
        "best_epoch": st.best_epoch,
        "monitor": monitor,
        "best_val_loss": min(r["val_loss"] for r in st.history),
        "best_monitored_row": best_row,
        "final_val_acc": row["val_acc"],
        "final_val_loss": row["val_loss"],
        "epochs": len(st.history),
        "finished": finished,
        "seconds_this_session": round(seconds, 3),
        "history": st.history,
    })


# Custom Scalars charts (tag regexes): what the tutorials plot together.
_CHARTS = {"loss: train vs val": ["^train/loss$", "^val/loss$", "^val_ema/loss$"],
           "acc: train vs val": ["^train/acc$", "^val/acc$", "^val_ema/acc$"],
           "lr per step": ["^train/lr$"]}
# HParams metrics: the last values of per-epoch scalars (no single-point hparam/* charts).
_HPARAM_METRICS = ("val/best_acc", "val/acc", "val/loss", "train/loss", "train/acc")


def run_settings(cfg: DictConfig, *, image_size: int, precision: str) -> dict[str, Any]:
    """The settings that define a run (HParams columns): groups, lr, peak, batch, epochs, augmentation, size, seed."""
    try:
        choices = dict(HydraConfig.get().runtime.choices)
    except ValueError:  # not under Hydra (programmatic use)
        choices = {}

    def target(node) -> str:
        return str(node.get("_target_", "")).rsplit(".", 1)[-1].lower()

    hp: dict[str, Any] = {
        "name": cfg.name,
        "model": cfg.model.get("name", choices.get("model", "")),
        "dataset": choices.get("dataset") or target(cfg.dataset),
        "optimizer": choices.get("optimizer") or target(cfg.optimizer),
        "optimizer.lr": cfg.optimizer.get("lr"),
        "optimizer.weight_decay": cfg.optimizer.get("weight_decay"),
        "scheduler": choices.get("scheduler") or target(cfg.scheduler),
        "scheduler.max_lr": cfg.scheduler.get("max_lr"),
        "dataset.batch_size": cfg.dataset.get("batch_size"),
        "trainer.epochs": cfg.trainer.epochs,
        "dataset.augment": cfg.dataset.get("augment"),
        "image_size": image_size,  # resolved: dataset.image_size may say auto
        "precision": precision,  # resolved: trainer.precision may say auto
        "trainer.seed": cfg.trainer.seed,
    }
    return {k: v for k, v in hp.items() if v is not None and not OmegaConf.is_config(v)}


def _final_hparams(cfg, tracker, run_dir: Path, *, image_size: int, precision: str) -> None:
    overrides: list[str] = []
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not under Hydra (programmatic use)
        pass
    hp = run_settings(cfg, image_size=image_size, precision=precision)
    typed = []
    for item in overrides:  # every key the user set, as typed
        key, _, value = item.partition("=")
        typed.append(key.lstrip("+~"))
        hp[typed[-1]] = value
    # The row's name is the run folder (what TensorBoard's legend shows; its own name first, as the
    # table cuts long names), never a hash of the values.
    root, here = Path(str(cfg.output_root)).resolve(), Path(run_dir).resolve()
    parent = here.parent.relative_to(root) if here.is_relative_to(root) else None
    trial = f"{here.name} ({parent})" if parent is not None and str(parent) != "." else here.name
    from resnet_cli.callbacks import read_swept_keys
    from resnet_cli.config import UNLABELLED

    # Marked as differing, TensorBoard shows these columns first: in a sweep the keys it varies, else what
    # the user set (paths and how the run is watched aside).
    swept = None
    try:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            swept = read_swept_keys(Path(str(HydraConfig.get().sweep.dir)))
    except ValueError:  # not under Hydra
        pass
    differs = swept if swept else [k for k in typed if k not in UNLABELLED]
    tracker.hparams(hp, _HPARAM_METRICS, trial_id=trial, differs=differs)


def _any_rank(flag: bool, rt) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=rt.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _progress_mode(setting: str) -> str | None:
    """'bar' (tqdm), 'lines' (log lines, where tqdm would be hidden) or None, from trainer.progress."""
    setting = str(setting).lower()
    if setting == "auto":
        return "bar" if sys.stderr.isatty() else "lines"
    if setting == "lines":
        return "lines"
    return "bar" if setting in ("true", "1", "yes") else None


def _progress_bar(enabled: bool, total: int, start: int, epoch: int, epochs: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"epoch {epoch + 1}/{epochs}", unit="batch", leave=False,
                dynamic_ncols=True)


def _dry_run(raw_model, bundle, rt, steps_per_epoch: int, cfg) -> float:
    """Print the plan (parameters, MACs, steps, device, precision, memory format) and stop."""
    n_params = sum(p.numel() for p in raw_model.parameters())
    size = int(bundle.eval_spec.get("crop", 32))
    try:
        from resnet_cli.models import count_macs

        macs = f"{count_macs(raw_model, size) / 1e9:.3f} GMACs at {size}px"
    except Exception as exc:  # noqa: BLE001 - MACs are informative only
        macs = f"MACs unavailable ({type(exc).__name__})"
    lines = [f"model: {cfg.model.name}  parameters: {n_params:,}  {macs}",
             f"data: {len(bundle.class_names)} classes, {bundle.train.num_samples} train / "
             f"{bundle.val.num_samples} val samples, batch {bundle.train.batch_size}, {steps_per_epoch} steps/epoch",
             rt.describe()]
    for line in lines:
        log.info("dry run: %s", line)
    return 0.0


if __name__ == "__main__":
    main()
