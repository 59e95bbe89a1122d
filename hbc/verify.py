"""Align-bpu validation: the simulator against the integer reference, bit for bit, and the
integer model against the float model (``hbc verify``).

:func:`verify` opens a model of an ``.hbm`` with :class:`hbc.runtime.Runtime` (the numpy
kernels of the op registry) and builds the integer reference from the same program with
:func:`hbc.quant.build_int_infer` (independent torch kernels). Per sample (``data`` read by
:func:`hbc.passes.calib_data.load_calib_data`, or seeded random inputs) both run; every model
output must be equal bit for bit (with ``per_layer``, every value of the program too). The
first difference is reported with its layer, element index and both values (exit code 1).
Values computed from a CPU-fallback float op are float arithmetic that numpy and torch need
not round alike: they match within one quantization step (docs/runtime.md).

For a float REF, the integer reference is derived from REF: lowered with the scales the file
records, it must give the program in the file node for node (:mod:`hbc.verify_derive`; else
exit 1 naming the first difference), so the int_infer of the program is that of REF.

REF is a float model (anything :func:`hbc.load` reads: ``.onnx``, ``.hbir``, ``zoo:NAME``,
``module:function``, a ``(module, example)`` pair, a QAT model, or a Graph) or an integer model
(a lowered graph, or an ``IntInferModule``), which then replaces the int_infer of the program
as the integer reference. A float REF goes through the float passes ``compile`` ran (its
``opt`` level; a graph already calibrated, like a QAT model's, is taken as it is), so its
values carry the names lowering kept: outputs, and with ``per_layer`` every value of the same
name, are compared as cosine and SQNR (:class:`ErrorStats`) of the dequantized integers
against float, over all samples.

``jobs > 1`` runs samples in worker processes (forkserver, spawn where there is none), each
reopening the ``.hbm`` by path; results come back per sample and are merged in sample order,
so the report equals the one-process report exactly.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from hbc.debug_report import ErrorStats
from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.registry import get_op
from hbc.ir.types import FLOAT_DTYPES
from hbc.runtime import Runtime

from .verify_derive import check_derivation
from .verify_report import LayerCheck, OutputCheck, VerifyReport
from .verify_sample import Checker, Reference, SampleResult, Sums, tolerated

#: seeded random samples checked when no data is given
DEFAULT_SAMPLES = 8
ProgressFn = Callable[[int, "int | None"], None]


def verify(hbm: str | os.PathLike | bytes, reference: Any, *, data: Any = None,
           samples: int | None = None, input_shapes: dict[str, list[int]] | None = None,
           per_layer: bool = False, jobs: int = 1, progress: ProgressFn | None = None,
           model: str | None = None, march: str | None = None, seed: int = 0) -> VerifyReport:
    """Verify model ``model`` of ``hbm`` against ``reference`` (see the module docstring).

    ``samples`` caps the samples read from ``data`` (default all) or sets how many random
    samples are drawn (default :data:`DEFAULT_SAMPLES`, generator seeded with ``[seed, i]``
    for sample ``i``). ``progress(done, total)`` is called after each sample.
    """
    if jobs < 1:
        raise InputError(f"--jobs {jobs}: expected a positive number of processes")
    if samples is not None and samples < 1:
        raise InputError(f"--samples {samples}: expected a positive number")
    rt = Runtime(hbm, model, march=march)
    ref = _resolve(reference, rt, input_shapes)
    feeds, total, where = _samples(rt, data, samples, seed)
    if jobs == 1:
        checker = Checker(rt, ref, per_layer)
        results: Iterator[SampleResult] = (checker.check(i, f) for i, f in enumerate(feeds))
    else:
        source = hbm if isinstance(hbm, (bytes, bytearray)) else os.fspath(hbm)
        results = _in_workers((source, rt.name, _payload(ref), per_layer), feeds, jobs)
    return _Merger(rt, ref, where, per_layer).merge(results, total, progress)


# -- the reference -------------------------------------------------------------------------------
def _resolve(reference: Any, rt: Runtime, input_shapes: Any) -> Reference:
    from hbc.api import load
    from hbc.quant.int_infer import IntInferModule

    if isinstance(reference, IntInferModule):
        return Reference("integer", repr(reference), module=reference)
    text = _describe(reference)
    graph = reference.copy() if isinstance(reference, Graph) else load(reference, input_shapes)
    if any(get_op(n.op).integer is True for n in graph.nodes):
        names = [v.name for v in graph.outputs]
        if names != [d.name for d in rt.outputs]:
            raise InputError(f"integer reference {text}: outputs {names} are not those of "
                             f"model '{rt.name}' {[d.name for d in rt.outputs]}")
        return Reference("integer", text, graph=graph)
    if "calibration" not in graph.meta:  # a QAT model's graph comes optimized and calibrated
        graph = _optimize(graph, int(rt.options.get("opt", 3)), rt.march)
    want = [(d.name, list(d.shape)) for d in rt.inputs]
    got = [(v.name, list(v.shape)) for v in graph.inputs]
    if got != want:
        raise InputError(f"reference {text}: inputs {got} are not those of model "
                         f"'{rt.name}' {want}", hint="give the reference the same --input-shape "
                         "as the compile")
    missing = [d.name for d in rt.outputs if not graph.has_value(d.name)]
    if missing or [v.name for v in graph.outputs] != [d.name for d in rt.outputs]:
        raise InputError(f"reference {text}: outputs {[v.name for v in graph.outputs]} are not "
                         f"those of model '{rt.name}' {[d.name for d in rt.outputs]}")
    check_derivation(graph, rt.graph, rt.options, f"{rt.source}: model '{rt.name}'", text)
    return Reference("float", text, graph=graph)


def _describe(reference: Any) -> str:
    if isinstance(reference, Graph):
        return f"<Graph {reference.name}>"
    if isinstance(reference, (str, os.PathLike)):
        return str(reference)
    if isinstance(reference, tuple) and len(reference) == 2:
        kind = "QAT module" if getattr(reference[0], "hbc_qat", None) is not None else "module"
        return f"<{kind} {type(reference[0]).__name__}>"
    return f"<{type(reference).__name__}>"


def _optimize(graph: Graph, opt: int, march: str) -> Graph:
    """The float passes ``compile`` runs at ``opt`` (value names then match the program's)."""
    from hbc.compiler import optimization_pipeline
    from hbc.passes import run

    return run(graph, passes=optimization_pipeline(opt), march=march)


def _payload(ref: Reference) -> tuple:
    """``ref`` in a form worker processes receive (a graph as its program and constants)."""
    if ref.graph is None:
        return (ref.kind, ref.text, None, ref.module)
    from hbc.ir.program import encode_program

    return (ref.kind, ref.text, encode_program(ref.graph), None)


# -- samples -------------------------------------------------------------------------------------
def _samples(rt: Runtime, data: Any, samples: int | None, seed: int
             ) -> tuple[Iterator[dict[str, np.ndarray]], int | None, str]:
    """The float inputs of each sample, their number when known, and where they come from."""
    import itertools

    if data is not None:
        from hbc.passes.calib_data import load_calib_data

        source = load_calib_data(data, rt.graph)
        known = None if source.num_samples is None else source.num_samples // source.batch
        total = known if samples is None else samples if known is None else min(samples, known)
        where = str(data) if isinstance(data, (str, os.PathLike)) else "the given data"
        return iter(itertools.islice(source, samples)), total, where
    n = DEFAULT_SAMPLES if samples is None else samples
    for d in rt.inputs:
        if d.dtype not in FLOAT_DTYPES:
            raise InputError(f"input {d.describe()} takes integers: random samples cannot be "
                             "drawn for it", hint="give --data")
    return (_random(rt, seed, i) for i in range(n)), n, f"seeded random inputs (seed {seed})"


def _random(rt: Runtime, seed: int, i: int) -> dict[str, np.ndarray]:
    """Sample ``i``: normal inputs with a deviation of a quarter of the input's quantized range
    (the range's ends are reached now and then), deviation 1 without one."""
    rng = np.random.default_rng([seed, i])
    out = {}
    for d in rt.inputs:
        std = 1.0
        if d.quant is not None and d.quant.axis is None:
            std = 0.25 * d.quant.scale[0] * np.iinfo(np.dtype(f"int{_bits(d.quant_dtype)}")).max
        out[d.name] = (std * rng.standard_normal(d.shape)).astype(d.np_dtype)
    return out


def _bits(dtype: str | None) -> int:
    return {"i8": 8, "i16": 16, "i32": 32}.get(dtype or "", 8)


# -- workers ------------------------------------------------------------------------------------
_WORKER: dict[str, Any] = {}


def _in_workers(spec: tuple, feeds: Iterator[dict[str, np.ndarray]], jobs: int
                ) -> Iterator[SampleResult]:
    """Check the samples in ``jobs`` processes; results in sample order, at most ``2 * jobs``
    samples in flight (a large data set is never queued whole)."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(spec,)) as pool:
        pending: deque = deque()
        for i, f in enumerate(feeds):
            pending.append(pool.apply_async(_work, (i, f)))
            if len(pending) >= 2 * jobs:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _init_worker(spec: tuple) -> None:
    # only remembered here: building in the initializer would turn an error into a pool that
    # restarts workers forever; _work builds on first use and reports errors per task
    _WORKER["spec"] = spec


def _work(index: int, feeds: dict[str, np.ndarray]) -> SampleResult:
    checker = _WORKER.get("checker")
    if checker is None:
        import torch

        torch.set_num_threads(1)  # jobs processes share the cores
        source, name, (kind, text, program, module), per_layer = _WORKER["spec"]
        graph = None
        if program is not None:
            from hbc.ir.program import decode_program

            graph = decode_program(*program, where=f"reference {text}")
        checker = Checker(Runtime(source, name), Reference(kind, text, graph, module),
                           per_layer)
        _WORKER["checker"] = checker
    return checker.check(index, feeds)


# -- merging -------------------------------------------------------------------------------------
class _Merger:
    """Adds per-sample results, in sample order, into the report."""

    def __init__(self, rt: Runtime, ref: Reference, where: str, per_layer: bool) -> None:
        self.rt, self.ref, self.where, self.per_layer = rt, ref, where, per_layer

    def merge(self, results: Iterator[SampleResult], total: int | None,
              progress: ProgressFn | None) -> VerifyReport:
        rt = self.rt
        g = rt.graph
        outputs = {d.name: OutputCheck(d.name, g.value(d.name).dtype, list(d.shape))
                   for d in rt.outputs}
        layers: dict[str, LayerCheck] = {}
        if self.per_layer:
            for node in g.nodes:
                for v in node.outputs:
                    layers[v.name] = LayerCheck(v.name, node.name, node.op, v.dtype)
        out_stats = {n: ErrorStats() for n in outputs}
        layer_stats: dict[str, ErrorStats] = {}
        report = VerifyReport(
            hbm=rt.source, model=rt.name, march=rt.march, reference=self.ref.text,
            reference_kind=self.ref.kind, data=self.where, samples=0, per_layer=self.per_layer,
            outputs=list(outputs.values()), layers=list(layers.values()) if self.per_layer
            else None, tolerance_values=[v.name for v in tolerated(g)])
        for r in results:
            report.samples += 1
            if r.diffs:
                report.mismatched_samples += 1
                if report.first_mismatch is None:
                    report.first_mismatch = r.first
            for name in r.diffs:
                if name in outputs:
                    outputs[name].mismatched_samples += 1
                if name in layers:
                    layers[name].mismatched_samples += 1
            for name, sums in r.outputs.items():
                out_stats[name].merge(_stats(sums))
            for name, sums in r.layers.items():
                layer_stats.setdefault(name, ErrorStats()).merge(_stats(sums))
            if progress is not None:
                progress(report.samples, total if total is None else max(total, report.samples))
        if report.samples == 0:
            raise InputError(f"verify: no samples in {self.where}")
        if self.ref.kind == "float":
            for name, s in out_stats.items():
                outputs[name].cosine, outputs[name].sqnr = s.cosine, s.sqnr
            for name, s in layer_stats.items():
                layers[name].cosine, layers[name].sqnr = s.cosine, s.sqnr
        return report


def _stats(sums: Sums) -> ErrorStats:
    s = ErrorStats()
    s.rr, s.xx, s.rx, s.ee = sums
    return s


__all__ = ["DEFAULT_SAMPLES", "VerifyReport", "verify"]
