"""The resize multi-task perception model of source document 001: a VarGNetV2 g8g8 0.5x
backbone shared by 4 detection heads (cyclist/traffic light, person, vehicle front/rear,
vehicle/traffic sign) and 2 segmentation heads (12-class default, 4-class lane), on 1x3x512x960
inputs (a 1080x1920 frame halved by the pyramid and cropped 28 rows at the top).

The architecture of the heads and neck is ours (the document names the tasks, the backbone and
the input sizes, not the layers): see ``vargnet.UpscaleNeck`` and ``multitask_heads``.

Modes, as the document distinguishes them:

- ``"model"``: training. ``forward(img, targets)`` returns a dict of losses (focal + L1 per
  detection task, cross entropy per segmentation task). Not for prediction, and not importable
  by hbc (its losses use log/BCE ops that never reach the chip).
- ``"export"``: backbone + heads, no loss; returns a dict of head outputs (per detection task
  class logits and box distances at strides 8/16/32, per segmentation task stride-4 logits).
- ``"deploy"``: export plus the on-chip post-processing: a detection decode per detection task
  (sigmoid scores and x1y1x2y2 boxes) and ``channel_argmax`` per segmentation task.

:func:`single_task_models` gives the six single-task graphs (backbone + neck + one head) with
the *same parameter objects and names* as the multi-task model (``backbone.*``, ``neck.*``,
``heads.<task>.*``), the input of the shared-parameter merging path.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import example_image
from .common import seeded_init
from .multitask_heads import (
    LEVEL_STRIDES,
    DetectionDecode,
    DetectionHead,
    SegmentationHead,
    channel_argmax,
    detection_loss,
    segmentation_loss,
)
from .vargnet import VARIANTS, UpscaleNeck, VarGNetV2Backbone

#: detection task -> class names (document 001's det_*.py branches)
DET_TASKS: dict[str, tuple[str, ...]] = {
    "det_cyclist_light": ("cyclist", "traffic_light"),
    "det_person": ("person",),
    "det_rear": ("vehicle_front", "vehicle_rear"),
    "det_vehicle_sign": ("vehicle", "traffic_sign"),
}
#: segmentation task -> number of classes (seg_default.py: 12 classes, seg_lane.py: 4)
SEG_TASKS: dict[str, int] = {"seg_default": 12, "seg_lane": 4}
TASKS = (*DET_TASKS, *SEG_TASKS)
MODES = ("model", "export", "deploy")
INPUT_HW = (512, 960)


class MultiTaskResize(nn.Module):
    """Shared VarGNetV2 backbone and upscale neck, one head per task (see the module doc)."""

    def __init__(self, mode: str = "export", backbone: str = "g8g8_0.5x",
                 tasks: tuple[str, ...] = TASKS, input_hw: tuple[int, int] = INPUT_HW) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown mode '{mode}'; expected one of {', '.join(MODES)}")
        unknown = [t for t in tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known: {', '.join(TASKS)}")
        config = VARIANTS[backbone]
        self.mode, self.tasks, self.input_hw = mode, tuple(tasks), tuple(input_hw)
        self.backbone = VarGNetV2Backbone(config)
        self.neck = UpscaleNeck(self.backbone.channels, config)
        ch = self.backbone.channels
        self.heads = nn.ModuleDict()
        for t in self.tasks:
            if t in DET_TASKS:
                self.heads[t] = DetectionHead(t, len(DET_TASKS[t]), self.neck.out_channels,
                                              config)
            else:
                self.heads[t] = SegmentationHead(t, SEG_TASKS[t], ch[1], ch[2], config)
        if mode == "deploy":
            self.decoders = nn.ModuleDict({t: DetectionDecode(t, len(DET_TASKS[t]), input_hw)
                                           for t in self.tasks if t in DET_TASKS})

    def forward(self, img: torch.Tensor,
                targets: dict[str, dict[str, torch.Tensor] | torch.Tensor] | None = None
                ) -> dict[str, torch.Tensor]:
        feats = self.backbone(img)
        pyramid = self.neck(feats)
        out: dict[str, torch.Tensor] = {}
        for t, head in self.heads.items():
            out.update(head(pyramid) if t in DET_TASKS else head(feats[1], pyramid[0]))
        if self.mode == "model":
            return self._losses(out, targets)
        if self.mode == "deploy":
            return self._post_process(out)
        return out

    def _losses(self, out: dict[str, torch.Tensor], targets) -> dict[str, torch.Tensor]:
        if targets is None:
            raise ValueError("mode 'model' (training) needs targets; see example_targets()")
        losses: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            if t in DET_TASKS:
                losses.update(detection_loss(out, targets[t], t))
            else:
                losses.update(segmentation_loss(out, targets[t], t))
        return losses

    def _post_process(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        for t in self.tasks:
            if t in DET_TASKS:
                result.update(self.decoders[t](out))
            else:
                result[f"{t}_label"] = channel_argmax(out[f"{t}_logits"])
        return result


def example_targets(model: MultiTaskResize, seed: int = 0) -> dict[str, object]:
    """Reproducible synthetic training targets matching the model's outputs: sparse 0/1 class
    maps and box distances per detection level, stride-4 label maps (some pixels 255,
    ignored) per segmentation task."""
    gen = torch.Generator().manual_seed(seed)
    h, w = model.input_hw
    targets: dict[str, object] = {}
    for t in model.tasks:
        if t in DET_TASKS:
            c = len(DET_TASKS[t])
            level = {}
            for s in LEVEL_STRIDES:
                hs, ws = -(-h // s), -(-w // s)
                level[f"cls_s{s}"] = (torch.rand(1, c, hs, ws, generator=gen) < 0.01).float()
                level[f"box_s{s}"] = torch.rand(1, 4, hs, ws, generator=gen) * 4
            targets[t] = level
        else:
            labels = torch.randint(0, SEG_TASKS[t], (1, h // 4, w // 4), generator=gen)
            ignore = torch.rand(1, h // 4, w // 4, generator=gen) < 0.05
            targets[t] = labels.masked_fill(ignore, 255)
    return targets


def build(mode: str = "export", backbone: str = "g8g8_0.5x",
          input_hw: tuple[int, int] = INPUT_HW, tasks: tuple[str, ...] = TASKS,
          seed: int = 0) -> tuple[MultiTaskResize, tuple]:
    """The model (unseeded) and its example inputs: ``(img,)``, plus targets in mode
    ``model``."""
    model = MultiTaskResize(mode, backbone, tasks, input_hw)
    img = example_image((1, 3, *input_hw), seed)
    if mode == "model":
        return model, (img, example_targets(model, seed))
    return model, (img,)


def single_task_models(mode: str = "export", backbone: str = "g8g8_0.5x",
                       input_hw: tuple[int, int] = INPUT_HW, seed: int = 0
                       ) -> dict[str, tuple[MultiTaskResize, tuple[torch.Tensor]]]:
    """The six single-task models (task -> (module, example inputs)), seeded and in eval mode.

    They share the multi-task model's parameter objects, so parameters have the same names
    (``backbone.mod1.0.weight``...) and the same values in every task graph; merging them by
    name gives back the multi-task model, with the backbone and neck computed once.
    """
    full = seeded_init(MultiTaskResize(mode, backbone, TASKS, input_hw), seed)
    img = example_image((1, 3, *input_hw), seed)
    result = {}
    for t in TASKS:
        single = MultiTaskResize(mode, backbone, (t,), input_hw)
        single.backbone, single.neck = full.backbone, full.neck
        single.heads[t] = full.heads[t]
        if mode == "deploy" and t in DET_TASKS:
            single.decoders[t] = full.decoders[t]
        result[t] = (single.eval(), (img,))
    return result
