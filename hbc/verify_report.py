"""The report of ``hbc verify`` (:func:`hbc.verify.verify`): bit-exactness of the simulator
against the integer reference, and float-vs-int error, with its text and JSON forms.

JSON (:meth:`VerifyReport.to_json`, schema ``hbc.verify/1``; the CLI dumps it with sorted
keys). Non-finite SQNRs (an exact value, or a zero reference) are ``null``, and so are the
float figures when the reference is an integer model::

    schema: "hbc.verify/1"
    hbm, model, march              the file (or "<bytes>"), the model verified, its march
    reference                      what REF was ("zoo:resnet18", "m.onnx", "<Graph main>", ...)
    reference_kind                 "float" (float model: error figures) | "integer" (int model)
    data                           where the samples came from
    samples                        samples (runs of the compiled batch) checked
    per_layer                      whether every intermediate value was compared too
    result                         "match" | "mismatch";   exit_code: 0 | 1
    mismatched_samples             samples with at least one difference
    first_mismatch: null | {sample, value, node, op, loc, index: [int], simulator, reference,
                    differing, elements, tolerance}
        the first differing value (graph order) of the first sample that differs: its
        producing node, the first differing element (row-major) and both values there,
        how many of its elements differ, and the tolerance it was compared with (null: exact)
    outputs: [{name, dtype, shape, mismatched_samples, cosine, sqnr}]   every model output
    layers: null | [{value, node, op, dtype, mismatched_samples, cosine, sqnr}]
        with per_layer: every node result of the program in graph order (the quantize of each
        input among them); cosine/sqnr against the float value of the same name (the input,
        for a quantized input; the output, for the integers behind an output), null when the
        float model has none
    tolerance: {rule, values: [value]}
        values computed from a CPU-fallback float op, compared within one quantization step

Figures over all samples at once (the samples' tensors concatenated), in float64:
``sqnr = 10 log10(sum(ref^2) / sum((ref - x)^2))``, ``cosine = sum(ref x) /
sqrt(sum(ref^2) sum(x^2))`` (:class:`hbc.debug_report.ErrorStats`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hbc.debug_report import format_cosine, format_db

SCHEMA = "hbc.verify/1"
TOLERANCE_RULE = ("values computed from a CPU-fallback float op (float arithmetic, not promised "
                  "bit-identical between numpy and torch) match within one quantization step: "
                  "1 for integers, the scale for floats")


@dataclass(frozen=True)
class Difference:
    """One value of one sample where the simulator and the reference differ."""

    sample: int
    value: str
    node: str | None
    op: str | None
    loc: str
    index: tuple[int, ...]
    simulator: int | float
    reference: int | float
    differing: int
    elements: int
    tolerance: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"sample": self.sample, "value": self.value, "node": self.node, "op": self.op,
                "loc": self.loc, "index": list(self.index), "simulator": _number(self.simulator),
                "reference": _number(self.reference), "differing": self.differing,
                "elements": self.elements, "tolerance": self.tolerance}

    def to_text(self) -> str:
        where = "graph input" if self.node is None else f"layer '{self.node}' ({self.op}" + (
            f", {self.loc})" if self.loc and self.loc != self.node else ")")
        within = "" if self.tolerance is None else f" by more than {self.tolerance:.6g}"
        return (f"sample {self.sample}: {where}, value %{self.value}, element "
                f"{list(self.index)}: simulator {self.simulator!r}, int_infer "
                f"{self.reference!r} ({self.differing} of {self.elements} elements "
                f"differ{within})")


@dataclass
class OutputCheck:
    """One model output over all samples."""

    name: str
    dtype: str
    shape: list[int]
    mismatched_samples: int = 0
    cosine: float | None = None
    sqnr: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape),
                "mismatched_samples": self.mismatched_samples, "cosine": _finite(self.cosine),
                "sqnr": _finite(self.sqnr)}


@dataclass
class LayerCheck:
    """One value of the program (a node result) over all samples."""

    value: str
    node: str
    op: str
    dtype: str
    mismatched_samples: int = 0
    cosine: float | None = None
    sqnr: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "node": self.node, "op": self.op, "dtype": self.dtype,
                "mismatched_samples": self.mismatched_samples, "cosine": _finite(self.cosine),
                "sqnr": _finite(self.sqnr)}


@dataclass
class VerifyReport:
    """The result of :func:`hbc.verify.verify`; see the module docstring."""

    hbm: str
    model: str
    march: str
    reference: str
    reference_kind: str
    data: str
    samples: int
    per_layer: bool
    outputs: list[OutputCheck]
    layers: list[LayerCheck] | None = None
    mismatched_samples: int = 0
    first_mismatch: Difference | None = None
    tolerance_values: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.mismatched_samples == 0

    @property
    def exit_code(self) -> int:
        """0 when the simulator matched the reference on every sample, else 1."""
        return 0 if self.ok else 1

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with the keys of the module docstring."""
        return {
            "schema": SCHEMA, "hbm": self.hbm, "model": self.model, "march": self.march,
            "reference": self.reference, "reference_kind": self.reference_kind,
            "data": self.data, "samples": self.samples, "per_layer": self.per_layer,
            "result": "match" if self.ok else "mismatch", "exit_code": self.exit_code,
            "mismatched_samples": self.mismatched_samples,
            "first_mismatch": None if self.first_mismatch is None else
            self.first_mismatch.to_json(),
            "outputs": [o.to_json() for o in self.outputs],
            "layers": None if self.layers is None else [r.to_json() for r in self.layers],
            "tolerance": {"rule": TOLERANCE_RULE, "values": list(self.tolerance_values)},
        }

    def to_text(self) -> str:
        """The summary ``hbc verify`` prints: verdict, first mismatch, tables."""
        what = "every value" if self.per_layer else "every output"
        head = [f"verify model '{self.model}' of {self.hbm} (march {self.march})",
                f"  simulator (hbc.runtime) vs int_infer (torch) on {self.samples} sample(s) from "
                f"{self.data}",
                f"  {self.reference_kind} reference: {self.reference}"]
        if self.ok:
            head.append(f"MATCH: {what} bit-exact on all {self.samples} sample(s)")
        else:
            head.append(f"MISMATCH in {self.mismatched_samples} of {self.samples} sample(s); "
                        f"first: {self.first_mismatch.to_text() if self.first_mismatch else '?'}")
        if self.tolerance_values:
            head.append(f"  {len(self.tolerance_values)} value(s) downstream of CPU-fallback "
                        "float ops compared within one quantization step")
        n = self.samples
        parts = ["\n".join(head), _table(
            ("output", "dtype", "shape", "mismatches", "cosine", "SQNR dB"),
            [(o.name, o.dtype, _shape(o.shape), f"{o.mismatched_samples}/{n}", _cos(o.cosine),
              _db(o.sqnr)) for o in self.outputs])]
        if self.layers is not None:
            parts.append("per layer (graph order; error against the float value of the same "
                         "name)\n" + _table(
                             ("value", "op", "dtype", "mismatches", "cosine", "SQNR dB"),
                             [(r.value, r.op, r.dtype, f"{r.mismatched_samples}/{n}",
                               _cos(r.cosine), _db(r.sqnr)) for r in self.layers]))
        return "\n\n".join(parts)


# -- formatting ----------------------------------------------------------------------------------
def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def _number(x: int | float) -> int | float | str:
    if isinstance(x, float) and not math.isfinite(x):
        return repr(x)
    return x


def _db(x: float | None) -> str:
    return format_db(x, infinite="exact")


_cos = format_cosine


def _shape(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in [head, *rows]]
    return "\n".join(lines)


__all__ = ["SCHEMA", "Difference", "LayerCheck", "OutputCheck", "VerifyReport"]
