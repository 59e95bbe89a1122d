"""Integer ops and fixed-point helpers (docs/quantization.md), bit-exact against independent
references: rounding ties, saturation at both ends, shifts of 0 and 31, negative accumulators,
choose() at powers of two and near the overflow step, qconv against an einsum conv on int64
(groups, depthwise, strides, dilations, pads, NHWC, residual, i32 output), the residual's own
rescale at its boundaries and past the accumulator's exact range, the worst case at the
contract's accumulator limit (float32 chunks; tests/test_kernel_speed_paths.py has the others),
every other op on hand-built cases, and the text round trip + verifier.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from hbc.ir import from_text, to_text
from hbc.ir.fixed_point import (
    FixedPointError,
    choose,
    choose_shared,
    exact_dtype,
    int_matmul_t,
    plan_matmul,
    rescale,
    saturate,
)
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.ops.int_conv import int_conv
from hbc.ir.ops.qops import MAX_K
from hbc.ir.registry import InferError, all_ops, get_op
from hbc.ir.types import QuantParams, TensorType, type_of_array
from hbc.ir.verify import verify

RNG = np.random.default_rng(2024)
QOPS = ("qconv", "qlinear", "qadd", "qmul", "requantize", "qavg_pool", "qglobal_avg_pool",
        "qresize", "lut", "qsoftmax", "qgrid_sample")


def i8(*shape: int) -> np.ndarray:
    return RNG.integers(-128, 128, shape, dtype=np.int8)


def i32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.int32)


def run(op: str, arrays: list[np.ndarray | None], attrs: dict | None = None,
        feed: tuple[int, ...] = (0,)) -> np.ndarray:
    """Interpret a one-node graph: inputs at ``feed`` indices are graph inputs, the rest
    constants (so results are checked against inference by the interpreter)."""
    g = Graph("t")
    values = [None if a is None else g.add_input(f"in{i}", type_of_array(a)) if i in feed
              else g.add_constant(f"c{i}", a) for i, a in enumerate(arrays)]
    node = g.add_node(op, values, attrs or {})
    g.set_outputs(node.outputs)
    verify(g)
    return interpret(g, {f"in{i}": arrays[i] for i in feed if arrays[i] is not None})[
        node.outputs[0].name]


def ref_round(v: np.ndarray, s) -> np.ndarray:
    """floor(v / 2^s + 1/2) = (2v + 2^s) // 2^(s+1): round half up, written differently from
    the kernels' ``(v + R) >> s``."""
    s = np.asarray(s, dtype=np.int64)
    return (2 * np.asarray(v, np.int64) + (np.int64(1) << s)) // (np.int64(2) << s)


def ref_conv(x, w, strides, pads, dilations, groups) -> np.ndarray:
    """2-d NCHW conv on int64 by explicit index arithmetic and einsum (no im2col, no BLAS)."""
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    n, c = x.shape[:2]
    cout, cg, kh, kw = w.shape
    ho = (xp.shape[2] - (kh - 1) * dilations[0] - 1) // strides[0] + 1
    wo = (xp.shape[3] - (kw - 1) * dilations[1] - 1) // strides[1] + 1
    rows = (np.arange(ho) * strides[0])[:, None] + np.arange(kh) * dilations[0]  # [ho, kh]
    cols = (np.arange(wo) * strides[1])[:, None] + np.arange(kw) * dilations[1]  # [wo, kw]
    patches = xp[:, :, rows[:, None, :, None], cols[None, :, None, :]]  # [n, c, ho, wo, kh, kw]
    pg = patches.reshape(n, groups, cg, ho, wo, kh, kw)
    wg = w.astype(np.int64).reshape(groups, cout // groups, cg, kh, kw)
    return np.einsum("ngchwij,gocij->ngohw", pg, wg).reshape(n, cout, ho, wo)


# -- fixed point --------------------------------------------------------------------------------
@pytest.mark.parametrize("v, m, s, want", [
    (5, 1, 1, 3), (-5, 1, 1, -2), (-3, 1, 1, -1), (3, 1, 1, 2), (1, 1, 1, 1), (-1, 1, 1, 0),
    (-7, 3, 0, -21), (7, -3, 0, -21),  # shift 0: no rounding term, exact product
    (2**30, 1, 31, 1), (2**30 - 1, 1, 31, 0), (-(2**30), 1, 31, 0), (-(2**30) - 1, 1, 31, -1),
    (2**31 - 1, 32767, 31, 32767), (-(2**31), 32767, 31, -32767), (-(2**31), -32767, 31, 32767),
    (-6, 1, 2, -1), (-10, 1, 2, -2), (10, 1, 2, 3),  # -1.5 -> -1, -2.5 -> -2, 2.5 -> 3
])
def test_rescale_boundaries(v, m, s, want):
    assert rescale(v, m, s) == want
    assert want == math.floor(Fraction(v * m, 2**s) + Fraction(1, 2))


def test_rescale_random_negative_accumulators_and_per_channel():
    v = RNG.integers(-(2**31), 2**31, (4, 6, 5), dtype=np.int64)
    m = RNG.integers(-32767, 32768, (1, 6, 1))
    s = RNG.integers(0, 32, (1, 6, 1))
    got = rescale(v, m, s)
    want = [math.floor(Fraction(int(a) * int(b), 2 ** int(c)) + Fraction(1, 2))
            for a, b, c in zip(*(np.broadcast_arrays(v, m, s)[i].ravel() for i in range(3)),
                               strict=True)]
    np.testing.assert_array_equal(got.ravel(), want)


@pytest.mark.parametrize("dtype, lo, hi", [("i8", -128, 127), ("i16", -32768, 32767)])
def test_saturate_both_ends(dtype, lo, hi):
    x = np.array([lo - 2**20, lo - 1, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi + 1, hi + 2**20])
    got = saturate(x, lo, hi, dtype)
    assert got.dtype == np.dtype(f"int{dtype[1:]}")
    np.testing.assert_array_equal(got, [lo, lo, lo, lo + 1, -1, 0, 1, hi - 1, hi, hi, hi])
    np.testing.assert_array_equal(saturate(x, 0, 6, dtype), [0] * 6 + [1, 6, 6, 6, 6])


@pytest.mark.parametrize("k", range(-31, 15))
def test_choose_powers_of_two(k):
    # S = 14 - k puts M at 2^14 until S reaches 31; below, M = 2^(31 + k) at S = 31
    want = (16384, 14 - k) if k >= -17 else (2 ** (31 + k), 31)
    assert choose(2.0**k) == want


def test_choose_near_the_overflow_step():
    assert choose(32767.4 / 2**15) == (32767, 15)
    assert choose(32767.5 / 2**15) == (16384, 14)  # ties to even -> 32768 -> one step down
    assert choose(32766.5 / 2**15) == (32766, 15)  # tie to even, stays
    assert choose(1 - 2**-20) == (16384, 14)
    assert choose(np.nextafter(1.0, 0.0)) == (16384, 14)  # floor(log2) exact just below 1
    assert choose(np.nextafter(2.0**14, 0.0)) == (16384, 0)
    assert choose(32767.49) == (32767, 0)
    assert choose(3.0) == (24576, 13)


def test_choose_tiny_and_huge():
    assert choose(2.0**-32) == (0, 31)  # 0.5 rounds to even: the term vanishes
    assert choose(1e-12) == (0, 31)
    assert choose(1.5 * 2.0**-32) == (1, 31)
    for bad in (32767.5, 32768.0, 1e6, 0.0, -0.5, math.inf, math.nan):
        with pytest.raises(FixedPointError, match="conv7"):
            choose(bad, what="conv7")


def test_choose_random_precision():
    for m in np.exp2(RNG.uniform(-17, 14.9, 500)):
        mq, s = choose(float(m))
        assert 2**14 <= mq <= 32767 and 0 <= s <= 31
        assert abs(mq / 2**s - m) <= 2.0 ** -(s + 1)


def test_choose_shared():
    assert choose_shared([0.5, 0.25]) == ([16384, 8192], 15)
    assert choose_shared([0.3, -0.6]) == ([9830, -19661], 15)  # signed: qsub
    assert choose_shared([0.99999, 0.1]) == ([16384, 1638], 14)  # one overflow step for all
    assert choose_shared([40.0, 1e-9]) == ([20480, 0], 9)
    with pytest.raises(FixedPointError, match="all zero"):
        choose_shared([0.0, 0.0])
    with pytest.raises(FixedPointError, match="even with shift 0"):
        choose_shared([1.0, -40000.0])


# -- exactness of the float64 fast path ----------------------------------------------------------
def test_exact_dtype_bound():
    assert exact_dtype(2**39, np.int8, np.int8) == np.float64  # 2^39 * 2^14 = 2^53
    assert exact_dtype(2**39 + 1, np.int8, np.int8) == np.int64
    assert exact_dtype(MAX_K, np.int16, np.int8) == np.float64  # 2^17 * 2^22 = 2^39


def test_worst_case_accumulation_at_max_k():
    """All inputs and weights -128 with K = MAX_K (acc = 2^31), plus one odd weight so the sum
    is not a multiple of 2^14; i16 inputs at -32768 (acc = 2^39)."""
    x = np.full((1, MAX_K, 1, 1), -128, np.int8)
    w = np.full((2, MAX_K, 1, 1), -128, np.int8)
    w[1, 7] = 127
    want = [MAX_K * 16384, (MAX_K - 1) * 16384 - 128 * 127]
    acc = int_conv(x, w, [1, 1], [0, 0, 0, 0], [1, 1], 1)
    assert acc.ravel().tolist() == want
    plan = plan_matmul(w.reshape(1, 2, MAX_K), 128)  # 128 float32 chunks of exactly 2^24
    assert (plan.dtype, plan.chunks, plan.bound) == (np.float32, 128, 2**31)
    np.testing.assert_array_equal(int_conv(x, w, [1, 1], [0] * 4, [1, 1], 1, np.int64), acc)
    y = run("qconv", [x, w, i32([1, 1]), i32([17, 17])],
            {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "out_dtype": "i16"})
    np.testing.assert_array_equal(y.ravel(), ref_round(np.array(want), 17))
    hp = run("qconv", [x, w, i32([0, 0]), i32([0, 0])],
             {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "out_dtype": "i32"})
    assert hp.ravel().tolist() == [2**31 - 1, want[1]]  # i32 output saturates
    x16 = np.full((1, MAX_K, 1, 1), -32768, np.int16)
    assert int_conv(x16, w[:1], [1, 1], [0] * 4, [1, 1], 1).item() == 2**39
    xl = np.where(RNG.random((3, MAX_K)) < 0.5, -128, 127).astype(np.int8)
    wl = np.where(RNG.random((2, MAX_K)) < 0.5, -128, 127).astype(np.int8)
    exact = xl.astype(np.int64) @ wl.astype(np.int64).T
    np.testing.assert_array_equal(int_matmul_t(xl, wl), exact)
    np.testing.assert_array_equal(run("qlinear", [xl, wl, i32([1, 1]), i32([20, 20])],
                                      {"out_dtype": "i16"}), ref_round(exact, 20))
    with pytest.raises(InferError, match="accumulator limit"):
        run("qlinear", [np.zeros((1, MAX_K + 1), np.int8), np.zeros((1, MAX_K + 1), np.int8),
                        i32([1]), i32([1])])


# -- qconv ---------------------------------------------------------------------------------------
CONV_CASES = {
    # name: (x shape, cout, kernel, strides, pads, dilations, groups)
    "plain_3x3": ((2, 8, 9, 9), 6, (3, 3), [1, 1], [1, 1, 1, 1], [1, 1], 1),
    "grouped_strided": ((1, 8, 11, 10), 12, (3, 3), [2, 2], [1, 0, 1, 2], [1, 1], 4),
    "depthwise": ((1, 6, 10, 10), 6, (3, 3), [2, 2], [1, 1, 1, 1], [1, 1], 6),
    "depthwise_multiplier": ((2, 4, 9, 8), 8, (3, 2), [1, 2], [0, 1, 2, 0], [2, 1], 4),
    "dilated_asym_pads": ((1, 3, 13, 12), 4, (3, 3), [2, 1], [0, 2, 3, 1], [2, 3], 1),
    "pointwise": ((2, 16, 7, 7), 8, (1, 1), [1, 1], [0, 0, 0, 0], [1, 1], 1),
}


@pytest.fixture(params=["default", "numpy"])
def kernels(request, monkeypatch) -> str:
    """Both ways qconv runs: by default (the compiled kernels of ``hbc.ir.native`` where they
    are built) and by the numpy kernels alone."""
    if request.param == "numpy":
        from hbc.ir.ops import qops

        native = getattr(qops, "native", None)
        if native is not None:
            monkeypatch.setattr(native, "available", lambda: False)
    return request.param


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_qconv_against_einsum(case, layout, kernels):
    shape, cout, kernel, strides, pads, dilations, groups = CONV_CASES[case]
    x, w = i8(*shape), i8(cout, shape[1] // groups, *kernel)
    b = RNG.integers(-5000, 5000, cout).astype(np.int32)
    m = RNG.integers(-32767, 32768, cout).astype(np.int32)
    s = RNG.integers(16, 26, cout).astype(np.int32)
    m[0], s[0], s[-1] = 32767, 31, 0
    acc = ref_conv(x, w, strides, pads, dilations, groups) + b[:, None, None]
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "groups": groups,
             "layout": layout}
    nhwc = layout == "NHWC"
    to_l = (lambda a: np.ascontiguousarray(a.transpose(0, 2, 3, 1))) if nhwc else (lambda a: a)
    xl = to_l(x)
    col = (1, -1, 1, 1)
    want = np.clip(ref_round(acc * m.reshape(col), s.reshape(col)), -128, 127)
    np.testing.assert_array_equal(run("qconv", [xl, w, m, s, b], attrs), to_l(want))
    # residual r rescaled to the accumulator by (mr, sr), i16 output clamped like relu
    r = RNG.integers(-32768, 32768, want.shape).astype(np.int16)
    mr = RNG.integers(-32767, 32768, cout).astype(np.int32)
    sr = RNG.integers(0, 32, cout).astype(np.int32)
    mr[0], sr[0], sr[-1] = -32767, 0, 31
    acc_r = acc + ref_round(r * mr.reshape(col), sr.reshape(col))
    want = np.clip(ref_round(acc_r * m.reshape(col), s.reshape(col)), 0, 32767)
    got = run("qconv", [xl, w, m, s, b, to_l(r), mr, sr],
              attrs | {"out_dtype": "i16", "lo": 0}, feed=(0, 5))
    np.testing.assert_array_equal(got, to_l(want))
    # high-precision output: the accumulator itself
    hp = run("qconv", [xl, w, m, s, b], attrs | {"out_dtype": "i32"})
    np.testing.assert_array_equal(hp, to_l(acc))
    assert hp.dtype == np.int32


def test_qconv_residual_boundaries(kernels):
    """The residual's rescale to the accumulator, then the output's, written out. A 1x1 conv
    of one input channel with weight 1 makes ``acc = x`` in every output channel; each channel
    has its own (mr, sr, m, s)."""
    x = np.array([[[[0, 0, 1, -1, -2, -2, 3, 0]]]], np.int8)
    w = np.ones((4, 1, 1, 1), np.int8)
    r = np.array([[[[3, -3, 1, -1, -1, -3, -5, 0]],  # ties in both steps
                   [[20, -20, 0, 1, -1, 18, -18, 3]],  # sr = 0: x - 7 r, saturating
                   [[-32768, 32767, -32768, 32767, 1, -1, 0, 100]],  # sr = 31: |r*mr| < 2^30
                   [[-32768, 32767, 2, -2, -1, 1, 0, 4]]]], np.int16)  # sr = 16, saturating
    mr, sr = i32([1, -7, 32767, 32767]), i32([1, 0, 31, 16])
    m, s = i32([1, 1, 32767, 1]), i32([1, 0, 15, 0])
    want = [
        # term (r + 1) >> 1: [2, -1, 1, 0, 0, -1, -2, 0]; acc [2, -1, 2, -1, -2, -3, 1, 0]
        # y = (acc + 1) >> 1: -0.5 -> 0, -1.5 -> -1, 0.5 -> 1 (round half up)
        [1, 0, 1, 0, -1, -1, 1, 0],
        [-128, 127, 1, -8, 5, -128, 127, -21],
        # the residual rounds to 0 everywhere; (x * 32767 + 2^14) >> 15 = x
        [0, 0, 1, -1, -2, -2, 3, 0],
        # term (r * 32767 + 2^15) >> 16: [-16383, 16383, 1, -1, 0, 0, 0, 2]
        [-128, 127, 2, -2, -2, -2, 3, 2],
    ]
    got = run("qconv", [x, w, m, s, None, r, mr, sr],
              {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1]}, feed=(0, 5))
    np.testing.assert_array_equal(got[0, :, 0], want)
    col = (1, -1, 1, 1)  # and the same from the contract's formula
    acc = x.astype(np.int64) + ref_round(r.astype(np.int64) * mr.reshape(col), sr.reshape(col))
    np.testing.assert_array_equal(
        np.clip(ref_round(acc * m.reshape(col), s.reshape(col)), -128, 127)[0, :, 0], want)


def test_qconv_residual_past_exact_accumulators(kernels):
    """A residual that takes the sum past the accumulator array's exact range: a float32
    product at the 2^24 bound plus 1 (float64 needed), a depthwise int32 accumulator plus a
    residual past 2^31 (int64 needed); both against int64 arithmetic."""
    x = np.full((1, 1024, 1, 1), -128, np.int8)
    w = np.full((2, 1024, 1, 1), -128, np.int8)  # acc = 2^24 exactly
    r = np.array([1, 32767], np.int16).reshape(1, 2, 1, 1)
    attrs = {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "out_dtype": "i16"}
    got = run("qconv", [x, w, i32([1, 1]), i32([10, 16]), None, r, i32([1, 32767]),
                        i32([0, 0])], attrs, feed=(0, 5))
    want = [ref_round(2**24 + 1, 10), ref_round(2**24 + 32767 * 32767, 16)]
    np.testing.assert_array_equal(got.ravel(), np.clip(want, -32768, 32767))
    x16 = np.full((1, 2, 17, 17), -32768, np.int16)
    w17 = np.full((2, 1, 17, 17), -128, np.int8)  # depthwise: acc = 289 * 2^22 < 2^31
    r = np.array([32767, -32768], np.int16).reshape(1, 2, 1, 1)
    acc = [289 * 2**22 + 32767 * 32767, 289 * 2**22 - 32768 * 32767]
    assert acc[0] >= 2**31
    got = run("qconv", [x16, w17, i32([1, 1]), i32([17, 17]), None, r, i32([32767, 32767]),
                        i32([0, 0])], attrs | {"groups": 2}, feed=(0, 5))
    np.testing.assert_array_equal(got.ravel(), ref_round(np.array(acc), 17))


def test_qconv_int16_input():
    x = RNG.integers(-32768, 32768, (1, 5, 6, 6), dtype=np.int16)
    w = i8(4, 5, 3, 3)
    m, s = i32([1, 2, 3, -4]), i32([10, 11, 12, 13])
    attrs = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "out_dtype": "i16"}
    acc = ref_conv(x, w, [1, 1], [1, 1, 1, 1], [1, 1], 1)
    want = np.clip(ref_round(acc * m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)), -32768,
                   32767)
    np.testing.assert_array_equal(run("qconv", [x, w, m, s], attrs), want)


def test_qconv_inference_errors():
    x, w = TensorType("i8", (1, 4, 5, 5)), TensorType("i8", (2, 4, 3, 3))
    c = TensorType("i32", (2,))
    attrs = {"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1]}
    op = get_op("qconv")

    def infer(inputs, **kw):
        return op.infer(inputs, op.normalize_attrs(attrs | kw))

    assert infer([x, w, c, c])[0] == TensorType("i8", (1, 2, 3, 3))
    for inputs, kw, match in [
        ([x.with_(dtype="f32"), w, c, c], {}, "input x must be i8 or i16"),
        ([x, w.with_(dtype="i16"), c, c], {}, "weight w must be i8"),
        ([x, w, TensorType("i32", (3,)), c], {}, r"m must have shape \[2\]"),
        ([x, w, c, TensorType("i16", (2,))], {}, "s must be i32"),
        ([x, w, c, c, None, TensorType("i8", (1, 2, 3, 3))], {}, "come together"),
        ([x, w, c, c, None, TensorType("i8", (1, 2, 3, 3)), c], {}, "come together"),
        ([x, w, c, c, None, None, None, c], {}, "come together"),
        ([x, w, c, c, None, TensorType("i8", (1, 2, 3, 3)), c, TensorType("i32", (3,))], {},
         r"sr must have shape \[2\]"),
        ([x, w, c, c, None, TensorType("i8", (1, 2, 3, 3)), c, c], {"out_dtype": "i32"},
         "no residual"),
        ([x, w, c, c, None, TensorType("i8", (1, 2, 4, 4)), c, c], {}, "output's shape"),
        ([x, w, c, c], {"lo": -129}, "lo=-129"),
        ([x, w, c, c], {"lo": 5, "hi": 4}, "lo <= hi"),
        ([x, w, c, c], {"groups": 3}, "qconv: groups=3"),
    ]:
        with pytest.raises(InferError, match=match):
            infer(inputs, **kw)
    with pytest.raises(InferError, match=r"m\[1\] = 40000"):
        run("qconv", [np.zeros((1, 4, 5, 5), np.int8), np.zeros((2, 4, 3, 3), np.int8),
                      i32([1, 40000]), i32([0, 0])], attrs)
    for mr, sr, match in (([1, -32768], [0, 0], r"mr\[1\] = -32768"),
                          ([1, 1], [32, 0], r"sr\[0\] = 32"), ([1, 1], [0, -1], r"sr\[1\] = -1")):
        with pytest.raises(InferError, match=match):
            run("qconv", [np.zeros((1, 4, 5, 5), np.int8), np.zeros((2, 4, 3, 3), np.int8),
                          i32([1, 1]), i32([0, 0]), None, np.zeros((1, 2, 3, 3), np.int8),
                          i32(mr), i32(sr)], attrs)


# -- linear and elementwise ----------------------------------------------------------------------
def test_qlinear():
    x, w = i8(2, 3, 40), i8(5, 40)
    b = RNG.integers(-3000, 3000, 5).astype(np.int32)
    m, s = RNG.integers(1, 32768, 5).astype(np.int32), RNG.integers(12, 20, 5).astype(np.int32)
    acc = np.einsum("abk,nk->abn", x.astype(np.int64), w.astype(np.int64)) + b
    np.testing.assert_array_equal(run("qlinear", [x, w, m, s, b]),
                                  np.clip(ref_round(acc * m, s), -128, 127))
    np.testing.assert_array_equal(run("qlinear", [x, w, m, s, b], {"out_dtype": "i32"}), acc)


def test_qadd_and_sub():
    a = np.array([3, 2, 127, -128, 1, -1], np.int8)
    b = np.array([2, 5, 127, -128, 0, 0], np.int8)
    np.testing.assert_array_equal(run("qadd", [a, b], {"ma": 1, "mb": -1, "s": 1}),
                                  [1, -1, 0, 0, 1, 0])  # (a - b)/2: 0.5 -> 1, -1.5 -> -1
    np.testing.assert_array_equal(run("qadd", [a, b], {"ma": 1, "mb": 1, "s": 0}),
                                  [5, 7, 127, -128, 1, -1])  # saturation at both ends
    x, y = i8(2, 3, 4, 4), RNG.integers(-32768, 32768, (1, 3, 1, 4)).astype(np.int16)
    got = run("qadd", [x, y], {"ma": 20000, "mb": -300, "s": 15, "out_dtype": "i16"},
              feed=(0, 1))
    want = np.clip(ref_round(x.astype(np.int64) * 20000 + y.astype(np.int64) * -300, 15),
                   -32768, 32767)
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.int16


def test_qmul_and_requantize():
    a = np.array([-128, 8, 127, -128], np.int8)
    b = np.array([-128, -24, 127, 127], np.int8)
    np.testing.assert_array_equal(run("qmul", [a, b], {"m": 1, "s": 7}, feed=(0, 1)),
                                  [127, -1, 126, -127])  # 128 saturates; -1.5 -> -1
    np.testing.assert_array_equal(
        run("qmul", [a, b], {"m": 1, "s": 7, "out_dtype": "i16"}, feed=(0, 1)),
        [128, -1, 126, -127])
    v = np.array([-(2**31), -(2**20) - 1, -3, 0, 5, 2**31 - 1], np.int32)
    np.testing.assert_array_equal(run("requantize", [v], {"m": 3, "s": 13}),
                                  np.clip(ref_round(v.astype(np.int64) * 3, 13), -128, 127))
    np.testing.assert_array_equal(run("requantize", [v[2:5].astype(np.int8)],
                                      {"m": 1, "s": 0, "lo": 0, "hi": 4}), [0, 0, 4])
    with pytest.raises(InferError, match="shift s=32"):
        run("requantize", [v], {"m": 1, "s": 32})
    with pytest.raises(InferError, match="ma=40000"):
        run("qadd", [a, b], {"ma": 40000, "mb": 1, "s": 1})


# -- pools ---------------------------------------------------------------------------------------
def test_qavg_pool_and_global():
    x = i8(2, 3, 6, 8)
    y = run("qavg_pool", [x], {"kernel": [2, 2], "strides": [2, 2], "pads": [0] * 4,
                               "dilations": [1, 1], "m": 16384, "s": 16})
    sums = x.astype(np.int64).reshape(2, 3, 3, 2, 4, 2).sum(axis=(3, 5))
    np.testing.assert_array_equal(y, ref_round(sums, 2))  # sum/4 rounded half up
    tie = np.array([[[[1, 1], [-1, -1]], [[-1, -1], [0, 0]]]], np.int8)  # sums 0 and -2
    np.testing.assert_array_equal(run("qavg_pool", [tie], {
        "kernel": [2, 2], "strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1],
        "m": 1, "s": 2}).ravel(), [0, 0])  # -2/4 = -0.5 -> 0
    # padded 3x3 windows (pads count as 0), ceil mode, channels last
    attrs = {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1],
             "ceil_mode": 1, "m": 7282, "s": 16, "layout": "NHWC"}
    got = run("qavg_pool", [np.ascontiguousarray(x.transpose(0, 2, 3, 1))], attrs)
    ones = np.ones((3, 1, 3, 3), np.int8)
    sums = ref_conv(np.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1))), ones, [2, 2], [1, 1, 1, 1],
                    [1, 1], 3)  # ceil mode: one more window at the end of each axis
    np.testing.assert_array_equal(got, ref_round(sums * 7282, 16).transpose(0, 2, 3, 1))
    g = run("qglobal_avg_pool", [x], {"m": 21845, "s": 20, "out_dtype": "i16"})
    want = ref_round(x.astype(np.int64).sum(axis=(2, 3), keepdims=True) * 21845, 20)
    np.testing.assert_array_equal(g, want)
    assert g.shape == (2, 3, 1, 1) and g.dtype == np.int16
    g_nhwc = run("qglobal_avg_pool", [np.ascontiguousarray(x.transpose(0, 2, 3, 1))],
                 {"m": 21845, "s": 20, "out_dtype": "i16", "layout": "NHWC"})
    np.testing.assert_array_equal(g_nhwc, want.transpose(0, 2, 3, 1))


# -- resampling ----------------------------------------------------------------------------------
def _taps_tables(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Half-pixel bilinear taps with 8 fraction bits (each row sums to 256)."""
    src = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = np.rint((src - lo) * 256).astype(np.int32)
    return np.stack([lo, hi], 1).astype(np.int32), np.stack([256 - frac, frac], 1)


def test_qresize_identity_and_upsample():
    x = i8(2, 3, 5, 6)
    ih = np.repeat(np.arange(5, dtype=np.int32)[:, None], 2, 1)
    iw = np.repeat(np.arange(6, dtype=np.int32)[:, None], 2, 1)
    for wh in ([[256, 0]] * 5, [[128, 128]] * 5):
        ww = np.array([[0, 256]] * 6, np.int32)
        got = run("qresize", [x, ih, np.array(wh, np.int32), iw, ww], {"m": 1, "s": 16})
        np.testing.assert_array_equal(got, x)
    ih, wh = _taps_tables(5, 10)
    iw, ww = _taps_tables(6, 11)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    got = run("qresize", [xl, ih, wh, iw, ww], {"m": 1, "s": 16, "layout": "NHWC"})
    gathered = x.astype(np.int64)[:, :, ih[:, :, None, None], iw[None, None, :, :]]
    acc = np.einsum("nchawb,ha,wb->nchw", gathered, wh.astype(np.int64), ww.astype(np.int64))
    np.testing.assert_array_equal(got, ref_round(acc, 16).transpose(0, 2, 3, 1))
    with pytest.raises(InferError, match="index 5"):
        run("qresize", [x, np.full((2, 2), 5, np.int32), wh[:2], iw, ww], {"m": 1, "s": 16})


def test_qgrid_sample():
    x = i8(2, 3, 3, 4)
    idx = RNG.integers(-1, 12, (2, 2, 5, 4)).astype(np.int32)
    idx[0, 0, 0] = -1
    wt = RNG.integers(0, 65537, (2, 2, 5, 4)).astype(np.int32)
    want = np.zeros((2, 3, 2, 5), np.int64)
    for n, h, w, k in np.ndindex(idx.shape):
        if idx[n, h, w, k] >= 0:
            want[n, :, h, w] += wt[n, h, w, k] * x[n, :].reshape(3, 12)[:, idx[n, h, w, k]]
    want = np.clip(ref_round(want * 3, 17), -128, 127)
    assert (want[0, :, 0, 0] == 0).all()  # every tap reads padding
    np.testing.assert_array_equal(run("qgrid_sample", [x, idx, wt], {"m": 3, "s": 17}), want)
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(
        run("qgrid_sample", [xl, idx, wt], {"m": 3, "s": 17, "layout": "NHWC"}),
        want.transpose(0, 2, 3, 1))
    with pytest.raises(InferError, match="index -2"):
        run("qgrid_sample", [x, np.full_like(idx, -2), wt], {"m": 1, "s": 0})


# -- tables --------------------------------------------------------------------------------------
def test_lut_i8_and_i16():
    x = np.arange(-128, 128, dtype=np.int8).reshape(4, 64)
    table = np.clip(-np.arange(-128, 128), -128, 127).astype(np.int8)  # saturating negation
    got = run("lut", [x, table])
    np.testing.assert_array_equal(got, np.clip(-x.astype(np.int64), -128, 127))
    assert got[0, 0] == 127 and got[-1, -1] == -127
    x16 = np.arange(-32768, 32768, dtype=np.int16).reshape(256, 256)
    t16 = ((np.arange(65536) - 32768) // 2).astype(np.int16)
    np.testing.assert_array_equal(run("lut", [x16, t16]), x16 // 2)
    t8 = np.clip((np.arange(65536) - 32768) >> 8, -128, 127).astype(np.int8)
    assert run("lut", [x16, t8]).dtype == np.int8
    with pytest.raises(InferError, match=r"table of shape \[65536\]"):
        run("lut", [x16, table])


def _exp_table(s_x: float, size: int) -> np.ndarray:
    return np.rint(np.exp(-np.arange(size) * s_x) * 2**15).astype(np.int32)


def test_qsoftmax():
    x = i8(4, 10)
    table = _exp_table(0.05, 256)
    y = run("qsoftmax", [x, table])
    e = table.astype(np.int64)[x.max(axis=1, keepdims=True).astype(np.int64) - x]
    t = e.sum(axis=1, keepdims=True)
    want = np.minimum([[math.floor(Fraction(int(a) * 128, int(b)) + Fraction(1, 2))
                        for a, b in zip(er, np.broadcast_to(tr, er.shape), strict=True)]
                       for er, tr in zip(e, t, strict=True)], 127)
    np.testing.assert_array_equal(y, want)
    assert (np.abs(y.astype(np.int64).sum(axis=1) - 128) <= 5).all()
    soft = np.exp(x * 0.05) / np.exp(x * 0.05).sum(axis=1, keepdims=True)
    assert np.abs(y / 128 - soft).max() < 2 / 128
    one_hot = np.array([[-128] * 9 + [127]], np.int8)
    np.testing.assert_array_equal(run("qsoftmax", [one_hot, table]), [[0] * 9 + [127]])
    # i16 in and out, bits 15, along axis 0
    x16 = RNG.integers(-32768, 32768, (12, 3)).astype(np.int16)
    t16 = _exp_table(0.0005, 65536)
    y16 = run("qsoftmax", [x16, t16], {"axis": 0, "out_dtype": "i16"})
    assert y16.dtype == np.int16
    assert (np.abs(y16.astype(np.int64).sum(axis=0) - 32768) <= 6).all()
    hot16 = np.array([[-32768] * 5 + [32767]], np.int16)
    np.testing.assert_array_equal(run("qsoftmax", [hot16, t16], {"out_dtype": "i16"}),
                                  [[0] * 5 + [32767]])
    with pytest.raises(InferError, match="bits=8"):
        run("qsoftmax", [x, table], {"bits": 8})


# -- registry, text form, verifier ---------------------------------------------------------------
def test_every_qop_is_integer_and_foldable():
    ops = all_ops()
    for name in QOPS:
        assert ops[name].integer is True and ops[name].foldable, name
    conv_like = TensorType("i8", (1, 8, 6, 6)), TensorType("i8", (4, 2, 3, 3))
    attrs = get_op("qconv").normalize_attrs(
        {"strides": [1, 1], "pads": [1] * 4, "dilations": [1, 1], "groups": 4})
    out = get_op("qconv").infer([*conv_like, None, None], attrs)
    assert get_op("qconv").macs(list(conv_like), out, attrs) == 4 * 36 * 2 * 9


def _all_ops_graph() -> tuple[Graph, dict[str, np.ndarray]]:
    g = Graph("q")
    x = g.add_input("x", TensorType("i8", (1, 4, 6, 6)))
    x16 = g.add_input("x16", TensorType("i16", (1, 4, 6, 6)))
    c = lambda name, a: g.add_constant(name, a)  # noqa: E731
    conv = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]}
    m4, s4 = c("m", i32([20000, 15000, -9000, 32767])), c("s", i32([20, 19, 18, 31]))
    y = g.add_node("qconv", [x, c("w", i8(4, 4, 3, 3)), m4, s4, c("b", i32([5, -5, 0, 9]))],
                   conv | {"lo": 0}, name="conv").outputs[0]
    y = g.add_node("qconv", [y, c("w2", i8(4, 4, 3, 3)), m4, s4, None, x16, c("mr", i32(
        [3, 4, 5, 6])), c("sr", i32([0, 1, 17, 31]))], conv | {"out_dtype": "i16"},
        name="res").outputs[0]
    y = g.add_node("requantize", [y], {"m": 300, "s": 10, "lo": -100, "hi": 100}).outputs[0]
    y = g.add_node("qadd", [y, x], {"ma": 3, "mb": -2, "s": 2}).outputs[0]
    y = g.add_node("qmul", [y, x], {"m": 5, "s": 9}).outputs[0]
    y = g.add_node("lut", [y, c("t", i8(256))]).outputs[0]
    ih, wh = _taps_tables(6, 12)
    y = g.add_node("qresize", [y, c("ih", ih), c("wh", wh), c("iw", ih), c("ww", wh)],
                   {"m": 1, "s": 16}).outputs[0]
    y = g.add_node("qavg_pool", [y], {"kernel": [2, 2], "strides": [2, 2], "pads": [0] * 4,
                                      "dilations": [1, 1], "m": 1, "s": 2}).outputs[0]
    idx = RNG.integers(-1, 36, (1, 3, 3, 4)).astype(np.int32)
    y = g.add_node("qgrid_sample", [y, c("idx", idx), c("wt", RNG.integers(
        0, 16384, idx.shape).astype(np.int32))], {"m": 1, "s": 16}).outputs[0]
    p = g.add_node("qglobal_avg_pool", [y], {"m": 7282, "s": 16}).outputs[0]
    flat = g.add_node("reshape", [p], {"shape": [1, 4]}).outputs[0]
    z = g.add_node("qlinear", [flat, c("fw", i8(3, 4)), c("fm", i32([1, 1, 1])),
                               c("fs", i32([0, 0, 0]))], {"out_dtype": "i32"}).outputs[0]
    sm = g.add_node("qsoftmax", [y, c("et", _exp_table(0.1, 256))], {"axis": 1}).outputs[0]
    g.set_outputs([z, sm])
    g.set_quant(x, QuantParams((0.05,)))  # scales recorded by lowering; behaviour ignores them
    g.set_quant(z, QuantParams((0.001, 0.002, 0.003), axis=1))
    feed = {"x": i8(1, 4, 6, 6),
            "x16": RNG.integers(-32768, 32768, (1, 4, 6, 6)).astype(np.int16)}
    return g, feed


def test_text_round_trip_and_verifier():
    g, feed = _all_ops_graph()
    verify(g)
    text = to_text(g)
    for op in QOPS:
        assert f"= {op}(" in text, op
    assert "lo=0}" in text and "hi=" not in text.split("= qconv(")[1].split("\n")[0]
    assert "i32[1,3] q(scale=[0.001, 0.002, 0.003], axis=1) = qlinear(" in text
    g2 = from_text(text, constants=g.constants)
    verify(g2)
    assert g2.value(g.outputs[0].name).type.quant == QuantParams((0.001, 0.002, 0.003), axis=1)
    assert to_text(g2) == text
    out1, out2 = interpret(g, feed), interpret(g2, feed)
    for name in out1:
        np.testing.assert_array_equal(out1[name], out2[name])
    assert out1[g.outputs[0].name].dtype == np.int32
