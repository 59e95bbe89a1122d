"""``hbc compile`` end to end: models in, ``.hbm`` + ``.perf.json`` + ``.perf.html`` out.

Oracles: the reader gives back what compile wrote (the program prints as the lowered graph's
.hbir), the same compile twice gives the same bytes, ``hbc perf`` re-derives the report compile
wrote, and the simulator's program equals the lowered graph.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import hbc
from hbc.cli import main
from hbc.ir import to_text
from hbc.models import demo_cnn
from hbc.runtime.hbm import read_hbm


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("demo") / "demo_cnn.onnx"
    demo_cnn.export(str(path))
    return path


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.npz"
    rng = np.random.default_rng(0)
    np.savez(path, input=rng.standard_normal((6, 3, 32, 32)).astype(np.float32))
    return path


@pytest.fixture(scope="module")
def compiled(demo_onnx, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "demo.hbm"
    return hbc.compile(str(demo_onnx), "bayes", 3, output=out, calib_data=str(calib))


def test_compile_writes_hbm_and_reports(compiled):
    m = compiled.models[0]
    assert compiled.output.exists() and m.perf_json.exists() and m.perf_html.exists()
    report = json.loads(m.perf_json.read_text())
    s = report["summary"]
    for key in ("march", "opt", "macs", "latency_ms", "fps", "ddr_bytes_per_frame", "bpu_ops",
                "cpu_ops"):
        assert key in s
    assert s["march"] == "bayes" and s["opt"] == 3 and s["cpu_ops"] >= 0
    assert report["layers"] and "<svg" in m.perf_html.read_text()
    assert m.options["calib_method"] == "max" and m.options["calib_samples"] == 6


def test_hbm_holds_the_lowered_program(compiled):
    f = read_hbm(compiled.output, march="bayes")
    (model,) = f.models
    assert model.name == "demo_cnn"
    assert to_text(model.graph()) == to_text(compiled.models[0].graph)
    assert model.perf == compiled.models[0].perf["summary"]
    assert [d["name"] for d in model.inputs] == ["input"]


def test_compile_is_deterministic(demo_onnx, calib, compiled, tmp_path):
    again = hbc.compile(str(demo_onnx), "bayes", 3, output=tmp_path / "demo.hbm",
                        calib_data=str(calib))
    assert again.output.read_bytes() == compiled.output.read_bytes()
    assert again.models[0].perf_json.read_bytes() == compiled.models[0].perf_json.read_bytes()


def test_perf_command_rederives_the_report(compiled, tmp_path):
    res = CliRunner().invoke(main, ["perf", str(compiled.output), "--json", "-"])
    assert res.exit_code == 0, res.output
    assert res.output == compiled.models[0].perf_json.read_text()
    html = tmp_path / "p.html"
    res = CliRunner().invoke(main, ["perf", str(compiled.output), "--html", str(html)])
    assert res.exit_code == 0 and html.read_text() == compiled.models[0].perf_html.read_text()


def test_cli_compile_json_and_summary(demo_onnx, calib, tmp_path):
    out = tmp_path / "m.hbm"
    res = CliRunner().invoke(main, ["compile", str(demo_onnx), "--march", "bernoulli2", "--opt",
                                    "1", "--calib-data", str(calib), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["march"] == "bernoulli2" and data["opt"] == 1
    assert data["models"][0]["summary"]["march"] == "bernoulli2"
    res = CliRunner().invoke(main, ["compile", str(demo_onnx), "--calib-data", str(calib), "-o",
                                    str(tmp_path / "n.hbm")])
    assert res.exit_code == 0, res.output
    assert "estimated latency" in res.stdout and "on the BPU" in res.stdout


def test_opt_levels_order_the_latency(demo_onnx, calib, tmp_path):
    lat = [hbc.compile(str(demo_onnx), "bayes", opt, output=tmp_path / f"o{opt}.hbm",
                       calib_data=str(calib)).models[0].perf["summary"]["latency_ms"]
           for opt in range(4)]
    assert lat[0] > lat[1] >= lat[2] >= lat[3]


def test_without_data_calibrates_on_random_samples_with_a_warning(demo_onnx, tmp_path):
    r = hbc.compile(str(demo_onnx), "bayes", 2, output=tmp_path / "r.hbm")
    assert any("no calibration data" in w for w in r.models[0].warnings)
    assert "warning: no calibration data" in r.to_text()


def test_several_models_in_one_file_and_pack(demo_onnx, calib, tmp_path):
    r = hbc.compile([str(demo_onnx), str(demo_onnx)], "bayes", 3, output=tmp_path / "ab.hbm",
                    calib_data=str(calib), names=["a", "b"])
    assert [m.name for m in read_hbm(r.output).models] == ["a", "b"]
    assert (tmp_path / "ab.a.perf.json").exists() and (tmp_path / "ab.b.perf.html").exists()
    res = CliRunner().invoke(main, ["pack", str(r.output), str(r.output), "--names",
                                    "a,b,c,d", "-o", str(tmp_path / "abcd.hbm")])
    assert res.exit_code == 0, res.output
    assert [m.name for m in read_hbm(tmp_path / "abcd.hbm").models] == ["a", "b", "c", "d"]


def test_bad_inputs_exit_2(demo_onnx, tmp_path):
    run = CliRunner().invoke
    assert run(main, ["compile", str(tmp_path / "nope.onnx")]).exit_code == 2
    res = run(main, ["compile", str(demo_onnx), "--march", "nosuch"])
    assert res.exit_code == 2 and "nosuch" in res.output
    assert not list(tmp_path.glob("*.hbm"))


def test_report_dir_gets_the_program(demo_onnx, calib, tmp_path):
    r = hbc.compile(str(demo_onnx), "bayes", 3, output=tmp_path / "x.hbm",
                    calib_data=str(calib), report_dir=tmp_path / "rep")
    assert (tmp_path / "rep" / "x.hbir").exists()
    assert r.models[0].perf_json.parent == tmp_path / "rep"


def test_qat_model_compiles_with_its_own_scales(tmp_path):
    from hbc.quant import calibrate, prepare_qat

    model, (x,) = demo_cnn.build()
    qat = prepare_qat(model, (x,))
    calibrate(qat, [torch.randn(1, 3, 32, 32) for _ in range(2)])
    r = hbc.compile((qat, (x,)), "bayes", 3, output=tmp_path / "qat.hbm")
    m = r.models[0]
    assert m.options["calib_method"] == "model" and not m.warnings
    assert m.perf["summary"]["bpu_ops"] > 0


def test_unsupported_input_stops_the_compile_with_every_reason(tmp_path):
    from hbc.errors import CheckFailed
    from hbc.models.common import seeded_init

    model = seeded_init(demo_cnn.DemoNet(), 0).eval()
    with pytest.raises(CheckFailed) as e:
        hbc.compile((model, (torch.zeros(2, 3, 32, 32),)), "bernoulli2", 3,
                    output=tmp_path / "b.hbm")
    assert "batch" in str(e.value) and "bernoulli2" in str(e.value)
    assert e.value.exit_code == 1 and not (tmp_path / "b.hbm").exists()
