"""Per-channel normalization ops that are not batch_norm itself: scale_shift.

``scale_shift`` is what a batch_norm becomes when ``fold-bn`` cannot fold it into a preceding
conv, conv_transpose or gemm (no such producer, or the producer's output has other users):
the four BN vectors collapse into one per-channel scale and shift,
``s = gamma / sqrt(var + eps)`` and ``t = beta - mean * s``.
"""

from __future__ import annotations

import numpy as np

from ..registry import INT, Attr, InferError, OpDef, register
from .common import like, norm_axis, require_float, same_dtype
from .window import acc_dtype


@register
class ScaleShift(OpDef):
    """Per-channel affine map: y = x * scale[c] + shift[c], c the index along ``axis``.

    x: float tensor of rank >= 1; scale, shift: 1-D of length x.shape[axis], x's dtype.
    ``axis`` is 1 for NCHW-like tensors (and [N, C] matrices), -1 (or 3) for NHWC.
    f16 is computed in f32 and rounded once at the end.
    """

    name = "scale_shift"
    inputs = ("x", "scale", "shift")
    attrs = (Attr("axis", INT, 1),)
    category = "nn"

    def infer(self, inputs, attrs):
        x, scale, shift = inputs
        require_float(x, "scale_shift input x")
        same_dtype([x, scale, shift], "scale_shift x, scale and shift")
        if x.rank < 1:
            raise InferError("scale_shift input x must have rank >= 1, got a scalar")
        axis = norm_axis(attrs["axis"], x.rank, "scale_shift axis")
        channels = x.shape[axis]
        for name, t in (("scale", scale), ("shift", shift)):
            if t.shape != (channels,):
                raise InferError(f"scale_shift {name} must have shape [{channels}] (x "
                                 f"{list(x.shape)} along axis {attrs['axis']}), got "
                                 f"{list(t.shape)}")
        return [like(x)]

    def reference(self, inputs, attrs):
        x, scale, shift = inputs
        acc = acc_dtype(x.dtype)
        axis = attrs["axis"] % x.ndim
        shape = [1] * x.ndim
        shape[axis] = -1
        s = scale.astype(acc).reshape(shape)
        t = shift.astype(acc).reshape(shape)
        y = x.astype(acc, copy=False) * s + t
        return [np.asarray(y).astype(x.dtype, copy=False)]
