"""One sample of ``hbc verify``: the simulator, the integer reference and the float model on
the same inputs, compared value by value (:class:`Checker`, used in-process and in workers).

Comparison: every model output (with ``per_layer`` every value of the program, in graph
order) of the simulator (:meth:`hbc.runtime.Runtime.run_values`) against the integer
reference (``IntInferModule.run``), equal dtype, shape and bits (NaN equal to NaN). Values in
:func:`tolerated` (computed from a CPU-fallback float op) may differ by one quantization step.
When an output differs and the values were not all compared, the reference runs again with
its trace to find the first diverging value. Error figures are returned as raw sums (see
:class:`hbc.debug_report.ErrorStats`) so samples merge in any process, in sample order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from hbc.debug_report import ErrorStats, dequantize
from hbc.ir.graph import Graph, Value
from hbc.ir.types import FLOAT_DTYPES
from hbc.runtime import Runtime

from .verify_report import Difference

Sums = tuple[float, float, float, float]


@dataclass
class Reference:
    """The resolved REF: a float graph (optimized like compile did), or an integer graph or
    module that replaces the program's int_infer."""

    kind: str  # "float" | "integer"
    text: str
    graph: Graph | None = None
    module: Any = None


@dataclass
class SampleResult:
    """What one sample gave: differences by value name (the first in graph order kept apart),
    and the error sums of each compared output and layer."""

    index: int
    diffs: dict[str, Difference]
    first: Difference | None
    outputs: dict[str, Sums]
    layers: dict[str, Sums]


# -- one sample ----------------------------------------------------------------------------------
class Checker:
    """Runs one sample through the simulator, the integer reference and the float model."""

    def __init__(self, rt: Runtime, ref: Reference, per_layer: bool) -> None:
        from hbc.quant import build_int_infer

        self.rt, self.per_layer, g = rt, per_layer, rt.graph
        self.int_ref = ref.module if ref.module is not None else build_int_infer(
            ref.graph if ref.kind == "integer" else g)
        self.float_graph = ref.graph if ref.kind == "float" else None
        self.tolerance = {v.name: _step(v) for v in tolerated(g)}
        self.order = [(v, n) for n in g.nodes for v in n.outputs]
        self.types = {v.name: v.type for v, _ in self.order}
        self.layers = layer_pairs(rt, self.float_graph) if per_layer else {}

    def check(self, index: int, feeds: dict[str, np.ndarray]) -> SampleResult:
        sim = self.rt.run_values(feeds)
        ref = self.int_ref.run(feeds, trace=self.per_layer)
        diffs: dict[str, Difference] = {}
        names = [v.name for v, _ in self.order] if self.per_layer else \
            [d.name for d in self.rt.outputs]
        for name in names:
            self._compare(index, name, sim, ref, diffs)
        if diffs and not self.per_layer:  # locate the first diverging value
            ref = self.int_ref.run(feeds, trace=True)
            for v, _ in self.order:
                if self._compare(index, v.name, sim, ref, diffs):
                    break
        first = next((diffs[v.name] for v, _ in self.order if v.name in diffs), None)
        outputs: dict[str, Sums] = {}
        layers: dict[str, Sums] = {}
        if self.float_graph is not None:
            fvals = self._float(feeds)
            for d in self.rt.outputs:
                outputs[d.name] = _sums(fvals[d.name], dequantize(sim[d.name],
                                                                  self.types[d.name]))
            for value, fname in self.layers.items():
                layers[value] = _sums(fvals[fname], dequantize(sim[value], self._type(value)))
        return SampleResult(index, diffs, first, outputs, layers)

    def _type(self, name: str):
        return self.types[name] if name in self.types else self.rt.graph.value(name).type

    def _compare(self, index: int, name: str, sim: dict, ref: dict,
                 diffs: dict[str, Difference]) -> bool:
        """Record how value ``name`` differs (if it does, and the reference has it)."""
        if name in diffs or name not in ref:
            return name in diffs
        tol = self.tolerance.get(name)
        found = difference(sim[name], np.asarray(ref[name]), tol)
        if found is None:
            return False
        at, mine, theirs, count, size = found
        node = self.rt.graph.value(name).producer
        diffs[name] = Difference(
            sample=index, value=name, node=node.name if node else None,
            op=node.op if node else None, loc=node.loc if node else "", index=at,
            simulator=mine, reference=theirs, differing=count, elements=size, tolerance=tol)
        return True

    def _float(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hbc.ir.interpret import interpret

        want = set(self.layers.values())
        values = {k: v for k, v in feeds.items() if k in want}

        def observe(node, results) -> None:
            for v, r in zip(node.outputs, results, strict=False):
                if v.name in want:
                    values[v.name] = r

        values.update(interpret(self.float_graph, feeds, observe=observe if want else None))
        return values


def difference(got: np.ndarray, want: np.ndarray, tol: float | None
               ) -> tuple[tuple[int, ...], Any, Any, int, int] | None:
    """None when ``got`` equals ``want`` (bit for bit, NaN equal to NaN; within ``tol`` when
    given), else (first differing index, both values there, differing count, elements). A
    dtype or shape difference is one difference, described by the two types."""
    if got.shape != want.shape or got.dtype != want.dtype:
        return (), f"{got.dtype}{list(got.shape)}", f"{want.dtype}{list(want.shape)}", 1, 1
    if tol is None:
        bad = got != want
        if got.dtype.kind == "f":
            bad &= ~(np.isnan(got) & np.isnan(want))
    else:
        bad = ~(np.abs(got.astype(np.float64) - want.astype(np.float64)) <= tol)
    if not bad.any():
        return None
    at = tuple(int(i) for i in np.argwhere(bad)[0])
    return at, got[at].item(), want[at].item(), int(np.count_nonzero(bad)), int(bad.size)


def tolerated(graph: Graph) -> list[Value]:
    """The values computed from a CPU-fallback node's results (those included), in graph
    order: the values compared within one quantization step."""
    cpu = set(graph.meta.get("cpu_nodes", ()))
    names: set[str] = set()
    out = []
    for node in graph.nodes:
        if node.name in cpu or any(v is not None and v.name in names for v in node.inputs):
            names.update(v.name for v in node.outputs)
            out += node.outputs
    return out


def _step(v: Value) -> float:
    """One quantization step of ``v``: 1 for integers, the (first) scale for floats, their
    own or that of the integers they were dequantized from (1.0 when there is none)."""
    if v.dtype not in FLOAT_DTYPES:
        return 1.0
    for t in (v.type, *(u.type for u in (v.producer.inputs if v.producer else ()) if u)):
        if t.quant is not None:
            return float(max(t.quant.scale))
    return 1.0


def layer_pairs(rt: Runtime, float_graph: Graph | None) -> dict[str, str]:
    """Program value -> float value of the same quantity: the integers behind each quantized
    input and output -> that input or output, and every other node result -> the float value
    of its name and shape."""
    if float_graph is None:
        return {}
    pairs = {d.value: d.name for d in [*rt.inputs, *rt.outputs] if d.value is not None}
    for node in rt.graph.nodes:
        for v in node.outputs:
            if v.name in pairs or not float_graph.has_value(v.name):
                continue
            f = float_graph.value(v.name)
            if f.kind != "const" and f.dtype in FLOAT_DTYPES and f.shape == v.shape and (
                    v.dtype in FLOAT_DTYPES or v.type.quant is not None):
                pairs[v.name] = v.name
    return pairs


def _sums(ref: np.ndarray, x: np.ndarray) -> Sums:
    s = ErrorStats()
    s.add(np.asarray(ref), np.asarray(x))
    return (s.rr, s.xx, s.rx, s.ee)


__all__ = ["Checker", "Reference", "SampleResult", "Sums", "difference", "layer_pairs",
           "tolerated"]
