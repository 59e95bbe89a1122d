"""MixVarGENet (Horizon Robotics' J5-oriented backbone; source document 002, "MixVarGENet
classification on ImageNet"), as plain PyTorch code.

Design, per the document: normal convs while channels are few, group convs (16 channels per
group) once they are many, widening inside each block (``factor``), and short feature-reuse
distances. The network is a 3x3/2 conv (BN, no activation) and five MixVarGE stages; each stage
is a head op (strided) plus stack ops, all of them ``BasicMixVarGEBlock``s::

    out = relu(BN(conv1x1(relu(BN(conv3x3(x)))))  + shortcut(x))      # 3x3 may be grouped

Optional per stage: *downsample layers* (3x3/2 conv-BN chains producing this stage's output at
2x, 4x, 8x coarser strides) and *fusion layers* (1x1 conv-BN of those downsampled maps, added to
a later stage's head block before its ReLU). The ImageNet configuration (``IMAGENET``, the
document's table: f2 | f4 + 2 f4 | f4 + 2 f4 | f2_gb16 + 6 f2_gb16 | f2_gb16 + 2 f2_gb16, with
32, 32, 64, 96, 160 channels) uses neither; ``IMAGENET_FUSION`` fuses strides 2/4/8 into the
stride 8/16/32 stages to exercise them. The top is a 1x1 conv to 1024, 7x7 average pool and a
1x1 conv (with BN) to the classes. The document reports 71.32% float / 70.66% fixed-point
top-1 and 5790 FPS on the dual-core J5 at 1x3x224x224.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import conv_bn

#: BasicMixVarGEBlock variants (document 002's BLOCK_CONFIG table): conv2 kernel, channel
#: factor, channels per group of the 3x3 conv (None: a normal conv)
BLOCK_CONFIG: dict[str, tuple[int, int, int | None]] = {
    "mixvarge_f2": (1, 2, None),
    "mixvarge_f4": (1, 4, None),
    "mixvarge_f2_gb16": (1, 2, 16),
    "mixvarge_f4_gb16": (1, 4, 16),
}


@dataclass(frozen=True)
class StageConfig:
    """One MixVarGE stage (the vendor's ``MixVarGENetConfig``)."""

    in_channels: int
    out_channels: int
    head_op: str
    stack_ops: tuple[str, ...]
    stride: int
    #: strides of earlier stages whose downsampled outputs are fused into this stage's head
    fusion_strides: tuple[int, ...] = field(default=())
    #: how many 3x3/2 downsample layers follow this stage (0..3)
    extra_downsample_num: int = 0


IMAGENET = (
    StageConfig(32, 32, "mixvarge_f2", (), 1),                               # stride 2
    StageConfig(32, 32, "mixvarge_f4", ("mixvarge_f4",) * 2, 2),             # stride 4
    StageConfig(32, 64, "mixvarge_f4", ("mixvarge_f4",) * 2, 2),             # stride 8
    StageConfig(64, 96, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",) * 6, 2),   # stride 16
    StageConfig(96, 160, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",) * 2, 2),  # stride 32
)

IMAGENET_FUSION = (
    StageConfig(32, 32, "mixvarge_f2", (), 1, (), 2),
    StageConfig(32, 32, "mixvarge_f4", ("mixvarge_f4",) * 2, 2, (), 2),
    StageConfig(32, 64, "mixvarge_f4", ("mixvarge_f4",) * 2, 2, (2,), 2),
    StageConfig(64, 96, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",) * 6, 2, (4, 8), 1),
    StageConfig(96, 160, "mixvarge_f2_gb16", ("mixvarge_f2_gb16",) * 2, 2, (8, 16)),
)

CONFIGS = {"imagenet": IMAGENET, "imagenet_fusion": IMAGENET_FUSION}


class BasicMixVarGEBlock(nn.Module):
    """3x3 conv widening to ``in * factor`` (grouped when ``group_base`` is set), BN, ReLU;
    1x1 conv back to ``out``, BN; plus a shortcut (1x1 strided conv-BN when the shape
    changes); ReLU. Fusion inputs, when given, go through 1x1 conv-BN and are added before
    the final ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, op: str, bias: bool = True,
                 fusion_channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        k2, factor, group_base = BLOCK_CONFIG[op]
        mid = cin * factor
        groups = 1 if group_base is None else cin // group_base
        self.conv = nn.Sequential(conv_bn(cin, mid, 3, stride, groups=groups, bias=bias),
                                  conv_bn(mid, cout, k2, bias=bias, act=None))
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = conv_bn(cin, cout, 1, stride, bias=bias, act=None)
        self.fusion_layers = nn.ModuleList(conv_bn(c, cout, 1, bias=bias, act=None)
                                           for c in fusion_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, fusion: list[torch.Tensor] | None = None) -> torch.Tensor:
        out = self.conv(x) + (x if self.downsample is None else self.downsample(x))
        for layer, f in zip(self.fusion_layers, fusion or [], strict=True):
            out = out + layer(f)
        return self.relu(out)


class MixVarGEStage(nn.Module):
    """Head op, stack ops, then the optional downsample layers for later fusion."""

    def __init__(self, cfg: StageConfig, fusion_channels: tuple[int, ...], bias: bool) -> None:
        super().__init__()
        c = cfg.out_channels
        self.head_layer = BasicMixVarGEBlock(cfg.in_channels, c, cfg.stride, cfg.head_op, bias,
                                             fusion_channels)
        self.stack_layers = nn.Sequential(*(BasicMixVarGEBlock(c, c, 1, op, bias)
                                            for op in cfg.stack_ops))
        self.downsample_layers = nn.ModuleList(conv_bn(c, c, 3, 2, bias=True, act=None)
                                               for _ in range(cfg.extra_downsample_num))

    def forward(self, x: torch.Tensor, fusion: list[torch.Tensor]
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.stack_layers(self.head_layer(x, fusion))
        downs, d = [], x
        for layer in self.downsample_layers:
            d = layer(d)
            downs.append(d)
        return x, downs


class MixVarGENet(nn.Module):
    """Stem conv, MixVarGE stages (mod2..mod6), classifier top (or the stage outputs when
    ``include_top`` is False)."""

    def __init__(self, config: str = "imagenet", num_classes: int = 1000, bias: bool = True,
                 include_top: bool = True) -> None:
        super().__init__()
        stages_cfg = CONFIGS[config]
        self.strides = [2 ** (i + 1) for i in range(len(stages_cfg))]
        out_by_stride = dict(zip(self.strides, (s.out_channels for s in stages_cfg),
                                 strict=True))
        self.fusion_strides = [s.fusion_strides for s in stages_cfg]
        self.mod1 = conv_bn(3, stages_cfg[0].in_channels, 3, 2, bias=bias, act=None)
        self.stages = nn.ModuleList(
            MixVarGEStage(s, tuple(out_by_stride[f] for f in s.fusion_strides), bias)
            for s in stages_cfg)
        self.include_top = include_top
        if include_top:
            c = stages_cfg[-1].out_channels
            self.output = nn.Sequential(conv_bn(c, 1024, 1, bias=bias), nn.AvgPool2d(7, 1),
                                        conv_bn(1024, num_classes, 1, bias=bias, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        x = self.mod1(x)
        # (target stride, source stride) -> a source stage's output downsampled to the target
        pending: dict[tuple[int, int], torch.Tensor] = {}
        outs = []
        for stride, fusion_strides, stage in zip(self.strides, self.fusion_strides, self.stages,
                                                 strict=True):
            x, downs = stage(x, [pending[(stride, f)] for f in fusion_strides])
            for j, d in enumerate(downs):
                pending[(stride * 2 ** (j + 1), stride)] = d
            outs.append(x)
        if not self.include_top:
            return outs
        return torch.flatten(self.output(x), 1)


def mixvargenet(config: str = "imagenet", num_classes: int = 1000) -> MixVarGENet:
    """MixVarGENet classifier; ``config`` one of ``CONFIGS``."""
    if config not in CONFIGS:
        raise ValueError(f"unknown MixVarGENet config '{config}'; known: {', '.join(CONFIGS)}")
    return MixVarGENet(config, num_classes)
