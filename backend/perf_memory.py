"""DDR traffic of each layer: which tensors stay in on-chip memory and which round-trip DDR.

Without residency (O0, O1) every layer reads its activation inputs from DDR and writes its
outputs back. With residency (O2, O3) a tensor produced on the BPU stays on chip when

* every consumer runs on the BPU and it is not a graph output, and
* at the moment it is produced, its bytes + the tensors already kept (still live) + the largest
  working set of the layers it lives across (from its producer to its last consumer) fit in
  ``onchip_bytes``. A layer's working set is its constants (weights), at most half the on-chip
  memory: larger weights stream through in slices.

Checking at production time is enough: whenever memory is occupied, the latest-produced kept
tensor was admitted against every tensor live then, and the current layer lies in its life.
Views (reshape, identity) alias their input. Constants are read from DDR by each layer that uses
them, once per frame; graph inputs are read from DDR.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hbc.ir.graph import Graph, Value

from .march import March
from .perf_cost import NodeCost, value_bytes


@dataclass
class Traffic:
    """Per-layer DDR bytes and the residency decisions of one opt level."""

    read: dict[str, int] = field(default_factory=dict)
    write: dict[str, int] = field(default_factory=dict)
    #: intermediate tensors kept on chip, and their bytes
    kept: int = 0
    kept_bytes: int = 0
    #: tensors written to DDR (outputs, CPU inputs, spills), and their bytes
    spilled: int = 0
    spilled_bytes: int = 0
    resident: set[str] = field(default_factory=set)


def plan_traffic(graph: Graph, units: dict[str, str], costs: dict[str, NodeCost], march: March,
                 *, resident: bool) -> Traffic:
    """DDR reads and writes of every node; ``resident`` enables on-chip residency (O2+)."""
    root: dict[str, Value] = {}
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.nodes):
        if costs[node.name].view:
            src = node.inputs[0]
            for v in node.outputs:
                root[v.name] = root.get(src.name, src)
            continue
        for v in _unique(node.inputs):
            if not v.is_const:
                r = root.get(v.name, v)
                consumers.setdefault(r.name, []).append(i)
    outputs = {root.get(v.name, v).name for v in graph.outputs}
    t = Traffic(resident=set())
    if resident:
        _plan_residency(graph, units, costs, march, consumers, outputs, t)
    for node in graph.nodes:
        if costs[node.name].view:
            t.read[node.name] = t.write[node.name] = 0
            continue
        seen = set()
        reads = costs[node.name].const_bytes
        for v in _unique(node.inputs):
            r = root.get(v.name, v)
            if v.is_const or r.name in seen:
                continue
            seen.add(r.name)
            if r.name not in t.resident:
                reads += value_bytes(r)
        writes = 0
        for v in node.outputs:
            if v.name in t.resident or (v.name not in consumers and v.name not in outputs):
                continue
            writes += value_bytes(v)
            t.spilled += 1
            t.spilled_bytes += value_bytes(v)
        t.read[node.name], t.write[node.name] = reads, writes
    return t


def _plan_residency(graph: Graph, units: dict[str, str], costs: dict[str, NodeCost],
                    march: March, consumers: dict[str, list[int]], outputs: set[str],
                    t: Traffic) -> None:
    cap = march.onchip_bytes
    working = [min(costs[n.name].const_bytes, cap // 2) if units[n.name] == "bpu" else 0
               for n in graph.nodes]
    live: list[tuple[int, int]] = []  # (last use, bytes) of the kept tensors
    for i, node in enumerate(graph.nodes):
        live = [(last, size) for last, size in live if last >= i]
        if units[node.name] != "bpu" or costs[node.name].view:
            continue
        for v in node.outputs:
            uses = consumers.get(v.name)
            if not uses or v.name in outputs or \
                    any(units[graph.nodes[j].name] != "bpu" for j in uses):
                continue
            last = max(uses)
            size = value_bytes(v)
            need = size + sum(s for _, s in live) + max(working[i:last + 1])
            if need <= cap:
                live.append((last, size))
                t.resident.add(v.name)
                t.kept += 1
                t.kept_bytes += size


def _unique(values: list[Value | None]) -> list[Value]:
    seen: set[int] = set()
    out = []
    for v in values:
        if v is not None and id(v) not in seen:
            seen.add(id(v))
            out.append(v)
    return out
