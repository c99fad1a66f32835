"""Speed on a user's own folder: resnet-train with defaults against the 30-line hand loop, interleaved.

    python bench/bench_folder.py [--root /tmp/rcli-folders] [--batches 12] [--repeats 2]

Two folders written to disk by bench/folders.py: ~1.8k digits at 32 px and ~1k at 224 px (JPEG).
For each, with the decoded cache first removed:
  1. resnet-train (cold: no cache) -- start-up time, from process start to the training table's header;
  2. the hand loop (bench/hand_loop.py) -- training images/s;
  3. resnet-train again (warm: cache from run 1) -- start-up time and training images/s;
  then 2 and 3 once more (`--repeats`), so both sides see the same machine load.
Training images/s is measured over the same number of batches of one epoch on each side
(resnet-train's own per-epoch figure, the hand loop's timed the same way). Prints a table
with the ratios: train images/s (target >= 1.5x) and warm/cold start-up (target <= 0.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from folders import FolderSpec, build_folder

HERE = Path(__file__).resolve().parent
SPECS = [FolderSpec("speed32", "digits", 32, 1438, 359),
         FolderSpec("speed224", "digits", 224, 900, 100, fmt="jpg")]
HEADER = re.compile(r"epoch\s+train_loss\s+train_acc")
HAND = re.compile(r"train_img_s ([\d.]+)")


def _env(cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # as a user's shell runs both
    if cache is not None:  # resnet-train's decoded cache: the bench's own, so "cold" really starts without one
        env["RESNET_CLI_CACHE"] = str(cache)
    return env


def run_ours(folder: Path, out: Path, batches: int, cache: Path) -> tuple[float, float]:
    """(seconds from process start to the first training step, training images/s) of one resnet-train run."""
    outputs = out / f"ours-{time.time_ns()}"
    cmd = [str(Path(sys.executable).parent / "resnet-train"), "dataset=imagefolder", f"dataset.root={folder}",
           "trainer.epochs=1", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=1",
           f"output_root={outputs}"]
    start = time.perf_counter()
    startup = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(cache))
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if startup is None and HEADER.search(line):
            startup = time.perf_counter() - start
    if proc.wait() or startup is None:
        raise SystemExit(f"resnet-train failed on {folder}:\n{''.join(lines[-20:])}")
    metrics = json.loads(next(outputs.rglob("metrics.json")).read_text())
    return startup, metrics["history"][0]["img/s"]


def run_hand(folder: Path, batches: int) -> float:
    """Training images/s of the hand loop over `batches` batches."""
    res = subprocess.run([sys.executable, str(HERE / "hand_loop.py"), str(folder), "1", str(batches)],
                         capture_output=True, text=True, env=_env())
    m = HAND.search(res.stdout)
    if res.returncode or not m:
        raise SystemExit(f"hand loop failed on {folder}:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return float(m.group(1))


def main() -> None:
    """Build the two folders, run the interleaved comparison, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/rcli-folders"))
    ap.add_argument("--batches", type=int, default=12, help="training batches timed per run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    out = args.root / "speed-runs"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in SPECS:
        if args.only and spec.name not in args.only.split(","):
            continue
        folder = build_folder(args.root, spec)
        cache = out / f"cache-{spec.name}"
        shutil.rmtree(cache, ignore_errors=True)
        cold, _ = run_ours(folder, out, 1, cache)
        ours, hand, warm = [], [], []
        for _ in range(args.repeats):
            hand.append(run_hand(folder, args.batches))
            t, rate = run_ours(folder, out, args.batches, cache)
            warm.append(t)
            ours.append(rate)
            print(f"{spec.name}: hand {hand[-1]:.1f} img/s, resnet-train {rate:.1f} img/s, start-up cold {cold:.1f} s "
                  f"warm {t:.1f} s", flush=True)
        rows.append((spec.name, spec.size, spec.train + spec.val, sum(ours) / len(ours), sum(hand) / len(hand),
                     cold, min(warm)))
    print()
    print("| folder | px | images | train img/s resnet-train | hand loop | ratio | start-up cold | warm | warm/cold |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, size, n, ours, hand, cold, warm in rows:
        print(f"| {name} | {size} | {n} | {ours:.1f} | {hand:.1f} | **{ours / hand:.2f}x** | {cold:.1f} s | "
              f"{warm:.1f} s | **{warm / cold:.2f}x** |")


if __name__ == "__main__":
    main()
