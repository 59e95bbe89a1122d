"""resize and grid_sample: the IR references against torch (the ops the torch frontend maps
F.interpolate and F.grid_sample to), the ONNX converter against onnxruntime, and edge cases."""

from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import hbc
from hbc.errors import UnsupportedError
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.registry import InferError, get_op
from hbc.ir.types import type_of_array

RNG = np.random.default_rng(7)


def _run(op: str, inputs: list[np.ndarray], **attrs) -> np.ndarray:
    """Interpret a one-node graph."""
    g = Graph("t")
    vals = [g.add_input(f"in{i}", type_of_array(a)) for i, a in enumerate(inputs)]
    node = g.add_node(op, vals, attrs)
    g.set_outputs(node.outputs)
    return interpret(g, {f"in{i}": a for i, a in enumerate(inputs)})[node.outputs[0].name]


def _resize(x: np.ndarray, out: tuple[int, ...], scales: list[float] | None = None,
            **attrs) -> np.ndarray:
    """resize of the trailing spatial axes to ``out`` (scales default to out / in)."""
    n = x.ndim - len(out)
    size = [*x.shape[:n], *out]
    if scales is None:
        scales = [1.0] * n + [o / i for o, i in zip(out, x.shape[n:], strict=True)]
    else:
        scales = [1.0] * n + list(scales)
    return _run("resize", [x], size=size, scales=scales, **attrs)


def _close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-5) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype
    np.testing.assert_allclose(ours, ref, rtol=tol, atol=tol)


# -- resize vs torch.nn.functional.interpolate ----------------------------------------------
X4 = RNG.standard_normal((2, 3, 9, 13)).astype(np.float32)
SIZES = [(18, 26), (5, 7), (4, 30), (1, 1), (27, 13)]
#: F.interpolate mode / align_corners -> resize attributes
TORCH_MODES = {
    ("nearest", None): dict(coordinate_transformation_mode="asymmetric", nearest_mode="floor"),
    ("nearest-exact", None): dict(nearest_mode="round_prefer_ceil"),
    ("bilinear", False): dict(mode="linear"),
    ("bilinear", True): dict(mode="linear", coordinate_transformation_mode="align_corners"),
    ("bicubic", False): dict(mode="cubic"),
    ("bicubic", True): dict(mode="cubic", coordinate_transformation_mode="align_corners"),
}


@pytest.mark.parametrize("out", SIZES)
@pytest.mark.parametrize("mode", TORCH_MODES, ids=lambda m: f"{m[0]}-ac{m[1]}")
def test_interpolate_size_matches_torch(mode, out):
    ref = F.interpolate(torch.from_numpy(X4), size=out, mode=mode[0], align_corners=mode[1])
    _close(_resize(X4, out, **TORCH_MODES[mode]), ref.numpy())


@pytest.mark.parametrize("factor", [2.0, 0.5, 1.5, 0.3, 2.7])
@pytest.mark.parametrize("mode", ["nearest", "bilinear", "bicubic"])
def test_interpolate_scale_factor_matches_torch(mode, factor):
    # with scale_factor torch maps coordinates with 1 / factor, as ONNX's given scales do
    ref = F.interpolate(torch.from_numpy(X4), scale_factor=factor, mode=mode)
    out = tuple(int(np.floor(d * factor)) for d in X4.shape[2:])
    ours = _resize(X4, out, scales=[factor, factor], **TORCH_MODES[(mode, None if
                   mode == "nearest" else False)])
    _close(ours, ref.numpy())


@pytest.mark.parametrize("out", [(4, 5), (3, 30), (18, 26), (1, 2)])
@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_interpolate_antialias_matches_torch(mode, out):
    # torch's antialias filter only reads in-range pixels (exclude_outside) and its bicubic
    # uses a = -0.5 (PIL's kernel)
    ref = F.interpolate(torch.from_numpy(X4), size=out, mode=mode, antialias=True)
    attrs = dict(mode="linear") if mode == "bilinear" else dict(mode="cubic", cubic_coeff_a=-0.5)
    _close(_resize(X4, out, antialias=1, exclude_outside=1, **attrs), ref.numpy())


@pytest.mark.parametrize("align", [False, True])
def test_interpolate_linear_1d_and_trilinear_match_torch(align):
    ctm = "align_corners" if align else "half_pixel"
    x3 = RNG.standard_normal((2, 3, 11)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x3), size=17, mode="linear", align_corners=align)
    _close(_resize(x3, (17,), mode="linear", coordinate_transformation_mode=ctm), ref.numpy())
    x5 = RNG.standard_normal((1, 2, 4, 6, 5)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x5), size=(7, 3, 10), mode="trilinear",
                        align_corners=align)
    _close(_resize(x5, (7, 3, 10), mode="linear", coordinate_transformation_mode=ctm),
           ref.numpy())


# -- grid_sample vs torch.nn.functional.grid_sample -----------------------------------------
def _grid(n: int, out: tuple[int, ...]) -> np.ndarray:
    r = len(out)
    g = RNG.uniform(-1.5, 1.5, (n, *out, r)).astype(np.float32)
    # exact corners, centers and edges, where the coordinate conventions differ most
    g.reshape(-1, r)[:8] = np.array([-1, 1, -1, 1, 0, 0.5, -0.5, 1.25], np.float32)[:, None]
    return g


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest", "bicubic"])
def test_grid_sample_matches_torch(mode, padding, align):
    x = RNG.standard_normal((2, 3, 7, 9)).astype(np.float32)
    grid = _grid(2, (5, 6))
    ref = F.grid_sample(torch.from_numpy(x), torch.from_numpy(grid), mode=mode,
                        padding_mode=padding, align_corners=bool(align))
    ours = _run("grid_sample", [x, grid], mode=mode, padding_mode=padding, align_corners=align)
    _close(ours, ref.numpy())


@pytest.mark.parametrize("align", [0, 1])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
def test_grid_sample_volumetric_matches_torch(mode, padding, align):
    x = RNG.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)
    grid = _grid(2, (3, 4, 5))
    ref = F.grid_sample(torch.from_numpy(x), torch.from_numpy(grid), mode=mode,
                        padding_mode=padding, align_corners=bool(align))
    ours = _run("grid_sample", [x, grid], mode=mode, padding_mode=padding, align_corners=align)
    _close(ours, ref.numpy())


# -- ONNX Resize / Upsample / GridSample converters vs onnxruntime --------------------------
def _onnx_model(node: onnx.NodeProto, opset: int, x: np.ndarray,
                inits: dict[str, np.ndarray], extra: dict[str, np.ndarray] | None = None):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape)]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, v.shape)
               for k, v in (extra or {}).items()]
    graph = helper.make_graph(
        [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                             ir_version=9)


def _check_ort(model: onnx.ModelProto, feed: dict[str, np.ndarray]) -> hbc.ir.graph.Graph:
    ref = ort.InferenceSession(model.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feed)[0]
    g = hbc.load(model)
    _close(list(interpret(g, feed).values())[0], ref, 1e-4)
    return g


X_SMALL = RNG.standard_normal((1, 2, 5, 7)).astype(np.float32)
ORT_CASES = [
    # (attributes, scales, sizes)
    (dict(mode="linear", coordinate_transformation_mode="half_pixel_symmetric"),
     [1, 1, 2.0, 0.6], None),
    (dict(mode="cubic", coordinate_transformation_mode="pytorch_half_pixel"), None,
     [1, 2, 1, 3]),
    (dict(mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5), [1, 1, 0.5, 1.7], None),
    (dict(mode="linear", antialias=1), None, [1, 2, 2, 3]),
    (dict(mode="cubic", antialias=1), [1, 1, 0.6, 0.4], None),
    (dict(mode="nearest", nearest_mode="ceil", coordinate_transformation_mode="asymmetric"),
     None, [1, 2, 11, 4]),
    (dict(mode="nearest", coordinate_transformation_mode="tf_half_pixel_for_nn"), None,
     [1, 2, 8, 3]),
    (dict(mode="linear", coordinate_transformation_mode="tf_crop_and_resize",
          extrapolation_value=-3.0), None, [1, 2, 6, 9]),
]


@pytest.mark.parametrize("attrs,scales,sizes", ORT_CASES)
def test_onnx_resize_matches_onnxruntime(attrs, scales, sizes):
    inits = {}
    ins = ["x", "", "", ""]
    opset = 18 if attrs.get("coordinate_transformation_mode") != "tf_half_pixel_for_nn" else 11
    if attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize":
        inits["roi"] = np.array([0, 0, 0.2, -0.1, 1, 1, 0.9, 1.2], np.float32)
        ins[1] = "roi"
    elif opset == 11:
        inits["roi"] = np.zeros(0, np.float32)
        ins[1] = "roi"
    if scales is not None:
        inits["scales"] = np.array(scales, np.float32)
        ins[2] = "scales"
    else:
        if opset == 11:
            inits["scales"] = np.zeros(0, np.float32)
            ins[2] = "scales"
        inits["sizes"] = np.array(sizes, np.int64)
        ins[3] = "sizes"
    while ins[-1] == "":
        ins.pop()
    node = helper.make_node("Resize", ins, ["y"], **attrs)
    _check_ort(_onnx_model(node, opset, X_SMALL, inits), {"x": X_SMALL})


@pytest.mark.parametrize("policy", ["not_larger", "not_smaller"])
def test_onnx_resize_axes_and_keep_aspect_ratio(policy):
    def model(axes):
        node = helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear",
                                axes=axes, keep_aspect_ratio_policy=policy)
        return _onnx_model(node, 18, X_SMALL, {"sizes": np.array([10, 13], np.int64)})

    (n,) = _check_ort(model([3, 2]), {"x": X_SMALL}).nodes
    common = min(10 / 7, 13 / 5) if policy == "not_larger" else max(10 / 7, 13 / 5)
    assert n.attrs["size"] == [1, 2, int(5 * common + 0.5), int(7 * common + 0.5)]
    assert n.attrs["scales"] == [1.0, 1.0, common, common]
    # negative axes mean the same (onnxruntime 1.31 gets them wrong with a policy, so no ORT)
    (neg,) = hbc.load(model([-1, -2])).nodes
    assert neg.attrs == n.attrs


@pytest.mark.parametrize("opset,mode,scales", [
    (7, "nearest", [1, 1, 2, 3]), (9, "nearest", [1, 1, 2.5, 1.5]), (9, "linear", [1, 1, 2, 3]),
    (10, "nearest", [1, 1, 0.5, 0.6]), (10, "linear", [1, 1, 2.5, 0.6]),
])
def test_onnx_upsample_and_resize10_match_onnxruntime(opset, mode, scales):
    s = np.array(scales, np.float32)
    op = "Resize" if opset == 10 else "Upsample"
    if opset == 7:
        node = helper.make_node(op, ["x"], ["y"], mode=mode, scales=s.tolist())
        inits = {}
    else:
        node = helper.make_node(op, ["x", "s"], ["y"], mode=mode)
        inits = {"s": s}
    _check_ort(_onnx_model(node, opset, X_SMALL, inits), {"x": X_SMALL})


def test_onnx_upsample_rejects_downscaling():
    node = helper.make_node("Upsample", ["x", "s"], ["y"])
    model = _onnx_model(node, 9, X_SMALL, {"s": np.array([1, 1, 0.5, 1], np.float32)})
    with pytest.raises(UnsupportedError, match="must all be >= 1"):
        hbc.load(model)


def test_onnx_resize_needs_scales_or_sizes():
    node = helper.make_node("Resize", ["x", "", "s", "z"], ["y"])
    model = _onnx_model(node, 13, X_SMALL, {"s": np.ones(4, np.float32),
                                             "z": np.array([1, 2, 5, 7], np.int64)})
    with pytest.raises(UnsupportedError, match="exactly one of the scales and sizes"):
        hbc.load(model)


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
def test_onnx_grid_sample20_matches_onnxruntime(mode):
    grid = _grid(1, (6, 9))
    node = helper.make_node("GridSample", ["x", "grid"], ["y"], mode=mode,
                            padding_mode="reflection", align_corners=0)
    model = _onnx_model(node, 20, X_SMALL, {}, {"grid": grid})
    _check_ort(model, {"x": X_SMALL, "grid": grid})


# -- semantics the oracles above do not pin down ----------------------------------------------
def test_resize_nearest_integer_data_is_exact():
    x = RNG.integers(-128, 127, (1, 2, 5, 6), dtype=np.int8)
    y = _resize(x, (10, 12), coordinate_transformation_mode="asymmetric", nearest_mode="floor")
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))


def test_resize_integer_interpolation_rounds_and_saturates():
    # cubic overshoot past 255 saturates; 0.5 ties round to even
    x = np.array([[0, 255, 255, 0]], np.uint8)
    y = _resize(x, (8,), mode="cubic")
    assert y.dtype == np.uint8 and y.max() == 255
    x = np.array([[1, 2]], np.uint8)
    y = _resize(x, (3,), mode="linear", coordinate_transformation_mode="align_corners")
    np.testing.assert_array_equal(y, [[1, 2, 2]])  # 1.5 -> 2


def test_resize_tf_crop_and_resize_extrapolates_outside_the_roi():
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    y = _run("resize", [x], size=[1, 1, 3, 3], scales=[1, 1, 0.75, 0.75], mode="linear",
             coordinate_transformation_mode="tf_crop_and_resize", extrapolation_value=-1.0,
             roi=[0, 0, 0.5, 0.5, 1, 1, 1.5, 1.0])
    # rows sample 1.5, 3.0, 4.5 (outside); columns 1.5, 2.25, 3.0
    want = np.array([[7.5, 8.25, 9.0], [13.5, 14.25, 15.0], [-1, -1, -1]], np.float32)
    np.testing.assert_allclose(y[0, 0], want, rtol=1e-6)


def test_resize_and_grid_sample_keep_float16():
    x = RNG.standard_normal((1, 1, 4, 4)).astype(np.float16)
    assert _resize(x, (8, 8), mode="linear").dtype == np.float16
    grid = _grid(1, (3, 3)).astype(np.float16)
    assert _run("grid_sample", [x, grid]).dtype == np.float16


def test_resize_is_fast():
    op = get_op("resize")
    x = RNG.standard_normal((1, 64, 128, 128)).astype(np.float32)
    attrs = op.normalize_attrs(dict(size=[1, 64, 256, 256], scales=[1, 1, 2, 2], mode="linear"))
    op.reference([x], attrs)
    start = time.perf_counter()
    op.reference([x], attrs)
    assert time.perf_counter() - start < 0.25


@pytest.mark.parametrize("attrs,match", [
    (dict(size=[1, 1, 4], scales=[1, 1, 2, 2]), "size .* has 3 entries"),
    (dict(size=[1, 1, 4, 4], scales=[1, 1, 2]), "scales .* has 3 entries"),
    (dict(size=[1, 1, 4, 4], scales=[1, 1, 0, 2]), "positive"),
    (dict(size=[1, 1, 4, 4], scales=[1, 1, 2, 2], roi=[0, 1]), "roi has 2 entries"),
    (dict(size=[1, 1, 4, 4], scales=[1, 1, 2, 2], mode="area"), "not one of"),
])
def test_resize_infer_errors(attrs, match):
    g = Graph("t")
    x = g.add_input("x", type_of_array(np.zeros((1, 1, 2, 2), np.float32)))
    with pytest.raises(InferError, match=match):
        g.add_node("resize", [x], attrs)


@pytest.mark.parametrize("grid_shape,match", [
    ((1, 3, 3, 3), "grid must have shape"),
    ((2, 3, 3, 2), "batch"),
])
def test_grid_sample_infer_errors(grid_shape, match):
    g = Graph("t")
    x = g.add_input("x", type_of_array(np.zeros((1, 1, 2, 2), np.float32)))
    grid = g.add_input("grid", type_of_array(np.zeros(grid_shape, np.float32)))
    with pytest.raises(InferError, match=match):
        g.add_node("grid_sample", [x, grid])


def test_macs():
    g = Graph("t")
    x = g.add_input("x", type_of_array(np.zeros((1, 2, 4, 4), np.float32)))
    grid = g.add_input("grid", type_of_array(np.zeros((1, 3, 5, 2), np.float32)))
    for mode, per in [("nearest", 0), ("linear", 2 * 2), ("cubic", 4 * 2)]:
        n = g.add_node("resize", [x], dict(size=[1, 2, 8, 8], scales=[1, 1, 2, 2], mode=mode))
        assert n.opdef.macs([x.type], [v.type for v in n.outputs], n.attrs) == 128 * per
    for mode, per in [("nearest", 0), ("bilinear", 4), ("bicubic", 16)]:
        n = g.add_node("grid_sample", [x, grid], dict(mode=mode))
        assert n.opdef.macs([x.type, grid.type], [v.type for v in n.outputs], n.attrs) == 30 * per

