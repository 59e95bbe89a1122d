"""Fixed-point arithmetic of hbc's integer models (docs/quantization.md, "The one rescale rule").

Every change of scale is ``rescale(v, M, S) = (v * M + R) >> S`` with ``R = 1 << (S - 1)``
(0 for ``S = 0``), computed in int64 with an arithmetic shift, so ties round half up (toward
+infinity), followed by saturation to the output range. :func:`choose` and
:func:`choose_shared` turn real multipliers into ``(M, S)`` with ``|M| <= 32767`` and
``0 <= S <= 31``; :func:`rescale`, :func:`rescale_terms` and :func:`saturate` apply them to numpy
arrays. numpy only: the torch ``int_infer`` model implements the same rules on its own.

Exact products in float64 (:func:`exact_dtype`). Integer inputs with ``|x| <= X`` and
``|w| <= W`` give products that are integers of magnitude ``<= X*W``, and every partial sum of
``K`` of them, in whatever order or blocking a BLAS adds them (with or without FMA), is an integer
of magnitude ``<= K*X*W``. When that bound is ``<= 2^53`` each such integer is a float64, and an
IEEE addition or FMA whose exact result is representable returns it exactly, so a float64
matrix product returns the exact integer sums. For i8 weights (W = 128) and at most ``2^17``
products (the contract's accumulator bound) the bound is ``2^31`` for i8 inputs (X = 128) and
``2^39`` for i16 inputs (X = 32768), far below ``2^53``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hbc.errors import InputError

from .types import DTYPES

#: value range of the integer dtypes of the integer graph
INT_RANGES: dict[str, tuple[int, int]] = {
    "i8": (-(2**7), 2**7 - 1),
    "i16": (-(2**15), 2**15 - 1),
    "i32": (-(2**31), 2**31 - 1),
}
#: largest multiplier magnitude (16-bit signed)
M_MAX = 2**15 - 1
#: largest shift
S_MAX = 31
#: ``S = 14 - floor(log2 m)`` puts ``m * 2^S`` in ``[2^14, 2^15)``
_S_TARGET = 14


class FixedPointError(InputError):
    """A real multiplier has no (M, S) form; the caller (lowering) names the node."""


def dtype_range(dtype: str | np.dtype) -> tuple[int, int]:
    """(min, max) of an integer dtype given by IR name ("i8") or numpy dtype."""
    if isinstance(dtype, str) and dtype in INT_RANGES:
        return INT_RANGES[dtype]
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def _floor_log2(x: float) -> int:
    """floor(log2(x)) of a positive finite float, exactly (frexp: x = f * 2^e, 0.5 <= f < 1)."""
    return math.frexp(x)[1] - 1


def _round_scaled(m: float, s: int) -> int:
    """round_half_even(m * 2^s); the scaling by a power of two is exact in float64."""
    return round(math.ldexp(m, s))


def choose_shared(ms: Sequence[float], what: str = "multipliers") -> tuple[list[int], int]:
    """Integer multipliers ``[M_i]`` and one shift ``S`` for real multipliers ``ms`` that share
    one output (one rounding per output): ``S = clamp(14 - floor(log2(max |m_i|)), 0, 31)``,
    ``M_i = round_half_even(m_i * 2^S)``, and ``S -= 1`` (all ``M_i`` recomputed) when the
    largest ``|M_i|`` exceeds 32767.

    Signs are kept (``qsub`` is ``qadd`` with a negative multiplier); round half even is odd-
    symmetric, so ``M(-m) = -M(m)``. A term with ``|m_i| * 2^S <= 0.5`` gets ``M_i = 0``.
    FixedPointError (``what`` names the multipliers) when a multiplier is not finite, all are
    zero, or the largest needs ``M > 32767`` even at ``S = 0`` (``|m| >= 32767.5``).
    """
    vals = [float(m) for m in ms]
    if not vals or not all(math.isfinite(v) for v in vals):
        raise FixedPointError(f"{what}: real multipliers {vals} must be finite (and non-empty)")
    top = max(abs(v) for v in vals)
    if top == 0.0:
        raise FixedPointError(f"{what}: real multipliers are all zero; no shift to choose")
    s = min(max(_S_TARGET - _floor_log2(top), 0), S_MAX)
    q = [_round_scaled(v, s) for v in vals]
    if max(abs(v) for v in q) > M_MAX:
        if s == 0:
            raise FixedPointError(
                f"{what}: real multiplier {top!r} needs a 16-bit multiplier above {M_MAX} even "
                f"with shift 0 (the limit is < 32767.5)",
                hint="the output scale is too small for its inputs; recalibrate or keep this "
                     "op in float")
        s -= 1
        q = [_round_scaled(v, s) for v in vals]
    return q, s


def choose(m: float, what: str = "multiplier") -> tuple[int, int]:
    """``(M, S)`` with ``M / 2^S ~ m`` for a real multiplier ``m > 0`` (docs/quantization.md):
    ``S = clamp(14 - floor(log2 m), 0, 31)``, ``M = round_half_even(m * 2^S)``, one step down
    of ``S`` when ``M > 32767``. ``M = 0`` (``m <= 2^-32``) means the term is zero.
    FixedPointError naming ``what`` for ``m <= 0``, non-finite ``m`` or ``m >= 32767.5``."""
    m = float(m)
    if not m > 0.0 or not math.isfinite(m):
        raise FixedPointError(f"{what}: real multiplier {m!r} must be positive and finite",
                              hint="signed terms of a sum use choose_shared")
    (q,), s = choose_shared([m], what)
    return q, s


def rounding_term(s: np.ndarray | int) -> np.ndarray:
    """``R = 1 << (S - 1)`` for ``S > 0``, 0 for ``S = 0`` (int64, elementwise)."""
    return (np.int64(1) << np.asarray(s, dtype=np.int64)) >> 1


def rescale_terms(terms: Sequence[tuple[np.ndarray | int, np.ndarray | int]],
                  s: np.ndarray | int) -> np.ndarray:
    """``(sum_i v_i * M_i + R) >> S`` in int64 with numpy broadcasting: several terms that
    share one output and one shift, rounded once (half up). The contract's bounds
    (``|v| < 2^47``, ``|M| < 2^15``, at most a few terms) keep every sum inside int64."""
    s = np.asarray(s, dtype=np.int64)
    total = rounding_term(s)
    for v, m in terms:
        total = total + np.asarray(v).astype(np.int64, copy=False) * np.asarray(m, np.int64)
    return total >> s


def rescale(v: np.ndarray | int, m: np.ndarray | int, s: np.ndarray | int) -> np.ndarray:
    """``(v * M + R) >> S`` in int64 (round half up): ``rescale(5, 1, 1) == 3``,
    ``rescale(-5, 1, 1) == -2``. ``m`` and ``s`` broadcast against ``v`` (per channel)."""
    return rescale_terms([(v, m)], s)


def saturate(x: np.ndarray | int, lo: int, hi: int, dtype: str | np.dtype) -> np.ndarray:
    """``x`` clamped to ``[lo, hi]`` and stored as ``dtype`` (IR name or numpy dtype)."""
    np_dtype = DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
    return np.clip(np.asarray(x), lo, hi).astype(np_dtype)


def round_half_even(x: np.ndarray | float) -> np.ndarray:
    """Round to nearest, ties to even (numpy's rint), for building tables and bounds."""
    return np.rint(np.asarray(x, dtype=np.float64))


# -- exact accumulation ----------------------------------------------------------------------
#: every integer of magnitude <= 2^53 is a float64
F64_EXACT = 2**53


def exact_dtype(k: int, x_dtype: np.dtype, w_dtype: np.dtype) -> np.dtype:
    """float64 when every partial sum of ``k`` products of integers of these dtypes is exact in
    float64 (``k * |min x| * |min w| <= 2^53``, see the module docstring), else int64."""
    bound = k * -int(np.iinfo(x_dtype).min) * -int(np.iinfo(w_dtype).min)
    return np.dtype(np.float64 if bound <= F64_EXACT else np.int64)


def int_matmul_t(x: np.ndarray, w: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
    """Exact ``x @ w.T`` of integer matrices [M, K] and [N, K] as int64, computed in ``dtype``
    (default :func:`exact_dtype`: float64 where proven exact)."""
    dt = exact_dtype(x.shape[-1], x.dtype, w.dtype) if dtype is None else dtype
    return np.matmul(x.astype(dt), w.astype(dt).T).astype(np.int64)
