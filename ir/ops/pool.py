"""Pooling ops: max_pool (with ONNX argmax indices), avg_pool, global_avg_pool, global_max_pool.

Windowed pools are N-d over the trailing ``len(kernel)`` axes of an [N, C, *spatial] input with
ONNX MaxPool/AveragePool semantics: explicit ``pads`` in ONNX order, dilations, and ceil mode
(a last window that would start inside the end padding is dropped, as onnxruntime and PyTorch do).
Every pool has a ``layout`` attribute: with "NHWC" its input and output are channels-last
([N, *spatial, C]); the references convert to NCHW, compute and convert back.
The references loop over kernel taps, each tap a vectorized operation on the whole tensor
(max_pool and qavg_pool read strided windows from contiguous copies of the stride phases,
:class:`StridePhases`).
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np

from ..registry import INT, INTS, Attr, InferError, OpDef, register
from ..types import FLOAT_DTYPES, TensorType
from .common import (
    LAYOUT_ATTR,
    LazyResults,
    channels_first_type,
    from_channels_first,
    layout_result,
    like,
    require_float,
    to_channels_first,
)
from .window import acc_dtype, check_window_attrs, pad_spatial, spatial_out_shape, tap_slices

POOL_WINDOW_ATTRS = (Attr("kernel", INTS), Attr("strides", INTS), Attr("pads", INTS),
           Attr("dilations", INTS), Attr("ceil_mode", INT, 0))

#: integer dtypes max pooling accepts (it only selects, so any integer is exact)
_MAX_INT_DTYPES = ("i8", "i16", "u8")


def pool_infer(what: str, x: TensorType, attrs: dict) -> list[int]:
    """Checks shared by the windowed pools; returns the output shape."""
    kernel = attrs["kernel"]
    n = len(kernel)
    if n < 1 or x.rank != n + 2:
        raise InferError(f"{what}: input must have rank 2 + len(kernel) = {n + 2} "
                         f"([N, C, *spatial]), got shape {list(x.shape)} with kernel {kernel}")
    if min(kernel) < 1:
        raise InferError(f"{what}: kernel {kernel} must all be >= 1")
    check_window_attrs(what, n, attrs)
    if attrs["ceil_mode"] not in (0, 1):
        raise InferError(f"{what}: ceil_mode must be 0 or 1, got {attrs['ceil_mode']}")
    out = spatial_out_shape(what, x.shape[2:], kernel, attrs, bool(attrs["ceil_mode"]))
    return [*x.shape[:2], *out]


def pool_out_shape(x: np.ndarray, what: str, attrs: dict) -> list[int]:
    return spatial_out_shape(what, x.shape[2:], attrs["kernel"], attrs, bool(attrs["ceil_mode"]))


def pool_padded(x: np.ndarray, attrs: dict, out: list[int], value: float | int) -> np.ndarray:
    """``x`` padded by pads, plus end padding so every (ceil mode) window is in bounds."""
    n = len(attrs["kernel"])
    begins, ends = list(attrs["pads"][:n]), list(attrs["pads"][n:])
    for i in range(n):
        need = (out[i] - 1) * attrs["strides"][i] + (attrs["kernel"][i] - 1) * \
            attrs["dilations"][i] + 1
        ends[i] = max(ends[i], need - x.shape[2 + i] - begins[i])
    return pad_spatial(x, begins, ends, value)


class StridePhases:
    """Kernel taps as unit-stride slices: a strided window reads ``xp[o*s + t*d]`` for output
    ``o`` and tap ``t``, which is element ``o + t*d // s`` of the stride phase ``t*d mod s``
    (``xp[..., p::s]``). Each phase used is copied once into a contiguous plane of spatial shape
    ``grid`` (``out + the largest shift``; cropped, the rest ``fill``), so every tap's operand is
    a contiguous slice instead of a strided view (numpy's vector loops need unit strides). With
    unit strides the one phase is ``xp`` itself (no copy)."""

    def __init__(self, xp: np.ndarray, kernel, strides, dilations, out, fill=0) -> None:
        n = len(out)
        self.geometry = g = _phase_geometry(tuple(xp.shape[xp.ndim - n:]), tuple(kernel),
                                            tuple(strides), tuple(dilations), tuple(out))
        lead = (slice(None),) * (xp.ndim - n)
        self.planes: dict[tuple[int, ...], np.ndarray] = {}
        for phase, (src_slices, fit) in g.copies.items():
            if src_slices is None:
                self.planes[phase] = xp
                continue
            plane = np.full((*xp.shape[:xp.ndim - n], *g.grid), fill, xp.dtype)
            plane[lead + fit] = xp[lead + src_slices][lead + fit]
            self.planes[phase] = plane

    def views(self):
        """(tap index, tap, view [..., *out] of its plane) for every kernel tap, row-major."""
        g = self.geometry
        for i, (tap, phase, at) in enumerate(zip(g.taps, g.phases, g.slices, strict=True)):
            yield i, tap, self.planes[phase][(...,) + at]

    def flat_views(self, lead: tuple[int, ...]):
        """The taps' operands on the flattened grid: planes reshaped to ``[*lead, grid size]``,
        tap ``t`` the slice ``[at_t, at_t + length)``, output ``o`` at flat position ``sum o_d *
        rows_d`` (``rows``: the grid's flat steps). Returns (views, length, rows); positions
        with a coordinate past ``out`` are garbage, reads stay inside the planes."""
        g = self.geometry
        flat = {k: v.reshape(*lead, -1) for k, v in self.planes.items()}
        views = [flat[phase][..., at:at + g.length] for phase, at in zip(
            g.phases, g.offsets, strict=True)]
        return views, g.length, g.rows


class _Geometry(NamedTuple):
    grid: tuple[int, ...]
    taps: list[tuple[int, ...]]
    phases: list[tuple[int, ...]]
    slices: list[tuple[slice, ...]]  # per tap: its [*out] window of the phase plane
    offsets: list[int]  # per tap: its flat offset into the phase plane
    rows: list[int]
    length: int
    copies: dict  # phase -> (slices of xp, crop) or (None, None) for xp itself


@functools.lru_cache(maxsize=1024)
def _phase_geometry(size: tuple[int, ...], kernel: tuple[int, ...], strides: tuple[int, ...],
                    dilations: tuple[int, ...], out: tuple[int, ...]) -> _Geometry:
    """The index arithmetic of :class:`StridePhases` (pure, remembered per shape)."""
    n = len(out)
    shifts = [[t * d // s for t in range(k)]
              for k, s, d in zip(kernel, strides, dilations, strict=True)]
    grid = tuple(o + sh[-1] for o, sh in zip(out, shifts, strict=True))
    taps = list(itertools.product(*map(range, kernel)))
    phases = [tuple(t * d % s for t, s, d in zip(tap, strides, dilations, strict=True))
              for tap in taps]
    rows = [math.prod(grid[d + 1:]) for d in range(n)]
    length = sum((o - 1) * r for o, r in zip(out, rows, strict=True)) + 1
    slices = [tuple(slice(sh[t], sh[t] + o) for sh, t, o in zip(shifts, tap, out, strict=True))
              for tap in taps]
    offsets = [sum(sh[t] * r for sh, t, r in zip(shifts, tap, rows, strict=True))
               for tap in taps]
    copies: dict = {}
    for phase in dict.fromkeys(phases):
        if size == grid and not any(phase):
            copies[phase] = (None, None)
            continue
        src = tuple(slice(p, None, s) for p, s in zip(phase, strides, strict=True))
        src_size = [-(-(d - p) // s) for d, p, s in zip(size, phase, strides, strict=True)]
        copies[phase] = (src, tuple(slice(0, min(g, d)) for g, d in zip(grid, src_size,
                                                                        strict=True)))
    return _Geometry(grid, taps, phases, slices, offsets, rows, length, copies)


def pool_taps(attrs: dict, out: list[int]):
    """(tap index, tap, slices of the padded input) for every kernel tap, row-major."""
    lead = (slice(None), slice(None))
    for i, tap in enumerate(itertools.product(*map(range, attrs["kernel"]))):
        yield i, tap, lead + tap_slices(tap, out, attrs["strides"], attrs["dilations"])


def _axis_positions(attrs: dict, out: list[int], dim: int, tap: int) -> np.ndarray:
    """Input coordinate (may be outside [0, size)) read along ``dim`` by ``tap``, per output."""
    return (np.arange(out[dim]) * attrs["strides"][dim] - attrs["pads"][dim]
            + tap * attrs["dilations"][dim])


def _outer(vectors: list[np.ndarray]) -> np.ndarray:
    """Broadcast 1-D per-dimension vectors to a [1, 1, *out] grid (product / logical and)."""
    n = len(vectors)
    result = np.ones([1] * (n + 2), dtype=vectors[0].dtype)
    for i, v in enumerate(vectors):
        result = result * v.reshape([1, 1] + [-1 if j == i else 1 for j in range(n)])
    return result


@register
class MaxPool(OpDef):
    """y = max over each (dilated) window of x; padding never wins.

    indices (i64, optional) is the ONNX argmax: the flat index of the first maximum into x,
    including the batch and channel offset ((n*C + c) * prod(spatial) + spatial offset); the
    spatial offset is row-major (storage_order=0) or column-major (storage_order=1). With
    ``layout="NHWC"`` indices has y's channels-last shape but still counts NCHW offsets.
    """

    name = "max_pool"
    integer = "native"
    outputs = ("y", "indices?")
    attrs = (*POOL_WINDOW_ATTRS, Attr("storage_order", INT, 0), LAYOUT_ATTR)
    category = "pool"

    def infer(self, inputs, attrs):
        x = channels_first_type(inputs[0], attrs["layout"])
        if x.dtype not in FLOAT_DTYPES and x.dtype not in _MAX_INT_DTYPES:
            raise InferError(f"max_pool input must be a float, i8, i16 or u8 tensor, got "
                             f"{x.dtype}")
        if attrs["storage_order"] not in (0, 1):
            raise InferError(f"max_pool: storage_order must be 0 or 1, got "
                             f"{attrs['storage_order']}")
        shape = pool_infer("max_pool", x, attrs)
        return [layout_result(like(x, shape), inputs[0], attrs["layout"]),
                layout_result(like(x, shape, "i64"), inputs[0], attrs["layout"])]

    def reference(self, inputs, attrs):
        x = to_channels_first(inputs[0], attrs["layout"])
        out = pool_out_shape(x, "max_pool", attrs)
        low = -np.inf if x.dtype.kind == "f" else np.iinfo(x.dtype).min
        xp = pool_padded(x, attrs, out, low)
        y = np.full((*x.shape[:2], *out), low, dtype=x.dtype)
        taps = StridePhases(xp, attrs["kernel"], attrs["strides"], attrs["dilations"], out, low)
        for _, _, xs in taps.views():
            if x.dtype.kind == "f":
                np.fmax(y, xs, out=y)  # NaN never wins (as ORT)
            else:
                np.maximum(y, xs, out=y)
        layout = attrs["layout"]
        # the indices only when asked for: the interpreter reads the node's outputs only
        return LazyResults(lambda: from_channels_first(y, layout), lambda: from_channels_first(
            self._indices(x, xp, attrs, out, low), layout))

    def _indices(self, x: np.ndarray, xp: np.ndarray, attrs: dict, out: list[int],
                 low: float | int) -> np.ndarray:
        y = np.full((*x.shape[:2], *out), low, dtype=x.dtype)
        best = np.full(y.shape, -1, dtype=np.int32)  # row-major tap index of the maximum
        for i, _, sl in pool_taps(attrs, out):
            xs = xp[sl]
            better = xs > y  # strict: the first maximum wins; NaN never does (as ORT)
            np.copyto(best, i, where=better)
            if x.dtype.kind == "f":
                np.fmax(y, xs, out=y)
            else:
                np.maximum(y, xs, out=y)
        if (best < 0).any():
            # windows whose values all equal the padding value: the first tap inside x
            for i, tap, _ in pool_taps(attrs, out):
                inside = _outer([(p >= 0) & (p < x.shape[2 + d]) for d, p in enumerate(
                    _axis_positions(attrs, out, d, t) for d, t in enumerate(tap))])
                np.copyto(best, i, where=(best < 0) & inside)
        return self._flat_indices(x.shape, attrs, out, best)

    @staticmethod
    def _flat_indices(shape: tuple[int, ...], attrs: dict, out: list[int],
                      best: np.ndarray) -> np.ndarray:
        spatial = shape[2:]
        n = len(spatial)
        taps = np.unravel_index(np.maximum(best, 0), attrs["kernel"])
        if attrs["storage_order"]:
            steps = [math.prod(spatial[:d]) for d in range(n)]
        else:
            steps = [math.prod(spatial[d + 1:]) for d in range(n)]
        index = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(
            shape[:2] + (1,) * n) * math.prod(spatial)
        for d in range(n):
            o = np.arange(out[d], dtype=np.int64).reshape([-1 if j == d else 1 for j in range(n)])
            pos = o * attrs["strides"][d] - attrs["pads"][d] + taps[d] * attrs["dilations"][d]
            index = index + pos * steps[d]
        return np.where(best < 0, -1, index).astype(np.int64)


@register
class AvgPool(OpDef):
    """y = mean over each (dilated) window of x.

    The divisor counts the window's taps inside x (count_include_pad=0), or inside x plus its
    explicit pads (count_include_pad=1); positions added only by ceil mode never count.
    """

    name = "avg_pool"
    integer = "qavg_pool"
    attrs = (*POOL_WINDOW_ATTRS, Attr("count_include_pad", INT, 0), LAYOUT_ATTR)
    category = "pool"

    def infer(self, inputs, attrs):
        x = channels_first_type(inputs[0], attrs["layout"])
        require_float(x, "avg_pool input")
        return [layout_result(like(x, pool_infer("avg_pool", x, attrs)), inputs[0],
                              attrs["layout"])]

    def reference(self, inputs, attrs):
        x = to_channels_first(inputs[0], attrs["layout"])
        out = pool_out_shape(x, "avg_pool", attrs)
        acc = acc_dtype(x.dtype)
        xp = pool_padded(x.astype(acc, copy=False), attrs, out, 0)
        total = np.zeros((*x.shape[:2], *out), dtype=acc)
        for _, _, sl in pool_taps(attrs, out):
            total += xp[sl]
        n = len(out)
        pads = attrs["pads"]
        counts = []
        for d in range(n):
            lo, hi = (-pads[d], x.shape[2 + d] + pads[n + d]) if attrs["count_include_pad"] \
                else (0, x.shape[2 + d])
            c = sum(((p >= lo) & (p < hi)).astype(np.int64) for p in (
                _axis_positions(attrs, out, d, t) for t in range(attrs["kernel"][d])))
            counts.append(np.asarray(c, dtype=acc))
        with np.errstate(divide="ignore", invalid="ignore"):
            y = total / _outer(counts)
        return [from_channels_first(y.astype(x.dtype, copy=False), attrs["layout"])]


class _GlobalPool(OpDef):
    category = "pool"
    attrs = (LAYOUT_ATTR,)
    #: integer dtypes the pool accepts besides floats (max selects, so integers are exact)
    int_dtypes: tuple[str, ...] = ()

    def infer(self, inputs, attrs):
        x = inputs[0]
        if x.dtype not in self.int_dtypes:
            require_float(x, f"{self.name} input")
        if x.rank < 3:
            raise InferError(f"{self.name} input must have rank >= 3 ([N, C, *spatial]), got "
                             f"shape {list(x.shape)}")
        x = channels_first_type(x, attrs["layout"])
        return [layout_result(like(x, (*x.shape[:2], *[1] * (x.rank - 2))), inputs[0],
                              attrs["layout"])]

    def reference(self, inputs, attrs):
        x = to_channels_first(inputs[0], attrs["layout"])
        return [from_channels_first(self._pool(x), attrs["layout"])]

    def _pool(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError


@register
class GlobalAvgPool(_GlobalPool):
    """y[n, c, 1, ...] = mean of x[n, c] over every spatial axis."""

    name = "global_avg_pool"
    integer = "qglobal_avg_pool"

    def _pool(self, x):
        axes = tuple(range(2, x.ndim))
        return np.mean(x, axis=axes, dtype=acc_dtype(x.dtype), keepdims=True).astype(x.dtype)


@register
class GlobalMaxPool(_GlobalPool):
    """y[n, c, 1, ...] = max of x[n, c] over every spatial axis."""

    name = "global_max_pool"
    integer = "native"
    int_dtypes = _MAX_INT_DTYPES

    def _pool(self, x):
        return np.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)
