"""ReduceMean, ReduceMax, ReduceSum, ArgMax.

Reduction axes are an attribute before opset 18 (13 for ReduceSum) and a constant input after.
Empty axes reduce over every axis unless ``noop_with_empty_axes`` is set, which makes the node an
identity.
"""

from __future__ import annotations

import numpy as np

from . import converter

_IR = {"ReduceMean": "reduce_mean", "ReduceMax": "reduce_max", "ReduceSum": "reduce_sum"}


@converter(*_IR, static=(1,))
def reduce(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    axes_are_input = ctx.opset >= (13 if node.op_type == "ReduceSum" else 18)
    if axes_are_input:
        value = ctx.const(node, 1)
        axes = None if value is None else [int(v) for v in np.asarray(value).ravel()]
    else:
        axes = a.get("axes")
    if not axes and a.get("noop_with_empty_axes", 0):
        ctx.bind(node.output[0], x)
        return
    rank = x.type.rank
    for ax in axes or []:
        if not -rank <= ax < max(rank, 1):
            ctx.unsupported(node, f"axis {ax} is out of range for rank {rank}")
    axes = sorted({ax % rank for ax in axes or []}) if rank else []
    attrs = {"axes": axes, "keepdims": a.get("keepdims", 1)}
    ctx.emit(_IR[node.op_type], [x], attrs, node=node)


@converter("ArgMax")
def argmax(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    rank = x.type.rank
    axis = a.get("axis", 0)
    if not -rank <= axis < max(rank, 1):
        ctx.unsupported(node, f"axis {axis} is out of range for rank {rank}")
    attrs = {"axis": axis % max(rank, 1), "keepdims": a.get("keepdims", 1),
             "select_last_index": a.get("select_last_index", 0)}
    ctx.emit("argmax", [x], attrs, node=node)
