"""Shape and layout: reshape family, permute/transpose, cat/stack/split, indexing and slicing,
padding, expand/repeat, dtype casts, pixel (un)shuffle."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hbc.ir.graph import Value

from . import converts, module_form, norm_dim, opt
from .context import Meta, TorchContext, Unsupported


@converts(torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze, torch.unflatten,
          methods=("view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as",
                   "reshape_as", "unflatten"),
          aten=("view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze",
                "unflatten", "view_as", "reshape_as"))
def _reshape(ctx, input, *args, **kwargs):
    """Every reshape-like op becomes reshape to the static shape torch computed."""
    x = ctx.value(input)
    if ctx.out_dtype != x.dtype:
        raise Unsupported("reinterpreting a tensor's bytes as another dtype (view(dtype))")
    return ctx.reshape(x, ctx.out.shape)


converts(nn.Flatten, nn.Unflatten)(module_form(_reshape))


def _transpose_perm(ctx: TorchContext, x: Value, perm: Sequence[int]) -> Value:
    perm = [norm_dim(int(p), x.type.rank) for p in perm]
    if perm == list(range(x.type.rank)):
        return x
    return ctx.emit1("transpose", [x], {"perm": perm})


@converts(torch.permute, methods=("permute",), aten=("permute",))
def _permute(ctx, input, *dims):
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = tuple(dims[0])
    return _transpose_perm(ctx, ctx.value(input), dims)


@converts(torch.transpose, torch.swapaxes, torch.swapdims,
          methods=("transpose", "swapaxes", "swapdims"), aten=("transpose", "swapaxes"))
def _transpose(ctx, input, dim0, dim1):
    x = ctx.value(input)
    perm = list(range(x.type.rank))
    a, b = norm_dim(dim0, x.type.rank), norm_dim(dim1, x.type.rank)
    perm[a], perm[b] = perm[b], perm[a]
    return _transpose_perm(ctx, x, perm)


@converts(torch.t, methods=("t",), aten=("t", "numpy_T"))
def _t(ctx, input):
    x = ctx.value(input)
    return _transpose_perm(ctx, x, list(reversed(range(x.type.rank))))


@converts(aten=("mT",))
def _mt(ctx, input):
    return _transpose(ctx, input, -2, -1)


@converts(getattr)
def _getattr(ctx, obj, name, *default):
    """Tensor attributes that depend on the values: x.T, x.mT, x.data."""
    if name == "T":
        return _t(ctx, obj)
    if name == "mT":
        return _mt(ctx, obj)
    if name == "data":
        return ctx.value(obj)
    raise Unsupported(f"tensor attribute '.{name}'")


@converts(torch.cat, torch.concat, torch.concatenate, aten=("cat", "concat", "concatenate"))
def _cat(ctx, tensors, dim=0, *, axis=None):
    dim = axis if axis is not None else dim
    values = [ctx.value(t) for t in tensors]
    values = [v for v in values if v.type.numel or len(values) == 1]  # torch skips empties
    rank = len(ctx.out.shape)
    if len(values) == 1:
        return values[0]
    return ctx.emit1("concat", values, {"axis": norm_dim(dim, rank)})


@converts(torch.stack, aten=("stack",))
def _stack(ctx, tensors, dim=0):
    rank = len(ctx.out.shape)
    axis = norm_dim(dim, rank)
    parts = []
    for i, t in enumerate(tensors):
        v = ctx.value(t)
        parts.append(ctx.reshape(v, (*v.shape[:axis], 1, *v.shape[axis:]), part=f"unsqueeze{i}"))
    return parts[0] if len(parts) == 1 else ctx.emit1("concat", parts, {"axis": axis})


def _split_to(ctx: TorchContext, input: Any, dim: int,
              sizes: list[int] | None = None) -> tuple[Value, ...]:
    """split along ``dim`` into the pieces torch produced (sizes taken from its results)."""
    x = ctx.value(input)
    axis = norm_dim(dim, x.type.rank)
    sizes = [m.shape[axis] for m in ctx.rec] if sizes is None else sizes
    if len(sizes) == 1:
        return (x,)
    return tuple(ctx.emit("split", [x], {"axis": axis, "sizes": sizes},
                          num_outputs=len(sizes)))


@converts(torch.split, torch.tensor_split, methods=("split", "tensor_split", "split_with_sizes"),
          aten=("split", "split_with_sizes", "tensor_split", "split_copy"))
def _split(ctx, tensor, split_size_or_sections, dim=0):
    return _split_to(ctx, tensor, dim)


@converts(torch.chunk, methods=("chunk",), aten=("chunk",))
def _chunk(ctx, input, chunks, dim=0):
    return _split_to(ctx, input, dim)


@converts(torch.unbind, methods=("unbind",), aten=("unbind",))
def _unbind(ctx, input, dim=0):
    pieces = _split_to(ctx, input, dim, [1] * len(ctx.rec))
    return tuple(ctx.reshape(p, m.shape, part=f"squeeze{i}")
                 for i, (p, m) in enumerate(zip(pieces, ctx.rec, strict=True)))


@converts(operator.getitem)
def _getitem(ctx, obj, index):
    """Python sequences index directly; tensors with ints, slices, None, Ellipsis and (one)
    constant index list: slice + gather + reshape."""
    if isinstance(obj, (list, tuple, dict)):
        return obj[index]
    x = ctx.value(obj)
    idx = index if isinstance(index, tuple) else (index,)
    consuming = sum(1 for i in idx if i is not None and i is not Ellipsis)
    if Ellipsis in idx:
        at = idx.index(Ellipsis)
        idx = idx[:at] + (slice(None),) * (x.type.rank - consuming) + idx[at + 1:]
    starts, ends, axes, steps = [], [], [], []
    gathers: list[tuple[int, np.ndarray]] = []
    has_int = False
    axis = 0
    for i in idx:
        if i is None:
            continue
        dim = x.shape[axis]
        if isinstance(i, (int, np.integer)):
            has_int = True
            j = int(i) + dim if i < 0 else int(i)
            starts, ends, axes, steps = starts + [j], ends + [j + 1], axes + [axis], steps + [1]
        elif isinstance(i, slice):
            start, stop, step = i.indices(dim)
            if (start, stop, step) != (0, dim, 1):
                starts, ends, axes, steps = (starts + [start], ends + [stop], axes + [axis],
                                             steps + [step])
        elif isinstance(i, (Value, torch.Tensor, list)):
            arr = ctx.array(i, "a tensor index")
            if arr.dtype == np.bool_:
                arr = np.nonzero(arr.reshape(-1))[0]
            gathers.append((axis, arr.astype(np.int64)))
        else:
            raise Unsupported(f"tensor index of type {type(i).__name__}")
        axis += 1
    if gathers and (len(gathers) > 1 or has_int):
        raise Unsupported("advanced indexing with several index lists (or lists mixed with "
                          "integers)", hint="index one axis at a time")
    if axes:
        x = ctx.emit1("slice", [x], {"starts": starts, "ends": ends, "axes": axes,
                                     "steps": steps})
    for g_axis, arr in gathers:
        x = ctx.emit1("gather", [x, ctx.constant(arr, "index")], {"axis": g_axis},
                      part="gather" if axes else None)
    return ctx.reshape(x, ctx.out.shape, part="reshape" if axes or gathers else None)


def _slice_axis(ctx: TorchContext, input: Any, dim: int, start: Any, end: Any,
                step: Any) -> Value:
    x = ctx.value(input)
    axis = norm_dim(dim, x.type.rank)
    start, end, step = slice(start, end, step).indices(x.shape[axis])
    if (start, end, step) == (0, x.shape[axis], 1):
        return ctx.reshape(x, ctx.out.shape)
    y = ctx.emit1("slice", [x], {"starts": [start], "ends": [end], "axes": [axis],
                                 "steps": [1 if step is None else int(step)]})
    return ctx.reshape(y, ctx.out.shape, part="reshape")


@converts(aten=("slice",))
def _slice_aten(ctx, input, dim=0, start=None, end=None, step=1):
    return _slice_axis(ctx, input, dim, start, end, step)


@converts(torch.narrow, methods=("narrow",), aten=("narrow",))
def _narrow(ctx, input, dim, start, length):
    return _slice_axis(ctx, input, dim, int(start), int(start) + int(length), 1)


@converts(torch.select, methods=("select",), aten=("select",))
def _select(ctx, input, dim, index):
    x = ctx.value(input)
    axis = norm_dim(dim, x.type.rank)
    index = int(index) + x.shape[axis] if int(index) < 0 else int(index)
    return _slice_axis(ctx, x, axis, index, index + 1, 1)


@converts(aten=("index",))
def _index_aten(ctx, input, indices):
    return _getitem(ctx, input, tuple(slice(None) if i is None else i for i in indices))


_PAD_MODES = {"constant": "constant", "zeros": "constant", "reflect": "reflect",
              "replicate": "edge", "circular": "wrap"}


def pad_ir(ctx: TorchContext, x: Value, begins: list[int], ends: list[int], mode: str,
            value: float, part: str | None) -> Value:
    if not any(begins) and not any(ends):
        return x
    return ctx.emit1("pad", [x], {"pads": list(begins) + list(ends), "mode": mode,
                                  "value": float(value or 0.0)}, part=part)


def torch_pad(ctx: TorchContext, input: Any, pad: Sequence[int], mode: str, value: Any,
         part: str | None = None) -> Value:
    """torch pad order (last dim first: left, right, top, bottom...) to ONNX begins/ends."""
    x = ctx.value(input)
    if mode not in _PAD_MODES:
        raise Unsupported(f"pad mode '{mode}'")
    r = x.type.rank
    begins, ends = [0] * r, [0] * r
    for i in range(len(pad) // 2):
        begins[r - 1 - i], ends[r - 1 - i] = int(pad[2 * i]), int(pad[2 * i + 1])
    return pad_ir(ctx, x, begins, ends, _PAD_MODES[mode], value, part)


@converts(F.pad, aten=("pad",))
def _pad_fn(ctx, input, pad, mode="constant", value=None):
    return torch_pad(ctx, input, pad, mode, value)


@converts(aten=("constant_pad_nd",))
def _constant_pad(ctx, input, pad, value=0):
    return torch_pad(ctx, input, pad, "constant", value)


for _nd in (1, 2, 3):
    converts(aten=(f"reflection_pad{_nd}d",))(
        lambda ctx, input, padding: torch_pad(ctx, input, padding, "reflect", 0.0))
    converts(aten=(f"replication_pad{_nd}d",))(
        lambda ctx, input, padding: torch_pad(ctx, input, padding, "replicate", 0.0))


@converts(nn.modules.padding._ConstantPadNd)
def _constant_pad_module(ctx, m, input):
    return torch_pad(ctx, input, m.padding, "constant", m.value)


@converts(nn.modules.padding._ReflectionPadNd)
def _reflection_pad_module(ctx, m, input):
    return torch_pad(ctx, input, m.padding, "reflect", 0.0)


@converts(nn.modules.padding._ReplicationPadNd)
def _replication_pad_module(ctx, m, input):
    return torch_pad(ctx, input, m.padding, "replicate", 0.0)


@converts(opt(nn.modules.padding, "_CircularPadNd"))
def _circular_pad_module(ctx, m, input):
    return torch_pad(ctx, input, m.padding, "circular", 0.0)


def _tile(ctx: TorchContext, x: Value, reps: Sequence[int], part: str) -> Value:
    """Repeat ``x`` ``reps[i]`` times along each axis with concat (no big constants)."""
    for axis, r in enumerate(reps):
        if r > 1:
            x = ctx.emit1("concat", [x] * r, {"axis": axis}, part=f"{part}{axis}")
    return x


@converts(torch.broadcast_to, methods=("expand", "expand_as", "broadcast_to"),
          aten=("expand", "expand_as", "broadcast_to", "expand_copy"))
def _expand(ctx, input, *args, **kwargs):
    x = ctx.value(input)
    out = ctx.out.shape
    x = ctx.reshape(x, (1,) * (len(out) - x.type.rank) + x.shape, part="unsqueeze")
    return _tile(ctx, x, [o if i == 1 else 1 for i, o in zip(x.shape, out, strict=True)],
                 "expand")


@converts(methods=("repeat",), aten=("repeat",))
def _repeat(ctx, input, *sizes):
    if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)):
        sizes = tuple(sizes[0])
    x = ctx.value(input)
    x = ctx.reshape(x, (1,) * (len(sizes) - x.type.rank) + x.shape, part="unsqueeze")
    return _tile(ctx, x, [int(s) for s in sizes], "repeat")


@converts(methods=("to", "type", "type_as", "float", "double", "half", "bfloat16", "int",
                   "long", "short", "char", "byte", "bool"),
          aten=("to", "_to_copy", "type_as"))
def _cast(ctx, input, *args, **kwargs):
    """dtype conversions: cast to the dtype torch produced (device moves are no-ops)."""
    if not isinstance(ctx.rec, Meta):
        return ctx.rec  # x.type() without arguments returns a string
    return ctx.cast(ctx.value(input), ctx.out_dtype, part=None)


@converts(F.pixel_shuffle, torch.pixel_shuffle, nn.PixelShuffle, aten=("pixel_shuffle",))
def _pixel_shuffle(ctx, input, upscale_factor=None):
    if isinstance(input, nn.Module):
        input, upscale_factor = upscale_factor, input.upscale_factor
    x = ctx.value(input)
    if x.type.rank != 4:
        raise Unsupported(f"pixel_shuffle of a rank-{x.type.rank} tensor (only NCHW)")
    return ctx.emit1("depth_to_space", [x], {"blocksize": int(upscale_factor), "mode": "CRD"})


@converts(F.pixel_unshuffle, torch.pixel_unshuffle, nn.PixelUnshuffle,
          aten=("pixel_unshuffle",))
def _pixel_unshuffle(ctx, input, downscale_factor=None):
    """(N,C,H*b,W*b) -> (N,C*b*b,H,W) with channel c*b*b + i*b + j: space_to_depth CRD."""
    if isinstance(input, nn.Module):
        input, downscale_factor = downscale_factor, input.downscale_factor
    x = ctx.value(input)
    if x.type.rank != 4:
        raise Unsupported(f"pixel_unshuffle of a rank-{x.type.rank} tensor (only NCHW)")
    return ctx.emit1("space_to_depth", [x], {"blocksize": int(downscale_factor), "mode": "CRD"})
