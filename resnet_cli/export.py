"""`resnet-export`: a checkpoint to ONNX, TorchScript and safetensors, each verified against PyTorch.

    resnet-export outputs/2026-01-01/12-00-00 --out exported/ --formats onnx,torchscript,safetensors

Every file is written under a temporary name, reloaded and run on the same input batch as
the PyTorch model, and only then given its name; a maximum absolute difference above --atol
(or an output that is not finite) fails the export and leaves nothing behind. ONNX is
checked with onnxruntime when it is installed (the `export` extra); without it the file is
only structurally checked and the report says so. An existing file is replaced only with
--overwrite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from resnet_cli.errors import OneLineParser, UserError, non_negative_float, one_line, reported
from resnet_cli.fileio import claim_outputs
from resnet_cli.inference import TTA, TTA_HELP, WEIGHTS, WEIGHTS_HELP

if TYPE_CHECKING:
    from resnet_cli.inference import Trained

FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "safetensors": ".safetensors"}


def example_batch(eval_spec: dict, batch: int = 2, seed: int = 0):
    """A fixed normalized input batch of the checkpoint's eval size and channels (the comparison input)."""
    import torch

    size = int(eval_spec["crop"])
    channels = int(eval_spec.get("channels", 3))
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def parse_formats(text: str) -> list[str]:
    """--formats as a list: known names, each once, at least one."""
    formats = list(dict.fromkeys(f.strip() for f in str(text).split(",") if f.strip()))
    if not formats:
        raise UserError(f"--formats '{text}': name at least one of {', '.join(FORMATS)}")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise UserError(f"--formats: unknown format '{unknown[0]}'; choose from {', '.join(FORMATS)}")
    return formats


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


def _export_safetensors(trained: "Trained", model, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # Metadata is str -> str: enough to rebuild the model (by name, as resnet_cli.inference does) and its
    # eval transform without the checkpoint; image_size is the resolved one.
    config = {"name": trained.model_name, **{k: v for k, v in trained.model_kwargs.items() if k != "pretrained"}}
    meta = {"format": "resnet-cli/1", "class_names": json.dumps(trained.class_names),
            "eval_spec": json.dumps(trained.eval_spec), "model_config": json.dumps(config),
            "weights": trained.weights.name, "tta": "flip" if trained.tta else "off"}
    save_file(state, str(path), metadata=meta)


def _check_safetensors(path: Path, x):
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file

    from resnet_cli.checkpoint import load_weights
    from resnet_cli.inference import build_model, model_spec

    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    name, kwargs = model_spec(json.loads(meta["model_config"]), path)
    fresh = build_model(name, kwargs, len(json.loads(meta["class_names"])), kwargs.get("image_size"), path)
    load_weights(fresh, load_file(str(path)), f"{path}: the exported weights do not fit their model config")
    with torch.inference_mode():
        return fresh.eval()(x)


def export(checkpoint: str | Path, out_dir: str | Path, formats: Sequence[str] = FORMATS, atol: float = 1e-4,
           name: str | None = None, log: Callable[[str], None] = print, weights: str = "auto",
           overwrite: bool = False, tta: str = "auto") -> dict[str, dict]:
    """Write each format into out_dir and verify it; returns {format: {path, max_abs_diff, verified}}.

    `weights`: auto (the EMA average when the run kept one, as training validated it), ema or raw.
    `tta`: with flip TTA on, the ONNX and TorchScript graphs average each image with its mirror; the
    safetensors file holds the classifier's weights (its metadata says `tta: flip`).
    A file is given its name only once verified; an existing one is replaced only with `overwrite`.
    """
    import torch

    from resnet_cli.inference import load_trained

    formats = parse_formats(",".join(formats))
    trained = load_trained(checkpoint, "cpu", weights, tta)
    out_dir = Path(out_dir)
    stem = name or trained.model_name
    targets = {fmt: out_dir / f"{stem}{SUFFIX[fmt]}" for fmt in formats}
    claim_outputs([(t, "--out") for t in targets.values()], inputs=[trained.path], overwrite=overwrite)
    log(trained.line())
    model = trained.model.float()
    plain = model.model if trained.tta else model  # the classifier itself, without the flip average
    x = example_batch(trained.eval_spec)
    with torch.inference_mode():
        reference, plain_reference = model(x), plain(x)
    if not bool(torch.isfinite(reference).all()):
        raise UserError(f"{trained.path}: the model's outputs are not finite (NaN or inf) on the example batch; "
                        f"nothing was exported")
    out_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for fmt, target in targets.items():
        # Written and checked under a temporary name: a failed check leaves no file that looks exported.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        try:
            if fmt == "onnx":
                _export_onnx(model, x, tmp)
                got = _check_onnx(tmp, x)
            elif fmt == "torchscript":
                _export_torchscript(model, x, tmp)
                got = _check_torchscript(tmp, x)
            else:
                _export_safetensors(trained, plain, tmp)
                got = _check_safetensors(tmp, x)
            want = plain_reference if fmt == "safetensors" else reference
            diff = None if got is None else float((got.float() - want.float()).abs().max())
            if diff is not None and not (math.isfinite(diff) and diff <= atol):
                raise UserError(f"{target}: outputs differ from PyTorch by {diff:.2e} (> --atol {atol:g}); "
                                f"not exported")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        results[fmt] = {"path": str(target), "max_abs_diff": diff, "verified": diff is not None}
        if diff is None:
            log(f"{fmt:12s} {target}  (onnxruntime not installed: graph checked, outputs not compared)")
        else:
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
    ap.add_argument("--overwrite", action="store_true", help="replace exported files that already exist")
    ap.add_argument("--tta", choices=TTA, default="auto", help=TTA_HELP)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: user errors print one line and exit with status 2."""
    args = parse_args(argv)
    with reported("resnet-export"):
        from resnet_cli.inference import resolve_checkpoint

        formats = parse_formats(args.formats)  # before the checkpoint is read
        out = Path(args.out) if args.out else resolve_checkpoint(args.checkpoint).parent / "export"
        export(args.checkpoint, out, formats, args.atol, args.name, weights=args.weights, overwrite=args.overwrite,
               tta=args.tta)


if __name__ == "__main__":
    main()
