"""Linear quantization (quantize, dequantize) and the number-format conversions behind them.

``quantize`` maps a float tensor to a narrow type and records the mapping in the output's type
(:class:`~hbc.ir.types.QuantParams`); ``dequantize`` reads it back from its input's type. Neither
is folded at compile time: a quantized constant stays an integer tensor with its scales.

:func:`convert` implements ONNX ``Cast`` semantics for every hbir dtype, including the float8
formats (saturating or not), float8e8m0 (with its rounding modes), float4 and int4/int2; the
``cast`` op of the tensor family uses it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..registry import FLOATS, INT, INTS, STR, Attr, InferError, OpDef, register
from ..types import DTYPES, FLOAT_DTYPES, QuantParams, TensorType, dtype_of
from .common import like, norm_axis

#: float8 formats whose out-of-range values saturate (to +-max) when ``saturate`` is set.
FLOAT8 = frozenset({"f8e4m3fn", "f8e4m3fnuz", "f8e5m2", "f8e5m2fnuz"})
#: integer quantized types and their ranges.
INT_RANGES = {
    "i8": (-128, 127), "u8": (0, 255), "i16": (-32768, 32767), "u16": (0, 65535),
    "i4": (-8, 7), "u4": (0, 15), "i2": (-2, 1), "u2": (0, 3),
}
QUANT_DTYPES = tuple(INT_RANGES) + tuple(sorted(FLOAT8)) + ("f4e2m1",)
E8M0_ROUND_MODES = ("up", "down", "nearest")


# -- number-format conversion ----------------------------------------------------------------
def convert(x: np.ndarray, dtype: str, saturate: bool = True, round_mode: str = "up"
            ) -> np.ndarray:
    """``x`` cast to hbir dtype ``dtype`` with ONNX Cast semantics.

    Float to float8 with ``saturate``: values beyond the format's range (infinities included)
    become +-max, NaN stays NaN; without it they become inf (e5m2) or NaN (formats without inf).
    Float4 always saturates. Rounding is to nearest even, except f8e8m0 (see :func:`to_e8m0`).
    Other conversions are numpy's (float to integer truncates toward zero).
    """
    target = DTYPES[dtype]
    if x.dtype == target:
        return x.copy()
    if dtype == "f8e8m0":
        return to_e8m0(x, saturate, round_mode)
    src = x
    if dtype in FLOAT8 and saturate:
        import ml_dtypes  # present whenever a float8 dtype is (see types.DTYPES)

        info = ml_dtypes.finfo(target)
        wide = x if x.dtype in (np.float32, np.float64) else x.astype(np.float32)
        src = np.clip(wide, float(info.min), float(info.max))
    with np.errstate(invalid="ignore", over="ignore"):
        return src.astype(target)


def to_e8m0(x: np.ndarray, saturate: bool = True, round_mode: str = "up") -> np.ndarray:
    """float8e8m0 (an unsigned power of two, 2**(e-127)) nearest to ``|x|`` by ``round_mode``.

    The result is the f32 exponent field, incremented when the mantissa is non-zero (``up``), when
    it is at least one half (``nearest``, ties up) or never (``down``). Inf and NaN map to NaN
    (0xFF); with ``saturate`` an increment past the largest exponent (0xFE) is dropped.
    """
    if round_mode not in E8M0_ROUND_MODES:
        raise InferError(f"round_mode '{round_mode}' is not one of {', '.join(E8M0_ROUND_MODES)}")
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    exponent = ((bits >> 23) & 0xFF).astype(np.uint16)
    special = exponent == 0xFF
    if round_mode == "up":
        inc = (bits & 0x7FFFFF) != 0
    elif round_mode == "nearest":
        half = (bits & 0x400000) != 0
        # A subnormal f32 of exactly half the smallest normal stays at exponent 0.
        inc = half & (((bits & 0x3FFFFF) != 0) | (exponent > 0))
    else:
        inc = np.zeros(bits.shape, dtype=bool)
    inc &= ~special
    if saturate:
        inc &= exponent != 0xFE
    out = np.where(special, 0xFF, exponent + inc.astype(np.uint16))
    return np.minimum(out, 0xFF).astype(np.uint8).view(DTYPES["f8e8m0"])


# -- quantize / dequantize ---------------------------------------------------------------------
def _per_axis(values: Sequence[float], rank: int, axis: int | None, dtype) -> np.ndarray:
    """Scales or zero points shaped to broadcast along ``axis`` of a rank-``rank`` tensor."""
    arr = np.asarray(values, dtype=dtype)
    if axis is None:
        return arr.reshape(())
    shape = [1] * rank
    shape[axis] = arr.size
    return arr.reshape(shape)


def quantize_array(x: np.ndarray, dtype: str, q: QuantParams, saturate: bool = True
                   ) -> np.ndarray:
    """ONNX QuantizeLinear: ``saturate(round_half_even(x / scale) + zero_point)``.

    The division is done in the dtype of ``x``. Float8 targets ignore the (zero) zero point and
    convert with :func:`convert`; float4 adds the zero point and rounds to nearest.
    """
    scale = _per_axis(q.scale, x.ndim, q.axis, x.dtype)
    zp = _per_axis(q.zero_point or (0,) * len(q.scale), x.ndim, q.axis, np.float64)
    with np.errstate(all="ignore"):
        y = x / scale
        if dtype in INT_RANGES:
            lo, hi = INT_RANGES[dtype]
            y = np.clip(np.rint(y).astype(np.float64) + zp, lo, hi)
            return np.nan_to_num(y, nan=0.0).astype(DTYPES[dtype])
        if dtype in FLOAT8:
            return convert(y, dtype, saturate)
        return (y + zp.astype(y.dtype)).astype(DTYPES[dtype])


def dequantize_array(x: np.ndarray, q: QuantParams, dtype: str) -> np.ndarray:
    """ONNX DequantizeLinear: ``(x - zero_point) * scale``, in f32, rounded once to ``dtype``."""
    scale = _per_axis(q.scale, x.ndim, q.axis, np.float32)
    zp = _per_axis(q.zero_point or (0,) * len(q.scale), x.ndim, q.axis, np.float32)
    return ((x.astype(np.float32) - zp) * scale).astype(DTYPES[dtype])


def check_quant(q: QuantParams, t: TensorType, what: str) -> None:
    """InferError unless ``q`` fits a tensor of type ``t`` (axis in range, one scale per index)."""
    if q.axis is not None:
        axis = norm_axis(q.axis, t.rank, f"{what} quantization axis")
        if len(q.scale) != t.shape[axis]:
            raise InferError(
                f"{what}: {len(q.scale)} scales for axis {axis} of size {t.shape[axis]} "
                f"(shape {list(t.shape)})"
            )
    if q.zero_point is not None and len(q.zero_point) != len(q.scale):
        raise InferError(f"{what}: {len(q.zero_point)} zero points for {len(q.scale)} scales")
    if q.zero_point is not None and t.dtype in FLOAT8:
        raise InferError(f"{what}: float8 quantization needs zero points 0, got {q.zero_point}")
    if any(not 0 < s < math.inf for s in q.scale):
        raise InferError(f"{what}: scales must be positive and finite, got {list(q.scale)}")


@register
class Quantize(OpDef):
    """y = saturate(round_half_even(x / scale) + zero_point) in ``dtype``; y's type records the
    scales. ``axis`` None means one scale for the whole tensor, otherwise one per index along
    ``axis``. ``saturate`` only matters for float8 targets (ONNX QuantizeLinear semantics)."""

    name = "quantize"
    category = "quant"
    foldable = False
    attrs = (
        Attr("dtype", STR, "i8", choices=QUANT_DTYPES),
        Attr("scale", FLOATS),
        Attr("axis", INT, None),
        Attr("zero_point", INTS, []),
        Attr("saturate", INT, 1),
    )

    def _params(self, x: TensorType, attrs) -> QuantParams:
        axis = attrs["axis"]
        if axis is not None:
            axis = norm_axis(axis, x.rank, "quantize axis")
        elif len(attrs["scale"]) != 1:
            raise InferError(f"per-tensor quantize needs one scale, got {len(attrs['scale'])}")
        q = QuantParams(tuple(attrs["scale"]), axis, tuple(attrs["zero_point"]) or None)
        check_quant(q, x.with_(dtype=attrs["dtype"]), "quantize")
        if q.zero_point is not None and attrs["dtype"] in INT_RANGES:
            lo, hi = INT_RANGES[attrs["dtype"]]
            if not all(lo <= z <= hi for z in q.zero_point):
                raise InferError(f"zero points {list(q.zero_point)} are outside the range "
                                 f"[{lo}, {hi}] of {attrs['dtype']}")
        return q

    def infer(self, inputs, attrs):
        (x,) = inputs
        if x.dtype not in FLOAT_DTYPES:
            raise InferError(f"quantize input must be a float tensor, got {x.dtype}")
        return [like(x, dtype=attrs["dtype"]).with_(quant=self._params(x, attrs))]

    def reference(self, inputs, attrs):
        (x,) = inputs
        q = self._params(TensorType(dtype_of(x), x.shape), attrs)
        return [quantize_array(x, attrs["dtype"], q, bool(attrs["saturate"]))]


@register
class Dequantize(OpDef):
    """y = (x - zero_point) * scale, computed in f32 and rounded to ``dtype``; scale, axis and
    zero point come from the quantization recorded in x's type (an error if it has none)."""

    name = "dequantize"
    category = "quant"
    foldable = False
    #: the reference reads the quantization from the input's type (``input_types``)
    needs_input_types = True
    attrs = (Attr("dtype", STR, "f32", choices=("f32", "f16", "bf16")),)

    def infer(self, inputs, attrs):
        (x,) = inputs
        if x.quant is None:
            raise InferError(
                f"dequantize input ({x.dtype}{list(x.shape)}) carries no quantization "
                "parameters; its type must record the scale"
            )
        check_quant(x.quant, x, "dequantize input")
        return [like(x, dtype=attrs["dtype"])]

    def reference(self, inputs, attrs, input_types: Sequence[TensorType | None] | None = None):
        (x,) = inputs
        if not input_types or input_types[0] is None or input_types[0].quant is None:
            raise InferError("dequantize: the reference needs the input's type (input_types=) "
                             "to read its scales")
        return [dequantize_array(x, input_types[0].quant, attrs["dtype"])]

