"""Removal of no-op nodes: ops that return their input unchanged, and chains of reshapes or
transposes that collapse into one.

Also home of :func:`replace_node`, the one way passes here replace a node by existing values
while keeping the names of graph outputs stable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from hbc.ir.graph import Graph, Node, Value
from hbc.ir.ops.tensor import slice_ranges

from .base import Pass, register_pass
from .rewrite import replace_node, replace_problem

# -- no-op rules: node -> (the values its outputs equal, what it is) -----------------------------
NoopRule = Callable[[Graph, Node], "tuple[list[Value], str] | None"]


def _const_all(graph: Graph, v: Value | None, fill: int) -> bool:
    """Is ``v`` a constant whose every element equals ``fill``?"""
    if v is None or not v.is_const:
        return False
    arr = graph.constants[v.name]
    return arr.size > 0 and bool(np.all(arr == fill))


def _identity(graph: Graph, n: Node):
    return [n.inputs[0]], "identity"


def _reshape(graph: Graph, n: Node):
    if list(n.inputs[0].shape) == n.attrs["shape"]:
        return [n.inputs[0]], "reshape to the same shape"
    return None


def _transpose(graph: Graph, n: Node):
    if n.attrs["perm"] == list(range(len(n.attrs["perm"]))):
        return [n.inputs[0]], "transpose with the identity perm"
    return None


def _cast(graph: Graph, n: Node):
    if n.inputs[0].dtype == n.attrs["to"]:
        return [n.inputs[0]], "cast to the same dtype"
    return None


def _pad(graph: Graph, n: Node):
    if not any(n.attrs["pads"]):
        return [n.inputs[0]], "pad by zero"
    return None


def _slice(graph: Graph, n: Node):
    x = n.inputs[0]
    ranges = slice_ranges(x.shape, n.attrs)
    if all(range(*r.indices(d)) == range(d) for r, d in zip(ranges, x.shape, strict=True)):
        return [x], "slice of the whole tensor"
    return None


def _one_piece(graph: Graph, n: Node):
    if len(n.inputs) == 1 and len(n.outputs) == 1:
        return [n.inputs[0]], f"{n.op} of one piece"
    return None


def _clip(graph: Graph, n: Node):
    if n.attrs["min"] == -np.inf and n.attrs["max"] == np.inf:
        return [n.inputs[0]], "clip without bounds"
    return None


def _arith(graph: Graph, n: Node):
    """x + 0, 0 + x, x - 0, x * 1, 1 * x, x / 1 (when broadcasting does not grow x)."""
    a, b = n.inputs
    neutral = {"add": 0, "sub": 0, "mul": 1, "div": 1}[n.op]
    y = n.outputs[0].shape
    if y == a.shape and _const_all(graph, b, neutral):
        return [a], f"{n.op} of {neutral}"
    if n.op in ("add", "mul") and y == b.shape and _const_all(graph, a, neutral):
        return [b], f"{n.op} of {neutral}"
    return None


NOOP_RULES: dict[str, NoopRule] = {
    "identity": _identity, "reshape": _reshape, "transpose": _transpose, "cast": _cast,
    "pad": _pad, "slice": _slice, "concat": _one_piece, "split": _one_piece, "clip": _clip,
    "add": _arith, "sub": _arith, "mul": _arith, "div": _arith,
}


# -- chains that collapse into one node ----------------------------------------------------------
def _compose(graph: Graph, n: Node) -> bool:
    """reshape(reshape(x, s1), s2) -> reshape(x, s2);
    transpose(transpose(x, p1), p2) -> transpose(x, p) with p[i] = p1[p2[i]]."""
    if n.op not in ("reshape", "transpose"):
        return False
    inner = n.inputs[0].producer
    if inner is None or inner.op != n.op:
        return False
    attrs = dict(n.attrs)
    if n.op == "transpose":
        attrs["perm"] = [inner.attrs["perm"][p] for p in n.attrs["perm"]]
    x = inner.inputs[0]
    inferred = n.opdef.infer([x.type], n.opdef.normalize_attrs(attrs))[0]
    if inferred != n.outputs[0].type:  # e.g. per-channel quantization dropped on the way
        return False
    graph.set_input(n, 0, x)
    n.attrs = attrs
    if not inner.outputs[0].uses and inner.outputs[0] not in graph.outputs:
        graph.remove_node(inner)
    return True


@register_pass
class RemoveNoops(Pass):
    """Remove nodes that return their input: identity; reshape to the input's shape; transpose
    by the identity perm; cast to the input's dtype; pad by all-zero pads; slice of the whole
    tensor (positive steps); concat or split of one piece; clip with infinite bounds; and the
    arithmetic identities ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1`` by constants (``-0.0 + 0``
    gives ``+0.0``: equal, not bit-identical). Chains collapse first: ``reshape(reshape(x))``
    into one reshape, ``transpose(transpose(x, p1), p2)`` into ``transpose(x, p1[p2[i]])``,
    which goes away when the composed perm is the identity.

    A node is only removed when its output type (layout and quantization included) equals its
    input's, and, for a graph output, when the input can take the output's name (a node result
    not itself exposed); otherwise ``--explain`` says why it stayed.
    """

    name = "remove-noops"
    opt_level = 1

    def run(self, graph: Graph) -> bool:
        changed = False
        for node in self.walk(graph):
            while _compose(graph, node):
                changed = True
            rule = NOOP_RULES.get(node.op)
            found = rule(graph, node) if rule is not None else None
            if found is None:
                continue
            values, what = found
            problem = replace_problem(graph, node, values)
            if problem is not None:
                self.explain(node, f"{what} kept: {problem}")
                continue
            replace_node(graph, node, values)
            changed = True
        return changed
