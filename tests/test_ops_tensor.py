"""Tensor, activation, reduce and quant ops: semantics the ONNX conformance cases do not cover.

Oracles: onnxruntime for whole ONNX models, onnx's reference evaluator for the narrow float
formats onnxruntime lacks, and numbers written out by hand for rounding and saturation
boundaries. Integer results are compared bit for bit.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hbc.errors import UnsupportedError
from hbc.frontend.onnx_import import import_onnx
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.types import QuantParams, TensorType

RNG = np.random.default_rng(7)


# -- helpers ----------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, initializers=(), opset=13) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = min(model.ir_version, 9)
    onnx.checker.check_model(model)
    return model


def _vi(name: str, elem: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _ours(model: onnx.ModelProto, feeds: dict) -> tuple[Graph, list[np.ndarray]]:
    g = import_onnx(model)
    return g, list(interpret(g, feeds).values())


def _single_node_graph(op: str, x: TensorType, attrs: dict) -> Graph:
    g = Graph()
    v = g.add_input("x", x)
    g.set_outputs(g.add_node(op, [v], attrs).outputs)
    return g


# -- QDQ: int8 symmetric quantization ---------------------------------------------------------
def _qdq_model() -> onnx.ModelProto:
    """x -> Q/DQ per tensor -> Q/DQ per channel (axis 1) -> + DQ(int8 weights, axis 0)."""
    a_scale = np.float32(0.02)
    c_scale = np.array([0.01, 0.03, 0.05], np.float32)
    w_scale = np.array([0.1, 0.2, 0.05], np.float32)
    w = RNG.integers(-127, 128, size=(3, 4, 4)).astype(np.int8)
    inits = [
        numpy_helper.from_array(np.array(a_scale), "a_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "a_zp"),
        numpy_helper.from_array(c_scale, "c_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "c_zp"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(3, np.int8), "w_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "a_scale", "a_zp"], ["q1"], name="q1"),
        helper.make_node("DequantizeLinear", ["q1", "a_scale", "a_zp"], ["dq1"], name="dq1"),
        helper.make_node("QuantizeLinear", ["dq1", "c_scale", "c_zp"], ["q2"], axis=1),
        helper.make_node("DequantizeLinear", ["q2", "c_scale", "c_zp"], ["dq2"], axis=1),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=0),
        helper.make_node("Add", ["dq2", "wd"], ["y"]),
    ]
    return _model(nodes, [_vi("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                  [_vi("y", TensorProto.FLOAT, [1, 3, 4, 4]), _vi("q1", TensorProto.INT8,
                                                                  [1, 3, 4, 4]),
                   _vi("q2", TensorProto.INT8, [1, 3, 4, 4])], inits)


def test_int8_qdq_matches_onnxruntime():
    model = _qdq_model()
    x = (RNG.standard_normal((1, 3, 4, 4)) * 2).astype(np.float32)
    x[0, 0, 0, :2] = [10.0, -10.0]  # saturates at +-127 / -128
    _, ours = _ours(model, {"x": x})
    ref = _ort(model, {"x": x})
    np.testing.assert_array_equal(ours[1], ref[1])
    np.testing.assert_array_equal(ours[2], ref[2])
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-6, atol=1e-7)
    assert ours[1].min() == -128 and ours[1].max() == 127


def test_int8_qdq_types_carry_scales():
    g = import_onnx(_qdq_model())
    q1 = g.node("q1").outputs[0]
    assert q1.type == TensorType("i8", (1, 3, 4, 4), quant=QuantParams((float(np.float32(0.02)),)))
    q2 = next(n for n in g.nodes if n.op == "quantize" and n is not g.node("q1")).outputs[0]
    assert q2.type.quant.axis == 1
    assert q2.type.quant.scale == tuple(float(s) for s in np.float32([0.01, 0.03, 0.05]))
    w = g.value("w")
    assert w.is_const and w.type.quant == QuantParams(
        tuple(float(s) for s in np.float32([0.1, 0.2, 0.05])), axis=0)
    # the dequantize nodes read from those types; nothing is folded away
    assert sum(n.op == "dequantize" for n in g.nodes) == 3
    text = to_text(g)
    assert to_text(from_text(text, constants=g.constants)) == text


def test_dequantize_of_int8_graph_input_retypes_the_input():
    scale = np.array([0.5, 0.25], np.float32)
    model = _model(
        [helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], axis=0)],
        [_vi("xq", TensorProto.INT8, [2, 3])], [_vi("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(scale, "s")],
    )
    xq = np.array([[-128, 0, 127], [1, -1, 5]], np.int8)
    g, ours = _ours(model, {"xq": xq})
    assert g.inputs[0].type.quant == QuantParams((0.5, 0.25), axis=0)
    np.testing.assert_array_equal(ours[0], _ort(model, {"xq": xq})[0])


def test_shared_weight_with_two_scales_gets_a_quantized_copy():
    w = np.arange(-3, 3, dtype=np.int8).reshape(2, 3)
    model = _model(
        [helper.make_node("DequantizeLinear", ["w", "s1"], ["a"]),
         helper.make_node("DequantizeLinear", ["w", "s2"], ["b"]),
         helper.make_node("Add", ["a", "b"], ["y"])],
        [], [_vi("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.float32(0.5), "s1"),
         numpy_helper.from_array(np.float32(0.125), "s2")],
    )
    g, ours = _ours(model, {})
    scales = sorted(n.inputs[0].type.quant.scale[0] for n in g.nodes if n.op == "dequantize")
    assert scales == [0.125, 0.5]
    np.testing.assert_array_equal(ours[0], w.astype(np.float32) * 0.625)


def test_dequantize_of_unquantized_node_result_is_rejected():
    model = _model(
        [helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT8, name="to_int"),
         helper.make_node("DequantizeLinear", ["xi", "s"], ["y"], name="dq")],
        [_vi("x", TensorProto.FLOAT, [4])], [_vi("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.float32(0.5), "s")],
    )
    with pytest.raises(UnsupportedError, match=r"DequantizeLinear node 'dq'.*no quantization"):
        import_onnx(model)


def test_blocked_quantization_is_rejected_with_reason():
    model = _model(
        [helper.make_node("DequantizeLinear", ["xq", "s"], ["y"], axis=1, block_size=2)],
        [_vi("xq", TensorProto.INT8, [2, 4])], [_vi("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(np.ones((2, 2), np.float32), "s")], opset=21,
    )
    with pytest.raises(UnsupportedError, match="block_size=2"):
        import_onnx(model)


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.5, 1000, -128.5, -1000, 3.49],
                 np.float32)
    g = _single_node_graph("quantize", TensorType("f32", x.shape), {"dtype": "i8", "scale": [1.0]})
    got = interpret(g, {"x": x})
    expected = np.array([0, 2, 2, 0, -2, -2, 126, 127, 127, -128, -128, 3], np.int8)
    np.testing.assert_array_equal(next(iter(got.values())), expected)


@pytest.mark.parametrize(("dtype", "lo", "hi"), [("i4", -8, 7), ("u4", 0, 15), ("u8", 0, 255),
                                                 ("i16", -32768, 32767)])
def test_quantize_saturates_to_the_type_range(dtype, lo, hi):
    x = np.array([-1e6, -2.5, 2.5, 1e6], np.float32)
    g = _single_node_graph("quantize", TensorType("f32", x.shape), {"dtype": dtype, "scale": [0.5]})
    got = next(iter(interpret(g, {"x": x}).values())).astype(np.int64)
    np.testing.assert_array_equal(got, np.clip([-2e6, -5, 5, 2e6], lo, hi))


# -- softmax before opset 13 ------------------------------------------------------------------
@pytest.mark.parametrize("opset", [11, 13])
@pytest.mark.parametrize("axis", [0, 1, 2, -1, -2])
def test_softmax_opset_semantics_match_onnxruntime(opset, axis):
    model = _model([helper.make_node("Softmax", ["x"], ["y"], axis=axis)],
                   [_vi("x", TensorProto.FLOAT, [2, 3, 4])], [_vi("y", TensorProto.FLOAT,
                                                                  [2, 3, 4])], opset=opset)
    x = RNG.standard_normal((2, 3, 4)).astype(np.float32) * 3
    g, ours = _ours(model, {"x": x})
    np.testing.assert_allclose(ours[0], _ort(model, {"x": x})[0], rtol=1e-5, atol=1e-7)
    coerced = opset < 13 and axis % 3 != 2
    assert [n.op for n in g.nodes] == (["reshape", "softmax", "reshape"] if coerced
                                       else ["softmax"])


# -- narrow float formats ---------------------------------------------------------------------
_F8 = {"f8e4m3fn": TensorProto.FLOAT8E4M3FN, "f8e4m3fnuz": TensorProto.FLOAT8E4M3FNUZ,
       "f8e5m2": TensorProto.FLOAT8E5M2, "f8e5m2fnuz": TensorProto.FLOAT8E5M2FNUZ}
_BOUNDARY = np.array([0.0, -0.0, 1e-9, 240, 448, 449, 464, 465, 480, 57344, 61439, 61440,
                      1e6, -1e6, np.inf, -np.inf, np.nan, 3.1415926], np.float32)


def _onnx_reference(node, inputs: dict, opset: int) -> np.ndarray:
    from onnx.reference import ReferenceEvaluator

    elem = onnx.helper.np_dtype_to_tensor_dtype(next(iter(inputs.values())).dtype)
    model = helper.make_model(helper.make_graph(
        [node], "r", [_vi(k, elem, v.shape) for k, v in inputs.items()],
        [helper.make_tensor_value_info("y", TensorProto.UNDEFINED, None)]),
        opset_imports=[helper.make_opsetid("", opset)])
    return ReferenceEvaluator(model).run(None, inputs)[0]


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("dtype", sorted(_F8))
def test_cast_to_float8_boundaries_match_onnx_reference(dtype, saturate):
    g = _single_node_graph("cast", TensorType("f32", _BOUNDARY.shape),
                           {"to": dtype, "saturate": saturate})
    got = next(iter(interpret(g, {"x": _BOUNDARY}).values()))
    node = helper.make_node("Cast", ["x"], ["y"], to=_F8[dtype], saturate=saturate)
    ref = _onnx_reference(node, {"x": _BOUNDARY}, 21)
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


@pytest.mark.parametrize("saturate", [0, 1])
@pytest.mark.parametrize("mode", ["up", "down", "nearest"])
def test_cast_to_e8m0_round_modes_match_onnx_reference(mode, saturate):
    x = np.array([1.0, 1.5, 1.4999, 3.0, 0.75, 2.0 ** 127, 2.0 ** 127 * 1.5, 3e38, 1e-39,
                  1.5 * 2.0 ** -127, -4.5, 0.0, np.inf, np.nan], np.float32)
    g = _single_node_graph("cast", TensorType("f32", x.shape),
                           {"to": "f8e8m0", "saturate": saturate, "round_mode": mode})
    got = next(iter(interpret(g, {"x": x}).values()))
    node = helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT8E8M0,
                            saturate=saturate, round_mode=mode)
    ref = _onnx_reference(node, {"x": x}, 25)
    np.testing.assert_array_equal(got.view(np.uint8), ref.view(np.uint8))


def test_quantize_to_float8_saturates_and_dequantizes_back():
    x = np.array([1.0, -3.0, 1e4, -1e4, np.inf], np.float32)
    g = Graph()
    v = g.add_input("x", TensorType("f32", x.shape))
    q = g.add_node("quantize", [v], {"dtype": "f8e4m3fn", "scale": [2.0]}).outputs[0]
    g.set_outputs(g.add_node("dequantize", [q]).outputs + [q])
    y, qv = interpret(g, {"x": x}).values()
    assert qv.dtype == ml_dtypes.float8_e4m3fn
    np.testing.assert_array_equal(y, [1.0, -3.0, 896.0, -896.0, 896.0])


# -- tensor ops -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["constant", "edge", "reflect"])
def test_pad_with_negative_pads_crops_like_onnxruntime(mode):
    x = np.arange(2 * 5 * 6, dtype=np.float32).reshape(1, 2, 5, 6)
    pads = np.array([0, 0, -1, 2, 0, 0, 2, -2], np.int64)
    model = _model([helper.make_node("Pad", ["x", "pads", "v"], ["y"], mode=mode)],
                   [_vi("x", TensorProto.FLOAT, x.shape)],
                   [_vi("y", TensorProto.FLOAT, ["n", "c", "h", "w"])],
                   [numpy_helper.from_array(pads, "pads"),
                    numpy_helper.from_array(np.float32(-7), "v")], opset=18)
    _, ours = _ours(model, {"x": x})
    np.testing.assert_array_equal(ours[0], _ort(model, {"x": x})[0])


@pytest.mark.parametrize("mode", ["reflect", "edge", "wrap"])
def test_pad_modes_on_int_tensors(mode):
    x = np.arange(12, dtype=np.int32).reshape(3, 4)
    g = _single_node_graph("pad", TensorType("i32", x.shape),
                           {"pads": [1, 2, 2, 1], "mode": mode})
    got = next(iter(interpret(g, {"x": x}).values()))
    np.testing.assert_array_equal(got, np.pad(x, [(1, 2), (2, 1)], mode=mode))


_SLICES = [
    ([0], [-1], [0], [1]),
    ([-1], [-10**18], [1], [-1]),
    ([10**18], [0], [1], [-2]),
    ([-100], [100], [0], [3]),
    ([3, 1], [-100, 4], [1, 0], [-1, 2]),
    ([2], [2], [1], [1]),
    ([-2], [-1], [-1], [-1]),
]


@pytest.mark.parametrize(("starts", "ends", "axes", "steps"), _SLICES)
def test_slice_clamping_matches_onnxruntime(starts, ends, axes, steps):
    x = np.arange(5 * 6, dtype=np.float32).reshape(5, 6)
    inits = [numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("s", starts), ("e", ends), ("a", axes), ("p", steps))]
    model = _model([helper.make_node("Slice", ["x", "s", "e", "a", "p"], ["y"])],
                   [_vi("x", TensorProto.FLOAT, x.shape)],
                   [_vi("y", TensorProto.FLOAT, ["h", "w"])], inits)
    _, ours = _ours(model, {"x": x})
    np.testing.assert_array_equal(ours[0], _ort(model, {"x": x})[0])


def test_reshape_placeholders_are_resolved_statically():
    model = _model([helper.make_node("Reshape", ["x", "shape"], ["y"])],
                   [_vi("x", TensorProto.FLOAT, [2, 3, 4])],
                   [_vi("y", TensorProto.FLOAT, [2, 6, 2])],
                   [numpy_helper.from_array(np.array([0, -1, 2], np.int64), "shape")])
    g = import_onnx(model)
    (node,) = g.nodes
    assert node.attrs["shape"] == [2, 6, 2]


def test_clip_on_int_tensors_rounds_bounds_inwards():
    x = np.array([-128, -4, -3, 0, 100, 101, 127], np.int8)
    g = _single_node_graph("clip", TensorType("i8", x.shape), {"min": -3.5, "max": 100.7})
    got = next(iter(interpret(g, {"x": x}).values()))
    np.testing.assert_array_equal(got, np.array([-3, -3, -3, 0, 100, 100, 100], np.int8))


def test_dropout_in_inference_is_identity_with_true_mask():
    model = _model([helper.make_node("Dropout", ["x", "r"], ["y", "mask"])],
                   [_vi("x", TensorProto.FLOAT, [2, 3])],
                   [_vi("y", TensorProto.FLOAT, [2, 3]), _vi("mask", TensorProto.BOOL, [2, 3])],
                   [numpy_helper.from_array(np.float32(0.3), "r")])
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    _, (y, mask) = _ours(model, {"x": x})
    np.testing.assert_array_equal(y, x)
    assert mask.dtype == np.bool_ and mask.all()


def test_training_dropout_is_rejected():
    model = _model([helper.make_node("Dropout", ["x", "r", "t"], ["y"], name="drop")],
                   [_vi("x", TensorProto.FLOAT, [2, 3])], [_vi("y", TensorProto.FLOAT, [2, 3])],
                   [numpy_helper.from_array(np.float32(0.3), "r"),
                    numpy_helper.from_array(np.array(True), "t")])
    with pytest.raises(UnsupportedError, match="Dropout node 'drop'.*training_mode"):
        import_onnx(model)


def test_data_movement_keeps_per_tensor_quant_and_remaps_channel_axis():
    q = QuantParams((0.5,))
    g = Graph()
    x = g.add_input("x", TensorType("i8", (1, 4, 2, 2), quant=q))
    r = g.add_node("reshape", [x], {"shape": [1, 16]}).outputs[0]
    assert r.type.quant == q
    parts = g.add_node("split", [x], {"axis": 1, "sizes": [1, 3]}).outputs
    assert all(p.type.quant == q for p in parts)
    qc = QuantParams((0.5, 0.25, 1.0, 2.0), axis=1)
    xc = g.add_input("xc", TensorType("i8", (1, 4, 2, 2), quant=qc))
    t = g.add_node("transpose", [xc], {"perm": [0, 2, 3, 1]}).outputs[0]
    assert t.type.quant == QuantParams(qc.scale, axis=3)
    assert g.add_node("reshape", [xc], {"shape": [4, 4]}).outputs[0].type.quant is None


def test_reduce_max_of_an_empty_axis_is_the_lowest_value():
    g = _single_node_graph("reduce_max", TensorType("f32", (2, 0, 3)),
                           {"axes": [1], "keepdims": 0})
    got = next(iter(interpret(g, {"x": np.zeros((2, 0, 3), np.float32)}).values()))
    assert got.shape == (2, 3) and np.all(got == -math.inf)


def test_constant_of_shape_folds_to_a_constant():
    """torch's F.pad export (constant folding off) builds pads with ConstantOfShape."""
    import onnx
    from onnx import TensorProto, helper

    import hbc
    from hbc.ir.interpret import interpret

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [2, 3])
    fill = helper.make_tensor("fill", TensorProto.FLOAT, [1], [1.5])
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["c"], value=fill),
             helper.make_node("Add", ["x", "c"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [shape]),
                              opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    g = hbc.load(model)
    assert [n.op for n in g.nodes] == ["add"]
    out = interpret(g, {"x": np.zeros((2, 3), np.float32)})["y"]
    np.testing.assert_array_equal(out, np.full((2, 3), 1.5, np.float32))
