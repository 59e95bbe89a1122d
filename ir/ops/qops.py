"""Integer ops of the quantized graph: the numpy kernels of docs/quantization.md.

qconv, qlinear, qadd, qmul, requantize, qavg_pool, qglobal_avg_pool, qresize, lut, qsoftmax and
qgrid_sample compute exact integer semantics: accumulate exactly, rescale once with
``(acc * M + R) >> S`` (round half up, :mod:`hbc.ir.fixed_point`), saturate to ``[lo, hi]``
(``None`` = the range of ``out_dtype``; activations are folded into these bounds by lowering).
Per-channel multipliers, shifts, biases and tables are i32 constant inputs, scalars attributes.
The scales recorded on the values' types never change what an op computes.

The arithmetic is chosen for speed where it is provably exact (docs/quantization.md, "Exact
fast paths"): convolutions accumulate in :mod:`hbc.ir.ops.int_conv`, matrix products are
float32 BLAS products (chunked past the ``2^24`` bound, float64 or int64 where chunks would be
short; :func:`plan_matmul`), rescaling float32/float64 (:class:`~hbc.ir.fixed_point.Rescale`);
where built, the compiled kernels of :mod:`hbc.ir.native` take ``qconv`` over. Inference
limits a reduction to ``MAX_K = 2^17`` products (the contract's accumulator bound), so i8 and
i16 inputs never need int64 products.
Per-node constants derived from the weights (L1 norms, rescale coefficients) are remembered for
the runtime's immutable mapped constants (:func:`~hbc.ir.fixed_point.cached`).
"""

from __future__ import annotations

import math

import numpy as np

from .. import native
from ..fixed_point import (
    F32_EXACT,
    F64_EXACT,
    INT_RANGES,
    M_MAX,
    S_MAX,
    Rescale,
    abs_max,
    cached,
    chunk_l1_max,
    int_matmul_t_acc,
    make_rescale,
    rescale,
    rounding_term,
    saturate,
    value_bound,
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
from .int_conv import conv_columns, int_conv_acc
from .nn import Conv, conv_out_shape
from .pool import (
    POOL_WINDOW_ATTRS,
    StridePhases,
    pool_infer,
    pool_out_shape,
    pool_padded,
)

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


def _check_ms_arrays(what: str, m: np.ndarray | None, s: np.ndarray | None,
                     mr: np.ndarray | None = None, sr: np.ndarray | None = None) -> None:
    """Range checks of per-channel multipliers and shifts (constant data, seen at run time)."""
    for name, arr, lo, hi in (("m", m, -M_MAX, M_MAX), ("s", s, 0, S_MAX),
                              ("mr", mr, -M_MAX, M_MAX), ("sr", sr, 0, S_MAX)):
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


def _rescale_finish(terms: list, s: np.ndarray | int, attrs: dict,
                    bias: np.ndarray | None = None, constants: tuple = (),
                    check: str | None = None) -> np.ndarray:
    """``sat_lohi((sum_i v_i * M_i + b * M_0 + R) >> s)`` (the bias at the first term's
    multiplier) for ``terms`` ``(v_i, M_i, bound_i)``: :func:`make_rescale` with the op's
    bounds and ``out_dtype``, derived once per node when the multipliers, shift and bias come
    from the immutable ``constants`` (see :func:`cached`). ``check`` names the op whose
    per-channel multipliers and shifts are range-checked on the way."""
    lo, hi = out_bounds(attrs)
    ms = [m for _, m, _ in terms]

    def make() -> Rescale:
        if check is not None:
            _check_ms_arrays(check, *[np.asarray(a) for a in (ms[0], s)],
                             None if len(ms) < 2 else np.asarray(ms[1]))
        const = 0
        if bias is not None:
            const = bias.astype(np.int64).reshape(np.shape(ms[0])) * np.asarray(ms[0], np.int64)
        return make_rescale(ms, s, lo, hi, attrs["out_dtype"], const)

    scalars = tuple(int(a) if np.ndim(a) == 0 else np.shape(a) for a in (*ms, s))
    rs = cached(constants, ("rescale", lo, hi, attrs["out_dtype"], scalars), make)
    return rs.apply([(v, b) for v, _, b in terms])


def _check_k(what: str, k: int) -> None:
    if k > MAX_K:
        raise InferError(f"{what}: {k} products per output exceed the accumulator limit of "
                         f"{MAX_K} (docs/quantization.md)", hint="split the reduction")


def _native_qconv(x: np.ndarray, w: np.ndarray, attrs: dict, lo: int, hi: int, m, s, b, r, mr,
                  sr) -> np.ndarray | None:
    """qconv (channels first, i8/i16 output) entirely by the compiled kernels of
    :mod:`hbc.ir.native`: a 2-D depthwise convolution, or int8 products where the CPU has them;
    None for every other case (the accumulator is then computed here and only its rescale may
    be compiled)."""
    groups, cout = attrs["groups"], w.shape[0]
    if w.shape[1] == 1 and groups == cout == x.shape[1] and x.ndim == 4:
        w_l1 = chunk_l1_max(w.reshape(cout, -1), 1, w)
        xmax = value_bound(x)
        if xmax * w_l1 >= 2**31:
            xmax = abs_max(x)
        padded = [d + attrs["pads"][i] + attrs["pads"][2 + i] for i, d in enumerate(x.shape[2:])]
        out = conv_out_shape(padded, w.shape[2:], attrs["strides"], attrs["dilations"])
        return native.qconv_depthwise(x, w, attrs["strides"], attrs["pads"], attrs["dilations"],
                                      out, xmax, w_l1, m, s, b, r, mr, sr, lo, hi,
                                      attrs["out_dtype"])
    if x.dtype != np.int8 or not native.int8_products():
        return None
    w3 = w.reshape(groups, cout // groups, -1)
    cols, out = conv_columns(x, w.shape[2:], attrs["strides"], attrs["pads"],
                             attrs["dilations"], groups, np.dtype(np.int8))
    y = native.qconv_gemm(cols, w3, w, chunk_l1_max(w3, 1, w), m, s, b, r, mr, sr, lo, hi,
                          attrs["out_dtype"])
    return None if y is None else y.reshape(x.shape[0], cout, *out)


class _IntOp(OpDef):
    category = "quant"
    integer = True
    foldable = True


# -- conv and linear -------------------------------------------------------------------------
@register
class QConv(_IntOp):
    """Integer convolution: ``acc = conv(x, w) + b`` exactly, plus the residual rescaled to
    the accumulator's scale, ``acc += (r*mr[c] + R(sr[c])) >> sr[c]``; then ``y =
    sat_lohi((acc*m[c] + R(s[c])) >> s[c])``. ``out_dtype="i32"``: ``y = sat_lohi(acc)``
    (high-precision output; m, s ignored, no residual). x: i8/i16 [N, Cin, *spatial] (or
    NHWC); w: i8 [Cout, Cin/groups, *kernel]; m, s, b, mr, sr: i32[Cout]; r (input
    ``residual``): i8/i16 of y's shape, in y's layout. Attributes as conv."""

    name = "qconv"
    # "residual" (the contract's r) is the name convert-layout reads as held in the layout
    inputs = ("x", "w", "m", "s", "b?", "residual?", "mr?", "sr?")
    attrs = (*Conv.attrs, *_out_attrs(("i8", "i16", "i32")))

    def infer(self, inputs, attrs):
        x, w, m, s, b, r, mr, sr = _pad(inputs, 8)
        _require(x, "qconv input x")
        _require(w, "qconv weight w", ("i8",))
        try:
            (y,) = OPS["conv"].infer([x.with_(dtype="f32", quant=None),
                                      w.with_(dtype="f32", quant=None)], conv_attrs(attrs))
        except InferError as e:
            raise InferError(f"qconv: {str(e).removeprefix('conv: ')}") from None
        _check_k("qconv", w.shape[1] * math.prod(w.shape[2:]))
        _per_channel("qconv", {"m": m, "s": s, "b": b, "mr": mr, "sr": sr}, w.shape[0])
        y = y.with_(dtype=attrs["out_dtype"])
        if not (r is None) == (mr is None) == (sr is None):
            raise InferError("qconv: the residual r, its multiplier mr and its shift sr come "
                             "together")
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
        x, w, m, s, b, r, mr, sr = _pad(inputs, 8)
        layout = attrs["layout"]
        x = to_channels_first(x, layout)
        r = None if r is None else to_channels_first(r, layout)
        compiled = attrs["out_dtype"] != "i32" and native.available()
        if compiled:
            y = _native_qconv(x, w, attrs, *out_bounds(attrs), m, s, b, r, mr, sr)
            if y is not None:
                return [from_channels_first(y, layout)]
        acc, bound, with_bias = int_conv_acc(
            x, w, attrs["strides"], attrs["pads"], attrs["dilations"], attrs["groups"], key=w,
            bias=b)
        b = None if with_bias else b
        if compiled:
            y = native.qconv_finish(acc, bound, m, s, b, r, mr, sr, *out_bounds(attrs),
                                    attrs["out_dtype"])
            if y is not None:
                return [from_channels_first(y, layout)]
        col = (1, -1) + (1,) * (acc.ndim - 2)
        if attrs["out_dtype"] == "i32":
            y = acc.astype(np.int64)
            if b is not None:
                y += b.astype(np.int64).reshape(col)
            return [from_channels_first(_finish(y, attrs), layout)]
        if r is not None:
            acc, bound = _add_residual(acc, bound, r, mr, sr, col)
        y = _rescale_finish([(acc, m.reshape(col), bound)], s.reshape(col), attrs, b,
                            (m, s, b), "qconv")
        return [from_channels_first(y, layout)]

    def macs(self, inputs, outputs, attrs):
        return OPS["conv"].macs(inputs[:2], outputs, conv_attrs(attrs))


def _add_residual(acc: np.ndarray, bound: int, r: np.ndarray, mr: np.ndarray,
                  sr: np.ndarray, col: tuple[int, ...]) -> tuple[np.ndarray, int]:
    """``acc + ((r*mr[c] + R) >> sr[c])`` (the residual at the accumulator's scale, by the one
    rescale rule in int64) and a bound on its magnitudes. The sum is formed in acc's own
    dtype (float32, int32) while that holds it exactly, else float64 or int64, so the
    rescale that follows keeps its fast paths."""
    cached((mr, sr), ("qconv residual ranges",),
           lambda: _check_ms_arrays("qconv", None, None, mr, sr))
    term = rescale(r, mr.reshape(col), sr.reshape(col))
    # |term| <= (|r| |mr| + R) >> sr, and one more for the floor of a negative value
    term_bound = cached((mr, sr), ("qconv residual bound", value_bound(r)), lambda: 1 + int(
        ((value_bound(r) * np.abs(mr.astype(np.int64)) + rounding_term(sr)) >> sr).max(
            initial=0)))
    total = bound + term_bound
    if acc.dtype == np.float32 and total <= F32_EXACT or \
            acc.dtype == np.int32 and total < 2**31:
        dtype = acc.dtype
    elif acc.dtype.kind == "f" and total <= F64_EXACT:
        dtype = np.dtype(np.float64)
    else:
        dtype = np.dtype(np.int64)
    return np.add(acc, term, dtype=dtype, casting="unsafe"), total  # exact: both below 2^p


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
        acc, bound = int_matmul_t_acc(x.reshape(-1, x.shape[-1]), w, key=w)
        if attrs["out_dtype"] == "i32":
            y = acc.astype(np.int64)
            if b is not None:
                y += b.astype(np.int64)
            y = _finish(y, attrs)
        else:
            y = _rescale_finish([(acc, m, bound)], s, attrs, b, (m, s, b), "qlinear")
        return [y.reshape(*x.shape[:-1], w.shape[0])]

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
        return [_rescale_finish([(a, attrs["ma"], None), (b, attrs["mb"], None)], attrs["s"],
                                attrs)]


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
        prod = np.multiply(a, b, dtype=np.int32)  # i16 * i16 <= 2^30: exact in int32
        return [_rescale_finish([(prod, attrs["m"], None)], attrs["s"], attrs)]


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
        return [_rescale_finish([(inputs[0], attrs["m"], None)], attrs["s"], attrs)]


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
        taps = math.prod(attrs["kernel"])
        bound = taps * -int(np.iinfo(x.dtype).min)
        dtype = np.int32 if bound < 2**31 else np.int64  # window sums, exact
        xp = pool_padded(x.astype(dtype), attrs, out, 0)
        total = np.zeros((*x.shape[:2], *out), dtype=dtype)
        for _, _, xs in StridePhases(xp, attrs["kernel"], attrs["strides"], attrs["dilations"],
                                     out).views():
            total += xs
        y = _rescale_finish([(total, attrs["m"], bound)], attrs["s"], attrs)
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
        total = x.sum(axis=tuple(range(2, x.ndim)), keepdims=True, dtype=np.int64)
        y = _rescale_finish([(total, attrs["m"], None)], attrs["s"], attrs)
        return [from_channels_first(y, attrs["layout"])]


# -- resampling ------------------------------------------------------------------------------
