"""Activations: relu, clip forms (ReLU6, hardtanh, clamp), leaky/parametric relu, sigmoid,
tanh, hard sigmoid/swish, SiLU and softmax."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hbc.ir.graph import Value

from . import converts, module_form, norm_dim
from .context import TorchContext, Unsupported


def _unary(op: str, **attrs: Any) -> Callable:
    def fn(ctx, input, *args, **kwargs):
        return ctx.emit1(op, [ctx.value(input)], attrs)

    return fn


_relu = converts(F.relu, F.relu_, torch.relu, torch.relu_, methods=("relu",),
                 aten=("relu",))(_unary("relu"))
_sigmoid = converts(torch.sigmoid, F.sigmoid, methods=("sigmoid",),
                    aten=("sigmoid",))(_unary("sigmoid"))
_tanh = converts(torch.tanh, F.tanh, methods=("tanh",), aten=("tanh",))(_unary("tanh"))
_hswish = converts(F.hardswish, aten=("hardswish",))(_unary("hard_swish"))
# torch: relu6(x + 3) / 6
_hsigmoid = converts(F.hardsigmoid, aten=("hardsigmoid",))(
    _unary("hard_sigmoid", alpha=1.0 / 6.0, beta=0.5))
converts(nn.ReLU)(module_form(_relu))
converts(nn.Sigmoid)(module_form(_sigmoid))
converts(nn.Tanh)(module_form(_tanh))
converts(nn.Hardswish)(module_form(_hswish))
converts(nn.Hardsigmoid)(module_form(_hsigmoid))


@converts(F.silu, aten=("silu",))
def _silu(ctx, input, *args, **kwargs):
    """SiLU: x * sigmoid(x)."""
    x = ctx.value(input)
    return ctx.emit1("mul", [x, ctx.emit1("sigmoid", [x], part="sigmoid")])


converts(nn.SiLU)(module_form(_silu))


def _clip(ctx: TorchContext, input: Any, lo: Any, hi: Any) -> Value:
    attrs = {}
    for key, bound in (("min", lo), ("max", hi)):
        if bound is not None:
            arr = ctx.array(bound, f"clamp {key}")
            if arr.size != 1:
                raise Unsupported(f"clamp with a tensor {key} of shape {list(arr.shape)}: only "
                                  "scalar bounds are supported")
            attrs[key] = float(arr.reshape(()))
    return ctx.emit1("clip", [ctx.value(input)], attrs)


@converts(torch.clamp, torch.clip, methods=("clamp", "clip"), aten=("clamp", "clip"))
def _clamp(ctx, input, min=None, max=None):
    return _clip(ctx, input, min, max)


@converts(torch.clamp_min, methods=("clamp_min",), aten=("clamp_min",))
def _clamp_min(ctx, input, min):
    return _clip(ctx, input, min, None)


@converts(torch.clamp_max, methods=("clamp_max",), aten=("clamp_max",))
def _clamp_max(ctx, input, max):
    return _clip(ctx, input, None, max)


@converts(F.hardtanh, F.hardtanh_, aten=("hardtanh",))
def _hardtanh(ctx, input, min_val=-1.0, max_val=1.0, inplace=False):
    return _clip(ctx, input, min_val, max_val)


@converts(F.relu6, aten=("relu6",))
def _relu6(ctx, input, inplace=False):
    return _clip(ctx, input, 0.0, 6.0)


@converts(nn.Hardtanh)  # nn.ReLU6 is a Hardtanh(0, 6)
def _hardtanh_module(ctx, m, input):
    return _clip(ctx, input, m.min_val, m.max_val)


@converts(F.leaky_relu, F.leaky_relu_, aten=("leaky_relu",))
def _leaky_relu(ctx, input, negative_slope=0.01, inplace=False):
    return ctx.emit1("leaky_relu", [ctx.value(input)], {"alpha": float(negative_slope)})


@converts(nn.LeakyReLU)
def _leaky_relu_module(ctx, m, input):
    return _leaky_relu(ctx, input, m.negative_slope)


@converts(F.prelu, torch.prelu, aten=("prelu", "_prelu_kernel"))
def _prelu(ctx, input, weight):
    x, w = ctx.value(input), ctx.value(weight)
    if w.type.numel > 1 and x.type.rank >= 2:  # one slope per channel (dim 1)
        w = ctx.reshape(w, [w.type.numel] + [1] * (x.type.rank - 2), part="slope")
    return ctx.emit1("prelu", [x, w])


@converts(nn.PReLU)
def _prelu_module(ctx, m, input):
    return _prelu(ctx, input, ctx.param("weight"))


@converts(F.softmax, torch.softmax, methods=("softmax",), aten=("softmax",))
def _softmax(ctx, input, dim=None, _stacklevel=3, dtype=None):
    x = ctx.value(input)
    if dim is None:  # torch's legacy implicit dim
        dim = 0 if x.type.rank in (0, 1, 3) else 1
    x = ctx.cast(x, ctx.out_dtype)
    return ctx.emit1("softmax", [x], {"axis": norm_dim(dim, x.type.rank)})


@converts(aten=("_softmax",))
def _softmax_aten(ctx, input, dim, half_to_float=False):
    return _softmax(ctx, input, dim)


@converts(nn.Softmax)
def _softmax_module(ctx, m, input):
    return _softmax(ctx, input, m.dim)


@converts(nn.Softmax2d)
def _softmax2d_module(ctx, m, input):
    return _softmax(ctx, input, -3)
