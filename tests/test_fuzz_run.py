"""Fuzzing the ``.npy`` inputs of ``hbc run`` (hbc/cli_runtime.py, runtime/runtime.py), through
the CLI in-process: every case exits 0, or exits 2 with one ``error:`` line naming the input;
never a traceback, never a hang (tests/fuzz.py).

Inputs: arrays of every dtype (integers of the quantized type are fed as they are, floats are
quantized, others refused), right and wrong shapes, batches, empty and 0-d arrays, NaN, Inf and
huge values; pickled object arrays; damaged files (flipped bytes, truncations) and crafted
headers (huge or negative shapes, garbage, Python code); .npz archives, folders, missing files.
"""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from hbc.cli import main
from hbc.errors import InputError

from .fuzz import Fixture, case, fuzz_settings
from .test_fuzz_calib import HEADERS, npy_bytes

MODEL = """hbir 1
graph @tiny(%x: f32[1,3,4,4]) {
  %w: f32[2,3,1,1] = const [0.5, -1.0, 0.25, 1.0, 0.5, -0.5]
  %c: f32[1,2,4,4] = conv(%x, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %r: f32[1,2,4,4] = relu(%c)
  return %r
}
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import hbc

    folder = tmp_path_factory.mktemp("fuzz_run")
    (folder / "tiny.hbir").write_text(MODEL)
    hbm = folder / "tiny.hbm"
    hbc.compile(str(folder / "tiny.hbir"), "bayes", 3, output=hbm, report_dir=folder / "r")
    return Fixture(hbm=hbm, folder=folder)


def run_cli(env, path) -> None:
    """``hbc run`` in-process; an exit 2 becomes the InputError the user saw (one line naming
    the file), exit 0 returns; anything else fails the test."""
    result = CliRunner().invoke(main, ["run", str(env["hbm"]), "--input", f"x={path}", "-o",
                                       str(env["folder"] / "out")])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    raise InputError(lines[0])


def check(env, raw: bytes, reader: str) -> None:
    path = env["folder"] / "input.npy"
    path.write_bytes(raw)
    # file errors name the file; shape and dtype errors (runtime/runtime.py) name the input
    case(reader, lambda: run_cli(env, path), some=(str(path), "input 'x'"))


#: crafted headers, but for those declaring more than the machine has (test_huge_header)
SMALL_HEADERS = [h for h in HEADERS if "1000000000000" not in h]


@st.composite
def an_array(draw) -> np.ndarray:
    shape = draw(st.sampled_from([(1, 3, 4, 4)] * 4 + [(2, 3, 4, 4), (3, 3, 4, 4), (0, 3, 4, 4),
                                                      (1, 3, 4), (3, 4, 4), (), (1, 4, 4, 3),
                                                      (4, 1, 3, 4, 4)]))
    dtype = draw(st.sampled_from(["<f4"] * 4 + ["<f8", "<f2", "i1", "<i2", "<i4", "u1", "?",
                                               "<c8", ">f4", "<U2", "O", "V4"]))
    rng = np.random.default_rng(draw(st.integers(0, 3)))
    with np.errstate(over="ignore", invalid="ignore"):
        values = rng.standard_normal(shape) * draw(st.sampled_from([1.0, 1e6, 1e-40, 0.0, 1e39]))
        if dtype == "O":
            arr = np.empty(shape, dtype=object)
        elif dtype == "V4":
            arr = np.zeros(shape, dtype="V4")
        else:
            arr = values.astype(dtype)
    if arr.size and arr.dtype.kind == "f" and draw(st.booleans()):
        arr.flat[draw(st.integers(0, arr.size - 1))] = draw(st.sampled_from(
            [np.nan, np.inf, -np.inf]))
    return arr


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=True)  # object arrays pickled: hostile
    return buf.getvalue()


@fuzz_settings(1000)
@given(arr=an_array())
def test_arrays(env, arr):
    check(env, _npy(arr), "run: .npy arrays")


@fuzz_settings(800)
@given(data=st.data())
def test_damaged_files(env, data):
    raw = bytearray(_npy(np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype("<f4")))
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "header", "garbage"]))
    if kind == "flip":
        for at, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                  st.integers(1, 255)), min_size=1, max_size=4)):
            raw[at] ^= x
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    elif kind == "extend":
        raw += data.draw(st.binary(min_size=1, max_size=64))
    elif kind == "header":
        raw = bytearray(npy_bytes(data.draw(st.sampled_from(SMALL_HEADERS) | st.text(max_size=60)),
                                  bytes(data.draw(st.sampled_from([0, 192, 200]))),
                                  data.draw(st.sampled_from([(1, 0), (2, 0), (3, 0)]))))
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    check(env, bytes(raw), "run: damaged .npy files")


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "is a directory"),
    (lambda p: None, "no such file"),
    (lambda p: np.savez(p, x=np.zeros((1, 3, 4, 4), np.float32)), "an .npz archive"),
])
def test_wrong_kinds_of_file(env, tmp_path, make, message):
    path = tmp_path / "in.npy"
    make(path)
    if not path.exists() and tmp_path.joinpath("in.npy.npz").exists():
        tmp_path.joinpath("in.npy.npz").rename(path)
    with pytest.raises(InputError) as e:
        run_cli(env, path)
    assert re.search(message, str(e.value)), str(e.value)


def test_huge_header_names_the_file_and_size(env, tmp_path):
    path = tmp_path / "huge.npy"
    path.write_bytes(npy_bytes(
        "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000000, 3, 4, 4), }"))
    with pytest.raises(InputError) as e:
        run_cli(env, path)
    assert str(path) in str(e.value) and "192,000,000,000,000 bytes" in str(e.value)


def test_damaged_header_is_named(env, tmp_path):
    path = tmp_path / "bad.npy"
    path.write_bytes(npy_bytes("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 3, 4, 4)"))
    result = CliRunner().invoke(main, ["run", str(env["hbm"]), "--input", f"x={path}"])
    assert result.exit_code == 2 and str(path) in result.stderr, result.exception
