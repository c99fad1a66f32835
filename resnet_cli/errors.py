"""User-facing errors and their one-line rendering (no torch import here)."""

from __future__ import annotations

import difflib
import re
import sys
from contextlib import contextmanager
from typing import Iterator


class UserError(Exception):
    """An error the user can fix; reported as one line."""


@contextmanager
def reported(prog: str, *also: type[BaseException]) -> Iterator[None]:
    """Turn a UserError (or one of `also`) raised in the block into one stderr line and exit status 2."""
    try:
        yield
    except (UserError, *also) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_KEY_MISSING = re.compile(r"Key '([^']+)' not in '([^']+)'")
_NO_OPTION = re.compile(r"Could not find '([^']+)/([^']+)'")
_MERGE = re.compile(r"^Error merging override (\S+)")
_FULL_KEY = re.compile(r"full_key:\s*(\S+)")


def one_line(exc: BaseException) -> str:
    """Render a config or user error as a single line that names the key or file."""
    if isinstance(exc, UserError):
        return str(exc).strip().replace("\n", " ")
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        text = f"{text}\n{cause}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    option = next((m for m in map(_NO_OPTION.search, lines) if m), None)
    if option:
        return _unknown_option(option.group(1), option.group(2), lines)
    full_key = next((m.group(1) for m in map(_FULL_KEY.search, lines) if m), None)
    missing = next((m for m in map(_KEY_MISSING.search, lines) if m), None)
    if missing and full_key:
        return f"unknown config key '{full_key}'{_suggest_key(missing.group(1), missing.group(2))}"
    # Keep the sentences, drop OmegaConf's indented "full_key:/object_type=" trailer
    # and Hydra's hint lines; the key is already named in the first sentence.
    keep = [
        ln for ln in lines
        if not ln.startswith(("full_key:", "object_type=", "reference_type=", "Set the environment variable"))
    ]
    msg = " ".join(keep) if keep else text.strip()
    msg = _MERGE.sub(r"\1:", msg)
    if full_key and full_key not in msg:
        msg = f"{full_key}: {msg}"
    return msg


def _unknown_option(group: str, name: str, lines: list[str]) -> str:
    # Hydra lists the group's options one per line after "Available options in ...".
    options: list[str] = []
    if any(ln.startswith("Available options") for ln in lines):
        start = next(i for i, ln in enumerate(lines) if ln.startswith("Available options")) + 1
        for ln in lines[start:]:
            if ln.startswith("Config search path"):
                break
            options.append(ln)
    return (f"{group}={name}: no such option in config group '{group}'{did_you_mean(name, options)}; "
            f"see resnet-train --help for the options")


def _suggest_key(key: str, schema: str) -> str:
    # Suggest from the schema's own fields, so a typo such as trainer.epoch names 'epochs'.
    from resnet_cli import config

    cls = getattr(config, schema, None)
    fields = list(getattr(cls, "__dataclass_fields__", {})) if cls else []
    return did_you_mean(key, fields)
