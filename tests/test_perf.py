"""The static performance estimator (backend/perf.py) and the march files (backend/march.py).

Unit layers are checked against costs computed by hand from the march numbers (a 1x1 conv, a
depthwise conv, a layer too big for the on-chip memory), then whole zoo models: the four
published calibration points within 10 % (FPS with all cores, latency of one frame on one core,
batch 1, 224x224), the opt-level ordering O0 > O1 >= O2 >= O3, CPU costs of quantize,
dequantize and fallback ops, determinism and the report schema.

Lowered graphs are built once per module (:func:`lowered`): the float graph of PIPELINES[opt]
(plus absorb-qdq and fold-bn), calibrated on one seeded random sample (method max), lowered
with ``lower-int{march=...}``. torch runs on one thread.
"""

from __future__ import annotations

import functools
import json
import math

import numpy as np
import pytest
import torch

import hbc
from hbc import models
from hbc.backend.march import ALIASES, March, load_march, march_names
from hbc.backend.perf import SCHEMA, estimate
from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.types import QuantParams, TensorType
from hbc.passes import PIPELINES, run
from hbc.passes.calibrate import calibrate

#: published figures: (march, zoo model, FPS with all cores, latency ms on one core or None)
PUBLISHED = (
    ("bayes", "mixvargenet", 5790.35, None),
    ("bernoulli2", "resnet18", 232.74, 8.87),
    ("bayes-e", "resnet18", 448.79, 2.95),
    ("nash-e", "resnet50", 1117.93, 1.12),
)
TOLERANCE = 0.10

SUMMARY_KEYS = {"march", "opt", "macs", "latency_ms", "fps", "ddr_bytes_per_frame", "bpu_ops",
                "cpu_ops", "mac_utilization", "bpu_ms", "cpu_ms", "cores", "clock_mhz",
                "weight_bytes", "peak_tops"}
LAYER_KEYS = {"name", "op", "unit", "macs", "aligned_macs", "compute_cycles", "ddr_read_bytes",
              "ddr_write_bytes", "latency_us", "bound", "inputs", "loc"}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _float_graph(name: str) -> Graph:
    module, example = models.build(name)
    return hbc.load((module, example))


@functools.cache
def lowered(name: str, march: str, opt: int) -> Graph:
    """Zoo model ``name`` through PIPELINES[opt] (+ absorb-qdq, fold-bn), calibrated on one
    seeded random sample (method max) and lowered for ``march``."""
    passes = list(dict.fromkeys(["absorb-qdq", *PIPELINES[opt], "fold-bn"]))
    floats = run(_float_graph(name), passes=passes, march=march, verify=False)
    rng = np.random.default_rng(0)
    sample = {v.name: rng.standard_normal(v.shape).astype(np.float32) for v in floats.inputs}
    calibrated = calibrate(floats, [sample], method="max")
    return run(calibrated, passes=[("lower-int", {"march": march})], verify=False)


# -- march files -----------------------------------------------------------------------------
def test_march_files():
    assert march_names() == ["bayes", "bayes-e", "bernoulli2", "nash-e"]
    tops = {"bernoulli2": 5, "bayes": 128, "bayes-e": 10, "nash-e": 80}
    cores = {"bernoulli2": 2, "bayes": 2, "bayes-e": 1, "nash-e": 1}
    for name in march_names():
        m = load_march(name)
        assert m.name == name and m.cores == cores[name]
        assert abs(m.peak_tops / tops[name] - 1) < 0.05, (name, m.peak_tops)
        assert m.int16 == (name != "bernoulli2") == ("i16" in m.macs_per_cycle)
        assert set(m.align) == {"cin", "cout", "width", "height"}
        for key in ("array_efficiency", "layer_overhead_cycles", "frame_overhead_us",
                    "macs_per_cycle", "align", "ddr_bytes_per_s", "onchip_bytes", "cpu"):
            assert key in m.sources, f"{name}: [sources] says nothing about {key}"
        text = open(m.path).read()
        assert "# [ops.*]: per-op constraint tables (backend/constraints.py)" in text
    assert load_march("bernoulli2").no_integer == {"qgrid_sample", "qsoftmax"}
    assert load_march("bernoulli2").fusion_limits == {"residual_strides": (1, 2)}
    assert load_march("nash").name == "nash-e" == ALIASES["nash"]
    assert load_march("BAYES").name == "bayes"


def test_unknown_march_lists_known():
    with pytest.raises(InputError, match=r"unknown march 'j7'.*bayes, bayes-e, bernoulli2, "
                                         r"nash-e.*nash -> nash-e"):
        load_march("j7")


def test_malformed_march_names_field(tmp_path, monkeypatch):
    import hbc.backend.march as march_mod

    text = open(load_march("bayes").path).read().replace("cores = 2 ", "cores = -2 ", 1)
    (tmp_path / "bayes.toml").write_text(text)
    monkeypatch.setattr(march_mod, "MARCH_DIR", tmp_path)
    with pytest.raises(InputError, match=r"bayes.toml \[hardware\] cores: expected a "
                                         "non-negative integer, got -2"):
        march_mod.load_march("bayes")


# -- hand-computed unit layers ---------------------------------------------------------------
def _march(ddr: float = 1e9, **hardware) -> March:
    """bayes-e with round numbers: 1 GHz, 1024 MACs/cycle, efficiency 0.5, alignment 16/16/8,
    1000 cycles per layer, DDR 1 GB/s (1 byte per ns)."""
    base = load_march("bayes-e")
    hw = {**base.hardware, "array_efficiency": 0.5, "layer_overhead_cycles": 1000,
          "vector_bytes_per_cycle": 64, "frame_overhead_us": 0.0, **hardware}
    cpu = {**base.cpu, "quantize_ns_per_element": 1.0, "dequantize_ns_per_element": 2.0,
           "float_ns_per_element": 4.0, "op_overhead_us": 10.0}
    return March(name="unit", cores=1, clock_hz=1e9, macs_per_cycle={"i8": 1024, "i16": 512},
                 int16=True, onchip_bytes=hw.get("onchip_bytes", 1 << 20),
                 ddr_bytes_per_s=ddr, align={"cin": 16, "cout": 16, "width": 8, "height": 1},
                 hardware=hw, cpu=cpu, lowering={}, ops={}, sources={})


_CONV = {"strides": [1, 1], "dilations": [1, 1]}


def _qconv_graph(cin: int, cout: int, hw: int, k: int, groups: int, dtype: str = "i8") -> Graph:
    """x (i8 input) -> qconv -> y, a graph output read by nothing else."""
    g = Graph("unit")
    q = QuantParams(scale=(0.1,))
    x = g.add_input("x", TensorType(dtype, (1, cin, hw, hw), quant=q))
    w = g.add_constant("w", np.ones((cout, cin // groups, k, k), np.int8))
    m = g.add_constant("m", np.full(cout, 1 << 14, np.int32))
    s = g.add_constant("s", np.full(cout, 20, np.int32))
    b = g.add_constant("b", np.zeros(cout, np.int32))
    attrs = {"groups": groups, "pads": [k // 2] * 4, **_CONV}
    (y,) = g.add_node("qconv", [x, w, m, s, b], attrs, name="conv").outputs
    g.set_outputs([y])
    return g


def test_pointwise_conv_by_hand():
    """1x1 conv 24 -> 40 channels on 14x14: aligned MACs pad cin 24->32, cout 40->48,
    width 14->16."""
    g = _qconv_graph(24, 40, 14, 1, 1)
    (layer,) = estimate(g, _march(), 1)["layers"]
    assert layer["macs"] == 14 * 14 * 40 * 24
    assert layer["aligned_macs"] == 14 * 16 * 48 * 32
    assert layer["compute_cycles"] == math.ceil(14 * 16 * 48 * 32 / (1024 * 0.5))  # 672
    weights = 40 * 24 + 3 * 40 * 4
    assert layer["ddr_read_bytes"] == 24 * 14 * 14 + weights
    assert layer["ddr_write_bytes"] == 40 * 14 * 14
    ddr_us = (24 * 196 + weights + 40 * 196) / 1e3  # 1 GB/s: 1 byte per ns
    assert layer["latency_us"] == pytest.approx(max(0.672, ddr_us) + 1.0)
    assert layer["bound"] == "ddr"
    # O0 does not overlap DMA and compute
    (layer0,) = estimate(g, _march(), 0)["layers"]
    assert layer0["latency_us"] == pytest.approx(0.672 + ddr_us + 1.0)


def test_depthwise_conv_by_hand():
    """3x3 depthwise conv on 64 channels: each group's single input channel takes all 16 input
    lanes, so the array spends 16x the MACs."""
    g = _qconv_graph(64, 64, 28, 3, 64)
    (layer,) = estimate(g, _march(ddr=10e9), 3)["layers"]
    assert layer["macs"] == 28 * 28 * 64 * 9
    assert layer["aligned_macs"] == 28 * 32 * 64 * 16 * 9 == 16 * layer["macs"] * 32 // 28
    assert layer["compute_cycles"] == 28 * 32 * 64 * 16 * 9 // 512  # 16128
    in_out, weights = 2 * 64 * 28 * 28, 64 * 9 + 3 * 64 * 4
    assert layer["ddr_read_bytes"] + layer["ddr_write_bytes"] == in_out + weights
    assert layer["bound"] == "compute"  # 16.1 us of compute, 10.2 us of DMA at 10 GB/s
    assert layer["latency_us"] == pytest.approx(16.128 + 1.0)
    # int16 activations run at half the MAC rate
    (wide,) = estimate(_qconv_graph(64, 64, 28, 3, 64, "i16"), _march(ddr=10e9), 3)["layers"]
    assert wide["compute_cycles"] == 2 * layer["compute_cycles"]
    assert wide["ddr_read_bytes"] == layer["ddr_read_bytes"] + 64 * 28 * 28


def _chain(channels: int, hw: int) -> Graph:
    """x -> conv a (1x1) -> conv b (1x1) -> y: a's output is the one intermediate tensor."""
    g = Graph("chain")
    x = g.add_input("x", TensorType("i8", (1, channels, hw, hw), quant=QuantParams((0.1,))))
    v = x
    for name in ("a", "b"):
        w = g.add_constant(f"{name}.w", np.ones((channels, channels, 1, 1), np.int8))
        m = g.add_constant(f"{name}.m", np.full(channels, 1 << 14, np.int32))
        s = g.add_constant(f"{name}.s", np.full(channels, 20, np.int32))
        (v,) = g.add_node("qconv", [v, w, m, s], {"pads": [0] * 4, **_CONV},
                          name=name).outputs
    g.set_outputs([v])
    return g


def test_on_chip_residency_and_spill():
    """At O2 the intermediate stays on chip when it fits; a layer whose output is too big for
    the on-chip memory spills it to DDR (written by a, read back by b) even at O3."""
    g = _chain(32, 64)  # the intermediate: 32 x 64 x 64 = 128 KiB
    act, weights = 32 * 64 * 64, 32 * 32 + 2 * 32 * 4
    fits = _march(onchip_bytes=1 << 20)
    a0, b0 = estimate(g, fits, 1)["layers"]
    assert (a0["ddr_write_bytes"], b0["ddr_read_bytes"]) == (act, act + weights)
    rep = estimate(g, fits, 2)
    a2, b2 = rep["layers"]
    assert (a2["ddr_write_bytes"], b2["ddr_read_bytes"]) == (0, weights)
    assert rep["opt_effects"][0].startswith("O2: 1 intermediate tensor (128.0 KiB in all) kept")
    small = _march(onchip_bytes=96 * 1024)
    a3, b3 = estimate(g, small, 3)["layers"]
    assert (a3["ddr_write_bytes"], b3["ddr_read_bytes"]) == (act, act + weights)
    assert estimate(g, small, 3)["summary"]["ddr_bytes_per_frame"] == \
        estimate(g, fits, 1)["summary"]["ddr_bytes_per_frame"]


def test_cpu_costs_quantize_dequantize_and_fallback():
    """Quantize, dequantize and float ops on the CPU cost op_overhead + elements x ns; the
    placement may move a node to the CPU."""
    g = Graph("cpu")
    x = g.add_input("x", TensorType("f32", (1, 8, 10, 10)))
    (xq,) = g.add_node("quantize", [x], {"scale": [0.1]}, name="x.quantize").outputs
    (r,) = g.add_node("relu", [xq], {}, name="relu").outputs
    g.set_quant(r, xq.type.quant)
    (y,) = g.add_node("dequantize", [r], {}, name="y.dequantize").outputs
    (z,) = g.add_node("sigmoid", [y], {}, name="sig").outputs
    g.set_outputs([z])
    g.meta["cpu_nodes"] = ["sig"]
    rep = estimate(g, _march(), 3)
    by = {lay["name"]: lay for lay in rep["layers"]}
    assert [by[n]["unit"] for n in ("x.quantize", "relu", "y.dequantize", "sig")] == \
        ["cpu", "bpu", "cpu", "cpu"]
    assert by["x.quantize"]["latency_us"] == pytest.approx(10 + 800 * 1.0e-3)
    assert by["y.dequantize"]["latency_us"] == pytest.approx(10 + 800 * 2.0e-3)
    assert by["sig"]["latency_us"] == pytest.approx(10 + 800 * 4.0e-3)
    assert all(by[n]["bound"] == "cpu" for n in ("x.quantize", "y.dequantize", "sig"))
    s = rep["summary"]
    assert (s["bpu_ops"], s["cpu_ops"]) == (1, 3)
    assert s["cpu_ms"] == pytest.approx((10.8 + 11.6 + 13.2) / 1e3)
    assert s["latency_ms"] == pytest.approx(s["cpu_ms"] + s["bpu_ms"])
    assert any(e.startswith("CPU: 3 layers (2 quantize/dequantize") for e in rep["opt_effects"])
    moved = estimate(g, _march(), 3, placement={"relu": "cpu", "folded.away": "cpu"})
    assert moved["summary"]["cpu_ops"] == 4
    with pytest.raises(InputError, match="'gpu' is not one of bpu, cpu"):
        estimate(g, _march(), 3, placement={"relu": "gpu"})
    with pytest.raises(InputError, match="opt level 4"):
        estimate(g, _march(), 4)


# -- zoo models ------------------------------------------------------------------------------
@pytest.mark.parametrize("march,model,fps,latency_ms", PUBLISHED,
                         ids=[f"{p[0]}-{p[1]}" for p in PUBLISHED])
def test_calibration_point(march, model, fps, latency_ms):
    s = estimate(lowered(model, march, 3), march, 3, name=model)["summary"]
    assert abs(s["fps"] / fps - 1) <= TOLERANCE, f"{march} {model}: FPS {s['fps']} vs {fps}"
    if latency_ms is not None:
        assert abs(s["latency_ms"] / latency_ms - 1) <= TOLERANCE, \
            f"{march} {model}: latency {s['latency_ms']} ms vs {latency_ms} ms"
    assert 0 < s["mac_utilization"] < 0.5


def _lowering_march(march: str) -> str:
    """bayes, bayes-e and nash-e lower alike (int16, no fallbacks, no fusion limits): their
    estimates share one lowered graph."""
    return "bernoulli2" if march == "bernoulli2" else "bayes-e"


def _check_order(model: str, march: str) -> None:
    reports = [estimate(lowered(model, _lowering_march(march), opt), march, opt)["summary"]
               for opt in range(4)]
    lat = [r["latency_ms"] for r in reports]
    assert lat[0] > lat[1] >= lat[2] >= lat[3], (model, march, lat)
    ddr = [r["ddr_bytes_per_frame"] for r in reports]
    # O3 may read a few more constants (the fused residuals' multipliers), far less activations
    assert ddr[0] == ddr[1] > ddr[2] and ddr[1] > ddr[3], (model, march, ddr)


@pytest.mark.parametrize("march", ["bernoulli2", "bayes", "bayes-e", "nash-e"])
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_opt_levels_order(model, march):
    _check_order(model, march)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet50", "mobilenet_v1", "efficientnet_b0",
                                   "efficientnet_b2", "vargnet_v2", "mixvargenet"])
def test_opt_levels_order_zoo(model):
    for march in march_names():
        _check_order(model, march)


@pytest.mark.parametrize("march", ["bernoulli2", "bayes", "bayes-e", "nash-e"])
def test_depthwise_costs_more_per_mac(march):
    """MobileNets' depthwise convs waste lanes: a lower MAC utilization than ResNet-18's."""
    rn, v1, v2 = (estimate(lowered(m, _lowering_march(march), 3), march, 3)["summary"]
                  ["mac_utilization"] for m in ("resnet18", "mobilenet_v1", "mobilenet_v2"))
    assert v2 < v1 < rn, (march, rn, v1, v2)


def test_report_schema_and_determinism():
    g = lowered("mobilenet_v2", "bayes-e", 3)
    rep = estimate(g, "bayes-e", 3, name="mobilenet_v2")
    assert rep["schema"] == SCHEMA == "hbc.perf/1" and rep["model"] == "mobilenet_v2"
    assert set(rep) == {"schema", "model", "summary", "opt_effects", "assumptions", "layers"}
    assert set(rep["summary"]) == SUMMARY_KEYS
    assert all(set(lay) == LAYER_KEYS for lay in rep["layers"])
    assert [lay["name"] for lay in rep["layers"]] == [n.name for n in g.nodes]
    names = set()
    for lay in rep["layers"]:
        assert set(lay["inputs"]) <= names  # topological, producers only
        names.add(lay["name"])
        assert lay["unit"] in ("bpu", "cpu")
        assert lay["bound"] in ("compute", "ddr", "cpu", "overhead")
    assert rep["layers"][0]["inputs"] == []  # graph inputs are omitted
    s = rep["summary"]
    assert s["macs"] == sum(lay["macs"] for lay in rep["layers"])
    assert s["cpu_ops"] == 2 and s["bpu_ops"] == len(g.nodes) - 2
    text = json.dumps(rep, sort_keys=True)
    assert json.dumps(estimate(g, load_march("bayes-e"), 3, name="mobilenet_v2"),
                      sort_keys=True) == text
    assert json.loads(text) == rep
