"""Tests of the model zoo (``hbc.models``): every model builds, imports with the torch
frontend, has the expected MACs and parameters, and the float interpreter matches torch.

Oracles: published MAC and parameter counts for the standard networks; for the document
models, which publish no MACs, our own figures pinned as regression guards (marked "ours").
Numerics compare the interpreter with the torch model run in float64, tolerance 1e-4 of the
output's range. The seeded random weights make activations large (outputs span 1e3..1e6), so
float32 torch is a poor oracle; and EfficientNet-B2 with them is ill-conditioned in float32
(squeeze-excite gates on pre-activations of ~1e4 flip between 0 and 1 on rounding; float32
torch itself misses the float64 output by 4e-4 of its range), so it is compared with its
BatchNorm statistics re-estimated on the example input, which keeps activations at unit scale.

The heavy document models run their numeric comparison at the standard size under ``slow``;
the default suite imports them at the standard size (and computes MACs) and compares numerics
at a reduced input size.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch

import hbc
from hbc import models
from hbc.calops import calops
from hbc.errors import InputError

NAMES = ["resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2", "efficientnet_b0",
         "efficientnet_b2", "vargnet_v2", "mixvargenet", "multitask_resize", "stereonet",
         "bev_ipm"]

# name -> (GMACs, torch parameters in millions, source of the figures)
EXPECTED = {
    "resnet18": (1.82, 11.69, "published"),
    "resnet50": (4.09, 25.56, "published"),
    "mobilenet_v1": (0.569, 4.23, "published"),
    "mobilenet_v2": (0.300, 3.50, "published"),
    "efficientnet_b0": (0.39, 5.29, "published"),
    "efficientnet_b2": (0.659, 9.11, "published params; MACs ours at 224 (1.0 G at 260)"),
    "vargnet_v2": (0.360, 3.63, "ours"),
    "mixvargenet": (1.034, 2.31, "ours"),
    "multitask_resize": (2.273, 1.19, "ours"),
    "stereonet": (117.66, 3.87, "ours"),
    "bev_ipm": (9.447, 7.11, "ours"),
}
STANDARD_INPUTS = {
    "multitask_resize": [(1, 3, 512, 960)],
    "stereonet": [(2, 3, 544, 960)],
    "bev_ipm": [(6, 3, 256, 480)],
}
HEAVY = ("multitask_resize", "stereonet", "bev_ipm")
#: reduced sizes for the default-suite numerics of the heavy models
SMALL = {
    "multitask_resize": {"input_hw": (128, 256)},
    "stereonet": {"input_hw": (128, 256)},
    "bev_ipm": {"image_hw": (256, 256), "bev_hw": (64, 64)},
}


def _feeds(graph, inputs) -> dict[str, np.ndarray]:
    return {v.name: x.numpy() for v, x in zip(graph.inputs, inputs, strict=True)}


def _reference(module: torch.nn.Module, inputs) -> dict[str, np.ndarray]:
    """The module's outputs computed in float64, keyed like the graph's outputs."""
    with torch.no_grad():
        out = copy.deepcopy(module).double()(*[x.double() for x in inputs])
    if isinstance(out, dict):
        return {k: v.numpy() for k, v in out.items()}
    return {"output": out.numpy()}


def assert_matches_torch(module: torch.nn.Module, inputs, graph=None) -> None:
    """Interpret the imported graph; every output within 1e-4 of its range of float64 torch
    (integer outputs: equal)."""
    graph = graph or hbc.load((module, inputs))
    got = hbc.interpret(graph, _feeds(graph, inputs))
    ref = _reference(module, inputs)
    assert sorted(got) == sorted(ref)
    for name, want in ref.items():
        have = got[name]
        assert have.shape == want.shape, name
        if have.dtype.kind in "iu":
            mismatch = np.mean(have != want)
            assert mismatch <= 1e-3, f"{name}: {mismatch:.2%} of the labels differ"
            continue
        err = float(np.abs(have.astype(np.float64) - want).max())
        assert err <= 1e-4 * float(np.ptp(want)), f"{name}: max abs err {err:.3g}, range " \
                                                  f"{np.ptp(want):.3g}"


def with_data_bn_stats(module: torch.nn.Module, inputs) -> torch.nn.Module:
    """A copy of ``module`` whose BatchNorm running statistics are those of ``inputs``."""
    module = copy.deepcopy(module)
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exactly the batch statistics
    module.train()
    with torch.no_grad():
        module(*inputs)
    return module.eval()


# -- registry --------------------------------------------------------------------------------
def test_names_are_the_documented_set():
    assert models.names() == NAMES


def test_import_is_cheap():
    code = "import sys, hbc.models; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_name_and_option_are_reported():
    with pytest.raises(ValueError, match="known: resnet18, resnet50"):
        models.build("resnet19")
    with pytest.raises(ValueError, match="takes no option colour.*options: variant"):
        models.build("vargnet_v2", colour="red")


def test_zoo_prefix_in_load():
    g = hbc.load("zoo:mobilenet_v1")
    assert g.name == "mobilenet_v1" and g.meta["source"] == "zoo:mobilenet_v1"
    with pytest.raises(InputError, match="no zoo model named 'vgg16'.*bev_ipm"):
        hbc.load("zoo:vgg16")


# -- every model: build, import, MACs and parameters ---------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_builds_imports_and_counts(name):
    module, inputs = models.build(name)
    assert not module.training
    shapes = [tuple(x.shape) for x in inputs]
    assert shapes == STANDARD_INPUTS.get(name, [(1, 3, 224, 224)])
    graph = hbc.load((module, inputs))
    gmacs, mparams, _ = EXPECTED[name]
    macs = calops(graph).total_macs / 1e9
    tol = 0.03 if name in ("resnet18", "resnet50", "efficientnet_b0") else 0.01
    assert macs == pytest.approx(gmacs, rel=tol), f"{name}: {macs:.4f} GMACs"
    params = sum(p.numel() for p in module.parameters()) / 1e6
    assert params == pytest.approx(mparams, rel=0.01), f"{name}: {params:.3f} M parameters"


def test_efficientnet_b2_at_its_native_size():
    module, inputs = models.build("efficientnet_b2", input_size=260)
    assert inputs[0].shape == (1, 3, 260, 260)
    assert calops(hbc.load((module, inputs))).total_macs / 1e9 == pytest.approx(1.0, rel=0.02)


@pytest.mark.parametrize("variant, gmacs", [("g8g8_0.5x", 0.131), ("g8g4_0.5x", 0.131)])
def test_vargnet_half_width_variants(variant, gmacs):
    module, inputs = models.build("vargnet_v2", variant=variant)
    graph = hbc.load((module, inputs))
    assert calops(graph).total_macs / 1e9 == pytest.approx(gmacs, rel=0.01)


# -- numerics ------------------------------------------------------------------------------
@pytest.mark.parametrize("name, config", [
    ("resnet18", {}), ("resnet50", {}), ("mobilenet_v1", {}), ("mobilenet_v2", {}),
    ("efficientnet_b0", {}), ("efficientnet_b2", {}), ("vargnet_v2", {}),
    ("vargnet_v2", {"variant": "g8g4_0.5x"}), ("mixvargenet", {}),
    ("mixvargenet", {"config": "imagenet_fusion"}),
    *[(name, cfg) for name, cfg in SMALL.items()],
])
def test_interpreter_matches_torch(name, config):
    module, inputs = models.build(name, **config)
    if name == "efficientnet_b2":
        module = with_data_bn_stats(module, inputs)
    assert_matches_torch(module, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("name", HEAVY)
def test_interpreter_matches_torch_at_standard_size(name):
    module, inputs = models.build(name)
    assert_matches_torch(module, inputs)


# -- the resize multi-task model (document 001) ------------------------------------------------
SMALL_HW = (128, 256)


def test_multitask_training_mode_returns_losses():
    from hbc.models.multitask import DET_TASKS, SEG_TASKS

    module, (img, targets) = models.build("multitask_resize", mode="model", input_hw=SMALL_HW)
    module.train()
    losses = module(img, targets)
    expected = [f"{t}_{k}_loss" for t in DET_TASKS for k in ("cls", "box")]
    assert sorted(losses) == sorted(expected + [f"{t}_loss" for t in SEG_TASKS])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert module.backbone.mod1[0].weight.grad is not None


def test_multitask_export_outputs():
    from hbc.models.multitask import DET_TASKS, SEG_TASKS

    module, inputs = models.build("multitask_resize", input_hw=SMALL_HW)
    with torch.no_grad():
        out = module(*inputs)
    h, w = SMALL_HW
    for t, classes in DET_TASKS.items():
        for s in (8, 16, 32):
            assert out[f"{t}_cls_s{s}"].shape == (1, len(classes), h // s, w // s)
            assert out[f"{t}_box_s{s}"].shape == (1, 4, h // s, w // s)
    for t, classes in SEG_TASKS.items():
        assert out[f"{t}_logits"].shape == (1, classes, h // 4, w // 4)
    assert len(out) == 6 * len(DET_TASKS) + len(SEG_TASKS)


@pytest.mark.parametrize("hw", [SMALL_HW, pytest.param((512, 960), marks=pytest.mark.slow)])
def test_multitask_deploy_decodes_the_export_outputs(hw):
    """The deploy graph equals the export graph followed by the decode and channel_argmax
    (both interpreted: the seeded logits span ~1e6, so sigmoid scores near logit 0 are only
    as exact as float32 arithmetic and torch is no oracle for them)."""
    export, inputs = models.build("multitask_resize", mode="export", input_hw=hw)
    deploy, _ = models.build("multitask_resize", mode="deploy", input_hw=hw)
    ge, gd = hbc.load((export, inputs)), hbc.load((deploy, inputs))
    heads = hbc.interpret(ge, _feeds(ge, inputs))
    got = hbc.interpret(gd, _feeds(gd, inputs))
    with torch.no_grad():
        want = deploy._post_process({k: torch.from_numpy(v) for k, v in heads.items()})
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        if name.endswith("_label"):
            assert got[name].dtype == np.int64
            np.testing.assert_array_equal(got[name], value.numpy())
        else:
            np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-5, atol=1e-6)


def test_single_task_models_share_parameters_by_name():
    from hbc.models.multitask import TASKS, single_task_models

    singles = single_task_models(input_hw=SMALL_HW)
    assert list(singles) == list(TASKS)
    full, inputs = models.build("multitask_resize", input_hw=SMALL_HW)
    full_params = dict(full.named_parameters())
    with torch.no_grad():
        full_out = full(*inputs)
    shared: dict[str, torch.nn.Parameter] = {}
    single_macs = 0
    for task, (module, task_inputs) in singles.items():
        params = dict(module.named_parameters())
        assert all(n.startswith(("backbone.", "neck.", f"heads.{task}.")) for n in params)
        for n, p in params.items():
            assert torch.equal(p, full_params[n]), n  # same name, same value
            assert shared.setdefault(n, p) is p, n  # one object across the task models
        with torch.no_grad():
            out = module(*task_inputs)
        for k, v in out.items():
            torch.testing.assert_close(v, full_out[k])
        single_macs += calops(hbc.load((module, task_inputs))).total_macs
    assert set(shared) == set(full_params)
    merged_macs = calops(hbc.load((full, inputs))).total_macs
    assert merged_macs < single_macs / 3  # the backbone and neck dominate and run once


def test_single_task_onnx_files_share_initializer_names(tmp_path):
    """Exported one by one (the merging path's input), the task graphs name the shared
    backbone's weights identically and their heads' weights differently."""
    import onnx

    from hbc.models.common import export_onnx
    from hbc.models.multitask import single_task_models

    names = {}
    for task, (module, inputs) in single_task_models(input_hw=SMALL_HW).items():
        with torch.no_grad():
            outputs = list(module(*inputs))
        path = tmp_path / f"{task}.onnx"
        export_onnx(module, inputs, str(path), output_names=outputs)
        names[task] = {i.name for i in onnx.load(str(path)).graph.initializer}
    common = set.intersection(*names.values())
    assert "backbone.mod1.0.weight" in common and "neck.fuse8.conv.0.0.weight" in common
    assert not any(n.startswith("heads.") for n in common)


# -- StereoNet (document 003) and BEV IPM (document 004) ---------------------------------------
def test_stereonet_cost_volume_uses_plain_ops():
    module, inputs = models.build("stereonet", input_hw=SMALL_HW)
    graph = hbc.load((module, inputs))
    ops = {n.op for n in graph.nodes}
    assert ops <= {"conv", "batch_norm", "relu", "add", "mul", "slice", "reshape",
                   "concat", "reduce_mean", "reduce_sum", "softmax", "resize"}, ops
    assert graph.outputs[0].shape == (1, 1, *SMALL_HW)


def test_bev_ipm_samples_a_constant_quantized_grid():
    from hbc.models.bev_ipm import NUM_VIEWS

    module, inputs = models.build("bev_ipm")
    graph = hbc.load((module, inputs))
    (node,) = [n for n in graph.nodes if n.op == "grid_sample"]
    grid_value = node.inputs[1]
    assert grid_value.name in graph.constants
    grid = graph.constants[grid_value.name]
    assert grid.shape == (NUM_VIEWS, 128, 128, 2)
    feat_w, feat_h = 480 // 8, 256 // 8
    pixels = (grid + 1) / 2 * np.array([feat_w, feat_h])  # feature-map pixels
    np.testing.assert_allclose(pixels * 64, np.round(pixels * 64), atol=2e-3)  # 1/64 steps
    covered = (np.abs(grid) <= 1).all(axis=-1).any(axis=0).mean()
    assert covered > 0.95  # the rig sees nearly the whole BEV grid
    outputs = {v.name: v.shape for v in graph.outputs}
    assert outputs["bev_seg"] == (1, 4, 64, 64)
    assert outputs["det_car_heatmap"] == (1, 1, 64, 64)
    assert outputs["det_pedestrian_reg"] == (1, 10, 64, 64)


@pytest.mark.slow
def test_bev_ipm_at_the_document_scale():
    module, inputs = models.build("bev_ipm", image_hw=(512, 960), bev_hw=(256, 256))
    graph = hbc.load((module, inputs))
    assert calops(graph).total_macs / 1e9 == pytest.approx(37.78, rel=0.01)  # ours
    assert_matches_torch(module, inputs, graph)
