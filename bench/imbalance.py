"""dataset.balance on a 10:1 folder of real images: off, sampler and loss side by side (same seed and epochs).

    python bench/imbalance.py [--idx DIR] [--epochs 5] [--model resnet18] [--extra key=value ...]

The folder: real Fashion-MNIST images (Debian's dataset-fashion-mnist idx files; `apt-get download
dataset-fashion-mnist && dpkg -x` puts them under usr/share/datasets/fashion-mnist), written as PNGs:
train/ holds 500 images of each of the first five classes and 50 of each of the last five (10:1),
val/ 100 of each class (balanced, from the official test set), so the val metrics weigh every class
alike. Prints, per setting: accuracy, balanced accuracy and macro-F1 at the best epoch, and the time.
This is the measurement behind dataset.balance=auto (resnet_cli/data/policy.py AUTO_BALANCE).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DEBIAN = "/usr/share/datasets/fashion-mnist"


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip'd or not) as a numpy array."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    dims = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"{folder}: no {stem}[.gz]; pass --idx DIR holding Fashion-MNIST's idx files")


def write_folder(idx: Path, out: Path) -> Path:
    """train/ (500 per class for classes 0-4, 50 for 5-9) and val/ (100 per class) as PNGs."""
    from PIL import Image

    x_train, y_train = read_idx(find(idx, "train-images-idx3-ubyte")), read_idx(find(idx, "train-labels-idx1-ubyte"))
    x_test, y_test = read_idx(find(idx, "t10k-images-idx3-ubyte")), read_idx(find(idx, "t10k-labels-idx1-ubyte"))
    for split, x, y, per in (("train", x_train, y_train, lambda c: 500 if c < 5 else 50),
                             ("val", x_test, y_test, lambda c: 100)):
        for c in range(10):
            folder = out / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i, j in enumerate(np.flatnonzero(y == c)[:per(c)]):
                Image.fromarray(x[j], "L").save(folder / f"{j}.png")
    return out


def run(folder: Path, balance: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"runs-{balance}"
    cmd = [str(Path(sys.executable).parent / "resnet-train"), "dataset=imagefolder", f"dataset.root={folder}",
           f"model={args.model}", f"trainer.epochs={args.epochs}", f"dataset.balance={balance}",
           "trainer.monitor=val_balanced_acc", "trainer.progress=false", f"hydra.run.dir={out}", *args.extra]
    env = {**os.environ, "RESNET_CLI_CACHE": str(work / "cache")}
    start = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if res.returncode != 0:
        raise SystemExit(f"balance={balance} failed:\n{res.stderr[-2000:]}")
    m = json.loads((out / "metrics.json").read_text())
    best = m["best_monitored_row"]
    return {"balance": balance, "acc": best["val_acc"], "balanced": best["val_balanced_acc"],
            "macro_f1": best["val_macro_f1"], "epoch": m["best_epoch"], "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--idx", default=DEBIAN, help="folder of Fashion-MNIST's four idx files")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--only", default="off,sampler,loss")
    ap.add_argument("--extra", nargs="*", default=[], help="more resnet-train overrides for every run")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="rcli-imbalance-") as tmp:
        work = Path(tmp)
        folder = write_folder(Path(args.idx), work / "fashion10to1")
        rows = [run(folder, b, args, work) for b in args.only.split(",")]
    print(f"{'balance':8s} {'acc':>6s} {'balanced':>9s} {'macro-F1':>9s} {'best ep':>8s} {'wall s':>7s}")
    for r in rows:
        print(f"{r['balance']:8s} {r['acc']:6.3f} {r['balanced']:9.3f} {r['macro_f1']:9.3f} {r['epoch']:8d} "
              f"{r['seconds']:7.0f}")


if __name__ == "__main__":
    main()
