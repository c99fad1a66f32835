"""A trained model from a checkpoint or run folder, read as data: what predict, eval and export stand on.

A checkpoint may come from someone else. `torch.load(weights_only=True)` keeps its pickle from
running code; this module keeps its *content* from doing so. The model is rebuilt by name from the
registry (`create_model`), its keys merged into its family's typed schema; a dataset (resnet-eval)
only through the builders resnet-cli ships, its keys merged into that builder's schema. No
`_target_` found in a file is ever instantiated or imported, no interpolation in it is resolved,
and every value the tools use (class names, the eval transform, the weights) is checked for type,
range and finiteness. A refusal is one line naming the file and the entry, raised before anything
is imported, opened or written.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from resnet_cli.errors import UserError, one_line
from resnet_cli.fileio import is_regular_file, kind_of, regular_file

if TYPE_CHECKING:
    import torch
    from torch import nn

# The one builder a stored model config may name: every model YAML points at it.
MODEL_TARGET = "resnet_cli.models.create_model"
# Keys the schemas carry for Hydra's instantiate; a rebuild reads them from the registry instead.
_HYDRA_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
# An eval transform beyond this side is not one resnet-cli writes (and would exhaust memory).
MAX_SIDE = 8192

WEIGHTS = ("auto", "ema", "raw")
WEIGHTS_HELP = ("auto (default): the EMA average when the run kept one (trainer.ema_decay), else the raw weights; "
                "ema or raw to choose")


# -- where the checkpoint is ---------------------------------------------------------------------

def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run folder's best.pt (else last.pt); never opens a FIFO or device."""
    path = Path(path)
    if path.is_dir():
        skipped = []
        for name in ("best.pt", "last.pt"):
            if is_regular_file(path / name):
                return path / name
            if os.path.lexists(path / name):  # a FIFO or device would block the load: never opened
                skipped.append(f"{name} ({_kind(path / name)})")
        extra = f" (skipped {', '.join(skipped)}: not regular files)" if skipped else ""
        raise UserError(f"{path}: no best.pt or last.pt in this run folder{extra}")
    return regular_file(path, "checkpoint")


def _kind(path: Path) -> str:
    try:
        return kind_of(os.stat(path).st_mode)
    except OSError:
        return "a dangling link"


# -- the stored entries, checked -----------------------------------------------------------------

def _no_interpolation(value: Any, where: str, source: Any) -> None:
    # A saved config is resolved before it is written; `${...}` in one would run OmegaConf's resolvers
    # (environment variables, Hydra's) on whatever a file says.
    if isinstance(value, str) and "${" in value:
        raise UserError(f"{source}: refused: {where} holds an interpolation ({value[:60]!r}); resnet-cli saves "
                        f"resolved values, so this file was not written by it")
    if isinstance(value, Mapping):
        for key, item in value.items():
            _no_interpolation(item, f"{where}.{key}", source)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _no_interpolation(item, f"{where}[{i}]", source)


def stored_section(ckpt: Mapping, key: str, source: Any) -> dict:
    """ckpt["config"][key] as a plain dict, refused in one line when absent, not a mapping or interpolated."""
    config = ckpt.get("config")
    section = config.get(key) if isinstance(config, Mapping) else None
    if not isinstance(section, Mapping):
        raise UserError(f"{source}: its config has no {key} section (not written by resnet-train?)")
    _no_interpolation(section, f"config.{key}", source)
    return dict(section)


def class_names(ckpt: Mapping, source: Any) -> list[str]:
    """The checkpoint's class names: a non-empty list of strings."""
    names = ckpt.get("class_names")
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) for n in names):
        raise UserError(f"{source}: its class_names entry is not a list of names (not written by resnet-train?)")
    return list(names)


def eval_spec(ckpt: Mapping, source: Any) -> dict:
    """The checkpoint's eval transform (resize, crop, mean, std, channels), each value checked."""
    spec = ckpt.get("eval_spec")
    if not isinstance(spec, Mapping):
        raise UserError(f"{source}: checkpoint has no 'eval_spec' entry (not written by resnet-train?)")
    channels = spec.get("channels", 3)
    out: dict[str, Any] = {}
    for key in ("resize", "crop"):
        value = spec.get(key)
        if not _whole(value) or not 1 <= value <= MAX_SIDE:
            raise UserError(f"{source}: its eval_spec.{key}={value!r} is not a size in pixels (1..{MAX_SIDE})")
        out[key] = int(value)
    if out["resize"] < out["crop"]:
        raise UserError(f"{source}: its eval_spec resizes to {out['resize']} px, below its {out['crop']} px crop")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise UserError(f"{source}: its eval_spec.channels={channels!r} is not 1 or 3")
    for key, positive in (("mean", False), ("std", True)):
        value = spec.get(key)
        if (not isinstance(value, (list, tuple)) or len(value) != channels
                or not all(_finite(v) and (v > 0 or not positive) for v in value)):
            raise UserError(f"{source}: its eval_spec.{key}={value!r} is not {channels} finite number(s)"
                            + (" above 0" if positive else ""))
        out[key] = [float(v) for v in value]
    if "channels" in spec:
        out["channels"] = int(channels)
    return out


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _typed(section: dict, schema: type, where: str, source: Any) -> dict:
    """`section` merged over `schema`'s defaults: an unknown key, a wrong type or a bad choice is one line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), section)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if key in reason and "not in" in reason:
            reason = f"{schema.__name__} has no such key"
        raise UserError(f"{source}: {where}.{key}: {reason[:160]}") from exc
    # is_missing reads the node as it is: the schema's `${dataset...}` defaults are not resolved.
    missing = [k for k in merged if k not in _HYDRA_KEYS and OmegaConf.is_missing(merged, k)]
    if missing:
        raise UserError(f"{source}: {where}.{missing[0]} is missing (not written by resnet-train?)")
    # Left unresolved: the schema's own `${dataset...}` defaults have no dataset node here.
    return OmegaConf.to_container(merged, resolve=False, enum_to_str=True)


# -- the model -----------------------------------------------------------------------------------

def model_schema(name: str) -> type:
    """The typed schema of model `name`: the one its configs/model/<name>.yaml names (ModelConfig without one)."""
    import yaml

    from resnet_cli import config, config_dir

    path = Path(config_dir()) / "model" / f"{name}.yaml"
    try:
        defaults = (yaml.safe_load(path.read_text()) or {}).get("defaults", [])
    except (OSError, yaml.YAMLError):
        return config.ModelConfig
    for entry in defaults:
        schema = str(entry).lstrip("/").split("@")[0]
        if schema in config.SCHEMAS:
            return config.SCHEMAS[schema]
    return config.ModelConfig


def model_spec(section: Mapping, source: Any) -> tuple[str, dict]:
    """(registered name, the builder's keyword arguments) of a stored or typed-in model config, checked.

    `_target_`, when present, must be resnet-cli's own model builder; the name must be registered; the
    other keys are merged into that family's schema. The weights it names (`pretrained`) are never
    fetched: the caller loads its own.
    """
    from resnet_cli.models import model_info

    section = dict(section)
    _no_interpolation(section, "model", source)
    target = section.get("_target_", MODEL_TARGET)
    if target != MODEL_TARGET:
        raise UserError(f"{source}: refused: its model config names _target_={target!r}; resnet-cli rebuilds models "
                        f"only by name from its own registry, so nothing a file names is imported or run")
    name = section.get("name")
    if not isinstance(name, str):
        raise UserError(f"{source}: its model config has no model name")
    try:
        model_info(name)
    except UserError as exc:
        raise UserError(f"{source}: {exc}") from exc
    typed = _typed({k: v for k, v in section.items() if k not in _HYDRA_KEYS}, model_schema(name), "model", source)
    kwargs = {k: v for k, v in typed.items() if k not in (*_HYDRA_KEYS, "name")}
    kwargs["pretrained"] = False
    return name, kwargs


def build_model(name: str, kwargs: Mapping, num_classes: int, image_size: int | None, source: Any) -> "nn.Module":
    """create_model(name, num_classes, **kwargs) at `image_size`; one line if the builder refuses its keys."""
    from resnet_cli.models import create_model

    kwargs = dict(kwargs)
    if image_size is not None:
        kwargs["image_size"] = int(image_size)
    elif not _whole(kwargs.get("image_size")):
        kwargs.pop("image_size", None)  # `auto` or an interpolation: the builder's own default
    try:
        return create_model(name, num_classes, **kwargs)
    except UserError as exc:
        raise UserError(f"{source}: cannot build the model its config describes ({exc})") from exc
    except (TypeError, ValueError, RuntimeError) as exc:  # a key or value the builder itself refuses
        raise UserError(f"{source}: cannot build the model its config describes ({one_line(exc)})") from exc


def check_finite(state: Mapping[str, Any], source: Any, which: str = "weights") -> None:
    """Refuse a state_dict holding a NaN or infinity: its outputs would be reported as results."""
    import torch

    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"{source}: its {which} are not finite ({key} holds NaN or inf); the run it came from "
                            f"diverged or the file is damaged: use an earlier checkpoint")


# -- which weights -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Weights:
    """Which of a checkpoint's two sets of weights a tool uses, and what training measured for them."""

    name: str  # "ema" or "raw"
    state: dict
    detail: str  # why these, and the accuracy validation gave them

    def line(self) -> str:
        """The start-up/result line that says which weights are in use."""
        return f"weights: {self.name} ({self.detail})"


def choose_weights(ckpt: Mapping, choice: str = "auto", source: Any = "") -> Weights:
    """The weights a tool should use: with trainer.ema_decay the EMA average (validated each epoch), else the raw ones.

    A run with EMA validates both sets; the average is the one the EMA was kept for, so `auto` takes it.
    """
    import torch

    if choice not in WEIGHTS:
        raise UserError(f"--weights {choice}: use {', '.join(WEIGHTS)}")
    ema = ckpt.get("ema")
    if choice == "ema" and not ema:
        raise UserError(f"--weights ema: {source} holds no EMA weights (trained without trainer.ema_decay); "
                        f"use --weights raw")
    name = "ema" if ema and choice != "raw" else "raw"
    trainer = (ckpt.get("config") or {}).get("trainer") if isinstance(ckpt.get("config"), Mapping) else None
    decay = trainer.get("ema_decay") if isinstance(trainer, Mapping) else None
    reason = ([f"trainer.ema_decay={decay:g}" if _finite(decay) else "trainer.ema_decay"] if name == "ema"
              else ["--weights raw"] if ema else [])
    metrics = ckpt.get("metrics") if isinstance(ckpt.get("metrics"), Mapping) else {}
    acc, epoch = metrics.get("ema_val_acc" if name == "ema" else "val_acc"), metrics.get("epoch")
    reason.append(f"validated at epoch {epoch}: acc {acc:.4f}" if _finite(acc) and _whole(epoch)
                  else "saved mid-epoch: not validated")
    state = ckpt.get("ema") if name == "ema" else ckpt.get("model")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UserError(f"{source}: its {name} weights are not a state_dict of tensors")
    if name == "ema":
        # AveragedModel's state_dict: the averaged module under "module." (buffers too: use_buffers=True),
        # plus its own step counter "n_averaged".
        prefix = "module."
        state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return Weights(name, dict(state), "; ".join(reason))


# -- flip test-time augmentation ----------------------------------------------------------------

TTA = ("auto", "on", "off")
TTA_HELP = ("auto (default): average each image's logits with its mirror's where training measured that it helps "
            "(and mirroring keeps the class); on, off")


def flip_average(model: "nn.Module") -> "nn.Module":
    """`model` whose logits are the mean of the image's and its left-right mirror's (flip TTA)."""
    import torch

    class FlipAverage(torch.nn.Module):
        """Flip test-time augmentation around a classifier; the classifier stays `model`."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.model = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.model(x) + self.model(torch.flip(x, dims=[3]))) / 2

    return FlipAverage(model)


def tta_choice(ckpt: Mapping, choice: str, source: Any) -> tuple[bool, str]:
    """(use flip TTA, why) for --tta auto|on|off and what the checkpoint's `tta` entry measured."""
    if choice not in TTA:
        raise UserError(f"--tta {choice}: use {', '.join(TTA)}")
    entry = ckpt.get("tta")
    entry = entry if isinstance(entry, Mapping) else {}
    mirror, helped = entry.get("mirror"), entry.get("flip")
    plain, flipped = entry.get("val_acc"), entry.get("val_acc_flip")
    measured = (f"val acc {plain:.4f} without, {flipped:.4f} with" if _finite(plain) and _finite(flipped)
                else "not measured")
    if choice == "off":
        return False, "tta: off (--tta off)"
    if choice == "on":
        if mirror is False:
            raise UserError(f"--tta on: {source} was trained on classes that mirroring changes (dataset.flip "
                            f"resolved off), so a mirrored image is another class; use --tta off")
        return True, f"tta: flip (--tta on; {measured})"
    if helped is True and mirror is not False:
        return True, f"tta: flip (it helped: {measured})"
    why = ("mirroring changes the classes" if mirror is False else measured if helped is False
           else "not measured by this run")
    return False, f"tta: off ({why})"


# -- the whole trained model ---------------------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    """A trained model in eval mode and the checked facts the tools need about it."""

    model: "nn.Module"  # flip-averaged when `tta` is on (flip_average): what the tools run
    path: Path  # the checkpoint file it came from
    ckpt: dict  # the loaded checkpoint (data only: tensors and plain containers)
    weights: Weights
    class_names: list[str]
    eval_spec: dict
    model_name: str
    model_kwargs: dict  # create_model's keywords as rebuilt, image_size resolved
    tta: bool = False
    tta_detail: str = "tta: off"

    def line(self) -> str:
        """The line the tools print: which weights, and whether flip TTA is on and why."""
        return f"{self.weights.line()}; {self.tta_detail}"

    def eval_transform(self) -> Callable:
        """PIL image -> the normalized tensor the model was validated on."""
        from resnet_cli.data.transforms import build_eval_transform

        return build_eval_transform(**self.eval_spec)


def rebuild(ckpt: Mapping, source: Any, weights: Weights | None = None) -> tuple["nn.Module", str, dict]:
    """The checkpoint's model rebuilt from the registry at its eval size and loaded with `weights` (default raw).

    Returns (model, name, keywords); every refusal is one line naming `source`.
    """
    from resnet_cli import checkpoint

    names = class_names(ckpt, source)
    spec = eval_spec(ckpt, source)
    name, kwargs = model_spec(stored_section(ckpt, "model", source), source)
    model = build_model(name, kwargs, len(names), spec["crop"], source)
    chosen = weights or choose_weights(ckpt, "raw", source)
    check_finite(chosen.state, source, f"{chosen.name} weights")
    checkpoint.load_weights(model, chosen.state, f"{source}: its {chosen.name} weights do not fit the model its "
                                                 f"config describes ({name}, {len(names)} classes)")
    return model, name, {**kwargs, "image_size": spec["crop"]}


def load_trained(path: str | os.PathLike, device: Any = "cpu", weights: str = "auto", tta: str = "auto") -> Trained:
    """Load a checkpoint file or run folder safely and rebuild its model in eval mode on `device`.

    `weights` is auto, ema or raw (see choose_weights): by default the weights that training validated.
    `tta` is auto, on or off (tta_choice): auto averages with the mirror where training measured a gain.
    """
    import torch

    from resnet_cli import checkpoint

    path = resolve_checkpoint(path)
    ckpt = checkpoint.load(path, map_location="cpu")
    chosen = choose_weights(ckpt, weights, path)
    use, detail = tta_choice(ckpt, tta, path)
    model, name, kwargs = rebuild(ckpt, path, chosen)
    model = flip_average(model) if use else model
    return Trained(model.to(torch.device(device)).eval(), path, ckpt, chosen, class_names(ckpt, path),
                   eval_spec(ckpt, path), name, kwargs, use, detail)


# -- the dataset a checkpoint was trained on (resnet-eval) ---------------------------------------

def dataset_builder(section: Mapping, source: Any) -> tuple[Callable[..., Any], dict]:
    """(builder, keyword arguments) of a stored dataset config: one of resnet-cli's own, its keys typed."""
    import importlib

    from resnet_cli.config import DATASET_SCHEMAS

    target = section.get("_target_")
    if target not in DATASET_SCHEMAS:
        known = ", ".join(sorted(t.rsplit(".", 1)[1] for t in DATASET_SCHEMAS))
        raise UserError(f"{source}: refused: its dataset config names _target_={target!r}, not one of resnet-cli's "
                        f"datasets ({known}); nothing a file names is imported or run")
    typed = _typed({k: v for k, v in section.items() if k not in _HYDRA_KEYS}, DATASET_SCHEMAS[target], "dataset",
                   source)
    module, _, attr = target.rpartition(".")
    builder = getattr(importlib.import_module(module), attr)  # a name from our own table, not from the file
    return builder, {k: v for k, v in typed.items() if k not in _HYDRA_KEYS}


def schema_fields(schema: type) -> list[str]:
    """The keys a typed schema declares (for messages listing what a node takes)."""
    return [f.name for f in dataclasses.fields(schema) if f.name not in _HYDRA_KEYS]
