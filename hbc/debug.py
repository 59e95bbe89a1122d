"""Accuracy debugging: where does the integer model lose accuracy against the float model?

:func:`debug` builds the float graph (``opt=3``), calibrates it, lowers it (``lower-int``) and
measures cosine similarity and SQNR (:mod:`hbc.debug_report`) over the evaluation samples
(default: the calibration samples):

- **cumulative**: the integer graph and the float graph run side by side; every float layer
  that lowering quantized (matched by node name: lowering keeps the float node's name on its
  integer op; outputs by position) is compared at its output, its integers dequantized with
  their recorded scale. Graph inputs count as layers (op ``input``) through their ``quantize``.
  Errors accumulate along the graph, as in deployment.
- **sensitivity**: one layer at a time, simulated in float: the layer's weights and bias become
  the dequantized integers lowering made of them, its output is fake-quantized with its
  calibrated scale (round half to even, saturated to int8 or int16), all else stays float, and
  the model's outputs are compared with float (the worst output is reported). ``act_*`` repeats
  it with float weights: the part of the error that int16 activations can recover. Only layers
  with a scale of their own are listed: a scale-preserving op (reshape, max_pool, relu, ...)
  quantizes exactly as the layer feeding it. Downstream nodes re-run from the cached float
  activations: one partial forward per layer and sample.

Graphs run with the torch kernels of :mod:`hbc.quant` (fast; integer kernels agree bit for bit
with the numpy interpreter, float kernels up to float rounding). Tables are sorted worst first.

**int16.** Globs (of value or node names) make those values int16, recalibrated with int16
scales (``calibrate(int16_values=...)``). ``"auto"`` (marches with int16 activations) promotes
layers in the order of the sensitivity ranking by ``act_sqnr`` (weights stay int8, so only the
activation error matters), calibrating and lowering for real each time; the count is searched
in growing groups (1, 2, 4, ... until the worst output SQNR reaches ``target_sqnr``) then by
bisection for the smallest count that does (assuming more int16 never hurts). The report then
describes the final configuration (sensitivity: the configuration before promotion). The cost
of the choice is the static performance estimate (``backend/perf.py``, opt level 3) of the
lowered graph on the march, all int8 and as chosen, with the layers whose estimated latency
changed; each auto step records its estimate too.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from hbc.debug_report import (
    DebugReport,
    ErrorStats,
    LatencyCost,
    LayerResult,
    MixedPrecision,
    OutputResult,
    as_numpy,
    dequantize,
    estimate_latency,
    min_sqnr,
    worst_first,
)
from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.types import FLOAT_DTYPES, TensorType

MODES = ("cumulative", "sensitivity", "both")
QMAX = {"i8": 127, "i16": 32767}
ProgressFn = Callable[[int, "int | None"], None]


def debug(model: Any, calib_data: Any, *, method: str = "max", march: str = "bayes",
          mode: str = "cumulative", eval_data: Any = None,
          int16: str | Iterable[str] | None = None, target_sqnr: float = 30.0,
          progress: ProgressFn | None = None) -> DebugReport:
    """Accuracy report of ``model`` quantized for ``march`` (see the module docstring).

    ``model``: a float Graph or anything :func:`hbc.load` takes. ``calib_data``/``eval_data``:
    anything :func:`~hbc.passes.calib_data.load_calib_data` reads. ``int16``: None, ``"auto"``
    or globs. ``progress(done, total)`` counts sample runs over all phases (total None while
    unknown; it grows with each mixed-precision trial).
    """
    from hbc.backend.march import load_march
    from hbc.passes.calibrate import METHODS

    if method not in METHODS:
        raise InputError(f"unknown calibration method '{method}' (methods: {', '.join(METHODS)})")
    if mode not in MODES:
        raise InputError(f"debug mode '{mode}': expected one of {', '.join(MODES)}")
    arch = load_march(march)
    auto = int16 == "auto"
    globs = [] if int16 is None or auto else [int16] if isinstance(int16, str) else list(int16)
    if (auto or globs) and not arch.int16:
        raise InputError(f"int16 {'auto' if auto else ','.join(globs)}: march {march} has int8 "
                         "activations only", hint="drop the int16 option or target bayes")
    graph = _float_graph(model)
    calib = _reiterable(calib_data, graph)
    evals = calib if eval_data is None else _reiterable(eval_data, graph)
    n_cal, n_eval = calib.num_samples, evals.num_samples
    ev = _Evaluator(graph, calib, evals, method, march, progress, n_cal, n_eval)
    sens_runs = n_eval if mode != "cumulative" or auto else 0
    ev.grow(ev.per_build, ev.per_build if globs else 0, sens_runs, n_eval if auto else 0)
    cal, low = ev.build(_resolve_int16(graph, globs))
    sensitivity = _sensitivity(cal, low, ev) if sens_runs else None
    mixed = None
    if auto:
        mixed, cal, low = _auto_int16(ev, cal, low, sensitivity, target_sqnr)
    elif globs:
        low8 = ev.build([])[1]
        cost = LatencyCost.of(estimate_latency(low8, march), estimate_latency(low, march))
        mixed = MixedPrecision.of(cal, "globs", target_sqnr, False, ev.outputs(low8), None, [],
                                  cost)
    outputs, cumulative, n_eval = _cumulative(cal, low, ev, per_layer=mode != "sensitivity")
    if mixed is not None and mixed.mode == "globs":
        mixed.target_met = min_sqnr(outputs) >= target_sqnr
    return DebugReport(
        model=graph.name, march=march, method=method, mode=mode,
        calib_samples=int(cal.meta["calibration"]["samples"]), eval_samples=n_eval,
        outputs=outputs, cumulative=cumulative,
        sensitivity=None if mode == "cumulative" else sensitivity, int16=mixed,
        cpu_nodes=list(low.meta.get("cpu_nodes", ())))


# -- setup -------------------------------------------------------------------------------------
def _float_graph(model: Any) -> Graph:
    from hbc.api import load
    from hbc.passes import run

    return run(model if isinstance(model, Graph) else load(model), opt=3)


def _reiterable(source: Any, graph: Graph):
    """The data as a re-iterable CalibData (a one-shot iterator is buffered)."""
    from hbc.passes.calib_data import load_calib_data

    data = load_calib_data(source, graph)
    return data if data.reiterable else load_calib_data(list(data), graph)


def _resolve_int16(graph: Graph, globs: list[str]) -> list[str]:
    """Float value names matched by ``globs`` (a glob matching a node selects its outputs)."""
    named = [(v.name, [v.name]) for v in graph.inputs if v.dtype in FLOAT_DTYPES]
    for node in graph.nodes:
        outs = [v.name for v in node.outputs if v.dtype in FLOAT_DTYPES]
        named += [(node.name, outs)] + [(v, [v]) for v in outs]
    chosen: dict[str, None] = {}
    for glob in globs:
        hits = [v for name, values in named if fnmatch.fnmatchcase(name, glob) for v in values]
        if not hits:
            raise InputError(f"int16 '{glob}' matches no float value or node of graph "
                             f"'{graph.name}'", hint="use the layer names of the debug report")
        chosen.update(dict.fromkeys(hits))
    return list(chosen)


class _Evaluator:
    """Builds (calibrate + lower with given int16 values), measures model outputs (float
    references cached), and counts progress in sample runs."""

    def __init__(self, graph: Graph, calib, evals, method: str, march: str,
                 progress: ProgressFn | None, n_cal: int | None, n_eval: int | None) -> None:
        self.graph, self.calib, self.evals = graph, calib, evals
        self.method, self.march, self.progress = method, march, progress
        self.per_build = None if n_cal is None or n_eval is None else \
            n_cal * (2 if method == "auto" else 1) + n_eval  # calibration + one eval pass
        self.done, self.total = 0, 0
        self._ref: list[dict[str, np.ndarray]] | None = None

    def grow(self, *runs: int | None) -> None:
        for n in runs:
            self.total = None if n is None or self.total is None else self.total + n

    def advance(self, done: int) -> None:
        self.done = done
        if self.progress is not None:
            self.progress(done, None if self.total is None else max(self.total, done))

    def build(self, int16_values: list[str]) -> tuple[Graph, Graph]:
        from hbc.passes import run
        from hbc.passes.calibrate import calibrate

        base = self.done
        cal = calibrate(self.graph, self.calib, self.method, int16_values=int16_values,
                        progress=lambda done, _total: self.advance(base + done))
        return cal, run(cal, passes=[("lower-int", {"march": self.march})])

    def outputs(self, low: Graph) -> list[OutputResult]:
        names = [v.name for v in self.graph.outputs]
        if self._ref is None:
            frun = _Runner(self.graph)
            self._ref = [{n: as_numpy(env[n]) for n in names} for env in map(frun.run, self.evals)]
        stats = {n: ErrorStats() for n in names}
        irun = _Runner(low)
        for run, ref in zip(self.evals, self._ref, strict=True):
            got = irun.run(run)
            for n, s in stats.items():
                s.add(ref[n], dequantize(as_numpy(got[n]), low.value(n).type))
            self.advance(self.done + self.evals.batch)
        return [OutputResult(n, s.cosine, s.sqnr) for n, s in stats.items()]


# -- layers and the cumulative comparison -----------------------------------------------------
class _Layer:
    """A float layer (or graph input, ``index`` -1) the integer graph quantized: the compared
    (float value, integer value, integer type) triples, and whether it owns a scale."""

    def __init__(self, name: str, op: str, index: int, int_op: str) -> None:
        self.name, self.op, self.index, self.int_op = name, op, index, int_op
        self.pairs: list[tuple[str, str, TensorType]] = []
        self.root = False


def _layers(cal: Graph, low: Graph) -> list[_Layer]:
    """The float layers (and graph inputs) that lowering quantized, in graph order."""
    from hbc.passes.calibrate import scale_groups

    lowered = {n.name: n for n in low.nodes}
    quantizers = {n.inputs[0].name: n for n in low.nodes
                  if n.op == "quantize" and n.inputs[0] is not None and n.inputs[0].kind == "input"}
    targets = {v.name: v for v in cal.inputs if v.dtype in FLOAT_DTYPES}
    for node in cal.nodes:
        targets.update((v.name, v) for v in node.outputs if v.dtype in FLOAT_DTYPES)
    root = scale_groups(cal, targets)
    sources: list[tuple[str, str, int, Node | None, list[Value]]] = [
        (v.name, "input", -1, quantizers.get(v.name), [v]) for v in cal.inputs]
    sources += [(n.name, n.op, i, lowered.get(n.name), n.outputs) for i, n in enumerate(cal.nodes)]
    out = []
    for name, op, index, lnode, fouts in sources:
        if lnode is None or (index >= 0 and lnode.op in ("quantize", "dequantize")):
            continue
        layer = _Layer(name, op, index, lnode.op)
        for fv, iv in zip(fouts, lnode.outputs, strict=False):
            if fv.dtype in FLOAT_DTYPES and iv.dtype not in FLOAT_DTYPES and \
                    iv.type.quant is not None and iv.shape == fv.shape:
                layer.pairs.append((fv.name, iv.name, iv.type))
                layer.root |= root.get(fv.name) == fv.name
        if layer.pairs:
            out.append(layer)
    return out


def _cumulative(cal: Graph, low: Graph, ev: _Evaluator, per_layer: bool
                ) -> tuple[list[OutputResult], list[LayerResult] | None, int]:
    """Model outputs, (``per_layer``) every quantized layer of ``low`` against float, and the
    number of samples."""
    layers = _layers(cal, low) if per_layer else []
    stats = {layer.name: ErrorStats() for layer in layers}
    outs = {v.name: ErrorStats() for v in cal.outputs}
    frun, irun = _Runner(cal), _Runner(low)
    samples = 0
    for run in ev.evals:
        fenv, ienv = frun.run(run), irun.run(run)
        for layer in layers:
            for fname, iname, t in layer.pairs:
                stats[layer.name].add(as_numpy(fenv[fname]), dequantize(as_numpy(ienv[iname]), t))
        for name, s in outs.items():
            s.add(as_numpy(fenv[name]), dequantize(as_numpy(ienv[name]), low.value(name).type))
        samples += ev.evals.batch
        ev.advance(ev.done + ev.evals.batch)
    rows = [LayerResult(layer.name, layer.op, layer.pairs[0][2].dtype, stats[layer.name].cosine,
                        stats[layer.name].sqnr, int_op=layer.int_op) for layer in layers]
    return ([OutputResult(n, s.cosine, s.sqnr) for n, s in outs.items()],
            worst_first(rows) if per_layer else None, samples)


# -- running graphs ---------------------------------------------------------------------------
class _Runner:
    """Runs a graph node by node with the torch kernels of :mod:`hbc.quant` (the numpy
    reference for an op without one), keeping every value: a whole run, or a re-run of some
    nodes over changed values."""

    def __init__(self, graph: Graph) -> None:
        from hbc.quant import int_infer  # noqa: F401  (registers every torch kernel)
        from hbc.quant.torch_kernels import KERNELS, NodeCtx

        self.graph = graph
        self.consts = {v.name: _tensor(graph.constants[v.name]) for v in graph.constant_values()}
        self.kernels = [KERNELS.get(n.op) for n in graph.nodes]
        self.ctxs = [NodeCtx(op=n.op, name=n.where(), attrs=dict(n.attrs),
                             in_types=[None if v is None else v.type for v in n.inputs],
                             out_types=[v.type for v in n.outputs]) for n in graph.nodes]

    def call(self, j: int, args: list) -> list:
        if self.kernels[j] is not None:
            return self.kernels[j](self.ctxs[j], args)
        node = self.graph.nodes[j]
        arrays = [None if a is None else as_numpy(a) for a in args]
        if node.opdef.needs_input_types:
            types = [None if v is None else v.type for v in node.inputs]
            return [_tensor(r) for r in node.opdef.reference(arrays, node.attrs,
                                                             input_types=types)]
        return [_tensor(r) for r in node.opdef.reference(arrays, node.attrs)]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, Any]:
        env = dict(self.consts)
        env.update((k, _tensor(a)) for k, a in inputs.items())
        self.rerun(env, env, range(len(self.graph.nodes)))
        return env

    def rerun(self, env: dict[str, Any], over: dict[str, Any], indices: Iterable[int]) -> None:
        """Run nodes ``indices`` reading ``over`` before ``env``; results go to ``over``."""
        for j in indices:
            node = self.graph.nodes[j]
            args = [None if v is None else over.get(v.name, env.get(v.name))
                    for v in node.inputs]
            over.update(zip((v.name for v in node.outputs), self.call(j, args), strict=False))


def _tensor(a: Any):
    import torch

    arr = np.asarray(a)
    if arr.dtype in (np.uint16, np.uint32, np.uint64):
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr, copy=True, order="C"))


# -- sensitivity -------------------------------------------------------------------------------
class _Candidate:
    """One layer of the sensitivity analysis: its weights as lowering quantized them, its
    outputs' scales, and the nodes downstream of it."""

    def __init__(self, layer: _Layer, cal: Graph, low: Graph) -> None:
        self.layer = layer
        self.fq = {f: (float(t.quant.scale[0]), QMAX.get(t.dtype, 127)) for f, _, t in layer.pairs}
        self.weights: dict[int, Any] = {}
        for slot, fv in enumerate(cal.nodes[layer.index].inputs if layer.index >= 0 else ()):
            lv = low.value(fv.name) if fv is not None and low.has_value(fv.name) else None
            if fv is not None and fv.is_const and lv is not None and lv.kind == "const" and \
                    lv.dtype not in FLOAT_DTYPES and lv.type.quant is not None and \
                    lv.shape == fv.shape:
                w = dequantize(low.constants[fv.name], lv.type)
                self.weights[slot] = _tensor(w.astype(fv.type.np_dtype))
        changed, self.downstream = set(self.fq), []
        for j in range(layer.index + 1, len(cal.nodes)):
            if any(v is not None and v.name in changed for v in cal.nodes[j].inputs):
                self.downstream.append(j)
                changed.update(v.name for v in cal.nodes[j].outputs)

    def simulate(self, runner: _Runner, env: dict[str, Any], with_weights: bool
                 ) -> dict[str, Any]:
        """The values that change when only this layer is quantized (float simulation)."""
        over: dict[str, Any] = {}
        if self.layer.index < 0:
            over.update((n, _fake_quant(env[n], *sq)) for n, sq in self.fq.items())
        else:
            node = runner.graph.nodes[self.layer.index]
            args = [None if v is None else env[v.name] for v in node.inputs]
            for slot, w in self.weights.items() if with_weights else ():
                args[slot] = w
            for v, r in zip(node.outputs, runner.call(self.layer.index, args), strict=False):
                over[v.name] = _fake_quant(r, *self.fq[v.name]) if v.name in self.fq else r
        runner.rerun(env, over, self.downstream)
        return over


def _sensitivity(cal: Graph, low: Graph, ev: _Evaluator) -> list[LayerResult]:
    """One layer quantized at a time (float simulation); rows worst first."""
    cands = [_Candidate(layer, cal, low) for layer in _layers(cal, low) if layer.root]
    outs = [v.name for v in cal.outputs]
    stats = {(c.layer.name, kind): {o: ErrorStats() for o in outs}
             for c in cands for kind in ("full", "act")}
    runner = _Runner(cal)
    for run in ev.evals:
        env = runner.run(run)
        for c in cands:
            got = c.simulate(runner, env, with_weights=True)
            for kind in ("full", "act"):
                if kind == "act" and c.weights:
                    got = c.simulate(runner, env, with_weights=False)
                for o, s in stats[(c.layer.name, kind)].items():
                    s.add(as_numpy(env[o]), as_numpy(got.get(o, env[o])))
        ev.advance(ev.done + ev.evals.batch)
    rows = []
    for c in cands:
        f, a = (min(stats[(c.layer.name, kind)].values(), key=lambda s: (s.sqnr, s.cosine))
                for kind in ("full", "act"))
        rows.append(LayerResult(c.layer.name, c.layer.op, c.layer.pairs[0][2].dtype, f.cosine,
                                f.sqnr, act_cosine=a.cosine, act_sqnr=a.sqnr))
    return worst_first(rows)


def _fake_quant(x: Any, scale: float, qmax: int) -> Any:
    """The quantize rule (float32 division, round half to even, saturate), dequantized."""
    import torch

    s = torch.tensor(scale, dtype=torch.float32)
    return torch.clamp(torch.round(x.to(torch.float32) / s), -qmax - 1, qmax) * s


# -- automatic mixed precision ----------------------------------------------------------------
def _auto_int16(ev: _Evaluator, cal: Graph, low: Graph, sens: list[LayerResult],
                target: float) -> tuple[MixedPrecision, Graph, Graph]:
    """Promote layers by sensitivity until the worst output SQNR reaches ``target``."""
    order = [r.layer for r in sorted(sens, key=lambda r: (r.act_sqnr, r.sqnr, r.layer))]
    values = {layer.name: [f for f, _, _ in layer.pairs] for layer in _layers(cal, low)}
    int8 = ev.outputs(low)
    sqnr = {0: min_sqnr(int8)}
    perf = {0: estimate_latency(low, ev.march)}
    steps = [(0, sqnr[0], perf[0]["summary"]["latency_ms"])]
    kept = {0: (cal, low)}  # graphs of the counts that met the target, and of all layers

    def trial(k: int) -> bool:
        ev.grow(ev.per_build)
        kc, kl = ev.build([v for name in order[:k] for v in values[name]])
        sqnr[k] = min_sqnr(ev.outputs(kl))
        perf[k] = estimate_latency(kl, ev.march)
        steps.append((k, sqnr[k], perf[k]["summary"]["latency_ms"]))
        if sqnr[k] >= target or k == len(order):
            kept[k] = (kc, kl)
        return sqnr[k] >= target

    lo, hi = 0, None
    if sqnr[0] >= target:
        hi = 0
    elif order:
        k = 1
        while hi is None:  # growing groups: 1, 2, 4, ... layers
            if trial(k):
                hi = k
            elif k == len(order):
                break
            else:
                lo, k = k, min(2 * k, len(order))
        while hi is not None and hi - lo > 1:  # the smallest count that meets the target
            mid = (lo + hi) // 2
            if trial(mid):
                hi = mid
            else:
                lo = mid
    k = len(order) if hi is None else hi  # unreachable: everything int16
    kc, kl = kept[k]
    mixed = MixedPrecision.of(kc, "auto", target, sqnr[k] >= target, int8, order[:k], steps,
                              LatencyCost.of(perf[0], perf[k]))
    return mixed, kc, kl
