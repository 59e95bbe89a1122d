"""Max/avg pooling (torch ceil_mode exactly) and adaptive pooling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hbc.ir.graph import Value

from . import converts, ints, opt
from .context import TorchContext, Unsupported
from .tensor import pad_ir


def _pool(ctx: TorchContext, kind: str, nd: int, input: Any, kernel_size: Any, stride: Any,
          padding: Any, dilation: Any, ceil_mode: bool, count_include_pad: bool = False,
          divisor_override: Any = None, return_indices: bool = False) -> Value:
    """max/avg pooling. torch's ceil_mode (the last window must start inside the input or its
    left padding) is expressed exactly as extra end padding with ceil_mode=0; avg pooling that
    counts padding then pads explicitly so the overhang is still excluded, as in torch."""
    if return_indices:
        raise Unsupported("max pooling with return_indices=True",
                          hint="torch's indices differ from hbc's; use the values only")
    if divisor_override:
        raise Unsupported("avg pooling with divisor_override")
    x = ctx.value(input)
    batched = x.type.rank == nd + 2
    if not batched:
        x = ctx.reshape(x, (1, *x.shape), part="batch")
    k = ints(kernel_size, nd)
    s = ints(stride, nd) if stride not in (None, [], ()) else list(k)
    p = ints(padding, nd)
    d = ints(dilation, nd)
    out_sp = list(ctx.out.shape[-nd:])
    cip = bool(count_include_pad) and kind == "avg"
    begin, end = list(p), list(p)

    def out_size(sp, b, e):
        return [(i + bb + ee - dd * (kk - 1) - 1) // ss + 1
                for i, bb, ee, dd, kk, ss in zip(sp, b, e, d, k, s, strict=True)]

    if out_size(x.shape[2:], begin, end) != out_sp:  # ceil_mode added windows
        if cip and any(p):
            x = pad_ir(ctx, x, [0, 0, *p], [0, 0, *p], "constant", 0.0, "pad")
            begin, end = [0] * nd, [0] * nd
        cip = False
        end = [(o - 1) * ss + dd * (kk - 1) + 1 - i - bb
               for o, ss, dd, kk, i, bb in zip(out_sp, s, d, k, x.shape[2:], begin, strict=True)]
    attrs = {"kernel": k, "strides": s, "pads": begin + end, "dilations": d}
    if kind == "max":
        y = ctx.emit("max_pool", [x], attrs, num_outputs=1)[0]
    else:
        y = ctx.emit1("avg_pool", [x], {**attrs, "count_include_pad": int(cip)})
    return y if batched else ctx.reshape(y, ctx.out.shape)


def _max_pool(nd: int) -> Callable:
    def fn(ctx, input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
           return_indices=False):
        return _pool(ctx, "max", nd, input, kernel_size, stride, padding, dilation, ceil_mode,
                     return_indices=return_indices)

    return fn


def _avg_pool(nd: int) -> Callable:
    def fn(ctx, input, kernel_size, stride=None, padding=0, ceil_mode=False,
           count_include_pad=True, divisor_override=None):
        return _pool(ctx, "avg", nd, input, kernel_size, stride, padding, 1, ceil_mode,
                     count_include_pad, divisor_override)

    return fn


def adaptive_pool(ctx: TorchContext, kind: str, nd: int, input: Any,
              out_shape: Sequence[int] | None = None) -> Value:
    """Adaptive pooling: global pooling for output 1, else a regular pool when the input size
    is a multiple of the output size."""
    out_shape = tuple(ctx.out.shape if out_shape is None else out_shape)
    x = ctx.value(input)
    batched = x.type.rank == nd + 2
    if not batched:
        x = ctx.reshape(x, (1, *x.shape), part="batch")
    in_sp, out_sp = list(x.shape[2:]), list(out_shape[-nd:])
    if all(o == 1 for o in out_sp):
        y = ctx.emit1(f"global_{kind}_pool", [x])
    elif all(i % o == 0 for i, o in zip(in_sp, out_sp, strict=True)):
        k = [i // o for i, o in zip(in_sp, out_sp, strict=True)]
        attrs = {"kernel": k, "strides": k, "pads": [0] * (2 * nd), "dilations": [1] * nd}
        y = ctx.emit(f"{kind}_pool", [x], attrs, num_outputs=1)[0]
    else:
        raise Unsupported(f"adaptive pooling from {in_sp} to {out_sp}: the input size is not "
                          "a multiple of the output size",
                          hint="choose an input size divisible by the output size")
    return y if batched else ctx.reshape(y, out_shape)


for _nd in (1, 2, 3):
    converts(getattr(F, f"max_pool{_nd}d"), opt(torch, f"max_pool{_nd}d"),
             aten=(f"max_pool{_nd}d",))(_max_pool(_nd))
    converts(getattr(F, f"avg_pool{_nd}d"), opt(torch, f"avg_pool{_nd}d"),
             aten=(f"avg_pool{_nd}d",))(_avg_pool(_nd))
    converts(aten=(f"max_pool{_nd}d_with_indices",))(
        lambda ctx, *a, _nd=_nd, **k: (_max_pool(_nd)(ctx, *a, **k), None))
    converts(getattr(nn, f"MaxPool{_nd}d"))(
        lambda ctx, m, input, _nd=_nd: _pool(ctx, "max", _nd, input, m.kernel_size, m.stride,
                                             m.padding, m.dilation, m.ceil_mode,
                                             return_indices=m.return_indices))
    converts(getattr(nn, f"AvgPool{_nd}d"))(
        lambda ctx, m, input, _nd=_nd: _pool(ctx, "avg", _nd, input, m.kernel_size, m.stride,
                                             m.padding, 1, m.ceil_mode, m.count_include_pad,
                                             getattr(m, "divisor_override", None)))
    converts(getattr(F, f"adaptive_avg_pool{_nd}d"), getattr(nn, f"AdaptiveAvgPool{_nd}d"),
             opt(torch, f"adaptive_avg_pool{_nd}d"),
             aten=(f"adaptive_avg_pool{_nd}d", f"_adaptive_avg_pool{_nd}d"))(
        lambda ctx, input, *a, _nd=_nd, **k: adaptive_pool(
            ctx, "avg", _nd, a[0] if isinstance(input, nn.Module) else input))
    converts(getattr(F, f"adaptive_max_pool{_nd}d"))(
        lambda ctx, input, output_size, return_indices=False, _nd=_nd: adaptive_pool(
            ctx, "max", _nd, input) if not return_indices else _no_indices())
    converts(getattr(nn, f"AdaptiveMaxPool{_nd}d"))(
        lambda ctx, m, input, _nd=_nd: adaptive_pool(ctx, "max", _nd, input)
        if not m.return_indices else _no_indices())
    converts(aten=(f"adaptive_max_pool{_nd}d",))(
        lambda ctx, input, output_size, _nd=_nd: (
            adaptive_pool(ctx, "max", _nd, input, ctx.rec[0].shape), None))


def _no_indices() -> Value:
    raise Unsupported("adaptive max pooling with return_indices=True")
