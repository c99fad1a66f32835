"""Hydra callback that summarises a multirun: one row per job, printed and saved as sweep_summary.csv.

Hydra stops a sweep at the first failed batch without calling `on_multirun_end`,
and launchers such as joblib or submitit run `on_job_end` in other processes or on
other machines. So each job writes its own record (`sweep_job.json`, in its run
folder) and rebuilds the CSV from every record found in the sweep folder; the
table is printed when the sweep ends, or at exit when a failure cut it short.
No torch import here: the callback is instantiated for every multirun.
"""

from __future__ import annotations

import atexit
import copy
import csv
import io
import json
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from resnet_cli.errors import Refused, UserError, one_line
from resnet_cli.fileio import atomic_write

RECORD = "sweep_job.json"
SUMMARY = "sweep_summary.csv"
COLUMNS = ("job", "status", "overrides", "best_val_acc", "epochs", "wall_s", "error", "run_dir", "all_overrides")


class SweepSummary(Callback):
    """Collects every job of a multirun (failed ones with their error) into one table and CSV."""

    def __init__(self, filename: str = SUMMARY) -> None:
        self.filename = filename
        self._started: float | None = None
        self._sweep_dir: Path | None = None
        self._done = False

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Remember the sweep folder and make sure a summary appears even if a failure ends the sweep."""
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        self._done = False
        atexit.register(self._at_exit)
        write_swept_keys(config, self._sweep_dir)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Start the job's wall clock."""
        self._started = time.time()

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Write this job's record and refresh the sweep's CSV (multirun only)."""
        if config.hydra.mode != RunMode.MULTIRUN:
            return
        run_dir = Path(str(config.hydra.runtime.output_dir))
        record = job_record(config, job_return, run_dir, time.time() - (self._started or time.time()))
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(run_dir / RECORD, json.dumps(record, indent=2) + "\n")
        write_summary(Path(str(config.hydra.sweep.dir)), self.filename)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Print the table and write the final CSV."""
        self._done = True
        self._report(Path(str(config.hydra.sweep.dir)))

    def _at_exit(self) -> None:
        if not self._done and self._sweep_dir is not None and self._sweep_dir.is_dir():
            print("sweep stopped early (a job failed); summary of the jobs that ran:", file=sys.stderr)
            self._report(self._sweep_dir, stream=sys.stderr)

    def _report(self, sweep_dir: Path, stream=None) -> None:
        rows = write_summary(sweep_dir, self.filename)
        print(format_table(rows), file=stream or sys.stdout)
        print(f"sweep summary: {sweep_dir / self.filename}", file=stream or sys.stdout)


class RunFolderGuard(Callback):
    """Refuses a single run with a bad config, or whose hydra.run.dir holds another or a live run, before Hydra writes.

    Hydra saves .hydra/config.yaml and opens the log in the run folder before the task
    starts, so the task's own check (train.fit) would come too late to keep those files.
    Sweep jobs are checked by the task only (Hydra has no hook before it writes a job's folder).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Validate the config, then check the run folder (rank 0 only: other ranks write nothing)."""
        if int(os.environ.get("RANK", "0")) != 0:
            return
        from omegaconf import OmegaConf, open_dict, read_write

        from resnet_cli.runfolder import check_run_folder, held_run, hold
        from resnet_cli.validate import validate

        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        run_dir = Path(str(config.hydra.run.dir))
        try:
            # A bad value stops here, before Hydra creates a run folder for it (and before the folder is judged).
            validate(task)
            if held_run(run_dir):  # the usual case is a new folder: nothing to compare, no torch to import
                check_run_folder(task, OmegaConf.to_container(task, resolve=True, enum_to_str=True), run_dir)
            hold(run_dir)  # held until the process ends: a second run started in this folder is refused
        except UserError as exc:
            raise Refused(exc) from exc  # Hydra would only warn about an Exception and run the job anyway
        except OSError as exc:  # the folder cannot be made or locked (a file in the way, read-only, full disk)
            raise Refused(UserError(one_line(exc))) from exc


def job_record(config: DictConfig, job_return: JobReturn, run_dir: Path, wall_s: float) -> dict:
    """One job's row: overrides, status, best val accuracy, epochs, wall time and error."""
    metrics: dict = {}
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        pass  # the job failed before its first epoch finished
    ok = job_return.status == JobStatus.COMPLETED
    value = job_return._return_value if ok else None  # the property would re-raise a failure
    best = metrics.get("best_val_acc", value if isinstance(value, (int, float)) else None)
    error = "" if ok else one_line(job_return._return_value) if isinstance(job_return._return_value,
                                                                            BaseException) else "unknown error"
    return {
        "job": int(config.hydra.job.num),
        "status": "ok" if ok else "failed",
        "overrides": list(job_return.overrides or config.hydra.overrides.task),
        "best_val_acc": None if best is None else float(best),
        "epochs": metrics.get("epochs", 0),
        "wall_s": round(wall_s, 1),
        "error": error,
        "run_dir": str(run_dir),
    }


def read_records(sweep_dir: Path) -> list[dict]:
    """Every job record under a sweep folder, ordered by job number."""
    records = []
    for path in sweep_dir.rglob(RECORD):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # being replaced right now; the writer rebuilds the summary after it
    return sorted(records, key=lambda r: r["job"])


def _varying(records: list[dict]) -> list[set[str]]:
    # Show only the overrides that differ between jobs: the fixed ones are the same on every row.
    if len(records) < 2:
        return [set(r["overrides"]) for r in records]
    common = set.intersection(*(set(r["overrides"]) for r in records))
    return [set(r["overrides"]) - common for r in records]


def summary_rows(records: list[dict]) -> list[dict]:
    """Records flattened to CSV rows (strings and numbers)."""
    rows = []
    for record, varying in zip(records, _varying(records)):
        rows.append({
            "job": record["job"],
            "status": record["status"],
            "overrides": " ".join(o for o in record["overrides"] if o in varying),
            "best_val_acc": "" if record["best_val_acc"] is None else f"{record['best_val_acc']:.4f}",
            "epochs": record["epochs"],
            "wall_s": record["wall_s"],
            "error": record["error"],
            "run_dir": record["run_dir"],
            "all_overrides": " ".join(record["overrides"]),
        })
    return rows


def write_summary(sweep_dir: Path, filename: str = SUMMARY) -> list[dict]:
    """Rebuild the sweep's CSV from the job records (under a lock: parallel jobs finish together)."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    with _locked(sweep_dir / f".{filename}.lock"):
        rows = summary_rows(read_records(sweep_dir))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(sweep_dir / filename, buf.getvalue())
    return rows


def format_table(rows: list[dict]) -> str:
    """The summary as an aligned terminal table (errors on their own indented line)."""
    head = ("job", "status", "best_val_acc", "epochs", "wall_s", "overrides")
    cells = [[str(r[k]) for k in head] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(head, widths))]
    for row, cell in zip(rows, cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cell, widths)).rstrip())
        if row["error"]:
            lines.append(f"    error: {row['error']}")
    return "\n".join(lines)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: jobs there run one at a time with the basic launcher
        yield
        return
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


SWEPT = "swept_keys.json"  # in the sweep folder: the keys the sweep varies (TensorBoard's HParams shows them first)


def write_swept_keys(config: DictConfig, sweep_dir: Path) -> list[str]:
    """Record which keys this multirun varies: sweep syntax on the command line and the sweeper's params."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    keys: list[str] = []
    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
        keys = [o.get_key_element().lstrip("+~") for o in parsed if o.is_sweep_override()]
    except Exception:  # noqa: BLE001 - an unparsable list only loses the ordering hint
        keys = []
    params = config.hydra.get("sweeper", {}).get("params") or {}
    keys += [str(k) for k in params if str(k) not in keys]  # Optuna's search space
    sweep_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(sweep_dir / SWEPT, json.dumps(keys) + "\n")
    return keys


def read_swept_keys(sweep_dir: Path) -> list[str] | None:
    """The keys write_swept_keys recorded for this sweep folder (None outside a sweep or if unreadable)."""
    try:
        return [str(k) for k in json.loads((Path(sweep_dir) / SWEPT).read_text())]
    except (OSError, ValueError, TypeError):
        return None
