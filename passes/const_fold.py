"""Constant folding: a node whose inputs are all constants becomes constants.

Runs each such node's float reference (the same numpy code the interpreter runs) at compile
time. Because nodes are visited in topological order, a chain of constant nodes folds in one
sweep, so static-shape subgraphs (what is left of ONNX ``Shape -> Gather -> Concat -> ...``
index math once shapes are known) and weight preprocessing (``transpose(W)``, ``W * s``)
disappear entirely.
"""

from __future__ import annotations

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value

from .base import Pass, register_pass

#: Default cap on the elements a fold may produce (over all outputs of one node): bigger
#: results stay nodes, so folding cannot blow up the size of the model.
MAX_FOLD_ELEMENTS = 1 << 24


@register_pass
class ConstantFold(Pass):
    """Evaluate nodes whose present inputs are all constants and replace their outputs by
    constants of the same name and type (layout and quantization included), so graph-output
    names and downstream types do not change; a folded graph output stays an output.

    Skipped (and explained): ops declared ``foldable=False`` (quantize/dequantize: a QDQ pair
    around a weight is kept for the quantizer), and nodes whose results would exceed
    ``max_elements`` elements. Input constants only the folded nodes used are removed.
    """

    name = "const-fold"
    opt_level = 1
    options = {"max_elements": ("int", MAX_FOLD_ELEMENTS)}

    def run(self, graph: Graph) -> bool:
        changed = False
        for node in self.walk(graph):
            present = [v for v in node.inputs if v is not None]
            if not present or not all(v.is_const for v in present):
                continue
            if not node.opdef.foldable:
                self.explain(node, f"op '{node.op}' is not foldable (kept for quantization)")
                continue
            size = sum(v.type.numel for v in node.outputs)
            if size > self.opts["max_elements"]:
                self.explain(node, f"result has {size} elements, more than the folding limit "
                                   f"of {self.opts['max_elements']} (option max_elements)")
                continue
            self._fold(graph, node)
            changed = True
        return changed

    def _fold(self, graph: Graph, node: Node) -> None:
        inputs = list(node.inputs)
        results = _evaluate(graph, node)
        names = [v.name for v in node.outputs]
        consts: list[Value] = []
        for v, array in zip(list(node.outputs), results, strict=True):
            # A temporary name first: the node's output still holds the final one.
            c = graph.add_constant(f"{v.name}.folded", array, type_=v.type)
            graph.replace_all_uses(v, c)
            consts.append(c)
        graph.remove_node(node)
        for name, c in zip(names, consts, strict=True):
            graph.rename_value(c, name)
        # Constants only this node read are now dead weight.
        outputs = {id(v) for v in graph.outputs}
        for v in dict.fromkeys(v for v in inputs if v is not None):
            if not v.uses and id(v) not in outputs:
                graph.remove_value(v)


def _evaluate(graph: Graph, node: Node) -> list[np.ndarray]:
    """The node's results from its reference, checked against the recorded output types."""
    opdef = node.opdef
    args = [None if v is None else graph.constants[v.name] for v in node.inputs]
    if opdef.needs_input_types:
        types = [None if v is None else v.type for v in node.inputs]
        results = opdef.reference(args, node.attrs, input_types=types)
    else:
        results = opdef.reference(args, node.attrs)
    out = []
    for v, r in zip(node.outputs, results, strict=False):
        r = np.asarray(r)
        if r.shape != v.shape or r.dtype != v.type.np_dtype:
            raise InputError(f"reference produced {r.dtype}{list(r.shape)} for %{v.name}, "
                             f"its type says {v.type.np_dtype}{list(v.shape)}")
        out.append(r)
    if len(out) != len(node.outputs):
        raise InputError(f"reference produced {len(out)} results for {len(node.outputs)} outputs")
    return out
