"""fold-bn: folding into conv / conv_transpose / gemm, the scale_shift fallback with its
explanations, scoped two-step folding on a torch model, golden text, and the scale_shift op."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hbc
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph, Value
from hbc.ir.interpret import interpret
from hbc.ir.registry import InferError
from hbc.ir.types import TensorType
from hbc.models.common import seeded_init
from hbc.passes import PassContext
from hbc.passes import run as run_passes

from .passes_util import assert_golden, assert_same_numerics, random_inputs

F32 = "f32"


# -- graph builders ------------------------------------------------------------------------------
def _const(g: Graph, name: str, rng: np.random.Generator, *shape: int, scale: float = 0.5):
    return g.add_constant(name, (rng.standard_normal(shape) * scale).astype(np.float32))


def _bn(g: Graph, x: Value, name: str, rng: np.random.Generator, loc: str = "") -> Value:
    """A batch_norm over axis 1 of ``x`` with non-trivial random statistics."""
    c = x.shape[1]
    params = [rng.uniform(0.5, 1.5, c), rng.normal(0, 0.3, c), rng.normal(0, 0.3, c),
              rng.uniform(0.3, 1.5, c)]
    vals = [g.add_constant(f"{name}.{k}", p.astype(np.float32))
            for k, p in zip(("gamma", "beta", "mean", "var"), params, strict=True)]
    return g.add_node("batch_norm", [x, *vals], {"epsilon": 1e-3}, name=name,
                      loc=loc).outputs[0]


def _conv_attrs(nd: int = 2, pad: int = 1) -> dict:
    return {"strides": [1] * nd, "pads": [pad] * (2 * nd), "dilations": [1] * nd}


def conv_bn(cin: int, cout: int, groups: int, bias: bool, seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("conv_bn")
    x = g.add_input("x", TensorType(F32, (2, cin, 6, 5)))
    w = _const(g, "w", rng, cout, cin // groups, 3, 3)
    b = _const(g, "b", rng, cout) if bias else None
    y = g.add_node("conv", [x, w, b], {**_conv_attrs(), "groups": groups}, name="conv")
    g.set_outputs([g.add_node("relu", [_bn(g, y.outputs[0], "bn", rng)], name="relu").outputs[0]])
    return g


def conv_transpose_bn(cin: int, cout: int, groups: int, bias: bool, seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("conv_transpose_bn")
    x = g.add_input("x", TensorType(F32, (2, cin, 4, 3)))
    w = _const(g, "w", rng, cin, cout // groups, 3, 2)
    b = _const(g, "b", rng, cout) if bias else None
    attrs = {"strides": [2, 2], "pads": [1, 0, 1, 0], "dilations": [1, 1],
             "output_padding": [1, 0], "groups": groups}
    y = g.add_node("conv_transpose", [x, w, b], attrs, name="deconv")
    g.set_outputs([_bn(g, y.outputs[0], "bn", rng)])
    return g


def gemm_bn(trans_b: int, c_shape: tuple[int, ...] | None, alpha: float = 1.0,
            beta: float = 1.0, seed: int = 0) -> Graph:
    rng = np.random.default_rng(seed)
    g = Graph("gemm_bn")
    m, k, n = 3, 5, 4
    a = g.add_input("a", TensorType(F32, (m, k)))
    w = _const(g, "w", rng, *((n, k) if trans_b else (k, n)))
    c = _const(g, "c", rng, *c_shape) if c_shape is not None else None
    y = g.add_node("gemm", [a, w, c], {"trans_b": trans_b, "alpha": alpha, "beta": beta},
                   name="fc")
    g.set_outputs([_bn(g, y.outputs[0], "bn", rng)])
    return g


def ops_of(g: Graph) -> list[str]:
    return [n.op for n in g.nodes]


def fold(g: Graph, spec: str = "fold-bn") -> tuple[Graph, list[str]]:
    """Run ``spec`` (verifying after each pass); the result and the explanation texts."""
    ctx = PassContext()
    out = run_passes(g, passes=spec, context=ctx)
    return out, [str(e) for e in ctx.explanations]


def frozen(g: Graph) -> dict[str, np.ndarray]:
    return {k: v.copy() for k, v in g.constants.items()}  # for assert_unchanged


def assert_unchanged(g: Graph, before: dict[str, np.ndarray]) -> None:
    """The pass never wrote into a constant array of its input graph."""
    assert set(g.constants) == set(before)
    for k, v in before.items():
        np.testing.assert_array_equal(g.constants[k], v, err_msg=k)


# -- folds ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cin,cout,groups,bias", [
    (3, 4, 1, True),     # plain
    (4, 6, 2, True),     # grouped
    (4, 4, 4, True),     # depthwise
    (4, 8, 4, False),    # depthwise with channel multiplier 2, no bias
    (3, 5, 1, False),    # no bias: a bias input is added
])
def test_conv_bn_folds(cin, cout, groups, bias):
    g = conv_bn(cin, cout, groups, bias)
    before = frozen(g)
    out, why = fold(g)
    assert ops_of(out) == ["conv", "relu"] and why == []
    assert out.node("conv").inputs[2] is not None
    assert_same_numerics(g, out)
    assert_unchanged(g, before)
    # the BN parameters are gone, the weights keep their names
    assert sorted(out.constants) == (["b", "w"] if bias else ["conv.bias", "w"])


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (2, True), (2, False)])
def test_conv_transpose_bn_folds(groups, bias):
    g = conv_transpose_bn(4, 6, groups, bias)
    out, why = fold(g)
    assert ops_of(out) == ["conv_transpose"] and why == []
    assert [v.name for v in out.outputs] == ["bn"]  # the graph output keeps its name
    assert_same_numerics(g, out)


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape,alpha,beta", [
    ((4,), 1.0, 1.0), ((3, 4), 2.0, 0.5), ((3, 1), 1.0, -1.5), ((1,), 0.5, 2.0), (None, 1.0, 1.0),
    ((4,), 1.0, 0.0),
])
def test_gemm_bn_folds(trans_b, c_shape, alpha, beta):
    g = gemm_bn(trans_b, c_shape, alpha, beta)
    out, why = fold(g)
    assert ops_of(out) == ["gemm"] and why == []
    assert out.nodes[0].attrs["beta"] == 1.0
    assert_same_numerics(g, out)


def test_bn_chain_folds_twice():
    g = conv_bn(3, 4, 1, True)
    rng = np.random.default_rng(5)
    relu = g.node("relu")
    g.set_input(relu, 0, _bn(g, relu.inputs[0], "bn2", rng))
    g.toposort()
    out, _ = fold(g)
    assert ops_of(out) == ["conv", "relu"]
    assert_same_numerics(g, out)


def test_shared_weight_gets_new_constants():
    """Two convs share one weight: each fold gives its conv its own folded copy."""
    rng = np.random.default_rng(3)
    g = Graph("shared")
    x = g.add_input("x", TensorType(F32, (1, 3, 5, 5)))
    w = _const(g, "w", rng, 4, 3, 3, 3)
    outs = []
    for i in range(2):
        y = g.add_node("conv", [x, w, None], _conv_attrs(), name=f"conv{i}").outputs[0]
        outs.append(_bn(g, y, f"bn{i}", rng))
    g.set_outputs(outs)
    before = frozen(g)
    out, _ = fold(g)
    assert ops_of(out) == ["conv", "conv"]
    w0, w1 = (out.constants[n.inputs[1].name] for n in out.nodes)
    assert out.nodes[0].inputs[1] is not out.nodes[1].inputs[1] and not np.array_equal(w0, w1)
    assert_same_numerics(g, out)
    assert_unchanged(g, before)


# -- no fold: scale_shift and the reason ---------------------------------------------------------
def test_bn_on_graph_input_becomes_scale_shift():
    rng = np.random.default_rng(1)
    g = Graph("input_bn")
    x = g.add_input("x", TensorType(F32, (2, 3, 4, 4)))
    g.set_outputs([_bn(g, x, "bn", rng)])
    out, why = fold(g)
    assert ops_of(out) == ["scale_shift"]
    assert out.nodes[0].name == "bn" and [v.name for v in out.outputs] == ["bn"]
    assert why == ["[fold-bn] bn: no producer: %x is a graph input (became scale_shift)"]
    assert sorted(out.constants) == ["bn.scale", "bn.shift"]
    assert_same_numerics(g, out)


def test_bn_after_relu_becomes_scale_shift():
    rng = np.random.default_rng(2)
    g = Graph("relu_bn")
    x = g.add_input("x", TensorType(F32, (2, 5)))
    r = g.add_node("relu", [x], name="relu").outputs[0]
    g.set_outputs([_bn(g, r, "bn", rng)])
    out, why = fold(g)
    assert ops_of(out) == ["relu", "scale_shift"]
    assert why == ["[fold-bn] bn: producer is relu, not conv/conv_transpose/gemm "
                   "(became scale_shift)"]
    assert_same_numerics(g, out)


def test_conv_output_used_twice_is_not_folded():
    g = conv_bn(3, 4, 1, True)
    conv_out = g.node("conv").outputs[0]
    extra = g.add_node("sigmoid", [conv_out], name="side").outputs[0]
    g.set_outputs([*g.outputs, extra])
    before = frozen(g)
    out, why = fold(g)
    assert ops_of(out) == ["conv", "scale_shift", "relu", "sigmoid"]
    assert why == ["[fold-bn] bn: conv output also used by side (became scale_shift)"]
    np.testing.assert_array_equal(out.constants["w"], before["w"])
    assert_same_numerics(g, out)


def test_conv_output_that_is_a_graph_output_is_not_folded():
    g = conv_bn(3, 4, 1, True)
    g.set_outputs([*g.outputs, g.node("conv").outputs[0]])
    out, why = fold(g)
    assert "scale_shift" in ops_of(out)
    assert why == ["[fold-bn] bn: conv output %conv is also a graph output (became scale_shift)"]
    assert_same_numerics(g, out)


def test_non_constant_weights_are_not_folded():
    rng = np.random.default_rng(4)
    g = Graph("dynamic_w")
    x = g.add_input("x", TensorType(F32, (1, 2, 4, 4)))
    w = g.add_input("w", TensorType(F32, (3, 2, 1, 1)))
    y = g.add_node("conv", [x, w, None], _conv_attrs(pad=0), name="conv").outputs[0]
    g.set_outputs([_bn(g, y, "bn", rng)])
    out, why = fold(g)
    assert ops_of(out) == ["conv", "scale_shift"]
    assert why == ["[fold-bn] bn: weights are not constant (%w of conv) (became scale_shift)"]
    assert_same_numerics(g, out)


def test_non_constant_bn_parameters_are_kept():
    g = conv_bn(3, 4, 1, True)
    bn = g.node("bn")
    g.set_input(bn, 1, g.add_input("gamma", TensorType(F32, (4,))))
    out, why = fold(g)
    assert ops_of(out) == ["conv", "batch_norm", "relu"]
    assert why == ["[fold-bn] bn: BN scale %gamma is not a constant (kept as batch_norm)"]


def test_scope_leaves_other_bns_alone():
    g = conv_bn(3, 4, 1, True)
    g.node("bn").loc = "heads.det.bn"
    out, why = fold(g, "fold-bn{scope=backbone.*}")
    assert ops_of(out) == ["conv", "batch_norm", "relu"]
    assert why == ["[fold-bn] bn (heads.det.bn): outside scope backbone.*"]
    out, why = fold(g, "fold-bn{scope=backbone.*|heads.*}")  # matched by loc
    assert ops_of(out) == ["conv", "relu"] and why == []


# -- golden text ---------------------------------------------------------------------------------
FIRES = """hbir 1
graph @fires(%x: f32[1,2,4,4]) {
  %w: f32[3,2,1,1] = const [1.0, -2.0, 0.5, 0.25, -1.0, 3.0]
  %gamma: f32[3] = const [1.0, 2.0, 0.5]
  %beta: f32[3] = const [0.0, 0.5, -1.0]
  %mean: f32[3] = const [0.5, -1.0, 2.0]
  %var: f32[3] = const [4.0, 1.0, 0.25]
  %conv: f32[1,3,4,4] = conv(%x, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %bn: f32[1,3,4,4] = batch_norm(%conv, %gamma, %beta, %mean, %var) {epsilon=0.0}
  %y: f32[1,3,4,4] = relu(%bn)
  return %y
}
"""

KEEPS = """hbir 1
graph @keeps(%x: f32[1,3,2,2]) {
  %gamma: f32[3] = const [1.0, 2.0, 0.5]
  %beta: f32[3] = const [0.0, 0.5, -1.0]
  %mean: f32[3] = const [0.5, -1.0, 2.0]
  %var: f32[3] = const [4.0, 1.0, 0.25]
  %bn0: f32[1,3,2,2] = batch_norm(%x, %gamma, %beta, %mean, %var) {epsilon=0.0}
  %r: f32[1,3,2,2] = relu(%bn0)
  %bn1: f32[1,3,2,2] = batch_norm(%r, %gamma, %beta, %mean, %var) {epsilon=0.0}
  %head: f32[1,3,2,2] = batch_norm(%bn1, %gamma, %beta, %mean, %var) {epsilon=0.0} loc("heads.0")
  return %head
}
"""


def test_golden_fires():
    g = from_text(FIRES)
    out, why = fold(g)
    assert why == [] and ops_of(out) == ["conv", "relu"]
    assert_same_numerics(g, out)
    assert_golden("fold_bn_fires", out)


def test_golden_keeps():
    g = from_text(KEEPS)
    out, why = fold(g, "fold-bn{scope=bn*}")
    assert ops_of(out) == ["scale_shift", "relu", "scale_shift", "batch_norm"]
    assert why == [
        "[fold-bn] bn0: no producer: %x is a graph input (became scale_shift)",
        "[fold-bn] bn1: producer is relu, not conv/conv_transpose/gemm (became scale_shift)",
        "[fold-bn] head (heads.0): outside scope bn*",
    ]
    assert_same_numerics(g, out)
    assert_golden("fold_bn_keeps", out)
    assert to_text(from_text(to_text(out))) == to_text(out)


# -- two-step scoped folding on a torch model ----------------------------------------------------
class TwoStage(nn.Module):
    """A backbone shared by three heads: conv, grouped, depthwise, deconv and linear + BN, and
    one BN after a ReLU (cannot fold)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, groups=8), nn.BatchNorm2d(16), nn.ReLU(),
        )
        self.heads = nn.ModuleDict({
            "det": nn.Sequential(nn.Conv2d(16, 6, 1), nn.BatchNorm2d(6)),
            "seg": nn.Sequential(nn.ConvTranspose2d(16, 4, 2, stride=2, groups=2),
                                 nn.BatchNorm2d(4), nn.ReLU(), nn.BatchNorm2d(4)),
            "cls": nn.Sequential(nn.Linear(16, 5), nn.BatchNorm1d(5)),
        })

    def forward(self, x: torch.Tensor):
        f = self.backbone(x)
        return (self.heads["det"](f), self.heads["seg"](f),
                self.heads["cls"](f.mean(dim=(2, 3))))


def _bn_locs(g: Graph) -> list[str]:
    return sorted(n.loc or n.name for n in g.nodes if n.op == "batch_norm")


def _assert_matches_torch(g: Graph, model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = [t.numpy() for t in model(x)]
    out = interpret(g, {g.inputs[0].name: x.numpy()})
    for r, o in zip(ref, [out[v.name] for v in g.outputs], strict=True):
        scale = float(np.max(np.abs(r)))
        np.testing.assert_allclose(o, r, rtol=0, atol=1e-5 * scale)


def test_two_step_scoped_folding_on_torch_model():
    model = seeded_init(TwoStage(), seed=11)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype("f4"))
    g = hbc.load((model, (x,)))
    assert len(_bn_locs(g)) == 7
    step1, why1 = fold(g, "fold-bn{scope=backbone.*}")
    assert _bn_locs(step1) == ["heads.cls.1", "heads.det.1", "heads.seg.1", "heads.seg.3"]
    assert all("outside scope backbone.*" in w for w in why1) and len(why1) == 4
    assert "scale_shift" not in ops_of(step1)
    step2, why2 = fold(step1, "fold-bn{scope=heads.*}")
    assert _bn_locs(step2) == []
    assert ops_of(step2).count("scale_shift") == 1
    assert why2 == ["[fold-bn] heads.seg.3: producer is relu, not conv/conv_transpose/gemm "
                    "(became scale_shift)"]
    for folded in (step1, step2):
        assert_same_numerics(g, folded)
        _assert_matches_torch(folded, model, x)
    # one pipeline string does both steps
    both, _ = fold(g, "fold-bn{scope=backbone.*},fold-bn{scope=heads.*}")
    assert to_text(both) == to_text(step2)
    assert [v.name for v in both.outputs] == [v.name for v in g.outputs]


# -- the scale_shift op --------------------------------------------------------------------------
@pytest.mark.parametrize("shape,axis", [((2, 3, 4, 4), 1), ((2, 4, 4, 3), -1), ((2, 4, 4, 3), 3),
                                        ((5, 3), 1), ((3,), 0)])
def test_scale_shift_reference(shape, axis):
    rng = np.random.default_rng(0)
    g = Graph("ss")
    x = g.add_input("x", TensorType(F32, shape))
    c = shape[axis]
    s, t = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    y = g.add_node("scale_shift", [x, g.add_constant("s", s), g.add_constant("t", t)],
                   {"axis": axis}).outputs[0]
    g.set_outputs([y])
    feed = random_inputs(g)
    bshape = [c if i == axis % len(shape) else 1 for i in range(len(shape))]
    expect = feed["x"] * s.reshape(bshape) + t.reshape(bshape)
    np.testing.assert_allclose(interpret(g, feed)[y.name], expect, rtol=1e-6, atol=1e-6)
    assert to_text(from_text(to_text(g))) == to_text(g)


def test_scale_shift_infer_errors():
    g = Graph("bad")
    x = g.add_input("x", TensorType(F32, (1, 3, 2, 2)))
    s3 = g.add_constant("s3", np.ones(3, np.float32))
    s4 = g.add_constant("s4", np.ones(4, np.float32))
    with pytest.raises(InferError, match=r"scale_shift shift must have shape \[3\]"):
        g.add_node("scale_shift", [x, s3, s4], name="n1")
    with pytest.raises(InferError, match="axis 4 is out of range"):
        g.add_node("scale_shift", [x, s3, s3], {"axis": 4}, name="n2")
    h = g.add_constant("h", np.ones(3, np.float16))
    with pytest.raises(InferError, match="one dtype"):
        g.add_node("scale_shift", [x, h, s3], name="n3")
