"""Image folders that look like what users bring, written to disk, and resnet-train against a hand loop on each.

    python bench/folders.py [--root /tmp/rcli-folders] [--epochs 6] [--only fashion1k,clipart128] [--extra "k=v ..."]

The folders (SPECS), each built from offline sources only (Debian packages fetched with `apt-get
download` and unpacked with `dpkg -x` into ROOT/.debs, no root install; scikit-learn's wheel; the
fonts on the machine):

- fashion1k: Fashion-MNIST (Zalando Research, MIT licence) from Debian's `dataset-fashion-mnist`:
  train/ = the first 1,000 images of the official train set, val/ = the first 1,000 of the official
  test set; 10 classes of clothes, shoes and bags; 28 px grey PNG.
- fashion5k: the same source, the first 5,000 train images and test/ = the first 2,000 test images
  (train/ + test/: fast.ai's layout).
- clipart128: the Open Clip Art Library 0.18 (public domain dedication) from Debian's
  `openclipart-png`: 7 classes, its top-level categories animals, buildings, food, people, plants,
  tools and vehicles (transportation/vehicles + boating); a file listed under two classes and exact
  duplicates are dropped; each drawing is composited on white, scaled to fit 128 px and centred;
  a seeded stratified 80/20 split gives 1,071 train/ and 267 val/ colour PNGs of 128x128.
- handwritten32: the UCI optical digits as scikit-learn ships them (`load_digits`, CC BY 4.0): real
  8x8 scans at 17 grey levels, upscaled to 32 px; 1,438 train / 359 val.
- digits28, glyphs32/64/128, photos400-600: digits rendered from the machine's TrueType/OpenType fonts
  (Debian's font packages, else Pillow's own font) with random affine, blur, noise, colour and
  texture, at 28 to ~600 px (see SPECS).
- shapes32: the embedded `shapes` set written out as PNG, 1,000 / 250 at 32 px.

On each folder it runs, one after the other on this machine:

- `resnet-train dataset=imagefolder dataset.root=DIR trainer.epochs=E` (defaults only), and
- `bench/hand_loop.py DIR E`: the 30-line loop a user would otherwise write (torchvision
  resnet18, Adam 1e-3, batch 100, pad-4 random crop + flip, DataLoader with 2 workers). The flip
  is dropped (`--no-flip`) where the data is digits or text, as a user who knows their data would:
  decided per folder by what it holds (`FolderSpec.mirror`), not by resnet-train's `flip: auto` rule,

timing each epoch's end from process start, and prints one table: folder, native size,
images, best val accuracy of each, resnet-train's flip decision and its statistic, wall time of
each to first reach the hand loop's final accuracy, and the ratios. `build_folder` is also what
the tests use for their small fixtures.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

HERE = Path(__file__).resolve().parent
DIGITS = "0123456789"


def font_files() -> list[Path | None]:
    """The scalable fonts installed on this machine (sorted, so a folder is the same on the same machine).

    None stands for Pillow's own scalable font, used when the machine has no font package.
    """
    roots = [Path("/usr/share/fonts"), Path("/usr/local/share/fonts"), Path.home() / ".fonts"]
    found = sorted({p for r in roots if r.is_dir() for p in r.rglob("*") if p.suffix.lower() in (".ttf", ".otf")})
    # Symbol and math fonts have no ordinary digits.
    return [p for p in found if not re.search(r"(?i)math|symbol|dingbat|emoji|d050000l", p.name)] or [None]


def _font(path: Path | None, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size) if path is not None else ImageFont.load_default(size)


def _background(rng: np.random.Generator, side: int, color: np.ndarray) -> Image.Image:
    # Flat colour, a gradient or a blurred noise texture: what surrounds digits in real photos and scans.
    kind = rng.integers(3)
    base = np.ones((side, side, 3)) * color
    if kind == 1:
        ramp = np.linspace(-1, 1, side)[:, None] * rng.uniform(-40, 40, 3)
        base = base + (ramp[:, None, :] if rng.random() < 0.5 else ramp[None, :, :])
    elif kind == 2:
        noise = rng.normal(0, rng.uniform(8, 25), (side // 8 + 1, side // 8 + 1, 3))
        noise = np.asarray(Image.fromarray(np.clip(noise + 128, 0, 255).astype(np.uint8)).resize((side, side), Image.BICUBIC),
                           dtype=np.float64) - 128
        base = base + noise
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def render_digit(digit: int, size: int, rng: np.random.Generator, fonts: list[Path | None], *,
                 gray: bool = False) -> Image.Image:
    """One digit at `size` px: random font, scale, offset, rotation, shear, colours, blur and noise."""
    side = max(64, size) * 2  # drawn large, then resized: antialiased like a real photo or scan
    font = _font(fonts[rng.integers(len(fonts))], int(side * rng.uniform(0.75, 1.0)))
    if gray:  # MNIST-like: light strokes on a dark ground
        fg, bg = np.array([rng.uniform(180, 255)] * 3), np.array([rng.uniform(0, 50)] * 3)
    else:
        bg = rng.uniform(0, 255, 3)
        fg = rng.uniform(0, 255, 3)
        while np.abs(fg - bg).mean() < 100:  # legible, as digits on signs and forms are
            fg = rng.uniform(0, 255, 3)
    img = _background(rng, side, bg) if not gray else Image.new("RGB", (side, side), tuple(int(v) for v in bg))
    layer = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(layer)
    cx, cy = side / 2 + rng.uniform(-0.06, 0.06) * side, side / 2 + rng.uniform(-0.06, 0.06) * side
    draw.text((cx, cy), DIGITS[digit], font=font, fill=255, anchor="mm")
    if rng.random() < 0.2:  # a neighbour digit cut by the border, as in house-number crops
        other = DIGITS[rng.integers(10)]
        dx = side * rng.choice([-0.62, 0.62])
        draw.text((cx + dx, cy), other, font=font, fill=int(rng.uniform(120, 255)), anchor="mm")
    angle, shear = rng.uniform(-10, 10), rng.uniform(-0.15, 0.15)
    layer = layer.rotate(angle, resample=Image.BILINEAR)
    layer = layer.transform(layer.size, Image.AFFINE, (1, shear, -shear * side / 2, 0, 1, 0), resample=Image.BILINEAR)
    img.paste(Image.new("RGB", img.size, tuple(int(v) for v in fg)), (0, 0), layer)
    img = img.resize((size, size), Image.LANCZOS)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.6) * size / 32))
    arr = np.asarray(img, dtype=np.float64) + rng.normal(0, rng.uniform(0, 8), (size, size, 3))
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return out.convert("L") if gray else out


@dataclass(frozen=True)
class FolderSpec:
    """One benchmark folder: what it holds and how it is laid out on disk."""

    name: str
    # digits | shapes | sklearn (scikit-learn's 1,797 scanned 8x8 handwritten digits, upscaled)
    # | fashion (Fashion-MNIST) | clipart (Open Clip Art Library)
    source: str
    size: int | tuple[int, int]  # native side in px, or a (min, max) range of sides (photos of mixed size)
    train: int  # images in train/ (or, with split=False, in total)
    val: int
    split: bool = True  # True: train/ and val/ folders; False: one set of class folders split by resnet-train
    fmt: str = "png"
    gray: bool = False
    held_out: str = "val"  # the held-out folder's name (val, or test: fast.ai's layout)
    # Whether a mirrored image is still of its class, by what the data is (digits, text: no): the hand
    # loop flips only where a user who knows the data would.
    mirror: bool = True


SPECS = [
    FolderSpec("fashion1k", "fashion", 28, 1000, 1000),
    FolderSpec("fashion5k", "fashion", 28, 5000, 2000, held_out="test"),
    FolderSpec("clipart128", "clipart", 128, 0, 0),  # all the drawings of the 7 classes, split 80/20
    FolderSpec("handwritten32", "sklearn", 32, 1438, 359, mirror=False),
    FolderSpec("digits28", "digits", 28, 1200, 300, gray=True, mirror=False),
    FolderSpec("glyphs32", "digits", 32, 1438, 359, mirror=False),
    FolderSpec("shapes32", "shapes", 32, 1000, 250),
    FolderSpec("glyphs64", "digits", 64, 500, 0, split=False, mirror=False),
    FolderSpec("glyphs128", "digits", 128, 600, 0, split=False, fmt="jpg", mirror=False),
    FolderSpec("photos400-600", "digits", (400, 600), 360, 0, split=False, fmt="jpg", mirror=False),
]
FASHION_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
CLIPART_CLASSES = {"animals": ["animals"], "buildings": ["buildings"], "food": ["food"], "people": ["people"],
                   "plants": ["plants"], "tools": ["tools"],
                   "vehicles": ["transportation/vehicles", "transportation/boating"]}


def debian_package(name: str, root: Path) -> Path:
    """Debian package `name` unpacked under root/.debs/name (apt-get download + dpkg -x: no root install)."""
    dest = Path(root) / ".debs" / name
    if (dest / ".complete").exists():
        return dest
    work = dest.parent
    work.mkdir(parents=True, exist_ok=True)
    for old in work.glob(f"{name}_*.deb"):
        old.unlink()
    subprocess.run(["apt-get", "download", name], cwd=work, check=True)
    deb = next(work.glob(f"{name}_*.deb"))  # apt verifies the package against the archive's signed checksums
    shutil.rmtree(dest, ignore_errors=True)
    subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True)
    deb.unlink()
    (dest / ".complete").write_text("ok\n")
    return dest


def _idx(path: Path) -> np.ndarray:
    """A gzip'd idx file (MNIST's format: magic, dims, big-endian sizes, then uint8 data) as an array."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def _fashion(root: Path, n: int, *, test: bool):
    folder = debian_package("dataset-fashion-mnist", root) / "usr/share/datasets/fashion-mnist"
    prefix = "t10k" if test else "train"
    images = _idx(folder / f"{prefix}-images-idx3-ubyte.gz")[:n]
    labels = _idx(folder / f"{prefix}-labels-idx1-ubyte.gz")[:n]
    for img, label in zip(images, labels):
        yield FASHION_CLASSES[label], Image.fromarray(img, "L")


def clipart_items(root: Path, size: int) -> list[tuple[str, Image.Image]]:
    """Every drawing of CLIPART_CLASSES as (class, size-px RGB image on white), duplicates dropped, sorted."""
    from resnet_cli.data.transforms import to_rgb

    base = debian_package("openclipart-png", root) / "usr/share/openclipart/png"
    files = {c: sorted(p for sub in subs for p in (base / sub).rglob("*.png")) for c, subs in CLIPART_CLASSES.items()}
    owners: dict[str, set[str]] = {}
    for c, paths in files.items():
        for p in paths:
            owners.setdefault(p.name, set()).add(c)
    Image.MAX_IMAGE_PIXELS = None  # a few posters are 10k x 16k: trusted files from the package
    items, seen = [], set()
    for c, paths in files.items():
        for p in paths:
            if len(owners[p.name]) > 1:  # the same drawing under two classes (crawfish: animals and food)
                continue
            with Image.open(p) as img:
                img.draft("RGB", (size, size))
                img = to_rgb(img)
                img.thumbnail((size, size), Image.LANCZOS)
            canvas = Image.new("RGB", (size, size), (255, 255, 255))
            canvas.paste(img, ((size - img.width) // 2, (size - img.height) // 2))
            digest = hashlib.sha256(canvas.tobytes()).hexdigest()
            if digest not in seen:
                seen.add(digest)
                items.append((c, canvas))
    return items


def _clipart(root: Path, size: int, *, val: bool, val_fraction: float = 0.2):
    # A stratified split, seeded: the last 20% of each class's shuffled drawings are val/.
    rng = np.random.default_rng(0)
    by_class: dict[str, list[Image.Image]] = {}
    for c, img in clipart_items(root, size):
        by_class.setdefault(c, []).append(img)
    for c, imgs in by_class.items():
        order = rng.permutation(len(imgs))
        cut = len(imgs) - round(val_fraction * len(imgs))
        for i in (order[cut:] if val else order[:cut]):
            yield c, imgs[i]


def _images(spec: FolderSpec, n: int, seed: int, sub: str = "", root: Path = Path(".")):
    rng = np.random.default_rng(seed)
    if spec.source == "fashion":
        yield from _fashion(root, n, test=sub != "train")
        return
    if spec.source == "clipart":
        yield from _clipart(root, int(spec.size), val=sub != "train")
        return
    if spec.source == "shapes":
        import torch  # only the shapes source needs it

        from resnet_cli.data.synthetic import CLASS_NAMES, generate_shapes

        split = generate_shapes(n, int(spec.size), key=seed)
        for img, label in zip(split.images.permute(0, 2, 3, 1).numpy(), split.labels.tolist()):
            yield CLASS_NAMES[label].replace(" ", "_"), Image.fromarray(img)
        del torch
        return
    if spec.source == "sklearn":
        yield from _handwritten(spec, n, val=sub != "train")
        return
    fonts = font_files()
    for i in range(n):
        digit = i % 10
        size = spec.size if isinstance(spec.size, int) else int(rng.integers(spec.size[0], spec.size[1] + 1))
        img = render_digit(digit, size, rng, fonts, gray=spec.gray)
        if not isinstance(spec.size, int):  # photos are rarely square
            w = int(size * rng.uniform(1.0, 1.5))
            img = img.resize((w, size), Image.BICUBIC) if rng.random() < 0.5 else img.resize((size, w), Image.BICUBIC)
        yield f"digit_{digit}", img


def _handwritten(spec: FolderSpec, n: int, *, val: bool):
    # Real scans (UCI optical digits, shipped inside scikit-learn's wheel): 8x8 at 17 grey levels,
    # upscaled to the folder's size as RGB, which is how such a set arrives in a user's folder.
    # One fixed shuffle: train takes the first `spec.train` images, val the next `n`.
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    part = order[spec.train:spec.train + n] if val else order[:n]
    for i in part:
        img = Image.fromarray((digits.images[i] * (255 / 16)).astype(np.uint8)).convert("RGB")
        yield f"digit_{digits.target[i]}", img.resize((int(spec.size), int(spec.size)), Image.BICUBIC)


def build_folder(root: Path, spec: FolderSpec, seed: int = 0) -> Path:
    """Write `spec` under root/spec.name (skipped when already complete); returns the folder."""
    folder = Path(root) / spec.name
    done = folder / ".complete"
    if done.exists():
        return folder
    parts = ([("train", spec.train, seed), (spec.held_out, spec.val, seed + 1)] if spec.split
             else [("", spec.train, seed)])
    for sub, n, s in parts:
        for i, (cls, img) in enumerate(_images(spec, n, s, sub, Path(root))):
            path = folder / sub / cls / f"{i:05d}.{spec.fmt}"
            path.parent.mkdir(parents=True, exist_ok=True)
            img.save(path, quality=90) if spec.fmt == "jpg" else img.save(path)
    done.write_text("ok\n")
    return folder


def _timed_run(cmd: list[str], pattern: re.Pattern, env: dict, log_path: Path) -> tuple[list[tuple[float, float]], int]:
    """Run cmd; for every output line matching `pattern` (groups: epoch, val acc) record (seconds since start, acc)."""
    start = time.perf_counter()
    points = []
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            m = pattern.search(line)
            if m:
                points.append((time.perf_counter() - start, float(m.group(2))))
        rc = proc.wait()
    return points, rc


# resnet-train's per-epoch table: epoch, train_loss, train_acc, val_loss, val_acc, ...
TABLE_ROW = re.compile(r"\]\s*-\s+(\d+)\s+[\d.]+\s+[\d.]+\s+[\d.naif]+\s+([\d.]+)\s")
HAND_ROW = re.compile(r"^epoch (\d+) val_acc ([\d.]+)")


def time_to(points: list[tuple[float, float]], target: float) -> float:
    """Seconds until the first epoch whose val accuracy reached `target` (inf if never)."""
    return next((t for t, acc in points if acc >= target - 1e-9), math.inf)


# The plan line's flip decision: "flip off (auto: ...: nearest class mean of ... z=30.1)".
FLIP = re.compile(r"flip (on|off) \((.*?)\)(?:, vertical flip on)?, eval ")
STAT = re.compile(r"(\d+) train images at \d+ px ([\d.]+), mirrored ([\d.]+), chance ([\d.]+), z=(-?[\d.]+)")


def flip_decision(log_path: Path) -> tuple[str, str]:
    """(on|off, the mirror test's numbers in short) from a resnet-train log's plan line."""
    m = FLIP.search(log_path.read_text())
    if not m:
        return "?", ""
    stat = STAT.search(m.group(2))
    short = (f"{stat.group(2)} vs {stat.group(3)} mirrored (chance {stat.group(4)}, z={stat.group(5)}, "
             f"n={stat.group(1)})" if stat else m.group(2))
    return m.group(1), short


def bench_folder(folder: Path, epochs: int, out: Path, extra: list[str], mirror: bool = True) -> dict:
    """resnet-train (defaults) and the hand loop (flipping only if `mirror`) on one folder; per-epoch (time, acc)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("OMP_NUM_THREADS", None)  # both get the machine as a user's shell gives it
    # A user's first run: no decoded cache from an earlier run (the hand loop decodes every epoch).
    cache = out / f"cache-{folder.name}"
    shutil.rmtree(cache, ignore_errors=True)
    env["RESNET_CLI_CACHE"] = str(cache)
    train_cmd = [str(Path(sys.executable).parent / "resnet-train"), "dataset=imagefolder", f"dataset.root={folder}",
                 f"trainer.epochs={epochs}", f"output_root={out / 'outputs'}", *extra]
    hand_cmd = [sys.executable, str(HERE / "hand_loop.py"), str(folder), str(epochs),
                *([] if mirror else ["--no-flip"])]
    ours, rc1 = _timed_run(train_cmd, TABLE_ROW, env, out / f"{folder.name}.resnet-train.log")
    hand, rc2 = _timed_run(hand_cmd, HAND_ROW, env, out / f"{folder.name}.hand.log")
    if rc1 or rc2 or len(ours) != epochs or len(hand) != epochs:
        raise SystemExit(f"{folder.name}: a run failed (resnet-train rc {rc1}, {len(ours)} epochs; hand loop rc {rc2}, "
                         f"{len(hand)} epochs); see the logs in {out}")
    return {"ours": ours, "hand": hand, "flip": flip_decision(out / f"{folder.name}.resnet-train.log")}


def main() -> None:
    """Build the folders, run both trainers on each, print the table (and save it as JSON)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("/tmp/rcli-folders"))
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--only", default="", help="comma-separated folder names (default: all)")
    ap.add_argument("--extra", default="", help="extra resnet-train overrides, space-separated")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else [s.name for s in SPECS]
    specs = [next(s for s in SPECS if s.name == name) for name in names]  # in the order asked for
    out = args.root / "runs"
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in specs:
        folder = build_folder(args.root, spec)
        res = bench_folder(folder, args.epochs, out, args.extra.split(), mirror=spec.mirror)
        target = res["hand"][-1][1]
        t_ours, t_hand = time_to(res["ours"], target), time_to(res["hand"], target)
        images = sum(1 for _ in folder.rglob("*") if _.suffix in (".png", ".jpg"))
        size = spec.size if isinstance(spec.size, int) else f"{spec.size[0]}-{spec.size[1]}"
        rows.append({"folder": spec.name, "size": size, "images": images,
                     "acc_ours": max(a for _, a in res["ours"]), "acc_hand": max(a for _, a in res["hand"]),
                     "final_hand": target, "time_ours": t_ours, "time_hand": t_hand,
                     "wall_ours": res["ours"][-1][0], "wall_hand": res["hand"][-1][0], "epochs": args.epochs,
                     "flip_ours": res["flip"][0], "flip_stat": res["flip"][1], "flip_hand": spec.mirror})
        print(f"{spec.name}: ours {res['ours']}\n{spec.name}: hand {res['hand']}", flush=True)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    print()
    print("| folder | native px | images | epochs | best val acc resnet-train | best val acc hand loop | "
          "flip: resnet-train (auto) | its statistic | hand loop | "
          "time to hand loop's final acc: resnet-train | hand loop | ratio | total wall: resnet-train | hand loop |")
    print("|---|---|---:|---:|---:|---:|---|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        ratio = r["time_ours"] / r["time_hand"]
        print(f"| {r['folder']} | {r['size']} | {r['images']} | {r['epochs']} | {r['acc_ours']:.3f} | "
              f"{r['acc_hand']:.3f} | {r['flip_ours']} | {r['flip_stat']} | {'on' if r['flip_hand'] else 'off'} | "
              f"{r['time_ours']:.0f} s | {r['time_hand']:.0f} s | **{ratio:.2f}x** | {r['wall_ours']:.0f} s | "
              f"{r['wall_hand']:.0f} s |")


if __name__ == "__main__":
    main()
