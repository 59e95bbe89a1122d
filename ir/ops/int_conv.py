"""Exact integer convolution of the numpy kernels: the accumulators of ``qconv`` before any
rescale (docs/quantization.md, "Exact fast paths of the numpy kernels").

Depthwise convolutions multiply-accumulate per kernel tap in int32 (int64 past ``2^31``); others
are im2col matrix products by :func:`~hbc.ir.fixed_point.plan_matmul` (float32 chunks below
``2^24``, float64 or int64 beyond), the bias folded in as one more weight column where exactness
allows. :mod:`hbc.ir.ops.qops` rescales what these return; :mod:`hbc.ir.native` reuses
:func:`conv_columns` for its int8 products.
"""

from __future__ import annotations

import math

import numpy as np

from ..fixed_point import (
    abs_max,
    broadcast_buffers,
    cached,
    chunk_l1_max,
    exact_matmul,
    plan_matmul,
    value_bound,
)
from .nn import conv_nd, conv_out_shape, conv_windows, pad_as
from .pool import StridePhases
from .window import tap_slices


def int_conv(x: np.ndarray, w: np.ndarray, strides, pads, dilations, groups: int,
             dtype: np.dtype | None = None) -> np.ndarray:
    """Exact ``conv(x, w)`` (NCHW, no bias) of integer arrays as int64: by
    :func:`int_conv_acc`, or with ``dtype`` one im2col matrix product per group in that dtype
    (conv_nd; float64 is exact by :func:`exact_dtype`)."""
    if dtype is None:
        return int_conv_acc(x, w, strides, pads, dilations, groups)[0].astype(np.int64)
    y = conv_nd(x.astype(dtype), w.astype(dtype), strides, pads, dilations, groups)
    return y.astype(np.int64)


def int_conv_acc(x: np.ndarray, w: np.ndarray, strides, pads, dilations, groups: int,
                 key: np.ndarray | None = None, bias: np.ndarray | None = None
                 ) -> tuple[np.ndarray, int, bool]:
    """Exact ``conv(x, w)`` (NCHW) of integer arrays: integers in a float32, float64, int32 or
    int64 array [N, Cout, *out] (possibly a strided view), a bound on their magnitudes, and
    whether the ``bias`` (i32[Cout], optional) is included (when exactness allows).

    Depthwise convolutions multiply-accumulate per kernel tap in int32 (int64 past ``2^31``);
    others are matrix products by :func:`plan_matmul` (float32 chunks below ``2^24``) of im2col
    columns built directly in the product's dtype (the input itself for 1x1), with the bias as
    one more weight column over a row of ones. ``key``: the weight array as the graph holds
    it (its L1 norms are derived once)."""
    batch = x.shape[0]
    cout, cg = w.shape[:2]
    kernel = w.shape[2:]
    key = w if key is None else key
    # an i8 input's range is as good a bound as its data's (one pass over x saved)
    xmax = value_bound(x) if x.dtype == np.int8 else abs_max(x)
    bmax = 0 if bias is None else abs_max(bias)
    if cg == 1 and groups > 1:
        return _int_depthwise(x, w, strides, pads, dilations, groups, xmax, key, bias, bmax)
    w3 = w.reshape(groups, cout // groups, cg * math.prod(kernel))
    plan = plan_matmul(w3, xmax, key, bmax)
    if bias is not None and plan.dtype == np.int64:
        plan = plan_matmul(w3, xmax, key)  # no bias column on the (never used) int64 path
        bias = None
    ones = 0 if bias is None else 1
    cols, out = conv_columns(x, kernel, strides, pads, dilations, groups, plan.dtype, ones)
    y = exact_matmul(w3, cols, plan, None if bias is None else bias.reshape(groups, -1))
    return y.reshape(batch, cout, *out), plan.bound, bias is not None


def conv_columns(x: np.ndarray, kernel, strides, pads, dilations, groups: int,
                 dtype: np.dtype, ones: int = 0) -> tuple[np.ndarray, list[int]]:
    """The im2col columns [N, G, K (+ a row of ones), P] of ``x`` (NCHW) in ``dtype``, built in
    one copy (1x1: the (strided) input itself), and the output's spatial shape."""
    n = x.ndim - 2
    batch, cg = x.shape[0], x.shape[1] // groups
    k = cg * math.prod(kernel)
    padded = [s + pads[i] + pads[n + i] for i, s in enumerate(x.shape[2:])]
    out = conv_out_shape(padded, kernel, strides, dilations)
    if math.prod(kernel) == 1 and not any(pads):
        xs = x[(slice(None), slice(None)) + tap_slices([0] * n, out, strides, dilations)]
        if not ones and xs.dtype == dtype and xs.flags.c_contiguous:
            return xs.reshape(batch, groups, k, math.prod(out)), out  # no copy at all
        cols = np.empty((batch, groups, k + ones, math.prod(out)), dtype)
        np.copyto(_split(cols, k, (batch, groups, cg, *out)),
                  xs.reshape(batch, groups, cg, *out), casting="unsafe")
    else:
        cols = np.empty((batch, groups, k + ones, math.prod(out)), dtype)
        xp = pad_as(x, pads[:n], pads[n:], dtype)
        win = conv_windows(xp, kernel, strides, dilations, out)
        win = win.reshape(batch, groups, cg, *out, *kernel)
        perm = (0, 1, 2, *range(3 + n, 3 + 2 * n), *range(3, 3 + n))
        np.copyto(_split(cols, k, (batch, groups, cg, *kernel, *out)), win.transpose(perm))
    if ones:
        cols[:, :, k] = 1
    return cols, out


def _split(cols: np.ndarray, k: int, shape: tuple[int, ...]) -> np.ndarray:
    """The first ``k`` rows of the columns [N, G, K (+1), P] as a view of ``shape`` (K and P
    split into their factors), for copying into."""
    view = cols[:, :, :k].reshape(shape)
    if view.base is not cols:  # splitting axes never copies; a copy would be filled in vain
        raise RuntimeError("im2col columns: reshape copied")
    return view


def _int_depthwise(x: np.ndarray, w: np.ndarray, strides, pads, dilations, groups: int,
                   xmax: int, key: np.ndarray | None, bias: np.ndarray | None, bmax: int
                   ) -> tuple[np.ndarray, int, bool]:
    """One input channel per group: per kernel tap, ``acc += x_shifted * w_tap`` over all
    channels at once, then ``+ bias``, in int32 when ``xmax * ||w[c]||_1 + |b| < 2^31``
    (always for i8 inputs and i32 biases of real models), else int64: exact integer arithmetic.

    Every tap is one long contiguous operation per channel: on the stride phases of the
    padded input (:class:`StridePhases`; the padded input itself for unit strides) flattened
    with row length ``R`` a tap is an offset, so the outputs are computed on the grid
    ``o_h * R + o_w`` and the extra columns are never read."""
    n = x.ndim - 2
    batch = x.shape[0]
    cout, kernel = w.shape[0], w.shape[2:]
    mult = cout // groups
    bound = xmax * chunk_l1_max(w.reshape(cout, -1), 1, key) + bmax
    dtype = np.dtype(np.int32 if bound < 2**31 else np.int64)
    xp = pad_as(x, pads[:n], pads[n:], dtype)
    out = conv_out_shape(xp.shape[2:], kernel, strides, dilations)
    phases = StridePhases(xp, kernel, strides, dilations, out)
    views, length, rows = phases.flat_views((batch, groups, 1))
    wt = cached((key,), ("depthwise", dtype.str, groups),
                lambda: w.reshape(groups, mult, -1, 1).astype(dtype))  # [G, mult, taps, 1]
    acc = _mac_taps(views, wt, (batch, groups, mult, length), dtype)
    if bias is not None:
        with broadcast_buffers(length, acc.size):
            acc += bias.reshape(groups, mult, 1).astype(dtype)
    item = acc.itemsize
    y = np.lib.stride_tricks.as_strided(
        acc, (batch, cout, *out), (acc.strides[0], length * item, *(r * item for r in rows)))
    return y, bound, bias is not None


def _mac_taps(views: list[np.ndarray], wt: np.ndarray, shape: tuple[int, ...],
              dtype: np.dtype) -> np.ndarray:
    """``sum_t views[t] * wt[:, :, t]`` into a new array of ``shape`` (one temporary)."""
    acc = np.empty(shape, dtype)
    tmp = np.empty(shape, dtype)
    with broadcast_buffers(shape[-1], math.prod(shape)):
        for t, view in enumerate(views):
            np.multiply(view, wt[:, :, t], out=acc if t == 0 else tmp)
            if t:
                acc += tmp
    return acc
