"""check-layout: layouts of layout-sensitive ops, declared input types, inputs that feed nothing.

Checks, reporting every problem at once (one PassError listing them, each naming the node or
input):

* every layout-sensitive op (an op whose registry declaration has a ``layout`` attribute) on a
  rank >= 3 input uses a layout the march allows, and its data input is not tagged with the
  other layout;
* every model input's declared input type is consistent with its shape;
* no model input is left over that feeds nothing (an auxiliary input such as a detector's
  ``im_hw`` kept in a segmentation-only model): it would be a required input the model ignores.

Input types are declared in ``graph.meta["input_types"]``, a dict ``{input name: type}``;
inputs not listed are ``featuremap``. The channel axis is 1, or the last axis when the input's
type is tagged NHWC. The types:

    featuremap   any tensor (no constraint)
    rgb, bgr     an image: rank 4 with 3 channels
    yuv444       rank 4 with 3 channels (full-resolution chroma)
    gray         rank 4 with 1 channel
    nv12         rank 4 with 3 channels at the model level and even H and W: on the chip it
                 arrives as YUV420 semi-planar (a full Y plane, then interleaved UV at half
                 resolution in both directions), so H and W must halve exactly
"""

from __future__ import annotations

from hbc.errors import InputError
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.ops.common import LAYOUT_ATTR_CHOICES

from .base import Pass, PassError, register_pass
from .layout_perm import layout_inputs, layout_sensitive

#: Layouts the BPU marches run layout-sensitive ops in. The march tables (a later issue) will
#: own this per march; until then it is one constant, overridable by the ``layout`` option.
ALLOWED = frozenset({"NHWC"})

#: input type -> (required channels or None for any, needs even H and W)
INPUT_TYPES: dict[str, tuple[int | None, bool]] = {
    "featuremap": (None, False),
    "rgb": (3, False),
    "bgr": (3, False),
    "yuv444": (3, False),
    "gray": (1, False),
    "nv12": (3, True),
}


def _input_problems(v: Value, kind: str) -> list[str]:
    """What is wrong with input ``v`` declared as ``kind``."""
    where = f"input '{v.name}' ({kind}, shape {list(v.shape)})"
    if kind not in INPUT_TYPES:
        return [f"input '{v.name}': unknown input type '{kind}' (expected one of "
                f"{', '.join(INPUT_TYPES)})"]
    channels, even = INPUT_TYPES[kind]
    if kind == "featuremap":
        return []
    if v.type.rank != 4:
        return [f"{where}: an image input must have rank 4 ([N, C, H, W] or NHWC)"]
    nhwc = v.type.layout == "NHWC"
    c = v.shape[3] if nhwc else v.shape[1]
    h, w = (v.shape[1], v.shape[2]) if nhwc else (v.shape[2], v.shape[3])
    out = []
    if channels is not None and c != channels:
        axis = "last axis (NHWC)" if nhwc else "axis 1"
        out.append(f"{where}: needs {channels} channel(s) on the {axis}, has {c}")
    if even and (h % 2 or w % 2):
        out.append(f"{where}: needs even H and W (YUV420 halves them for chroma), has "
                   f"{h}x{w}")
    return out


def _op_problems(node: Node, allowed: frozenset[str]) -> list[str]:
    x = node.inputs[0]
    if x is None or x.type.rank < 3:
        return []
    where = f"{node.op} node '{node.where()}'"
    layout = node.attrs["layout"]
    out = []
    if layout not in allowed:
        out.append(f"{where}: layout {layout} is not allowed (allowed: "
                   f"{', '.join(sorted(allowed))})")
    for i in layout_inputs(node.op):
        v = node.inputs[i] if i < len(node.inputs) else None
        if v is not None and v.type.layout is not None and v.type.layout != layout:
            out.append(f"{where}: input %{v.name} is tagged {v.type.layout} but the op reads "
                       f"{layout}")
    return out


@register_pass
class CheckLayout(Pass):
    """Check layouts, declared input types and unused inputs; raise one PassError listing
    every problem, each naming its node or input. Changes nothing.

    Input types are declared as ``graph.meta["input_types"] = {input name: type}`` with type one
    of featuremap (the default for inputs not listed), rgb, bgr, yuv444, gray, nv12; the shape
    each needs is in the module docstring. A disallowed layout comes with the hint to run
    convert-layout. Option ``layout`` replaces ALLOWED by that one layout (for tests).
    """

    name = "check-layout"
    opt_level = 3
    #: layout: the one allowed layout (empty: ALLOWED)
    options = {"layout": ("str", "")}

    def run(self, graph: Graph) -> bool:
        layout = self.opts["layout"]
        if layout and layout not in LAYOUT_ATTR_CHOICES:
            raise InputError(f"pass 'check-layout': layout={layout} is not one of "
                             f"{', '.join(LAYOUT_ATTR_CHOICES)}")
        allowed = frozenset({layout}) if layout else ALLOWED
        problems: list[str] = []
        declared = graph.meta.get("input_types") or {}
        if not isinstance(declared, dict):
            raise InputError("graph.meta['input_types'] must be a dict {input name: type}")
        names = {v.name for v in graph.inputs}
        problems += [f"input_types names '{n}', which is not an input of graph "
                     f"'{graph.name}' (inputs: {', '.join(sorted(names))})"
                     for n in declared if n not in names]
        for v in graph.inputs:
            problems += _input_problems(v, str(declared.get(v.name, "featuremap")))
            if not v.uses and v not in graph.outputs:
                problems.append(f"input '{v.name}' feeds nothing: remove it from the model's "
                                "inputs (an auxiliary input left over from another task?)")
        for node in self.walk(graph):
            if layout_sensitive(node.op):
                problems += _op_problems(node, allowed)
        if problems:
            hint = "run convert-layout" if any("is not allowed" in p for p in problems) else None
            raise PassError(f"check-layout: graph '{graph.name}' has {len(problems)} layout "
                            "problem(s):\n  " + "\n  ".join(problems), hint=hint)
        return False
