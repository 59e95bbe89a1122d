"""The model checker end to end: the verdicts of every zoo model on bayes and bernoulli2, the
CLI (``hbc check`` and ``model_checker``: exit codes 0/1/2, --json against the schema in
docs/checker.md, --html), the constraint tables (every op has one on every march, malformed
tables are rejected naming the place) and docs/marches.md generated from them.

The per-constraint tests are in test_check_constraints.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from click.testing import CliRunner

import hbc
from hbc.backend import constraints
from hbc.backend.constraints_doc import markdown
from hbc.cli import main
from hbc.cli_check import model_checker
from hbc.errors import InputError
from hbc.ir import save
from tests.test_check_constraints import conv, unary

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# zoo model -> march -> Counter of (op, constraint) over the nodes that do not run on the BPU.
# bayes: everything on the BPU except StereoNet's six 3-D convs (rank-5 conv: an assumed limit)
# and the reduce_sum of StereoNet's soft-argmin and of the BEV view transformer, which hbc has
# no integer kernel for. bernoulli2 adds its CPU ops (reshape, softmax, grid_sample), its
# pooling and channel limits and its batch-1 inputs.
FLATTEN = {("reshape", "unit"): 1}
ZOO = {
    "resnet18": {"bayes": {}, "bernoulli2": FLATTEN},
    "resnet50": {"bayes": {}, "bernoulli2": FLATTEN},
    "mobilenet_v1": {"bayes": {}, "bernoulli2": FLATTEN},
    "mobilenet_v2": {"bayes": {}, "bernoulli2": FLATTEN},
    "efficientnet_b0": {"bayes": {}, "bernoulli2": {**FLATTEN,
                                                    ("global_avg_pool", "input_size"): 1}},
    "efficientnet_b2": {"bayes": {}, "bernoulli2": {**FLATTEN, ("mul", "channels"): 1,
                                                    ("global_avg_pool", "input_size"): 2}},
    "vargnet_v2": {"bayes": {}, "bernoulli2": FLATTEN},
    "mixvargenet": {"bayes": {}, "bernoulli2": FLATTEN},
    "multitask_resize": {"bayes": {}, "bernoulli2": {}},
    "stereonet": {
        "bayes": {("conv_fused", "rank"): 5, ("conv", "rank"): 1,
                  ("reduce_sum", "integer-kernel"): 1},
        "bernoulli2": {("conv_fused", "rank"): 5, ("conv", "rank"): 1,
                       ("reduce_sum", "integer-kernel"): 1, ("reshape", "unit"): 37,
                       ("softmax", "unit"): 1, ("input", "batch"): 1}},
    "bev_ipm": {
        "bayes": {("reduce_sum", "integer-kernel"): 1},
        "bernoulli2": {("reduce_sum", "integer-kernel"): 1, ("avg_pool", "kernel"): 3,
                       ("grid_sample", "unit"): 1, ("input", "batch"): 1}},
}


def non_bpu(report) -> Counter:
    return Counter((v.op, p.constraint) for v in (*report.inputs, *report.nodes)
                   if v.unit != "bpu" for p in v.problems)


@pytest.fixture(scope="module")
def zoo_graphs():
    """Each zoo model imported once (at its standard input size)."""
    cache: dict = {}

    def get(name: str):
        if name not in cache:
            cache[name] = hbc.load(f"zoo:{name}")
        return cache[name]

    return get


def test_zoo_table_covers_the_zoo():
    assert sorted(ZOO) == sorted(hbc.models.names())


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_verdicts(name, zoo_graphs):
    graph = zoo_graphs(name)
    for march in ("bayes", "bernoulli2"):
        report = hbc.check(graph, march)
        assert non_bpu(report) == Counter(ZOO[name][march]), (name, march, report.to_text())
        assert report.exit_code == (1 if ZOO[name][march] else 0)
        assert report.summary().startswith(f"{name} on {march}: ")
        units = report.units()
        p = report.partition
        assert sum(len(s.nodes) for s in p.subgraphs) == len(report.nodes)
        assert p.count("bpu") >= 1 and (p.count("cpu") >= 1) == bool(units["cpu"])
        if not units["cpu"]:
            assert p.quantize == p.dequantize == 0
        assert p.input_quantize == len(graph.inputs)


def test_multitask_deploy_postprocessing_on_bpu():
    # the deploy model's channel_argmax and detection decode run on bayes's BPU
    module, inputs = hbc.models.build("multitask_resize", mode="deploy", input_hw=(64, 128))
    report = hbc.check((module, inputs), "bayes")
    assert report.exit_code == 0, report.to_text()
    assert report.units()["bpu"] == len(report.nodes)
    assert any(v.op == "argmax" for v in report.nodes)


def test_qat_and_module_function_models():
    from hbc.models import demo_cnn
    from hbc.quant.qat import prepare_qat

    model, (x,) = demo_cnn.build()
    qat = prepare_qat(model, (x,)).train()
    qat(x)
    report = hbc.check((qat.eval(), (x,)), "bernoulli2")
    assert non_bpu(report) == Counter(FLATTEN)
    assert hbc.check((qat, (x,)), "bayes").exit_code == 0
    spec = hbc.check("hbc.models.demo_cnn:build", "bernoulli2")
    assert spec.model == "demo_cnn:build" and non_bpu(spec) == Counter(FLATTEN)


# -- the CLI --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two small .hbir models: one all-BPU everywhere, one with a 9x9 kernel."""
    d = tmp_path_factory.mktemp("check")
    save(unary("relu", (1, 8, 4, 4)), d / "ok.hbir")
    save(conv(k=9), d / "big_kernel.hbir")
    return d


def _run(*args: str, script: str = "hbc") -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / script), *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("script", ["hbc", "model_checker"])
def test_cli_exit_codes(models, script):
    pre = ["check"] if script == "hbc" else []
    ok = _run(*pre, str(models / "ok.hbir"), "--march", "bernoulli2", script=script)
    assert ok.returncode == 0, ok.stderr
    assert "ok on bernoulli2: every node runs on the BPU (1 node, 1 subgraph)" in ok.stdout
    bad = _run(*pre, str(models / "big_kernel.hbir"), "--march", "bernoulli2", script=script)
    assert bad.returncode == 1, bad.stderr
    assert "conv conv3 (Conv_17): kernel 9x9, bernoulli2 allows at most 7x7" in bad.stdout
    assert "runs with CPU fallback" in bad.stdout
    assert _run(*pre, str(models / "big_kernel.hbir"), script=script).returncode == 0  # bayes
    missing = _run(*pre, str(models / "nope.onnx"), script=script)
    assert missing.returncode == 2 and "nope.onnx" in missing.stderr
    assert "Traceback" not in missing.stderr
    march = _run(*pre, str(models / "ok.hbir"), "--march", "x3", script=script)
    assert march.returncode == 2 and "unknown march 'x3'" in march.stderr


def _schema() -> dict:
    text = (ROOT / "docs" / "checker.md").read_text()
    return json.loads(re.search(r"```json\n(.*?)```", text, re.S).group(1))


def _validate(doc, schema: dict, root: dict, path: str = "$") -> None:
    """The subset of JSON Schema docs/checker.md uses: type, enum, properties, required,
    additionalProperties false, items, $ref to #/$defs."""
    if "$ref" in schema:
        schema = root["$defs"][schema["$ref"].rsplit("/", 1)[1]]
    if "enum" in schema:
        assert doc in schema["enum"], f"{path}: {doc!r} not in {schema['enum']}"
    kind = schema.get("type")
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int}
    if kind:
        assert isinstance(doc, types[kind]) and not (kind == "integer" and
                                                     isinstance(doc, bool)), f"{path}: {kind}"
    if kind == "object":
        missing = set(schema.get("required", ())) - set(doc)
        assert not missing, f"{path}: missing {missing}"
        if schema.get("additionalProperties") is False:
            extra = set(doc) - set(schema["properties"])
            assert not extra, f"{path}: unexpected {extra}"
        for key, sub in schema.get("properties", {}).items():
            if key in doc:
                _validate(doc[key], sub, root, f"{path}.{key}")
    if kind == "array":
        for i, item in enumerate(doc):
            _validate(item, schema["items"], root, f"{path}[{i}]")


def test_json_matches_the_documented_schema(models):
    schema = _schema()
    runner = CliRunner()
    for model, march in (("big_kernel.hbir", "bernoulli2"), ("ok.hbir", "bayes")):
        result = runner.invoke(main, ["check", str(models / model), "--march", march,
                                      "--json"])
        doc = json.loads(result.output)
        _validate(doc, schema, schema)
        assert result.exit_code == doc["exit_code"]
        assert result.output == json.dumps(doc, indent=2, sort_keys=True) + "\n"
    (node,) = doc["nodes"]
    assert node["unit"] == "bpu" and doc["status"] == "bpu"
    unsupported = hbc.check(unary("relu", (2, 8, 4, 4)), "bernoulli2").to_dict()
    _validate(unsupported, schema, schema)
    assert unsupported["status"] == "unsupported"
    assert unsupported["inputs"][0]["problems"][0]["actual"] == "2"


def test_json_problem_fields(models):
    doc = json.loads(hbc.check(str(models / "big_kernel.hbir"), "bernoulli2").to_json())
    (node,) = doc["nodes"]
    (p,) = node["problems"]
    assert (node["node"], node["loc"], node["unit"]) == ("conv3", "Conv_17", "cpu")
    assert (p["constraint"], p["actual"], p["allowed"]) == ("kernel", "9x9", "at most 7x7")
    assert doc["partition"]["cpu_subgraphs"] == 1 and doc["counts"]["cpu"] == 1


def test_html_written(models, tmp_path):
    out = tmp_path / "check.html"
    result = CliRunner().invoke(model_checker, [str(models / "big_kernel.hbir"), "--march",
                                                "bernoulli2", "--html", str(out)])
    assert result.exit_code == 1
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert 'data-name="conv3"' in page and "#f0ad4e" in page  # the CPU fallback, orange
    assert "kernel 9x9, bernoulli2 allows at most 7x7" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page


def test_input_shape_option(tmp_path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 3, 9, 9), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="Conv_17", pads=[4, 4, 4, 4])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, "H", "W"])], [w])
    path = tmp_path / "dyn.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    runner = CliRunner()
    dynamic = runner.invoke(main, ["check", str(path), "--march", "bernoulli2"])
    assert dynamic.exit_code == 2 and "--input-shape" in dynamic.output
    fixed = runner.invoke(main, ["check", str(path), "--march", "bernoulli2",
                                 "--input-shape", "x=1x3x16x16"])
    assert fixed.exit_code == 1
    assert "conv Conv_17: kernel 9x9, bernoulli2 allows at most 7x7" in fixed.output
    assert "summary: dyn on bernoulli2: 0 of 1 nodes on the BPU" in fixed.output
    report = hbc.check(str(path), "bayes", input_shapes={"x": [1, 3, 16, 16]})
    assert report.exit_code == 0 and report.model == "dyn"


def test_import_hbc_stays_light():
    code = ("import sys, hbc; assert callable(hbc.check); "
            "bad = [m for m in ('torch', 'onnx', 'networkx') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- the tables and their docs --------------------------------------------------------------------
@pytest.mark.parametrize("march", constraints.march_names())
def test_every_op_has_a_table(march):
    tables = constraints.load_constraints(march)
    missing = sorted(set(constraints.table_keys()) - set(tables.tables))
    assert not missing, f"{march} has no [ops.*] table for {missing}"
    for table in tables.tables.values():
        if table.unit != "bpu":
            assert table.hint or table.key in constraints.PSEUDO_TABLES, table.key
        for rule in table.rules:
            assert rule.hint, f"{march} [ops.{table.key}] {rule.quantity} has no hint"


@pytest.mark.parametrize("raw, message", [
    ({"conv": {"kernal": {"max": 7}}}, r"\[ops\.conv\]: 'kernal' is not a quantity"),
    ({"convv": {}}, r"\[ops\.convv\]: no IR op has this table"),
    ({"conv": {"kernel": {"most": 7}}}, r"\[ops\.conv\]\.kernel: unknown key\(s\) most"),
    ({"conv": {"kernel": {"max": "7"}}}, r"\[ops\.conv\]\.kernel\.max: expected a number"),
    ({"conv": {"unit": "gpu"}}, r"\[ops\.conv\]: unit = 'gpu'"),
    ({"conv": {"kernel": {"max": 7, "hint": "{kernel}"}}}, r"kernel\.hint: bad placeholder"),
    ({"base": "bernoulli3"}, r"unknown march 'bernoulli3'"),
])
def test_malformed_tables_name_the_place(raw, message):
    with pytest.raises(InputError, match=message) as e:
        constraints._build("bayes", raw)
    assert "backend/marches/bayes.toml" in str(e.value) or "bernoulli3" in str(e.value)


def test_docs_marches_md_is_generated():
    path = ROOT / "docs" / "marches.md"
    assert path.read_text() == markdown(), (
        "docs/marches.md is stale: python -m hbc.backend.constraints --markdown > "
        "docs/marches.md")


def test_markdown_cli():
    proc = subprocess.run([sys.executable, "-m", "hbc.backend.constraints", "--markdown"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout == markdown()
    assert "| `conv` | conv, conv_fused, qconv |" in proc.stdout
