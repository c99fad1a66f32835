"""`resnet-predict`: classify image files with a trained checkpoint; top-k names and probabilities out.

    resnet-predict outputs/2026-01-01/12-00-00 photo.jpg more_photos/ --topk 3 --json preds.json

The checkpoint carries everything needed: the model config, the class names and the
eval transform (resize, crop, mean, std), so predictions match what validation measured.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence

from resnet_cli.errors import UserError, one_line, reported

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run folder's best.pt (else last.pt)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: no best.pt or last.pt in this run folder")
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    return path


def load_model(path: str | Path, device: str = "cpu"):
    """Rebuild the checkpoint's model in eval mode; returns (model, checkpoint dict)."""
    import torch

    from resnet_cli import checkpoint
    from resnet_cli.build import build_model

    ckpt = checkpoint.load(resolve_checkpoint(path), map_location="cpu")
    for key in ("config", "class_names", "eval_spec"):
        if key not in ckpt:
            raise UserError(f"{path}: checkpoint has no '{key}' entry (not written by resnet-train?)")
    # The checkpoint holds the trained weights: fetch nothing; build at the size it was trained at.
    model = build_model(ckpt["config"]["model"], len(ckpt["class_names"]), ckpt["eval_spec"].get("crop"),
                        fetch_weights=False)
    model.load_state_dict(ckpt["model"])
    return model.to(torch.device(device)).eval(), ckpt


def find_images(inputs: Sequence[str]) -> list[Path]:
    """Image files named directly or found (recursively, sorted) in folders; UserError for a bad path."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
            found += files
        elif path.is_file():
            found.append(path)
        else:
            raise UserError(f"image not found: {path}")
    return found


def _read(path: Path, transform):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            return transform(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"cannot read image {path}: {one_line(exc)}") from exc


def predict(model, ckpt: dict, files: Sequence[Path], topk: int = 5, batch_size: int = 64,
            device: str = "cpu") -> list[dict]:
    """Top-k class names and probabilities for each file, in order."""
    import torch

    from resnet_cli.data.transforms import build_eval_transform

    transform = build_eval_transform(**ckpt["eval_spec"])
    names = ckpt["class_names"]
    k = max(1, min(topk, len(names)))
    results: list[dict] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start:start + batch_size]
        batch = torch.stack([_read(p, transform) for p in chunk]).to(device)
        with torch.inference_mode():
            probs = model(batch).float().softmax(1)
        top = probs.topk(k, dim=1)
        for path, p, i in zip(chunk, top.values.tolist(), top.indices.tolist()):
            results.append({"file": str(path), "top": [{"class": names[c], "index": c, "prob": q}
                                                       for c, q in zip(i, p)]})
    return results


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
        Path(dest).write_text(text)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of resnet-predict."""
    ap = argparse.ArgumentParser(prog="resnet-predict", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt, else last.pt)")
    ap.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    ap.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the predictions as JSON ('-' for stdout)")
    ap.add_argument("--csv", metavar="FILE", help="also write the predictions as CSV ('-' for stdout)")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    ap.add_argument("--batch-size", type=int, default=64)
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Predict as the parsed command line asks, printing the table and writing the files."""
    files = find_images(args.images)  # check the inputs before paying for torch and the model
    model, ckpt = load_model(args.checkpoint, args.device)
    results = predict(model, ckpt, files, topk=args.topk, batch_size=args.batch_size, device=args.device)
    to_stdout = "-" in (args.json, args.csv)
    if not to_stdout:
        print(format_table(results))
    if args.json:
        _write(args.json, json.dumps(results, indent=2) + "\n")
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
