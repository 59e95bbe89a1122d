"""Elementwise binary arithmetic with numpy broadcasting: add, sub, mul, div."""

from __future__ import annotations

import numpy as np

from ..registry import OpDef, register
from .common import broadcast_shapes, like, same_dtype


class _Binary(OpDef):
    inputs = ("a", "b")
    outputs = ("y",)
    category = "elementwise"

    def infer(self, inputs, attrs):
        a, b = inputs
        dtype = same_dtype([a, b], f"{self.name} inputs")
        return [like(a if a.rank >= b.rank else b, broadcast_shapes(a.shape, b.shape), dtype)]

    def reference(self, inputs, attrs):
        a, b = inputs
        with np.errstate(all="ignore"):
            return [np.asarray(self._apply(a, b)).astype(a.dtype, copy=False)]

    def _apply(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@register
class Add(_Binary):
    """y = a + b (integers wrap like the hardware's fixed-width adders)."""

    name = "add"
    integer = "qadd"

    def _apply(self, a, b):
        return a + b


@register
class Sub(_Binary):
    """y = a - b."""

    name = "sub"
    integer = "qadd"

    def _apply(self, a, b):
        return a - b


@register
class Mul(_Binary):
    """y = a * b."""

    name = "mul"
    integer = "qmul"

    def _apply(self, a, b):
        return a * b


@register
class Div(_Binary):
    """y = a / b; integer division truncates toward zero (C semantics, as ONNX)."""

    name = "div"

    def _apply(self, a, b):
        if np.issubdtype(a.dtype, np.integer):
            q = np.trunc(a.astype(np.float64) / b.astype(np.float64))
            # float64 is exact for |values| < 2**53; wider integers take the integer path.
            if a.dtype.itemsize >= 8:
                q = np.sign(a) * np.sign(b) * (np.abs(a) // np.abs(b))
            return q
        return a / b
