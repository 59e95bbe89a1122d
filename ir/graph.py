"""The IR: Graph, Node, Value.

A ``Graph`` owns its values and nodes. Use-lists (``Value.uses``) are maintained by the graph's
methods, never by hand. Every value has a unique, readable name; nodes have unique names and a
source location (``loc``: the ONNX node name, the torch module path, or ``file:line`` of a
``.hbir``). Constants are values without a producer whose data is in ``graph.constants``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hbc.errors import InputError

from .limits import check_shape
from .registry import InferError, get_op
from .types import QuantParams, TensorType, type_of_array


@dataclass(eq=False)
class Value:
    """An SSA value: a graph input, a constant, or an output of one node."""

    name: str
    type: TensorType
    producer: Node | None = None
    uses: list[tuple[Node, int]] = field(default_factory=list)
    kind: str = "node"  # "input" | "const" | "node"

    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> str:
        return self.type.dtype

    @property
    def is_const(self) -> bool:
        return self.kind == "const"

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self.type.dtype}{list(self.type.shape)})"


@dataclass(eq=False)
class Node:
    """One op application. ``inputs`` may hold ``None`` for an absent optional input."""

    op: str
    inputs: list[Value | None]
    outputs: list[Value]
    attrs: dict[str, Any]
    name: str
    loc: str = ""

    @property
    def opdef(self):
        return get_op(self.op)

    def where(self) -> str:
        """'name' plus the source location when it says more, for error messages."""
        return f"{self.name} ({self.loc})" if self.loc and self.loc != self.name else self.name

    def __repr__(self) -> str:
        return f"Node({self.op} {self.name})"


_SANITIZE = re.compile(r"[^A-Za-z0-9_.\-/:]")


def legal_name(base: str) -> str:
    """``base`` with characters outside the IR's name alphabet replaced by '_'."""
    return _SANITIZE.sub("_", base) or "v"


class Graph:
    """A dataflow graph with static shapes. Nodes are kept in topological order."""

    def __init__(self, name: str = "main") -> None:
        self.name = name
        self.inputs: list[Value] = []
        self.outputs: list[Value] = []
        self.nodes: list[Node] = []
        #: constant name -> array; each has a Value of kind "const" of the same name.
        self.constants: dict[str, np.ndarray] = {}
        self._values: dict[str, Value] = {}
        self._node_names: set[str] = set()
        #: free-form metadata (source file, opset, ...), not part of the text form.
        self.meta: dict[str, Any] = {}

    # -- names -------------------------------------------------------------------------------
    def unique_name(self, base: str, taken: set[str] | dict | None = None) -> str:
        """``base`` made legal and unique among value names (or ``taken``)."""
        taken = self._values if taken is None else taken
        base = legal_name(base)
        if base not in taken:
            return base
        i = 1
        while f"{base}_{i}" in taken:
            i += 1
        return f"{base}_{i}"

    def value(self, name: str) -> Value:
        try:
            return self._values[name]
        except KeyError:
            raise InputError(f"graph '{self.name}' has no value '%{name}'") from None

    def has_value(self, name: str) -> bool:
        return name in self._values

    def values(self) -> Iterable[Value]:
        return self._values.values()

    def constant_values(self) -> list[Value]:
        return [v for v in self._values.values() if v.kind == "const"]

    # -- building ----------------------------------------------------------------------------
    def _add_value(self, name: str, type_: TensorType, kind: str, exact: bool) -> Value:
        if exact and name in self._values:
            raise InputError(f"graph '{self.name}': value name '%{name}' is defined twice")
        v = Value(name if exact else self.unique_name(name), type_, kind=kind)
        self._values[v.name] = v
        return v

    def add_input(self, name: str, type_: TensorType) -> Value:
        check_shape(type_.shape, type_.np_dtype.itemsize,
                    f"graph '{self.name}': input %{name} ({type_.dtype}{list(type_.shape)})")
        v = self._add_value(name, type_, "input", exact=True)
        self.inputs.append(v)
        return v

    def add_constant(self, name: str, array: np.ndarray, *, exact: bool = False,
                     type_: TensorType | None = None) -> Value:
        """A constant value; the name is made unique unless ``exact``."""
        array = np.asarray(array, order="C")  # ascontiguousarray would make 0-d arrays 1-d
        type_ = type_ or type_of_array(array)
        if tuple(array.shape) != type_.shape or array.dtype != type_.np_dtype:
            raise InputError(
                f"constant '%{name}': data {array.dtype}{list(array.shape)} does not match "
                f"its type {type_.dtype}{list(type_.shape)}"
            )
        v = self._add_value(name, type_, "const", exact)
        self.constants[v.name] = array
        return v

    def add_node(
        self,
        op: str,
        inputs: Sequence[Value | None],
        attrs: dict[str, Any] | None = None,
        *,
        name: str | None = None,
        loc: str = "",
        output_names: Sequence[str] | None = None,
        num_outputs: int | None = None,
        output_types: Sequence[TensorType] | None = None,
        exact_names: bool = False,
    ) -> Node:
        """Append a node; output types are inferred from the registry unless given.

        ``output_types`` (from a parser) are taken as recorded; the verifier compares them with
        inference. Names are made legal and unique unless ``exact_names``, which keeps ``name``
        and ``output_names`` verbatim and rejects duplicates. Inference failures raise
        InferError naming the node.
        """
        opdef = get_op(op)
        inputs = list(inputs)
        node_name = name or (output_names[0] if output_names else op)
        if not exact_names:
            node_name = self._unique_node_name(node_name)
        elif node_name in self._node_names:
            raise InputError(f"graph '{self.name}': node name '{node_name}' is used twice")
        try:
            attrs = opdef.normalize_attrs(attrs or {})
            if output_types is None:
                types = opdef.infer([v.type if v is not None else None for v in inputs], attrs)
            else:
                types = list(output_types)
        except InferError as e:
            raise InferError(f"{op} node '{_where(node_name, loc)}': {e}") from None
        if num_outputs is not None:
            types = types[:num_outputs]
        elif output_names is not None:
            types = types[: len(output_names)]
        for i, t in enumerate(types):  # before anything can allocate it (hbc.ir.limits)
            check_shape(t.shape, t.np_dtype.itemsize, f"{op} node '{_where(node_name, loc)}': "
                        f"output {i} ({t.dtype}{list(t.shape)})")
        node = Node(op, inputs, [], attrs, node_name, loc)
        for i, t in enumerate(types):
            base = output_names[i] if output_names and i < len(output_names) else (
                node_name if len(types) == 1 else f"{node_name}.{i}"
            )
            v = self._add_value(base, t, "node", exact=exact_names)
            v.producer = node
            node.outputs.append(v)
        self._attach(node)
        return node

    def _attach(self, node: Node) -> None:
        """Append ``node`` (outputs already registered) and record its uses and name."""
        for i, v in enumerate(node.inputs):
            if v is not None:
                v.uses.append((node, i))
        self.nodes.append(node)
        self._node_names.add(node.name)

    def _unique_node_name(self, base: str) -> str:
        return self.unique_name(base, self._node_names)

    def set_outputs(self, outputs: Sequence[Value]) -> None:
        self.outputs = list(outputs)

    def named_output(self, value: Value, name: str, taken: Sequence[Value] = ()) -> Value:
        """The value to expose as graph output ``name``: ``value`` itself, renamed when it is a
        node result whose name is free, else an identity node of that name (for inputs,
        constants, or a value already exposed under another name in ``taken``)."""
        name = legal_name(name)
        if value.name == name and value not in taken:
            return value
        if value.kind == "node" and value not in taken and not self.has_value(name):
            self.rename_value(value, name)
            return value
        if self.has_value(name):
            name = self.unique_name(name)
        return self.add_node("identity", [value], name=name, output_names=[name],
                             loc=name).outputs[0]

    # -- editing -----------------------------------------------------------------------------
    def set_input(self, node: Node, index: int, value: Value | None) -> None:
        """Rewire input ``index`` of ``node`` (growing the list with absent inputs when
        ``index`` is past its end), keeping use-lists right."""
        while len(node.inputs) <= index:
            node.inputs.append(None)
        old = node.inputs[index]
        if old is not None:
            old.uses.remove((node, index))
        node.inputs[index] = value
        if value is not None:
            value.uses.append((node, index))

    def set_inputs(self, node: Node, values: Sequence[Value | None]) -> None:
        """Replace all inputs of ``node``."""
        for i in range(len(node.inputs)):
            self.set_input(node, i, None)
        node.inputs = [None] * len(values)
        for i, v in enumerate(values):
            self.set_input(node, i, v)

    def change_op(self, node: Node, op: str, attrs: dict[str, Any] | None = None) -> None:
        """Turn ``node`` into another op in place (same inputs/outputs; attrs normalized)."""
        node.attrs = get_op(op).normalize_attrs(attrs or {})
        node.op = op

    def set_constant(self, value: Value, array: np.ndarray) -> None:
        """Bind new data to a constant (same dtype and shape); the old array is untouched."""
        array = np.asarray(array, order="C")
        if value.kind != "const" or array.shape != value.shape or \
                array.dtype != value.type.np_dtype:
            raise InputError(f"set_constant of %{value.name}: needs a constant and data of "
                             f"type {value.type.dtype}{list(value.shape)}")
        self.constants[value.name] = array

    def replace_all_uses(self, old: Value, new: Value) -> None:
        """Make every user of ``old`` (and the graph outputs) use ``new`` instead."""
        for node, i in list(old.uses):
            self.set_input(node, i, new)
        self.outputs = [new if v is old else v for v in self.outputs]

    def remove_node(self, node: Node) -> None:
        """Remove a node whose outputs are unused."""
        for v in node.outputs:
            if v.uses or v in self.outputs:
                raise InputError(f"cannot remove node '{node.name}': %{v.name} is still used")
        for i in range(len(node.inputs)):
            self.set_input(node, i, None)
        for v in node.outputs:
            del self._values[v.name]
        self.nodes.remove(node)
        self._node_names.discard(node.name)

    def remove_value(self, value: Value) -> None:
        """Remove an unused constant or input."""
        if value.uses or value in self.outputs:
            raise InputError(f"cannot remove %{value.name}: it is still used")
        del self._values[value.name]
        self.constants.pop(value.name, None)
        if value in self.inputs:
            self.inputs.remove(value)

    def retype(self, value: Value, type_: TensorType) -> None:
        """Change the type of a graph input or constant (e.g. to attach quantization)."""
        if value.kind == "node":
            raise InputError(f"%{value.name} is a node result; its type comes from inference")
        if type_.shape != value.type.shape or type_.dtype != value.type.dtype:
            raise InputError(f"retype of %{value.name} may only change layout or quantization")
        value.type = type_

    def set_quant(self, value: Value, quant: QuantParams | None) -> None:
        """Record (or clear) quantization parameters on any value, e.g. calibrated scales on
        node results (inference never produces them, so the verifier keeps recorded ones)."""
        value.type = value.type.with_(quant=quant)

    def rename_value(self, value: Value, new_name: str) -> None:
        if new_name == value.name:
            return
        if new_name in self._values:
            raise InputError(f"value name '%{new_name}' is already taken")
        del self._values[value.name]
        if value.kind == "const":
            self.constants[new_name] = self.constants.pop(value.name)
        value.name = new_name
        self._values[new_name] = value

    def toposort(self) -> None:
        """Reorder nodes topologically (stable: keeps the current order where it can)."""
        order = {id(n): i for i, n in enumerate(self.nodes)}
        done: set[int] = set()
        out: list[Node] = []
        visiting: set[int] = set()

        def visit(n: Node) -> None:
            stack = [(n, False)]
            while stack:
                cur, expanded = stack.pop()
                if id(cur) in done:
                    continue
                if expanded:
                    visiting.discard(id(cur))
                    done.add(id(cur))
                    out.append(cur)
                    continue
                if id(cur) in visiting:
                    raise InputError(f"graph '{self.name}' has a cycle through node '{cur.name}'")
                visiting.add(id(cur))
                stack.append((cur, True))
                preds = [v.producer for v in cur.inputs if v is not None and v.producer]
                for p in sorted(preds, key=lambda p: -order.get(id(p), 0)):
                    if id(p) not in done:
                        stack.append((p, False))

        for n in self.nodes:
            visit(n)
        self.nodes = out

    def replace_contents(self, other: Graph) -> None:
        """Make this graph object hold ``other``'s inputs, constants, nodes, outputs and name
        tables (for passes that rebuild a graph but must update the caller's object)."""
        self.__dict__.update(other.__dict__)

    def contains(self, node: Node) -> bool:
        """Is ``node`` (still) part of this graph? O(1)."""
        return bool(node.outputs) and self._values.get(node.outputs[0].name) is node.outputs[0]

    def copy(self) -> Graph:
        """An independent copy of the structure; constant arrays are shared (never mutate a
        constant in place: replace it)."""
        g = Graph(self.name)
        g.meta = dict(self.meta)
        vmap: dict[int, Value] = {}
        for v in self._values.values():
            if v.kind != "node":
                nv = Value(v.name, v.type, kind=v.kind)
                g._values[v.name] = nv
                vmap[id(v)] = nv
        g.inputs = [vmap[id(v)] for v in self.inputs]
        g.constants = dict(self.constants)
        for n in self.nodes:
            inputs = [None if v is None else vmap[id(v)] for v in n.inputs]
            nn = Node(n.op, inputs, [], dict(n.attrs), n.name, n.loc)
            for v in n.outputs:
                nv = Value(v.name, v.type, producer=nn, kind="node")
                g._values[v.name] = nv
                vmap[id(v)] = nv
                nn.outputs.append(nv)
            g._attach(nn)
        g.outputs = [vmap[id(v)] for v in self.outputs]
        return g

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise InputError(f"graph '{self.name}' has no node '{name}'")

    def __repr__(self) -> str:
        return f"Graph({self.name}: {len(self.inputs)} inputs, {len(self.nodes)} nodes)"


def _where(name: str, loc: str) -> str:
    return f"{name} ({loc})" if loc and loc != name else name
