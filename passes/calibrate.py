"""Post-training calibration: activation scales of a float graph from sample data.

:func:`calibrate` runs the float interpreter over every calibration sample and feeds each
observed tensor (the float graph inputs and every float node output) into a streaming
:class:`~hbc.passes.observers.Histogram`; no activation outlives its node. An observer then
turns each histogram into a clipping range ``a`` and the value gets
``QuantParams((float32(a / qmax),))`` (``qmax`` 127, or 32767 for the ``int16_values``).
Weights are not calibrated: lowering takes their per-channel max from the constants.

Ops that move or select integers with the scale unchanged (docs/quantization.md: reshape,
transpose, slice, max_pool, relu, clip, nearest resize, ...) give their outputs the scale of
their data input: such a chain is one *scale group*, observed once at its root (the first value;
the others hold a subset of its values) and given one scale, so no requantize is needed between
them. ``int16_values`` likewise applies to a whole group.

``auto`` picks, per tensor, the candidate range (max, percentile, kl, mse) whose fake-quantized
tensor gives the least error *at the outputs of the nodes that consume it*, summed over the
calibration set (a second pass over the data; one-shot iterators are buffered, inputs only).
The tensor's own histogram MSE is not used as the criterion: the mse observer minimises it by
construction, so it would always win. What the model feels is the consumer's output: pooling
and convolutions average uncorrelated rounding noise away but not the bias of clipping, and a
fused ReLU hides the error of negative values. Each consumer's squared error is divided by its
output energy (a relative error, so consumers of different magnitudes add up fairly); a value
that is a graph output also counts its own error. Sums use ``math.fsum``, so the choice does not
depend on the order of the samples, like the histograms.

Calibration needs data, so it is an API, not a pipeline pass. The library never prints;
:func:`calibration_progress` gives the CLI a rich progress bar to pass as ``progress``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.interpret import interpret
from hbc.ir.types import FLOAT_DTYPES, QuantParams

from .calib_data import CalibData, load_calib_data
from .observers import OBSERVERS, QMAX, Histogram, NonFiniteError, compute_range, fake_quant

log = logging.getLogger(__name__)

METHODS = (*OBSERVERS, "auto")
#: ops whose float outputs share the scale of input 0 (integers moved or selected unchanged).
SCALE_PRESERVING = frozenset({
    "reshape", "transpose", "slice", "split", "pad", "depth_to_space", "space_to_depth",
    "gather", "max_pool", "global_max_pool", "identity", "relu", "clip", "resize"})
ProgressFn = Callable[[int, "int | None"], None]


def calibrate(graph: Graph, data: Any, method: str = "max", *, percentile: float = 99.99,
              progress: ProgressFn | None = None, int16_values: Iterable[str] = ()) -> Graph:
    """A calibrated copy of ``graph`` (float, after fold-bn and fuse).

    ``data``: anything :func:`~hbc.passes.calib_data.load_calib_data` reads (``.npz``, folder,
    mapping, iterable of dicts, DataLoader). ``method``: one of METHODS. ``progress(done,
    total)`` is called after each run with samples done and the total (None when unknown;
    ``auto`` counts both passes). ``int16_values`` names values quantized to int16 (bayes).
    Records ``graph.meta["calibration"]`` and, when given, ``graph.meta["int16_values"]``.
    """
    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}' (methods: {', '.join(METHODS)})")
    if not 0.0 < percentile <= 100.0:
        raise InputError(f"percentile {percentile}: expected a number in (0, 100]")
    start = time.perf_counter()
    g = graph.copy()
    targets = _targets(g)
    root = scale_groups(g, targets)
    int16 = {root[n] for n in _int16(g, targets, int16_values)}
    source = load_calib_data(data, g)
    buffer: list[dict[str, np.ndarray]] | None = (
        [] if method == "auto" and not source.reiterable else None)
    hists = {r: Histogram() for r in dict.fromkeys(root.values())}
    n = _observe(g, source, hists, progress, buffer)
    qmax = {r: QMAX["i16" if r in int16 else "i8"] for r in hists}
    ranges = {r: {m: compute_range(h, m, percentile=percentile, qmax=qmax[r])
                  for m in (OBSERVERS if method == "auto" else (method,))}
              for r, h in hists.items()}
    chosen = {r: method for r in hists}
    if method == "auto":
        runs: Iterable[dict[str, np.ndarray]] = source if buffer is None else buffer
        chosen = _auto(g, runs, root, ranges, qmax, progress, n)
    for name, value in targets.items():
        r = root[name]
        a = ranges[r][chosen[r]]
        if not a > 0.0:
            log.warning("calibration: %%%s is zero on every sample; scale 1/%d", name, qmax[r])
            a = 1.0
        g.set_quant(value, QuantParams((float(np.float32(a / qmax[r])),)))
    meta: dict[str, Any] = {"method": method, "samples": n}
    if method == "percentile":
        meta["percentile"] = percentile
    if method == "auto":
        meta["per_value_method"] = {name: chosen[root[name]] for name in targets}
    g.meta["calibration"] = meta
    if int16:
        g.meta["int16_values"] = [name for name in targets if root[name] in int16]
    log.info("calibrated %d values of '%s' on %d samples (%s) in %.2f s", len(targets), g.name,
             n, method, time.perf_counter() - start)
    return g


def _targets(g: Graph) -> dict[str, Value]:
    """Values to observe, in graph order: float graph inputs and float node outputs."""
    out = {v.name: v for v in g.inputs if v.dtype in FLOAT_DTYPES}
    for node in g.nodes:
        out.update((v.name, v) for v in node.outputs if v.dtype in FLOAT_DTYPES)
    return out


def scale_groups(g: Graph, targets: dict[str, Value]) -> dict[str, str]:
    """value name -> the root of its scale group (itself unless produced by a scale-preserving
    op from another target)."""
    root: dict[str, str] = {}
    for name in targets:
        v = targets[name]
        src = v.producer.inputs[0] if v.producer is not None and v.producer.inputs else None
        ties = src is not None and src.name in root and _preserves_scale(v.producer)
        root[name] = root[src.name] if ties else name  # type: ignore[union-attr]
    return root


def _preserves_scale(node: Node) -> bool:
    if node.op not in SCALE_PRESERVING:
        return False
    if node.op == "pad":
        return node.attrs.get("mode") != "constant" or node.attrs.get("value", 0.0) == 0.0
    if node.op == "resize":
        return node.attrs.get("mode") == "nearest"
    return True


def _int16(g: Graph, targets: dict[str, Value], names: Iterable[str]) -> set[str]:
    names = [names] if isinstance(names, str) else list(names)
    bad = [n for n in names if n not in targets]
    if bad:
        what = "is not a float value" if len(bad) == 1 else "are not float values"
        raise InputError(f"int16_values: {', '.join('%' + n for n in bad)} {what} of graph "
                         f"'{g.name}'", hint="name graph inputs or float node outputs")
    return set(names)


def _observe(g: Graph, source: CalibData, hists: dict[str, Histogram],
             progress: ProgressFn | None, buffer: list | None) -> int:
    """First pass: histograms of every target over every run; returns the sample count."""
    total = source.num_samples
    done = 0
    for run in source:
        for v in g.inputs:
            if v.name in hists:
                hists[v.name].update(run[v.name])  # finite: checked by the loader
        where = f"calibration sample {done}" + (f"..{done + source.batch - 1}"
                                                if source.batch > 1 else "")

        def hook(node: Node, results: list[np.ndarray], where: str = where) -> None:
            for v, r in zip(node.outputs, results, strict=False):
                h = hists.get(v.name)
                if h is None:
                    continue
                try:
                    h.update(r)
                except NonFiniteError:
                    raise InputError(f"{node.op} node '{node.where()}': %{v.name} is NaN or "
                                     f"Inf on {where}") from None

        interpret(g, run, observe=hook)
        if buffer is not None:
            buffer.append(run)
        done += source.batch
        if progress is not None:
            progress(done, total if total is None else max(total, done))
    if done == 0:
        raise InputError("calibration data holds no samples")
    return done


# -- auto --------------------------------------------------------------------------------------
def _auto(g: Graph, runs: Iterable[dict[str, np.ndarray]], root: dict[str, str],
          ranges: dict[str, dict[str, float]], qmax: dict[str, int],
          progress: ProgressFn | None, n: int) -> dict[str, str]:
    """Per scale group, the observer whose range gives the least consumer-output error."""
    cands: dict[str, list[tuple[str, float]]] = {}
    chosen: dict[str, str] = {}
    for name, by_method in ranges.items():
        distinct: list[tuple[str, float]] = []
        for m in OBSERVERS:
            a = by_method[m]
            if a > 0.0 and all(a != b for _, b in distinct):
                distinct.append((m, a))
        if len(distinct) > 1:
            cands[name] = distinct
        else:
            chosen[name] = distinct[0][0] if distinct else "max"
    scorer = _ConsumerError(g, root, cands, qmax)
    done = 0
    for run in runs:
        scorer.run(run)
        done += len(next(iter(run.values())))
        if progress is not None:
            progress(n + done, 2 * n)
    chosen.update(scorer.best())
    return {r: chosen[r] for r in ranges}


class _ConsumerError:
    """Squared error at the consumers' outputs of each candidate range of each scale group.

    A group's consumers are the uses of its members outside the group; a member that is a graph
    output counts its own error, and so does the root of a group without consumers.
    """

    def __init__(self, g: Graph, root: dict[str, str], cands: dict[str, list[tuple[str, float]]],
                 qmax: dict[str, int]) -> None:
        self.g, self.cands, self.qmax = g, cands, qmax
        self.root = {name: r for name, r in root.items() if r in cands}
        self.uses: dict[str, list[tuple[Node, int]]] = {}  # member -> external float uses
        for name, r in self.root.items():
            self.uses[name] = [(n, i) for n, i in g.value(name).uses if _float_outputs(n) and not (
                i == 0 and any(root.get(o.name) == r for o in n.outputs))]
        self.selfs = {v.name for v in g.outputs if v.name in self.root}
        with_uses = {self.root[name] for name, uses in self.uses.items() if uses}
        self.selfs.update(r for r in cands if r not in with_uses)
        # consumer nodes to re-evaluate, and the values they need kept alive
        self.consumers = {id(n): n for uses in self.uses.values() for n, _ in uses}
        last_use: dict[str, Node] = {}
        for node in g.nodes:
            if id(node) in self.consumers:
                for v in node.inputs:
                    if v is not None and not v.is_const:
                        last_use[v.name] = node
        self.keep = set(last_use)
        self.free: dict[int, list[str]] = {}
        for name, node in last_use.items():
            self.free.setdefault(id(node), []).append(name)
        self.num: dict[tuple[str, str, str], list[float]] = {}
        self.den: dict[tuple[str, str], list[float]] = {}

    def run(self, inputs: dict[str, np.ndarray]) -> None:
        live: dict[str, np.ndarray] = {}
        for v in self.g.inputs:
            self._produced(v.name, inputs[v.name], live)

        def hook(node: Node, results: list[np.ndarray]) -> None:
            for v, r in zip(node.outputs, results, strict=False):
                self._produced(v.name, r, live)
            if id(node) in self.consumers:
                self._consume(node, results, live)
                for name in self.free.get(id(node), ()):
                    live.pop(name, None)

        interpret(self.g, inputs, observe=hook)

    def _produced(self, name: str, array: np.ndarray, live: dict[str, np.ndarray]) -> None:
        if name in self.keep:
            live[name] = array
        if name in self.selfs:
            r = self.root[name]
            ref = array.astype(np.float64)
            self._add_den(r, name, float(np.sum(ref * ref)))
            for m, a in self.cands[r]:
                err = fake_quant(array, a, self.qmax[r]).astype(np.float64) - ref
                self._add_num(r, name, m, float(np.sum(err * err)))

    def _consume(self, node: Node, results: list[np.ndarray], live: dict) -> None:
        args = [None if v is None else (self.g.constants[v.name] if v.is_const else live[v.name])
                for v in node.inputs]
        opdef = node.opdef
        types = [None if v is None else v.type for v in node.inputs]
        refs = [r.astype(np.float64) for r, v in zip(results, node.outputs, strict=False)
                if v.dtype in FLOAT_DTYPES]
        energy = math.fsum(float(np.sum(r * r)) for r in refs)
        for slot, v in enumerate(node.inputs):
            if v is None or (node, slot) not in self.uses.get(v.name, ()):
                continue
            r, key = self.root[v.name], f"{node.name}#{slot}"
            self._add_den(r, key, energy)
            for m, a in self.cands[r]:
                trial = list(args)
                trial[slot] = fake_quant(args[slot], a, self.qmax[r])
                outs = (opdef.reference(trial, node.attrs, input_types=types)
                        if opdef.needs_input_types else opdef.reference(trial, node.attrs))
                outs = [np.asarray(o, dtype=np.float64) for o, w in
                        zip(outs, node.outputs, strict=False) if w.dtype in FLOAT_DTYPES]
                err = math.fsum(float(np.sum((o - r) ** 2)) for o, r in
                                zip(outs, refs, strict=True))
                self._add_num(r, key, m, err)

    def _add_num(self, name: str, consumer: str, method: str, err: float) -> None:
        self.num.setdefault((name, consumer, method), []).append(err)

    def _add_den(self, name: str, consumer: str, energy: float) -> None:
        self.den.setdefault((name, consumer), []).append(energy)

    def best(self) -> dict[str, str]:
        score: dict[tuple[str, str], float] = {}
        for (name, consumer, m), errs in sorted(self.num.items()):
            den = math.fsum(self.den[(name, consumer)])
            rel = math.fsum(errs) / den if den > 0.0 else math.fsum(errs)
            score[(name, m)] = score.get((name, m), 0.0) + rel
        out = {}
        for name, cands in self.cands.items():
            out[name] = min((m for m, _ in cands), key=lambda m: score.get((name, m), 0.0))
        return out


def _float_outputs(node: Node) -> bool:
    return any(v.dtype in FLOAT_DTYPES for v in node.outputs)


# -- progress bar for the CLI ------------------------------------------------------------------
@contextmanager
def calibration_progress(description: str = "calibrating", *, disable: bool = False
                         ) -> Iterator[ProgressFn]:
    """A rich progress bar on stderr (samples done / total, elapsed, remaining); yields the
    ``progress`` callback for :func:`calibrate`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("samples"), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=disable,
                  transient=False) as bar:
        task = bar.add_task(description, total=None)
        seen = {"done": 0, "total": None}

        def update(done: int, total: int | None) -> None:
            seen.update(done=done, total=total)
            bar.update(task, completed=done, total=total)

        yield update
        if seen["total"] is None:  # an unsized source: close the bar at what was done
            bar.update(task, total=seen["done"])
