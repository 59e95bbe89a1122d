"""ONNX export (``hbc.frontend.onnx_export``): exported models run in onnxruntime and give the
interpreter's numbers.

* every ONNX backend conformance case of our op set: import, export, onnxruntime on the export
  equals ``hbc.interpret`` of the import (cases onnxruntime itself cannot run are skipped and
  counted, with the reason);
* ResNet-18 and MobileNetV2 after the O3 pipeline (fused ops), in NCHW and converted to NHWC;
* hand-written graphs for what the importer never produces: NHWC layouts, conv_fused with a
  residual and clip, linear on 3-D input, scale_shift, quantize/dequantize, resize encodings;
* ``hbc merge a.onnx b.onnx -o m.onnx`` through the CLI; errors listing every unsupported node.
"""

from __future__ import annotations

import collections
import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import hbc
from hbc.errors import InputError, UnsupportedError
from hbc.frontend import onnx_export
from hbc.frontend.onnx_export import export_onnx, load_exporters
from hbc.ir.graph import Graph, legal_name
from hbc.ir.interpret import interpret
from hbc.ir.parser import from_text
from hbc.ir.registry import all_ops
from hbc.ir.types import TensorType
from tests.conformance import _array, cases
from tests.passes_util import random_inputs

ort.set_default_logger_severity(3)

#: dtypes onnxruntime's Python API cannot pass in or out, and the type they travel as
_CARRIER = {"bfloat16": TensorProto.FLOAT, "float8": TensorProto.FLOAT,
            "float4": TensorProto.FLOAT, "int4": TensorProto.INT8, "int2": TensorProto.INT8,
            "uint4": TensorProto.UINT8, "uint2": TensorProto.UINT8}


def _carrier(elem_type: int) -> int | None:
    name = helper.tensor_dtype_to_np_dtype(elem_type).name
    return next((c for k, c in _CARRIER.items() if name.startswith(k)), None)


def _for_ort(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with bf16/float8/int4 graph inputs and outputs carried as f32/i8/u8 (an exact
    Cast at the edge), because onnxruntime's Python API cannot bind those numpy dtypes."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    edge = []
    for vi in g.input:
        carrier = _carrier(vi.type.tensor_type.elem_type)
        if carrier is not None:
            inner = vi.name + "__narrow"
            for node in g.node:
                node.input[:] = [inner if n == vi.name else n for n in node.input]
            edge.append(helper.make_node("Cast", [vi.name], [inner],
                                         to=vi.type.tensor_type.elem_type))
            vi.type.tensor_type.elem_type = carrier
    if edge:
        nodes = edge + list(g.node)
        del g.node[:]
        g.node.extend(nodes)
    for vi in g.output:
        carrier = _carrier(vi.type.tensor_type.elem_type)
        if carrier is not None:
            inner = vi.name + "__narrow"
            for node in g.node:
                node.output[:] = [inner if n == vi.name else n for n in node.output]
            g.node.append(helper.make_node("Cast", [inner], [vi.name], to=carrier))
            vi.type.tensor_type.elem_type = carrier
    return m


def run_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Outputs of ``model`` in onnxruntime by name (narrow dtypes carried as wide ones)."""
    m = _for_ort(model)
    wide = {vi.name: helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            for vi in m.graph.input}
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {k: np.asarray(v).astype(wide[k]) for k, v in feed.items()})
    return {vi.name: o for vi, o in zip(m.graph.output, outs, strict=True)}


def mismatch(got: np.ndarray, want: np.ndarray, rtol: float = 1e-4) -> str | None:
    """None when onnxruntime's ``got`` equals the interpreter's ``want``: bit-exact for
    integers and narrow floats (compared in f32), else within ``rtol`` of the output's range."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != {list(want.shape)}"
    if want.dtype.kind == "f" and want.dtype.itemsize >= 2 and want.dtype.name.startswith(
            "float"):
        a, b = got.astype(np.float64), want.astype(np.float64)
        finite = np.isfinite(b)
        if not np.array_equal(np.isnan(a), np.isnan(b)) or not np.array_equal(
                a[~finite & ~np.isnan(b)], b[~finite & ~np.isnan(b)]):
            return "NaN/inf positions differ"
        scale = max(float(np.ptp(b[finite])) if finite.any() else 0.0, 1e-3)
        err = float(np.max(np.abs(a[finite] - b[finite]), initial=0.0))
        return None if err <= rtol * scale else f"max abs error {err:.3g} (range {scale:.3g})"
    if want.dtype.kind in "biu":
        ok = np.array_equal(got.astype(want.dtype), want)
    else:  # ml_dtypes narrow floats, carried as f32
        ok = np.array_equal(got.astype(np.float32), want.astype(np.float32), equal_nan=True)
    return None if ok else "values differ"


def assert_export_matches(graph: Graph, feed: dict[str, np.ndarray] | None = None,
                          rtol: float = 1e-4) -> onnx.ModelProto:
    feed = random_inputs(graph) if feed is None else feed
    model = export_onnx(graph)
    want = interpret(graph, feed)
    got = run_ort(model, feed)
    assert list(got) == list(want)
    for name in want:
        problem = mismatch(got[name], want[name], rtol)
        assert problem is None, f"output {name}: {problem}"
    return model


def test_every_float_op_has_an_exporter():
    """Every op but the integer kernels of the lowered quantized graph (category "quant" besides
    quantize/dequantize), whose fixed-point rescaling has no ONNX export yet."""
    ops = all_ops()
    missing = sorted(set(ops) - set(load_exporters()))
    assert [op for op in missing if ops[op].category != "quant"] == []
    assert {"quantize", "dequantize", "conv_fused", "linear", "scale_shift"} <= set(
        load_exporters())


# -- conformance round trip -------------------------------------------------------------------
def _ort_cannot(message: str) -> bool:
    return "NOT_IMPLEMENTED" in message or "No corresponding Numpy type" in message


def _round_trip(case) -> tuple[str, str]:
    """('pass' | 'fail' | 'skip', reason) of one conformance case through export."""
    from hbc.frontend.onnx_import import static_input_names

    model = case.model
    inits = {t.name for t in model.graph.initializer}
    names = [vi.name for vi in model.graph.input if vi.name not in inits]
    inputs, expected = case.data_sets[0] if case.data_sets else ([], [])
    feed = dict(zip(names, [_array(a) for a in inputs], strict=False))
    static = {n: feed[n] for n in static_input_names(model) if n in feed}
    try:
        graph = hbc.load(model, constant_inputs=static)
    except hbc.HbcError as e:
        return "skip", f"hbc does not import it ({str(e)[:80]})"
    feed = {legal_name(k): v for k, v in feed.items() if k not in static}
    want = interpret(graph, feed)
    orig = _original_in_ort(model, case, dict(zip(names, [_array(a) for a in inputs],
                                                  strict=False)), expected)
    if orig is not None and orig.startswith("deviates"):
        return "skip", f"onnxruntime {orig}"
    try:
        got = run_ort(export_onnx(graph), feed)
    except Exception as e:  # onnxruntime's own errors have no common base class
        message = str(e).splitlines()[0]
        if _ort_cannot(message) or (orig is not None and orig.startswith("fails")):
            return "skip", f"onnxruntime cannot run it ({message[:100]})"
        return "fail", f"{type(e).__name__}: {message[:200]}"
    exported = None
    for name in want:
        problem = mismatch(got[name], want[name], rtol=1e-4)
        if problem:
            exported = exported or export_onnx(graph)
            if _reference_agrees(exported, feed, want):
                # the export is right by the ONNX reference itself; onnxruntime differs on it
                # (e.g. 4-bit casts of out-of-range values, where it cannot run the original)
                return "skip", "onnxruntime deviates from the ONNX reference output"
            return "fail", f"output {name}: {problem}"
    return "pass", ""


def _reference_agrees(model, feed, want) -> bool:
    """Whether onnx's reference evaluator computes ``want`` from the exported ``model``."""
    from onnx.reference import ReferenceEvaluator

    try:
        outs = ReferenceEvaluator(model).run(None, feed)
    except Exception:  # the reference implements most, not all, operators
        return False
    names = [o.name for o in model.graph.output]
    return all(name in want and not mismatch(np.asarray(o), want[name], rtol=1e-4)
               for name, o in zip(names, outs, strict=True))


def _original_in_ort(model, case, feed, expected) -> str | None:
    """None when onnxruntime runs the case's own model and matches its expected outputs;
    'deviates ...' when it runs it with other numbers (its own deviation from the ONNX
    reference); 'fails ...' when it loads but cannot run it; None when it cannot load it (an
    IR version newer than it knows: the export, at a lower opset, may still run)."""
    try:
        sess = ort.InferenceSession(model.SerializeToString(),
                                    providers=["CPUExecutionProvider"])
    except Exception:
        return None
    try:
        outs = sess.run(None, feed)
    except Exception as e:
        return f"fails: {str(e).splitlines()[0][:80]}"
    for o, e in zip(outs, expected, strict=False):
        e = _array(e)
        if e.dtype.kind == "f" and mismatch(o, e, rtol=1e-3):
            return "deviates from the ONNX reference output"
    return None


def test_conformance_cases_round_trip_through_onnxruntime():
    counts: collections.Counter[str] = collections.Counter()
    skips: collections.Counter[str] = collections.Counter()
    failures = []
    for case in cases():
        status, reason = _round_trip(case)
        counts[status] += 1
        if status == "skip":
            skips[reason.split(" (")[0]] += 1
        elif status == "fail":
            failures.append(f"{case.name}: {reason}")
    ran = counts["pass"] + counts["fail"]
    print(f"\nONNX export round trip: {counts['pass']}/{ran} cases passed, {counts['skip']} "
          f"skipped ({dict(skips)})")
    for f in failures:
        print("  FAIL", f)
    assert ran >= 400, f"only {ran} cases ran"
    assert counts["pass"] / ran >= 0.97, "\n".join(failures)


# -- models through O3 --------------------------------------------------------------------------
@pytest.mark.parametrize("model, layout", [("resnet18", "NCHW"), ("mobilenet_v2", "NCHW"),
                                           ("resnet18", "NHWC")])
def test_o3_model_exports_and_matches_interpreter(tmp_path, model, layout):
    import torch

    from hbc.models import mobilenet, resnet
    from hbc.models.common import export_onnx as torch_export
    from hbc.models.common import seeded_init
    from hbc.passes import run

    build = {"resnet18": resnet.resnet18, "mobilenet_v2": mobilenet.mobilenet_v2}[model]
    net = seeded_init(build(num_classes=10))
    src = tmp_path / f"{model}.onnx"
    torch_export(net, [torch.randn(1, 3, 64, 64)], str(src))
    g = run(hbc.load(src), opt=3)
    if layout == "NHWC":
        g = run(g, passes=[("convert-layout", {"layout": "NHWC"})])
        assert any(n.attrs.get("layout") == "NHWC" for n in g.nodes)
    ops = {n.op for n in g.nodes}
    assert "conv_fused" in ops and "linear" in ops
    out = tmp_path / "exported.onnx"
    model_proto = export_onnx(g, out)
    assert onnx.load(str(out)) == model_proto
    assert [vi.name for vi in model_proto.graph.input] == [v.name for v in g.inputs]
    assert {n.name for n in model_proto.graph.node} >= {n.name for n in g.nodes}
    feed = random_inputs(g)
    want = interpret(g, feed)
    got = run_ort(model_proto, feed)
    for name, y in want.items():
        assert mismatch(got[name], y, rtol=1e-4) is None, name


# -- hand-written graphs ------------------------------------------------------------------------
RNG = np.random.default_rng(5)


def _w(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def _parse(body: str, **constants: np.ndarray) -> Graph:
    return from_text("hbir 1\n" + body.strip() + "\n", constants=constants)


FUSED_NHWC = """
graph @fused(%x: f32[1,6,6,4], %r: f32[1,6,6,8], %t: f32[2,3,8]) {
  %w: f32[8,4,3,3] = const
  %b: f32[8] = const
  %wl: f32[5,8] = const
  %bl: f32[5] = const
  %k: f32[8] = const
  %g: f32[1,4,2,2] = const
  %c: f32[1,6,6,8] = conv_fused(%x, %w, %b, %r) {strides=[1, 1], pads=[1, 1, 1, 1],
      dilations=[1, 1], layout="NHWC", activation="clip", clip_min=-0.5, clip_max=1.5}
  %mp, %idx: f32[1,3,3,8], i64[1,3,3,8] = max_pool(%c) {kernel=[2, 2], strides=[2, 2],
      pads=[0, 0, 0, 0], dilations=[1, 1], layout="NHWC"}
  %ap: f32[1,3,3,8] = avg_pool(%c) {kernel=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1],
      dilations=[1, 1], count_include_pad=1, layout="NHWC"}
  %bn: f32[1,3,3,8] = batch_norm(%ap, %k, %b, %b, %k) {epsilon=10.0, layout="NHWC"}
  %ct: f32[1,6,6,8] = conv_transpose(%bn, %w, _) {strides=[2, 2], pads=[1, 1, 1, 1],
      dilations=[1, 1], output_padding=[1, 1], groups=2, layout="NHWC"}
  %d2s: f32[1,6,6,2] = depth_to_space(%mp) {blocksize=2, mode="CRD", layout="NHWC"}
  %s2d: f32[1,3,3,8] = space_to_depth(%d2s) {blocksize=2, mode="CRD", layout="NHWC"}
  %s2d2: f32[1,3,3,8] = space_to_depth(%d2s) {blocksize=2, layout="NHWC"}
  %gs: f32[1,4,2,8] = grid_sample(%ct, %g) {mode="bicubic", padding_mode="reflection",
      layout="NHWC"}
  %gp: f32[1,1,1,8] = global_avg_pool(%gs) {layout="NHWC"}
  %ss: f32[1,6,6,8] = scale_shift(%ct, %k, %b) {axis=-1}
  %lin: f32[2,3,5] = linear(%t, %wl, %bl) {activation="relu6"}
  %gp_flat: f32[1,8] = reshape(%gp) {shape=[1, 8]}
  %lin2: f32[1,5] = linear(%gp_flat, %wl, _) {activation="relu"}
  return %mp, %idx, %s2d, %s2d2, %gs, %ss, %lin, %lin2
}"""


def test_nhwc_and_fused_ops_match_interpreter():
    g = _parse(FUSED_NHWC, w=_w(8, 4, 3, 3), b=_w(8), wl=_w(5, 8), bl=_w(5),
               k=np.abs(_w(8)) + 0.5, g=np.tanh(_w(1, 4, 2, 2)))
    model = assert_export_matches(g)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["Conv"] == 1 and ops["Gemm"] == 1 and ops["MatMul"] == 1 and ops["Clip"] == 2
    assert ops["SpaceToDepth"] == 1 and model.opset_import[0].version == 17
    names = {n.name for n in model.graph.node}
    assert {"c", "mp", "ct", "gs", "lin"} <= names and "c/to_nchw" in names
    assert {t.name for t in model.graph.initializer} >= {"w", "b", "wl", "bl", "k", "g"}


QDQ = """
graph @qdq(%x: f32[2,3,4], %h: f16[2,3]) {
  %w: i8[3,4] q(scale=[0.1, 0.2, 0.3], axis=0) = const
  %q: u8[2,3,4] q(scale=0.05, zero_point=128) = quantize(%x) {dtype="u8", scale=[0.05],
      zero_point=[128]}
  %qa: i8[2,3,4] q(scale=[0.1, 0.2, 0.4], axis=1) = quantize(%x) {scale=[0.1, 0.2, 0.4],
      axis=1}
  %dq: f32[2,3,4] = dequantize(%q)
  %dqa: f16[2,3,4] = dequantize(%qa) {dtype="f16"}
  %dw: f32[3,4] = dequantize(%w)
  %y: f32[2,3,4] = mul(%dq, %dw)
  %s16: f16[3] = const [0.5, 1.5, -2.0]
  %hs: f16[2,3] = scale_shift(%h, %s16, %s16) {axis=1}
  %c: i32[2,3,4] = cast(%qa) {to="i32"}
  %cl: i32[2,3,4] = clip(%c) {min=-3.5, max=2.5}
  return %y, %dqa, %hs, %cl
}"""


def test_quantize_dequantize_cast_and_f16_match_interpreter():
    g = _parse(QDQ, w=RNG.integers(-128, 128, (3, 4)).astype(np.int8))
    model = assert_export_matches(g, rtol=1e-3)
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 3
    # f16 input: QuantizeLinear-19 is needed only for f16 inputs, so opset 17 stays
    assert model.opset_import[0].version == 17


@pytest.mark.parametrize("attrs, shape, expect", [
    ({"size": [1, 2, 5, 7], "scales": [1.0, 1.0, 5 / 3, 7 / 4], "mode": "linear"},
     (1, 2, 3, 4), "sizes"),
    ({"size": [1, 2, 7, 9], "scales": [1.0, 1.0, 2.5, 2.25], "mode": "cubic",
      "exclude_outside": 1}, (1, 2, 3, 4), "scales"),
    ({"size": [1, 2, 5, 6], "scales": [1.0, 1.0, 1.5, 1.5], "mode": "linear"},
     (1, 2, 3, 4), "keep_aspect_ratio_policy"),
    ({"size": [1, 2, 6, 8], "scales": [1.0, 1.0, 2.0, 2.0], "mode": "nearest",
      "coordinate_transformation_mode": "tf_half_pixel_for_nn"}, (1, 2, 3, 4), "Gather"),
    ({"size": [1, 2, 4, 4], "scales": [1.0, 1.0, 4 / 3, 1.0], "mode": "linear",
      "coordinate_transformation_mode": "tf_crop_and_resize",
      "roi": [0, 0, -0.1, 0, 1, 1, 1.2, 1], "extrapolation_value": 3.0},
     (1, 2, 3, 4), "roi"),
    ({"size": [1, 2, 2, 3], "scales": [1.0, 1.0, 0.6, 0.6], "mode": "linear",
      "antialias": 1, "coordinate_transformation_mode": "half_pixel_symmetric"},
     (1, 2, 4, 5), "opset 19"),
])
def test_resize_encodings_are_exact(attrs, shape, expect):
    g = Graph("resize")
    x = g.add_input("x", TensorType("f32", shape))
    g.set_outputs(g.add_node("resize", [x], attrs, name="y").outputs)
    model = assert_export_matches(g)
    node = model.graph.node
    if expect == "Gather":
        assert [n.op_type for n in node] == ["Gather", "Gather"]
        return
    (resize,) = node
    attr = {a.name for a in resize.attribute}
    inputs = list(resize.input) + [""] * (4 - len(resize.input))
    if expect == "sizes":
        assert inputs[3] and not inputs[2]
    elif expect == "scales":
        assert inputs[2] and not inputs[3]
    elif expect == "roi":
        assert inputs[1]
    elif expect == "opset 19":
        assert model.opset_import[0].version == 19 and "antialias" in attr
    else:
        assert expect in attr and model.opset_import[0].version == 18


def test_opset_is_raised_to_what_the_graph_needs(caplog):
    g = Graph("volume")
    x = g.add_input("x", TensorType("f32", (1, 2, 3, 4, 5)))
    grid = g.add_input("grid", TensorType("f32", (1, 2, 2, 2, 3)))
    g.set_outputs(g.add_node("grid_sample", [x, grid], {"mode": "bicubic"}, name="y").outputs)
    with caplog.at_level(logging.INFO, logger="hbc.frontend.onnx_export"):
        model = export_onnx(g)
    assert model.opset_import[0].version == 20
    assert "rank-5 input (GridSample-20)" in caplog.text
    assert {a.s for a in model.graph.node[0].attribute if a.name == "mode"} == {b"cubic"}
    assert export_onnx(g, opset=21).opset_import[0].version == 21
    with pytest.raises(InputError, match="opset 11 is outside"):
        export_onnx(g, opset=11)


# -- errors ---------------------------------------------------------------------------------------
def test_unsupported_ops_are_all_listed(monkeypatch):
    g = _parse("""
graph @two(%x: f32[1,4]) {
  %a: f32[1,4] = relu(%x)
  %b: f32[1,4] = tanh(%a)
  %c: f32[1,4] = relu(%b)
  return %c
}""")
    for op in ("relu", "tanh"):
        monkeypatch.delitem(onnx_export.EXPORTERS, op)
    with pytest.raises(UnsupportedError) as err:
        export_onnx(g)
    msg = str(err.value)
    assert "3 node(s) cannot be exported" in msg
    assert all(f"node '{n}'" in msg for n in ("a", "b", "c"))
    assert "op 'tanh' has no ONNX mapping" in msg


def test_unexportable_attributes_are_reported():
    g = Graph("q64")
    x = g.add_input("x", TensorType("f64", (2,)))
    g.set_outputs(g.add_node("quantize", [x], {"scale": [0.5]}, name="q").outputs)
    with pytest.raises(UnsupportedError, match=r"quantize node 'q': QuantizeLinear takes"):
        export_onnx(g)


# -- hbc merge -o MULTI.onnx -----------------------------------------------------------------------
def _task_model(path, head: str, seed: int, backbone_w: np.ndarray) -> None:
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(backbone_w, "backbone.conv.weight"),
             numpy_helper.from_array(rng.standard_normal((2, 4, 1, 1)).astype(np.float32),
                                     f"{head}.weight")]
    nodes = [helper.make_node("Conv", ["input", "backbone.conv.weight"], ["feat"],
                              name="backbone/conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["feat"], ["act"], name="backbone/relu"),
             helper.make_node("Conv", ["act", f"{head}.weight"], ["out"], name=f"{head}/conv")]
    g = helper.make_graph(nodes, head, [helper.make_tensor_value_info(
        "input", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "out", TensorProto.FLOAT, [1, 2, 8, 8])], initializer=inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what onnxruntime reads (onnx writes its newest by default)
    onnx.save(model, str(path))


def test_merge_cli_writes_onnx(tmp_path, hbc_cli):
    backbone = np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32)
    for seed, task in enumerate(("det", "seg")):
        _task_model(tmp_path / f"{task}.onnx", task, seed + 1, backbone)
    out = tmp_path / "multi.onnx"
    r = hbc_cli("merge", tmp_path / "det.onnx", tmp_path / "seg.onnx", "-o", out)
    assert r.returncode == 0, r.stderr
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp left
    model = onnx.load(str(out))
    assert [n.op_type for n in model.graph.node].count("Conv") == 3  # the backbone runs once
    feed = {"input": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    got = run_ort(model, feed)
    assert list(got) == ["det/out", "seg/out"]
    for task in ("det", "seg"):
        (alone,) = run_ort(onnx.load(str(tmp_path / f"{task}.onnx")), feed).values()
        np.testing.assert_allclose(got[f"{task}/out"], alone, rtol=1e-5, atol=1e-6)
