"""`resnet-lr-find`: the learning-rate range test (Smith 2015, arXiv:1506.01186 sec. 3.3).

    resnet-lr-find model=resnet20 dataset=shapes optimizer=sgd --steps 200 --start-lr 1e-6 --end-lr 3

Takes exactly resnet-train's overrides (the same Hydra config composition), trains
for a few hundred steps while torch's ExponentialLR raises the learning rate from
--start-lr to --end-lr, writes the loss-vs-LR curve to TensorBoard in its own run
folder (outputs/lr_find/...) and prints the overrides to use. The model is thrown
away: nothing is checkpointed.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from resnet_cli import config as _schemas  # noqa: F401  (registers the typed schemas)
from resnet_cli import config_dir
from resnet_cli.errors import OneLineParser, UserError, positive_float, positive_int, reported

log = logging.getLogger("resnet_cli")

_OPTIONS: dict[str, Any] = {}


def _parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="resnet-lr-find", add_help=False)
    ap.add_argument("--steps", type=positive_int, default=200, help="optimizer steps in the sweep (default 200)")
    ap.add_argument("--start-lr", type=positive_float, default=1e-6)
    ap.add_argument("--end-lr", type=positive_float, default=3.0)
    ap.add_argument("--smoothing", type=positive_float, default=0.05,
                    help="weight of each new loss in the running average")
    ap.add_argument("--diverge", type=positive_float, default=4.0,
                    help="stop when the loss exceeds this multiple of its best")
    return ap


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """Suggestions from a smoothed loss-vs-LR curve.

    `lr`: where the loss falls fastest per decade (the steepest descent), a safe
    constant or peak LR; `max_lr`: a tenth of the LR at the loss minimum, the usual
    one-cycle peak. The first and last tenth of the curve are ignored (warm-up noise,
    divergence).
    """
    n = len(losses)
    if n < 5:
        raise UserError(f"the LR sweep stopped after {n} steps (loss diverged at once): lower --start-lr")
    lo, hi = max(1, n // 10), max(2, n - n // 10)
    i_min = min(range(lo, hi), key=lambda i: losses[i])
    slopes = [(losses[i + 1] - losses[i - 1]) / (math.log10(lrs[i + 1]) - math.log10(lrs[i - 1]))
              for i in range(lo, max(lo + 1, i_min))]
    i_steep = lo + min(range(len(slopes)), key=lambda j: slopes[j]) if slopes else i_min
    return {"lr": lrs[i_steep], "max_lr": lrs[i_min] / 10, "min_loss_lr": lrs[i_min], "min_loss": losses[i_min]}


def find_lr(cfg: DictConfig, run_dir: Path, *, steps: int = 200, start_lr: float = 1e-6, end_lr: float = 3.0,
            smoothing: float = 0.05, diverge: float = 4.0) -> dict[str, Any]:
    """Run the range test on the configured model and data; returns the curve and the suggestions."""
    import torch
    from hydra.utils import instantiate

    from resnet_cli import engine, optim, reports, runtime
    from resnet_cli.build import build_model
    from resnet_cli.tracking import Tracker
    from resnet_cli.validate import validate

    validate(cfg)  # the same ranges and relations as resnet-train, before any data is read
    if not 0 < start_lr < end_lr or steps < 5:
        raise UserError(f"need 0 < --start-lr < --end-lr and --steps >= 5 (got {start_lr}, {end_lr}, {steps})")
    if not 0 < smoothing <= 1 or diverge <= 1:
        raise UserError(f"need 0 < --smoothing <= 1 and --diverge > 1 (got {smoothing}, {diverge})")
    tcfg = cfg.trainer
    rt = runtime.setup(tcfg)
    try:
        bundle = instantiate(cfg.dataset)(device=rt.device, seed=int(tcfg.seed), rank=0, world_size=1)
        model = build_model(cfg.model, len(bundle.class_names), bundle.eval_spec["crop"])
        model = model.to(rt.device, memory_format=rt.memory_format)
        groups = optim.param_groups(model, weight_decay_norm_bias=tcfg.weight_decay_norm_bias,
                                    backbone_lr_scale=tcfg.backbone_lr_scale)
        optimizer = optim.build_optimizer(instantiate(cfg.optimizer), groups)
        for g in optimizer.param_groups:  # keep each group's ratio (backbone_lr_scale) to the base LR
            g["lr"] = start_lr * g.get("lr_scale", 1.0)
        gamma = (end_lr / start_lr) ** (1.0 / (steps - 1))
        scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
        criterion = torch.nn.CrossEntropyLoss(label_smoothing=float(tcfg.label_smoothing))
        scaler = torch.amp.GradScaler(rt.device.type, enabled=rt.precision == "fp16")
        tracker = Tracker(run_dir, True)
        lrs: list[float] = []
        smooth: list[float] = []
        avg, best = 0.0, math.inf
        model.train()
        epoch = 0
        while len(lrs) < steps:
            bundle.train.set_epoch(epoch)
            for batch in bundle.train.iter_from(0):
                images, targets = engine.to_device(batch, rt)
                _, loss = engine.compute_loss(model, images, targets, criterion, rt)
                scaler.scale(loss).backward()
                if tcfg.grad_clip_norm:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), float(tcfg.grad_clip_norm))
                lr = optimizer.param_groups[0]["lr"]
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                raw = float(loss.detach())  # one sync per step: the curve needs every point
                if not math.isfinite(raw):
                    break
                # Bias-corrected running average, so the first points are not pulled towards 0.
                avg = (1 - smoothing) * avg + smoothing * raw
                value = avg / (1 - (1 - smoothing) ** (len(lrs) + 1))
                lrs.append(lr)
                smooth.append(value)
                best = min(best, value)
                tracker.scalars({"lr_find/loss": value, "lr_find/raw_loss": raw, "lr_find/lr": lr}, len(lrs))
                if value > diverge * best or len(lrs) >= steps:
                    break
                scheduler.step()
            else:
                epoch += 1
                continue
            break
        result = suggest(lrs, smooth)
        tracker.image("lr_find/loss_vs_lr", reports.curve_image(lrs, smooth, title="smoothed loss vs learning rate",
                                                                 mark=result["lr"]), 0)
        tracker.text("lr_find/suggestion", _suggestion_text(result), 0)
        tracker.write_json("lr_find.json", {**result, "lrs": lrs, "losses": smooth})
        tracker.close()
        return {**result, "lrs": lrs, "losses": smooth}
    finally:
        runtime.teardown(rt)


def _suggestion_text(result: dict) -> str:
    return (f"optimizer.lr={result['lr']:.3g}  (steepest descent; constant, step or cosine schedules)\n"
            f"scheduler.max_lr={result['max_lr']:.3g}  (one-cycle peak: a tenth of the LR at the loss minimum, "
            f"{result['min_loss_lr']:.3g})")


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def hydra_main(cfg: DictConfig) -> float:
    """Hydra's task function: one range test in its own run folder."""
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = find_lr(cfg, run_dir, **_OPTIONS)
    print(f"lr finder: {len(result['lrs'])} steps from {result['lrs'][0]:.2e} to {result['lrs'][-1]:.2e}; "
          f"curve in {run_dir} (TensorBoard: lr_find/*)")
    print("suggested overrides:\n  " + _suggestion_text(result).replace("\n", "\n  "))
    return float(result["lr"])


def main() -> None:
    """Console entry point: finder flags (--steps, --start-lr, ...) first, then resnet-train's overrides."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    opts, rest = _parser().parse_known_args(sys.argv[1:])
    _OPTIONS.update(steps=opts.steps, start_lr=opts.start_lr, end_lr=opts.end_lr, smoothing=opts.smoothing,
                    diverge=opts.diverge)
    if not any(a.startswith("hydra.run.dir=") for a in rest):
        rest.append("hydra.run.dir=${output_root}/lr_find/${now:%Y-%m-%d}/${now:%H-%M-%S}")
    sys.argv = [sys.argv[0], *rest]
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    with reported("resnet-lr-find", HydraException, OmegaConfBaseException):
        hydra_main()


if __name__ == "__main__":
    main()
