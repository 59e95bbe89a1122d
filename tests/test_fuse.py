"""fuse: every rule firing and not firing (golden text), the explanations, the march limit,
linear from gemm and from matmul + add, stable output names, the fused ops themselves, and
ResNet-18 / MobileNetV2 imported from torch (numerics before vs after)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hbc
import hbc.passes.registry  # noqa: F401  (registers every pass, so PASSES is complete)
from hbc.calops import calops
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph
from hbc.ir.registry import InferError, get_op
from hbc.ir.types import TensorType
from hbc.models.common import seeded_init
from hbc.passes import PASSES, PassContext
from hbc.passes import run as run_passes

from .passes_util import assert_golden, assert_same_numerics

F32 = "f32"
CONV = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]}


def fuse(g: Graph, spec: str = "fuse", march: str | None = None) -> tuple[Graph, list[str]]:
    """Run ``spec`` (verifying after each pass); the result and the explanation texts."""
    ctx = PassContext()
    out = run_passes(g, passes=spec, context=ctx, march=march)
    return out, [str(e) for e in ctx.explanations]


def ops_of(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def _w(g: Graph, name: str, *shape: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return g.add_constant(name, (rng.standard_normal(shape) * 0.5).astype(np.float32))


# -- golden text: every rule fires ---------------------------------------------------------------
FIRES = """hbir 1
graph @fires(%x: f32[1,2,4,4], %r: f32[1,2,4,4], %m: f32[2,2], %v: f32[2,3,2]) {
  %w: f32[2,2,1,1] = const [1.0, -2.0, 0.5, 0.25]
  %b: f32[2] = const [0.5, -0.5]
  %B: f32[2,3] = const [1.0, 2.0, -1.0, 0.5, -0.5, 3.0]
  %cc: f32[1,3] = const [0.25, -1.0, 2.0]
  %W2: f32[2,2] = const [1.0, -1.0, 2.0, 0.5]
  %bias: f32[2] = const [-0.5, 1.5]
  %c1: f32[1,2,4,4] = conv(%x, %w, %b) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %a1: f32[1,2,4,4] = relu(%c1)
  %c2: f32[1,2,4,4] = conv(%a1, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %a2: f32[1,2,4,4] = clip(%c2) {min=0.0, max=6.0}
  %c3: f32[1,2,4,4] = conv(%a2, %w, %b) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %s3: f32[1,2,4,4] = add(%r, %c3)
  %a3: f32[1,2,4,4] = relu(%s3)
  %c4: f32[1,2,4,4] = conv(%a3, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %y: f32[1,2,4,4] = clip(%c4) {min=-1.0, max=1.0}
  %g: f32[2,3] = gemm(%m, %B, %cc) {alpha=0.5, beta=2.0}
  %h: f32[2,3] = relu(%g)
  %mm: f32[2,3,2] = matmul(%v, %W2)
  %o: f32[2,3,2] = add(%bias, %mm)
  %o2: f32[2,3,2] = clip(%o) {min=0.0}
  return %y, %h, %o2
}
"""


def test_golden_fires():
    g = from_text(FIRES)
    ctx = PassContext()
    out = run_passes(g, passes=["fuse"], context=ctx)
    assert ctx.explanations == []
    assert ctx.results["fuse"] == {"conv-act": 4, "conv-add": 1, "gemm-linear": 1,
                                   "linear-act": 2, "linear-bias": 1}
    assert ops_of(out) == ["conv_fused"] * 4 + ["linear"] * 2
    acts = [n.attrs["activation"] for n in out.nodes]
    assert acts == ["relu", "relu6", "relu", "clip", "relu", "relu"]
    assert [v.name for v in out.outputs] == ["y", "h", "o2"]
    assert_same_numerics(g, out)
    assert_golden("fuse_fires", out)
    assert to_text(from_text(to_text(out))) == to_text(out)


# -- golden text: no rule may fire ---------------------------------------------------------------
KEEPS = """hbir 1
graph @keeps(%x: f32[1,2,4,4], %m: f32[2,2], %k: f32[2,2]) {
  %w: f32[2,2,1,1] = const [1.0, -2.0, 0.5, 0.25]
  %shift: f32[1,2,1,1] = const [0.5, -0.5]
  %bias: f32[2] = const [-0.5, 1.5]
  %bias2: f32[2,2] = const [1.0, 2.0, 3.0, 4.0]
  %W: f32[2,2] = const [1.0, -1.0, 2.0, 0.5]
  %c1: f32[1,2,4,4] = conv(%x, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %r1: f32[1,2,4,4] = relu(%c1)
  %s1: f32[1,2,4,4] = sigmoid(%c1)
  %c2: f32[1,2,4,4] = conv(%r1, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %r2: f32[1,2,4,4] = relu(%c2)
  %c3: f32[1,2,4,4] = conv(%r2, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %a3: f32[1,2,4,4] = add(%c3, %shift)
  %cf: f32[1,2,4,4] = conv_fused(%a3, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], activation="relu"}
  %a4: f32[1,2,4,4] = add(%cf, %s1)
  %g: f32[2,2] = gemm(%m, %k) {trans_a=1}
  %mm: f32[2,2] = matmul(%g, %k)
  %o: f32[2,2] = add(%mm, %bias)
  %mm2: f32[2,2] = matmul(%o, %W)
  %o2: f32[2,2] = add(%mm2, %bias2)
  return %c2, %a4, %o2
}
"""  # noqa: E501

KEEPS_WHY = [
    "[fuse] r1: conv-act: conv output %c1 is also used by node 's1'",
    "[fuse] s1: conv-act: activation sigmoid is not fusible into conv 'c1' (fusible: relu, "
    "relu6, clip)",
    "[fuse] r2: conv-act: conv output %c2 is a graph output",
    "[fuse] a3: conv-add: the add broadcasts: residual %shift [1, 2, 1, 1], conv output %c3 "
    "[1, 2, 4, 4]; a residual must have the conv output's shape",
    "[fuse] a4: conv-add: conv_fused 'cf' applies relu before the add; only act(conv + "
    "residual) fuses",
    "[fuse] g: gemm-linear: gemm with trans_a=1 is not a linear layer x @ w^T (x would be "
    "transposed)",
    "[fuse] o: linear-bias: matmul weight %k [2, 2] is not a constant matrix, so it cannot "
    "become linear's weight",
    "[fuse] o2: linear-bias: add operand %bias2 f32[2, 2] is not a 1-D bias over the last axis "
    "(f32[2])",
]


def test_golden_keeps():
    g = from_text(KEEPS)
    out, why = fuse(g)
    assert to_text(out) == to_text(g)
    assert why == KEEPS_WHY
    assert_golden("fuse_keeps", out)


# -- explanations --------------------------------------------------------------------------------
def _conv_add(stride: int, residual_shape: tuple[int, ...] | None = None) -> Graph:
    """conv (stride ``stride``) + add of a residual input + relu."""
    g = Graph("conv_add")
    x = g.add_input("x", TensorType(F32, (1, 4, 12, 12)))
    c = g.add_node("conv", [x, _w(g, "w", 4, 4, 3, 3)],
                   {**CONV, "strides": [stride, stride]}, name="conv").outputs[0]
    r = g.add_input("res", TensorType(F32, residual_shape or c.shape))
    s = g.add_node("add", [c, r], name="add").outputs[0]
    g.set_outputs([g.add_node("relu", [s], name="relu", output_names=["out"]).outputs[0]])
    return g


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_march_limits_residual_stride(stride: int):
    g = _conv_add(stride)
    out, why = fuse(g)  # no march: no limit
    assert ops_of(out) == ["conv_fused"] and why == []
    out, why = fuse(g, march="bernoulli2")
    assert_same_numerics(g, out)
    if stride in (1, 2):
        assert ops_of(out) == ["conv_fused"] and why == []
        return
    assert ops_of(out) == ["conv", "add", "relu"]
    assert why == ["[fuse] add: conv-add: bernoulli2 fuses residual adds only for stride 1 or 2 "
                   "(conv 'conv' has strides [3, 3])"]


def test_explanations_appear_once_and_other_operand_fuses():
    """add(a, b) with both operands convs: a is also used elsewhere, so b fuses with a as its
    residual; the relu after conv a stays, explained once although the driver sweeps twice."""
    g = Graph("two_convs")
    x = g.add_input("x", TensorType(F32, (1, 4, 6, 6)))
    a = g.add_node("conv", [x, _w(g, "wa", 4, 4, 3, 3)], CONV, name="ca").outputs[0]
    b = g.add_node("conv", [x, _w(g, "wb", 4, 4, 3, 3, seed=1)], CONV, name="cb").outputs[0]
    s = g.add_node("add", [a, b], name="add").outputs[0]
    side = g.add_node("relu", [a], name="side").outputs[0]
    out = g.add_node("relu", [s], name="relu").outputs[0]
    g.set_outputs([out, side])
    fused, why = fuse(g)
    assert ops_of(fused) == ["conv", "relu", "conv_fused"]  # the fused node takes the root's place
    cf = fused.nodes[2]
    assert cf.name == "cb" and cf.inputs[3].name == "ca" and cf.attrs["activation"] == "relu"
    assert why == ["[fuse] side: conv-act: conv output %ca is also used by node 'cb'"]
    assert_same_numerics(g, fused)


def test_activation_after_activation_is_explained():
    g = Graph("double")
    x = g.add_input("x", TensorType(F32, (1, 4, 6, 6)))
    c = g.add_node("conv", [x, _w(g, "w", 4, 4, 3, 3)], CONV, name="conv").outputs[0]
    r = g.add_node("relu", [c], name="r1").outputs[0]
    g.set_outputs([g.add_node("clip", [r], {"min": 0.0, "max": 6.0}, name="r2").outputs[0]])
    out, why = fuse(g)
    assert ops_of(out) == ["conv_fused", "clip"]
    assert why == ["[fuse] r2: conv-act: conv_fused 'conv' already applies activation relu"]


def test_residual_of_its_own_output_is_not_fused():
    g = Graph("self_add")
    x = g.add_input("x", TensorType(F32, (1, 4, 6, 6)))
    c = g.add_node("conv", [x, _w(g, "w", 4, 4, 3, 3)], CONV, name="conv").outputs[0]
    g.set_outputs([g.add_node("add", [c, c], name="double").outputs[0]])
    out, why = fuse(g)
    assert ops_of(out) == ["conv", "add"]
    assert why == ["[fuse] double: conv-add: the add adds conv output %conv to itself"]


# -- linear --------------------------------------------------------------------------------------
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (0.5, 2.0), (1.0, 0.0)])
@pytest.mark.parametrize("c_shape", [None, (4,), (1, 4), (1,), ()])
def test_linear_from_gemm(trans_b, alpha, beta, c_shape):
    g = Graph("gemm")
    a = g.add_input("a", TensorType(F32, (3, 5)))
    w = _w(g, "fc.weight", *((4, 5) if trans_b else (5, 4)))
    c = None if c_shape is None else _w(g, "fc.bias", *c_shape, seed=1)
    y = g.add_node("gemm", [a, w, c], {"alpha": alpha, "beta": beta, "trans_b": trans_b},
                   name="fc", output_names=["logits"]).outputs[0]
    g.set_outputs([y])
    out, why = fuse(g)
    assert why == [] and ops_of(out) == ["linear"]
    lin = out.nodes[0]
    assert lin.name == "fc" and out.outputs[0].name == "logits"
    assert lin.inputs[1].name == "fc.weight" and lin.inputs[1].shape == (4, 5)
    has_bias = c_shape is not None and beta != 0.0
    assert (len(lin.inputs) > 2 and lin.inputs[2] is not None) == has_bias
    if has_bias:
        assert lin.inputs[2].name == "fc.bias" and lin.inputs[2].shape == (4,)
    # constants the gemm alone used are replaced, not left behind
    assert sorted(out.constants) == sorted(["fc.weight"] + ["fc.bias"] * has_bias)
    assert_same_numerics(g, out)


def test_gemm_with_row_varying_bias_is_not_linear():
    g = Graph("gemm")
    a = g.add_input("a", TensorType(F32, (3, 5)))
    y = g.add_node("gemm", [a, _w(g, "w", 4, 5), _w(g, "c", 3, 4)], {"trans_b": 1},
                   name="fc").outputs[0]
    g.set_outputs([y])
    out, why = fuse(g)
    assert ops_of(out) == ["gemm"]
    assert why == ["[fuse] fc: gemm-linear: gemm bias %c [3, 4] varies over rows; linear takes "
                   "one bias per output feature [4]"]


@pytest.mark.parametrize("bias_first", [False, True])
def test_linear_from_matmul_add(bias_first: bool):
    g = Graph("mm")
    x = g.add_input("x", TensorType(F32, (2, 3, 5)))
    mm = g.add_node("matmul", [x, _w(g, "W", 5, 4)], name="proj").outputs[0]
    b = _w(g, "b", 4, seed=1)
    s = g.add_node("add", [b, mm] if bias_first else [mm, b], name="add").outputs[0]
    y = g.add_node("relu", [s], name="act", output_names=["y"]).outputs[0]
    g.set_outputs([y])
    out, why = fuse(g)
    assert why == [] and ops_of(out) == ["linear"]
    lin = out.nodes[0]
    assert lin.name == "proj" and lin.attrs["activation"] == "relu" and out.outputs[0].name == "y"
    assert lin.inputs[1].name == "W" and lin.inputs[1].shape == (4, 5)
    assert_same_numerics(g, out)


def test_bias_added_after_linear_with_bias_sums():
    g = Graph("two_bias")
    a = g.add_input("a", TensorType(F32, (3, 5)))
    y = g.add_node("gemm", [a, _w(g, "w", 4, 5), _w(g, "c", 4, seed=1)], {"trans_b": 1},
                   name="fc").outputs[0]
    z = g.add_node("add", [y, _w(g, "d", 4, seed=2)], name="add").outputs[0]
    g.set_outputs([z])
    out, why = fuse(g)
    assert why == [] and ops_of(out) == ["linear"] and sorted(out.constants) == ["c", "w"]
    assert_same_numerics(g, out)


def test_integer_matmul_is_not_linear():
    g = Graph("int")
    x = g.add_input("x", TensorType("i64", (2, 3)))
    w = g.add_constant("w", np.arange(12, dtype=np.int64).reshape(3, 4))
    mm = g.add_node("matmul", [x, w], name="mm").outputs[0]
    g.set_outputs([g.add_node("add", [mm, g.add_constant("b", np.arange(4))], name="add")
                   .outputs[0]])
    out, why = fuse(g)
    assert ops_of(out) == ["matmul", "add"]
    assert why == ["[fuse] add: linear-bias: matmul on i64 tensors: linear is defined on float "
                   "tensors only"]


# -- output names --------------------------------------------------------------------------------
def test_graph_output_names_are_stable():
    g = _conv_add(1)
    mid = g.node("add").outputs[0]
    g.set_outputs([*g.outputs, g.add_node("sigmoid", [mid], name="gate").outputs[0]])
    out, why = fuse(g)
    # the add's result has two users (relu and sigmoid): conv+add fuses, the relu may not
    assert ops_of(out) == ["conv_fused", "relu", "sigmoid"]
    assert [v.name for v in out.outputs] == [v.name for v in g.outputs] == ["out", "gate"]
    assert out.nodes[0].outputs[0].name == "add"
    assert why == [
        "[fuse] relu: conv-act: conv_fused output %add is also used by node 'gate'",
        "[fuse] gate: conv-act: activation sigmoid is not fusible into conv_fused 'conv' "
        "(fusible: relu, relu6, clip)",
    ]
    assert_same_numerics(g, out)


def test_output_name_of_last_fused_node_is_kept():
    out, _ = fuse(_conv_add(1))
    (node,) = out.nodes
    assert node.name == "conv" and node.outputs[0].name == "out" and out.outputs == node.outputs


# -- the fused ops -------------------------------------------------------------------------------
def test_fused_ops_count_the_macs_of_the_unfused_ops():
    g = from_text(FIRES)
    out, _ = fuse(g)
    assert calops(out).total_macs == calops(g).total_macs == 4 * 32 * 2 + 6 * 2 + 12 * 2


def test_conv_fused_attrs_are_a_superset_of_conv():
    conv = [a.name for a in get_op("conv").attrs]
    fused = [a.name for a in get_op("conv_fused").attrs]
    assert fused[: len(conv)] == conv
    assert fused[len(conv):] == ["activation", "clip_min", "clip_max"]


@pytest.mark.parametrize("op,shapes,attrs,message", [
    ("conv_fused", [(1, 4, 6, 6), (4, 4, 3, 3), None, (1, 4, 1, 1)], CONV,
     "residual [1, 4, 1, 1] must have the shape of the conv output [1, 4, 6, 6]"),
    ("conv_fused", [(1, 4, 6, 6), (4, 4, 3, 3)], {**CONV, "clip_max": 6.0},
     "clip_min/clip_max (-inf, 6.0) apply only to activation=clip, not activation=none"),
    ("conv_fused", [(1, 4, 6, 6), (4, 4, 3, 3)], {**CONV, "activation": "gelu"},
     "attribute 'activation' = 'gelu' is not one of none, relu, relu6, clip"),
    ("conv_fused", [(1, 4, 6, 6), (4, 3, 3, 3)], CONV,
     "conv_fused: x has 4 channels but w [4, 3, 3, 3] with groups=1 expects 3"),
    ("linear", [(2, 5), (4, 6)], {}, "linear weight w must be [N, 5] (x is [2, 5]), got [4, 6]"),
    ("linear", [(2, 5), (4, 5), (5,)], {}, "linear bias b must have shape [4], got [5]"),
    ("linear", [(5,), (4, 5)], {}, "linear input x must have rank >= 2, got shape [5]"),
])
def test_fused_op_inference_errors(op, shapes, attrs, message):
    g = Graph("bad")
    values = [None if s is None else g.add_input(f"in{i}", TensorType(F32, s))
              for i, s in enumerate(shapes)]
    with pytest.raises(InferError) as e:
        g.add_node(op, values, attrs, name="n")
    assert message in str(e.value)


def test_clip_activation_bounds_round_trip():
    g = Graph("clip")
    x = g.add_input("x", TensorType(F32, (1, 4, 6, 6)))
    y = g.add_node("conv_fused", [x, _w(g, "w", 4, 4, 3, 3)],
                   {**CONV, "activation": "clip", "clip_min": -math.inf, "clip_max": 0.5},
                   name="c").outputs[0]
    g.set_outputs([y])
    text = to_text(g)
    assert 'activation="clip", clip_max=0.5}' in text
    assert to_text(from_text(text, constants=g.constants)) == text


# -- models imported from torch ------------------------------------------------------------------
def _fold_then_fuse(model: torch.nn.Module) -> tuple[Graph, Graph]:
    if "fold-bn" not in PASSES:
        pytest.skip("fold-bn is not registered yet")
    x = torch.randn(1, 3, 64, 64)
    g = hbc.load((seeded_init(model), (x,)))
    return g, run_passes(g, passes=["fold-bn", "fuse"])


def _no_activation_after_compute(g: Graph) -> None:
    for n in g.nodes:
        if n.op in ("relu", "clip"):
            p = n.inputs[0].producer
            assert p is None or p.op not in ("conv", "conv_fused", "linear"), n.name


def test_resnet18_fuses_every_residual_block():
    from hbc.models.resnet import resnet18

    g, out = _fold_then_fuse(resnet18(num_classes=10))
    fused = [n for n in out.nodes if n.op == "conv_fused"]
    residual = [n for n in fused if len(n.inputs) > 3 and n.inputs[3] is not None]
    assert len(residual) == 8  # one per basic block
    assert all(n.attrs["activation"] == "relu" for n in fused)
    _no_activation_after_compute(out)
    assert not any(n.op in ("add", "relu", "gemm") for n in out.nodes)
    assert [v.name for v in out.outputs] == [v.name for v in g.outputs]
    assert calops(out).total_macs == calops(g).total_macs
    assert_same_numerics(g, out, seeds=(0,))


def test_mobilenet_v2_fuses_relu6_and_residuals():
    from hbc.models.mobilenet import mobilenet_v2

    g, out = _fold_then_fuse(mobilenet_v2(num_classes=10))
    fused = [n for n in out.nodes if n.op == "conv_fused"]
    relu6 = [n for n in fused if n.attrs["activation"] == "relu6"]
    residual = [n for n in fused if len(n.inputs) > 3 and n.inputs[3] is not None]
    assert len(relu6) == 35 and len(residual) == 10  # 2-3 relu6 per block; 10 identity blocks
    _no_activation_after_compute(out)
    assert not any(n.op in ("add", "clip") for n in out.nodes)
    assert calops(out).total_macs == calops(g).total_macs
    assert_same_numerics(g, out, seeds=(0,))
