"""Safe file access shared by training and the tools: open regular files only, write atomically (no torch import)."""

from __future__ import annotations

import json
import math
import os
import secrets
import stat
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Union

from resnet_cli.errors import UserError

# What a data payload may be: bytes, text (written as UTF-8), or a function that writes into
# the open binary file (torch.save(obj, fh), a CSV writer...), so one helper serves every format.
Payload = Union[bytes, str, Callable[[BinaryIO], None]]

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def kind_of(mode: int) -> str:
    """What a stat mode describes, in words ('a regular file', 'a FIFO (named pipe)', ...)."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def is_regular_file(path: str | os.PathLike) -> bool:
    """Whether path is a regular file (links followed), decided by stat alone: the file is never opened."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        return False


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """`path` when it is a regular file, else a one-line UserError naming it and saying what it is instead.

    Checked with stat before anything opens it: opening a FIFO blocks until some other
    process writes to it, and a device may never end, so either would hang the caller.
    """
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot access {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is {kind_of(mode)}, not a regular file; point at a regular file")
    return path


def atomic_write(path: str | os.PathLike, data: Payload, *, durable: bool = True) -> Path:
    """Replace `path` with `data` all at once, so a reader or a crash never sees half a file.

    The bytes go to a temporary file in the same folder (same filesystem, so the rename is
    atomic), are flushed and (when `durable`) fsynced, and only then replace `path`. Any
    failure (a full disk, an exception while serialising) leaves the previous file untouched
    and removes the temporary one. The file gets the usual permissions (0666 minus umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        # O_EXCL: never write through a link or into someone else's file of the same name.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_link(source: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Make `path` a second name of the file `source` (a hard link), replacing `path` atomically.

    Files here are only ever replaced by rename, never rewritten in place, so the two names
    stay independent: a later replacement of `source` leaves `path` holding today's bytes.
    Raises OSError where the filesystem has no hard links (the caller then writes a copy).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.link")
    os.link(source, tmp)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, data: Any, *, durable: bool = True) -> Path:
    """Write `data` as indented JSON (with a final newline) through atomic_write; NaN and inf become null."""
    return atomic_write(path, json_text(data), durable=durable)


def json_text(data: Any) -> str:
    """`data` as indented JSON with a final newline: a NaN or inf is written as null (JSON has neither)."""
    return json.dumps(_finite_or_none(data), indent=2, allow_nan=False) + "\n"


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def claim_outputs(outputs: Iterable[tuple[str | os.PathLike, str]], *, inputs: Iterable[str | os.PathLike] = (),
                  overwrite: bool = False) -> None:
    """Refuse, before anything is written, an output that would land on an input or replace a file already there.

    `outputs` are (path, the flag that names it). An input is never replaced, not even with `overwrite`
    (the same file under another name or through a link counts); an existing file is replaced only with
    `overwrite`, which the message offers.
    """
    held = {ident for ident in map(_identity, map(Path, inputs)) if ident is not None}
    seen: dict[str, str] = {}
    for path, flag in outputs:
        path = Path(path)
        ident = _identity(path)
        where = os.path.abspath(path)
        if ident is not None and ident in held:
            raise UserError(f"{flag}: {path} is one of the inputs; write the output somewhere else")
        if where in seen:
            raise UserError(f"{flag}: {path} is also the output of {seen[where]}; give each output its own name")
        if os.path.lexists(path) and not overwrite:
            what = "a folder" if path.is_dir() else "a file"
            raise UserError(f"{flag}: {path} already exists ({what} this command did not write); choose another "
                            f"name, or pass --overwrite to replace it")
        if path.is_dir():
            raise UserError(f"{flag}: {path} is a folder; give a file name")
        seen[where] = flag


def _fsync_dir(folder: Path) -> None:
    # Make the rename itself durable (a no-op where folders cannot be opened, e.g. Windows).
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the file itself is already on disk
    finally:
        os.close(dfd)
