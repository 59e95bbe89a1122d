"""absorb-qdq: QDQ models (onnxruntime quantize_static, QAT exports) compile without calibration.

The end-to-end case quantizes the demo CNN with onnxruntime (QDQ, symmetric int8, per-channel
weights), imports it, runs -O3 (absorb-qdq first) and lowers it without calibrate(): the
recorded scales are onnxruntime's and the integer graph agrees with onnxruntime running the QDQ
model. Hand-built graphs cover the golden rewrite, the pass leaving a graph alone, the errors
(asymmetric, unsigned, per-channel activations) and the weight scales lowering must honour.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import hbc
from hbc.ir import from_text, to_text
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.types import QuantParams
from hbc.passes import PassContext, PassError, run
from hbc.passes.absorb_qdq import AbsorbQdq
from hbc.passes.lower_context import quantize_weight
from tests.passes_util import assert_golden

ort = pytest.importorskip("onnxruntime")
quantization = pytest.importorskip("onnxruntime.quantization")

SHAPE = (1, 3, 32, 32)
ASYMMETRIC = (r"asymmetric quantization \(zero point -?\d+\) cannot be absorbed: hbc's integer "
              r"scheme is symmetric; re-export with symmetric activations")


def _parse(body: str) -> Graph:
    return from_text("hbir 1\n" + body.strip() + "\n")


def _samples(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(SHAPE).astype(np.float32) for _ in range(n)]


class _Reader(quantization.CalibrationDataReader):
    """8 seeded samples for onnxruntime's calibration."""

    def __init__(self) -> None:
        self._it = iter([{"input": x} for x in _samples(8, seed=0)])

    def get_next(self):
        return next(self._it, None)


@pytest.fixture(scope="module")
def float_onnx(tmp_path_factory) -> str:
    from hbc.models import demo_cnn
    from hbc.models.common import export_onnx

    path = str(tmp_path_factory.mktemp("qdq") / "demo.onnx")
    model, args = demo_cnn.build()
    export_onnx(model, args, path, input_names=["input"], output_names=["logits"])
    return path


def _quantize(src: str, dst: str, symmetric: bool = True, **options) -> str:
    q = quantization
    act = q.QuantType.QInt8 if symmetric else q.QuantType.QUInt8
    q.quantize_static(src, dst, _Reader(), quant_format=q.QuantFormat.QDQ, per_channel=True,
                      activation_type=act, weight_type=q.QuantType.QInt8,
                      extra_options={"ActivationSymmetric": symmetric, "WeightSymmetric": True},
                      **options)
    return dst


@pytest.fixture(scope="module")
def qdq_onnx(float_onnx) -> str:
    return _quantize(float_onnx, float_onnx.replace(".onnx", "_qdq.onnx"))


def _ort_activation_scales(path: str) -> dict[str, float]:
    """Tensor name -> scale of every QuantizeLinear of a float tensor in an ONNX model."""
    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def _folded_bns(path: str) -> dict[str, str]:
    """Conv output -> the output of the BatchNormalization after it (through its QDQ pair):
    after fold-bn the conv's value holds the BN's values, with the BN output's scale."""
    model = onnx.load(path)
    producer = {o: n for n in model.graph.node for o in n.output}
    out = {}
    for n in model.graph.node:
        if n.op_type == "BatchNormalization":
            t = n.input[0]
            while t in producer and producer[t].op_type in ("QuantizeLinear", "DequantizeLinear"):
                t = producer[t].input[0]
            out[t] = n.output[0]
    return out


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# -- onnxruntime QDQ models -----------------------------------------------------------------------

def test_absorb_records_onnxruntime_scales(qdq_onnx):
    g = hbc.load(qdq_onnx)
    out = run(g, passes="absorb-qdq")
    assert not any(n.op in ("quantize", "dequantize") for n in out.nodes)
    assert out.meta["calibration"] == {"method": "qdq", "samples": 0}
    scales = _ort_activation_scales(qdq_onnx)
    assert "input" in scales and "logits_QuantizeLinear_Input" in scales
    renamed = {"logits_QuantizeLinear_Input": "logits"}  # the graph output keeps its name
    for name, scale in scales.items():
        v = out.value(renamed.get(name, name))
        assert v.type.quant == QuantParams((scale,)), name
    # onnxruntime's symmetric per-channel weights are max|W[c]|/127: nothing to record
    weights = [v for v in out.constant_values() if v.name.endswith(".weight")]
    assert len(weights) >= 8 and all(v.type.quant is None for v in weights)
    assert out.value("stem.0.weight").dtype == "f32"


def test_ort_qdq_model_lowers_without_calibration(qdq_onnx):
    g3 = run(hbc.load(qdq_onnx), opt=3)
    scales = _ort_activation_scales(qdq_onnx)
    scales["logits"] = scales.pop("logits_QuantizeLinear_Input")
    folded = _folded_bns(qdq_onnx)
    recorded = {v.name: v.type.quant for v in [*g3.inputs, *(o for n in g3.nodes
                                                           for o in n.outputs)]}
    assert all(q is not None for q in recorded.values()), recorded
    assert any(name in folded for name in recorded)  # the downsample conv, BN folded
    for name, q in recorded.items():  # every scale lowering reads is onnxruntime's
        assert q == QuantParams((scales[folded.get(name, name)],)), name
    lowered = run(g3, passes=["lower-int"])
    assert lowered.meta["cpu_nodes"] == []
    sess = ort.InferenceSession(qdq_onnx, providers=["CPUExecutionProvider"])
    for x in _samples(3, seed=5):
        expect = sess.run(None, {"input": x})[0]
        got = interpret(lowered, {"input": x})["logits"]
        assert _cosine(got, expect) > 0.99


def test_asymmetric_activations_are_a_clear_error(float_onnx):
    path = _quantize(float_onnx, float_onnx.replace(".onnx", "_u8.onnx"), symmetric=False)
    g = hbc.load(path)
    with pytest.raises(PassError, match=r"pass 'absorb-qdq': quantize node "
                                        r"'input_QuantizeLinear': " + ASYMMETRIC +
                                        r" \(and \d+ more nodes\)"):
        run(g, opt=3)
    before = to_text(g)
    with pytest.raises(PassError):
        AbsorbQdq().run(g)
    assert to_text(g) == before  # left unchanged


def test_values_the_qdq_model_left_float_are_named_by_lowering(float_onnx):
    path = _quantize(float_onnx, float_onnx.replace(".onnx", "_nofc.onnx"),
                     nodes_to_exclude=["/fc/Gemm"])
    g3 = run(hbc.load(path), opt=3)
    with pytest.raises(PassError, match=r"pass 'lower-int': linear node '/fc/Gemm': output "
                                        r"%logits has no calibrated scale"):
        run(g3, passes=["lower-int"])


# -- hand-built graphs: golden rewrite --------------------------------------------------------

QDQ = """
graph @qdq(%x: f32[1,2,4,4]) {
  %w_quantized: i8[2,2,1,1] q(scale=[0.01, 0.02], axis=0) = const [127, -64, 30, -20]
  %b: f32[2] = const [0.3, -0.2]
  %xq: i8[1,2,4,4] q(scale=0.05) = quantize(%x) {scale=[0.05]}
  %xd: f32[1,2,4,4] = dequantize(%xq)
  %w: f32[2,2,1,1] = dequantize(%w_quantized)
  %bq: i8[2] q(scale=0.01) = quantize(%b) {scale=[0.01]}
  %bd: f32[2] = dequantize(%bq)
  %y: f32[1,2,4,4] = conv(%xd, %w, %bd) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1]}
  %yq: i8[1,2,4,4] q(scale=0.1) = quantize(%y) {scale=[0.1]}
  %yd: f32[1,2,4,4] = dequantize(%yq)
  %r: f32[1,2,4,4] = relu(%yd)
  %rq: i16[1,2,4,4] q(scale=0.001) = quantize(%r) {dtype="i16", scale=[0.001]}
  %rd: f32[1,2,4,4] = dequantize(%rq)
  %out: f32[1,32] = reshape(%rd) {shape=[1, 32]}
  return %out
}
"""


def test_absorb_qdq_fires():
    ctx = PassContext()
    out = run(_parse(QDQ), passes="absorb-qdq", context=ctx)
    assert [n.op for n in out.nodes] == ["conv", "relu", "reshape"]
    assert out.inputs[0].type.quant == QuantParams((0.05,))
    assert out.value("y").type.quant == QuantParams((0.1,))
    assert out.value("r").type.quant == QuantParams((0.001,))
    assert out.value("out").type.quant == QuantParams((0.001,))  # reshape keeps its input's
    assert out.meta["int16_values"] == ["r"]
    # weights: float32(q) * float32(s); channel 1 does not reach 127, so its scales are kept
    w = out.value("w_quantized".removesuffix("_quantized"))
    np.testing.assert_array_equal(
        out.constants[w.name].ravel(),
        np.array([127, -64, 30, -20], np.float32) * np.array([0.01, 0.01, 0.02, 0.02], np.float32))
    assert w.type.quant == QuantParams((0.01, 0.02), axis=0)
    assert any("weight scales differ" in e.reason for e in ctx.explanations)
    # a fake-quantized float constant (the bias) is folded: quantize then dequantize
    np.testing.assert_array_equal(out.constants["b"], np.float32([30, -20]) * np.float32(0.01))
    assert out.value("b").type.quant is None
    assert_golden("absorb_qdq_fires", out)


KEEPS = """
graph @keep(%xi: i8[4] q(scale=0.5), %f: f32[4]) {
  %x: f32[4] = dequantize(%xi)
  %y: f32[4] = add(%x, %f)
  %z: f32[4] = relu(%y)
  return %z
}
"""


def test_absorb_qdq_keeps():
    g = _parse(KEEPS)
    ctx = PassContext()
    out = run(g, passes="absorb-qdq", context=ctx)
    assert to_text(out) == to_text(g)
    assert "calibration" not in out.meta
    assert [e.reason for e in ctx.explanations] == [
        "%xi is neither a quantize result nor a constant: the dequantize is kept"]
    assert not AbsorbQdq().run(from_text(to_text(g)))  # reports no change
    assert_golden("absorb_qdq_keeps", out)


def test_graph_input_pair_and_output_names():
    g = _parse("""
graph @io(%x: f32[4]) {
  %xq: i8[4] q(scale=0.25) = quantize(%x) {scale=[0.25]}
  %xd: f32[4] = dequantize(%xq)
  %y: f32[4] = relu(%xd)
  %yq: i8[4] q(scale=0.25) = quantize(%y) {scale=[0.25]}
  %out: f32[4] = dequantize(%yq)
  return %out
}""")
    out = run(g, passes="absorb-qdq")
    assert out.inputs[0].type.quant == QuantParams((0.25,))
    assert [v.name for v in out.outputs] == ["out"]
    assert out.outputs[0].producer.op == "relu"
    assert out.outputs[0].type.quant == QuantParams((0.25,))


@pytest.mark.parametrize("qtype, message", [
    ('i8[4] q(scale=0.5, zero_point=3) = quantize(%x) {scale=[0.5], zero_point=[3]}',
     ASYMMETRIC.replace(r"-?\d+", "3")),
    ('u8[4] q(scale=0.5) = quantize(%x) {dtype="u8", scale=[0.5]}',
     r"unsigned quantization \(u8, zero point 0\) cannot be absorbed"),
    ('i8[4] q(scale=[0.5, 0.5, 0.5, 0.5], axis=0) = quantize(%x) {scale=[0.5, 0.5, 0.5, 0.5], '
     'axis=0}', r"per-channel activation quantization \(axis 0\) cannot be absorbed"),
])
def test_unsupported_activation_quantization_names_the_node(qtype, message):
    g = _parse(f"""
graph @bad(%x: f32[4]) {{
  %xq: {qtype} name("Q_7")
  %xd: f32[4] = dequantize(%xq)
  %y: f32[4] = relu(%xd)
  return %y
}}""")
    with pytest.raises(PassError, match=r"absorb-qdq': quantize node 'Q_7': " + message):
        run(g, passes="absorb-qdq")


def test_a_value_quantized_twice_keeps_the_second_pair():
    g = _parse("""
graph @twice(%x: f32[4]) {
  %a: i8[4] q(scale=0.5) = quantize(%x) {scale=[0.5]}
  %ad: f32[4] = dequantize(%a)
  %b: i8[4] q(scale=0.25) = quantize(%x) {scale=[0.25]}
  %bd: f32[4] = dequantize(%b)
  %y: f32[4] = add(%ad, %bd)
  return %y
}""")
    ctx = PassContext()
    out = run(g, passes="absorb-qdq", context=ctx)
    assert out.inputs[0].type.quant == QuantParams((0.5,))
    assert [n.op for n in out.nodes] == ["quantize", "dequantize", "add"]
    assert "already quantized with scale [0.5]" in ctx.explanations[0].reason


# -- lowering honours recorded weight scales ----------------------------------------------------

def test_quantize_weight_uses_recorded_scales():
    w = (np.array([[127, -64], [30, -20], [-128, 5]], np.float32)
         * np.float32([[0.01], [0.02], [0.5]]))
    q, s = quantize_weight(w, QuantParams((0.01, 0.02, 0.5), axis=0))
    np.testing.assert_array_equal(q, [[127, -64], [30, -20], [-128, 5]])
    np.testing.assert_array_equal(s, [0.01, 0.02, 0.5])
    q, s = quantize_weight(w, QuantParams((0.5,)))  # per tensor: one scale for every channel
    np.testing.assert_array_equal(s, [0.5, 0.5, 0.5])
    np.testing.assert_array_equal(q[2], [-128, 5])
    # no recorded scales, or scales along another axis: the max rule, [-127, 127]
    for quant in (None, QuantParams((1.0, 1.0), axis=1)):
        q, s = quantize_weight(w, quant)
        np.testing.assert_allclose(s, np.abs(w).max(axis=1) / 127)
        assert q.min() >= -127


def test_hbc_compile_takes_the_qdq_models_scales(qdq_onnx, tmp_path):
    """``hbc compile`` of a QDQ model needs no calibration data: the scales are the model's."""
    result = hbc.compile(qdq_onnx, "bayes", 3, output=tmp_path / "qdq.hbm")
    m = result.models[0]
    assert m.options["calib_method"] == "model" and not m.warnings
    from hbc.runtime import Runtime

    sess = ort.InferenceSession(qdq_onnx, providers=["CPUExecutionProvider"])
    rt = Runtime(result.output)
    for x in _samples(2, seed=6):
        got = rt.run({"input": x}, dequantize=True)["logits"]
        assert _cosine(got, sess.run(None, {"input": x})[0]) > 0.99
