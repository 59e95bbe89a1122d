"""The state of one ``lower-int`` run: the float graph, the integer graph being built, and the
integer and float versions of every float value.

Rules ask for a value as integers (:meth:`LowerContext.as_int`: a quantize is inserted for a
float value, a float constant is quantized at compile time) or as floats
(:meth:`LowerContext.as_float`: a dequantize is inserted), emit the op that replaces a node with
:meth:`LowerContext.emit` (which keeps the node's name, location and output names) and record
scales with ``Graph.set_quant``. Conversions are made once per value and shared. The helpers
shared by the rules (weight quantization, scales, the lo/hi/out_dtype and m/s attributes) are
here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hbc.ir.fixed_point import INT_RANGES as RANGES
from hbc.ir.fixed_point import choose
from hbc.ir.graph import Graph, Node, Value, legal_name
from hbc.ir.ops.quant import quantize_array
from hbc.ir.types import FLOAT_DTYPES, QuantParams

from .base import PassError

#: int8 -> int16 scale of the same clipping range a (a / 127 -> a / 32767)
INT16_RESCALE = 127 / 32767


def qscale(v: Value) -> float:
    """The per-tensor scale of an integer value of the integer graph."""
    q = v.type.quant
    if q is None or q.axis is not None:
        raise PassError(f"%{v.name} ({v.type.describe()}) has no per-tensor scale")
    return q.scale[0]


def weight_scales(w: np.ndarray) -> np.ndarray:
    """Per-output-channel (axis 0) scales ``max|W[c]| / 127``, 1 for an all-zero channel."""
    amax = np.abs(w.astype(np.float64)).reshape(w.shape[0], -1).max(axis=1, initial=0.0)
    return np.where(amax > 0, amax / 127, 1.0)


def quantize_weight(w: np.ndarray, quant: QuantParams | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, per-channel scales): round half even, clipped to [-127, 127].

    ``quant``: scales recorded on the float weight constant (absorb-qdq, when a QDQ model's
    weight scales are not ``max|W[c]|/127``): per output channel (axis 0) or per tensor, they
    replace the max rule and the integers keep the full int8 range [-128, 127] the model used.
    Recorded scales of another shape are ignored.
    """
    s, lo = weight_scales(w), -127
    if quant is not None and quant.zero_point is None and w.ndim >= 1 and (
            quant.axis is None or (quant.axis == 0 and len(quant.scale) == w.shape[0])):
        s = np.broadcast_to(np.asarray(quant.scale, dtype=np.float64), (w.shape[0],)).copy()
        lo = -128
    q = np.rint(w.astype(np.float64) / s.reshape((-1,) + (1,) * (w.ndim - 1)))
    return np.clip(q, lo, 127).astype(np.int8), s


def out_attrs(dtype: str, lo: int | None = None, hi: int | None = None) -> dict[str, Any]:
    """lo, hi, out_dtype attributes; bounds equal to the dtype's range are left at None."""
    tlo, thi = RANGES[dtype]
    return {"lo": None if lo in (None, tlo) else lo, "hi": None if hi in (None, thi) else hi,
            "out_dtype": dtype}


def rescaled_attrs(lc: LowerContext, node: Node, x: Value, divisor: float) -> dict[str, Any]:
    """m, s, lo, hi, out_dtype of an op (node) whose integer sum over x is ``divisor`` times
    the input's scale: ``(m, s) = choose(s_x / (s_y * divisor))``."""
    y = node.outputs[0]
    s_y, dtype = lc.act_scale(y), lc.out_dtype(y)
    m, s = choose(qscale(x) / (s_y * divisor), node.name)
    return {"m": m, "s": s, **out_attrs(dtype)}


class LowerContext:
    """Builds the integer graph ``dst`` from the float graph ``src`` (see the module doc)."""

    def __init__(self, src: Graph, march: str, int16: set[str],
                 explain: Callable[[Node, str], None]) -> None:
        self.src = src
        self.march = march
        self.int16 = int16
        #: int16 values whose recorded scale is calibration's int8 one (chosen at lowering
        #: time, not listed in graph.meta["int16_values"] when calibrating)
        self.int16_from_int8 = int16 - set(src.meta.get("int16_values", ()))
        self.explain = explain
        #: float output values (names) that become int32 graph outputs
        self.high_precision: set[str] = set()
        self.cpu_nodes: list[str] = []
        self.dst = Graph(src.name)
        self.dst.meta = dict(src.meta)
        self._int: dict[int, Value] = {}
        self._float: dict[int, Value] = {}
        self._taken_values = {v.name for v in src.values()}
        self._taken_nodes = {n.name for n in src.nodes}
        self._outputs = {id(v) for v in src.outputs}
        for v in src.inputs:
            self._float[id(v)] = self.dst.add_input(v.name, v.type)

    # -- names --------------------------------------------------------------------------------
    def aux_name(self, base: str) -> str:
        """A value name free in both graphs (so no float name is ever taken by a helper)."""
        return self._free(legal_name(base), self._taken_values, set(self.dst._values))

    def aux_node_name(self, base: str) -> str:
        return self._free(legal_name(base), self._taken_nodes,
                          {n.name for n in self.dst.nodes})

    @staticmethod
    def _free(base: str, *taken: set[str]) -> str:
        name, i = base, 0
        while any(name in t for t in taken):
            i += 1
            name = f"{base}_{i}"
        return name

    # -- scales and types ---------------------------------------------------------------------
    def out_dtype(self, fv: Value) -> str:
        """Integer dtype of the activation ``fv``: i16 when chosen, else i8."""
        return "i16" if fv.name in self.int16 else "i8"

    def act_scale(self, fv: Value) -> float:
        """The calibrated scale of float activation ``fv`` in its integer dtype."""
        q = fv.type.quant
        if q is None or q.axis is not None:
            raise PassError(f"%{fv.name} has no calibrated per-tensor scale  hint: calibrate "
                            "the graph first")
        return q.scale[0] * (INT16_RESCALE if fv.name in self.int16_from_int8 else 1.0)

    def const_array(self, fv: Value | None) -> np.ndarray | None:
        """The data of a constant of the float graph (None if ``fv`` is not one)."""
        if fv is None or fv.kind != "const":
            return None
        return self.src.constants[fv.name]

    # -- values -------------------------------------------------------------------------------
    def add_const(self, base: str, array: np.ndarray, quant: QuantParams | None = None,
                  own: bool = False) -> Value:
        """A constant of the integer graph; ``own``: named ``base`` itself when still free
        there (a float constant's replacement keeps the constant's name)."""
        name = base if own and not self.dst.has_value(base) else self.aux_name(base)
        v = self.dst.add_constant(name, array, exact=True)
        if quant is not None:
            self.dst.retype(v, v.type.with_(quant=quant))
        return v

    def _plain(self, fv: Value) -> Value:
        """``fv`` itself in the integer graph: a copied constant or a non-float value."""
        if id(fv) not in self._float:
            if fv.kind != "const":
                raise PassError(f"%{fv.name} is used before it is lowered")
            arr = self.src.constants[fv.name]
            self._float[id(fv)] = self.add_const(fv.name, arr, fv.type.quant, own=True)
        return self._float[id(fv)]

    def is_float(self, fv: Value) -> bool:
        """Is ``fv`` a float activation (not a constant, not an index or mask)?"""
        return fv.kind != "const" and fv.dtype in FLOAT_DTYPES

    def as_int(self, fv: Value) -> Value:
        """``fv`` as integers with a per-tensor scale (quantized where needed)."""
        if id(fv) in self._int:
            return self._int[id(fv)]
        if fv.dtype not in FLOAT_DTYPES:
            return self._plain(fv)
        dtype = self.out_dtype(fv)
        if fv.kind == "const":
            arr = self.src.constants[fv.name]
            if fv.type.quant is not None:
                scale = self.act_scale(fv)
            else:
                amax = float(np.max(np.abs(arr), initial=0.0))
                scale = amax / RANGES[dtype][1] if amax > 0 else 1.0
            q = QuantParams((scale,))
            v = self.add_const(f"{fv.name}.q", quantize_array(arr, dtype, q), q)
        else:
            f = self.as_float(fv)
            attrs = {"dtype": dtype, "scale": [self.act_scale(fv)]}
            v = self._helper("quantize", f, attrs, fv, "q")
        self._int[id(fv)] = v
        return v

    def as_float(self, fv: Value) -> Value:
        """``fv`` as floats (dequantized where needed). A graph output dequantizes under its
        own name; its integer version is renamed ``name.q``."""
        if id(fv) in self._float:
            return self._float[id(fv)]
        if fv.dtype not in FLOAT_DTYPES or fv.kind == "const":
            return self._plain(fv)
        if id(fv) not in self._int:
            raise PassError(f"%{fv.name} is used before it is lowered")
        iv = self._int[id(fv)]
        if id(fv) in self._outputs and iv.name == fv.name:
            self.dst.rename_value(iv, self.aux_name(f"{fv.name}.q"))
            v = self._helper("dequantize", iv, {}, fv, None)
        else:
            v = self._helper("dequantize", iv, {}, fv, "f")
        self._float[id(fv)] = v
        return v

    def _helper(self, op: str, x: Value, attrs: dict, fv: Value, suffix: str | None) -> Value:
        """A quantize/dequantize node for float value ``fv`` (its output ``fv.name.suffix``,
        or ``fv.name`` itself when ``suffix`` is None)."""
        name = fv.name if suffix is None else self.aux_name(f"{fv.name}.{suffix}")
        loc = fv.producer.loc or fv.producer.name if fv.producer is not None else fv.name
        node = self.dst.add_node(op, [x], attrs, name=self.aux_node_name(f"{fv.name}.{op}"),
                                 loc=loc, output_names=[name])
        return node.outputs[0]

    # -- nodes --------------------------------------------------------------------------------
    def emit(self, node: Node, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any],
             scales: Sequence[QuantParams | None] = (), as_float: bool = False) -> Node:
        """Add ``op`` replacing float ``node``: same name, location and output names; output
        ``i`` gets quantization ``scales[i]`` (when given) and becomes the integer (or, with
        ``as_float``, the float) version of the node's output ``i``."""
        new = self.dst.add_node(op, inputs, attrs, name=node.name, loc=node.loc,
                                output_names=[v.name for v in node.outputs],
                                num_outputs=len(node.outputs))
        for i, (fv, v) in enumerate(zip(node.outputs, new.outputs, strict=True)):
            if i < len(scales) and scales[i] is not None:
                self.dst.set_quant(v, scales[i])
            if as_float or fv.dtype not in FLOAT_DTYPES:
                self._float[id(fv)] = v
            else:
                self._int[id(fv)] = v
        return new

    def fallback(self, node: Node, reason: str) -> None:
        """Keep ``node`` as a float op on dequantized inputs (it runs on the CPU)."""
        inputs = [None if v is None else self.as_float(v) for v in node.inputs]
        scales = [v.type.quant for v in node.outputs]
        self.emit(node, node.op, inputs, node.attrs, scales, as_float=True)
        self.cpu_nodes.append(node.name)
        self.explain(node, reason)

    def int_value(self, fv: Value) -> Value:
        return self._int[id(fv)]

    def finish(self) -> None:
        """Set the graph outputs and drop what no output needs (e.g. the sigmoid of a SiLU)."""
        outs = []
        for fv in self.src.outputs:
            iv = self._int.get(id(fv))
            if fv.name in self.high_precision and iv is not None and iv.dtype == "i32":
                outs.append(iv)
            else:
                outs.append(self.as_float(fv))
        self.dst.set_outputs(outs)
        live = {id(v) for v in outs}
        for node in reversed(list(self.dst.nodes)):
            if any(v.uses or id(v) in live for v in node.outputs):
                continue
            self.dst.remove_node(node)
            if node.name in self.cpu_nodes:
                self.cpu_nodes.remove(node.name)
        for v in self.dst.constant_values():
            if not v.uses and id(v) not in live:
                self.dst.remove_value(v)
