"""Optional extras: the Hydra plugins a command line asks for, checked before Hydra composes anything (no torch).

Without its plugin, Hydra knows no `hydra/sweeper=optuna` and fails with a config-search report
(or, with the plugin but not the library it drives, a traceback at launch); the user needs the
name of the extra to install, in one line.
"""

from __future__ import annotations

import importlib.util
import re
from typing import Sequence

from resnet_cli.errors import UserError

# What the command line names -> (extra, the modules it needs with the pip package of each).
_NEEDS: list[tuple[re.Pattern, str, dict[str, str]]] = [
    (re.compile(r"^[+~]?(hparams_search|hydra/sweeper)=optuna$"), "sweep",
     {"hydra_plugins.hydra_optuna_sweeper": "hydra-optuna-sweeper", "optuna": "optuna"}),
    (re.compile(r"^[+~]?hydra/launcher=(parallel|joblib)$"), "sweep",
     {"hydra_plugins.hydra_joblib_launcher": "hydra-joblib-launcher", "joblib": "joblib"}),
    (re.compile(r"^[+~]?hydra/launcher=(slurm|local|submitit_slurm|submitit_local)$"), "slurm",
     {"hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher", "submitit": "submitit"}),
]
# The configs those plugins register: what Hydra reports missing when an option of ours names one.
PLUGIN_CONFIGS = {"hydra/sweeper/optuna": "sweep", "hydra/launcher/joblib": "sweep",
                  "hydra/launcher/submitit_slurm": "slurm", "hydra/launcher/submitit_local": "slurm"}


def install_hint(extra: str) -> str:
    """The one command that installs an extra."""
    return f"pip install 'resnet-cli[{extra}]'"


def missing_plugin_line(missing: str, named_in: str | None) -> str | None:
    """One line for Hydra's "could not find/load" of a plugin's config (`missing` as group/name), else None."""
    extra = PLUGIN_CONFIGS.get(missing)
    if extra is None:
        return None
    # "In 'hydra/launcher/slurm': Could not load 'hydra/launcher/submitit_slurm'": the user chose slurm
    # (an option of the same group); "In 'hydra/config'" is Hydra's own primary config.
    chosen = named_in if named_in and named_in.rpartition("/")[0] == missing.rpartition("/")[0] else missing
    group, _, name = chosen.rpartition("/")
    return f"{group}={name} needs the `{extra}` extra (its Hydra plugin is not installed): {install_hint(extra)}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken half-install
        return False


def require_extras(overrides: Sequence[str]) -> None:
    """Raise a one-line UserError naming the extra to install when an override needs a plugin that is missing."""
    for item in overrides:
        for pattern, extra, modules in _NEEDS:
            if not pattern.match(item):
                continue
            missing = [package for module, package in modules.items() if not _importable(module)]
            if missing:
                raise UserError(f"{item.lstrip('+~')} needs the `{extra}` extra ({', '.join(missing)} not installed): "
                                f"{install_hint(extra)}")
