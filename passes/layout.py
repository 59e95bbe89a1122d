"""convert-layout: run the graph in the march's native layout with transposes only at its edges.

The BPU marches compute channels-last (NHWC). The pass rewrites an NCHW graph so that its
interior runs in NHWC while its inputs and outputs keep their shapes:

* each float graph input of rank 3 to 5 in the other layout (NCHW; an untagged input counts as
  NCHW) is tagged NCHW and gets one transpose to NHWC;
* layout-sensitive ops (those whose registry declaration has a ``layout`` attribute: conv,
  conv_transpose, conv_fused, batch_norm, the pools, depth_to_space, space_to_depth,
  grid_sample) switch ``layout`` and read their data inputs (x, a conv's residual) in NHWC;
* layout-agnostic ops run on the permuted data with their axis attributes remapped (softmax,
  concat, split, reduce_*, argmax, slice axes, pad pads, gather axis, resize size/scales/roi,
  scale_shift and quantize axis); elementwise ops (add, mul, prelu, ...) permute their constant
  operands (a bias [1,C,1,1] becomes [1,1,1,C]; lower-rank constants are right-aligned first);
  a transpose in the graph composes with the current permutation and disappears;
* a reshape keeps the permutation when the memory order allows it (flattening [1,C,1,1] needs
  nothing; [N,C,H,W] -> [N,C,H*W] becomes [N,H*W,C]); one that mixes channel and spatial dims
  (a flatten before a classifier) gets a transpose back to NCHW right before it;
* ops with no layout rule (gemm, matmul, unknown ones) read their inputs in the original order;
* graph outputs that end up permuted get a transpose back, keeping their names and shapes.

Every value is tracked as ``(new value, perm)`` with ``new = transpose(old, perm)``; a transpose
is only materialized where a consumer needs another order, always directly from the value's
producer, so no chain of transposes (and no pair composing to identity) is ever built, and an
input transpose nothing uses is dropped. Numerics are unchanged: permuting data and remapping
axes is exact. Values are tagged NHWC / NCHW where the types say so. The converted graph is built
node by node (names and locations kept) and then replaces the old one.

Option ``layout`` (NHWC or NCHW) is the target; NCHW converts an NHWC graph back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.ops.common import LAYOUT_ATTR_CHOICES
from hbc.ir.types import FLOAT_DTYPES

from .base import Pass, register_pass
from .layout_perm import (
    Perm,
    change,
    drop_axes,
    identity,
    inverse,
    layout_inputs,
    layout_sensitive,
    reshape_plan,
)

#: ops that follow their (only) data input's order unchanged
_FOLLOW = frozenset({"relu", "leaky_relu", "sigmoid", "tanh", "hard_sigmoid", "hard_swish",
                     "clip", "cast", "identity", "dequantize"})
#: broadcasting elementwise ops: operands in one order, constants permuted
_BINARY = frozenset({"add", "sub", "mul", "div", "prelu"})
#: op -> its attribute naming one axis of input 0
_AXIS_ATTR = {"softmax": "axis", "scale_shift": "axis", "quantize": "axis", "split": "axis",
              "concat": "axis"}


@dataclass
class _Held:
    """Where an old value lives in the new graph: ``root = transpose(old, root_perm)``;
    ``primary`` is the order its consumers follow; ``mats`` caches materialized orders."""

    root: Value
    root_perm: Perm
    primary: Perm
    mats: dict[Perm, Value] = field(default_factory=dict)


class _Converter:
    """Builds the converted copy of one graph."""

    def __init__(self, old: Graph, target: str) -> None:
        self.old, self.target = old, target
        self.source = "NHWC" if target == "NCHW" else "NCHW"
        self.new = Graph(old.name)
        self.new.meta = old.meta
        self.taken = {v.name for v in old.values()} | {n.name for n in old.nodes}
        self.held: dict[int, _Held] = {}
        #: transposes this pass added, and old ones it kept (both dropped when left unused)
        self.inserted: list[Node] = []
        self.kept: list[Node] = []
        self.broadcast: dict[tuple[int, int, Perm], Value] = {}
        self.changed = False

    # -- values --------------------------------------------------------------------------------
    def _name(self, base: str) -> str:
        name = self.new.unique_name(base, self.taken)
        self.taken.add(name)
        return name

    def _hold(self, old: Value, new: Value, perm: Perm) -> None:
        self.held[id(old)] = _Held(new, perm, perm, {perm: new})

    def get(self, old: Value, perm: Perm) -> Value:
        """``transpose(old, perm)`` in the new graph, materialized once."""
        h = self.held[id(old)]
        if perm in h.mats:
            return h.mats[perm]
        q = tuple(inverse(h.root_perm)[p] for p in perm)
        if q == identity(len(q)) or (h.root.is_const and all(d == 1 for d in h.root.shape)):
            h.mats[perm] = h.root
            return h.root
        suffix = {identity(len(perm)): self.source.lower(),
                  change(self.source, self.target, len(perm)): self.target.lower()}.get(perm, "t")
        if h.root.is_const:
            self.changed = True
            arr = np.ascontiguousarray(np.transpose(self.new.constants[h.root.name], q))
            v = self.new.add_constant(self._name(f"{old.name}.{suffix}"), arr, exact=True)
        else:
            name = self._name(f"{old.name}.{suffix}")
            src = h.root.producer
            node = self.new.add_node("transpose", [h.root], {"perm": list(q)}, name=name,
                                     output_names=[name], exact_names=True,
                                     loc=src.loc if src is not None else h.root.name)
            self.inserted.append(node)
            v = node.outputs[0]
        h.mats[perm] = v
        return v

    def get_broadcast(self, old: Value, rank: int, perm: Perm) -> Value:
        """A broadcasting operand of a rank-``rank`` result held in ``perm``: constants of lower
        rank are right-aligned (leading 1s) and permuted; all-ones shapes stay as they are."""
        if old.type.rank == rank or all(d == 1 for d in old.shape):
            return self.get(old, perm if old.type.rank == rank else identity(old.type.rank))
        key = (id(old), rank, perm)
        if key not in self.broadcast:
            arr = self.new.constants[old.name]
            full = arr.reshape((1,) * (rank - arr.ndim) + arr.shape)
            self.changed = True
            self.broadcast[key] = self.new.add_constant(
                self._name(f"{old.name}.{self.target.lower()}"),
                np.ascontiguousarray(np.transpose(full, perm)), exact=True)
        return self.broadcast[key]

    # -- the walk ------------------------------------------------------------------------------
    def convert(self, nodes: Iterable[Node]) -> Graph:
        """The converted graph; ``nodes`` iterates over the old graph's nodes in order."""
        for v in self.old.inputs:
            self._input(v)
        for v in self.old.constant_values():
            c = self.new.add_constant(v.name, self.old.constants[v.name], exact=True,
                                      type_=v.type)
            self._hold(v, c, identity(v.type.rank))
        for node in nodes:
            self._node(node)
        self._outputs()
        self._clean()
        return self.new

    def _input(self, v: Value) -> None:
        src = self.source
        rank = v.type.rank
        perm = change(src, self.target, rank)
        # an input that only feeds transposes to the target layout was converted before
        converted = v.uses and all(n.op == "transpose" and tuple(n.attrs["perm"]) == perm
                                   for n, _ in v.uses)
        if v.dtype in FLOAT_DTYPES and 3 <= rank <= 5 and (v.type.layout or "NCHW") == src \
                and not converted:
            nv = self.new.add_input(v.name, v.type.with_(layout=src))
            self.changed = self.changed or nv.type != v.type
            self._hold(v, nv, identity(rank))
            self.held[id(v)].primary = perm
            self.get(v, perm)
        else:
            self._hold(v, self.new.add_input(v.name, v.type), identity(rank))

    def _node(self, node: Node) -> None:
        if node.op == "transpose":
            self._transpose(node)
            return
        inputs, attrs, perms = self._plan(node)
        if attrs != node.attrs:
            self.changed = True
        outputs = self.old.outputs
        names = [self._name(f"{v.name}.{self.target.lower()}")
                 if v in outputs and p != identity(len(p)) else v.name
                 for v, p in zip(node.outputs, perms, strict=True)]
        new = self.new.add_node(node.op, inputs, attrs, name=node.name, loc=node.loc,
                                output_names=names, exact_names=True)
        for old_v, new_v, p in zip(node.outputs, new.outputs, perms, strict=True):
            self._hold(old_v, new_v, p)

    def _transpose(self, node: Node) -> None:
        """A transpose composes with the order its input is held in. On a permuted input it
        vanishes; otherwise it is kept, but later orders derive from its input (so a following
        transpose back cancels instead of stacking)."""
        x, y = node.inputs[0], node.outputs[0]
        h = self.held[id(x)]
        inv = inverse(node.attrs["perm"])

        def compose(k: Perm) -> Perm:
            return tuple(inv[p] for p in k)

        if h.primary != identity(len(h.primary)):
            self.held[id(y)] = _Held(h.root, compose(h.root_perm), compose(h.primary),
                                     {compose(k): v for k, v in h.mats.items()})
            self.changed = True
            return
        new = self.new.add_node("transpose", [self.get(x, h.primary)], dict(node.attrs),
                                name=node.name, loc=node.loc, output_names=[y.name],
                                exact_names=True)
        rank = len(h.primary)
        self.held[id(y)] = _Held(h.root, compose(h.root_perm), identity(rank),
                                 {identity(rank): new.outputs[0]})
        if y.uses or y in self.old.outputs:
            self.kept.append(new)

    def _outputs(self) -> None:
        outs: list[Value] = []
        done: dict[int, Value] = {}
        for v in self.old.outputs:
            if id(v) not in done:
                nv = self.get(v, identity(v.type.rank))
                done[id(v)] = self.new.named_output(nv, v.name, taken=outs)
            outs.append(done[id(v)])
        self.new.set_outputs(outs)

    def _clean(self) -> None:
        """Drop transposes and originally used constants nothing reads any more."""
        for node in reversed(self.inserted + self.kept):
            if not node.outputs[0].uses and node.outputs[0] not in self.new.outputs:
                self.new.remove_node(node)
                self.changed = self.changed or node in self.kept
        self.changed = self.changed or any(self.new.contains(n) for n in self.inserted)
        used = {id(v) for n in self.old.nodes for v in n.inputs if v is not None}
        for v in self.old.constant_values():
            nv = self.new.value(v.name)
            if id(v) in used and not nv.uses and nv not in self.new.outputs:
                self.new.remove_value(nv)

    # -- per-op rules: (new inputs, new attrs, perms of the outputs) ---------------------------
    def _plan(self, node: Node) -> tuple[list[Value | None], dict[str, Any], list[Perm]]:
        op, attrs = node.op, dict(node.attrs)
        x = node.inputs[0] if node.inputs else None
        rank = x.type.rank if x is not None else 0
        p = self.held[id(x)].primary if x is not None else ()
        if layout_sensitive(op) and 3 <= rank <= 5:
            return self._sensitive(node)
        if all(self.held[id(v)].primary == identity(v.type.rank)
               for v in node.inputs if v is not None):
            return self._orig(node.inputs), attrs, [identity(v.type.rank) for v in node.outputs]
        if op in _FOLLOW or (op == "quantize" and attrs["axis"] is None):
            return [self.get(x, p)], attrs, [p]
        if op in _BINARY:
            return self._binary(node)
        if op in _AXIS_ATTR and attrs[_AXIS_ATTR[op]] is not None:
            return self._axis(node)
        if op in ("reduce_sum", "reduce_mean", "reduce_max", "argmax"):
            return self._reduce(node, p)
        if op == "slice":
            axes = attrs["axes"] or list(range(len(attrs["starts"])))
            attrs["axes"] = [p.index(a % rank) for a in axes]
            return [self.get(x, p)], attrs, [p]
        if op == "pad":
            pads = attrs["pads"]
            attrs["pads"] = [pads[a] for a in p] + [pads[rank + a] for a in p]
            return [self.get(x, p)], attrs, [p]
        if op == "resize":
            roi = attrs["roi"]
            attrs["size"] = [attrs["size"][a] for a in p]
            attrs["scales"] = [attrs["scales"][a] for a in p]
            attrs["roi"] = [roi[a] for a in p] + [roi[rank + a] for a in p] if roi else []
            return [self.get(x, p)], attrs, [p]
        if op == "gather" and node.inputs[1].type.rank <= 1:
            idx = self.get(node.inputs[1], identity(node.inputs[1].type.rank))
            axis = attrs["axis"] % rank
            attrs["axis"] = p.index(axis)
            out = p if node.inputs[1].type.rank == 1 else drop_axes(p, {axis})
            return [self.get(x, p), idx], attrs, [out]
        if op == "reshape":
            plan = reshape_plan(x.shape, p, attrs["shape"])
            if plan is not None:
                attrs["shape"], out = plan
                return [self.get(x, p)], attrs, [out]
        if op == "linear" and p and p[-1] == rank - 1:
            return [self.get(x, p), *self._orig(node.inputs[1:])], attrs, [p]
        return self._orig(node.inputs), attrs, [identity(v.type.rank) for v in node.outputs]

    def _orig(self, values: Sequence[Value | None]) -> list[Value | None]:
        return [None if v is None else self.get(v, identity(v.type.rank)) for v in values]

    def _sensitive(self, node: Node):
        rank = node.inputs[0].type.rank
        perm = change(node.attrs["layout"], self.target, rank)
        data = layout_inputs(node.op)
        inputs = [self.get(v, perm) if i in data and v is not None else
                  self._orig([v])[0] for i, v in enumerate(node.inputs)]
        attrs = dict(node.attrs, layout=self.target)
        return inputs, attrs, [perm] * len(node.outputs)

    def _binary(self, node: Node):
        rank = node.outputs[0].type.rank
        ops = node.inputs
        full = [v for v in ops if not v.is_const and v.type.rank == rank]
        perm = next((self.held[id(v)].primary for v in full
                     if self.held[id(v)].primary != identity(rank)), identity(rank))
        if any(not v.is_const and v.type.rank != rank for v in ops):
            perm = identity(rank)  # a lower-rank non-constant operand: keep the orig order
        inputs = [self.get_broadcast(v, rank, perm) if v.is_const else
                  self.get(v, perm if v.type.rank == rank else identity(v.type.rank))
                  for v in ops]
        return inputs, dict(node.attrs), [perm]

    def _axis(self, node: Node):
        key = _AXIS_ATTR[node.op]
        rank = node.inputs[0].type.rank
        perm = identity(rank)
        for v in node.inputs:  # concat: the first permuted non-constant input sets the order
            held = self.held[id(v)].primary
            if not v.is_const and held != identity(rank):
                perm = held
                break
        attrs = dict(node.attrs)
        attrs[key] = perm.index(attrs[key] % rank)
        data = node.inputs if node.op == "concat" else node.inputs[:1]
        inputs = [self.get(v, perm) for v in data] + self._orig(node.inputs[len(data):])
        return inputs, attrs, [perm] * len(node.outputs)

    def _reduce(self, node: Node, p: Perm):
        attrs = dict(node.attrs)
        rank = len(p)
        if node.op == "argmax":
            axes = {attrs["axis"] % rank}
            attrs["axis"] = p.index(attrs["axis"] % rank)
        else:
            axes = {a % rank for a in attrs["axes"]} or set(range(rank))
            attrs["axes"] = sorted(p.index(a) for a in axes) if attrs["axes"] else []
        out = p if attrs["keepdims"] else drop_axes(p, axes)
        return [self.get(node.inputs[0], p)], attrs, [out]


@register_pass
class ConvertLayout(Pass):
    """Convert the graph to the march's native layout (NHWC), transposes only at the inputs, the
    outputs and before reshapes that mix channels with spatial dims (see the module docstring)."""

    name = "convert-layout"
    opt_level = 3
    options = {"layout": ("str", "NHWC")}

    def run(self, graph: Graph) -> bool:
        target = self.opts["layout"]
        if target not in LAYOUT_ATTR_CHOICES:
            raise InputError(f"pass 'convert-layout': layout={target} is not one of "
                             f"{', '.join(LAYOUT_ATTR_CHOICES)}")
        conv = _Converter(graph, target)
        new = conv.convert(self.walk(graph))
        if not conv.changed:
            return False
        graph.replace_contents(new)
        return True
