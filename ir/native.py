"""The compiled kernels of ``qconv`` (``ir/_qkernels.c``), loaded with ctypes when built.

They compute exactly what the numpy kernels of :mod:`hbc.ir.ops.qops` compute, in integer
arithmetic (the C file's header gives the argument), fusing the passes numpy makes one by one:
a depthwise convolution with its rescale, and the rescale of a matrix product's accumulators.
They are an acceleration only: every function returns None when the library is absent (no C
compiler at install time, or ``HBC_NATIVE=0`` in the environment) or the case is not one they
cover, and the caller runs the numpy kernel. ``tests/test_native_kernels.py`` holds both to the
same bits. Callers check the op's contract (shapes, constant ranges) first; these functions
check again everything the C code indexes with, so no input can make it read out of bounds.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np

from .fixed_point import M_MAX, S_MAX, cached

#: accumulators the C epilogue takes (their products with a multiplier stay below 2^62)
_ACC_BOUND = 2**46
_ACC_KINDS = {np.dtype(np.float32): 0, np.dtype(np.float64): 1, np.dtype(np.int32): 2}
_BITS = {np.dtype(np.int8): 8, np.dtype(np.int16): 16}
_OUT = {"i8": np.dtype(np.int8), "i16": np.dtype(np.int16)}


class _Epilogue(ctypes.Structure):
    _fields_ = [("m", ctypes.c_void_p), ("s", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("res", ctypes.c_void_p), ("mr", ctypes.c_void_p), ("sr", ctypes.c_void_p),
                ("res_bits", ctypes.c_int32), ("out_bits", ctypes.c_int32),
                ("lo", ctypes.c_int32), ("hi", ctypes.c_int32), ("out", ctypes.c_void_p)]


def _load() -> ctypes.CDLL | None:
    if os.environ.get("HBC_NATIVE", "1") == "0":
        return None
    try:
        spec = importlib.util.find_spec("hbc.ir._qkernels")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    i64, i32, ptr = ctypes.c_int64, ctypes.c_int32, ctypes.c_void_p
    lib.hbc_qconv_finish.argtypes = [ptr, i32, i64, i64, i64, i64, ctypes.POINTER(_Epilogue)]
    lib.hbc_qconv_depthwise.argtypes = [ptr, i32, ptr, *[i64] * 14, ctypes.POINTER(_Epilogue)]
    lib.hbc_qgemm_s8.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64]
    lib.hbc_features.argtypes = []
    lib.hbc_limit_features.argtypes = [ctypes.c_int]
    for fn in (lib.hbc_qconv_finish, lib.hbc_qconv_depthwise, lib.hbc_qgemm_s8,
               lib.hbc_features, lib.hbc_limit_features):
        fn.restype = ctypes.c_int
    return lib


_LIB = _load()
#: whether the int8 matrix products run on this CPU (AVX-512 VNNI)
_VNNI = bool(_LIB is not None and _LIB.hbc_features() & 2)


def available() -> bool:
    """Whether the compiled kernels are loaded."""
    return _LIB is not None


def int8_products() -> bool:
    """Whether :func:`qconv_gemm` runs on this CPU (AVX-512 VNNI)."""
    return _VNNI


def features() -> tuple[str, ...]:
    """The CPU features the compiled kernels use here: "avx512" (every kernel) and "vnni" (the
    int8 matrix products); empty for the portable C kernels or without the library."""
    bits = _LIB.hbc_features() if _LIB is not None else 0
    return tuple(name for bit, name in ((1, "avx512"), (2, "vnni")) if bits & bit)


@contextmanager
def portable_only() -> Iterator[None]:
    """The portable C kernels only (no AVX-512, no VNNI) inside the block: for tests."""
    global _VNNI
    before = _LIB.hbc_limit_features(0) if _LIB is not None else 0
    saved, _VNNI = _VNNI, False
    try:
        yield
    finally:
        _VNNI = saved
        if _LIB is not None:
            _LIB.hbc_limit_features(before)


def _check(status: int) -> None:
    """The C functions' status: 0 ok, -2 out of memory, anything else a caller's bug."""
    if status == -2:
        raise MemoryError("qconv compiled kernel: out of memory")
    if status != 0:
        raise RuntimeError(f"qconv compiled kernel refused its arguments (status {status})")


def _channel_consts(c: int, arrays: Sequence[np.ndarray | None]) -> list[np.ndarray | None]:
    """``arrays`` as contiguous int32[c] (None stays None); ValueError when one is not that."""
    out = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        # a copy: cached values must not hold the graph's arrays (it would keep them alive)
        a = np.array(a, dtype=np.int32, copy=True).reshape(-1)
        if a.size != c:
            raise ValueError(f"per-channel constant of {a.size} elements for {c} channels")
        out.append(a)
    return out


def _in_range(a: np.ndarray | None, lo: int, hi: int) -> bool:
    return a is None or a.size == 0 or (int(a.min()) >= lo and int(a.max()) <= hi)


def _address(a: np.ndarray | None) -> int | None:
    return None if a is None else a.ctypes.data


def _epilogue(c: int, m, s, bias, residual, mr, sr, lo: int, hi: int, out: np.ndarray,
              keep: list) -> _Epilogue | None:
    """The C epilogue for ``c`` channels writing into ``out``, or None when a constant is out
    of the contract's range (the numpy kernel then reports it); ``keep`` holds the arrays the
    structure points into until the call returns."""
    def checked() -> tuple[list, tuple] | None:
        arrays = _channel_consts(c, (m, s, bias, mr, sr))
        ranges = ((-M_MAX, M_MAX), (0, S_MAX), (-2**31, 2**31 - 1), (-M_MAX, M_MAX),
                  (0, S_MAX))
        ok = all(_in_range(a, *bounds) for a, bounds in zip(arrays, ranges, strict=True))
        return (arrays, tuple(_address(a) for a in arrays)) if ok else None

    # checked copies and their addresses, derived once per node for the runtime's immutable
    # constants
    consts = cached((m, s, bias, mr, sr), ("native consts", c), checked)
    if consts is None:
        return None
    arrays, (pm, ps, pb, pmr, psr) = consts
    if residual is not None:
        if (pmr is None or psr is None or residual.shape != out.shape
                or residual.dtype not in _BITS):
            return None
        residual = np.ascontiguousarray(residual)
    keep.extend((arrays, residual))
    return _Epilogue(pm, ps, pb, _address(residual), pmr, psr,
                     0 if residual is None else _BITS[residual.dtype], _BITS[out.dtype],
                     lo, hi, out.ctypes.data)


def qconv_finish(acc: np.ndarray, bound: int, m, s, bias, residual, mr, sr, lo: int, hi: int,
                 out_dtype: str) -> np.ndarray | None:
    """``sat_[lo,hi](((acc + bias + ((residual*mr + R) >> sr)) * m + R) >> s)`` per channel
    (axis 1) for exact integer accumulators ``acc`` [N, C, *spatial] (float32, float64 or
    int32, ``|acc| <= bound``), as ``out_dtype``; None when not covered."""
    if _LIB is None or out_dtype not in _OUT or acc.dtype not in _ACC_KINDS or acc.ndim < 2:
        return None
    if bound > _ACC_BOUND:
        return None
    n, c = acc.shape[:2]
    rows = acc.reshape(n * c, -1) if acc.flags.c_contiguous else None
    if rows is None:
        return None
    out = np.empty(acc.shape, _OUT[out_dtype])
    keep: list = []
    epi = _epilogue(c, m, s, bias, residual, mr, sr, lo, hi, out, keep)
    if epi is None:
        return None
    _check(_LIB.hbc_qconv_finish(rows.ctypes.data, _ACC_KINDS[acc.dtype], n * c, c,
                                 rows.shape[1], rows.shape[1], ctypes.byref(epi)))
    return out


def _packed_weights(w: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``w`` [G, M, K] int8 as the VNNI kernel reads it: rows padded with zeros to ``4 *
    ceil(K / 4)`` bytes and to ``4 * ceil(M / 4)`` rows (``w`` itself, no copy, when both are
    multiples of 4 already: almost every layer), and ``128 * sum_k w[g, m, k]`` per row
    (int32[G, Mp]); derived once for ``key`` (the graph's weight array)."""
    def make() -> tuple[np.ndarray | None, np.ndarray]:
        g, m, k = w.shape
        if m % 4 or k % 4 or not w.flags.c_contiguous:
            packed = np.zeros((g, -(-m // 4) * 4, -(-k // 4) * 4), np.int8)
            packed[:, :m, :k] = w
            return packed, (128 * packed.sum(axis=2, dtype=np.int64)).astype(np.int32)
        # the mapped weights themselves, not remembered (that would keep them alive)
        return None, (128 * w.sum(axis=2, dtype=np.int64)).astype(np.int32)

    packed, corr = cached((key,), ("vnni weights", w.shape), make)
    return w if packed is None else packed, corr


def qconv_gemm(cols: np.ndarray, w: np.ndarray, key: np.ndarray, w_l1: int, m, s, bias,
               residual, mr, sr, lo: int, hi: int, out_dtype: str) -> np.ndarray | None:
    """qconv as int8 matrix products: im2col columns ``cols`` [N, G, K, P] and weights ``w``
    [G, M, K] (both int8; ``key`` the graph's weight array, ``w_l1`` the largest per-row L1
    norm) to [N, G*M, P] of ``out_dtype`` with the rescale; None when not covered (no VNNI,
    int32 sums could overflow)."""
    if not _VNNI or out_dtype not in _OUT or cols.dtype != np.int8 or w.dtype != np.int8:
        return None
    n, g, k, p = cols.shape
    if w.shape[0] != g or w.shape[2] != k or 128 * w_l1 >= 2**31:
        return None
    cout, rows = g * w.shape[1], -(-w.shape[1] // 4) * 4
    packed, corr = _packed_weights(w, key)
    stride = -(-p // 16) * 16
    acc = np.empty((n, g, rows, stride), np.int32)
    out = np.empty((n, cout, p), _OUT[out_dtype])
    keep: list = []
    epi = _epilogue(cout, m, s, bias, None if residual is None else residual.reshape(out.shape),
                    mr, sr, lo, hi, out, keep)
    if epi is None:
        return None
    cols = np.ascontiguousarray(cols)
    for i in range(n):
        _check(_LIB.hbc_qgemm_s8(acc[i].ctypes.data, packed.ctypes.data, corr.ctypes.data,
                                 cols[i].ctypes.data, g, rows, k, p, stride))
    if rows != w.shape[1]:
        acc = np.ascontiguousarray(acc[:, :, :w.shape[1]])  # drop the padding rows
    _check(_LIB.hbc_qconv_finish(acc.ctypes.data, 2, n * cout, cout, p, stride,
                                 ctypes.byref(epi)))
    return out


def qconv_depthwise(x: np.ndarray, w: np.ndarray, strides: Sequence[int], pads: Sequence[int],
                    dilations: Sequence[int], out_hw: Sequence[int], xmax: int, w_l1: int, m, s,
                    bias, residual, mr, sr, lo: int, hi: int, out_dtype: str
                    ) -> np.ndarray | None:
    """The depthwise 2-D ``qconv`` (x [N, C, H, W] int8/int16, w [C, 1, KH, KW] int8, one
    output channel per input channel, output [N, C, *out_hw]) with its rescale, as
    ``out_dtype``; ``xmax`` bounds ``|x|``, ``w_l1`` the weights' largest per-channel L1 norm.
    None when not covered (the taps' int32 sums could overflow, other shapes or dtypes)."""
    if _LIB is None or out_dtype not in _OUT or x.ndim != 4 or x.dtype not in _BITS:
        return None
    n, c, h, wd = x.shape
    if w.dtype != np.int8 or w.ndim != 4 or w.shape[:2] != (c, 1):
        return None
    if xmax * w_l1 >= 2**31:  # the bias joins in int64, after the taps
        return None
    kh, kw = w.shape[2:]
    (sh, sw), (dh, dw), (oh, ow) = strides, dilations, out_hw
    pt, pl = pads[0], pads[1]
    if min(sh, sw, dh, dw, kh, kw, oh, ow) < 1 or min(pads) < 0:
        return None
    out = np.empty((n, c, oh, ow), _OUT[out_dtype])
    keep: list = []
    epi = _epilogue(c, m, s, bias, residual, mr, sr, lo, hi, out, keep)
    if epi is None:
        return None
    x = np.ascontiguousarray(x)
    wc = np.ascontiguousarray(w)
    _check(_LIB.hbc_qconv_depthwise(x.ctypes.data, _BITS[x.dtype], wc.ctypes.data, n, c, h, wd,
                                    kh, kw, sh, sw, dh, dw, pt, pl, oh, ow, ctypes.byref(epi)))
    return out
