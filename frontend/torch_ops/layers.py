"""Convolution (N-d, grouped, dilated, padding modes), transposed convolution, batch norm with
running statistics, linear and matrix products."""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hbc.ir.graph import Value

from . import converts, ints
from .context import TorchContext, Unsupported
from .elementwise import binary
from .tensor import torch_pad


def _conv(ctx: TorchContext, input: Any, weight: Any, bias: Any, stride: Any, padding: Any,
          dilation: Any, groups: int) -> Value:
    x, w = ctx.value(input), ctx.value(weight)
    nd = w.type.rank - 2
    strides, dilations = ints(stride, nd), ints(dilation, nd)
    if isinstance(padding, str):
        if padding == "valid":
            pads = [0] * (2 * nd)
        elif padding == "same":  # torch puts the odd pixel at the end
            total = [d * (k - 1) for d, k in zip(dilations, w.shape[2:], strict=True)]
            pads = [t // 2 for t in total] + [t - t // 2 for t in total]
        else:
            raise Unsupported(f"padding='{padding}'")
    else:
        p = ints(padding, nd)
        pads = p + p
    batched = x.type.rank == nd + 2
    if not batched:
        x = ctx.reshape(x, (1, *x.shape), part="batch")
    b = None if bias is None else ctx.value(bias)
    y = ctx.emit1("conv", [x, w, b], {"strides": strides, "pads": pads,
                                      "dilations": dilations, "groups": int(groups)})
    return y if batched else ctx.reshape(y, ctx.out.shape)


@converts(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
          aten=("conv1d", "conv2d", "conv3d"))
def _conv_fn(ctx, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return _conv(ctx, input, weight, bias, stride, padding, dilation, groups)


@converts(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv_module(ctx, m, input):
    x, padding = input, m.padding
    if m.padding_mode != "zeros":
        x = torch_pad(ctx, x, list(m._reversed_padding_repeated_twice), m.padding_mode, 0.0, "pad")
        padding = 0
    return _conv(ctx, x, ctx.param("weight"), ctx.param("bias"), m.stride, padding,
                 m.dilation, m.groups)


def _conv_transpose(ctx: TorchContext, input: Any, weight: Any, bias: Any, stride: Any,
                    padding: Any, groups: int, dilation: Any) -> Value:
    """ConvTranspose; output_padding (and output_size) are recovered from torch's result."""
    x, w = ctx.value(input), ctx.value(weight)
    nd = w.type.rank - 2
    if x.type.rank != nd + 2:
        raise Unsupported("unbatched transposed convolution input")
    s, p, d = ints(stride, nd), ints(padding, nd), ints(dilation, nd)
    out_padding = [
        o - ((i - 1) * ss - 2 * pp + dd * (k - 1) + 1)
        for o, i, ss, pp, dd, k in zip(ctx.out.shape[2:], x.shape[2:], s, p, d, w.shape[2:],
                                       strict=True)
    ]
    b = None if bias is None else ctx.value(bias)
    return ctx.emit1("conv_transpose", [x, w, b], {
        "strides": s, "pads": p + p, "dilations": d, "output_padding": out_padding,
        "groups": int(groups)})


@converts(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
          aten=("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def _conv_transpose_fn(ctx, input, weight, bias=None, stride=1, padding=0, output_padding=0,
                       groups=1, dilation=1):
    return _conv_transpose(ctx, input, weight, bias, stride, padding, groups, dilation)


@converts(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose_module(ctx, m, input, output_size=None):
    if m.padding_mode != "zeros":
        raise Unsupported(f"padding_mode='{m.padding_mode}'")
    return _conv_transpose(ctx, input, ctx.param("weight"), ctx.param("bias"), m.stride,
                           m.padding, m.groups, m.dilation)


@converts(aten=("convolution", "_convolution"))
def _convolution(ctx, input, weight, bias, stride, padding, dilation, transposed,
                 output_padding, groups, *args):
    if transposed:
        return _conv_transpose(ctx, input, weight, bias, stride, padding, groups, dilation)
    return _conv(ctx, input, weight, bias, stride, padding, dilation, groups)


def _batch_norm(ctx: TorchContext, input: Any, mean: Any, var: Any, weight: Any, bias: Any,
                eps: float) -> Value:
    x = ctx.value(input)
    if mean is None or var is None:
        raise Unsupported("BatchNorm without running statistics (track_running_stats=False) "
                          "normalizes with batch statistics", hint="track running statistics")
    channels = x.shape[1] if x.type.rank > 1 else x.shape[0]
    np_dt = x.type.np_dtype
    scale = ctx.value(weight) if weight is not None else ctx.constant(
        np.ones(channels, np_dt), "scale")
    shift = ctx.value(bias) if bias is not None else ctx.constant(
        np.zeros(channels, np_dt), "bias")
    return ctx.emit1("batch_norm", [x, scale, shift, ctx.value(mean), ctx.value(var)],
                     {"epsilon": float(eps)})


@converts(nn.modules.batchnorm._BatchNorm)
def _batch_norm_module(ctx, m, input):
    if m.running_mean is None:
        return _batch_norm(ctx, input, None, None, None, None, m.eps)
    return _batch_norm(ctx, input, ctx.param("running_mean"), ctx.param("running_var"),
                       ctx.param("weight"), ctx.param("bias"), m.eps)


@converts(F.batch_norm)
def _batch_norm_fn(ctx, input, running_mean, running_var, weight=None, bias=None,
                   training=False, momentum=0.1, eps=1e-5):
    if training:
        raise Unsupported("batch_norm with training=True uses batch statistics",
                          hint="call model.eval() semantics: training=False")
    return _batch_norm(ctx, input, running_mean, running_var, weight, bias, eps)


@converts(aten=("batch_norm",))
def _batch_norm_aten(ctx, input, weight, bias, running_mean, running_var, training, momentum,
                     eps, cudnn_enabled=True):
    return _batch_norm_fn(ctx, input, running_mean, running_var, weight, bias, training,
                          momentum, eps)


@converts(aten=("_native_batch_norm_legit_no_training",))
def _batch_norm_legit(ctx, input, weight, bias, running_mean, running_var, momentum, eps):
    return (_batch_norm(ctx, input, running_mean, running_var, weight, bias, eps), None, None)


def _linear(ctx: TorchContext, input: Any, weight: Any, bias: Any) -> Value:
    """2-D input: gemm(x, W, b, trans_b=1); otherwise matmul(x, W^T) + b."""
    x, w = ctx.value(input), ctx.value(weight)
    b = None if bias is None else ctx.value(bias)
    if x.type.rank == 2 and w.type.rank == 2:
        return ctx.emit1("gemm", [x, w, b], {"trans_b": 1})
    if w.type.rank == 2:
        w = ctx.emit1("transpose", [w], {"perm": [1, 0]}, part="weight_t")
    y = ctx.emit1("matmul", [x, w], part=None if b is None else "matmul")
    return y if b is None else ctx.emit1("add", [y, b])


@converts(F.linear, aten=("linear",))
def _linear_fn(ctx, input, weight, bias=None):
    return _linear(ctx, input, weight, bias)


@converts(nn.Linear)
def _linear_module(ctx, m, input):
    return _linear(ctx, input, ctx.param("weight"), ctx.param("bias"))


@converts(torch.matmul, operator.matmul, torch.bmm, torch.mm,
          methods=("matmul", "bmm", "mm", "__matmul__"), aten=("matmul", "bmm", "mm"))
def _matmul(ctx, input, other, **_):
    return binary(ctx, "matmul", input, other)


@converts(torch.addmm, aten=("addmm",))
def _addmm(ctx, input, mat1, mat2, *, beta=1, alpha=1):
    return ctx.emit1("gemm", [ctx.value(mat1), ctx.value(mat2), ctx.value(input)],
                     {"alpha": float(alpha), "beta": float(beta)})
