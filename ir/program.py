"""The program: a Graph as JSON-ready data plus its constant arrays (the body of an .hbm).

``encode_program(graph)`` gives ``(program, constants)``: ``program`` is plain JSON data (dicts,
lists, strings, ints, floats) describing the graph exactly, ``constants`` the constant arrays by
name (C-contiguous, little-endian). ``decode_program(program, constants)`` rebuilds the Graph
through the Graph API, so every node's output types come from the op registry's inference and
are checked against the recorded ones; ``to_text(decode_program(*encode_program(g))) ==
to_text(g)``. The schema (``docs/hbm-format.md`` has the full form)::

    {"version": 2, "name": "main",
     "inputs": [{"name": "x", "type": TYPE}], "consts": [{"name": "w", "type": TYPE}],
     "nodes": [{"op": "qconv", "name": "conv1", "loc": "...", "attrs": {...},
                "inputs": ["x", "w", null], "outputs": [{"name": "y", "type": TYPE}]}],
     "outputs": ["y"], "meta": {...}}
    TYPE = {"dtype": "i8", "shape": [1, 3], "layout": "NHWC",
            "quant": {"scale": [0.5], "axis": 0, "zero_point": [0]}}

``layout``, ``quant``, ``loc``, quant ``axis`` and ``zero_point`` are omitted when unset. A scale
list longer than 8 (per-channel) is the string ``"f64:<base64 of little-endian doubles>"``. Floats
are JSON numbers (``repr``, exact for a double) except non-finite ones, which are strings:
``"inf"``, ``"-inf"`` and ``"nan(0x<16 hex digits>)"`` (the bits of the double). ``meta`` keeps
the ``graph.meta`` entries that are plain JSON data. Every malformed field raises InputError
naming ``where`` and the JSON path. numpy, json and the stdlib only: nothing here imports lark.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from hbc.errors import InputError

from .graph import Graph, Value
from .registry import FLOAT, FLOATS, INT, INTS, STR, get_op
from .types import DTYPES, LAYOUTS, QuantParams, TensorType

#: 2: qconv's residual is rescaled to the accumulator by its own shift (input ``sr``); a
#: version 1 program meant the older rule, so it is refused rather than run differently
PROGRAM_VERSION = 2
#: scale lists longer than this are packed as base64 doubles (see encode_scales)
PACKED_SCALES = 8


# -- encoding --------------------------------------------------------------------------------
def encode_float(x: float) -> float | str:
    """A double as JSON data: itself when finite, else ``"inf"``, ``"-inf"``, ``"nan(0x..)"``."""
    x = float(x)
    if math.isfinite(x):
        return x
    if x != x:
        return f"nan(0x{struct.unpack('<Q', struct.pack('<d', x))[0]:016x})"
    return "inf" if x > 0 else "-inf"


def encode_scales(scales: tuple[float, ...]) -> list | str:
    """Scales as JSON data: a list of numbers, or for long per-channel lists the string
    ``"f64:<base64 of the little-endian doubles>"`` (exact, and about half the size)."""
    if len(scales) <= PACKED_SCALES:
        return [encode_float(s) for s in scales]
    return "f64:" + base64.b64encode(np.asarray(scales, dtype="<f8").tobytes()).decode("ascii")


def encode_type(t: TensorType) -> dict[str, Any]:
    """The JSON form of a tensor type."""
    out: dict[str, Any] = {"dtype": t.dtype, "shape": list(t.shape)}
    if t.layout is not None:
        out["layout"] = t.layout
    if t.quant is not None:
        q: dict[str, Any] = {"scale": encode_scales(t.quant.scale)}
        if t.quant.axis is not None:
            q["axis"] = t.quant.axis
        if t.quant.zero_point is not None:
            q["zero_point"] = list(t.quant.zero_point)
        out["quant"] = q
    return out


def _encode_attr(kind: str, value: Any) -> Any:
    if value is None or kind in (INT, STR):
        return value
    if kind == INTS:
        return [int(v) for v in value]
    if kind == FLOAT:
        return encode_float(value)
    assert kind == FLOATS, kind
    return [encode_float(v) for v in value]


def encode_program(graph: Graph) -> tuple[dict, dict[str, np.ndarray]]:
    """``graph`` as JSON-ready data plus its constant arrays by name (C-contiguous,
    little-endian, in the graph's constant order)."""
    constants: dict[str, np.ndarray] = {}
    consts = []
    for v in graph.constant_values():
        data = graph.constants.get(v.name)
        if data is None:
            raise InputError(f"graph '{graph.name}': constant %{v.name} has no data")
        arr = np.asarray(data, order="C")  # ascontiguousarray would make 0-d arrays 1-d
        if arr.dtype.byteorder == ">":
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        constants[v.name] = arr
        consts.append({"name": v.name, "type": encode_type(v.type)})
    nodes = []
    for n in graph.nodes:
        opdef = get_op(n.op)
        entry: dict[str, Any] = {
            "op": n.op, "name": n.name,
            "attrs": {a.name: _encode_attr(a.kind, n.attrs.get(a.name)) for a in opdef.attrs
                      if a.name in n.attrs},
            "inputs": [None if v is None else v.name for v in n.inputs],
            "outputs": [{"name": v.name, "type": encode_type(v.type)} for v in n.outputs],
        }
        if n.loc:
            entry["loc"] = n.loc
        nodes.append(entry)
    program = {
        "version": PROGRAM_VERSION,
        "name": graph.name,
        "inputs": [{"name": v.name, "type": encode_type(v.type)} for v in graph.inputs],
        "consts": consts,
        "nodes": nodes,
        "outputs": [v.name for v in graph.outputs],
        "meta": json_meta(graph.meta),
    }
    return program, constants


class _NotJson(Exception):
    pass


def _plain(x: Any) -> Any:
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        if not math.isfinite(x):
            raise _NotJson
        return x
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":
        return _plain(x.item())
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, dict) and all(isinstance(k, str) for k in x):
        return {k: _plain(v) for k, v in x.items()}
    raise _NotJson


def json_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``graph.meta`` that are plain JSON data (tuples become lists; entries
    holding other objects or non-finite floats are left out)."""
    out = {}
    for key, value in meta.items():
        try:
            out[key] = _plain(value)
        except _NotJson:
            continue
    return out


# -- IO descriptors --------------------------------------------------------------------------
def _quant_desc(value: Value) -> dict[str, Any]:
    q = value.type.quant
    assert q is not None
    scale: Any = encode_float(q.scale[0]) if q.axis is None else [encode_float(s)
                                                                  for s in q.scale]
    return {"axis": q.axis, "dtype": value.dtype, "scale": scale, "value": value.name}


def io_descriptors(graph: Graph) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) descriptors of a lowered graph, for the .hbm meta and the runtime.

    An input's ``quant`` describes the quantize node that is the input's only user (its output
    is where integer data may be fed directly); an output's describes the integer value its
    final dequantize reads. ``quant`` is None when there is no such boundary.
    """
    input_types = graph.meta.get("input_types")
    input_types = input_types if isinstance(input_types, dict) else {}
    inputs = []
    for v in graph.inputs:
        quant = None
        if len(v.uses) == 1 and v.uses[0][0].op == "quantize":
            out = v.uses[0][0].outputs[0]
            if out.type.quant is not None:
                quant = _quant_desc(out)
        inputs.append({"dtype": v.dtype, "input_type": str(input_types.get(v.name, "featuremap")),
                       "layout": v.type.layout, "name": v.name, "quant": quant,
                       "shape": list(v.shape)})
    outputs = []
    for v in graph.outputs:
        quant = None
        node = v.producer
        if node is not None and node.op == "dequantize" and node.inputs[0] is not None \
                and node.inputs[0].type.quant is not None:
            quant = _quant_desc(node.inputs[0])
        outputs.append({"dtype": v.dtype, "layout": v.type.layout, "name": v.name,
                        "quant": quant, "shape": list(v.shape)})
    return inputs, outputs


# -- decoding --------------------------------------------------------------------------------
class JsonReader:
    """Typed access to parsed JSON data: each accessor checks one field and raises ``error``
    (InputError or a subclass) naming ``where`` and the field's JSON path."""

    def __init__(self, where: str, error: type[InputError] = InputError) -> None:
        self.where = where
        self.error = error

    def fail(self, path: str, what: str) -> InputError:
        return self.error(f"{self.where}: {path}: {what}")

    def get(self, obj: dict, key: str, path: str, *, optional: bool = False) -> Any:
        if key not in obj:
            if optional:
                return None
            raise self.fail(path, f"missing field '{key}'")
        return obj[key]

    def dict(self, x: Any, path: str) -> dict:
        if not isinstance(x, dict):
            raise self.fail(path, f"expected an object, got {_kind(x)}")
        return x

    def list(self, x: Any, path: str) -> list:
        if not isinstance(x, list):
            raise self.fail(path, f"expected a list, got {_kind(x)}")
        return x

    def str(self, x: Any, path: str, *, empty: bool = True) -> str:
        if not isinstance(x, str) or (not empty and not x):
            raise self.fail(path, f"expected a{'' if empty else ' non-empty'} string, "
                                  f"got {_kind(x)}")
        return x

    def int(self, x: Any, path: str) -> int:
        if not isinstance(x, int) or isinstance(x, bool):
            raise self.fail(path, f"expected an int, got {_kind(x)}")
        return x

    def ints(self, x: Any, path: str) -> list[int]:
        if not isinstance(x, list):
            raise self.fail(path, f"expected a list of ints, got {_kind(x)}")
        for i, v in enumerate(x):
            if not isinstance(v, int) or isinstance(v, bool):
                raise self.fail(f"{path}[{i}]", f"expected an int, got {_kind(v)}")
        return x

    def float(self, x: Any, path: str) -> float:
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return float(x)
        if x == "inf":
            return math.inf
        if x == "-inf":
            return -math.inf
        if isinstance(x, str) and len(x) == 23 and x.startswith("nan(0x") and x.endswith(")"):
            try:
                value = struct.unpack("<d", struct.pack("<Q", int(x[6:22], 16)))[0]
            except ValueError:
                pass
            else:
                if value != value:
                    return value
        raise self.fail(path, f"expected a number (or \"inf\", \"-inf\", \"nan(0x..)\"), "
                              f"got {_kind(x)}")

    def floats(self, x: Any, path: str) -> list[float]:
        if not isinstance(x, list):
            raise self.fail(path, f"expected a list of numbers, got {_kind(x)}")
        return [self.float(v, f"{path}[{i}]") for i, v in enumerate(x)]

    def scales(self, x: Any, path: str) -> list[float]:
        """A list of numbers, or ``"f64:<base64>"`` (see :func:`encode_scales`)."""
        if not isinstance(x, str):
            return self.floats(x, path)
        if not x.startswith("f64:"):
            raise self.fail(path, "expected a list of numbers or 'f64:<base64>'")
        try:
            raw = base64.b64decode(x[4:].encode("ascii"), validate=True)
        except (binascii.Error, UnicodeEncodeError):
            raise self.fail(path, "malformed base64 in 'f64:<base64>'") from None
        if len(raw) % 8:
            raise self.fail(path, f"{len(raw)} bytes of packed doubles, not a multiple of 8")
        return [float(v) for v in np.frombuffer(raw, dtype="<f8")]

    def type(self, x: Any, path: str) -> TensorType:
        t = self.dict(x, path)
        dtype = self.str(self.get(t, "dtype", path), f"{path}.dtype")
        if dtype not in DTYPES:
            raise self.fail(f"{path}.dtype", f"unknown dtype '{dtype}'")
        shape = self.ints(self.get(t, "shape", path), f"{path}.shape")
        if any(d < 0 for d in shape):
            raise self.fail(f"{path}.shape", f"negative dimension in {shape}")
        layout = self.get(t, "layout", path, optional=True)
        if layout is not None and layout not in LAYOUTS:
            raise self.fail(f"{path}.layout", f"expected one of {', '.join(LAYOUTS)}, "
                                              f"got {_kind(layout)}")
        quant = None
        q = self.get(t, "quant", path, optional=True)
        if q is not None:
            q = self.dict(q, f"{path}.quant")
            scale = self.scales(self.get(q, "scale", f"{path}.quant"), f"{path}.quant.scale")
            axis = q.get("axis")
            if axis is not None:
                self.int(axis, f"{path}.quant.axis")
            zp = q.get("zero_point")
            if zp is not None:
                self.ints(zp, f"{path}.quant.zero_point")
            try:
                quant = QuantParams(tuple(scale), axis, None if zp is None else tuple(zp))
            except InputError as e:
                raise self.fail(f"{path}.quant", str(e)) from None
        return TensorType(dtype, tuple(shape), layout, quant)

    def attr(self, kind: str, x: Any, path: str) -> Any:
        if x is None:
            return None
        if kind == INT:
            return self.int(x, path)
        if kind == FLOAT:
            return self.float(x, path)
        if kind == STR:
            return self.str(x, path)
        if kind == INTS:
            return self.ints(x, path)
        return self.floats(x, path)


def _arity(lo: int, hi: int) -> str:
    if hi < 0:
        return f"at least {lo}"
    return str(lo) if lo == hi else f"{lo} to {hi}"


def _kind(x: Any) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return f"boolean {str(x).lower()}"
    if isinstance(x, (int, float)):
        return f"number {x!r}"
    if isinstance(x, str):
        return f"string {x[:40]!r}"
    return "a list" if isinstance(x, list) else "an object" if isinstance(x, dict) else \
        type(x).__name__


def decode_program(program: dict, constants: Mapping[str, np.ndarray], *,
                   where: str = "program") -> Graph:
    """Rebuild the Graph ``encode_program`` described. ``constants`` are used as given (no
    copies). Unknown top-level keys are ignored (a later minor format may add some)."""
    r = JsonReader(where)
    p = r.dict(program, "program")
    version = r.int(r.get(p, "version", "program"), "version")
    if version != PROGRAM_VERSION:
        raise r.fail("version", f"program version {version} is not supported (this hbc reads "
                                f"version {PROGRAM_VERSION}, whose integer semantics differ); "
                                "recompile the model")
    g = Graph(r.str(r.get(p, "name", "program"), "name", empty=False))
    for i, e in enumerate(r.list(r.get(p, "inputs", "program"), "inputs")):
        path = f"inputs[{i}]"
        e = r.dict(e, path)
        name = r.str(r.get(e, "name", path), f"{path}.name", empty=False)
        t = r.type(r.get(e, "type", path), f"{path}.type")
        try:
            g.add_input(name, t)
        except InputError as err:
            raise r.fail(path, str(err)) from None
    for i, e in enumerate(r.list(r.get(p, "consts", "program"), "consts")):
        path = f"consts[{i}]"
        e = r.dict(e, path)
        name = r.str(r.get(e, "name", path), f"{path}.name", empty=False)
        t = r.type(r.get(e, "type", path), f"{path}.type")
        if name not in constants:
            raise r.fail(path, f"constant %{name} has no data")
        try:
            g.add_constant(name, constants[name], exact=True, type_=t)
        except InputError as err:
            raise r.fail(path, str(err)) from None
    for i, e in enumerate(r.list(r.get(p, "nodes", "program"), "nodes")):
        _decode_node(r, g, r.dict(e, f"nodes[{i}]"), f"nodes[{i}]")
    outputs = []
    for i, name in enumerate(r.list(r.get(p, "outputs", "program"), "outputs")):
        name = r.str(name, f"outputs[{i}]")
        if not g.has_value(name):
            raise r.fail(f"outputs[{i}]", f"%{name} is not defined")
        outputs.append(g.value(name))
    g.set_outputs(outputs)
    meta = p.get("meta")
    g.meta = _decode_meta(r, meta) if meta is not None else {}
    return g


def _decode_meta(r: JsonReader, meta: Any) -> dict:
    """The program's graph.meta, with the entries passes and tools read checked for shape
    (the rest is kept as it is: free-form JSON)."""
    meta = dict(r.dict(meta, "meta"))
    lowered = meta.get("lowered")
    if lowered is not None:
        _strs(r, r.dict(lowered, "meta.lowered").get("int16_values", []),
              "meta.lowered.int16_values")
    for key in ("cpu_nodes", "cpu_placed", "int16_values"):
        if key in meta:
            _strs(r, meta[key], f"meta.{key}")
    if "input_types" in meta:
        for k, v in r.dict(meta["input_types"], "meta.input_types").items():
            r.str(v, f"meta.input_types.{k}")
    if "calibration" in meta:
        r.dict(meta["calibration"], "meta.calibration")
    return meta


def _strs(r: JsonReader, x: Any, path: str) -> list[str]:
    return [r.str(v, f"{path}[{i}]") for i, v in enumerate(r.list(x, path))]


def _decode_node(r: JsonReader, g: Graph, e: dict, path: str) -> None:
    """Add one node of the program (its inputs must be defined already: the graph's values
    are exactly those of the inputs, constants and earlier nodes)."""
    op = r.str(r.get(e, "op", path), f"{path}.op")
    try:
        opdef = get_op(op)
    except InputError as err:
        raise r.fail(f"{path}.op", str(err)) from None
    name = r.str(r.get(e, "name", path), f"{path}.name", empty=False)
    loc = r.str(e.get("loc", ""), f"{path}.loc")
    inputs = []
    for j, x in enumerate(r.list(r.get(e, "inputs", path), f"{path}.inputs")):
        if x is None:
            inputs.append(None)
            continue
        x = r.str(x, f"{path}.inputs[{j}]")
        if not g.has_value(x):
            raise r.fail(f"{path}.inputs[{j}]", f"%{x} is not defined before this node")
        inputs.append(g.value(x))
    attrs = {}
    for key, x in r.dict(r.get(e, "attrs", path), f"{path}.attrs").items():
        try:
            kind = opdef.attr(key).kind
        except KeyError:
            known = ", ".join(a.name for a in opdef.attrs) or "none"
            raise r.fail(f"{path}.attrs.{key}",
                         f"op '{op}' has no such attribute (known: {known})") from None
        attrs[key] = r.attr(kind, x, f"{path}.attrs.{key}")
    outs = r.list(r.get(e, "outputs", path), f"{path}.outputs")
    names, types = [], []
    for j, o in enumerate(outs):
        o = r.dict(o, f"{path}.outputs[{j}]")
        names.append(r.str(r.get(o, "name", f"{path}.outputs[{j}]"), f"{path}.outputs[{j}].name",
                           empty=False))
        types.append(r.type(r.get(o, "type", f"{path}.outputs[{j}]"), f"{path}.outputs[{j}].type"))
    lo, hi = opdef.input_arity()
    if len(inputs) < lo or (hi >= 0 and len(inputs) > hi):
        raise r.fail(f"{path}.inputs", f"op '{op}' takes {_arity(lo, hi)} inputs, got "
                                       f"{len(inputs)}")
    if None in inputs[:lo]:
        j = inputs.index(None)
        raise r.fail(f"{path}.inputs[{j}]", f"input '{opdef.inputs[j]}' of op '{op}' is "
                                            "required, got null")
    lo, hi = opdef.output_arity()
    if not names or len(names) < lo or (hi >= 0 and len(names) > hi):
        raise r.fail(f"{path}.outputs", f"op '{op}' cannot have {len(names)} outputs")
    try:
        node = g.add_node(op, inputs, attrs, name=name, loc=loc, output_names=names,
                          exact_names=True)
    except InputError as err:  # InferError included: bad attributes or input types
        raise r.fail(path, str(err)) from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as err:
        # an op's inference meeting inputs it never expects (only a damaged program gets here)
        raise r.fail(path, f"{op}: shape inference failed ({type(err).__name__}: {err})"
                     ) from None
    if len(node.outputs) != len(names):
        raise r.fail(f"{path}.outputs", f"{op} gives {len(node.outputs)} outputs, the program "
                                        f"lists {len(names)}")
    for j, (v, t) in enumerate(zip(node.outputs, types, strict=True)):
        # Quantization is recorded (by calibration, lowering), not checked here: the verifier
        # compares it where inference gives one.
        inferred = v.type
        if t.with_(quant=None) != inferred.with_(quant=None):
            raise r.fail(f"{path}.outputs[{j}].type", f"recorded as {t.describe()} but "
                                                     f"inference gives {inferred.describe()}")
        if t.quant != inferred.quant:
            g.set_quant(v, t.quant)


__all__ = ["PROGRAM_VERSION", "JsonReader", "decode_program", "encode_float", "encode_program",
           "encode_type", "io_descriptors", "json_meta"]
