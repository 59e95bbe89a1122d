"""Fuzzing calibration data files (passes/calib_data.py over ir/npy.py, then calibration): wrong
keys, shapes and dtypes, NaN and Inf, object arrays (pickles), damaged archives and crafted
.npy headers end in an HbcError naming the file, or calibrate; never another exception, never
a hang, never a silently broken scale: every scale of a calibration that succeeds is positive
and finite (tests/fuzz.py).
"""

from __future__ import annotations

import io
import math
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hbc.errors import InputError, ResourceLimitError
from hbc.ir import from_text
from hbc.passes.calib_data import load_calib_data
from hbc.passes.calibrate import calibrate

from .fuzz import Fixture, case, fuzz_settings

GRAPH = """hbir 1
graph @cal(%x: f32[2,3,4,4], %y: f32[2,8]) {
  %w: f32[4,3,1,1] = const [0.5, -1.0, 0.25, 1.0, 0.5, -0.5, 2.0, 0.125, -0.25, 1.5, -2.0, 0.75]
  %c: f32[2,4,4,4] = conv(%x, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %r: f32[2,4,4,4] = relu(%c)
  %s: f32[2,8] = sigmoid(%y)
  return %r, %s
}
"""
SAMPLE = {"x": (3, 4, 4), "y": (8,)}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return Fixture(graph=from_text(GRAPH), folder=tmp_path_factory.mktemp("fuzz_calib"))


def calibrate_checked(graph, path, method: str) -> None:
    """Calibrate; when it succeeds, every scale is positive and finite."""
    g = calibrate(graph, path, method=method)
    for v in g.values():
        q = v.type.quant
        if q is not None and v.kind != "const":
            assert all(math.isfinite(s) and s > 0 for s in q.scale), (v.name, q)


# -- array contents -----------------------------------------------------------------------------
DTYPES = ["f32", "f32", "f32", "f64", "f16", "i32", "i8", "u8", "bool", "c64", "U3", "obj",
          "S2", ">f4", "rec"]


@st.composite
def an_array(draw, key: str) -> np.ndarray:
    per = SAMPLE.get(key, (3,))
    n = draw(st.sampled_from([0, 1, 2, 2, 4, 3]))
    shape = draw(st.one_of(
        st.just((n, *per)), st.just((n, *per)), st.just((1, n, *per)),
        st.lists(st.integers(0, 5), max_size=4).map(tuple)))
    kind = draw(st.sampled_from(DTYPES))
    size = math.prod(shape)
    base = np.random.default_rng(draw(st.integers(0, 3))).standard_normal(size)
    if kind == "obj":
        return np.array([{"a": 1}] * size, dtype=object).reshape(shape)
    if kind == "rec":
        return np.zeros(shape, dtype=[("a", "<f4"), ("b", "<i4")])
    dtype = {"f32": "<f4", "f64": "<f8", "f16": "<f2", "i32": "<i4", "i8": "i1", "u8": "u1",
             "bool": "?", "c64": "<c8", "U3": "<U3", "S2": "S2", ">f4": ">f4"}[kind]
    with np.errstate(over="ignore", invalid="ignore"):
        arr = base.astype(dtype) if kind in ("U3", "S2") else \
            (base * draw(st.sampled_from([1.0, 1e-30, 1e30, 0.0]))).astype(dtype)
    arr = arr.reshape(shape)
    if arr.size and arr.dtype.kind in "fc" and draw(st.booleans()):
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(
            [np.nan, np.inf, -np.inf]))
    return arr


@st.composite
def npz_content(draw) -> dict:
    """Valid content (x and y with the same number of samples) with 0 to 3 edits."""
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    n = draw(st.sampled_from([2, 4]))
    content = {k: rng.standard_normal((n, *per)).astype(np.float32) for k, per in SAMPLE.items()}
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["drop", "add", "replace", "nonfinite", "dtype", "scale"]))
        key = draw(st.sampled_from(sorted(content) or ["x"]))
        if kind == "drop" and content:
            del content[key]
        elif kind == "add":
            name = draw(st.sampled_from(["z", "X", "", "x.npy", "y/x"]))
            content[name] = draw(an_array(name))
        elif kind == "replace":
            content[key] = draw(an_array(key))
        elif kind == "nonfinite" and key in content and content[key].size and \
                content[key].dtype.kind == "f":
            content[key].flat[draw(st.integers(0, content[key].size - 1))] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf]))
        elif kind == "dtype" and key in content and content[key].dtype.kind in "fiub":
            with np.errstate(over="ignore", invalid="ignore"):
                content[key] = content[key].astype(draw(st.sampled_from(
                    ["<f8", "<f2", ">f4", "<i4", "?", "<c8"])))
        elif kind == "scale" and key in content and content[key].dtype.kind == "f":
            with np.errstate(over="ignore", invalid="ignore"):
                content[key] = (content[key] * draw(st.sampled_from(
                    [0.0, 1e-38, 1e-45, 1e30, 3e38]))).astype(content[key].dtype)
    return content


def _savez(path, content: dict) -> None:
    # np.savez pickles object arrays (allow_pickle defaults to True when writing): exactly
    # the hostile file a reader must refuse without unpickling
    with zipfile.ZipFile(path, "w") as zf:
        for k, arr in content.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=True)
            zf.writestr(k + ".npy", buf.getvalue())


@fuzz_settings(1500)
@given(content=npz_content(), method=st.sampled_from(["max", "max", "percentile", "kl", "mse"]))
def test_npz_contents(env, content, method):
    path = env["folder"] / "calib.npz"
    _savez(path, content)
    case("calib: .npz contents", lambda: calibrate_checked(env["graph"], path, method),
         names=(str(path),))


def _valid(folder) -> bytes:
    rng = np.random.default_rng(0)
    path = folder / "valid.npz"
    np.savez(path, x=rng.standard_normal((4, 3, 4, 4)).astype(np.float32),
             y=rng.standard_normal((4, 8)).astype(np.float32))
    return path.read_bytes()


@fuzz_settings(1000)
@given(data=st.data())
def test_damaged_archives(env, data):
    raw = bytearray(_valid(env["folder"]))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "garbage"]))
    if kind == "flip":
        for at, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                  st.integers(1, 255)), min_size=1, max_size=6)):
            raw[at] ^= x
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    else:
        raw = bytearray(data.draw(st.binary(max_size=300)))
    path = env["folder"] / "damaged.npz"
    path.write_bytes(bytes(raw))
    case("calib: damaged archives",
         lambda: calibrate_checked(env["graph"], path, "max"), names=(str(path),))


# -- crafted .npy headers ---------------------------------------------------------------------
def npy_bytes(header: str, data: bytes = b"", version: tuple[int, int] = (1, 0)) -> bytes:
    head = header.encode("latin1" if version == (1, 0) else "utf-8", errors="replace")
    pad = -(len(head) + 10 + (2 if version != (1, 0) else 0) + 1) % 64
    head += b" " * pad + b"\n"
    if version == (1, 0):
        return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head + data
    return b"\x93NUMPY" + bytes(version) + struct.pack("<I", len(head)) + head + data


HEADERS = [
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 4, 4), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 4, 4), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4, -3, 4, 4), }",
    "{'descr': '<f4', 'fortran_order': True, 'shape': (4, 3, 4, 4), }",
    "{'descr': '>f4', 'fortran_order': False, 'shape': (4, 3, 4, 4), }",
    "{'descr': '|O', 'fortran_order': False, 'shape': (4,), }",
    "{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (4, 3, 4, 4), }",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 4, 4)",
    "{'descr': '<f4', 'fortran_order': False}",
    "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 4, 4), 'x': __import__('os'), }",
    "[" * 5000,
    "{'descr': '<f4', 'fortran_order': False, 'shape': (" + "9" * 5000 + ",), }",
    "",
]


@fuzz_settings(600)
@given(header=st.sampled_from(HEADERS) | st.text(max_size=80),
       version=st.sampled_from([(1, 0), (2, 0), (3, 0), (9, 9)]),
       data_len=st.sampled_from([0, 8, 768, 1000]))
def test_crafted_npy_headers(env, header, version, data_len):
    rng = np.random.default_rng(0)
    y = io.BytesIO()
    np.lib.format.write_array(y, rng.standard_normal((4, 8)).astype(np.float32))
    path = env["folder"] / "crafted.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_bytes(header, bytes(data_len), version))
        zf.writestr("y.npy", y.getvalue())
    case("calib: crafted .npy headers",
         lambda: calibrate_checked(env["graph"], path, "max"), names=(str(path),))


# -- specific guarantees ----------------------------------------------------------------------
def test_object_arrays_are_never_unpickled(env, tmp_path):
    """A pickled object array whose unpickling would create a file: refused unread."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.npz"
    _savez(path, {"x": np.array([Evil()], dtype=object), "y": np.zeros((2, 8), np.float32)})
    with pytest.raises(InputError, match=r"evil.npz: array 'x': holds Python objects"):
        list(load_calib_data(path, env["graph"]))
    assert not marker.exists()


def test_huge_declared_array_is_refused_before_allocating(env, tmp_path):
    path = tmp_path / "huge.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_bytes(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 4, 4), }"))
    with pytest.raises(ResourceLimitError, match=r"huge.npz: array 'x': array float32"
                                                 r"\[1000000000000, 3, 4, 4\] needs "
                                                 r"192,000,000,000,000 bytes"):
        list(load_calib_data(path, env["graph"]))


def test_truncated_array_is_named(env, tmp_path):
    path = tmp_path / "short.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", npy_bytes(
            "{'descr': '<f4', 'fortran_order': False, 'shape': (4, 3, 4, 4), }", bytes(100)))
    with pytest.raises(InputError, match=r"short.npz: array 'x': truncated: the header declares "
                                         r"float32\[4, 3, 4, 4\] \(768 bytes\), the file holds "
                                         r"100 bytes"):
        list(load_calib_data(path, env["graph"]))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_samples_are_refused(env, tmp_path, bad):
    """NaN/Inf calibration data: an error naming the file, the key and the sample, never a
    scale computed from it."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 4, 4)).astype(np.float32)
    x[3, 1, 2, 2] = bad
    path = tmp_path / "bad.npz"
    np.savez(path, x=x, y=rng.standard_normal((4, 8)).astype(np.float32))
    with pytest.raises(InputError, match=r"bad.npz: 'x' sample 3 \(calibration sample 3\) "
                                         r"contains NaN or Inf"):
        calibrate(env["graph"], path)
