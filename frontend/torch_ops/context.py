"""What the torch converters build with: the conversion context, recorded result metadata and
the torch -> hbir dtype mapping."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from hbc.errors import UnsupportedError
from hbc.ir.graph import Graph, Value, legal_name
from hbc.ir.interpret import evaluate_constant
from hbc.ir.types import DTYPES, INTERCHANGE_DTYPES, TensorType

#: Results of folding larger than this many elements stay as nodes.

TORCH_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "f32", torch.float16: "f16", torch.float64: "f64", torch.bfloat16: "bf16",
    torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
    torch.uint8: "u8", torch.bool: "bool",
}
for _tname, _ir in (("uint16", "u16"), ("uint32", "u32"), ("uint64", "u64"),
                    ("float8_e4m3fn", "f8e4m3fn"), ("float8_e5m2", "f8e5m2"),
                    ("float8_e4m3fnuz", "f8e4m3fnuz"), ("float8_e5m2fnuz", "f8e5m2fnuz")):
    if hasattr(torch, _tname) and _ir in DTYPES:
        TORCH_DTYPES[getattr(torch, _tname)] = _ir


class Unsupported(UnsupportedError):
    """A node cannot be converted; the importer adds where it is."""


@dataclass(frozen=True)
class Meta:
    """Shape and dtype of a tensor result recorded on the example inputs."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class _Poison:
    def __repr__(self) -> str:
        return "<not converted>"


#: Stands for the result of a node that could not be converted.
POISON: Any = _Poison()


def ir_dtype(dtype: torch.dtype) -> str:
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise Unsupported(f"dtype {dtype} has no hbir equivalent") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor's data as a numpy array of the matching hbir dtype (bf16/float8 included)."""
    t = t.detach().cpu().contiguous()
    name = ir_dtype(t.dtype)
    if name in INTERCHANGE_DTYPES:
        bits = {1: torch.uint8, 2: torch.int16}[t.element_size()]
        return t.view(bits).numpy().view(DTYPES[name])
    return t.numpy()


# -- the context ------------------------------------------------------------------------------
class TorchContext:
    """What a converter sees: the graph being built, the node and its recorded result."""

    def __init__(self, graph: Graph, gm: fx.GraphModule, names: dict[int, str]) -> None:
        self.graph = graph
        self.gm = gm
        #: id(tensor) -> qualified parameter/buffer name
        self.names = names
        self.env: dict[fx.Node, Any] = {}
        self._consts: dict[int, tuple[Any, Value]] = {}
        self.node: fx.Node | None = None
        self.rec: Any = None
        self.module: nn.Module | None = None
        self.base = ""

    def begin(self, node: fx.Node, rec: Any, module: nn.Module | None) -> None:
        self.node, self.rec, self.module = node, rec, module
        self.base = self.node_name(node)

    @staticmethod
    def node_name(n: fx.Node) -> str:
        """Name and loc of the IR nodes of ``n``: the module path for module calls, else the
        enclosing module path plus the fx node name."""
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack")
        if not stack:
            return n.name
        path, typ = list(stack.values())[-1]
        typename = typ if isinstance(typ, str) else f"{typ.__module__}.{typ.__qualname__}"
        if path and typename.startswith("torch.nn.modules.") and ".container." not in typename:
            return path  # an aten op inside a torch.nn leaf module (torch.export)
        return f"{path}/{n.name}" if path else n.name

    # -- the recorded result ---------------------------------------------------------------
    @property
    def out(self) -> Meta:
        """Shape and dtype torch computed for the current node (a single tensor result)."""
        if not isinstance(self.rec, Meta):
            raise Unsupported(f"expected one tensor result, torch returned {self.rec!r}")
        return self.rec

    @property
    def out_dtype(self) -> str:
        return ir_dtype(self.out.dtype)

    @staticmethod
    def tensor_type(shape: Sequence[int], dtype: torch.dtype) -> TensorType:
        return TensorType(ir_dtype(dtype), tuple(shape))

    # -- values ----------------------------------------------------------------------------
    def value(self, x: Any, dtype: str | None = None) -> Value:
        """``x`` as an IR value: Values pass, tensors and Python numbers become constants (a
        number takes ``dtype``, default the current node's result dtype)."""
        if isinstance(x, Value):
            return x
        if isinstance(x, torch.Tensor):
            hit = self._consts.get(id(x))
            if hit is not None and hit[0] is x:
                return hit[1]
            name = self.names.get(id(x)) or f"{self.base}/const"
            v = self.graph.add_constant(legal_name(name), to_numpy(x))
            self._consts[id(x)] = (x, v)
            return v
        if isinstance(x, np.ndarray):
            return self.constant(x, "const")
        if isinstance(x, (bool, int, float, np.number)):
            if dtype is None:
                dtype = self.out_dtype if isinstance(self.rec, Meta) else (
                    "f32" if isinstance(x, float) else "i64")
            return self.constant(np.asarray(x, dtype=DTYPES[dtype]), "scalar")
        if x is POISON or x is None:
            raise Unsupported("an input of this node is not available")
        raise Unsupported(f"expected a tensor, got {type(x).__name__} {x!r}")

    def constant(self, array: np.ndarray, part: str) -> Value:
        return self.graph.add_constant(legal_name(f"{self.base}/{part}"), np.asarray(array))

    def array(self, x: Any, what: str) -> np.ndarray:
        """The value of ``x``, which must be known at compile time."""
        if isinstance(x, Value):
            if not x.is_const:
                raise Unsupported(f"{what} must be known at compile time, it depends on the "
                                  "model inputs")
            return self.graph.constants[x.name]
        if isinstance(x, torch.Tensor):
            return to_numpy(x)
        return np.asarray(x)

    def param(self, attr: str) -> Value | None:
        """Parameter or buffer ``attr`` of the module being converted (None if unset)."""
        t = getattr(self.module, attr, None)
        if t is None:
            return None
        self.names.setdefault(id(t), f"{self.node.target}.{attr}")
        return self.value(t)

    # -- building --------------------------------------------------------------------------
    def emit(self, op: str, inputs: Sequence[Value | None], attrs: dict[str, Any] | None = None,
             *, part: str | None = None, num_outputs: int | None = None) -> list[Value]:
        """Add IR op ``op``; folded to constants when every input is constant."""
        name = legal_name(self.base if part is None else f"{self.base}/{part}")
        present = [v for v in inputs if v is not None]
        if present and all(v.is_const for v in present):
            folded = self._fold(op, list(inputs), attrs or {}, name, num_outputs)
            if folded is not None:
                return folded
        node = self.graph.add_node(op, inputs, dict(attrs or {}), name=name, loc=self.base,
                                   num_outputs=num_outputs)
        return node.outputs

    def emit1(self, op: str, inputs: Sequence[Value | None],
              attrs: dict[str, Any] | None = None, *, part: str | None = None) -> Value:
        return self.emit(op, inputs, attrs, part=part, num_outputs=1)[0]

    def _fold(self, op, inputs, attrs, name, num_outputs) -> list[Value] | None:
        folded = evaluate_constant(op, inputs, attrs, self.graph.constants, num_outputs)
        if folded is None:
            return None
        return [self.graph.add_constant(name if len(folded) == 1 else f"{name}.{i}", arr,
                                        type_=t) for i, (t, arr) in enumerate(folded)]

    def cast(self, v: Value, dtype: str, part: str = "cast") -> Value:
        return v if v.dtype == dtype else self.emit1("cast", [v], {"to": dtype}, part=part)

    def reshape(self, x: Any, shape: Sequence[int], part: str | None = None) -> Value:
        v = self.value(x)
        if v.shape == tuple(shape):
            return v
        return self.emit1("reshape", [v], {"shape": [int(d) for d in shape]}, part=part)

    def finish(self, result: Any, rec: Any) -> Any:
        """Check a converter's result against torch's; cast where the dtype differs."""
        if isinstance(rec, Meta):
            if result is None:
                return None  # an output torch computes and the model does not use
            v = self.value(result)
            if v.shape != tuple(rec.shape):
                raise Unsupported(f"internal error: converted to shape {list(v.shape)}, torch "
                                  f"computes {list(rec.shape)}")
            return self.cast(v, ir_dtype(rec.dtype), part="to_torch_dtype")
        if isinstance(rec, (tuple, list)) and isinstance(result, (tuple, list)):
            if len(rec) != len(result):
                raise Unsupported(f"internal error: {len(result)} results, torch has {len(rec)}")
            return tuple(self.finish(r, m) for r, m in zip(result, rec, strict=True))
        return result
