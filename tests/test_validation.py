"""The validation layer, property-based: every typed trainer key, every key of dataset=shapes and
dataset=imagefolder, and the optimizer and scheduler keys, drawn in and out of range.

Each draw is composed with the real configs (Hydra's own override code on the real composed
groups) and validated; an oracle written here, independently of resnet_cli/validate.py, says
whether the draw should pass. A refusal must be one line naming an offending key. A few drawn
configs from the accepted side are then trained for real, in-process.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY, apply, compose, fit_inproc, read_metrics

DRAWS = 240  # property draws per CI run (derandomized: the same draws every time)
DATASETS = ("shapes", "imagefolder")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("onecycle", "step", "multistep", "cosine", "none", "plateau")
ABSENT = object()


# ---------------------------------------------------------------------------------------------
# Value domains: what a key accepts (valid) and what it must refuse (invalid), as Python values.
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Dom:
    """A key's valid and invalid values: strategies for the property test, plus fixed edge cases.

    `good` holds the boundary values that must pass (lo itself, the other choices...), `bad`
    one example of each kind of mistake (just past each bound, nan/inf, a word, a wrong type).
    """

    valid: st.SearchStrategy
    invalid: st.SearchStrategy
    good: list = dataclasses.field(default_factory=list)
    bad: list = dataclasses.field(default_factory=list)


WORD = st.sampled_from(["abc", "bogus", "x1"])
NOT_FINITE = st.sampled_from([math.nan, math.inf, -math.inf])


def ints(lo: int, hi: int | None = None) -> Dom:
    top = hi if hi is not None else lo + 10**6
    bad = [st.integers(max_value=lo - 1, min_value=lo - 10**6), WORD, st.sampled_from([1.5, -0.5, True, [1]])]
    if hi is not None:
        bad.append(st.integers(min_value=hi + 1, max_value=hi + 10**6))
    edges = [lo - 1, "abc", 1.5, True, [1]] + ([hi + 1] if hi is not None else [])
    return Dom(st.integers(lo, top) | st.just(lo), st.one_of(bad), [lo, lo + 1] + ([hi] if hi else []), edges)


def nums(lo: float | None = None, hi: float | None = None, open_lo: bool = False, open_hi: bool = False) -> Dom:
    valid = st.floats(min_value=lo, max_value=hi, exclude_min=open_lo and lo is not None,
                      exclude_max=open_hi and hi is not None, allow_nan=False, allow_infinity=False)
    bad = [NOT_FINITE, WORD, st.just([0.5])]
    if lo is not None:
        bad.append(st.floats(max_value=lo, exclude_max=not open_lo, allow_nan=False, allow_infinity=False,
                             min_value=lo - 1e6))
    if hi is not None:
        bad.append(st.floats(min_value=hi, exclude_min=not open_hi, allow_nan=False, allow_infinity=False,
                             max_value=hi + 1e6))
    good, edges = [], [math.nan, math.inf, -math.inf, "abc", [0.5]]
    if lo is not None:
        good.append(lo + 1e-6 if open_lo else lo)
        edges += [lo] if open_lo else [lo - 1e-6]
    if hi is not None:
        good.append(hi - 1e-6 if open_hi else hi)
        edges += [hi] if open_hi else [hi + 1e-6]
    return Dom(valid, st.one_of(bad), good, edges)


def words(*options: str, bad: tuple = ("bogus", "fp8", "x")) -> Dom:
    wrong = [b for b in bad if b not in options]
    return Dom(st.sampled_from(options), st.sampled_from(wrong), list(options), wrong)


def typed_bool() -> Dom:
    return Dom(st.booleans(), st.sampled_from(["maybe", "bogus"]), [True, False], ["maybe"])


def plain_bool() -> Dom:
    # Untyped keys get what Hydra parsed: 'yes' stays a string, 1 an int; neither is a bool.
    return Dom(st.booleans(), st.sampled_from(["maybe", "yes", 1]), [True, False], ["maybe", "yes", 1])


def listed(good: list, bad: list, valid: st.SearchStrategy | None = None) -> Dom:
    return Dom(valid if valid is not None else st.sampled_from(good), st.sampled_from(bad), good, bad)


def either(*doms: Dom, invalid: Dom) -> Dom:
    return Dom(st.one_of([d.valid for d in doms]), invalid.invalid, [g for d in doms for g in d.good], invalid.bad)


FRACTION = nums(0, 1, open_hi=True)
POSITIVE = nums(0, open_lo=True)
NON_NEG = nums(0)
SWITCH = words("auto", "true", "false", bad=("bogus", "maybe", "2"))

TRAINER: dict[str, Dom] = {
    "epochs": ints(1), "seed": ints(0, 2**63 - 1),
    "device": listed(["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"], ["nonsense", "gpu", "cuda:x", "cpu0"]),
    "precision": words("auto", "fp32", "bf16", "fp16"), "channels_last": SWITCH,
    "compile": typed_bool(), "deterministic": typed_bool(),
    "grad_clip_value": NON_NEG, "grad_clip_norm": NON_NEG, "grad_accum_steps": ints(1),
    "label_smoothing": FRACTION, "ema_decay": FRACTION, "precise_bn_images": ints(0), "warmup_epochs": NON_NEG,
    "weight_decay_norm_bias": typed_bool(), "backbone_lr_scale": NON_NEG,
    "monitor": words("val_acc", "val_loss", bad=("val_top5", "loss")), "early_stop_patience": ints(0),
    "log_every_n_steps": ints(1), "checkpoint_every_n_steps": ints(0), "save_top_k": ints(0),
    "resume": listed([None, "auto", "outputs/some/run"], [""]),
    "overwrite": typed_bool(), "max_bad_steps": ints(0), "limit_train_batches": ints(0),
    "limit_val_batches": ints(0), "sync_batchnorm": typed_bool(), "log_graph": typed_bool(),
    "progress": SWITCH, "dry_run": typed_bool(),
    "num_threads": either(listed(["auto"], []), ints(1), invalid=ints(1)), "progress_every_n_steps": ints(0),
}
MEAN = listed([[0.5, 0.5, 0.5], [-1.0, 0.0, 10.0]], [[0.5, 0.5], [0.5, "a", 0.5], [0.5, math.nan, 0.5], "abc"],
              st.lists(st.floats(-10, 10), min_size=3, max_size=3))
STD = listed([[0.3, 0.3, 0.3], [1e-3, 1.0, 5.0]], [[0.3, 0.0, 0.3], [0.3, -1.0, 0.3], [0.1, 0.1, 0.1, 0.1], "abc"],
             st.lists(st.floats(0.01, 10), min_size=3, max_size=3))
AUGMENT = listed(["none", "standard", "trivialaugment", "standard+randomerasing", "autoaugment",
                  "randaugment+colorjitter"], ["bogus", "standard+bogus", "", "randaugmnt"])
DATASET: dict[str, Dom] = {
    "num_train": ints(1), "num_val": ints(1),
    "image_size": either(listed(["auto"], []), ints(8), invalid=ints(8)),
    "batch_size": either(listed(["auto"], []), ints(1), invalid=ints(1)), "val_batch_size": either(listed([None], []), ints(1), invalid=ints(1)),
    "num_workers": either(listed(["auto"], []), ints(0), invalid=ints(0)), "loader": words("auto", "memory", "dataloader", bad=("disk", "gpu")),
    "augment": AUGMENT, "flip": SWITCH, "vflip": plain_bool(),
    "crop": words("auto", "pad", "resized", bad=("center", "random")),
    "pad": either(listed(["auto"], []), ints(0), invalid=ints(0)),
    "pad_mode": words("reflect", "constant", "edge", bad=("wrap", "zero")), "cutout": ints(0),
    "mixup_alpha": NON_NEG, "cutmix_alpha": NON_NEG, "mean": MEAN, "std": STD, "drop_last": plain_bool(),
    # image folders
    "root": listed([None, "data/photos"], [""]),
    "val_fraction": FRACTION, "split_seed": ints(0),
    "resize": either(listed([None, "auto"], []), ints(1), invalid=ints(1)),
    "cache_size": either(listed([None], []), ints(1), invalid=ints(1)),
    "auto_max_size": ints(8), "memory_budget": nums(0, 1, open_lo=True),
    "scale": listed([[0.08, 1.0], [0.5, 0.5], [1.0, 1.0]], [[0.9, 0.1], [0.0, 1.0], [0.5, 1.5], [0.1], [0.1, 0.5, 1.0],
                                                             "abc"],
                    st.tuples(st.floats(0.01, 1), st.floats(0.01, 1)).map(lambda p: sorted(p))),
    "on_bad_image": words("error", "skip", bad=("ignore", "warn")), "max_bad_images": ints(0),
    "verify_images": plain_bool(),
    "balance": words("auto", "off", "sampler", "loss", bad=("bogus", "weighted", "on")),
}
OPTIMIZER: dict[str, Dom] = {
    "lr": POSITIVE, "momentum": FRACTION, "nesterov": plain_bool(), "weight_decay": NON_NEG,
    "betas": listed([[0.9, 0.999], [0.0, 0.0]], [[0.9, 1.0], [-0.1, 0.9], [0.9], [0.9, 0.99, 0.9], "abc"],
                    st.lists(st.floats(0, 0.999), min_size=2, max_size=2)),
}
SCHEDULER: dict[str, Dom] = {
    "interval": words("step", "epoch", bad=("batch", "iteration")), "max_lr": POSITIVE,
    "pct_start": nums(0, 1, open_lo=True, open_hi=True), "anneal_strategy": words("cos", "linear", bad=("cosine",)),
    "div_factor": POSITIVE, "final_div_factor": POSITIVE, "step_size": ints(1), "gamma": POSITIVE,
    "milestones": listed([[], [1], [5, 5, 9]], [[0, 5], [10, 5], [1.5], "abc"],
                         st.lists(st.integers(1, 500), max_size=4).map(sorted)),
    "eta_min": NON_NEG, "factor": nums(0, 1), "total_iters": ints(0),
    "patience": ints(0), "threshold": NON_NEG, "threshold_mode": words("rel", "abs", bad=("relative",)),
    "cooldown": ints(0), "min_lr": NON_NEG,
}
GROUPS = {"trainer": TRAINER, "dataset": DATASET, "optimizer": OPTIMIZER, "scheduler": SCHEDULER}
SKIP = {"_target_", "_partial_"}  # constructor plumbing, not user settings


# ---------------------------------------------------------------------------------------------
# Composition: the real configs, composed once per group choice; each draw's key=value overrides
# then go through Hydra's own override code (the same call compose() makes).
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def base(dataset: str, optimizer: str, scheduler: str):
    """The composed config for one choice of groups (conftest.compose: the entry point's composition)."""
    return compose([f"dataset={dataset}", f"optimizer={optimizer}", f"scheduler={scheduler}"])


def fmt(value: Any) -> str:
    """A Python value as Hydra override text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return "nan" if value != value else "inf" if value == math.inf else "-inf" if value == -math.inf \
            else repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(fmt(v) for v in value) + "]"
    if value == "":
        return "''"
    return str(value)


def relation_problems(v: Callable[[str], Any]) -> list[set[str]]:
    """The cross-key rules the README and the issue state, as sets of keys any of which may be named."""
    out = []
    epochs, warmup = v("trainer.epochs"), v("trainer.warmup_epochs")
    if warmup > 0 and warmup >= epochs:
        out.append({"trainer.warmup_epochs", "trainer.epochs"})
    if v("trainer.overwrite") is True and v("trainer.resume") is not None:
        out.append({"trainer.overwrite", "trainer.resume"})
    if 0 < v("trainer.limit_train_batches") < v("trainer.grad_accum_steps"):
        out.append({"trainer.limit_train_batches", "trainer.grad_accum_steps"})
    if v("optimizer.nesterov") is True and v("optimizer.momentum") == 0:
        out.append({"optimizer.nesterov", "optimizer.momentum"})
    if v("scheduler._target_").endswith("ReduceLROnPlateau"):
        if v("scheduler.interval") == "step":
            out.append({"scheduler.interval"})
        if warmup > 0:
            out.append({"trainer.warmup_epochs"})
    augment = v("dataset.augment")
    if v("dataset.loader") == "memory" and any(n.strip() not in ("none", "standard") for n in augment.split("+")):
        out.append({"dataset.augment", "dataset.loader"})
    for key in ("dataset.mean", "dataset.std"):
        if v(key) == "auto" and not v("dataset._target_").endswith("imagefolder"):
            out.append({key})
    return out


@st.composite
def draws(draw):
    """Groups, then 1-4 keys of them, each drawn valid or invalid; sometimes an unknown or misspelt key."""
    dataset, optimizer, scheduler = (draw(st.sampled_from(c)) for c in (DATASETS, OPTIMIZERS, SCHEDULERS))
    cfg = base(dataset, optimizer, scheduler)
    present = {g: [k for k in cfg[g] if k not in SKIP] for g in ("dataset", "optimizer", "scheduler")}
    present["trainer"] = list(cfg.trainer)
    keys = [f"{g}.{k}" for g, ks in present.items() for k in ks]
    chosen = draw(st.lists(st.sampled_from(keys), min_size=1, max_size=4, unique=True))
    picks = []
    for i, key in enumerate(chosen):
        group, name = key.split(".", 1)
        # The first key is the one under test (invalid 3 times in 5); the others are in range, so a refusal
        # must come from it or from a relation between the drawn values.
        ok = draw(st.integers(0, 4)) >= 3 if i == 0 else True
        value = draw((GROUPS[group][name].valid if ok else GROUPS[group][name].invalid))
        picks.append((key, value, ok))
    extra = draw(st.sampled_from([None, None, None, None, "unknown", "typo"]))
    return dataset, optimizer, scheduler, picks, extra


SEEN: dict[str, Any] = {"draws": 0, "refused": set(), "accepted": 0}


def refusal(cfg, overrides: list[str]) -> str | None:
    """None when compose + validate accept the overrides, else the one-line message."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from resnet_cli.errors import UserError, one_line
    from resnet_cli.validate import validate

    try:
        validate(apply(cfg, overrides))
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        return one_line(exc)
    return None


def edge_cases():
    """(group choice, key, value, in its own range) for every key of every tested group option, each once."""
    plan = [(("shapes", "sgd", "onecycle"), ("trainer", "dataset", "optimizer", "scheduler")),
            (("imagefolder", "sgd", "onecycle"), ("dataset",))]
    plan += [(("shapes", o, "onecycle"), ("optimizer",)) for o in OPTIMIZERS if o != "sgd"]
    plan += [(("shapes", "sgd", s), ("scheduler",)) for s in SCHEDULERS if s != "onecycle"]
    cases = []
    for groups, tested in plan:
        cfg = base(*groups)
        for group in tested:
            for name in (k for k in cfg[group] if k not in SKIP):
                dom = GROUPS[group][name]
                cases += [(groups, f"{group}.{name}", v, True) for v in dom.good]
                cases += [(groups, f"{group}.{name}", v, False) for v in dom.bad]
    return cases


def offending_keys(cfg0, picks: list[tuple[str, Any, bool]]) -> set[str]:
    """The keys a refusal may name: the out-of-range picks, else those of a broken cross-key rule."""
    from omegaconf import OmegaConf

    offending = {k for k, _, ok in picks if not ok}
    if offending:
        return offending
    drawn = {k: v for k, v, _ in picks}

    def value(key: str) -> Any:
        if key in drawn:
            return drawn[key]
        got = OmegaConf.select(cfg0, key, default=None)
        return getattr(got, "value", got)

    for keys in relation_problems(value):
        offending |= keys
    return offending


def test_every_key_accepts_its_bounds_and_refuses_each_kind_of_bad_value():
    """Deterministic edges per key: the bounds pass, one step past them and each wrong type is refused."""
    wrong = []
    refused = set()
    for groups, key, value, ok in edge_cases():
        offending = offending_keys(base(*groups), [(key, value, ok)])
        message = refusal(base(*groups), [f"{key}={fmt(value)}"])
        if not offending and message is not None:
            wrong.append(f"{key}={fmt(value)} ({'/'.join(groups)}) refused: {message}")
        elif offending and (message is None or not any(k in message for k in offending) or "\n" in message):
            wrong.append(f"{key}={fmt(value)} ({'/'.join(groups)}) gave {message!r}, expected one of {offending}")
        elif offending:
            refused.add((key, fmt(value)))
    assert not wrong, "\n".join(wrong[:20])
    SEEN["edges"] = len(refused)


def test_every_key_of_the_tested_groups_has_a_domain():
    """A key added to these YAMLs or to TrainerConfig must get a domain here (and a rule in validate.py)."""
    from resnet_cli.validate import RULES

    for d, o, s in [(d, o, s) for d in DATASETS for o in OPTIMIZERS for s in SCHEDULERS]:
        cfg = base(d, o, s)
        for group, doms in GROUPS.items():
            for key in cfg[group]:
                if key not in SKIP:
                    assert key in doms, f"{group}.{key} ({d}/{o}/{s}) has no test domain"
                    assert f"{group}.{key}" in RULES, f"{group}.{key} has no validation rule"


@settings(derandomize=True, max_examples=DRAWS, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(draws())
def test_every_drawn_config_is_refused_in_one_line_naming_the_key_or_accepted(case):
    dataset, optimizer, scheduler, picks, extra = case
    overrides = [f"{k}={fmt(v)}" for k, v, _ in picks]
    offending = {k for k, _, ok in picks if not ok}
    if extra == "unknown":
        overrides.append("+trainer.foo_bar=1")
        offending.add("trainer.foo_bar")
    elif extra == "typo":
        overrides.append("trainer.epoch=3")
        offending.add("trainer.epoch")
    cfg0 = base(dataset, optimizer, scheduler)
    if not offending:  # every value is in range: the cross-key rules decide
        offending = offending_keys(cfg0, picks)
    SEEN["draws"] += 1
    message = refusal(cfg0, overrides)
    if message is not None:
        assert offending, f"{overrides} ({dataset}/{optimizer}/{scheduler}) was refused: {message}"
        assert "\n" not in message and len(message) < 400, message
        assert any(k in message for k in offending), f"{message!r} names none of {sorted(offending)}"
        SEEN["refused"].add(tuple(sorted(overrides)))
    else:
        assert not offending, f"{overrides} ({dataset}/{optimizer}/{scheduler}) was accepted; expected a refusal " \
                              f"naming one of {sorted(offending)}"
        SEEN["accepted"] += 1


def test_the_property_draws_covered_both_sides():
    """Runs after the property test (file order): enough draws, and many distinct refused configs."""
    if SEEN["draws"] < DRAWS:
        pytest.skip("the property test did not run in this session")
    assert SEEN["draws"] >= 200 and len(SEEN["refused"]) >= 100 and SEEN["accepted"] >= 30, SEEN
    out = os.environ.get("RESNET_CLI_CASE_COUNT")
    if out:  # how the README's reliability numbers were taken
        Path(out).write_text(json.dumps({"draws": SEEN["draws"], "refused": len(SEEN["refused"]),
                                         "accepted": SEEN["accepted"], "edges": SEEN.get("edges")}) + "\n")


# A handful of accepted configs trained for real: validation must not pass what cannot run.
RUNNABLE = {
    "optimizer": st.sampled_from(OPTIMIZERS),
    "scheduler": st.sampled_from(SCHEDULERS),
    "optimizer.lr": st.floats(1e-4, 0.05),
    "trainer.grad_clip_norm": st.sampled_from([0.0, 0.5, 5.0]),
    "trainer.grad_clip_value": st.sampled_from([0.0, 1.0]),
    "trainer.label_smoothing": st.floats(0, 0.3),
    "trainer.ema_decay": st.sampled_from([0.0, 0.9]),
    "trainer.grad_accum_steps": st.integers(1, 2),
    "trainer.limit_train_batches": st.integers(2, 6),
    "trainer.warmup_epochs": st.sampled_from([0.0, 0.5]),
    "trainer.epochs": st.integers(1, 2),
    "dataset.batch_size": st.sampled_from([8, 16, 32]),
    "dataset.cutout": st.integers(0, 6),
    "dataset.mixup_alpha": st.sampled_from([0.0, 0.2]),
}


@settings(derandomize=True, max_examples=5, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
# A warm-up cannot precede ReduceLROnPlateau (refused by a relation): not on the accepted side.
@given(st.fixed_dictionaries(RUNNABLE).filter(lambda v: not (v["scheduler"] == "plateau"
                                                              and v["trainer.warmup_epochs"] > 0)))
def test_drawn_accepted_configs_train_to_the_end(tmp_path_factory, values):
    from resnet_cli.validate import validate

    merged = {**dict(item.split("=", 1) for item in TINY), "model": "simple_cnn",
              **{k: fmt(v) for k, v in values.items()}}
    overrides = [f"{k}={v}" for k, v in merged.items()]
    run = tmp_path_factory.mktemp("drawn")
    validate(compose([*overrides, f"output_root={run / 'outputs'}"]))  # on the accepted side by construction
    fit_inproc(run, [*overrides, f"output_root={run / 'outputs'}"])
    metrics = read_metrics(run)
    assert metrics["finished"] and metrics["epochs"] == values["trainer.epochs"], metrics
    assert all(math.isfinite(r["train_loss"]) for r in metrics["history"])
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()


def test_validation_knows_the_real_augmentation_presets():
    from resnet_cli.data.policy import MEMORY_AUGMENT
    from resnet_cli.data.transforms import PRESETS
    from resnet_cli.validate import AUGMENT_PRESETS, MEMORY_PRESETS as MEMORY

    assert tuple(PRESETS) == AUGMENT_PRESETS and tuple(MEMORY_AUGMENT) == MEMORY


@pytest.mark.parametrize("name", sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "configs"
                                                          / "experiment").glob("*.yaml")))
def test_every_experiment_passes_validation(name):
    from resnet_cli.validate import validate

    validate(compose([f"experiment={name}"]))


def test_validation_does_not_import_torch():
    import subprocess
    import sys

    probe = ("import sys; sys.argv=['x']; from resnet_cli.validate import validate; "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
