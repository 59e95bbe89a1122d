"""The report of ``hbc merge``: nodes, MACs and parameters of the separate task graphs against
the merged graph, and what was shared."""

from __future__ import annotations

from dataclasses import dataclass, field

from hbc.calops import calops
from hbc.ir.graph import Graph, Value


@dataclass(frozen=True)
class GraphFigures:
    """Size of one graph (or a sum of graphs): nodes, MACs, parameter elements and bytes.

    Parameters are the constants the nodes read, each counted once (as ``hbc calops`` does).
    """

    nodes: int
    macs: int
    params: int
    param_bytes: int

    @classmethod
    def of(cls, graph: Graph) -> GraphFigures:
        seen: dict[str, Value] = {}
        for node in graph.nodes:
            for v in node.inputs:
                if v is not None and v.is_const:
                    seen.setdefault(v.name, v)
        return cls(len(graph.nodes), calops(graph).total_macs,
                   sum(v.type.numel for v in seen.values()),
                   sum(v.type.nbytes for v in seen.values()))

    def __add__(self, other: GraphFigures) -> GraphFigures:
        return GraphFigures(self.nodes + other.nodes, self.macs + other.macs,
                            self.params + other.params, self.param_bytes + other.param_bytes)

    def __sub__(self, other: GraphFigures) -> GraphFigures:
        return GraphFigures(self.nodes - other.nodes, self.macs - other.macs,
                            self.params - other.params, self.param_bytes - other.param_bytes)

    def to_json(self) -> dict[str, int]:
        return {"nodes": self.nodes, "macs": self.macs, "params": self.params,
                "param_bytes": self.param_bytes}


@dataclass
class MergeReport:
    """What merging saved: the sum of the separate task graphs against the merged graph."""

    tasks: list[str]
    per_task: list[GraphFigures]
    merged: GraphFigures
    #: parameter names shared by two or more tasks
    shared_parameters: list[str] = field(default_factory=list)
    #: names whose values differ between tasks, kept separate (``on_conflict="keep"``)
    kept_separate: list[str] = field(default_factory=list)
    #: (name, shared-with name) pairs shared by content (``share_identical=True``)
    shared_identical: list[tuple[str, str]] = field(default_factory=list)
    #: the passes run on the merged graph
    passes: list[str] = field(default_factory=list)

    @property
    def separate(self) -> GraphFigures:
        total = GraphFigures(0, 0, 0, 0)
        for f in self.per_task:
            total = total + f
        return total

    @property
    def saved(self) -> GraphFigures:
        return self.separate - self.merged

    def to_json(self) -> dict:
        """A JSON-ready dict: separate / merged / saved figures, per task, and what was shared."""
        return {
            "tasks": [{"name": n, **f.to_json()} for n, f in zip(self.tasks, self.per_task,
                                                                  strict=True)],
            "separate": self.separate.to_json(),
            "merged": self.merged.to_json(),
            "saved": self.saved.to_json(),
            "shared_parameters": len(self.shared_parameters),
            "kept_separate": list(self.kept_separate),
            "shared_identical": [list(p) for p in self.shared_identical],
            "passes": list(self.passes),
        }

    def to_text(self) -> str:
        """A fixed-width table: separate, merged, saved (and percent) per figure."""
        sep, mer, sav = self.separate, self.merged, self.saved
        rows = [("", "separate", "merged", "saved", "")]
        for label, key in (("nodes", "nodes"), ("MACs", "macs"), ("params", "params"),
                           ("param bytes", "param_bytes")):
            a, b, d = getattr(sep, key), getattr(mer, key), getattr(sav, key)
            pct = f"{100.0 * d / a:.1f}%" if a else "-"
            rows.append((label, f"{a:,}", f"{b:,}", f"{d:,}", pct))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = [f"merged {len(self.tasks)} tasks: {', '.join(self.tasks)}"]
        lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                            for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
                  for r in rows]
        lines.append(f"shared parameters: {len(self.shared_parameters)} names used by 2+ tasks")
        if self.kept_separate:
            lines.append("kept separate (values differ): " + ", ".join(self.kept_separate))
        if self.shared_identical:
            lines.append("shared by identical content: " + ", ".join(
                f"{a} = {b}" for a, b in self.shared_identical))
        lines.append("passes: " + (", ".join(self.passes) or "none"))
        return "\n".join(lines)
