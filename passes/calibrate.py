"""Post-training calibration: activation scales of a float graph from sample data.

:func:`calibrate` runs the float graph over every calibration sample
(:mod:`~hbc.passes.calib_forward`: in onnxruntime when the graph exports, else in hbc's
interpreter) and feeds observed tensors into a streaming statistic: a
:class:`~hbc.passes.observers.Histogram`, or for ``max`` only the running largest ``|x|``
(:class:`~hbc.passes.observers.RunningMax`, the histogram's max without the histogram); no
activation outlives its run. An observer then turns each statistic into a clipping range ``a``
and the value gets ``QuantParams((float32(a / qmax),))`` (``qmax`` 127, or 32767 for the
``int16_values``). Weights are not calibrated: lowering takes their per-channel max from the
constants.

Ops that move or select integers with the scale unchanged (docs/quantization.md: reshape,
transpose, slice, max_pool, relu, clip, nearest resize, ...) give their outputs the scale of
their data input: such a chain is one *scale group* (its first value is the *root*), given one
scale, so no requantize is needed between them. ``int16_values`` likewise applies to a whole
group. A group is observed at its *exits* (:func:`group_exits`): the members that a node
outside the group reads, and graph outputs. Only their values reach the rest of the model: a
max_pool's output is the distribution its consumers see (larger values than the pooled input),
and a relu's negative inputs never leave it, so a range fitted to the exits spends no levels on
values the group drops.

``auto`` (:mod:`~hbc.passes.calib_auto`) picks, per group, the candidate range (max,
percentile, kl, mse) with the least expected error at the outputs of the group's consumers,
each element's squared quantization error weighted by how strongly its consumers pass it on
(the squared weights of the convolutions reading its channel). The weighted histogram
accumulates in the same single pass as the others.

Calibration needs data, so it is an API, not a pipeline pass. The library never prints;
:func:`calibration_progress` gives the CLI a rich progress bar to pass as ``progress``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.types import FLOAT_DTYPES, QuantParams

from .calib_auto import Gain, choose, exit_gains
from .calib_data import CalibData, load_calib_data
from .calib_forward import InterpreterForward, OrtForward, open_forward
from .observers import (
    OBSERVERS,
    PERCENTILE,
    QMAX,
    Histogram,
    NonFiniteError,
    RunningMax,
    Workspace,
    compute_range,
)

log = logging.getLogger(__name__)

METHODS = (*OBSERVERS, "auto")
#: ops whose float outputs share the scale of input 0 (integers moved or selected unchanged).
SCALE_PRESERVING = frozenset({
    "reshape", "transpose", "slice", "split", "pad", "depth_to_space", "space_to_depth",
    "gather", "max_pool", "global_max_pool", "identity", "relu", "clip", "resize"})
ProgressFn = Callable[[int, "int | None"], None]


def calibrate(graph: Graph, data: Any, method: str = "max", *, percentile: float = PERCENTILE,
              progress: ProgressFn | None = None, int16_values: Iterable[str] = (),
              engine: str = "auto", threads: int | None = None) -> Graph:
    """A calibrated copy of ``graph`` (float, after fold-bn and fuse).

    ``data``: anything :func:`~hbc.passes.calib_data.load_calib_data` reads (``.npz``, folder,
    mapping, iterable of dicts, DataLoader). ``method``: one of METHODS. ``progress(done,
    total)`` is called after each run with samples done and the total (None when unknown).
    ``percentile``: the level of the percentile observer (also a candidate of ``auto``).
    ``int16_values`` names values quantized to int16 (bayes).
    ``engine`` runs the float forward pass (:mod:`~hbc.passes.calib_forward`: ``"auto"``,
    ``"onnxruntime"`` or ``"interpreter"``) with ``threads`` intra-op threads (onnxruntime).
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
    roots = list(dict.fromkeys(root.values()))
    # max needs the largest |x| only; every other method reads a histogram, auto a weighted one
    observers = {r: RunningMax() if method == "max" else Histogram(weighted=method == "auto")
                 for r in roots}
    exits = group_exits(g, root)
    gains = exit_gains(g, root, exits) if method == "auto" else {}
    watch = {name: (observers[r], gains.get(name, 1.0)) for name, r in exits.items()}
    for r in roots:  # a root its group reads only inside is still checked for NaN and Inf,
        watch.setdefault(r, (RunningMax(), 1.0))  # so the error names the node that made them
    forward = open_forward(g, [name for name in targets if name in watch], engine, threads)
    n = _observe(forward, source, watch, progress)
    qmax = {r: QMAX["i16" if r in int16 else "i8"] for r in observers}
    ranges = {r: {m: compute_range(h, m, percentile=percentile, qmax=qmax[r])
                  for m in (OBSERVERS if method == "auto" else (method,))}
              for r, h in observers.items()}
    chosen = {r: method for r in observers}
    if method == "auto":
        chosen = choose({r: h for r, h in observers.items() if isinstance(h, Histogram)},
                        ranges, qmax)
    for name, value in targets.items():
        r = root[name]
        a = ranges[r][chosen[r]]
        if not np.float32(a / qmax[r]) > 0.0:  # all zeros, or so tiny the scale underflows
            log.warning("calibration: %%%s is zero (or below float32 range) on every sample; "
                        "scale 1/%d", name, qmax[r])
            a = 1.0
        g.set_quant(value, QuantParams((float(np.float32(a / qmax[r])),)))
    meta: dict[str, Any] = {"method": method, "samples": n, "engine": forward.engine}
    if method in ("percentile", "auto"):
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


def group_exits(g: Graph, root: dict[str, str]) -> dict[str, str]:
    """The values each scale group is observed at, in graph order (value name -> its root):
    the members read by a node outside the group (or by a member at another slot than its data
    input) and the graph outputs; the root itself for a group with neither."""
    outputs = {v.name for v in g.outputs}
    exits: dict[str, str] = {}
    for name, r in root.items():
        inside = all(slot == 0 and any(root.get(o.name) == r for o in node.outputs)
                     for node, slot in g.value(name).uses)
        if name in outputs or not inside:
            exits[name] = r
    observed = set(exits.values())
    unused = {r: r for r in dict.fromkeys(root.values()) if r not in observed}
    return {name: root[name] for name in root if name in exits or name in unused}


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


def _observe(forward: InterpreterForward | OrtForward, source: CalibData,
             watch: dict[str, tuple[Histogram | RunningMax, Gain]],
             progress: ProgressFn | None) -> int:
    """The calibration pass: every watched value of every run into its group's statistic
    (``watch``: value name -> (statistic, gain of its elements)); returns the sample count."""
    total = source.num_samples
    done = 0
    workspace = Workspace()
    for run in source:
        where = f"calibration sample {done}" + (f"..{done + source.batch - 1}"
                                                if source.batch > 1 else "")

        def sink(node: Node | None, v: Value, array: np.ndarray, owned: bool,
                 where: str = where) -> None:
            observer, gain = watch[v.name]
            try:
                observer.update(array, gain=gain, workspace=workspace, overwrite=owned)
            except NonFiniteError:
                what = f"input '{v.name}'" if node is None else f"{node.op} node '{node.where()}'"
                raise InputError(f"{what}: %{v.name} is NaN or Inf on {where}") from None

        forward.run(run, sink)
        done += source.batch
        if progress is not None:
            progress(done, total if total is None else max(total, done))
    if done == 0:
        raise InputError("calibration data holds no samples")
    return done


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
