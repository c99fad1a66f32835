"""`resnet-export`: a checkpoint to ONNX, TorchScript and safetensors, each verified against PyTorch.

    resnet-export outputs/2026-01-01/12-00-00 --out exported/ --formats onnx,torchscript,safetensors

Every file is reloaded right after it is written and run on the same input batch as
the PyTorch model; a maximum absolute difference above --atol fails the export.
ONNX is checked with onnxruntime when it is installed (the `export` extra); without
it the file is only structurally checked and the report says so.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Callable, Sequence

from resnet_cli.errors import OneLineParser, UserError, non_negative_float, one_line, reported
from resnet_cli.predict import WEIGHTS, WEIGHTS_HELP

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}


def example_batch(eval_spec: dict, batch: int = 2, seed: int = 0):
    """A fixed normalized input batch of the checkpoint's eval size (the comparison input)."""
    import torch

    size = int(eval_spec["crop"])
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _export_onnx(model, x, path: Path) -> None:
    import torch

    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    try:
        # One self-contained file (external_data=False) with a free batch dimension.
        if release >= (2, 9):
            # torch.export's exporter, the default from torch 2.9 on (the TorchScript one is deprecated there).
            torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"], dynamo=True,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False, verbose=False)
        else:
            # Before 2.9 the torch.export path needs an onnxscript of its own time (the newest one cannot
            # translate torch 2.6's batch norm; .ci/lowest found it): the TorchScript exporter needs none.
            torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["logits"], dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, verbose=False)
    except ImportError as exc:
        raise UserError(f"ONNX export needs the `export` extra (onnx, onnxscript): {one_line(exc)}") from exc


def _check_onnx(path: Path, x):
    import onnx

    onnx.checker.check_model(str(path))
    try:
        import onnxruntime as ort
    except ImportError:
        return None  # structurally valid; numbers unchecked (reported by the caller)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    import torch

    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def _export_torchscript(model, x, path: Path) -> None:
    import torch

    # torch.jit is deprecated in favour of torch.export, but TorchScript is still what
    # C++/LibTorch and many serving stacks load; the warning is not the user's to act on.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.trace(model, x), str(path))


def _check_torchscript(path: Path, x):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return loaded(x)


def _export_safetensors(model, ckpt: dict, path: Path, weights: str) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Metadata is str -> str: enough to rebuild the model and its eval transform without the checkpoint.
    meta = {"format": "resnet-cli/1", "class_names": json.dumps(ckpt["class_names"]),
            "eval_spec": json.dumps(ckpt["eval_spec"]), "model_config": json.dumps(ckpt["config"]["model"]),
            "weights": weights}
    save_file(state, str(path), metadata=meta)


def _check_safetensors(path: Path, x):
    import torch
    from hydra.utils import instantiate
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    cfg = json.loads(meta["model_config"])
    if cfg.get("pretrained"):
        cfg["pretrained"] = False  # the weights come from the file
    from resnet_cli.checkpoint import load_weights

    fresh = instantiate(cfg)(num_classes=len(json.loads(meta["class_names"])))
    load_weights(fresh, load_file(str(path)), f"{path}: the exported weights do not fit their model config")
    with torch.inference_mode():
        return fresh.eval()(x)


def export(checkpoint: str | Path, out_dir: str | Path, formats: Sequence[str] = FORMATS, atol: float = 1e-4,
           name: str | None = None, log: Callable[[str], None] = print, weights: str = "auto") -> dict[str, dict]:
    """Write each format into out_dir and verify it; returns {format: {path, max_abs_diff, verified}}.

    `weights`: auto (the EMA average when the run kept one, as training validated it), ema or raw.
    """
    import torch

    from resnet_cli.predict import load_model, resolve_checkpoint

    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"--formats: unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    path = resolve_checkpoint(checkpoint)
    model, ckpt, chosen = load_model(path, "cpu", weights)
    log(chosen.line())
    model = model.float()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = name or ckpt["config"]["model"].get("name") or "model"
    x = example_batch(ckpt["eval_spec"])
    with torch.inference_mode():
        reference = model(x)
    results: dict[str, dict] = {}
    for fmt in formats:
        target = out_dir / f"{stem}{SUFFIX[fmt]}"
        if fmt == "onnx":
            _export_onnx(model, x, target)
            got = _check_onnx(target, x)
        elif fmt == "torchscript":
            _export_torchscript(model, x, target)
            got = _check_torchscript(target, x)
        else:
            _export_safetensors(model, ckpt, target, chosen.name)
            got = _check_safetensors(target, x)
        if got is None:
            results[fmt] = {"path": str(target), "max_abs_diff": None, "verified": False}
            log(f"{fmt:12s} {target}  (onnxruntime not installed: graph checked, outputs not compared)")
            continue
        diff = float((got.float() - reference.float()).abs().max())
        results[fmt] = {"path": str(target), "max_abs_diff": diff, "verified": diff <= atol}
        if diff > atol:
            raise UserError(f"{target}: outputs differ from PyTorch by {diff:.2e} (> --atol {atol:g})")
        log(f"{fmt:12s} {target}  max |diff| vs PyTorch {diff:.2e}")
    return results


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line of resnet-export."""
    ap = OneLineParser(prog="resnet-export", description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt, else last.pt)")
    ap.add_argument("--out", default=None, help="output folder (default: <checkpoint folder>/export)")
    ap.add_argument("--formats", default=",".join(FORMATS), help=f"comma-separated subset of {','.join(FORMATS)}")
    ap.add_argument("--atol", type=non_negative_float, default=1e-4,
                    help="largest allowed |difference| from PyTorch")
    ap.add_argument("--name", help="file stem (default: the model's name)")
    ap.add_argument("--weights", choices=WEIGHTS, default="auto", help=WEIGHTS_HELP)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with status 2."""
    args = parse_args(argv)
    with reported("resnet-export"):
        from resnet_cli.predict import resolve_checkpoint

        out = Path(args.out) if args.out else resolve_checkpoint(args.checkpoint).parent / "export"
        export(args.checkpoint, out, [f.strip() for f in args.formats.split(",") if f.strip()], args.atol,
               args.name, weights=args.weights)


if __name__ == "__main__":
    main()
