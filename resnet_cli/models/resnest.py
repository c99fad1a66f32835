"""ResNeSt (Zhang et al. 2020, arXiv:2004.08955): the bottleneck with a split-attention 3x3 convolution.

It is the one ResNet trunk with a different block, the deep stem (ResNet-C) and average-pool
shortcuts (ResNet-D); only the block is new here.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from resnet_cli.models.layers import conv1x1
from resnet_cli.models.registry import register_model
from resnet_cli.models.resnet import ResNet, _Block, variant


class SplitAttention(nn.Module):
    """A 3x3 conv producing `radix` splits per group, fused by a softmax over the splits (Zhang et al. 2020, Fig. 2)."""

    def __init__(self, channels: int, radix: int = 2, groups: int = 1, reduction: int = 4) -> None:
        super().__init__()
        self.radix, self.groups = radix, groups
        hidden = max(channels * radix // reduction, 32)
        self.conv = nn.Conv2d(channels, channels * radix, 3, padding=1, groups=groups * radix, bias=False)
        self.bn0 = nn.BatchNorm2d(channels * radix)
        self.relu = nn.ReLU(inplace=True)
        self.fc1 = nn.Conv2d(channels, hidden, 1, groups=groups)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, channels * radix, 1, groups=groups)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn0(self.conv(x)))
        n, c = x.shape[0], x.shape[1] // self.radix
        splits = x.view(n, self.radix, c, *x.shape[2:])
        gap = splits.sum(1).mean((2, 3), keepdim=True)
        logits = self.fc2(self.relu(self.bn1(self.fc1(gap))))
        # r-softmax: within each cardinal group, the weights of its radix splits sum to one per channel.
        weights = logits.view(n, self.groups, self.radix, -1).transpose(1, 2).softmax(1)
        return (splits * weights.reshape(n, self.radix, c, 1, 1)).sum(1)


class ResNeStBottleneck(_Block):
    """1x1 reduce, split-attention 3x3, average-pool downsampling (ResNet-D's "avd"), 1x1 expand."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        groups: int = 1,
        base_width: int = 64,
        attn: str | None = None,
        residual: bool = True,
        radix: int = 2,
    ) -> None:
        super().__init__(downsample, residual, attn, planes * self.expansion)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = SplitAttention(width, radix, groups)
        # The 3x3 conv runs at full resolution and a 3x3 average pool strides, so no input pixel is skipped.
        self.avd = nn.AvgPool2d(3, stride, padding=1) if stride > 1 else nn.Identity()
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.avd(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return F.relu(self._add_shortcut(self.bn3(self.conv3(out)), x))


@register_model(family="ResNeSt", paper="Zhang et al. 2020, arXiv:2004.08955")
def resnest50(**kwargs: Any) -> ResNet:
    """ResNeSt-50 (radix 2, cardinality 1, width 64): deep stem, average-pool shortcuts."""
    return variant(ResNeStBottleneck, [3, 4, 6, 3], kwargs, deep_stem=True, shortcut="avg", block_args={"radix": 2})
