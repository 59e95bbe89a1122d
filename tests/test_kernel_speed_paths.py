"""The fast paths of the numpy integer kernels are exact (docs/quantization.md, "Exact fast
paths"): float32 matrix products up to the ``2^24`` bound and just past it (chunked), the
float64 and int64 fallbacks, depthwise convolutions in int32 (and int64 past ``2^31``), 1x1 and
strided convolutions without im2col, the bias folded into the product, the float32/float64/int64
rescale, and the constants derived once for immutable weights. Every result is compared bit for
bit with int64 arithmetic written independently (einsum, ``rescale_terms``)."""

from __future__ import annotations

import gc

import numpy as np
import pytest

from hbc.ir import fixed_point as fp
from hbc.ir.fixed_point import (
    F32_EXACT,
    MIN_CHUNK,
    abs_max,
    exact_matmul,
    make_rescale,
    plan_matmul,
    rescale_terms,
    saturate,
)
from hbc.ir.ops.int_conv import int_conv, int_conv_acc
from hbc.ir.registry import get_op

RNG = np.random.default_rng(6)
#: the largest reduction of products |x| <= 128, |w| <= 127 that one float32 product takes
K_FAST = F32_EXACT // (128 * 127)  # 1032


def frozen(a: np.ndarray) -> np.ndarray:
    """``a`` as a read-only array over immutable bytes, as the runtime's mapped constants."""
    return np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)


def ref_conv(x, w, strides, pads, dilations, groups) -> np.ndarray:
    """N-d conv on int64 by index arithmetic and einsum (no im2col, no BLAS, no float)."""
    n = x.ndim - 2
    xp = np.pad(x.astype(np.int64), [(0, 0), (0, 0)] + list(zip(pads[:n], pads[n:],
                                                                 strict=True)))
    batch, c = x.shape[:2]
    cout, cg, *kernel = w.shape
    out = [(xp.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(n)]
    grids = np.meshgrid(*[np.arange(o) * s for o, s in zip(out, strides, strict=True)],
                        *[np.arange(k) * d for k, d in zip(kernel, dilations, strict=True)],
                        indexing="ij")
    idx = tuple(grids[i] + grids[n + i] for i in range(n))  # [*out, *kernel]
    patches = xp[(slice(None), slice(None)) + idx]  # [N, C, *out, *kernel]
    pg = patches.reshape(batch, groups, cg, *patches.shape[2:])
    wg = w.astype(np.int64).reshape(groups, cout // groups, cg, *kernel)
    letters = "hwd"[:n]
    taps = "ijk"[:n]
    spec = f"ngc{letters}{taps},goc{taps}->ngo{letters}"
    return np.einsum(spec, pg, wg).reshape(batch, cout, *out)


def run_qconv(x, w, m, s, b=None, **attrs) -> np.ndarray:
    op = get_op("qconv")
    n = x.ndim - 2
    full = {"strides": [1] * n, "pads": [0] * 2 * n, "dilations": [1] * n} | attrs
    return op.reference([x, w, m, s, b], op.normalize_attrs(full))[0]


def want_qconv(acc, m, s, lo=-128, hi=127) -> np.ndarray:
    col = (1, -1) + (1,) * (acc.ndim - 2)
    return np.clip(rescale_terms([(acc, m.reshape(col))], s.reshape(col)), lo, hi)


# -- float32 products at the 2^24 bound ---------------------------------------------------------
@pytest.mark.parametrize("k, chunks", [(K_FAST, 1), (K_FAST + 1, 2)])
def test_float32_product_worst_case_at_and_past_the_bound(k, chunks):
    """x = -128 everywhere (one 127), w = 127 (and a row alternating -127/127): K_FAST products
    take one float32 product (the bound 128 * 127 * K just below 2^24), one more takes two
    chunks."""
    x = np.full((k, 3), -128, np.int8)
    x[0, 1] = 127  # an odd product in column 1
    w = np.full((2, k), 127, np.int8)
    w[1, ::2] = -127
    plan = plan_matmul(w, abs_max(x))
    assert plan.dtype == np.float32 and plan.chunks == chunks
    assert plan.bound == 128 * 127 * k
    got = exact_matmul(w, x.astype(plan.dtype), plan)
    want = w.astype(np.int64) @ x.astype(np.int64)
    np.testing.assert_array_equal(got.astype(np.int64), want)
    assert got.dtype == (np.float32 if chunks == 1 else np.float64)


def test_chunking_is_needed_past_the_bound():
    """The case the chunks exist for: products summing to an odd integer above 2^24, which one
    float32 product cannot represent (so it cannot be exact)."""
    k = K_FAST + 8
    x = np.full((k, 1), -128, np.int8)
    x[1, 0] = 127
    w = np.full((1, k), -127, np.int8)
    want = int((w.astype(np.int64) @ x.astype(np.int64))[0, 0])
    assert want > F32_EXACT and want % 2 == 1
    naive = np.matmul(w.astype(np.float32), x.astype(np.float32))
    assert int(naive[0, 0]) != want
    plan = plan_matmul(w, 128)
    assert plan.chunks == 2
    assert int(exact_matmul(w, x.astype(np.float32), plan)[0, 0]) == want


@pytest.mark.parametrize("cin, kernel", [(K_FAST, 1), (K_FAST + 1, 1), (114, 3), (115, 3)])
def test_qconv_worst_case_around_the_bound(cin, kernel):
    """Whole qconv ops at the extremes: 1x1 (no im2col) and 3x3 with K = 9 * cin on both sides
    of K_FAST, every input -128 and every weight 127 or -128 in a pattern, i16 output."""
    x = np.full((1, cin, 5, 5), -128, np.int8)
    x[0, :, 2, 2] = 127
    w = np.where(RNG.random((4, cin, kernel, kernel)) < 0.5, -128, 127).astype(np.int8)
    w[0] = 127
    pad = kernel // 2
    m, s = np.array([1, 3, 32767, 7], np.int32), np.array([14, 15, 31, 0], np.int32)
    got = run_qconv(x, frozen(w), m, s, pads=[pad] * 4, out_dtype="i16")
    acc = ref_conv(x, w, [1, 1], [pad] * 4, [1, 1], 1)
    np.testing.assert_array_equal(got, want_qconv(acc, m, s, -32768, 32767))
    np.testing.assert_array_equal(int_conv(x, w, [1, 1], [pad] * 4, [1, 1], 1), acc)


def test_short_chunks_fall_back_to_float64_and_int64():
    """i16 inputs at -32768 need chunks shorter than MIN_CHUNK: one float64 product; a bound
    past 2^53 (constructed, no real conv has it) goes to int64."""
    k = 4 * MIN_CHUNK
    x = np.full((k, 2), -32768, np.int16)
    w = np.full((3, k), -128, np.int8)
    plan = plan_matmul(w, 32768)
    assert plan.dtype == np.float64 and plan.chunks == 1
    got = exact_matmul(w, x.astype(plan.dtype), plan)
    np.testing.assert_array_equal(got.astype(np.int64), w.astype(np.int64) @ x)
    wide = plan_matmul(np.full((1, 4), 127, np.int64), 2**52)
    assert wide.dtype == np.int64


def test_chunk_counts_give_identical_results():
    """The same product with 1, 3 and 7 float32 chunks, and in float64: identical."""
    x = RNG.integers(-128, 128, (2, 600, 9)).astype(np.int8)
    w = RNG.integers(-128, 128, (2, 5, 600)).astype(np.int8)
    want = np.matmul(w.astype(np.int64), x.astype(np.int64))
    for plan in (fp.MatmulPlan(np.dtype(np.float32), c, 0) for c in (1, 3, 7)):
        got = exact_matmul(w, x.astype(np.float32), plan)
        np.testing.assert_array_equal(got.astype(np.int64), want)
    got = exact_matmul(w, x.astype(np.float64), fp.MatmulPlan(np.dtype(np.float64), 1, 0))
    np.testing.assert_array_equal(got.astype(np.int64), want)


# -- convolution shapes ---------------------------------------------------------------------------
CONVS = {
    # name: (x shape, cout, kernel, strides, pads, dilations, groups)
    "pointwise": ((2, 16, 7, 6), 8, (1, 1), [1, 1], [0] * 4, [1, 1], 1),
    "pointwise_strided": ((1, 12, 9, 8), 6, (1, 1), [2, 3], [0] * 4, [1, 1], 1),
    "pointwise_grouped": ((1, 12, 5, 5), 6, (1, 1), [1, 1], [0] * 4, [1, 1], 3),
    "pointwise_padded": ((1, 4, 5, 5), 3, (1, 1), [1, 1], [1, 0, 0, 1], [1, 1], 1),
    "dense_3x3_s2": ((2, 5, 10, 9), 7, (3, 3), [2, 2], [1] * 4, [1, 1], 1),
    "small_groups": ((1, 16, 8, 8), 8, (3, 3), [1, 1], [1] * 4, [1, 1], 4),
    "depthwise": ((2, 6, 9, 10), 6, (3, 3), [1, 1], [1] * 4, [1, 1], 6),
    "depthwise_s2": ((1, 5, 11, 12), 5, (3, 3), [2, 2], [1, 1, 0, 1], [1, 1], 5),
    "depthwise_s3_dilated": ((1, 4, 17, 16), 4, (3, 2), [3, 2], [2, 0, 1, 3], [2, 3], 4),
    "depthwise_multiplier": ((2, 3, 8, 7), 9, (2, 3), [1, 2], [0, 1, 1, 0], [1, 1], 3),
    "depthwise_5x5": ((1, 8, 14, 14), 8, (5, 5), [2, 2], [2] * 4, [1, 1], 8),
    "depthwise_1d": ((1, 4, 20), 4, (5,), [2], [2, 1], [2], 4),
    "depthwise_3d": ((1, 3, 5, 6, 7), 3, (3, 3, 2), [1, 2, 1], [1, 0, 1, 1, 1, 0], [1, 1, 2],
                     3),
    "dense_3d": ((1, 2, 4, 5, 6), 3, (2, 3, 3), [1, 1, 2], [0, 1, 1, 1, 1, 0], [2, 1, 1], 1),
}


@pytest.mark.parametrize("name", list(CONVS))
@pytest.mark.parametrize("values", ["random", "extreme"])
def test_conv_paths_against_einsum(name, values):
    shape, cout, kernel, strides, pads, dilations, groups = CONVS[name]
    if values == "random":
        x = RNG.integers(-128, 128, shape).astype(np.int8)
        w = RNG.integers(-128, 128, (cout, shape[1] // groups, *kernel)).astype(np.int8)
    else:
        x = np.where(RNG.random(shape) < 0.5, -128, 127).astype(np.int8)
        w = np.full((cout, shape[1] // groups, *kernel), -128, np.int8)
    b = RNG.integers(-(2**20), 2**20, cout).astype(np.int32)
    want = ref_conv(x, w, strides, pads, dilations, groups)
    np.testing.assert_array_equal(int_conv(x, w, strides, pads, dilations, groups), want)
    acc, bound, with_bias = int_conv_acc(x, frozen(w), strides, pads, dilations, groups,
                                         bias=b)
    assert with_bias
    col = (1, -1) + (1,) * (x.ndim - 2)
    np.testing.assert_array_equal(acc.astype(np.int64), want + b.reshape(col))
    assert np.abs(want + b.reshape(col)).max() <= bound
    m = RNG.integers(1, 32768, cout).astype(np.int32)
    s = RNG.integers(16, 26, cout).astype(np.int32)
    got = run_qconv(x, w, m, s, b, strides=strides, pads=pads, dilations=dilations,
                    groups=groups, lo=0)
    np.testing.assert_array_equal(got, want_qconv(want + b.reshape(col), m, s, 0, 127))


def test_depthwise_int64_past_2_31():
    """i16 inputs at -32768 with 600 taps of weight -128: |acc| = 2^22 * 600 > 2^31."""
    x = np.full((1, 2, 1, 600), -32768, np.int16)
    w = np.full((2, 1, 1, 600), -128, np.int8)
    w[1, 0, 0, 0] = 127
    acc, bound, _ = int_conv_acc(x, w, [1, 1], [0] * 4, [1, 1], 2)
    assert acc.dtype == np.int64 and bound > 2**31
    np.testing.assert_array_equal(acc, ref_conv(x, w, [1, 1], [0] * 4, [1, 1], 2))


def test_bias_past_the_float32_bound():
    """A bias of 2^31 - 1 cannot join a float32 product: the float64 product carries it; the
    i32 (high-precision) output saturates exactly."""
    x = np.full((1, 8, 3, 3), -128, np.int8)
    w = np.full((2, 8, 1, 1), -128, np.int8)
    b = np.array([2**31 - 1, -(2**31)], np.int32)
    acc, _, with_bias = int_conv_acc(x, w, [1, 1], [0] * 4, [1, 1], 1, bias=b)
    assert with_bias and acc.dtype == np.float64
    want = ref_conv(x, w, [1, 1], [0] * 4, [1, 1], 1) + b.astype(np.int64).reshape(1, -1, 1, 1)
    np.testing.assert_array_equal(acc.astype(np.int64), want)
    hp = run_qconv(x, w, np.ones(2, np.int32), np.zeros(2, np.int32), b, out_dtype="i32")
    np.testing.assert_array_equal(hp, np.clip(want, -(2**31), 2**31 - 1))


# -- rescaling ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, lo, hi", [("i8", -128, 127), ("i8", 0, 127), ("i8", 0, 6),
                                           ("i16", -32768, 32767), ("i16", -5, 40000 // 2)])
def test_rescale_paths_against_int64(dtype, lo, hi):
    """Ties (half up), negative values, both clamps, shifts 0 and 31, negative multipliers, a
    residual term: float32, float64 and int64 paths against rescale_terms + saturate."""
    c = 6
    m = np.array([1, -1, 32767, -32767, 3, 12345], np.int64).reshape(1, c, 1)
    s = np.array([0, 1, 31, 15, 2, 20], np.int64).reshape(1, c, 1)
    const = np.array([0, 5, -(2**40), 2**30, -7, 1], np.int64).reshape(1, c, 1)
    ties = (np.arange(-40, 40) * 2 + 1).reshape(1, 1, -1)  # odd: halves under shift 1
    for v, bound in ((np.broadcast_to(ties, (2, c, 80)), 80),
                     (RNG.integers(-(2**20), 2**20, (2, c, 80)), 2**20),
                     (RNG.integers(-(2**31), 2**31, (2, c, 80)), 2**31)):
        r = RNG.integers(-32768, 32768, (2, c, 80)).astype(np.int16)
        mr = RNG.integers(-32767, 32768, (1, c, 1))
        rs = make_rescale([m, mr], s, lo, hi, dtype, const)
        for acc in (v.astype(np.float64), v.astype(np.int64)):
            got = rs.apply([(acc, bound), (r, None)])
            want = saturate(rescale_terms([(v, m), (r, mr), (const, 1)], s), lo, hi, dtype)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype


def test_rescale_float32_path_and_its_limit():
    """Small numerators take float32 (requantize of i8 with a small shift); one past 2^24 does
    not; both exact, ties included."""
    x = np.arange(-128, 128, dtype=np.int8)
    for m, s in ((3, 1), (2**15 - 1, 8), (2**15 - 1, 10)):
        rs = make_rescale([m], s, -32768, 32767, "i16")
        got = rs.apply([(x, None)])
        np.testing.assert_array_equal(got, saturate(rescale_terms([(x, m)], s), -32768, 32767,
                                                    "i16"))
    small = make_rescale([3], 1, -128, 127, "i8")
    assert small.fixed_bound + 128 * 3 <= F32_EXACT


def test_numpy_buffer_size_is_restored():
    before = np.getbufsize()
    x = RNG.integers(-128, 128, (1, 8, 40, 40)).astype(np.int8)
    w = RNG.integers(-128, 128, (8, 1, 3, 3)).astype(np.int8)
    run_qconv(x, w, np.ones(8, np.int32), np.full(8, 10, np.int32), pads=[1] * 4, groups=8)
    assert np.getbufsize() == before


# -- constants derived once -----------------------------------------------------------------------
def test_derived_constants_only_for_immutable_arrays():
    """Immutable weights: L1 norms derived once, forgotten with the array; writeable weights:
    recomputed every call, so changing them in place changes the result."""
    w = RNG.integers(-128, 128, (4, 3, 3, 3)).astype(np.int8)
    x = RNG.integers(-128, 128, (1, 3, 6, 6)).astype(np.int8)
    args = ([1, 1], [1] * 4, [1, 1], 1)
    wf = frozen(w)
    assert fp.immutable(wf) and not fp.immutable(w) and not fp.immutable(wf.copy())
    before = len(fp._DERIVED)
    np.testing.assert_array_equal(int_conv(x, wf, *args), ref_conv(x, w, *args))
    assert len(fp._DERIVED) > before
    del wf
    gc.collect()
    assert len(fp._DERIVED) == before
    np.testing.assert_array_equal(int_conv(x, w, *args), ref_conv(x, w, *args))
    w[:] = -128
    np.testing.assert_array_equal(int_conv(x, w, *args), ref_conv(x, w, *args))
    assert len(fp._DERIVED) == before


def test_read_only_view_of_writeable_memory_is_not_immutable():
    a = np.zeros(4, np.int8)
    v = a.view()
    v.flags.writeable = False
    assert not fp.immutable(v)
