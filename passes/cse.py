"""Common-subexpression elimination: identical computations on the same values run once."""

from __future__ import annotations

from typing import Any

from hbc.ir.graph import Graph, Node

from .base import Pass, register_pass
from .rewrite import replace_node


def node_key(node: Node) -> tuple[Any, ...]:
    """What makes two nodes compute the same thing: the op, the input values (by identity),
    the attributes and the recorded output types (quantization is recorded, not inferred).

    Attributes are compared through ``repr`` of their canonical form, so ``0.0`` and ``-0.0``
    differ and a NaN attribute equals itself.
    """
    inputs = tuple(None if v is None else id(v) for v in node.inputs)
    attrs = repr(list(node.attrs.items()))
    return node.op, inputs, attrs, tuple(v.type for v in node.outputs)


@register_pass
class CommonSubexpressionElimination(Pass):
    """Replace a node by an earlier one with the same op, the same input values (the very same
    ``Value``, not equal data) and equal attributes. Nodes are visited in topological order,
    so after ``b1 = f(x); b2 = f(x)`` merge, ``g(b1)`` and ``g(b2)`` merge too.

    Constants with equal data are ``dedup-constants``' job; run it first to let CSE see
    through duplicated weights. A graph output keeps its name: the surviving value is renamed
    to it, or an identity of that name is added when the survivor is itself exposed.
    """

    name = "cse"
    opt_level = 2

    def run(self, graph: Graph) -> bool:
        seen: dict[tuple[Any, ...], Node] = {}
        merged = 0
        for node in self.walk(graph):
            key = node_key(node)
            first = seen.get(key)
            if first is None:
                seen[key] = node
                continue
            replace_node(graph, node, first.outputs)
            merged += 1
        return merged > 0
