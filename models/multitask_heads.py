"""Task heads of the resize multi-task model (``multitask.py``): anchor-free detection heads
with their losses and on-chip decode, segmentation heads with their loss and ``channel_argmax``.

Detection (one head per task, on the neck's stride 8/16/32 maps): per level a VarG tower
(3x3 group conv + 1x1 conv, ReLU) then two 3x3 convs, class logits and box distances
(left, top, right, bottom from the location, in units of the level's stride; FCOS-style).
The vendor's deploy model decodes on the chip (``DetectionPostProcessing_X2``); ours is
:class:`DetectionDecode`: sigmoid scores and boxes ``centre + (-l, -t, r, b) * stride`` from
constant location grids, all levels concatenated. Score thresholding and NMS are data-dependent
and run on the CPU after the graph.

Segmentation: the neck's stride-8 map, projected, upsampled x2 (nearest) and added to the
backbone's stride-4 map, a VarG block and a 1x1 classifier; logits at stride 4. Deploy adds
``channel_argmax`` (argmax over channels, keepdim).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import conv_bn
from .vargnet import VarGBlock, VarGNetConfig, var_group_conv

LEVEL_STRIDES = (8, 16, 32)


class DetectionHead(nn.Module):
    """Per level: VarG tower, then 3x3 conv to the class logits and to 4 box distances."""

    def __init__(self, task: str, num_classes: int, channels: tuple[int, ...],
                 config: VarGNetConfig) -> None:
        super().__init__()
        self.task, self.num_classes = task, num_classes
        self.towers = nn.ModuleList(
            nn.Sequential(var_group_conv(c, c, 1, config.factor, config.group_base),
                          nn.ReLU(inplace=True)) for c in channels)
        self.cls = nn.ModuleList(nn.Conv2d(c, num_classes, 3, 1, 1) for c in channels)
        self.box = nn.ModuleList(nn.Conv2d(c, 4, 3, 1, 1) for c in channels)

    def forward(self, feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for s, f, tower, cls, box in zip(LEVEL_STRIDES, feats, self.towers, self.cls, self.box,
                                         strict=True):
            t = tower(f)
            out[f"{self.task}_cls_s{s}"] = cls(t)
            out[f"{self.task}_box_s{s}"] = box(t)
        return out


class SegmentationHead(nn.Module):
    """Stride-8 neck map fused with the stride-4 backbone map; logits at stride 4."""

    def __init__(self, task: str, num_classes: int, c4: int, c8: int,
                 config: VarGNetConfig) -> None:
        super().__init__()
        self.task, self.num_classes = task, num_classes
        self.lateral = conv_bn(c8, c4, 1, bias=True, act=None)
        self.fuse = VarGBlock(c4, c4, 1, config.factor, config.upscale_group_base)
        self.classifier = nn.Conv2d(c4, num_classes, 1)

    def forward(self, c4: torch.Tensor, p8: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.fuse(c4 + F.interpolate(self.lateral(p8), scale_factor=2.0))
        return {f"{self.task}_logits": self.classifier(x)}


class DetectionDecode(nn.Module):
    """On-chip decode of one detection head: ``{task}_scores`` (1, C, N) sigmoid scores and
    ``{task}_boxes`` (1, 4, N) as x1, y1, x2, y2 in input pixels, N = all locations of all
    levels. Location centres are constant buffers, so the graph holds only mul/add/reshape."""

    def __init__(self, task: str, num_classes: int, input_hw: tuple[int, int]) -> None:
        super().__init__()
        self.task, self.num_classes = task, num_classes
        self.shapes = []
        for i, s in enumerate(LEVEL_STRIDES):
            h, w = -(-input_hw[0] // s), -(-input_hw[1] // s)
            self.shapes.append((h, w))
            ys, xs = torch.meshgrid(torch.arange(h) * s + s // 2, torch.arange(w) * s + s // 2,
                                    indexing="ij")
            centres = torch.stack([xs, ys, xs, ys]).float().unsqueeze(0)  # (1, 4, h, w)
            self.register_buffer(f"centres{i}", centres, persistent=False)
            scale = torch.tensor([-1.0, -1.0, 1.0, 1.0]).view(1, 4, 1, 1) * s
            self.register_buffer(f"scale{i}", scale, persistent=False)

    def forward(self, head_out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scores, boxes = [], []
        for i, (s, (h, w)) in enumerate(zip(LEVEL_STRIDES, self.shapes, strict=True)):
            cls = head_out[f"{self.task}_cls_s{s}"]
            dist = F.relu(head_out[f"{self.task}_box_s{s}"])
            box = getattr(self, f"centres{i}") + dist * getattr(self, f"scale{i}")
            scores.append(torch.sigmoid(cls).reshape(1, self.num_classes, h * w))
            boxes.append(box.reshape(1, 4, h * w))
        return {f"{self.task}_scores": torch.cat(scores, dim=2),
                f"{self.task}_boxes": torch.cat(boxes, dim=2)}


def channel_argmax(logits: torch.Tensor) -> torch.Tensor:
    """The deploy model's ``channel_argmax``: class index per pixel, shape (N, 1, H, W)."""
    return torch.argmax(logits, dim=1, keepdim=True)


# -- training losses ---------------------------------------------------------------------------
def sigmoid_focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25,
                       gamma: float = 2.0) -> torch.Tensor:
    """Focal loss (Lin et al., 2017) summed over elements."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def detection_loss(out: dict[str, torch.Tensor], targets: dict[str, torch.Tensor],
                   task: str) -> dict[str, torch.Tensor]:
    """Focal loss on the class maps and L1 on the box distances of positive locations, both
    normalised by the number of positives. ``targets`` per level: ``cls_s{s}`` (0/1 maps),
    ``box_s{s}`` (distances in stride units)."""
    cls_loss = out[f"{task}_cls_s8"].new_zeros(())
    box_loss = out[f"{task}_cls_s8"].new_zeros(())
    num_pos = out[f"{task}_cls_s8"].new_zeros(())
    for s in LEVEL_STRIDES:
        cls_t, box_t = targets[f"cls_s{s}"], targets[f"box_s{s}"]
        pos = cls_t.amax(dim=1, keepdim=True)
        cls_loss = cls_loss + sigmoid_focal_loss(out[f"{task}_cls_s{s}"], cls_t)
        box_loss = box_loss + (F.relu(out[f"{task}_box_s{s}"]) - box_t).abs().mul(pos).sum()
        num_pos = num_pos + pos.sum()
    num_pos = num_pos.clamp(min=1.0)
    return {f"{task}_cls_loss": cls_loss / num_pos, f"{task}_box_loss": box_loss / num_pos}


def segmentation_loss(out: dict[str, torch.Tensor], labels: torch.Tensor,
                      task: str) -> dict[str, torch.Tensor]:
    """Cross entropy over the stride-4 logits; label 255 is ignored."""
    return {f"{task}_loss": F.cross_entropy(out[f"{task}_logits"], labels, ignore_index=255)}
