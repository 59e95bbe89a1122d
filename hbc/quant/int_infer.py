"""The int_infer model: a lowered integer IR graph as a ``torch.nn.Module``.

``build_int_infer(graph)`` turns a graph of the integer ops of docs/quantization.md (plus the
plain ops lowering keeps and the float ops of CPU fallbacks) into an :class:`IntInferModule`:
constants become buffers, ``forward`` runs the graph's nodes in order with the torch kernels of
``torch_kernels`` (and its siblings) and returns the outputs by name. It is the second,
independent implementation of the integer semantics: it shares no kernel with the numpy
interpreter (``hbc.ir.interpret``) and the two must agree bit for bit, which ``hbc verify`` and
the tests check, per output and, with ``trace=True``, per intermediate value.

Every kernel result is checked against the type the graph records for it (dtype and shape), so
a disagreement is reported at the node that causes it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.types import TensorType

from . import torch_float_kernels, torch_tensor_kernels  # noqa: F401  (register kernels)
from .torch_kernels import KERNELS, TORCH_DTYPES, Kernel, NodeCtx


@dataclass
class _Step:
    """One node: its kernel, context, and the value slots it reads, writes and frees."""

    kernel: Kernel
    ctx: NodeCtx
    reads: list[int | None]
    writes: list[int]
    frees: list[int]


def torch_dtype(t: TensorType) -> torch.dtype:
    """The torch dtype carrying values of IR type ``t``."""
    try:
        return TORCH_DTYPES[t.dtype]
    except KeyError:
        raise InputError(f"dtype {t.dtype} has no torch representation in int_infer") from None


def _to_tensor(array: Any, t: TensorType) -> torch.Tensor:
    """A numpy array or tensor as the tensor carrying IR type ``t`` (wide unsigned -> int64)."""
    if torch.is_tensor(array):
        return array
    arr = np.asarray(array)
    if t.dtype in ("u16", "u32", "u64"):
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr, copy=True, order="C"))


class IntInferModule(torch.nn.Module):
    """Runs one IR graph with torch kernels; see the module docstring.

    ``forward(*inputs, trace=False, **named)`` takes the graph inputs positionally (graph order)
    or by name, as tensors or numpy arrays, and returns ``{output name: tensor}``; with
    ``trace=True`` it returns ``(outputs, values)`` where ``values`` maps the name of every
    graph input and node result to its tensor. :meth:`run` is the numpy convenience.
    """

    def __init__(self, graph: Graph) -> None:
        super().__init__()
        self.graph_name = graph.name
        self.input_names = [v.name for v in graph.inputs]
        self.output_names = [v.name for v in graph.outputs]
        self.value_types: dict[str, TensorType] = {}
        slots: dict[int, int] = {}
        names: list[str] = []

        def slot(v) -> int:
            if id(v) not in slots:
                slots[id(v)] = len(names)
                names.append(v.name)
                self.value_types[v.name] = v.type
            return slots[id(v)]

        self._input_slots = [slot(v) for v in graph.inputs]
        self._const_slots: list[tuple[int, str]] = []
        for i, v in enumerate(graph.constant_values()):
            buf = f"const{i}"
            self.register_buffer(buf, _to_tensor(graph.constants[v.name], v.type))
            self._const_slots.append((slot(v), buf))
        # a node result is freed after the last node reading it (after its producer if unused)
        last_use: dict[int, int] = {}
        for k, node in enumerate(graph.nodes):
            for v in [*node.inputs, *node.outputs]:
                if v is not None and v.kind == "node":
                    last_use[slot(v)] = k
        keep = {slot(v) for v in graph.outputs}
        frees: dict[int, list[int]] = {}
        for s, k in last_use.items():
            if s not in keep:
                frees.setdefault(k, []).append(s)
        self._steps: list[_Step] = []
        for k, node in enumerate(graph.nodes):
            fn = KERNELS.get(node.op)
            if fn is None:
                raise InputError(f"int_infer: {node.op} node '{node.where()}': the op has no "
                                 "torch kernel", hint="lower the graph (lower-int) first, or "
                                 "add the op to hbc/quant/torch_*kernels.py")
            ctx = NodeCtx(
                op=node.op, name=node.where(), attrs=dict(node.attrs),
                in_types=[None if v is None else v.type for v in node.inputs],
                out_types=[v.type for v in node.outputs])
            self._steps.append(_Step(fn, ctx, [None if v is None else slot(v)
                                               for v in node.inputs],
                                     [slot(v) for v in node.outputs], frees.get(k, [])))
        self._names = names
        self._output_slots = [slot(v) for v in graph.outputs]

    # -- running -----------------------------------------------------------------------------
    def _bind(self, args: tuple, named: Mapping[str, Any]) -> list[torch.Tensor]:
        if args and named:
            raise InputError(f"int_infer '{self.graph_name}': pass inputs either positionally "
                             "or by name, not both")
        if args:
            if len(args) != len(self.input_names):
                raise InputError(f"int_infer '{self.graph_name}': {len(args)} inputs given, "
                                 f"the graph takes {len(self.input_names)} "
                                 f"({', '.join(self.input_names)})")
            named = dict(zip(self.input_names, args, strict=True))
        unknown = sorted(set(named) - set(self.input_names))
        missing = [n for n in self.input_names if n not in named]
        if unknown or missing:
            raise InputError(f"int_infer '{self.graph_name}': inputs do not match (missing "
                             f"{missing}, unknown {unknown}); expected "
                             + ", ".join(f"{n}: {self.value_types[n].describe()}"
                                         for n in self.input_names))
        out = []
        for name in self.input_names:
            t = self.value_types[name]
            x = _to_tensor(named[name], t)
            if tuple(x.shape) != t.shape or x.dtype != torch_dtype(t):
                raise InputError(f"input '{name}': got {x.dtype}{list(x.shape)}, expected "
                                 f"{t.dtype}{list(t.shape)}")
            out.append(x)
        return out

    def forward(self, *args: Any, trace: bool = False, **named: Any):
        env: list[torch.Tensor | None] = [None] * len(self._names)
        for s, x in zip(self._input_slots, self._bind(args, named), strict=True):
            env[s] = x
        for s, buf in self._const_slots:
            env[s] = getattr(self, buf)
        for step in self._steps:
            results = step.kernel(step.ctx, [None if s is None else env[s] for s in step.reads])
            for s, r, t in zip(step.writes, results, step.ctx.out_types, strict=False):
                if tuple(r.shape) != t.shape or r.dtype != torch_dtype(t):
                    raise InputError(
                        f"int_infer: {step.ctx.op} node '{step.ctx.name}' produced "
                        f"{r.dtype}{list(r.shape)} for %{self._names[s]}, its type says "
                        f"{t.dtype}{list(t.shape)}")
                env[s] = r
            if not trace:
                for s in step.frees:
                    env[s] = None
        outputs = {self._names[s]: env[s] for s in self._output_slots}
        if not trace:
            return outputs
        const = {s for s, _ in self._const_slots}
        values = {n: env[s] for s, n in enumerate(self._names)
                  if s not in const and env[s] is not None}
        return outputs, values

    def _numpy(self, name: str, t: torch.Tensor) -> np.ndarray:
        return t.detach().cpu().numpy().astype(self.value_types[name].np_dtype, copy=False)

    @torch.no_grad()
    def run(self, inputs: Mapping[str, np.ndarray], trace: bool = False
            ) -> dict[str, np.ndarray]:
        """Run on numpy inputs keyed by name; numpy outputs keyed by output name (every graph
        input and node result with ``trace=True``)."""
        if not trace:
            return {n: self._numpy(n, t) for n, t in self.forward(**inputs).items()}
        _, values = self.forward(**inputs, trace=True)
        return {n: self._numpy(n, t) for n, t in values.items()}

    def extra_repr(self) -> str:
        return (f"graph={self.graph_name!r}, nodes={len(self._steps)}, "
                f"inputs={self.input_names}, outputs={self.output_names}")


def build_int_infer(graph: Graph) -> IntInferModule:
    """The int_infer torch module of a lowered integer ``graph``."""
    return IntInferModule(graph)
