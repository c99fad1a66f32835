"""Process trees for the multi-node and submitit tests: followed line by line, found by a tag, never orphaned.

Every process a test starts carries a unique tag in its environment (inherited by
torchrun's workers, submitit's controllers and job tasks alike), so the test can find
all of them in /proc even where they left its process group (torchrun starts each
worker in a session of its own). Linux only: these tests read /proc.
"""

from __future__ import annotations

import ctypes
import os
import re
import select
import signal
import socket
import subprocess
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

TAG_ENV = "RESNET_CLI_TEST_TAG"

needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads process trees from /proc")


@dataclass
class Tracked:
    """A test's process tag and the process groups it started (the ones to check for leftovers)."""

    tag: str
    pgids: set[int] = field(default_factory=set)


def new_tag() -> str:
    """A tag that no other process on the machine carries."""
    return uuid.uuid4().hex


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of a live process, or None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1]), int(fields[2])


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def tagged(tag: str) -> dict[int, int]:
    """pid -> pgid of every live process whose environment carries the tag."""
    needle = f"{TAG_ENV}={tag}".encode()
    found = {}
    for pid in _pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue  # gone, or not ours
        st = _stat(pid)
        if needle in environ.split(b"\0") and st is not None and st[0] != "Z":
            found[pid] = st[2]
    return found


def children(pid: int) -> list[int]:
    """Live direct children of pid."""
    return [p for p in _pids() if (st := _stat(p)) is not None and st[1] == pid and st[0] != "Z"]


def alive_in_groups(pgids: set[int]) -> list[int]:
    """Processes (zombies excluded: they are dead) that belong to any of the process groups."""
    return [p for p in _pids() if (st := _stat(p)) is not None and st[2] in pgids and st[0] != "Z"]


def kill_groups(pgids: set[int]) -> None:
    """SIGKILL every process group in pgids (those already gone are skipped)."""
    for pgid in pgids:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def wait_exited(pids: set[int] | list[int], timeout: float) -> None:
    """Return once every pid has exited (each one's pidfd turns readable) or after timeout; never polls."""
    fds = []
    for pid in pids:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue  # already gone
    try:
        pending, deadline = set(fds), time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select(list(pending), [], [], left)
            pending -= set(ready)
    finally:
        for fd in fds:
            os.close(fd)


def kill_tree(tag: str, pgids: set[int], timeout: float = 30.0) -> set[int]:
    """Kill the given groups and every tagged process's group; wait until none is alive; return all groups."""
    groups = set(pgids)
    deadline = time.monotonic() + timeout
    while True:
        groups |= set(tagged(tag).values())
        kill_groups(groups)
        alive = set(alive_in_groups(groups)) | set(tagged(tag))
        if not alive or time.monotonic() > deadline:
            return groups
        # SIGKILL is asynchronous: wait for these exits, then look again (a child forked meanwhile is killed next).
        wait_exited(alive, deadline - time.monotonic())


def assert_no_leftovers(tag: str, pgids: set[int]) -> None:
    """After kill_tree: nothing of the run is alive, in its groups or anywhere with its tag."""
    groups = kill_tree(tag, pgids)
    left = sorted(set(alive_in_groups(groups)) | set(tagged(tag)))
    details = [Path(f"/proc/{p}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:200] for p in left
               if Path(f"/proc/{p}").exists()]
    assert not left, f"processes left alive: {left} {details}"


class Follower:
    """Reads a process's combined output on a thread, so tests wait for lines without sleeping or deadlocking."""

    def __init__(self, name: str, proc: subprocess.Popen):
        self.name, self.proc = name, proc
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first output line matching pattern; fails (naming the process, with its log tail) on exit or timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := re.search(pattern, line):
                        return m
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = f"exited ({self.proc.poll()})" if self._eof else f"still silent after {timeout:.0f} s"
                    pytest.fail(f"{self.name} {why} before printing {pattern!r}:\n{self.tail()}")
                self._cond.wait(left)

    def wait(self, timeout: float) -> int:
        """The exit code, once the process ended and its output was read."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still running after {timeout:.0f} s:\n{self.tail()}")
        self._thread.join(timeout=30)
        return self.proc.returncode

    def text(self) -> str:
        """All output so far."""
        with self._cond:
            return "".join(self.lines)

    def tail(self, chars: int = 3000) -> str:
        """The end of the output, labelled with the process name."""
        return f"--- {self.name} (last {chars} chars) ---\n{self.text()[-chars:]}"


# inotify(7) events that mean "the file may have new lines": written, closed, or created/moved into place.
_IN_MODIFY, _IN_CLOSE_WRITE, _IN_MOVED_TO, _IN_CREATE = 0x2, 0x8, 0x80, 0x100


class _Inotify:
    """A Linux inotify descriptor (through libc: the standard library has no binding) to wait on with select."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")

    def watch_towards(self, path: Path) -> None:
        """Watch path for writes if it exists, and its deepest existing folder for what is created in it."""
        if path.exists():
            self._libc.inotify_add_watch(self.fd, os.fsencode(path), _IN_MODIFY | _IN_CLOSE_WRITE)
        folder = path.parent
        while not folder.is_dir():
            folder = folder.parent
        self._libc.inotify_add_watch(self.fd, os.fsencode(folder), _IN_CREATE | _IN_MOVED_TO | _IN_MODIFY)

    def drain(self) -> None:
        """Discard the queued events (the caller re-reads the file instead)."""
        try:
            while os.read(self.fd, 1 << 16):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        """Release the descriptor and its watches."""
        os.close(self.fd)


@contextmanager
def _pidfd(pid: int) -> Iterator[list[int]]:
    try:
        fds = [os.pidfd_open(pid)]  # readable once the process exits
    except ProcessLookupError:
        fds = []  # already exited and reaped: the caller sees it from poll()
    try:
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


def wait_for_file_line(path: Path, pattern: str, timeout: float, owner: Follower, name: str) -> re.Match:
    """The first line of a log file that matches pattern, waited for while `owner` runs (for jobs that log to files).

    Woken by the file's changes (inotify) or by owner's exit (its pidfd), never by a clock.
    """
    deadline = time.monotonic() + timeout
    notify = _Inotify()
    try:
        with _pidfd(owner.proc.pid) as exited:
            while True:
                notify.watch_towards(path)  # before reading: a write after the read wakes the select below
                text = path.read_text() if path.is_file() else ""
                if m := re.search(pattern, text, re.MULTILINE):
                    return m
                left = deadline - time.monotonic()
                if owner.proc.poll() is not None or left <= 0:
                    pytest.fail(f"{name} never printed {pattern!r} in {path} ({owner.name} exit code "
                                f"{owner.proc.poll()}):\n{text[-2000:]}\n{owner.tail()}")
                select.select([notify.fd, *exited], [], [], left)
                notify.drain()
    finally:
        notify.close()


def holding_open(pids: list[int], path: Path) -> list[int]:
    """Those of pids that have path open (e.g. the job process writing a run's train.log)."""
    target = str(path.resolve())
    found = []
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == target:
                    found.append(pid)
                    break
            except OSError:
                continue
    return found


def cmdline(pid: int) -> str:
    """A process's command line ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""
