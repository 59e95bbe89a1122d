"""NaN and Inf in weights and scales never become a silently broken scale (docs/guarantees.md).

ONNX models with a NaN or Inf in a conv weight or bias are compiled three ways: calibrated on
seeded random samples, calibrated on data, and with the model's own scales (a QDQ model, no
calibration). Each ends in an error naming the node (and, at lowering, the constant and the
index); QDQ scales that are NaN, Inf, zero or negative are refused at import.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import hbc
from hbc.errors import HbcError


def _model(path, *, weight=None, bias=None, qdq: bool = False, sx=0.02, sy=0.05) -> str:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = np.zeros(4, np.float32)
    if weight is not None:
        w[1, 0, 2, 1] = weight
    if bias is not None:
        b[2] = bias
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    if qdq:
        inits += [numpy_helper.from_array(np.array(sx, np.float32), "sx"),
                  numpy_helper.from_array(np.array(sy, np.float32), "sy"),
                  numpy_helper.from_array(np.array(0, np.int8), "z")]
        nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "z"], ["xq"], name="xq"),
                 helper.make_node("DequantizeLinear", ["xq", "sx", "z"], ["xd"], name="xd"),
                 helper.make_node("Conv", ["xd", "w", "b"], ["c"], name="conv", pads=[1] * 4),
                 helper.make_node("QuantizeLinear", ["c", "sy", "z"], ["cq"], name="cq"),
                 helper.make_node("DequantizeLinear", ["cq", "sy", "z"], ["y"], name="cd")]
    else:
        nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1] * 4),
                 helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return str(path)


def _compile(model: str, tmp_path, calib=None):
    return hbc.compile(model, "bayes", 3, output=tmp_path / "m.hbm", calib_data=calib,
                       report_dir=tmp_path / "report")


@pytest.mark.parametrize("bad", [{"weight": np.nan}, {"weight": np.inf}, {"bias": np.nan},
                                 {"bias": -np.inf}], ids=["w-nan", "w-inf", "b-nan", "b-inf"])
@pytest.mark.parametrize("how", ["random", "data", "own-scales"])
def test_nonfinite_weights_are_an_error(tmp_path, bad, how):
    model = _model(tmp_path / "m.onnx", qdq=how == "own-scales", **bad)
    calib = None
    if how == "data":
        calib = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    with pytest.raises(HbcError) as e:
        _compile(model, tmp_path, calib)
    text = str(e.value)
    assert "m.onnx" in text and "node 'conv" in text, text
    what, index = ("weight %w", "[1, 0, 2, 1]") if "weight" in bad else ("bias %", "[2]")
    at_lowering = what in text and f"at index {index}" in text
    # calibration stops first when the value reaches an observed output; a -inf bias under a
    # fused ReLU does not (relu(-inf) = 0), and lowering catches it
    assert at_lowering or (how != "own-scales" and "NaN or Inf on calibration sample 0" in text)
    if how == "own-scales" or bad == {"bias": -np.inf}:
        assert at_lowering, text
    assert not (tmp_path / "m.hbm").exists()


@pytest.mark.parametrize("scale", [np.nan, np.inf, 0.0, -0.5])
def test_nonfinite_or_nonpositive_model_scales_are_refused(tmp_path, scale):
    model = _model(tmp_path / "m.onnx", qdq=True, sx=scale)
    with pytest.raises(HbcError, match=r"m.onnx: .*QuantizeLinear node 'xq'.*scales must be "
                                       r"positive and finite"):
        _compile(model, tmp_path)


def test_finite_models_compile_with_finite_scales(tmp_path):
    for qdq in (False, True):
        result = _compile(_model(tmp_path / f"m{qdq}.onnx", qdq=qdq), tmp_path)
        for v in result.models[0].graph.values():
            q = v.type.quant
            assert q is None or all(np.isfinite(s) and s > 0 for s in q.scale), v.name
