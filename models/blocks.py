"""Small building blocks shared by the zoo models: a conv-BN-activation stack (HAT's
``ConvModule2d``), a depthwise-separable conv, and the ResNet basic block used by StereoNet.

Plain PyTorch modules built from ``nn.Sequential`` where possible, so module paths stay short and
readable in the imported graph (``backbone.mod3.0.conv.0.0`` is conv, ``...0.1`` its BN).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

#: an activation factory, e.g. ``nn.ReLU``; None for no activation
Act = Callable[[], nn.Module] | None


def conv_bn(cin: int, cout: int, k: int = 1, stride: int = 1, *, groups: int = 1,
            padding: int | None = None, dilation: int = 1, bias: bool = False,
            act: Act = nn.ReLU, bn: bool = True) -> nn.Sequential:
    """Conv2d, BatchNorm2d, optional activation; 'same' padding for odd kernels by default."""
    pad = dilation * (k - 1) // 2 if padding is None else padding
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, pad, dilation, groups, bias)]
    if bn:
        layers.append(nn.BatchNorm2d(cout))
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def separable_conv(cin: int, cout: int, k: int = 3, stride: int = 1, *, dw_act: Act = None,
                   pw_act: Act = None, bias: bool = False) -> nn.Sequential:
    """Depthwise kxk conv-BN(-act), then pointwise 1x1 conv-BN(-act)."""
    return nn.Sequential(conv_bn(cin, cin, k, stride, groups=cin, bias=bias, act=dw_act),
                         conv_bn(cin, cout, 1, bias=bias, act=pw_act))


class BasicResBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, 1x1 projection shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, bias: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(conv_bn(cin, cout, 3, stride, bias=bias),
                                  conv_bn(cout, cout, 3, bias=bias, act=None))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn(cin, cout, 1, stride, bias=bias, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(self.conv(x) + identity)


def example_image(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A reproducible standard-normal tensor of ``shape`` (the zoo's example inputs)."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
