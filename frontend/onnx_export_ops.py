"""Per-op ONNX export: one function per IR op (or family of ops), registered with
:func:`~hbc.frontend.onnx_export.exporter`.

Each function writes the ONNX nodes of one IR node: its outputs keep their IR names, helper
tensors and initializers get fresh ones. Attributes are written explicitly where ONNX defaults
could differ between opsets. The fused ops become their chains: conv_fused is Conv, then Add of
the residual, then the activation (Relu, or Clip for relu6/clip); linear is Gemm (transB=1) for
a matrix x and MatMul with the transposed weight plus Add of the bias otherwise, then the
activation; scale_shift is Mul and Add with per-channel constants reshaped to broadcast.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hbc.ir.graph import Node
from hbc.ir.ops.quant import FLOAT8
from hbc.ir.registry import get_op
from hbc.ir.types import numpy_dtype

from .onnx_export import (
    Chain,
    ExportContext,
    Unexportable,
    exporter,
    layout_of,
    onnx_elem_type,
    to_channels_last_perm,
)

log = logging.getLogger(__name__)


def _window(node: Node, kernel: Sequence[int]) -> dict[str, Any]:
    a = node.attrs
    return {"kernel_shape": list(kernel), "strides": a["strides"], "pads": a["pads"],
            "dilations": a["dilations"]}


def _activation(chain: Chain, node: Node, dtype: str) -> Chain:
    """Append the fused activation (attributes activation, clip_min, clip_max)."""
    act = node.attrs["activation"]
    if act == "relu":
        chain.then("Relu")
    elif act in ("relu6", "clip"):
        lo, hi = (0.0, 6.0) if act == "relu6" else (node.attrs["clip_min"],
                                                    node.attrs["clip_max"])
        _clip_step(chain, node, dtype, lo, hi)
    return chain


def _clip_step(chain: Chain, node: Node, dtype: str, lo: float, hi: float,
               main: bool = False) -> None:
    """Clip with the IR's bounds: infinite float bounds are left out; on integer tensors the
    bounds round inwards and clamp to the dtype's range (the reference of ``clip``)."""
    np_dtype = numpy_dtype(dtype)
    if np.issubdtype(np_dtype, np.integer):
        info = np.iinfo(np_dtype)
        lo_i = info.min if lo <= info.min else int(math.ceil(lo))
        hi_i = info.max if hi >= info.max else int(math.floor(hi))
        lo_i, hi_i = min(max(lo_i, info.min), info.max), max(min(hi_i, info.max), info.min)
        bounds = [None if lo_i == info.min else lo_i, None if hi_i == info.max else hi_i]
    else:
        bounds = [None if lo == -math.inf else lo, None if hi == math.inf else hi]
    names = ["" if b is None else chain.ctx.scalar(node, b, dtype, what)
             for b, what in zip(bounds, ("min", "max"), strict=True)]
    chain.then("Clip", *names, main=main)


# -- nn ---------------------------------------------------------------------------------------
@exporter("conv", "conv_fused")
def conv(ctx: ExportContext, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    attrs = _window(node, w.shape[2:])
    chain = ctx.chain(node).then("Conv", w.name, "" if b is None else b.name, main=True,
                                 group=node.attrs["groups"], **attrs)
    chain.back_to_layout()
    if node.op == "conv_fused":
        residual = node.inputs[3] if len(node.inputs) > 3 else None
        if residual is not None:
            chain.then("Add", residual.name)
        _activation(chain, node, x.dtype)
    chain.emit(ctx.channels_first_input(node))


@exporter("conv_transpose")
def conv_transpose(ctx: ExportContext, node: Node) -> None:
    w = node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    a = node.attrs
    chain = ctx.chain(node).then(
        "ConvTranspose", w.name, "" if b is None else b.name, main=True, group=a["groups"],
        output_padding=a["output_padding"] if any(a["output_padding"]) else None,
        **_window(node, w.shape[2:]))
    chain.back_to_layout().emit(ctx.channels_first_input(node))


@exporter("batch_norm")
def batch_norm(ctx: ExportContext, node: Node) -> None:
    params = [v.name for v in node.inputs[1:5]]
    chain = ctx.chain(node).then("BatchNormalization", *params, main=True,
                                 epsilon=node.attrs["epsilon"])
    chain.back_to_layout().emit(ctx.channels_first_input(node))


@exporter("gemm")
def gemm(ctx: ExportContext, node: Node) -> None:
    a = node.attrs
    ctx.add("Gemm", ctx.inputs(node), ctx.outputs(node), node, alpha=a["alpha"],
            beta=a["beta"], transA=a["trans_a"], transB=a["trans_b"])


@exporter("matmul")
def matmul(ctx: ExportContext, node: Node) -> None:
    ctx.add("MatMul", ctx.inputs(node), ctx.outputs(node), node)


@exporter("linear")
def linear(ctx: ExportContext, node: Node) -> None:
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    chain = ctx.chain(node)
    if x.type.rank == 2:
        chain.then("Gemm", w.name, "" if b is None else b.name, main=True, transB=1)
    else:
        wt = ctx.add("Transpose", [w.name], 1, node, "weight_t", perm=[1, 0])[0]
        chain.then("MatMul", wt, main=True)
        if b is not None:
            chain.then("Add", b.name)
    _activation(chain, node, x.dtype).emit(x.name)


@exporter("scale_shift")
def scale_shift(ctx: ExportContext, node: Node) -> None:
    """y = x * scale + shift with [C, 1, ...] constants; f16 computes in f32 and rounds once,
    as the reference does."""
    x = node.inputs[0]
    axis = node.attrs["axis"] % x.type.rank
    shape = [-1] + [1] * (x.type.rank - 1 - axis)
    acc = "f64" if x.dtype == "f64" else "f32"
    scale, shift = (_per_channel(ctx, node, v, shape, acc) for v in node.inputs[1:])
    chain = ctx.chain(node)
    wide = x.dtype == "f16"
    if wide:
        chain.then("Cast", to=onnx_elem_type("f32"))
    chain.then("Mul", scale, main=True).then("Add", shift)
    if wide:
        chain.then("Cast", to=onnx_elem_type("f16"))
    chain.emit(x.name)


def _per_channel(ctx: ExportContext, node: Node, v, shape: list[int], acc: str) -> str:
    """A per-channel vector in dtype ``acc``, reshaped to broadcast along the channel axis:
    a new initializer for a constant, Cast + Reshape nodes otherwise."""
    if v.is_const:
        data = np.asarray(ctx.graph.constants[v.name], dtype=numpy_dtype(acc))
        return ctx.const(data.reshape(shape), f"{v.name}/bcast")
    name = v.name
    if v.dtype != acc:
        name = ctx.add("Cast", [name], 1, node, "widen", to=onnx_elem_type(acc))[0]
    return ctx.add("Reshape", [name, ctx.ints(shape, f"{node.name}/bcast_shape")], 1, node,
                   "bcast")[0]


# -- pools ------------------------------------------------------------------------------------
def _pool_attrs(node: Node) -> dict[str, Any]:
    a = node.attrs
    attrs = _window(node, a["kernel"])
    attrs["ceil_mode"] = a["ceil_mode"]
    return attrs


def _avg_pool_requires(node: Node) -> list[tuple[int, str]]:
    if any(d != 1 for d in node.attrs["dilations"]):
        return [(19, f"dilations {node.attrs['dilations']} (AveragePool-19)")]
    return []


@exporter("avg_pool", requires=_avg_pool_requires)
def avg_pool(ctx: ExportContext, node: Node) -> None:
    attrs = _pool_attrs(node)
    if all(d == 1 for d in attrs["dilations"]):
        attrs["dilations"] = None
    chain = ctx.chain(node).then("AveragePool", main=True,
                                 count_include_pad=node.attrs["count_include_pad"], **attrs)
    chain.back_to_layout().emit(ctx.channels_first_input(node))


@exporter("max_pool")
def max_pool(ctx: ExportContext, node: Node) -> None:
    """MaxPool; the indices output is written only when something reads it."""
    wanted = [v for v in node.outputs if v is node.outputs[0] or ctx.is_used(v)]
    x = ctx.channels_first_input(node)
    attrs = dict(_pool_attrs(node), storage_order=node.attrs["storage_order"])
    if layout_of(node) == "NCHW":
        ctx.add("MaxPool", [x], [v.name for v in wanted], node, **attrs)
        return
    tmp = ctx.add("MaxPool", [x], len(wanted), node, **attrs)
    for t, v in zip(tmp, wanted, strict=True):
        ctx.add("Transpose", [t], [v.name], node, "to_nhwc",
                perm=to_channels_last_perm(v.type.rank))


@exporter("global_avg_pool", "global_max_pool")
def global_pool(ctx: ExportContext, node: Node) -> None:
    op = "GlobalAveragePool" if node.op == "global_avg_pool" else "GlobalMaxPool"
    ctx.chain(node).then(op, main=True).back_to_layout().emit(ctx.channels_first_input(node))


# -- activations and elementwise --------------------------------------------------------------
#: IR op -> (ONNX op type, the attributes it takes under the same name and meaning)
_SIMPLE: dict[str, tuple[str, tuple[str, ...]]] = {
    "relu": ("Relu", ()), "sigmoid": ("Sigmoid", ()), "tanh": ("Tanh", ()),
    "hard_swish": ("HardSwish", ()), "prelu": ("PRelu", ()), "add": ("Add", ()),
    "sub": ("Sub", ()), "mul": ("Mul", ()), "div": ("Div", ()), "identity": ("Identity", ()),
    "leaky_relu": ("LeakyRelu", ("alpha",)), "hard_sigmoid": ("HardSigmoid", ("alpha", "beta")),
    "softmax": ("Softmax", ("axis",)), "gather": ("Gather", ("axis",)),
    "transpose": ("Transpose", ("perm",)), "concat": ("Concat", ("axis",)),
    "argmax": ("ArgMax", ("axis", "keepdims", "select_last_index")),
}


@exporter(*_SIMPLE)
def simple(ctx: ExportContext, node: Node) -> None:
    """Ops whose ONNX form has the same inputs and attributes. An attribute the ONNX op does
    not have (one added to the IR op later) is an error unless it has its default value."""
    op_type, names = _SIMPLE[node.op]
    extra = [k for k, v in node.attrs.items()
             if k not in names and not node.opdef.is_default(k, v)]
    if extra:
        raise Unexportable(f"attribute(s) {', '.join(extra)} have no {op_type} equivalent")
    attrs = {k: node.attrs[k] for k in names}
    ctx.add(op_type, ctx.inputs(node), ctx.outputs(node), node, **attrs)


@exporter("clip")
def clip(ctx: ExportContext, node: Node) -> None:
    x = node.inputs[0]
    chain = ctx.chain(node)
    _clip_step(chain, node, x.dtype, node.attrs["min"], node.attrs["max"], main=True)
    chain.emit(x.name)


# -- tensor -----------------------------------------------------------------------------------
def _reshape_requires(node: Node) -> list[tuple[int, str]]:
    return [(14, "a 0 in the target shape needs allowzero")] if 0 in node.attrs["shape"] else []


@exporter("reshape", requires=_reshape_requires)
def reshape(ctx: ExportContext, node: Node) -> None:
    shape = node.attrs["shape"]
    ctx.add("Reshape", [node.inputs[0].name, ctx.ints(shape, f"{node.name}/shape")],
            ctx.outputs(node), node, allowzero=1 if 0 in shape else None)


@exporter("split")
def split(ctx: ExportContext, node: Node) -> None:
    sizes = ctx.ints(node.attrs["sizes"], f"{node.name}/sizes")
    ctx.add("Split", [node.inputs[0].name, sizes], ctx.outputs(node), node,
            axis=node.attrs["axis"])


@exporter("slice")
def slice_(ctx: ExportContext, node: Node) -> None:
    a = node.attrs
    n = len(a["starts"])
    bounds = [ctx.ints(vals, f"{node.name}/{what}") for what, vals in (
        ("starts", a["starts"]), ("ends", a["ends"]), ("axes", a["axes"] or range(n)),
        ("steps", a["steps"] or [1] * n))]
    ctx.add("Slice", [node.inputs[0].name, *bounds], ctx.outputs(node), node)


def _pad_requires(node: Node) -> list[tuple[int, str]]:
    return [(19, "mode 'wrap' (Pad-19)")] if node.attrs["mode"] == "wrap" else []


@exporter("pad", requires=_pad_requires)
def pad(ctx: ExportContext, node: Node) -> None:
    x, a = node.inputs[0], node.attrs
    value = ""
    if a["mode"] == "constant" and (a["value"] != 0 or math.copysign(1.0, a["value"]) < 0):
        value = ctx.scalar(node, a["value"], x.dtype, "value")
    ctx.add("Pad", [x.name, ctx.ints(a["pads"], f"{node.name}/pads"), value],
            ctx.outputs(node), node, mode=a["mode"])


@exporter("cast")
def cast(ctx: ExportContext, node: Node) -> None:
    a = node.attrs
    to = a["to"]
    saturate = a["saturate"] if to in FLOAT8 and not a["saturate"] else None
    round_mode = a["round_mode"] if to == "f8e8m0" and a["round_mode"] != "up" else None
    ctx.add("Cast", ctx.inputs(node), ctx.outputs(node), node, to=onnx_elem_type(to),
            saturate=saturate, round_mode=round_mode)


@exporter("depth_to_space", "space_to_depth")
def block_rearrange(ctx: ExportContext, node: Node) -> None:
    """DepthToSpace / SpaceToDepth. ONNX SpaceToDepth (before opset 28) has DCR order only, so
    a CRD space_to_depth is written out as Reshape -> Transpose -> Reshape."""
    b, mode = node.attrs["blocksize"], node.attrs["mode"]
    chain = ctx.chain(node)
    if node.op == "depth_to_space":
        chain.then("DepthToSpace", main=True, blocksize=b, mode=mode)
    elif mode == "DCR":
        chain.then("SpaceToDepth", main=True, blocksize=b)
    else:
        n, c, h, w = _nchw_shape(node.inputs[0].type.shape, layout_of(node))
        split = ctx.ints([n, c, h // b, b, w // b, b], f"{node.name}/blocks")
        merged = ctx.ints([n, c * b * b, h // b, w // b], f"{node.name}/merged")
        chain.then("Reshape", split).then("Transpose", main=True, perm=[0, 1, 3, 5, 2, 4])
        chain.then("Reshape", merged)
    chain.back_to_layout().emit(ctx.channels_first_input(node))


def _nchw_shape(shape: Sequence[int], layout: str) -> tuple[int, ...]:
    return tuple(shape) if layout == "NCHW" else (shape[0], shape[-1], *shape[1:-1])


# -- reductions -------------------------------------------------------------------------------
_REDUCE = {"reduce_sum": ("ReduceSum", 13), "reduce_mean": ("ReduceMean", 18),
           "reduce_max": ("ReduceMax", 18)}


def _reduce_requires(node: Node) -> list[tuple[int, str]]:
    if node.op == "reduce_max" and node.inputs[0].dtype == "bool":
        return [(20, "bool input (ReduceMax-20)")]
    return []


@exporter(*_REDUCE, requires=_reduce_requires)
def reduce(ctx: ExportContext, node: Node) -> None:
    """Axes are an input from ReduceSum-13 / ReduceMean-18 / ReduceMax-18 on, an attribute
    before; no axes (empty) reduces every axis in both forms."""
    op_type, axes_input_since = _REDUCE[node.op]
    axes, keepdims = node.attrs["axes"], node.attrs["keepdims"]
    inputs = [node.inputs[0].name]
    if ctx.opset >= axes_input_since:
        if axes:
            inputs.append(ctx.ints(axes, f"{node.name}/axes"))
        ctx.add(op_type, inputs, ctx.outputs(node), node, keepdims=keepdims)
    else:
        ctx.add(op_type, inputs, ctx.outputs(node), node, keepdims=keepdims,
                axes=axes or None)


# -- resampling -------------------------------------------------------------------------------
@dataclass(frozen=True)
class _ResizeForm:
    """How an IR resize is written: ``sizes`` (full rank, or on ``axes`` with a
    keep_aspect_ratio ``policy``), ``scales``, or ``gather`` (nearest by index tables)."""

    kind: str
    values: tuple = ()
    policy: str | None = None
    axes: tuple[int, ...] | None = None
    exact: bool = True


def _resize_form(node: Node) -> _ResizeForm:
    """The ONNX encoding that the importer reads back as this node's exact (size, scales).

    ONNX takes either output sizes (scale = size / in) or scales (size = floor(in * scale),
    scale a float32); sizes with keep_aspect_ratio_policy give one common scale and
    size = round(in * scale). A nearest resize that none of these reproduces (or the
    tf_half_pixel_for_nn mode, which opset 13 removed) becomes one Gather per resized axis.
    """
    a = node.attrs
    shape, size, scales = node.inputs[0].type.shape, a["size"], a["scales"]
    rank = len(shape)
    ctm, mode = a["coordinate_transformation_mode"], a["mode"]
    if ctm == "tf_half_pixel_for_nn":
        if mode != "nearest":
            raise Unexportable(f"coordinate_transformation_mode tf_half_pixel_for_nn with mode "
                               f"{mode} has no ONNX form after Resize-11")
        return _ResizeForm("gather")
    if all(i > 0 and s / i == sc for i, s, sc in zip(shape, size, scales, strict=True)):
        return _ResizeForm("sizes", tuple(size))
    f32 = [float(np.float32(sc)) for sc in scales]
    floor_ok = all(math.floor(i * s) == o for i, s, o in zip(shape, f32, size, strict=True))
    if floor_ok and f32 == list(scales):
        return _ResizeForm("scales", tuple(f32))
    axes = tuple(d for d in range(rank) if size[d] != shape[d] or scales[d] != 1.0)
    if axes and len({scales[d] for d in axes}) == 1 and all(shape[d] > 0 for d in axes):
        ratios = [size[d] / shape[d] for d in axes]
        for policy, pick in (("not_larger", min), ("not_smaller", max)):
            common = pick(ratios)
            if common == scales[axes[0]] and all(
                    int(common * shape[d] + 0.5) == size[d] for d in axes):
                return _ResizeForm("sizes", tuple(size[d] for d in axes), policy, axes)
    if mode == "nearest" and ctm != "tf_crop_and_resize":
        return _ResizeForm("gather")
    if floor_ok:
        return _ResizeForm("scales", tuple(f32), exact=False)
    return _ResizeForm("sizes", tuple(size), exact=False)


def _resize_requires(node: Node) -> list[tuple[int, str]]:
    out = []
    if node.attrs["antialias"]:
        out.append((18, "antialias (Resize-18)"))
    if node.attrs["coordinate_transformation_mode"] == "half_pixel_symmetric":
        out.append((19, "coordinate_transformation_mode half_pixel_symmetric (Resize-19)"))
    try:
        if _resize_form(node).policy is not None:
            out.append((18, "its sizes need keep_aspect_ratio_policy (Resize-18)"))
    except Unexportable:
        pass  # reported when the node is written
    return out


@exporter("resize", requires=_resize_requires)
def resize(ctx: ExportContext, node: Node) -> None:
    a = node.attrs
    x = node.inputs[0]
    form = _resize_form(node)
    if form.kind == "gather":
        _resize_by_gather(ctx, node)
        return
    if not form.exact:
        log.warning(
            "resize node '%s': size %s with scales %s has no exact ONNX encoding; wrote %s "
            "%s (the sampling positions may differ slightly)", node.where(), a["size"],
            a["scales"], form.kind, list(form.values))
    rank = x.type.rank
    roi = ""
    if a["coordinate_transformation_mode"] == "tf_crop_and_resize":
        box = a["roi"] or [0.0] * rank + [1.0] * rank
        if form.axes is not None:
            box = [box[d] for d in form.axes] + [box[rank + d] for d in form.axes]
        roi = ctx.const(np.asarray(box, dtype=np.float32), f"{node.name}/roi")
    if form.kind == "scales":
        scales = ctx.const(np.asarray(form.values, dtype=np.float32), f"{node.name}/scales")
        inputs = [x.name, roi, scales]
    else:
        inputs = [x.name, roi, "", ctx.ints(form.values, f"{node.name}/sizes")]
    linear = a["mode"] != "nearest"
    ctx.add("Resize", inputs, ctx.outputs(node), node, mode=a["mode"],
            coordinate_transformation_mode=a["coordinate_transformation_mode"],
            nearest_mode=a["nearest_mode"] if not linear else None,
            cubic_coeff_a=a["cubic_coeff_a"] if a["mode"] == "cubic" else None,
            exclude_outside=a["exclude_outside"] or None,
            extrapolation_value=a["extrapolation_value"] if roi else None,
            antialias=a["antialias"] or None,
            keep_aspect_ratio_policy=form.policy,
            axes=list(form.axes) if form.axes is not None else None)


def _resize_by_gather(ctx: ExportContext, node: Node) -> None:
    """Nearest resize as one Gather per resized axis; the index tables come from the op's own
    reference applied to 0..n-1 along each axis."""
    a = node.attrs
    shape = node.inputs[0].type.shape
    opdef = get_op("resize")
    axes = [d for d in range(len(shape)) if a["size"][d] != shape[d] or a["scales"][d] != 1.0]
    chain = ctx.chain(node)
    for d in axes:
        one = dict(a, size=[a["size"][d]], scales=[a["scales"][d]], roi=[])
        (index,) = opdef.reference([np.arange(shape[d], dtype=np.int64)], one)
        chain.then("Gather", ctx.ints(index, f"{node.name}/index{d}"), main=d == axes[0],
                   axis=d)
    chain.emit(node.inputs[0].name)


_GRID_MODES_20 = {"bilinear": "linear", "bicubic": "cubic", "nearest": "nearest"}


def _grid_requires(node: Node) -> list[tuple[int, str]]:
    out = [(16, "GridSample-16")]
    if node.inputs[0].type.rank != 4:
        out.append((20, f"a rank-{node.inputs[0].type.rank} input (GridSample-20)"))
    return out


@exporter("grid_sample", requires=_grid_requires)
def grid_sample(ctx: ExportContext, node: Node) -> None:
    a = node.attrs
    mode = a["mode"] if ctx.opset < 20 else _GRID_MODES_20[a["mode"]]
    chain = ctx.chain(node).then("GridSample", node.inputs[1].name, main=True, mode=mode,
                                 padding_mode=a["padding_mode"],
                                 align_corners=a["align_corners"])
    chain.back_to_layout().emit(ctx.channels_first_input(node))


# -- quantization -----------------------------------------------------------------------------
_QDQ_OPSET = {"i16": 21, "u16": 21}


def _qdq_requires(node: Node) -> list[tuple[int, str]]:
    int_type = node.outputs[0].dtype if node.op == "quantize" else node.inputs[0].dtype
    out = []
    if int_type in _QDQ_OPSET:
        out.append((_QDQ_OPSET[int_type], f"{int_type} quantization (QuantizeLinear-21)"))
    if node.op == "quantize" and node.inputs[0].dtype != "f32":
        out.append((19, f"a {node.inputs[0].dtype} input (QuantizeLinear-19)"))
    return out


def _qparams(ctx: ExportContext, node: Node, q, scale_dtype: str, int_dtype: str,
             rank: int) -> tuple[str, str, int | None]:
    """(scale, zero point or '', axis) of a QuantizeLinear/DequantizeLinear."""
    shape = () if q.axis is None else (len(q.scale),)
    scale = ctx.const(np.asarray(q.scale, dtype=numpy_dtype(scale_dtype)).reshape(shape),
                      f"{node.name}/scale")
    zp = ""
    if q.zero_point is not None or node.op == "quantize":  # a quantize's zp names its dtype
        values = np.asarray(q.zero_point or [0] * len(q.scale))
        zp = ctx.const(values.astype(numpy_dtype(int_dtype)).reshape(shape),
                       f"{node.name}/zero_point")
    return scale, zp, None if q.axis is None else q.axis % rank


@exporter("quantize", requires=_qdq_requires)
def quantize(ctx: ExportContext, node: Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    if x.dtype not in ("f32", "f16"):
        raise Unexportable(f"QuantizeLinear takes f32/f16/bf16 inputs, not {x.dtype} (the "
                           "division happens in the input's dtype)")
    scale, zp, axis = _qparams(ctx, node, y.type.quant, x.dtype, y.dtype, x.type.rank)
    saturate = node.attrs["saturate"] if y.dtype in FLOAT8 and not node.attrs["saturate"] \
        else None
    ctx.add("QuantizeLinear", [x.name, scale, zp], [y.name], node, axis=axis,
            saturate=saturate)


@exporter("dequantize", requires=_qdq_requires)
def dequantize(ctx: ExportContext, node: Node) -> None:
    """DequantizeLinear with an f32 scale (the reference computes in f32), then a Cast to
    f16/bf16 when that is the result type."""
    x = node.inputs[0]
    scale, zp, axis = _qparams(ctx, node, x.type.quant, "f32", x.dtype, x.type.rank)
    chain = ctx.chain(node).then("DequantizeLinear", scale, zp, main=True, axis=axis)
    if node.attrs["dtype"] != "f32":
        chain.then("Cast", to=onnx_elem_type(node.attrs["dtype"]))
    chain.emit(x.name)
