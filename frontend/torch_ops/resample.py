"""Resampling: interpolate/Upsample as resize, grid_sample."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import nn

from hbc.ir.graph import Value

from . import converts, floats
from .context import TorchContext, Unsupported
from .pool import adaptive_pool


def _resize(ctx: TorchContext, input: Any, mode: str, align_corners: Any,
            scale_factor: Any = None, recompute_scale_factor: Any = None,
            antialias: bool = False) -> Value:
    """torch's interpolate as resize. Coordinates: nearest = floor(dst * in/out) (asymmetric,
    floor); nearest-exact = half_pixel + round_prefer_ceil; (bi/tri)linear and bicubic =
    half_pixel or align_corners. With scale_factor the scale itself maps coordinates."""
    x = ctx.value(input)
    nd = x.type.rank - 2
    out = list(ctx.out.shape)
    if scale_factor is not None and not recompute_scale_factor:
        scales = [1.0, 1.0] + floats(scale_factor, nd)
    else:
        scales = [1.0, 1.0] + [o / i for o, i in zip(out[2:], x.shape[2:], strict=True)]
    if antialias:  # torch's antialiased kernels differ from ONNX Resize's at the borders
        raise Unsupported(f"interpolate(mode='{mode}', antialias=True)",
                          hint="use antialias=False, or downscale with avg pooling")
    attrs: dict[str, Any] = {"size": out, "scales": scales}
    if mode == "nearest":
        attrs.update(mode="nearest", coordinate_transformation_mode="asymmetric",
                     nearest_mode="floor")
    elif mode == "nearest-exact":
        attrs.update(mode="nearest", coordinate_transformation_mode="half_pixel",
                     nearest_mode="round_prefer_ceil")
    elif mode in ("linear", "bilinear", "trilinear", "bicubic"):
        attrs.update(mode="cubic" if mode == "bicubic" else "linear",
                     coordinate_transformation_mode="align_corners" if align_corners
                     else "half_pixel")
        if mode == "bicubic":
            attrs["cubic_coeff_a"] = -0.75
    elif mode == "area":
        return adaptive_pool(ctx, "avg", nd, x)
    else:
        raise Unsupported(f"interpolation mode '{mode}'")
    return ctx.emit1("resize", [x], attrs)


@converts(F.interpolate, F.upsample)
def _interpolate(ctx, input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    return _resize(ctx, input, mode, align_corners, scale_factor, recompute_scale_factor,
                   antialias)


@converts(F.upsample_nearest)
def _upsample_nearest(ctx, input, size=None, scale_factor=None):
    return _resize(ctx, input, "nearest", None, scale_factor)


@converts(F.upsample_bilinear)
def _upsample_bilinear(ctx, input, size=None, scale_factor=None):
    return _resize(ctx, input, "bilinear", True, scale_factor)


@converts(nn.Upsample)  # UpsamplingNearest2d / UpsamplingBilinear2d set mode/align_corners
def _upsample_module(ctx, m, input):
    return _resize(ctx, input, m.mode, m.align_corners, m.scale_factor,
                   m.recompute_scale_factor)


def _aten_scales(rest: Sequence[Any]) -> list[float] | None:
    """Scale factors of an aten upsample: a list (.vec) or per-axis optional floats."""
    flat = []
    for r in rest:
        if isinstance(r, (list, tuple)):
            flat.extend(r)
        elif r is not None:
            flat.append(r)
    return [float(s) for s in flat] or None


def _aten_upsample(mode: str, has_align: bool) -> Callable:
    def fn(ctx, input, output_size, *rest, **kwargs):
        align = None
        if has_align:
            align, rest = (rest[0] if rest else kwargs.get("align_corners")), rest[1:]
        scales = _aten_scales(list(rest) + [v for k, v in kwargs.items() if "scale" in k])
        return _resize(ctx, input, mode.removesuffix("-aa"), align,
                       scales if output_size is None else None, antialias=mode.endswith("-aa"))

    return fn


for _name, _mode, _align in (
    ("upsample_nearest1d", "nearest", False), ("upsample_nearest2d", "nearest", False),
    ("upsample_nearest3d", "nearest", False), ("_upsample_nearest_exact1d", "nearest-exact", False),
    ("_upsample_nearest_exact2d", "nearest-exact", False),
    ("_upsample_nearest_exact3d", "nearest-exact", False),
    ("upsample_linear1d", "linear", True), ("upsample_bilinear2d", "bilinear", True),
    ("upsample_trilinear3d", "trilinear", True), ("upsample_bicubic2d", "bicubic", True),
    ("_upsample_bilinear2d_aa", "bilinear-aa", True),
    ("_upsample_bicubic2d_aa", "bicubic-aa", True),
):
    converts(aten=(_name,))(_aten_upsample(_mode, _align))


@converts(F.grid_sample)
def _grid_sample(ctx, input, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
    x = ctx.value(input)
    g = ctx.cast(ctx.value(grid), x.dtype, part="grid_cast")
    return ctx.emit1("grid_sample", [x, g], {"mode": mode, "padding_mode": padding_mode,
                                             "align_corners": int(bool(align_corners))})


@converts(aten=("grid_sampler", "grid_sampler_2d", "grid_sampler_3d"))
def _grid_sampler(ctx, input, grid, interpolation_mode, padding_mode, align_corners):
    modes = {0: "bilinear", 1: "nearest", 2: "bicubic"}
    paddings = {0: "zeros", 1: "border", 2: "reflection"}
    return _grid_sample(ctx, input, grid, modes[int(interpolation_mode)],
                        paddings[int(padding_mode)], align_corners)
