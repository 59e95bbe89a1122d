"""nn and pool ops: interpret() of one-node graphs against torch.nn.functional and onnxruntime.

Covers what the ONNX backend cases do not: grouped, depthwise (with channel multiplier), dilated,
strided and asymmetrically padded conv in 1-3 spatial dims, conv_transpose with groups and
output_padding, MaxPool indices, f16 accumulation, MACs and inference errors.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

from hbc.frontend.onnx_import import import_onnx
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.registry import InferError, get_op
from hbc.ir.types import TensorType, type_of_array

RNG = np.random.default_rng(7)


def _rand(*shape: int, dtype=np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def run_op(op: str, arrays: list[np.ndarray | None], attrs: dict, num_outputs: int | None = None,
           const: tuple[int, ...] = (1, 2)) -> list[np.ndarray]:
    """Interpret one ``op`` node; inputs at ``const`` indices are constants, the rest inputs."""
    g = Graph("t")
    values = []
    for i, a in enumerate(arrays):
        if a is None:
            values.append(None)
        elif i in const:
            values.append(g.add_constant(f"c{i}", a))
        else:
            values.append(g.add_input(f"in{i}", type_of_array(a)))
    node = g.add_node(op, values, attrs, num_outputs=num_outputs)
    g.set_outputs(node.outputs)
    feed = {v.name: a for v, a in zip(values, arrays, strict=True) if v is not None
            and v.kind == "input"}
    out = interpret(g, feed)
    return [out[v.name] for v in node.outputs]


def _close(ours: np.ndarray, ref, tol: float = 1e-4) -> None:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else np.asarray(ref)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = max(1.0, float(np.max(np.abs(ref))))
    np.testing.assert_allclose(ours.astype(np.float64), ref.astype(np.float64),
                               atol=tol * scale, rtol=tol)


def _torch_pad(x: np.ndarray, pads: list[int], value: float = 0.0) -> torch.Tensor:
    """x padded with ONNX-order pads (F.pad takes the last axis first, begin then end)."""
    n = len(pads) // 2
    tpad = [p for i in reversed(range(n)) for p in (pads[i], pads[n + i])]
    return F.pad(torch.from_numpy(x), tpad, value=value)


_TORCH_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TORCH_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}

CONV_CASES = {
    # name: (x shape, cout, kernel, strides, pads, dilations, groups)
    "1d_plain": ((2, 3, 17), 5, [3], [1], [1, 1], [1], 1),
    "1d_strided_dilated": ((1, 4, 20), 6, [3], [2], [2, 0], [3], 2),
    "2d_grouped": ((2, 8, 11, 9), 12, [3, 3], [1, 1], [1, 1, 1, 1], [1, 1], 4),
    "2d_depthwise": ((1, 6, 10, 10), 6, [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], 6),
    "2d_depthwise_multiplier": ((2, 4, 9, 8), 8, [3, 2], [1, 2], [0, 1, 2, 0], [2, 1], 4),
    "2d_dilated_asym_pads": ((1, 3, 13, 12), 4, [3, 3], [2, 1], [0, 2, 3, 1], [2, 3], 1),
    "2d_1x1_strided": ((2, 16, 7, 7), 8, [1, 1], [2, 2], [0, 0, 0, 0], [1, 1], 1),
    "2d_7x7_stem": ((1, 3, 32, 32), 8, [7, 7], [2, 2], [3, 3, 3, 3], [1, 1], 1),
    "3d_grouped_strided": ((1, 4, 6, 7, 5), 6, [2, 3, 3], [2, 1, 2], [0, 1, 1, 1, 0, 1],
                           [1, 2, 1], 2),
    "3d_depthwise": ((1, 3, 5, 6, 6), 3, [3, 3, 3], [1, 1, 1], [1] * 6, [1, 1, 1], 3),
}


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_conv_matches_torch(case, bias):
    shape, cout, kernel, strides, pads, dilations, groups = CONV_CASES[case]
    x = _rand(*shape)
    w = _rand(cout, shape[1] // groups, *kernel)
    b = _rand(cout) if bias else None
    attrs = {"strides": strides, "pads": pads, "dilations": dilations, "groups": groups}
    (y,) = run_op("conv", [x, w, b], attrs)
    ref = _TORCH_CONV[len(kernel)](
        _torch_pad(x, pads), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
        stride=strides, dilation=dilations, groups=groups)
    _close(y, ref)


def test_conv_f16_accumulates_in_f32():
    x, w = _rand(1, 64, 6, 6, dtype=np.float16), _rand(8, 64, 3, 3, dtype=np.float16)
    attrs = {"strides": [1, 1], "pads": [1] * 4, "dilations": [1, 1], "groups": 1}
    (y,) = run_op("conv", [x, w], attrs)
    assert y.dtype == np.float16
    ref = F.conv2d(torch.from_numpy(x).float(), torch.from_numpy(w).float(), padding=1)
    _close(y, ref.half().float(), tol=2e-3)


CONVT_CASES = {
    # name: (x shape, cout, kernel, strides, pads, dilations, output_padding, groups)
    "1d": ((2, 3, 7), 4, [3], [2], [1, 0], [1], [1], 1),
    "2d_groups_output_padding": ((1, 4, 5, 6), 6, [3, 3], [2, 3], [1, 1, 1, 1], [1, 1],
                                 [1, 2], 2),
    "2d_dilated_asym_pads": ((2, 2, 4, 5), 3, [3, 2], [1, 2], [0, 2, 1, 0], [2, 1], [0, 1], 1),
    "2d_depthwise": ((1, 4, 5, 5), 4, [4, 4], [2, 2], [1, 1, 1, 1], [1, 1], [0, 0], 4),
    "3d_groups": ((1, 4, 3, 4, 3), 4, [2, 3, 2], [2, 1, 2], [0, 1, 0, 0, 1, 1], [1, 1, 2],
                  [1, 0, 1], 2),
}


@pytest.mark.parametrize("case", CONVT_CASES)
def test_conv_transpose_matches_torch(case):
    shape, cout, kernel, strides, pads, dilations, out_pad, groups = CONVT_CASES[case]
    n = len(kernel)
    x = _rand(*shape)
    w = _rand(shape[1], cout // groups, *kernel)
    b = _rand(cout)
    attrs = {"strides": strides, "pads": pads, "dilations": dilations,
             "output_padding": out_pad, "groups": groups}
    (y,) = run_op("conv_transpose", [x, w, b], attrs)
    # torch pads symmetrically: run unpadded, then crop ONNX's begin/end pads
    full = _TORCH_CONVT[n](torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(b),
                           stride=strides, dilation=dilations, groups=groups,
                           output_padding=out_pad)
    crop = tuple(slice(pads[i], full.shape[2 + i] - pads[n + i]) for i in range(n))
    _close(y, full[(slice(None), slice(None)) + crop])


def test_batch_norm_matches_torch():
    x = _rand(2, 5, 4, 3)
    scale, bias, mean = _rand(5), _rand(5), _rand(5)
    var = np.abs(_rand(5)) + 0.1
    (y,) = run_op("batch_norm", [x, scale, bias, mean, var], {"epsilon": 1e-3},
                  const=(1, 2, 3, 4))
    ref = F.batch_norm(torch.from_numpy(x), torch.from_numpy(mean), torch.from_numpy(var),
                       torch.from_numpy(scale), torch.from_numpy(bias), training=False, eps=1e-3)
    _close(y, ref)


@pytest.mark.parametrize("trans_a,trans_b", [(0, 0), (1, 0), (0, 1), (1, 1)])
@pytest.mark.parametrize("c_shape", [None, (5,), (3, 1), (3, 5)])
def test_gemm(trans_a, trans_b, c_shape):
    a = _rand(4, 3) if trans_a else _rand(3, 4)
    b = _rand(5, 4) if trans_b else _rand(4, 5)
    c = None if c_shape is None else _rand(*c_shape)
    attrs = {"alpha": 0.5, "beta": 2.0, "trans_a": trans_a, "trans_b": trans_b}
    (y,) = run_op("gemm", [a, b, c], attrs)
    ref = 0.5 * ((a.T if trans_a else a) @ (b.T if trans_b else b))
    _close(y, ref if c is None else ref + 2.0 * c)


def test_gemm_int32_is_exact():
    a, b = RNG.integers(-100, 100, (3, 4), np.int32), RNG.integers(-100, 100, (4, 2), np.int32)
    (y,) = run_op("gemm", [a, b], {})
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, a @ b)


@pytest.mark.parametrize("sa,sb", [((4,), (4,)), ((4,), (2, 4, 3)), ((2, 3, 4), (4,)),
                                   ((3, 4), (4, 5)), ((2, 1, 3, 4), (5, 4, 2)),
                                   ((1, 3, 4), (6, 4, 2))])
def test_matmul_matches_torch(sa, sb):
    a, b = _rand(*sa), _rand(*sb)
    (y,) = run_op("matmul", [a, b], {}, const=())
    _close(y, torch.matmul(torch.from_numpy(a), torch.from_numpy(b)))


# -- pools ---------------------------------------------------------------------------------------
POOL_CASES = {
    # name: (x shape, kernel, strides, pads, dilations, ceil_mode)
    "2d_basic": ((2, 3, 8, 9), [3, 3], [2, 2], [1, 1, 1, 1], [1, 1], 0),
    "2d_ceil": ((1, 2, 7, 8), [3, 2], [2, 3], [1, 0, 1, 0], [1, 1], 1),
    "2d_dilated": ((1, 3, 10, 9), [2, 3], [1, 2], [1, 1, 1, 1], [2, 2], 0),
    "1d_ceil_dilated": ((2, 2, 11), [3], [3], [1, 1], [2], 1),
    "3d": ((1, 2, 5, 6, 7), [2, 3, 2], [2, 2, 1], [0, 1, 1, 0, 1, 1], [1, 1, 1], 0),
}
_TORCH_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_TORCH_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_attrs(kernel, strides, pads, dilations, ceil_mode) -> dict:
    return {"kernel": kernel, "strides": strides, "pads": pads, "dilations": dilations,
            "ceil_mode": ceil_mode}


def _symmetric(pads: list[int]) -> list[int]:
    n = len(pads) // 2
    assert pads[:n] == pads[n:], "torch pools take symmetric padding only"
    return pads[:n]


@pytest.mark.parametrize("case", [c for c in POOL_CASES if c != "3d"])
def test_max_pool_values_and_indices_match_torch(case):
    shape, kernel, strides, pads, dilations, ceil_mode = POOL_CASES[case]
    x = _rand(*shape)
    y, idx = run_op("max_pool", [x], _pool_attrs(kernel, strides, pads, dilations, ceil_mode))
    ref, ref_idx = _TORCH_MAXPOOL[len(kernel)](
        torch.from_numpy(x), kernel, strides, _symmetric(pads), dilations,
        ceil_mode=bool(ceil_mode), return_indices=True)
    _close(y, ref)
    # torch indexes within each (n, c) plane; ONNX adds the plane offset
    plane = np.prod(shape[2:])
    offset = (np.arange(shape[0] * shape[1]) * plane).reshape(shape[:2] + (1,) * len(kernel))
    np.testing.assert_array_equal(idx, ref_idx.numpy() + offset)
    np.testing.assert_array_equal(x.ravel()[idx], y)


def test_max_pool_column_major_indices():
    x = _rand(2, 3, 5, 4)
    attrs = _pool_attrs([2, 2], [1, 2], [1, 0, 0, 1], [1, 1], 0)
    y, row = run_op("max_pool", [x], attrs)
    _, col = run_op("max_pool", [x], {**attrs, "storage_order": 1})
    plane, (h, w) = row // 20, np.unravel_index(row % 20, (5, 4))
    np.testing.assert_array_equal(col, plane * 20 + w * 5 + h)


def test_max_pool_uint8_and_3d():
    x = RNG.integers(0, 255, (1, 2, 5, 6, 7), dtype=np.uint8)
    shape, kernel, strides, pads, dilations, ceil_mode = POOL_CASES["3d"]
    y, idx = run_op("max_pool", [x], _pool_attrs(kernel, strides, pads, dilations, ceil_mode))
    assert y.dtype == np.uint8
    np.testing.assert_array_equal(x.ravel()[idx], y)
    padded = _torch_pad(x.astype(np.float32), pads, value=-1.0)
    ref = F.max_pool3d(padded, kernel, strides, 0, dilations)
    np.testing.assert_array_equal(y, ref.numpy().astype(np.uint8))


@pytest.mark.parametrize("case", [c for c in POOL_CASES if "dilated" not in c and c != "3d"])
@pytest.mark.parametrize("include_pad", [0, 1])
def test_avg_pool_matches_torch(case, include_pad):
    shape, kernel, strides, pads, dilations, ceil_mode = POOL_CASES[case]
    x = _rand(*shape)
    attrs = {**_pool_attrs(kernel, strides, pads, dilations, ceil_mode),
             "count_include_pad": include_pad}
    (y,) = run_op("avg_pool", [x], attrs)
    ref = _TORCH_AVGPOOL[len(kernel)](torch.from_numpy(x), kernel, strides, _symmetric(pads),
                                      ceil_mode=bool(ceil_mode),
                                      count_include_pad=bool(include_pad))
    _close(y, ref)


def test_global_pools():
    x = _rand(2, 3, 4, 5, 6)
    (avg,) = run_op("global_avg_pool", [x], {})
    (mx,) = run_op("global_max_pool", [x], {})
    _close(avg, x.mean(axis=(2, 3, 4), keepdims=True))
    np.testing.assert_array_equal(mx, x.max(axis=(2, 3, 4), keepdims=True))


# -- MACs and inference errors -------------------------------------------------------------------
def _macs(op: str, types: list[TensorType | None], attrs: dict) -> int:
    opdef = get_op(op)
    attrs = opdef.normalize_attrs(attrs)
    return opdef.macs(types, opdef.infer(types, attrs), attrs)


def test_macs_of_known_ops():
    # grouped 3x3 conv, 16 -> 32 channels in 2 groups on 32x32: 32*32*32 outputs * 8*3*3
    x, w = TensorType("f32", (1, 16, 32, 32)), TensorType("f32", (32, 8, 3, 3))
    attrs = {"strides": [1, 1], "pads": [1] * 4, "dilations": [1, 1], "groups": 2}
    assert _macs("conv", [x, w, None], attrs) == 32 * 32 * 32 * 8 * 9 == 2_359_296
    # ResNet stem: 7x7/2 conv 3 -> 64 on 224x224 = 118,013,952 MACs
    x, w = TensorType("f32", (1, 3, 224, 224)), TensorType("f32", (64, 3, 7, 7))
    attrs = {"strides": [2, 2], "pads": [3] * 4, "dilations": [1, 1]}
    assert _macs("conv", [x, w, None], attrs) == 118_013_952
    a, b = TensorType("f32", (2, 7, 3)), TensorType("f32", (3, 5))
    assert _macs("matmul", [a, b], {}) == 2 * 7 * 5 * 3
    a, b = TensorType("f32", (3, 7)), TensorType("f32", (5, 3))
    assert _macs("gemm", [a, b, None], {"trans_a": 1, "trans_b": 1}) == 7 * 5 * 3


def test_conv_infer_errors_name_the_problem():
    conv = get_op("conv")
    attrs = conv.normalize_attrs({"strides": [1, 1], "pads": [0] * 4, "dilations": [1, 1],
                                  "groups": 2})
    x, w = TensorType("f32", (1, 6, 8, 8)), TensorType("f32", (4, 2, 3, 3))
    with pytest.raises(InferError, match="x has 6 channels but w"):
        conv.infer([x, w, None], attrs)
    with pytest.raises(InferError, match="pads .* must have 4 values"):
        conv.infer([x, TensorType("f32", (4, 3, 3, 3)), None], {**attrs, "pads": [0, 0]})
    with pytest.raises(InferError, match="empty output"):
        conv.infer([x, TensorType("f32", (4, 3, 9, 9)), None], attrs)


# -- ONNX import of auto_pad / output_shape, against onnxruntime ---------------------------------
def _onnx_check(node: onnx.NodeProto, arrays: dict[str, np.ndarray], n_out: int = 1) -> None:
    inputs = [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
              for k, v in arrays.items()]
    outputs = [helper.make_tensor_value_info(o, TensorProto.INT64 if i else TensorProto.FLOAT,
                                             None) for i, o in enumerate(node.output[:n_out])]
    model = helper.make_model(helper.make_graph([node], "t", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    expected = sess.run(None, arrays)
    graph = import_onnx(model)
    got = interpret(graph, arrays)
    for name, ref in zip(node.output, expected, strict=False):
        if ref.dtype == np.int64:
            np.testing.assert_array_equal(got[name], ref)
        else:
            _close(got[name], ref)


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER", "VALID"])
def test_onnx_conv_and_pools_auto_pad(auto_pad):
    x, w = _rand(1, 4, 9, 10), _rand(6, 2, 4, 3)
    _onnx_check(helper.make_node("Conv", ["x", "w"], ["y"], auto_pad=auto_pad, group=2,
                                 strides=[2, 3]), {"x": x, "w": w})
    _onnx_check(helper.make_node("MaxPool", ["x"], ["y", "i"], auto_pad=auto_pad,
                                 kernel_shape=[3, 2], strides=[2, 2]), {"x": x}, n_out=2)
    _onnx_check(helper.make_node("AveragePool", ["x"], ["y"], auto_pad=auto_pad,
                                 kernel_shape=[2, 3], strides=[2, 2]), {"x": x})


@pytest.mark.parametrize("output_shape", [[10, 12], [12, 13]])
def test_onnx_conv_transpose_output_shape(output_shape):
    x, w = _rand(1, 2, 5, 6), _rand(2, 3, 3, 3)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[2, 2],
                            output_shape=output_shape)
    _onnx_check(node, {"x": x, "w": w})


@pytest.mark.parametrize("auto_pad", ["SAME_UPPER", "SAME_LOWER"])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (4, 2), (2, 3)])
def test_onnx_conv_transpose_auto_pad(auto_pad, kernel, stride):
    # kernel < stride: the total padding is negative and the output keeps its natural size
    x, w = _rand(1, 2, 5, 6), _rand(2, 3, kernel, kernel)
    node = helper.make_node("ConvTranspose", ["x", "w"], ["y"], strides=[stride, stride],
                            auto_pad=auto_pad)
    _onnx_check(node, {"x": x, "w": w})
