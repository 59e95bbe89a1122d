"""The model checker (``hbc check`` / ``model_checker``): where every layer of a model runs on a
march, before training or compiling.

:func:`check` loads the model (``.onnx``, ``.hbir``, ``module:function``, ``zoo:NAME``, a QAT
model or a Graph), runs the canonical passes compile runs first (so a residual add is checked
fused into its conv, and batch norms folded), and asks ``hbc.backend.legality`` for a verdict per
node: BPU, CPU (fallback in float, with quantize/dequantize around it) or unsupported, each with
the constraint, the actual and allowed values and a hint. The :class:`CheckReport` adds the
partition (BPU and CPU subgraphs, the boundaries between them) and a summary line, and renders
as text, JSON (schema ``hbc.check/1``, docs/checker.md) or an HTML page. No calibration data is
needed. This module imports nothing heavy, so ``import hbc`` stays light.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hbc.backend.legality import Partition, Verdict
    from hbc.ir.graph import Graph

SCHEMA = "hbc.check/1"
#: the passes run before the check, as compile runs them (fuse gets the march)
CANONICAL_PASSES = ("absorb-qdq", "const-fold", "remove-noops", "dce", "fold-bn", "fuse")
STATUS = {0: "bpu", 1: "cpu-fallback"}


@dataclass
class CheckReport:
    """The checker's verdicts on one model for one march."""

    model: str
    march: str
    verdicts: list[Verdict]
    inputs: list[Verdict]
    partition: Partition
    graph: Graph | None = field(default=None, repr=False)

    # -- numbers -----------------------------------------------------------------------------
    @property
    def nodes(self) -> list[Verdict]:
        """The verdicts of the compute nodes (boundary ops left out)."""
        return [v for v in self.verdicts if not v.boundary]

    def units(self) -> Counter[str]:
        return Counter(v.unit for v in self.nodes)

    @property
    def unsupported(self) -> list[Verdict]:
        return [v for v in (*self.inputs, *self.nodes) if v.unit == "unsupported"]

    @property
    def fallbacks(self) -> list[Verdict]:
        return [v for v in self.nodes if v.unit == "cpu"]

    @property
    def exit_code(self) -> int:
        """0: the whole model runs on the BPU; 1: something falls back or is unsupported."""
        return 0 if not self.unsupported and not self.fallbacks else 1

    @property
    def status(self) -> str:
        """``bpu``, ``cpu-fallback`` or ``unsupported``."""
        return "unsupported" if self.unsupported else STATUS[self.exit_code]

    def summary(self) -> str:
        """One line: how much runs where, the subgraphs, the boundaries and the outcome."""
        units, total = self.units(), len(self.nodes)
        head = f"{self.model} on {self.march}: "
        p = self.partition
        if self.exit_code == 0:
            return head + (f"every node runs on the BPU ({_n(total, 'node')}, "
                           f"{_n(p.count('bpu'), 'subgraph')}): passes")
        parts = [f"{units['bpu']} of {total} nodes on the BPU"]
        if units["cpu"]:
            parts.append(f"{units['cpu']} on the CPU ({_ops(self.fallbacks)})")
        if self.unsupported:
            parts.append(f"{len(self.unsupported)} unsupported ({_ops(self.unsupported)})")
        outcome = (f"cannot run on {self.march}" if self.unsupported else
                   "runs with CPU fallback")
        return (head + ", ".join(parts) + f"; {_n(p.count('bpu'), 'BPU subgraph')}, "
                f"{_n(p.count('cpu'), 'CPU subgraph')}, {p.quantize} quantize and "
                f"{p.dequantize} dequantize between them: {outcome}")

    # -- renderings --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON document (schema ``hbc.check/1``, docs/checker.md)."""
        units, p = self.units(), self.partition
        return {
            "schema": SCHEMA,
            "model": self.model,
            "march": self.march,
            "exit_code": self.exit_code,
            "status": self.status,
            "summary": self.summary(),
            "counts": {"nodes": len(self.nodes), "bpu": units["bpu"], "cpu": units["cpu"],
                       "unsupported": units["unsupported"],
                       "boundary": len(self.verdicts) - len(self.nodes),
                       "unsupported_inputs": sum(v.unit == "unsupported" for v in self.inputs)},
            "partition": {
                "bpu_subgraphs": p.count("bpu"), "cpu_subgraphs": p.count("cpu"),
                "unsupported_subgraphs": p.count("unsupported"),
                "quantize": p.quantize, "dequantize": p.dequantize,
                "input_quantize": p.input_quantize, "output_dequantize": p.output_dequantize,
                "subgraphs": [{"unit": s.unit, "nodes": list(s.nodes)} for s in p.subgraphs],
            },
            "inputs": [v.to_json() for v in self.inputs],
            "nodes": [v.to_json() for v in self.verdicts],
        }

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text: sorted keys, two-space indent, final newline."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_text(self) -> str:
        """Every node that does not run on the BPU with its problems and hints, the BPU ops by
        count, the partition and the summary line."""
        lines = [f"model_checker: {self.model} on {self.march}"]
        hints: set[str] = set()  # a hint is printed once, under its first problem
        for v in (*self.inputs, *self.nodes):
            for pr in v.problems if v.unit != "bpu" else ():
                lines.append(f"  {v.unit.upper()}  {v.op} {v.where()}: {pr.message}")
                if pr.hint not in hints:
                    hints.add(pr.hint)
                    lines.append(f"      hint: {pr.hint}")
        bpu = Counter(v.op for v in self.nodes if v.unit == "bpu")
        if bpu:
            lines.append(f"  BPU: {sum(bpu.values())} nodes (" +
                         ", ".join(f"{op} {n}" for op, n in sorted(bpu.items())) + ")")
        p = self.partition
        lines.append(f"  partition: {_n(p.count('bpu'), 'BPU subgraph')}, "
                     f"{_n(p.count('cpu'), 'CPU subgraph')}"
                     + (f", {_n(p.count('unsupported'), 'unsupported subgraph')}"
                        if p.count("unsupported") else "")
                     + f"; {p.quantize} quantize and {p.dequantize} dequantize at the CPU "
                     f"fallbacks, {p.input_quantize} quantize at the inputs, "
                     f"{p.output_dequantize} dequantize at the outputs")
        lines.append(f"summary: {self.summary()}")
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """A self-contained page: the graph coloured by verdict, and every problem."""
        from .check_html import check_html

        return check_html(self)


def _n(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _ops(verdicts: Sequence[Verdict]) -> str:
    counts = Counter(v.op for v in verdicts)
    return ", ".join(op if n == 1 else f"{n} {op}" for op, n in sorted(counts.items()))


def check(model: Any, march: str = "bayes", *,
          input_shapes: Mapping[str, Sequence[int]] | None = None) -> CheckReport:
    """Check where every node of ``model`` runs on ``march`` (see the module docstring).

    ``model``: anything :func:`hbc.load` takes, or a Graph (left unchanged). ``input_shapes``
    fixes dynamic ONNX input dimensions. Raises InputError for a bad model or march.
    """
    from hbc import passes as hp
    from hbc.backend.legality import (
        check_graph,
        check_inputs,
        is_lowered,
        partition,
        resolve_march,
    )
    from hbc.ir.graph import Graph

    from .api import load

    name = resolve_march(march)
    graph = model if isinstance(model, Graph) else load(model, input_shapes)
    if not is_lowered(graph):
        # no per-pass verification: the check only reads shapes and attributes
        graph = hp.run(graph, passes=list(CANONICAL_PASSES), march=name, verify=False)
    verdicts = check_graph(graph, name)
    inputs = check_inputs(graph, name, verdicts)
    return CheckReport(_model_name(model, graph), name, verdicts, inputs,
                       partition(graph, verdicts), graph)


def _model_name(model: Any, graph: Graph) -> str:
    if isinstance(model, str) and model.startswith("zoo:"):
        return model[4:]
    if isinstance(model, (str, Path)) and Path(str(model)).suffix in (".onnx", ".hbir"):
        return Path(str(model)).stem
    if isinstance(model, str) and ":" in model:
        return model.rsplit(".", 1)[-1]  # pkg.module:function -> module:function
    return graph.name
