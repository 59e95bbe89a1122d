"""Pass ``lower-int`` (-O3, after calibration): lower a calibrated float graph to the integer
graph of docs/quantization.md.

    graph input x (f32)     ->  quantize(x){scale = s_x}                (ONNX rounding)
    conv / conv_fused       ->  qconv(x, w_q, m, s, b_q, r, mr, sr)     m/s = choose(...)
    linear / gemm           ->  qlinear;   add / sub -> qadd;   mul -> qmul
    avg pools, bilinear resize, grid_sample, softmax, sigmoid ...  -> their integer ops
    max_pool, reshape, concat, relu, ...  ("native")  -> the same op on the integers
    op without integer form ->  dequantize -> float op -> quantize       (CPU fallback)
    graph output            ->  dequantize back to f32 under the output's name, or int32 with
                                per-channel scales (option ``high_precision_output``)

Which integer form an op has is declared with the op: the registry slot ``integer`` holds
"native", the name of the integer op it lowers to, or None (no integer form: it runs on the
CPU). ``lower_rules.py`` holds one rule per integer form, dispatched through ``RULES`` (the
table-driven ones in ``lower_tables.py``); a rule may decline a node with a reason (e.g. a
non-constant weight), which makes it a CPU fallback. ``lower_context.py`` holds the state of a
run: the integer graph being built and the integer/float versions of each value.
The option ``cpu_nodes`` (globs of node names or locations) makes nodes fall back although they
have an integer form: the march check placed them on the CPU (``hbc compile`` passes them).
Every fallback is listed in ``graph.meta["cpu_nodes"]`` and explained (``--explain``).

Numbers: weights int8 per output channel, ``s_w[c] = max|W[c]| / 127``; bias int32 at
``s_x * s_w[c]``; every rescale ``m`` becomes ``(M, S) = choose(m)`` (``choose_shared`` when
terms share an output). A conv's residual is rescaled to the accumulator's scale with its own
``(mr[c], sr[c]) = choose(s_r / (s_x * s_w[c]))`` and added to the accumulator; where that
ratio needs a multiplier above 32767 or the sum could leave int32, the add is not fused (a
qconv to an intermediate, then a qadd). Sharing a shift costs the smaller term precision, so
an add's int8 input is first requantized to int16 over the same range when the output is int16.

Activations are int8 with their calibrated scale, or int16 for the values named by the option
``int16`` (globs) or ``graph.meta["int16_values"]``, on marches with int16 only. Calibration
records ``a / 32767`` for the values it was told are int16 (listed in
``graph.meta["int16_values"]``) and ``a / 127`` for the others; a value chosen as int16 only by
the option gets its recorded int8 scale times 127 / 32767 (the same clipping range ``a``).

The graph is rebuilt: each float node is replaced by the op that lowers it, which keeps the
node's name, location and output names; helper values get suffixes (``x.q`` quantized,
``y.f`` dequantized) and helper nodes ``x.quantize`` / ``y.dequantize``.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from hbc.backend.march import load_march
from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.types import FLOAT_DTYPES

from .base import Pass, PassError, in_scope, register_pass
from .lower_context import LowerContext
from .lower_rules import HIGH_PRECISION_OPS, RULES, passes_scale

#: ops of an already lowered graph, copied as they are
BOUNDARY_OPS = ("quantize", "dequantize")

_HINT = "hint: calibrate the graph first (hbc.passes.calibrate.calibrate(graph, data))"


@register_pass
class LowerInt(Pass):
    """Lower a calibrated float graph to integer ops (see the module docstring)."""

    name = "lower-int"
    opt_level = 3
    options = {
        "march": ("str", "bayes"),
        "high_precision_output": ("bool", False),
        "int16": ("globs", []),
        "cpu_nodes": ("globs", []),
    }
    requires = ("calibrated",)

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._march_given = "march" in options

    # -- configuration ------------------------------------------------------------------------
    def march(self) -> str:
        """The option ``march`` when given, else the pass context's march, else bayes."""
        march = self.opts["march"] if self._march_given else (self.ctx.march or "bayes")
        try:
            return load_march(march).name
        except InputError as e:
            raise PassError(f"pass '{self.name}': {e}") from None

    def int16_values(self, graph: Graph) -> set[str]:
        """Names of the float activation values to keep as int16."""
        globs = list(self.opts["int16"])
        exact = set(graph.meta.get("int16_values", ()))
        names = set()
        for v in graph.values():
            if v.kind == "const" or v.dtype not in FLOAT_DTYPES:
                continue
            if v.name in exact or any(fnmatch.fnmatchcase(v.name, p) for p in globs):
                names.add(v.name)
        return names

    # -- contract -----------------------------------------------------------------------------
    def check_requires(self, graph: Graph) -> None:
        """The march allows the requested int16 values, and every value whose scale lowering
        needs is calibrated: PassError naming the first node that lacks one."""
        march = self.march()
        asked = sorted(self.int16_values(graph))
        if (asked or self.opts["int16"]) and not load_march(march).int16:
            what = ", ".join(f"%{n}" for n in asked[:5]) or "|".join(self.opts["int16"])
            raise PassError(f"pass '{self.name}': int16 requested for {what} but march "
                            f"{march} has int8 activations only  hint: drop the int16 "
                            "option (and graph.meta['int16_values']) or target bayes")
        known: dict[int, bool] = {}
        for node in graph.nodes:
            form = self.integer_form(node, march)
            if form is None or form is True:
                continue
            for v in node.inputs:
                if v is not None and not _scale_known(v, known, march, self):
                    raise PassError(
                        f"pass '{self.name}': {node.op} node '{node.where()}': input %{v.name} "
                        f"has no calibrated scale  {_HINT}")
            if not passes_scale(node):
                for v in node.outputs:
                    if v.dtype in FLOAT_DTYPES and v.type.quant is None:
                        raise PassError(
                            f"pass '{self.name}': {node.op} node '{node.where()}': output "
                            f"%{v.name} has no calibrated scale  {_HINT}")

    def integer_form(self, node: Node, march: str) -> str | None:
        """The node's integer form on ``march`` (None: it runs on the CPU; True: it is an
        integer op or a quantize/dequantize already)."""
        form = True if node.op in BOUNDARY_OPS else node.opdef.integer
        if form is None or form in load_march(march).no_integer:
            return None
        return form

    # -- the rewrite --------------------------------------------------------------------------
    def run(self, graph: Graph) -> bool:
        march = self.march()
        lc = LowerContext(graph, march, self.int16_values(graph), self.explain)
        lc.high_precision = self._high_precision_values(graph, march)
        cpu = list(self.opts["cpu_nodes"])
        for node in self.walk(graph):
            form = self.integer_form(node, march)
            if form is None:
                lc.fallback(node, f"no integer form on {march}: runs on CPU")
                continue
            if form is not True and cpu and in_scope(node, cpu):
                lc.fallback(node, f"placed on the CPU for {march} (see hbc check)")
                continue
            if form is True:
                lc.emit(node, node.op, [lc.as_float(v) if v else None for v in node.inputs],
                        node.attrs, [v.type.quant for v in node.outputs], as_float=True)
                continue
            reason = RULES[form](lc, node)
            if reason is not None:
                lc.fallback(node, f"{reason}: runs on CPU")
        lc.finish()
        lc.dst.meta["cpu_nodes"] = list(lc.cpu_nodes)
        lc.dst.meta["lowered"] = {"march": march,
                                  "high_precision_output": self.opts["high_precision_output"],
                                  "int16_values": sorted(lc.int16)}
        graph.replace_contents(lc.dst)
        return True

    def _high_precision_values(self, graph: Graph, march: str) -> set[str]:
        """Graph outputs produced directly by a conv or linear that may output int32."""
        if not self.opts["high_precision_output"]:
            return set()
        names = set()
        for v in graph.outputs:
            node = v.producer
            if node is None or node.op not in HIGH_PRECISION_OPS or \
                    self.integer_form(node, march) is None:
                continue
            if v.uses or graph.outputs.count(v) > 1:
                self.explain(node, f"%{v.name} has other users: int8 output, dequantized")
            elif len(node.inputs) > 3 and node.inputs[3] is not None:
                self.explain(node, "a residual add needs a rescale: no int32 output")
            elif node.attrs.get("activation", "none") != "none":
                self.explain(node, f"activation {node.attrs['activation']} needs a rescale: "
                                   "no int32 output")
            else:
                names.add(v.name)
        return names


def _scale_known(v: Value, known: dict[int, bool], march: str, p: LowerInt) -> bool:
    """Does lowering know the scale of ``v``: recorded, not a float activation, or passed
    through a native op from an input whose scale is known."""
    if id(v) in known:
        return known[id(v)]
    node = v.producer
    ok = v.type.quant is not None or v.kind == "const" or v.dtype not in FLOAT_DTYPES
    if not ok and node is not None and p.integer_form(node, march) is not None \
            and passes_scale(node):
        ok = all(_scale_known(u, known, march, p) for u in node.inputs if u is not None)
    known[id(v)] = ok
    return ok
