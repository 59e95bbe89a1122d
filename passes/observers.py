"""Calibration observers: streaming histograms of ``|x|`` and the clipping ranges read from them.

A :class:`Histogram` accumulates ``|x|`` of one tensor batch by batch; no activation is kept.
Its range ``R`` is always a power of two strictly above the largest ``|x|`` seen, split into
``BINS`` equal bins (so ``[0, max]`` spans more than ``BINS / 2`` of them). When a batch exceeds
``R``, ``R`` doubles (as often as needed) and adjacent bins merge pairwise. Because ``R`` and
``BINS`` are powers of two, ``x * BINS / R`` is exact in floating point, and the merged bin of a
value is exactly the bin it would have had at the larger range: the histogram after any number
of batches, in any order, equals the one-shot histogram of all the data (bit for bit). Exact
zeros are counted apart (``zeros``): they quantize to 0 at every scale.

Observers map a histogram to a clipping range ``a``; the scale is ``a / qmax`` (``qmax`` 127 for
int8, 32767 for int16):

- ``max``: the largest ``|x|`` (exact, not a bin edge).
- ``percentile``: the ``p``-th percentile of ``|x|`` (zeros included), linear within its bin.
- ``kl`` (TensorRT-style entropy): for each candidate threshold ``i`` bins (128 .. all), the
  reference ``P`` is the histogram clipped to ``i`` bins with the outliers added to its last bin,
  ``Q`` its 128-level quantized version (the ``i`` bins split into 128 groups; each group's mass
  spread evenly over the bins where ``P`` is non-zero); the threshold minimising ``KL(P || Q)``
  wins. Exact zeros are one more bin present identically in ``P`` and ``Q`` (they are exact in
  int8), so a ReLU's spike at 0 does not drag the threshold down. Every candidate is evaluated in
  one vectorized step from prefix sums.
- ``mse``: the bin edge ``a`` minimising the expected squared quantization error
  (:func:`expected_error`) over all edges at once.

The expected squared error of quantizing a histogram's values with range ``a`` (step
``s = a / qmax``), values uniform within their bin: a value below ``s / 2`` rounds to zero and
loses ``x^2``; a value in ``[s / 2, a)`` loses the rounding noise ``s^2 / 12``; a value above
``a`` is clipped and loses ``(x - a)^2``. Exact zeros lose nothing. (Before issue 4's second
round every non-zero value below ``a`` counted ``s^2 / 12``, which overstates the error of
distributions concentrated near zero many times over and pulls their ranges down.)

A histogram may also accumulate a *weighted* mass per bin (``Histogram(weighted=True)``): each
non-zero value adds its weight (the ``gain`` of its update, a scalar or an array broadcast over
the batch) instead of 1. ``auto`` (:mod:`~hbc.passes.calib_auto`) weighs each value by how
strongly its consumers pass its error on, and compares candidates on the weighted mass. The
mass is summed in float64 and stays exact (so, like the counts, independent of the order of the
batches) as long as the gains are multiples of ``2**-12`` (auto rounds them so) and a bin's mass
stays below ``2**41``.
"""

from __future__ import annotations

import math

import numpy as np

#: bins of every histogram (a power of two; see the module docstring).
BINS = 4096
#: quantization levels of the kl observer (int8 magnitudes 0..127).
KL_LEVELS = 128
#: candidate thresholds kl evaluates at once (the same result for any chunk size)
KL_CHUNK = 256
#: largest magnitude of each quantized activation type.
QMAX = {"i8": 127, "i16": 32767}
#: the observers, in the order ``auto`` breaks ties.
OBSERVERS = ("max", "percentile", "kl", "mse")
#: the default level of the ``percentile`` observer (onnxruntime's default too; see
#: docs/benchmarks.md for why not 99.99).
PERCENTILE = 99.999


class NonFiniteError(ValueError):
    """A batch holds NaN or Inf (the caller names the tensor and the sample)."""


def _pow2_above(m: float) -> float:
    """The smallest power of two strictly greater than ``m > 0``."""
    return math.ldexp(1.0, math.frexp(m)[1])


class Workspace:
    """Scratch buffers reused across :meth:`Histogram.update` calls (one per calibration), so a
    batch costs no allocation (fresh arrays of activation size are page-faulted in each time)."""

    def __init__(self) -> None:
        self._floats: dict[np.dtype, np.ndarray] = {}
        self._ints = np.empty(0, np.intp)
        self._weights = np.empty(0, np.float64)
        self._mask = np.empty(0, np.bool_)

    def floats(self, n: int, dtype: np.dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        buf = self._floats.get(dtype)
        if buf is None or buf.size < n:
            buf = self._floats[dtype] = np.empty(n, dtype)
        return buf[:n]

    def ints(self, n: int) -> np.ndarray:
        if self._ints.size < n:
            self._ints = np.empty(n, np.intp)
        return self._ints[:n]

    def weights(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """float64 scratch apart from :meth:`floats` (which may hold the float64 ``|x|``), and
        a bool scratch."""
        if self._weights.size < n:
            self._weights = np.empty(n, np.float64)
            self._mask = np.empty(n, np.bool_)
        return self._weights[:n], self._mask[:n]


def _magnitudes(x: np.ndarray, workspace: Workspace | None, overwrite: bool) -> np.ndarray:
    """``|x|`` flattened, as a private array the caller may scale in place: float32 or float64
    (float16 widens to float32, integers and wider floats to float64)."""
    if x.dtype not in (np.float32, np.float64):
        a = np.abs(x).ravel()
        if a.dtype.kind != "f" or a.dtype.itemsize > 8:
            return a.astype(np.float64)
        return a.astype(np.float32) if a.dtype.itemsize < 4 else a
    if overwrite and x.flags.c_contiguous:
        flat = x.reshape(-1)
        return np.abs(flat, out=flat)
    if workspace is None:
        return np.abs(x).ravel()
    out = workspace.floats(x.size, x.dtype)
    np.abs(x, out=out.reshape(x.shape))
    return out


class RunningMax:
    """The ``max`` observer's whole state: the largest ``|x|`` seen (``max``), exact, without a
    histogram. Equals :attr:`Histogram.max` on the same data."""

    def __init__(self) -> None:
        self.max = 0.0

    def update(self, x: np.ndarray, **_: object) -> None:
        """Add one batch; NonFiniteError on NaN or Inf. ``max(x)`` and ``-min(x)`` in two
        reductions, with no ``|x|`` copy (negation is exact)."""
        x = np.asarray(x)
        if x.size == 0:
            return
        if x.dtype.kind == "f" and x.dtype.itemsize <= 8:
            hi, lo = float(x.max()), float(x.min())
            if not (math.isfinite(hi) and math.isfinite(lo)):
                raise NonFiniteError("NaN or Inf")
            m = max(hi, -lo)
        else:
            m = float(_magnitudes(x, None, False).max())
            if not math.isfinite(m):
                raise NonFiniteError("NaN or Inf")
        if m > self.max:
            self.max = m


class Histogram:
    """Streaming histogram of ``|x|`` over ``[0, range)``, ``range`` a power of two."""

    def __init__(self, bins: int = BINS, *, weighted: bool = False) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        #: counts of non-zero |x| per bin (exact zeros are in ``zeros``).
        self.counts = np.zeros(bins, dtype=np.int64)
        #: with ``weighted``: the summed gains of the non-zero values per bin (float64)
        self.mass = np.zeros(bins, dtype=np.float64) if weighted else None
        self.range = 0.0  # 0 until a non-zero value arrives
        self.max = 0.0
        self.zeros = 0
        self.total = 0

    @property
    def width(self) -> float:
        return self.range / self.bins

    def update(self, x: np.ndarray, *, gain: float | np.ndarray = 1.0,
               workspace: Workspace | None = None, overwrite: bool = False) -> None:
        """Add the values of one batch; NonFiniteError on NaN or Inf.

        ``gain`` (weighted histograms only): each value's weight in :attr:`mass`, a scalar or
        an array that broadcasts to ``x.shape``. ``workspace`` lends reusable scratch buffers
        (no allocation per batch); ``overwrite`` lets the update use ``x`` itself as scratch
        (the caller no longer needs its values). Neither changes the result.
        """
        x = np.asarray(x)
        shape = x.shape
        a = _magnitudes(x, workspace, overwrite)  # a private scratch copy of |x|
        if a.size == 0:
            return
        m = float(a.max())
        if not math.isfinite(m):
            raise NonFiniteError("NaN or Inf")
        # |x| has no -0.0 (and no NaN here): a value is zero exactly when its bits are, and
        # counting non-zero integers is about 3x faster than comparing floats
        nonzero = int(np.count_nonzero(a.view(np.int32 if a.itemsize == 4 else np.int64)))
        self.total += a.size
        self.zeros += a.size - nonzero
        if m == 0.0:
            return
        self.max = max(self.max, m)
        if m >= self.range:
            self._grow(_pow2_above(m))
        weights = None
        if self.mass is not None and np.ndim(gain) > 0:  # gain where |x| > 0, 0 at exact zeros
            weights, nonzero_mask = workspace.weights(a.size) if workspace is not None else \
                (np.empty(a.size, np.float64), np.empty(a.size, np.bool_))
            np.not_equal(a, 0, out=nonzero_mask)
            np.multiply(nonzero_mask.reshape(shape), gain, out=weights.reshape(shape))
        # bins / range is a power of two, so the product is exact and floor() is the true bin
        factor = self.bins / self.range
        if a.dtype == np.float32 and factor > 2.0**100:  # keep the factor finite in float32
            a = a.astype(np.float64)
        np.multiply(a, a.dtype.type(factor), out=a)
        idx = workspace.ints(a.size) if workspace is not None else np.empty(a.size, np.intp)
        np.copyto(idx, a, casting="unsafe")  # truncation toward zero: floor, as a >= 0
        counts = np.bincount(idx, minlength=self.bins)
        if counts.size > self.bins:  # never (a < range); a safety net that costs no pass
            counts[self.bins - 1] += counts[self.bins:].sum()
            counts = counts[: self.bins]
        counts[0] -= a.size - nonzero
        self.counts += counts
        if self.mass is None:
            return
        if weights is None:
            self.mass += float(gain) * counts
            return
        mass = np.bincount(idx, weights=weights, minlength=self.bins)
        if mass.size > self.bins:
            mass[self.bins - 1] += mass[self.bins:].sum()
        self.mass += mass[: self.bins]

    def _grow(self, new_range: float) -> None:
        if self.range == 0.0:
            self.range = new_range
            return
        factor = round(new_range / self.range)
        self.counts = _merge(self.counts, factor)
        if self.mass is not None:
            self.mass = _merge(self.mass, factor)
        self.range = new_range

    def used(self) -> int:
        """Number of bins up to the one holding the max (0 when every value was zero)."""
        if self.max == 0.0:
            return 0
        return min(int(self.max / self.width) + 1, self.bins)


def _merge(per_bin: np.ndarray, factor: int) -> np.ndarray:
    """``per_bin`` at a ``factor`` times larger range: groups of ``factor`` bins summed into the
    first ``bins / factor`` bins (all into the first when ``factor >= bins``)."""
    bins = per_bin.size
    merged = per_bin.reshape(-1, factor).sum(axis=1) if factor < bins else per_bin.sum(
        keepdims=True)
    out = np.zeros_like(per_bin)
    out[: merged.size] = merged
    return out


# -- observers ---------------------------------------------------------------------------------
def max_range(h: Histogram) -> float:
    return h.max


def percentile_range(h: Histogram, p: float = PERCENTILE) -> float:
    """The ``p``-th percentile of ``|x|`` (zeros included), interpolated within its bin."""
    if h.max == 0.0 or p >= 100.0:
        return h.max
    n = h.used()
    full = h.counts[:n].astype(np.float64)
    full[0] += h.zeros
    cum = np.cumsum(full)
    target = p / 100.0 * h.total
    k = int(np.searchsorted(cum, target))
    if k >= n:
        return h.max
    before = cum[k - 1] if k else 0.0
    frac = (target - before) / full[k] if full[k] else 1.0
    a = (k + frac) * h.width
    return h.max if a <= 0.0 else min(a, h.max)


def kl_range(h: Histogram, levels: int = KL_LEVELS) -> float:
    """Threshold minimising KL(P || Q) over bin edges (see the module docstring).

    A sparse histogram (fewer non-zero values than used bins, e.g. a small output seen on few
    samples) is first coarsened by merging bin pairs, since KL over mostly empty bins rewards
    absurd clipping; if that leaves ``levels`` bins or fewer, the max is kept.
    """
    counts, width, n = h.counts, h.width, h.used()
    nonzero = h.total - h.zeros
    while n > levels and nonzero < n:
        counts = counts.reshape(-1, 2).sum(axis=1)
        width *= 2
        n = min(int(h.max / width) + 1, counts.size)
    if n <= levels:
        return h.max
    with np.errstate(divide="ignore", invalid="ignore"):
        best = _kl_best_bins(counts[:n].astype(np.float64), float(h.zeros), levels)
    return min(best * width, h.max)


def _kl_best_bins(hist: np.ndarray, z: float, levels: int) -> int:
    """The number of bins ``i`` (levels .. len(hist)) whose clipped distribution loses the
    least information when quantized to ``levels`` levels; ``z`` exact zeros form one more bin
    shared exactly by P and Q."""
    n = hist.size
    total = hist.sum() + z
    cum0 = np.concatenate(([0.0], np.cumsum(hist)))
    nz0 = np.concatenate(([0], np.cumsum(hist > 0)))
    xlogx0 = np.concatenate(([0.0], np.cumsum(_xlogx(hist))))

    cand = np.arange(levels, n + 1)  # threshold after `cand` bins
    inside = cum0[cand]  # mass below the threshold (non-zero values)
    outliers = cum0[n] - inside
    last = hist[cand - 1] + outliers  # P's last bin
    # sum p log p with p = count / total
    plogp = (xlogx0[cand - 1] + _xlogx(last) + _xlogx(z)) / total - math.log(total)
    # Q: groups of bins [j*i // levels, (j+1)*i // levels), mass spread over P's non-zero bins;
    # in chunks of candidates, so the (candidates x levels) arrays stay in cache
    sum_plogq = np.empty(cand.size)
    steps = np.arange(levels + 1)[None, :]
    for lo in range(0, cand.size, KL_CHUNK):
        c, out = cand[lo:lo + KL_CHUNK], outliers[lo:lo + KL_CHUNK]
        bounds = (steps * c[:, None]) // levels
        g = cum0[bounds[:, 1:]] - cum0[bounds[:, :-1]]
        nz = (nz0[bounds[:, 1:]] - nz0[bounds[:, :-1]]).astype(np.float64)
        nz[:, -1] += (hist[c - 1] == 0) & (out > 0)
        mass = g.copy()  # P's mass per group
        mass[:, -1] += out
        logq = np.where(mass > 0, np.log(g / np.maximum(nz, 1.0)), 0.0)
        sum_plogq[lo:lo + KL_CHUNK] = (mass * logq).sum(axis=1)
    plogq = (sum_plogq + _xlogx(z)) / total - np.log(inside + z)
    kl = plogp - plogq
    kl[~np.isfinite(kl)] = np.inf  # an outlier bin Q leaves empty: Q = 0 where P > 0
    return int(cand[int(np.argmin(kl))])


def _xlogx(x: np.ndarray | float) -> np.ndarray:
    """``x * log(x)`` with ``0 log 0 = 0``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    np.log(x, out=out, where=x > 0)
    return out * x


def expected_error(mass: np.ndarray, width: float, a: np.ndarray, qmax: int = 127
                   ) -> np.ndarray:
    """The expected squared quantization error, at each range in ``a``, of the values whose
    per-bin mass is ``mass`` (bins of ``width`` from 0; exact zeros left out), by the model of
    the module docstring: ``x^2`` below ``s / 2``, ``s^2 / 12`` up to ``a``, ``(x - a)^2``
    above, values uniform within their bin.

    With ``M_k(x)`` the mass-weighted ``k``-th moment of the values below ``x`` (prefix sums
    plus the covered part of ``x``'s bin) and ``t = s / 2``: ``M_2(t) + s^2 / 12 (M_0(a) -
    M_0(t)) + T_2(a) - 2 a T_1(a) + a^2 T_0(a)``, ``T_k(a) = M_k(inf) - M_k(a)`` the moments
    above ``a`` (from suffix sums, so a small clipping error is not the difference of two large
    sums).
    """
    mass = np.asarray(mass, dtype=np.float64)
    a = np.asarray(a, dtype=np.float64)
    n = mass.size
    edge = np.arange(n + 1, dtype=np.float64) * width
    # mass * the mean of x^k over each bin, k = 0, 1, 2
    per_bin = [mass * (edge[1:] ** (k + 1) - edge[:-1] ** (k + 1)) / ((k + 1) * width)
               for k in range(3)]
    prefix = [np.concatenate(([0.0], np.cumsum(m))) for m in per_bin]
    suffix = [np.concatenate((np.cumsum(m[::-1])[::-1], [0.0])) for m in per_bin]

    def split(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """x's bin (the last one for x beyond it) and x capped at that bin's upper edge."""
        j = np.clip((x / width).astype(np.int64), 0, n - 1)
        return j, np.minimum(x, edge[j + 1])

    def below(k: int, x: np.ndarray) -> np.ndarray:
        j, hi = split(x)
        part = mass[j] * (hi ** (k + 1) - edge[j] ** (k + 1)) / ((k + 1) * width)
        return prefix[k][j] + part

    def above(k: int, x: np.ndarray) -> np.ndarray:
        j, hi = split(x)
        part = mass[j] * (edge[j + 1] ** (k + 1) - hi ** (k + 1)) / ((k + 1) * width)
        return suffix[k][j + 1] + part

    s = a / qmax
    t = s / 2.0
    rounding = below(2, t) + s * s / 12.0 * np.maximum(below(0, a) - below(0, t), 0.0)
    clipping = above(2, a) - 2.0 * a * above(1, a) + a * a * above(0, a)
    return rounding + np.maximum(clipping, 0.0)


def mse_curve(h: Histogram, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(candidate ranges, expected squared error of each) over the bin edges up to the max."""
    n = h.used()
    a = np.minimum(np.arange(1, n + 1) * h.width, h.max)
    return a, expected_error(h.counts[:n], h.width, a, qmax)


def mse_range(h: Histogram, qmax: int = 127) -> float:
    """The bin edge with the least expected quantization MSE."""
    if h.max == 0.0:
        return 0.0
    a, err = mse_curve(h, qmax)
    return float(a[int(np.argmin(err))])


def compute_range(h: Histogram, method: str, *, percentile: float = PERCENTILE,
                  qmax: int = 127) -> float:
    """Clipping range of ``method`` (one of OBSERVERS) for a tensor quantized to ``qmax``.

    For int16 (``qmax`` 32767) kl has more levels than bins, so it keeps the max.
    """
    if method == "max":
        return float(max_range(h))
    if method == "percentile":
        return float(percentile_range(h, percentile))
    if method == "kl":
        return float(kl_range(h) if qmax <= 127 else max_range(h))
    if method == "mse":
        return float(mse_range(h, qmax))
    raise ValueError(f"unknown observer '{method}' (observers: {', '.join(OBSERVERS)})")


def fake_quant(x: np.ndarray, a: float, qmax: int = 127) -> np.ndarray:
    """``x`` quantized symmetrically with clipping range ``a`` (scale ``float32(a / qmax)``,
    round half to even, saturated to ``[-qmax-1, qmax]``) and dequantized."""
    s = np.float32(a / qmax)
    q = np.clip(np.rint(x.astype(np.float32, copy=False) / s), -qmax - 1, qmax)
    return (q * s).astype(x.dtype, copy=False)
