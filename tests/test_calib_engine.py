"""Calibration speed-ups that must not change results: the running max of ``max``, histogram
scratch buffers, the onnxruntime forward pass (passes/calib_forward.py) against the interpreter,
and the onnxruntime scorer of ``auto`` (passes/calib_auto.py) against the interpreter's.

Oracles: ``Histogram`` without scratch buffers (the reference streaming histogram), the
interpreter's values (max ranges computed here from its observe hook), and the interpreter
scorer's sums. The two engines differ by float rounding only, so they are compared with a
relative tolerance; each engine is compared with itself bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import hbc
import hbc.passes
from hbc.errors import InputError
from hbc.frontend.onnx_export import export_onnx
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.types import TensorType
from hbc.passes import calib_auto
from hbc.passes.calib_forward import ENGINES, open_forward
from hbc.passes.calibrate import _targets, calibrate, scale_groups
from hbc.passes.observers import (
    OBSERVERS,
    Histogram,
    NonFiniteError,
    RunningMax,
    Workspace,
    compute_range,
)

N = 8
RNG = np.random.default_rng(11)


@pytest.fixture(scope="module")
def demo():
    from hbc.models.demo_cnn import build

    model, x = build()
    g = hbc.passes.run(hbc.load((model, x)), opt=3)
    data = {"x": np.random.default_rng(1).normal(size=(N, 3, 32, 32)).astype(np.float32)}
    return g, data


def _scales(g: Graph) -> dict[str, float]:
    return {v.name: v.type.quant.scale[0] for v in g.values() if v.type.quant is not None}


# -- observers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, np.int32])
def test_running_max_equals_the_histogram_max(dtype):
    parts = [RNG.normal(size=1000) * 10, -np.abs(RNG.normal(size=10)) * 50, np.zeros(7),
             np.array([-0.0]), RNG.normal(size=(3, 5, 7))]
    h, r = Histogram(), RunningMax()
    for p in parts:
        a = np.asarray(p).astype(dtype)
        h.update(a)
        r.update(a)
        assert r.max == h.max
    assert r.max == float(np.max(np.abs(np.concatenate([np.ravel(p).astype(dtype).astype(
        np.float64) for p in parts]))))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("where", [0, 500, 999])
def test_running_max_rejects_nan_and_inf_anywhere(bad, where):
    x = RNG.normal(size=1000).astype(np.float32)
    x[where] = bad
    for obs in (RunningMax(), Histogram()):
        with pytest.raises(NonFiniteError):
            obs.update(x)


def test_scratch_buffers_do_not_change_the_histogram():
    """A shared Workspace (reused, grown and shrunk) and overwrite=True give the counts of the
    plain update, bit for bit; overwrite touches the batch only when asked."""
    batches = [RNG.normal(size=s).astype(dt) * k for s, dt, k in
               [(5000, np.float32, 1), (300, np.float32, 40), (7, np.float64, 1e-3),
                ((4, 50, 50), np.float32, 1e5), (2000, np.float16, 3)]]
    batches.append(np.maximum(RNG.normal(size=(2, 8, 30)), 0).astype(np.float32)[:, ::2])
    plain, shared, owned = Histogram(), Histogram(), Histogram()
    ws = Workspace()
    for b in batches:
        plain.update(b)
        keep = b.copy()
        shared.update(b, workspace=ws)
        np.testing.assert_array_equal(b, keep)  # not overwritten
        owned.update(b.copy(), workspace=ws, overwrite=True)
    for h in (shared, owned):
        np.testing.assert_array_equal(h.counts, plain.counts)
        assert (h.range, h.max, h.zeros, h.total) == \
            (plain.range, plain.max, plain.zeros, plain.total)
    x = RNG.normal(size=100).astype(np.float32)
    Histogram().update(x, overwrite=True)
    assert (x >= 0).all()  # used as scratch: |x| scaled in place


# -- the forward pass --------------------------------------------------------------------------
def _interpreter_max(g: Graph, data: dict[str, np.ndarray]) -> dict[str, float]:
    """max |x| per value over the samples, from the interpreter's observe hook (the oracle)."""
    out: dict[str, float] = {}
    for i in range(len(data["x"])):
        run = {"x": data["x"][i:i + 1]}
        out["x"] = max(out.get("x", 0.0), float(np.abs(run["x"]).max()))

        def hook(node, results):
            for v, r in zip(node.outputs, results, strict=False):
                out[v.name] = max(out.get(v.name, 0.0), float(np.abs(r).max()))

        interpret(g, run, observe=hook)
    return out


@pytest.mark.parametrize("engine", ["interpreter", "onnxruntime"])
def test_max_scales_are_the_observed_max(demo, engine):
    g, data = demo
    c = calibrate(g, data, "max", engine=engine, threads=1)
    assert c.meta["calibration"]["engine"] == engine
    want = _interpreter_max(g, data)
    root = scale_groups(c, _targets(c))
    for name, s in _scales(c).items():
        exact = float(np.float32(want[root[name]] / 127))
        if engine == "interpreter":
            assert s == exact, name
        else:  # float rounding of onnxruntime's kernels
            assert s == pytest.approx(exact, rel=1e-5), name


@pytest.mark.parametrize("method", ["percentile", "kl", "mse", "auto"])
def test_engines_agree(demo, method):
    g, data = demo
    ort = calibrate(g, data, method, engine="onnxruntime", threads=1)
    ref = calibrate(g, data, method, engine="interpreter")
    a, b = _scales(ort), _scales(ref)
    assert a.keys() == b.keys()
    # kl's argmin can move by a bin when counts shift; the others read the same bins
    rel = 3e-2 if method in ("kl", "auto") else 1e-4
    for name in a:
        assert a[name] == pytest.approx(b[name], rel=rel), name
    if method == "auto":
        assert ort.meta["calibration"]["per_value_method"] == \
            ref.meta["calibration"]["per_value_method"]


@pytest.mark.parametrize("method", ["max", "auto"])
def test_onnxruntime_is_deterministic_at_any_thread_count(demo, method):
    g, data = demo
    first = _scales(calibrate(g, data, method, engine="onnxruntime", threads=1))
    assert _scales(calibrate(g, data, method, engine="onnxruntime", threads=1)) == first
    assert _scales(calibrate(g, data, method, engine="onnxruntime", threads=2)) == first


def _unexportable_graph() -> Graph:
    """A float graph with a node the ONNX exporter cannot write (a linear resize in the
    tf_half_pixel_for_nn mode, which ONNX dropped), and an integer value (argmax)."""
    g = Graph("odd")
    x = g.add_input("x", TensorType("f32", (1, 2, 4, 4)))
    up = {"size": [1, 2, 8, 8], "scales": [1.0, 1.0, 2.0, 2.0], "mode": "linear",
          "coordinate_transformation_mode": "tf_half_pixel_for_nn"}
    y = g.add_node("resize", [x], up, name="up").outputs[0]
    r = g.add_node("relu", [y], name="act").outputs[0]
    idx = g.add_node("argmax", [x], {"axis": 1}, name="best").outputs[0]
    g.set_outputs([r, idx])
    return g


def test_fallback_to_the_interpreter_and_errors(demo):
    g = _unexportable_graph()
    data = {"x": RNG.normal(size=(4, 2, 4, 4)).astype(np.float32)}
    c = calibrate(g, data, "max")  # engine auto: falls back
    assert c.meta["calibration"]["engine"] == "interpreter"
    assert _scales(c) == _scales(calibrate(g, data, "max", engine="interpreter"))
    with pytest.raises(InputError, match=r"engine onnxruntime: graph 'odd': .*resize node 'up'"):
        calibrate(g, data, "max", engine="onnxruntime")
    dg, ddata = demo
    with pytest.raises(InputError, match=r"engine onnxruntime: .*%best is i64"):
        open_forward(g, ["best"], "onnxruntime")
    with pytest.raises(InputError, match="unknown calibration engine 'torch'"):
        calibrate(dg, ddata, engine="torch")
    with pytest.raises(InputError, match="calibration threads -1"):
        calibrate(dg, ddata, engine="interpreter", threads=-1)
    assert set(ENGINES) == {"auto", "onnxruntime", "interpreter"}


def test_nan_is_reported_at_its_node_by_onnxruntime():
    g = Graph("two")
    a = g.add_input("a", TensorType("f32", (1, 8)))
    b = g.add_input("b", TensorType("f32", (1, 8)))
    s = g.add_node("add", [a, b], name="sum").outputs[0]
    y = g.add_node("div", [s, b], name="ratio").outputs[0]
    g.set_outputs([g.add_node("relu", [y], name="out").outputs[0]])
    ones = np.ones((4, 8), np.float32)
    zeros_b = ones.copy()
    zeros_b[2, 3] = 0.0  # 2/0 = inf at node 'ratio', sample 2
    fwd = open_forward(g, ["a", "b", "sum", "ratio", "out"], "onnxruntime", 1)
    assert fwd.engine == "onnxruntime"
    with pytest.raises(InputError, match=r"div node 'ratio'.*Inf on calibration sample 2"):
        calibrate(g, {"a": ones, "b": zeros_b}, engine="onnxruntime")


# -- auto's scorers ----------------------------------------------------------------------------
def test_onnxruntime_scorer_matches_the_interpreter_scorer(demo):
    """Same candidates, same data: the trial graph's float64 sums equal the interpreter's up to
    the consumers' float rounding, every use is scored (residual inputs of fused convs too) and
    the choices are the same."""
    g, data = demo
    roots = list(dict.fromkeys(scale_groups(g, _targets(g)).values()))
    root = scale_groups(g, _targets(g))
    hists = {r: Histogram() for r in roots}
    runs = [{"x": data["x"][i:i + 1]} for i in range(N)]
    fwd = open_forward(g, roots, "interpreter")
    for run in runs:
        fwd.run(run, lambda node, v, a, owned: hists[v.name].update(a))
    cands = {}
    for r, h in hists.items():
        distinct: list[tuple[str, float]] = []
        for m in OBSERVERS:
            a = compute_range(h, m)
            if a > 0 and all(a != b for _, b in distinct):
                distinct.append((m, a))
        if len(distinct) > 1:
            cands[r] = distinct
    qmax = dict.fromkeys(roots, 127)
    interp = calib_auto._InterpreterScores(g, root, cands, qmax)
    ort = calib_auto._OrtScores(g, root, cands, qmax, 1)
    for run in runs:
        interp.run(run)
        ort.run(run)
    assert interp.num.keys() == ort.num.keys() and interp.den.keys() == ort.den.keys()
    assert any(key.endswith("#3") for _, key, _ in interp.num)  # a fused residual is scored
    for k in interp.num:  # an error of a pooled mean is a small difference of two sums
        assert math.fsum(ort.num[k]) == pytest.approx(math.fsum(interp.num[k]), rel=1e-2), k
    for k in interp.den:
        assert math.fsum(ort.den[k]) == pytest.approx(math.fsum(interp.den[k]), rel=1e-5), k
    assert ort.best() == interp.best()


def test_f16_graph_runs_in_onnxruntime_and_scores_in_the_interpreter(caplog):
    """f16 values run in onnxruntime (f16 buffers); the trial graph's fake quantization is
    exported for f32 only, so auto scores those groups in the interpreter, with the same
    choices as the interpreter engine."""
    g = Graph("half")
    x = g.add_input("x", TensorType("f16", (1, 64)))
    w = g.add_constant("w", RNG.normal(size=(1, 64)).astype(np.float16))
    y = g.add_node("mul", [x, w], name="scaled").outputs[0]
    g.set_outputs([g.add_node("relu", [y], name="act").outputs[0]])
    data = {"x": RNG.standard_t(3, size=(16, 64)).astype(np.float16)}
    with caplog.at_level("INFO", logger="hbc.passes.calib_auto"):
        ort = calibrate(g, data, "auto", engine="onnxruntime", threads=1)
    assert "scores in the interpreter: fake quantization of %x (f16)" in caplog.text
    ref = calibrate(g, data, "auto", engine="interpreter")
    assert ort.meta["calibration"]["engine"] == "onnxruntime"
    assert ort.meta["calibration"]["per_value_method"] == \
        ref.meta["calibration"]["per_value_method"]


# -- the exporter option the engine uses -------------------------------------------------------
def test_export_extra_outputs(demo):
    g, data = demo
    inner = g.nodes[2].outputs[0].name
    model = export_onnx(g, extra_outputs=[inner, g.outputs[0].name])
    assert [o.name for o in model.graph.output] == [g.outputs[0].name, inner]
    assert inner not in {v.name for v in model.graph.value_info}
    with pytest.raises(InputError, match="extra outputs must be node outputs, not %x"):
        export_onnx(g, extra_outputs=["x"])
