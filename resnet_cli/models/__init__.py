"""The model family: `create_model(name, num_classes, ...)` over a registry of named builders.

The names below load on first use (PEP 562), so `resnet-models --help` and other torch-free code can
import this package without paying for torch; the registry imports every builder module itself.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelInfo": "registry",
    "UnknownModelError": "registry",
    "create_model": "registry",
    "list_models": "registry",
    "model_info": "registry",
    "register_model": "registry",
    "count_macs": "complexity",
    "count_params": "complexity",
    "layer_summary": "complexity",
    "hook_summary": "complexity",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
