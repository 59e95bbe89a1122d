"""calops: multiply-accumulates and parameters per layer and in total.

MACs come from each op's ``macs()`` in the registry; a layer's parameters are the elements of
its constant inputs (weights, biases, BN statistics), each constant counted once even when
several layers share it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from hbc.ir.graph import Graph
from hbc.ir.registry import get_op


@dataclass(frozen=True)
class LayerOps:
    """One node's figures."""

    name: str
    op: str
    output_shape: tuple[int, ...]
    macs: int
    params: int


@dataclass(frozen=True)
class CalopsReport:
    """Per-layer figures in graph order and the totals."""

    model: str
    layers: list[LayerOps]

    @property
    def total_macs(self) -> int:
        return sum(layer.macs for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def to_json(self) -> dict:
        """A JSON-ready dict: {model, total_macs, total_params, layers: [...]}."""
        return {
            "model": self.model,
            "total_macs": self.total_macs,
            "total_params": self.total_params,
            "layers": [
                {**asdict(layer), "output_shape": list(layer.output_shape)}
                for layer in self.layers
            ],
        }

    def to_text(self) -> str:
        """A fixed-width table with a total line."""
        rows = [(layer.name, layer.op, "x".join(map(str, layer.output_shape)) or "scalar",
                 f"{layer.macs:,}", f"{layer.params:,}") for layer in self.layers]
        head = ("layer", "op", "output", "MACs", "params")
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]

        def fmt(r: tuple[str, ...]) -> str:
            cells = zip(r, widths, strict=True)
            return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w)
                             for i, (c, w) in enumerate(cells)).rstrip()

        lines = [fmt(head), fmt(tuple("-" * w for w in widths))]
        lines += [fmt(r) for r in rows]
        lines.append(
            f"total: {self.total_macs:,} MACs ({self.total_macs / 1e9:.3f} G), "
            f"{self.total_params:,} params ({self.total_params / 1e6:.3f} M), "
            f"{len(self.layers)} layers"
        )
        return "\n".join(lines)


def calops(graph: Graph) -> CalopsReport:
    """MACs and parameter counts of every node of ``graph``."""
    seen: set[str] = set()
    layers = []
    for node in graph.nodes:
        opdef = get_op(node.op)
        macs = opdef.macs([None if v is None else v.type for v in node.inputs],
                          [v.type for v in node.outputs], node.attrs)
        params = 0
        for v in node.inputs:
            if v is not None and v.is_const and v.name not in seen:
                seen.add(v.name)
                params += v.type.numel
        shape = node.outputs[0].shape if node.outputs else ()
        layers.append(LayerOps(node.name, node.op, shape, int(macs), params))
    return CalopsReport(graph.name, layers)
