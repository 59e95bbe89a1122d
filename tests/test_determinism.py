"""Determinism: the same model and options give byte-identical outputs, whatever the process.

- ``hbc compile zoo:resnet18`` in two processes with different ``PYTHONHASHSEED`` (so set and
  dict-of-str orders differ), thread counts and working folders gives byte-identical ``.hbm``,
  ``.perf.json`` and ``.perf.html``;
- a compile with calibration data (``--calib-method auto``: every observer and the consumer
  scorer) likewise;
- calibration does not depend on the order of the keys of a sample dict, nor on the order of
  the samples (the histograms merge exactly, sums use ``math.fsum``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from hbc.ir import from_text
from hbc.passes.calibrate import METHODS, calibrate

from .test_fuzz_calib import GRAPH

BIN = os.path.join(os.path.dirname(sys.executable), "hbc")


def _compile(tmp_path, name: str, args: list[str], hashseed: str, threads: str) -> dict:
    folder = tmp_path / name
    folder.mkdir()
    env = dict(os.environ, PYTHONHASHSEED=hashseed, OMP_NUM_THREADS=threads)
    proc = subprocess.run([BIN, "compile", *args, "-o", "model.hbm"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return {p: (folder / p).read_bytes()
            for p in ("model.hbm", "model.perf.json", "model.perf.html")}


def _same(a: dict, b: dict) -> None:
    for name in a:
        assert a[name] == b[name], f"{name} differs between the two processes"


def test_compile_is_byte_identical_across_processes(tmp_path):
    args = ["zoo:resnet18", "--march", "bayes", "--opt", "3"]
    _same(_compile(tmp_path, "a", args, "0", "1"), _compile(tmp_path, "b", args, "12345", "2"))


def test_compile_with_calibration_data_is_byte_identical(tmp_path):
    model = tmp_path / "cal.hbir"
    model.write_text(GRAPH)
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((8, 3, 4, 4)).astype(np.float32),
             y=rng.standard_normal((8, 8)).astype(np.float32))
    args = [str(model), "--calib-data", str(data), "--calib-method", "auto"]
    _same(_compile(tmp_path, "a", args, "1", "1"), _compile(tmp_path, "b", args, "999", "2"))


def _scales(g) -> dict:
    return {v.name: v.type.quant for v in g.values() if v.kind != "const"}


@pytest.mark.parametrize("method", METHODS)
def test_calibration_ignores_key_and_sample_order(method):
    graph = from_text(GRAPH)
    rng = np.random.default_rng(1)
    samples = [{"x": rng.standard_normal((2, 3, 4, 4)).astype(np.float32) * (i + 1),
                "y": rng.standard_normal((2, 8)).astype(np.float32) * (3 - i)}
               for i in range(3)]
    reordered = [{"y": s["y"], "x": s["x"]} for s in reversed(samples)]
    first = _scales(calibrate(graph, samples, method))
    assert all(q is not None for q in first.values())
    assert _scales(calibrate(graph, reordered, method)) == first
