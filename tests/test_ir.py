"""The IR core: graph editing keeps use-lists right, the verifier reports every problem with its
node, the interpreter checks inputs, and the layering rules hold."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from hbc.errors import InputError, VerifyError
from hbc.ir.graph import Graph
from hbc.ir.interpret import interpret
from hbc.ir.registry import all_ops
from hbc.ir.types import QuantParams, TensorType
from hbc.ir.verify import collect_problems, verify


def _chain() -> Graph:
    g = Graph("chain")
    x = g.add_input("x", TensorType("f32", (2, 3)))
    c = g.add_constant("c", np.arange(3, dtype=np.float32))
    a = g.add_node("add", [x, c], name="add0").outputs[0]
    m = g.add_node("mul", [a, x], name="mul0").outputs[0]
    g.set_outputs([m])
    return g


def test_use_lists_follow_edits():
    g = _chain()
    x, add0, mul0 = g.value("x"), g.node("add0"), g.node("mul0")
    assert {(n.name, i) for n, i in x.uses} == {("add0", 0), ("mul0", 1)}
    g.replace_all_uses(add0.outputs[0], x)
    assert mul0.inputs[0] is x and not add0.outputs[0].uses
    g.remove_node(add0)
    assert {(n.name, i) for n, i in x.uses} == {("mul0", 0), ("mul0", 1)}
    verify(g)


def test_interpret_and_input_errors():
    g = _chain()
    x = np.ones((2, 3), np.float32)
    out = interpret(g, {"x": x})["mul0"]
    np.testing.assert_array_equal(out, (x + np.arange(3)) * x)
    with pytest.raises(InputError, match="input 'x': got float64"):
        interpret(g, {"x": x.astype(np.float64)})
    with pytest.raises(InputError, match="missing 'x'"):
        interpret(g, {})


def test_verifier_reports_every_problem_with_node_names():
    g = _chain()
    add0, mul0 = g.node("add0"), g.node("mul0")
    add0.outputs[0].type = TensorType("f32", (9, 9))  # recorded type differs from inference
    mul0.attrs["bogus"] = 1  # an attribute the op does not declare
    g.nodes.reverse()  # break topological order
    problems = collect_problems(g)
    text = "\n".join(problems)
    assert "add node 'add0'" in text and "recorded as f32[9, 9]" in text
    assert "mul node 'mul0'" in text and "bogus" in text
    assert "before it is defined" in text
    with pytest.raises(VerifyError, match=r"\d+ problem"):
        verify(g)


def test_toposort_restores_order_and_detects_cycles():
    g = _chain()
    g.nodes.reverse()
    g.toposort()
    assert [n.name for n in g.nodes] == ["add0", "mul0"]
    verify(g)
    g.set_input(g.node("add0"), 1, g.node("mul0").outputs[0])
    with pytest.raises(InputError, match="cycle"):
        g.toposort()


def test_types_and_quant_params():
    t = TensorType("i8", (1, 8), "NCHW", QuantParams((0.5,) * 8, axis=1))
    assert t.quant.per_channel and t.nbytes == 8
    with pytest.raises(InputError, match="one scale"):
        QuantParams((0.1, 0.2))
    with pytest.raises(InputError, match="unknown dtype"):
        TensorType("f31", (1,))
    assert QuantParams((0.1,), zero_point=(0,)).zero_point is None


def test_every_op_has_inference_and_reference():
    from hbc.ir.registry import OpDef

    for name, op in all_ops().items():
        assert type(op).infer is not OpDef.infer, f"{name} has no infer()"
        assert type(op).reference is not OpDef.reference, f"{name} has no reference()"
        assert type(op).__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("module", ["hbc.ir", "hbc", "hbc.runtime"])
def test_light_imports(module):
    """ir/, runtime/ and the top-level package never load torch or onnx."""
    code = (f"import sys, {module}, hbc.ir.interpret, hbc.ir.verify; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_public_api_round_trip(tmp_path):
    """The names later issues and users rely on: hbc.load / hbc.ir.save / to_text / from_text /
    hbc.interpret, with constants out of line in a sidecar .npz."""
    import hbc

    g = _chain()
    g.add_constant("big", np.arange(64, dtype=np.float32).reshape(8, 8))
    path = tmp_path / "chain.hbir"
    hbc.ir.save(g, path)
    assert path.exists() and path.with_suffix(".npz").exists()
    g2 = hbc.load(path)
    assert hbc.ir.to_text(g2) == hbc.ir.to_text(g)
    np.testing.assert_array_equal(g2.constants["big"], g.constants["big"])
    g3 = hbc.ir.from_text(hbc.ir.to_text(g), constants=g.constants)
    x = np.full((2, 3), 2.0, np.float32)
    np.testing.assert_array_equal(hbc.interpret(g3, {"x": x})["mul0"],
                                  hbc.interpret(g, {"x": x})["mul0"])
