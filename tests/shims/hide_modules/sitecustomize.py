"""Test shim: the modules named in RESNET_CLI_TEST_HIDE (comma-separated) behave as if not installed.

Put this folder first on PYTHONPATH of a subprocess. Imports of a hidden module fail as for a
missing package, and Hydra's plugin scan (pkgutil.walk_packages over hydra_plugins) does not see
a hidden plugin, so it registers none of its configs: what a machine without the extra has.
"""

from __future__ import annotations

import importlib.abc
import os
import pkgutil
import sys

HIDDEN = tuple(name for name in os.environ.get("RESNET_CLI_TEST_HIDE", "").split(",") if name)


def _hidden(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HIDDEN)


class _Hide(importlib.abc.MetaPathFinder):
    """Answers for hidden modules before any real finder can find them."""

    def find_spec(self, name, path=None, target=None):  # noqa: D102 - the MetaPathFinder protocol
        if _hidden(name):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


_walk_packages = pkgutil.walk_packages


def _walk_visible(*args, **kwargs):
    # Hydra finds plugins with the path-based finders, not the meta path: hide them from the scan too.
    return (info for info in _walk_packages(*args, **kwargs) if not _hidden(info.name))


if HIDDEN:
    sys.meta_path.insert(0, _Hide())
    pkgutil.walk_packages = _walk_visible
