"""resnet-cli: a config-driven trainer for the ResNet family.

Importing this package must stay cheap (no torch): the CLI parses its command
line, prints --help and completes in the shell before any heavy import.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"


def config_dir() -> str:
    """Absolute path of the Hydra config tree, for source, editable and wheel installs."""
    here = Path(__file__).resolve().parent
    # A wheel carries the tree inside the package; a source or editable checkout
    # keeps it at the top level beside the package.
    for candidate in (here / "configs", here.parent / "configs"):
        if (candidate / "train.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"resnet-cli config tree not found next to {here}")
