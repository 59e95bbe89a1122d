"""Helpers shared by op declarations: broadcasting, axis normalization, dtype checks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..registry import STR, Attr, InferError
from ..types import FLOAT_DTYPES, TensorType


def norm_axis(axis: int, rank: int, what: str = "axis") -> int:
    """``axis`` in [0, rank); InferError if out of range."""
    if not -rank <= axis < max(rank, 1):
        raise InferError(f"{what} {axis} is out of range for rank {rank}")
    return axis % rank if rank else 0


def broadcast_shapes(*shapes: Sequence[int]) -> tuple[int, ...]:
    """numpy broadcasting of static shapes; InferError naming both shapes if incompatible."""
    try:
        return tuple(np.broadcast_shapes(*[tuple(s) for s in shapes]))
    except ValueError:
        raise InferError(
            "shapes " + " and ".join(str(list(s)) for s in shapes) + " do not broadcast"
        ) from None


def same_dtype(types: Sequence[TensorType | None], what: str = "inputs") -> str:
    """The common dtype of the given types; InferError if they differ."""
    dts = {t.dtype for t in types if t is not None}
    if len(dts) != 1:
        raise InferError(f"{what} must have one dtype, got {', '.join(sorted(dts))}")
    return dts.pop()


def require_float(t: TensorType, what: str = "input") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InferError(f"{what} must be a float tensor, got {t.dtype}")


def require_rank(t: TensorType, ranks: Sequence[int] | int, what: str = "input") -> None:
    ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
    if t.rank not in ranks:
        raise InferError(f"{what} must have rank {' or '.join(map(str, ranks))}, got {t.rank} "
                         f"(shape {list(t.shape)})")


def like(t: TensorType, shape: Sequence[int] | None = None, dtype: str | None = None) -> TensorType:
    """A plain (unquantized) type derived from ``t`` with another shape and/or dtype.

    The layout tag is kept unless the rank changes (a tag describes the axes of one rank).
    """
    shape = tuple(t.shape if shape is None else shape)
    return TensorType(dtype or t.dtype, shape, t.layout if len(shape) == t.rank else None)


# -- layouts ------------------------------------------------------------------------------------
# Layout-sensitive ops (conv, conv_transpose, conv_fused, batch_norm, the pools, depth_to_space,
# space_to_depth, grid_sample) carry an attribute ``layout`` ("NCHW" default, or "NHWC": channels
# last). Their references convert to NCHW, compute and convert back; these helpers move between
# the two for any rank >= 3 (N, C, spatial... <-> N, spatial..., C).
LAYOUT_ATTR_CHOICES = ("NCHW", "NHWC")
#: the ``layout`` attribute of layout-sensitive ops
LAYOUT_ATTR = Attr("layout", STR, "NCHW", choices=LAYOUT_ATTR_CHOICES)


def to_channels_first(shape_or_array, layout: str):
    """A shape tuple or array given in ``layout``, as NCHW (arrays C-contiguous, so a reference
    computes bit for bit what it computes on NCHW data)."""
    if layout == "NCHW":
        return shape_or_array
    if isinstance(shape_or_array, np.ndarray):
        return np.ascontiguousarray(np.moveaxis(shape_or_array, -1, 1))
    s = tuple(shape_or_array)
    return (s[0], s[-1], *s[1:-1])


def from_channels_first(shape_or_array, layout: str):
    """A shape tuple or array given in NCHW, in ``layout``."""
    if layout == "NCHW":
        return shape_or_array
    if isinstance(shape_or_array, np.ndarray):
        return np.ascontiguousarray(np.moveaxis(shape_or_array, 1, -1))
    s = tuple(shape_or_array)
    return (s[0], *s[2:], s[1])


def channels_first_type(t: TensorType, layout: str) -> TensorType:
    """The type ``t`` (whose axes are in ``layout``) seen as NCHW, for shape checks."""
    if layout == "NCHW" or t.rank < 2:
        return t
    return t.with_(shape=to_channels_first(t.shape, layout), layout=None)


def layout_result(out: TensorType, x: TensorType, layout: str) -> TensorType:
    """The result type of a layout-sensitive op from ``out`` computed in NCHW: its shape in
    ``layout``, tagged ``layout`` when that is not the default or the input ``x`` is tagged."""
    tag = layout if layout != "NCHW" or x.layout is not None else None
    return out.with_(shape=from_channels_first(out.shape, layout), layout=tag)


def permuted_layout(layout: str | None, perm: Sequence[int]) -> str | None:
    """The layout tag of a transpose's result: NCHW <-> NHWC by the channels-last (first) perm,
    the same tag for the identity perm, no tag for any other perm."""
    rank = len(perm)
    if layout is None or list(perm) == list(range(rank)):
        return layout
    if rank >= 3 and layout == "NCHW" and list(perm) == [0, *range(2, rank), 1]:
        return "NHWC"
    if rank >= 3 and layout == "NHWC" and list(perm) == [0, rank - 1, *range(1, rank - 1)]:
        return "NCHW"
    return None


# -- results ------------------------------------------------------------------------------------
class LazyResults(Sequence):
    """The results of a reference whose later outputs are costly and usually not declared on
    the node (max_pool's indices): each is computed on first access, so the interpreter, which
    reads as many results as the node has outputs, never computes the others."""

    def __init__(self, *makers: Callable[[], np.ndarray]) -> None:
        self._makers = makers
        self._done: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._makers)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        if i not in self._done:
            self._done[i] = self._makers[i]()
        return self._done[i]
