"""Rewrite helpers shared by passes: replacing a node by existing values while graph outputs
keep their names and positions."""

from __future__ import annotations

from collections.abc import Sequence

from hbc.ir.graph import Graph, Node, Value


def replace_node(graph: Graph, node: Node, values: Sequence[Value]) -> None:
    """Make every user of ``node``'s outputs use ``values`` instead and remove the node.

    A graph output keeps its name and position: its replacement is renamed to it when the
    replacement is a node result not otherwise exposed, else an ``identity`` of that name is
    added (see :meth:`Graph.named_output`). Constants that only the node read are removed.
    """
    exposed = {i: v.name for i, v in enumerate(graph.outputs) if v.producer is node}
    inputs = list(node.inputs)
    for old, new in zip(node.outputs, values, strict=True):
        graph.replace_all_uses(old, new)
    graph.remove_node(node)
    for i, name in sorted(exposed.items()):
        others = graph.outputs[:i] + graph.outputs[i + 1:]
        graph.outputs[i] = graph.named_output(graph.outputs[i], name, taken=others)
    # constants only the removed node read (the 1 of ``x * 1``) go with it
    for v in dict.fromkeys(v for v in inputs if v is not None and v.is_const):
        if not v.uses and v not in graph.outputs:
            graph.remove_value(v)


def replace_problem(graph: Graph, node: Node, values: Sequence[Value]) -> str | None:
    """Why ``node`` cannot be replaced by ``values`` without adding nodes, or None."""
    for old, new in zip(node.outputs, values, strict=True):
        if old.type != new.type:
            return f"%{old.name} is {old.type.describe()} but %{new.name} is {new.type.describe()}"
    exposed = [v for v in graph.outputs if v.producer is node]
    for old, new in zip(node.outputs, values, strict=True):
        if old in exposed and (new.kind != "node" or new in graph.outputs
                               or sum(v is new for v in values) > 1):
            what = {"input": "a graph input", "const": "a constant"}.get(
                new.kind, "already a graph output")
            return (f"%{old.name} is a graph output and %{new.name} is {what}, so it cannot "
                    "take the output's name")
    return None
