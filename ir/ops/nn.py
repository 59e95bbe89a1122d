"""Neural-network compute ops: conv, conv_transpose, batch_norm, gemm, matmul.

Convolutions are N-d (1 to 3 spatial dims) with ONNX semantics; x and y are [N, C, *spatial]
(``layout="NCHW"``, the default) or [N, *spatial, C] (``layout="NHWC"``), the weights always
[Cout, Cin/groups, *kernel] (conv) or [Cin, Cout/groups, *kernel] (conv_transpose). ``pads`` is in
ONNX order ``[x1_begin, x2_begin, ..., x1_end, x2_end, ...]``; ``strides``, ``pads`` and
``dilations`` are always explicit (the frontend resolves ``auto_pad``).

The float references accumulate in float32 (float64 for f64 inputs) as onnxruntime does, and round
f16 results once at the end. Convolution uses im2col with one (batched) matrix product per call;
depthwise convolution multiply-accumulates over kernel taps instead.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..registry import FLOAT, INT, INTS, Attr, InferError, OpDef, register
from ..types import FLOAT_DTYPES, TensorType
from .common import (
    LAYOUT_ATTR,
    broadcast_shapes,
    channels_first_type,
    from_channels_first,
    layout_result,
    like,
    require_float,
    same_dtype,
    to_channels_first,
)
from .window import (
    WINDOW_ATTRS,
    acc_dtype,
    check_window_attrs,
    pad_spatial,
    spatial_out_shape,
    tap_slices,
)


def _spatial(x: TensorType, w: TensorType, what: str, b: TensorType | None) -> int:
    """Common rank/dtype checks of conv-like ops; returns the number of spatial dims."""
    require_float(x, f"{what} input x")
    same_dtype([x, w, b], f"{what} x, w and b")
    if x.rank not in (3, 4, 5):
        raise InferError(f"{what} input x must have rank 3 to 5 (N, C, 1-3 spatial dims), got "
                         f"shape {list(x.shape)}")
    if w.rank != x.rank:
        raise InferError(f"{what} weight w must have the rank of x ({x.rank}), got shape "
                         f"{list(w.shape)}")
    return x.rank - 2


def _check_bias(what: str, b: TensorType | None, cout: int) -> None:
    if b is not None and b.shape != (cout,):
        raise InferError(f"{what} bias b must have shape [{cout}] (output channels), got "
                         f"{list(b.shape)}")


def _pad3(inputs: Sequence) -> list:
    """The three inputs of an op whose third is optional (it may be left out of the list)."""
    return [*inputs, None, None, None][:3]


def _add_bias(y: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    if b is not None:
        y += b.astype(y.dtype).reshape((1, -1) + (1,) * (y.ndim - 2))
    return y


# -- conv ----------------------------------------------------------------------------------------
@register
class Conv(OpDef):
    """N-d convolution (cross-correlation), ONNX Conv: y[n, co] = sum over ci in co's group and
    kernel taps of x_padded[n, ci, o*stride + k*dilation] * w[co, ci, k] (+ b[co]).

    x: [N, Cin, *spatial]; w: [Cout, Cin/groups, *kernel]; b: [Cout].
    Output spatial size: floor((in + pad_begin + pad_end - ((k-1)*dilation + 1)) / stride) + 1.
    With ``layout="NHWC"`` x and y are channels-last ([N, *spatial, C]).
    """

    name = "conv"
    integer = "qconv"
    inputs = ("x", "w", "b?")
    attrs = (*WINDOW_ATTRS, Attr("groups", INT, 1), LAYOUT_ATTR)
    category = "nn"

    def infer(self, inputs, attrs):
        x_in, w, b = _pad3(inputs)
        x = channels_first_type(x_in, attrs["layout"])
        n = _spatial(x, w, "conv", b)
        check_window_attrs("conv", n, attrs)
        groups, cin, cout = attrs["groups"], x.shape[1], w.shape[0]
        if groups < 1 or cin % groups or cout % groups:
            raise InferError(f"conv: groups={groups} must be >= 1 and divide the input channels "
                             f"({cin}) and output channels ({cout})")
        if w.shape[1] * groups != cin:
            raise InferError(f"conv: x has {cin} channels but w {list(w.shape)} with "
                             f"groups={groups} expects {w.shape[1] * groups}")
        _check_bias("conv", b, cout)
        out = spatial_out_shape("conv", x.shape[2:], w.shape[2:], attrs)
        return [layout_result(like(x, (x.shape[0], cout, *out)), x_in, attrs["layout"])]

    def reference(self, inputs, attrs):
        x, w, b = _pad3(inputs)
        x = to_channels_first(x, attrs["layout"])
        acc = acc_dtype(x.dtype)
        y = conv_nd(x.astype(acc, copy=False), w.astype(acc, copy=False), attrs["strides"],
                    attrs["pads"], attrs["dilations"], attrs["groups"])
        y = _add_bias(y, b).astype(x.dtype, copy=False)
        return [from_channels_first(y, attrs["layout"])]

    def macs(self, inputs, outputs, attrs):
        x, w = channels_first_type(inputs[0], attrs["layout"]), inputs[1]
        return outputs[0].numel * (x.shape[1] // attrs["groups"]) * math.prod(w.shape[2:])


def conv_nd(x: np.ndarray, w: np.ndarray, strides: Sequence[int], pads: Sequence[int],
            dilations: Sequence[int], groups: int) -> np.ndarray:
    """ONNX Conv without bias on arrays of one float dtype (no dtype conversion)."""
    n = x.ndim - 2
    batch, cin = x.shape[:2]
    cout, cg = w.shape[:2]
    kernel = w.shape[2:]
    xp = pad_spatial(x, pads[:n], pads[n:])
    out = conv_out_shape(xp.shape[2:], kernel, strides, dilations)
    if cg == 1 and groups > 1:
        return _depthwise(xp, w, strides, dilations, out, groups)
    coutg, ksize, osize = cout // groups, math.prod(kernel), math.prod(out)
    win = conv_windows(xp, kernel, strides, dilations, out)
    # [N, G, cg, *out, *kernel] -> columns [G, cg*K, N*O] in the weight's (cg, kernel) order
    win = win.reshape(batch, groups, cg, *out, *kernel)
    perm = (1, 2, *range(3 + n, 3 + 2 * n), 0, *range(3, 3 + n))
    cols = win.transpose(perm).reshape(groups, cg * ksize, batch * osize)
    y = np.matmul(w.reshape(groups, coutg, cg * ksize), cols)  # [G, coutg, N*O]
    y = y.reshape(cout, batch, *out)
    return np.ascontiguousarray(np.moveaxis(y, 1, 0))


def conv_out_shape(padded: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                   dilations: Sequence[int]) -> list[int]:
    """Output spatial shape of a convolution over an already padded input."""
    return [(p - (k - 1) * d - 1) // s + 1
            for p, k, s, d in zip(padded, kernel, strides, dilations, strict=True)]


def conv_windows(xp: np.ndarray, kernel: Sequence[int], strides: Sequence[int],
                 dilations: Sequence[int], out: Sequence[int]) -> np.ndarray:
    """A view [N, C, *out, *kernel] of the padded input: the window of every output position."""
    n = len(kernel)
    lead = (slice(None), slice(None))
    if math.prod(kernel) == 1:
        win = xp[lead + tap_slices([0] * n, out, strides, dilations)]
        return win.reshape(*xp.shape[:2], *out, *kernel)
    ext = [(k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True)]
    win = sliding_window_view(xp, ext, axis=tuple(range(2, 2 + n)))
    return win[lead + tuple(slice(None, None, s) for s in strides)
               + tuple(slice(None, None, d) for d in dilations)]


def pad_as(x: np.ndarray, begins: Sequence[int], ends: Sequence[int],
           dtype: np.dtype) -> np.ndarray:
    """``x`` zero-padded on its trailing ``len(begins)`` axes and converted to ``dtype`` in one
    copy (``x`` itself when it needs neither)."""
    n = len(begins)
    if not any(begins) and not any(ends):
        return x.astype(dtype, copy=False)
    size = x.shape[x.ndim - n:]
    shape = [s + b + e for s, b, e in zip(size, begins, ends, strict=True)]
    out = np.zeros((*x.shape[:x.ndim - n], *shape), dtype)
    out[(...,) + tuple(slice(b, b + s) for b, s in zip(begins, size, strict=True))] = x
    return out


def _depthwise(xp: np.ndarray, w: np.ndarray, strides: Sequence[int],
               dilations: Sequence[int], out: Sequence[int], groups: int) -> np.ndarray:
    """One input channel per group: multiply-accumulate over kernel taps, all channels at once."""
    n = len(out)
    batch = xp.shape[0]
    mult = w.shape[0] // groups
    kernel = w.shape[2:]
    wr = w.reshape(groups, mult, *kernel)
    acc = np.zeros((batch, groups, mult, *out), dtype=xp.dtype)
    lead = (slice(None), slice(None))
    for tap in itertools.product(*map(range, kernel)):
        xs = xp[lead + tap_slices(tap, out, strides, dilations)]
        acc += xs[:, :, None] * wr[lead + tap].reshape(1, groups, mult, *[1] * n)
    return acc.reshape(batch, groups * mult, *out)


# -- conv_transpose ------------------------------------------------------------------------------
@register
class ConvTranspose(OpDef):
    """N-d transposed convolution, ONNX ConvTranspose: every x[n, ci, i] scatters
    x * w[ci, co, k] to full[n, co, i*stride + k*dilation]; y = full cropped by pads (+ b[co]).

    x: [N, Cin, *spatial]; w: [Cin, Cout/groups, *kernel]; b: [Cout].
    Output size: stride*(in-1) + output_padding + (k-1)*dilation + 1 - pad_begin - pad_end;
    output_padding adds positions at the end (they receive only the bias).
    With ``layout="NHWC"`` x and y are channels-last ([N, *spatial, C]).
    """

    name = "conv_transpose"
    inputs = ("x", "w", "b?")
    attrs = (*WINDOW_ATTRS, Attr("output_padding", INTS), Attr("groups", INT, 1), LAYOUT_ATTR)
    category = "nn"

    def infer(self, inputs, attrs):
        x_in, w, b = _pad3(inputs)
        x = channels_first_type(x_in, attrs["layout"])
        n = _spatial(x, w, "conv_transpose", b)
        check_window_attrs("conv_transpose", n, attrs)
        op = attrs["output_padding"]
        if len(op) != n or any(v < 0 for v in op):
            raise InferError(f"conv_transpose: output_padding {op} must have {n} values >= 0")
        groups, cin = attrs["groups"], x.shape[1]
        if groups < 1 or cin % groups:
            raise InferError(f"conv_transpose: groups={groups} must be >= 1 and divide the "
                             f"input channels ({cin})")
        if w.shape[0] != cin:
            raise InferError(f"conv_transpose: x has {cin} channels but w {list(w.shape)} "
                             f"expects {w.shape[0]} (w is [Cin, Cout/groups, *kernel])")
        cout = w.shape[1] * groups
        _check_bias("conv_transpose", b, cout)
        s, d, p = attrs["strides"], attrs["dilations"], attrs["pads"]
        out = [s[i] * (x.shape[2 + i] - 1) + op[i] + (w.shape[2 + i] - 1) * d[i] + 1
               - p[i] - p[n + i] for i in range(n)]
        if min(out) < 1:
            raise InferError(f"conv_transpose: empty output {out}: pads {p} crop more than the "
                             f"full output")
        return [layout_result(like(x, (x.shape[0], cout, *out)), x_in, attrs["layout"])]

    def reference(self, inputs, attrs):
        x, w, b = _pad3(inputs)
        x = to_channels_first(x, attrs["layout"])
        acc = acc_dtype(x.dtype)
        y = conv_transpose_nd(x.astype(acc, copy=False), w.astype(acc, copy=False),
                              attrs["strides"], attrs["pads"], attrs["dilations"],
                              attrs["output_padding"], attrs["groups"])
        y = _add_bias(y, b).astype(x.dtype, copy=False)
        return [from_channels_first(y, attrs["layout"])]

    def macs(self, inputs, outputs, attrs):
        return inputs[0].numel * inputs[1].shape[1] * math.prod(inputs[1].shape[2:])


def conv_transpose_nd(x: np.ndarray, w: np.ndarray, strides: Sequence[int],
                      pads: Sequence[int], dilations: Sequence[int],
                      output_padding: Sequence[int], groups: int) -> np.ndarray:
    """ONNX ConvTranspose without bias: one matmul per group, then a scatter-add per tap."""
    n = x.ndim - 2
    batch, cin = x.shape[:2]
    size = x.shape[2:]
    coutg, kernel = w.shape[1], w.shape[2:]
    cg, isize = cin // groups, math.prod(size)
    xm = x.reshape(batch, groups, cg, isize).transpose(1, 2, 0, 3).reshape(groups, cg, -1)
    wm = w.reshape(groups, cg, coutg * math.prod(kernel)).transpose(0, 2, 1)
    cols = np.matmul(wm, xm).reshape(groups, coutg, *kernel, batch, *size)
    full_shape = [s * (i - 1) + (k - 1) * d + 1 + op for s, i, k, d, op in
                  zip(strides, size, kernel, dilations, output_padding, strict=True)]
    full = np.zeros((batch, groups, coutg, *full_shape), dtype=x.dtype)
    lead = (slice(None),) * 3
    for tap in itertools.product(*map(range, kernel)):
        contrib = cols[(slice(None), slice(None)) + tap]  # [G, coutg, N, *size]
        full[lead + tap_slices(tap, size, strides, dilations)] += np.moveaxis(contrib, 2, 0)
    crop = tuple(slice(pads[i], full_shape[i] - pads[n + i]) for i in range(n))
    y = full[lead + crop]
    return y.reshape(batch, groups * coutg, *y.shape[3:])


# -- batch_norm ----------------------------------------------------------------------------------
@register
class BatchNorm(OpDef):
    """Inference batch normalization over the channel axis (1, or the last with
    ``layout="NHWC"``): y = (x - mean[c]) / sqrt(var[c] + epsilon) * scale[c] + bias[c].
    """

    name = "batch_norm"
    inputs = ("x", "scale", "bias", "mean", "var")
    attrs = (Attr("epsilon", FLOAT, 1e-5), LAYOUT_ATTR)
    category = "nn"

    def infer(self, inputs, attrs):
        x = channels_first_type(inputs[0], attrs["layout"])
        require_float(x, "batch_norm input x")
        if x.rank < 2:
            raise InferError(f"batch_norm input x must have rank >= 2 (N, C, ...), got shape "
                             f"{list(x.shape)}")
        for name, t in zip(self.inputs[1:], inputs[1:], strict=True):
            require_float(t, f"batch_norm {name}")
            if t.shape != (x.shape[1],):
                raise InferError(f"batch_norm {name} must have shape [{x.shape[1]}] (channels "
                                 f"of x {list(x.shape)}), got {list(t.shape)}")
        return [layout_result(like(x), inputs[0], attrs["layout"])]

    def reference(self, inputs, attrs):
        x, scale, bias, mean, var = inputs
        x = to_channels_first(x, attrs["layout"])
        acc = acc_dtype(x.dtype)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        scale, bias, mean, var = (a.astype(acc).reshape(shape) for a in (scale, bias, mean, var))
        y = (x.astype(acc) - mean) * (scale / np.sqrt(var + acc.type(attrs["epsilon"]))) + bias
        return [from_channels_first(y.astype(x.dtype, copy=False), attrs["layout"])]


# -- gemm, matmul --------------------------------------------------------------------------------
def _require_numeric(t: TensorType, what: str) -> None:
    if t.dtype not in FLOAT_DTYPES and t.dtype not in ("i32", "i64", "u32", "u64"):
        raise InferError(f"{what} must be a float or 32/64-bit integer tensor, got {t.dtype}")


def _mm_dtype(dtype: np.dtype) -> np.dtype:
    """Computation dtype of a matrix product: f32/f64 for floats, 64-bit for integers."""
    if dtype.kind == "f":
        return acc_dtype(dtype)
    return np.dtype(np.int64) if dtype.kind == "i" else np.dtype(np.uint64)


@register
class Gemm(OpDef):
    """y = alpha * A' @ B' + beta * c, with A' = a.T if trans_a else a (B' likewise).

    a and b are matrices; c broadcasts (one-directionally) to the [M, N] result.
    """

    name = "gemm"
    integer = "qlinear"
    inputs = ("a", "b", "c?")
    attrs = (Attr("alpha", FLOAT, 1.0), Attr("beta", FLOAT, 1.0), Attr("trans_a", INT, 0),
             Attr("trans_b", INT, 0))
    category = "nn"

    def infer(self, inputs, attrs):
        a, b, c = _pad3(inputs)
        dtype = same_dtype([a, b, c], "gemm a, b and c")
        _require_numeric(a, "gemm input a")
        if a.rank != 2 or b.rank != 2:
            raise InferError(f"gemm a and b must be matrices, got shapes {list(a.shape)} and "
                             f"{list(b.shape)}")
        m, k = a.shape[::-1] if attrs["trans_a"] else a.shape
        k2, n = b.shape[::-1] if attrs["trans_b"] else b.shape
        if k != k2:
            raise InferError(f"gemm: inner dimensions differ: A' is [{m}, {k}], B' is [{k2}, {n}] "
                             f"(trans_a={attrs['trans_a']}, trans_b={attrs['trans_b']})")
        if c is not None and broadcast_shapes(c.shape, (m, n)) != (m, n):
            raise InferError(f"gemm: c {list(c.shape)} does not broadcast to [{m}, {n}]")
        return [like(a, (m, n), dtype)]

    def reference(self, inputs, attrs):
        a, b, c = _pad3(inputs)
        acc = _mm_dtype(a.dtype)
        a = a.T if attrs["trans_a"] else a
        b = b.T if attrs["trans_b"] else b
        y = np.matmul(a.astype(acc), b.astype(acc))
        if attrs["alpha"] != 1.0:
            y = y * attrs["alpha"]
        if c is not None and attrs["beta"] != 0.0:
            cc = c.astype(acc)
            y = y + (cc if attrs["beta"] == 1.0 else cc * attrs["beta"])
        return [y.astype(a.dtype)]

    def macs(self, inputs, outputs, attrs):
        return outputs[0].numel * inputs[0].shape[0 if attrs["trans_a"] else 1]


@register
class MatMul(OpDef):
    """numpy matmul: 1-D operands are promoted to matrices (and the added dim removed), leading
    (batch) dims broadcast.
    """

    name = "matmul"
    inputs = ("a", "b")
    category = "nn"

    def infer(self, inputs, attrs):
        a, b = inputs
        dtype = same_dtype([a, b], "matmul a and b")
        _require_numeric(a, "matmul input a")
        if a.rank < 1 or b.rank < 1:
            raise InferError(f"matmul operands must have rank >= 1, got shapes {list(a.shape)} "
                             f"and {list(b.shape)}")
        am = a.shape if a.rank > 1 else (1, *a.shape)
        bm = b.shape if b.rank > 1 else (*b.shape, 1)
        if am[-1] != bm[-2]:
            raise InferError(f"matmul: a {list(a.shape)} has inner dimension {am[-1]}, b "
                             f"{list(b.shape)} has {bm[-2]}")
        batch = broadcast_shapes(am[:-2], bm[:-2])
        out = batch + am[-2:-1] * (a.rank > 1) + bm[-1:] * (b.rank > 1)
        return [like(a if a.rank >= b.rank else b, out, dtype)]

    def reference(self, inputs, attrs):
        a, b = inputs
        acc = _mm_dtype(a.dtype)
        return [np.asarray(np.matmul(a.astype(acc), b.astype(acc))).astype(a.dtype)]

    def macs(self, inputs, outputs, attrs):
        return outputs[0].numel * inputs[0].shape[-1]
