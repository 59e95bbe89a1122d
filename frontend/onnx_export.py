"""ONNX exporter: an IR :class:`Graph` to an ``onnx.ModelProto`` (and optionally a file).

The inverse of the importer: graph inputs and outputs keep their names, shapes and dtypes
(hbir dtypes map to ONNX element types, the interchange ones bf16/float8/int4 included),
constants become initializers under their own names, and every IR node becomes one or a few
ONNX nodes, the main one named like the IR node (helpers ``<node>/<op>``, the source location
in ``doc_string``). Per-op mapping lives in ``onnx_export_ops`` (registered with
:func:`exporter`); this module owns what every op shares: names, helper initializers, chains of
nodes, the NHWC wrapping, the choice of opset, error collection, the ONNX checker and the atomic
write.

Opset: ``opset`` (default 17) is a minimum. A graph that needs a newer operator version
(resize with antialias, volumetric grid_sample, float8 casts, int16 quantization, ...) is written
with the lowest opset that has it, and the raise is logged with its reason; the IR version is the
lowest one that carries that opset.

Layout: ONNX operators are channels-first, so a node with ``layout="NHWC"`` is written as
``Transpose(NHWC->NCHW) -> op -> Transpose(NCHW->NHWC)``.

Every node with no ONNX mapping, or with attributes its mapping cannot express, is listed in one
:class:`~hbc.errors.UnsupportedError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from hbc.errors import InputError, UnsupportedError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.io import write_atomic
from hbc.ir.registry import get_op
from hbc.ir.types import numpy_dtype

log = logging.getLogger(__name__)

#: the lowest opset the exporter writes (Split and ReduceSum take their axes as inputs, Softmax
#: has its one-axis semantics, Clip takes its bounds as inputs)
MIN_OPSET = 13
DEFAULT_OPSET = 17

#: dtypes newer than MIN_OPSET: the first opset whose operators (Cast, QuantizeLinear,
#: Reshape, ...) accept them, and so the first IR version that has them
DTYPE_OPSET: dict[str, int] = {
    "f8e4m3fn": 19, "f8e4m3fnuz": 19, "f8e5m2": 19, "f8e5m2fnuz": 19,
    "i4": 21, "u4": 21, "f4e2m1": 23, "f8e8m0": 24, "i2": 25, "u2": 25,
}


def onnx_elem_type(dtype: str) -> int:
    """The ONNX TensorProto element type of an hbir dtype."""
    return helper.np_dtype_to_tensor_dtype(numpy_dtype(dtype))


# -- the exporter registry ----------------------------------------------------------------------
Requires = Callable[[Node], list[tuple[int, str]]]


class Unexportable(Exception):
    """Raised by an op exporter: this node's attributes have no ONNX form (the message says
    which and why); collected into one UnsupportedError."""


@dataclass(frozen=True)
class OpExporter:
    """The export of one IR op: ``fn(ctx, node)`` writes its nodes; ``requires(node)`` lists
    ``(opset, reason)`` pairs the node needs beyond MIN_OPSET."""

    op: str
    fn: Callable[[ExportContext, Node], None]
    requires: Requires | None = None


EXPORTERS: dict[str, OpExporter] = {}


def exporter(*ops: str, requires: Requires | None = None) -> Callable:
    """Decorator: register ``fn(ctx, node)`` as the ONNX export of the given IR ops."""

    def wrap(fn: Callable) -> Callable:
        for op in ops:
            if op in EXPORTERS:
                raise RuntimeError(f"ONNX exporter for '{op}' registered twice")
            get_op(op)  # the op must be declared in the registry
            EXPORTERS[op] = OpExporter(op, fn, requires)
        return fn

    return wrap


def load_exporters() -> dict[str, OpExporter]:
    """Import the op exporters (they register on import) and return the table."""
    from . import onnx_export_ops  # noqa: F401

    return EXPORTERS


# -- building ----------------------------------------------------------------------------------
def layout_of(node: Node) -> str:
    return node.attrs.get("layout", "NCHW")


def to_channels_first_perm(rank: int) -> list[int]:
    """Transpose perm NHWC -> NCHW."""
    return [0, rank - 1, *range(1, rank - 1)]


def to_channels_last_perm(rank: int) -> list[int]:
    """Transpose perm NCHW -> NHWC."""
    return [0, *range(2, rank), 1]


class ExportContext:
    """What an op exporter sees: the IR graph, the opset being written, and builders for ONNX
    nodes and helper initializers with names that collide with nothing in the graph."""

    def __init__(self, graph: Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._taken: set[str] = {v.name for v in graph.values()}
        self._taken.update(n.name for n in graph.nodes)

    def fresh(self, base: str) -> str:
        """A new tensor or node name starting with ``base``."""
        name, i = base, 1
        while name in self._taken:
            name = f"{base}_{i}"
            i += 1
        self._taken.add(name)
        return name

    @staticmethod
    def inputs(node: Node) -> list[str]:
        """The ONNX names of the node's inputs ('' for an absent optional input)."""
        return ["" if v is None else v.name for v in node.inputs]

    @staticmethod
    def outputs(node: Node) -> list[str]:
        return [v.name for v in node.outputs]

    def is_used(self, value: Value) -> bool:
        return bool(value.uses) or value in self.graph.outputs

    def add(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | int,
            node: Node, suffix: str | None = None, **attrs: Any) -> list[str]:
        """Append an ONNX node for IR ``node``; returns its output names.

        The node is named like the IR node, or ``<ir name>/<suffix>`` for a helper node.
        ``outputs`` is a list of names, or a count of fresh intermediate names. Attributes
        whose value is None are left out, and so are trailing absent ('') inputs.
        """
        name = node.name if suffix is None else self.fresh(f"{node.name}/{suffix}")
        if isinstance(outputs, int):
            outputs = [self.fresh(f"{name}_out{i}" if outputs > 1 else f"{name}_out")
                       for i in range(outputs)]
        ins = list(inputs)
        while ins and ins[-1] == "":
            ins.pop()
        proto = helper.make_node(op_type, ins, list(outputs), name=name,
                                 **{k: v for k, v in attrs.items() if v is not None})
        if node.loc and node.loc != node.name:
            proto.doc_string = node.loc
        self.nodes.append(proto)
        return list(outputs)

    def const(self, array: np.ndarray, base: str) -> str:
        """A new helper initializer holding ``array``; returns its name."""
        name = self.fresh(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, values: Sequence[int], base: str) -> str:
        """A 1-D int64 helper initializer (shapes, axes, pads, ...)."""
        return self.const(np.asarray(list(values), dtype=np.int64).reshape(-1), base)

    def scalar(self, node: Node, value: Any, dtype: str, what: str) -> str:
        """A scalar helper initializer of hbir dtype ``dtype`` named ``<node>/<what>``."""
        return self.const(np.asarray(value).astype(numpy_dtype(dtype)).reshape(()),
                          f"{node.name}/{what}")

    def channels_first_input(self, node: Node, index: int = 0) -> str:
        """Input ``index`` of a layout-sensitive node, transposed to NCHW when it is NHWC."""
        v = node.inputs[index]
        if layout_of(node) == "NCHW":
            return v.name
        return self.add("Transpose", [v.name], 1, node, "to_nchw",
                        perm=to_channels_first_perm(v.type.rank))[0]

    def chain(self, node: Node, final: str | None = None) -> Chain:
        return Chain(self, node, final)


class Chain:
    """ONNX nodes applied one after another to one tensor; the last writes ``final`` (default:
    the IR node's first output).

    Each step is an op type with the extra inputs that follow the running tensor and its
    attributes; the step marked ``main`` (else the first) is named like the IR node, the
    others ``<ir name>/<op>``.
    """

    def __init__(self, ctx: ExportContext, node: Node, final: str | None = None) -> None:
        self.ctx, self.node = ctx, node
        self.final = node.outputs[0].name if final is None else final
        self.steps: list[tuple[str, tuple[str, ...], bool, dict[str, Any]]] = []

    def then(self, op_type: str, *extra: str, main: bool = False, **attrs: Any) -> Chain:
        self.steps.append((op_type, extra, main, attrs))
        return self

    def back_to_layout(self) -> Chain:
        """Append the transpose from NCHW back to the node's layout (none for NCHW)."""
        if layout_of(self.node) != "NCHW":
            self.then("Transpose", perm=to_channels_last_perm(self.node.outputs[0].type.rank))
        return self

    def emit(self, x: str) -> None:
        if not self.steps:
            self.then("Identity")
        named = any(main for _, _, main, _ in self.steps)
        for i, (op_type, extra, main, attrs) in enumerate(self.steps):
            is_main = main or (not named and i == 0)
            out: list[str] | int = [self.final] if i == len(self.steps) - 1 else 1
            x = self.ctx.add(op_type, [x, *extra], out, self.node,
                             None if is_main else op_type.lower(), **attrs)[0]


# -- the export ----------------------------------------------------------------------------------
def required_opset(graph: Graph, opset: int) -> int:
    """The opset to write ``graph`` with: ``opset`` raised to what its ops and dtypes need."""
    exporters = load_exporters()
    need, why = opset, ""
    for v in graph.values():
        if DTYPE_OPSET.get(v.dtype, 0) > need:
            need, why = DTYPE_OPSET[v.dtype], f"%{v.name} has dtype {v.dtype}"
    for node in graph.nodes:
        exp = exporters.get(node.op)
        for version, reason in exp.requires(node) if exp and exp.requires else ():
            if version > need:
                need, why = version, f"{node.op} node '{node.where()}' has {reason}"
    if need > opset:
        log.info("graph '%s': exporting with opset %d instead of %d: %s", graph.name, need,
                 opset, why)
    return need


def export_onnx(graph: Graph, path: str | os.PathLike | None = None,
                opset: int = DEFAULT_OPSET, *, extra_outputs: Sequence[str] = (),
                check: bool = True) -> onnx.ModelProto:
    """Export ``graph`` as an ONNX model, checked with ``onnx.checker``; also write it to
    ``path`` (atomically) when given.

    ``opset`` is the lowest default-domain opset to use; it is raised when the graph needs a
    newer one. ``extra_outputs`` names node outputs to expose as graph outputs too, after the
    graph's own (calibration reads intermediate values this way). ``check=False`` skips
    ``onnx.checker`` (an in-memory model for onnxruntime, which checks what it loads). Raises
    UnsupportedError listing every node that has no ONNX form.
    """
    latest = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= latest:
        raise InputError(f"opset {opset} is outside the range the ONNX exporter writes "
                         f"({MIN_OPSET} to {latest})")
    exporters = load_exporters()
    opset = required_opset(graph, opset)
    if opset > latest:
        raise UnsupportedError(f"graph '{graph.name}' needs ONNX opset {opset}, but the "
                               f"installed onnx package knows opsets up to {latest}")
    ctx = ExportContext(graph, opset)
    problems: list[str] = []
    for node in graph.nodes:
        exp = exporters.get(node.op)
        try:
            if exp is None:
                raise Unexportable(_no_mapping(node))
            exp.fn(ctx, node)
        except Unexportable as e:
            problems.append(f"{node.op} node '{node.where()}': {e}")
    if problems:
        raise UnsupportedError(
            f"graph '{graph.name}': {len(problems)} node(s) cannot be exported to ONNX: "
            + "; ".join(problems))
    extra = [graph.value(name) for name in dict.fromkeys(extra_outputs)]
    bad = [v.name for v in extra if v.kind != "node"]
    if bad:
        raise InputError(f"graph '{graph.name}': extra outputs must be node outputs, not "
                         + ", ".join(f"%{n}" for n in bad))
    model = _model(ctx, [v for v in extra if v not in graph.outputs])
    try:
        if check:
            onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        # the exporter wrote something ONNX rejects: a bug in hbc, not in the user's graph
        raise RuntimeError(f"graph '{graph.name}': the exported model fails the ONNX checker "
                           f"(a bug in the ONNX exporter): {e}") from e
    if path is not None:
        write_model(model, path)
    return model


def _no_mapping(node: Node) -> str:
    if node.opdef.category == "quant":  # the integer kernels of a lowered graph
        return (f"op '{node.op}' has no ONNX mapping (integer kernels of the lowered graph are "
                "not exported; export the float or QDQ graph from before integer lowering)")
    return f"op '{node.op}' has no ONNX mapping"


def _value_info(v: Value) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(v.name, onnx_elem_type(v.dtype), list(v.shape))


def _model(ctx: ExportContext, extra: Sequence[Value] = ()) -> onnx.ModelProto:
    graph = ctx.graph
    used = {v.name for n in graph.nodes for v in n.inputs if v is not None}
    used.update(v.name for v in graph.outputs)
    params = [numpy_helper.from_array(np.asarray(graph.constants[v.name]), v.name)
              for v in graph.constant_values() if v.name in used]
    outputs = [*graph.outputs, *extra]
    names = {v.name for v in outputs}
    value_info = [_value_info(v) for n in graph.nodes for v in n.outputs
                  if v.name not in names and ctx.is_used(v)]
    g = helper.make_graph(ctx.nodes, graph.name,
                          inputs=[_value_info(v) for v in graph.inputs],
                          outputs=[_value_info(v) for v in outputs],
                          initializer=params + ctx.initializers, value_info=value_info)
    opset_id = helper.make_opsetid("", ctx.opset)
    from hbc import __version__

    model = helper.make_model(g, opset_imports=[opset_id], producer_name="hbc",
                              producer_version=__version__)
    model.ir_version = helper.find_min_ir_version_for([opset_id])
    if graph.meta.get("source"):
        helper.set_model_props(model, {"hbc.source": str(graph.meta["source"])})
    return model


def write_model(model: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Write ``model`` to ``path`` atomically: a temporary file in the same folder, then
    ``os.replace``, so a reader never sees a half-written model."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected an .onnx file name")
    if not path.parent.is_dir():
        raise InputError(f"{path}: the folder {path.parent} does not exist")
    try:
        data = model.SerializeToString()
    except ValueError as e:  # protobuf's 2 GB limit
        raise InputError(f"{path}: the model is too large for one protobuf file ({e})") from None
    write_atomic(path, lambda f: f.write(data))
