"""Canonicalization passes: const-fold, dce, cse, dedup-constants, remove-noops.

Each pass has golden .hbir cases (one where the rewrite fires, one where it must not) under
tests/golden/passes/ and before/after numerics on the float interpreter. Every run goes through
``hbc.passes.run`` so the graph is verified after each pass.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import hbc
from hbc.ir import from_text
from hbc.ir.graph import Graph
from hbc.ir.registry import OPS, OpDef, register
from hbc.ir.types import QuantParams, TensorType
from hbc.passes import PassContext, run
from tests.passes_util import assert_golden, assert_same_numerics


def _parse(body: str, constants: dict[str, np.ndarray] | None = None) -> Graph:
    return from_text("hbir 1\n" + body.strip() + "\n", constants=constants)


def _run(g: Graph, passes: str, ctx: PassContext | None = None) -> Graph:
    out = run(g, passes=passes, context=ctx)
    assert_same_numerics(g, out)
    return out


def _reasons(ctx: PassContext) -> dict[str, str]:
    return {e.node: e.reason for e in ctx.explanations}


# -- const-fold --------------------------------------------------------------------------------

FOLDABLE = """
graph @fold(%x: f32[2,4], %v: f32[2,2]) {
  %shape: i64[4] = const [1, 3, 8, 8]
  %idx: i64[2] = const [2, 3]
  %ones: i64[2] = const [1, 1]
  %w: f32[2,2] = const [1.0, 2.0, 3.0, 4.0]
  %two: f32[] = const 2.0
  %hw: i64[2] = gather(%shape, %idx)
  %dims: i64[4] = concat(%ones, %hw) {axis=0}
  %fdims: f32[4] = cast(%dims) {to="f32"}
  %y: f32[2,4] = add(%x, %fdims)
  %wt: f32[2,2] = transpose(%w) {perm=[1, 0]}
  %ws: f32[2,2] = mul(%wt, %two)
  %lo, %hi: f32[1,2], f32[1,2] = split(%ws) {axis=0, sizes=[1, 1]}
  %z: f32[2,2] = matmul(%v, %ws)
  %u: f32[2,2] = add(%z, %hi)
  return %y, %u, %dims, %lo
}
"""


def test_const_fold_fires_on_static_shape_and_weight_subgraphs():
    g = _parse(FOLDABLE)
    out = _run(g, "const-fold")
    assert [n.op for n in out.nodes] == ["add", "matmul", "add"]
    # graph outputs keep their names and positions, a folded one stays an output
    assert [v.name for v in out.outputs] == ["y", "u", "dims", "lo"]
    assert out.outputs[2].is_const and out.outputs[3].is_const
    np.testing.assert_array_equal(out.constants["dims"], [1, 1, 8, 8])
    np.testing.assert_array_equal(out.constants["ws"], [[2.0, 6.0], [4.0, 8.0]])
    # inputs only the folded nodes read are gone with them
    assert not out.has_value("shape") and not out.has_value("w")
    assert_golden("const_fold_fires", out)


KEEPS = """
graph @keep(%x: f32[4]) {
  %wq: i8[4] q(scale=0.5) = const [1, -2, 3, 4]
  %c: f32[4] = const [1.0, 2.0, 3.0, 4.0]
  %w: f32[4] = dequantize(%wq)
  %q: i8[4] q(scale=0.25) = quantize(%c) {scale=[0.25]}
  %big: f32[4] = mul(%c, %c)
  %y: f32[4] = add(%x, %w)
  %z: f32[4] = add(%y, %big)
  return %z, %q
}
"""


def test_const_fold_keeps_quantization_and_big_results():
    g = _parse(KEEPS)
    ctx = PassContext()
    out = _run(g, "const-fold{max_elements=3}", ctx)
    assert [n.op for n in out.nodes] == [n.op for n in g.nodes]
    reasons = _reasons(ctx)
    assert "not foldable" in reasons["w"] and "not foldable" in reasons["q"]
    assert "4 elements" in reasons["big"] and "max_elements" in reasons["big"]
    assert_golden("const_fold_keeps", out)
    # with the default limit the product folds
    assert [n.op for n in run(g, passes="const-fold").nodes] == [
        "dequantize", "quantize", "add", "add"]


def test_const_fold_keeps_the_type_of_the_folded_value():
    g = _parse("""
graph @typed(%x: f32[1,2,1,1] NHWC) {
  %c: f32[1,1,1,2] NHWC = const [1.0, 2.0]
  %r: f32[1,2,1,1] NHWC = reshape(%c) {shape=[1, 2, 1, 1]}
  %y: f32[1,2,1,1] NHWC = add(%x, %r)
  return %y
}""")
    out = _run(g, "const-fold")
    assert out.value("r").type == TensorType("f32", (1, 2, 1, 1), "NHWC")


def test_const_fold_error_names_the_node():
    g = _parse("""
graph @bad(%x: f32[2]) {
  %c: f32[3] = const [1.0, 2.0, 3.0]
  %i: i64[1] = const [7]
  %g: f32[1] = gather(%c, %i) loc("model.py:12")
  %y: f32[2] = add(%x, %g)
  return %y
}""")
    with pytest.raises(hbc.HbcError, match=r"const-fold.*gather node 'g \(model.py:12\)'.*range"):
        run(g, passes="const-fold")


class _RealValue(OpDef):
    """Test-only: a foldable op whose reference reads the input type (real = q * scale)."""

    name = "test.canon_real_value"
    needs_input_types = True

    def infer(self, inputs, attrs):
        return [TensorType("f32", inputs[0].shape)]

    def reference(self, inputs, attrs, input_types=None):
        return [(inputs[0] * input_types[0].quant.scale[0]).astype(np.float32)]


@pytest.fixture
def real_value_op():
    register(_RealValue)
    try:
        yield
    finally:
        OPS.pop(_RealValue.name, None)


def test_const_fold_passes_input_types_when_the_op_needs_them(real_value_op):
    g = Graph("types")
    x = g.add_input("x", TensorType("f32", (3,)))
    q = g.add_constant("q", np.array([2, -4, 6], np.int8),
                       type_=TensorType("i8", (3,), quant=QuantParams((0.5,))))
    r = g.add_node("test.canon_real_value", [q], name="r").outputs[0]
    g.set_outputs([g.add_node("add", [x, r], name="y").outputs[0]])
    out = _run(g, "const-fold")
    np.testing.assert_array_equal(out.constants["r"], [1.0, -2.0, 3.0])


# -- dce ---------------------------------------------------------------------------------------

def test_dce_fires_transitively_and_drops_unused_constants():
    g = _parse("""
graph @dead(%x: f32[4], %unused: f32[4]) {
  %c: f32[4] = const [1.0, 2.0, 3.0, 4.0]
  %orphan: f32[2] = const [5.0, 6.0]
  %y: f32[4] = relu(%x)
  %d1: f32[4] = add(%x, %c)
  %d2: f32[4] = sigmoid(%d1)
  %d3: f32[4] = mul(%d2, %y)
  return %y
}""")
    out = _run(g, "dce")
    assert [n.op for n in out.nodes] == ["relu"]
    assert out.constants == {}
    assert [v.name for v in out.inputs] == ["x", "unused"]  # the interface stays
    assert_golden("dce_fires", out)


def test_dce_keeps_everything_an_output_needs():
    g = _parse("""
graph @live(%x: f32[4]) {
  %c: f32[4] = const [1.0, 2.0, 3.0, 4.0]
  %k: f32[2] = const [5.0, 6.0]
  %a: f32[4] = add(%x, %c)
  %b: f32[4] = relu(%a)
  return %b, %a, %k
}""")
    out = _run(g, "dce")
    assert len(out.nodes) == 2 and set(out.constants) == {"c", "k"}
    assert_golden("dce_keeps", out)


# -- cse ---------------------------------------------------------------------------------------

class _TwiceConv(nn.Module):
    """Calls one conv twice on the same input: torch traces two conv nodes on shared weights."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x)) + torch.relu(self.conv(x)), torch.sigmoid(self.conv(x))


def test_cse_fires_on_a_traced_model():
    torch.manual_seed(0)
    g = hbc.load((_TwiceConv().eval(), (torch.randn(1, 3, 8, 8),)))
    assert [n.op for n in g.nodes].count("conv") == 3
    out = _run(g, "cse")
    assert [n.op for n in out.nodes] == ["conv", "relu", "add", "sigmoid"]
    add = out.nodes[2]
    assert add.inputs[0] is add.inputs[1]


def test_cse_fires_and_keeps_output_names():
    g = _parse("""
graph @cse(%x: f32[4], %w: f32[4]) {
  %a1: f32[4] = mul(%x, %w)
  %a2: f32[4] = mul(%x, %w)
  %b1: f32[4] = relu(%a1)
  %b2: f32[4] = relu(%a2)
  %s: f32[4] = add(%b1, %b2)
  %c1: f32[4] = clip(%s) {min=0.0, max=6.0}
  %c2: f32[4] = clip(%s) {min=0.0, max=6.0}
  return %s, %c1, %c2, %b2
}""")
    out = _run(g, "cse")
    # b2 (an output) is merged into b1, which takes its name; c2 merges into c1, which is
    # exposed too, so c2 becomes an identity of c1 to keep both names
    assert [v.name for v in out.outputs] == ["s", "c1", "c2", "b2"]
    assert [n.op for n in out.nodes] == ["mul", "relu", "add", "clip", "identity"]
    assert_golden("cse_fires", out)


def test_cse_keeps_different_computations():
    g = _parse("""
graph @nocse(%x: f32[4]) {
  %w1: f32[4] = const [1.0, 2.0, 3.0, 4.0]
  %w2: f32[4] = const [1.0, 2.0, 3.0, 4.0]
  %a: f32[4] = mul(%x, %w1)
  %b: f32[4] = mul(%x, %w2)
  %c: f32[4] = leaky_relu(%x) {alpha=0.1}
  %d: f32[4] = leaky_relu(%x) {alpha=0.2}
  %e: f32[4] = sub(%a, %x)
  %f: f32[4] = sub(%x, %a)
  %z: f32[4] = clip(%x) {min=0.0}
  %mz: f32[4] = clip(%x) {min=-0.0}
  return %a, %b, %c, %d, %e, %f, %z, %mz
}""")
    out = _run(g, "cse")
    assert len(out.nodes) == len(g.nodes)
    assert_golden("cse_keeps", out)
    # equal constants are dedup-constants' job; after it, cse merges the two muls
    assert [n.op for n in run(g, passes="dedup-constants,cse").nodes].count("mul") == 1


# -- dedup-constants ---------------------------------------------------------------------------

def test_dedup_constants_fires_and_reports_bytes():
    w = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    g = _parse("""
graph @dedup(%x: f32[2,3,4]) {
  %w1: f32[2,3,4] = const
  %w2: f32[2,3,4] = const
  %w3: f32[2,3,4] = const
  %k1: i32[2] = const [7, -1]
  %k2: i32[2] = const [7, -1]
  %a: f32[2,3,4] = add(%x, %w1)
  %b: f32[2,3,4] = mul(%a, %w2)
  %c: f32[2,3,4] = sub(%b, %w3)
  return %c, %k1, %k2
}""", constants={"w1": w, "w2": w.copy(), "w3": w.copy()})
    ctx = PassContext()
    out = _run(g, "dedup-constants", ctx)
    assert sorted(out.constants) == ["k1", "k2", "w1"]  # k2 is an output: kept
    assert all(n.inputs[1].name == "w1" for n in out.nodes)
    assert ctx.results["dedup-constants"] == {"merged": 2, "bytes_saved": 2 * w.nbytes}
    assert_golden("dedup_constants_fires", out)


def test_dedup_constants_keeps_different_types_and_bits():
    g = _parse("""
graph @nodedup(%x: f32[4], %i: i32[4]) {
  %f: f32[4] = const [0.0, 0.0, 0.0, 0.0]
  %n: f32[4] = const [-0.0, 0.0, 0.0, 0.0]
  %r: f32[2,2] = const [0.0, 0.0, 0.0, 0.0]
  %i0: i32[4] = const [0, 0, 0, 0]
  %l: f32[4] NHWC = const [0.0, 0.0, 0.0, 0.0]
  %qa: i8[2] q(scale=0.5) = const [1, 2]
  %qb: i8[2] q(scale=0.25) = const [1, 2]
  %a: f32[4] = add(%x, %f)
  %b: f32[4] = add(%a, %n)
  %c: f32[2,2] = reshape(%b) {shape=[2, 2]}
  %d: f32[2,2] = add(%c, %r)
  %e: i32[4] = add(%i, %i0)
  %g: f32[4] NHWC = add(%l, %x)
  %h: f32[2] = dequantize(%qa)
  %k: f32[2] = dequantize(%qb)
  return %d, %e, %g, %h, %k
}""")
    ctx = PassContext()
    out = _run(g, "dedup-constants", ctx)
    assert len(out.constants) == len(g.constants)
    assert ctx.results["dedup-constants"] == {"merged": 0, "bytes_saved": 0}
    assert_golden("dedup_constants_keeps", out)


def test_dedup_constants_handles_scalars_and_narrow_dtypes():
    bf16 = TensorType("bf16", (2,))
    g = Graph("narrow")
    x = g.add_input("x", TensorType("f32", ()))
    data = np.array([1.5, -2.0], np.float32).astype(bf16.np_dtype)
    ys = []
    for i in range(2):
        s = g.add_constant(f"s{i}", np.array(2.0, np.float32))
        b = g.add_constant(f"b{i}", data.copy(), type_=bf16)
        f = g.add_node("cast", [b], {"to": "f32"}, name=f"f{i}").outputs[0]
        ys.append(g.add_node("add", [g.add_node("mul", [x, s]).outputs[0], f]).outputs[0])
    g.set_outputs(ys)
    ctx = PassContext()
    out = _run(g, "dedup-constants", ctx)
    assert sorted(out.constants) == ["b0", "s0"]
    assert ctx.results["dedup-constants"] == {"merged": 2, "bytes_saved": 4 + 4}


# -- remove-noops ------------------------------------------------------------------------------

NOOPS = """
graph @noops(%x: f32[2,3,4]) {
  %zero: f32[] = const 0.0
  %ones: f32[4] = const [1.0, 1.0, 1.0, 1.0]
  %i: f32[2,3,4] = identity(%x)
  %r: f32[2,3,4] = reshape(%i) {shape=[2, 3, 4]}
  %r1: f32[6,4] = reshape(%r) {shape=[6, 4]}
  %r2: f32[24] = reshape(%r1) {shape=[24]}
  %r3: f32[2,12] = reshape(%r2) {shape=[2, 12]}
  %t1: f32[12,2] = transpose(%r3) {perm=[1, 0]}
  %t2: f32[2,12] = transpose(%t1) {perm=[1, 0]}
  %back: f32[2,3,4] = reshape(%t2) {shape=[2, 3, 4]}
  %p1: f32[3,4,2] = transpose(%back) {perm=[1, 2, 0]}
  %p2: f32[4,2,3] = transpose(%p1) {perm=[1, 2, 0]}
  %p3: f32[2,3,4] = transpose(%p2) {perm=[1, 2, 0]}
  %tid: f32[2,3,4] = transpose(%p3) {perm=[0, 1, 2]}
  %c: f32[2,3,4] = cast(%tid) {to="f32"}
  %pd: f32[2,3,4] = pad(%c) {pads=[0, 0, 0, 0, 0, 0], mode="reflect"}
  %s: f32[2,3,4] = slice(%pd) {starts=[0, -100], ends=[9223372036854775807, 100], axes=[1, 2]}
  %cc: f32[2,3,4] = concat(%s) {axis=1}
  %sp: f32[2,3,4] = split(%cc) {axis=2, sizes=[4]}
  %cl: f32[2,3,4] = clip(%sp)
  %a0: f32[2,3,4] = add(%zero, %cl)
  %m1: f32[2,3,4] = mul(%a0, %ones)
  %d1: f32[2,3,4] = div(%m1, %ones)
  %s0: f32[2,3,4] = sub(%d1, %zero)
  %y: f32[2,3,4] = relu(%s0)
  %out: f32[2,3,4] = identity(%y)
  %t3: f32[4,3,2] = transpose(%y) {perm=[2, 1, 0]}
  %t4: f32[3,2,4] = transpose(%t3) {perm=[1, 2, 0]}
  return %out, %t4
}
"""


def test_remove_noops_fires():
    g = _parse(NOOPS)
    out = _run(g, "remove-noops")
    # everything before relu was a no-op; the output identity's name moves to relu's result;
    # the transpose pair composes into one
    assert [n.op for n in out.nodes] == ["relu", "transpose"]
    assert [v.name for v in out.outputs] == ["out", "t4"]
    assert out.nodes[0].inputs[0].name == "x"
    assert out.nodes[1].attrs["perm"] == [1, 0, 2]
    assert_golden("remove_noops_fires", out)


def test_remove_noops_keeps_real_work_and_explains():
    g = _parse("""
graph @real(%x: f32[2,3], %q: i8[2,3] q(scale=[0.5, 0.25], axis=0)) {
  %half: f32[] = const 0.5
  %ones: f32[2,1,3] = const [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
  %r: f32[3,2] = reshape(%x) {shape=[3, 2]}
  %t: f32[2,3] = transpose(%r) {perm=[1, 0]}
  %rev: f32[2,3] = slice(%t) {starts=[-1], ends=[-100], axes=[1], steps=[-1]}
  %pd: f32[2,5] = pad(%rev) {pads=[0, 1, 0, 1]}
  %c: f16[2,5] = cast(%pd) {to="f16"}
  %cf: f32[2,5] = cast(%c) {to="f32"}
  %m: f32[2,5] = mul(%cf, %half)
  %bc: f32[2,2,3] = mul(%x, %ones)
  %qr: i8[2,3] = reshape(%q) {shape=[2, 3]}
  %i: f32[2,3] = identity(%x)
  return %m, %bc, %qr, %i
}""")
    ctx = PassContext()
    out = _run(g, "remove-noops", ctx)
    assert [n.op for n in out.nodes] == [n.op for n in g.nodes]
    reasons = _reasons(ctx)
    assert "q(scale=[0.5, 0.25], axis=0)" in reasons["qr"]  # per-channel quant is dropped
    assert "graph output" in reasons["i"] and "graph input" in reasons["i"]
    assert "bc" not in reasons  # broadcasting x * 1 grows x: not a no-op at all
    assert_golden("remove_noops_keeps", out)


def test_remove_noops_on_a_traced_model():
    class Shuffle(nn.Module):
        def forward(self, x):
            y = (x + 1).permute(0, 2, 3, 1).permute(0, 3, 1, 2)
            return y.reshape(1, -1).reshape(1, 4, 8, 8)

    g = hbc.load((Shuffle(), (torch.randn(1, 4, 8, 8),)))
    out = _run(g, "remove-noops")
    assert [n.op for n in out.nodes] == ["add"]
    assert [v.name for v in out.outputs] == [v.name for v in g.outputs]


# -- canonicalization together -----------------------------------------------------------------

def test_o1_pipeline_leaves_a_canonical_graph():
    g = _parse(FOLDABLE)
    out = run(g, opt=1)
    assert_same_numerics(g, out)
    again = run(out, opt=1)
    assert hbc.ir.to_text(again) == hbc.ir.to_text(out)
