"""Torch kernels of the integer ops of docs/quantization.md, for the int_infer model.

This is the second implementation of the integer semantics, written from the document and
independent of the numpy kernels of ``hbc.ir.ops.qops`` / ``hbc.ir.fixed_point`` (nothing here
imports or calls them). Rules followed throughout:

- every integer computation runs on int64 tensors; results are saturated with ``clamp`` to the
  op's ``[lo, hi]`` (``None`` = the range of ``out_dtype``) and only then narrowed;
- the rescale is ``(v*M + R) >> S`` with ``R = (1 << S) >> 1`` (0 when ``S = 0``), torch's
  ``>>`` on int64 being an arithmetic shift (floor division by ``2^S``): round half up;
- terms that share an output share one shift and one rounding (qadd); qconv's residual is
  rescaled on its own to the accumulator's scale and added to it before the output rescale;
- quantize divides in float32, rounds half to even (``torch.round``) and saturates.

Convolutions and matrix products are exact by construction: ``torch_conv`` sums in float64
only where a bound proves every partial sum an exactly representable integer, else in int64.

Kernels share one signature, ``fn(ctx, args) -> list[Tensor]``: ``ctx`` (:class:`NodeCtx`) holds
the node's attributes and types, ``args`` its input tensors (``None`` for absent ones). The
plain ops that an integer graph keeps live in ``torch_tensor_kernels``, the float ops of CPU
fallbacks in ``torch_float_kernels``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hbc.errors import InputError
from hbc.ir.types import TensorType

from .torch_conv import (
    col,
    from_cf,
    int_conv,
    int_matmul_t,
    to_cf,
    window_padded,
    window_taps,
)

Kernel = Callable[["NodeCtx", list], list]
#: op name -> torch kernel (this module's ops; int_infer merges the other kernel modules)
KERNELS: dict[str, Kernel] = {}

#: IR dtype -> torch dtype of the tensors that carry it (wide unsigned types ride in int64)
TORCH_DTYPES: dict[str, torch.dtype] = {
    "f32": torch.float32, "f16": torch.float16, "f64": torch.float64, "bf16": torch.bfloat16,
    "i8": torch.int8, "i16": torch.int16, "i32": torch.int32, "i64": torch.int64,
    "u8": torch.uint8, "u16": torch.int64, "u32": torch.int64, "u64": torch.int64,
    "bool": torch.bool,
}
#: the integer types of the contract and their ranges
INT_RANGES: dict[str, tuple[int, int]] = {
    "i8": (-128, 127), "i16": (-32768, 32767), "i32": (-2**31, 2**31 - 1), "u8": (0, 255),
    "u16": (0, 65535),
}
M_LIMIT, S_LIMIT = 32767, 31


def kernel(*names: str) -> Callable[[Kernel], Kernel]:
    """Decorator: register ``fn`` as the torch kernel of the ops ``names``."""
    def deco(fn: Kernel) -> Kernel:
        for n in names:
            KERNELS[n] = fn
        return fn
    return deco


@dataclass
class NodeCtx:
    """What a kernel knows about its node: op, name, attributes, input/output types."""

    op: str
    name: str
    attrs: dict[str, Any]
    in_types: list[TensorType | None]
    out_types: list[TensorType]

    def error(self, msg: str) -> InputError:
        return InputError(f"{self.op} node '{self.name}': {msg}")

    def out_spatial(self, i: int = 0) -> list[int]:
        """Spatial sizes of output ``i`` (whatever the layout attribute)."""
        shape = self.out_types[i].shape
        return list(shape[1:-1] if self.attrs.get("layout") == "NHWC" else shape[2:])


def padded(args: Sequence, n: int) -> list:
    """``args`` with absent trailing optional inputs as None, ``n`` long. Kernels take inputs
    by position, in the order of the contract (the signature in docs/quantization.md)."""
    return [*args, *[None] * n][:n]


# -- fixed point ---------------------------------------------------------------------------------
def bounds(attrs: dict[str, Any]) -> tuple[int, int]:
    """The clamp bounds of an integer op (``None`` means the range of ``out_dtype``)."""
    tlo, thi = INT_RANGES[attrs["out_dtype"]]
    lo = tlo if attrs.get("lo") is None else max(tlo, attrs["lo"])
    hi = thi if attrs.get("hi") is None else min(thi, attrs["hi"])
    return lo, hi


def rescale_sum(terms: Sequence[tuple[torch.Tensor, torch.Tensor | int]],
                s: torch.Tensor | int) -> torch.Tensor:
    """``(sum_i v_i*M_i + R) >> S`` in int64, ``R = 2^(S-1)`` (0 for ``S = 0``)."""
    acc = None
    for v, m in terms:
        t = v.to(torch.int64) * (m.to(torch.int64) if torch.is_tensor(m) else int(m))
        acc = t if acc is None else acc + t
    if torch.is_tensor(s):
        s = s.to(torch.int64)
        rounding = torch.bitwise_left_shift(torch.ones_like(s), s) >> 1
    else:
        rounding = (1 << int(s)) >> 1
    return (acc + rounding) >> s


def rescale(v: torch.Tensor, m: torch.Tensor | int, s: torch.Tensor | int) -> torch.Tensor:
    """``(v*M + R) >> S``: the one rescale rule (round half up, arithmetic shift)."""
    return rescale_sum([(v, m)], s)


def saturate(acc: torch.Tensor, lo: int, hi: int, out_dtype: str) -> torch.Tensor:
    """``acc`` clamped to ``[lo, hi]`` and narrowed to ``out_dtype``."""
    return acc.clamp(lo, hi).to(TORCH_DTYPES[out_dtype])


def finish(ctx: NodeCtx, acc: torch.Tensor) -> torch.Tensor:
    lo, hi = bounds(ctx.attrs)
    return saturate(acc, lo, hi, ctx.attrs["out_dtype"])


def check_ms(ctx: NodeCtx, m: torch.Tensor | int, s: torch.Tensor | int, what: str = "m",
             shift: str = "s") -> None:
    """The contract's ranges: ``|M| <= 32767``, ``0 <= S <= 31``."""
    m_t, s_t = torch.as_tensor(m), torch.as_tensor(s)
    if bool((m_t.abs() > M_LIMIT).any()) or bool(((s_t < 0) | (s_t > S_LIMIT)).any()):
        raise ctx.error(f"multiplier {what} (|{what}| <= {M_LIMIT}) or shift {shift} "
                        f"(0..{S_LIMIT}) out of range: {what}={m_t.tolist()}, "
                        f"{shift}={s_t.tolist()}")


# -- conv and linear -------------------------------------------------------------------------
@kernel("qconv")
def qconv(ctx: NodeCtx, args: list) -> list:
    """``acc = conv(x, w) + b``, plus the residual at the accumulator's scale ``(r*mr[c] +
    R) >> sr[c]``; ``y = sat((acc*m[c] + R) >> s[c])`` (inputs in the contract's order x, w,
    m, s, b?, r?, mr?, sr?); ``out_dtype="i32"``: ``y = sat(acc)``."""
    x, w, m, s, b, r, mr, sr = padded(args, 8)
    layout = ctx.attrs["layout"]
    x = to_cf(x, layout)
    acc = int_conv(x, w, ctx.attrs["strides"], ctx.attrs["pads"], ctx.attrs["dilations"],
                   ctx.attrs["groups"])
    if b is not None:
        acc = acc + col(b.to(torch.int64), acc.dim())
    if ctx.attrs["out_dtype"] != "i32":
        check_ms(ctx, m, s)
        if r is not None:
            check_ms(ctx, mr, sr, "mr", "sr")
            acc = acc + rescale(to_cf(r, layout), col(mr, acc.dim()), col(sr, acc.dim()))
        acc = rescale(acc, col(m, acc.dim()), col(s, acc.dim()))
    return [from_cf(finish(ctx, acc), layout)]


@kernel("qlinear")
def qlinear(ctx: NodeCtx, args: list) -> list:
    x, w, m, s, b = padded(args, 5)
    acc = int_matmul_t(x.reshape(-1, x.shape[-1]), w)
    if b is not None:
        acc = acc + b.to(torch.int64)
    if ctx.attrs["out_dtype"] != "i32":
        check_ms(ctx, m, s)
        acc = rescale(acc, m, s)
    return [finish(ctx, acc).reshape(*x.shape[:-1], w.shape[0])]


# -- elementwise -----------------------------------------------------------------------------
@kernel("qadd")
def qadd(ctx: NodeCtx, args: list) -> list:
    a, b = args
    at = ctx.attrs
    return [finish(ctx, rescale_sum([(a, at["ma"]), (b, at["mb"])], at["s"]))]


@kernel("qmul")
def qmul(ctx: NodeCtx, args: list) -> list:
    a, b = args
    prod = a.to(torch.int64) * b.to(torch.int64)
    return [finish(ctx, rescale(prod, ctx.attrs["m"], ctx.attrs["s"]))]


@kernel("requantize")
def requantize(ctx: NodeCtx, args: list) -> list:
    return [finish(ctx, rescale(args[0], ctx.attrs["m"], ctx.attrs["s"]))]


# -- pools, resize, sampling -----------------------------------------------------------------
@kernel("qavg_pool")
def qavg_pool(ctx: NodeCtx, args: list) -> list:
    layout = ctx.attrs["layout"]
    x = to_cf(args[0], layout).to(torch.int64)
    out = ctx.out_spatial()
    xp = window_padded(x, ctx.attrs, out, 0)
    total = torch.zeros((*x.shape[:2], *out), dtype=torch.int64, device=x.device)
    for _, sl in window_taps(ctx.attrs, out):
        total += xp[sl]
    return [from_cf(finish(ctx, rescale(total, ctx.attrs["m"], ctx.attrs["s"])), layout)]


@kernel("qglobal_avg_pool")
def qglobal_avg_pool(ctx: NodeCtx, args: list) -> list:
    layout = ctx.attrs["layout"]
    x = to_cf(args[0], layout).to(torch.int64)
    total = x.sum(dim=tuple(range(2, x.dim())), keepdim=True)
    return [from_cf(finish(ctx, rescale(total, ctx.attrs["m"], ctx.attrs["s"])), layout)]


def _weighted_axis(x: torch.Tensor, axis: int, idx: torch.Tensor, wt: torch.Tensor
                   ) -> torch.Tensor:
    """``sum_t wt[o, t] * x[.., idx[o, t], ..]`` along ``axis`` (int64 throughout)."""
    shape = [1] * x.dim()
    shape[axis] = -1
    acc = None
    for t in range(idx.shape[1]):
        term = x.index_select(axis, idx[:, t].to(torch.int64)) * \
            wt[:, t].to(torch.int64).reshape(shape)
        acc = term if acc is None else acc + term
    return acc


@kernel("qresize")
def qresize(ctx: NodeCtx, args: list) -> list:
    """Separable bilinear: the W pass of the H pass equals the double sum exactly (int64)."""
    x, ih, wh, iw, ww = args
    layout = ctx.attrs["layout"]
    x = to_cf(x, layout).to(torch.int64)
    acc = _weighted_axis(x, x.dim() - 2, ih, wh)
    acc = _weighted_axis(acc, x.dim() - 1, iw, ww)
    return [from_cf(finish(ctx, rescale(acc, ctx.attrs["m"], ctx.attrs["s"])), layout)]


@kernel("qgrid_sample")
def qgrid_sample(ctx: NodeCtx, args: list) -> list:
    """``acc = sum_k wt[k] * x[idx[k]]`` over each (n, c) plane; index -1 reads 0."""
    x, idx, wt = args
    layout = ctx.attrs["layout"]
    x = to_cf(x, layout).to(torch.int64)
    n, c = x.shape[:2]
    plane = x.reshape(n, c, -1)
    idx, wt = idx.to(torch.int64), wt.to(torch.int64)
    out_sp = idx.shape[1:-1]
    acc = torch.zeros((n, c, math.prod(out_sp)), dtype=torch.int64, device=x.device)
    for k in range(idx.shape[-1]):
        ik = idx[..., k].reshape(n, 1, -1)
        vals = plane.gather(2, ik.clamp(min=0).expand(n, c, -1))
        acc += torch.where(ik >= 0, vals, 0) * wt[..., k].reshape(n, 1, -1)
    acc = acc.reshape(n, c, *out_sp)
    return [from_cf(finish(ctx, rescale(acc, ctx.attrs["m"], ctx.attrs["s"])), layout)]


# -- tables ----------------------------------------------------------------------------------
@kernel("lut")
def lut(ctx: NodeCtx, args: list) -> list:
    x, table = args
    return [table[x.to(torch.int64) - torch.iinfo(x.dtype).min]]


@kernel("qsoftmax")
def qsoftmax(ctx: NodeCtx, args: list) -> list:
    """``d = x - max(x)``; ``e = table[-d]``; ``t = sum(e)``; ``y = min((e*2^b + t//2)//t, hi)``
    with ``//`` floor division of non-negative int64, ``hi`` the top of ``out_dtype`` and ``b``
    the attribute ``bits`` (default 7 for i8, 15 for i16 outputs)."""
    x, table = args
    axis = ctx.attrs["axis"] % x.dim()
    x = x.to(torch.int64)
    d = x - x.amax(dim=axis, keepdim=True)
    e = table.to(torch.int64)[-d]
    t = e.sum(dim=axis, keepdim=True)
    bits = ctx.attrs["bits"]
    if bits is None:
        bits = 7 if ctx.attrs["out_dtype"] == "i8" else 15
    num = e * (1 << bits) + torch.div(t, 2, rounding_mode="floor")
    hi = INT_RANGES[ctx.attrs["out_dtype"]][1]
    return [saturate(torch.div(num, t, rounding_mode="floor"), 0, hi, ctx.attrs["out_dtype"])]


# -- quantize / dequantize -------------------------------------------------------------------
def _along(values: Sequence[float], rank: int, axis: int | None, dtype: torch.dtype,
           device) -> torch.Tensor:
    t = torch.tensor(list(values), dtype=dtype, device=device)
    if axis is None:
        return t.reshape(())
    shape = [1] * rank
    shape[axis] = -1
    return t.reshape(shape)


@kernel("quantize")
def quantize(ctx: NodeCtx, args: list) -> list:
    """``sat(round_half_even(x / s) + zp)``, the division in x's float type."""
    (x,) = args
    at = ctx.attrs
    if at["dtype"] not in INT_RANGES:
        raise ctx.error(f"quantize to {at['dtype']} has no torch kernel (integer types only)")
    axis = None if at["axis"] is None else at["axis"] % x.dim()
    scale = _along(at["scale"], x.dim(), axis, x.dtype, x.device)
    zp = _along(at["zero_point"] or [0] * len(at["scale"]), x.dim(), axis, torch.float64,
                x.device)
    lo, hi = INT_RANGES[at["dtype"]]
    y = torch.round(x / scale).to(torch.float64) + zp
    y = torch.nan_to_num(y.clamp(lo, hi), nan=0.0)
    return [y.to(TORCH_DTYPES[at["dtype"]])]


@kernel("dequantize")
def dequantize(ctx: NodeCtx, args: list) -> list:
    """``(float32(q) - zp) * float32(s)`` with the scales recorded on the input's type."""
    (x,) = args
    q = ctx.in_types[0].quant
    if q is None:
        raise ctx.error("the input's type records no scale")
    axis = None if q.axis is None else q.axis % x.dim()
    scale = _along(q.scale, x.dim(), axis, torch.float32, x.device)
    zp = _along(q.zero_point or [0] * len(q.scale), x.dim(), axis, torch.float32, x.device)
    return [((x.to(torch.float32) - zp) * scale).to(TORCH_DTYPES[ctx.attrs["dtype"]])]
