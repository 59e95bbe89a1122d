"""Shared-parameter merging of multi-task graphs.

Several single-task graphs (detection and segmentation heads on one backbone, each exported on
its own) become one graph whose shared computation runs once:

1. Inputs are matched by name: an input that several tasks take is one input of the merged
   graph, and must have the same type in each (else an error naming the input and both tasks).
2. Constants are matched by name: a name with the same value (type, shape and bytes) in every
   task that uses it is one shared constant. A *parameter* name with different values is an
   error naming the parameter and both tasks, unless ``on_conflict="keep"``: then each distinct
   value stays separate, named ``<task>/<name>`` after the first task that uses it. Constants
   with identical content under different names are shared only with ``share_identical=True``.
3. Each task's nodes are copied in; node and value names keep their original spelling where it
   is free and take the task prefix (``det_rear/backbone/conv1/Conv``) where it collides, so the
   first task's names survive for shared computation. Outputs are named ``<task>/<output>``.
4. The ``cse`` pass then computes identical computations (same op, same input values, equal
   attributes) once, which makes the backbone run once, and ``dce`` drops what is left over.

Anonymous constants that exporters synthesize (ONNX ``Constant`` outputs such as
``/head/Constant_output_0``, ``onnx::...`` names, the torch importer's ``<node>/scalar``) are not
parameters: they are shared when equal and kept apart when not, without an error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph, Value, legal_name
from hbc.ir.types import TensorType

from .merge_report import GraphFigures, MergeReport

log = logging.getLogger(__name__)

#: names exporters give to constants that are not model parameters
_ANONYMOUS = re.compile(r"^(/|onnx::)|(^|/)(scalar|const|index)(_\d+)?$")
_TASK_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")
_CONFLICT_MODES = ("error", "keep")


def is_parameter_name(name: str) -> bool:
    """Does constant ``name`` look like a model parameter (``backbone.conv1.weight``) rather
    than a constant an exporter synthesized (``/Constant_output_0``, ``onnx::Cast_13``)?"""
    return _ANONYMOUS.search(name) is None


@dataclass
class MergeResult:
    """The merged graph and the report of what merging saved."""

    graph: Graph
    report: MergeReport


def merge_tasks(graphs: Sequence[Graph], names: Sequence[str] | None = None, *,
                on_conflict: str = "error", share_identical: bool = False) -> MergeResult:
    """Merge single-task graphs into one graph that computes their shared part once.

    ``names`` are the task names (default: the source file stems, else the graph names, else
    ``task0``...), used as output prefix ``<task>/<output>``. The input graphs are not changed.
    """
    if not graphs:
        raise InputError("merge needs at least one task graph")
    if on_conflict not in _CONFLICT_MODES:
        raise InputError(f"on_conflict={on_conflict!r}: expected one of "
                         f"{', '.join(_CONFLICT_MODES)}")
    tasks = _task_names(graphs, names)
    merged = Graph("multitask")
    merged.meta.update(tasks=list(tasks),
                       sources=[g.meta.get("source", g.name) for g in graphs])
    vmaps: list[dict[int, Value]] = [{} for _ in graphs]
    _merge_inputs(merged, graphs, tasks, vmaps)
    plan = _ConstantPlan(graphs, tasks, on_conflict, share_identical)
    plan.build(merged, vmaps)
    reserved = {legal_name(f"{t}/{v.name}") for t, g in zip(tasks, graphs, strict=True)
                for v in g.outputs}
    for task, g, vmap in zip(tasks, graphs, vmaps, strict=True):
        _copy_nodes(merged, task, g, vmap, reserved)
    expected: list[str] = []
    outputs: list[Value] = []
    for task, g, vmap in zip(tasks, graphs, vmaps, strict=True):
        for v in g.outputs:
            expected.append(legal_name(f"{task}/{v.name}"))
            outputs.append(merged.named_output(vmap[id(v)], expected[-1], taken=outputs))
    merged.set_outputs(outputs)
    ran = _share_computation(merged)
    _restore_output_names(merged, expected)
    report = MergeReport(list(tasks), [GraphFigures.of(g) for g in graphs],
                         GraphFigures.of(merged), plan.shared_parameters, plan.kept_separate,
                         plan.shared_identical, ran)
    return MergeResult(merged, report)


def merge_files(paths: Sequence[str | os.PathLike], names: Sequence[str] | None,
                output: str | os.PathLike, on_conflict: str = "error",
                share_identical: bool = False) -> MergeReport:
    """``hbc merge``: load each model, merge them, write ``output`` (.hbir, or .onnx through
    the ONNX exporter), return the report. Task names default to the file stems.
    """
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in (".hbir", ".onnx"):
        raise InputError(f"{out}: unknown output format '{out.suffix}'; write .hbir or .onnx")
    from hbc.api import load

    graphs = [load(p) for p in paths]
    if names is None:
        names = [legal_name(Path(p).stem) for p in paths]
        if len(set(names)) != len(names):
            raise InputError("task names from the file names are not unique ("
                             + ", ".join(names) + ")", hint="give them with --names a,b,...")
    result = merge_tasks(graphs, names, on_conflict=on_conflict,
                         share_identical=share_identical)
    if suffix == ".onnx":
        from hbc.frontend.onnx_export import export_onnx

        export_onnx(result.graph, out)  # written atomically (temp file + os.replace)
    else:
        from hbc.ir.io import save

        save(result.graph, out)
    return result.report


# -- steps ----------------------------------------------------------------------------------

def _task_names(graphs: Sequence[Graph], names: Sequence[str] | None) -> list[str]:
    if names is None:
        for candidate in (
            [legal_name(Path(str(g.meta.get("source", ""))).stem) for g in graphs],
            [g.name for g in graphs],
        ):
            if all(_TASK_NAME.match(c) for c in candidate) and len(set(candidate)) == len(
                    candidate):
                return candidate
        return [f"task{i}" for i in range(len(graphs))]
    names = [str(n) for n in names]
    if len(names) != len(graphs):
        raise InputError(f"{len(names)} task names for {len(graphs)} graphs")
    for n in names:
        if not _TASK_NAME.match(n):
            raise InputError(f"task name '{n}': use letters, digits, '_', '.' and '-' only")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"task name(s) {', '.join(dup)} given twice: task names must be unique")
    return names


def _merge_inputs(merged: Graph, graphs: Sequence[Graph], tasks: Sequence[str],
                  vmaps: list[dict[int, Value]]) -> None:
    """One merged input per input name (union, in order of first appearance)."""
    from hbc.ir.text import format_type

    first: dict[str, tuple[str, TensorType]] = {}
    for task, g, vmap in zip(tasks, graphs, vmaps, strict=True):
        for v in g.inputs:
            if v.name in first:
                other, t = first[v.name]
                if t != v.type:
                    raise InputError(
                        f"input '{v.name}' differs between tasks '{other}' ({format_type(t)}) "
                        f"and '{task}' ({format_type(v.type)}): merged tasks must take the "
                        "same inputs", hint="export the tasks with the same input shapes")
            else:
                first[v.name] = (task, v.type)
                merged.add_input(v.name, v.type)
            vmap[id(v)] = merged.value(v.name)


def _content_key(type_: TensorType, array: np.ndarray) -> tuple:
    """A dict key for content lookups; equality is then confirmed with :func:`_same_bytes`."""
    digest = hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).digest()
    return (type_, digest)


def _same_bytes(a: np.ndarray, b: np.ndarray) -> bool:
    if a is b:
        return True
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(np.ascontiguousarray(a).reshape(-1).view(np.uint8),
                               np.ascontiguousarray(b).reshape(-1).view(np.uint8)))


@dataclass
class _Variant:
    """One distinct value a constant name has across the tasks."""

    array: np.ndarray
    type: TensorType
    tasks: list[str]
    merged: Value | None = None


class _ConstantPlan:
    """Decides which constants are shared: by name (checking values) and, opt-in, by content."""

    def __init__(self, graphs: Sequence[Graph], tasks: Sequence[str], on_conflict: str,
                 share_identical: bool) -> None:
        self.graphs, self.tasks = graphs, tasks
        self.share_identical = share_identical
        self.variants: dict[str, list[_Variant]] = {}
        for task, g in zip(tasks, graphs, strict=True):
            for v in _used_constants(g):
                self._add(task, v, g.constants[v.name])
        conflicts = {n: vs for n, vs in self.variants.items()
                     if len(vs) > 1 and is_parameter_name(n)}
        if conflicts and on_conflict == "error":
            raise InputError(_conflict_message(conflicts), hint=(
                "pass on_conflict='keep' (hbc merge --on-conflict keep) to keep them separate, "
                "named with the task prefix"))
        self.kept_separate = sorted(conflicts)
        self.shared_parameters = [n for n, vs in self.variants.items()
                                  if len(vs) == 1 and len(vs[0].tasks) > 1
                                  and is_parameter_name(n)]
        self.shared_identical: list[tuple[str, str]] = []

    def _add(self, task: str, v: Value, array: np.ndarray) -> None:
        variants = self.variants.setdefault(v.name, [])
        for var in variants:
            if var.type == v.type and _same_bytes(var.array, array):
                var.tasks.append(task)
                return
        variants.append(_Variant(array, v.type, [task]))

    def build(self, merged: Graph, vmaps: list[dict[int, Value]]) -> None:
        """Add the merged constants and map each task's constants to them."""
        by_content: dict[tuple, list[_Variant]] = {}
        for task, g, vmap in zip(self.tasks, self.graphs, vmaps, strict=True):
            for v in _used_constants(g):
                variants = self.variants[v.name]
                var = next(x for x in variants if task in x.tasks)
                if var.merged is None:
                    twin = self._twin(by_content, var)
                    if twin is not None:
                        var.merged = twin.merged
                        self.shared_identical.append((v.name, twin.merged.name))
                    else:
                        var.merged = _create(merged, v.name, var, split=len(variants) > 1)
                vmap[id(v)] = var.merged

    def _twin(self, by_content: dict[tuple, list[_Variant]], var: _Variant) -> _Variant | None:
        """An already merged constant with the same content (only with share_identical);
        ``var`` is recorded in ``by_content`` for later lookups when it has no twin."""
        if not self.share_identical:
            return None
        candidates = by_content.setdefault(_content_key(var.type, var.array), [])
        for cand in candidates:
            if _same_bytes(cand.array, var.array):
                return cand
        candidates.append(var)
        return None


def _create(merged: Graph, name: str, var: _Variant, split: bool) -> Value:
    """The merged constant of one variant: the original name, or ``<first task>/<name>`` when
    the name has several values (or is taken by an input)."""
    prefixed = legal_name(f"{var.tasks[0]}/{name.lstrip('/')}")
    base = prefixed if split else name
    if merged.has_value(base):
        base = merged.unique_name(prefixed)
    return merged.add_constant(base, var.array, exact=True, type_=var.type)


def _used_constants(graph: Graph) -> list[Value]:
    """Constants a node reads or the graph returns, in graph order (dead ones are dropped)."""
    used: dict[str, Value] = {}
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None and v.is_const:
                used.setdefault(v.name, v)
    for v in graph.outputs:
        if v.is_const:
            used.setdefault(v.name, v)
    return [v for v in graph.constant_values() if v.name in used]


def _conflict_message(conflicts: dict[str, list[_Variant]]) -> str:
    parts = []
    for name, (a, b, *_) in conflicts.items():
        if a.type != b.type:
            from hbc.ir.text import format_type

            why = f"{format_type(a.type)} vs {format_type(b.type)}"
        else:
            differ = int(np.count_nonzero(a.array.reshape(-1).view(np.uint8)
                                          != b.array.reshape(-1).view(np.uint8)))
            why = f"same type, {differ} of {a.array.nbytes} bytes differ"
        parts.append(f"parameter '{name}' has different values in tasks '{a.tasks[0]}' and "
                     f"'{b.tasks[0]}' ({why})")
    more = f" (and {len(parts) - 3} more)" if len(parts) > 3 else ""
    return "; ".join(parts[:3]) + more


def _copy_nodes(merged: Graph, task: str, graph: Graph, vmap: dict[int, Value],
                reserved: set[str]) -> None:
    """Copy ``graph``'s nodes into ``merged``, prefixing names that collide with ``task/``."""
    node_names = {n.name for n in merged.nodes}

    def claim(name: str, taken) -> str:
        prefixed = legal_name(f"{task}/{name.lstrip('/')}")
        for cand in (name, prefixed):
            if not taken(cand) and cand not in reserved:
                return cand
        i = 1
        while taken(f"{prefixed}_{i}") or f"{prefixed}_{i}" in reserved:
            i += 1
        return f"{prefixed}_{i}"

    for node in graph.nodes:
        name = claim(node.name, node_names.__contains__)
        out_names: list[str] = []
        for v in node.outputs:
            out_names.append(claim(v.name, lambda n, seen=out_names: merged.has_value(n)
                                   or n in seen))
        new = merged.add_node(node.op, [None if v is None else vmap[id(v)] for v in node.inputs],
                              dict(node.attrs), name=name, loc=node.loc, output_names=out_names,
                              output_types=[v.type for v in node.outputs], exact_names=True)
        node_names.add(name)
        for old, nv in zip(node.outputs, new.outputs, strict=True):
            vmap[id(old)] = nv


def _share_computation(merged: Graph) -> list[str]:
    """Run ``cse`` and ``dce`` on the merged graph (those that are registered)."""
    from . import registry  # noqa: F401  (registers every pass)
    from .base import PASSES
    from .manager import run

    names = [p for p in ("cse", "dce") if p in PASSES]
    if "cse" not in names:
        log.warning("merge: the 'cse' pass is not available; shared computation is not "
                    "deduplicated")
    if names:
        run(merged, passes=names, copy=False)
    return names


def _restore_output_names(merged: Graph, expected: list[str]) -> None:
    """CSE may make two outputs one value; give every output its ``<task>/<name>`` back."""
    outputs = list(merged.outputs)
    for i, name in enumerate(expected):
        v = outputs[i]
        if v.name == name and v not in outputs[:i]:
            continue
        others = outputs[:i] + outputs[i + 1:]
        outputs[i] = merged.named_output(v, name, taken=others)
    merged.set_outputs(outputs)
