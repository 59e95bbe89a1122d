"""Elementwise arithmetic (add/sub/mul/div with tensors or Python scalars, in type-promoted
dtype) and the ops that are the identity at inference (dropout, contiguous, clone)."""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hbc.ir.graph import Value

from . import converts
from .context import TorchContext, Unsupported


def binary(ctx: TorchContext, op: str, a: Any, b: Any) -> Value:
    """``op(a, b)`` computed in the dtype torch's type promotion chose for the result."""
    dt = ctx.out_dtype
    av = ctx.cast(ctx.value(a, dt), dt, part="cast_a")
    bv = ctx.cast(ctx.value(b, dt), dt, part="cast_b")
    return ctx.emit1(op, [av, bv])


def _scaled(ctx: TorchContext, x: Any, alpha: Any) -> Any:
    if alpha is None or alpha == 1:
        return x
    if isinstance(x, (int, float)):
        return x * alpha
    return ctx.emit1("mul", [ctx.value(x), ctx.value(alpha)], part="alpha")


@converts(operator.add, operator.iadd, torch.add, methods=("add", "__add__"), aten=("add",))
def _add(ctx, input, other, alpha=1, **_):
    if isinstance(input, (list, tuple)):  # Python sequence concatenation of tensor lists
        return tuple(input) + tuple(other)
    return binary(ctx, "add", input, _scaled(ctx, other, alpha))


@converts(operator.sub, operator.isub, torch.sub, torch.subtract, methods=("sub", "subtract"),
          aten=("sub",))
def _sub(ctx, input, other, alpha=1, **_):
    return binary(ctx, "sub", input, _scaled(ctx, other, alpha))


@converts(torch.rsub, methods=("rsub",), aten=("rsub",))
def _rsub(ctx, input, other, alpha=1, **_):
    return binary(ctx, "sub", other, _scaled(ctx, input, alpha))


@converts(operator.mul, operator.imul, torch.mul, torch.multiply, methods=("mul", "multiply"),
          aten=("mul",))
def _mul(ctx, input, other, **_):
    if isinstance(input, (list, tuple)):
        return tuple(input) * other
    return binary(ctx, "mul", input, other)


@converts(operator.truediv, operator.itruediv, torch.div, torch.divide, torch.true_divide,
          methods=("div", "divide", "true_divide"), aten=("div",))
def _div(ctx, input, other, *, rounding_mode=None, **_):
    if rounding_mode is not None:
        raise Unsupported(f"division with rounding_mode='{rounding_mode}' is not supported",
                          hint="use true division (a / b)")
    return binary(ctx, "div", input, other)


@converts(operator.neg, torch.neg, torch.negative, methods=("neg", "negative"), aten=("neg",))
def _neg(ctx, input):
    return binary(ctx, "mul", input, -1)


@converts(operator.pos, torch.Tensor.contiguous, torch.clone, nn.Identity, nn.Dropout,
          nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
          F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
          F.feature_alpha_dropout, torch.dropout, torch.detach,
          methods=("contiguous", "clone", "detach", "cpu", "cuda", "requires_grad_",
                   "dropout"),
          aten=("alias", "clone", "detach", "contiguous", "dropout", "lift_fresh_copy",
                "feature_dropout", "alpha_dropout"))
def identity(ctx, input, *args, **kwargs):
    """Dropout (inference), Identity, contiguous, clone: the value itself, no node."""
    if isinstance(input, nn.Module):  # module form: (module, input)
        input = args[0]
    return ctx.value(input)


@converts(aten=("_assert_tensor_metadata", "_assert_async", "_assert_scalar"))
def _no_op(ctx, *args, **kwargs):
    return None
