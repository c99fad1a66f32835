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
