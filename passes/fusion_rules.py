"""The fusion rules of the ``fuse`` pass, as data: each is a :class:`Rule` (match, check,
rewrite) run by the driver in ``fuse.py``.

=============  ====================================  =========================================
rule           pattern (root last)                    result
=============  ====================================  =========================================
conv-act       conv | conv_fused -> relu | clip       conv_fused{activation}
conv-add       conv | conv_fused -> add(., residual)  conv_fused(x, w, b, residual)
gemm-linear    gemm                                   linear (alpha, beta, trans_b folded)
linear-bias    matmul | linear -> add(., const [N])   linear(x, w, b)
linear-act     linear -> relu | clip                  linear{activation}
=============  ====================================  =========================================

Chains fuse step by step (conv -> add -> relu becomes conv_fused with a residual, then its
activation). A candidate whose check fails is left alone and the reason is explained; the
act rules also match sigmoid, tanh and the like after a conv or linear, only to explain that
they are not fusible.

The folds of gemm-linear and linear-bias: ``w = alpha * (B if trans_b else B^T)`` ([N, K]),
``b = beta * c`` (c broadcast to one row); a bias added after a linear with a bias sums into it.
The fused node takes the name and location of the compute node (conv, gemm, matmul) and the
output name of the pattern's last node, so downstream names and graph outputs stay stable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hbc.ir.graph import Graph, Node, Value
from hbc.ir.ops.fused import ACTIVATION_ATTRS, conv_attrs
from hbc.ir.registry import get_op
from hbc.ir.types import FLOAT_DTYPES, type_of_array


@dataclass
class FuseContext:
    """What a rule check may consult: the target march and its fusion limits."""

    march: str | None = None
    #: limits of the march (the march file's ``[lowering.fusion]``), e.g. residual_strides
    limits: dict[str, Any] = field(default_factory=dict)


@dataclass
class Match:
    """A matched candidate: ``main`` is the compute node that survives (its name and location
    go to the fused node), ``root`` the last node (its output name goes to the fused node),
    ``nodes`` every node replaced, in topological order."""

    main: Node
    root: Node
    graph: Graph
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def nodes(self) -> list[Node]:
        return [self.main, self.root] if self.main is not self.root else [self.root]


#: match(node, graph) gives a Match, several alternatives (tried in order) or None
MatchFn = Callable[[Node, Graph], "Match | Sequence[Match] | None"]


@dataclass(frozen=True)
class Rule:
    """A declarative fusion: which ops may be its root (the pattern's last node), how to match
    from the root, what must hold (True or the reason it does not), and the rewrite."""

    name: str
    roots: tuple[str, ...]
    match: MatchFn
    check: Callable[[Match, FuseContext], bool | str]
    rewrite: Callable[[Match, Graph], Node]


# -- rewrite helpers -------------------------------------------------------------------------
def sole_use_reason(graph: Graph, v: Value, consumer: Node, what: str) -> str | None:
    """Why ``v`` (the intermediate of a pattern) cannot disappear into the fused node, or None
    when ``consumer`` is its only user."""
    if v in graph.outputs:
        return f"{what} output %{v.name} is a graph output"
    others = [n for n, _ in v.uses if n is not consumer]
    if others:
        return f"{what} output %{v.name} is also used by node '{others[0].name}'"
    return None


@dataclass
class NewConst:
    """A constant a rewrite creates in place of ``replaces`` (a transposed or scaled weight);
    it takes over the name when ``replaces`` has no other user."""

    array: np.ndarray
    replaces: Value


def replace_nodes(graph: Graph, m: Match, op: str, inputs: Sequence[Value | NewConst | None],
                  attrs: dict[str, Any]) -> Node:
    """Replace the nodes of ``m`` by one ``op`` node at the root's position, named after
    ``m.main`` and with the root's output name; users and graph outputs move over, constants
    only the old nodes used are removed."""
    root, out = m.root, m.root.outputs[0]
    in_types = [v.type if isinstance(v, Value) else None if v is None
                else type_of_array(v.array) for v in inputs]
    opdef = get_op(op)
    (new_type,) = opdef.infer(in_types, opdef.normalize_attrs(attrs))
    if (new_type.dtype, new_type.shape) != (out.type.dtype, out.type.shape):
        raise RuntimeError(f"fused {op} would produce {new_type}, not {out.type} of %{out.name}")
    uses, saved_outputs = list(out.uses), list(graph.outputs)
    position = graph.nodes.index(root) - (len(m.nodes) - 1)
    old_consts = [v for n in m.nodes for v in n.inputs if v is not None and v.is_const]
    for n, i in uses:  # detach the users so the old nodes can go and free their names
        graph.set_input(n, i, None)
    graph.outputs = [v for v in saved_outputs if v is not out]
    for n in reversed(m.nodes):
        graph.remove_node(n)
    values = [_materialize(graph, v) if isinstance(v, NewConst) else v for v in inputs]
    node = graph.add_node(op, values, attrs, name=m.main.name, loc=m.main.loc,
                          output_names=[out.name])
    graph.nodes.insert(position, graph.nodes.pop())
    new = node.outputs[0]
    if out.type.quant is not None:  # a recorded scale (absorbed QDQ) describes the same values
        graph.set_quant(new, out.type.quant)
    for n, i in uses:
        graph.set_input(n, i, new)
    graph.outputs = [new if v is out else v for v in saved_outputs]
    for v in old_consts:
        if not v.uses and v not in graph.outputs and _alive(graph, v):
            graph.remove_value(v)
    return node


def _alive(graph: Graph, v: Value) -> bool:
    return graph.has_value(v.name) and graph.value(v.name) is v


def _materialize(graph: Graph, c: NewConst) -> Value:
    old = c.replaces
    if _alive(graph, old) and not old.uses and old not in graph.outputs:
        graph.remove_value(old)
        return graph.add_constant(old.name, c.array, exact=True)
    return graph.add_constant(old.name, c.array)


# -- activations -----------------------------------------------------------------------------
FUSIBLE_ACTIVATIONS = ("relu", "clip")
#: activations met after a conv/linear that cannot fuse (matched only to explain why)
OTHER_ACTIVATIONS = ("leaky_relu", "prelu", "sigmoid", "tanh", "hard_sigmoid", "hard_swish")
_NO_ACT = {a.name: a.default for a in ACTIVATION_ATTRS}


def activation_attrs(node: Node) -> dict[str, Any] | None:
    """The fused-op activation attributes equivalent to ``node``, or None if not fusible.
    clip(0, inf) is relu and clip(0, 6) is relu6."""
    if node.op == "relu":
        return _NO_ACT | {"activation": "relu"}
    if node.op != "clip":
        return None
    lo, hi = node.attrs["min"], node.attrs["max"]
    if lo == 0 and hi == math.inf:
        return _NO_ACT | {"activation": "relu"}
    if lo == 0 and hi == 6:
        return _NO_ACT | {"activation": "relu6"}
    return {"activation": "clip", "clip_min": lo, "clip_max": hi}


def _is_float(v: Value) -> bool:
    return v.dtype in FLOAT_DTYPES


def _producer(v: Value | None, ops: tuple[str, ...]) -> Node | None:
    p = v.producer if v is not None else None
    return p if p is not None and p.op in ops else None


def _act_rule(name: str, producers: tuple[str, ...]) -> Rule:
    def match(node: Node, graph: Graph) -> Match | None:
        p = _producer(node.inputs[0], producers)
        return Match(p, node, graph) if p is not None else None

    def check(m: Match, fctx: FuseContext) -> bool | str:
        p, act = m.main, m.root
        if activation_attrs(act) is None:
            return (f"activation {act.op} is not fusible into {p.op} '{p.name}' "
                    f"(fusible: relu, relu6, clip)")
        if p.attrs.get("activation", "none") != "none":
            return f"{p.op} '{p.name}' already applies activation {p.attrs['activation']}"
        return sole_use_reason(m.graph, p.outputs[0], act, p.op) or True

    def rewrite(m: Match, graph: Graph) -> Node:
        p = m.main
        op = "conv_fused" if p.op == "conv" else p.op
        attrs = {**p.attrs, **_NO_ACT, **activation_attrs(m.root)}
        return replace_nodes(graph, m, op, list(p.inputs), attrs)

    return Rule(name, FUSIBLE_ACTIVATIONS + OTHER_ACTIVATIONS, match, check, rewrite)


# -- conv + add (residual) -------------------------------------------------------------------
def _match_conv_add(node: Node, graph: Graph) -> list[Match] | None:
    out = []
    for i in (0, 1):
        p = _producer(node.inputs[i], ("conv", "conv_fused"))
        if p is not None:
            out.append(Match(p, node, graph, {"residual": node.inputs[1 - i]}))
    return out or None


def _check_conv_add(m: Match, fctx: FuseContext) -> bool | str:
    conv, add, residual = m.main, m.root, m.extra["residual"]
    y = conv.outputs[0]
    if conv.op == "conv_fused":
        if conv.inputs[3:] and conv.inputs[3] is not None:
            return f"conv_fused '{conv.name}' already has a residual"
        if conv.attrs["activation"] != "none":
            return (f"conv_fused '{conv.name}' applies {conv.attrs['activation']} before the "
                    "add; only act(conv + residual) fuses")
    if residual is y:
        return f"the add adds conv output %{y.name} to itself"
    reason = sole_use_reason(m.graph, y, add, conv.op)
    if reason:
        return reason
    if residual.shape != y.shape or add.outputs[0].shape != y.shape:
        return (f"the add broadcasts: residual %{residual.name} {list(residual.shape)}, "
                f"{conv.op} output %{y.name} {list(y.shape)}; a residual must have the conv "
                "output's shape")
    strides = fctx.limits.get("residual_strides")
    if strides is not None and any(s not in strides for s in conv.attrs["strides"]):
        allowed = " or ".join(map(str, strides))
        return (f"{fctx.march} fuses residual adds only for stride {allowed} ({conv.op} "
                f"'{conv.name}' has strides {conv.attrs['strides']})")
    return True


def _rewrite_conv_add(m: Match, graph: Graph) -> Node:
    conv = m.main
    x, w, b = [*conv.inputs, None][:3]
    attrs = {**conv_attrs(conv.attrs), **_NO_ACT}
    return replace_nodes(graph, m, "conv_fused", [x, w, b, m.extra["residual"]], attrs)


# -- gemm -> linear --------------------------------------------------------------------------
def _match_gemm(node: Node, graph: Graph) -> Match:
    return Match(node, node, graph)


def _check_gemm(m: Match, fctx: FuseContext) -> bool | str:
    g = m.main
    a, b, c = [*g.inputs, None][:3]
    if not _is_float(a):
        return f"gemm on {a.dtype} tensors: linear is defined on float tensors only"
    if g.attrs["trans_a"]:
        return "gemm with trans_a=1 is not a linear layer x @ w^T (x would be transposed)"
    if not b.is_const and (not g.attrs["trans_b"] or g.attrs["alpha"] != 1.0):
        return (f"gemm weight %{b.name} is not a constant, so trans_b=0 or alpha != 1 cannot "
                "be folded into linear's [N, K] weight")
    if c is None or g.attrs["beta"] == 0.0:
        return True
    n = g.outputs[0].shape[1]
    if c.is_const:
        if c.type.rank == 2 and c.shape[0] != 1:
            return (f"gemm bias %{c.name} {list(c.shape)} varies over rows; linear takes one "
                    f"bias per output feature [{n}]")
        return True
    if c.shape != (n,) or g.attrs["beta"] != 1.0:
        return (f"gemm bias %{c.name} {list(c.shape)} (beta={g.attrs['beta']}) is not a "
                f"constant, so it cannot become linear's [{n}] bias")
    return True


def _rewrite_gemm(m: Match, graph: Graph) -> Node:
    g = m.main
    a, b, c = [*g.inputs, None][:3]
    alpha, beta = g.attrs["alpha"], g.attrs["beta"]
    w: Value | NewConst = b
    if not g.attrs["trans_b"] or alpha != 1.0:
        arr = graph.constants[b.name]
        arr = arr if g.attrs["trans_b"] else arr.T
        w = NewConst(np.ascontiguousarray(arr * arr.dtype.type(alpha) if alpha != 1.0 else arr),
                     b)
    bias: Value | NewConst | None = None
    if c is not None and beta != 0.0:
        n = g.outputs[0].shape[1]
        if not c.is_const or (c.shape == (n,) and beta == 1.0):
            bias = c
        else:
            arr = graph.constants[c.name]
            row = np.broadcast_to(arr, (1, n)).reshape(n)
            bias = NewConst(np.ascontiguousarray(row * row.dtype.type(beta)), c)
    return replace_nodes(graph, m, "linear", [a, w, bias], dict(_NO_ACT))


# -- matmul / linear + add of a bias -----------------------------------------------------------
def _match_linear_bias(node: Node, graph: Graph) -> list[Match] | None:
    out = []
    for i in (0, 1):
        p = _producer(node.inputs[i], ("matmul", "linear"))
        bias = node.inputs[1 - i]
        if p is not None and bias.is_const:
            out.append(Match(p, node, graph, {"bias": bias}))
    return out or None


def _check_linear_bias(m: Match, fctx: FuseContext) -> bool | str:
    p, add, bias = m.main, m.root, m.extra["bias"]
    y = p.outputs[0]
    if not _is_float(y):
        return f"{p.op} on {y.dtype} tensors: linear is defined on float tensors only"
    if p.op == "matmul":
        x, w = p.inputs
        if x.type.rank < 2:
            return f"matmul input %{x.name} has rank {x.type.rank}; linear needs rank >= 2"
        if not w.is_const or w.type.rank != 2:
            return (f"matmul weight %{w.name} {list(w.shape)} is not a constant matrix, so "
                    "it cannot become linear's weight")
    elif p.attrs["activation"] != "none":
        return f"linear '{p.name}' applies {p.attrs['activation']} before the add"
    elif p.inputs[2:] and p.inputs[2] is not None and not p.inputs[2].is_const:
        return f"linear '{p.name}' has a bias %{p.inputs[2].name} that is not a constant"
    n = y.shape[-1]
    if bias.shape != (n,) or bias.dtype != y.dtype:
        return (f"add operand %{bias.name} {bias.dtype}{list(bias.shape)} is not a 1-D bias "
                f"over the last axis ({y.dtype}[{n}])")
    return sole_use_reason(m.graph, y, add, p.op) or True


def _rewrite_linear_bias(m: Match, graph: Graph) -> Node:
    p, bias = m.main, m.extra["bias"]
    if p.op == "matmul":
        x, w = p.inputs
        wt = NewConst(np.ascontiguousarray(graph.constants[w.name].T), w)
        return replace_nodes(graph, m, "linear", [x, wt, bias], dict(_NO_ACT))
    x, w, old = [*p.inputs, None][:3]
    b: Value | NewConst = bias
    if old is not None:
        b = NewConst(graph.constants[old.name] + graph.constants[bias.name], old)
    return replace_nodes(graph, m, "linear", [x, w, b], dict(p.attrs))


RULES: tuple[Rule, ...] = (
    Rule("gemm-linear", ("gemm",), _match_gemm, _check_gemm, _rewrite_gemm),
    Rule("conv-add", ("add",), _match_conv_add, _check_conv_add, _rewrite_conv_add),
    Rule("linear-bias", ("add",), _match_linear_bias, _check_linear_bias, _rewrite_linear_bias),
    _act_rule("conv-act", ("conv", "conv_fused")),
    _act_rule("linear-act", ("linear",)),
)
