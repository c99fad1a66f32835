"""User-facing errors and their one-line rendering (no torch import here)."""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class UserError(Exception):
    """An error the user can fix; reported as one line."""


class Diverged(UserError):
    """Training produced a non-finite loss or non-finite weights (resnet-train exits with status 3)."""


class Refused(BaseException):
    """A UserError carried past Hydra's callback runner, which turns any Exception into a warning and goes on.

    A BaseException is not swallowed there; the entry points unwrap it and report `error` as one line.
    """

    def __init__(self, error: UserError):
        super().__init__(str(error))
        self.error = error


@contextmanager
def reported(prog: str, *also: type[BaseException]) -> Iterator[None]:
    """Turn a UserError (or one of `also`) raised in the block into one stderr line and exit status 2."""
    try:
        yield
    except Refused as exc:
        print(f"{prog}: error: {one_line(exc.error)}", file=sys.stderr)
        sys.exit(2)
    except (UserError, *also) as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        if not exc.filename:
            raise  # no file to name: not something the user caused by a path they gave
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        sys.exit(2)


# errno -> (the cause in words, what to do about it)
_OS_CAUSES = {
    errno.EACCES: ("permission denied", "use a folder you can write to, or fix its permissions"),
    errno.EPERM: ("operation not permitted", "use a folder you can write to, or fix its permissions"),
    errno.EROFS: ("read-only file system", "use a folder on a writable file system"),
    errno.ENOTDIR: ("not a folder", "a file is in the way: choose another path or move that file"),
    errno.EEXIST: ("already exists and is not a folder", "choose another path or move that file"),
    errno.EISDIR: ("is a folder, not a file", "give a file name"),
    errno.ENOSPC: ("no space left on device", "free some space and run again"),
    errno.EDQUOT: ("disk quota exceeded", "free some space and run again"),
    errno.ENOENT: ("no such file or folder", "check the path"),
    errno.ENAMETOOLONG: ("file name too long", "choose a shorter path"),
}


def os_error_line(exc: OSError) -> str:
    """An operating-system error as one line: the path, the cause in words, and what to do."""
    path = str(exc.filename)
    cause, advice = _OS_CAUSES.get(exc.errno, (exc.strerror or type(exc).__name__, ""))
    if exc.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = _file_in_the_way(Path(path))
        if blocker is not None:
            path, cause = str(blocker), "is a file, not a folder"
    if exc.filename2:
        path = f"{path} -> {exc.filename2}"
    return f"{path}: {cause}" + (f"; {advice}" if advice else "")


def _file_in_the_way(path: Path) -> Path | None:
    # mkdir reports the folder it could not make; the user needs the file that blocks it.
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            return None if candidate.is_dir() else candidate
    return None


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (`prog: error: ...`, exit 2), like every other user error.

    argparse's own error() prints the whole usage block first; `--help` still shows it.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print one line naming the bad argument and exit with status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _bounded(text, int, 1, "an integer >= 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _bounded(text, int, 0, "an integer >= 0")


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    return _bounded(text, float, 0, "a number >= 0")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = _bounded(text, float, 0, "a number > 0")
    if value == 0:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number > 0")
    return value


def _bounded(text: str, kind: type, lo: float, words: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not {words}") from None
    if value != value or value in (float("inf"), float("-inf")) or value < lo:
        raise argparse.ArgumentTypeError(f"'{text}' is not {words}")
    return value


def did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    """A ' (did you mean X?)' suffix when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


_KEY_MISSING = re.compile(r"Key '([^']+)' not in '([^']+)'")
_NO_OPTION = re.compile(r"Could not find '([^']+)/([^']+)'")
_NO_PLUGIN_CONFIG = re.compile(r"(?:In '([^']+)': )?Could not (?:find|load) '(hydra/[^']+)'")
_MERGE = re.compile(r"^Error merging override (\S+)")
_FULL_KEY = re.compile(r"full_key:\s*(\S+)")


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of an exception's first line (at most `limit` characters), else its type's name."""
    text = str(exc).strip().splitlines()
    # torch's messages run on with advice that does not fit one line: keep the first sentence.
    return text[0].split(". ")[0][:limit] if text else type(exc).__name__


def one_line(exc: BaseException) -> str:
    """Render a config or user error as a single line that names the key or file."""
    if isinstance(exc, UserError):
        return str(exc).strip().replace("\n", " ")
    if isinstance(exc, OSError) and exc.filename:
        return os_error_line(exc)
    text = str(exc)
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) not in text:
        text = f"{text}\n{cause}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    plugin = next((m for m in map(_NO_PLUGIN_CONFIG.search, lines) if m), None)
    if plugin:
        from resnet_cli.extras import missing_plugin_line

        line = missing_plugin_line(plugin.group(2), plugin.group(1))
        if line:
            return line
    option = next((m for m in map(_NO_OPTION.search, lines) if m), None)
    if option:
        return _unknown_option(option.group(1), option.group(2), lines)
    full_key = next((m.group(1) for m in map(_FULL_KEY.search, lines) if m), None)
    missing = next((m for m in map(_KEY_MISSING.search, lines) if m), None)
    if missing and full_key:
        return (f"unknown config key '{full_key}'{_suggest_key(missing.group(1), missing.group(2))}: "
                f"{missing.group(2)} has no such key (`--cfg job` prints every key)")
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
