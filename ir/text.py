"""The .hbir printer: ``to_text(graph)`` gives the canonical text form of a Graph.

The text is canonical: one way to print each graph, so that
``to_text(from_text(to_text(g), constants=g.constants)) == to_text(g)``. In order:

- the header ``hbir 1`` (the format version), then ``graph @name(%in: TYPE, ...) {``;
- constants, in value order: ``%w: TYPE = const`` when the data lives out of line (a sidecar
  ``.npz``, looked up by name), or ``%k: i64[2] = const [1, -1]`` when it has at most
  ``INLINE_MAX`` elements (a flat list; a bare scalar for rank 0);
- nodes in graph order: ``%a, %b: T1, T2 = op(%x, _, %y) {attr=value} name("n") loc("l")``,
  attributes in the op's declared order with defaults omitted, ``_`` for an absent input,
  ``name(...)`` only when the node name differs from its first output's, ``loc(...)`` only when
  non-empty and different from the node name;
- ``return %y, ...`` and ``}``.

Types print as ``f32[1,3,32,32] NCHW q(scale=0.5)`` (``q(scale=[...], axis=0)`` per channel,
``, zero_point=...`` when non-zero). Floats print so that they parse back bit-exactly: Python
floats (attributes, scales, f64 data) with ``repr``, other float data with the shortest string
that round-trips in its dtype (numpy's for f32/f16, a search for bf16/f8), and a NaN other than
the dtype's default one as ``nan(0xBITS)`` (``-nan`` for the default NaN with the sign bit set).
"""

from __future__ import annotations

import functools
import json
import re
import struct
from typing import Any

import numpy as np

from .graph import Graph, Node, Value
from .registry import FLOAT, FLOATS, INT, INTS, STR, get_op
from .types import QuantParams, TensorType, dtype_of

FORMAT_VERSION = 1
#: Constants with at most this many elements print inline; bigger ones live out of line.
INLINE_MAX = 8

_F64 = np.dtype(np.float64)
_BARE_NAME = re.compile(r"[A-Za-z0-9_.\-/:]*[A-Za-z0-9_.\-/]")

_UINT_OF_SIZE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
_NATIVE_FLOATS = (np.dtype(np.float32), np.dtype(np.float16))


def value_kind(dtype: np.dtype) -> str:
    """'b' (bool), 'i' (integer) or 'f' (float) for any hbir dtype, ml_dtypes ones included."""
    if dtype == np.bool_:
        return "b"
    return "i" if dtype_of(dtype)[0] in "iu" else "f"


def bits_of(array: np.ndarray) -> np.ndarray:
    """The raw bits of a (contiguous) array as unsigned integers of the same width."""
    return array.view(_UINT_OF_SIZE[array.dtype.itemsize])


@functools.cache
def default_nan_bits(dtype: np.dtype) -> int:
    """The bits of the NaN a float dtype gets from ``np.nan``: printed as plain ``nan``."""
    with np.errstate(invalid="ignore"):
        return int(bits_of(np.array([np.nan]).astype(dtype))[0])


def is_inline(array: np.ndarray) -> bool:
    """True when a constant is printed inline (so it needs no sidecar data)."""
    return int(np.size(array)) <= INLINE_MAX


def format_name(name: str, sigil: str = "%") -> str:
    """``%name``, or ``%"name"`` (a JSON string) when the name is not a bare identifier."""
    if _BARE_NAME.fullmatch(name):
        return sigil + name
    return sigil + json.dumps(name, ensure_ascii=False)


def format_nan_bits(bits: int, dtype: np.dtype) -> str:
    """The text of a NaN given its bit pattern in ``dtype``."""
    default = default_nan_bits(dtype)
    if bits == default:
        return "nan"
    if bits == default | (1 << (8 * dtype.itemsize - 1)):
        return "-nan"
    return f"nan(0x{bits:0{2 * dtype.itemsize}x})"


def format_float(x: float) -> str:
    """A Python float (a double) as text that parses back bit-exactly."""
    if x != x:
        return format_nan_bits(struct.unpack("<Q", struct.pack("<d", x))[0], _F64)
    return repr(x)


def _shortest(x: float, dtype: np.dtype) -> str:
    # ml_dtypes floats (bf16, f8...) have no shortest repr of their own: search for the shortest
    # %g form that converts back to the same bits (x itself is exact as a double, so 17 digits
    # always do).
    want = bits_of(np.array([x]).astype(dtype))[0]
    for digits in range(1, 17):
        text = repr(float(f"{x:.{digits}g}"))
        if bits_of(np.array([float(text)]).astype(dtype))[0] == want:
            return text
    return repr(x)


def format_array(array: np.ndarray) -> str:
    """Inline constant data: a bare scalar for rank 0, else a flat list ``[a, b, ...]``."""
    flat = np.ascontiguousarray(array).reshape(-1)
    dtype = flat.dtype
    kind = value_kind(dtype)
    if kind == "b":
        items = ["true" if v else "false" for v in flat.tolist()]
    elif kind == "i":
        items = [str(int(v)) for v in flat.tolist()]
    elif dtype == _F64:
        items = [repr(v) for v in flat.tolist()]
    elif dtype in _NATIVE_FLOATS:  # numpy's str() is the shortest string that round-trips
        items = [str(v) for v in flat]
    else:
        items = [_shortest(v, dtype) for v in flat.tolist()]
    if kind == "f":
        bits = bits_of(flat)
        with np.errstate(invalid="ignore"):  # signaling NaNs
            nans = np.flatnonzero(np.isnan(flat)).tolist()
        for i in nans:
            items[i] = format_nan_bits(int(bits[i]), dtype)
    if array.ndim == 0:
        return items[0]
    return "[" + ", ".join(items) + "]"


def format_quant(q: QuantParams) -> str:
    if q.axis is None:
        text = f"q(scale={format_float(q.scale[0])}"
        if q.zero_point is not None:
            text += f", zero_point={q.zero_point[0]}"
    else:
        text = f"q(scale=[{', '.join(map(format_float, q.scale))}], axis={q.axis}"
        if q.zero_point is not None:
            text += f", zero_point=[{', '.join(map(str, q.zero_point))}]"
    return text + ")"


def format_type(t: TensorType) -> str:
    """``f32[1,3,32,32] NCHW q(scale=0.5)``."""
    text = f"{t.dtype}[{','.join(map(str, t.shape))}]"
    if t.layout is not None:
        text += " " + t.layout
    if t.quant is not None:
        text += " " + format_quant(t.quant)
    return text


def format_attr(kind: str, value: Any) -> str:
    if kind == INT:
        return str(int(value))
    if kind == FLOAT:
        return format_float(float(value))
    if kind == STR:
        return json.dumps(value, ensure_ascii=False)
    if kind == INTS:
        return "[" + ", ".join(str(int(v)) for v in value) + "]"
    if kind == FLOATS:
        return "[" + ", ".join(format_float(float(v)) for v in value) + "]"
    raise ValueError(f"unknown attribute kind {kind!r}")


class _Printer:
    def __init__(self, graph: Graph) -> None:
        self.graph = graph
        self._types: dict[TensorType, str] = {}

    def type(self, t: TensorType) -> str:
        text = self._types.get(t)
        if text is None:
            text = self._types[t] = format_type(t)
        return text

    def run(self) -> str:
        g = self.graph
        params = ", ".join(f"{format_name(v.name)}: {self.type(v.type)}" for v in g.inputs)
        lines = [f"hbir {FORMAT_VERSION}", f"graph {format_name(g.name, '@')}({params}) {{"]
        lines.extend(self.constant(v) for v in g.constant_values())
        lines.extend(self.node(n) for n in g.nodes)
        lines.append("  return " + ", ".join(format_name(v.name) for v in g.outputs)
                     if g.outputs else "  return")
        lines.append("}")
        return "\n".join(lines) + "\n"

    def constant(self, v: Value) -> str:
        head = f"  {format_name(v.name)}: {self.type(v.type)} = const"
        data = self.graph.constants.get(v.name)
        if data is not None and is_inline(data):
            return f"{head} {format_array(data)}"
        return head

    def node(self, n: Node) -> str:
        if not n.outputs:
            raise ValueError(f"node '{n.name}' has no outputs; .hbir cannot print it")
        outs = ", ".join(format_name(v.name) for v in n.outputs)
        types = ", ".join(self.type(v.type) for v in n.outputs)
        args = ", ".join("_" if v is None else format_name(v.name) for v in n.inputs)
        text = f"  {outs}: {types} = {n.op}({args})"
        attrs = self.attrs(n)
        if attrs:
            text += " {" + attrs + "}"
        if n.name != n.outputs[0].name:
            text += f" name({json.dumps(n.name, ensure_ascii=False)})"
        if n.loc and n.loc != n.name:
            text += f" loc({json.dumps(n.loc, ensure_ascii=False)})"
        return text

    def attrs(self, n: Node) -> str:
        opdef = get_op(n.op)
        parts = []
        for a in opdef.attrs:
            value = n.attrs.get(a.name)
            if value is None or opdef.is_default(a.name, value):
                continue
            parts.append(f"{a.name}={format_attr(a.kind, value)}")
        return ", ".join(parts)


def to_text(graph: Graph) -> str:
    """The canonical .hbir text of ``graph`` (out-of-line constant data is not included)."""
    return _Printer(graph).run()
