"""Every zoo model through the whole integer flow, and the two integer implementations against
each other, bit for bit.

Per model: the float graph (``run(opt=3)``) is calibrated (method ``max``, two seeded random
samples of the model's input shape) and lowered (``lower-int``, march bayes); the lowered graph
then runs in the numpy interpreter (the registry's kernels, ``interpret(observe=...)``) and in
the torch int_infer model (``build_int_infer(graph).run(trace=True)``) on two random inputs
(the second at twice the calibrated range, so saturation is exercised). Every output and every
intermediate value must be equal (``assert_array_equal``); a failure names the first diverging
node in graph order, the element index and both values.

The deployment path too: each model compiled with ``hbc.compile`` (-O3, bayes) to an ``.hbm``
and run by the simulator (``hbc.runtime.Runtime``, which reads only the file) against the
int_infer model built from the program in the file, value by value.

Tolerance, and only there: values downstream of a CPU-fallback float op
(``graph.meta["cpu_nodes"]``) are float arithmetic, which docs/quantization.md does not promise
bit-identical (numpy and torch sum in different orders: a ``reduce_mean`` over ~1e9 differs in
its last bit). Those values, and everything computed from them, are compared with a tolerance
of one quantization step: their scale for floats, 1 for integers.

The CPU fallbacks of each model are pinned in ``CPU_FALLBACKS`` (op, reason) -> count: they are
the gaps of lowering on real models, and a change (a new fallback, or a gap closed) shows here.

Sizes: the default suite runs every model at a reduced input size that keeps the architecture
(``input_size=64`` for the classifiers; vargnet_v2 and mixvargenet have a fixed 7x7 average
pool and run at their standard 224; StereoNet and BEV IPM at the smallest inputs they accept),
about 16 s on an idle 2-core machine (45 s under a load of 3); ``slow`` runs the other models
at their standard size (2.5 min, StereoNet 2 of them). torch runs on one thread: on a busy
machine OpenMP threads thrash (5x the time).
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch

import hbc
from hbc import models
from hbc.ir.graph import Graph, Node, Value
from hbc.ir.interpret import interpret
from hbc.ir.types import FLOAT_DTYPES
from hbc.passes import PassContext, run
from hbc.passes.calibrate import calibrate
from hbc.quant import build_int_infer
from hbc.quant.int_infer import IntInferModule

CALIBRATION_SAMPLES = 2
#: test inputs: (seed, standard deviation); the calibration samples have deviation 1
TEST_INPUTS = ((101, 1.0), (102, 2.0))
SMALL = {"input_size": 64}

#: (case id, model, build config, slow)
CASES: list[tuple[str, str, dict[str, Any], bool]] = [
    ("resnet18", "resnet18", SMALL, False),
    ("resnet50", "resnet50", SMALL, False),
    ("mobilenet_v1", "mobilenet_v1", SMALL, False),
    ("mobilenet_v2", "mobilenet_v2", SMALL, False),
    ("efficientnet_b0", "efficientnet_b0", SMALL, False),
    ("efficientnet_b2", "efficientnet_b2", SMALL, False),
    ("vargnet_v2", "vargnet_v2", {}, False),
    ("mixvargenet", "mixvargenet", {}, False),
    ("multitask_resize", "multitask_resize", {"input_hw": (64, 128)}, False),
    # the deploy graph: box decoding (sigmoid tables, qmul, qadd) and the label argmax
    ("multitask_resize-deploy", "multitask_resize", {"input_hw": (64, 128), "mode": "deploy"},
     False),
    # the smallest StereoNet input: width / 16 must exceed maxdisp / 16 = 12 disparities
    ("stereonet", "stereonet", {"input_hw": (32, 208)}, False),
    ("bev_ipm", "bev_ipm", {"image_hw": (256, 256), "bev_hw": (32, 32)}, False),
    *[(f"{name}-full", name, {}, True) for name in (
        "resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2", "efficientnet_b0",
        "efficientnet_b2", "multitask_resize", "stereonet", "bev_ipm")],
]

_MEAN_NOT_GLOBAL = "reduce_mean over axes [2] is not a global average pool: runs on CPU"
_NO_FORM = "no integer form on bayes: runs on CPU"
#: model -> {(op, reason): count} of the nodes lowering leaves on the CPU (same at every size)
CPU_FALLBACKS: dict[str, dict[tuple[str, str], int]] = {
    # the group-wise correlation: mean over the 8 channels of each group of the 5-d product
    # (1, 32, 8, h, w), one per disparity; and the disparity expectation sum(prob * d) over D
    "stereonet": {("reduce_mean", _MEAN_NOT_GLOBAL): 12, ("reduce_sum", _NO_FORM): 1},
    # the sum of the six views' IPM-sampled features into one BEV map
    "bev_ipm": {("reduce_sum", _NO_FORM): 1},
}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One intra-op thread: on a busy machine OpenMP threads thrash (results do not depend on
    the thread count; only the time does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Lowered:
    """One zoo model through the flow: the lowered graph and the lowering's explanations."""

    def __init__(self, name: str, config: dict[str, Any], **options: Any) -> None:
        module, example = models.build(name, **config)
        floats = run(hbc.load((module, example)), opt=3)
        rng = np.random.default_rng(0)
        samples = [_random_inputs(floats, rng, 1.0) for _ in range(CALIBRATION_SAMPLES)]
        calibrated = calibrate(floats, samples, method="max")
        self.ctx = PassContext()
        self.graph = run(calibrated, passes=[("lower-int", {"march": "bayes", **options})],
                         context=self.ctx)
        self.name = name

    def check_bit_exact(self) -> None:
        """numpy and torch agree on the inputs of ``TEST_INPUTS``."""
        module = build_int_infer(self.graph)
        for seed, std in TEST_INPUTS:
            feeds = _random_inputs(self.graph, np.random.default_rng(seed), std)
            assert_bit_exact(self.graph, feeds, module)

    def fallbacks(self) -> Counter:
        """(op, reason) -> count over the nodes left on the CPU."""
        cpu = set(self.graph.meta["cpu_nodes"])
        ops = {n.name: n.op for n in self.graph.nodes}
        return Counter((ops[e.node], e.reason) for e in self.ctx.explanations
                       if e.pass_name == "lower-int" and e.node in cpu)


def _random_inputs(graph: Graph, rng: np.random.Generator, std: float
                   ) -> dict[str, np.ndarray]:
    """Normal random float inputs of deviation ``std``."""
    return {v.name: (std * rng.standard_normal(v.shape)).astype(v.type.np_dtype)
            for v in graph.inputs}


def _downstream_of_cpu(graph: Graph) -> set[str]:
    """Names of the values computed from a CPU-fallback node's results (those included)."""
    cpu = set(graph.meta["cpu_nodes"])
    tainted: set[str] = set()
    for node in graph.nodes:  # topological order
        if node.name in cpu or any(v is not None and v.name in tainted for v in node.inputs):
            tainted.update(v.name for v in node.outputs)
    return tainted


def _step(v: Value) -> float:
    """One quantization step of value ``v``: 1 for integers, the scale for floats (its own,
    else that of the integers it was dequantized from)."""
    if v.dtype not in FLOAT_DTYPES:
        return 1.0
    for t in (v.type, *(u.type for u in (v.producer.inputs if v.producer else ()) if u)):
        if t.quant is not None and t.quant.axis is None:
            return float(t.quant.scale[0])
    raise AssertionError(f"%{v.name}: no scale to bound a float difference with")


def _difference(want: np.ndarray, got: np.ndarray, tol: float | None) -> str | None:
    """None when ``got`` matches ``want`` (exactly, or within ``tol``), else where and how."""
    if got.dtype != want.dtype or got.shape != want.shape:
        return f"numpy {want.dtype}{list(want.shape)}, torch {got.dtype}{list(got.shape)}"
    if tol is None:
        bad = want != got
        if want.dtype.kind == "f":
            bad &= ~(np.isnan(want) & np.isnan(got))
    else:
        bad = ~(np.abs(want.astype(np.float64) - got.astype(np.float64)) <= tol)
    if not bad.any():
        return None
    idx = tuple(int(i) for i in np.argwhere(bad)[0])
    what = "differ" if tol is None else f"differ by more than {tol:.6g}"
    return (f"{int(bad.sum())} of {bad.size} elements {what}; first at {list(idx)}: "
            f"numpy {want[idx]!r}, torch {got[idx]!r}")


def assert_bit_exact(graph: Graph, feeds: dict[str, np.ndarray],
                     module: IntInferModule | None = None,
                     numpy_values: dict[str, np.ndarray] | None = None) -> None:
    """numpy vs torch int_infer (``module``, built when not given): every value, in graph
    order, then every output. The numpy side is the interpreter on ``graph``, or the values a
    simulator computed (``numpy_values``: every value by name, e.g. ``Runtime.run_values``)."""
    tainted = _downstream_of_cpu(graph)
    traced = (module or build_int_infer(graph)).run(feeds, trace=True)
    failures: list[str] = []

    def observe(node: Node, results: list[np.ndarray]) -> None:
        if failures:
            return
        for v, want in zip(node.outputs, results, strict=True):
            tol = _step(v) if v.name in tainted else None
            diff = _difference(want, traced[v.name], tol)
            if diff is not None:
                failures.append(f"first diverging node: {node.op} '{node.where()}', "
                                f"%{v.name}: {diff}")
                return

    if numpy_values is None:
        outputs = interpret(graph, feeds, observe=observe)
    else:
        for node in graph.nodes:
            observe(node, [numpy_values[v.name] for v in node.outputs])
        outputs = {v.name: numpy_values[v.name] for v in graph.outputs}
    assert not failures, failures[0]
    for v in graph.outputs:
        if v.name in tainted:
            np.testing.assert_allclose(traced[v.name], outputs[v.name], rtol=0,
                                       atol=_step(v), err_msg=f"output %{v.name}")
        else:
            np.testing.assert_array_equal(traced[v.name], outputs[v.name],
                                          err_msg=f"output %{v.name}")


@pytest.fixture(scope="module", params=[
    pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[3] else []) for c in CASES])
def lowered(request) -> Lowered:
    _, name, config, _ = request.param
    return Lowered(name, config)


def test_cpu_fallbacks(lowered):
    """The nodes left on the CPU, by op and reason, are the pinned ones; nothing else in the
    lowered graph computes in float (quantize/dequantize at the boundaries aside)."""
    got = lowered.fallbacks()
    assert dict(got) == CPU_FALLBACKS.get(lowered.name, {})
    assert sum(got.values()) == len(lowered.graph.meta["cpu_nodes"])
    cpu = set(lowered.graph.meta["cpu_nodes"])
    floats = [n.name for n in lowered.graph.nodes if n.op not in ("dequantize", "quantize")
              and n.name not in cpu and any(v.dtype in FLOAT_DTYPES for v in n.outputs)]
    assert floats == []


def test_numpy_and_torch_agree(lowered):
    lowered.check_bit_exact()


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c[0], marks=[pytest.mark.slow] if c[3] else []) for c in CASES])
def test_compiled_hbm_simulates_bit_exact(case, tmp_path):
    """The deployment path: ``hbc.compile`` at -O3 for bayes (march check, calibration,
    lowering, .hbm), then the simulator (``hbc.runtime.Runtime``, reading only the .hbm)
    against int_infer built from the program in the file, value by value."""
    from hbc.runtime import Runtime

    _, name, config, _ = case
    module, example = models.build(name, **config)
    graph = hbc.load((module, example))
    rng = np.random.default_rng(0)
    samples = [_random_inputs(graph, rng, 1.0) for _ in range(CALIBRATION_SAMPLES)]
    result = hbc.compile(graph, "bayes", 3, output=tmp_path / f"{name}.hbm",
                         calib_data=samples, calib_method="max")
    sim = Runtime(result.output, march="bayes")
    module = build_int_infer(sim.graph)
    for seed, std in TEST_INPUTS:
        feeds = _random_inputs(sim.graph, np.random.default_rng(seed), std)
        assert_bit_exact(sim.graph, feeds, module, numpy_values=sim.run_values(feeds))


@pytest.mark.parametrize("name, config, options", [
    ("mobilenet_v2", SMALL, {"int16": ["*"]}),
    # int16 lookup tables (65536 entries) for sigmoid and SiLU
    ("efficientnet_b0", SMALL, {"int16": ["*"]}),
    # int16 qadd and nearest resize; int32 (high-precision) head outputs
    ("multitask_resize", {"input_hw": (64, 128)}, {"int16": ["*"], "high_precision_output": True}),
    # int16 qgrid_sample and qresize
    pytest.param("bev_ipm", {"image_hw": (256, 256), "bev_hw": (32, 32)}, {"int16": ["*"]},
                 marks=pytest.mark.slow),
])
def test_int16_and_high_precision_output_agree(name, config, options):
    """The lowering options of bayes: every activation int16 (the option ``int16``), conv
    heads with int32 outputs. (Not StereoNet: int16 convolutions downstream of its CPU means
    amplify a one-step float rounding difference to a few steps, beyond the tolerance.)"""
    lowered = Lowered(name, config, **options)
    assert lowered.graph.meta["lowered"]["int16_values"]
    if options.get("high_precision_output"):
        assert any(v.dtype == "i32" for v in lowered.graph.outputs)
    assert sum(lowered.fallbacks().values()) == sum(CPU_FALLBACKS.get(name, {}).values())
    lowered.check_bit_exact()


def test_a_divergence_is_reported_at_its_node(monkeypatch):
    """The comparison itself: a torch kernel off by one in one element is reported at the first
    node it affects, with the element and both values."""
    from hbc.quant.torch_kernels import KERNELS

    lowered = Lowered("resnet18", {"input_size": 32})
    # a conv with a fused residual (inputs x, w, m, s, b, residual, mr, sr)
    first = next(n for n in lowered.graph.nodes if n.op == "qconv" and len(n.inputs) == 8)
    exact = KERNELS["qconv"]

    def off_by_one(ctx, args):
        results = exact(ctx, args)
        if ctx.name == first.where():
            results[0].view(-1)[3] += 1
        return results

    monkeypatch.setitem(KERNELS, "qconv", off_by_one)
    where = re.escape(f"qconv '{first.where()}', %{first.outputs[0].name}")
    with pytest.raises(AssertionError, match=rf"first diverging node: {where}: 1 of \d+ "
                       r"elements differ; first at \[0, 0, 0, 3\]: numpy np.int\d+\((-?\d+)\), "
                       r"torch np.int\d+\((-?\d+)\)"):
        lowered.check_bit_exact()
