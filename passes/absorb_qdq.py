"""Pass ``absorb-qdq`` (-O1, first): turn the QuantizeLinear/DequantizeLinear pairs of a QDQ
model (onnxruntime ``quantize_static`` in QDQ format, or a QAT export) into recorded scales, so
the graph is a calibrated float graph that ``lower-int`` compiles without calibration.

    dequantize(quantize(x){scale=s, i8|i16})  ->  x,  with x.type.quant = QuantParams((s,))
    dequantize(W_q)        (W_q a constant)     ->  W = float32(W_q) * float32(s_w)   (a constant)
    dequantize(quantize(W)) (W a constant)      ->  the same, W_q = quantize(W) at compile time

Activations (x a graph input or a node result): the pair disappears and its scale is recorded on
``x``; graph-output names are kept. An int16 pair also lists ``x`` in
``graph.meta["int16_values"]`` (its scale is already ``a / 32767``). After absorbing at least
one activation the graph gets ``graph.meta["calibration"] = {"method": "qdq", "samples": 0}``.

Weights: lowering recomputes weight scales as ``max|W[c]| / 127``; that reproduces the QDQ
integers and scales when the exporter used symmetric max (onnxruntime with
``WeightSymmetric``). When it does not (a channel whose integers do not reach +-127, a
per-tensor weight scale, a learned QAT scale), the QDQ scales are recorded on the float weight
constant (``QuantParams(s_w, axis)``) and lowering quantizes with them. Bias (int32) and other
constants are simply dequantized.

hbc's integer scheme is symmetric with per-tensor int8/int16 activations, so a pair with a
non-zero zero point, unsigned (u8/u16) or per-channel activation quantization, or another
format, is an error naming the node (the graph is left unchanged). Ops the QDQ model left
unquantized keep values without a scale; ``lower-int`` then names them.

Ops that move integers unchanged (reshape, transpose, ...) infer their input's scale for their
output, so their recorded scale follows the input's; a QDQ requantization after such an op is
dropped in favour of the input's scale (explained).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hbc.ir.graph import Graph, Node, Value
from hbc.ir.ops.quant import dequantize_array, quantize_array
from hbc.ir.types import QuantParams

from .base import Pass, PassError, register_pass
from .lower_context import quantize_weight
from .rewrite import replace_node

#: activation dtypes hbc's integer graph uses
ACTIVATION_DTYPES = ("i8", "i16")
#: ops whose input 1 is a weight that lowering quantizes per output channel
WEIGHT_OPS = frozenset({"conv", "conv_fused", "conv_transpose", "gemm", "linear", "matmul"})
_REEXPORT = "hbc's integer scheme is symmetric; re-export with symmetric activations"


@dataclass
class _Plan:
    """What one run found: activation pairs (dequantize, quantize), constant dequantizes
    (dequantize, quantize or None), and the problems that forbid absorbing."""

    pairs: list[tuple[Node, Node]] = field(default_factory=list)
    consts: list[tuple[Node, Node | None]] = field(default_factory=list)
    problems: list[tuple[Node, str]] = field(default_factory=list)


def activation_problem(q: Node) -> str | None:
    """Why the activation quantization of quantize node ``q`` cannot be absorbed, or None."""
    quant, dtype = q.outputs[0].type.quant, q.outputs[0].dtype
    if quant.zero_point is not None:
        zp = quant.zero_point[0] if len(set(quant.zero_point)) == 1 else list(quant.zero_point)
        return f"asymmetric quantization (zero point {zp}) cannot be absorbed: {_REEXPORT}"
    if dtype in ("u8", "u16"):
        return (f"unsigned quantization ({dtype}, zero point 0) cannot be absorbed: {_REEXPORT} "
                "(signed int8)")
    if dtype not in ACTIVATION_DTYPES:
        return (f"{dtype} quantization cannot be absorbed: hbc's activations are int8 or int16; "
                "re-export with int8 activations")
    if quant.axis is not None:
        return (f"per-channel activation quantization (axis {quant.axis}) cannot be absorbed: "
                "hbc's activations have one scale per tensor; re-export with per-tensor "
                "activations")
    return None


@register_pass
class AbsorbQdq(Pass):
    """Absorb QDQ pairs into recorded scales and float weights (see the module docstring)."""

    name = "absorb-qdq"
    opt_level = 1

    def run(self, graph: Graph) -> bool:
        plan = self._plan(graph)
        if plan.problems:
            node, reason = plan.problems[0]
            more = len(plan.problems) - 1
            raise PassError(f"pass '{self.name}': {node.op} node '{node.where()}': {reason}"
                            + (f" (and {more} more node{'s' * (more > 1)})" if more else ""))
        for dq, q in plan.consts:
            self.ctx.node = dq
            self._fold_constant(graph, dq, q)
        absorbed: list[Value] = []
        int16: list[Value] = []
        for dq, q in plan.pairs:
            self.ctx.node = dq
            x = self._absorb(graph, dq, q)
            if x is not None:
                absorbed.append(x)
                if q.outputs[0].dtype == "i16":
                    int16.append(x)
        self.ctx.node = None
        if absorbed:
            self._follow_moves(graph)
            graph.meta["calibration"] = {"method": "qdq", "samples": 0}
        if int16:
            names = [*graph.meta.get("int16_values", ()), *(v.name for v in int16)]
            graph.meta["int16_values"] = list(dict.fromkeys(names))
        return bool(plan.consts or absorbed)

    # -- finding the pairs ----------------------------------------------------------------------
    def _plan(self, graph: Graph) -> _Plan:
        plan = _Plan()
        for dq in graph.nodes:
            if dq.op != "dequantize":
                continue
            src = dq.inputs[0]
            q = src.producer if src.producer is not None and src.producer.op == "quantize" \
                else None
            if src.is_const:
                plan.consts.append((dq, None))
            elif q is not None and q.inputs[0].is_const:
                plan.consts.append((dq, q))
            elif q is not None:
                problem = activation_problem(q)
                if problem is None:
                    plan.pairs.append((dq, q))
                elif all(n is not q for n, _ in plan.problems):
                    plan.problems.append((q, problem))
            else:
                self.explain(dq, f"%{src.name} is neither a quantize result nor a constant: "
                                 "the dequantize is kept")
        return plan

    # -- constants ------------------------------------------------------------------------------
    def _fold_constant(self, graph: Graph, dq: Node, q: Node | None) -> None:
        """dequantize(const) or dequantize(quantize(const)) -> a float constant named after the
        dequantize's output; weight scales recorded when lowering's max rule differs."""
        src = dq.inputs[0]
        quant = src.type.quant
        if q is None:
            ints = graph.constants[src.name]
        else:
            ints = quantize_array(graph.constants[q.inputs[0].name], q.attrs["dtype"], quant,
                                  bool(q.attrs["saturate"]))
        arr = dequantize_array(ints, quant, dq.attrs["dtype"])
        out = dq.outputs[0]
        names = _float_names(dq, q)
        c = graph.add_constant(names[0], arr)
        if _is_weight(out) and self._needs_scales(dq, ints, arr, quant):
            graph.retype(c, c.type.with_(quant=quant))
        replace_node(graph, dq, [c])
        _drop_if_unused(graph, q)
        free = [n for n in names if not graph.has_value(n)]
        if free and c.name not in names and c not in graph.outputs:
            graph.rename_value(c, free[0])

    def _needs_scales(self, dq: Node, ints: np.ndarray, arr: np.ndarray,
                      quant: QuantParams) -> bool:
        """Would lowering's max rule give other integers or scales than the QDQ weights?"""
        if ints.dtype != np.int8 or quant.zero_point is not None or arr.ndim < 2:
            return False
        wq, sw = quantize_weight(arr)
        lowered = wq.astype(np.float64) * sw.reshape((-1,) + (1,) * (arr.ndim - 1))
        if np.array_equal(wq, ints) and np.allclose(lowered, arr, rtol=1e-6, atol=0.0):
            return False
        self.explain(dq, f"weight scales differ from max|W[c]|/127 (axis {quant.axis}): "
                         "recorded on the float weight for lowering")
        return True

    # -- activations ----------------------------------------------------------------------------
    def _absorb(self, graph: Graph, dq: Node, q: Node) -> Value | None:
        """Record the pair's scale on its float input and bypass it; None if left alone."""
        x, out = q.inputs[0], dq.outputs[0]
        quant = QuantParams((q.outputs[0].type.quant.scale[0],))
        if (x.dtype, x.shape) != (out.dtype, out.shape):
            self.explain(dq, f"dequantizes to {out.type.describe()}, but %{x.name} is "
                             f"{x.type.describe()}: the pair is kept")
            return None
        if x.type.quant is not None and x.type.quant != quant:
            self.explain(q, f"%{x.name} is already quantized with scale "
                            f"{list(x.type.quant.scale)}, this pair uses {quant.scale[0]}: the "
                            "pair is kept")
            return None
        graph.set_quant(x, quant)
        replace_node(graph, dq, [x])
        _drop_if_unused(graph, q)
        return x

    def _follow_moves(self, graph: Graph) -> None:
        """Make recorded scales agree with inference: an op that moves integers unchanged
        infers its input's scale for its output."""
        for node in graph.nodes:
            inferred = node.opdef.infer([None if v is None else v.type for v in node.inputs],
                                        node.attrs)
            for v, t in zip(node.outputs, inferred, strict=False):
                if t.quant is None or v.type.quant == t.quant:
                    continue
                if v.type.quant is not None:
                    self.explain(node, f"the QDQ model requantizes %{v.name} to scale "
                                       f"{list(v.type.quant.scale)}; {node.op} keeps its input's "
                                       f"scale {list(t.quant.scale)}")
                graph.set_quant(v, t.quant)


def _float_names(dq: Node, q: Node | None) -> list[str]:
    """Names for the float constant, best first: the quantized float constant's, the integer
    constant's without onnxruntime's ``_quantized`` suffix (the model's weight name), the
    dequantize output's."""
    src = q.inputs[0] if q is not None else dq.inputs[0]
    stem = src.name.removesuffix("_quantized") if q is None else src.name
    return list(dict.fromkeys(n for n in (stem, dq.outputs[0].name) if n))


def _is_weight(v: Value) -> bool:
    """Is ``v`` read only as the weight (input 1) of convs or matrix products? (Scales recorded
    on a constant that something else reads would flow into that reader's inferred type.)"""
    return bool(v.uses) and all(i == 1 and n.op in WEIGHT_OPS for n, i in v.uses)


def _drop_if_unused(graph: Graph, q: Node | None) -> None:
    """Remove quantize node ``q`` (and a constant input only it read) once nothing uses it."""
    if q is None or not graph.contains(q):
        return
    if any(v.uses or v in graph.outputs for v in q.outputs):
        return
    x = q.inputs[0]
    graph.remove_node(q)
    if x.is_const and not x.uses and x not in graph.outputs:
        graph.remove_value(x)
