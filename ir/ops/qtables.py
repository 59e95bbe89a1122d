"""Integer ops that sample or look up: qresize, qgrid_sample (compile-time index/weight
tables) and lut, qsoftmax (compile-time tables). Semantics: docs/quantization.md."""

from __future__ import annotations

import numpy as np

from ..fixed_point import INT_RANGES, saturate
from ..registry import INT, STR, Attr, InferError, register
from ..types import TensorType
from .common import (
    LAYOUT_ATTR,
    channels_first_type,
    from_channels_first,
    layout_result,
    like,
    norm_axis,
    to_channels_first,
)
from .qops import (
    _MS,
    ACT_DTYPES,
    _check_ms,
    _IntOp,
    _out_attrs,
    _require,
    _rescale_finish,
    out_bounds,
)


def _check_index(what: str, idx: np.ndarray, lo: int, hi: int) -> None:
    """Compile-time index tables must lie in [lo, hi)."""
    bad = (idx < lo) | (idx >= hi)
    if bad.any():
        i = np.unravel_index(int(np.flatnonzero(bad)[0]), idx.shape)
        raise InferError(f"{what}: index {int(idx[i])} at {list(map(int, i))} is outside "
                         f"[{lo}, {hi})")


@register
class QResize(_IntOp):
    """Separable bilinear resize with compile-time tables: ``acc = sum_a sum_b wh[h,a] *
    ww[w,b] * x[.., ih[h,a], iw[w,b]]``, ``y = sat_lohi((acc*m + R) >> s)``. x: i8/i16
    [N, C, H, W] (or NHWC); ih, wh: i32[Ho, T]; iw, ww: i32[Wo, T] (T = 2 taps, weights with
    8 fraction bits, each row summing to 256)."""

    name = "qresize"
    inputs = ("x", "ih", "wh", "iw", "ww")
    attrs = (LAYOUT_ATTR, *_MS, *_out_attrs())

    def infer(self, inputs, attrs):
        x_in, ih, wh, iw, ww = inputs
        x = channels_first_type(x_in, attrs["layout"])
        _require(x, "qresize input x")
        if x.rank != 4:
            raise InferError(f"qresize input must have rank 4, got shape {list(x.shape)}")
        for name, t in (("ih", ih), ("wh", wh), ("iw", iw), ("ww", ww)):
            _require(t, f"qresize table {name}", ("i32",))
        if ih.rank != 2 or ih.shape != wh.shape or iw.rank != 2 or iw.shape != ww.shape:
            raise InferError(f"qresize: tables must be ih, wh [Ho, T] and iw, ww [Wo, T], got "
                             f"{list(ih.shape)}, {list(wh.shape)}, {list(iw.shape)}, "
                             f"{list(ww.shape)}")
        _check_ms("qresize", attrs["m"], attrs["s"])
        out_bounds(attrs)
        shape = (*x.shape[:2], ih.shape[0], iw.shape[0])
        return [layout_result(like(x, shape, attrs["out_dtype"]), x_in, attrs["layout"])]

    def reference(self, inputs, attrs):
        x, ih, wh, iw, ww = inputs
        x = to_channels_first(x, attrs["layout"])
        _check_index("qresize ih", ih, 0, x.shape[2])
        _check_index("qresize iw", iw, 0, x.shape[3])
        x64, wh, ww = x.astype(np.int64), wh.astype(np.int64), ww.astype(np.int64)
        rows = sum(x64[:, :, ih[:, a], :] * wh[:, a, None] for a in range(ih.shape[1]))
        acc = sum(rows[:, :, :, iw[:, b]] * ww[:, b] for b in range(iw.shape[1]))
        y = _rescale_finish([(acc, attrs["m"], None)], attrs["s"], attrs)
        return [from_channels_first(y, attrs["layout"])]

    def macs(self, inputs, outputs, attrs):
        return outputs[0].numel * 2 * inputs[1].shape[1]


@register
class QGridSample(_IntOp):
    """Bilinear sampling on a compile-time grid: ``acc[n, c, h, w] = sum_k wt[n,h,w,k] *
    x[n, c].flat[idx[n,h,w,k]]`` (index -1 reads 0: zeros padding), ``y = sat_lohi((acc*m +
    R) >> s)``. x: i8/i16 [N, C, H, W] (or NHWC); idx, wt: i32[N, Ho, Wo, K] (K = 4 taps,
    weights with 16 fraction bits in total); y: [N, C, Ho, Wo]."""

    name = "qgrid_sample"
    inputs = ("x", "idx", "wt")
    attrs = (LAYOUT_ATTR, *_MS, *_out_attrs())

    def infer(self, inputs, attrs):
        x_in, idx, wt = inputs
        x = channels_first_type(x_in, attrs["layout"])
        _require(x, "qgrid_sample input x")
        _require(idx, "qgrid_sample idx", ("i32",))
        _require(wt, "qgrid_sample wt", ("i32",))
        if x.rank != 4 or idx.rank != 4 or wt.shape != idx.shape or idx.shape[0] != x.shape[0]:
            raise InferError(f"qgrid_sample: x must be [N, C, H, W] and idx, wt [N, Ho, Wo, K] "
                             f"with the same N, got x {list(x.shape)}, idx {list(idx.shape)}, "
                             f"wt {list(wt.shape)}")
        _check_ms("qgrid_sample", attrs["m"], attrs["s"])
        out_bounds(attrs)
        shape = (*x.shape[:2], *idx.shape[1:3])
        return [layout_result(like(x, shape, attrs["out_dtype"]), x_in, attrs["layout"])]

    def reference(self, inputs, attrs):
        x, idx, wt = inputs
        x = to_channels_first(x, attrs["layout"])
        n, c, h, w = x.shape
        _check_index("qgrid_sample idx", idx, -1, h * w)
        flat = np.concatenate([x.reshape(n, c, h * w), np.zeros((n, c, 1), x.dtype)], axis=2)
        taps = np.where(idx < 0, h * w, idx).reshape(n, 1, -1)
        picked = np.take_along_axis(flat, taps, axis=2).reshape(n, c, *idx.shape[1:])
        acc = (picked.astype(np.int64) * wt[:, None].astype(np.int64)).sum(axis=-1)
        y = _rescale_finish([(acc, attrs["m"], None)], attrs["s"], attrs)
        return [from_channels_first(y, attrs["layout"])]

    def macs(self, inputs, outputs, attrs):
        return outputs[0].numel * inputs[1].shape[-1]


# -- tables ----------------------------------------------------------------------------------
def _check_table(what: str, x: TensorType, table: TensorType, dtypes: tuple[str, ...]) -> None:
    _require(table, f"{what} table", dtypes)
    size = 2 ** (8 * x.np_dtype.itemsize)
    if table.shape != (size,):
        raise InferError(f"{what}: a {x.dtype} input needs a table of shape [{size}], got "
                         f"{list(table.shape)}")


@register
class Lut(_IntOp):
    """Table lookup ``y = table[x - min(x.dtype)]``; y has the table's dtype. x: i8/i16;
    table: i8/i16 [256] for i8 x, [65536] for i16 x (built at compile time)."""

    name = "lut"
    inputs = ("x", "table")

    def infer(self, inputs, attrs):
        x, table = inputs
        _require(x, "lut input x")
        _check_table("lut", x, table, ACT_DTYPES)
        return [like(x, dtype=table.dtype)]

    def reference(self, inputs, attrs):
        x, table = inputs
        return [table[x.astype(np.intp) - int(np.iinfo(x.dtype).min)]]


@register
class QSoftmax(_IntOp):
    """Integer softmax along ``axis``: ``d = x - max(x)``, ``e = table[-d]``, ``t = sum(e)``,
    ``y = min((e * 2^bits + t // 2) // t, max(out_dtype))`` at scale ``2^-bits``. x: i8/i16;
    table: i32 [256] for i8 x, [65536] for i16 x, ``table[i] = round_half_even(exp(-i*s_x) *
    2^15)``. ``bits`` defaults to 7 (i8 output) or 15 (i16 output)."""

    name = "qsoftmax"
    inputs = ("x", "table")
    attrs = (Attr("axis", INT, -1), Attr("bits", INT, None),
             Attr("out_dtype", STR, "i8", choices=ACT_DTYPES))

    def infer(self, inputs, attrs):
        x, table = inputs
        _require(x, "qsoftmax input x")
        _check_table("qsoftmax", x, table, ("i32",))
        axis = norm_axis(attrs["axis"], x.rank, "qsoftmax axis")
        if x.shape[axis] > 2**16:
            raise InferError(f"qsoftmax: axis length {x.shape[axis]} exceeds 65536 (the sum of "
                             f"exponentials must fit int32)")
        bits, most = _softmax_bits(attrs), INT_RANGES[attrs["out_dtype"]][1].bit_length()
        if not 0 <= bits <= most:
            raise InferError(f"qsoftmax: bits={bits} must be in [0, {most}] for "
                             f"out_dtype={attrs['out_dtype']}")
        return [like(x, dtype=attrs["out_dtype"])]

    def reference(self, inputs, attrs):
        x, table = inputs
        if table[0] <= 0 or (table < 0).any():
            raise InferError("qsoftmax: the exponential table must be >= 0 with table[0] > 0")
        axis = norm_axis(attrs["axis"], x.ndim)
        x64 = x.astype(np.int64)
        e = table.astype(np.int64)[x64.max(axis=axis, keepdims=True) - x64]
        t = e.sum(axis=axis, keepdims=True)
        y = ((e << _softmax_bits(attrs)) + t // 2) // t
        hi = INT_RANGES[attrs["out_dtype"]][1]
        return [saturate(y, 0, hi, attrs["out_dtype"])]


def _softmax_bits(attrs: dict) -> int:
    if attrs["bits"] is not None:
        return attrs["bits"]
    return 7 if attrs["out_dtype"] == "i8" else 15
