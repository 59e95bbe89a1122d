"""EfficientNet-B0 and -B2 (Tan and Le, "EfficientNet: Rethinking Model Scaling for
Convolutional Neural Networks", ICML 2019): MBConv blocks with squeeze-excite and SiLU, the
B0 stage table of the paper scaled by width/depth multipliers, as plain PyTorch code.

The same network serves as the feature extractor of the BEV model (``bev_ipm.py``), configured
as the source document 004 does: ReLU instead of SiLU, no squeeze-excite, no classifier
(``features_only=True`` returns the stride 2, 4, 8, 16, 32 feature maps).

Published figures at 224x224: B0 0.39 GMACs, 5.3 M parameters; B2 at its native 260x260 about
1.0 GMACs and 9.1 M parameters (about 0.7 GMACs at 224x224, the zoo's default size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .blocks import Act, conv_bn


@dataclass(frozen=True)
class StageConfig:
    """One row of the B0 table: MBConv expansion, kernel, first stride, output channels,
    repeats."""

    expand: int
    kernel: int
    stride: int
    channels: int
    repeats: int


# The paper's Table 1 (stages 2-8); the stem is a 3x3/2 conv to 32 channels.
B0_STAGES = (
    StageConfig(1, 3, 1, 16, 1), StageConfig(6, 3, 2, 24, 2), StageConfig(6, 5, 2, 40, 2),
    StageConfig(6, 3, 2, 80, 3), StageConfig(6, 5, 1, 112, 3), StageConfig(6, 5, 2, 192, 4),
    StageConfig(6, 3, 1, 320, 1),
)

#: (width multiplier, depth multiplier, native resolution, dropout) per variant
VARIANTS = {"b0": (1.0, 1.0, 224, 0.2), "b1": (1.0, 1.1, 240, 0.2), "b2": (1.1, 1.2, 260, 0.3),
            "b3": (1.2, 1.4, 300, 0.3)}


def round_channels(channels: float, width: float, divisor: int = 8) -> int:
    """Scale ``channels`` by ``width`` and round to a multiple of ``divisor`` (never down by
    more than 10%), as the reference implementation does."""
    c = channels * width
    new = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * c else new


class SqueezeExcite(nn.Module):
    """Global pool, 1x1 reduce, activation, 1x1 expand, sigmoid, channel-wise scale."""

    def __init__(self, channels: int, reduced: int, act: Act) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = act()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (if expand > 1), kxk depthwise, squeeze-excite (ratio 0.25
    of the block's input channels), linear 1x1 projection; identity shortcut when shapes allow
    (stochastic depth is training-only and omitted)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int, act: Act,
                 se: bool) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(conv_bn(cin, hidden, 1, act=act))
        layers.append(conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if se:
            layers.append(SqueezeExcite(hidden, max(1, cin // 4), act))
        layers.append(conv_bn(hidden, cout, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNet(nn.Module):
    """Stem, seven MBConv stages, 1x1 head conv, global pool, classifier.

    ``features_only``: drop the head and return the last feature map of each resolution
    (strides 2, 4, 8, 16, 32) as a list.
    """

    def __init__(self, variant: str = "b0", num_classes: int = 1000, *, in_channels: int = 3,
                 act: Act = nn.SiLU, se: bool = True, features_only: bool = False) -> None:
        super().__init__()
        width, depth, _, dropout = VARIANTS[variant]
        self.features_only = features_only
        stem = round_channels(32, width)
        self.stem = conv_bn(in_channels, stem, 3, 2, act=act)
        stages: list[nn.Module] = []
        #: indexes of the stages whose output ends a resolution (the feature outputs)
        self.feature_stages: list[int] = []
        self.feature_channels: list[int] = []
        cin = stem
        for i, st in enumerate(B0_STAGES):
            cout = round_channels(st.channels, width)
            blocks = [MBConv(cin if j == 0 else cout, cout, st.kernel, st.stride if j == 0 else 1,
                             st.expand, act, se)
                      for j in range(int(math.ceil(st.repeats * depth)))]
            stages.append(nn.Sequential(*blocks))
            cin = cout
            if i + 1 == len(B0_STAGES) or B0_STAGES[i + 1].stride == 2:
                self.feature_stages.append(i)
                self.feature_channels.append(cout)
        self.stages = nn.Sequential(*stages)
        if not features_only:
            head = round_channels(1280, width)
            self.head = conv_bn(cin, head, 1, act=act)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(head, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.feature_stages:
                feats.append(x)
        if self.features_only:
            return feats
        return self.classifier(torch.flatten(self.pool(self.head(x)), 1))


def efficientnet_b0(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0: about 0.39 GMACs and 5.3 M parameters at 224x224."""
    return EfficientNet("b0", num_classes)


def efficientnet_b2(num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B2 (width 1.1, depth 1.2): about 1.0 GMACs at its native 260x260."""
    return EfficientNet("b2", num_classes)
