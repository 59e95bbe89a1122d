"""Resampling: resize (nearest/linear/cubic, ONNX Resize semantics) and grid_sample.

Both references are vectorized. ``resize`` is separable: for each resized axis it precomputes an
(out, taps) array of source indices and weights and applies them with ``np.take``, so its cost is
taps x output size per axis. ``grid_sample`` gathers every tap of the per-point kernel (2**r for
bilinear, 4**r for bicubic, r spatial dims) from the flattened spatial plane.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from ..registry import FLOAT, FLOATS, INT, INTS, STR, Attr, InferError, OpDef, register
from ..types import FLOAT_DTYPES
from .common import (
    LAYOUT_ATTR,
    channels_first_type,
    from_channels_first,
    layout_result,
    like,
    require_float,
    to_channels_first,
)

RESIZE_MODES = ("nearest", "linear", "cubic")
COORD_MODES = ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel", "align_corners",
               "asymmetric", "tf_crop_and_resize", "tf_half_pixel_for_nn")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")
_INT_DTYPES = frozenset({"i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"})


def _compute_dtype(dtype: np.dtype) -> np.dtype:
    """Interpolation runs in f32 for f16/f32 data and in f64 otherwise (f64, integers)."""
    return np.dtype(np.float32) if dtype in (np.float16, np.float32) else np.dtype(np.float64)


def _saturate(a: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Cast interpolated values back: integers round half to even and saturate (as ONNX)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return np.clip(np.rint(a), info.min, info.max).astype(dtype)
    return a.astype(dtype, copy=False)


# -- resize ---------------------------------------------------------------------------------
def _source_coords(ctm: str, y: np.ndarray, n_in: int, n_out: int, scale: float,
                   roi: tuple[float, float]) -> tuple[np.ndarray, np.ndarray | None]:
    """Source coordinate of each output index ``y`` along one axis, and the tf_crop_and_resize
    mask of positions outside the input (None for the other modes).

    ``scale`` is the ONNX scale of the axis. Where the formula divides by it and it equals
    n_out / n_in (sizes were given), the exact ratio n_in / n_out is used instead so integral
    source positions stay integral. ``out_f = scale * n_in`` is the unrounded output length that
    align_corners, tf_crop_and_resize and half_pixel_symmetric use (as the ONNX reference).
    """
    out_f = scale * n_in
    exact = math.isclose(out_f, n_out, rel_tol=1e-12)
    if exact:
        out_f = float(n_out)

    def div(v: np.ndarray) -> np.ndarray:
        return v * n_in / n_out if exact else v / scale

    if ctm == "half_pixel":
        return div(y + 0.5) - 0.5, None
    if ctm == "half_pixel_symmetric":
        offset = n_in / 2 * (1 - n_out / out_f)
        return offset + div(y + 0.5) - 0.5, None
    if ctm == "pytorch_half_pixel":
        # ONNX spec and onnxruntime: 0 for a length-1 output.
        return (div(y + 0.5) - 0.5) if n_out > 1 else np.zeros_like(y), None
    if ctm == "align_corners":
        return (y * (n_in - 1) / (out_f - 1) if out_f != 1 else np.zeros_like(y)), None
    if ctm == "asymmetric":
        return div(y), None
    if ctm == "tf_half_pixel_for_nn":
        return div(y + 0.5), None
    # tf_crop_and_resize
    start, end = roi
    if out_f != 1:
        x = y * (end - start) * (n_in - 1) / (out_f - 1)
    else:
        x = np.full_like(y, (end - start) * (n_in - 1) / 2)
    x = x + start * (n_in - 1)
    return x, (x < 0) | (x > n_in - 1)


def _kernel(mode: str, d: np.ndarray, a: float) -> np.ndarray:
    """Interpolation kernel at distance d: triangle (linear) or Keys cubic with coefficient a."""
    d = np.abs(d)
    if mode == "linear":
        return np.maximum(0.0, 1.0 - d)
    d2, d3 = d * d, d * d * d
    near = (a + 2) * d3 - (a + 3) * d2 + 1
    far = a * d3 - 5 * a * d2 + 8 * a * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def axis_taps(attrs: dict, n_in: int, n_out: int, scale: float, roi: tuple[float, float]):
    """(indices (out, taps), weights (out, taps) or None for nearest, extrapolation mask)."""
    mode = attrs["mode"]
    y = np.arange(n_out, dtype=np.float64)
    x, outside = _source_coords(attrs["coordinate_transformation_mode"], y, n_in, n_out,
                                scale, roi)
    # The left neighbour; an integral x counts as the right end of [left, left + 1] (ratio 1),
    # which is how ONNX breaks ties between equally near taps.
    left = np.ceil(x) - 1
    ratio = x - left
    left = left.astype(np.int64)
    if mode == "nearest":
        nm = attrs["nearest_mode"]
        if nm == "round_prefer_floor":
            right = ratio > 0.5
        elif nm == "round_prefer_ceil":
            right = ratio >= 0.5
        elif nm == "floor":
            right = ratio == 1
        else:
            right = np.ones_like(ratio, dtype=bool)
        idx = left + right
        return np.clip(idx, 0, n_in - 1)[:, None], None, outside
    radius = 1 if mode == "linear" else 2
    s = min(scale, 1.0) if attrs["antialias"] else 1.0
    first = math.floor(-radius / s) + 1  # taps left + first .. left + 1 - first
    offsets = np.arange(first, 2 - first)
    w = _kernel(mode, s * (offsets[None, :] - ratio[:, None]), attrs["cubic_coeff_a"])
    if attrs["antialias"]:
        w = w / w.sum(axis=1, keepdims=True)
    idx = left[:, None] + offsets[None, :]
    if attrs["exclude_outside"]:
        w = np.where((idx < 0) | (idx >= n_in), 0.0, w)
        total = w.sum(axis=1, keepdims=True)
        w = w / np.where(total == 0, 1.0, total)
    return np.clip(idx, 0, n_in - 1), w, outside


def _resize_axis(data: np.ndarray, axis: int, attrs: dict, n_out: int, scale: float,
                 roi: tuple[float, float], fill) -> np.ndarray:
    idx, w, outside = axis_taps(attrs, data.shape[axis], n_out, scale, roi)
    if w is None:
        out = np.take(data, idx[:, 0], axis=axis)
    else:
        wshape = [1] * data.ndim
        wshape[axis] = n_out
        out = None
        for t in range(idx.shape[1]):
            term = np.take(data, idx[:, t], axis=axis)
            term *= w[:, t].astype(data.dtype).reshape(wshape)
            out = term if out is None else np.add(out, term, out=out)
    if outside is not None and outside.any():
        mshape = [1] * data.ndim
        mshape[axis] = n_out
        out = np.where(outside.reshape(mshape), fill, out)
    return out


@register
class Resize(OpDef):
    """Resize x to the static shape ``size`` with ONNX Resize (opset 19) semantics.

    Each axis is resampled independently (separable): the output index y maps to the source
    coordinate given by ``coordinate_transformation_mode`` using that axis's ``scales`` entry
    (the ONNX scale; n_out / n_in when ONNX gave sizes), then ``nearest`` picks one source
    element by ``nearest_mode``, ``linear`` / ``cubic`` (Keys kernel with ``cubic_coeff_a``)
    weight 2 / 4 neighbours with edge-clamped indices. ``exclude_outside`` zeroes the weights of
    neighbours outside the input and renormalizes. ``antialias`` (linear/cubic, downscaling)
    stretches the kernel by 1/scale and normalizes it. ``tf_crop_and_resize`` samples the box
    ``roi`` (full-rank starts then ends, normalized) and writes ``extrapolation_value`` where the
    source lies outside the input. Axes with scale 1 and unchanged length are left as they are.
    Integer outputs are rounded half to even and saturated.
    """

    name = "resize"
    integer = "qresize"
    category = "resample"
    attrs = (
        Attr("size", INTS),
        Attr("scales", FLOATS),
        Attr("mode", STR, "nearest", RESIZE_MODES),
        Attr("coordinate_transformation_mode", STR, "half_pixel", COORD_MODES),
        Attr("nearest_mode", STR, "round_prefer_floor", NEAREST_MODES),
        Attr("cubic_coeff_a", FLOAT, -0.75),
        Attr("exclude_outside", INT, 0),
        Attr("extrapolation_value", FLOAT, 0.0),
        Attr("roi", FLOATS, []),
        Attr("antialias", INT, 0),
    )

    def infer(self, inputs, attrs):
        (x,) = inputs
        size, scales, roi = attrs["size"], attrs["scales"], attrs["roi"]
        if len(size) != x.rank:
            raise InferError(f"size {size} has {len(size)} entries, input {list(x.shape)} has "
                             f"rank {x.rank}")
        if len(scales) != x.rank:
            raise InferError(f"scales {scales} has {len(scales)} entries, input has rank "
                             f"{x.rank}")
        if any(s < 0 for s in size):
            raise InferError(f"size {size} has a negative entry")
        if any(not (s > 0 and math.isfinite(s)) for s in scales):
            raise InferError(f"scales {scales} must be positive and finite")
        if roi and len(roi) != 2 * x.rank:
            raise InferError(f"roi has {len(roi)} entries, expected 2 * rank = {2 * x.rank}")
        if attrs["mode"] != "nearest" and x.dtype not in FLOAT_DTYPES | _INT_DTYPES:
            raise InferError(f"{attrs['mode']} resize needs a float or integer input, got "
                             f"{x.dtype}")
        return [like(x, size)]

    def reference(self, inputs, attrs):
        (x,) = inputs
        rank = x.ndim
        roi = attrs["roi"] or [0.0] * rank + [1.0] * rank
        crop = attrs["coordinate_transformation_mode"] == "tf_crop_and_resize"
        nearest = attrs["mode"] == "nearest"
        data = x if nearest else x.astype(_compute_dtype(x.dtype))
        fill = attrs["extrapolation_value"]
        if nearest:
            fill = _saturate(np.asarray(fill, dtype=np.float64), x.dtype)
        for axis in range(rank):
            n_out, scale = attrs["size"][axis], attrs["scales"][axis]
            box = (roi[axis], roi[axis + rank])
            trivial_box = not crop or (math.isclose(box[0], 0.0) and math.isclose(box[1], 1.0))
            if n_out == data.shape[axis] and math.isclose(scale, 1.0) and trivial_box:
                continue
            if n_out == 0 or data.size == 0:
                shape = list(data.shape)
                shape[axis] = n_out
                data = np.zeros(shape, data.dtype)
                continue
            data = _resize_axis(data, axis, attrs, n_out, scale, box, fill)
        return [data if nearest else _saturate(data, x.dtype)]

    def macs(self, inputs, outputs, attrs):
        # One multiply-accumulate per tap of the separable kernel per resized axis of the output
        taps = {"nearest": 0, "linear": 2, "cubic": 4}[attrs["mode"]]
        resized = sum(a != b for a, b in zip(inputs[0].shape, outputs[0].shape, strict=True))
        return outputs[0].numel * taps * resized


# -- grid_sample ----------------------------------------------------------------------------
def _reflect(x: np.ndarray, twice_low: float, twice_high: float) -> np.ndarray:
    """Reflect x into [twice_low / 2, twice_high / 2] (PyTorch's reflect_coordinates)."""
    if twice_low == twice_high:
        return np.zeros_like(x)
    low, span = twice_low / 2, (twice_high - twice_low) / 2
    x = np.abs(x - low)
    extra = np.fmod(x, span)
    flips = np.floor(x / span)
    return np.where(flips % 2 == 0, extra + low, span - extra + low)


def _pad_coords(x: np.ndarray, n: int, padding: str, align: bool) -> np.ndarray:
    """Map coordinates into the input by the padding mode (zeros leaves them alone)."""
    if padding == "border":
        return np.clip(x, 0, n - 1)
    if padding == "reflection":
        x = _reflect(x, 0, 2 * (n - 1)) if align else _reflect(x, -1, 2 * n - 1)
        return np.clip(x, 0, n - 1)
    return x


def grid_taps(g: np.ndarray, n: int, attrs: dict) -> tuple[np.ndarray, np.ndarray]:
    """Per-point tap indices and weights (points..., taps) along one spatial axis.

    ``g`` holds the normalized coordinates in [-1, 1]. Taps outside the input get weight 0
    (zeros padding) and a clamped index.
    """
    mode, padding, align = attrs["mode"], attrs["padding_mode"], bool(attrs["align_corners"])
    x = (g + 1) / 2 * (n - 1) if align else ((g + 1) * n - 1) / 2
    if mode == "bicubic":
        # PyTorch pads each tap position rather than the sampling coordinate.
        pos = np.floor(x)[..., None] + np.arange(-1, 3)
        w = _kernel("cubic", pos - x[..., None], -0.75)
        pos = _pad_coords(pos, n, padding, align)
    else:
        x = _pad_coords(x, n, padding, align)
        if mode == "nearest":
            pos = np.rint(x)[..., None]
            w = np.ones_like(pos)
        else:
            base = np.floor(x)
            pos = base[..., None] + np.arange(2)
            w = np.stack([1 - (x - base), x - base], axis=-1)
    inside = (pos >= 0) & (pos <= n - 1)
    w = np.where(inside, w, 0.0)
    idx = np.clip(np.nan_to_num(pos), 0, n - 1).astype(np.int64)
    return idx, w


@register
class GridSample(OpDef):
    """Sample x (N, C, D1..Dr) at the points of grid (N, O1..Or, r), as torch grid_sample.

    grid[..., 0] is the normalized coordinate of the last spatial axis (x/width), grid[..., 1]
    of the one before, and so on; -1 and 1 are the centers of the corner elements when
    ``align_corners`` is 1 and their outer edges otherwise. ``bilinear`` and ``nearest``
    (round half to even) apply the padding mode to the sampling coordinate; ``bicubic`` (Keys
    a = -0.75) applies it to each of its 4 taps per axis. Padding: ``zeros`` reads 0 outside,
    ``border`` clamps, ``reflection`` mirrors at the borders. Output (N, C, O1..Or).
    With ``layout="NHWC"`` x and the output are channels-last (N, D1..Dr, C); grid is unchanged.
    """

    name = "grid_sample"
    integer = "qgrid_sample"
    category = "resample"
    inputs = ("x", "grid")
    attrs = (
        Attr("mode", STR, "bilinear", ("bilinear", "nearest", "bicubic")),
        Attr("padding_mode", STR, "zeros", ("zeros", "border", "reflection")),
        Attr("align_corners", INT, 0),
        LAYOUT_ATTR,
    )

    def infer(self, inputs, attrs):
        x_in, grid = inputs
        x = channels_first_type(x_in, attrs["layout"])
        require_float(grid, "grid")
        r = x.rank - 2
        if r < 1:
            raise InferError(f"x must have rank >= 3 (N, C, spatial...), got {list(x.shape)}")
        if grid.rank != r + 2 or grid.shape[-1] != r:
            raise InferError(f"grid must have shape (N, {', '.join(['O'] * r)}, {r}) for x "
                             f"{list(x.shape)}, got {list(grid.shape)}")
        if grid.shape[0] != x.shape[0]:
            raise InferError(f"grid batch {grid.shape[0]} != x batch {x.shape[0]}")
        if x.dtype not in FLOAT_DTYPES | _INT_DTYPES:
            raise InferError(f"x must be a float or integer tensor, got {x.dtype}")
        return [layout_result(like(x, (*x.shape[:2], *grid.shape[1:-1])), x_in, attrs["layout"])]

    def reference(self, inputs, attrs):
        x, grid = inputs
        x = to_channels_first(x, attrs["layout"])
        n, c, dims = x.shape[0], x.shape[1], x.shape[2:]
        r = len(dims)
        out_sp = grid.shape[1:-1]
        cdt = _compute_dtype(x.dtype)
        g = grid.reshape(n, -1, r).astype(np.float64)
        # grid's last entry indexes the first spatial axis of x, so walk it backwards
        taps = [grid_taps(g[..., r - 1 - d], dims[d], attrs) for d in range(r)]
        strides = [int(np.prod(dims[d + 1:], dtype=np.int64)) for d in range(r)]
        flat_x = x.reshape(n, c, -1).astype(cdt, copy=False)
        batch = np.arange(n)[:, None, None]
        chan = np.arange(c)[None, :, None]
        out = np.zeros((n, c, g.shape[1]), dtype=cdt)
        for combo in itertools.product(*(range(t[0].shape[-1]) for t in taps)):
            flat = sum(taps[d][0][..., k] * strides[d] for d, k in enumerate(combo))
            w = np.prod([taps[d][1][..., k] for d, k in enumerate(combo)], axis=0)
            out += flat_x[batch, chan, flat[:, None, :]] * w[:, None, :].astype(cdt)
        return [from_channels_first(_saturate(out.reshape(n, c, *out_sp), x.dtype),
                                    attrs["layout"])]

    def macs(self, inputs, outputs, attrs):
        r = inputs[0].rank - 2
        taps = {"nearest": 0, "bilinear": 2**r, "bicubic": 4**r}[attrs["mode"]]
        return outputs[0].numel * taps
