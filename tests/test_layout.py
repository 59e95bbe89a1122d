"""Layout: the ``layout`` attribute of layout-sensitive ops, convert-layout and check-layout.

* every layout-sensitive op computes in NHWC what it computes in NCHW, with channels-last types;
* convert-layout keeps the interpreter's numbers (ResNet-18 and MobileNetV2 from the torch
  frontend, small graphs with every layout rule), leaves transposes only at the inputs, the
  outputs and before reshapes that mix channels with spatial dims, and has golden cases;
* check-layout reports every problem at once, each naming its node or input.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hbc
from hbc.errors import InputError
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph
from hbc.ir.registry import get_op
from hbc.ir.types import TensorType
from hbc.passes import PassError, run
from hbc.passes.layout_perm import reshape_plan, to_last
from tests.passes_util import assert_golden, assert_same_numerics

RNG = np.random.default_rng(11)


def _w(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _parse(body: str, **constants: np.ndarray) -> Graph:
    return from_text("hbir 1\n" + body.strip() + "\n", constants=constants)


def _transposes(g: Graph) -> list[str]:
    return [n.name for n in g.nodes if n.op == "transpose"]


def _convert(g: Graph, layout: str = "NHWC") -> Graph:
    out = run(g, passes=[("convert-layout", {"layout": layout})])
    assert_same_numerics(g, out)
    return out


# -- ops in NHWC ---------------------------------------------------------------------------------
NHWC_CASES = [
    ("conv", [(1, 4, 7, 6), (6, 2, 3, 3), (6,)],
     {"strides": [2, 1], "pads": [1, 0, 1, 2], "dilations": [1, 2], "groups": 2}),
    ("conv", [(2, 3, 9), (4, 3, 3), None], {"strides": [2], "pads": [1, 1], "dilations": [1]}),
    ("conv", [(1, 2, 4, 5, 3), (3, 2, 2, 2, 2), None],
     {"strides": [1, 1, 1], "pads": [0] * 6, "dilations": [1, 1, 1]}),
    ("conv_transpose", [(1, 4, 5, 5), (4, 3, 3, 3), (6,)],
     {"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1], "output_padding": [1, 0],
      "groups": 2}),
    ("conv_fused", [(1, 4, 6, 6), (4, 4, 3, 3), (4,), (1, 4, 6, 6)],
     {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1], "activation": "relu"}),
    ("batch_norm", [(2, 3, 4, 5), (3,), (3,), (3,), (3,)], {"epsilon": 1e-3}),
    ("max_pool", [(1, 3, 7, 7)],
     {"kernel": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [1, 1],
      "ceil_mode": 1}),
    ("avg_pool", [(1, 3, 7, 7)],
     {"kernel": [2, 3], "strides": [2, 2], "pads": [0, 1, 0, 1], "dilations": [1, 1]}),
    ("global_avg_pool", [(2, 5, 3, 4)], {}),
    ("global_max_pool", [(2, 5, 3, 4, 2)], {}),
    ("depth_to_space", [(1, 8, 3, 2)], {"blocksize": 2, "mode": "CRD"}),
    ("space_to_depth", [(1, 2, 4, 6)], {"blocksize": 2}),
    ("grid_sample", [(1, 3, 5, 6), (1, 4, 3, 2)], {"align_corners": 1}),
]


@pytest.mark.parametrize("op, shapes, attrs", NHWC_CASES, ids=[c[0] for c in NHWC_CASES])
def test_op_in_nhwc_equals_nchw(op, shapes, attrs):
    opdef = get_op(op)
    arrays = [None if s is None else _w(*s) for s in shapes]
    if op == "batch_norm":
        arrays[4] = np.abs(arrays[4])
    if op == "grid_sample":
        arrays[1] = np.tanh(arrays[1])
    data = {0, 3} if op == "conv_fused" else {0}

    def nhwc(i: int, a):
        return a if i not in data or a is None else np.ascontiguousarray(np.moveaxis(a, 1, -1))

    ref = opdef.reference(arrays, opdef.normalize_attrs(attrs))
    nattrs = opdef.normalize_attrs({**attrs, "layout": "NHWC"})
    got = opdef.reference([nhwc(i, a) for i, a in enumerate(arrays)], nattrs)
    types = opdef.infer([None if a is None else TensorType(
        "f32", nhwc(i, a).shape) for i, a in enumerate(arrays)], nattrs)
    for r, y, t in zip(ref, got, types, strict=False):
        np.testing.assert_array_equal(y, np.moveaxis(r, 1, -1))
        assert t.shape == y.shape and t.layout == "NHWC"


def test_layout_attr_text_round_trip_and_tags():
    g = _parse("""
graph @t(%x: f32[1,5,5,2] NHWC) {
  %w: f32[3,2,1,1] = const
  %y: f32[1,5,5,3] NHWC = conv(%x, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0],
                                            dilations=[1, 1], layout="NHWC"}
  %z: f32[1,3,5,5] NCHW = transpose(%y) {perm=[0, 3, 1, 2]}
  %f: f32[1,75] = reshape(%z) {shape=[1, 75]}
  return %f
}""", w=_w(3, 2, 1, 1))
    assert to_text(from_text(to_text(g), constants=g.constants)) == to_text(g)
    assert g.node("y").attrs["layout"] == "NHWC"
    assert g.value("z").type.layout == "NCHW" and g.value("f").type.layout is None
    with pytest.raises(InputError, match="layout"):
        g.add_node("conv", [g.value("x"), g.value("w")], {
            "strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1], "layout": "NWHC"})


def test_conv_macs_read_channels_in_either_layout():
    conv = get_op("conv")
    attrs = conv.normalize_attrs({"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1]})
    w = TensorType("f32", (8, 4, 3, 3))
    nchw = conv.macs([TensorType("f32", (1, 4, 6, 6)), w], [TensorType("f32", (1, 8, 4, 4))],
                     attrs)
    nhwc = conv.macs([TensorType("f32", (1, 6, 6, 4)), w], [TensorType("f32", (1, 4, 4, 8))],
                     {**attrs, "layout": "NHWC"})
    assert nchw == nhwc == 8 * 16 * 4 * 9


# -- reshape planning ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape, target, expect", [
    ((1, 512, 1, 1), (1, 512), ([1, 512], (0, 1))),           # flatten after a global pool
    ((2, 8, 3, 5), (2, 8, 15), ([2, 15, 8], (0, 2, 1))),        # merge H and W only
    ((2, 8, 3, 5), (2, 4, 2, 3, 5), ([2, 3, 5, 4, 2], (0, 3, 4, 1, 2))),  # split C
    ((2, 8, 3, 5), (2, 120), None),                            # flatten: mixes C with H, W
    ((1, 6, 4, 4), (1, 2, 3, 16), ([1, 16, 2, 3], (0, 3, 1, 2))),  # split C, merge H, W
    ((1, 6, 4, 4), (1, 4, 6, 4), None),
])
def test_reshape_plan(shape, target, expect):
    plan = reshape_plan(shape, to_last(4), target)
    assert plan == expect
    if plan is not None:  # reshaping the held data gives the result in the returned order
        x = _w(*shape)
        held = np.transpose(x, to_last(4)).reshape(plan[0])
        np.testing.assert_array_equal(held, np.transpose(x.reshape(target), plan[1]))


# -- convert-layout: golden cases ----------------------------------------------------------------
SMALL = """
graph @small(%x: f32[1,3,8,8]) {
  %w: f32[4,3,3,3] = const
  %bias: f32[1,4,1,1] = const [0.5, -1.0, 0.25, 2.0]
  %scale: f32[4,1,1] = const [1.0, 2.0, 3.0, 4.0]
  %c: f32[1,4,8,8] = conv(%x, %w, _) {strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1]}
  %b: f32[1,4,8,8] = add(%c, %bias)
  %s: f32[1,4,8,8] = mul(%b, %scale)
  %r: f32[1,4,8,8] = relu(%s)
  %cat: f32[1,8,8,8] = concat(%r, %c) {axis=1}
  %sm: f32[1,8,8,8] = softmax(%cat) {axis=1}
  %m: f32[1,1,8,8] = reduce_mean(%sm) {axes=[1]}
  %p: f32[1,8,4,4] = max_pool(%sm) {kernel=[2, 2], strides=[2, 2], pads=[0, 0, 0, 0],
                                    dilations=[1, 1]}
  return %p, %m
}"""

FLATTEN = """
graph @flatten(%x: f32[1,2,4,4]) {
  %w: f32[3,2,1,1] = const
  %fc: f32[5,48] = const
  %c: f32[1,3,4,4] = conv(%x, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %f: f32[1,48] = reshape(%c) {shape=[1, 48]}
  %y: f32[1,5] = gemm(%f, %fc) {trans_b=1}
  return %y
}"""


def _small() -> Graph:
    return _parse(SMALL, w=_w(4, 3, 3, 3))


def test_convert_golden_fires():
    out = _convert(_small())
    assert_golden("layout_convert_fires", out)
    # one transpose in, one back for each 4-D output
    assert _transposes(out) == ["x.nhwc", "p.nchw", "m.nchw"]
    assert all(n.attrs.get("layout", "NHWC") == "NHWC" for n in out.nodes)


def test_convert_golden_flatten_gets_transpose_back():
    g = _parse(FLATTEN, w=_w(3, 2, 1, 1), fc=_w(5, 48))
    out = _convert(g)
    assert_golden("layout_convert_flatten", out)
    assert _transposes(out) == ["x.nhwc", "c.nchw"]
    assert out.node("f").inputs[0].name == "c.nchw"


KEEPS = """
graph @keeps(%x: f32[2,6], %img: u8[1,3,4,4]) {
  %w: f32[4,6] = const
  %y: f32[2,4] = gemm(%x, %w) {trans_b=1}
  %r: f32[2,4] = softmax(%y) {axis=-1}
  %s: u8[1,3,2,4] = slice(%img) {starts=[0], ends=[2], axes=[2]}
  return %r, %s
}"""


def test_convert_golden_keeps_graph_without_layout():
    g = _parse(KEEPS, w=_w(4, 6))
    out = _convert(g)
    assert to_text(out) == to_text(g)
    assert_golden("layout_convert_keeps", out)


def test_convert_is_idempotent_and_converts_back():
    once = _convert(_small())
    twice = _convert(once)
    assert to_text(twice) == to_text(once)
    back = _convert(once, "NCHW")
    assert all(n.attrs.get("layout", "NCHW") == "NCHW" for n in back.nodes)
    assert _transposes(back) == []


def test_transpose_pairs_cancel():
    g = _parse("""
graph @pairs(%x: f32[1,5,5,2] NHWC) {
  %w: f32[3,2,1,1] = const
  %t: f32[1,2,5,5] = transpose(%x) {perm=[0, 3, 1, 2]}
  %c: f32[1,3,5,5] = conv(%t, %w, _) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %u: f32[1,5,5,3] = transpose(%c) {perm=[0, 2, 3, 1]}
  return %u
}""", w=_w(3, 2, 1, 1))
    out = _convert(g)
    assert _transposes(out) == []
    assert [n.op for n in out.nodes] == ["conv"] and out.outputs[0].name == "u"
    assert_golden("layout_convert_cancel", out)


# -- convert-layout: models and every rule -------------------------------------------------------
@pytest.mark.parametrize("model", ["resnet18", "mobilenet_v2"])
def test_convert_torch_models(model):
    from hbc.models import mobilenet, resnet
    from hbc.models.common import seeded_init

    build = {"resnet18": resnet.resnet18, "mobilenet_v2": mobilenet.mobilenet_v2}[model]
    net = seeded_init(build(num_classes=10)).eval()
    g = hbc.load((net, (torch.randn(1, 3, 64, 64),)))
    out = _convert(g)
    # the flatten after the global pool keeps the memory order: no transpose before it
    assert _transposes(out) == ["x.nhwc"]
    sensitive = [n for n in out.nodes if "layout" in n.attrs]
    assert sensitive and all(n.attrs["layout"] == "NHWC" for n in sensitive)
    assert all(n.outputs[0].type.layout == "NHWC" for n in sensitive)
    assert out.inputs[0].type.layout == "NCHW" and out.outputs[0].shape == (1, 10)


RULES = """
graph @rules(%x: f32[1,8,6,6], %y: f32[1,2,6,6], %grid: f32[1,3,3,2]) {
  %w: f32[8,2,3,3] = const
  %wt: f32[8,1,2,2] = const
  %k: f32[8] = const
  %idx: i64[2] = const [2, 0]
  %slope: f32[8,1,1] = const
  %a: f32[1,8,6,6] = conv_fused(%y, %w, _, %x) {strides=[1, 1], pads=[1, 1, 1, 1],
                                               dilations=[1, 1], activation="relu6"}
  %s: f32[1,8,6,6] = add(%x, %a)
  %pr: f32[1,8,6,6] = prelu(%s, %slope)
  %lo, %hi: f32[1,3,6,6], f32[1,5,6,6] = split(%pr) {axis=1, sizes=[3, 5]}
  %pd: f32[1,3,7,9] = pad(%lo) {pads=[0, 0, 1, 2, 0, 0, 0, 1], mode="reflect"}
  %rs: f32[1,3,14,9] = resize(%pd) {size=[1, 3, 14, 9], scales=[1.0, 1.0, 2.0, 1.0], mode="linear"}
  %sl: f32[1,3,7,9] = slice(%rs) {starts=[1], ends=[14], axes=[-2], steps=[2]}
  %d2s: f32[1,2,12,12] = depth_to_space(%pr) {blocksize=2, mode="DCR"}
  %ct: f32[1,2,12,12] = conv_transpose(%a, %wt, _) {strides=[2, 2], pads=[0, 0, 0, 0],
                          dilations=[1, 1], output_padding=[0, 0], groups=2}
  %sum: f32[1,2,12,12] = add(%d2s, %ct)
  %s2d: f32[1,8,6,6] = space_to_depth(%sum) {blocksize=2}
  %ss: f32[1,8,6,6] = scale_shift(%s2d, %k, %k) {axis=1}
  %g: f32[1,8,2,6] = gather(%ss, %idx) {axis=2}
  %am: i64[1,2,6] = argmax(%g) {axis=1, keepdims=0}
  %mx: f32[1,8] = reduce_max(%g) {axes=[2, 3], keepdims=0}
  %gs: f32[1,8,3,3] = grid_sample(%ss, %grid)
  %ap: f32[1,8,1,1] = global_max_pool(%gs)
  %q: i8[1,8,3,3] q(scale=0.05) = quantize(%gs) {scale=[0.05]}
  %dq: f32[1,8,3,3] = dequantize(%q)
  %sm: f32[1,8,3,3] = softmax(%dq) {axis=-3}
  %r3: f32[1,8,9] = reshape(%sm) {shape=[1, 8, 9]}
  %hm: f32[1,5,6,1] = reduce_mean(%hi) {axes=[-1]}
  return %sl, %am, %mx, %ap, %r3, %hm
}"""


def test_convert_every_rule_keeps_numerics():
    g = _parse(RULES, w=_w(8, 2, 3, 3), wt=_w(8, 1, 2, 2), k=_w(8), slope=_w(8, 1, 1))
    out = _convert(g)
    # inputs x and y are converted, grid is not; back to NCHW only at the 4-D/3-D outputs
    assert sorted(_transposes(out)) == ["ap.nchw", "hm.nchw", "r3.nchw", "sl.nchw", "x.nhwc",
                                        "y.nhwc"]
    assert out.node("lo").attrs["axis"] == 3 and out.node("mx").attrs["axes"] == [1, 2]
    assert out.node("hm").attrs["axes"] == [2] and out.node("sm").attrs["axis"] == 3
    assert out.value("am").shape == (1, 2, 6)  # argmax over C: back in the original order
    assert out.node("sl").attrs["axes"] == [1] and out.node("pd").attrs["pads"] == [
        0, 1, 2, 0, 0, 0, 1, 0]
    assert out.value("r3.nhwc").shape == (1, 9, 8)  # [N, H*W, C]: no transpose before it


@pytest.mark.parametrize("rank", [3, 5])
def test_convert_1d_and_3d_convs(rank):
    spatial = [5, 4, 3][: rank - 2]
    g = Graph("nd")
    x = g.add_input("x", TensorType("f32", (1, 2, *spatial)))
    w = g.add_constant("w", _w(3, 2, *[2] * (rank - 2)))
    c = g.add_node("conv", [x, w], {"strides": [1] * (rank - 2), "pads": [0] * (2 * rank - 4),
                                    "dilations": [1] * (rank - 2)}, name="c").outputs[0]
    m = g.add_node("reduce_sum", [c], {"axes": [1], "keepdims": 1}, name="m").outputs[0]
    g.set_outputs([m])
    out = _convert(g)
    assert _transposes(out) == ["x.nhwc", "m.nchw"]
    assert out.node("m").attrs["axes"] == [rank - 1]


def test_convert_rejects_an_unknown_layout():
    with pytest.raises(Exception, match="NWHC"):
        run(_small(), passes="convert-layout{layout=NWHC}")


# -- check-layout --------------------------------------------------------------------------------
def _check(g: Graph, **opts: str) -> None:
    run(g, passes=[("check-layout", opts)])


def test_check_passes_on_converted_model_with_declared_rgb_input():
    out = _convert(_small())
    out.meta["input_types"] = {"x": "rgb"}
    _check(out)
    _check(_small(), layout="NCHW")


def test_check_reports_ops_in_a_disallowed_layout():
    with pytest.raises(PassError) as e:
        _check(_small())
    msg = str(e.value)
    assert "2 layout problem(s)" in msg and "hint: run convert-layout" in msg
    assert "conv node 'c': layout NCHW is not allowed (allowed: NHWC)" in msg
    assert "max_pool node 'p'" in msg


def _images() -> Graph:
    g = Graph("images")
    for name, shape, layout in [("cam", (1, 4, 6, 6), None), ("ir", (1, 3, 6, 6), None),
                                ("yuv", (1, 3, 5, 6), None), ("bgr", (1, 6, 6, 3), "NHWC"),
                                ("vec", (1, 3), None), ("im_hw", (1, 2), None)]:
        g.add_input(name, TensorType("f32", shape, layout))
    outs = [g.add_node("relu", [v]).outputs[0] for v in g.inputs[:5]]
    g.set_outputs(outs)
    return g


def test_check_reports_every_input_problem_naming_the_input():
    g = _images()
    g.meta["input_types"] = {"cam": "rgb", "ir": "gray", "yuv": "nv12", "bgr": "bgr",
                             "vec": "yuv444", "im_hw": "featuremap", "gone": "rgb"}
    with pytest.raises(PassError) as e:
        _check(g)
    lines = str(e.value).splitlines()[1:]
    assert len(lines) == 6, lines
    expect = ["'gone', which is not an input",
              "input 'cam' (rgb, shape [1, 4, 6, 6]): needs 3 channel(s) on the axis 1, has 4",
              "input 'ir' (gray, shape [1, 3, 6, 6]): needs 1 channel(s)",
              "input 'yuv' (nv12, shape [1, 3, 5, 6]): needs even H and W",
              "input 'vec' (yuv444, shape [1, 3]): an image input must have rank 4",
              "input 'im_hw' feeds nothing"]
    for line, text in zip(lines, expect, strict=True):
        assert text in line


def test_check_accepts_consistent_inputs_and_nhwc_images():
    g = _images()
    g.remove_value(g.value("im_hw"))
    g.meta["input_types"] = {"cam": "featuremap", "yuv": "yuv444", "bgr": "bgr", "ir": "rgb"}
    _check(g)
    g.meta["input_types"] = {"bgr": "gray"}
    with pytest.raises(PassError, match=r"input 'bgr'.*on the last axis \(NHWC\), has 3"):
        _check(g)
    g.meta["input_types"] = {"ir": "yuv420"}
    with pytest.raises(PassError, match="unknown input type 'yuv420'"):
        _check(g)


def test_check_reports_a_tag_that_contradicts_the_op_layout():
    g = _parse("""
graph @tags(%x: f32[1,5,5,2] NHWC) {
  %p: f32[1,5,1,1] NCHW = global_avg_pool(%x)
  return %p
}""")
    with pytest.raises(PassError) as e:
        _check(g)
    assert "input %x is tagged NHWC but the op reads NCHW" in str(e.value)
    _check(_convert(g))
