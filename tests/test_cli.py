"""The CLI on good and bad input: exit codes and one-line errors, through the console script."""

from __future__ import annotations

import json

import onnx
import pytest
from onnx import TensorProto, helper

from hbc.models import demo_cnn


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "demo.onnx"
    demo_cnn.export(str(path))
    return path


def _one_error_line(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in proc.stderr
    return lines[0]


def test_inspect_prints_hbir(hbc_cli, demo_onnx):
    proc = hbc_cli("inspect", demo_onnx)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("hbir 1\n")
    assert " = conv(" in proc.stdout and "return %logits" in proc.stdout


def test_inspect_writes_hbir_and_reloads(hbc_cli, demo_onnx, tmp_path):
    out = tmp_path / "m.hbir"
    assert hbc_cli("inspect", demo_onnx, "-o", out).returncode == 0
    assert out.exists() and out.with_suffix(".npz").exists()
    again = hbc_cli("inspect", out)
    assert again.returncode == 0
    assert again.stdout == hbc_cli("inspect", demo_onnx).stdout


def test_calops_table_and_json(hbc_cli, demo_onnx):
    proc = hbc_cli("calops", demo_onnx)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1].startswith("total: ")
    data = json.loads(hbc_cli("calops", demo_onnx, "--json").stdout)
    assert data["total_macs"] == sum(layer["macs"] for layer in data["layers"])
    # stem conv: 16 x 3 x 3 x 3 weights at 32x32 outputs
    stem = next(layer for layer in data["layers"] if layer["op"] == "conv")
    assert stem["macs"] == 16 * 3 * 9 * 32 * 32


def test_missing_file(hbc_cli, tmp_path):
    proc = hbc_cli("inspect", tmp_path / "nope.onnx")
    assert proc.returncode == 2
    assert "nope.onnx: no such file" in _one_error_line(proc)


def test_not_an_onnx_file(hbc_cli, tmp_path):
    bad = tmp_path / "text.onnx"
    bad.write_text("this is not a protobuf\n" * 10)
    proc = hbc_cli("inspect", bad)
    assert proc.returncode == 2
    assert "text.onnx" in _one_error_line(proc)


def test_truncated_onnx(hbc_cli, demo_onnx, tmp_path):
    data = demo_onnx.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    proc = hbc_cli("inspect", bad)
    assert proc.returncode == 2
    assert "truncated.onnx" in _one_error_line(proc)


def _model(nodes, inputs, outputs, opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_ops_all_listed(hbc_cli, tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    nodes = [helper.make_node("Relu", ["x"], ["a"], name="ok"),
             helper.make_node("Erf", ["a"], ["b"], name="erf_1"),
             helper.make_node("Sin", ["b"], ["y"], name="sin_1")]
    path = tmp_path / "unsup.onnx"
    onnx.save(_model(nodes, [x], [y]), path)
    proc = hbc_cli("inspect", path)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "erf_1" in line and "Erf" in line and "sin_1" in line and "Sin" in line
    assert "ok" not in line.split(":", 2)[2].replace("not supported", "")


def test_dynamic_input_needs_shape(hbc_cli, tmp_path):
    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 8, 8])
    path = tmp_path / "dyn.onnx"
    onnx.save(_model([helper.make_node("Relu", ["images"], ["y"])], [x], [y]), path)
    proc = hbc_cli("inspect", path)
    assert proc.returncode == 2
    line = _one_error_line(proc)
    assert "'images'" in line and "dimension 0" in line and "--input-shape" in line
    ok = hbc_cli("inspect", path, "--input-shape", "images=2x3x8x8")
    assert ok.returncode == 0, ok.stderr
    assert "%images: f32[2,3,8,8]" in ok.stdout


def test_bad_input_shape_option(hbc_cli, demo_onnx):
    proc = hbc_cli("inspect", demo_onnx, "--input-shape", "input=1xAx3")
    assert proc.returncode == 2
    assert "--input-shape" in _one_error_line(proc)


def test_usage_error_exit_2(hbc_cli):
    assert hbc_cli("inspect").returncode == 2
    assert hbc_cli("no-such-command").returncode == 2


def test_opt_runs_passes_and_explains(hbc_cli, demo_onnx, tmp_path):
    proc = hbc_cli("opt", demo_onnx, "--opt", "3")
    assert proc.returncode == 0, proc.stderr
    assert "batch_norm(" not in proc.stdout and "conv_fused(" in proc.stdout
    dumped = hbc_cli("opt", demo_onnx, "--passes", "fold-bn{scope=/stem*},dce",
                     "--dump-after", "all", "--explain")
    assert dumped.returncode == 0, dumped.stderr
    assert "IR after fold-bn{scope=/stem*}" in dumped.stderr and "IR after dce" in dumped.stderr
    assert "explain: [fold-bn]" in dumped.stderr and "outside scope" in dumped.stderr
    out = tmp_path / "o.hbir"
    assert hbc_cli("opt", demo_onnx, "--opt", "1", "-o", out).returncode == 0
    assert out.exists()


def test_opt_bad_usage(hbc_cli, demo_onnx):
    both = hbc_cli("opt", demo_onnx, "--opt", "1", "--passes", "dce")
    assert both.returncode == 2 and "exactly one" in _one_error_line(both)
    unknown = hbc_cli("opt", demo_onnx, "--passes", "no-such-pass")
    assert unknown.returncode == 2 and "unknown pass 'no-such-pass'" in _one_error_line(unknown)


def test_merge_cli(hbc_cli, demo_onnx, tmp_path):
    out = tmp_path / "multi.hbir"
    proc = hbc_cli("merge", demo_onnx, demo_onnx, "--names", "a,b", "-o", out, "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["saved"]["macs"] > 0
    assert hbc_cli("inspect", out).stdout.count("return %a/logits, %b/logits") == 1
