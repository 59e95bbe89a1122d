"""The checker against every constraint of issue 7: a tiny IR graph built to break each one,
checked on bernoulli2 and on bayes, asserting the node, the constraint and the actual and
allowed values in the message (and that the looser march accepts what only the stricter one
forbids). Lowered graphs are checked through the float op each q-op came from.
"""

from __future__ import annotations

import numpy as np
import pytest

import hbc
from hbc.backend.legality import check_graph
from hbc.ir.graph import Graph
from hbc.ir.types import TensorType

F32 = np.float32


def _input(g: Graph, name: str, shape) -> object:
    return g.add_input(name, TensorType("f32", tuple(shape)))


def _const(g: Graph, name: str, shape) -> object:
    return g.add_constant(name, np.ones(shape, F32))


def _out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv(x_shape=(1, 8, 16, 16), cout=8, k=3, *, stride=1, pad=0, dil=1, groups=1,
         residual=False) -> Graph:
    """x -> conv 'conv3' (loc Conv_17) [with a fused residual input r] -> output."""
    g = Graph("t")
    x = _input(g, "x", x_shape)
    kh, kw = (k, k) if isinstance(k, int) else k
    w = _const(g, "w", (cout, x_shape[1] // groups, kh, kw))
    attrs = {"strides": [stride, stride], "pads": [pad] * 4, "dilations": [dil, dil],
             "groups": groups}
    inputs = [x, w]
    op = "conv"
    if residual:
        oh = _out(x_shape[2], kh, stride, pad, dil)
        ow = _out(x_shape[3], kw, stride, pad, dil)
        inputs += [None, _input(g, "r", (x_shape[0], cout, oh, ow))]
        op = "conv_fused"
    node = g.add_node(op, inputs, attrs, name="conv3", loc="Conv_17")
    g.set_outputs(node.outputs)
    return g


def conv_transpose(cin=8, cout=8, k=2, stride=2, groups=1) -> Graph:
    g = Graph("t")
    x = _input(g, "x", (1, cin, 8, 8))
    w = _const(g, "w", (cin, cout // groups, k, k))
    node = g.add_node("conv_transpose", [x, w],
                      {"strides": [stride, stride], "pads": [0, 0, 0, 0], "dilations": [1, 1],
                       "output_padding": [0, 0], "groups": groups}, name="up", loc="ConvT_3")
    g.set_outputs(node.outputs)
    return g


def unary(op: str, shape, attrs=None, name="n", out_name=None) -> Graph:
    g = Graph("t")
    x = _input(g, "x", shape)
    node = g.add_node(op, [x], attrs or {}, name=name, loc=f"{op}_1",
                      output_names=[out_name] if out_name else None)
    g.set_outputs(node.outputs[:1])
    return g


def pool(op: str, shape, k, stride=1, pad=0) -> Graph:
    return unary(op, shape, {"kernel": [k, k], "strides": [stride, stride], "pads": [pad] * 4,
                             "dilations": [1, 1]}, name="pool")


def binary(op: str, a_shape, b_shape, b_const=False) -> Graph:
    g = Graph("t")
    a = _input(g, "a", a_shape)
    b = _const(g, "b", b_shape) if b_const else _input(g, "b", b_shape)
    node = g.add_node(op, [a, b], name="ew", loc=f"{op}_9")
    g.set_outputs(node.outputs)
    return g


def resize(shape, size, mode="nearest") -> Graph:
    scales = [o / i for o, i in zip(size, shape, strict=True)]
    return unary("resize", shape, {"size": list(size), "scales": scales, "mode": mode},
                 name="up")


def grid_sample(x_shape, mode="bilinear") -> Graph:
    g = Graph("t")
    x = _input(g, "x", x_shape)
    grid = _input(g, "grid", (x_shape[0], 2, 2, 2))
    node = g.add_node("grid_sample", [x, grid], {"mode": mode}, name="warp", loc="GridSample_1")
    g.set_outputs(node.outputs)
    return g


def concat(c: int) -> Graph:
    g = Graph("t")
    a, b = _input(g, "a", (1, c, 2, 2)), _input(g, "b", (1, c, 2, 2))
    node = g.add_node("concat", [a, b], {"axis": 1}, name="cat")
    g.set_outputs(node.outputs)
    return g


def split(c: int) -> Graph:
    g = Graph("t")
    x = _input(g, "x", (1, c, 2, 2))
    node = g.add_node("split", [x], {"axis": 1, "sizes": [c // 2, c - c // 2]}, name="parts")
    g.set_outputs(node.outputs)
    return g


def conv_int16() -> Graph:
    g = conv()
    g.meta["int16_values"] = ["x"]
    return g


def sigmoid_int16() -> Graph:
    g = unary("sigmoid", (1, 8, 4, 4), name="act", out_name="y")
    g.meta["int16_values"] = ["y"]
    return g


# (id, builder, node, {march: (constraint, actual, allowed) or None when the march accepts it})
K = "kernel"
CASES = [
    ("conv-kernel", lambda: conv(k=9), "conv3",
     {"bernoulli2": (K, "9x9", "at most 7x7"), "bayes": None}),
    ("conv-kernel-bayes", lambda: conv((1, 1, 40, 40), 1, 33), "conv3",
     {"bernoulli2": (K, "33x33", "at most 7x7"), "bayes": (K, "33x33", "at most 31x31")}),
    ("conv-channels", lambda: conv((1, 4100, 2, 2), 4, 1), "conv3",
     {"bernoulli2": ("plain_channels", "4100", "at most 4096"), "bayes": None}),
    ("conv-channels-bayes", lambda: conv((1, 8200, 1, 1), 2, 1), "conv3",
     {"bernoulli2": ("plain_channels", "8200", "at most 4096"),
      "bayes": ("channels", "8200", "at most 8192")}),
    ("conv-group-channels", lambda: conv((1, 4200, 2, 2), 4200, 1, groups=2), "conv3",
     {"bernoulli2": ("channels_per_group", "2100", "at most 2048"), "bayes": None}),
    ("conv-kernel-volume", lambda: conv((1, 700, 8, 8), 1, 7), "conv3",
     {"bernoulli2": ("kernel_volume", "34300", "at most 32768"), "bayes": None}),
    ("conv-kernel-volume-bayes", lambda: conv((1, 1400, 8, 8), 1, 7), "conv3",
     {"bernoulli2": ("kernel_volume", "68600", "at most 32768"),
      "bayes": ("kernel_volume", "68600", "at most 65535")}),
    ("conv-dilation-pow2", lambda: conv(dil=3, pad=3), "conv3",
     {"bernoulli2": ("dilation", "3x3", "a power of 2"), "bayes": None}),
    ("conv-dilation-max", lambda: conv((1, 4, 40, 40), 4, 3, dil=32, pad=32), "conv3",
     {"bernoulli2": None, "bayes": ("dilation", "32x32", "at most 16x16")}),
    ("conv-stride", lambda: conv((1, 2, 300, 300), 2, 1, stride=257), "conv3",
     {"bernoulli2": None, "bayes": ("stride", "257x257", "at most 256x256")}),
    ("conv-pad", lambda: conv((1, 2, 4, 4), 2, 1, pad=257), "conv3",
     {"bernoulli2": None, "bayes": ("pad", "[257, 257, 257, 257]", "at most 256")}),
    ("conv-residual-stride", lambda: conv(stride=4, residual=True), "conv3",
     {"bernoulli2": ("residual_stride", "4x4", "1 or 2"),
      "bayes": ("residual_stride", "4x4", "1 or 2")}),
    ("convt-kernel", lambda: conv_transpose(k=1, stride=2), "up",
     {"bernoulli2": (K, "1x1", "2x2 to 14x14"), "bayes": None}),
    ("convt-kernel-bayes", lambda: conv_transpose(k=16, stride=2), "up",
     {"bernoulli2": (K, "16x16", "2x2 to 14x14"), "bayes": (K, "16x16", "1x1 to 14x14")}),
    ("convt-stride", lambda: conv_transpose(k=3, stride=3), "up",
     {"bernoulli2": ("stride", "3x3", "2 or 4"), "bayes": None}),
    ("convt-stride-bayes", lambda: conv_transpose(k=2, stride=15), "up",
     {"bernoulli2": ("stride", "15x15", "2 or 4"), "bayes": ("stride", "15x15", "1x1 to 14x14")}),
    ("convt-channels", lambda: conv_transpose(cin=2100, cout=4), "up",
     {"bernoulli2": ("channels", "2100", "at most 2048"),
      "bayes": ("channels", "2100", "at most 2048")}),
    ("convt-groups", lambda: conv_transpose(cin=8, cout=8, groups=2), "up",
     {"bernoulli2": ("groups", "2", "at most 1"), "bayes": None}),
    ("maxpool-kernel", lambda: pool("max_pool", (1, 1, 65, 65), 65), "pool",
     {"bernoulli2": (K, "65x65", "at most 64x64"), "bayes": None}),
    ("maxpool-kernel-bayes", lambda: pool("max_pool", (1, 1, 257, 257), 257), "pool",
     {"bernoulli2": (K, "257x257", "at most 64x64"), "bayes": (K, "257x257", "at most 256x256")}),
    ("avgpool-kernel", lambda: pool("avg_pool", (1, 4, 8, 8), 8), "pool",
     {"bernoulli2": (K, "8x8", "at most 7x7"), "bayes": None}),
    ("avgpool-stride-bayes", lambda: pool("avg_pool", (1, 1, 2, 600), 1, stride=257), "pool",
     {"bernoulli2": None, "bayes": ("stride", "257x257", "at most 256x256")}),
    ("global-avgpool", lambda: unary("global_avg_pool", (1, 4, 91, 91), name="gap"), "gap",
     {"bernoulli2": ("input_size", "8281", "at most 8192"), "bayes": None}),
    ("resize-rank", lambda: resize((1, 4, 8), (1, 4, 16)), "up",
     {"bernoulli2": ("rank", "3", "4"), "bayes": ("rank", "3", "4")}),
    ("resize-axes", lambda: resize((1, 4, 8, 8), (1, 8, 16, 16)), "up",
     {"bernoulli2": ("resized_axes", "C, H, W", "only H, W"),
      "bayes": ("resized_axes", "C, H, W", "only H, W")}),
    ("resize-mode", lambda: resize((1, 4, 8, 8), (1, 4, 16, 16), "cubic"), "up",
     {"bernoulli2": ("mode", "cubic", "nearest or linear"),
      "bayes": ("mode", "cubic", "nearest or linear")}),
    ("resize-nearest-pow2", lambda: resize((1, 4, 8, 8), (1, 4, 24, 24)), "up",
     {"bernoulli2": ("nearest_factor", "3x3", "a power of 2"), "bayes": None}),
    ("resize-nearest-h-le-w", lambda: resize((1, 4, 8, 8), (1, 4, 32, 16)), "up",
     {"bernoulli2": ("nearest_factor_ratio", "2", "at most 1"), "bayes": None}),
    ("grid-sample-size", lambda: grid_sample((1, 1, 721, 1024)), "warp",
     {"bernoulli2": ("unit", "cpu", "bpu"), "bayes": ("input_size", "738304", "at most 737280")}),
    ("grid-sample-mode", lambda: grid_sample((1, 2, 8, 8), "bicubic"), "warp",
     {"bernoulli2": ("unit", "cpu", "bpu"), "bayes": ("mode", "bicubic", "bilinear or nearest")}),
    ("add-channels", lambda: binary("add", (1, 2050, 2, 2), (1, 2050, 2, 2)), "ew",
     {"bernoulli2": ("channels", "2050", "at most 2048"), "bayes": None}),
    ("mul-broadcast-c", lambda: binary("mul", (1, 4, 8, 8), (1, 1, 8, 8)), "ew",
     {"bernoulli2": ("broadcast_axes", "C", "only H, W"), "bayes": None}),
    ("add-broadcast-n", lambda: binary("add", (2, 4, 8, 8), (1, 4, 8, 8)), "ew",
     {"bernoulli2": ("broadcast_axes", "N", "only H, W"),
      "bayes": ("broadcast_axes", "N", "only C, H, W")}),
    ("sub-cpu", lambda: binary("sub", (1, 4, 8, 8), (1, 4, 8, 8)), "ew",
     {"bernoulli2": ("unit", "cpu", "bpu"), "bayes": None}),
    ("reshape-cpu", lambda: unary("reshape", (1, 8, 4, 4), {"shape": [1, 128]}), "n",
     {"bernoulli2": ("unit", "cpu", "bpu"), "bayes": None}),
    ("transpose-cpu", lambda: unary("transpose", (1, 8, 4, 4), {"perm": [0, 2, 3, 1]}), "n",
     {"bernoulli2": ("unit", "cpu", "bpu"), "bayes": None}),
    ("softmax-cpu", lambda: unary("softmax", (1, 8, 4, 4), {"axis": 1}), "n",
     {"bernoulli2": ("unit", "cpu", "bpu"), "bayes": None}),
    ("argmax-axis", lambda: unary("argmax", (1, 8, 4, 4), {"axis": 2}), "n",
     {"bernoulli2": ("axis", "2", "1"), "bayes": ("axis", "2", "1")}),
    ("argmax-channels", lambda: unary("argmax", (1, 65, 4, 4), {"axis": 1}), "n",
     {"bernoulli2": ("axis_size", "65", "at most 64"), "bayes": ("axis_size", "65", "at most 64")}),
    ("concat-channels", lambda: concat(1100), "cat",
     {"bernoulli2": ("channels", "2200", "at most 2048"), "bayes": None}),
    ("split-channels", lambda: split(2100), "parts",
     {"bernoulli2": ("channels", "2100", "at most 2048"), "bayes": None}),
    ("slice-channels",
     lambda: unary("slice", (1, 2100, 2, 2), {"starts": [0], "ends": [8], "axes": [1]}), "n",
     {"bernoulli2": ("channels", "2100", "at most 2048"), "bayes": None}),
    ("conv-int16", conv_int16, "conv3",
     {"bernoulli2": ("activation_dtype", "i16", "i8"), "bayes": None}),
    ("lut-int16", sigmoid_int16, "act",
     {"bernoulli2": ("activation_dtype", "i16", "i8"), "bayes": None}),
]


def _verdict(report, node: str):
    found = [v for v in (*report.inputs, *report.verdicts) if v.node == node]
    assert found, f"no verdict for {node}: {[v.node for v in report.verdicts]}"
    return found[0]


@pytest.mark.parametrize("march", ["bernoulli2", "bayes"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_constraint(case, march):
    _, build, node, expect = case
    report = hbc.check(build(), march)
    v = _verdict(report, node)
    want = expect[march]
    if want is None:  # the march accepts it (hbc may still lack an integer kernel for it)
        rest = [p.message for p in v.problems if p.constraint != "integer-kernel"]
        assert not rest, f"{node} on {march}: {rest}"
        assert v.unit == ("cpu" if v.problems else "bpu")
        assert report.exit_code == (1 if v.problems else 0)
        return
    constraint, actual, allowed = want
    assert v.unit == "cpu"
    assert report.exit_code == 1
    hits = [p for p in v.problems if p.constraint == constraint]
    assert hits, f"{node} on {march}: {[p.message for p in v.problems]}"
    p = hits[0]
    assert (p.actual, p.allowed) == (actual, allowed)
    assert p.hint
    text = report.to_text()
    if constraint == "unit":
        assert f"{v.op} {v.where()}: {march} runs {v.op} on the CPU" in text
    else:
        assert f"{v.op} {v.where()}: {constraint} {actual}, {march} allows {allowed}" in text
    # the hint names the looser march when only the stricter one forbids it
    looser = [m for m, w in expect.items() if w is None]
    if looser:
        assert any(m in p.hint for m in looser), p.hint


def test_kernel_hint_is_concrete():
    report = hbc.check(conv(k=9), "bernoulli2")
    (p,) = [p for p in _verdict(report, "conv3").problems if p.constraint == "kernel"]
    assert "two stacked 5x5 convs" in p.hint and "bayes" in p.hint
    assert "conv conv3 (Conv_17): kernel 9x9, bernoulli2 allows at most 7x7" in report.to_text()


@pytest.mark.parametrize("march, unit", [("bernoulli2", "unsupported"), ("bayes", "bpu")])
def test_input_batch(march, unit):
    report = hbc.check(unary("relu", (2, 8, 4, 4)), march)
    v = _verdict(report, "x")
    assert (v.op, v.unit) == ("input", unit)
    if unit == "unsupported":
        (p,) = v.problems
        assert (p.constraint, p.actual, p.allowed) == ("batch", "2", "at most 1")
        assert "input x: input batch 2, bernoulli2 allows at most 1" in report.to_text()
        assert report.status == "unsupported" and report.exit_code == 1
        assert "cannot run on bernoulli2" in report.summary()


def test_input_rank():
    report = hbc.check(unary("relu", (1, 8, 4)), "bernoulli2")
    (p,) = _verdict(report, "x").problems
    assert (p.constraint, p.actual, p.allowed) == ("rank", "3", "4")


def test_input_read_only_by_cpu_is_not_checked():
    # a batch-2 input that only a CPU op reads never reaches the BPU
    report = hbc.check(unary("softmax", (2, 8, 4, 4), {"axis": 1}), "bernoulli2")
    assert report.inputs == []


def test_const_inputs():
    g = Graph("t")
    a, b = _const(g, "a", (1, 4, 2, 2)), _const(g, "b", (1, 4, 2, 2))
    g.set_outputs(g.add_node("add", [a, b], name="ew").outputs)
    for march in ("bernoulli2", "bayes"):  # unfolded: check_graph without the passes
        (v,) = check_graph(g, march)
        (p,) = v.problems
        assert (p.constraint, p.actual, p.allowed) == ("const_inputs", "2", "at most 1")


def test_integer_kernel_and_table_problems():
    v = _verdict(hbc.check(conv_transpose(), "bayes"), "up")
    assert v.unit == "cpu"
    assert [p.constraint for p in v.problems] == ["integer-kernel"]
    assert "conv_transpose" in v.problems[0].message


def test_looser_marches_accept_what_bayes_accepts():
    for case in CASES:
        _, build, node, expect = case
        if expect["bayes"] is None:
            base = _verdict(hbc.check(build(), "bayes"), node)
            for march in ("bayes-e", "nash-e", "nash"):
                v = _verdict(hbc.check(build(), march), node)
                assert (v.unit, v.problems) == (base.unit, base.problems), (case[0], march)


def test_lowered_graph_maps_qops_to_float_constraints():
    from hbc.passes import run
    from hbc.passes.calibrate import calibrate

    g = run(conv((1, 4, 16, 16), 4, 9), opt=3)
    rng = np.random.default_rng(0)
    cal = calibrate(g, [{"x": rng.standard_normal((1, 4, 16, 16)).astype(F32)}], method="max")
    low = run(cal, passes=["lower-int"], march="bayes")
    ops = {n.op for n in low.nodes}
    assert "qconv" in ops
    report = hbc.check(low, "bernoulli2")
    v = _verdict(report, "conv3")
    assert v.op == "qconv" and v.unit == "cpu"
    (p,) = v.problems
    assert (p.constraint, p.actual, p.allowed) == ("kernel", "9x9", "at most 7x7")
    assert report.partition.input_quantize == 1 and report.partition.output_dequantize == 1
    assert all(v.unit == "cpu" and not v.problems for v in report.verdicts if v.boundary)
    assert hbc.check(low, "bayes").exit_code == 0


def test_residual_add_not_fused_at_stride_4_on_bernoulli2():
    # fuse keeps the add apart (bernoulli2's fusion limits), so both nodes run on the BPU
    g = conv(stride=4)
    r = _input(g, "r", (1, 8, 4, 4))
    add = g.add_node("add", [g.outputs[0], r], name="res")
    g.set_outputs(add.outputs)
    report = hbc.check(g, "bernoulli2")
    assert [v.op for v in report.nodes] == ["conv", "add"] and report.exit_code == 0
