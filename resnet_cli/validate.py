"""One validation layer for the composed config: every known key's range, and the relations between keys.

Pure Python, no torch: it runs first in `fit()` (and in the LR finder), before any data
is read, and takes well under a millisecond. The table `RULES` maps a dotted key to what
it accepts; a key is checked only when the composed config has it, because dataset YAMLs
differ (shapes has num_train, image folders have val_fraction, CIFAR-100 has labels) and
the optimizer and scheduler groups hold their constructor's own arguments. The first
problem raises a UserError of one line naming the key, the value and what is allowed.

Hydra's schemas (resnet_cli/config.py) already refuse a misspelt or wrongly typed trainer,
dataset or model key while composing, and name an enum's allowed values; but a `+` override
turns the struct flag off for its node (`OmegaConf.update(..., force_add=True)`), so
`+dataset.foo=1` reaches the task. The typed nodes' keys are therefore checked against their
dataclasses here as well (a dataset YAML of your own without a schema: against the schema of
its builder), so the builders never see a key they do not take.
"""

from __future__ import annotations

import dataclasses
import math
import re
from enum import Enum
from typing import Any, Callable

from omegaconf import DictConfig, ListConfig, OmegaConf

from resnet_cli.config import (DATASET_SCHEMAS, AugmentPreset, Balance, CifarLabels, Crop, DatasetConfig, Flip,
                               HeldOutSplit, Loader, ModelConfig, Monitor, OnBadImage, PadMode, TrainConfig,
                               TrainerConfig)
from resnet_cli.errors import UserError, did_you_mean

_ABSENT = object()

# The augmentation presets resnet_cli.data.transforms.PRESETS defines (a test keeps the two equal);
# named by the schema's enum because importing the transforms would import torch.
AUGMENT_PRESETS = tuple(p.value for p in AugmentPreset)
MEMORY_PRESETS = ("none", "standard")
# Builders whose `mean: auto` / `std: auto` are computed from the images (class-folder datasets).
_FOLDER_BUILDERS = ("resnet_cli.data.imagefolder", "resnet_cli.data.flowers", "resnet_cli.data.flowers102")
# Builders whose images have one channel (the idx files of resnet_cli.data.mnist); every other dataset's have 3.
_GRAY_BUILDERS = ("resnet_cli.data.mnist", "resnet_cli.data.fashion_mnist", "resnet_cli.data.kmnist")


class Rule:
    """What one key accepts: `ok(value)` decides, `text` says it in words for the error line."""

    text = "valid"

    def ok(self, value: Any) -> bool:
        """Whether value is allowed."""
        raise NotImplementedError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Int(Rule):
    """An integer (not a bool) within [lo, hi]."""

    def __init__(self, lo: int | None = None, hi: int | None = None):
        self.lo, self.hi = lo, hi
        bounds = [f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else ""]
        self.text = "an integer " + " and ".join(b for b in bounds if b) if any(bounds) else "an integer"

    def ok(self, value: Any) -> bool:
        return _is_int(value) and (self.lo is None or value >= self.lo) and (self.hi is None or value <= self.hi)


class IntText(Int):
    """An integer as the text a str-typed key holds (keys that also take a word such as `auto`)."""

    def ok(self, value: Any) -> bool:
        text = str(value).strip()
        return not isinstance(value, bool) and text.isdigit() and super().ok(int(text))


class OddInt(Int):
    """An odd integer within [lo, hi] (a kernel padded to keep the size: an even one shifts the map by a pixel)."""

    def __init__(self, lo: int | None = None, hi: int | None = None):
        super().__init__(lo, hi)
        self.text = self.text.replace("an integer", "an odd integer")

    def ok(self, value: Any) -> bool:
        return super().ok(value) and value % 2 == 1


class Num(Rule):
    """A finite number within lo..hi; `open` names the bounds that are excluded ('lo', 'hi')."""

    def __init__(self, lo: float | None = None, hi: float | None = None, open: str = ""):
        self.lo, self.hi, self.open = lo, hi, open
        if lo is not None and hi is not None:
            self.text = (f"a number in {'(' if 'lo' in open else '['}{lo:g}, {hi:g}{')' if 'hi' in open else ']'}")
        elif lo is not None:
            self.text = f"a number {'>' if 'lo' in open else '>='} {lo:g}"
        elif hi is not None:
            self.text = f"a number {'<' if 'hi' in open else '<='} {hi:g}"
        else:
            self.text = "a finite number"

    def ok(self, value: Any) -> bool:
        if not _is_number(value):
            return False
        if self.lo is not None and (value <= self.lo if "lo" in self.open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if "hi" in self.open else value <= self.hi)


class Choice(Rule):
    """One of a fixed set of words (case-insensitive; enums compare by their value)."""

    def __init__(self, *options: str):
        self.options = options
        self.text = "one of " + ", ".join(options)

    def ok(self, value: Any) -> bool:
        value = getattr(value, "value", value)
        if isinstance(value, bool):
            value = str(value)
        return isinstance(value, str) and value.lower() in self.options


def choice_of(words: type[Enum]) -> Choice:
    """A Choice of an enum's values (the schema's own list, so the two never differ)."""
    return Choice(*(w.value for w in words))


class Bool(Rule):
    """true or false."""

    text = "true or false"

    def ok(self, value: Any) -> bool:
        return isinstance(value, bool)


class Text(Rule):
    """A non-empty string (a path, a URL, a name)."""

    text = "a non-empty string"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and value.strip() != ""


class Null(Rule):
    """null."""

    text = "null"

    def ok(self, value: Any) -> bool:
        return value is None


class Match(Rule):
    """A string matching a regular expression (described by `text`)."""

    def __init__(self, pattern: str, text: str):
        self.pattern, self.text = re.compile(pattern, re.IGNORECASE), text

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and self.pattern.fullmatch(value.strip()) is not None


class AnyOf(Rule):
    """Any of several rules (e.g. `auto` or an integer >= 8)."""

    def __init__(self, *rules: Rule):
        self.rules = rules
        self.text = " or ".join(r.text for r in rules)

    def ok(self, value: Any) -> bool:
        return any(r.ok(value) for r in self.rules)


class Seq(Rule):
    """A list whose items all pass `item`; optionally of fixed length and non-decreasing."""

    def __init__(self, item: Rule, length: int | None = None, ordered: bool = False, min_length: int = 0):
        self.item, self.length, self.ordered, self.min_length = item, length, ordered, min_length
        size = f"{length} " if length else ""
        order = ", in increasing order" if ordered else ""
        self.text = f"a list of {size}{_plural(item.text)}{order}"

    def ok(self, value: Any) -> bool:
        if not isinstance(value, (list, tuple)) or len(value) < self.min_length:
            return False
        if self.length is not None and len(value) != self.length:
            return False
        if not all(self.item.ok(v) for v in value):
            return False
        return not self.ordered or all(a <= b for a, b in zip(value, value[1:]))


class Augment(Rule):
    """Augmentation presets joined by '+'."""

    text = f"presets from {', '.join(AUGMENT_PRESETS)}, joined by '+'"

    def ok(self, value: Any) -> bool:
        return isinstance(value, str) and bool(_presets(value)) and all(n in AUGMENT_PRESETS for n in _presets(value))


def _plural(text: str) -> str:
    return re.sub(r"^an? (\w+)", r"\1s", text)


def _presets(value: str) -> list[str]:
    return [n.strip().lower() for n in value.split("+") if n.strip()]


POSITIVE = Num(0, open="lo")
NON_NEGATIVE = Num(0)
FRACTION = Num(0, 1, open="hi")  # [0, 1)
BOOL_WORDS = Choice("auto", "true", "false", "1", "0", "yes", "no")  # what runtime.py accepts

RULES: dict[str, Rule] = {
    # run level
    "output_root": Text(),
    "name": Text(),
    # trainer (typed by resnet_cli.config.TrainerConfig)
    "trainer.epochs": Int(1),
    "trainer.seed": Int(0, 2**63 - 1),
    "trainer.device": Match(r"auto|cpu|mps|cuda(:\d+)?", "auto, cpu, cuda or cuda:N"),
    "trainer.precision": Choice("auto", "fp32", "bf16", "fp16"),
    "trainer.channels_last": BOOL_WORDS,
    "trainer.compile": Bool(),
    "trainer.deterministic": Bool(),
    "trainer.grad_clip_value": NON_NEGATIVE,
    "trainer.grad_clip_norm": NON_NEGATIVE,
    "trainer.grad_accum_steps": Int(1),
    "trainer.label_smoothing": FRACTION,
    "trainer.ema_decay": FRACTION,
    "trainer.precise_bn_images": Int(0),
    "trainer.warmup_epochs": NON_NEGATIVE,
    "trainer.weight_decay_norm_bias": Bool(),
    "trainer.backbone_lr_scale": NON_NEGATIVE,
    "trainer.monitor": choice_of(Monitor),
    "trainer.early_stop_patience": Int(0),
    "trainer.log_every_n_steps": Int(1),
    "trainer.checkpoint_every_n_steps": Int(0),
    "trainer.save_top_k": Int(0),
    "trainer.resume": AnyOf(Null(), Text()),
    "trainer.overwrite": Bool(),
    "trainer.max_bad_steps": Int(0),
    "trainer.limit_train_batches": Int(0),
    "trainer.limit_val_batches": Int(0),
    "trainer.sync_batchnorm": Bool(),
    "trainer.log_graph": Bool(),
    "trainer.progress": BOOL_WORDS,
    "trainer.dry_run": Bool(),
    "trainer.num_threads": AnyOf(Choice("auto"), IntText(1)),
    "trainer.progress_every_n_steps": Int(0),
    # dataset (typed by a resnet_cli.config.DatasetConfig subclass; a key is checked where the dataset has it)
    "dataset._target_": Text(),
    "dataset.root": AnyOf(Null(), Text()),
    "dataset.num_train": AnyOf(Null(), Int(1)),  # null (mnist): all of them
    "dataset.num_val": AnyOf(Null(), Int(1)),
    "dataset.image_size": AnyOf(Choice("auto"), Int(8)),
    "dataset.resize": AnyOf(Null(), Choice("auto"), Int(1)),
    "dataset.auto_max_size": Int(8),
    "dataset.batch_size": AnyOf(Choice("auto"), Int(1)),
    "dataset.val_batch_size": AnyOf(Null(), Int(1)),
    "dataset.num_workers": AnyOf(Choice("auto"), Int(0)),
    "dataset.loader": choice_of(Loader),
    "dataset.cache_size": AnyOf(Null(), Int(1)),
    "dataset.memory_budget": Num(0, 1, open="lo"),
    "dataset.augment": Augment(),
    "dataset.flip": choice_of(Flip),
    "dataset.vflip": Bool(),
    "dataset.crop": choice_of(Crop),
    "dataset.balance": choice_of(Balance),
    "dataset.pad": AnyOf(Choice("auto"), Int(0)),
    "dataset.pad_mode": choice_of(PadMode),
    "dataset.scale": Seq(Num(0, 1, open="lo"), length=2, ordered=True),
    "dataset.cutout": Int(0),
    "dataset.mixup_alpha": NON_NEGATIVE,
    "dataset.cutmix_alpha": NON_NEGATIVE,
    "dataset.mean": AnyOf(Choice("auto"), Seq(Num(), min_length=1)),  # one per channel: a relation below
    "dataset.std": AnyOf(Choice("auto"), Seq(POSITIVE, min_length=1)),
    "dataset.channels": Int(1),
    "dataset.drop_last": Bool(),
    "dataset.val_fraction": FRACTION,
    "dataset.split_seed": Int(0),
    "dataset.on_bad_image": choice_of(OnBadImage),
    "dataset.max_bad_images": Int(0),
    "dataset.verify_images": Bool(),
    "dataset.download": Bool(),
    "dataset.url": Text(),
    "dataset.url_prefix": Text(),
    "dataset.md5": AnyOf(Null(), Match(r"[0-9a-f]{32}", "32 hex digits")),
    "dataset.sha256": AnyOf(Null(), Match(r"[0-9a-f]{64}", "64 hex digits")),
    "dataset.mirrors": AnyOf(Null(), Seq(Text(), min_length=1)),
    **{f"dataset.md5s.{role}": AnyOf(Null(), Match(r"[0-9a-f]{32}", "32 hex digits"))
       for role in ("train_images", "train_labels", "test_images", "test_labels")},
    "dataset.labels": choice_of(CifarLabels),
    "dataset.val_split": choice_of(HeldOutSplit),
    # model (typed by a resnet_cli.config.ModelConfig subclass: create_model's and its builder's keywords)
    "model.name": Text(),
    "model.in_channels": Int(1),
    "model.drop_rate": FRACTION,
    "model.pretrained": AnyOf(Bool(), Text()),
    "model.head_hidden": Int(1),
    "model.head_dropout": FRACTION,
    "model.shortcut_kernel": OddInt(1),
    "model.groups": Int(1),
    "model.width_per_group": Int(1),
    # optimizer (torch.optim constructor arguments)
    "optimizer._target_": Text(),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.momentum": FRACTION,
    "optimizer.dampening": FRACTION,
    "optimizer.nesterov": Bool(),
    "optimizer.betas": Seq(FRACTION, length=2),
    "optimizer.eps": POSITIVE,
    "optimizer.amsgrad": Bool(),
    # scheduler (torch.optim.lr_scheduler constructor arguments, plus `interval`)
    "scheduler._target_": Text(),
    "scheduler.interval": Choice("step", "epoch"),
    "scheduler.max_lr": POSITIVE,  # one number: build_scheduler scales it per parameter group
    "scheduler.pct_start": Num(0, 1, open="lo hi"),
    "scheduler.anneal_strategy": Choice("cos", "linear"),
    "scheduler.div_factor": POSITIVE,
    "scheduler.final_div_factor": POSITIVE,
    "scheduler.three_phase": Bool(),
    "scheduler.cycle_momentum": Bool(),
    "scheduler.base_momentum": FRACTION,
    "scheduler.max_momentum": FRACTION,
    "scheduler.step_size": Int(1),
    "scheduler.gamma": POSITIVE,
    "scheduler.milestones": Seq(Int(1), ordered=True),
    "scheduler.eta_min": NON_NEGATIVE,
    "scheduler.factor": Num(0, 1),
    "scheduler.total_iters": Int(0),
    "scheduler.T_max": Int(1),
    "scheduler.total_steps": Int(1),
    # ReduceLROnPlateau (its mode follows trainer.monitor; build_scheduler refuses a contradicting one)
    "scheduler.mode": Choice("min", "max"),
    "scheduler.patience": Int(0),
    "scheduler.threshold": NON_NEGATIVE,
    "scheduler.threshold_mode": Choice("rel", "abs"),
    "scheduler.cooldown": Int(0),
    "scheduler.min_lr": NON_NEGATIVE,
    "scheduler.eps": NON_NEGATIVE,
}


def _relations(get: Callable[[str], Any]) -> list[tuple[str, Any, str]]:
    """Checks that involve two keys: (key, value, what is wrong) for each that fails."""
    bad: list[tuple[str, Any, str]] = []
    epochs, warmup = get("trainer.epochs"), get("trainer.warmup_epochs")
    if _is_number(warmup) and _is_int(epochs) and warmup > 0 and warmup >= epochs:
        bad.append(("trainer.warmup_epochs", warmup, f"must be less than trainer.epochs={epochs} (the warm-up "
                                                     f"would never end)"))
    resume, overwrite = get("trainer.resume"), get("trainer.overwrite")
    if overwrite is True and resume not in (None, _ABSENT):
        bad.append(("trainer.overwrite", True, f"contradicts trainer.resume={resume}: resume a run or replace it, "
                                               f"not both"))
    accum, limit = get("trainer.grad_accum_steps"), get("trainer.limit_train_batches")
    if _is_int(accum) and _is_int(limit) and 0 < limit < accum:
        bad.append(("trainer.limit_train_batches", limit, f"is fewer than trainer.grad_accum_steps={accum} "
                                                          f"micro-batches: no optimizer step would run"))
    if get("optimizer.nesterov") is True:
        momentum, dampening = get("optimizer.momentum"), get("optimizer.dampening")
        if momentum in (_ABSENT, 0, 0.0) or (_is_number(dampening) and dampening != 0):
            bad.append(("optimizer.nesterov", True, "needs optimizer.momentum > 0 and optimizer.dampening=0 "
                                                    "(or set optimizer.nesterov=false)"))
    if get("scheduler.three_phase") is True:
        pct = get("scheduler.pct_start")
        if _is_number(pct) and pct >= 0.5:
            bad.append(("scheduler.pct_start", pct, "must be below 0.5 with scheduler.three_phase=true (the "
                                                    "warm-up and its mirror take 2 x pct_start of the run)"))
    if str(get("scheduler._target_")).endswith("ReduceLROnPlateau"):  # steps on the val metric, once per epoch
        if get("scheduler.interval") == "step":
            bad.append(("scheduler.interval", "step", "cannot drive ReduceLROnPlateau: it steps on the validation "
                                                      "metric, once per epoch; set scheduler.interval=epoch"))
        if _is_number(warmup) and warmup > 0:
            bad.append(("trainer.warmup_epochs", warmup, "cannot precede ReduceLROnPlateau (it steps on the "
                                                         "validation metric); set trainer.warmup_epochs=0"))
        mode, monitor = get("scheduler.mode"), get("trainer.monitor")
        known = monitor in {m.value for m in Monitor}
        if mode in ("min", "max") and known and mode != Monitor(monitor).goal:
            bad.append(("scheduler.mode", mode, f"contradicts trainer.monitor={monitor}; leave scheduler.mode out: "
                                                f"it follows the monitor"))
    loader, augment = get("dataset.loader"), get("dataset.augment")
    if loader == "memory" and isinstance(augment, str):
        extra = [n for n in _presets(augment) if n not in MEMORY_PRESETS]
        if extra:
            bad.append(("dataset.augment", augment, f"needs dataset.loader=dataloader ({extra[0]} runs per image); "
                                                    f"the memory loader offers {', '.join(MEMORY_PRESETS)}"))
    target = get("dataset._target_")
    declared = get("dataset.channels")
    # A dataset node without the key (a YAML of your own without a schema line): what its builder reads.
    channels = declared if _is_int(declared) else 1 if target in _GRAY_BUILDERS else 3
    numbers = f"{channels} number{'s' * (channels > 1)}"
    if target in _GRAY_BUILDERS and channels != 1:
        bad.append(("dataset.channels", declared, "is 1 for the idx datasets: their images are grayscale"))
    for key in ("dataset.mean", "dataset.std"):
        value = get(key)
        if value == "auto" and target not in _FOLDER_BUILDERS:
            bad.append((key, "auto", f"is computed for image-folder datasets only; give {numbers}"))
        elif isinstance(value, list) and len(value) != channels:
            bad.append((key, value, f"must have {numbers}, one per channel of the dataset's {channels}-channel "
                                    f"images"))
    in_channels = get("model.in_channels")
    if _is_int(in_channels) and in_channels != channels:
        bad.append(("model.in_channels", in_channels, f"contradicts the dataset's {channels}-channel images; leave it "
                                                      f"out: it follows dataset.channels"))
    return bad


def validate(cfg: DictConfig) -> None:
    """Check the composed config against RULES, the relations and the typed schemas; one-line UserError."""
    _check_schema_keys(cfg)
    # One plain copy (Hydra's own node left out): looking keys up in it is ~100x faster than OmegaConf.select.
    plain = {key: (OmegaConf.to_container(node, resolve=True, enum_to_str=True)
                   if isinstance(node, (DictConfig, ListConfig)) else node)
             for key, node in ((k, cfg[k]) for k in cfg.keys() if k != "hydra")}

    def get(key: str) -> Any:
        value: Any = plain
        for part in key.split("."):
            if not isinstance(value, dict) or part not in value:
                return _ABSENT
            value = value[part]
        return value

    for key, rule in RULES.items():
        value = get(key)
        if value is not _ABSENT and not rule.ok(value):
            raise UserError(f"{key}={_show(value)}: must be {rule.text}")
    for key, value, problem in _relations(get):
        raise UserError(f"{key}={_show(value)} {problem}")


def _check_schema_keys(cfg: DictConfig) -> None:
    """Keys of the typed nodes that their dataclass does not declare (they can only come from '+key=...')."""
    for prefix, node, schema in _typed_nodes(cfg):
        known = [f.name for f in dataclasses.fields(schema)]
        for key in node.keys():
            if key in known or (prefix == "" and key == "hydra"):
                continue
            # The dataset is named by its builder, the model by its name: what the user chose.
            owner = node.get("name") if prefix == "model." else node.get("_target_")
            where = (f"{owner} takes no such key (`--cfg job` prints every key)" if prefix in ("dataset.", "model.")
                     else "a '+' adds keys to the untyped groups only (optimizer, scheduler)")
            raise UserError(f"unknown config key '{prefix}{key}'{did_you_mean(str(key), known)}: {where}")


def _typed_nodes(cfg: DictConfig) -> list[tuple[str, DictConfig, type]]:
    """(key prefix, node, its dataclass) for the top level and each typed group present in cfg."""
    nodes = [("", cfg, TrainConfig)]
    for group, base, by_target in (("trainer", TrainerConfig, {}), ("dataset", DatasetConfig, DATASET_SCHEMAS),
                                   ("model", ModelConfig, {})):
        node = cfg.get(group) if group in cfg else None
        if not isinstance(node, DictConfig):
            continue
        schema = OmegaConf.get_type(node)
        if not (isinstance(schema, type) and issubclass(schema, base)):
            # A YAML of your own without a schema line: the schema of the builder it names, if it is ours.
            schema = by_target.get(str(node.get("_target_")), base if group == "trainer" else None)
        if schema is not None:
            nodes.append((f"{group}.", node, schema))
    return nodes


def _show(value: Any) -> str:
    value = getattr(value, "value", value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
