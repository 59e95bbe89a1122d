"""End-to-end float numerics: ResNet- and MobileNet-style models through both frontends,
against onnxruntime (ONNX path) and torch (torch path)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

import hbc
from hbc.ir import from_text, to_text
from hbc.ir.verify import verify
from hbc.models.common import export_onnx, seeded_init
from hbc.models.mobilenet import mobilenet_v2
from hbc.models.resnet import resnet18

MODELS = {
    "resnet18": lambda: resnet18(num_classes=10),
    "mobilenet_v2": lambda: mobilenet_v2(num_classes=10),
}


def _input(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, 64, 64)).astype(np.float32)


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    err = float(np.max(np.abs(ours - ref)))
    assert err <= 1e-4 * float(np.ptp(ref)), f"max abs error {err} for output range {np.ptp(ref)}"


@pytest.mark.parametrize("name", MODELS)
def test_onnx_frontend_matches_onnxruntime(name, tmp_path):
    model = seeded_init(MODELS[name](), seed=3)
    x = _input()
    path = tmp_path / f"{name}.onnx"
    export_onnx(model, [torch.from_numpy(x)], str(path))
    graph = hbc.load(path)
    verify(graph)
    graph = from_text(to_text(graph), constants=graph.constants)  # the text form is lossless
    ours = hbc.interpret(graph, {"input": x})["output"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    _assert_close(ours, sess.run(None, {"input": x})[0])


@pytest.mark.parametrize("name", MODELS)
def test_torch_frontend_matches_torch(name):
    model = seeded_init(MODELS[name](), seed=3)
    x = _input()
    graph = hbc.load((model, (torch.from_numpy(x),)))
    verify(graph)
    (out_name,) = [v.name for v in graph.outputs]
    ours = hbc.interpret(graph, {graph.inputs[0].name: x})[out_name]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    _assert_close(ours, ref)
