"""Resize (opsets 10-19), Upsample (opsets 7 and 9) and GridSample (opsets 16 and 20).

Resize's scales / sizes / roi / axes / keep_aspect_ratio_policy are resolved here into the
full-rank ``size`` (output shape) and ``scales`` (the per-axis scale the coordinate mapping
uses) of the IR ``resize`` op: when ONNX gives scales, size = floor(in * scale) and the given
scale is kept; when it gives sizes, scale = out / in, or with keep_aspect_ratio_policy one
common scale and size = round_half_up(in * scale) on the listed axes.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from . import converter

log = logging.getLogger(__name__)

_KEEP_ASPECT = ("stretch", "not_larger", "not_smaller")
_GRID_MODES = {"linear": "bilinear", "bilinear": "bilinear", "cubic": "bicubic",
               "bicubic": "bicubic", "nearest": "nearest"}


def _given(arr: np.ndarray | None) -> np.ndarray | None:
    """An optional ONNX tensor input: None when absent or empty (the opset-11 'not given')."""
    if arr is None or np.asarray(arr).size == 0:
        return None
    return np.asarray(arr)


def _axes(ctx, node, rank: int) -> list[int]:
    axes = ctx.attrs(node).get("axes")
    if axes is None:
        return list(range(rank))
    out = []
    for a in axes:
        if not -rank <= a < rank:
            ctx.unsupported(node, f"axis {a} is out of range for rank {rank}")
        out.append(a % rank)
    if len(set(out)) != len(out):
        ctx.unsupported(node, f"axes {list(axes)} repeat an axis")
    return out


def _resolve(ctx, node, shape: tuple[int, ...], axes: list[int], scales, sizes,
             policy: str) -> tuple[list[int], list[float]]:
    """Full-rank (size, scales) from the scales or sizes input on ``axes``."""
    rank = len(shape)
    size = list(shape)
    scale = [1.0] * rank
    given = scales if scales is not None else sizes
    what = "scales" if scales is not None else "sizes"
    if given.ndim != 1 or given.shape[0] != len(axes):
        ctx.unsupported(node, f"{what} has shape {list(given.shape)}, expected [{len(axes)}] "
                        f"(one per resized axis of the rank-{rank} input)")
    if scales is not None:
        for a, s in zip(axes, scales.tolist(), strict=True):
            if not (s > 0 and math.isfinite(s)):
                ctx.unsupported(node, f"scale {s} for axis {a} must be positive and finite")
            scale[a] = float(s)
            size[a] = int(math.floor(shape[a] * float(s)))
        return size, scale
    sz = [int(v) for v in sizes.tolist()]
    if any(v < 0 for v in sz) or any(shape[a] == 0 for a in axes):
        ctx.unsupported(node, f"sizes {sz} must be non-negative and the resized axes of "
                        f"input {list(shape)} non-empty")
    ratios = [v / shape[a] for a, v in zip(axes, sz, strict=True)]
    if policy == "stretch":
        for a, v, s in zip(axes, sz, ratios, strict=True):
            size[a], scale[a] = v, s
        return size, scale
    common = min(ratios) if policy == "not_larger" else max(ratios)
    for a in axes:
        scale[a] = common
        size[a] = int(common * shape[a] + 0.5)  # round half up, as the ONNX reference
    return size, scale


def _resize10_rounding(ctx, node, scales) -> str:
    if scales is None:
        return "floor"
    down = any(s < 1 for s in scales.tolist())
    up = any(s > 1 for s in scales.tolist())
    if down and up and ctx.attrs(node).get("mode", "nearest") == "nearest":
        log.warning("%s node '%s': nearest Resize-10 both up- and downscales; rounding source "
                    "positions down on every axis (onnxruntime rounds up on the downscaled "
                    "ones)", node.op_type, ctx.where(node))
    return "ceil" if down and not up else "floor"


@converter("Resize", static=(1, 2, 3))
def resize(ctx, node):
    a = ctx.attrs(node)
    x = ctx.input(node, 0)
    shape = ctx.type(node, 0).shape
    rank = len(shape)
    mode = a.get("mode", "nearest")
    if ctx.opset < 11:
        # Resize-10: (X, scales) with asymmetric coordinates; onnxruntime rounds nearest
        # source positions down when upscaling and up when downscaling
        roi, scales, sizes = None, _given(ctx.const(node, 1)), None
        ctm, nearest_mode = "asymmetric", _resize10_rounding(ctx, node, scales)
    else:
        roi = _given(ctx.const(node, 1))
        scales = _given(ctx.const(node, 2))
        sizes = _given(ctx.const(node, 3))
        ctm = a.get("coordinate_transformation_mode", "half_pixel")
        nearest_mode = a.get("nearest_mode", "round_prefer_floor")
    if (scales is None) == (sizes is None):
        ctx.unsupported(node, "exactly one of the scales and sizes inputs must be given "
                        f"({'both are' if scales is not None else 'neither is'})")
    policy = a.get("keep_aspect_ratio_policy", "stretch")
    if policy not in _KEEP_ASPECT:
        ctx.unsupported(node, f"keep_aspect_ratio_policy '{policy}' is not one of "
                        f"{', '.join(_KEEP_ASPECT)}")
    axes = _axes(ctx, node, rank)
    size, scale = _resolve(ctx, node, shape, axes, scales, sizes, policy)
    attrs = {
        "size": size, "scales": scale, "mode": mode,
        "coordinate_transformation_mode": ctm, "nearest_mode": nearest_mode,
        "cubic_coeff_a": a.get("cubic_coeff_a", -0.75),
        "exclude_outside": a.get("exclude_outside", 0),
        "extrapolation_value": a.get("extrapolation_value", 0.0),
        "antialias": a.get("antialias", 0) if mode != "nearest" else 0,
    }
    if ctm == "tf_crop_and_resize":
        full = [0.0] * rank + [1.0] * rank
        if roi is not None:
            roi = roi.astype(np.float64).ravel()
            if roi.shape[0] != 2 * len(axes):
                ctx.unsupported(node, f"roi has {roi.shape[0]} entries, expected "
                                f"{2 * len(axes)} (starts then ends of the resized axes)")
            for i, ax in enumerate(axes):
                full[ax], full[rank + ax] = float(roi[i]), float(roi[len(axes) + i])
        attrs["roi"] = full
    ctx.emit("resize", [x], attrs, node=node)


@converter("Upsample", static=(1,))
def upsample(ctx, node):
    a = ctx.attrs(node)
    shape = ctx.type(node, 0).shape
    if ctx.opset < 7:
        ctx.unsupported(node, f"Upsample-{ctx.opset} (height_scale/width_scale attributes) is "
                        "not supported; re-export with opset >= 7")
    scales = a.get("scales") if ctx.opset < 9 else ctx.const(node, 1)
    if scales is None:
        ctx.unsupported(node, "the scales are missing")
    mode = a.get("mode", "nearest")
    mode = "linear" if mode in ("linear", "bilinear") else mode
    scales = np.asarray(scales, dtype=np.float64)
    if (scales < 1).any():
        ctx.unsupported(node, f"scales {scales.tolist()} must all be >= 1 (Upsample only "
                        "upscales; use Resize to downscale)")
    size, scale = _resolve(ctx, node, shape, list(range(len(shape))), scales, None, "stretch")
    # Upsample's nearest is index floor(y / scale) (np.repeat for integral scales)
    ctx.emit("resize", [ctx.input(node, 0)], {
        "size": size, "scales": scale, "mode": mode,
        "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor",
    }, node=node)


@converter("GridSample")
def grid_sample(ctx, node):
    a = ctx.attrs(node)
    mode = a.get("mode", "bilinear" if ctx.opset < 20 else "linear")
    if mode not in _GRID_MODES:
        ctx.unsupported(node, f"mode '{mode}' is not one of linear, nearest, cubic")
    if ctx.opset < 20 and ctx.type(node, 0).rank != 4:
        ctx.unsupported(node, f"GridSample-{ctx.opset} takes a 4-D input, got rank "
                        f"{ctx.type(node, 0).rank}")
    ctx.emit("grid_sample", [ctx.input(node, 0), ctx.input(node, 1)], {
        "mode": _GRID_MODES[mode],
        "padding_mode": a.get("padding_mode", "zeros"),
        "align_corners": a.get("align_corners", 0),
    }, node=node)
