"""Necks of the BEV IPM model (``bev_ipm.py``, source document 004):

- :class:`FastSCNNNeck` (Poudel et al., "Fast-SCNN: Fast Semantic Segmentation Network", 2019,
  as configured in the document: ``in_channels=[40, 320]``, ``feat_channels=[64, 64]``): a
  pyramid pooling module on the stride-32 map fused into the stride-8 map.
- :class:`BiFPN` (Tan et al., "EfficientDet: Scalable and Efficient Object Detection", CVPR
  2020) on the BEV features: repeated top-down and bottom-up paths, fusion by plain sums
  (the document's ``fpn_name="bifpn_sum"``), ReLU + depthwise-separable conv + BN per node.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_bn, separable_conv


class PyramidPooling(nn.Module):
    """Average pools to 1x1, 2x2, 4x4, 8x8 bins (fixed kernels for the known input size), 1x1
    conv-BN-ReLU each, bilinear upsample back, concat with the input, 3x3 conv-BN-ReLU."""

    def __init__(self, cin: int, cout: int, hw: tuple[int, int],
                 scales: tuple[int, ...] = (1, 2, 4, 8)) -> None:
        super().__init__()
        self.hw = hw
        if max(scales) > min(hw):
            raise ValueError(f"pyramid pooling to {max(scales)} bins needs a stride-32 map of at "
                             f"least {max(scales)}x{max(scales)}, got {hw[0]}x{hw[1]}: use a "
                             "larger input")
        # the vendor's rule: stride floor(size / scale), kernel covering the rest
        self.pools = []
        for s in scales:
            stride = (hw[0] // s, hw[1] // s)
            kernel = (hw[0] - (s - 1) * stride[0], hw[1] - (s - 1) * stride[1])
            self.pools.append((kernel, stride))
        self.branches = nn.ModuleList(conv_bn(cin, cout // 4, 1) for _ in scales)
        self.project = conv_bn(cin + cout // 4 * len(scales), cout, 3, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for (kernel, stride), branch in zip(self.pools, self.branches, strict=True):
            y = branch(F.avg_pool2d(x, kernel, stride))
            outs.append(F.interpolate(y, size=self.hw, mode="bilinear", align_corners=False))
        return self.project(torch.cat([*outs, x], dim=1))


class FastSCNNFusion(nn.Module):
    """Feature fusion: 3x3 conv-BN of the high-resolution map plus the low-resolution map
    upsampled x4 (bilinear) and refined by a separable conv; ReLU; separable conv."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.project = conv_bn(cin, cout, 3, bias=True, act=None)
        self.upsample = separable_conv(cout, cout, dw_act=nn.ReLU, bias=True)
        self.relu = nn.ReLU(inplace=True)
        self.fusion = separable_conv(cout, cout, pw_act=nn.ReLU, bias=True)

    def forward(self, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        low = self.upsample(F.interpolate(low, scale_factor=4.0, mode="bilinear",
                                          align_corners=False))
        return self.fusion(self.relu(self.project(x) + low))


class FastSCNNNeck(nn.Module):
    """Pyramid pooling on the stride-32 map, fused into the stride-8 map; returns the fused
    stride-8 map (the view transformer's input)."""

    def __init__(self, in_channels: tuple[int, int] = (40, 320),
                 feat_channels: tuple[int, int] = (64, 64),
                 hw32: tuple[int, int] = (8, 15)) -> None:
        super().__init__()
        self.extract = PyramidPooling(in_channels[1], feat_channels[1], hw32)
        self.fusion = FastSCNNFusion(in_channels[0], feat_channels[0])
        self.out_channels = feat_channels[0]

    def forward(self, c8: torch.Tensor, c32: torch.Tensor) -> torch.Tensor:
        return self.fusion(c8, self.extract(c32))


class BiFPNNode(nn.Module):
    """ReLU, 3x3 depthwise-separable conv, BN (of a sum of inputs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.relu = nn.ReLU()
        self.conv = separable_conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.relu(x))


class BiFPNLayer(nn.Module):
    """One top-down then bottom-up pass over the levels (finest first)."""

    def __init__(self, channels: int, levels: int) -> None:
        super().__init__()
        self.td = nn.ModuleList(BiFPNNode(channels) for _ in range(levels - 1))
        self.bu = nn.ModuleList(BiFPNNode(channels) for _ in range(levels - 1))
        self.down = nn.MaxPool2d(3, 2, 1)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        n = len(feats)
        td = [feats[-1]]
        for i in range(n - 2, -1, -1):  # top-down: coarse to fine
            up = F.interpolate(td[0], scale_factor=2.0)
            td.insert(0, self.td[i](feats[i] + up))
        outs = [td[0]]
        for i in range(1, n):  # bottom-up: fine to coarse, with the level's input and td
            fused = feats[i] + self.down(outs[-1])
            if i < n - 1:
                fused = fused + td[i]
            outs.append(self.bu[i - 1](fused))
        return outs


class BiFPN(nn.Module):
    """1x1 conv-BN laterals to ``channels``, then ``stack`` BiFPN layers."""

    def __init__(self, in_channels: list[int], channels: int = 48, stack: int = 3) -> None:
        super().__init__()
        self.laterals = nn.ModuleList(conv_bn(c, channels, 1, act=None) for c in in_channels)
        self.layers = nn.Sequential(*(BiFPNLayer(channels, len(in_channels))
                                      for _ in range(stack)))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.layers([lat(f) for lat, f in zip(self.laterals, feats, strict=True)])
