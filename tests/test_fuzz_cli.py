"""The readers through the command line: a damaged .hbm, .hbir, .onnx or calibration .npz given
to ``hbc inspect`` / ``hbc perf`` / ``hbc compile --calib-data`` exits 0, or exits 2 with one
``error:`` line naming the file (a parse error adds the source line and a caret) and no
traceback (the library-level fuzz tests cover the
readers in depth; this checks the CLI's error path on a sample of the same damage).
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

import hbc
from hbc.cli import main
from hbc.errors import InputError

from .fuzz import Fixture, case, fuzz_settings
from .test_fuzz_calib import GRAPH
from .test_fuzz_onnx import cnn


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz_cli")
    (folder / "m.hbir").write_text(GRAPH)
    hbc.compile(str(folder / "m.hbir"), "bayes", 3, output=folder / "m.hbm",
                report_dir=folder / "report")
    (folder / "m.onnx").write_bytes(cnn().SerializeToString())
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", x=rng.standard_normal((4, 3, 4, 4)).astype(np.float32),
             y=rng.standard_normal((4, 8)).astype(np.float32))
    return Fixture(folder=folder, **{k: (folder / f).read_bytes() for k, f in (
        ("hbm", "m.hbm"), ("hbir", "m.hbir"), ("onnx", "m.onnx"), ("npz", "calib.npz"))})


def cli(args: list[str], path) -> None:
    result = CliRunner().invoke(main, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 0:
        return
    assert result.exit_code == 2, (result.exit_code, result.output)
    # compile prints its stages first; a parse error adds the source line and a caret
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    raise InputError(errors[0])


@fuzz_settings(400)
@given(kind=st.sampled_from(["hbm", "hbir", "onnx", "npz"]), data=st.data())
def test_damaged_files_through_the_cli(files, kind, data):
    raw = bytearray(files[kind])
    how = data.draw(st.sampled_from(["flip", "truncate"]))
    if how == "flip":
        for at, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                  st.integers(1, 255)), min_size=1, max_size=4)):
            raw[at] ^= x
    else:
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    folder = files["folder"]
    path = folder / f"damaged.{kind}"
    path.write_bytes(bytes(raw))
    if kind == "hbm":
        args = [["inspect", str(path)], ["perf", str(path)]][data.draw(st.integers(0, 1))]
    elif kind == "npz":
        args = ["compile", str(folder / "m.hbir"), "--calib-data", str(path), "-o",
                str(folder / "out.hbm"), "--report", str(folder / "out")]
    else:
        args = ["inspect", str(path)]
    case(f"cli: damaged .{kind}", lambda: cli(args, path), names=(str(path),))
