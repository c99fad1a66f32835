"""Speed on a user's own folder: resnet-train with defaults against the 30-line hand loop, interleaved.

    python bench/bench_folder.py [--root /tmp/rcli-folders] [--batches 12] [--repeats 3]

Folders written to disk by bench/folders.py: ~1.8k digits at 32 px, ~1k at 224 px (JPEG) and
2k JPEGs of 400-600 px (trained at 224). For each folder, `--repeats` times:
  1. resnet-train cold (its decoded cache removed first) -- start-up, from process start to the
     training table's header;
  2. the hand loop (bench/hand_loop.py) -- training images/s, and its start-up to its first batch;
  3. resnet-train warm (the cache of run 1) -- start-up and training images/s;
  4. the torch floor: a process that imports torch and builds one optimizer, timed to that point. No
     PyTorch training run starts faster: building an optimizer imports torch._dynamo (~1.4 s here).
Training images/s is measured over the same number of batches of one epoch on each side
(resnet-train's own per-epoch figure, the hand loop's timed the same way). Prints a table of the
medians over the repeats with the ratios: train images/s (target >= 1.5x), warm/cold start-up
(target <= 0.5x), and the same ratio for the part of each start-up above the floor.
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
from statistics import median

from folders import FolderSpec, build_folder

HERE = Path(__file__).resolve().parent
SPECS = [FolderSpec("speed32", "digits", 32, 1438, 359),
         FolderSpec("speed224", "digits", 224, 900, 100, fmt="jpg"),
         # Photos as they come off a phone or the web, larger than the training size: decoding is the cost.
         FolderSpec("speed-photos", "digits", (400, 600), 1800, 200, fmt="jpg")]
HEADER = re.compile(r"epoch\s+train_loss\s+train_acc")
HAND = re.compile(r"train_img_s ([\d.]+)")
FIRST = re.compile(r"^first batch$", re.M)


def _env(cache: Path | None = None) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # as a user's shell runs both
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # set on these sandboxes; a user's Python caches bytecode
    if cache is not None:  # resnet-train's decoded cache: the bench's own, so "cold" really starts without one
        env["RESNET_CLI_CACHE"] = str(cache)
    return env


# Timed up to its "first batch", as the hand loop is: a torch process's exit alone takes about a second here.
FLOOR = "import torch; torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1); print('first batch', flush=True)"


def _timed(cmd: list[str], env: dict, mark: re.Pattern) -> tuple[float, list[str]]:
    """(seconds from process start to the first line of its output matching `mark`, the whole output)."""
    start = time.perf_counter()
    seen = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if seen is None and mark.search(line):
            seen = time.perf_counter() - start
    if proc.wait() or seen is None:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{''.join(lines[-20:])}")
    return seen, lines


def run_ours(folder: Path, out: Path, batches: int, cache: Path) -> tuple[float, float]:
    """(seconds from process start to the first training step, training images/s) of one resnet-train run."""
    outputs = out / f"ours-{time.time_ns()}"
    cmd = [str(Path(sys.executable).parent / "resnet-train"), "dataset=imagefolder", f"dataset.root={folder}",
           "trainer.epochs=1", f"trainer.limit_train_batches={batches}", "trainer.limit_val_batches=1",
           f"output_root={outputs}"]
    startup, _ = _timed(cmd, _env(cache), HEADER)
    metrics = json.loads(next(outputs.rglob("metrics.json")).read_text())
    return startup, metrics["history"][0]["img/s"]


def run_hand(folder: Path, batches: int) -> tuple[float, float]:
    """(seconds from process start to the first batch, training images/s over `batches` batches) of the hand loop."""
    startup, lines = _timed([sys.executable, str(HERE / "hand_loop.py"), str(folder), "1", str(batches)], _env(),
                            FIRST)
    m = HAND.search("".join(lines))
    if not m:
        raise SystemExit(f"hand loop printed no rate on {folder}:\n{''.join(lines[-20:])}")
    return startup, float(m.group(1))


def run_floor() -> float:
    """Seconds a process takes from its start to having imported torch and built one optimizer."""
    return _timed([sys.executable, "-c", FLOOR], _env(), FIRST)[0]


def main() -> None:
    """Build the two folders, run the interleaved comparison, print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/rcli-folders"))
    ap.add_argument("--batches", type=int, default=12, help="training batches timed per run")
    ap.add_argument("--repeats", type=int, default=3)
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
        ours, hand, hand_up, cold, warm, floor = [], [], [], [], [], []
        for _ in range(args.repeats):
            shutil.rmtree(cache, ignore_errors=True)  # each repeat starts cold, as a user's first run does
            cold.append(run_ours(folder, out, 1, cache)[0])
            up, rate = run_hand(folder, args.batches)
            hand_up.append(up)
            hand.append(rate)
            t, rate = run_ours(folder, out, args.batches, cache)
            warm.append(t)
            ours.append(rate)
            floor.append(run_floor())
            print(f"{spec.name}: hand {hand[-1]:.1f} img/s, resnet-train {rate:.1f} img/s, start-up cold "
                  f"{cold[-1]:.1f} s warm {t:.1f} s, hand loop {up:.1f} s, torch floor {floor[-1]:.1f} s", flush=True)
        px = spec.size if isinstance(spec.size, int) else "-".join(map(str, spec.size))
        rows.append((spec.name, px, spec.train + spec.val, median(ours), median(hand), median(cold), median(warm),
                     median(hand_up), median(floor)))
    print()
    print("| folder | px | images | train img/s resnet-train | hand loop | ratio | start-up cold | warm | warm/cold "
          "| hand loop start-up | torch floor | warm/cold above the floor |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, size, n, ours, hand, cold, warm, hand_up, floor in rows:
        above = (warm - floor) / (cold - floor) if cold > floor else float("nan")
        print(f"| {name} | {size} | {n} | {ours:.1f} | {hand:.1f} | **{ours / hand:.2f}x** | {cold:.1f} s | "
              f"{warm:.1f} s | **{warm / cold:.2f}x** | {hand_up:.1f} s | {floor:.1f} s | {above:.2f}x |")


if __name__ == "__main__":
    main()
