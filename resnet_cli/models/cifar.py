"""The CIFAR nets of the papers: He et al. 2015 sec. 4.2 (residual and plain), He et al. 2016 (pre-activation).

All are the one trunk with three stages of 16/32/64 planes on 32x32 inputs and the CIFAR stem. They
keep that stem at any image size (image_size is accepted for a uniform config, not read).
"""

from __future__ import annotations

from typing import Any

from resnet_cli.models.layers import resolve_stem
from resnet_cli.models.registry import register_model
from resnet_cli.models.resnet import BasicBlock, PreActBasicBlock, PreActBottleneck, ResNet, _Block

CIFAR_WIDTHS = (16, 32, 64)


def _cifar(block: type[_Block], blocks_per_stage: int, kwargs: dict[str, Any], **defining: Any) -> ResNet:
    # `defining` (the shortcut kind) is the variant's own; a config may override it like any other keyword.
    options = {**defining, **kwargs}
    resolve_stem("auto", options.pop("image_size", 32))  # same validation as every builder; the stem stays "cifar"
    return ResNet(block, [blocks_per_stage] * 3, widths=CIFAR_WIDTHS, stem="cifar", **options)


# He et al. 2015 sec. 4.2: 6n+2 layers. Table 6 uses identity shortcuts everywhere, zero-padding the
# new channels where the width doubles (option A): the residual nets have exactly the plain nets' parameters.
_resnet = register_model(family="CIFAR ResNet", paper="He et al. 2015 sec. 4.2, arXiv:1512.03385")
_plain = register_model(family="CIFAR plain net", paper="He et al. 2015 sec. 4.2, arXiv:1512.03385")
_preact = register_model(family="CIFAR pre-act ResNet", paper="He et al. 2016, arXiv:1603.05027")


@_resnet
def resnet20(**kwargs: Any) -> ResNet:
    """ResNet-20 for CIFAR (n=3), option-A shortcuts."""
    return _cifar(BasicBlock, 3, kwargs, shortcut="pad")


@_resnet
def resnet32(**kwargs: Any) -> ResNet:
    """ResNet-32 for CIFAR (n=5)."""
    return _cifar(BasicBlock, 5, kwargs, shortcut="pad")


@_resnet
def resnet44(**kwargs: Any) -> ResNet:
    """ResNet-44 for CIFAR (n=7)."""
    return _cifar(BasicBlock, 7, kwargs, shortcut="pad")


@_resnet
def resnet56(**kwargs: Any) -> ResNet:
    """ResNet-56 for CIFAR (n=9)."""
    return _cifar(BasicBlock, 9, kwargs, shortcut="pad")


@_resnet
def resnet110(**kwargs: Any) -> ResNet:
    """ResNet-110 for CIFAR (n=18)."""
    return _cifar(BasicBlock, 18, kwargs, shortcut="pad")


@_plain
def plain20(**kwargs: Any) -> ResNet:
    """Plain-20: ResNet-20 without shortcuts, the degradation experiment's baseline (Fig. 6)."""
    return _cifar(BasicBlock, 3, kwargs, shortcut="none")


@_plain
def plain32(**kwargs: Any) -> ResNet:
    """Plain-32."""
    return _cifar(BasicBlock, 5, kwargs, shortcut="none")


@_plain
def plain44(**kwargs: Any) -> ResNet:
    """Plain-44."""
    return _cifar(BasicBlock, 7, kwargs, shortcut="none")


@_plain
def plain56(**kwargs: Any) -> ResNet:
    """Plain-56."""
    return _cifar(BasicBlock, 9, kwargs, shortcut="none")


@_plain
def plain110(**kwargs: Any) -> ResNet:
    """Plain-110."""
    return _cifar(BasicBlock, 18, kwargs, shortcut="none")


# He et al. 2016 Table 2/3: 1x1 projection shortcuts where the width changes.


@_preact
def preact_resnet110(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-110 for CIFAR (basic blocks, n=18)."""
    return _cifar(PreActBasicBlock, 18, kwargs)


@_preact
def preact_resnet164(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-164 for CIFAR (bottlenecks, 9n+2 layers, n=18)."""
    return _cifar(PreActBottleneck, 18, kwargs)


@_preact
def preact_resnet1001(**kwargs: Any) -> ResNet:
    """Pre-activation ResNet-1001 for CIFAR (bottlenecks, n=111)."""
    return _cifar(PreActBottleneck, 111, kwargs)
