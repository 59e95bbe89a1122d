"""The table-driven integer ops of ``lower-int``: their rules, and their compile-time tables
built in float64 from the float ops' own arithmetic (docs/quantization.md):

- ``lut``: ``table[i] = sat(round_half_even(f((i + min) * s_x) / s_y))`` over every input
  integer (256 entries for i8, 65536 for i16);
- ``qsoftmax``: ``table[i] = round_half_even(exp(-i * s_x) * 2^15)`` for every difference
  ``i = max - x`` the input dtype allows;
- ``qresize``: per axis, the two source indices and the weights of each output from the float
  resize's own coordinate mapping (``resample.axis_taps``), weights with 8 fraction bits;
- ``qgrid_sample``: the four flat indices (-1 = outside, reads 0) and weights with 8 fraction
  bits per axis (16 in total) of each sampling point, from ``resample.grid_taps``.

Weights are rounded half to even; a pair of weights that sums to 1 is fixed to sum to 256 by
adjusting the larger weight, so a constant input stays constant.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hbc.ir.graph import Node, Value
from hbc.ir.ops.quant import INT_RANGES
from hbc.ir.ops.resample import axis_taps, grid_taps
from hbc.ir.registry import get_op
from hbc.ir.types import QuantParams, numpy_dtype

from .lower_context import LowerContext, qscale, rescaled_attrs

#: fraction bits of resize and grid_sample weights, per axis
WEIGHT_BITS = 8


def lut_table(f: Callable[[np.ndarray], np.ndarray], in_dtype: str, s_x: float, s_y: float,
              out_dtype: str) -> np.ndarray:
    """The lut table of float function ``f`` from inputs of ``in_dtype``/``s_x`` to outputs of
    ``out_dtype``/``s_y``."""
    lo, hi = INT_RANGES[in_dtype]
    real = np.arange(lo, hi + 1, dtype=np.float64) * s_x
    with np.errstate(all="ignore"):
        y = np.asarray(f(real), dtype=np.float64) / s_y
    olo, ohi = INT_RANGES[out_dtype]
    return np.clip(np.rint(y), olo, ohi).astype(numpy_dtype(out_dtype))


def softmax_table(s_x: float, in_dtype: str) -> np.ndarray:
    """exp(-i * s_x) with 15 fraction bits for i in [0, max - min of ``in_dtype``]."""
    lo, hi = INT_RANGES[in_dtype]
    i = np.arange(hi - lo + 1, dtype=np.float64)
    return np.rint(np.exp(-i * s_x) * 2.0**15).astype(np.int32)


def fixed_weights(w: np.ndarray) -> np.ndarray:
    """Weights (..., taps) as int32 with :data:`WEIGHT_BITS` fraction bits; rows that sum to 1
    are fixed to sum to exactly 2^bits (the larger weight absorbs the difference)."""
    one = 1 << WEIGHT_BITS
    flat = w.reshape(-1, w.shape[-1]).astype(np.float64)
    q = np.rint(flat * one).astype(np.int64)
    unit = np.abs(flat.sum(axis=1) - 1.0) < 1e-9
    rows = np.nonzero(unit)[0]
    big = np.argmax(flat[rows], axis=1)
    q[rows, big] += one - q[rows].sum(axis=1)
    return q.reshape(w.shape).astype(np.int32)


def _identity_taps(n: int) -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(n)
    return np.stack([i, i], axis=1), np.stack([np.ones(n), np.zeros(n)], axis=1)


def resize_tables(attrs: dict[str, Any], in_shape: Sequence[int], out_shape: Sequence[int],
                  layout: str) -> tuple[np.ndarray, ...] | str:
    """(ih, wh, iw, ww) of a bilinear resize over H and W, or why there is no qresize form."""
    if attrs["mode"] != "linear":
        return f"{attrs['mode']} resize has no integer form"
    if attrs["antialias"] or attrs["coordinate_transformation_mode"] == "tf_crop_and_resize":
        return "antialiased or tf_crop_and_resize resize has no integer form"
    if len(in_shape) != 4:
        return f"linear resize of a rank-{len(in_shape)} tensor has no integer form"
    hw = (1, 2) if layout == "NHWC" else (2, 3)
    for a in range(4):
        if a not in hw and (in_shape[a] != out_shape[a] or
                            not math.isclose(attrs["scales"][a], 1.0)):
            return f"linear resize of axis {a} (not H or W) has no integer form"
    tables = []
    for a in hw:
        n_in, n_out, scale = in_shape[a], out_shape[a], attrs["scales"][a]
        if n_in == n_out and math.isclose(scale, 1.0):
            idx, w = _identity_taps(n_in)
        else:
            idx, w, _ = axis_taps(attrs, n_in, n_out, scale, (0.0, 1.0))
            if w is None or idx.shape[1] != 2:
                return "resize kernel is not two-tap bilinear"
        tables += [idx.astype(np.int32), fixed_weights(w)]
    return tuple(tables)


def grid_tables(attrs: dict[str, Any], x_shape: Sequence[int], grid: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray] | str:
    """(idx i32[N,Ho,Wo,4], wt i32[N,Ho,Wo,4]) of a 2-D grid_sample with a constant grid."""
    if attrs["mode"] == "bicubic":
        return "bicubic grid_sample has no integer form"
    if len(x_shape) != 4:
        return f"grid_sample of a rank-{len(x_shape)} input has no integer form"
    h, w = (x_shape[1], x_shape[2]) if attrs["layout"] == "NHWC" else (x_shape[2], x_shape[3])
    g = grid.astype(np.float64)
    (ih, wh), (iw, ww) = (_two_taps(*grid_taps(g[..., 1], h, attrs)),
                          _two_taps(*grid_taps(g[..., 0], w, attrs)))
    wh, ww = fixed_weights(wh), fixed_weights(ww)
    idx, wt = [], []
    for a in range(2):
        for b in range(2):
            weight = wh[..., a] * ww[..., b]
            idx.append(np.where(weight != 0, ih[..., a] * w + iw[..., b], -1))
            wt.append(weight)
    return np.stack(idx, -1).astype(np.int32), np.stack(wt, -1).astype(np.int32)


def _two_taps(idx: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Taps padded to two per point (nearest has one; the second gets weight 0)."""
    if idx.shape[-1] == 2:
        return idx, w
    return (np.concatenate([idx, idx], axis=-1),
            np.concatenate([w, np.zeros_like(w)], axis=-1))


# -- the rules of the table-driven ops -----------------------------------------------------------
def lower_lut(lc: LowerContext, node: Node) -> str | None:
    """sigmoid, tanh, hard_sigmoid, hard_swish, leaky_relu -> lut(x, table)."""
    opdef = get_op(node.op)
    return emit_lut(lc, node, node.inputs[0], lambda a: opdef.reference([a], node.attrs)[0])


def emit_lut(lc: LowerContext, node: Node, xf: Value, f: Callable) -> None:
    """lut(x, table) with ``table[i] = sat(rhe(f((i + min) * s_x) / s_y))``."""
    x = lc.as_int(xf)
    y = node.outputs[0]
    s_y, dtype = lc.act_scale(y), lc.out_dtype(y)
    table = lut_table(f, x.dtype, qscale(x), s_y, dtype)
    lc.emit(node, "lut", [x, lc.add_const(f"{node.name}.table", table)], {},
            [QuantParams((s_y,))])
    return None


def lower_softmax(lc: LowerContext, node: Node) -> str | None:
    """softmax -> qsoftmax(x, exp table); output scale 2^-bits."""
    x = lc.as_int(node.inputs[0])
    dtype = lc.out_dtype(node.outputs[0])
    bits = 7 if dtype == "i8" else 15
    table = lc.add_const(f"{node.name}.table", softmax_table(qscale(x), x.dtype))
    lc.emit(node, "qsoftmax", [x, table], {"axis": node.attrs["axis"], "out_dtype": dtype},
            [QuantParams((2.0**-bits,))])
    return None


def lower_bilinear_resize(lc: LowerContext, node: Node) -> str | None:
    """Bilinear resize over H and W -> qresize with per-axis tables."""
    xf = node.inputs[0]
    layout = "NHWC" if xf.type.layout == "NHWC" else "NCHW"
    tables = resize_tables(node.attrs, xf.shape, node.outputs[0].shape, layout)
    if isinstance(tables, str):
        return tables
    x = lc.as_int(xf)
    consts = [lc.add_const(f"{node.name}.{k}", t) for k, t in zip(("ih", "wh", "iw", "ww"),
                                                                   tables, strict=True)]
    attrs = {"layout": layout, **rescaled_attrs(lc, node, x, 2.0**16)}
    lc.emit(node, "qresize", [x, *consts], attrs, [QuantParams((lc.act_scale(node.outputs[0]),))])
    return None


def lower_grid_sample(lc: LowerContext, node: Node) -> str | None:
    """grid_sample with a constant grid -> qgrid_sample with compile-time indices/weights."""
    grid = lc.const_array(node.inputs[1])
    if grid is None:
        return "the sampling grid is not a constant"
    tables = grid_tables(node.attrs, node.inputs[0].shape, grid)
    if isinstance(tables, str):
        return tables
    x = lc.as_int(node.inputs[0])
    idx, wt = (lc.add_const(f"{node.name}.{k}", t) for k, t in zip(("idx", "wt"), tables,
                                                                    strict=True))
    attrs = {"layout": node.attrs["layout"], **rescaled_attrs(lc, node, x, 2.0**16)}
    lc.emit(node, "qgrid_sample", [x, idx, wt], attrs,
            [QuantParams((lc.act_scale(node.outputs[0]),))])
    return None
