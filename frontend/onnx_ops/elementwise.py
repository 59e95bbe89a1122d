"""Add, Sub, Mul, Div: numpy-style broadcasting binary ops."""

from __future__ import annotations

from . import converter

_IR = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div"}


@converter(*_IR)
def binary(ctx, node):
    if ctx.attrs(node).get("broadcast", 1) == 0 and ctx.opset < 7:
        ctx.unsupported(node, "legacy broadcast=0 semantics (opset < 7)")
    ctx.emit(_IR[node.op_type], [ctx.input(node, 0), ctx.input(node, 1)], node=node)
