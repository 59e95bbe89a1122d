"""Data movement and type ops: reshape, transpose, concat, split, slice, pad, gather, cast,
identity, depth_to_space, space_to_depth.

These ops move or select elements without arithmetic, so a per-tensor quantization of the input
still describes the output and is kept; a per-channel one is kept by ``identity`` and
``transpose`` (with the axis permuted) and dropped elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..registry import FLOAT, INT, INTS, STR, Attr, InferError, OpDef, register
from ..types import DTYPES, QuantParams, TensorType
from .common import (
    LAYOUT_ATTR,
    channels_first_type,
    from_channels_first,
    layout_result,
    like,
    norm_axis,
    permuted_layout,
    same_dtype,
    to_channels_first,
)
from .quant import E8M0_ROUND_MODES, convert


def _moved(t: TensorType, shape: Sequence[int] | None = None) -> TensorType:
    """The type of elements of ``t`` rearranged into ``shape``: per-tensor quant is kept."""
    out = like(t, shape)
    return out.with_(quant=t.quant) if t.quant is not None and t.quant.axis is None else out


class _Movement(OpDef):
    category = "tensor"


@register
class Identity(_Movement):
    """y = x (type, layout and quantization included)."""

    name = "identity"
    integer = "native"

    def infer(self, inputs, attrs):
        return [inputs[0]]

    def reference(self, inputs, attrs):
        return [inputs[0]]


@register
class Reshape(_Movement):
    """y = x with a new shape of the same element count (row-major order); ``shape`` is fully
    resolved (no 0 or -1 placeholders)."""

    name = "reshape"
    integer = "native"
    attrs = (Attr("shape", INTS),)

    def infer(self, inputs, attrs):
        (x,) = inputs
        shape = attrs["shape"]
        if any(d < 0 for d in shape):
            raise InferError(f"reshape target {shape} has negative dimensions (resolve -1 first)")
        if int(np.prod(shape, dtype=np.int64)) != x.numel:
            raise InferError(f"cannot reshape {list(x.shape)} ({x.numel} elements) to {shape} "
                             f"({int(np.prod(shape, dtype=np.int64))} elements)")
        return [_moved(x, shape)]

    def reference(self, inputs, attrs):
        return [inputs[0].reshape(attrs["shape"])]


@register
class Transpose(_Movement):
    """y = x with its axes permuted: y.shape[i] = x.shape[perm[i]]."""

    name = "transpose"
    integer = "native"
    attrs = (Attr("perm", INTS),)

    def infer(self, inputs, attrs):
        (x,) = inputs
        perm = attrs["perm"]
        if sorted(perm) != list(range(x.rank)):
            raise InferError(f"perm {perm} is not a permutation of the {x.rank} axes of x")
        out = like(x, [x.shape[p] for p in perm]).with_(layout=permuted_layout(x.layout, perm))
        q = x.quant
        if q is not None:
            axis = None if q.axis is None else perm.index(q.axis)
            out = out.with_(quant=QuantParams(q.scale, axis, q.zero_point))
        return [out]

    def reference(self, inputs, attrs):
        return [np.transpose(inputs[0], attrs["perm"])]


@register
class Concat(_Movement):
    """y = the inputs joined along ``axis``; every other dimension must match."""

    name = "concat"
    integer = "native"
    inputs = ("xs*",)
    attrs = (Attr("axis", INT),)

    def infer(self, inputs, attrs):
        if not inputs or any(t is None for t in inputs):
            raise InferError("concat needs at least one input and no absent ones")
        first = inputs[0]
        dtype = same_dtype(inputs, "concat inputs")
        axis = norm_axis(attrs["axis"], first.rank, "concat axis")
        for i, t in enumerate(inputs):
            if t.rank != first.rank or any(
                a != b for k, (a, b) in enumerate(zip(t.shape, first.shape, strict=True))
                if k != axis
            ):
                raise InferError(f"input {i} shape {list(t.shape)} does not match input 0 shape "
                                 f"{list(first.shape)} outside axis {axis}")
        shape = list(first.shape)
        shape[axis] = sum(t.shape[axis] for t in inputs)
        out = like(first, shape, dtype)
        quants = {t.quant for t in inputs}
        if len(quants) == 1 and first.quant is not None and first.quant.axis is None:
            out = out.with_(quant=first.quant)
        return [out]

    def reference(self, inputs, attrs):
        return [np.concatenate(inputs, axis=norm_axis(attrs["axis"], inputs[0].ndim))]


@register
class Split(_Movement):
    """ys[i] = the i-th consecutive piece of x along ``axis``, ``sizes[i]`` long."""

    name = "split"
    integer = "native"
    outputs = ("ys*",)
    attrs = (Attr("axis", INT), Attr("sizes", INTS))

    def infer(self, inputs, attrs):
        (x,) = inputs
        axis = norm_axis(attrs["axis"], x.rank, "split axis")
        sizes = attrs["sizes"]
        if not sizes or any(s < 0 for s in sizes) or sum(sizes) != x.shape[axis]:
            raise InferError(f"split sizes {sizes} must be non-negative and add up to "
                             f"{x.shape[axis]} (axis {axis} of {list(x.shape)})")
        outs = []
        for s in sizes:
            shape = list(x.shape)
            shape[axis] = s
            outs.append(_moved(x, shape))
        return outs

    def reference(self, inputs, attrs):
        x = inputs[0]
        cuts = np.cumsum(attrs["sizes"])[:-1]
        return list(np.split(x, cuts, axis=norm_axis(attrs["axis"], x.ndim)))


def slice_ranges(shape: Sequence[int], attrs) -> list[slice]:
    """Per-axis Python slices of an ONNX Slice: negative starts/ends count from the end, then
    starts/ends are clamped to [0, dim] (step > 0) or [-1, dim - 1] (step < 0)."""
    starts, ends, axes, steps = attrs["starts"], attrs["ends"], attrs["axes"], attrs["steps"]
    rank = len(shape)
    axes = axes or list(range(len(starts)))
    steps = steps or [1] * len(starts)
    if not len(starts) == len(ends) == len(axes) == len(steps):
        raise InferError(f"slice starts {starts}, ends {ends}, axes {axes} and steps {steps} "
                         "must have the same length")
    out = [slice(None)] * rank
    seen: set[int] = set()
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        a = norm_axis(axis, rank, "slice axis")
        if a in seen:
            raise InferError(f"slice axis {a} is given twice (axes {axes})")
        seen.add(a)
        if step == 0:
            raise InferError("slice steps must be non-zero")
        dim = shape[a]
        start = start + dim if start < 0 else start
        end = end + dim if end < 0 else end
        if step > 0:
            start, end = min(max(start, 0), dim), min(max(end, 0), dim)
        else:
            start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
        out[a] = slice(start, None if end < 0 else end, step)
    return out


@register
class Slice(_Movement):
    """y = x[starts:ends:steps] along ``axes`` with ONNX clamping (negative indices count from the
    end, out-of-range bounds are clamped, negative steps walk backwards)."""

    name = "slice"
    integer = "native"
    attrs = (Attr("starts", INTS), Attr("ends", INTS), Attr("axes", INTS, []),
             Attr("steps", INTS, []))

    def infer(self, inputs, attrs):
        (x,) = inputs
        ranges = slice_ranges(x.shape, attrs)
        shape = [len(range(*r.indices(d))) for r, d in zip(ranges, x.shape, strict=True)]
        return [_moved(x, shape)]

    def reference(self, inputs, attrs):
        x = inputs[0]
        return [x[tuple(slice_ranges(x.shape, attrs))]]


@register
class Pad(_Movement):
    """y = x padded by ``pads`` ([x1_begin, x2_begin, ..., x1_end, x2_end]) with ``value``
    (constant), the mirror without the edge (reflect), the edge (edge) or the other end (wrap).
    Negative pads crop."""

    name = "pad"
    integer = "native"
    attrs = (Attr("pads", INTS), Attr("mode", STR, "constant",
                                      choices=("constant", "reflect", "edge", "wrap")),
             Attr("value", FLOAT, 0.0))

    def infer(self, inputs, attrs):
        (x,) = inputs
        pads = attrs["pads"]
        if len(pads) != 2 * x.rank:
            raise InferError(f"pad needs {2 * x.rank} pads for rank {x.rank}, got {len(pads)}")
        shape = [d + b + e for d, b, e in zip(x.shape, pads[: x.rank], pads[x.rank:], strict=True)]
        if any(d < 0 for d in shape):
            raise InferError(f"pads {pads} crop more than the shape {list(x.shape)}")
        for i, (d, b, e) in enumerate(zip(x.shape, pads[: x.rank], pads[x.rank:], strict=True)):
            if attrs["mode"] != "constant" and max(b, e) > 0 and d + min(b, 0) + min(e, 0) == 0:
                raise InferError(f"{attrs['mode']} pad of an empty axis {i}")
        return [_moved(x, shape)]

    def reference(self, inputs, attrs):
        x = inputs[0]
        r = x.ndim
        begin, end = attrs["pads"][:r], attrs["pads"][r:]
        # negative pads crop first, then the positive ones pad
        x = x[tuple(slice(max(-b, 0), d - max(-e, 0))
                    for d, b, e in zip(x.shape, begin, end, strict=True))]
        width = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end, strict=True)]
        if attrs["mode"] == "constant":
            value = np.asarray(attrs["value"]).astype(x.dtype)
            return [np.pad(x, width, mode="constant", constant_values=value)]
        return [np.pad(x, width, mode=attrs["mode"])]


@register
class Gather(_Movement):
    """y = take(x, indices, axis): y.shape = x.shape[:axis] + indices.shape + x.shape[axis+1:];
    negative indices count from the end."""

    name = "gather"
    integer = "native"
    inputs = ("x", "indices")
    attrs = (Attr("axis", INT, 0),)

    def infer(self, inputs, attrs):
        x, idx = inputs
        if idx.dtype not in ("i32", "i64"):
            raise InferError(f"gather indices must be i32 or i64, got {idx.dtype}")
        if not x.rank:
            raise InferError("gather needs data of rank >= 1, got a scalar")
        axis = norm_axis(attrs["axis"], x.rank, "gather axis")
        return [_moved(x, x.shape[:axis] + idx.shape + x.shape[axis + 1:])]

    def reference(self, inputs, attrs):
        x, idx = inputs
        axis = norm_axis(attrs["axis"], x.ndim, "gather axis")
        dim = x.shape[axis]
        if idx.size and (idx.min() < -dim or idx.max() >= dim):
            raise InferError(f"gather index out of range [{-dim}, {dim - 1}] for axis {axis}: "
                             f"{int(idx.min()) if idx.min() < -dim else int(idx.max())}")
        return [np.take(x, np.where(idx < 0, idx + dim, idx), axis=axis)]


@register
class Cast(_Movement):
    """y = x converted to dtype ``to`` (ONNX Cast semantics: float8 targets saturate to +-max when
    ``saturate`` is 1, f8e8m0 rounds by ``round_mode``, float to integer truncates)."""

    name = "cast"
    attrs = (Attr("to", STR, choices=tuple(DTYPES)), Attr("saturate", INT, 1),
             Attr("round_mode", STR, "up", choices=E8M0_ROUND_MODES))

    def infer(self, inputs, attrs):
        return [like(inputs[0], dtype=attrs["to"])]

    def reference(self, inputs, attrs):
        return [convert(inputs[0], attrs["to"], bool(attrs["saturate"]), attrs["round_mode"])]


class _BlockRearrange(_Movement):
    """Rearrangement between channel blocks and spatial blocks of ``blocksize``, described on
    NCHW; with ``layout="NHWC"`` input and output are channels-last and the reference converts to
    NCHW, rearranges and converts back."""

    attrs = (Attr("blocksize", INT), Attr("mode", STR, "DCR", choices=("DCR", "CRD")),
             LAYOUT_ATTR)

    def infer(self, inputs, attrs):
        x = channels_first_type(inputs[0], attrs["layout"])
        n, c, h, w = self._check(x, b := attrs["blocksize"])
        return [layout_result(_moved(x, self._shape(n, c, h, w, b)), inputs[0],
                              attrs["layout"])]

    def reference(self, inputs, attrs):
        x = to_channels_first(inputs[0], attrs["layout"])
        y = self._rearrange(x, attrs["blocksize"], attrs["mode"])
        return [from_channels_first(y, attrs["layout"])]

    def _check(self, x: TensorType, b: int) -> tuple[int, int, int, int]:
        if x.rank != 4:
            raise InferError(f"{self.name} needs a rank-4 input, got {list(x.shape)}")
        if b < 1:
            raise InferError(f"blocksize must be positive, got {b}")
        return x.shape  # type: ignore[return-value]

    def _shape(self, n: int, c: int, h: int, w: int, b: int) -> list[int]:
        """The NCHW output shape (InferError when the sizes do not divide)."""
        raise NotImplementedError

    def _rearrange(self, x: np.ndarray, b: int, mode: str) -> np.ndarray:
        raise NotImplementedError


@register
class DepthToSpace(_BlockRearrange):
    """[N, C*b*b, H, W] -> [N, C, H*b, W*b]; DCR takes the depth index as (bh, bw, c), CRD as
    (c, bh, bw)."""

    name = "depth_to_space"
    integer = "native"

    def _shape(self, n, c, h, w, b):
        if c % (b * b):
            raise InferError(f"channels {c} are not divisible by blocksize^2 = {b * b}")
        return [n, c // (b * b), h * b, w * b]

    def _rearrange(self, x, b, mode):
        n, c, h, w = x.shape
        if mode == "DCR":
            y = x.reshape(n, b, b, c // (b * b), h, w).transpose(0, 3, 4, 1, 5, 2)
        else:
            y = x.reshape(n, c // (b * b), b, b, h, w).transpose(0, 1, 4, 2, 5, 3)
        return y.reshape(n, c // (b * b), h * b, w * b)


@register
class SpaceToDepth(_BlockRearrange):
    """[N, C, H*b, W*b] -> [N, C*b*b, H, W], the inverse of depth_to_space in the same mode."""

    name = "space_to_depth"
    integer = "native"

    def _shape(self, n, c, h, w, b):
        if h % b or w % b:
            raise InferError(f"spatial size {h}x{w} is not divisible by blocksize {b}")
        return [n, c * b * b, h // b, w // b]

    def _rearrange(self, x, b, mode):
        n, c, h, w = x.shape
        y = x.reshape(n, c, h // b, b, w // b, b)
        perm = (0, 3, 5, 1, 2, 4) if mode == "DCR" else (0, 1, 3, 5, 2, 4)
        return y.transpose(perm).reshape(n, c * b * b, h // b, w // b)
