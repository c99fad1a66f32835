"""The model registry: `@register_model` builders, looked up by name in `create_model`."""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, overload

from torch import nn

from resnet_cli.errors import UserError
from resnet_cli.models.pretrained import freeze_backbone as freeze
from resnet_cli.models.pretrained import load_pretrained

Builder = TypeVar("Builder", bound=Callable[..., nn.Module])


@dataclass(frozen=True)
class ModelInfo:
    """A registered model: its builder and what `resnet-models` prints about it."""

    name: str
    family: str
    paper: str
    builder: Callable[..., nn.Module]


class UnknownModelError(UserError, ValueError):
    """A model name that is not registered; the message lists close matches."""


_REGISTRY: dict[str, ModelInfo] = {}
# The modules whose builders make up the family; imported on the first look-up (they import this module).
BUILDER_MODULES = ("attention", "cifar", "resnest", "resnet", "small")


def _load_builders() -> None:
    for module in BUILDER_MODULES:
        importlib.import_module(f"resnet_cli.models.{module}")


@overload
def register_model(fn: Builder) -> Builder: ...
@overload
def register_model(*, family: str = ..., paper: str = ...) -> Callable[[Builder], Builder]: ...


def register_model(fn: Any = None, *, family: str = "custom", paper: str = "") -> Any:
    """Register a builder under its function name; use bare or as `@register_model(family=..., paper=...)`."""

    def register(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = ModelInfo(name, family, paper, builder)
        return builder

    return register(fn) if fn is not None else register


def list_models() -> list[str]:
    """All registered model names, sorted."""
    _load_builders()
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    """The registry entry for `name`; UnknownModelError naming close matches if there is none."""
    _load_builders()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (`resnet-models` lists all)") from None


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool | str = False,
    freeze_backbone: bool = False,
    head: str = "linear",
    head_hidden: int = 1024,
    head_dropout: float = 0.5,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model with `num_classes` outputs in `fc`.

    Args:
        name: a name from `list_models()`.
        num_classes: outputs of the classifier `fc`.
        pretrained: False, True (torchvision's ImageNet weights, for the variants torchvision ships) or the
            path of a state_dict / resnet-cli checkpoint file. All weights but `fc` must fit; `fc` is kept
            from the file only when its shape matches.
        freeze_backbone: train only `fc`.
        head: "linear" (one `fc` layer) or "mlp", the transfer-learning tutorials' head: `fc` becomes
            dropout, a `head_hidden`-unit ReLU layer, dropout (`head_dropout` both) and the classifier.
        **kwargs: the builder's own arguments (stem, image_size, in_channels, drop_rate, ...).
    """
    model = model_info(name).builder(num_classes=num_classes, **kwargs)
    if head != "linear":
        set_head(model, head, num_classes, hidden=head_hidden, dropout=head_dropout)
    if pretrained:
        load_pretrained(model, name, pretrained)
    if freeze_backbone:
        freeze(model)
    return model


HEADS = ("linear", "mlp")


def set_head(model: nn.Module, head: str, num_classes: int, *, hidden: int = 1024, dropout: float = 0.5) -> nn.Module:
    """Replace the classifier `fc` by `head` (see create_model); the attribute keeps its name `fc`.

    The trunk's global pool feeds it, so pretrained loading (which skips a misfit `fc.*`),
    freeze_backbone and trainer.backbone_lr_scale (both find `model.fc`) work unchanged.
    """
    if head not in HEADS:
        raise UserError(f"model.head={head}: choose one of {', '.join(HEADS)}")
    fc = getattr(model, "fc", None)
    if not isinstance(fc, nn.Linear):
        raise UserError(f"model.head={head}: {type(model).__name__} has no linear `fc` classifier to replace")
    if head == "mlp":
        model.fc = nn.Sequential(nn.Dropout(dropout), nn.Linear(fc.in_features, int(hidden)), nn.ReLU(inplace=True),
                                 nn.Dropout(dropout), nn.Linear(int(hidden), num_classes))
    return model
