"""Torch kernels of the plain ops an integer graph keeps: they move, select or clamp values
(max_pool, global_max_pool, reshape, transpose, slice, split, pad, concat, depth_to_space,
space_to_depth, gather, argmax, relu, clip, identity, cast, nearest resize), so they run on the
integers as they are. Written from the op declarations of ``hbc.ir.ops`` (ONNX semantics),
independent of their numpy references. Every kernel also accepts float tensors.
"""

from __future__ import annotations

import math

import torch

from .torch_conv import from_cf, to_cf, window_padded, window_taps
from .torch_kernels import TORCH_DTYPES, NodeCtx, kernel
from .torch_resize import resize_tensor


def _lowest(dtype: torch.dtype):
    return -math.inf if dtype.is_floating_point else torch.iinfo(dtype).min


# -- pools -----------------------------------------------------------------------------------
@kernel("max_pool")
def max_pool(ctx: NodeCtx, args: list) -> list:
    """Max over each window, padding never wins; indices (if used) as ONNX MaxPool."""
    layout, at = ctx.attrs["layout"], ctx.attrs
    x = to_cf(args[0], layout)
    out = ctx.out_spatial()
    xp = window_padded(x, at, out, _lowest(x.dtype))
    y = torch.full((*x.shape[:2], *out), _lowest(x.dtype), dtype=x.dtype, device=x.device)
    best = torch.full(y.shape, -1, dtype=torch.int64, device=x.device)
    for i, (_, sl) in enumerate(window_taps(at, out)):
        xs = xp[sl]
        best = torch.where(xs > y, i, best)  # strict: the first maximum wins
        y = torch.fmax(y, xs) if x.dtype.is_floating_point else torch.maximum(y, xs)
    results = [from_cf(y, layout)]
    if len(ctx.out_types) > 1:
        results.append(from_cf(_pool_indices(x.shape, at, out, best), layout))
    return results


def _pool_indices(shape, at: dict, out: list[int], best: torch.Tensor) -> torch.Tensor:
    """Flat NCHW indices of the maxima (best = row-major tap index, -1 = every tap padding:
    then the first tap inside x)."""
    spatial, n = list(shape[2:]), len(shape) - 2
    kernel, s, d, p = at["kernel"], at["strides"], at["dilations"], at["pads"]
    dev = best.device

    def positions(dim: int, tap: torch.Tensor) -> torch.Tensor:
        o = torch.arange(out[dim], device=dev).reshape([-1 if j == dim else 1 for j in range(n)])
        return o * s[dim] - p[dim] + tap * d[dim]

    if bool((best < 0).any()):
        for i, tap in enumerate(torch.cartesian_prod(*[torch.arange(k) for k in kernel])
                                .reshape(-1, n).tolist()):
            inside = torch.ones(out, dtype=torch.bool, device=dev)
            for dim in range(n):
                pos = positions(dim, torch.tensor(tap[dim], device=dev))
                inside = inside & (pos >= 0) & (pos < spatial[dim])
            best = torch.where((best < 0) & inside, i, best)
    taps, rest = [], best.clamp(min=0)
    for k in reversed(kernel):
        taps.insert(0, rest % k)
        rest = rest // k
    if at["storage_order"]:
        steps = [math.prod(spatial[:dim]) for dim in range(n)]
    else:
        steps = [math.prod(spatial[dim + 1:]) for dim in range(n)]
    index = (torch.arange(shape[0] * shape[1], device=dev) * math.prod(spatial)).reshape(
        shape[0], shape[1], *[1] * n)
    for dim in range(n):
        index = index + positions(dim, taps[dim]) * steps[dim]
    return torch.where(best < 0, -1, index).to(torch.int64)


@kernel("global_max_pool")
def global_max_pool(ctx: NodeCtx, args: list) -> list:
    layout = ctx.attrs["layout"]
    x = to_cf(args[0], layout)
    return [from_cf(x.amax(dim=tuple(range(2, x.dim())), keepdim=True), layout)]


# -- movement --------------------------------------------------------------------------------
@kernel("identity")
def identity(ctx: NodeCtx, args: list) -> list:
    return [args[0]]


@kernel("reshape")
def reshape(ctx: NodeCtx, args: list) -> list:
    return [args[0].reshape(ctx.attrs["shape"])]


@kernel("transpose")
def transpose(ctx: NodeCtx, args: list) -> list:
    return [args[0].permute(ctx.attrs["perm"]).contiguous()]


@kernel("concat")
def concat(ctx: NodeCtx, args: list) -> list:
    return [torch.cat(list(args), dim=ctx.attrs["axis"])]


@kernel("split")
def split(ctx: NodeCtx, args: list) -> list:
    return [p.contiguous() for p in torch.split(args[0], ctx.attrs["sizes"],
                                                 dim=ctx.attrs["axis"])]


def _slice_index(dim: int, start: int, end: int, step: int) -> range:
    """The indices ONNX Slice reads along one axis (negatives count from the end; bounds
    clamped to [0, dim] for step > 0 and [-1, dim - 1] for step < 0)."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return range(min(max(start, 0), dim), min(max(end, 0), dim), step)
    return range(min(max(start, 0), dim - 1), min(max(end, -1), dim - 1), step)


@kernel("slice")
def slice_(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    at = ctx.attrs
    axes = at["axes"] or list(range(len(at["starts"])))
    steps = at["steps"] or [1] * len(at["starts"])
    for start, end, axis, step in zip(at["starts"], at["ends"], axes, steps, strict=True):
        axis %= x.dim()
        idx = _slice_index(x.shape[axis], start, end, step)
        if step > 0:
            x = x[(slice(None),) * axis + (slice(idx.start, idx.stop, step),)]
        else:
            x = x.index_select(axis, torch.tensor(list(idx), dtype=torch.int64,
                                                  device=x.device))
    return [x.contiguous()]


def _pad_index(dim: int, begin: int, end: int, mode: str) -> torch.Tensor:
    """Source index of every output position along one axis for reflect / edge / wrap."""
    pos = torch.arange(-begin, dim + end)
    if mode == "edge":
        return pos.clamp(0, dim - 1)
    if mode == "wrap":
        return pos % dim
    if dim == 1:
        return torch.zeros_like(pos)
    period = 2 * (dim - 1)
    r = pos % period
    return torch.where(r < dim, r, period - r)


@kernel("pad")
def pad(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    r, mode = x.dim(), ctx.attrs["mode"]
    begin, end = ctx.attrs["pads"][:r], ctx.attrs["pads"][r:]
    # negative pads crop first
    for axis in range(r):
        lo, hi = max(-begin[axis], 0), x.shape[axis] - max(-end[axis], 0)
        if lo or hi != x.shape[axis]:
            x = x.narrow(axis, lo, hi - lo)
    begin, end = [max(b, 0) for b in begin], [max(e, 0) for e in end]
    if mode == "constant":
        value = ctx.attrs["value"]
        value = value if x.dtype.is_floating_point else math.trunc(value)
        y = torch.full([d + b + e for d, b, e in zip(x.shape, begin, end, strict=True)], value,
                       dtype=x.dtype, device=x.device)
        y[tuple(slice(b, b + d) for b, d in zip(begin, x.shape, strict=True))] = x
        return [y]
    for axis in range(r):
        if begin[axis] or end[axis]:
            idx = _pad_index(x.shape[axis], begin[axis], end[axis], mode).to(x.device)
            x = x.index_select(axis, idx)
    return [x.contiguous()]


@kernel("gather")
def gather(ctx: NodeCtx, args: list) -> list:
    x, idx = args
    axis = ctx.attrs["axis"] % x.dim()
    dim = x.shape[axis]
    flat = idx.to(torch.int64).reshape(-1)
    if flat.numel() and (bool((flat < -dim).any()) or bool((flat >= dim).any())):
        raise ctx.error(f"gather index out of range [{-dim}, {dim - 1}] for axis {axis}")
    flat = torch.where(flat < 0, flat + dim, flat)
    y = x.index_select(axis, flat)
    return [y.reshape(*x.shape[:axis], *idx.shape, *x.shape[axis + 1:])]


def _block(ctx: NodeCtx, x: torch.Tensor, to_space: bool) -> torch.Tensor:
    layout, b, mode = ctx.attrs["layout"], ctx.attrs["blocksize"], ctx.attrs["mode"]
    x = to_cf(x, layout)
    n, c, h, w = x.shape
    if to_space:
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
        y = y.reshape(n, c // (b * b), h * b, w * b)
    else:
        y = x.reshape(n, c, h // b, b, w // b, b)
        perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
        y = y.permute(perm).reshape(n, c * b * b, h // b, w // b)
    return from_cf(y, layout)


@kernel("depth_to_space")
def depth_to_space(ctx: NodeCtx, args: list) -> list:
    return [_block(ctx, args[0], True)]


@kernel("space_to_depth")
def space_to_depth(ctx: NodeCtx, args: list) -> list:
    return [_block(ctx, args[0], False)]


# -- selection and clamps --------------------------------------------------------------------
@kernel("argmax")
def argmax(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    axis = ctx.attrs["axis"] % x.dim()
    if ctx.attrs["select_last_index"]:
        idx = x.shape[axis] - 1 - torch.argmax(torch.flip(x, [axis]), dim=axis, keepdim=True)
    else:
        idx = torch.argmax(x, dim=axis, keepdim=True)
    return [idx if ctx.attrs["keepdims"] else idx.squeeze(axis)]


@kernel("relu")
def relu(ctx: NodeCtx, args: list) -> list:
    x = args[0]
    return [torch.clamp(x, min=0) if not x.dtype.is_floating_point else torch.relu(x)]


@kernel("clip")
def clip(ctx: NodeCtx, args: list) -> list:
    """On integers the bounds round inwards and clamp to the dtype's range."""
    x = args[0]
    lo, hi = ctx.attrs["min"], ctx.attrs["max"]
    if x.dtype.is_floating_point:
        return [torch.minimum(torch.maximum(x, torch.tensor(lo, dtype=x.dtype)),
                              torch.tensor(hi, dtype=x.dtype))]
    info = torch.iinfo(x.dtype)
    lo_i = info.min if lo <= info.min else min(math.ceil(lo), info.max)
    hi_i = info.max if hi >= info.max else max(math.floor(hi), info.min)
    return [torch.minimum(torch.maximum(x, torch.tensor(lo_i, dtype=x.dtype)),
                          torch.tensor(hi_i, dtype=x.dtype))]


@kernel("cast")
def cast(ctx: NodeCtx, args: list) -> list:
    """Casts between torch-representable types (float to integer truncates toward zero)."""
    to = ctx.attrs["to"]
    if to not in TORCH_DTYPES or to in ("u16", "u32", "u64"):
        raise ctx.error(f"cast to {to} has no torch kernel")
    return [args[0].to(TORCH_DTYPES[to])]


@kernel("resize")
def resize(ctx: NodeCtx, args: list) -> list:
    return [resize_tensor(args[0], ctx.attrs)]
