"""Relu, LeakyRelu, PRelu, Clip, Sigmoid, Tanh, HardSigmoid, HardSwish, Softmax."""

from __future__ import annotations

import math

import numpy as np

from . import converter

_PLAIN = {"Relu": "relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "HardSwish": "hard_swish"}


@converter(*_PLAIN)
def plain(ctx, node):
    ctx.emit(_PLAIN[node.op_type], [ctx.input(node, 0)], node=node)


@converter("LeakyRelu")
def leaky_relu(ctx, node):
    alpha = ctx.attrs(node).get("alpha", 0.01)
    ctx.emit("leaky_relu", [ctx.input(node, 0)], {"alpha": alpha}, node=node)


@converter("HardSigmoid")
def hard_sigmoid(ctx, node):
    a = ctx.attrs(node)
    attrs = {"alpha": a.get("alpha", 0.2), "beta": a.get("beta", 0.5)}
    ctx.emit("hard_sigmoid", [ctx.input(node, 0)], attrs, node=node)


@converter("PRelu")
def prelu(ctx, node):
    ctx.emit("prelu", [ctx.input(node, 0), ctx.input(node, 1)], node=node)


def _bound(ctx, node, i: int, default: float) -> float:
    value = ctx.const(node, i)
    if value is None:
        return default
    if value.size != 1:
        ctx.unsupported(node, f"input {i} must be a scalar, got shape {list(value.shape)}")
    return float(value.reshape(()))


@converter("Clip", static=(1, 2))
def clip(ctx, node):
    if ctx.opset < 11:
        a = ctx.attrs(node)
        lo, hi = a.get("min", -math.inf), a.get("max", math.inf)
    else:
        lo, hi = _bound(ctx, node, 1, -math.inf), _bound(ctx, node, 2, math.inf)
    ctx.emit("clip", [ctx.input(node, 0)], {"min": lo, "max": hi}, node=node)


@converter("Softmax")
def softmax(ctx, node):
    x = ctx.input(node, 0)
    t = x.type
    default = -1 if ctx.opset >= 13 else 1
    axis = ctx.attrs(node).get("axis", default)
    if not -t.rank <= axis < max(t.rank, 1):
        ctx.unsupported(node, f"axis {axis} is out of range for rank {t.rank}")
    axis = axis % t.rank if t.rank else 0
    if ctx.opset >= 13 or axis == t.rank - 1:
        ctx.emit("softmax", [x], {"axis": axis if ctx.opset >= 13 else -1}, node=node)
        return
    # Before opset 13 the input is coerced to 2-D [prod(shape[:axis]), prod(shape[axis:])] and
    # the softmax runs over the second dimension.
    rows = int(np.prod(t.shape[:axis], dtype=np.int64))
    flat = ctx.emit("reshape", [x], {"shape": [rows, t.numel // max(rows, 1)]}, node=node,
                    outputs=[])[0]
    y = ctx.emit("softmax", [flat], {"axis": -1}, node=node, outputs=[])[0]
    for v, suffix in ((flat, "2d"), (y, "softmax2d")):
        if not v.is_const:
            ctx.graph.rename_value(v, ctx.graph.unique_name(f"{v.name}_{suffix}"))
    ctx.emit("reshape", [y], {"shape": list(t.shape)}, node=node)
