"""Concat, Split, Slice, Pad, Reshape, Flatten, Transpose, Squeeze, Unsqueeze, Gather, Identity,
Dropout, Constant, Cast, Shape, DepthToSpace, SpaceToDepth.

Shape-carrying inputs (Reshape's shape, Slice's bounds, axes, pads) must be constants; the
converters resolve ONNX placeholders (0 and -1 in Reshape shapes, negative axes, missing
defaults) so the IR ops get fully static attributes. Flatten, Squeeze and Unsqueeze become
``reshape``; Identity and inference-mode Dropout just rebind their input; Constant and Shape
become constants.
"""

from __future__ import annotations

import math

import numpy as np

from hbc.ir.limits import check_shape
from hbc.ir.ops.tensor import slice_ranges

from ..onnx_import import ONNX_DTYPES
from . import converter


def _ints(ctx, node, i: int, attr: str | None = None, *, from_input: bool = True):
    """A list of ints from static input ``i`` (or attribute ``attr`` if not ``from_input``)."""
    if not from_input:
        v = ctx.attrs(node).get(attr)
        return None if v is None else [int(x) for x in v]
    v = ctx.const(node, i)
    return None if v is None else [int(x) for x in np.asarray(v).ravel()]


def _axis(ctx, node, axis: int, rank: int, what: str = "axis") -> int:
    if not -rank <= axis < max(rank, 1):
        ctx.unsupported(node, f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def _reshape(ctx, node, x, shape) -> None:
    shape = [int(d) for d in shape]
    if list(x.shape) == shape:
        ctx.bind(node.output[0], x)
    else:
        ctx.emit("reshape", [x], {"shape": shape}, node=node, outputs=node.output[:1])


@converter("Reshape", static=(1,))
def reshape(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    target = _ints(ctx, node, 1, "shape", from_input=ctx.opset >= 5)
    if target is None:
        ctx.unsupported(node, "the target shape is missing")
    allowzero = a.get("allowzero", 0)
    shape = []
    for i, d in enumerate(target):
        if d == 0 and not allowzero:
            if i >= x.type.rank:
                ctx.unsupported(node, f"shape {target}: 0 at {i} copies a dimension the "
                                f"{x.type.rank}-D input does not have")
            d = x.shape[i]
        shape.append(d)
    if shape.count(-1) > 1 or any(d < -1 for d in shape):
        ctx.unsupported(node, f"shape {target} has more than one -1 or a negative dimension")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.type.numel % known:
            ctx.unsupported(node, f"cannot infer the -1 of shape {target} for input "
                            f"{list(x.shape)}")
        shape[shape.index(-1)] = x.type.numel // known
    _reshape(ctx, node, x, shape)


@converter("Flatten")
def flatten(ctx, node):
    x = ctx.input(node, 0)
    rank = x.type.rank
    axis = ctx.attrs(node).get("axis", 1)
    if not -rank <= axis <= rank:
        ctx.unsupported(node, f"axis {axis} is out of range for rank {rank}")
    axis = axis + rank if axis < 0 else axis
    rows = math.prod(x.shape[:axis])
    _reshape(ctx, node, x, [rows, math.prod(x.shape[axis:])])


@converter("Squeeze", static=(1,))
def squeeze(ctx, node):
    x = ctx.input(node, 0)
    axes = _ints(ctx, node, 1, "axes", from_input=ctx.opset >= 13)
    if not axes:  # absent (or empty): every axis of size 1
        axes = [i for i, d in enumerate(x.shape) if d == 1]
    axes = {_axis(ctx, node, a, x.type.rank, "squeeze axis") for a in axes}
    bad = [a for a in sorted(axes) if x.shape[a] != 1]
    if bad:
        ctx.unsupported(node, f"cannot squeeze axes {bad} of shape {list(x.shape)} "
                        "(their size is not 1)")
    _reshape(ctx, node, x, [d for i, d in enumerate(x.shape) if i not in axes])


@converter("Unsqueeze", static=(1,))
def unsqueeze(ctx, node):
    x = ctx.input(node, 0)
    axes = _ints(ctx, node, 1, "axes", from_input=ctx.opset >= 13)
    if not axes:
        ctx.unsupported(node, "axes are missing")
    out_rank = x.type.rank + len(axes)
    axes = sorted({_axis(ctx, node, a, out_rank, "unsqueeze axis") for a in axes})
    if len(axes) != out_rank - x.type.rank:
        ctx.unsupported(node, "axes repeat an axis")
    dims = iter(x.shape)
    _reshape(ctx, node, x, [1 if i in axes else next(dims) for i in range(out_rank)])


@converter("Transpose")
def transpose(ctx, node):
    x = ctx.input(node, 0)
    perm = ctx.attrs(node).get("perm") or list(range(x.type.rank))[::-1]
    ctx.emit("transpose", [x], {"perm": list(perm)}, node=node)


@converter("Concat")
def concat(ctx, node):
    xs = [ctx.input(node, i) for i in range(len(node.input)) if ctx.has_input(node, i)]
    axis = ctx.attrs(node).get("axis")
    if axis is None:
        ctx.unsupported(node, "attribute axis is required")
    ctx.emit("concat", xs, {"axis": _axis(ctx, node, axis, xs[0].type.rank)}, node=node)


@converter("Split", static=(1,))
def split(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    axis = _axis(ctx, node, a.get("axis", 0), x.type.rank)
    dim = x.shape[axis]
    sizes = _ints(ctx, node, 1, "split", from_input=ctx.opset >= 13)
    n = len(node.output)
    if sizes is None and "num_outputs" in a:
        count = a["num_outputs"]
        chunk = -(-dim // count)
        sizes = [chunk] * (count - 1) + [dim - chunk * (count - 1)]
        if sizes[-1] < 0:
            ctx.unsupported(node, f"cannot split {dim} into {count} chunks of {chunk}")
    elif sizes is None:
        if dim % n:
            ctx.unsupported(node, f"axis {axis} of size {dim} does not split evenly into {n}")
        sizes = [dim // n] * n
    if len(sizes) != n:
        ctx.unsupported(node, f"{len(sizes)} split sizes for {n} outputs")
    ctx.emit("split", [x], {"axis": axis, "sizes": sizes}, node=node)


@converter("Slice", static=(1, 2, 3, 4))
def slice_(ctx, node):
    x = ctx.input(node, 0)
    old = ctx.opset < 10
    starts = _ints(ctx, node, 1, "starts", from_input=not old)
    ends = _ints(ctx, node, 2, "ends", from_input=not old)
    axes = _ints(ctx, node, 3, "axes", from_input=not old)
    steps = None if old else _ints(ctx, node, 4)
    if starts is None or ends is None:
        ctx.unsupported(node, "starts and ends are required")
    attrs = {"starts": starts, "ends": ends, "axes": axes or list(range(len(starts))),
             "steps": steps or [1] * len(starts)}
    try:
        ranges = slice_ranges(x.shape, attrs)
    except Exception as e:
        ctx.unsupported(node, str(e))
    # Canonical bounds: clamped non-negative starts, ends past the edge as dim or -dim-1.
    canon: dict[str, list[int]] = {"starts": [], "ends": [], "axes": [], "steps": []}
    for axis, (r, dim) in enumerate(zip(ranges, x.shape, strict=True)):
        start, stop, step = r.indices(dim)
        if step == 1 and start == 0 and stop >= dim:
            continue
        end = r.stop if r.stop is not None else -dim - 1
        for k, v in zip(canon, (r.start, end, axis, step), strict=True):
            canon[k].append(v)
    if not canon["axes"]:
        ctx.bind(node.output[0], x)
        return
    ctx.emit("slice", [x], canon, node=node)


@converter("Pad", static=(1, 2, 3))
def pad(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    rank = x.type.rank
    mode = a.get("mode", "constant")
    if ctx.opset < 11:
        pads = [int(p) for p in a.get("pads", a.get("paddings", []))]
        value = float(a.get("value", 0.0))
        axes = None
    else:
        pads = _ints(ctx, node, 1) or []
        v = ctx.const(node, 2)
        value = 0.0 if v is None or v.size == 0 else float(np.asarray(v).ravel()[0])
        axes = _ints(ctx, node, 3)
    if axes is not None:
        axes = [_axis(ctx, node, ax, rank, "pad axis") for ax in axes]
        if len(pads) != 2 * len(axes):
            ctx.unsupported(node, f"{len(pads)} pads for {len(axes)} axes")
        full = [0] * (2 * rank)
        for i, ax in enumerate(axes):
            full[ax], full[rank + ax] = pads[i], pads[len(axes) + i]
        pads = full
    if len(pads) != 2 * rank:
        ctx.unsupported(node, f"{len(pads)} pads for rank {rank} (expected {2 * rank})")
    if not any(pads):
        ctx.bind(node.output[0], x)
        return
    ctx.emit("pad", [x], {"pads": pads, "mode": mode, "value": value}, node=node)


@converter("Gather")
def gather(ctx, node):
    x = ctx.input(node, 0)
    axis = _axis(ctx, node, ctx.attrs(node).get("axis", 0), x.type.rank)
    ctx.emit("gather", [x, ctx.input(node, 1)], {"axis": axis}, node=node)


@converter("Identity")
def identity(ctx, node):
    ctx.bind(node.output[0], ctx.input(node, 0))


@converter("Dropout", static=(1, 2))
def dropout(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    if ctx.opset < 7:
        training, ratio = not a.get("is_test", 0), a.get("ratio", 0.5)
    elif ctx.opset < 12:
        training, ratio = False, a.get("ratio", 0.5)
    else:
        t = ctx.const(node, 2)
        r = ctx.const(node, 1)
        training = bool(t is not None and np.asarray(t).ravel()[0])
        ratio = 0.5 if r is None else float(np.asarray(r).ravel()[0])
    if training and ratio > 0:
        ctx.unsupported(node, f"training_mode with ratio {ratio} drops random elements; hbc "
                        "compiles inference graphs (export the model in eval mode)")
    ctx.bind(node.output[0], x)
    if len(node.output) > 1 and node.output[1]:
        mask_dtype = np.bool_ if ctx.opset >= 10 else x.type.np_dtype
        ctx.bind_const(node.output[1], np.ones(x.shape, dtype=mask_dtype))


@converter("Constant")
def constant(ctx, node):
    a = ctx.attrs(node)
    if "value" in a:
        arr = np.asarray(a["value"])
    elif "value_float" in a:
        arr = np.asarray(a["value_float"], dtype=np.float32)
    elif "value_floats" in a:
        arr = np.asarray(a["value_floats"], dtype=np.float32)
    elif "value_int" in a:
        arr = np.asarray(a["value_int"], dtype=np.int64)
    elif "value_ints" in a:
        arr = np.asarray(a["value_ints"], dtype=np.int64)
    else:
        ctx.unsupported(node, f"only numeric tensor constants are supported, got {sorted(a)}")
    if arr.dtype.kind in "OUS":
        ctx.unsupported(node, "string constants are not supported")
    ctx.bind_const(node.output[0], arr)


@converter("Cast")
def cast(ctx, node):
    a = ctx.attrs(node)
    to = ONNX_DTYPES.get(a.get("to"))
    if to is None:
        ctx.unsupported(node, f"cast to element type {a.get('to')} has no hbir dtype")
    attrs = {"to": to, "saturate": a.get("saturate", 1), "round_mode": a.get("round_mode", "up")}
    ctx.emit("cast", [ctx.input(node, 0)], attrs, node=node)


@converter("Shape")
def shape(ctx, node):
    a = ctx.attrs(node)
    dims = ctx.input(node, 0).shape[a.get("start", 0):a.get("end")]
    ctx.bind_const(node.output[0], np.asarray(dims, dtype=np.int64))


@converter("ConstantOfShape", static=(0,))
def constant_of_shape(ctx, node):
    shape = [int(d) for d in np.asarray(ctx.const(node, 0)).reshape(-1)]
    if any(d < 0 for d in shape):
        ctx.unsupported(node, f"shape {shape} has a negative dimension")
    value = ctx.attrs(node).get("value")
    fill = np.zeros(1, np.float32) if value is None else np.asarray(value).reshape(-1)
    if fill.size != 1:
        ctx.unsupported(node, f"value must hold one element, got {fill.size}")
    check_shape(shape, fill.dtype.itemsize, f"ConstantOfShape node '{ctx.where(node)}': "
                f"output {fill.dtype}{shape}")
    ctx.bind_const(node.output[0], np.full(shape, fill[0], dtype=fill.dtype))


@converter("DepthToSpace", "SpaceToDepth")
def depth_space(ctx, node):
    a = ctx.attrs(node)
    op = "depth_to_space" if node.op_type == "DepthToSpace" else "space_to_depth"
    attrs = {"blocksize": a.get("blocksize"), "mode": a.get("mode", "DCR")}
    ctx.emit(op, [ctx.input(node, 0)], attrs, node=node)
