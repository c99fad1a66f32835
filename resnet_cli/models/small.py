"""The small tutorial nets: ResNet-9 (recipe R2, docs/presets.md) and the plain two-layer CNN baseline."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from resnet_cli.models.layers import conv_bn_relu
from resnet_cli.models.registry import register_model


class ResidualPair(nn.Module):
    """Two conv-BN-ReLU units around an identity: block(x) + x."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def zero_init_last(self) -> None:
        # The pair then starts as the identity (the ReLU after a zeroed BN outputs 0).
        nn.init.zeros_(self.block[1][1].weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x) + x


class ResNet9(nn.Module):
    """ResNet-9 (Page 2018, DAWNBench): prep 64, 128 + pool, residual 128, 256 + pool, 512 + pool, residual 512.

    Args:
        num_classes: outputs of `fc`.
        image_size: accepted like every builder's; not read (the final pool adapts to the input).
        in_channels: channels of the input images.
        zero_init_residual: start each residual pair as the identity.
        drop_rate: dropout probability before `fc`.
    """

    def __init__(self, num_classes: int = 10, *, image_size: int = 32, in_channels: int = 3,
                 zero_init_residual: bool = False, drop_rate: float = 0.0) -> None:
        super().__init__()
        self.prep = conv_bn_relu(in_channels, 64)
        self.layer1 = nn.Sequential(conv_bn_relu(64, 128), nn.MaxPool2d(2))
        self.res1 = ResidualPair(128)
        self.layer2 = nn.Sequential(conv_bn_relu(128, 256), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(conv_bn_relu(256, 512), nn.MaxPool2d(2))
        self.res2 = ResidualPair(512)
        # MaxPool2d(4) of the 4x4 map at 32 px; adaptive so that 16 px (2x2) or 64 px inputs work too.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(512, num_classes)
        if zero_init_residual:
            self.res1.zero_init_last()
            self.res2.zero_init_last()

    def forward(self, x: Tensor) -> Tensor:
        x = self.res2(self.layer3(self.layer2(self.res1(self.layer1(self.prep(x))))))
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))


class SimpleCNN(nn.Module):
    """The plain CNN of the tutorials: conv-ReLU-maxpool 3->32->64, then FC 4096->512->num_classes.

    Args:
        num_classes: outputs of `fc`.
        image_size: accepted like every builder's; not read (the pool before the FC layers adapts).
        in_channels: channels of the input images.
        drop_rate: dropout probability before `fc`.
    """

    def __init__(self, num_classes: int = 10, *, image_size: int = 32, in_channels: int = 3,
                 drop_rate: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        self.conv2 = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2))
        # 64 x 8 x 8 = 4096 features at 32 px, as in the tutorial; the adaptive pool is the identity there
        # and keeps the FC layer's size at any other input size.
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.fc1 = nn.Sequential(nn.Linear(64 * 8 * 8, 512), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.pool(self.conv2(self.conv1(x))), 1)
        return self.fc(self.dropout(self.fc1(x)))


@register_model(family="ResNet-9", paper="Page 2018, DAWNBench (myrtle.ai)")
def resnet9(**kwargs: Any) -> ResNet9:
    """ResNet-9 for CIFAR-sized inputs (recipe R2, docs/presets.md)."""
    return ResNet9(**kwargs)


@register_model(family="plain CNN", paper="the PyTorch CIFAR-10 tutorial's baseline")
def simple_cnn(**kwargs: Any) -> SimpleCNN:
    """Two conv-ReLU-maxpool layers and two FC layers: the no-shortcut, shallow baseline."""
    return SimpleCNN(**kwargs)
