"""ONNX importer: an ``onnx.ModelProto`` (or file) to an IR :class:`Graph`.

The importer owns what is common to every op: reading and validating the file, graph inputs with
static shapes (``input_shapes`` fills dynamic dimensions), initializers and ``Constant`` nodes,
folding of nodes whose inputs are all constant (so static-shape subgraphs such as
Shape->Gather->Concat->Reshape disappear), naming, and error collection: every unsupported node
is reported in one error. Per-op mapping lives in ``onnx_ops/``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hbc.errors import InputError, ResourceLimitError, UnsupportedError
from hbc.ir.graph import Graph, Value, legal_name
from hbc.ir.interpret import evaluate_constant
from hbc.ir.limits import check_shape
from hbc.ir.registry import InferError
from hbc.ir.types import DTYPES, TensorType, dtype_of

from .onnx_ops import Converter, load_all


def _onnx_dtypes() -> dict[int, str]:
    out = {}
    for code in onnx.TensorProto.DataType.values():
        try:
            out[code] = dtype_of(helper.tensor_dtype_to_np_dtype(code))
        except Exception:  # no numpy or hbir equivalent (string, complex, undefined)
            continue
    return out


#: ONNX element type -> hbir dtype name.
ONNX_DTYPES: dict[int, str] = _onnx_dtypes()



class ImportContext:
    """What a converter sees: the graph being built and the ONNX-name -> Value bindings."""

    def __init__(self, graph: Graph, opset: int, source: str) -> None:
        self.graph = graph
        self.opset = opset
        self.source = source
        self.env: dict[str, Value] = {}

    # -- reading the ONNX node ----------------------------------------------------------------
    @staticmethod
    def attrs(node: onnx.NodeProto) -> dict[str, Any]:
        """The node's attributes as Python values (strings decoded)."""
        out: dict[str, Any] = {}
        for a in node.attribute:
            v = helper.get_attribute_value(a)
            try:
                if isinstance(v, bytes):
                    v = v.decode()
                elif isinstance(v, list) and v and isinstance(v[0], bytes):
                    v = [s.decode() for s in v]
            except UnicodeDecodeError:
                raise UnsupportedError(f"{node.op_type} node '{node.name or node.op_type}': "
                                       f"attribute '{a.name}' is not valid UTF-8 text") from None
            if isinstance(v, onnx.TensorProto):
                v = _tensor_array(v, f"{node.op_type} node '{node.name or node.op_type}': "
                                     f"attribute '{a.name}'")
            out[a.name] = v
        return out

    def has_input(self, node: onnx.NodeProto, i: int) -> bool:
        return i < len(node.input) and node.input[i] != ""

    def input(self, node: onnx.NodeProto, i: int) -> Value | None:
        """The Value bound to input ``i`` (None when absent)."""
        if not self.has_input(node, i):
            return None
        return self.env[node.input[i]]

    def type(self, node: onnx.NodeProto, i: int) -> TensorType:
        v = self.input(node, i)
        if v is None:
            self.unsupported(node, f"input {i} is required")
        return v.type

    def const(self, node: onnx.NodeProto, i: int, default: Any = None) -> np.ndarray | None:
        """The value of input ``i``, which must be a constant (``default`` when absent)."""
        v = self.input(node, i)
        if v is None:
            return default
        if not v.is_const:
            self.unsupported(
                node,
                f"input {i} ('{node.input[i]}') must be a constant known at compile time; "
                "hbc compiles static graphs (freeze it, or make it an initializer)",
            )
        return self.graph.constants[v.name]

    def where(self, node: onnx.NodeProto) -> str:
        return node.name or (node.output[0] if node.output else node.op_type)

    def unsupported(self, node: onnx.NodeProto, what: str) -> NoReturn:
        """Abort this node's conversion with a message naming it."""
        raise UnsupportedError(f"{node.op_type} node '{self.where(node)}': {what}")

    # -- building ------------------------------------------------------------------------------
    def emit(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: Mapping[str, Any] | None = None,
        *,
        node: onnx.NodeProto,
        outputs: Sequence[str] | None = None,
        num_outputs: int | None = None,
    ) -> list[Value]:
        """Add IR op ``op`` for ONNX ``node`` and bind ONNX output names to its results.

        ``outputs`` lists the ONNX names to bind (default: the node's outputs; ``[]`` for an
        intermediate). When every input is a constant and the op is foldable, the result is
        computed now and becomes a constant.
        """
        names = list(node.output) if outputs is None else list(outputs)
        if num_outputs is None and outputs is None:
            num_outputs = len(names)
        present = [v for v in inputs if v is not None]
        base = self.where(node) if outputs is None else (names[0] if names else self.where(node))
        try:
            if present and all(v.is_const for v in present):
                values = self._fold(op, inputs, attrs or {}, names, num_outputs, base)
                if values is not None:
                    return values
            ir = self.graph.add_node(
                op, inputs, dict(attrs or {}), name=_legal(base), loc=self.where(node),
                output_names=[_legal(n) if n else _legal(base) for n in names] or None,
                num_outputs=num_outputs,
            )
        except InferError as e:
            raise UnsupportedError(f"{node.op_type} node '{self.where(node)}': {e}") from None
        for n, v in zip(names, ir.outputs, strict=False):
            if n:
                self.env[n] = v
        return ir.outputs

    def _fold(self, op, inputs, attrs, names, num_outputs, base) -> list[Value] | None:
        folded = evaluate_constant(op, inputs, attrs, self.graph.constants, num_outputs)
        if folded is None:
            return None
        values = []
        for i, (t, arr) in enumerate(folded):
            name = names[i] if i < len(names) and names[i] else f"{base}.{i}"
            v = self.graph.add_constant(_legal(name), arr, type_=t)
            if i < len(names) and names[i]:
                self.env[names[i]] = v
            values.append(v)
        return values

    def bind(self, onnx_name: str, value: Value) -> None:
        """Make ONNX tensor ``onnx_name`` refer to an existing value (no new node)."""
        if onnx_name:
            self.env[onnx_name] = value

    def constant(self, array: np.ndarray, name: str) -> Value:
        """A new constant value (the name is made unique)."""
        return self.graph.add_constant(_legal(name), np.asarray(array))

    def bind_const(self, onnx_name: str, array: np.ndarray) -> Value:
        v = self.constant(array, onnx_name)
        self.bind(onnx_name, v)
        return v


_legal = legal_name


# ---------------------------------------------------------------------------------------------
def read_model(src: str | os.PathLike | onnx.ModelProto | bytes) -> tuple[onnx.ModelProto, str]:
    """Load and validate an ONNX model; InputError naming the file on any problem."""
    if isinstance(src, onnx.ModelProto):
        return src, src.graph.name or "<model>"
    if isinstance(src, bytes):
        label = "<bytes>"
        data = src
    else:
        path = Path(src)
        label = str(path)
        if not path.exists():
            raise InputError(f"{label}: no such file")
        if path.is_dir():
            raise InputError(f"{label}: is a directory, expected an .onnx file")
        data = path.read_bytes()
    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as e:  # protobuf raises its own DecodeError types
        raise InputError(f"{label}: not a valid ONNX model (protobuf parse failed: {e})") from None
    _check_strings(model, label)
    if not model.graph.node and not model.graph.output:
        raise InputError(f"{label}: not an ONNX model (no graph found; is the file truncated "
                         "or of another format?)")
    if not isinstance(src, bytes) and any(
        t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
    ):
        try:
            onnx.load_external_data_for_model(model, str(Path(src).parent))
        except Exception as e:
            raise InputError(f"{label}: cannot load external tensor data: {e}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"{label}: invalid ONNX model: {first}") from None
    return model, label


def _check_strings(model: onnx.ModelProto, label: str) -> None:
    """Names are UTF-8 text: protobuf hands undecodable ones over as bytes."""
    g = model.graph
    fields: list[tuple[str, Any]] = [("graph name", g.name)]
    for kind, items in (("input", g.input), ("output", g.output), ("value_info", g.value_info),
                        ("initializer", g.initializer)):
        fields += [(f"graph {kind} {i} name", x.name) for i, x in enumerate(items)]
    for i, n in enumerate(g.node):
        fields += [(f"node {i} name", n.name), (f"node {i} op_type", n.op_type),
                   (f"node {i} domain", n.domain)]
        fields += [(f"node {i} input {j}", x) for j, x in enumerate(n.input)]
        fields += [(f"node {i} output {j}", x) for j, x in enumerate(n.output)]
        fields += [(f"node {i} attribute {j} name", a.name) for j, a in enumerate(n.attribute)]
    for what, value in fields:
        if not isinstance(value, str):
            raise InputError(f"{label}: {what} is not valid UTF-8 text ({value!r})")


def _elem_type_name(code: int) -> str:
    try:
        return onnx.TensorProto.DataType.Name(code)
    except ValueError:  # a code this onnx does not know
        return f"code {code} (unknown)"


def _onnx_type(label: str, vi: onnx.ValueInfoProto,
               shape_override: Sequence[int] | None) -> TensorType:
    tt = vi.type.tensor_type
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedError(f"{label}: input '{vi.name}' is not a tensor")
    if tt.elem_type not in ONNX_DTYPES:
        raise UnsupportedError(
            f"{label}: input '{vi.name}' has element type "
            f"{_elem_type_name(tt.elem_type)}, which hbir does not support"
        )
    dims = list(tt.shape.dim) if tt.HasField("shape") else None
    if shape_override is not None:
        shape = tuple(int(d) for d in shape_override)
        if dims is not None and len(dims) != len(shape):
            raise InputError(
                f"{label}: --input-shape for '{vi.name}' has rank {len(shape)}, the model's "
                f"input has rank {len(dims)}"
            )
        for i, d in enumerate(dims or []):
            if d.HasField("dim_value") and d.dim_value >= 0 and d.dim_value != shape[i]:
                raise InputError(
                    f"{label}: --input-shape for '{vi.name}' sets dimension {i} to {shape[i]}, "
                    f"but the model fixes it to {d.dim_value}"
                )
    else:
        if dims is None:
            raise InputError(
                f"{label}: input '{vi.name}' has no shape",
                hint=f"pass --input-shape {vi.name}=1x3x224x224 (API: input_shapes=)",
            )
        shape_l = []
        for i, d in enumerate(dims):
            if not d.HasField("dim_value") or d.dim_value < 0:
                sym = f" ('{d.dim_param}')" if d.dim_param else ""
                raise InputError(
                    f"{label}: input '{vi.name}' has a dynamic dimension {i}{sym}",
                    hint=f"pass --input-shape {vi.name}=" + "x".join(
                        str(x.dim_value) if x.HasField("dim_value") and x.dim_value >= 0 else "N"
                        for x in dims
                    ) + " with N set (API: input_shapes=)",
                )
            shape_l.append(d.dim_value)
        shape = tuple(shape_l)
    return TensorType(ONNX_DTYPES[tt.elem_type], shape)


def import_onnx(
    src: str | os.PathLike | onnx.ModelProto | bytes,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    constant_inputs: Mapping[str, np.ndarray] | None = None,
) -> Graph:
    """Import an ONNX model into an IR graph with static shapes.

    ``input_shapes`` fixes dynamic input dimensions by input name. ``constant_inputs`` freezes
    graph inputs to given values (they become constants), for inputs that must be static.
    """
    model, label = read_model(src)
    input_shapes = dict(input_shapes or {})
    constant_inputs = dict(constant_inputs or {})
    opset = _default_opset(model, label)
    converters = load_all()
    g = model.graph
    _check_supported(g, converters, label)

    graph = Graph(_legal(g.name or Path(label).stem or "main"))
    graph.meta.update(source=label, opset=opset, producer=model.producer_name)
    ctx = ImportContext(graph, opset, label)

    init_names = {t.name for t in g.initializer}
    real_inputs = [vi for vi in g.input if vi.name not in init_names]
    unknown = sorted(set(input_shapes) - {vi.name for vi in real_inputs})
    if unknown:
        raise InputError(
            f"{label}: --input-shape names unknown input(s) {', '.join(unknown)} (inputs: "
            + ", ".join(vi.name for vi in real_inputs) + ")"
        )
    with _named(label):
        _import_graph(ctx, g, real_inputs, input_shapes, constant_inputs, converters, label)
    return graph


def _import_graph(ctx: ImportContext, g: onnx.GraphProto, real_inputs: list,
                  input_shapes: dict, constant_inputs: dict,
                  converters: Mapping[str, Converter], label: str) -> None:
    graph = ctx.graph
    for vi in real_inputs:
        if vi.name in constant_inputs:
            ctx.bind_const(vi.name, np.asarray(constant_inputs[vi.name]))
            continue
        t = _onnx_type(label, vi, input_shapes.get(vi.name))
        ctx.env[vi.name] = graph.add_input(_legal(vi.name), t)
    for init in g.initializer:
        arr = _tensor_array(init, f"{label}: initializer '{init.name}'")
        ctx.bind_const(init.name, arr)

    problems: list[str] = []
    poisoned: set[str] = set()
    for node in g.node:
        if any(n in poisoned for n in node.input if n):
            poisoned.update(node.output)
            continue
        missing = [n for n in node.input if n and n not in ctx.env]
        if missing:
            problems.append(f"{node.op_type} node '{ctx.where(node)}': input '{missing[0]}' is "
                            "not defined before use (the graph is not topologically sorted or "
                            "has a cycle)")
            poisoned.update(node.output)
            continue
        bad = _schema_problem(node, ctx.opset)
        if bad:
            problems.append(f"{node.op_type} node '{ctx.where(node)}': {bad}")
            poisoned.update(node.output)
            continue
        try:
            converters[node.op_type].fn(ctx, node)
        except (UnsupportedError, InferError) as e:
            problems.append(str(e))
            poisoned.update(node.output)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError,
                ArithmeticError) as e:
            # a converter (or the constant folding it asks for) meeting attributes or inputs
            # of kinds no valid model has: report the node instead of crashing
            problems.append(f"{node.op_type} node '{ctx.where(node)}': malformed node "
                            f"({type(e).__name__}: {str(e)[:200]})")
            poisoned.update(node.output)
    if problems:
        raise UnsupportedError(
            f"{label}: {len(problems)} node(s) cannot be imported: " + "; ".join(problems)
        )
    outputs = []
    for vi in g.output:
        if vi.name not in ctx.env:
            raise InputError(f"{label}: graph output '{vi.name}' is not produced by any node")
        outputs.append(graph.named_output(ctx.env[vi.name], vi.name, outputs))
    graph.set_outputs(outputs)


@contextmanager
def _named(label: str) -> Iterator[None]:
    """Resource-limit errors raised deep inside (graph inputs, node outputs) name the file."""
    try:
        yield
    except ResourceLimitError as e:
        if e.args[0].startswith(f"{label}: "):
            raise
        raise ResourceLimitError(f"{label}: {e.args[0]}", hint=e.hint) from None


def _tensor_array(t: onnx.TensorProto, what: str) -> np.ndarray:
    """A TensorProto's data as numpy, its declared size checked against the limit first."""
    if any(d < 0 for d in t.dims):
        raise UnsupportedError(f"{what}: negative dimension in {list(t.dims)}")
    dtype = ONNX_DTYPES.get(t.data_type)
    check_shape(t.dims, DTYPES[dtype].itemsize if dtype else 1, f"{what} {list(t.dims)}")
    try:
        arr = numpy_helper.to_array(t)
        dtype_of(arr)
    except Exception as e:  # onnx raises ValueError, TypeError, KeyError... for bad tensors
        raise UnsupportedError(f"{what}: {e}") from None
    return arr


def _schema_problem(node: onnx.NodeProto, opset: int) -> str | None:
    """What onnx.checker would say about the node's inputs and attribute types (a ModelProto
    given in memory is not checked), so converters only see well-formed nodes."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")  # default domain only
    except Exception:  # noqa: BLE001 - SchemaError: not defined at this opset
        return f"op type {node.op_type} is not defined in opset {opset}"
    n = len(node.input)
    while n and not node.input[n - 1]:
        n -= 1  # trailing empty names are absent optional inputs
    if n < schema.min_input or n > schema.max_input:
        return f"takes {schema.min_input} to {schema.max_input} inputs, got {n}"
    single = onnx.defs.OpSchema.FormalParameterOption.Single
    for i, formal in enumerate(schema.inputs[:n]):
        if formal.option == single and not node.input[i]:
            return f"input {i} ('{formal.name}') is required"
    for a in node.attribute:
        want = schema.attributes.get(a.name)
        if want is None:
            return f"unknown attribute '{a.name}'"
        if int(a.type) != int(want.type):
            got = onnx.AttributeProto.AttributeType.Name(a.type) \
                if a.type in onnx.AttributeProto.AttributeType.values() else str(a.type)
            return f"attribute '{a.name}' must be {want.type.name}, got {got}"
    return None


def _default_opset(model: onnx.ModelProto, label: str) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    raise InputError(f"{label}: the model imports no default ONNX opset")


def _check_supported(g: onnx.GraphProto, converters: Mapping[str, Converter], label: str) -> None:
    bad = []
    for i, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx"):
            bad.append(f"{node.op_type} node '{node.name or i}': domain '{node.domain}' is not "
                       "supported")
        elif node.op_type not in converters:
            where = node.name or (node.output[0] if node.output else str(i))
            bad.append(f"{node.op_type} node '{where}': op type "
                       f"{node.op_type} is not supported")
    if bad:
        raise UnsupportedError(
            f"{label}: {len(bad)} node(s) use unsupported ops: " + "; ".join(bad),
            hint="see docs/frontend.md for the supported ONNX operators",
        )


def static_input_names(model: onnx.ModelProto) -> list[str]:
    """Graph inputs that feed a static slot (shape, axes, pads...): they must be frozen."""
    converters = load_all()
    inputs = {vi.name for vi in model.graph.input}
    out: list[str] = []
    for node in model.graph.node:
        conv = converters.get(node.op_type)
        for i in conv.static if conv else ():
            if i < len(node.input) and node.input[i] in inputs and node.input[i] not in out:
                out.append(node.input[i])
    return out
