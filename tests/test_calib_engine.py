"""Calibration speed-ups that must not change results: the running max of ``max``, histogram
scratch buffers, the onnxruntime forward pass (passes/calib_forward.py) against the interpreter;
and ``auto``'s one-pass criterion (passes/calib_auto.py): consumer gains, weighted histograms.

Oracles: ``Histogram`` without scratch buffers (the reference streaming histogram), the
interpreter's values (max ranges computed here from its observe hook), the energy a consumer
passes for a unit error (the interpreter on a one-hot input) and np.bincount of the gains. The
two engines differ by float rounding only, so they are compared with a relative tolerance; each
engine is compared with itself bit for bit.
"""

from __future__ import annotations

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
from hbc.passes.calibrate import _targets, calibrate, group_exits, scale_groups
from hbc.passes.observers import (
    Histogram,
    NonFiniteError,
    RunningMax,
    Workspace,
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
    observed: dict[str, float] = {}  # per group, the max over the values it is observed at
    for name, r in group_exits(c, root).items():
        observed[r] = max(observed.get(r, 0.0), want[name])
    for name, s in _scales(c).items():
        exact = float(np.float32(observed[root[name]] / 127))
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


# -- auto: consumer gains and the weighted histogram --------------------------------------------
CONV = {"strides": [1, 1], "dilations": [1, 1], "pads": [1, 1, 1, 1]}


def _energy_passed(g: Graph, node_name: str, x_name: str, channel: int) -> float:
    """Oracle: the output energy of the consumer's linear part (no bias) for a unit error at one
    interior element of ``channel``: sum over outputs of the weights reading it, squared."""
    node = next(n for n in g.nodes if n.name == node_name)
    x = g.value(x_name)
    delta = np.zeros(x.shape, np.float32)
    where = [0] * x.type.rank
    axis = x.type.rank - 1 if node.attrs.get("layout") == "NHWC" or node.op == "linear" else 1
    for i in range(1, x.type.rank):
        where[i] = x.shape[i] // 2
    where[axis] = channel
    delta[tuple(where)] = 1.0
    sub = Graph("one")
    xi = sub.add_input("x", x.type)
    w = sub.add_constant("w", g.constants[node.inputs[1].name])
    y = sub.add_node(node.op, [xi, w], node.attrs, name="c").outputs[0]
    sub.set_outputs([y])
    out = interpret(sub, {"x": delta})["c"].astype(np.float64)
    return float(np.sum(out * out))


def test_consumer_gain_is_the_energy_a_channel_passes():
    g = Graph("gains")
    w = RNG.normal(size=(6, 2, 3, 3)).astype(np.float32) * np.arange(1, 7)[:, None, None, None]
    g.add_constant("w", w.astype(np.float32))
    x = g.add_input("x", TensorType("f32", (1, 4, 7, 7)))
    xt = g.add_input("xt", TensorType("f32", (1, 7, 7, 4)))
    xl = g.add_input("xl", TensorType("f32", (3, 4)))
    g.add_constant("wl", RNG.normal(size=(5, 4)).astype(np.float32))
    outs = [g.add_node("conv", [x, g.value("w")], {**CONV, "groups": 2}, name="grouped"),
            g.add_node("conv", [xt, g.value("w")], {**CONV, "groups": 2, "layout": "NHWC"},
                       name="nhwc"),
            g.add_node("linear", [xl, g.value("wl")], {}, name="fc")]
    g.set_outputs([n.outputs[0] for n in outs])
    for node, value, shape in [(outs[0], x, (1, 4, 1, 1)), (outs[1], xt, (1, 1, 1, 4)),
                               (outs[2], xl, (1, 4))]:
        gain = calib_auto.consumer_gain(g, node, 0, value)
        assert gain.shape == shape, node.name
        passed = np.array([_energy_passed(g, node.name, value.name, c) for c in range(4)])
        np.testing.assert_allclose(gain.ravel(), passed / passed.mean(), rtol=1e-5)
    assert calib_auto.consumer_gain(g, outs[0], 1, g.value("w")) is None  # not the data input


def test_weighted_histogram_sums_the_gains_of_non_zero_values_exactly_in_any_order():
    x = RNG.laplace(size=(6, 3, 5, 5)) * np.array([1.0, 4.0, 0.5])[:, None, None]
    x = np.where(RNG.random(x.shape) < 0.3, 0.0, x).astype(np.float32) * \
        (2.0 ** np.arange(6))[:, None, None, None].astype(np.float32)  # the range grows
    gain = np.array([0.25, 2.0, 0.75]).reshape(1, 3, 1, 1)
    first = None
    for order in (range(6), reversed(range(6)), RNG.permutation(6)):
        h = Histogram(weighted=True)
        ws = Workspace()
        for i in order:
            h.update(x[i:i + 1].copy(), gain=gain, workspace=ws, overwrite=True)
        if first is None:
            first = h
        np.testing.assert_array_equal(h.mass, first.mass)  # exact: gains are 2**-k multiples
    ax = np.abs(x.astype(np.float64))
    idx = np.floor(ax * first.bins / first.range).astype(np.int64)
    weight = np.broadcast_to(gain, x.shape) * (ax > 0)
    np.testing.assert_array_equal(first.mass, np.bincount(idx.ravel(), weight.ravel(),
                                                          first.bins))
    plain = Histogram(weighted=True)
    plain.update(x, gain=3.0)
    np.testing.assert_array_equal(plain.mass, 3.0 * plain.counts)


def _two_channel_graph(w: list[float]) -> Graph:
    g = Graph("two_channels")
    x = g.add_input("x", TensorType("f32", (1, 2, 16, 16)))
    k = g.add_constant("k", np.array(w, np.float32).reshape(1, 2, 1, 1))
    attrs = {**CONV, "pads": [0, 0, 0, 0]}
    g.set_outputs([g.add_node("conv", [x, k], attrs, name="mix").outputs[0]])
    return g


def test_auto_spares_the_channel_its_consumer_amplifies():
    """Channel 0 holds heavy tails, channel 1 narrow values. Read through a large weight,
    channel 0's outliers must not be clipped (a wide range); read through a small one, their
    clipping costs little against the rounding noise of channel 1 (a narrow range)."""
    n = 64
    x = np.empty((n, 2, 16, 16), np.float32)
    x[:, 0] = RNG.standard_t(2, size=(n, 16, 16))
    x[:, 1] = RNG.uniform(-1, 1, size=(n, 16, 16))
    scales, methods = {}, {}
    for label, w in (("amplified", [8.0, 0.1]), ("damped", [0.1, 8.0])):
        c = calibrate(_two_channel_graph(w), {"x": x}, "auto", engine="interpreter")
        scales[label] = c.value("x").type.quant.scale[0]
        methods[label] = c.meta["calibration"]["per_value_method"]["x"]
    assert scales["amplified"] > 2 * scales["damped"], (scales, methods)


def test_f16_graph_auto_in_onnxruntime():
    """f16 values run in onnxruntime (f16 buffers); auto's weighted histograms take them as
    they come, with the interpreter engine's choices."""
    g = Graph("half")
    x = g.add_input("x", TensorType("f16", (1, 64)))
    w = g.add_constant("w", RNG.normal(size=(1, 64)).astype(np.float16))
    y = g.add_node("mul", [x, w], name="scaled").outputs[0]
    g.set_outputs([g.add_node("relu", [y], name="act").outputs[0]])
    data = {"x": RNG.standard_t(3, size=(16, 64)).astype(np.float16)}
    ort = calibrate(g, data, "auto", engine="onnxruntime", threads=1)
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
