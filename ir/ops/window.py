"""Sliding-window arithmetic shared by convolutions and pools: attribute checks, output
sizes, padding and the strided slices of one kernel tap."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..registry import INTS, Attr, InferError

WINDOW_ATTRS = (Attr("strides", INTS), Attr("pads", INTS), Attr("dilations", INTS))


# -- helpers shared with pool.py ---------------------------------------------------------------
def acc_dtype(dtype: np.dtype) -> np.dtype:
    """The accumulation dtype of a float reference: float64 for f64, float32 otherwise."""
    return np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)


def check_window_attrs(what: str, spatial: int, attrs: dict, names: Sequence[str] = (
        "strides", "pads", "dilations")) -> None:
    """Length and range checks of strides (>=1), pads (>=0, 2 per dim), dilations (>=1)."""
    for name in names:
        value = attrs[name]
        length, low = (2 * spatial, 0) if name == "pads" else (spatial, 1)
        if len(value) != length:
            order = " (all begins, then all ends)" if name == "pads" else ""
            raise InferError(f"{what}: {name} {value} must have {length} values{order} for "
                             f"{spatial} spatial dim(s)")
        if any(v < low for v in value):
            raise InferError(f"{what}: {name} {value} must all be >= {low}")


def window_out_size(size: int, kernel: int, stride: int, dilation: int, pad_begin: int,
                    pad_end: int, ceil_mode: bool = False) -> int:
    """Output length of a sliding window; ceil mode drops a last window starting in the end pad."""
    span = size + pad_begin + pad_end - ((kernel - 1) * dilation + 1)
    if span < 0:
        return 0
    if not ceil_mode:
        return span // stride + 1
    out = -(-span // stride) + 1
    if (out - 1) * stride >= size + pad_begin:
        out -= 1
    return out


def spatial_out_shape(what: str, spatial: Sequence[int], kernel: Sequence[int], attrs: dict,
                      ceil_mode: bool = False) -> list[int]:
    """Output spatial shape of a window op; InferError when a dimension would be empty."""
    n = len(spatial)
    s, d, p = attrs["strides"], attrs["dilations"], attrs["pads"]
    out = [window_out_size(spatial[i], kernel[i], s[i], d[i], p[i], p[n + i], ceil_mode)
           for i in range(n)]
    if min(out, default=1) < 1:
        raise InferError(
            f"{what}: empty output: input spatial shape {list(spatial)} with kernel "
            f"{list(kernel)}, dilations {d}, pads {p}, strides {s} gives {out}")
    return out


def pad_spatial(x: np.ndarray, begins: Sequence[int], ends: Sequence[int],
                value: float | int = 0) -> np.ndarray:
    """``x`` padded with ``value`` on its trailing len(begins) axes (no copy when no padding)."""
    if not any(begins) and not any(ends):
        return x
    lead = [(0, 0)] * (x.ndim - len(begins))
    return np.pad(x, lead + list(zip(begins, ends, strict=True)), constant_values=value)


def tap_slices(tap: Sequence[int], out: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> tuple[slice, ...]:
    """Slices of a padded input read by kernel tap ``tap`` for every output position."""
    return tuple(slice(t * d, t * d + (o - 1) * s + 1, s)
                 for t, o, s, d in zip(tap, out, strides, dilations, strict=True))
