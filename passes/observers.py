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
- ``mse``: the bin edge ``a`` minimising the expected squared quantization error: rounding noise
  ``(a / qmax)^2 / 12`` per non-zero value below ``a``, plus the exact clipping error of values
  above ``a`` (uniform within their bin), for all edges at once from suffix sums.
"""

from __future__ import annotations

import math

import numpy as np

#: bins of every histogram (a power of two; see the module docstring).
BINS = 4096
#: quantization levels of the kl observer (int8 magnitudes 0..127).
KL_LEVELS = 128
#: largest magnitude of each quantized activation type.
QMAX = {"i8": 127, "i16": 32767}
#: the observers, in the order ``auto`` breaks ties.
OBSERVERS = ("max", "percentile", "kl", "mse")


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

    def __init__(self, bins: int = BINS) -> None:
        if bins < 2 or bins & (bins - 1):
            raise ValueError(f"bins must be a power of two >= 2, got {bins}")
        self.bins = bins
        #: counts of non-zero |x| per bin (exact zeros are in ``zeros``).
        self.counts = np.zeros(bins, dtype=np.int64)
        self.range = 0.0  # 0 until a non-zero value arrives
        self.max = 0.0
        self.zeros = 0
        self.total = 0

    @property
    def width(self) -> float:
        return self.range / self.bins

    def update(self, x: np.ndarray, *, workspace: Workspace | None = None,
               overwrite: bool = False) -> None:
        """Add the values of one batch; NonFiniteError on NaN or Inf.

        ``workspace`` lends reusable scratch buffers (no allocation per batch); ``overwrite``
        lets the update use ``x`` itself as scratch (the caller no longer needs its values).
        Neither changes the result.
        """
        a = _magnitudes(np.asarray(x), workspace, overwrite)  # a private scratch copy of |x|
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

    def _grow(self, new_range: float) -> None:
        if self.range == 0.0:
            self.range = new_range
            return
        factor = round(new_range / self.range)
        merged = self.counts.reshape(-1, factor).sum(axis=1) if factor < self.bins else \
            np.array([self.counts.sum()], dtype=np.int64)
        self.counts = np.zeros(self.bins, dtype=np.int64)
        self.counts[: merged.size] = merged
        self.range = new_range

    def used(self) -> int:
        """Number of bins up to the one holding the max (0 when every value was zero)."""
        if self.max == 0.0:
            return 0
        return min(int(self.max / self.width) + 1, self.bins)


# -- observers ---------------------------------------------------------------------------------
def max_range(h: Histogram) -> float:
    return h.max


def percentile_range(h: Histogram, p: float = 99.99) -> float:
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
    # Q: groups of bins [j*i // levels, (j+1)*i // levels), mass spread over P's non-zero bins
    bounds = (np.arange(levels + 1)[None, :] * cand[:, None]) // levels
    g = cum0[bounds[:, 1:]] - cum0[bounds[:, :-1]]
    nz = (nz0[bounds[:, 1:]] - nz0[bounds[:, :-1]]).astype(np.float64)
    nz[:, -1] += (hist[cand - 1] == 0) & (outliers > 0)
    mass = g.copy()  # P's mass per group
    mass[:, -1] += outliers
    logq = np.where(mass > 0, np.log(g / np.maximum(nz, 1.0)), 0.0)
    plogq = ((mass * logq).sum(axis=1) + _xlogx(z)) / total - np.log(inside + z)
    kl = plogp - plogq
    kl[~np.isfinite(kl)] = np.inf  # an outlier bin Q leaves empty: Q = 0 where P > 0
    return int(cand[int(np.argmin(kl))])


def _xlogx(x: np.ndarray | float) -> np.ndarray:
    """``x * log(x)`` with ``0 log 0 = 0``."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    np.log(x, out=out, where=x > 0)
    return out * x


def mse_curve(h: Histogram, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """(candidate ranges, expected squared error of each) over the bin edges up to the max."""
    n = h.used()
    w = h.width
    hist = h.counts[:n].astype(np.float64)
    b = np.arange(n, dtype=np.float64)
    m1 = (b + 0.5) * w  # E[x] in bin b
    m2 = (3 * b * b + 3 * b + 1) / 3.0 * w * w  # E[x^2] in bin b
    s0 = np.cumsum((hist)[::-1])[::-1]
    s1 = np.cumsum((hist * m1)[::-1])[::-1]
    s2 = np.cumsum((hist * m2)[::-1])[::-1]
    k = np.arange(1, n + 1)
    a = np.minimum(k * w, h.max)
    above = np.append(s0[1:], 0.0), np.append(s1[1:], 0.0), np.append(s2[1:], 0.0)
    inside = s0[0] - above[0]
    rounding = inside * (a / qmax) ** 2 / 12.0
    clipping = np.maximum(above[2] - 2.0 * a * above[1] + a * a * above[0], 0.0)
    return a, rounding + clipping


def mse_range(h: Histogram, qmax: int = 127) -> float:
    """The bin edge with the least expected quantization MSE."""
    if h.max == 0.0:
        return 0.0
    a, err = mse_curve(h, qmax)
    return float(a[int(np.argmin(err))])


def compute_range(h: Histogram, method: str, *, percentile: float = 99.99,
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
