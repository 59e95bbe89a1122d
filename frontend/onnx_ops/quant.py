"""QuantizeLinear and DequantizeLinear (QDQ models).

Scales and zero points must be constants; they become :class:`~hbc.ir.types.QuantParams`.
``QuantizeLinear`` becomes ``quantize``, whose result type carries them. ``DequantizeLinear``
becomes ``dequantize``, which reads them from its input's type, so the converter attaches them
there: a constant input (the int8 weights of a QDQ model) or a graph input is retyped in place
when nothing else has claimed it, a constant shared with another use gets a quantized copy, and a
node result must already carry the same parameters (it normally comes from a ``QuantizeLinear``).
Blocked quantization (``block_size``) is not supported.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from hbc.errors import InputError
from hbc.ir.ops.quant import FLOAT8, QUANT_DTYPES, check_quant
from hbc.ir.registry import InferError
from hbc.ir.types import QuantParams, TensorType, dtype_of

from ..onnx_import import ONNX_DTYPES
from . import converter


def _params(ctx, node, x: TensorType) -> tuple[QuantParams, np.ndarray, np.ndarray | None]:
    """(QuantParams, scale array, zero point array) of a Q/DQ node for input type ``x``."""
    a = ctx.attrs(node)
    if a.get("block_size", 0):
        ctx.unsupported(node, f"blocked quantization (block_size={a['block_size']}) is not "
                        "supported; use per-tensor or per-axis scales")
    scale = np.asarray(ctx.const(node, 1))
    zp = ctx.const(node, 2)
    if scale.ndim > 1:
        ctx.unsupported(node, f"scale of shape {list(scale.shape)}: only a scalar or a 1-D "
                        "per-axis scale is supported")
    if scale.size == 1:
        axis = None
    else:
        axis = a.get("axis", 1)
        if not -x.rank <= axis < x.rank:
            ctx.unsupported(node, f"axis {axis} is out of range for rank {x.rank}")
        axis %= x.rank
    zero_point = None
    if zp is not None:
        zp = np.asarray(zp)
        if zp.size != scale.size:
            ctx.unsupported(node, f"{zp.size} zero points for {scale.size} scales")
        zf = zp.astype(np.float64).ravel()
        if not np.all(zf == np.round(zf)):
            ctx.unsupported(node, f"zero points {zf.tolist()} are not integers")
        zero_point = tuple(int(z) for z in zf)
    try:
        q = QuantParams(tuple(scale.astype(np.float64).ravel()), axis, zero_point)
        check_quant(q, x, node.op_type)
    except (InputError, InferError) as e:
        ctx.unsupported(node, str(e))
    return q, scale, zp


@converter("QuantizeLinear", static=(1, 2))
def quantize_linear(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    zp = ctx.const(node, 2)
    if zp is not None:
        dtype = dtype_of(zp)
    elif a.get("output_dtype", 0):
        dtype = ONNX_DTYPES.get(a["output_dtype"], str(a["output_dtype"]))
    else:
        dtype = "u8"
    if dtype not in QUANT_DTYPES:
        ctx.unsupported(node, f"quantization to {dtype} is not supported "
                        f"(supported: {', '.join(QUANT_DTYPES)})")
    precision = a.get("precision", 0)
    if precision and ONNX_DTYPES.get(precision) != x.dtype:
        ctx.unsupported(node, f"precision {TensorProto.DataType.Name(precision)} differs from the "
                        f"input dtype {x.dtype}")
    q, _, _ = _params(ctx, node, x.type.with_(dtype=dtype))
    attrs = {"dtype": dtype, "scale": list(q.scale), "saturate": a.get("saturate", 1)}
    if q.axis is not None:
        attrs["axis"] = q.axis
    if q.zero_point is not None:
        attrs["zero_point"] = list(q.zero_point)
    ctx.emit("quantize", [x], attrs, node=node)


@converter("DequantizeLinear", static=(1, 2))
def dequantize_linear(ctx, node):
    x = ctx.input(node, 0)
    a = ctx.attrs(node)
    if x.dtype not in QUANT_DTYPES and x.dtype != "i32":
        ctx.unsupported(node, f"cannot dequantize a {x.dtype} tensor")
    q, scale, zp = _params(ctx, node, x.type)
    if zp is not None and zp.dtype != x.type.np_dtype:
        ctx.unsupported(node, f"zero point dtype {dtype_of(zp)} differs from the input's "
                        f"{x.dtype}")
    if zp is not None and x.dtype in FLOAT8 and np.any(zp.astype(np.float32) != 0):
        ctx.unsupported(node, "float8 zero points must be 0")
    out = ONNX_DTYPES.get(a["output_dtype"]) if a.get("output_dtype") else dtype_of(scale)
    if out not in ("f32", "f16", "bf16"):
        ctx.unsupported(node, f"dequantize to {out} is not supported (f32, f16 or bf16)")
    ctx.emit("dequantize", [_with_quant(ctx, node, x, q)], {"dtype": out}, node=node)


def _with_quant(ctx, node, x, q: QuantParams):
    """``x``, or a stand-in for it, whose type carries ``q``."""
    if x.type.quant == q:
        return x
    graph = ctx.graph
    if x.is_const:
        if x.type.quant is None and not x.uses and x not in graph.outputs:
            graph.retype(x, x.type.with_(quant=q))
            return x
        return graph.add_constant(x.name + "_q", graph.constants[x.name],
                                  type_=x.type.with_(quant=q))
    if x.kind == "input" and x.type.quant is None:
        graph.retype(x, x.type.with_(quant=q))
        return x
    have = "no quantization" if x.type.quant is None else f"different quantization {x.type.quant}"
    ctx.unsupported(node, f"input %{x.name} has {have}, expected {q} (the integer tensor should "
                    "come from a QuantizeLinear with the same scale and zero point)")
