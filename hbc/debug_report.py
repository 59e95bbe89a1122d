"""The report of ``hbc debug`` (:func:`hbc.debug.debug`): error statistics, per-layer and per-output
results, the mixed-precision search, and their table and JSON forms.

Every figure compares a quantized tensor ``x`` (integers dequantized with their recorded scale,
or a fake-quantized float simulation) with the float reference ``ref`` over all evaluation
samples at once (the samples' tensors concatenated), in float64:

- ``sqnr`` (dB) = ``10 * log10(sum(ref^2) / sum((ref - x)^2))``; +inf when ``x == ref``.
- ``cosine`` = ``sum(ref * x) / sqrt(sum(ref^2) * sum(x^2))`` (1 when both are all zero).

JSON (:meth:`DebugReport.to_json`; keys sorted when dumped by the CLI). Non-finite SQNRs (an
exact layer, or a zero reference) are ``null``::

    model, march, method (calibration observer), mode ("cumulative"|"sensitivity"|"both"),
    samples: {calibration, eval},
    outputs: [{name, cosine, sqnr}]                 model outputs of the final integer graph
    cumulative: [{layer, op, int_op, dtype, cosine, sqnr}] | null   worst (lowest sqnr) first
    sensitivity: [{layer, op, dtype, cosine, sqnr, act_cosine, act_sqnr}] | null   worst first
    int16: null | {mode ("auto"|"globs"), target_sqnr, target_met, promoted: [layer],
                   int16_values: [value], steps: [{promoted, min_output_sqnr, latency_ms}],
                   int8_outputs: [{name, cosine, sqnr}],
                   cost: {metric: "latency", march, opt, int8_latency_ms, latency_ms,
                          delta_ms, delta_fraction, layers: [{layer, int8_us, int16_us}],
                          int16_macs, total_macs, int16_mac_fraction, note}}
    cpu_nodes: [node]                                float fallbacks of the integer graph

``cumulative`` rows are the float layers the integer graph quantized, each compared at its own
output with everything before it quantized too; ``sensitivity`` rows give the model's output
(the worst output) with only that layer quantized: ``sqnr``/``cosine`` with its weights and its
output, ``act_*`` with its output alone (what int16 can recover). ``int16``: ``promoted`` lists
the layers made int16 (auto: in promotion order; globs: the layers with an int16 output),
``int16_values`` the values calibrated as int16, ``steps`` the auto trials in order (layers
promoted -> worst output SQNR and estimated latency; 0 is all int8), ``int8_outputs`` the model
all int8. ``cost`` is what the int16 choice costs on the target march: the static performance
estimate (``backend/perf.py``, at opt level 3 like the graphs compared here, the lowering's
placement) of one frame's latency on one core, all int8 and as chosen, and the lowered layers
whose estimated latency changed (int16 inputs halve the MAC rate on bayes, int16 tensors double
the bytes moved; a layer that exists in one configuration only, such as a requantize, counts 0
in the other); MACs of the layers that read or write an int16 value are kept for reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hbc.ir.graph import Graph
from hbc.ir.types import TensorType

#: the opt level whose latency the mixed-precision cost estimates (debug compares O3 graphs)
COST_OPT = 3
COST_NOTE = ("static estimate (backend/perf.py) of one frame's latency on one core of the march, "
             "opt level 3; layers: lowered nodes whose estimated latency changed")


class ErrorStats:
    """Running sums of one compared tensor over samples (float64)."""

    __slots__ = ("rr", "xx", "rx", "ee")

    def __init__(self) -> None:
        self.rr = self.xx = self.rx = self.ee = 0.0

    def add(self, ref: np.ndarray, x: np.ndarray) -> None:
        r = np.asarray(ref, dtype=np.float64).ravel()
        q = np.asarray(x, dtype=np.float64).ravel()
        d = r - q
        dot = np.einsum  # not BLAS: no thread start-up for these one-pass sums
        self.rr += float(dot("i,i->", r, r))
        self.xx += float(dot("i,i->", q, q))
        self.rx += float(dot("i,i->", r, q))
        self.ee += float(dot("i,i->", d, d))

    def merge(self, other: ErrorStats) -> None:
        self.rr += other.rr
        self.xx += other.xx
        self.rx += other.rx
        self.ee += other.ee

    @property
    def sqnr(self) -> float:
        if self.ee == 0.0:
            return math.inf
        if self.rr == 0.0:
            return -math.inf
        return 10.0 * math.log10(self.rr / self.ee)

    @property
    def cosine(self) -> float:
        if self.rr == 0.0 and self.xx == 0.0:
            return 1.0
        if self.rr == 0.0 or self.xx == 0.0:
            return 0.0
        return self.rx / math.sqrt(self.rr * self.xx)


@dataclass(frozen=True)
class OutputResult:
    """One model output."""

    name: str
    cosine: float
    sqnr: float

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "cosine": self.cosine, "sqnr": _finite(self.sqnr)}


@dataclass(frozen=True)
class LayerResult:
    """One layer of the cumulative table (``int_op`` set) or the sensitivity table (``act_*``
    set)."""

    layer: str
    op: str
    dtype: str
    cosine: float
    sqnr: float
    int_op: str | None = None
    act_cosine: float | None = None
    act_sqnr: float | None = None

    def to_json(self, sensitivity: bool) -> dict[str, Any]:
        out = {"layer": self.layer, "op": self.op, "dtype": self.dtype, "cosine": self.cosine,
               "sqnr": _finite(self.sqnr)}
        if sensitivity:
            out.update(act_cosine=self.act_cosine, act_sqnr=_finite(self.act_sqnr))
        else:
            out["int_op"] = self.int_op
        return out


def estimate_latency(low: Graph, march: str) -> dict:
    """The static performance estimate (``backend/perf.py``) of lowered graph ``low`` on
    ``march`` at :data:`COST_OPT`: the ``hbc.perf/1`` report."""
    from hbc.backend.perf import estimate

    return estimate(low, march, COST_OPT, name=low.name)


@dataclass
class LatencyCost:
    """Estimated latency of one frame on one core, all int8 and with the int16 choice, and the
    lowered layers whose latency changed: ``(name, int8 us, chosen us)``."""

    march: str
    int8_ms: float
    ms: float
    layers: list[tuple[str, float, float]]

    @classmethod
    def of(cls, int8: dict, chosen: dict) -> LatencyCost:
        """From the perf reports (:func:`estimate_latency`) of the all-int8 and the chosen
        lowered graphs."""
        before = {lay["name"]: lay["latency_us"] for lay in int8["layers"]}
        after = {lay["name"]: lay["latency_us"] for lay in chosen["layers"]}
        names = list(after) + [n for n in before if n not in after]
        changed = [(n, before.get(n, 0.0), after.get(n, 0.0)) for n in names
                   if before.get(n, 0.0) != after.get(n, 0.0)]
        return cls(march=chosen["summary"]["march"], int8_ms=int8["summary"]["latency_ms"],
                   ms=chosen["summary"]["latency_ms"], layers=changed)

    @property
    def delta_ms(self) -> float:
        return self.ms - self.int8_ms

    @property
    def delta_fraction(self) -> float:
        return self.delta_ms / self.int8_ms if self.int8_ms else 0.0


@dataclass
class MixedPrecision:
    """The int16 choice: promoted layers, the search steps (layers promoted, worst output SQNR,
    estimated latency in ms) and the cost: estimated latency, and the MACs of int16 layers."""

    mode: str
    target_sqnr: float
    target_met: bool
    promoted: list[str]
    int16_values: list[str]
    steps: list[tuple[int, float, float]]
    int8_outputs: list[OutputResult]
    latency: LatencyCost
    int16_macs: int
    total_macs: int

    @classmethod
    def of(cls, cal: Graph, mode: str, target: float, met: bool, int8: list[OutputResult],
           promoted: list[str] | None, steps: list[tuple[int, float, float]],
           latency: LatencyCost) -> MixedPrecision:
        """The summary of calibrated graph ``cal`` (its ``int16_values``) with its estimated
        ``latency`` and the MACs of the nodes reading or writing int16 values; ``promoted``
        None: the nodes with an int16 output (or graph inputs)."""
        from hbc.calops import calops

        int16 = set(cal.meta.get("int16_values", ()))
        macs = {layer.name: layer.macs for layer in calops(cal).layers}
        hot = [n.name for n in cal.nodes
               if any(v is not None and v.name in int16 for v in [*n.inputs, *n.outputs])]
        if promoted is None:
            promoted = [v.name for v in cal.inputs if v.name in int16] + [
                n.name for n in cal.nodes if any(v.name in int16 for v in n.outputs)]
        return cls(mode=mode, target_sqnr=target, target_met=met, promoted=promoted,
                   int16_values=sorted(int16), steps=steps, int8_outputs=int8,
                   latency=latency, int16_macs=sum(macs.get(n, 0) for n in hot),
                   total_macs=sum(macs.values()))

    def to_json(self) -> dict[str, Any]:
        frac = self.int16_macs / self.total_macs if self.total_macs else 0.0
        lat = self.latency
        return {
            "mode": self.mode, "target_sqnr": self.target_sqnr, "target_met": self.target_met,
            "promoted": list(self.promoted), "int16_values": list(self.int16_values),
            "steps": [{"promoted": k, "min_output_sqnr": _finite(s), "latency_ms": ms}
                      for k, s, ms in self.steps],
            "int8_outputs": [o.to_json() for o in self.int8_outputs],
            "cost": {"metric": "latency", "march": lat.march, "opt": COST_OPT,
                     "int8_latency_ms": lat.int8_ms, "latency_ms": lat.ms,
                     "delta_ms": lat.delta_ms, "delta_fraction": lat.delta_fraction,
                     "layers": [{"layer": n, "int8_us": a, "int16_us": b}
                                for n, a, b in lat.layers],
                     "int16_macs": self.int16_macs, "total_macs": self.total_macs,
                     "int16_mac_fraction": frac, "note": COST_NOTE},
        }


@dataclass
class DebugReport:
    """Accuracy of an integer model against its float graph; see the module docstring."""

    model: str
    march: str
    method: str
    mode: str
    calib_samples: int
    eval_samples: int
    outputs: list[OutputResult]
    cumulative: list[LayerResult] | None = None
    sensitivity: list[LayerResult] | None = None
    int16: MixedPrecision | None = None
    cpu_nodes: list[str] = field(default_factory=list)

    @property
    def min_output_sqnr(self) -> float:
        return min_sqnr(self.outputs)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict with the keys of the module docstring."""
        return {
            "model": self.model, "march": self.march, "method": self.method, "mode": self.mode,
            "samples": {"calibration": self.calib_samples, "eval": self.eval_samples},
            "outputs": [o.to_json() for o in self.outputs],
            "cumulative": None if self.cumulative is None else
            [r.to_json(False) for r in self.cumulative],
            "sensitivity": None if self.sensitivity is None else
            [r.to_json(True) for r in self.sensitivity],
            "int16": None if self.int16 is None else self.int16.to_json(),
            "cpu_nodes": list(self.cpu_nodes),
        }

    def to_text(self) -> str:
        """Fixed-width tables: outputs, cumulative, sensitivity, then the int16 summary."""
        parts = [f"model {self.model}: march {self.march}, calibration {self.method} on "
                 f"{self.calib_samples} samples, evaluated on {self.eval_samples} samples",
                 _table(("output", "cosine", "SQNR dB"),
                        [(o.name, _cos(o.cosine), _db(o.sqnr)) for o in self.outputs])]
        if self.cumulative is not None:
            parts.append("cumulative (every layer quantized; each layer's output), worst first\n"
                         + _table(("layer", "op", "int op", "dtype", "cosine", "SQNR dB"),
                                  [(r.layer, r.op, r.int_op or "", r.dtype, _cos(r.cosine),
                                    _db(r.sqnr)) for r in self.cumulative]))
        if self.sensitivity is not None:
            parts.append("sensitivity (one layer quantized; model output, float simulation), "
                         "worst first\n" + _table(
                             ("layer", "op", "dtype", "cosine", "SQNR dB", "act cosine",
                              "act SQNR dB"),
                             [(r.layer, r.op, r.dtype, _cos(r.cosine), _db(r.sqnr),
                               _cos(r.act_cosine), _db(r.act_sqnr)) for r in self.sensitivity]))
        if self.int16 is not None:
            parts.append(_int16_text(self.int16, self.min_output_sqnr))
        if self.cpu_nodes:
            parts.append("float on the CPU: " + ", ".join(self.cpu_nodes))
        return "\n\n".join(parts)


def _int16_text(mp: MixedPrecision, final: float) -> str:
    int8 = min_sqnr(mp.int8_outputs)
    frac = mp.int16_macs / mp.total_macs if mp.total_macs else 0.0
    lat = mp.latency
    lines = [f"int16 ({mp.mode}): {len(mp.promoted)} layer(s) promoted"
             + (f": {', '.join(mp.promoted)}" if mp.promoted else "")]
    if mp.mode == "auto":
        met = "met" if mp.target_met else "NOT met"
        lines.append(f"target {mp.target_sqnr:g} dB {met}: min output SQNR {_db(int8)} dB "
                     f"(int8) -> {_db(final)} dB")
        lines.append("steps: " + ", ".join(f"{k} -> {_db(s)} dB {ms:.4f} ms"
                                           for k, s, ms in mp.steps))
    lines.append(f"cost on {lat.march} (estimated latency, O{COST_OPT}, one frame on one core): "
                 f"{lat.int8_ms:.4f} ms all int8 -> {lat.ms:.4f} ms ({lat.delta_ms * 1e3:+.1f} us, "
                 f"{100 * lat.delta_fraction:+.2f}%)")
    if lat.layers:
        lines.append(_table(("layer", "int8 us", "int16 us", "delta us"),
                            [(n, f"{a:.3f}", f"{b:.3f}", f"{b - a:+.3f}")
                             for n, a, b in lat.layers]))
    lines.append(f"MACs: {mp.int16_macs:,} of {mp.total_macs:,} ({100 * frac:.1f}%) in layers "
                 "that read or write int16")
    return "\n".join(lines)


def dequantize(a: np.ndarray, t: TensorType) -> np.ndarray:
    """Integers times their recorded (per-tensor or per-channel) scale, in float64; floats as
    they are."""
    if a.dtype.kind == "f" or t.quant is None:
        return a
    s = np.asarray(t.quant.scale, dtype=np.float32).astype(np.float64)
    if t.quant.axis is not None and s.size > 1:
        shape = [1] * a.ndim
        shape[t.quant.axis] = -1
        s = s.reshape(shape)
    return a.astype(np.float64) * s


def as_numpy(t: Any) -> np.ndarray:
    """A torch tensor (or array) as a numpy array, without a copy."""
    return t.numpy() if hasattr(t, "numpy") else np.asarray(t)


def worst_first(rows: list[LayerResult]) -> list[LayerResult]:
    """Rows by SQNR ascending (then cosine, then name: deterministic)."""
    return sorted(rows, key=lambda r: (r.sqnr, r.cosine, r.layer))


def min_sqnr(outputs: list[OutputResult]) -> float:
    return min((o.sqnr for o in outputs), default=math.inf)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def format_db(x: float | None, infinite: str = "inf") -> str:
    """An SQNR for a table: two decimals, ``infinite`` for no error, "-" when unknown."""
    if x is None:
        return "-"
    return infinite if x == math.inf else f"{x:.2f}"


def format_cosine(x: float | None) -> str:
    """A cosine similarity for a table: six decimals, "-" when unknown."""
    return "-" if x is None else f"{x:.6f}"


_db, _cos = format_db, format_cosine


def _table(head: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Text columns left-aligned, numeric columns (from ``cosine`` on) right-aligned."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    first_num = next((i for i, h in enumerate(head) if h in ("cosine", "SQNR dB", "int8 us")),
                     len(head))

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.rjust(w) if i >= first_num else c.ljust(w)
                         for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths)), *map(fmt, rows)])
