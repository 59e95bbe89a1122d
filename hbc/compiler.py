"""``hbc compile``: models in, one ``.hbm`` plus performance reports out.

Per model: load -> the passes of the opt level (``absorb-qdq`` and ``fold-bn`` always: integer
lowering needs BN inside its conv) -> input types checked (``check-layout``) -> the march check
places every node (``hbc.backend.legality``; an unsupported node stops the compile with every
reason) -> scales: calibration on ``calib_data``, else the model's own (QAT / QDQ), else seeded
random samples with a warning -> ``lower-int`` for the march, with the nodes the check put on
the CPU as float fallbacks -> the static performance estimate. Then the ``.hbm`` (all models),
and per model ``.perf.json`` and ``.perf.html``, each written atomically.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import CheckFailed, HbcError, InputError

log = logging.getLogger(__name__)

#: calibration samples drawn when a model has neither data nor scales of its own
RANDOM_SAMPLES = 4
#: the stages reported to ``progress``
STAGES = ("load", "optimize", "check", "calibrate", "lower", "estimate", "write")

ProgressFn = Callable[[str, str], None]


@dataclass
class CompiledModel:
    """One compiled model: its lowered program, placement and performance estimate."""

    name: str
    source: str
    graph: Any  # the lowered hbc.ir.graph.Graph
    perf: dict
    options: dict
    warnings: list[str] = field(default_factory=list)
    perf_json: Path | None = None
    perf_html: Path | None = None


@dataclass
class CompileResult:
    """What ``compile`` wrote and measured."""

    output: Path
    march: str
    opt: int
    models: list[CompiledModel]

    def to_json(self) -> dict:
        """Machine-readable result (``hbc compile --json``)."""
        return {
            "output": str(self.output), "march": self.march, "opt": self.opt,
            "models": [{"name": m.name, "source": m.source, "summary": m.perf["summary"],
                        "options": m.options, "warnings": m.warnings,
                        "perf_json": str(m.perf_json) if m.perf_json else None,
                        "perf_html": str(m.perf_html) if m.perf_html else None}
                       for m in self.models],
        }

    def to_text(self) -> str:
        """The summary ``hbc compile`` prints."""
        lines = [f"wrote {self.output} ({self.output.stat().st_size:,} bytes, march "
                 f"{self.march}, -O{self.opt})"]
        for m in self.models:
            s = m.perf["summary"]
            lines += [
                f"model '{m.name}' ({m.source}):",
                f"  ops: {s['bpu_ops']} on the BPU, {s['cpu_ops']} on the CPU",
                f"  MACs: {s['macs']:,} ({s['macs'] / 1e9:.3f} G)",
                f"  estimated latency {s['latency_ms']:.3f} ms (one frame, one core), "
                f"{s['fps']:.1f} FPS (all cores)",
                f"  DDR traffic per frame: {s['ddr_bytes_per_frame'] / 2**20:.2f} MiB",
            ]
            lines += [f"  report: {p}" for p in (m.perf_json, m.perf_html) if p]
            lines += [f"  warning: {w}" for w in m.warnings]
        return "\n".join(lines)


def compile(  # noqa: A001 - the public name users expect: hbc.compile
    models: Any | Sequence[Any],
    march: str = "bayes",
    opt: int = 3,
    *,
    output: str | os.PathLike | None = None,
    calib_data: Any = None,
    calib_method: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    input_type: str | None = None,
    report_dir: str | os.PathLike | None = None,
    names: Sequence[str] | None = None,
    high_precision_output: bool = False,
    progress: ProgressFn | None = None,
    calib_progress: Callable[[int, int | None], None] | None = None,
) -> CompileResult:
    """Compile one or several models into one ``.hbm`` with a performance report each.

    ``models``: what :func:`hbc.load` takes (path, ``zoo:NAME``, ``module:function``, a
    ``(module, example_inputs)`` pair, a QAT module pair) or a Graph, or a list of those.
    ``calib_data``: what :func:`hbc.passes.calibrate.calibrate` reads (one source for every
    model). ``output`` defaults to ``<first model name>.hbm`` in the current folder; reports
    go next to it, or into ``report_dir`` together with each lowered program as ``.hbir``.
    """
    from hbc.backend.hbm_writer import HbmModelSpec, write_hbm
    from hbc.backend.march import load_march

    sources = list(models) if isinstance(models, (list, tuple)) and not _is_pair(models) \
        else [models]
    if not sources:
        raise InputError("compile: no model given")
    if names is not None and len(names) != len(sources):
        raise InputError(f"--names gives {len(names)} name(s) for {len(sources)} model(s)")
    if opt not in (0, 1, 2, 3):
        raise InputError(f"--opt {opt}: expected 0, 1, 2 or 3")
    arch = load_march(march)
    say = progress or (lambda stage, what: None)
    model_names = list(names) if names else _default_names(sources)
    if len(set(model_names)) != len(model_names):
        raise InputError(f"model names {', '.join(model_names)} are not unique",
                         hint="give --names a,b,...")
    compiled = []
    for src, name in zip(sources, model_names, strict=True):
        with _naming(_describe(src)):
            compiled.append(_compile_one(
                src, name, arch, opt, calib_data=calib_data, calib_method=calib_method,
                input_shapes=input_shapes, input_type=input_type,
                high_precision_output=high_precision_output, say=say,
                calib_progress=calib_progress))
    out = Path(output) if output else Path(f"{model_names[0]}.hbm")
    say("write", str(out))
    write_hbm(out, [HbmModelSpec(m.name, m.graph, m.options, m.perf["summary"])
                    for m in compiled], arch.name)
    _write_reports(compiled, out, Path(report_dir) if report_dir else None)
    return CompileResult(out, arch.name, opt, compiled)


def _compile_one(src: Any, name: str, arch: Any, opt: int, *, calib_data: Any,
                 calib_method: str | None, input_shapes: Any, input_type: str | None,
                 high_precision_output: bool, say: ProgressFn,
                 calib_progress: Callable | None) -> CompiledModel:
    from hbc.api import load
    from hbc.backend.legality import check_graph, check_inputs
    from hbc.backend.perf import estimate
    from hbc.ir.graph import Graph
    from hbc.passes import run

    label = _describe(src)
    say("load", label)
    graph = src.copy() if isinstance(src, Graph) else load(src, input_shapes)
    if input_type:
        graph.meta["input_types"] = {v.name: input_type for v in graph.inputs}
    say("optimize", f"{label} -O{opt}")
    graph = run(graph, passes=optimization_pipeline(opt), march=arch.name)
    run(graph, passes=[("check-layout", {"layout": "NCHW"})], copy=False)
    say("check", f"{label} on {arch.name}")
    verdicts = check_graph(graph, arch)
    unsupported = [v for v in [*check_inputs(graph, arch, verdicts), *verdicts]
                   if v.unit == "unsupported"]
    if unsupported:
        raise CheckFailed(f"{label}: {len(unsupported)} node(s) cannot run on {arch.name}:\n  "
                          + "\n  ".join(_verdict_line(v) for v in unsupported),
                          hint=f"run 'hbc check {label} --march {arch.name}' for the full report")
    on_cpu = [v.node for v in verdicts if v.unit == "cpu"]
    cpu = [n for n in on_cpu if graph.node(n).opdef.integer != "native"]
    warnings: list[str] = []
    graph, calib = _scales(graph, calib_data, calib_method, say, label, warnings,
                           calib_progress)
    say("lower", f"{label} to integers")
    lowered = run(graph, passes=[("lower-int", {
        "march": arch.name, "high_precision_output": high_precision_output,
        "cpu_nodes": cpu})], march=arch.name)
    # the estimate reads the placement from the program, so `hbc perf` re-derives it exactly
    lowered.meta["cpu_placed"] = sorted({*on_cpu, *lowered.meta.get("cpu_nodes", [])})
    say("estimate", label)
    options = {"march": arch.name, "opt": opt, "calib_method": calib["method"],
               "calib_samples": calib["samples"], "input_type": input_type or "featuremap",
               "high_precision_output": high_precision_output}
    perf = estimate(lowered, arch, opt, placement=placement_of(lowered), name=name)
    return CompiledModel(name, label, lowered, perf, options, warnings)


def placement_of(lowered: Any) -> dict[str, str]:
    """Where the nodes of a compiled program run: those the march check or the lowering put
    on the CPU (recorded in the program), the rest as the estimator decides."""
    return {n: "cpu" for n in lowered.meta.get("cpu_placed", [])}


def perf_reports(hbm: str | os.PathLike, model: str | None = None) -> list[dict]:
    """The performance reports of the models in an .hbm, re-estimated from their programs
    (the same numbers ``compile`` wrote: the estimate is deterministic)."""
    from hbc.backend.march import load_march
    from hbc.backend.perf import estimate
    from hbc.runtime.hbm import read_hbm

    f = read_hbm(hbm)
    arch = load_march(f.march)
    chosen = [f.model(model)] if model else f.models
    reports = []
    for m in chosen:
        g = m.graph()
        opt = m.options.get("opt", 3)
        if opt not in (0, 1, 2, 3) or isinstance(opt, bool):
            raise InputError(f"{f.source}: model '{m.name}' options.opt: expected 0, 1, 2 or 3, "
                             f"got {opt!r}")
        try:
            reports.append(estimate(g, arch, int(opt), placement=placement_of(g), name=m.name))
        except InputError as e:  # the program is valid IR but not one compile produced
            raise InputError(f"{f.source}: model '{m.name}': {e}") from None
    return reports


def optimization_pipeline(opt: int) -> list[str]:
    """The passes ``compile`` runs at ``opt``: the level's pipeline, plus absorb-qdq and
    fold-bn at every level (integer lowering needs scales and BN inside its conv)."""
    from hbc.passes.manager import pipeline_for

    specs = pipeline_for(opt)
    if "absorb-qdq" not in specs:
        specs.insert(0, "absorb-qdq")
    if "fold-bn" not in specs:
        specs.append("fold-bn")
    return specs


def _scales(graph: Any, calib_data: Any, method: str | None, say: ProgressFn, label: str,
            warnings: list[str], calib_progress: Callable | None) -> tuple[Any, dict]:
    """Calibrate (data given), keep the model's own scales (QAT/QDQ), or calibrate on seeded
    random samples with a warning. Returns the graph and what was done."""
    from hbc.passes.calibrate import calibrate

    own = any(v.type.quant is not None for v in graph.values() if v.kind != "const")
    if calib_data is None and own and method is None:
        return graph, {"method": "model", "samples": 0}
    if calib_data is None:
        rng = np.random.default_rng(0)
        calib_data = [{v.name: rng.standard_normal(v.type.shape).astype(v.type.np_dtype)
                       for v in graph.inputs} for _ in range(RANDOM_SAMPLES)]
        warnings.append(f"no calibration data: scales from {RANDOM_SAMPLES} seeded random "
                        "samples (fine for the performance estimate, not for accuracy; give "
                        "--calib-data)")
    method = method or "max"
    say("calibrate", f"{label} ({method})")
    g = calibrate(graph, calib_data, method=method, progress=calib_progress)
    return g, {"method": method, "samples": int(g.meta["calibration"]["samples"])}


def _write_reports(models: list[CompiledModel], out: Path, report_dir: Path | None) -> None:
    from hbc.backend.report import perf_html, perf_json
    from hbc.ir.io import save, write_atomic

    folder = report_dir or out.parent
    folder.mkdir(parents=True, exist_ok=True)
    for m in models:
        stem = out.stem if len(models) == 1 else f"{out.stem}.{m.name}"
        m.perf_json = folder / f"{stem}.perf.json"
        m.perf_html = folder / f"{stem}.perf.html"
        text, page = perf_json(m.perf), perf_html(m.perf)
        write_atomic(m.perf_json, lambda f, t=text: f.write(t.encode("utf-8")))
        write_atomic(m.perf_html, lambda f, p=page: f.write(p.encode("utf-8")))
        if report_dir is not None:
            save(m.graph, folder / f"{stem}.hbir")


@contextmanager
def _naming(label: str) -> Iterator[None]:
    """Errors of one model's compile (a pass failing at a node, bad weights) start with the
    model they concern, unless they name it already."""
    try:
        yield
    except HbcError as e:
        if e.args and isinstance(e.args[0], str) and label not in e.args[0]:
            e.args = (f"{label}: {e.args[0]}", *e.args[1:])
        raise


def _verdict_line(v: Any) -> str:
    why = "; ".join(f"{p.constraint}: {p.actual} (allowed {p.allowed})  hint: {p.hint}"
                    for p in v.problems) or "no BPU or CPU implementation"
    return f"{v.op} node '{v.node}'{f' ({v.loc})' if v.loc else ''}: {why}"


def _is_pair(x: Any) -> bool:
    return isinstance(x, tuple) and len(x) == 2 and hasattr(x[0], "forward")


def _describe(src: Any) -> str:
    if isinstance(src, (str, os.PathLike)):
        return str(src)
    if _is_pair(src):
        return type(src[0]).__name__
    return getattr(src, "name", type(src).__name__)


def _default_names(sources: list[Any]) -> list[str]:
    """Model names: file stems, zoo names, function names, graph names."""
    out = []
    for src in sources:
        if isinstance(src, (str, os.PathLike)):
            text = str(src)
            if text.startswith("zoo:"):
                out.append(text[4:])
            elif Path(text).suffix:
                out.append(Path(text).stem)
            else:
                out.append(text.rpartition(":")[2] or text)
        else:
            out.append(_describe(src))
    return out
