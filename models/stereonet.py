"""StereoNet stereo depth (Khamis et al., "StereoNet: Guided Hierarchical Refinement for
Real-Time Edge-Aware Depth Prediction", ECCV 2018) in the form of source document 003: a
``StereoNetNeck`` feature extractor and a ``StereoNetHead`` with a cost volume up to maxdisp 192
and hierarchical edge-aware refinement, at 2x3x544x960 (left and right image stacked on the
batch axis; SceneFlow frames padded from 540 to 544 rows).

Neck (document config ``out_channels=[32, 32, 64, 128, 128, 16]``): three 3x3 convs (the first
strided), ResNet basic-block stages of 3, 16, 3, 3 blocks at strides 4, 8, 16, 16; the "gwc"
feature is the concat of the last two stages (256 channels), the "concat" feature a 3x3 conv to
128 and a 1x1 conv to 16 channels. Left and right share the weights (one batch-2 pass).

Head: at 1/16 resolution ``D = maxdisp / 2**refine_levels = 12`` disparities. For each d the
left features from column d are paired with the right features up to column W - d (slicing),
giving a group-wise correlation volume (32 groups: product, then mean over each group's 8
channels) and a concat volume (the two slices concatenated), each completed by d zero columns
(a constant) in front; together 64 x D x H x W. Five 3x3x3 conv3d-BN-ReLU
layers and a conv3d to one channel filter it; softmax over D and the expectation over the
disparity values (``d / D``) give a normalised disparity. Four edge-aware refinements then
upsample it x2 (bilinear), concat the left image at that scale, and add a predicted residual
(a 3x3 conv to 32, 6 basic blocks, a 3x3 conv to 1). The output is the full-resolution
disparity in pixels (normalised disparity x maxdisp).

Everything the cost volume needs is slicing, mul, reshape, mean and concat (with constant
zeros), which the torch frontend converts; there is no data-dependent control flow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import BasicResBlock, conv_bn, example_image

NECK_CHANNELS = (32, 32, 64, 128, 128, 16)
INPUT_HW = (544, 960)


class StereoNetNeck(nn.Module):
    """Shared feature extractor; returns (gwc feature, concat feature) at stride 16."""

    def __init__(self, channels: tuple[int, ...] = NECK_CHANNELS) -> None:
        super().__init__()
        c = channels
        self.firstconv = nn.Sequential(conv_bn(3, c[0], 3, 2), conv_bn(c[0], c[0], 3),
                                       conv_bn(c[0], c[0], 3))
        self.layer1 = _stage(c[0], c[1], 3, 2)
        self.layer2 = _stage(c[1], c[2], 16, 2)
        self.layer3 = _stage(c[2], c[3], 3, 2)
        self.layer4 = _stage(c[3], c[4], 3, 1)
        self.lastconv = nn.Sequential(conv_bn(c[3] + c[4], 128, 3),
                                      nn.Conv2d(128, c[5], 1, bias=False))
        self.gwc_channels, self.concat_channels = c[3] + c[4], c[5]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        l3 = self.layer3(self.layer2(self.layer1(self.firstconv(x))))
        gwc = torch.cat([l3, self.layer4(l3)], dim=1)
        return gwc, self.lastconv(gwc)


def _stage(cin: int, cout: int, blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*(BasicResBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1)
                           for i in range(blocks)))


def conv3d_bn_relu(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm3d(cout),
                         nn.ReLU(inplace=True))


class EdgeAwareRefinement(nn.Module):
    """Upsample the disparity to the image scale, concat the image, predict a residual."""

    def __init__(self, num_res: int = 6) -> None:
        super().__init__()
        self.feature = conv_bn(4, 32, 3)
        self.residual_blocks = nn.Sequential(*(BasicResBlock(32, 32) for _ in range(num_res)))
        self.out = conv_bn(32, 1, 3, act=None)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, disparity: torch.Tensor, image: torch.Tensor,
                hw: tuple[int, int]) -> torch.Tensor:
        up = F.interpolate(disparity, size=hw, mode="bilinear", align_corners=False)
        residual = self.out(self.residual_blocks(self.feature(torch.cat([up, image], dim=1))))
        return self.relu(up + residual)


class StereoNetHead(nn.Module):
    """Cost volume, 3-D filtering, soft-argmin, hierarchical refinement (see the module doc)."""

    def __init__(self, gwc_channels: int, concat_channels: int, feat_hw: tuple[int, int],
                 maxdisp: int = 192, refine_levels: int = 4, num_groups: int = 32) -> None:
        super().__init__()
        self.maxdisp, self.refine_levels, self.num_groups = maxdisp, refine_levels, num_groups
        self.feat_hw = tuple(feat_hw)
        self.D = maxdisp // 2**refine_levels
        self.gwc_channels, self.concat_channels = gwc_channels, concat_channels
        in3d = num_groups + 2 * concat_channels
        self.filter = nn.Sequential(conv3d_bn_relu(in3d, 32),
                                    *(conv3d_bn_relu(32, 32) for _ in range(refine_levels)))
        self.conv3d_out = nn.Conv3d(32, 1, 3, 1, 1)
        self.refinements = nn.ModuleList(EdgeAwareRefinement() for _ in range(refine_levels))
        disp_values = torch.arange(self.D, dtype=torch.float32).view(1, self.D, 1, 1) / self.D
        self.register_buffer("disp_values", disp_values)
        zero_channels = max(num_groups, 2 * concat_channels)
        self.register_buffer("zeros", torch.zeros(1, zero_channels, feat_hw[0], self.D),
                             persistent=False)

    def _group_correlation(self, left: torch.Tensor, right: torch.Tensor, d: int
                           ) -> torch.Tensor:
        """Mean of the channel-wise product over each group: (1, num_groups, h, w - d)."""
        h, w = self.feat_hw
        per_group = self.gwc_channels // self.num_groups
        return (left * right).reshape(1, self.num_groups, per_group, h, w - d).mean(dim=2)

    def _zero_fill(self, x: torch.Tensor, channels: int, d: int) -> torch.Tensor:
        """``x`` (computed for columns d..w-1) with d zero columns in front: disparity d has no
        match there. The zeros are a slice of a constant, so no pad op is needed."""
        return x if d == 0 else torch.cat([self.zeros[:, :channels, :, :d], x], dim=3)

    def cost_volume(self, gwc: torch.Tensor, concat: torch.Tensor) -> torch.Tensor:
        """(1, num_groups + 2 * concat_channels, D, h, w) from the batch-2 features: for each
        disparity d, left columns d.. against right columns ..w-d, as in GwcNet."""
        gl, gr = gwc[0:1], gwc[1:2]
        cl, cr = concat[0:1], concat[1:2]
        w = self.feat_hw[1]
        corr, cat = [], []
        for d in range(self.D):
            corr.append(self._zero_fill(
                self._group_correlation(gl[:, :, :, d:], gr[:, :, :, :w - d], d),
                self.num_groups, d))
            cat.append(self._zero_fill(
                torch.cat([cl[:, :, :, d:], cr[:, :, :, :w - d]], dim=1),
                2 * self.concat_channels, d))
        return torch.cat([torch.stack(corr, dim=2), torch.stack(cat, dim=2)], dim=1)

    def forward(self, gwc: torch.Tensor, concat: torch.Tensor,
                left_image: torch.Tensor, image_hw: tuple[int, int]) -> torch.Tensor:
        h, w = self.feat_hw
        cost = self.conv3d_out(self.filter(self.cost_volume(gwc, concat)))
        prob = torch.softmax(cost.reshape(1, self.D, h, w), dim=1)
        disparity = (prob * self.disp_values).sum(dim=1, keepdim=True)
        for i, refine in enumerate(self.refinements):
            scale = 2 ** (self.refine_levels - 1 - i)
            hw = (image_hw[0] // scale, image_hw[1] // scale)
            image = left_image if scale == 1 else F.interpolate(
                left_image, size=hw, mode="bilinear", align_corners=False)
            disparity = refine(disparity, image, hw)
        return disparity * float(self.maxdisp)


class StereoNet(nn.Module):
    """``forward(images)``: images (2, 3, H, W), left then right; returns the left view's
    disparity (1, 1, H, W) in pixels."""

    def __init__(self, maxdisp: int = 192, refine_levels: int = 4,
                 input_hw: tuple[int, int] = INPUT_HW) -> None:
        super().__init__()
        if input_hw[0] % 16 or input_hw[1] % 16:
            raise ValueError(f"input {input_hw}: height and width must be multiples of 16")
        self.input_hw = tuple(input_hw)
        self.neck = StereoNetNeck()
        feat_hw = (input_hw[0] // 16, input_hw[1] // 16)
        if feat_hw[1] <= maxdisp // 2**refine_levels:
            raise ValueError(f"input width {input_hw[1]} too small for maxdisp {maxdisp}")
        self.head = StereoNetHead(self.neck.gwc_channels, self.neck.concat_channels, feat_hw,
                                  maxdisp, refine_levels)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        gwc, concat = self.neck(images)
        return self.head(gwc, concat, images[0:1], self.input_hw)


def build(maxdisp: int = 192, refine_levels: int = 4, input_hw: tuple[int, int] = INPUT_HW,
          seed: int = 0) -> tuple[StereoNet, tuple[torch.Tensor]]:
    """The model (unseeded) and a (2, 3, H, W) stereo pair."""
    return (StereoNet(maxdisp, refine_levels, input_hw),
            (example_image((2, 3, *input_hw), seed),))
