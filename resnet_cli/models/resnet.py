"""The one ResNet trunk and its ImageNet-style variants (ResNet, ResNeXt, wide, SE, pre-activation).

Reads bottom-up like torchvision's resnet.py: blocks, the trunk, then the registered builders.
Module names match torchvision's so its ImageNet weights load unchanged.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from resnet_cli.models.layers import conv1x1, conv3x3, make_attn, make_shortcut, resolve_stem, stem_conv
from resnet_cli.models.registry import register_model


class _Block(nn.Module):
    """What every residual block shares: its shortcut, the plain-net switch and the attention slot."""

    expansion = 1
    preact = False

    def __init__(self, downsample: nn.Module | None, residual: bool, attn: str | None, channels: int) -> None:
        super().__init__()
        self.downsample = downsample
        self.residual = residual
        self.attn = make_attn(attn, channels)

    def _add_shortcut(self, out: Tensor, x: Tensor) -> Tensor:
        # Channel attention scales the residual branch only, before the addition (Hu et al. 2018, Fig. 3).
        out = self.attn(out)
        if not self.residual:
            return out
        return out + (x if self.downsample is None else self.downsample(x))


class BasicBlock(_Block):
    """Two 3x3 convs (He et al. 2015, Fig. 5 left)."""

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
    ) -> None:
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock supports only groups=1 and width_per_group=64")
        super().__init__(downsample, residual, attn, planes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self._add_shortcut(self.bn2(self.conv2(out)), x))


class Bottleneck(_Block):
    """1x1 reduce, 3x3, 1x1 expand (He et al. 2015, Fig. 5 right); groups/width give ResNeXt and wide ResNets."""

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
    ) -> None:
        super().__init__(downsample, residual, attn, planes * self.expansion)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = nn.BatchNorm2d(width)
        # Stride sits on the 3x3 conv ("ResNet v1.5", as torchvision): a strided 1x1 conv, as in the paper,
        # ignores 3/4 of its input. It costs ~8% more MACs for ResNet-50 (4.1 vs 3.8 G) and adds ~0.5% top-1.
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self._add_shortcut(self.bn3(self.conv3(out)), x))


# Pre-activation blocks (He et al. 2016, Fig. 4e): BN-ReLU before each conv and nothing after the
# addition, so the identity path from block to block is clean. They are separate classes only because
# the order of operations differs; a projection shortcut reads the pre-activated input, as in the paper.


class PreActBasicBlock(_Block):
    """Pre-activation basic block: BN-ReLU-conv3x3 twice."""

    preact = True

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
    ) -> None:
        if groups != 1 or base_width != 64:
            raise ValueError("PreActBasicBlock supports only groups=1 and width_per_group=64")
        super().__init__(downsample, residual, attn, planes)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.stride = stride

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        return self._add_shortcut(out, x if self.downsample is None else pre)


class PreActBottleneck(_Block):
    """Pre-activation bottleneck: BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1."""

    expansion = 4
    preact = True

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
    ) -> None:
        super().__init__(downsample, residual, attn, planes * self.expansion)
        width = int(planes * (base_width / 64.0)) * groups
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.stride = stride

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv2(self.relu(self.bn2(self.conv1(pre))))
        out = self.conv3(self.relu(self.bn3(out)))
        return self._add_shortcut(out, x if self.downsample is None else pre)


def init_weights(module: nn.Module, zero_init_residual: bool = False) -> None:
    """He-normal convs (fan_out), unit BatchNorms; optionally zero each residual branch's last layer."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        # Every block then starts as the identity, which helps large-batch training (Goyal et al. 2017).
        # A plain block has no identity to fall back on, so it keeps its weights.
        for m in module.modules():
            if isinstance(m, _Block) and m.residual and hasattr(m, "zero_init_last"):
                m.zero_init_last()


class ResNet(nn.Module):
    """The trunk: stem, stages of blocks, global average pool, dropout, `fc`.

    Args:
        block: the block class (BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, ...).
        layers: blocks per stage; the first stage runs at stride 1, every later one starts at stride 2.
        num_classes: outputs of `fc`.
        widths: planes per stage (a stage outputs planes * block.expansion channels); widths[0] is
            also the stem width.
        stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool), "cifar" (3x3/1 conv, no pool) or "auto"
            (cifar when image_size <= 64).
        image_size: input side in pixels; only read to resolve stem="auto".
        deep_stem: three 3x3 convs instead of the 7x7 one in the ImageNet stem (ResNet-C).
        in_channels: channels of the input images.
        groups: cardinality of the grouped 3x3 conv (ResNeXt, Xie et al. 2017).
        width_per_group: bottleneck width per group; 128 with groups=1 gives the wide ResNets.
        attn: channel attention on each residual branch: None or "se" (squeeze-excitation).
        shortcut: "projection" (option B), "pad" (option A), "avg" (ResNet-D) or "none" (plain net).
        shortcut_kernel: kernel of a projection shortcut (1; the R1 tutorial used 3).
        zero_init_residual: start each residual branch at zero so every block begins as the identity.
        drop_rate: dropout probability before `fc`.
        block_args: extra keyword arguments for every block (e.g. ResNeSt's radix).
    """

    def __init__(
        self,
        block: type[_Block],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "auto",
        image_size: int = 224,
        deep_stem: bool = False,
        in_channels: int = 3,
        groups: int = 1,
        width_per_group: int = 64,
        attn: str | None = None,
        shortcut: str = "projection",
        shortcut_kernel: int = 1,
        zero_init_residual: bool = False,
        drop_rate: float = 0.0,
        block_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        stem = resolve_stem(stem, image_size)
        self.inplanes = widths[0]
        self._shortcut = (shortcut, shortcut_kernel)
        self._block_args = dict(
            groups=groups, base_width=width_per_group, attn=attn, residual=shortcut != "none", **(block_args or {})
        )
        # A pre-activation trunk leaves the stem un-normalized: the first block normalizes its input.
        self.conv1 = stem_conv(stem, in_channels, widths[0], deep=deep_stem)
        self.bn1 = nn.Identity() if block.preact else nn.BatchNorm2d(widths[0])
        self.relu = nn.Identity() if block.preact else nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (name, planes, blocks) in enumerate(zip(self.stage_names, widths, layers)):
            self.add_module(name, self._make_layer(block, planes, blocks, stride=1 if i == 0 else 2))
        self.num_features = widths[len(layers) - 1] * block.expansion
        # ...and so it needs one last BN-ReLU before pooling (He et al. 2016, appendix).
        self.final_act = (
            nn.Sequential(nn.BatchNorm2d(self.num_features), nn.ReLU(inplace=True)) if block.preact else nn.Identity()
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        init_weights(self, zero_init_residual)

    def _make_layer(self, block: type[_Block], planes: int, blocks: int, stride: int) -> nn.Sequential:
        out_planes = planes * block.expansion
        downsample = None
        if stride != 1 or self.inplanes != out_planes:
            kind, kernel = self._shortcut
            downsample = make_shortcut(kind, self.inplanes, out_planes, stride, kernel, norm=not block.preact)
        layers = [block(self.inplanes, planes, stride, downsample, **self._block_args)]
        self.inplanes = out_planes
        layers += [block(self.inplanes, planes, **self._block_args) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> Tensor:
        """Feature map after the last stage (and the final BN-ReLU of pre-activation nets)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in self.stage_names:
            x = getattr(self, name)(x)
        return self.final_act(x)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.forward_features(x)), 1)
        return self.fc(self.dropout(x))


def variant(block: type[_Block], layers: Sequence[int], kwargs: dict[str, Any], **defining: Any) -> ResNet:
    """The trunk with a variant's defining keywords (groups, attn, ...), each of which a config may override."""
    return ResNet(block, layers, **{**defining, **kwargs})


_resnet = register_model(family="ResNet", paper="He et al. 2015, arXiv:1512.03385")
_resnext = register_model(family="ResNeXt", paper="Xie et al. 2017, arXiv:1611.05431")
_wide = register_model(family="Wide ResNet", paper="Zagoruyko & Komodakis 2016, arXiv:1605.07146")
_se = register_model(family="SE-ResNet", paper="Hu et al. 2018, arXiv:1709.01507")
_sex = register_model(family="SE-ResNeXt", paper="Hu et al. 2018, arXiv:1709.01507")
_preact = register_model(family="Pre-act ResNet", paper="He et al. 2016, arXiv:1603.05027")


@_resnet
def resnet18(**kwargs: Any) -> ResNet:
    """ResNet-18 (He et al. 2015, Table 1)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], **kwargs)


@_resnet
def resnet34(**kwargs: Any) -> ResNet:
    """ResNet-34."""
    return ResNet(BasicBlock, [3, 4, 6, 3], **kwargs)


@_resnet
def resnet50(**kwargs: Any) -> ResNet:
    """ResNet-50."""
    return ResNet(Bottleneck, [3, 4, 6, 3], **kwargs)


@_resnet
def resnet101(**kwargs: Any) -> ResNet:
    """ResNet-101."""
    return ResNet(Bottleneck, [3, 4, 23, 3], **kwargs)


@_resnet
def resnet152(**kwargs: Any) -> ResNet:
    """ResNet-152."""
    return ResNet(Bottleneck, [3, 8, 36, 3], **kwargs)


@_resnext
def resnext50_32x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-50 32x4d: cardinality 32, 4 channels per group."""
    return variant(Bottleneck, [3, 4, 6, 3], kwargs, groups=32, width_per_group=4)


@_resnext
def resnext101_32x8d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 32x8d."""
    return variant(Bottleneck, [3, 4, 23, 3], kwargs, groups=32, width_per_group=8)


@_resnext
def resnext101_64x4d(**kwargs: Any) -> ResNet:
    """ResNeXt-101 64x4d."""
    return variant(Bottleneck, [3, 4, 23, 3], kwargs, groups=64, width_per_group=4)


@_wide
def wide_resnet50_2(**kwargs: Any) -> ResNet:
    """Wide ResNet-50-2: bottlenecks twice as wide."""
    return variant(Bottleneck, [3, 4, 6, 3], kwargs, width_per_group=128)


@_wide
def wide_resnet101_2(**kwargs: Any) -> ResNet:
    """Wide ResNet-101-2."""
    return variant(Bottleneck, [3, 4, 23, 3], kwargs, width_per_group=128)


@_se
def seresnet18(**kwargs: Any) -> ResNet:
    """SE-ResNet-18: squeeze-excitation (reduction 16) on every residual branch."""
    return variant(BasicBlock, [2, 2, 2, 2], kwargs, attn="se")


@_se
def seresnet34(**kwargs: Any) -> ResNet:
    """SE-ResNet-34."""
    return variant(BasicBlock, [3, 4, 6, 3], kwargs, attn="se")


@_se
def seresnet50(**kwargs: Any) -> ResNet:
    """SE-ResNet-50."""
    return variant(Bottleneck, [3, 4, 6, 3], kwargs, attn="se")


@_se
def seresnet101(**kwargs: Any) -> ResNet:
    """SE-ResNet-101."""
    return variant(Bottleneck, [3, 4, 23, 3], kwargs, attn="se")


@_se
def seresnet152(**kwargs: Any) -> ResNet:
    """SE-ResNet-152."""
    return variant(Bottleneck, [3, 8, 36, 3], kwargs, attn="se")


@_sex
def seresnext50_32x4d(**kwargs: Any) -> ResNet:
    """SE-ResNeXt-50 32x4d."""
    return variant(Bottleneck, [3, 4, 6, 3], kwargs, groups=32, width_per_group=4, attn="se")


@_sex
def seresnext101_32x4d(**kwargs: Any) -> ResNet:
    """SE-ResNeXt-101 32x4d."""
    return variant(Bottleneck, [3, 4, 23, 3], kwargs, groups=32, width_per_group=4, attn="se")


@_preact
def preact_resnet18(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-18 ("ResNet v2")."""
    return ResNet(PreActBasicBlock, [2, 2, 2, 2], **kwargs)


@_preact
def preact_resnet34(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-34."""
    return ResNet(PreActBasicBlock, [3, 4, 6, 3], **kwargs)


@_preact
def preact_resnet50(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-50."""
    return ResNet(PreActBottleneck, [3, 4, 6, 3], **kwargs)


@_preact
def preact_resnet101(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-101."""
    return ResNet(PreActBottleneck, [3, 4, 23, 3], **kwargs)


@_preact
def preact_resnet152(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-152."""
    return ResNet(PreActBottleneck, [3, 8, 36, 3], **kwargs)
