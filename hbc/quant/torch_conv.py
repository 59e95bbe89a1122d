"""Exact integer convolution and matrix product in torch, and the layout and sliding-window
helpers the int_infer kernels share.

Exactness of the float64 convolution and matrix products (:func:`f64_exact`). The inputs are
integers with ``|x| <= X`` and ``|w| <= W`` (``X``, ``W`` the largest magnitudes of their
dtypes: 128 for int8, 32768 for int16). Every product is an integer of magnitude ``<= X*W`` and
every partial sum of ``K`` of them, in any order or blocking, one of magnitude ``<= K*X*W``.
When ``K*X*W <= 2^53`` all of these are float64 numbers, and an IEEE addition (or FMA) whose
exact result is representable returns it exactly, so the float64 result is the exact integer.
For int8 x int8 the bound allows ``K <= 2^39`` and for int16 x int8 ``K <= 2^31`` (the contract
caps K at 2^17). Where the bound does not hold, the kernels take an int64 path (one int64
product per kernel tap), so an inexact float path is never taken.

The argument needs the float64 convolution to compute sums of the products (no Winograd or FFT
transform); torch's CPU float64 convolutions are direct or im2col + GEMM. The tests check the
worst case (every input and weight at the most negative value, at the contract's K limit and at
the largest K the bound allows) against exact integers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

F64_EXACT = 2**53


# -- layouts and windows ---------------------------------------------------------------------
def to_cf(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor given in ``layout`` as channels-first (N, C, *spatial)."""
    return x if layout == "NCHW" else x.movedim(-1, 1)


def from_cf(x: torch.Tensor, layout: str) -> torch.Tensor:
    """A channels-first tensor in ``layout``, contiguous."""
    return (x if layout == "NCHW" else x.movedim(1, -1)).contiguous()


def col(v: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    return v.reshape((1, -1) + (1,) * (rank - 2))


def pad_spatial(x: torch.Tensor, begins: Sequence[int], ends: Sequence[int], value=0
                ) -> torch.Tensor:
    """``x`` padded with ``value`` on its trailing len(begins) axes."""
    if not any(begins) and not any(ends):
        return x
    widths: list[int] = []
    for b, e in zip(reversed(begins), reversed(ends), strict=True):
        widths += [b, e]
    return F.pad(x, widths, value=value)


def window_padded(x: torch.Tensor, attrs: dict, out: Sequence[int], value) -> torch.Tensor:
    """``x`` (channels-first) padded by ``pads``, and further at the end where a (ceil mode)
    window of an ``out``-sized output would read past it."""
    kernel, strides, dil, pads = attrs["kernel"], attrs["strides"], attrs["dilations"], \
        attrs["pads"]
    n = len(kernel)
    ends = []
    for i in range(n):
        need = (out[i] - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1
        ends.append(max(pads[n + i], need - x.shape[2 + i] - pads[i]))
    return pad_spatial(x, pads[:n], ends, value)


def window_taps(attrs: dict, out: Sequence[int]):
    """(tap, slices of the padded input) of every kernel tap, row-major."""
    for tap in itertools.product(*map(range, attrs["kernel"])):
        yield tap, (slice(None), slice(None)) + tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, o, s, d in zip(tap, out, attrs["strides"], attrs["dilations"], strict=True))


# -- exact convolution and matrix product ----------------------------------------------------
def max_abs(dtype: torch.dtype) -> int:
    """The largest magnitude of an integer dtype (128 for int8)."""
    info = torch.iinfo(dtype)
    return max(-info.min, info.max)


def f64_exact(k: int, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
    """Are sums of ``k`` products of these integer dtypes exact in float64 (module docstring)?"""
    return k * max_abs(x_dtype) * max_abs(w_dtype) <= F64_EXACT


def conv_out_size(size: int, k: int, stride: int, dil: int, pb: int, pe: int) -> int:
    return (size + pb + pe - ((k - 1) * dil + 1)) // stride + 1


def int_conv(x: torch.Tensor, w: torch.Tensor, strides: Sequence[int], pads: Sequence[int],
             dilations: Sequence[int], groups: int, path: str = "auto") -> torch.Tensor:
    """Exact ``conv(x, w)`` (channels-first, no bias) of integer tensors, as int64.

    ``path``: "auto" (float64 when :func:`f64_exact` holds, else int64), "f64" (asserts the
    bound) or "i64".
    """
    k = w.shape[1] * math.prod(w.shape[2:])
    exact = f64_exact(k, x.dtype, w.dtype)
    if path == "f64" and not exact:
        raise AssertionError(f"float64 conv is not exact for K={k} products of {x.dtype} and "
                             f"{w.dtype}")
    if path == "i64" or not exact:
        return _conv_i64(x, w, strides, pads, dilations, groups)
    n = x.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[n - 1]
    xp = pad_spatial(x.to(torch.float64), pads[:n], pads[n:])
    y = conv(xp, w.to(torch.float64), stride=list(strides),
             dilation=list(dilations), groups=groups)
    return y.to(torch.int64)


def _conv_i64(x: torch.Tensor, w: torch.Tensor, strides: Sequence[int], pads: Sequence[int],
              dilations: Sequence[int], groups: int) -> torch.Tensor:
    """The int64 path: for each kernel tap, one int64 product per group, accumulated."""
    n = x.dim() - 2
    xp = pad_spatial(x.to(torch.int64), pads[:n], pads[n:])
    kernel = list(w.shape[2:])
    out = [conv_out_size(x.shape[2 + i], kernel[i], strides[i], dilations[i], pads[i],
                         pads[n + i]) for i in range(n)]
    batch, cout, cg = x.shape[0], w.shape[0], w.shape[1]
    wg = w.to(torch.int64).reshape(groups, cout // groups, cg, *kernel)
    acc = torch.zeros((batch, groups, cout // groups, math.prod(out)), dtype=torch.int64,
                      device=x.device)
    attrs = {"kernel": kernel, "strides": strides, "dilations": dilations}
    for tap, sl in window_taps(attrs, out):
        xs = xp[sl].reshape(batch, groups, cg, -1)
        acc += torch.einsum("ngcp,goc->ngop", xs, wg[(slice(None),) * 3 + tap])
    return acc.reshape(batch, cout, *out)


def int_matmul_t(x: torch.Tensor, w: torch.Tensor, path: str = "auto") -> torch.Tensor:
    """Exact ``x @ w.T`` of integer matrices [M, K] and [N, K], as int64."""
    exact = f64_exact(x.shape[-1], x.dtype, w.dtype)
    if path == "f64" and not exact:
        raise AssertionError(f"float64 matmul is not exact for K={x.shape[-1]}")
    if path == "i64" or not exact:
        return x.to(torch.int64) @ w.to(torch.int64).T
    return (x.to(torch.float64) @ w.to(torch.float64).T).to(
        torch.int64)
