"""VarGNetV2 (Horizon Robotics; Zhang et al., "VarGNet: Variable Group Convolutional Neural
Network for Efficient Embedded Computing", 2019, and its v2 as shipped in the vendor's training
samples), as plain PyTorch code.

A VarG block replaces depthwise conv by *variable group* conv: a kxk group conv with a fixed
number of channels per group (``group_base``, 8 here) that also widens the channels by
``factor``, followed by a 1x1 conv. Two such separable pairs make a block, with a residual; the
first block of a stage runs a second "merge" branch in parallel and projects the shortcut.

Layout (strides 2..32): a 3x3/2 conv (BN, no activation), then four stages of 1, 3, 7, 4
blocks with 32, 64, 128, 256 channels times ``alpha``. The classifier top is a 1x1 conv to 1024,
7x7 average pool and a 1x1 conv (with BN) to the classes.

Variants (``VARIANTS``): ``1.0x`` is the standard ImageNet network. ``g8g8_0.5x`` and
``g8g4_0.5x`` are the backbones of the source document 001's resize and crop multi-task models
(``vargnet_v2_g8g8_0_5x`` / ``vargnet_v2_g8g4_0_5x``): alpha 0.5, group base 8, and an
*upscale* group base of 8 or 4. The document only names the upscale group base; we read it as
the group base of the VarG blocks in the upscaling (top-down) neck that feeds the task heads
(:class:`UpscaleNeck`), so the two 0.5x classification networks are identical and differ only
inside ``multitask_resize``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_bn


@dataclass(frozen=True)
class VarGNetConfig:
    """Width multiplier, group base of the backbone blocks, group base of the upscale neck."""

    alpha: float = 1.0
    group_base: int = 8
    upscale_group_base: int = 8
    factor: int = 2


VARIANTS = {
    "1.0x": VarGNetConfig(1.0, 8, 8),
    "g8g8_0.5x": VarGNetConfig(0.5, 8, 8),
    "g8g4_0.5x": VarGNetConfig(0.5, 8, 4),
}

_CHANNELS = (32, 32, 64, 128, 256)  # stem, then stages at strides 4, 8, 16, 32
_UNITS = (1, 3, 7, 4)


def var_group_conv(cin: int, cout: int, stride: int, factor: int, group_base: int,
                   relu_mid: bool = True) -> nn.Sequential:
    """3x3 group conv (``cin / group_base`` groups) widening to ``cin * factor``, BN(-ReLU),
    then 1x1 conv to ``cout``, BN."""
    mid = cin * factor
    return nn.Sequential(
        conv_bn(cin, mid, 3, stride, groups=max(1, cin // group_base), bias=True,
                act=nn.ReLU if relu_mid else None),
        conv_bn(mid, cout, 1, bias=True, act=None),
    )


class VarGBlock(nn.Module):
    """Two variable-group separable convs with a residual; the optional merge branch (first
    block of a stage) adds a parallel separable conv before the first ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, factor: int, group_base: int,
                 merge_branch: bool = False) -> None:
        super().__init__()
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = var_group_conv(cin, cout, stride, factor, group_base)
        self.body_conv = (var_group_conv(cin, cout, stride, factor, group_base)
                          if merge_branch else None)
        self.conv = var_group_conv(cin, cout, stride, factor, group_base)
        self.merge_act = nn.ReLU(inplace=True)
        self.out_conv = var_group_conv(cout, cout, 1, factor, group_base)
        self.out_act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.conv(x)
        if self.body_conv is not None:
            y = y + self.body_conv(x)
        y = self.out_conv(self.merge_act(y))
        return self.out_act(y + identity)


class VarGNetV2Backbone(nn.Module):
    """The stem and four stages; returns the feature maps at strides 2, 4, 8, 16, 32."""

    def __init__(self, config: VarGNetConfig = VARIANTS["1.0x"], in_channels: int = 3) -> None:
        super().__init__()
        ch = [int(c * config.alpha) for c in _CHANNELS]
        self.channels = ch
        self.mod1 = conv_bn(in_channels, ch[0], 3, 2, bias=True, act=None)
        # stage 1 widens by 8 // group_base (1 for group base 8), later stages by `factor`
        factors = (8 // config.group_base, config.factor, config.factor, config.factor)
        stages = []
        for i, (units, factor) in enumerate(zip(_UNITS, factors, strict=True)):
            blocks = [VarGBlock(ch[i] if j == 0 else ch[i + 1], ch[i + 1], 2 if j == 0 else 1,
                                factor, config.group_base, merge_branch=(j == 0 and i > 0))
                      for j in range(units)]
            stages.append(nn.Sequential(*blocks))
        self.mod2, self.mod3, self.mod4, self.mod5 = stages

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for mod in (self.mod1, self.mod2, self.mod3, self.mod4, self.mod5):
            x = mod(x)
            outs.append(x)
        return outs


class VarGNetV2(nn.Module):
    """VarGNetV2 ImageNet classifier: backbone, 1x1 conv to max(1024, 1024 * alpha), 7x7
    average pool, 1x1 conv + BN to the classes, flattened."""

    def __init__(self, variant: str = "1.0x", num_classes: int = 1000) -> None:
        super().__init__()
        config = VARIANTS[variant]
        self.backbone = VarGNetV2Backbone(config)
        top = max(int(1024 * config.alpha), 1024)
        self.num_classes = num_classes
        self.output = nn.Sequential(
            conv_bn(self.backbone.channels[-1], top, 1, bias=True),
            nn.AvgPool2d(7),
            conv_bn(top, num_classes, 1, bias=True, act=None),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.output(self.backbone(x)[-1]), 1)


class UpscaleNeck(nn.Module):
    """Top-down neck on the backbone's stride 8/16/32 maps: the coarser map is projected by a
    1x1 conv, upsampled x2 (nearest) and added to the finer one, and each sum is refined by a
    VarG block with the *upscale* group base. Returns the maps at strides 8, 16, 32."""

    def __init__(self, channels: list[int], config: VarGNetConfig) -> None:
        super().__init__()
        c8, c16, c32 = channels[2], channels[3], channels[4]
        g = config.upscale_group_base
        self.lateral32 = conv_bn(c32, c16, 1, bias=True, act=None)
        self.fuse16 = VarGBlock(c16, c16, 1, config.factor, g)
        self.lateral16 = conv_bn(c16, c8, 1, bias=True, act=None)
        self.fuse8 = VarGBlock(c8, c8, 1, config.factor, g)
        self.out_channels = (c8, c16, c32)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        c8, c16, c32 = feats[2], feats[3], feats[4]
        p16 = self.fuse16(c16 + F.interpolate(self.lateral32(c32), scale_factor=2.0))
        p8 = self.fuse8(c8 + F.interpolate(self.lateral16(p16), scale_factor=2.0))
        return [p8, p16, c32]


def vargnet_v2(variant: str = "1.0x", num_classes: int = 1000) -> VarGNetV2:
    """VarGNetV2 classifier; ``variant`` one of ``VARIANTS``."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown VarGNetV2 variant '{variant}'; known: {', '.join(VARIANTS)}")
    return VarGNetV2(variant, num_classes)
