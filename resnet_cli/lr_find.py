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
import itertools
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
    # add_help=False: -h reaches main(), which prints this parser's help (Hydra would print resnet-train's).
    ap = OneLineParser(prog="resnet-lr-find", add_help=False, usage="resnet-lr-find [FLAGS] [key=value ...]",
                       description=__doc__.split("\n\n")[0],
                       epilog="Every other argument is one of resnet-train's overrides (model=resnet20 dataset=shapes "
                              "optimizer.weight_decay=5e-4 ...): `resnet-train --help` lists the groups and their "
                              "options, `resnet-train --cfg job` every key.")
    ap.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    ap.add_argument("--steps", type=positive_int, default=200, help="optimizer steps in the sweep (default 200)")
    ap.add_argument("--start-lr", type=positive_float, default=1e-6, help="first learning rate (default 1e-6)")
    ap.add_argument("--end-lr", type=positive_float, default=3.0, help="last learning rate (default 3)")
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

    from resnet_cli import build, engine, reports, runtime
    from resnet_cli.tracking import Tracker
    from resnet_cli.validate import validate

    validate(cfg)  # the same ranges and relations as resnet-train, before any data is read
    if not 0 < start_lr < end_lr or steps < 5:
        raise UserError(f"need 0 < --start-lr < --end-lr and --steps >= 5 (got {start_lr}, {end_lr}, {steps})")
    if not 0 < smoothing <= 1 or diverge <= 1:
        raise UserError(f"need 0 < --smoothing <= 1 and --diverge > 1 (got {smoothing}, {diverge})")

    def sweep(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        for g in optimizer.param_groups:  # keep each group's ratio (backbone_lr_scale) to the base LR
            g["lr"] = start_lr * g.get("lr_scale", 1.0)
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=(end_lr / start_lr) ** (1.0 / (steps - 1)))

    rt = build.build_runtime(cfg.trainer)
    bundle = None
    try:
        bundle = build.build_data(cfg, rt)
        raw, model = build.build_training_model(cfg, rt, len(bundle.class_names), bundle.eval_spec["crop"])
        # The training run's own step (accumulation, clipping, precision), the lr raised after each update.
        parts = build.build_parts(cfg, rt, raw, model, steps_per_epoch=1, schedule=sweep, ema=False,
                                  class_weights=build.class_loss_weights(bundle))
        settings = build.build_settings(cfg, rt, interval="step")
        tracker = Tracker(run_dir, True)
        lrs: list[float] = []
        smooth: list[float] = []
        avg, best = 0.0, math.inf
        for epoch in itertools.count():
            bundle.train.set_epoch(epoch)
            try:
                for step in engine.train_steps(parts, settings, bundle.train.iter_from(0), epoch=epoch):
                    raw_loss = float(step.loss)  # one sync per step: the curve needs every point
                    if not math.isfinite(raw_loss):
                        break
                    # Bias-corrected running average, so the first points are not pulled towards 0.
                    avg = (1 - smoothing) * avg + smoothing * raw_loss
                    value = avg / (1 - (1 - smoothing) ** (len(lrs) + 1))
                    lrs.append(step.lrs["lr"])
                    smooth.append(value)
                    best = min(best, value)
                    tracker.scalars({"lr_find/loss": value, "lr_find/raw_loss": raw_loss,
                                     "lr_find/lr": step.lrs["lr"]}, len(lrs))
                    if value > diverge * best or len(lrs) >= steps:
                        break
                else:
                    continue  # the epoch ended before the sweep did
            except engine.NonFiniteLoss:
                pass  # the loss diverged: the sweep ends there
            break
        result = suggest(lrs, smooth)
        tracker.image("lr_find/loss_vs_lr", reports.curve_image(lrs, smooth, title="smoothed loss vs learning rate",
                                                                 mark=result["lr"]), 0)
        tracker.text("lr_find/suggestion", _suggestion_text(result), 0)
        tracker.write_json("lr_find.json", {**result, "lrs": lrs, "losses": smooth})
        tracker.close()
        return {**result, "lrs": lrs, "losses": smooth}
    finally:
        build.close_data(bundle)
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
    parser = _parser()
    opts, rest = parser.parse_known_args(sys.argv[1:])
    if opts.help:
        parser.print_help()
        return
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
