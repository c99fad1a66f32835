"""Model size and cost: parameter counts and multiply-accumulates counted on meta tensors."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with requires_grad when trainable_only)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, image_size: int, in_channels: int | None = None) -> int:
    """Multiply-accumulates of one eval-mode forward pass of a single image_size x image_size image.

    The pass runs on a meta-device copy, so no arithmetic happens and a 224 px ResNet-152 costs
    milliseconds. A FLOP in torch's counter is one multiply or one add, so MACs = FLOPs / 2.
    """
    if in_channels is None:
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        in_channels = first.in_channels if first is not None else 3
    on_meta = all(p.is_meta for p in model.parameters())
    probe = model if on_meta else copy.deepcopy(model).to("meta")
    was_training = probe.training
    probe.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            probe(torch.empty(1, in_channels, image_size, image_size, device="meta"))
    finally:
        probe.train(was_training)
    return counter.get_total_flops() // 2


def layer_summary(model: nn.Module, image_size: int, depth: int = 3, in_channels: int = 3) -> str:
    """A per-layer table (output shape, parameters) of one forward pass at image_size, and the totals.

    Uses torchinfo (the `summary` extra) when it is installed, else forward hooks on a meta-device
    copy (shapes only, no arithmetic). Both end with 'Total params: N' and 'Trainable params: N'.
    """
    try:
        import torchinfo
    except ImportError:
        return hook_summary(model, image_size, depth, in_channels)
    stats = torchinfo.summary(model, input_size=(1, in_channels, image_size, image_size), depth=depth,
                              col_names=("output_size", "num_params", "trainable"), row_settings=("var_names",),
                              verbose=0, device="cpu",
                              mode="eval")
    return str(stats)


def hook_summary(model: nn.Module, image_size: int, depth: int = 3, in_channels: int = 3) -> str:
    """layer_summary without torchinfo: forward hooks record each module's output shape down to `depth`."""
    probe = copy.deepcopy(model).to("meta")
    probe.eval()
    shapes: dict[str, str] = {}
    rows = [(name, module) for name, module in probe.named_modules()
            if name and name.count(".") < depth]
    handles = []
    for name, module in rows:
        def hook(mod, args, out, name=name):
            shapes[name] = str(list(out.shape)) if torch.is_tensor(out) else type(out).__name__
        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            out = probe(torch.empty(1, in_channels, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    lines = [(f"{type(model).__name__}", f"{list(out.shape)}", "")]
    for name, module in rows:
        n = sum(p.numel() for p in module.parameters())
        indent = "  " * (name.count(".") + 1)
        lines.append((f"{indent}{name.rsplit('.', 1)[-1]} ({type(module).__name__})", shapes.get(name, "--"),
                      f"{n:,}" if n else "--"))
    w0 = max(len(r[0]) for r in lines) + 2
    w1 = max(len("Output Shape"), *(len(r[1]) for r in lines)) + 2
    rule = "=" * (w0 + w1 + 14)
    text = [rule, f"{'Layer (type)':<{w0}}{'Output Shape':<{w1}}{'Param #':>12}", rule]
    text += [f"{a:<{w0}}{b:<{w1}}{c:>12}" for a, b, c in lines]
    total, trainable = count_params(model), count_params(model, trainable_only=True)
    text += [rule, f"Total params: {total:,}", f"Trainable params: {trainable:,}",
             f"Non-trainable params: {total - trainable:,}",
             f"Input size: [1, {in_channels}, {image_size}, {image_size}]", rule]
    return "\n".join(text)
