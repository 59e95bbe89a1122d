"""The multi-task path of the resize model end to end (issue 7, document 001):

six single-task ONNX graphs (a shared VarGNetV2 backbone and neck, one head each) -> merged by
shared-parameter merging -> BN folded in two scoped steps (backbone and neck, then the heads)
-> calibrated -> compiled to one ``.hbm`` -> run on the simulator, which must equal the torch
int_infer reference bit for bit on every output; and the merged outputs must match the float
single-task models. The MACs merging saved are printed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import hbc
from hbc.ir.interpret import interpret
from hbc.models.common import export_onnx
from hbc.models.multitask import TASKS, single_task_models
from hbc.passes import merge_tasks, run
from hbc.passes.calibrate import calibrate
from hbc.quant import build_int_infer
from hbc.runtime import Runtime

HW = (64, 128)


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("tasks")
    graphs, refs = [], {}
    for task, (module, inputs) in single_task_models(input_hw=HW).items():
        with torch.no_grad():
            outputs = module(*inputs)
        path = folder / f"{task}.onnx"
        export_onnx(module, inputs, str(path), output_names=list(outputs))
        graphs.append(hbc.load(path))
        refs.update({f"{task}/{k}": v.numpy() for k, v in outputs.items()})
    result = merge_tasks(graphs, list(TASKS))
    return result, refs, inputs[0].numpy()


def test_merge_fold_calibrate_compile_simulate(merged, tmp_path, capsys):
    result, refs, image = merged
    saved = result.report.saved
    separate = result.report.separate
    print(f"\nmulti-task resize model ({len(TASKS)} tasks, {HW[0]}x{HW[1]}): merging saved "
          f"{saved.macs:,} MACs of {separate.macs:,} ({100 * saved.macs / separate.macs:.1f}%)")
    assert saved.macs > 0.6 * separate.macs  # five of six backbones and necks

    g = result.graph
    assert sum(n.op == "batch_norm" for n in g.nodes) > 0
    # ONNX node names carry the module path: /backbone/..., /neck/..., /det_person/...
    step1 = run(g, passes="fold-bn{scope=/backbone/*,/neck/*}")
    left = [n.loc for n in step1.nodes if n.op == "batch_norm"]
    assert left and all(loc.startswith(("/det_", "/seg_")) for loc in left)
    step2 = run(step1, passes="fold-bn{scope=/det_*,/seg_*}")
    assert not [n for n in step2.nodes if n.op == "batch_norm"]

    feeds = {g.inputs[0].name: image}
    floats = interpret(step2, feeds)
    for name, want in refs.items():
        # seeded weights give outputs in the thousands: within 1e-5 of the output's range
        np.testing.assert_allclose(floats[name], want, rtol=0, atol=1e-5 * np.ptp(want),
                                   err_msg=name)

    rng = np.random.default_rng(0)
    samples = [{g.inputs[0].name: rng.standard_normal(image.shape).astype(np.float32)}
               for _ in range(2)]
    calibrated = calibrate(step2, samples, method="max")
    out = hbc.compile(calibrated, "bayes", 3, output=tmp_path / "multitask.hbm",
                      names=["multitask"]).output
    sim = Runtime(out)
    program = sim_graph = hbc.runtime.read_hbm(out).model().graph()
    reference = build_int_infer(program)
    for feed in (feeds, samples[0]):
        got = sim.run(feed, dequantize=True)
        want = reference.run(feed)
        assert sorted(got) == sorted(v.name for v in sim_graph.outputs)
        assert len(got) == len(refs)
        for name in got:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
