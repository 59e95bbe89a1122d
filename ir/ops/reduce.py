"""Reductions: reduce_mean, reduce_max, reduce_sum over a set of axes, and argmax along one."""

from __future__ import annotations

import numpy as np

from ..registry import INT, INTS, Attr, InferError, OpDef, register
from ..types import FLOAT_DTYPES
from .common import like, norm_axis


def reduced_axes(rank: int, axes: list[int]) -> tuple[int, ...]:
    """``axes`` normalized and sorted; empty means every axis."""
    if not axes:
        return tuple(range(rank))
    norm = [norm_axis(a, rank, "reduce axis") for a in axes]
    if len(set(norm)) != len(norm):
        raise InferError(f"reduce axes {axes} name an axis twice")
    return tuple(sorted(norm))


def reduced_shape(shape: tuple[int, ...], axes: tuple[int, ...], keepdims: bool) -> list[int]:
    if keepdims:
        return [1 if i in axes else d for i, d in enumerate(shape)]
    return [d for i, d in enumerate(shape) if i not in axes]


class _Reduce(OpDef):
    inputs = ("x",)
    outputs = ("y",)
    category = "reduce"
    attrs = (Attr("axes", INTS, []), Attr("keepdims", INT, 1))
    #: dtypes the reduction is defined on besides the float ones
    extra_dtypes: frozenset[str] = frozenset({"i8", "i16", "i32", "i64", "u8", "u16", "u32",
                                              "u64"})

    def infer(self, inputs, attrs):
        (x,) = inputs
        if x.dtype not in FLOAT_DTYPES and x.dtype not in self.extra_dtypes:
            raise InferError(f"{self.name} does not support dtype {x.dtype}")
        axes = reduced_axes(x.rank, attrs["axes"])
        return [like(x, reduced_shape(x.shape, axes, bool(attrs["keepdims"])))]

    def reference(self, inputs, attrs):
        (x,) = inputs
        axes = reduced_axes(x.ndim, attrs["axes"])
        with np.errstate(all="ignore"):
            y = self._apply(x, axes)
        y = np.asarray(y).astype(x.dtype, copy=False)
        return [y.reshape(reduced_shape(x.shape, axes, bool(attrs["keepdims"])))]

    def _apply(self, x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
        raise NotImplementedError


def _accumulator(dtype: np.dtype) -> np.dtype:
    """f16 sums accumulate in f32; integers in their own width (wrapping, as hardware adders)."""
    return np.dtype(np.float32) if dtype == np.float16 else dtype


@register
class ReduceSum(_Reduce):
    """y = sum of x over ``axes`` (all axes if empty); an empty reduction gives 0."""

    name = "reduce_sum"

    def _apply(self, x, axes):
        return np.sum(x, axis=axes, dtype=_accumulator(x.dtype), keepdims=True)


@register
class ReduceMean(_Reduce):
    """y = mean of x over ``axes`` (all axes if empty); an empty reduction gives NaN."""

    name = "reduce_mean"
    integer = "qglobal_avg_pool"

    def _apply(self, x, axes):
        count = int(np.prod([x.shape[a] for a in axes], dtype=np.int64))
        acc = np.float64 if x.dtype == np.float64 else np.float32
        total = np.sum(x, axis=axes, dtype=acc if x.dtype.kind == "f" else np.float64,
                       keepdims=True)
        if x.dtype.kind in "iu":
            return np.trunc(total / count) if count else np.zeros_like(total)
        return total / count if count else np.full_like(total, np.nan)


@register
class ReduceMax(_Reduce):
    """y = maximum of x over ``axes`` (all axes if empty); an empty reduction gives the lowest
    value of the dtype (-inf for floats, False for bool)."""

    name = "reduce_max"
    integer = "native"
    extra_dtypes = _Reduce.extra_dtypes | {"bool"}

    def _apply(self, x, axes):
        if x.dtype == np.bool_:
            lowest = False
        elif x.dtype.kind == "f":
            lowest = -np.inf
        else:
            lowest = np.iinfo(x.dtype).min
        return np.max(x, axis=axes, keepdims=True, initial=lowest)


@register
class ArgMax(OpDef):
    """y = index (i64) of the maximum of x along ``axis``; the first one on ties, the last one
    with ``select_last_index``."""

    name = "argmax"
    integer = "native"
    category = "reduce"
    attrs = (Attr("axis", INT, 0), Attr("keepdims", INT, 1), Attr("select_last_index", INT, 0))

    def infer(self, inputs, attrs):
        (x,) = inputs
        axis = norm_axis(attrs["axis"], x.rank, "argmax axis")
        if x.shape[axis] == 0:
            raise InferError(f"argmax over the empty axis {axis} of {list(x.shape)}")
        return [like(x, reduced_shape(x.shape, (axis,), bool(attrs["keepdims"])), "i64")]

    def reference(self, inputs, attrs):
        (x,) = inputs
        axis = norm_axis(attrs["axis"], x.ndim, "argmax axis")
        if attrs["select_last_index"]:
            idx = x.shape[axis] - 1 - np.argmax(np.flip(x, axis), axis=axis)
        else:
            idx = np.argmax(x, axis=axis)
        idx = np.expand_dims(idx, axis).astype(np.int64)
        return [idx.reshape(reduced_shape(x.shape, (axis,), bool(attrs["keepdims"])))]
