"""The simulator runtime (``hbc.runtime.Runtime``) against the torch integer reference, bit for
bit, and its input handling, batches, dumps, file checks, import layering and ``hbc run``.

Every model is calibrated and lowered the way compile does (``tests/runtime_models.py``),
written to ``.hbm`` bytes with the writer and loaded back: the runtime sees only the file.
The reference is ``build_int_infer(lowered graph)``, the independent torch kernels.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from hbc import models
from hbc.backend.hbm_writer import HbmModelSpec, hbm_bytes
from hbc.cli import main
from hbc.errors import InputError
from hbc.models import demo_cnn
from hbc.quant import build_int_infer
from hbc.runtime import HbmError, Runtime, read_hbm
from hbc.runtime.runtime import file_name
from hbc.verify import verify
from tests.runtime_models import (
    compile_model,
    digits,
    digits_labels,
    digits_net,
    random_inputs,
    small_net,
)
from tests.test_zoo_int import CASES as ZOO_CASES


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


#: case id -> (model builder, compile options); "slow" cases at the end
CASES = {
    "small": (small_net, {}),
    "small-cpu-fallback": (small_net, {"cpu_ops": ("add",)}),
    "small-int16": (small_net, {"int16": ["*"]}),
    "small-high-precision": (small_net, {"high_precision_output": True}),
    "demo_cnn": (lambda: demo_cnn.build(), {}),
    "resnet18-64": (lambda: models.build("resnet18", input_size=64), {}),
    "mobilenet_v2-64": (lambda: models.build("mobilenet_v2", input_size=64), {}),
}
SLOW = {
    "resnet50-64": (lambda: models.build("resnet50", input_size=64), {}),
    "efficientnet_b0-64-int16": (lambda: models.build("efficientnet_b0", input_size=64),
                                 {"int16": ["*"]}),
    "multitask_resize": (lambda: models.build("multitask_resize", input_hw=(64, 128)),
                         {"high_precision_output": True}),
}


@pytest.fixture(scope="module")
def compiled():
    cache: dict = {}

    def get(case: str):
        if case not in cache:
            build, options = {**CASES, **SLOW}[case]
            cache[case] = compile_model(case, build(), **options)
        return cache[case]

    return get


def assert_runtime_matches_int_infer(c, feeds: dict[str, np.ndarray]) -> None:
    """Every output, both as integers and dequantized, equals int_infer's bit for bit."""
    rt = Runtime(c.hbm)
    traced = build_int_infer(c.lowered).run(feeds, trace=True)
    ints = rt.run(feeds)
    floats = rt.run(feeds, dequantize=True)
    for d in rt.outputs:
        want_int = traced[d.value or d.name]
        assert ints[d.name].dtype == want_int.dtype, d.name
        np.testing.assert_array_equal(ints[d.name], want_int, err_msg=d.name)
        if d.value is not None:  # the program's own dequantize
            np.testing.assert_array_equal(floats[d.name], traced[d.name], err_msg=d.name)
        else:
            assert floats[d.name].dtype == np.float32


@pytest.mark.parametrize("case", [
    *CASES, *[pytest.param(c, marks=pytest.mark.slow) for c in SLOW]])
def test_bit_exact_on_random_inputs(compiled, case):
    c = compiled(case)
    if case == "small-cpu-fallback":
        assert c.lowered.meta["cpu_nodes"]
    for seed, std in ((11, 1.0), (12, 3.0)):  # 3.0: far past the calibrated range
        assert_runtime_matches_int_infer(c, random_inputs(c.floats, seed, std))


def test_bit_exact_on_digits():
    """Real inputs: a trained digits CNN calibrated on 32 sklearn digits, checked on 64 held-out
    ones as one batch; the integer model still classifies them."""
    images, labels = digits(), digits_labels()
    c = compile_model("digits", digits_net(), calib=[{"x": images[i:i + 1]} for i in range(32)])
    rt = Runtime(c.hbm)
    batch = images[1200:1264]
    got = rt.run({"x": batch})
    module = build_int_infer(c.lowered)
    want = np.concatenate([module.run({"x": batch[i:i + 1]}, trace=True)[rt.outputs[0].value]
                           for i in range(len(batch))])
    np.testing.assert_array_equal(got["output"], want)
    assert np.mean(np.argmax(got["output"], axis=1) == labels[1200:1264]) > 0.8


def test_descriptors(compiled):
    c = compiled("small")
    rt = Runtime(c.hbm)
    assert (rt.name, rt.march) == ("small", "bayes")
    assert [d.name for d in rt.inputs] == ["x", "y"]
    assert [d.name for d in rt.outputs] == ["output0", "output1"]
    x = rt.inputs[0]
    quantize = c.lowered.value("x").uses[0][0]
    assert (x.shape, x.dtype, x.layout, x.input_type) == ((1, 3, 16, 16), "f32", None,
                                                          "featuremap")
    assert (x.quant_dtype, x.scale, x.axis) == ("i8", quantize.attrs["scale"][0], None)
    assert x.value == quantize.outputs[0].name
    out = rt.outputs[1]
    assert out.scale == c.lowered.value(out.value).type.quant.scale[0]
    with pytest.raises(AttributeError):
        x.name = "z"  # frozen
    hp = Runtime(compiled("small-high-precision").hbm).outputs[1]
    assert (hp.dtype, hp.quant_dtype, hp.axis, hp.value) == ("i32", "i32", 1, None)
    assert len(hp.scale) == 5


def test_input_errors(compiled):
    c = compiled("small")
    rt = Runtime(c.hbm)
    feeds = random_inputs(c.floats, 0)
    with pytest.raises(InputError, match=r"missing 'y'; unknown 'z'.*'x': f32\[1, 3, 16, 16\]"):
        rt.run({"x": feeds["x"], "z": feeds["y"]})
    with pytest.raises(InputError, match=r"input 'y': got shape \[1, 2, 16, 16\], expected "
                       r"\[1, 1, 16, 16\].*quantized i8"):
        rt.run({**feeds, "y": np.zeros((1, 2, 16, 16), np.float32)})
    with pytest.raises(InputError, match=r"input 'x': got int64 data, expected float32 or int8"):
        rt.run({**feeds, "x": np.zeros((1, 3, 16, 16), np.int64)})
    with pytest.raises(InputError, match="different numbers of runs"):
        rt.run({"x": np.concatenate([feeds["x"]] * 2), "y": feeds["y"]})
    with pytest.raises(InputError, match="must be a dict"):
        rt.run([feeds["x"], feeds["y"]])


def test_integer_inputs_skip_the_quantize(compiled):
    """Integers of the quantized dtype, made with the documented rounding (round half to
    even of x / scale in float32, saturated), give the float path's results; mixed too."""
    c = compiled("small")
    rt = Runtime(c.hbm)
    feeds = random_inputs(c.floats, 3, 2.0)
    feeds["x"].flat[:4] = np.float32(2.5) * np.float32(rt.inputs[0].scale)  # ties
    ints = {d.name: np.clip(np.rint(feeds[d.name] / np.float32(d.scale)), -128, 127)
            .astype(np.int8) for d in rt.inputs}
    want = rt.run(feeds)
    for given in (ints, {"x": ints["x"], "y": feeds["y"]}):
        got = rt.run(given)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
    values = rt.run(ints, dump=True)
    np.testing.assert_array_equal(values[rt.inputs[0].value], ints["x"])


def test_batch_of_three_is_three_runs(compiled):
    c = compiled("small")
    rt = Runtime(c.hbm)
    runs = [random_inputs(c.floats, s) for s in (21, 22, 23)]
    batch = {k: np.concatenate([r[k] for r in runs]) for k in runs[0]}
    for dequantize in (False, True):
        got = rt.run(batch, dequantize=dequantize)
        for d in rt.outputs:
            want = np.concatenate([rt.run(r, dequantize=dequantize)[d.name] for r in runs])
            assert got[d.name].shape[0] == 3
            np.testing.assert_array_equal(got[d.name], want)


def test_dump(compiled, tmp_path):
    c = compiled("small-cpu-fallback")
    rt = Runtime(c.hbm)
    feeds = random_inputs(c.floats, 4)
    traced = build_int_infer(c.lowered).run(feeds, trace=True)
    values = rt.run(feeds, dump=True)
    outputs = rt.run(feeds)
    for node in c.lowered.nodes:
        for v in node.outputs:
            want = outputs[v.name] if v.name in outputs else traced[v.name]
            np.testing.assert_array_equal(values[v.name], want, err_msg=v.name)
    got = rt.run(feeds, dump=tmp_path / "d")
    assert set(got) == {"output0", "output1"}
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    assert [e["name"] for e in index["values"]] == list(values)
    for e in index["values"]:
        np.testing.assert_array_equal(np.load(tmp_path / "d" / e["file"]), values[e["name"]])
    assert index["values"][-1]["scale"] == [rt.outputs[1].scale]


def test_file_names_are_safe_and_unique():
    taken: set[str] = set()
    names = [file_name(n, taken) for n in ("a/b:c", "A/b:c", ".hidden", "ok-1.2", "", "index")]
    assert names == ["a_b_c", "A_b_c_1", "hidden", "ok-1.2", "value", "index"]


def test_damaged_and_foreign_files(compiled, tmp_path):
    data = bytearray(compiled("small").hbm)
    with pytest.raises(HbmError, match="not an .hbm file"):
        Runtime(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(HbmError, match="truncated|outside the file"):
        Runtime(bytes(data[:len(data) // 2]))
    weights = next(s for s in read_hbm(bytes(data)).sections if s.name == "weights.0")
    data[weights.offset + weights.size // 2] ^= 0xFF
    path = tmp_path / "damaged.hbm"
    path.write_bytes(bytes(data))
    with pytest.raises(HbmError, match=r"damaged.hbm: section 'weights.0' is damaged"):
        Runtime(path)
    with pytest.raises(HbmError, match="no such file"):
        Runtime(tmp_path / "missing.hbm")


def test_march_and_model_selection(compiled, tmp_path):
    a, b = compiled("small"), compiled("small-int16")
    with pytest.raises(HbmError, match="compiled for bayes, not bernoulli2"):
        Runtime(a.hbm, march="bernoulli2")
    assert Runtime(a.hbm, march="bayes").march == "bayes"
    both = hbm_bytes([HbmModelSpec("a", a.lowered, {}, {}), HbmModelSpec("b", b.lowered, {}, {})],
                     "bayes")
    with pytest.raises(HbmError, match=r"2 models \(a, b\); name one"):
        Runtime(both)
    rt = Runtime(both, "b")
    assert rt.inputs[0].quant_dtype == "i16"
    feeds = random_inputs(b.floats, 0)
    np.testing.assert_array_equal(rt.run(feeds)["output1"], Runtime(b.hbm).run(feeds)["output1"])


def test_constants_stay_in_the_mapped_file(compiled, tmp_path):
    path = tmp_path / "m.hbm"
    path.write_bytes(compiled("small").hbm)
    rt = Runtime(path)
    arrays = list(rt.graph.constants.values())
    assert arrays and all(not a.flags.writeable and not a.flags.owndata for a in arrays)
    rt.run(random_inputs(rt.graph, 0))


def test_importing_and_running_the_runtime_stays_light(compiled, tmp_path):
    """``import hbc.runtime`` and a whole run load none of the heavy libraries."""
    path = tmp_path / "m.hbm"
    path.write_bytes(compiled("small").hbm)
    code = (
        "import sys, numpy as np\n"
        "import hbc.runtime\n"
        "from hbc.runtime import Runtime\n"
        f"rt = Runtime({str(path)!r})\n"
        "rt.run({d.name: np.zeros(d.shape, np.float32) for d in rt.inputs}, dequantize=True)\n"
        "heavy = ('torch', 'onnx', 'onnxruntime', 'lark', 'jinja2', 'networkx', 'click', 'rich')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


# -- hbc run -----------------------------------------------------------------------------------
def test_cli_run(compiled, tmp_path):
    c = compiled("small")
    path = tmp_path / "m.hbm"
    path.write_bytes(c.hbm)
    feeds = random_inputs(c.floats, 7)
    for name, arr in feeds.items():
        np.save(tmp_path / f"{name}.npy", arr)
    args = ["run", str(path), "--input", f"x={tmp_path / 'x.npy'}",
            "--input", f"y={tmp_path / 'y.npy'}", "-o", str(tmp_path / "out")]
    result = CliRunner().invoke(main, args + ["--dump-dir", str(tmp_path / "dump")])
    assert result.exit_code == 0, result.output
    assert "output0: int8[1, 4, 16, 16], scale" in result.output
    want = Runtime(c.hbm).run(feeds)
    for name, arr in want.items():
        np.testing.assert_array_equal(np.load(tmp_path / "out" / f"{name}.npy"), arr)
    assert (tmp_path / "dump" / "index.json").exists()
    result = CliRunner().invoke(main, args + ["--dequantize"])
    assert result.exit_code == 0, result.output
    assert np.load(tmp_path / "out" / "output0.npy").dtype == np.float32


def _savez(path, **arrays) -> None:
    with path.open("wb") as f:  # np.savez would add ".npz" to the name
        np.savez(f, **arrays)


@pytest.mark.parametrize("make, message", [
    (None, r"missing.npy \(input 'x'\): no such file"),
    (lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
     r"bad.npy \(input 'x'\): holds Python objects"),
    (lambda p: p.write_bytes(b"not numpy"), r"bad.npy \(input 'x'\): not an .npy array"),
    (lambda p: np.save(p, np.zeros(3, np.float32)) or p.write_bytes(p.read_bytes()[:-4]),
     r"bad.npy \(input 'x'\): truncated: the header declares float32\[3\] \(12 bytes\)"),
    (lambda p: _savez(p, x=np.zeros(3)), r"bad.npy \(input 'x'\): an .npz"),
    (lambda p: np.save(p, np.zeros((1, 3, 16, 16), np.int32)),
     r"input 'x': got int32 data, expected float32 or int8"),
])
def test_cli_run_errors_name_the_file(compiled, tmp_path, make, message):
    path = tmp_path / "m.hbm"
    path.write_bytes(compiled("small").hbm)
    np.save(tmp_path / "y.npy", np.zeros((1, 1, 16, 16), np.float32))
    x = tmp_path / ("missing.npy" if make is None else "bad.npy")
    if make is not None:
        make(x)
    result = CliRunner().invoke(main, ["run", str(path), "-i", f"x={x}", "-i",
                                       f"y={tmp_path / 'y.npy'}", "-o", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert re.search(message, result.output), result.output


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c[0], marks=[] if c[0] == "stereonet" else [pytest.mark.slow])
    for c in ZOO_CASES if not c[3]])
def test_zoo_models_through_the_file(case):
    """Every zoo model (reduced sizes of tests/test_zoo_int.py) compiled to .hbm and checked
    by verify: every value bit-exact (within one step downstream of CPU fallbacks: StereoNet,
    in the default suite, has 13 of them)."""
    _, name, config, _ = case
    c = compile_model(name, models.build(name, **config))
    report = verify(c.hbm, c.floats, samples=2, per_layer=True)
    assert report.ok, report.to_text()


def test_meta_descriptors_must_agree_with_the_program(compiled):
    from hbc.ir.program import io_descriptors
    from hbc.runtime.runtime import descriptors

    c = compiled("small")
    ins, outs = io_descriptors(c.lowered)
    bad = [dict(ins[0], shape=[1, 3, 8, 8]), ins[1]]
    with pytest.raises(HbmError, match=r"m.hbm: meta inputs\[0\].shape is \[1, 3, 8, 8\], the "
                       r"program says \[1, 3, 16, 16\]"):
        descriptors(c.lowered, bad, outs, "m.hbm")
    with pytest.raises(HbmError, match=r"meta outputs \['output1'\] are not the program's"):
        descriptors(c.lowered, ins, outs[1:], "m.hbm")
