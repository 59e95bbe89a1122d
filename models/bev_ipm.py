"""BEV IPM multi-task model of source document 004 (the vendor's
``bev_ipm_efficientnetb0_multitask_nuscenes``): six surround-view camera images to a
bird's-eye-view (BEV) map with a segmentation decoder and a CenterPoint-style 3-D detection
head (Yin et al., "Center-based 3D Object Detection and Tracking", CVPR 2021).

Pipeline, as the document configures it:

1. Image backbone: EfficientNet-B0 with ReLU and no squeeze-excite, shared by the 6 views
   (batch 6); features at strides 8 (40 ch) and 32 (320 ch).
2. FastSCNN neck: pyramid pooling on stride 32 fused into stride 8, 64 channels.
3. IPM view transformer: ``F.grid_sample`` of each view's stride-8 map at the image positions
   of a flat-ground BEV grid, summed over the views. The sampling grid is a *constant*
   precomputed from the camera rig (:class:`CameraRig`), quantized to ``grid_quant_scale``
   feature pixels as on the chip (the vendor feeds it through a 16-bit QuantStub).
4. BEV encoder: EfficientNet-B0 (ReLU, no SE) on the 64-channel BEV map, then a BiFPN (48
   channels, 3 repeats, sum fusion) over its 5 levels.
5. Decoders on the finest BiFPN level (half the IPM grid): a depthwise-separable FCN head
   (4 map classes) and a CenterPoint head (a shared 3x3 conv, then per task a heatmap and
   reg/height/dim/rot/vel regressions, the six nuScenes task groups).

Sizes: the document trains on 512x960 crops; the zoo default is 6x3x256x480 per sample (the
same crop at half resolution) with a 128x128 IPM grid over +-51.2 m (0.8 m cells) and 64x64
task maps (1.6 m), about 9 GMACs; ``image_hw=(512, 960), bev_hw=(256, 256)`` gives the
document's scale (about 4x the MACs). The camera rig is a synthetic nuScenes-like one
(6 cameras at 1.5 m, yaws 0, +-55, +-110, 180 degrees, 70 degree horizontal field of view).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .bev_necks import BiFPN, FastSCNNNeck
from .blocks import conv_bn, example_image, separable_conv
from .efficientnet import EfficientNet

#: CenterPoint task groups of nuScenes (name, classes), as in the vendor's config
TASKS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("car", ("car",)),
    ("truck", ("truck", "construction_vehicle")),
    ("bus", ("bus", "trailer")),
    ("barrier", ("barrier",)),
    ("bike", ("motorcycle", "bicycle")),
    ("pedestrian", ("pedestrian", "traffic_cone")),
)
#: regression heads: name -> output channels (each with 2 convs)
COMMON_HEADS = {"reg": 2, "height": 1, "dim": 3, "rot": 2, "vel": 2}
SEG_CLASSES = 4  # background, lane divider, pedestrian crossing, road boundary
NUM_VIEWS = 6
IMAGE_HW = (256, 480)
BEV_HW = (128, 128)


@dataclass(frozen=True)
class CameraRig:
    """Pinhole cameras looking horizontally from ``height`` metres, at ``yaws_deg`` (0 is
    ego-forward, counter-clockwise), principal point at the image centre."""

    yaws_deg: tuple[float, ...] = (0.0, -55.0, 55.0, 180.0, 110.0, -110.0)
    height: float = 1.5
    hfov_deg: float = 70.0

    def ground_to_image(self, x: torch.Tensor, y: torch.Tensor, image_hw: tuple[int, int]
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Image coordinates (u, v; continuous pixels) of ground points (x forward, y left,
        metres) in every camera, and whether each point lies in front of the camera."""
        h, w = image_hw
        f = (w / 2) / math.tan(math.radians(self.hfov_deg) / 2)
        us, vs, valid = [], [], []
        for yaw in self.yaws_deg:
            c, s = math.cos(math.radians(yaw)), math.sin(math.radians(yaw))
            depth = x * c + y * s          # along the optical axis
            right = x * s - y * c          # camera x axis (right)
            safe = depth.clamp(min=1e-3)
            us.append(f * right / safe + w / 2)
            vs.append(f * self.height / safe + h / 2)
            valid.append(depth > 0.5)
        return torch.stack(us), torch.stack(vs), torch.stack(valid)


def ipm_grid(rig: CameraRig, image_hw: tuple[int, int], feat_hw: tuple[int, int],
             bev_hw: tuple[int, int], bev_range: float, grid_quant_scale: float) -> torch.Tensor:
    """The constant sampling grid (views, bev_h, bev_w, 2) for ``F.grid_sample``
    (align_corners=False) over a feature map of ``feat_hw``.

    BEV row 0 is the farthest ahead (+x), column 0 the farthest left (+y); cell centres.
    Positions are quantized to ``grid_quant_scale`` feature pixels; points behind a camera
    or outside its image are sent outside the map, where zero padding samples zeros.
    """
    bh, bw = bev_hw
    xs = bev_range - (torch.arange(bh, dtype=torch.float64) + 0.5) * (2 * bev_range / bh)
    ys = bev_range - (torch.arange(bw, dtype=torch.float64) + 0.5) * (2 * bev_range / bw)
    gx, gy = torch.meshgrid(xs, ys, indexing="ij")
    u, v, valid = rig.ground_to_image(gx, gy, image_hw)
    stride_h, stride_w = image_hw[0] / feat_hw[0], image_hw[1] / feat_hw[1]
    fu, fv = u / stride_w, v / stride_h  # feature-map pixels
    inside = valid & (fu >= 0) & (fu <= feat_hw[1]) & (fv >= 0) & (fv <= feat_hw[0])
    outside = -4.0  # a few pixels off the map: zero padding returns 0
    fu = torch.where(inside, fu, torch.full_like(fu, outside))
    fv = torch.where(inside, fv, torch.full_like(fv, outside))
    fu = torch.round(fu / grid_quant_scale) * grid_quant_scale
    fv = torch.round(fv / grid_quant_scale) * grid_quant_scale
    grid = torch.stack([2 * fu / feat_hw[1] - 1, 2 * fv / feat_hw[0] - 1], dim=-1)
    return grid.float()


class IPMViewTransformer(nn.Module):
    """Samples every view's features on the constant IPM grid and sums the views."""

    def __init__(self, grid: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("grid", grid)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        sampled = F.grid_sample(feats, self.grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)
        return sampled.sum(dim=0, keepdim=True)


class SegHead(nn.Module):
    """Depthwise-separable FCN head: two separable 3x3 conv-BN-ReLU, 1x1 classifier."""

    def __init__(self, cin: int, channels: int, num_classes: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(separable_conv(cin, channels, pw_act=nn.ReLU),
                                   separable_conv(channels, channels, pw_act=nn.ReLU))
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.convs(x)))


def _branch(cin: int, channels: int, cout: int, num_convs: int = 2) -> nn.Sequential:
    layers: list[nn.Module] = [conv_bn(cin if i == 0 else channels, channels, 3)
                               for i in range(num_convs - 1)]
    layers.append(nn.Conv2d(channels, cout, 3, 1, 1))
    return nn.Sequential(*layers)


class CenterPointHead(nn.Module):
    """Shared 3x3 conv-BN-ReLU; per task a heatmap branch and the regression branches; the
    regressions of a task are concatenated (reg, height, dim, rot, vel: 10 channels)."""

    def __init__(self, cin: int, channels: int = 48) -> None:
        super().__init__()
        self.shared = conv_bn(cin, channels, 3)
        self.heatmaps = nn.ModuleDict({name: _branch(channels, channels, len(classes))
                                       for name, classes in TASKS})
        self.regressions = nn.ModuleDict({
            name: nn.ModuleDict({k: _branch(channels, channels, c)
                                 for k, c in COMMON_HEADS.items()})
            for name, _ in TASKS})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.shared(x)
        out = {}
        for name, _ in TASKS:
            out[f"det_{name}_heatmap"] = self.heatmaps[name](x)
            regs = [branch(x) for branch in self.regressions[name].values()]
            out[f"det_{name}_reg"] = torch.cat(regs, dim=1)
        return out


class BevIPM(nn.Module):
    """``forward(images)``: images (6, 3, H, W), one per camera; returns ``bev_seg`` logits
    and per task ``det_<task>_heatmap`` / ``det_<task>_reg`` on the task grid."""

    def __init__(self, image_hw: tuple[int, int] = IMAGE_HW, bev_hw: tuple[int, int] = BEV_HW,
                 bev_range: float = 51.2, grid_quant_scale: float = 1 / 64,
                 rig: CameraRig | None = None) -> None:
        super().__init__()
        if image_hw[0] % 32 or image_hw[1] % 32 or bev_hw[0] % 32 or bev_hw[1] % 32:
            raise ValueError(f"image {image_hw} and BEV {bev_hw} sizes must be multiples of 32")
        self.image_hw, self.bev_hw = tuple(image_hw), tuple(bev_hw)
        relu_b0 = dict(act=nn.ReLU, se=False, features_only=True)
        self.backbone = EfficientNet("b0", **relu_b0)
        c = self.backbone.feature_channels  # 16, 24, 40, 112, 320
        self.neck = FastSCNNNeck((c[2], c[4]), (64, 64), (image_hw[0] // 32, image_hw[1] // 32))
        feat_hw = (image_hw[0] // 8, image_hw[1] // 8)
        grid = ipm_grid(rig or CameraRig(), image_hw, feat_hw, bev_hw, bev_range,
                        grid_quant_scale)
        self.view_transformer = IPMViewTransformer(grid)
        self.bev_backbone = EfficientNet("b0", in_channels=self.neck.out_channels, **relu_b0)
        self.bev_neck = BiFPN(self.bev_backbone.feature_channels, 48, stack=3)
        self.seg_head = SegHead(48, 48, SEG_CLASSES)
        self.det_head = CenterPointHead(48, 48)

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.backbone(images)
        bev = self.view_transformer(self.neck(feats[2], feats[4]))
        levels = self.bev_neck(self.bev_backbone(bev))
        return {"bev_seg": self.seg_head(levels[0]), **self.det_head(levels[0])}


def build(image_hw: tuple[int, int] = IMAGE_HW, bev_hw: tuple[int, int] = BEV_HW,
          seed: int = 0) -> tuple[BevIPM, tuple[torch.Tensor]]:
    """The model (unseeded) and a (6, 3, H, W) batch of camera images."""
    return BevIPM(image_hw, bev_hw), (example_image((NUM_VIEWS, 3, *image_hw), seed),)
