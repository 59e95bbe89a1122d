"""Dead-code elimination: nodes and constants that no graph output depends on are removed."""

from __future__ import annotations

from hbc.ir.graph import Graph

from .base import Pass, register_pass


@register_pass
class DeadCodeElimination(Pass):
    """Remove every node none of whose outputs is used or is a graph output, transitively
    (a backward sweep over the topologically ordered nodes sees each node after all its
    users), then every constant nothing uses.

    Graph inputs are never removed, even unused ones: they are the model's interface
    (``layout-check`` reports inputs that feed nothing).
    """

    name = "dce"
    opt_level = 1

    def run(self, graph: Graph) -> bool:
        outputs = {id(v) for v in graph.outputs}
        removed = 0
        for node in reversed(list(graph.nodes)):
            if any(v.uses or id(v) in outputs for v in node.outputs):
                continue
            self.ctx.node = node
            graph.remove_node(node)
            removed += 1
        self.ctx.node = None
        for v in graph.constant_values():
            if not v.uses and id(v) not in outputs:
                graph.remove_value(v)
                removed += 1
        return removed > 0
