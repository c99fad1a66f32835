"""`resnet-predict`: classify image files with a trained checkpoint; top-k names and probabilities out.

    resnet-predict outputs/2026-01-01/12-00-00 photo.jpg more_photos/ --topk 3 --json preds.json
    resnet-predict outputs/2026-01-01/12-00-00 photo.jpg --annotate annotated/   # the picture, labelled

The checkpoint carries everything needed: the model's name and keys, the class names and the
eval transform (resize, crop, mean, std), so predictions match what validation measured. It is
read as data (resnet_cli.inference): nothing it names is run. Outputs never land on an input and
never replace a file that is already there unless --overwrite says so.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from resnet_cli.errors import OneLineParser, UserError, one_line, positive_int, reported
from resnet_cli.fileio import atomic_write, claim_outputs, is_regular_file, kind_of, regular_file
from resnet_cli.inference import TTA, TTA_HELP, WEIGHTS, WEIGHTS_HELP

if TYPE_CHECKING:
    from resnet_cli.inference import Trained

log = logging.getLogger(__name__)

_URL = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _kind(path: Path) -> str:
    try:
        return kind_of(os.stat(path).st_mode)
    except OSError:
        return "a dangling link"


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in folders; UserError for a bad path."""
    from resnet_cli.data.images import IMAGE_SUFFIXES

    found: list[Path] = []
    for item in inputs:
        if _URL.match(str(item)):
            raise UserError(f"{item}: a URL; resnet-predict reads image files on this machine: download it first "
                            f"(e.g. curl -O {item})")
        path = Path(item)
        if path.is_dir():
            named = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
            files = [p for p in named if is_regular_file(p)]
            for p in sorted(set(named) - set(files)):  # a FIFO would block the decoder: never opened
                log.warning("skipped %s: %s, not a regular file", p, _kind(p))
            if not files:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += files
        else:
            found.append(regular_file(path, "image"))
    return found


def _read(path: Path, transform):
    from resnet_cli.data.images import decode, reason

    try:
        # decode(): a regular file only, fully decoded, EXIF orientation applied (the picture as displayed).
        return transform(decode(path))
    except Exception as exc:  # noqa: BLE001 - a decoder failure is a property of the file: name it
        raise UserError(f"cannot read image {path}: {reason(exc)}") from exc


ON_BAD_IMAGE = ("error", "skip")


def predict(trained: "Trained", files: Sequence[Path], topk: int = 5, batch_size: int = 64, device: str = "cpu",
            on_bad_image: str = "error", skipped: list | None = None, names: Sequence[str] | None = None) -> list[dict]:
    """Top-k class names and probabilities for each file, in order (`names` replaces the checkpoint's).

    A file that cannot be read stops with a one-line UserError naming it (`on_bad_image="error"`),
    or is left out and appended to `skipped` as (path, reason) (`"skip"`). Outputs that are not
    finite are an error naming the image, never a result.
    """
    import torch

    if on_bad_image not in ON_BAD_IMAGE:
        raise UserError(f"--on-bad-image {on_bad_image}: use error or skip")
    if topk < 1 or batch_size < 1:
        raise UserError(f"--topk and --batch-size must be >= 1 (got {topk}, {batch_size})")
    transform = trained.eval_transform()
    model = trained.model
    names = list(names or trained.class_names)
    k = max(1, min(topk, len(names)))
    skipped = skipped if skipped is not None else []
    readable = []
    for path in files:
        try:
            readable.append((path, _read(path, transform)))
        except UserError as exc:
            if on_bad_image == "error":
                raise UserError(f"{exc} (or pass --on-bad-image skip)") from exc
            skipped.append((str(path), str(exc)))
    if not readable:
        raise UserError(f"none of the {len(files)} image(s) could be read (first: {skipped[0][1]})")
    results: list[dict] = []
    for start in range(0, len(readable), batch_size):
        chunk = [p for p, _ in readable[start:start + batch_size]]
        batch = torch.stack([x for _, x in readable[start:start + batch_size]]).to(device)
        with torch.inference_mode():
            probs = model(batch).float().softmax(1)
        bad = (~torch.isfinite(probs).all(1)).nonzero().flatten().tolist()
        if bad:
            raise UserError(f"{chunk[bad[0]]}: the model's outputs are not finite (NaN or inf) for this image; "
                            f"{trained.path} gives no prediction to report")
        top = probs.topk(k, dim=1)
        for path, p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"file": str(path), "top": [{"class": names[c], "index": c, "prob": q}
                                                       for c, q in zip(i, p)]})
    return results


def read_class_names(path: str | Path) -> list[str]:
    """Class names from JSON: our class_names.json (a list) or the tutorials' class_indices.json ({"0": "daisy"})."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"--class-names {path}: cannot read it as JSON ({one_line(exc)})") from exc
    if isinstance(data, list) and all(isinstance(n, str) for n in data):
        return list(data)
    if isinstance(data, dict):
        try:
            by_index = {int(k): str(v) for k, v in data.items()}
        except ValueError:
            by_index = {}
        if by_index and sorted(by_index) == list(range(len(by_index))):
            return [by_index[i] for i in range(len(by_index))]
    raise UserError(f"--class-names {path}: expected a list of names or {{\"0\": \"name\", ...}} with indices 0..n-1")


def _font(size: int):
    from PIL import ImageFont

    try:  # a scalable font where Pillow has FreeType; its bitmap font otherwise
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def annotate(path: str | Path, top: Sequence[dict], max_side: int = 320):
    """The image (fitted into max_side, as displayed) above its top-k classes with probability bars, as a PIL image."""
    from PIL import Image, ImageDraw

    from resnet_cli.data.images import decode

    picture = decode(path)
    scale = max_side / max(picture.size)
    picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                             Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    big, small = _font(18), _font(13)
    width = max(picture.width, 260)
    line = 18
    height = picture.height + 34 + line * len(top)
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(picture, ((width - picture.width) // 2, 0))
    draw = ImageDraw.Draw(canvas)
    y = picture.height + 6
    best = top[0]
    draw.text((6, y), f"{best['class']}  {best['prob']:.1%}", fill=(20, 20, 20), font=big)
    y += 26
    for t in top:
        bar = int((width - 150) * float(t["prob"]))
        draw.rectangle([140, y + 3, 140 + max(bar, 1), y + line - 4], fill=(60, 110, 210))
        draw.text((6, y + 1), f"{t['class'][:16]}", fill="black", font=small)
        draw.text((96, y + 1), f"{t['prob']:.1%}", fill="black", font=small)
        y += line
    return canvas


def annotation_names(files: Sequence[Path]) -> list[str]:
    """The file name of each image's annotation: <stem>.png, numbered where two images share a stem."""
    names, used = [], {"grid.png"}
    for path in files:
        name, n = f"{Path(path).stem}.png", 1
        while name in used:  # files of the same name in different folders
            n += 1
            name = f"{Path(path).stem}_{n}.png"
        used.add(name)
        names.append(name)
    return names


def annotation_outputs(files: Sequence[Path], out_dir: str | Path) -> list[Path]:
    """Every file --annotate will write for these images (grid.png last, for several)."""
    out = Path(out_dir)
    return [out / n for n in annotation_names(files)] + ([out / "grid.png"] if len(files) > 1 else [])


def write_annotated(results: list[dict], out_dir: str | Path, max_grid: int = 64) -> list[Path]:
    """Write <out_dir>/<name>.png for each result (its "annotated" entry says where) and, for several, grid.png."""
    from PIL import Image

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written, tiles = [], []
    for r, name in zip(results, annotation_names([Path(r["file"]) for r in results])):
        img = annotate(r["file"], r["top"])
        atomic_write(out / name, lambda fh, img=img: img.save(fh, format="PNG"), durable=False)
        r["annotated"] = str(out / name)
        written.append(out / name)
        if len(tiles) < max_grid:
            tiles.append(img)
    if len(tiles) > 1:
        # The tutorials' figure of several predictions: the annotated images in rows of up to four.
        cols = min(4, len(tiles))
        w, h = max(t.width for t in tiles), max(t.height for t in tiles)
        rows = -(-len(tiles) // cols)
        grid = Image.new("RGB", (cols * w + (cols + 1) * 4, rows * h + (rows + 1) * 4), (200, 200, 200))
        for i, t in enumerate(tiles):
            grid.paste(t, (4 + (i % cols) * (w + 4), 4 + (i // cols) * (h + 4)))
        atomic_write(out / "grid.png", lambda fh: grid.save(fh, format="PNG"), durable=False)
        written.append(out / "grid.png")
    return written


def format_table(results: list[dict]) -> str:
    """One row per image: the file, then 'name prob' for each of the top k."""
    width = max([len("file")] + [len(r["file"]) for r in results])
    k = max((len(r["top"]) for r in results), default=1)
    head = f"{'file'.ljust(width)}  " + "  ".join(f"top{j + 1}".ljust(24) for j in range(k))
    rows = [head.rstrip()]
    for r in results:
        cells = [f"{t['class']} {t['prob']:.3f}".ljust(24) for t in r["top"]]
        rows.append((f"{r['file'].ljust(width)}  " + "  ".join(cells)).rstrip())
    return "\n".join(rows)


def to_csv(results: list[dict]) -> str:
    """Long-form CSV: file, rank, class, index, probability."""
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["file", "rank", "class", "index", "prob"])
    for r in results:
        for rank, t in enumerate(r["top"], start=1):
            writer.writerow([r["file"], rank, t["class"], t["index"], f"{t['prob']:.6f}"])
    return buf.getvalue()


def _write(dest: str, text: str) -> None:
    if dest == "-":
        sys.stdout.write(text)
    else:
        atomic_write(dest, text, durable=False)  # never half a file where a complete one was


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of resnet-predict."""
    ap = OneLineParser(prog="resnet-predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt, else last.pt)")
    ap.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    ap.add_argument("--topk", type=positive_int, default=5, help="classes per image (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the predictions as JSON ('-' for stdout)")
    ap.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV ('-' for stdout)")
    ap.add_argument("--annotate", metavar="OUT_DIR",
                    help="write each image with its top-k classes and probabilities drawn under it, as "
                         "OUT_DIR/<name>.png, and OUT_DIR/grid.png of them all (first 64) for several images")
    ap.add_argument("--class-names", metavar="FILE",
                    help="names to print instead of the checkpoint's: class_names.json (a list) or "
                         "class_indices.json ({\"0\": \"daisy\", ...})")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace output files that already exist (never an input image)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--weights", choices=WEIGHTS, default="auto", help=WEIGHTS_HELP)
    ap.add_argument("--tta", choices=TTA, default="auto", help=TTA_HELP)
    ap.add_argument("--batch-size", type=positive_int, default=64)
    ap.add_argument("--on-bad-image", choices=ON_BAD_IMAGE, default="error",
                    help="error (default): stop at an unreadable image, naming it; skip: leave it out and say so")
    return ap.parse_args(argv)


def check_outputs(args: argparse.Namespace, files: Sequence[Path]) -> None:
    """Refuse, before the model loads, outputs that would land on an input or replace a file already there."""
    planned = [(args.json, "--json"), (args.csv, "--csv")]
    outputs = [(path, flag) for path, flag in planned if path and path != "-"]
    if args.annotate:
        out = Path(args.annotate).resolve()
        for item in args.images:
            folder = Path(item).resolve()
            if Path(item).is_dir() and (out == folder or folder in out.parents):
                raise UserError(f"--annotate {args.annotate}: inside the input folder {item}, so its pictures would "
                                f"mix with (and later be read as) the images; choose a folder outside it")
        outputs += [(path, "--annotate") for path in annotation_outputs(files, args.annotate)]
    claim_outputs(outputs, inputs=[*files, *([args.class_names] if args.class_names else [])],
                  overwrite=args.overwrite)


def run(args: argparse.Namespace) -> list[dict]:
    """Predict as the parsed command line asks, printing the table and writing the files."""
    from resnet_cli.inference import load_trained
    from resnet_cli.runtime import resolve_device

    files = find_images(args.images)  # check the inputs before paying for the model
    names = read_class_names(args.class_names) if args.class_names else None
    check_outputs(args, files)
    device = str(resolve_device(args.device, key="--device"))
    trained = load_trained(args.checkpoint, device, args.weights, args.tta)
    if names is not None and len(names) != len(trained.class_names):
        raise UserError(f"--class-names {args.class_names}: {len(names)} names, but the model has "
                        f"{len(trained.class_names)} classes")
    skipped: list = []
    results = predict(trained, files, topk=args.topk, batch_size=args.batch_size, device=device,
                      on_bad_image=args.on_bad_image, skipped=skipped, names=names)
    # After the predictions, so that an error stays the only line on stderr; stdout may be JSON or CSV.
    print(f"resnet-predict: {trained.line()}", file=sys.stderr)
    for path, reason in skipped:
        print(f"resnet-predict: skipped: {reason}", file=sys.stderr)
    if skipped:
        print(f"resnet-predict: {len(skipped)} of {len(files)} image(s) skipped (--on-bad-image skip)",
              file=sys.stderr)
    if args.annotate:
        written = write_annotated(results, args.annotate)
        print(f"annotated {len(results)} image(s) in {args.annotate}"
              f"{' (grid.png: all of them)' if len(written) > len(results) else ''}", file=sys.stderr)
    to_stdout = "-" in (args.json, args.csv)
    if not to_stdout:
        print(format_table(results))
    if args.json:
        _write(args.json, json.dumps(results, indent=2, allow_nan=False) + "\n")
    if args.csv:
        _write(args.csv, to_csv(results))
    return results


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with status 2."""
    args = parse_args(argv)
    with reported("resnet-predict"):
        run(args)


if __name__ == "__main__":
    main()
