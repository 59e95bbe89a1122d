"""The compiled qconv kernels (ir/_qkernels.c via hbc.ir.native) give the numpy kernels' bits:
depthwise convolutions of every stride, dilation and padding, int8 and int16 inputs and
outputs, clamp bounds, biases, residuals at the accumulator's scale, rounding ties and the
extremes of multipliers and shifts; and the rescale of matrix-product accumulators. Each case
runs the ``qconv`` reference twice, with the library and with it switched off."""

from __future__ import annotations

import numpy as np
import pytest

from hbc.ir import native
from hbc.ir.registry import get_op

needs_lib = pytest.mark.skipif(not native.available(),
                                reason="compiled kernels not built (no C compiler)")


def test_built_where_a_compiler_is():
    """An install on a machine with a C compiler has the library (an optional extension that
    failed to build would otherwise go unnoticed, every test here skipped)."""
    import os
    import shutil
    import subprocess
    import sys

    if os.environ.get("HBC_NATIVE") == "0" or not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler, or switched off")
    code = "from hbc.ir import native; print(native.available())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"

QCONV = get_op("qconv")
RNG = np.random.default_rng(11)
UNIT = {"strides": [1, 1], "dilations": [1, 1]}


def run_both(inputs: list, attrs: dict, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """qconv's result with the compiled kernels and with the numpy kernels."""
    full = QCONV.normalize_attrs(dict(attrs))
    used = []
    with monkeypatch.context() as mp:
        for name in ("qconv_depthwise", "qconv_gemm", "qconv_finish"):
            mp.setattr(native, name, _spy(getattr(native, name), used))
        (fast,) = QCONV.reference(inputs, full)
    assert used and used[-1], "no compiled kernel took the case"
    with monkeypatch.context() as mp:
        mp.setattr(native, "_LIB", None)
        (slow,) = QCONV.reference(inputs, full)
    return fast, slow


@pytest.fixture(params=["best", "portable"])
def kernels(request):
    """The kernels for this CPU (AVX-512, VNNI where it has them), then the portable C ones."""
    if request.param == "portable" and native.available():
        with native.portable_only():
            yield request.param
    else:
        yield request.param


def _spy(fn, used: list):
    """``fn`` recording whether each call was taken (returned an array)."""
    def spy(*args, **kw):
        result = fn(*args, **kw)
        used.append(result is not None)
        return result
    return spy


def consts(c: int, m_max: int = 2**15 - 1, s_range=(0, 31)) -> tuple[np.ndarray, np.ndarray]:
    m = RNG.integers(-m_max, m_max + 1, c).astype(np.int32)
    s = RNG.integers(s_range[0], s_range[1] + 1, c).astype(np.int32)
    return m, s


def ints(shape, dtype) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, int(info.max) + 1, shape).astype(dtype)


@needs_lib
@pytest.mark.parametrize("stride,dilation,pads,kernel", [
    (1, 1, (1, 1, 1, 1), (3, 3)), (2, 1, (1, 1, 1, 1), (3, 3)), (2, 1, (0, 0, 1, 1), (3, 3)),
    (1, 2, (2, 2, 2, 2), (3, 3)), (3, 1, (2, 1, 0, 2), (5, 5)), (1, 1, (0, 0, 0, 0), (1, 1)),
    (2, 2, (3, 0, 1, 2), (3, 2)), (1, 1, (3, 3, 3, 3), (7, 7)),
])
@pytest.mark.parametrize("x_dtype,out_dtype", [(np.int8, "i8"), (np.int16, "i16"),
                                               (np.int8, "i16"), (np.int16, "i8")])
def test_depthwise_matches_numpy(stride, dilation, pads, kernel, x_dtype, out_dtype,
                                 monkeypatch, kernels):
    c, h, w = 5, 11, 13
    x = ints((2, c, h, w), x_dtype)
    wt = ints((c, 1, *kernel), np.int8)
    m, s = consts(c, s_range=(8, 31) if x_dtype == np.int16 else (0, 24))
    b = RNG.integers(-2**20, 2**20, c).astype(np.int32)
    attrs = {"strides": [stride, stride], "pads": list(pads), "dilations": [dilation] * 2,
             "groups": c, "out_dtype": out_dtype}
    fast, slow = run_both([x, wt, m, s, b], attrs, monkeypatch)
    assert fast.dtype == slow.dtype and fast.shape == slow.shape
    np.testing.assert_array_equal(fast, slow)
    fast, slow = run_both([x, wt, m, s], dict(attrs, lo=-3, hi=90 if out_dtype == "i8" else 900),
                          monkeypatch)
    np.testing.assert_array_equal(fast, slow)


@needs_lib
@pytest.mark.parametrize("groups,kernel", [(1, (1, 1)), (1, (3, 3)), (2, (3, 3)), (1, (1, 3))])
@pytest.mark.parametrize("residual", [None, np.int8, np.int16])
@pytest.mark.parametrize("x_dtype,cout", [(np.int8, 8), (np.int8, 6), (np.int16, 8)])
def test_matmul_rescale_matches_numpy(groups, kernel, residual, x_dtype, cout, monkeypatch,
                                     kernels):
    """int8 inputs with a multiple of 4 output channels take the VNNI product where the CPU has
    it; the others (and every case elsewhere) the rescale after numpy's product."""
    c = 6
    x = ints((2, c, 7, 9), x_dtype)
    wt = ints((cout, c // groups, *kernel), np.int8)
    m, s = consts(cout, s_range=(4, 31) if x_dtype == np.int8 else (12, 31))
    b = RNG.integers(-2**16, 2**16, cout).astype(np.int32)
    inputs = [x, wt, m, s, b]
    attrs = {"pads": [kernel[0] // 2, kernel[1] // 2] * 2, "groups": groups, **UNIT}
    if residual is not None:
        mr, sr = consts(cout)
        shape = run_both(inputs, attrs, monkeypatch)[0].shape
        inputs += [ints(shape, residual), mr, sr]
    fast, slow = run_both(inputs, attrs, monkeypatch)
    np.testing.assert_array_equal(fast, slow)


@needs_lib
def test_rounding_ties_and_extremes(monkeypatch, kernels):
    """Accumulators at exact ties of every shift, both signs, multipliers at +-M_MAX, shifts 0
    and 31, saturation at both ends."""
    c = 4
    x = np.tile(np.array([1, -1, 2, -2, 3, -3, 127, -128], np.int8), (1, c, 1, 1))
    wt = np.ones((c, 1, 1, 1), np.int8)
    for m, s in [(1, 1), (3, 1), (1, 2), (32767, 0), (-32767, 0), (32767, 31), (-32767, 31),
                 (5, 3)]:
        ms = np.full(c, m, np.int32)
        ss = np.full(c, s, np.int32)
        for b in (None, np.array([0, 1, -1, 2**30], np.int32)):
            inputs = [x, wt, ms, ss] + ([] if b is None else [b])
            fast, slow = run_both(inputs, {"groups": c, **UNIT, "pads": [0] * 4},
                                  monkeypatch)
            np.testing.assert_array_equal(fast, slow)


def test_out_of_range_constants_are_left_to_numpy():
    """A shift outside [0, 31] (a damaged file) is never handed to C: the numpy kernel names
    it."""
    x = ints((1, 3, 4, 4), np.int8)
    wt = ints((3, 1, 3, 3), np.int8)
    m = np.array([1, 2, 3], np.int32)
    s = np.array([1, 40, 2], np.int32)
    full = QCONV.normalize_attrs({"groups": 3, "pads": [1, 1, 1, 1], **UNIT})
    with pytest.raises(Exception, match="s\\[1\\] = 40"):
        QCONV.reference([x, wt, m, s], full)


def test_switch_off(monkeypatch):
    """HBC_NATIVE=0 leaves the library unloaded (the numpy kernels only)."""
    monkeypatch.setenv("HBC_NATIVE", "0")
    assert native._load() is None


@pytest.mark.skipif(not native._VNNI, reason="no AVX-512 VNNI on this CPU")
@pytest.mark.parametrize("k,p", [(1, 1), (3, 17), (4, 16), (5, 63), (64, 64), (130, 200),
                                 (4608, 49)])
def test_vnni_product_extremes(k, p, monkeypatch):
    """Reduction lengths and column counts around the kernel's blocks of 4 and 16, and the
    extreme operands -128 * -128 everywhere (the u8 offset's worst case) and mixed."""
    cout = 8
    for fill in (None, -128, 127):
        x = ints((1, k, 1, p), np.int8) if fill is None else np.full((1, k, 1, p), fill, np.int8)
        wt = ints((cout, k, 1, 1), np.int8) if fill is None else np.full(
            (cout, k, 1, 1), -128, np.int8)
        m, s = consts(cout, s_range=(20, 31))
        fast, slow = run_both([x, wt, m, s], {**UNIT, "pads": [0] * 4, "groups": 1,
                                              "out_dtype": "i16"}, monkeypatch)
        np.testing.assert_array_equal(fast, slow)


@needs_lib
def test_derived_constants_do_not_keep_the_weights_alive(monkeypatch):
    """What the compiled path remembers per node (checked constants, packed weights) goes with
    the graph's arrays: a runtime's mapped constants are freed when it is."""
    import gc
    import weakref

    def frozen(a: np.ndarray) -> np.ndarray:
        """read-only over immutable bytes, as mapped data, and the owner of its view (a
        remembered view of it would keep it alive)"""
        return np.ndarray(a.shape, a.dtype, buffer=a.tobytes())

    x = ints((1, 8, 6, 6), np.int8)
    arrays = {"w": frozen(ints((8, 8, 1, 1), np.int8)), "dw": frozen(ints((8, 1, 3, 3), np.int8)),
              "m": frozen(np.full(8, 3000, np.int32)), "s": frozen(np.full(8, 12, np.int32))}
    for w, groups in (("w", 1), ("dw", 8)):
        fast, slow = run_both([x, arrays[w], arrays["m"], arrays["s"]],
                              {**UNIT, "pads": [1] * 4 if groups > 1 else [0] * 4,
                               "groups": groups}, monkeypatch)
        np.testing.assert_array_equal(fast, slow)
    refs = [weakref.ref(a) for a in arrays.values()]
    del arrays
    gc.collect()
    assert all(r() is None for r in refs)


@needs_lib
@pytest.mark.parametrize("width,pads", [(64, (1, 1, 1, 1)), (65, (0, 0, 0, 0)), (77, (1, 0, 1, 2)),
                                        (130, (1, 1, 1, 1))])
def test_depthwise_stride2_long_rows(width, pads, monkeypatch, kernels):
    """Stride-2 rows longer than one vector of the phase split (32 int8 lanes), odd and even
    widths and offsets: every output, and no byte read past a row that is the input's last."""
    x = ints((1, 3, 5, width), np.int8)
    wt = ints((3, 1, 3, 3), np.int8)
    m, s = consts(3, s_range=(8, 20))
    fast, slow = run_both([x, wt, m, s], {"strides": [2, 2], "dilations": [1, 1],
                                          "pads": list(pads), "groups": 3}, monkeypatch)
    np.testing.assert_array_equal(fast, slow)
