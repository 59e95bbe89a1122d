"""``hbc verify`` (align-bpu validation): the simulator against int_infer bit for bit, the
first diverging layer on a mismatch, float-vs-int figures, worker processes, JSON and the CLI.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hbc.backend.hbm_writer import HbmModelSpec, hbm_bytes
from hbc.cli import main
from hbc.errors import InputError
from hbc.ir import save
from hbc.quant import build_int_infer
from hbc.runtime import Runtime
from hbc.verify import verify
from tests.runtime_models import compile_model, digits, digits_net, small_net


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small():
    return compile_model("small", small_net())


@pytest.fixture(scope="module")
def files(small, tmp_path_factory):
    """The small model as .hbm, its float graph and lowered graph as .hbir, and 6 samples."""
    d = tmp_path_factory.mktemp("verify")
    (d / "m.hbm").write_bytes(small.hbm)
    save(small.floats, d / "float.hbir")
    save(small.lowered, d / "lowered.hbir")
    rng = np.random.default_rng(5)
    np.savez(d / "data.npz", **{v.name: rng.standard_normal((6, *v.shape[1:]))
                                .astype(np.float32) for v in small.floats.inputs})
    return d


def test_match_with_float_reference_per_layer(small):
    calls = []
    report = verify(small.hbm, small.floats, samples=3, per_layer=True,
                    progress=lambda done, total: calls.append((done, total)))
    assert report.ok and report.exit_code == 0 and report.samples == 3
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert [o.name for o in report.outputs] == ["output0", "output1"]
    assert all(o.cosine > 0.99 and o.sqnr > 15 for o in report.outputs)
    values = [v.name for n in small.lowered.nodes for v in n.outputs]
    assert [r.value for r in report.layers] == values
    convs = [r for r in report.layers if r.op == "qconv"]
    assert convs and all(r.cosine is not None and r.cosine > 0.99 for r in convs)
    text = report.to_text()
    assert "MATCH: every value bit-exact on all 3 sample(s)" in text and "output1" in text


def test_real_data_and_sample_cap(tmp_path):
    images = digits()
    c = compile_model("digits", digits_net(), calib=[{"x": images[i:i + 1]} for i in range(32)])
    np.savez(tmp_path / "val.npz", x=images[1200:1216])
    (tmp_path / "d.hbm").write_bytes(c.hbm)
    report = verify(tmp_path / "d.hbm", c.floats, data=tmp_path / "val.npz")
    assert report.ok and report.samples == 16 and report.data.endswith("val.npz")
    assert report.outputs[0].sqnr > 20
    assert verify(c.hbm, c.floats, data=tmp_path / "val.npz", samples=5).samples == 5


def test_cpu_fallback_values_are_compared_within_one_step():
    c = compile_model("cpu", small_net(), cpu_ops=("add",))
    report = verify(c.hbm, c.floats, samples=2, per_layer=True)
    assert report.ok
    assert report.tolerance_values and report.tolerance_values[0] == \
        c.lowered.node(c.lowered.meta["cpu_nodes"][0]).outputs[0].name


@pytest.mark.parametrize("per_layer", [False, True])
def test_a_kernel_divergence_names_the_first_layer(small, monkeypatch, per_layer):
    """A torch kernel off by one from one element of one layer on: exit code 1, that layer,
    the first element and both values (located by a trace re-run when only outputs are
    compared)."""
    from hbc.quant.torch_kernels import KERNELS

    node = [n for n in small.lowered.nodes if n.op == "qconv"][1]
    exact = KERNELS["qconv"]

    def off_by_one(ctx, args):
        results = exact(ctx, args)
        if ctx.name == node.where():
            results[0].view(-1)[5:] += 1
        return results

    monkeypatch.setitem(KERNELS, "qconv", off_by_one)
    report = verify(small.hbm, small.floats, samples=2, per_layer=per_layer)
    first = report.first_mismatch
    assert report.exit_code == 1 and report.mismatched_samples == 2
    assert (first.sample, first.node, first.op, first.value) == (0, node.name, "qconv",
                                                                 node.outputs[0].name)
    assert first.index == (0, 0, 0, 5) and first.reference == first.simulator + 1
    assert first.differing == first.elements - 5
    assert f"layer '{node.name}' (qconv" in report.to_text()


def test_integer_reference_module(small):
    report = verify(small.hbm, build_int_infer(small.lowered), samples=2, per_layer=True)
    assert report.ok and report.reference_kind == "integer"
    assert all(o.cosine is None for o in report.outputs)


def test_qat_model_and_its_converted_int_infer(small):
    """REF a QAT model: its float graph with the learned scales is the float reference; the
    int_infer model ``convert`` makes of it (lowered on its own, not read from the .hbm) is an
    integer reference the program must equal bit for bit."""
    import hbc
    from hbc.models import demo_cnn
    from hbc.passes import run
    from hbc.quant import convert, prepare_qat
    from hbc.quant.qat import calibrate

    model, (x,) = demo_cnn.build()
    q = prepare_qat(model, (x,), fold_bn="all")
    calibrate(q, [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(s))
                  for s in range(2)])
    low = run(hbc.load((q, (x,))), passes=[("lower-int", {"march": "bayes"})])
    data = hbm_bytes([HbmModelSpec("qat", low, {"opt": 3}, {})], "bayes")
    floats = verify(data, (q, (x,)), samples=2, per_layer=True)
    assert floats.ok and floats.reference == "<QAT module DemoNet>"
    assert floats.outputs[0].sqnr > 20
    ints = verify(data, convert(q, (x,)), samples=2, per_layer=True)
    assert ints.ok and ints.reference_kind == "integer"


def test_reference_must_match_the_model(small):
    other = compile_model("digits", digits_net(steps=0))
    with pytest.raises(InputError, match=r"inputs \[\('x', \[1, 1, 8, 8\]\)\] are not those "
                       r"of model 'small'"):
        verify(small.hbm, other.floats, samples=1)
    with pytest.raises(InputError, match="--jobs 0"):
        verify(small.hbm, small.floats, jobs=0)


def test_two_jobs_give_the_one_process_report(files):
    """Worker processes (reopening the .hbm by path) give exactly the same report."""
    args = (files / "m.hbm", str(files / "float.hbir"))
    one = verify(*args, data=files / "data.npz", per_layer=True)
    two = verify(*args, data=files / "data.npz", per_layer=True, jobs=2)
    assert one.samples == 6
    assert json.dumps(two.to_json(), sort_keys=True) == json.dumps(one.to_json(), sort_keys=True)


# -- the CLI -----------------------------------------------------------------------------------
def _corrupted(small, path):
    """The program with the first conv's first output channel negated, written to ``path``."""
    graph = small.lowered.copy()
    node = next(n for n in graph.nodes if n.op == "qconv")
    w = node.inputs[1]
    data = np.array(graph.constants[w.name])
    data[0] = np.maximum(-data[0], -127)
    graph.set_constant(w, data)
    path.write_bytes(hbm_bytes([HbmModelSpec("small", graph, {"opt": 3}, {})], "bayes"))
    return node


def test_cli_exit_codes(small, files, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(files / "m.hbm"), "-r", str(files / "float.hbir"),
                              "--samples", "2"])
    assert ok.exit_code == 0, ok.output
    assert "MATCH" in ok.output
    node = _corrupted(small, tmp_path / "bad.hbm")
    bad = runner.invoke(main, ["verify", str(tmp_path / "bad.hbm"), "-r",
                               str(files / "lowered.hbir"), "--samples", "2"])
    assert bad.exit_code == 1, bad.output
    assert re.search(rf"MISMATCH in 2 of 2 sample\(s\); first: sample 0: layer '{node.name}' "
                     rf"\(qconv.*value %{re.escape(node.outputs[0].name)}, element \[", bad.output)
    missing = runner.invoke(main, ["verify", str(files / "m.hbm"), "-r",
                                   str(tmp_path / "none.onnx")])
    assert missing.exit_code == 2 and "none.onnx" in missing.output
    damaged = runner.invoke(main, ["verify", str(tmp_path / "none.hbm"), "-r", "x.onnx"])
    assert damaged.exit_code == 2 and "none.hbm: no such file" in damaged.output


def test_cli_json_schema(files):
    result = CliRunner().invoke(main, ["verify", str(files / "m.hbm"), "-r",
                                       str(files / "float.hbir"), "--data",
                                       str(files / "data.npz"), "--samples", "2", "--per-layer",
                                       "--json"])
    assert result.exit_code == 0
    report = json.loads(result.output[result.output.index("{"):])
    assert sorted(report) == sorted([
        "schema", "hbm", "model", "march", "reference", "reference_kind", "data", "samples",
        "per_layer", "result", "exit_code", "mismatched_samples", "first_mismatch", "outputs",
        "layers", "tolerance"])
    assert (report["schema"], report["result"], report["exit_code"], report["samples"]) == \
        ("hbc.verify/1", "match", 0, 2)
    assert sorted(report["outputs"][0]) == ["cosine", "dtype", "mismatched_samples", "name",
                                            "shape", "sqnr"]
    assert sorted(report["layers"][0]) == ["cosine", "dtype", "mismatched_samples", "node",
                                           "op", "sqnr", "value"]
    assert sorted(report["tolerance"]) == ["rule", "values"]
    assert Runtime(files / "m.hbm").name == report["model"]


@pytest.mark.parametrize("opt", [1, 3])
def test_compiled_file_against_its_onnx(tmp_path, opt):
    """The real flow: ``hbc.compile`` of an ONNX model, verified against that ONNX file; the
    float passes of the opt level keep the names, so the convs have float counterparts."""
    import hbc
    from hbc.models.common import export_onnx

    module, example = small_net()
    export_onnx(module, example, str(tmp_path / "m.onnx"), input_names=("x", "y"),
                output_names=("seg", "cls"))
    hbc.compile(str(tmp_path / "m.onnx"), opt=opt, output=tmp_path / "m.hbm")
    result = CliRunner().invoke(main, ["verify", str(tmp_path / "m.hbm"), "-r",
                                       str(tmp_path / "m.onnx"), "--per-layer", "--samples",
                                       "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert [o["name"] for o in report["outputs"]] == ["seg", "cls"]
    assert all(o["cosine"] > 0.99 for o in report["outputs"])
    convs = [r for r in report["layers"] if r["op"] == "qconv"]
    assert convs and all(r["cosine"] is not None for r in convs)


def test_a_file_not_compiled_from_the_reference_is_caught(tmp_path):
    """The integer reference is derived from the float REF with the file's scales: an edited
    weight in the program (which the program's own int_infer would reproduce) or another
    model's file is reported at its first difference, exit 1."""
    import hbc
    from hbc.backend.hbm_writer import write_hbm
    from hbc.models.common import export_onnx, seeded_init
    from hbc.runtime import read_hbm

    module, example = small_net()
    export_onnx(module, example, str(tmp_path / "m.onnx"), input_names=("x", "y"),
                output_names=("seg", "cls"))
    out = hbc.compile(str(tmp_path / "m.onnx"), output=tmp_path / "m.hbm").output
    model = read_hbm(out).model()
    program = model.graph()
    conv = next(n for n in program.nodes if n.op == "qconv")
    weight = program.constants[conv.inputs[1].name].copy()
    weight.flat[0] = -weight.flat[0] if weight.flat[0] else 1
    program.set_constant(conv.inputs[1], weight)
    write_hbm(tmp_path / "edited.hbm",
              [HbmModelSpec(model.name, program, model.options, model.perf)], "bayes")
    run = CliRunner().invoke
    res = run(main, ["verify", str(tmp_path / "edited.hbm"), "-r", str(tmp_path / "m.onnx"),
                     "--samples", "1"])
    assert res.exit_code == 1, res.output
    assert f"constant %{conv.inputs[1].name} differs" in res.output
    other, _ = small_net()
    seeded_init(other, 7)
    export_onnx(other, example, str(tmp_path / "o.onnx"), input_names=("x", "y"),
                output_names=("seg", "cls"))
    res = run(main, ["verify", str(out), "-r", str(tmp_path / "o.onnx"), "--samples", "1"])
    assert res.exit_code == 1 and "is not what" in res.output
