"""Residual Attention Network (Wang et al. 2017, arXiv:1704.06904): attention modules on a pre-activation trunk.

Each attention module splits into a trunk branch T(x) of residual units and a soft-mask branch M(x)
that pools down and interpolates back up (bottom-up top-down, with skip connections) and ends in
two 1x1 convs and a sigmoid; it outputs (1 + M(x)) * T(x), "attention residual learning", so a
mask near zero keeps the trunk's features instead of erasing them.

attention56 and attention92 are the paper's ImageNet nets (Table 2). With stem=auto they adapt to
CIFAR-sized inputs (<= 64 px) as the ResNets do: a 3x3/1 stem without max-pool, so the four stages run
at 32/16/8/4 px instead of 56/28/14/7 and every mask keeps its number of down-sampling levels.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resnet_cli.models.layers import make_shortcut, resolve_stem, stem_conv
from resnet_cli.models.registry import register_model
from resnet_cli.models.resnet import PreActBottleneck, init_weights


def _unit(inplanes: int, out_planes: int, stride: int = 1) -> PreActBottleneck:
    """The paper's residual unit: a pre-activation bottleneck (a projection shortcut where the shape changes)."""
    downsample = None
    if stride != 1 or inplanes != out_planes:
        downsample = make_shortcut("projection", inplanes, out_planes, stride, norm=False)
    return PreActBottleneck(inplanes, out_planes // PreActBottleneck.expansion, stride, downsample)


def _units(channels: int, n: int) -> nn.Sequential:
    return nn.Sequential(*(_unit(channels, channels) for _ in range(n)))


class AttentionModule(nn.Module):
    """One attention module with hyper-parameters p=1, t=2, r=1 (Wang et al. 2017, sec. 4).

    Args:
        channels: input and output channels.
        levels: max-pool steps of the soft-mask branch (3, 2, 1 in stages 1, 2, 3); a skip connection
            joins the two paths at every level but the deepest.
    """

    def __init__(self, channels: int, levels: int, p: int = 1, t: int = 2, r: int = 1) -> None:
        super().__init__()
        self.pre = _units(channels, p)
        self.trunk = _units(channels, t)
        # The deepest level gets 2r units: r on the way down, r on the way up.
        self.down = nn.ModuleList(_units(channels, r if i < levels - 1 else 2 * r) for i in range(levels))
        self.skips = nn.ModuleList(_unit(channels, channels) for _ in range(levels - 1))
        self.up = nn.ModuleList(_units(channels, r) for _ in range(levels - 1))
        self.mask = nn.Sequential(
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels), nn.ReLU(inplace=True), nn.Conv2d(channels, channels, 1, bias=False),
            nn.Sigmoid(),
        )
        self.post = _units(channels, p)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pre(x)
        trunk = self.trunk(x)
        m, skips = x, []
        for i, down in enumerate(self.down):
            m = down(F.max_pool2d(m, 3, stride=2, padding=1))
            if i < len(self.skips):
                skips.append(self.skips[i](m))
        for up, skip in zip(reversed(self.up), reversed(skips)):
            m = up(F.interpolate(m, size=skip.shape[-2:], mode="bilinear", align_corners=False) + skip)
        # The top of the mask path adds the trunk's output, as in the authors' released network.
        m = F.interpolate(m, size=trunk.shape[-2:], mode="bilinear", align_corners=False) + trunk
        return self.post((1 + self.mask(m)) * trunk)


class ResidualAttentionNet(nn.Module):
    """Stem, three stages of a residual unit plus attention modules, a fourth stage of three units, `fc`.

    Args:
        modules_per_stage: attention modules in stages 1-3: (1, 1, 1) is Attention-56, (1, 2, 3) Attention-92.
        num_classes: outputs of `fc`.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "cifar" (3x3/1 conv) or "auto" (cifar when
            image_size <= 64).
        image_size: input side in pixels; only read to resolve stem="auto".
        in_channels: channels of the input images.
        drop_rate: dropout probability before `fc`.
        widths: stem width, then the output channels of stages 1-4 (a stage's units are bottlenecks
            of a quarter of that width); the CIFAR nets use the ResNet-164 widths.
    """

    def __init__(
        self,
        modules_per_stage: Sequence[int],
        num_classes: int = 1000,
        *,
        stem: str = "auto",
        image_size: int = 224,
        in_channels: int = 3,
        drop_rate: float = 0.0,
        widths: Sequence[int] = (64, 256, 512, 1024, 2048),
        levels: Sequence[int] = (3, 2, 1),
        last_stride: int = 2,
    ) -> None:
        super().__init__()
        stem = resolve_stem(stem, image_size)
        self.conv1 = stem_conv(stem, in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        inplanes = widths[0]
        for i, (channels, count, depth) in enumerate(zip(widths[1:4], modules_per_stage, levels)):
            unit = _unit(inplanes, channels, stride=1 if i == 0 else 2)
            attention = [AttentionModule(channels, levels=depth) for _ in range(count)]
            self.add_module(f"layer{i + 1}", nn.Sequential(unit, *attention))
            inplanes = channels
        last = widths[4]
        self.layer4 = nn.Sequential(_unit(inplanes, last, stride=last_stride), _unit(last, last), _unit(last, last))
        self.final_act = nn.Sequential(nn.BatchNorm2d(last), nn.ReLU(inplace=True))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.final_act(self.layer4(self.layer3(self.layer2(self.layer1(x)))))
        return self.fc(self.dropout(torch.flatten(self.avgpool(x), 1)))


_attention = register_model(family="Residual Attention", paper="Wang et al. 2017, arXiv:1704.06904")


@_attention
def attention56(**kwargs: Any) -> ResidualAttentionNet:
    """Attention-56: one attention module per stage."""
    return ResidualAttentionNet((1, 1, 1), **kwargs)


@_attention
def attention92(**kwargs: Any) -> ResidualAttentionNet:
    """Attention-92: one, two and three attention modules in stages 1-3."""
    return ResidualAttentionNet((1, 2, 3), **kwargs)


# The paper's CIFAR nets (sec. 4.1, Table 5) run at 32 px on the ResNet-164 widths: a 16-channel 3x3
# stem and stages of 64/128/256 channels at 32/16/8 px, the last three units staying at 8 px. Masks
# pool down to 8 px at most (two levels, one, none); with that, Attention-92 has the paper's 1.9M
# parameters, which pins the layout the text leaves open.
_CIFAR = {"stem": "cifar", "widths": (16, 64, 128, 256, 256), "levels": (2, 1, 0), "last_stride": 1}
_attention_cifar = register_model(family="CIFAR Residual Attention", paper="Wang et al. 2017, arXiv:1704.06904")


@_attention_cifar
def attention56_cifar(**kwargs: Any) -> ResidualAttentionNet:
    """Attention-56 for 32 px inputs (Wang et al. 2017, CIFAR layout)."""
    return ResidualAttentionNet((1, 1, 1), **{**_CIFAR, **kwargs})


@_attention_cifar
def attention92_cifar(**kwargs: Any) -> ResidualAttentionNet:
    """Attention-92 for 32 px inputs (Wang et al. 2017, Table 5: 1.9M parameters)."""
    return ResidualAttentionNet((1, 2, 3), **{**_CIFAR, **kwargs})
