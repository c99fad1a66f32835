"""`resnet-eval`: measure a checkpoint on a dataset split: accuracy, per-class accuracy, confusion matrix.

    resnet-eval outputs/2026-01-01/12-00-00 --split val --json eval.json
    resnet-eval best.pt dataset.root=/data/cifar10          # dataset keys as in resnet-train

The dataset, precision and memory format come from the checkpoint's own config, so
the number printed for `val` is the one training measured for that checkpoint. That config is
read as data (resnet_cli.inference): only resnet-cli's own dataset builders run, with its keys
checked against their schemas, and nothing is downloaded unless you pass dataset.download=true.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from resnet_cli.errors import OneLineParser, UserError, non_negative_int, one_line, reported
from resnet_cli.fileio import atomic_write, claim_outputs
from resnet_cli.inference import TTA, TTA_HELP, WEIGHTS, WEIGHTS_HELP

if TYPE_CHECKING:
    from resnet_cli.runtime import Runtime

SPLITS = ("val", "train", "test")
# Evaluating the train split means measuring it, not training on it: no augmentation or mixing.
_PLAIN_TRAIN = {"augment": "none", "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "drop_last": False}


def dataset_config(ckpt: dict, overrides: Sequence[str], split: str, source: Path) -> tuple[Callable, dict]:
    """(builder, keywords) of the checkpoint's dataset, typed, with your `dataset.KEY=VALUE` overrides on top.

    The stored config is data: its builder must be one of resnet-cli's and its keys must fit that
    builder's schema. It never downloads unless you say `dataset.download=true` yourself.
    """
    from omegaconf import OmegaConf

    from resnet_cli.inference import dataset_builder, stored_section
    from resnet_cli.validate import validate

    builder, stored = dataset_builder(stored_section(ckpt, "dataset", source), source)
    if "download" in stored:
        stored["download"] = False  # a colleague's checkpoint must not fetch (and extract) what it names
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key.startswith("dataset."):
            raise UserError(f"override '{item}': resnet-eval takes dataset.KEY=VALUE overrides only")
        if key.split(".")[1] not in stored:
            raise UserError(f"override '{item}': the checkpoint's dataset config has no key '{key}'")
    try:
        merged = OmegaConf.merge(OmegaConf.create({"dataset": stored}), OmegaConf.from_dotlist(list(overrides)))
        cfg = OmegaConf.to_container(merged.dataset, resolve=True)
    except Exception as exc:  # noqa: BLE001 - OmegaConf's grammar errors: report the bad override
        raise UserError(f"bad override: {one_line(exc)}") from exc
    # Your overrides meet resnet-train's rules before any data is read.
    validate(OmegaConf.create({"dataset": {"_target_": ckpt["config"]["dataset"]["_target_"], **cfg}}))
    if split == "train":
        cfg.update({k: v for k, v in _PLAIN_TRAIN.items() if k in cfg})
    return builder, cfg


def _runtime(ckpt: dict, device: str | None, source: Path) -> tuple["Runtime", int]:
    """(device, precision and memory format, seed) from the checkpoint's trainer settings (typed), or --device."""
    from resnet_cli import runtime
    from resnet_cli.config import TrainerConfig
    from resnet_cli.inference import _typed, stored_section

    stored = stored_section(ckpt, "trainer", source)
    wanted = {k: stored[k] for k in ("device", "precision", "channels_last", "seed") if k in stored}
    tcfg = _typed(wanted, TrainerConfig, "trainer", source)
    dev = runtime.resolve_device(device or tcfg["device"], key="--device" if device else "trainer.device")
    precision = runtime.resolve_precision(tcfg["precision"], dev)
    channels_last = runtime.resolve_channels_last(str(tcfg["channels_last"]), dev, precision)
    return runtime.Runtime(dev, precision, channels_last), int(tcfg["seed"])


def evaluate_checkpoint(checkpoint: str | Path, split: str = "val", overrides: Sequence[str] = (),
                        device: str | None = None, limit: int = 0, weights: str = "auto",
                        tta: str = "auto") -> tuple[dict, dict]:
    """Run the checkpoint over a split; returns (report dict, raw engine.evaluate output).

    `weights`: auto (the EMA average when the run kept one, as training validated it), ema or raw;
    `tta`: auto (flip TTA where training measured that it helps), on or off.
    """
    import math

    from resnet_cli import engine, reports
    from resnet_cli.inference import load_trained, resolve_checkpoint
    from resnet_cli.runtime import resolve_device

    if split not in SPLITS:
        raise UserError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if limit < 0:
        raise UserError(f"--limit-batches {limit}: must be >= 0 (0 = all)")
    if device is not None:
        resolve_device(device, key="--device")  # the flag's own one-line error, before the checkpoint is read
    path = resolve_checkpoint(checkpoint)
    trained = load_trained(path, "cpu", weights, tta)
    ckpt = trained.ckpt
    rt, seed = _runtime(ckpt, device, path)
    builder, dataset = dataset_config(ckpt, overrides, split, path)
    model = trained.model.to(rt.device, memory_format=rt.memory_format)
    bundle = builder(**dataset, device=rt.device, seed=seed, rank=0, world_size=1)
    names = trained.class_names
    if list(bundle.class_names) != names:
        raise UserError(f"{path}: the dataset's classes {bundle.class_names[:5]}... differ from the checkpoint's "
                        f"{names[:5]}...")
    source = {"val": bundle.val, "train": bundle.train, "test": bundle.test}[split]
    if source is None:
        raise UserError(f"--split test: {path}'s dataset has no test split (a test/ folder beside train/ and val/); "
                        f"use --split val")
    out = engine.evaluate(model, source.iter_from(0), rt, limit=limit, num_classes=len(names), collect=True)
    if not all(math.isfinite(out[k]) for k in ("loss", "acc")):
        raise UserError(f"{path}: the loss on the {split} split is not finite ({out['loss']}); the weights or the "
                        f"data give NaN or inf outputs, so there is no result to report")
    cm = reports.confusion_matrix(out["pred"], out["target"], len(names))
    per_class = reports.per_class_accuracy(cm)
    report = {
        "checkpoint": str(path),
        "split": split,
        "weights": trained.weights.name,
        "weights_detail": trained.line(),
        "tta": "flip" if trained.tta else "off",
        "samples": int(cm.sum()),
        "accuracy": out["acc"],
        "loss": out["loss"],
        **({"top5": out["top5"]} if "top5" in out else {}),
        "per_class_accuracy": dict(zip(names, per_class)),
        "class_names": names,
        "confusion_matrix": cm.tolist(),
        "precision": rt.precision,
        "device": str(rt.device),
        "eval_spec": trained.eval_spec,
    }
    return report, out


def format_report(report: dict) -> str:
    """The report as terminal text: headline numbers, per-class table, confusion matrix."""
    import torch

    from resnet_cli import reports

    names = report["class_names"]
    cm = torch.tensor(report["confusion_matrix"])
    lines = [f"{report['checkpoint']}  split={report['split']}  samples={report['samples']}",
             report["weights_detail"],
             f"accuracy {report['accuracy']:.4f}  loss {report['loss']:.4f}"
             + (f"  top5 {report['top5']:.4f}" if "top5" in report else ""), "",
             reports.accuracy_table(cm, names), ""]
    shown = list(range(len(names)))
    if len(names) > reports.MAX_SHOWN_CLASSES:  # a terminal (and a reader) takes a bounded matrix
        cells = cm.nonzero()
        true, pred = cells[:, 0], cells[:, 1]
        recall = torch.tensor(reports.per_class_accuracy(cm), dtype=torch.double)
        shown = reports.most_confused(true, pred, cm[true, pred], recall, reports.MAX_SHOWN_CLASSES).tolist()
        lines.append(f"confusion matrix of the {len(shown)} most confused of {len(names)} classes "
                     f"(rows true, columns predicted; the JSON report holds every class):")
    else:
        lines.append("confusion matrix (rows true, columns predicted):")
    sub = cm[shown][:, shown]
    width = max(4, len(str(int(cm.max()))) + 1, len(str(max(shown))) + 1)
    lines.append("    " + "".join(str(j).rjust(width) for j in shown))
    for i, row in zip(shown, sub.tolist()):
        lines.append(str(i).rjust(3) + " " + "".join(str(v).rjust(width) for v in row) + f"  {names[i]}")
    return "\n".join(lines)


def write_tensorboard(report: dict, out: dict, logdir: Path) -> None:
    """Scalars, confusion matrix, per-class accuracy and misclassified grid under `logdir`."""
    from resnet_cli import reports
    from resnet_cli.tracking import Tracker

    tracker = Tracker(logdir, True)
    split = report["split"]
    scalars = {f"eval_{split}/acc": report["accuracy"], f"eval_{split}/loss": report["loss"]}
    if "top5" in report:
        scalars[f"eval_{split}/top5"] = report["top5"]
    tracker.scalars(scalars, 0)
    reports.log_evaluation(tracker, out, report["class_names"], report["eval_spec"], 0, prefix=f"eval_{split}")
    tracker.close()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of resnet-eval."""
    ap = OneLineParser(prog="resnet-eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt, else last.pt)")
    ap.add_argument("overrides", nargs="*", help="dataset.KEY=VALUE changes to the checkpoint's dataset config")
    ap.add_argument("--split", default="val", choices=SPLITS)
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON ('-' for stdout)")
    ap.add_argument("--logdir", help="TensorBoard folder (default: <checkpoint folder>/eval_<split>)")
    ap.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard events")
    ap.add_argument("--overwrite", action="store_true", help="replace a --json file that already exists")
    ap.add_argument("--device", help="default: the checkpoint's trainer.device")
    ap.add_argument("--weights", choices=WEIGHTS, default="auto", help=WEIGHTS_HELP)
    ap.add_argument("--tta", choices=TTA, default="auto", help=TTA_HELP)
    ap.add_argument("--limit-batches", type=non_negative_int, default=0,
                    help="evaluate only this many batches (0 = all)")
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """Evaluate as the parsed command line asks; prints the report and writes the files."""
    if args.json and args.json != "-":
        claim_outputs([(args.json, "--json")], overwrite=args.overwrite)
    report, out = evaluate_checkpoint(args.checkpoint, args.split, args.overrides, args.device, args.limit_batches,
                                      args.weights, args.tta)
    if args.json != "-":
        print(format_report(report))
    if args.json:
        text = json.dumps(report, indent=2, allow_nan=False) + "\n"
        sys.stdout.write(text) if args.json == "-" else atomic_write(args.json, text, durable=False)
    if not args.no_tensorboard:
        path = Path(report["checkpoint"])
        logdir = Path(args.logdir) if args.logdir else path.parent / f"eval_{args.split}"
        write_tensorboard(report, out, logdir)
    return report


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with status 2."""
    args = parse_args(argv)
    with reported("resnet-eval"):
        run(args)


if __name__ == "__main__":
    main()
