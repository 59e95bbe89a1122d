"""The float reference interpreter: runs a Graph with each op's numpy reference.

numpy only. Inputs are checked against the graph's input types (name, shape, dtype) with errors
naming the input; each node's results are checked against its recorded output types, so an op
whose reference disagrees with its shape inference is caught where it happens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from hbc.errors import InputError

from .graph import Graph, Node, Value
from .registry import get_op
from .types import TensorType

#: Results of compile-time evaluation larger than this many elements stay as nodes.
FOLD_LIMIT = 1 << 24


def evaluate_constant(
    op: str,
    inputs: Sequence[Value | None],
    attrs: Mapping[str, object],
    constants: Mapping[str, np.ndarray],
    num_outputs: int | None = None,
    limit: int = FOLD_LIMIT,
) -> list[tuple[TensorType, np.ndarray]] | None:
    """Evaluate op ``op`` on constant inputs at compile time (frontends' folding).

    Returns (type, array) per output, or None when the op is not foldable or the results
    exceed ``limit`` elements. Types carry no quantization.
    """
    opdef = get_op(op)
    if not opdef.foldable:
        return None
    norm = opdef.normalize_attrs(dict(attrs))
    in_types = [None if v is None else v.type for v in inputs]
    types = opdef.infer(in_types, norm)
    if num_outputs is not None:
        types = types[:num_outputs]
    if sum(t.numel for t in types) > limit:
        return None
    arrays = [None if v is None else constants[v.name] for v in inputs]
    if opdef.needs_input_types:
        results = opdef.reference(arrays, norm, input_types=in_types)
    else:
        results = opdef.reference(arrays, norm)
    return [(t.with_(quant=None), np.asarray(r, dtype=t.np_dtype).reshape(t.shape))
            for t, r in zip(types, results, strict=False)]


def check_inputs(graph: Graph, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Validate ``inputs`` against the graph inputs; returns them as numpy arrays."""
    expected = {v.name: v for v in graph.inputs}
    unknown = sorted(set(inputs) - set(expected))
    missing = [n for n in expected if n not in inputs]
    if unknown or missing:
        parts = []
        if missing:
            parts.append("missing " + ", ".join(f"'{n}'" for n in missing))
        if unknown:
            parts.append("unknown " + ", ".join(f"'{n}'" for n in unknown))
        raise InputError(
            f"graph '{graph.name}': inputs do not match ({'; '.join(parts)}); expected "
            + ", ".join(f"{v.name}: {v.dtype}{list(v.shape)}" for v in graph.inputs)
        )
    out = {}
    for name, v in expected.items():
        arr = np.asarray(inputs[name])
        if tuple(arr.shape) != v.shape or arr.dtype != v.type.np_dtype:
            raise InputError(
                f"input '{name}': got {arr.dtype}{list(arr.shape)}, expected "
                f"{v.type.np_dtype}{list(v.shape)}"
            )
        out[name] = arr
    return out


def interpret(
    graph: Graph,
    inputs: Mapping[str, np.ndarray],
    *,
    observe: Callable[[Node, list[np.ndarray]], None] | None = None,
) -> dict[str, np.ndarray]:
    """Run ``graph`` on ``inputs`` (keyed by input name); outputs keyed by output name.

    ``observe(node, results)`` is called after each node (for calibration and debugging).
    """
    arrays = check_inputs(graph, inputs)
    env: dict[int, np.ndarray] = {id(v): arrays[v.name] for v in graph.inputs}
    for v in graph.constant_values():
        env[id(v)] = graph.constants[v.name]
    remaining = _last_uses(graph)
    for node in graph.nodes:
        args = [None if v is None else env[id(v)] for v in node.inputs]
        results = _run_node(node, args)
        for v, r in zip(node.outputs, results, strict=False):
            r = np.asarray(r)
            if r.shape != v.shape or r.dtype != v.type.np_dtype:
                raise InputError(
                    f"{node.op} node '{node.where()}': reference produced "
                    f"{r.dtype}{list(r.shape)} for %{v.name}, its type says "
                    f"{v.type.np_dtype}{list(v.shape)}"
                )
            env[id(v)] = r
        if observe is not None:
            observe(node, [env[id(v)] for v in node.outputs])
        for v in remaining.pop(id(node), ()):
            env.pop(id(v), None)
    return {v.name: env[id(v)] for v in graph.outputs}


def _run_node(node: Node, args: list[np.ndarray | None]) -> list[np.ndarray]:
    """The node's reference on ``args``; an error names the node (a program read from a file
    may hold attributes or constants a kernel refuses: a shift out of range, a bad table)."""
    opdef = get_op(node.op)
    try:
        if opdef.needs_input_types:
            types = [None if v is None else v.type for v in node.inputs]
            return opdef.reference(args, node.attrs, input_types=types)
        return opdef.reference(args, node.attrs)
    except InputError as e:
        if f"node '{node.name}" in str(e):
            raise
        raise type(e)(f"{node.op} node '{node.where()}': {e.args[0] if e.args else e}",
                      hint=e.hint) from None
    except (ValueError, TypeError, IndexError, KeyError, ArithmeticError) as e:
        raise InputError(f"{node.op} node '{node.where()}': cannot compute it "
                         f"({type(e).__name__}: {str(e)[:200]})") from None


def _last_uses(graph: Graph) -> dict[int, list[Value]]:
    """node id -> values whose last use is that node (freed after it, to bound memory)."""
    keep = {id(v) for v in graph.outputs}
    last: dict[int, Node] = {}
    for node in graph.nodes:
        for v in node.inputs:
            if v is not None and v.kind == "node" and id(v) not in keep:
                last[id(v)] = node
    out: dict[int, list[Value]] = {}
    by_id = {id(v): v for n in graph.nodes for v in n.outputs}
    for vid, node in last.items():
        out.setdefault(id(node), []).append(by_id[vid])
    return out
