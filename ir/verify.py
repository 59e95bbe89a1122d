"""The IR verifier: checks every invariant and reports every problem, each naming its node
(and its ``FILE:LINE`` for a parsed .hbir; the graph's source file heads the message).

Checked: names are unique and use-lists agree with node inputs; nodes are in topological order;
each op exists and has the right number of inputs and outputs; attributes have the declared
kinds; the recorded output types equal what the registry's inference gives; constants' data
matches their types; graph outputs are defined.
"""

from __future__ import annotations

from hbc.errors import InputError, VerifyError

from .graph import Graph, Node
from .registry import OPS, InferError, get_op
from .types import FLOAT_DTYPES


def verify(graph: Graph) -> None:
    """Raise VerifyError listing every problem found in ``graph``."""
    problems = collect_problems(graph)
    if problems:
        source = graph.meta.get("source")
        where = f"{source}: " if isinstance(source, str) and source else ""
        raise VerifyError(
            f"{where}graph '{graph.name}' failed verification ({len(problems)} problem(s)):\n  "
            + "\n  ".join(problems)
        )


def collect_problems(graph: Graph) -> list[str]:
    """Every invariant violation of ``graph`` as one message each."""
    problems: list[str] = []
    defined: set[int] = set()
    names: dict[str, str] = {}

    def define(v, what: str) -> None:
        if v.name in names:
            problems.append(f"%{v.name} is defined twice ({names[v.name]} and {what})")
        names[v.name] = what
        defined.add(id(v))

    for v in graph.inputs:
        define(v, "graph input")
    for v in graph.constant_values():
        define(v, "constant")
        arr = graph.constants.get(v.name)
        if arr is None:
            problems.append(f"constant %{v.name} has no data in graph.constants")
        elif tuple(arr.shape) != v.shape or arr.dtype != v.type.np_dtype:
            problems.append(
                f"constant %{v.name}: data {arr.dtype}{list(arr.shape)} does not match its "
                f"type {v.type.dtype}{list(v.shape)}"
            )
    node_names: set[str] = set()
    lines = graph.meta.get("hbir_lines")  # node -> FILE:LINE of a parsed .hbir
    lines = lines if isinstance(lines, dict) else {}
    for node in graph.nodes:
        where = f"{node.op} node '{node.where()}'"
        if isinstance(lines.get(node.name), str):
            where = f"{lines[node.name]}: {where}"
        if node.name in node_names:
            problems.append(f"{where}: node name is used twice")
        node_names.add(node.name)
        for i, v in enumerate(node.inputs):
            if v is None:
                continue
            if id(v) not in defined:
                problems.append(f"{where}: input {i} %{v.name} is used before it is defined "
                                "(nodes are not in topological order, or the value is foreign)")
            if (node, i) not in v.uses:
                problems.append(f"{where}: use-list of %{v.name} misses input {i}")
        problems.extend(f"{where}: {p}" for p in _check_node(node))
        for v in node.outputs:
            if v.producer is not node:
                problems.append(f"{where}: output %{v.name} names another producer")
            define(v, f"node '{node.name}'")
    for v in graph.outputs:
        if id(v) not in defined:
            problems.append(f"graph output %{v.name} is not defined")
    for v in graph.values():
        for node, i in v.uses:
            if i >= len(node.inputs) or node.inputs[i] is not v:
                problems.append(f"use-list of %{v.name} names input {i} of '{node.name}', "
                                "which is not that value")
    return problems


def _check_node(node: Node) -> list[str]:
    if node.op not in OPS:
        try:
            get_op(node.op)
        except InputError:
            return [f"unknown op '{node.op}'"]
    opdef = get_op(node.op)
    out: list[str] = []
    lo, hi = opdef.input_arity()
    n_in = len(node.inputs)
    if n_in < lo or (hi >= 0 and n_in > hi):
        out.append(f"takes {_arity(lo, hi)} inputs, has {n_in}")
    for i, v in enumerate(node.inputs[:lo]):
        if v is None:
            out.append(f"required input {i} ('{opdef.inputs[i]}') is missing")
    lo, hi = opdef.output_arity()
    if len(node.outputs) < lo or (hi >= 0 and len(node.outputs) > hi):
        out.append(f"has {_arity(lo, hi)} outputs, has {len(node.outputs)}")
    try:
        attrs = opdef.normalize_attrs(node.attrs)
    except InferError as e:
        return out + [str(e)]
    if attrs != node.attrs:
        out.append("attributes are not in canonical form (missing defaults or wrong kinds)")
    if out:
        return out
    try:
        inferred = opdef.infer([None if v is None else v.type for v in node.inputs], attrs)
    except InferError as e:
        return [f"shape inference failed: {e}"]
    for v, t in zip(node.outputs, inferred, strict=False):
        # Quantization is recorded by calibration/lowering, not inferred by every op; on float
        # values it is an annotation (calibration may record a scale inference would not pass
        # through, e.g. a QAT graph's flatten), on integer values it is what the numbers mean.
        if v.type.with_(quant=None) != t.with_(quant=None) or (
                t.quant and t.dtype not in FLOAT_DTYPES and v.type.quant != t.quant):
            out.append(f"output %{v.name} is recorded as {v.type.describe()} but inference gives "
                       f"{t.describe()}")
    return out


def _arity(lo: int, hi: int) -> str:
    if hi < 0:
        return f"at least {lo}"
    return str(lo) if lo == hi else f"{lo} to {hi}"
