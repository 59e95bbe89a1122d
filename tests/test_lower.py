"""Tests of the pass ``lower-int``: calibrated float graph -> integer graph.

Oracle: the float interpreter on the float graph. Lowered graphs run in the interpreter with the
numpy kernels of the integer ops; outputs must stay close to float (cosine similarity of the
logits), every conv must become a qconv, and no float op may remain except explained CPU
fallbacks. MobileNetV2 with seeded random weights is too sensitive for the 0.99 bar: its
per-channel int8 *weights alone* (float activations) give cosine ~0.977, so there the bar is
0.97, and every qconv is checked in isolation, which is what the lowering controls: its
integers against the float op run on its dequantized integer input, weights and bias, rounded
to the output scale: at most 1 LSB apart (a fused residual has its own rescale to the
accumulator's scale, so it costs the accumulator's multiplier no precision).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hbc
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.registry import get_op
from hbc.models import demo_cnn
from hbc.models.common import seeded_init
from hbc.models.mobilenet import mobilenet_v2
from hbc.models.resnet import resnet18
from hbc.passes import PassContext, PassError, run
from hbc.passes.calibrate import calibrate

from .passes_util import assert_golden


def _feeds(shape, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def _float_graph(module: nn.Module, shape) -> Graph:
    return run(hbc.load((module, (torch.zeros(shape),))), opt=3)


def _lower(graph: Graph, ctx: PassContext | None = None, **options) -> Graph:
    return run(graph, passes=[("lower-int", options)], context=ctx)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _float_ops(graph: Graph) -> list[str]:
    """Ops of ``graph`` that compute in float (the output dequantize aside)."""
    return [n.op for n in graph.nodes
            if n.op != "dequantize" and any(v.dtype == "f32" for v in n.outputs)]


@pytest.fixture(scope="module")
def demo():
    model, _ = demo_cnn.build()
    g = _float_graph(model, (1, 3, 32, 32))
    return g, calibrate(g, _feeds((1, 3, 32, 32), 8), method="max")


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def zoo(request):
    build = {"resnet18": resnet18, "mobilenet_v2": mobilenet_v2}[request.param]
    g = _float_graph(seeded_init(build(num_classes=10), 0), (1, 3, 64, 64))
    cal = calibrate(g, _feeds((1, 3, 64, 64), 4), method="max")
    return request.param, g, cal, _lower(cal)


# -- whole models -------------------------------------------------------------------------------
def _check_lowered(g: Graph, q: Graph) -> None:
    convs = {n.name for n in g.nodes if n.op in ("conv", "conv_fused")}
    assert convs and convs == {n.name for n in q.nodes if n.op == "qconv"}
    assert _float_ops(q) == [] and q.meta["cpu_nodes"] == []
    assert [v.dtype for v in q.outputs] == ["f32"]
    assert [v.name for v in q.outputs] == [v.name for v in g.outputs]


def test_demo_close_to_float(demo):
    g, cal = demo
    q = _lower(cal)
    _check_lowered(g, q)
    feed = _feeds((1, 3, 32, 32), 1, seed=7)[0]
    (a,), (b,) = interpret(g, feed).values(), interpret(q, feed).values()
    assert _cos(a, b) > 0.99, _cos(a, b)
    for n in g.nodes:  # names and locations of the float nodes are kept
        assert q.node(n.name).loc == n.loc


def test_zoo_close_to_float(zoo):
    name, g, _, q = zoo
    _check_lowered(g, q)
    feed = _feeds((1, 3, 64, 64), 1, seed=7)[0]
    (a,), (b,) = interpret(g, feed).values(), interpret(q, feed).values()
    assert _cos(a, b) > (0.99 if name == "resnet18" else 0.97), (name, _cos(a, b))


def test_zoo_each_qconv_matches_its_float_conv(zoo):
    """Each qconv against its float op on the same (dequantized) integers, weights and bias,
    rounded to the output scale: the rescale, bounds and residual of the lowering."""
    _, g, _, q = zoo
    env: dict[str, np.ndarray] = {}
    interpret(q, _feeds((1, 3, 64, 64), 1, seed=7)[0], observe=lambda n, r: env.update(
        {v.name: x for v, x in zip(n.outputs, r, strict=True)}))

    def real(v, data: np.ndarray) -> np.ndarray:
        s = np.asarray(v.type.quant.scale)
        if s.size > 1:  # per output channel (axis 0 of weights and bias)
            s = s.reshape((-1,) + (1,) * (data.ndim - 1))
        return (data * s).astype(np.float32)

    for qn in (n for n in q.nodes if n.op == "qconv"):
        fn = g.node(qn.name)
        x, w, b = qn.inputs[0], qn.inputs[1], qn.inputs[4]
        args = [real(x, env[x.name]), real(w, q.constants[w.name]), real(b, q.constants[b.name])]
        if len(qn.inputs) > 5:
            args.append(real(qn.inputs[5], env[qn.inputs[5].name]))
        ref = get_op(fn.op).reference(args, fn.attrs)[0]
        ref = np.clip(np.rint(ref / qn.outputs[0].type.quant.scale[0]), -128, 127)
        err = np.abs(ref - env[qn.outputs[0].name])
        assert err.max() <= 1 and err.mean() < 0.05, (qn.name, err.max(), err.mean())


# -- every rule on one small model -----------------------------------------------------------
class Mixed(nn.Module):
    """SiLU, avg pool, bilinear and nearest resize, concat of two scales, hard_swish, a gate
    (mul by sigmoid), tanh, add, sub, max pool, leaky relu, grid_sample on a constant grid,
    spatial mean, linear and softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1), nn.BatchNorm2d(8), nn.SiLU())
        self.ca = nn.Conv2d(8, 8, 3, 1, 1)
        self.cb = nn.Sequential(nn.Conv2d(8, 8, 1), nn.Hardswish())
        self.cg = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 10)
        gen = torch.Generator().manual_seed(1)
        self.register_buffer("grid", torch.rand(1, 8, 8, 2, generator=gen) * 2.2 - 1.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c1(x)
        a = F.interpolate(self.ca(F.avg_pool2d(x, 2)), scale_factor=2, mode="bilinear")
        y = torch.cat([a, self.cb(x)], 1)
        y = y * torch.sigmoid(self.cg(y))
        y = F.max_pool2d(y + torch.tanh(y), 2)
        y = F.leaky_relu(y, 0.1) - F.interpolate(y, scale_factor=1.0, mode="nearest") * 0.5
        y = F.grid_sample(y, self.grid, align_corners=False).mean((2, 3))
        return torch.softmax(self.fc(y), -1)


def test_every_rule_on_a_mixed_model():
    g = _float_graph(seeded_init(Mixed(), 0), (1, 3, 16, 16))
    q = _lower(calibrate(g, _feeds((1, 3, 16, 16), 8), method="max"))
    ops = {n.op for n in q.nodes}
    assert {"qconv", "lut", "qavg_pool", "qresize", "requantize", "concat", "qmul", "qadd",
            "max_pool", "resize", "qgrid_sample", "qglobal_avg_pool", "qlinear",
            "qsoftmax"} <= ops
    assert _float_ops(q) == [] and q.meta["cpu_nodes"] == []
    assert "sigmoid" not in ops and q.node("c1.2").op == "lut"  # SiLU is one table
    assert q.node("sub").attrs["mb"] < 0
    for n in q.nodes:
        if n.op == "lut":
            t = q.constants[n.inputs[1].name]
            assert t.shape == (256,) and t.dtype == np.int8
    feed = _feeds((1, 3, 16, 16), 1, seed=7)[0]
    (a,), (b,) = interpret(g, feed).values(), interpret(q, feed).values()
    assert _cos(a, b) > 0.99


# -- CPU fallback -------------------------------------------------------------------------------
class WithPrelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 4, 3, 1, 1), nn.PReLU(4), nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.avg_pool2d(self.c2(self.act(self.c1(x))), 3, 1, 1, count_include_pad=False)
        return y


def test_op_without_integer_form_runs_on_cpu():
    assert get_op("prelu").integer is None
    g = _float_graph(seeded_init(WithPrelu(), 0), (1, 3, 8, 8))
    ctx = PassContext()
    q = _lower(calibrate(g, _feeds((1, 3, 8, 8), 4), method="max"), ctx)
    prelu, pool = (n.name for n in g.nodes if n.op in ("prelu", "avg_pool"))
    assert q.meta["cpu_nodes"] == [prelu, pool]
    node = q.node(prelu)
    assert node.inputs[0].producer.op == "dequantize"
    assert [u.op for u, _ in node.outputs[0].uses] == ["quantize"]
    reasons = {e.node: e.reason for e in ctx.explanations}
    assert reasons[prelu] == "no integer form on bayes: runs on CPU"
    assert "count_include_pad=0" in reasons[pool]
    feed = _feeds((1, 3, 8, 8), 1, seed=7)[0]
    (a,), (b,) = interpret(g, feed).values(), interpret(q, feed).values()
    assert _cos(a, b) > 0.99


# -- options --------------------------------------------------------------------------------------
class ConvHead(nn.Module):
    def __init__(self, act: bool) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 8, 3, 1, 1), nn.Conv2d(8, 5, 1)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c2(torch.relu(self.c1(x)))
        return torch.relu(y) if self.act else y


@pytest.mark.parametrize("act", [False, True])
def test_high_precision_output(act: bool):
    g = _float_graph(seeded_init(ConvHead(act), 0), (1, 3, 8, 8))
    ctx = PassContext()
    q = _lower(calibrate(g, _feeds((1, 3, 8, 8), 4), method="max"), ctx,
               high_precision_output=True)
    (out,) = q.outputs
    feed = _feeds((1, 3, 8, 8), 1, seed=7)[0]
    (a,), (b,) = interpret(g, feed).values(), interpret(q, feed).values()
    if act:  # a fused activation needs the rescale: int8, dequantized
        assert out.dtype == "f32" and any("no int32 output" in e.reason
                                          for e in ctx.explanations)
    else:
        assert out.dtype == "i32" and out.producer.op == "qconv"
        assert out.name == g.outputs[0].name
        assert out.type.quant.axis == 1 and len(out.type.quant.scale) == 5
        b = b * np.asarray(out.type.quant.scale).reshape(1, -1, 1, 1)
    assert _cos(a, b) > 0.999


def test_high_precision_linear_output(demo):
    _, cal = demo
    q = _lower(cal, high_precision_output=True)
    (out,) = q.outputs
    assert (out.dtype, out.producer.op, out.type.quant.axis) == ("i32", "qlinear", 1)


def test_int16_values_on_bayes(demo):
    g, cal = demo
    q = _lower(cal, int16="layer1.*")
    i16 = {n.outputs[0].name for n in q.nodes
           if n.outputs[0].dtype == "i16" and cal.has_value(n.outputs[0].name)}
    assert i16 == {"layer1.relu", "layer1.relu_1"}
    assert q.meta["lowered"]["int16_values"] == sorted(i16)
    feed = _feeds((1, 3, 32, 32), 1, seed=7)[0]
    (a,), (b,) = interpret(g, feed).values(), interpret(q, feed).values()
    assert _cos(a, b) > 0.99


def test_cpu_nodes_option_forces_a_float_fallback(demo):
    g, cal = demo
    conv = [n.name for n in cal.nodes if n.op in ("conv", "conv_fused")][-1]
    ctx = PassContext()
    q = _lower(cal, ctx, cpu_nodes=[conv])
    assert q.meta["cpu_nodes"] == [conv]
    assert q.node(conv).op == cal.node(conv).op
    assert q.node(conv).inputs[0].producer.op == "dequantize"
    reasons = {e.node: e.reason for e in ctx.explanations}
    assert reasons[conv] == "placed on the CPU for bayes (see hbc check)"
    feed = _feeds((1, 3, 32, 32), 1, seed=3)[0]
    ref, out = interpret(g, feed), interpret(q, feed)
    assert all(_cos(ref[k], out[k]) > 0.99 for k in ref)


def test_int16_on_bernoulli2_is_an_error(demo):
    _, cal = demo
    with pytest.raises(PassError, match="int16 .* bernoulli2"):
        _lower(cal, march="bernoulli2", int16="layer1.*")
    marked = cal.copy()
    marked.meta["int16_values"] = ["layer1.relu"]
    with pytest.raises(PassError, match="bernoulli2"):
        run(marked, passes=["lower-int"], march="bernoulli2")


def test_missing_calibration_names_the_node(demo):
    g, cal = demo
    with pytest.raises(PassError, match=r"conv_fused node 'stem\.0'.*%x.*calibrate"):
        _lower(g)
    partial = cal.copy()
    partial.set_quant(partial.value("layer1.relu"), None)
    with pytest.raises(PassError, match=r"layer1\.conv1.*output %layer1\.relu"):
        _lower(partial)


# -- golden text ----------------------------------------------------------------------------------
SMALL = """hbir 1
graph @small(%x: f32[1,2,4,4] q(scale=0.03125)) {
  %w: f32[3,2,1,1] = const [0.5, -0.25, 0.125, 1.0, -1.0, 0.0]
  %b: f32[3] = const [0.1, -0.2, 0.05]
  %y: f32[1,3,4,4] q(scale=0.046875) = conv_fused(%x, %w, %b) {strides=[1, 1], \
pads=[0, 0, 0, 0], dilations=[1, 1], activation="relu6"} loc("conv1")
  %s: f32[1,3,4,4] q(scale=0.0078125) = sigmoid(%y) loc("act")
  %z: f32[1,3,4,4] q(scale=0.05) = add(%y, %s) loc("sum")
  %p: f32[1,3,2,2] q(scale=0.05) = max_pool(%z) {kernel=[2, 2], strides=[2, 2], \
pads=[0, 0, 0, 0], dilations=[1, 1]}
  return %p
}
"""


def test_golden_small():
    q = _lower(from_text(SMALL))
    assert_golden("lower_int_small", q)
    assert q.constants["w"].tolist() == [[[[127]], [[-64]]], [[[16]], [[127]]],
                                         [[[-127]], [[0]]]]


def test_lowering_a_lowered_graph_changes_nothing():
    q = _lower(from_text(SMALL))
    again = _lower(q)  # constants come in the order of first use: compare the statements
    assert sorted(to_text(again).splitlines()) == sorted(to_text(q).splitlines())
    assert again.meta["cpu_nodes"] == []


# -- residuals ---------------------------------------------------------------------------------
RESIDUAL = """hbir 1
graph @res(%x: f32[1,2,4,4] q(scale=0.01), %r: f32[1,3,4,4] q(scale=0.05)) {
  %w: f32[3,2,1,1] = const [0.5, -0.005, 0.5, 1.0, -1.0, 0.25]
  %w2: f32[3,CIN,1,1] = const W2
  %b: f32[3] = const [0.001, -0.002, 0.05]
  %y: f32[1,3,4,4] q(scale=0.06) = conv_fused(%x, %w, %b, %r) {strides=[1, 1], \
pads=[0, 0, 0, 0], dilations=[1, 1], activation="relu"}
  %z: f32[1,3,4,4] q(scale=0.07) = conv_fused(%IN, %w2, %b, %y) {strides=[1, 1], \
pads=[0, 0, 0, 0], dilations=[1, 1]}
  return %z
}
"""
#: %z over %r (s_x = 0.05) or over %x (s_x = 0.01); channel 0 of w2 has s_w = 0.0127 / 127
RESIDUAL_FUSED = RESIDUAL.replace("%IN", "%r").replace("CIN", "3").replace(
    "W2", "[0.0127, -0.005, 0.01, 0.5, 1.0, -1.0, 0.25, 0.125, 0.5]")
RESIDUAL_UNFUSED = RESIDUAL.replace("%IN", "%x").replace("CIN", "2").replace(
    "W2", "[0.0127, -0.005, 0.5, 1.0, -1.0, 0.25]")


def _residual_feeds(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(5)
    return [{"x": (rng.standard_normal((1, 2, 4, 4)) * 0.4).astype(np.float32),
             "r": (rng.standard_normal((1, 3, 4, 4)) * 0.8).astype(np.float32)} for _ in range(n)]


@pytest.mark.parametrize("march", ["bayes", "bernoulli2"])
def test_residual_is_rescaled_to_the_accumulator(march: str):
    """%y's residual fuses with its own (mr, sr) = choose(s_r / (s_x * s_w[c])), no requantize
    in front; so does %z's, whose channel 0 (s_w = 1e-4) has the ratio 0.06 / (0.05 * 1e-4) =
    12000. The graph runs bit-exact in int_infer, and close to float."""
    from hbc.ir.fixed_point import choose
    from hbc.quant import build_int_infer

    g = from_text(RESIDUAL_FUSED)
    ctx = PassContext()
    q = _lower(g, ctx, march=march)
    assert ctx.explanations == [] and len(q.node("z").inputs) == 8
    y = q.node("y")
    assert y.op == "qconv" and len(y.inputs) == 8
    sxw = np.asarray(y.inputs[4].type.quant.scale)
    mr, sr = (q.constants[v.name] for v in y.inputs[6:8])
    assert [(int(a), int(b)) for a, b in zip(mr, sr, strict=True)] == \
        [choose(0.05 / v, "test") for v in sxw]
    assert y.inputs[5].producer.op == "quantize"  # the int8 residual itself, not widened
    assert not any(n.op == "requantize" for n in q.nodes if n.outputs[0].uses
                   and n.outputs[0].uses[0][0] is y)
    for feed in _residual_feeds(4):
        out = interpret(q, feed)
        np.testing.assert_array_equal(build_int_infer(q).run(feed)["z"], out["z"])
        assert np.abs(out["z"] - interpret(g, feed)["z"]).max() < 2 * 0.07


@pytest.mark.parametrize("march", ["bayes", "bernoulli2"])
def test_residual_beyond_the_multiplier_is_not_fused(march: str):
    """A residual whose scale is more than 32767 times the accumulator's (channel 0 of %z:
    0.06 / (0.01 * 1e-4) = 60000 with %x as input) is not fused: qconv to an intermediate of
    range A_y + A_r (int16 where the march has it, the int8 residual widened to match), then
    qadd with the activation's bounds; explained; bit-exact in int_infer, close to float."""
    from hbc.quant import build_int_infer

    g = from_text(RESIDUAL_UNFUSED)
    ctx = PassContext()
    q = _lower(g, ctx, march=march)
    conv, add = q.node("z.conv"), q.node("z")  # the float node's name on its output's op
    assert conv.op == "qconv" and len(conv.inputs) == 5 and add.op == "qadd"
    z_dtype = "i8" if march == "bernoulli2" else "i16"
    mid = conv.outputs[0]
    assert mid.dtype == z_dtype and add.inputs[0] is mid
    assert mid.type.quant.scale[0] == pytest.approx((0.07 * 128 + 0.06 * 128) /
                                                    (127 if z_dtype == "i8" else 32767))
    assert add.inputs[1].dtype == z_dtype  # the residual widened for an int16 intermediate
    assert add.outputs[0].name == "z.q" and add.attrs["lo"] is None
    assert "not fused" in {e.node: e.reason for e in ctx.explanations}["z"]
    assert q.meta["cpu_nodes"] == []
    for feed in _residual_feeds(4):
        out = interpret(q, feed)
        np.testing.assert_array_equal(build_int_infer(q).run(feed)["z"], out["z"])
        assert np.abs(out["z"] - interpret(g, feed)["z"]).max() < 2.5 * 0.07


def test_golden_residual():
    """%y's residual fused (mr, sr), %z's not (qconv to an int16 intermediate, then qadd)."""
    assert_golden("lower_int_residual", _lower(from_text(RESIDUAL_UNFUSED)))


def test_residual_rescale_checks_the_int32_bound():
    """int8 inputs accumulate in int32: 128 * ||w[c]||_1 + |b[c]| plus the residual term must
    stay below 2^31, else the residual is not fused; int16 inputs accumulate in int64."""
    from hbc.ir.fixed_point import choose
    from hbc.passes.lower_rules import residual_rescale

    node = from_text(SMALL).nodes[0]
    wq = np.full((2, 100_000, 1, 1), 127, np.int8)  # |acc| <= 128 * 127 * 1e5 = 1.6256e9
    sxw = np.array([1e-6, 1e-6])
    mr, sr = residual_rescale(node, "i8", wq, None, sxw, "i8", 0.03)
    assert (int(mr[0]), int(sr[0])) == choose(0.03 / 1e-6, "test") == (30000, 0)
    # an int8 residual at ratio 30000 adds up to 128 * 30000, an int16 one 32768 * 30000
    reason = residual_rescale(node, "i8", wq, None, sxw, "i16", 0.03)
    assert isinstance(reason, str) and "beyond int32" in reason
    assert not isinstance(residual_rescale(node, "i16", wq, None, sxw, "i16", 0.03), str)
    reason = residual_rescale(node, "i8", wq[:, :1], None, sxw, "i8", 0.0328)
    assert isinstance(reason, str) and "32800 times" in reason


# -- concat at its recorded scale ----------------------------------------------------------------
CONCAT = """hbir 1
graph @cat(%x: f32[1,2,4,4] q(scale=0.03125)) {
  %w1: f32[2,2,1,1] = const [0.5, -0.25, 0.125, 1.0]
  %w2: f32[2,2,1,1] = const [-1.0, 0.75, 0.25, -0.5]
  %a: f32[1,2,4,4] q(scale=0.05) = conv_fused(%x, %w1) {strides=[1, 1], pads=[0, 0, 0, 0], \
dilations=[1, 1]}
  %b: f32[1,2,4,4] q(scale=0.05) = conv_fused(%x, %w2) {strides=[1, 1], pads=[0, 0, 0, 0], \
dilations=[1, 1]}
  %y: f32[1,4,4,4] q(scale=S_Y) = concat(%a, %b) {axis=1}
  return %y
}
"""


@pytest.mark.parametrize("s_y", [0.05, 0.1, 0.0375])
def test_concat_of_one_scale_requantizes_to_the_recorded_output_scale(s_y: float):
    """Inputs sharing one scale pass through only when it is the output's recorded scale (a QAT
    model learns its own scale there); otherwise each is requantized to it (the rescale rule
    on the conv's integers), and int_infer agrees bit for bit."""
    from hbc.ir.fixed_point import choose
    from hbc.quant import build_int_infer

    g = from_text(CONCAT.replace("S_Y", repr(s_y)))
    q = _lower(g)
    (cat,) = (n for n in q.nodes if n.op == "concat")
    assert cat.outputs[0].type.quant.scale == (s_y,)
    convs = [n for n in q.nodes if n.op == "qconv"]
    assert len(convs) == 2
    if s_y == 0.05:  # the pass-through stays
        assert [v.producer for v in cat.inputs] == convs
        assert not any(n.op == "requantize" for n in q.nodes)
    else:
        m, s = choose(0.05 / s_y, "test")
        rq = [v.producer for v in cat.inputs]
        assert [(p.op, p.attrs["m"], p.attrs["s"]) for p in rq] == [("requantize", m, s)] * 2
        assert [p.inputs[0].producer for p in rq] == convs
    feed = _feeds((1, 2, 4, 4), 1, seed=3)[0]
    seen: dict[str, np.ndarray] = {}
    out = interpret(q, feed, observe=lambda n, r: seen.update({n.name: r[0]}))
    acc = np.concatenate([seen[c.name] for c in convs], axis=1).astype(np.int64)
    if s_y != 0.05:
        acc = np.clip((acc * m + (1 << (s - 1))) >> s, -128, 127)
    np.testing.assert_array_equal(seen[cat.name], acc)
    ref = interpret(g, feed)["y"]
    assert np.abs(out["y"] - ref).max() <= s_y / 2 + 0.05 / 2 + 1e-6  # output + input LSB/2
    np.testing.assert_array_equal(build_int_infer(q).run(feed)["y"], out["y"])
