"""Small pieces the model files share: convolutions, stems, shortcuts, channel attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEMS = ("auto", "imagenet", "cifar")
CIFAR_MAX_IMAGE_SIZE = 64


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BatchNorm follows)."""
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, groups=groups, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias."""
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


def conv_bn_relu(in_planes: int, out_planes: int) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU: the unit of ResNet-9."""
    return nn.Sequential(conv3x3(in_planes, out_planes), nn.BatchNorm2d(out_planes), nn.ReLU(inplace=True))


def resolve_stem(stem: str, image_size: int) -> str:
    """Turn stem 'auto' into 'cifar' for small images (<= 64 px) and 'imagenet' otherwise."""
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")
    if stem == "auto":
        return "cifar" if image_size <= CIFAR_MAX_IMAGE_SIZE else "imagenet"
    return stem


def stem_conv(stem: str, in_channels: int, width: int, deep: bool = False) -> nn.Module:
    """The first convolution: 7x7/2 (ImageNet), three 3x3 with the first at stride 2 (deep), or 3x3/1 (CIFAR)."""
    if stem == "cifar":
        # Small images cannot afford the 4x reduction of the ImageNet stem (He et al. 2015, sec. 4.2).
        return conv3x3(in_channels, width)
    if deep:
        # ResNet-C of He et al. 2019 ("Bag of Tricks"), the stem of ResNeSt: same receptive field, cheaper.
        half = width // 2
        return nn.Sequential(
            conv3x3(in_channels, half, stride=2), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            conv3x3(half, half), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            conv3x3(half, width),
        )
    return nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)


class PadShortcut(nn.Module):
    """Parameter-free shortcut: subsample spatially, zero-pad the new channels (option A, He et al. 2015)."""

    def __init__(self, out_planes: int, stride: int) -> None:
        super().__init__()
        self.out_planes = out_planes
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.out_planes - x.shape[1]))


def make_shortcut(
    kind: str, in_planes: int, out_planes: int, stride: int, kernel: int = 1, norm: bool = True
) -> nn.Module | None:
    """The shortcut of a block whose shape changes; None where the block has none (plain nets).

    Args:
        kind: "projection" (conv + BN, option B of He et al. 2015), "pad" (option A), "avg" (average
            pool then 1x1 conv + BN, ResNet-D of He et al. 2019), or "none".
        kernel: kernel size of the projection conv.
        norm: add the BatchNorm after the conv (pre-activation blocks project an already normalized input).
    """
    if kind == "none":
        return None
    if kind == "pad":
        return PadShortcut(out_planes, stride)
    bn = [nn.BatchNorm2d(out_planes)] if norm else []
    if kind == "projection":
        conv = nn.Conv2d(in_planes, out_planes, kernel, stride=stride, padding=kernel // 2, bias=False)
        return nn.Sequential(conv, *bn)
    if kind == "avg":
        # Pooling before a stride-1 1x1 conv reads every input pixel; a strided 1x1 conv drops 3/4 of them.
        pool = nn.AvgPool2d(stride, stride, ceil_mode=True, count_include_pad=False) if stride > 1 else nn.Identity()
        return nn.Sequential(pool, conv1x1(in_planes, out_planes), *bn)
    raise ValueError(f"shortcut must be projection, pad, avg or none, got {kind!r}")


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): global pool, FC down by `reduction`, ReLU, FC up, sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.relu(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


ATTENTION_LAYERS: dict[str, type[nn.Module]] = {"se": SqueezeExcite}


def make_attn(name: str | None, channels: int) -> nn.Module:
    """Channel attention for a residual branch by name (None: identity)."""
    if name is None:
        return nn.Identity()
    if name not in ATTENTION_LAYERS:
        raise ValueError(f"attn must be one of {sorted(ATTENTION_LAYERS)} or None, got {name!r}")
    return ATTENTION_LAYERS[name](channels)
