"""Activations: relu, leaky_relu, prelu, clip, sigmoid, tanh, hard_sigmoid, hard_swish, softmax.

All are shape-preserving. relu, prelu and clip also accept integer tensors (clamping keeps the
dtype); the others are defined on float tensors only. Float math of f16 inputs is done in f32 and
rounded once at the end, so a result is the correctly rounded f32 value, not a chain of f16 steps.
"""

from __future__ import annotations

import math

import numpy as np

from ..registry import FLOAT, INT, Attr, InferError, OpDef, register
from ..types import FLOAT_DTYPES
from .common import broadcast_shapes, like, norm_axis, require_float, same_dtype

_NUMERIC_INT = frozenset({"i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"})


def _wide(x: np.ndarray) -> np.ndarray:
    """``x`` in a float type with at least f32 precision (f16 math is done in f32)."""
    return x.astype(np.promote_types(x.dtype, np.float32), copy=False)


class _Unary(OpDef):
    inputs = ("x",)
    outputs = ("y",)
    category = "activation"
    #: also defined on integer tensors?
    integer_ok = False

    def infer(self, inputs, attrs):
        (x,) = inputs
        if not (self.integer_ok and x.dtype in _NUMERIC_INT):
            require_float(x, f"{self.name} input")
        return [like(x)]

    def reference(self, inputs, attrs):
        (x,) = inputs
        with np.errstate(all="ignore"):
            return [np.asarray(self._apply(x, attrs)).astype(x.dtype, copy=False)]

    def _apply(self, x: np.ndarray, attrs) -> np.ndarray:
        raise NotImplementedError


@register
class Relu(_Unary):
    """y = max(x, 0)."""

    name = "relu"
    integer = "native"
    integer_ok = True

    def _apply(self, x, attrs):
        return np.maximum(x, x.dtype.type(0))


@register
class LeakyRelu(_Unary):
    """y = x if x >= 0 else alpha * x."""

    name = "leaky_relu"
    integer = "lut"
    attrs = (Attr("alpha", FLOAT, 0.01),)

    def _apply(self, x, attrs):
        w = _wide(x)
        return np.where(w >= 0, w, w * attrs["alpha"])


@register
class PRelu(OpDef):
    """y = x if x >= 0 else slope * x; ``slope`` broadcasts (numpy rules) to the shape of x."""

    name = "prelu"
    inputs = ("x", "slope")
    category = "activation"

    def infer(self, inputs, attrs):
        x, slope = inputs
        dtype = same_dtype([x, slope], "prelu x and slope")
        if dtype not in FLOAT_DTYPES and dtype not in _NUMERIC_INT:
            raise InferError(f"prelu needs a numeric tensor, got {dtype}")
        if broadcast_shapes(x.shape, slope.shape) != x.shape:
            raise InferError(
                f"slope shape {list(slope.shape)} must broadcast to x shape {list(x.shape)}"
            )
        return [like(x)]

    def reference(self, inputs, attrs):
        x, slope = inputs
        with np.errstate(all="ignore"):
            return [np.where(x >= 0, x, x * slope).astype(x.dtype, copy=False)]


@register
class Clip(_Unary):
    """y = min(max(x, min), max); when min > max every element becomes max (as ONNX).

    On integer tensors the bounds are rounded inwards to integers and clamped to the dtype's range,
    so the result keeps the input dtype.
    """

    name = "clip"
    integer = "native"
    integer_ok = True
    attrs = (Attr("min", FLOAT, -math.inf), Attr("max", FLOAT, math.inf))

    def _apply(self, x, attrs):
        lo, hi = attrs["min"], attrs["max"]
        if np.issubdtype(x.dtype, np.integer):
            info = np.iinfo(x.dtype)
            lo_i = info.min if lo <= info.min else int(math.ceil(lo))
            hi_i = info.max if hi >= info.max else int(math.floor(hi))
            lo_i, hi_i = min(max(lo_i, info.min), info.max), max(min(hi_i, info.max), info.min)
            return np.minimum(np.maximum(x, x.dtype.type(lo_i)), x.dtype.type(hi_i))
        return np.minimum(np.maximum(x, x.dtype.type(lo)), x.dtype.type(hi))


@register
class Sigmoid(_Unary):
    """y = 1 / (1 + exp(-x)), computed without overflow for large |x|."""

    name = "sigmoid"
    integer = "lut"

    def _apply(self, x, attrs):
        w = _wide(x)
        e = np.exp(-np.abs(w))
        return np.where(w >= 0, 1 / (1 + e), e / (1 + e))


@register
class Tanh(_Unary):
    """y = tanh(x)."""

    name = "tanh"
    integer = "lut"

    def _apply(self, x, attrs):
        return np.tanh(_wide(x))


@register
class HardSigmoid(_Unary):
    """y = max(0, min(1, alpha * x + beta))."""

    name = "hard_sigmoid"
    integer = "lut"
    attrs = (Attr("alpha", FLOAT, 0.2), Attr("beta", FLOAT, 0.5))

    def _apply(self, x, attrs):
        return np.clip(_wide(x) * attrs["alpha"] + attrs["beta"], 0, 1)


@register
class HardSwish(_Unary):
    """y = x * max(0, min(1, x / 6 + 0.5))."""

    name = "hard_swish"
    integer = "lut"

    def _apply(self, x, attrs):
        w = _wide(x)
        return w * np.clip(w * (1 / 6) + 0.5, 0, 1)


@register
class Softmax(_Unary):
    """y = exp(x - max) / sum(exp(x - max)) along one axis (ONNX opset-13 semantics)."""

    name = "softmax"
    integer = "qsoftmax"
    attrs = (Attr("axis", INT, -1),)

    def infer(self, inputs, attrs):
        (x,) = inputs
        require_float(x, "softmax input")
        norm_axis(attrs["axis"], x.rank)
        return [like(x)]

    def _apply(self, x, attrs):
        axis = norm_axis(attrs["axis"], x.ndim)
        w = _wide(x)
        if w.size == 0:
            return w
        e = np.exp(w - np.max(w, axis=axis, keepdims=True))
        return e / np.sum(e, axis=axis, keepdims=True)
