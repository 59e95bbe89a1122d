"""Reductions: mean/sum/amax/amin, max/min with indices, argmax/argmin."""

from __future__ import annotations

from typing import Any

import torch

from hbc.ir.graph import Value

from . import converts, norm_dim
from .context import TorchContext, Unsupported


def _axes(dim: Any, rank: int) -> list[int]:
    """Reduction axes; [] (all axes) for None or an empty list."""
    if dim is None:
        return []
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(norm_dim(int(d), rank) for d in dims)


def _reduce(ctx: TorchContext, op: str, input: Any, dim: Any, keepdim: bool) -> Value:
    x = ctx.cast(ctx.value(input), ctx.out_dtype)  # sum of ints accumulates in int64, as torch
    y = ctx.emit1(op, [x], {"axes": _axes(dim, x.type.rank), "keepdims": int(bool(keepdim))})
    return ctx.reshape(y, ctx.out.shape, part="reshape")  # rank-0 results of full reductions


@converts(torch.mean, methods=("mean",), aten=("mean.dim",))
def _mean(ctx, input, dim=None, keepdim=False, *, dtype=None):
    return _reduce(ctx, "reduce_mean", input, dim, keepdim)


@converts(torch.sum, methods=("sum",), aten=("sum.dim_IntList",))
def _sum(ctx, input, dim=None, keepdim=False, *, dtype=None):
    return _reduce(ctx, "reduce_sum", input, dim, keepdim)


@converts(aten=("mean.default",))
def _mean_all(ctx, input, dtype=None):
    return _reduce(ctx, "reduce_mean", input, None, False)


@converts(aten=("sum.default",))
def _sum_all(ctx, input, dtype=None):
    return _reduce(ctx, "reduce_sum", input, None, False)


@converts(torch.amax, methods=("amax",), aten=("amax",))
def _amax(ctx, input, dim=(), keepdim=False):
    return _reduce(ctx, "reduce_max", input, dim, keepdim)


def _negate(ctx: TorchContext, x: Value, part: str) -> Value:
    return ctx.emit1("mul", [x, ctx.value(-1, x.dtype)], part=part)


@converts(torch.amin, methods=("amin",), aten=("amin",))
def _amin(ctx, input, dim=(), keepdim=False):
    """min(x) = -max(-x)."""
    neg = _negate(ctx, ctx.value(input), "neg")
    y = ctx.emit1("reduce_max", [neg], {"axes": _axes(dim, neg.type.rank),
                                        "keepdims": int(bool(keepdim))}, part="reduce_max")
    return ctx.reshape(_negate(ctx, y, "negate"), ctx.out.shape, part="reshape")


def _argmax(ctx: TorchContext, x: Value, dim: Any, keepdim: bool, part: str | None) -> Value:
    if dim is None:  # over the flattened tensor
        x, dim = ctx.reshape(x, (x.type.numel,), part="flatten"), 0
    y = ctx.emit1("argmax", [x], {"axis": norm_dim(int(dim), x.type.rank),
                                  "keepdims": int(bool(keepdim))}, part=part)
    return y


def _max_min(ctx: TorchContext, input: Any, dim: Any, keepdim: bool, is_min: bool) -> Any:
    if isinstance(dim, (Value, torch.Tensor)):
        raise Unsupported("elementwise maximum/minimum of two tensors")
    x = ctx.value(input)
    src = _negate(ctx, x, "neg") if is_min else x
    if dim is None:
        y = ctx.emit1("reduce_max", [src], {"axes": [], "keepdims": 0}, part="reduce")
        y = _negate(ctx, y, "negate") if is_min else y
        return ctx.reshape(y, ctx.out.shape)
    rec = ctx.rec
    axis = norm_dim(int(dim), x.type.rank)
    values = ctx.emit1("reduce_max", [src], {"axes": [axis], "keepdims": int(bool(keepdim))},
                       part="values")
    if is_min:
        values = _negate(ctx, values, "values_neg")
    indices = _argmax(ctx, src, axis, keepdim, "indices")
    return ctx.reshape(values, rec[0].shape), ctx.reshape(indices, rec[1].shape)


@converts(torch.max, methods=("max",), aten=("max",))
def _max(ctx, input, dim=None, keepdim=False):
    return _max_min(ctx, input, dim, keepdim, False)


@converts(torch.min, methods=("min",), aten=("min",))
def _min(ctx, input, dim=None, keepdim=False):
    return _max_min(ctx, input, dim, keepdim, True)


@converts(torch.argmax, methods=("argmax",), aten=("argmax",))
def _argmax_fn(ctx, input, dim=None, keepdim=False):
    y = _argmax(ctx, ctx.value(input), dim, keepdim, None)
    return ctx.reshape(y, ctx.out.shape, part="reshape")


@converts(torch.argmin, methods=("argmin",), aten=("argmin",))
def _argmin_fn(ctx, input, dim=None, keepdim=False):
    y = _argmax(ctx, _negate(ctx, ctx.value(input), "neg"), dim, keepdim, None)
    return ctx.reshape(y, ctx.out.shape, part="reshape")
