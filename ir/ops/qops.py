"""Integer ops of the quantized graph: the numpy kernels of docs/quantization.md.

qconv, qlinear, qadd, qmul, requantize, qavg_pool, qglobal_avg_pool, qresize, lut, qsoftmax and
qgrid_sample compute exact integer semantics: accumulate exactly (int64), rescale once with
``(acc * M + R) >> S`` (round half up, :mod:`hbc.ir.fixed_point`), saturate to ``[lo, hi]``
(``None`` = the range of ``out_dtype``; activations are folded into these bounds by lowering).
Per-channel multipliers, shifts, biases and tables are i32 constant inputs, scalars attributes.
The scales recorded on the values' types never change what an op computes.

Convolutions and matrix products multiply in float64 (BLAS) only where
:func:`hbc.ir.fixed_point.exact_dtype` proves the sums exact, otherwise in int64. Inference
limits a reduction to ``MAX_K = 2^17`` products (the contract's accumulator bound), so i8 and
i16 inputs always take the exact float64 path (sums below ``2^31`` and ``2^39``).
"""

from __future__ import annotations

import math

import numpy as np

from ..fixed_point import (
    INT_RANGES,
    M_MAX,
    S_MAX,
    exact_dtype,
    int_matmul_t,
    rescale,
    rescale_terms,
    saturate,
)
from ..registry import INT, OPS, STR, Attr, InferError, OpDef, register
from ..types import TensorType
from .common import (
    LAYOUT_ATTR,
    broadcast_shapes,
    channels_first_type,
    from_channels_first,
    layout_result,
    like,
    to_channels_first,
)
from .fused import conv_attrs
from .nn import Conv, conv_nd
from .pool import POOL_WINDOW_ATTRS, pool_infer, pool_out_shape, pool_padded, pool_taps

#: dtypes of integer activations
ACT_DTYPES = ("i8", "i16")
#: most products one accumulator sums (docs/quantization.md: int32 exact for 2^17 int8 products)
MAX_K = 2**17


def _out_attrs(dtypes: tuple[str, ...] = ACT_DTYPES) -> tuple[Attr, ...]:
    return (Attr("lo", INT, None), Attr("hi", INT, None),
            Attr("out_dtype", STR, "i8", choices=dtypes))


_MS = (Attr("m", INT), Attr("s", INT))


def _pad(inputs: list, n: int) -> list:
    return [*inputs, *[None] * n][:n]


def _require(t: TensorType, what: str, dtypes: tuple[str, ...] = ACT_DTYPES) -> None:
    if t.dtype not in dtypes:
        raise InferError(f"{what} must be {' or '.join(dtypes)}, got {t.describe()}")


def _check_ms(what: str, m: int, s: int, m_name: str = "m") -> None:
    if not -M_MAX <= m <= M_MAX:
        raise InferError(f"{what}: multiplier {m_name}={m} is outside [-{M_MAX}, {M_MAX}]")
    if not 0 <= s <= S_MAX:
        raise InferError(f"{what}: shift s={s} is outside [0, {S_MAX}]")


def _check_ms_arrays(what: str, m: np.ndarray, s: np.ndarray, mr: np.ndarray | None = None
                     ) -> None:
    """Range checks of per-channel multipliers and shifts (constant data, seen at run time)."""
    for name, arr, lo, hi in (("m", m, -M_MAX, M_MAX), ("s", s, 0, S_MAX),
                              ("mr", mr, -M_MAX, M_MAX)):
        if arr is not None and ((arr < lo) | (arr > hi)).any():
            i = int(np.flatnonzero((arr < lo) | (arr > hi))[0])
            raise InferError(f"{what}: {name}[{i}] = {int(arr.ravel()[i])} is outside "
                             f"[{lo}, {hi}]")


def _per_channel(what: str, types: dict[str, TensorType | None], c: int) -> None:
    for name, t in types.items():
        if t is not None:
            _require(t, f"{what} {name}", ("i32",))
            if t.shape != (c,):
                raise InferError(f"{what} {name} must have shape [{c}] (one per output "
                                 f"channel), got {list(t.shape)}")


def out_bounds(attrs: dict) -> tuple[int, int]:
    """The clamp bounds ``(lo, hi)`` of an integer op: ``None`` means the ``out_dtype`` range.
    InferError unless ``min <= lo <= hi <= max`` of ``out_dtype``."""
    dt = attrs["out_dtype"]
    tlo, thi = INT_RANGES[dt]
    lo = tlo if attrs["lo"] is None else attrs["lo"]
    hi = thi if attrs["hi"] is None else attrs["hi"]
    if not tlo <= lo <= hi <= thi:
        raise InferError(f"clamp bounds lo={lo}, hi={hi} must satisfy {tlo} <= lo <= hi <= "
                         f"{thi} (the range of {dt})")
    return lo, hi


def _finish(acc: np.ndarray, attrs: dict) -> np.ndarray:
    lo, hi = out_bounds(attrs)
    return saturate(acc, lo, hi, attrs["out_dtype"])


def _check_k(what: str, k: int) -> None:
    if k > MAX_K:
        raise InferError(f"{what}: {k} products per output exceed the accumulator limit of "
                         f"{MAX_K} (docs/quantization.md)", hint="split the reduction")


# -- exact accumulation ----------------------------------------------------------------------
def int_conv(x: np.ndarray, w: np.ndarray, strides, pads, dilations, groups: int,
             dtype: np.dtype | None = None) -> np.ndarray:
    """Exact ``conv(x, w)`` (NCHW, no bias) of integer arrays as int64: im2col and one matrix
    product per group (conv_nd), in ``dtype`` (default :func:`exact_dtype`)."""
    k = w.shape[1] * math.prod(w.shape[2:])
    dt = exact_dtype(k, x.dtype, w.dtype) if dtype is None else dtype
    y = conv_nd(x.astype(dt), w.astype(dt), strides, pads, dilations, groups)
    return y.astype(np.int64)


class _IntOp(OpDef):
    category = "quant"
    integer = True
    foldable = True


# -- conv and linear -------------------------------------------------------------------------
@register
class QConv(_IntOp):
    """Integer convolution: ``acc = conv(x, w) + b`` exactly; ``y = sat_lohi((acc*m[c] +
    r*mr[c] + R) >> s[c])``. ``out_dtype="i32"``: ``y = sat_lohi(acc)`` (high-precision output;
    m, s ignored, no residual). x: i8/i16 [N, Cin, *spatial] (or NHWC); w: i8 [Cout, Cin/groups,
    *kernel]; m, s, b, mr: i32[Cout]; r (input ``residual``): i8/i16 of y's shape, in y's
    layout. Attributes as conv."""

    name = "qconv"
    # "residual" (the contract's r) is the name convert-layout reads as held in the layout
    inputs = ("x", "w", "m", "s", "b?", "residual?", "mr?")
    attrs = (*Conv.attrs, *_out_attrs(("i8", "i16", "i32")))

    def infer(self, inputs, attrs):
        x, w, m, s, b, r, mr = _pad(inputs, 7)
        _require(x, "qconv input x")
        _require(w, "qconv weight w", ("i8",))
        try:
            (y,) = OPS["conv"].infer([x.with_(dtype="f32", quant=None),
                                      w.with_(dtype="f32", quant=None)], conv_attrs(attrs))
        except InferError as e:
            raise InferError(f"qconv: {str(e).removeprefix('conv: ')}") from None
        _check_k("qconv", w.shape[1] * math.prod(w.shape[2:]))
        _per_channel("qconv", {"m": m, "s": s, "b": b, "mr": mr}, w.shape[0])
        y = y.with_(dtype=attrs["out_dtype"])
        if (r is None) != (mr is None):
            raise InferError("qconv: the residual r and its multiplier mr come together")
        if r is not None:
            if attrs["out_dtype"] == "i32":
                raise InferError("qconv: the high-precision output (out_dtype=i32) takes no "
                                 "residual")
            _require(r, "qconv residual r")
            if r.shape != y.shape:
                raise InferError(f"qconv residual r {list(r.shape)} must have the output's "
                                 f"shape {list(y.shape)}")
        out_bounds(attrs)
        return [y]

    def reference(self, inputs, attrs):
        x, w, m, s, b, r, mr = _pad(inputs, 7)
        layout = attrs["layout"]
        acc = int_conv(to_channels_first(x, layout), w, attrs["strides"], attrs["pads"],
                       attrs["dilations"], attrs["groups"])
        col = (1, -1) + (1,) * (acc.ndim - 2)
        if b is not None:
            acc += b.astype(np.int64).reshape(col)
        if attrs["out_dtype"] != "i32":
            _check_ms_arrays("qconv", m, s, mr)
            terms = [(acc, m.reshape(col))]
            if r is not None:
                terms.append((to_channels_first(r, layout), mr.reshape(col)))
            acc = rescale_terms(terms, s.reshape(col))
        return [from_channels_first(_finish(acc, attrs), layout)]

    def macs(self, inputs, outputs, attrs):
        return OPS["conv"].macs(inputs[:2], outputs, conv_attrs(attrs))


@register
class QLinear(_IntOp):
    """Integer fully connected layer over the last axis: ``acc = x @ w^T + b`` exactly;
    ``y = sat_lohi((acc*m[n] + R) >> s[n])`` (``out_dtype="i32"``: ``y = sat_lohi(acc)``).
    x: i8/i16 [..., K]; w: i8 [N, K]; m, s, b: i32[N]."""

    name = "qlinear"
    inputs = ("x", "w", "m", "s", "b?")
    attrs = _out_attrs(("i8", "i16", "i32"))

    def infer(self, inputs, attrs):
        x, w, m, s, b = _pad(inputs, 5)
        _require(x, "qlinear input x")
        _require(w, "qlinear weight w", ("i8",))
        if x.rank < 2 or w.rank != 2 or w.shape[1] != x.shape[-1]:
            raise InferError(f"qlinear: x must be [..., K] (rank >= 2) and w [N, K], got x "
                             f"{list(x.shape)} and w {list(w.shape)}")
        _check_k("qlinear", w.shape[1])
        _per_channel("qlinear", {"m": m, "s": s, "b": b}, w.shape[0])
        out_bounds(attrs)
        return [like(x, (*x.shape[:-1], w.shape[0]), attrs["out_dtype"])]

    def reference(self, inputs, attrs):
        x, w, m, s, b = _pad(inputs, 5)
        acc = int_matmul_t(x.reshape(-1, x.shape[-1]), w)
        if b is not None:
            acc += b.astype(np.int64)
        if attrs["out_dtype"] != "i32":
            _check_ms_arrays("qlinear", m, s)
            acc = rescale(acc, m, s)
        return [_finish(acc, attrs).reshape(*x.shape[:-1], w.shape[0])]

    def macs(self, inputs, outputs, attrs):
        return outputs[0].numel * inputs[0].shape[-1]


# -- elementwise -----------------------------------------------------------------------------
@register
class QAdd(_IntOp):
    """``y = sat_lohi((a*ma + b*mb + R) >> s)`` with numpy broadcasting; a negative ``mb`` is a
    subtraction. a, b: i8/i16."""

    name = "qadd"
    inputs = ("a", "b")
    attrs = (Attr("ma", INT), Attr("mb", INT), Attr("s", INT), *_out_attrs())

    def infer(self, inputs, attrs):
        a, b = inputs
        _require(a, "qadd input a")
        _require(b, "qadd input b")
        _check_ms("qadd", attrs["ma"], attrs["s"], "ma")
        _check_ms("qadd", attrs["mb"], attrs["s"], "mb")
        out_bounds(attrs)
        shape = broadcast_shapes(a.shape, b.shape)
        return [like(a if a.rank >= b.rank else b, shape, attrs["out_dtype"])]

    def reference(self, inputs, attrs):
        a, b = inputs
        acc = rescale_terms([(a, attrs["ma"]), (b, attrs["mb"])], attrs["s"])
        return [_finish(acc, attrs)]


@register
class QMul(_IntOp):
    """``y = sat_lohi((a*b*m + R) >> s)`` with numpy broadcasting. a, b: i8/i16."""

    name = "qmul"
    inputs = ("a", "b")
    attrs = (*_MS, *_out_attrs())

    def infer(self, inputs, attrs):
        a, b = inputs
        _require(a, "qmul input a")
        _require(b, "qmul input b")
        _check_ms("qmul", attrs["m"], attrs["s"])
        out_bounds(attrs)
        shape = broadcast_shapes(a.shape, b.shape)
        return [like(a if a.rank >= b.rank else b, shape, attrs["out_dtype"])]

    def reference(self, inputs, attrs):
        a, b = inputs
        prod = a.astype(np.int64) * b.astype(np.int64)
        return [_finish(rescale(prod, attrs["m"], attrs["s"]), attrs)]


@register
class Requantize(_IntOp):
    """``y = sat_lohi((x*m + R) >> s)``, per tensor. x: i8/i16/i32."""

    name = "requantize"
    attrs = (*_MS, *_out_attrs())

    def infer(self, inputs, attrs):
        (x,) = inputs
        _require(x, "requantize input x", ("i8", "i16", "i32"))
        _check_ms("requantize", attrs["m"], attrs["s"])
        out_bounds(attrs)
        return [like(x, dtype=attrs["out_dtype"])]

    def reference(self, inputs, attrs):
        return [_finish(rescale(inputs[0], attrs["m"], attrs["s"]), attrs)]


# -- pools -----------------------------------------------------------------------------------
@register
class QAvgPool(_IntOp):
    """Window sum (padding counts as 0; windows as avg_pool, ceil mode included) then
    ``y = sat_lohi((sum*m + R) >> s)``; lowering puts the divisor into m/s. x: i8/i16."""

    name = "qavg_pool"
    attrs = (*POOL_WINDOW_ATTRS, LAYOUT_ATTR, *_MS, *_out_attrs())

    def infer(self, inputs, attrs):
        x = channels_first_type(inputs[0], attrs["layout"])
        _require(x, "qavg_pool input x")
        _check_ms("qavg_pool", attrs["m"], attrs["s"])
        out_bounds(attrs)
        shape = pool_infer("qavg_pool", x, attrs)
        return [layout_result(like(x, shape, attrs["out_dtype"]), inputs[0], attrs["layout"])]

    def reference(self, inputs, attrs):
        x = to_channels_first(inputs[0], attrs["layout"])
        out = pool_out_shape(x, "qavg_pool", attrs)
        xp = pool_padded(x.astype(np.int64), attrs, out, 0)
        total = np.zeros((*x.shape[:2], *out), dtype=np.int64)
        for _, _, sl in pool_taps(attrs, out):
            total += xp[sl]
        y = _finish(rescale(total, attrs["m"], attrs["s"]), attrs)
        return [from_channels_first(y, attrs["layout"])]


@register
class QGlobalAvgPool(_IntOp):
    """Sum over every spatial axis then ``y = sat_lohi((sum*m + R) >> s)``; y is
    [N, C, 1, ...]. x: i8/i16."""

    name = "qglobal_avg_pool"
    attrs = (LAYOUT_ATTR, *_MS, *_out_attrs())

    def infer(self, inputs, attrs):
        x = channels_first_type(inputs[0], attrs["layout"])
        _require(x, "qglobal_avg_pool input x")
        if x.rank < 3:
            raise InferError(f"qglobal_avg_pool input must have rank >= 3 ([N, C, *spatial]), "
                             f"got shape {list(x.shape)}")
        _check_ms("qglobal_avg_pool", attrs["m"], attrs["s"])
        out_bounds(attrs)
        shape = (*x.shape[:2], *[1] * (x.rank - 2))
        return [layout_result(like(x, shape, attrs["out_dtype"]), inputs[0], attrs["layout"])]

    def reference(self, inputs, attrs):
        x = to_channels_first(inputs[0], attrs["layout"])
        total = x.astype(np.int64).sum(axis=tuple(range(2, x.ndim)), keepdims=True)
        y = _finish(rescale(total, attrs["m"], attrs["s"]), attrs)
        return [from_channels_first(y, attrs["layout"])]


# -- resampling ------------------------------------------------------------------------------
