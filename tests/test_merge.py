"""Tests of shared-parameter merging of multi-task graphs (``hbc.passes.merge_tasks``).

The main case follows the source documents: six single-task models (4 detection-like heads, 2
segmentation-like heads) share a backbone by parameter name, each exported to ONNX on its own;
merged, the backbone runs once and the outputs equal the six separate models.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.text import to_text
from hbc.ir.types import TensorType
from hbc.passes import PASSES, merge_tasks
from hbc.passes import registry as _registry  # noqa: F401  (registers the passes)
from hbc.passes.merge import is_parameter_name, merge_files
from tests.passes_util import random_inputs

needs_cse = pytest.mark.skipif("cse" not in PASSES, reason="the 'cse' pass is not written yet")

HW = 64
BACKBONE_CONVS = 5
DET_TASKS = {"det_cyclist_light": 3, "det_person": 1, "det_rear": 2, "det_vehicle_sign": 4}
SEG_TASKS = {"seg_default": 12, "seg_lane": 4}


# -- six torch tasks sharing a backbone by parameter name --------------------------------------

def six_task_models(backbone=None, hw: int = HW, channels: int = 64):
    """[(task name, torch module, output names)] for the six tasks, and the shared backbone.

    Every task module holds the *same* backbone module under ``backbone`` (so its parameters
    export under the same names and values) and its own head under the task's name (so head
    parameter names differ between tasks, as in the multi-task training setup).
    """
    import torch
    from torch import nn

    from hbc.models.common import seeded_init

    def cbr(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    if backbone is None:
        backbone = nn.Sequential(*cbr(3, 16, 2), *cbr(16, 32, 2), *cbr(32, 32, 1),
                                 *cbr(32, channels, 2), *cbr(channels, channels, 1))
        seeded_init(backbone, seed=0)

    class DetHead(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.neck = nn.Sequential(*cbr(channels, 32, 1))
            self.box = nn.Conv2d(32, 4 * classes, 1)
            self.score = nn.Conv2d(32, classes, 1)

        def forward(self, x):
            y = self.neck(x)
            return self.box(y), torch.sigmoid(self.score(y))

    class SegHead(nn.Module):
        def __init__(self, classes: int) -> None:
            super().__init__()
            self.neck = nn.Sequential(*cbr(channels, 16, 1))
            self.cls = nn.Conv2d(16, classes, 1)

        def forward(self, x):
            y = self.cls(self.neck(x))
            return (nn.functional.interpolate(y, size=(hw, hw), mode="bilinear",
                                              align_corners=False),)

    class Task(nn.Module):
        def __init__(self, name: str, head: nn.Module) -> None:
            super().__init__()
            self.backbone = backbone
            self.name = name
            self.add_module(name, head)

        def forward(self, x):
            return getattr(self, self.name)(self.backbone(x))

    tasks = []
    for i, (name, classes) in enumerate(DET_TASKS.items()):
        head = seeded_init(DetHead(classes), seed=10 + i)
        tasks.append((name, Task(name, head).eval(), ("boxes", "scores")))
    for i, (name, classes) in enumerate(SEG_TASKS.items()):
        head = seeded_init(SegHead(classes), seed=20 + i)
        tasks.append((name, Task(name, head).eval(), ("mask",)))
    return tasks, backbone


def export_six_tasks(folder, hw: int = HW, backbone=None, channels: int = 64):
    """Export each task (and the backbone alone) to ONNX in ``folder``; returns the task paths
    and the backbone's path."""
    import torch

    from hbc.models.common import export_onnx

    tasks, backbone = six_task_models(backbone, hw, channels)
    x = torch.zeros(1, 3, hw, hw)
    paths = []
    for name, module, outputs in tasks:
        path = folder / f"{name}.onnx"
        export_onnx(module, [x], str(path), output_names=outputs)
        paths.append(path)
    bb_path = folder / "backbone.onnx"
    export_onnx(backbone, [x], str(bb_path))
    return paths, bb_path


@pytest.fixture(scope="module")
def six_tasks(tmp_path_factory):
    import hbc

    folder = tmp_path_factory.mktemp("six_tasks")
    paths, bb_path = export_six_tasks(folder)
    return paths, [hbc.load(p) for p in paths], hbc.load(bb_path)


def test_backbone_parameters_export_under_the_same_names(six_tasks):
    import onnx
    from onnx import numpy_helper

    paths, _, _ = six_tasks
    per_task = []
    for path in paths:
        inits = onnx.load(str(path)).graph.initializer
        per_task.append({t.name: numpy_helper.to_array(t) for t in inits
                         if t.name.startswith("backbone.")})
    assert len(per_task[0]) == BACKBONE_CONVS * 5  # conv weight + 4 BN tensors per layer
    for params in per_task[1:]:
        assert params.keys() == per_task[0].keys()
        for name, arr in params.items():
            np.testing.assert_array_equal(arr, per_task[0][name])


def _backbone_convs(graph: Graph) -> list[str]:
    return [n.name for n in graph.nodes
            if n.op == "conv" and n.inputs[1].name.startswith("backbone.")]


def _assert_outputs_equal_separate(graphs, names, merged: Graph) -> None:
    feed = random_inputs(graphs[0], seed=3)
    got = interpret(merged, feed)
    expected = {}
    for task, g in zip(names, graphs, strict=True):
        for out, arr in interpret(g, {v.name: feed[v.name] for v in g.inputs}).items():
            expected[f"{task}/{out}"] = arr
    assert list(got) == list(expected)
    for name, arr in expected.items():
        np.testing.assert_array_equal(got[name], arr, err_msg=name)


def test_six_tasks_merge_keeps_every_output(six_tasks):
    paths, graphs, _ = six_tasks
    before = [to_text(g) for g in graphs]
    result = merge_tasks(graphs)  # task names default to the file stems
    names = [p.stem for p in paths]
    assert result.report.tasks == names
    assert [v.name for v in result.graph.outputs] == [
        f"{t}/{o}" for t in names for o in (("mask",) if t.startswith("seg") else
                                            ("boxes", "scores"))]
    assert [v.name for v in result.graph.inputs] == ["input"]
    _assert_outputs_equal_separate(graphs, names, result.graph)
    assert [to_text(g) for g in graphs] == before, "merging must not change its inputs"
    # every backbone parameter is one shared constant
    bb_params = [v for v in result.graph.constant_values() if v.name.startswith("backbone.")]
    assert len(bb_params) == BACKBONE_CONVS * 5
    assert len(result.report.shared_parameters) == BACKBONE_CONVS * 5


@needs_cse
def test_six_tasks_run_the_backbone_once(six_tasks):
    from hbc.calops import calops

    paths, graphs, backbone = six_tasks
    result = merge_tasks(graphs)
    merged, report = result.graph, result.report
    assert len(_backbone_convs(graphs[0])) == BACKBONE_CONVS
    assert len(_backbone_convs(merged)) == BACKBONE_CONVS
    # the first task's names survive for the shared computation
    assert set(_backbone_convs(merged)) == set(_backbone_convs(graphs[0]))
    _assert_outputs_equal_separate(graphs, report.tasks, merged)
    five_backbones = 5 * calops(backbone).total_macs
    assert abs(report.saved.macs - five_backbones) <= 0.01 * five_backbones
    assert report.saved.nodes >= 5 * len(backbone.nodes)
    bb_bytes = sum(v.type.nbytes for v in backbone.constant_values())
    assert report.saved.param_bytes == 5 * bb_bytes
    assert report.passes[0] == "cse"
    text = report.to_text()
    assert "MACs" in text and "saved" in text
    data = json.loads(json.dumps(report.to_json()))
    assert data["saved"]["macs"] == report.saved.macs
    assert [t["name"] for t in data["tasks"]] == report.tasks


@needs_cse
def test_tasks_from_the_torch_frontend_share_the_backbone():
    import torch

    import hbc

    tasks, _ = six_task_models()
    x = torch.zeros(1, 3, HW, HW)
    picked = [tasks[1], tasks[5]]  # det_person, seg_lane
    graphs = [hbc.load((module, (x,))) for _, module, _ in picked]
    names = [name for name, _, _ in picked]
    result = merge_tasks(graphs, names)
    assert len(_backbone_convs(result.graph)) == BACKBONE_CONVS
    assert [v.name for v in result.graph.outputs] == [
        f"{t}/{v.name}" for t, g in zip(names, graphs, strict=True) for v in g.outputs]
    _assert_outputs_equal_separate(graphs, names, result.graph)


# -- small hand-built graphs --------------------------------------------------------------------

def _task(head: str = "head.w", seed: int = 1, *, shape=(1, 3, 8, 8), extra=None,
          name: str = "g") -> Graph:
    """x -> conv(backbone.w) -> relu -> conv(head) -> out (+ add of an optional constant)."""
    rng = np.random.default_rng(0)
    conv = {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]}
    g = Graph(name)
    x = g.add_input("x", TensorType("f32", shape))
    bw = g.add_constant("backbone.w", rng.standard_normal((4, shape[1], 3, 3)).astype(np.float32),
                        exact=True)
    y = g.add_node("conv", [x, bw, None], conv, name="/backbone/conv").outputs[0]
    y = g.add_node("relu", [y], name="/backbone/relu").outputs[0]
    hw = np.random.default_rng(seed).standard_normal((2, 4, 1, 1)).astype(np.float32)
    y = g.add_node("conv", [y, g.add_constant(head, hw, exact=True), None],
                   {**conv, "pads": [0, 0, 0, 0]}, name="/head/conv").outputs[0]
    if extra is not None:
        c = g.add_constant(extra[0], np.asarray(extra[1], dtype=np.float32), exact=True)
        y = g.add_node("add", [y, c], name="/head/add").outputs[0]
    g.set_outputs([g.named_output(y, "out")])
    return g


def test_conflicting_parameter_is_an_error_naming_it_and_both_tasks():
    with pytest.raises(InputError) as e:
        merge_tasks([_task(seed=1), _task(seed=2)], ["det_a", "det_b"])
    msg = str(e.value)
    assert "'head.w'" in msg and "'det_a'" in msg and "'det_b'" in msg
    assert "on_conflict" in msg


def test_conflicting_shapes_are_named():
    g2 = _task(extra=("bias", [1.0]))
    g1 = _task(extra=("bias", [[[1.0]], [[2.0]]]))
    with pytest.raises(InputError, match=r"'bias'.*f32\[2,1,1\] vs f32\[1\]"):
        merge_tasks([g1, g2], ["a", "b"])


def test_on_conflict_keep_renames_with_the_task_prefix():
    graphs = [_task(seed=1), _task(seed=2), _task(seed=1)]
    result = merge_tasks(graphs, ["a", "b", "c"], on_conflict="keep")
    consts = {v.name for v in result.graph.constant_values()}
    assert {"backbone.w", "a/head.w", "b/head.w"} <= consts
    assert "head.w" not in consts and "c/head.w" not in consts  # c shares a's value
    assert result.report.kept_separate == ["head.w"]
    _assert_outputs_equal_separate(graphs, ["a", "b", "c"], result.graph)


def test_anonymous_constants_are_kept_apart_without_an_error():
    g1 = _task(extra=("/head/Constant_output_0", [1.0]))
    g2 = _task(extra=("/head/Constant_output_0", [2.0]))
    result = merge_tasks([g1, g2], ["a", "b"])
    assert {"a/head/Constant_output_0", "b/head/Constant_output_0"} <= {
        v.name for v in result.graph.constant_values()}
    _assert_outputs_equal_separate([g1, g2], ["a", "b"], result.graph)
    assert not is_parameter_name("onnx::Cast_13") and not is_parameter_name("mul/scalar")
    assert is_parameter_name("backbone.conv1.weight")


def test_identical_content_under_other_names_is_shared_only_when_asked():
    g1, g2 = _task("a_head.w", seed=1), _task("b_head.w", seed=1)
    plain = merge_tasks([g1, g2], ["a", "b"])
    assert {"a_head.w", "b_head.w"} <= {v.name for v in plain.graph.constant_values()}
    assert plain.report.shared_identical == []
    shared = merge_tasks([g1, g2], ["a", "b"], share_identical=True)
    names = {v.name for v in shared.graph.constant_values()}
    assert "a_head.w" in names and "b_head.w" not in names
    assert shared.report.shared_identical == [("b_head.w", "a_head.w")]
    assert shared.report.merged.params < plain.report.merged.params
    _assert_outputs_equal_separate([g1, g2], ["a", "b"], shared.graph)


def test_input_type_mismatch_names_the_input_and_both_tasks():
    with pytest.raises(InputError) as e:
        merge_tasks([_task(), _task(shape=(1, 3, 16, 16))], ["det", "seg"])
    msg = str(e.value)
    assert "input 'x'" in msg and "'det'" in msg and "'seg'" in msg
    assert "f32[1,3,8,8]" in msg and "f32[1,3,16,16]" in msg


def test_outputs_are_named_task_slash_output_even_when_computed_once():
    graphs = [_task(), _task()]  # the same computation twice: CSE makes the outputs one value
    result = merge_tasks(graphs, ["det_person", "det_rear"])
    assert [v.name for v in result.graph.outputs] == ["det_person/out", "det_rear/out"]
    _assert_outputs_equal_separate(graphs, ["det_person", "det_rear"], result.graph)
    if "cse" in PASSES:
        convs = [n for n in result.graph.nodes if n.op == "conv"]
        assert len(convs) == 2


def test_colliding_node_names_take_the_task_prefix():
    result = merge_tasks([_task(seed=1), _task("other.w", seed=2)], ["a", "b"])
    names = {n.name for n in result.graph.nodes}
    assert "/head/conv" in names and "b/head/conv" in names


def test_bad_task_names():
    with pytest.raises(InputError, match="unique"):
        merge_tasks([_task(), _task()], ["a", "a"])
    with pytest.raises(InputError, match="task name 'a/b'"):
        merge_tasks([_task(), _task()], ["a/b", "c"])
    with pytest.raises(InputError, match="2 task names for 1"):
        merge_tasks([_task()], ["a", "b"])
    with pytest.raises(InputError, match="on_conflict"):
        merge_tasks([_task()], on_conflict="rename")
    assert merge_tasks([_task(name="g"), _task(name="g")]).report.tasks == ["task0", "task1"]


def test_merge_files_writes_hbir(tmp_path):
    import hbc
    from hbc.ir.io import save

    paths = []
    for name, seed in (("det_a", 1), ("det_b", 1)):
        paths.append(tmp_path / f"{name}.hbir")
        save(_task(seed=seed), paths[-1])
    out = tmp_path / "multi.hbir"
    report = merge_files(paths, None, out)
    assert report.tasks == ["det_a", "det_b"]
    merged = hbc.load(out)
    assert [v.name for v in merged.outputs] == ["det_a/out", "det_b/out"]
    with pytest.raises(InputError, match=r"unknown output format"):
        merge_files(paths, ["a", "b"], tmp_path / "multi.pb")
