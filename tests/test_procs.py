"""The process helpers the multi-node and submitit tests rely on: waits woken by events, trees killed whole."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading

import pytest

from procs import TAG_ENV, Follower, alive_in_groups, kill_tree, needs_proc, new_tag, tagged, wait_for_file_line

pytestmark = needs_proc

# A job that logs to a file, in folders it creates itself: "ready", then, once told to on stdin, "done".
_JOB = """
import pathlib, sys
log = pathlib.Path(sys.argv[1])
log.parent.mkdir(parents=True)
with log.open("a") as fh:
    fh.write("ready\\n"); fh.flush()
    sys.stdin.readline()
    fh.write("done 42\\n")
print("bye", flush=True)
"""


def test_wait_for_file_line_wakes_on_the_files_writes_and_fails_when_the_owner_exits(tmp_path):
    log = tmp_path / "not" / "yet" / "train.log"
    proc = subprocess.Popen([sys.executable, "-c", _JOB, str(log)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    job = Follower("the job", proc)

    def release() -> None:  # the job writes "done" only after "ready" was seen: the main wait is then blocked
        wait_for_file_line(log, r"^ready$", 60, job, "job")
        proc.stdin.write("go\n")
        proc.stdin.flush()

    helper = threading.Thread(target=release)
    helper.start()
    assert wait_for_file_line(log, r"^done (\d+)$", 60, job, "job")[1] == "42"
    helper.join()
    assert job.wait(60) == 0
    with pytest.raises(pytest.fail.Exception, match="never printed"):
        wait_for_file_line(log, r"^never$", 60, job, "job")  # the owner is gone: fails at once, not at 60 s


def _waiter(name: str, own_session: bool) -> str:
    """A shell word list: python that says it is up, then waits for a signal (no sleep)."""
    code = f"import os, signal\n{'os.setsid()' if own_session else ''}\nprint('{name} up', flush=True)\nsignal.pause()"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


def test_kill_tree_leaves_nothing_of_a_tagged_tree():
    tag = new_tag()
    # A group whose grandchild moved to a session of its own (as torchrun's workers do).
    script = f"{_waiter('grandchild', True)} & exec {_waiter('root', False)}"
    proc = subprocess.Popen(["sh", "-c", script], env={**os.environ, TAG_ENV: tag}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    tree = Follower("the tree", proc)
    tree.wait_for("grandchild up", 60)
    tree.wait_for("root up", 60)
    assert len(tagged(tag)) == 2
    groups = kill_tree(tag, {proc.pid})
    assert tree.wait(30) == -9
    assert not tagged(tag) and not alive_in_groups(groups) and len(groups) == 2
