"""Fused compute ops produced by the ``fuse`` pass: conv_fused and linear.

    conv_fused(x, w, b?, residual?):  y = act(conv(x, w, b) + residual)
    linear(x, w, b?):                 y = act(x @ w^T + b)

``act`` is one of the fusible activations, given by the attribute ``activation``:

    none    y
    relu    max(y, 0)
    relu6   min(max(y, 0), 6)
    clip    min(max(y, clip_min), clip_max)    (ONNX Clip: every element is clip_max when
                                                clip_min > clip_max)

``clip_min``/``clip_max`` apply only to ``activation=clip``; with any other activation they
must keep their defaults (-inf, inf). The fuse pass writes clip(0, 6) as relu6.

The arithmetic is not repeated here: the references call the declarations of conv, gemm, add,
relu and clip, so a fused op computes exactly what its unfused chain computes. conv_fused takes
every attribute of conv (in conv's order, followed by the activation's), so whatever conv
declares, its ``layout`` included, carries over with no change here; the residual is read in
the output's layout. MACs are those of the conv or matrix product.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..registry import FLOAT, OPS, STR, Attr, InferError, OpDef, register
from ..types import TensorType
from .common import like, require_float, same_dtype
from .nn import Conv, Gemm

#: values of the ``activation`` attribute of the fused ops
ACTIVATIONS = ("none", "relu", "relu6", "clip")

ACTIVATION_ATTRS = (
    Attr("activation", STR, "none", choices=ACTIVATIONS),
    Attr("clip_min", FLOAT, -math.inf),
    Attr("clip_max", FLOAT, math.inf),
)

_CONV_ATTR_NAMES = tuple(a.name for a in Conv.attrs)
#: gemm attributes computing x @ w^T + b
_GEMM_XWT = {a.name: a.default for a in Gemm.attrs} | {"trans_b": 1}


def conv_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """The attributes of conv_fused that belong to its conv."""
    return {k: attrs[k] for k in _CONV_ATTR_NAMES}


def _check_activation(what: str, attrs: dict[str, Any]) -> None:
    lo, hi = attrs["clip_min"], attrs["clip_max"]
    if attrs["activation"] != "clip" and (lo != -math.inf or hi != math.inf):
        raise InferError(f"{what}: clip_min/clip_max ({lo}, {hi}) apply only to "
                         f"activation=clip, not activation={attrs['activation']}")
    if math.isnan(lo) or math.isnan(hi):
        raise InferError(f"{what}: clip bounds must not be NaN, got ({lo}, {hi})")


def apply_activation(y: np.ndarray, attrs: dict[str, Any]) -> np.ndarray:
    """``act(y)`` by the references of relu and clip."""
    act = attrs["activation"]
    if act == "none":
        return y
    if act == "relu":
        return OPS["relu"].reference([y], {})[0]
    lo, hi = (0.0, 6.0) if act == "relu6" else (attrs["clip_min"], attrs["clip_max"])
    return OPS["clip"].reference([y], {"min": lo, "max": hi})[0]


def _pad(inputs: list, n: int) -> list:
    return [*inputs, *[None] * n][:n]


@register
class ConvFused(OpDef):
    """y = act(conv(x, w, b) + residual): a conv with its bias, an optional residual of the
    output's shape (the other operand of an add) and a fusible activation.

    Attributes: those of conv (strides, pads, dilations, groups, layout, ...), then
    activation, clip_min, clip_max.
    """

    name = "conv_fused"
    integer = "qconv"
    inputs = ("x", "w", "b?", "residual?")
    attrs = (*Conv.attrs, *ACTIVATION_ATTRS)
    category = "nn"

    def infer(self, inputs, attrs):
        x, w, b, residual = _pad(inputs, 4)
        try:
            (y,) = OPS["conv"].infer([x, w, b], conv_attrs(attrs))
        except InferError as e:
            raise InferError(f"conv_fused: {str(e).removeprefix('conv: ')}") from None
        if residual is not None:
            same_dtype([y, residual], "conv_fused output and residual")
            if residual.shape != y.shape:
                raise InferError(f"conv_fused residual {list(residual.shape)} must have the "
                                 f"shape of the conv output {list(y.shape)} (no broadcasting)")
        _check_activation("conv_fused", attrs)
        return [y]

    def reference(self, inputs, attrs):
        x, w, b, residual = _pad(inputs, 4)
        (y,) = OPS["conv"].reference([x, w, b], conv_attrs(attrs))
        if residual is not None:
            (y,) = OPS["add"].reference([y, residual], {})
        return [apply_activation(y, attrs)]

    def macs(self, inputs, outputs, attrs):
        return OPS["conv"].macs(inputs[:3], outputs, conv_attrs(attrs))


@register
class Linear(OpDef):
    """y = act(x @ w^T + b), a fully connected layer over the last axis of x.

    x: [..., K] (rank >= 2); w: [N, K] (one row per output feature, as torch.nn.Linear and
    conv's [Cout, ...]); b: [N]; y: [..., N]. The product is gemm's (trans_b=1) on x viewed as
    a [prod(leading dims), K] matrix.
    """

    name = "linear"
    integer = "qlinear"
    inputs = ("x", "w", "b?")
    attrs = ACTIVATION_ATTRS
    category = "nn"

    def infer(self, inputs, attrs):
        x, w, b = _pad(inputs, 3)
        require_float(x, "linear input x")
        same_dtype([x, w, b], "linear x, w and b")
        if x.rank < 2:
            raise InferError(f"linear input x must have rank >= 2, got shape {list(x.shape)}")
        if w.rank != 2 or w.shape[1] != x.shape[-1]:
            raise InferError(f"linear weight w must be [N, {x.shape[-1]}] (x is "
                             f"{list(x.shape)}), got {list(w.shape)}")
        if b is not None and b.shape != (w.shape[0],):
            raise InferError(f"linear bias b must have shape [{w.shape[0]}], got "
                             f"{list(b.shape)}")
        _check_activation("linear", attrs)
        return [like(x, (*x.shape[:-1], w.shape[0]))]

    def reference(self, inputs, attrs):
        x, w, b = _pad(inputs, 3)
        (y,) = OPS["gemm"].reference([x.reshape(-1, x.shape[-1]), w, b], _GEMM_XWT)
        return [apply_activation(y.reshape(*x.shape[:-1], w.shape[0]), attrs)]

    def macs(self, inputs: list[TensorType | None], outputs, attrs):
        return outputs[0].numel * inputs[0].shape[-1]
