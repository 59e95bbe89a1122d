"""Fixed-point arithmetic of hbc's integer models (docs/quantization.md, "The one rescale rule").

Every change of scale is ``rescale(v, M, S) = (v * M + R) >> S`` with ``R = 1 << (S - 1)``
(0 for ``S = 0``), computed in int64 with an arithmetic shift, so ties round half up (toward
+infinity), followed by saturation to the output range. :func:`choose` and
:func:`choose_shared` turn real multipliers into ``(M, S)`` with ``|M| <= 32767`` and
``0 <= S <= 31``; :func:`rescale`, :func:`rescale_terms` and :func:`saturate` apply them to numpy
arrays. numpy only: the torch ``int_infer`` model implements the same rules on its own.

Exact products in floating point (:func:`plan_matmul`, :func:`exact_dtype`). Integer inputs
with ``|x| <= X`` and weights ``w`` give products that are integers, and every partial sum of one
output ``sum_k x_k * w[c, k]``, in whatever order or blocking a BLAS adds them (with or without
FMA), is an integer of magnitude ``<= X * ||w[c]||_1`` (the L1 norm of the weights it sums over,
at most ``K * X * max|w|``). An IEEE addition or FMA whose exact result is representable returns
it exactly, and every integer of magnitude ``<= 2^24`` is a float32 (``<= 2^53``: a float64). So a
float32 matrix product returns the exact integer sums when ``X * ||w[c]||_1 <= 2^24`` for every
row ``c``; longer reductions are split into chunks of the reduction axis that each meet that
bound, multiplied in float32 and added in float64 (exact: the total is below ``2^53``). Where
chunks would be short, one float64 product (exact while ``X * ||w[c]||_1 <= 2^53``, always for
i8/i16 inputs within the contract's ``2^17`` products) or int64 is used instead. The argument
assumes only that the BLAS computes each output as a sum of the products (no fast-matrix-multiply
algorithm), which holds for OpenBLAS, MKL, BLIS and Accelerate. ``X`` is the actual maximum of
the input (one cheap reduction per call), the L1 norms are computed once per weight array whose
memory cannot change (the read-only mapped constants of the runtime) and per call otherwise.

Exact rescaling in float64 (:func:`rescale_saturate`). ``(sum_i v_i * M_i + C + R) >> S`` is
``floor(sum_i v_i * (M_i * 2^-S) + (C + R) * 2^-S)``: each coefficient ``M_i * 2^-S`` is exact
(an integer scaled by a power of two), each product ``v_i * M_i * 2^-S`` and each partial sum
is an integer below ``2^53`` scaled by ``2^-S``, hence exactly representable, so the float64
value is the exact rational and its floor is the exact shift. The bound is checked from the
operands' ranges (int64 otherwise).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from hbc.errors import InputError

from .types import DTYPES

T = TypeVar("T")

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


# -- exact rescaling -------------------------------------------------------------------------
@dataclass(frozen=True)
class Rescale:
    """The constant part of :func:`rescale_saturate`: per-term multipliers ``M_i``, the shift
    ``S``, the integer ``const``, the clamp ``[lo, hi]`` and the output ``dtype``, with the
    float coefficients ``M_i * 2^-S`` and offset ``(const + R - lo * 2^S) * 2^-S`` (exact in
    float32 and float64) and the bounds that choose the arithmetic. Build once per node with
    :func:`make_rescale` (see :func:`cached`), apply with :meth:`apply`."""

    ms: tuple[np.ndarray, ...]
    s: np.ndarray
    const: np.ndarray
    lo: int
    hi: int
    dtype: str
    coefs: tuple[float | np.ndarray, ...]
    offset: float | np.ndarray
    m_bounds: tuple[int, ...]
    fixed_bound: int  # |const| + R + max(|lo|, |hi|) * 2^S over every channel
    flat_axes: int  # trailing axes along which no coefficient varies

    def apply(self, values: Sequence[tuple[np.ndarray, int | None]]) -> np.ndarray:
        """``sat_[lo,hi]((sum_i v_i * M_i + const + R) >> S)`` for ``values`` ``(v_i,
        bound_i)`` with ``|v_i| <= bound_i`` (None: from v's dtype, see :func:`value_bound`):
        in float32 or float64 when the numerator's bound allows (module docstring), else
        int64. ``v`` may hold integers in a float array and may be a strided view."""
        bound = self.fixed_bound + sum(
            (value_bound(v) if b is None else b) * mb
            for (v, b), mb in zip(values, self.m_bounds, strict=True))
        if self.dtype not in ("i8", "i16") or bound > F64_EXACT:
            total = rescale_terms([(v, m) for (v, _), m in zip(values, self.ms, strict=True)]
                                  + [(self.const, 1)], self.s)
            return saturate(total, self.lo, self.hi, self.dtype)
        ftype = np.float32 if bound <= F32_EXACT else np.float64
        coefs, offset = self.coefs, self.offset
        if ftype is np.float32:
            coefs = tuple(c if isinstance(c, float) else c.astype(np.float32) for c in coefs)
            offset = offset if isinstance(offset, float) else offset.astype(np.float32)
        shape = np.broadcast_shapes(*(np.shape(v) for v, _ in values), np.shape(offset),
                                    *(np.shape(c) for c in coefs))
        u = np.empty(shape, ftype)
        with broadcast_buffers(math.prod(shape[len(shape) - self.flat_axes:]), u.size):
            for i, ((v, _), coef) in enumerate(zip(values, coefs, strict=True)):
                part = u if i == 0 else np.empty(shape, ftype)
                np.copyto(part, v, casting="unsafe")  # integers, exact in the float type
                part *= coef
                if i:
                    u += part
            u += offset
            np.clip(u, 0, self.hi - self.lo, out=u)
        # u = value - lo >= 0 after the clamp, so truncation is the floor
        unsigned = np.dtype(f"uint{8 * DTYPES[self.dtype].itemsize}")
        y = u.astype(unsigned)
        if self.lo:
            y += unsigned.type(self.lo % (1 << (8 * unsigned.itemsize)))  # wraps to lo + floor
        return y.view(DTYPES[self.dtype])


def make_rescale(ms: Sequence[np.ndarray | int], s: np.ndarray | int, lo: int, hi: int,
                 dtype: str, const: np.ndarray | int = 0) -> Rescale:
    """The :class:`Rescale` of multipliers ``ms`` (one per term), shift ``s`` and integer
    ``const`` (arrays broadcasting against the values, e.g. per channel ``[1, C, 1, 1]``)."""
    ms = tuple(np.asarray(m, np.int64) for m in ms)
    s = np.asarray(s, dtype=np.int64)
    const = np.asarray(const, dtype=np.int64)
    inv = np.ldexp(1.0, -s)  # 2^-S, exact
    # the offset's integer numerator is below the bound apply() checks
    offset = (const + rounding_term(s) - (np.int64(lo) << s)) * inv
    top = 1 << (int(s.max()) if s.size else 0)
    coefs = tuple(_uniform(m * inv) for m in ms)
    offset = _uniform(offset)
    return Rescale(ms, s, const, lo, hi, dtype, coefs, offset, tuple(abs_max(m) for m in ms),
                   abs_max(const) + top + max(abs(lo), abs(hi)) * top,
                   min(_flat_axes(a) for a in (*coefs, offset)))


def rescale_saturate(terms: Sequence[tuple[np.ndarray, np.ndarray | int, int | None]],
                     s: np.ndarray | int, lo: int, hi: int, dtype: str,
                     const: np.ndarray | int = 0) -> np.ndarray:
    """``sat_[lo,hi]((sum_i v_i * M_i + const + R) >> S)`` stored as ``dtype``: the result of
    :func:`rescale_terms` then :func:`saturate`, for ``terms`` ``(v_i, M_i, bound_i)`` (see
    :meth:`Rescale.apply`)."""
    rs = make_rescale([m for _, m, _ in terms], s, lo, hi, dtype, const)
    return rs.apply([(v, b) for v, _, b in terms])


def value_bound(v: np.ndarray) -> int:
    """``max |v|``: the dtype's range for integers up to 32 bits, else from the data."""
    v = np.asarray(v)
    if v.dtype.kind in "iu" and v.dtype.itemsize <= 4:
        info = np.iinfo(v.dtype)
        return max(-int(info.min), int(info.max))
    return abs_max(v)


def _uniform(a: np.ndarray) -> np.ndarray | float:
    """``a`` as a Python float when all its elements are equal (scalar operands take numpy's
    fastest loops), else ``a``."""
    if a.size and (a.size == 1 or (a == a.flat[0]).all()):
        return float(a.flat[0])
    return a


def _flat_axes(a: np.ndarray | float) -> int:
    """Trailing axes of extent 1 of ``a`` (a scalar: all of them)."""
    shape = np.shape(a)
    ones = 0
    while ones < len(shape) and shape[len(shape) - 1 - ones] == 1:
        ones += 1
    return ones if ones < len(shape) else 64


@contextmanager
def broadcast_buffers(inner: int, total: int) -> Iterator[None]:
    """Speed only (results never depend on it): numpy's iterator copies broadcast operands
    through buffers (default 8192 elements) when its inner loop is shorter than a buffer,
    which makes per-channel operations several times slower than scalar ones; inner loops of
    ``inner >= 256`` elements (out of ``total``) run unbuffered with a small buffer size. The
    setting is numpy's context-local one, restored on exit."""
    if inner < 256 or inner >= total:
        yield
        return
    old = np.setbufsize(16)
    try:
        yield
    finally:
        np.setbufsize(old)


# -- constants derived once ------------------------------------------------------------------
#: (ids of constant arrays, extra key) -> (weak references to the arrays, derived value)
_DERIVED: dict[tuple, tuple[tuple, object]] = {}
_DERIVED_MAX = 1 << 14


def cached(arrays: Sequence[np.ndarray | None], key: tuple, make: Callable[[], T]) -> T:
    """``make()``, remembered per (identity of ``arrays``, ``key``) when every array's memory
    is immutable (:func:`immutable`: the runtime's mapped constants), recomputed otherwise.
    ``make`` may depend only on the arrays' contents and ``key``. Entries go with the arrays."""
    ident = (tuple(id(a) for a in arrays), key)
    hit = _DERIVED.get(ident)
    if hit is not None and all(r is None if a is None else r() is a
                               for r, a in zip(hit[0], arrays, strict=True)):
        return hit[1]  # type: ignore[return-value]
    value = make()
    if len(_DERIVED) >= _DERIVED_MAX:
        _DERIVED.clear()  # a bound for callers that vary scalar keys without end
    if all(a is None or immutable(a) for a in arrays):
        def forget(_ref: weakref.ref, ident: tuple = ident) -> None:
            _DERIVED.pop(ident, None)

        refs = tuple(None if a is None else weakref.ref(a, forget) for a in arrays)
        _DERIVED[ident] = (refs, value)
    return value


def immutable(a: np.ndarray) -> bool:
    """Whether the memory of ``a`` cannot change: no array on its base chain is writeable and
    the buffer at its end is read-only (the runtime's read-only mapping of a ``.hbm``, bytes;
    numpy refuses to make such views writeable). An array owning its memory can be made
    writeable again, so it does not count."""
    base = a
    while isinstance(base, np.ndarray):
        if base.flags.writeable:
            return False
        base = base.base
    if base is None:
        return False
    try:
        return memoryview(base).readonly
    except TypeError:
        return False


# -- exact accumulation ----------------------------------------------------------------------
#: every integer of magnitude <= 2^24 is a float32
F32_EXACT = 2**24
#: every integer of magnitude <= 2^53 is a float64
F64_EXACT = 2**53
#: float32 chunks of a reduction shorter than this are not worth it: one float64 product instead
MIN_CHUNK = 128


def abs_max(x: np.ndarray) -> int:
    """``max |x|`` of an integer (or integer-valued) array as a Python int, 0 when empty; two
    reductions, no ``abs`` (``|min|`` of a signed dtype overflows it)."""
    if x.size == 0:
        return 0
    return max(-int(x.min()), int(x.max()))


def exact_dtype(k: int, x_dtype: np.dtype, w_dtype: np.dtype) -> np.dtype:
    """float64 when every partial sum of ``k`` products of integers of these dtypes is exact in
    float64 (``k * |min x| * |min w| <= 2^53``, see the module docstring), else int64."""
    bound = k * -int(np.iinfo(x_dtype).min) * -int(np.iinfo(w_dtype).min)
    return np.dtype(np.float64 if bound <= F64_EXACT else np.int64)


def chunk_l1_max(w: np.ndarray, chunks: int, key: np.ndarray | None = None) -> int:
    """``max`` over rows ``c`` and chunks ``j`` of ``sum_{k in chunk j} |w[..., c, k]|`` for
    integer weights ``w`` [..., M, K], K split evenly (chunk ``j`` is ``[j*K//chunks,
    (j+1)*K//chunks)``); derived once for ``key`` (the array as the graph holds it, default
    ``w``; see :func:`cached`)."""

    def make() -> int:
        if w.size == 0:
            return 0
        starts = (np.arange(chunks) * w.shape[-1]) // chunks
        mags = np.abs(w.astype(np.int32 if w.dtype.itemsize < 4 else np.int64))
        return int(np.add.reduceat(mags, starts, axis=-1).max())

    return cached((w if key is None else key,), ("l1", w.shape, chunks), make)


@dataclass(frozen=True)
class MatmulPlan:
    """How to compute an exact integer matrix product ``w @ x``: the operands' dtype (float32,
    float64 or int64), the number of float32 chunks of the reduction axis (each meeting the
    ``2^24`` bound, added in float64), and ``bound`` >= every ``|result|``."""

    dtype: np.dtype
    chunks: int
    bound: int


def plan_matmul(w: np.ndarray, xmax: int, key: np.ndarray | None = None,
                extra: int = 0) -> MatmulPlan:
    """The fastest exact way to compute ``w @ x`` for integer weights ``w`` [..., M, K] and
    integers ``|x| <= xmax`` (module docstring), plus integers ``|b| <= extra`` added to every
    row (a bias column, see :func:`exact_matmul`): one float32 product when ``xmax *
    ||w[c]||_1 + extra <= 2^24`` for every row, else the fewest even float32 chunks of at least
    ``MIN_CHUNK`` products that each meet that bound, else float64 (``<= 2^53``), else int64."""
    k = w.shape[-1]
    bound = xmax * chunk_l1_max(w, 1, key) + extra
    f32 = np.dtype(np.float32)
    if bound <= F32_EXACT:
        return MatmulPlan(f32, 1, bound)
    chunks = -(-bound // F32_EXACT)
    while k // chunks >= MIN_CHUNK:
        if xmax * chunk_l1_max(w, chunks, key) + extra <= F32_EXACT:
            return MatmulPlan(f32, chunks, bound)
        chunks += 1 + chunks // 4
    wide = np.float64 if bound <= F64_EXACT else np.int64
    return MatmulPlan(np.dtype(wide), 1, bound)


def exact_matmul(w: np.ndarray, x: np.ndarray, plan: MatmulPlan,
                 bias: np.ndarray | None = None) -> np.ndarray:
    """``w @ x`` (numpy matmul, batch axes broadcast) for integer weights ``w`` [..., M, K] and
    ``x`` [..., K, P] holding integers in ``plan.dtype``: the exact integer results, in float32
    (one chunk), float64 (chunks added, or a float64 plan) or int64. With ``bias`` ([..., M]
    integers, planned as ``extra``), ``x`` has a last row of ones ([..., K + 1, P]) and the
    results include the bias (a last weight column, in the last chunk)."""
    k = w.shape[-1]
    if bias is None:
        wq = w.astype(plan.dtype)
    else:
        wq = np.empty((*w.shape[:-1], k + 1), plan.dtype)
        wq[..., :k] = w
        wq[..., k] = bias
    if plan.chunks == 1:
        return np.matmul(wq, x)
    edges = [j * k // plan.chunks for j in range(plan.chunks)] + [wq.shape[-1]]
    acc = np.matmul(wq[..., :edges[1]], x[..., :edges[1], :]).astype(np.float64)
    for a, b in zip(edges[1:-1], edges[2:], strict=True):
        acc += np.matmul(wq[..., a:b], x[..., a:b, :])  # float32 sums, exact, added in float64
    return acc


def int_matmul_t(x: np.ndarray, w: np.ndarray, dtype: np.dtype | None = None,
                 key: np.ndarray | None = None) -> np.ndarray:
    """Exact ``x @ w.T`` of integer matrices [M, K] and [N, K] as int64: by
    :func:`plan_matmul` (``key`` as there), or entirely in ``dtype`` when given."""
    if dtype is not None:
        return np.matmul(x.astype(dtype), w.astype(dtype).T).astype(np.int64)
    acc, _ = int_matmul_t_acc(x, w, key)
    return acc.astype(np.int64)


def int_matmul_t_acc(x: np.ndarray, w: np.ndarray, key: np.ndarray | None = None
                     ) -> tuple[np.ndarray, int]:
    """Exact ``x @ w.T`` as integers in a float or int64 array (a transposed view), and a
    bound on their magnitudes."""
    plan = plan_matmul(w, abs_max(x), key)
    return exact_matmul(w, x.astype(plan.dtype).T, plan).T, plan.bound
