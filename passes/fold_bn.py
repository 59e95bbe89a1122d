"""Fold batch_norm into the conv, conv_transpose or gemm that produces its input.

Inference batch norm is a per-channel affine map. With ``eps`` and the BN vectors
``gamma`` (scale), ``beta`` (bias), ``mean`` and ``var``::

    s = gamma / sqrt(var + eps)          t = beta - mean * s
    BN(y)[c] = (y[c] - mean[c]) * s[c] + beta[c] = y[c] * s[c] + t[c]

so when ``y`` is an affine op of constant weights, the map folds into them:

- conv, ``W: [Cout, Cin/groups, *k]``: ``W'[o] = W[o] * s[o]``, ``b' = (b - mean) * s + beta``
  (``b = 0`` when the conv has no bias: a bias input is added). Grouped and depthwise convs are
  no different, output channel ``o`` is row ``o`` of W.
- conv_transpose, ``W: [Cin, Cout/groups, *k]``: output channel ``o = g * (Cout/groups) + j``
  is ``W[g*Cin/groups:(g+1)*Cin/groups, j]``; those slices are scaled by ``s[o]``; the bias
  as for conv.
- gemm, ``y = alpha * A' @ B' + beta * C``, BN over the features (axis 1 of [M, N]): column
  ``n`` of ``B'`` (row ``n`` of B when ``trans_b``) is scaled by ``s[n]`` and
  ``C' = beta * C * s + t`` with the gemm's ``beta`` set to 1 (``C' = t`` without C).

Arithmetic is float64, cast back to the weight dtype once. Arrays are never changed in place: a
weight only this node uses gets new data under its name, a shared one a new constant.

A BN folds when its input comes from such a node whose output has no other user and is not a
graph output, and whose weights (and bias) are constants. Otherwise the BN becomes
``scale_shift(x, s, t)`` and ``--explain`` says why it did not fold. The option ``scope``
(globs on node names or locations, e.g. torch module paths) limits the pass to matching BN
nodes; the rest stay batch_norm, so folding can go in two steps as in the source documents:
``fold-bn{scope=backbone.*}`` first, then ``fold-bn{scope=heads.*}``.
"""

from __future__ import annotations

import numpy as np

from hbc.ir.graph import Graph, Node, Value

from .base import Pass, in_scope, register_pass

#: producers a BN can fold into
FOLDABLE = ("conv", "conv_transpose", "gemm")


@register_pass
class FoldBatchNorm(Pass):
    """Fold each in-scope batch_norm into its producer, or turn it into scale_shift."""

    name = "fold-bn"
    opt_level = 2
    options = {"scope": ("globs", [])}

    def run(self, graph: Graph) -> bool:
        scope = self.opts["scope"]
        changed = False
        for bn in self.walk(graph):
            if bn.op != "batch_norm":
                continue
            if not in_scope(bn, scope):
                self.explain(bn, f"outside scope {'|'.join(scope)}")
                continue
            affine = _bn_affine(graph, bn)
            if isinstance(affine, str):
                self.explain(bn, affine)
                continue
            s, t = affine
            reason = _fold_blocker(graph, bn)
            if reason is None:
                _fold(graph, bn, s, t)
            else:
                self.explain(bn, f"{reason} (became scale_shift)")
                _to_scale_shift(graph, bn, s, t)
            changed = True
        return changed


# -- analysis -----------------------------------------------------------------------------------
def _bn_affine(graph: Graph, bn: Node) -> tuple[np.ndarray, np.ndarray] | str:
    """(s, t) in float64, or the reason the BN parameters cannot be read."""
    arrays = []
    for role, v in zip(("scale", "bias", "mean", "var"), bn.inputs[1:], strict=True):
        if not v.is_const:
            return f"BN {role} %{v.name} is not a constant (kept as batch_norm)"
        arrays.append(graph.constants[v.name].astype(np.float64))
    gamma, beta, mean, var = arrays
    s = gamma / np.sqrt(var + bn.attrs["epsilon"])
    return s, beta - mean * s


def _layout(node: Node) -> str:
    return node.attrs.get("layout") or "NCHW"


def _fold_blocker(graph: Graph, bn: Node) -> str | None:
    """Why ``bn`` cannot fold into its producer (None when it can)."""
    x = bn.inputs[0]
    p = x.producer
    if p is None:
        return f"no producer: %{x.name} is a graph {'constant' if x.is_const else 'input'}"
    if p.op not in FOLDABLE:
        return f"producer is {p.op}, not {'/'.join(FOLDABLE)}"
    others = sorted({n.name for n, i in x.uses if not (n is bn and i == 0)})
    if others:
        return f"{p.op} output also used by {', '.join(others)}"
    if x in graph.outputs:
        return f"{p.op} output %{x.name} is also a graph output"
    if _layout(bn) != "NCHW" or _layout(p) != "NCHW":
        return "channels-last layout (fold-bn runs before the layout pass)"
    w, b = p.inputs[1], (p.inputs[2] if len(p.inputs) > 2 else None)
    if not w.is_const:
        return f"weights are not constant (%{w.name} of {p.name})"
    if w.type.quant is not None:
        return f"weights %{w.name} of {p.name} are quantized"
    if b is not None and not b.is_const:
        return f"bias is not constant (%{b.name} of {p.name})"
    return None


# -- rewrites -----------------------------------------------------------------------------------
def _fold(graph: Graph, bn: Node, s: np.ndarray, t: np.ndarray) -> None:
    """Fold ``bn`` into its producer and remove it."""
    p = bn.inputs[0].producer
    w = graph.constants[p.inputs[1].name]
    b_in = p.inputs[2] if len(p.inputs) > 2 else None
    b = None if b_in is None else graph.constants[b_in.name].astype(np.float64)
    w64 = w.astype(np.float64)
    if p.op == "conv":
        new_w = w64 * s.reshape((-1,) + (1,) * (w.ndim - 1))
        new_b = t if b is None else b * s + t
    elif p.op == "conv_transpose":
        groups = p.attrs["groups"]
        cin, coutg, kernel = w.shape[0], w.shape[1], w.shape[2:]
        per_group = w64.reshape(groups, cin // groups, coutg, *kernel)
        new_w = (per_group * s.reshape(groups, 1, coutg, *(1,) * len(kernel))).reshape(w.shape)
        new_b = t if b is None else b * s + t
    else:  # gemm: scale the output columns of B'
        new_w = w64 * (s[:, None] if p.attrs["trans_b"] else s[None, :])
        beta = p.attrs["beta"]
        new_b = t if b is None or beta == 0.0 else beta * b * s + t
        p.attrs["beta"] = 1.0
    _set_const_input(graph, p, 1, new_w.astype(w.dtype), f"{p.inputs[1].name}.folded")
    _set_const_input(graph, p, 2, new_b.astype(w.dtype),
                     f"{p.name}.bias" if b_in is None else f"{b_in.name}.folded")
    _remove_bn(graph, bn)


def _to_scale_shift(graph: Graph, bn: Node, s: np.ndarray, t: np.ndarray) -> None:
    """Rewrite ``bn`` in place (same name, location, output) as scale_shift(x, s, t)."""
    x = bn.inputs[0]
    axis = -1 if _layout(bn) == "NHWC" else 1
    dtype = x.type.np_dtype
    old = [v for v in bn.inputs[1:] if v is not None]
    scale = graph.add_constant(f"{bn.name}.scale", s.astype(dtype))
    shift = graph.add_constant(f"{bn.name}.shift", t.astype(dtype))
    graph.set_inputs(bn, [x, scale, shift])
    graph.change_op(bn, "scale_shift", {"axis": axis})
    _drop_unused_constants(graph, old)


def _remove_bn(graph: Graph, bn: Node) -> None:
    """Remove a folded BN: its users (and graph outputs) read the producer's output, which
    takes the BN output's name when that was a graph output."""
    x, y = bn.inputs[0], bn.outputs[0]
    params = [v for v in bn.inputs[1:] if v is not None]
    was_output = y in graph.outputs
    graph.replace_all_uses(y, x)
    graph.remove_node(bn)
    # x now holds the BN's values: a scale recorded on y (an absorbed QDQ model) is x's, and one
    # recorded on x (the values before the BN) no longer applies
    graph.set_quant(x, y.type.quant)
    if was_output:
        graph.rename_value(x, y.name)
    _drop_unused_constants(graph, params)


def _set_const_input(graph: Graph, node: Node, index: int, array: np.ndarray,
                     new_name: str) -> None:
    """Give input ``index`` of ``node`` the constant data ``array``: new data under the old
    name when only this input reads that constant, a new constant otherwise (shared or absent).
    """
    old = node.inputs[index] if index < len(node.inputs) else None
    if old is not None and old.is_const and old.uses == [(node, index)] \
            and old not in graph.outputs and old.type.shape == array.shape:
        graph.set_constant(old, array)
        return
    graph.set_input(node, index, graph.add_constant(new_name, array))
    if old is not None:
        _drop_unused_constants(graph, [old])


def _drop_unused_constants(graph: Graph, values: list[Value]) -> None:
    seen: set[int] = set()
    for v in values:
        if id(v) in seen:
            continue
        seen.add(id(v))
        if v.is_const and not v.uses and v not in graph.outputs and graph.has_value(v.name):
            graph.remove_value(v)

