"""Torch kernels of the float ops a CPU fallback keeps in an integer graph (``dequantize ->
float op -> quantize``), with ``torch.nn.functional`` where it has the op.

These follow the float semantics of the op declarations (ONNX), computing f16 in f32; they are
not promised bit-identical to the numpy float references (a float convolution may sum in another
order), only equal to float rounding. Integer ops never come through here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .torch_conv import col, from_cf, pad_spatial, to_cf, window_padded, window_taps
from .torch_kernels import TORCH_DTYPES, NodeCtx, kernel
from .torch_resize import round_saturate


def _acc(x: torch.Tensor) -> torch.dtype:
    """f64 math for f64 (and integers), f32 otherwise."""
    if x.dtype == torch.float64 or not x.dtype.is_floating_point:
        return torch.float64
    return torch.float32


def _act(y: torch.Tensor, attrs: dict) -> torch.Tensor:
    act = attrs["activation"]
    if act == "relu":
        return torch.relu(y)
    if act in ("relu6", "clip"):
        lo, hi = (0.0, 6.0) if act == "relu6" else (attrs["clip_min"], attrs["clip_max"])
        return torch.minimum(torch.maximum(y, torch.tensor(lo, dtype=y.dtype)),
                             torch.tensor(hi, dtype=y.dtype))
    return y


# -- convolutions and products ---------------------------------------------------------------
def _conv(ctx: NodeCtx, x: torch.Tensor, w: torch.Tensor, b) -> torch.Tensor:
    at = ctx.attrs
    x = to_cf(x, at["layout"])
    n = x.dim() - 2
    dt = _acc(x)
    xp = pad_spatial(x.to(dt), at["pads"][:n], at["pads"][n:])
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    y = conv(xp, w.to(dt), None if b is None else b.to(dt), stride=at["strides"],
             dilation=at["dilations"], groups=at["groups"])
    return y


@kernel("conv")
def conv(ctx: NodeCtx, args: list) -> list:
    x, w, b = [*args, None][:3]
    return [from_cf(_conv(ctx, x, w, b).to(x.dtype), ctx.attrs["layout"])]


@kernel("conv_fused")
def conv_fused(ctx: NodeCtx, args: list) -> list:
    x, w, b, r = [*args, None, None][:4]
    y = _conv(ctx, x, w, b)
    if r is not None:
        y = y + to_cf(r, ctx.attrs["layout"]).to(y.dtype)
    return [from_cf(_act(y, ctx.attrs).to(x.dtype), ctx.attrs["layout"])]


@kernel("conv_transpose")
def conv_transpose(ctx: NodeCtx, args: list) -> list:
    x, w, b = [*args, None][:3]
    at = ctx.attrs
    xc = to_cf(x, at["layout"])
    n = xc.dim() - 2
    dt = _acc(xc)
    fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[n - 1]
    full = fn(xc.to(dt), w.to(dt), stride=at["strides"], groups=at["groups"],
              dilation=at["dilations"])
    full = pad_spatial(full, [0] * n, at["output_padding"])
    p = at["pads"]
    y = full[(slice(None), slice(None)) + tuple(
        slice(p[i], full.shape[2 + i] - p[n + i]) for i in range(n))]
    if b is not None:
        y = y + col(b.to(dt), y.dim())
    return [from_cf(y.to(x.dtype), at["layout"])]


@kernel("linear")
def linear(ctx: NodeCtx, args: list) -> list:
    x, w, b = [*args, None][:3]
    dt = _acc(x)
    y = x.to(dt) @ w.to(dt).T
    if b is not None:
        y = y + b.to(dt)
    return [_act(y, ctx.attrs).to(x.dtype)]


@kernel("gemm")
def gemm(ctx: NodeCtx, args: list) -> list:
    a, b, c = [*args, None][:3]
    at = ctx.attrs
    dt = _acc(a) if a.dtype.is_floating_point else torch.int64
    a2, b2 = (a.T if at["trans_a"] else a).to(dt), (b.T if at["trans_b"] else b).to(dt)
    y = a2 @ b2
    if at["alpha"] != 1.0:
        y = y * at["alpha"]
    if c is not None and at["beta"] != 0.0:
        y = y + (c.to(dt) if at["beta"] == 1.0 else c.to(dt) * at["beta"])
    return [y.to(a.dtype)]


@kernel("matmul")
def matmul(ctx: NodeCtx, args: list) -> list:
    a, b = args
    dt = _acc(a) if a.dtype.is_floating_point else torch.int64
    return [torch.matmul(a.to(dt), b.to(dt)).to(a.dtype)]


# -- normalization and elementwise -----------------------------------------------------------
@kernel("batch_norm")
def batch_norm(ctx: NodeCtx, args: list) -> list:
    x, scale, bias, mean, var = args
    layout = ctx.attrs["layout"]
    xc = to_cf(x, layout)
    dt = _acc(xc)
    s, t, m, v = (col(a.to(dt), xc.dim()) for a in (scale, bias, mean, var))
    y = (xc.to(dt) - m) * (s / torch.sqrt(v + ctx.attrs["epsilon"])) + t
    return [from_cf(y.to(x.dtype), layout)]


@kernel("scale_shift")
def scale_shift(ctx: NodeCtx, args: list) -> list:
    x, scale, shift = args
    shape = [1] * x.dim()
    shape[ctx.attrs["axis"] % x.dim()] = -1
    dt = _acc(x)
    return [(x.to(dt) * scale.to(dt).reshape(shape) + shift.to(dt).reshape(shape)).to(x.dtype)]


@kernel("add", "sub", "mul", "div")
def binary(ctx: NodeCtx, args: list) -> list:
    a, b = args
    if ctx.op == "add":
        y = a + b
    elif ctx.op == "sub":
        y = a - b
    elif ctx.op == "mul":
        y = a * b
    elif a.dtype.is_floating_point:
        y = a / b
    else:
        y = torch.div(a, b, rounding_mode="trunc")
    return [y.to(TORCH_DTYPES[ctx.out_types[0].dtype])]


def _unary(fn):
    def run(ctx: NodeCtx, args: list) -> list:
        x = args[0]
        return [fn(x.to(_acc(x)), ctx.attrs).to(x.dtype)]
    return run


kernel("sigmoid")(_unary(lambda x, at: torch.sigmoid(x)))
kernel("tanh")(_unary(lambda x, at: torch.tanh(x)))
kernel("leaky_relu")(_unary(lambda x, at: torch.where(x >= 0, x, x * at["alpha"])))
kernel("hard_sigmoid")(_unary(lambda x, at: (x * at["alpha"] + at["beta"]).clamp(0, 1)))
kernel("hard_swish")(_unary(lambda x, at: x * (x * (1 / 6) + 0.5).clamp(0, 1)))


@kernel("softmax")
def softmax(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    w = x.to(_acc(x))
    axis = ctx.attrs["axis"] % x.dim()
    e = torch.exp(w - w.amax(dim=axis, keepdim=True))
    return [(e / e.sum(dim=axis, keepdim=True)).to(x.dtype)]


@kernel("prelu")
def prelu(ctx: NodeCtx, args: list) -> list:
    x, slope = args
    return [torch.where(x >= 0, x, x * slope).to(x.dtype)]


# -- pools and reductions --------------------------------------------------------------------
@kernel("avg_pool")
def avg_pool(ctx: NodeCtx, args: list) -> list:
    """Window mean; the divisor counts taps inside x (and inside the explicit pads with
    count_include_pad), never the positions ceil mode adds."""
    at, layout = ctx.attrs, ctx.attrs["layout"]
    x = to_cf(args[0], layout)
    dt = _acc(x)
    out = ctx.out_spatial()
    n = len(out)
    ones = torch.ones((1, 1, *x.shape[2:]), dtype=dt, device=x.device)
    inside = pad_spatial(ones, at["pads"][:n], at["pads"][n:],
                         1.0 if at["count_include_pad"] else 0.0)
    need = [(out[i] - 1) * at["strides"][i] + (at["kernel"][i] - 1) * at["dilations"][i] + 1
            for i in range(n)]
    inside = pad_spatial(inside, [0] * n, [max(0, need[i] - inside.shape[2 + i])
                                           for i in range(n)])
    xp = window_padded(x.to(dt), at, out, 0.0)
    total = torch.zeros((*x.shape[:2], *out), dtype=dt, device=x.device)
    count = torch.zeros((1, 1, *out), dtype=dt, device=x.device)
    for _, sl in window_taps(at, out):
        total += xp[sl]
        count += inside[sl]
    return [from_cf((total / count).to(x.dtype), layout)]


@kernel("global_avg_pool")
def global_avg_pool(ctx: NodeCtx, args: list) -> list:
    layout = ctx.attrs["layout"]
    x = to_cf(args[0], layout)
    y = x.to(_acc(x)).mean(dim=tuple(range(2, x.dim())), keepdim=True)
    return [from_cf(y.to(x.dtype), layout)]


def _axes(ctx: NodeCtx, rank: int) -> tuple[int, ...]:
    return tuple(sorted(a % rank for a in ctx.attrs["axes"])) or tuple(range(rank))


@kernel("reduce_sum")
def reduce_sum(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    dt = torch.float32 if x.dtype == torch.float16 else x.dtype
    y = torch.sum(x, dim=_axes(ctx, x.dim()), keepdim=bool(ctx.attrs["keepdims"]), dtype=dt)
    return [y.to(x.dtype)]


@kernel("reduce_mean")
def reduce_mean(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    axes = _axes(ctx, x.dim())
    count = math.prod(x.shape[a] for a in axes)
    total = torch.sum(x.to(_acc(x)), dim=axes, keepdim=bool(ctx.attrs["keepdims"]))
    y = total / count if x.dtype.is_floating_point else torch.trunc(total / count)
    return [y.to(x.dtype)]


@kernel("reduce_max")
def reduce_max(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    return [torch.amax(x, dim=_axes(ctx, x.dim()), keepdim=bool(ctx.attrs["keepdims"]))]


# -- sampling --------------------------------------------------------------------------------
@kernel("grid_sample")
def grid_sample(ctx: NodeCtx, args: list) -> list:
    x, grid = args
    at = ctx.attrs
    xc = to_cf(x, at["layout"])
    dt = _acc(xc)
    y = F.grid_sample(xc.to(dt), grid.to(dt), mode=at["mode"], padding_mode=at["padding_mode"],
                      align_corners=bool(at["align_corners"]))
    return [from_cf(round_saturate(y, x.dtype), at["layout"])]
