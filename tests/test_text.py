"""The .hbir text form: exact round trips (types, quantization, constants bit for bit, names,
attributes), golden files, .npz sidecars, and errors that point at file:line:col with a caret."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from hbc.errors import ParseError
from hbc.ir import from_text, load_hbir, save, to_text
from hbc.ir.graph import Graph
from hbc.ir.io import sidecar_path
from hbc.ir.registry import FLOAT, FLOATS, INT, INTS, OPS, REQUIRED, STR, Attr, OpDef, register
from hbc.ir.text import INLINE_MAX, bits_of, value_kind
from hbc.ir.types import DTYPES, QuantParams, TensorType

GOLDEN = Path(__file__).parent / "golden" / "text"


# -- test-only ops: optional inputs, several outputs, one attribute of every kind ---------------

class _TextOp(OpDef):
    """Test-only: y (and z) with the type of x."""

    name = "test.text_op"
    inputs = ("x", "w?", "b?")
    outputs = ("y", "z?")
    attrs = (
        Attr("axis", INT, 0),
        Attr("sizes", INTS, []),
        Attr("alpha", FLOAT, 1.0),
        Attr("scales", FLOATS, [1.0, 1.0]),
        Attr("mode", STR, "nearest"),
        Attr("eps", FLOAT, None),
    )

    def infer(self, inputs, attrs):
        return [inputs[0], inputs[0]]

    def reference(self, inputs, attrs):
        return [inputs[0], inputs[0]]


class _NeedsK(OpDef):
    """Test-only: an op with a required attribute."""

    name = "test.needs_k"
    attrs = (Attr("k", INT, REQUIRED),)

    def infer(self, inputs, attrs):
        return [inputs[0]]

    def reference(self, inputs, attrs):
        return [inputs[0]]


@pytest.fixture(autouse=True, scope="module")
def _test_ops():
    """Register the test-only ops while this module runs, so other tests never see them."""
    added = [cls for cls in (_TextOp, _NeedsK) if cls.name not in OPS]
    for cls in added:
        register(cls)
    yield
    for cls in added:
        OPS.pop(cls.name, None)


# -- helpers ----------------------------------------------------------------------------------

def _round_trip(g: Graph, constants=None) -> tuple[str, Graph]:
    """Print, parse, print again; the two texts must be identical."""
    text = to_text(g)
    g2 = from_text(text, constants=g.constants if constants is None else constants)
    assert to_text(g2) == text
    return text, g2


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.array_equal(bits_of(np.ascontiguousarray(a)),
                               bits_of(np.ascontiguousarray(b))))


def _assert_constants_equal(g: Graph, g2: Graph) -> None:
    assert list(g.constants) == list(g2.constants)
    for name, data in g.constants.items():
        assert _same_bits(data, g2.constants[name]), name


def _float_bits(x: float) -> int:
    return struct.unpack("<Q", struct.pack("<d", x))[0]


def _random_array(dtype: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random data of an hbir dtype: random bit patterns for floats (NaN payloads included)."""
    dt = DTYPES[dtype]
    kind = value_kind(dt)
    n = int(np.prod(shape, dtype=np.int64))
    if kind == "b":
        return rng.integers(0, 2, n).astype(bool).reshape(shape)
    if kind == "i":
        if dt.kind in "iu":
            info = np.iinfo(dt)
            return rng.integers(info.min, info.max, n, dtype=dt, endpoint=True).reshape(shape)
        import ml_dtypes

        info = ml_dtypes.iinfo(dt)
        return np.array(rng.integers(info.min, info.max + 1, n).tolist(), dtype=dt).reshape(shape)
    width = 8 * dt.itemsize
    if dt.kind == "V":  # ml_dtypes floats may use fewer bits than their storage (f4e2m1)
        import ml_dtypes

        width = ml_dtypes.finfo(dt).bits
    raw = rng.integers(0, 1 << width, n, dtype=np.uint64)
    return raw.astype(bits_of(np.zeros(1, dt)).dtype).view(dt).reshape(shape)


def _error(text: str, filename: str = "m.hbir", constants=None) -> tuple[str, str, str]:
    """Parse ``text`` expecting a ParseError; returns (first line, source line, caret line)."""
    with pytest.raises(ParseError) as info:
        from_text(text, constants=constants, filename=filename)
    lines = str(info.value).split("\n")
    assert len(lines) == 3, str(info.value)
    return lines[0], lines[1], lines[2]


def _caret_col(caret: str) -> int:
    assert caret.strip() == "^", caret
    return caret.index("^") + 1


BASE = """\
hbir 1
graph @g(%x: f32[2,3]) {
  %c: f32[3] = const [1.0, 2.0, 3.0]
  %y: f32[2,3] = add(%x, %c)
  return %y
}
"""


# -- round trips --------------------------------------------------------------------------------

def test_every_dtype_as_input_and_inline_constant():
    rng = np.random.default_rng(0)
    g = Graph("dtypes")
    for name in DTYPES:
        g.add_input(f"in_{name}", TensorType(name, (2, 3)))
        g.add_constant(f"c_{name}", _random_array(name, (2, 3), rng))
    g.set_outputs([g.inputs[0]])
    text, g2 = _round_trip(g)
    _assert_constants_equal(g, g2)
    assert [v.type for v in g2.inputs] == [v.type for v in g.inputs]
    assert "%c_bool: bool[2,3] = const [" in text


def test_scalars_and_empty_shapes():
    g = Graph("scalars")
    x = g.add_input("x", TensorType("f32", ()))
    g.add_constant("half", np.array(0.5, dtype=np.float32))
    g.add_constant("negzero", np.array(-0.0, dtype=np.float64))
    g.add_constant("n", np.array(-7, dtype=np.int64))
    g.add_constant("flag", np.array(True))
    g.add_constant("empty", np.zeros((0, 3), dtype=np.float32))
    y = g.add_node("add", [x, g.value("half")]).outputs[0]
    g.set_outputs([y])
    text, g2 = _round_trip(g)
    assert "%x: f32[]" in text
    assert "%half: f32[] = const 0.5\n" in text
    assert "%negzero: f64[] = const -0.0\n" in text
    assert "%n: i64[] = const -7\n" in text
    assert "%flag: bool[] = const true\n" in text
    assert "%empty: f32[0,3] = const []\n" in text
    _assert_constants_equal(g, g2)


def test_layouts_and_quantization():
    g = Graph("quant")
    scale = float(np.float32(1e-5))
    x = g.add_input("x", TensorType("i8", (1, 4, 8, 8), "NCHW", QuantParams((scale,))))
    h = g.add_input("h", TensorType("f32", (1, 8, 8, 4), "NHWC"))
    zp = g.add_input("zp", TensorType("u8", (4,), None, QuantParams((0.25,), None, (128,))))
    w = g.add_constant("w", np.ones((4, 4, 1, 1), np.int8), type_=TensorType(
        "i8", (4, 4, 1, 1), quant=QuantParams((0.1, 0.2, float("inf"), -0.0), 0)))
    wz = g.add_constant("wz", np.ones((2, 3), np.int8), type_=TensorType(
        "i8", (2, 3), quant=QuantParams((0.5, 0.25, 0.125), 1, (1, 0, -3))))
    y = g.add_node("test.text_op", [x, w], output_types=[
        TensorType("i8", (1, 4, 8, 8), "NCHW", QuantParams((0.0123,))),
        TensorType("i32", (1, 4, 8, 8), "NHWC", QuantParams((0.5, 1.5), 1, (0, 2))),
    ], output_names=["y", "z"]).outputs
    g.set_outputs([*y, h, zp, wz])
    text, g2 = _round_trip(g)
    assert f"%x: i8[1,4,8,8] NCHW q(scale={scale!r})" in text
    assert "%zp: u8[4] q(scale=0.25, zero_point=128)" in text
    assert "q(scale=[0.1, 0.2, inf, -0.0], axis=0) = const" in text
    assert "q(scale=[0.5, 0.25, 0.125], axis=1, zero_point=[1, 0, -3])" in text
    assert "i32[1,4,8,8] NHWC q(scale=[0.5, 1.5], axis=1, zero_point=[0, 2])" in text
    for a, b in zip([*g.inputs, *g.outputs], [*g2.inputs, *g2.outputs], strict=True):
        assert a.type == b.type
        if a.type.quant:
            assert [_float_bits(s) for s in a.type.quant.scale] == [
                _float_bits(s) for s in b.type.quant.scale]


def test_nan_scale_survives():
    g = Graph("nan_scale")
    nan_payload = struct.unpack("<d", struct.pack("<Q", 0x7FF8000000000123))[0]
    x = g.add_input("x", TensorType("i8", (2,), quant=QuantParams((float("nan"), nan_payload), 0)))
    g.set_outputs([x])
    text, g2 = _round_trip(g)
    assert "q(scale=[nan, nan(0x7ff8000000000123)], axis=0)" in text
    assert [_float_bits(s) for s in g2.inputs[0].type.quant.scale] == [
        _float_bits(float("nan")), 0x7FF8000000000123]


@pytest.mark.parametrize("dtype", ["f32", "f16", "f64"])
def test_inline_float_special_values(dtype):
    dt = DTYPES[dtype]
    info = np.finfo(dt)
    values = np.array([0.1, -0.0, 0.0, np.inf, -np.inf, np.nan, 1.0, -2.5, 1e-5, 1e4,
                       float(info.max), float(info.smallest_subnormal), float(info.tiny),
                       -float(info.max)], dtype=dt)
    quiet = bits_of(np.array([np.nan], dt))[0]
    sign = 1 << (8 * dt.itemsize - 1)
    extra = np.array([quiet | sign, quiet | 1], dtype=bits_of(values).dtype).view(dt)
    g = Graph("special")
    data = np.concatenate([values, extra])
    for i in range(0, data.size, INLINE_MAX):
        g.add_constant(f"v{i}", data[i:i + INLINE_MAX])
    g.add_constant("s", np.array(np.nan, dt))
    text, g2 = _round_trip(g)
    _assert_constants_equal(g, g2)
    inline = " ".join(line.split(" = const ")[1] for line in text.splitlines()[2:-3])
    assert " -0.0, 0.0, inf, -inf, nan, 1.0, -2.5" in inline
    assert inline.endswith(f"-nan, nan(0x{int(quiet | 1):0{2 * dt.itemsize}x})]")


@pytest.mark.parametrize("dtype", ["f32", "f16", "f64", "bf16", "f8e4m3fn", "f8e5m2",
                                   "f8e4m3fnuz", "f8e5m2fnuz", "f8e8m0", "f4e2m1"])
def test_float_bit_patterns_round_trip(dtype):
    """Random bit patterns (every pattern for 8-bit formats) print and parse back exactly."""
    if dtype not in DTYPES:
        pytest.skip(f"{dtype} needs ml_dtypes")
    dt = DTYPES[dtype]
    rng = np.random.default_rng(1)
    if dt.itemsize == 1:
        import ml_dtypes

        width = ml_dtypes.finfo(dt).bits
        data = np.arange(1 << width, dtype=np.uint8).view(dt)
    else:
        data = _random_array(dtype, (4096,), rng)
    g = Graph("bits")
    for i in range(0, data.size, INLINE_MAX):
        g.add_constant(f"c{i}", data[i:i + INLINE_MAX])
    _, g2 = _round_trip(g)
    _assert_constants_equal(g, g2)


def test_f32_shortest_strings():
    g = Graph("short")
    g.add_constant("v", np.array([0.1, 1e-5, 3.4028235e38, 16777216.0, 1.0], np.float32))
    text = to_text(g)
    assert "const [0.1, 1e-05, 3.4028235e+38, 1.6777216e+07, 1.0]" in text


def test_integer_and_bool_constants():
    rng = np.random.default_rng(2)
    g = Graph("ints")
    for dtype in ("i8", "i16", "i32", "i64", "u8", "u16", "u32", "u64"):
        info = np.iinfo(DTYPES[dtype])
        data = np.array([info.min, info.max, 0, 1], dtype=DTYPES[dtype])
        g.add_constant(f"edge_{dtype}", data)
        g.add_constant(f"rand_{dtype}", _random_array(dtype, (4, 4), rng))
    g.add_constant("bools", np.array([[True, False], [False, True]]))
    text, g2 = _round_trip(g)
    _assert_constants_equal(g, g2)
    assert "%edge_i64: i64[4] = const [-9223372036854775808, 9223372036854775807, 0, 1]" in text
    assert "%edge_u64: u64[4] = const [0, 18446744073709551615, 0, 1]" in text
    assert "%bools: bool[2,2] = const [true, false, false, true]" in text


def _big_graph() -> Graph:
    rng = np.random.default_rng(3)
    g = Graph("big")
    x = g.add_input("x", TensorType("f32", (1, 4, 4, 4), "NCHW"))
    g.add_constant("w", rng.standard_normal((4, 4, 3, 3)).astype(np.float32))
    g.add_constant("wq", rng.integers(-128, 127, (4, 17), dtype=np.int8), type_=TensorType(
        "i8", (4, 17), quant=QuantParams(tuple(rng.random(4).tolist()), 0)))
    g.add_constant("mask", rng.integers(0, 2, 40).astype(bool))
    g.add_constant("table", np.arange(100, dtype=np.int64))
    if "bf16" in DTYPES:
        g.add_constant("wb", rng.standard_normal(20).astype(DTYPES["bf16"]))
    g.add_constant("small", np.array([1, -1], np.int64))
    y = g.add_node("add", [x, x]).outputs[0]
    g.set_outputs([y, g.value("w")])
    return g


def test_out_of_line_constants_via_from_text():
    g = _big_graph()
    text, g2 = _round_trip(g)
    _assert_constants_equal(g, g2)
    assert "  %w: f32[4,4,3,3] = const\n" in text
    assert "  %table: i64[100] = const\n" in text
    assert "  %small: i64[2] = const [1, -1]\n" in text
    assert g2.outputs[1] is g2.value("w")


def test_save_and_load_with_sidecar(tmp_path):
    g = _big_graph()
    path = tmp_path / "model.hbir"
    save(g, path)
    assert path.read_text() == to_text(g)
    assert sidecar_path(path) == tmp_path / "model.npz"
    with np.load(tmp_path / "model.npz", allow_pickle=False) as npz:
        assert "small" not in npz.files and "w" in npz.files and "wq" in npz.files
    g2 = load_hbir(path)
    assert to_text(g2) == to_text(g)
    _assert_constants_equal(g, g2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.hbir", "model.npz"]
    # Same graph, same bytes.
    first = (path.read_bytes(), (tmp_path / "model.npz").read_bytes())
    save(g2, path)
    assert (path.read_bytes(), (tmp_path / "model.npz").read_bytes()) == first


def test_save_names_npz_can_not_hold_as_keywords(tmp_path):
    g = Graph("kw")
    g.add_constant("file", np.arange(20, dtype=np.float32))
    g.add_constant("allow_pickle", np.arange(20, dtype=np.int32))
    g.add_constant("a/b:c", np.arange(20, dtype=np.int8))
    save(g, tmp_path / "kw.hbir")
    _assert_constants_equal(g, load_hbir(tmp_path / "kw.hbir"))


def test_load_without_sidecar_names_the_constant(tmp_path):
    path = tmp_path / "m.hbir"
    save(_big_graph(), path)
    (tmp_path / "m.npz").unlink()
    with pytest.raises(ParseError) as info:
        load_hbir(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}:3:3: constant %w ") and "m.npz (no such file)" in msg


def test_graph_without_big_constants_needs_no_sidecar(tmp_path):
    g = Graph("small")
    g.add_constant("k", np.array([1, 2], np.int32))
    save(g, tmp_path / "s.hbir")
    assert not (tmp_path / "s.npz").exists()
    assert to_text(load_hbir(tmp_path / "s.hbir")) == to_text(g)


def test_optional_inputs_multi_outputs_and_attributes():
    g = Graph("attrs")
    x = g.add_input("x", TensorType("f32", (2, 2)))
    b = g.add_constant("b", np.zeros(2, np.float32))
    n = g.add_node("test.text_op", [x, None, b], {
        "axis": 1, "sizes": [1, 2, -3], "alpha": float(np.float32(1e-5)), "scales": [0.5, -0.0],
        "mode": 'bi"linear\n', "eps": float("nan"),
    }, output_names=["lo", "hi"])
    m = g.add_node("test.text_op", [n.outputs[1]], {"alpha": 1.0, "scales": [1.0, 1.0]},
                   output_names=["m0", "m1"])
    g.set_outputs([n.outputs[0], m.outputs[1]])
    text, g2 = _round_trip(g)
    assert (
        '%lo, %hi: f32[2,2], f32[2,2] = test.text_op(%x, _, %b) {axis=1, sizes=[1, 2, -3], '
        'alpha=9.999999747378752e-06, scales=[0.5, -0.0], mode="bi\\"linear\\n", eps=nan}\n'
    ) in text
    # Attributes at their default are omitted.
    assert "%m0, %m1: f32[2,2], f32[2,2] = test.text_op(%hi)\n" in text
    n2 = g2.nodes[0]
    assert n2.inputs[1] is None and [v.name for v in n2.outputs] == ["lo", "hi"]
    assert n2.attrs["mode"] == 'bi"linear\n' and math.isnan(n2.attrs["eps"])
    assert _float_bits(n2.attrs["alpha"]) == _float_bits(float(np.float32(1e-5)))
    assert _float_bits(n2.attrs["scales"][1]) == _float_bits(-0.0)


@pytest.mark.parametrize("value", [0.1, -0.0, math.inf, -math.inf, 1.0, 5e-324, 1e300,
                                   float(np.float32(0.1)), math.nan])
def test_float_attribute_bits(value):
    g = Graph("f")
    x = g.add_input("x", TensorType("f32", (1,)))
    g.set_outputs(g.add_node("test.text_op", [x], {"alpha": value, "scales": [value]}).outputs)
    _, g2 = _round_trip(g)
    attrs = g2.nodes[0].attrs
    assert _float_bits(attrs["alpha"]) == _float_bits(value) or value == 1.0
    assert _float_bits(attrs["scales"][0]) == _float_bits(value)


def test_int_list_attribute_accepts_empty_and_float_list_accepts_ints():
    text = BASE.replace("%y: f32[2,3] = add(%x, %c)",
                        "%y: f32[2,3] = test.text_op(%x) {sizes=[], scales=[1, 2]}")
    g = from_text(text)
    assert g.nodes[0].attrs["sizes"] == [] and g.nodes[0].attrs["scales"] == [1.0, 2.0]
    assert "{scales=[1.0, 2.0]}" in to_text(g)


def test_quoted_names_and_clauses():
    g = Graph("my graph")
    x = g.add_input("x", TensorType("f32", (2,)))
    c = g.add_constant("c", np.ones(2, np.float32))
    a = g.add_node("add", [x, c], name="Add_0", loc="Add_0")  # loc == name: not printed
    b = g.add_node("mul", [a.outputs[0], a.outputs[0]], loc="/model/layer1/Mul")
    d = g.add_node("sub", [b.outputs[0], x], name="sub_0")
    g.rename_value(x, "in put")
    g.rename_value(c, "onnx::Conv_0:")
    g.rename_value(a.outputs[0], "onnx::Add_1")
    g.rename_value(b.outputs[0], "ü/ñ")
    g.rename_value(d.outputs[0], "")
    g.set_outputs([d.outputs[0], x])
    text, g2 = _round_trip(g)
    assert text.splitlines()[1] == 'graph @"my graph"(%"in put": f32[2]) {'
    assert '%"onnx::Conv_0:": f32[2] = const [1.0, 1.0]' in text
    assert '%onnx::Add_1: f32[2] = add(%"in put", %"onnx::Conv_0:") name("Add_0")\n' in text
    assert '= mul(%onnx::Add_1, %onnx::Add_1) name("mul") loc("/model/layer1/Mul")\n' in text
    assert '%"": f32[2] = sub(%"ü/ñ", %"in put") name("sub_0")\n' in text
    assert 'return %"", %"in put"' in text
    assert g2.name == "my graph"
    assert [n.name for n in g2.nodes] == ["Add_0", "mul", "sub_0"]
    assert [n.loc for n in g2.nodes] == ["", "/model/layer1/Mul", ""]
    assert g2.meta["hbir_lines"]["sub_0"] == "<string>:6"


def test_names_are_kept_exactly():
    """Names the Graph API would sanitize (spaces, quotes) survive a parse unchanged."""
    text = BASE.replace("add(%x, %c)", 'add(%x, %"c\\"") name("weird node") loc("")')
    text = text.replace("%c: f32[3]", '%"c\\"": f32[3]').replace("%x", '%"x x"')
    g = from_text(text)
    assert [v.name for v in g.values()] == ["x x", 'c"', "y"]
    assert g.nodes[0].name == "weird node" and g.nodes[0].loc == ""
    assert to_text(g) == text.replace(' loc("")', "")


def test_outputs_may_be_inputs_or_constants_and_graph_may_be_empty():
    g = Graph("io")
    x = g.add_input("x", TensorType("f32", (1,)))
    c = g.add_constant("c", np.ones(1, np.float32))
    g.set_outputs([c, x, x])
    text, g2 = _round_trip(g)
    assert text.endswith("  return %c, %x, %x\n}\n")
    assert g2.outputs[1] is g2.outputs[2] is g2.inputs[0]
    empty = Graph("empty")
    assert _round_trip(empty)[0] == "hbir 1\ngraph @empty() {\n  return\n}\n"


def test_comments_and_free_layout_parse_to_canonical_text():
    text = """
    # a hand-written file
    hbir 1   # version
    graph @g(
        %x : f32[2,3],   # input
    ) {
    """
    with pytest.raises(ParseError):  # no trailing comma in parameter lists
        from_text(text)
    text = """# a hand-written file
hbir 1   # version
graph @g(  %x : f32[ 2 , 3 ]  NCHW ) {   # inputs
  %c: f32[3]=const[ 1.0,2,
     3e0 ]   # a list may span lines
  %y: f32[2,3]=add( %x,%c ) { } name( "n" )
  return %y  # done
}"""
    g = from_text(text)
    assert to_text(g) == (
        "hbir 1\ngraph @g(%x: f32[2,3] NCHW) {\n  %c: f32[3] = const [1.0, 2.0, 3.0]\n"
        '  %y: f32[2,3] = add(%x, %c) name("n")\n  return %y\n}\n'
    )


# -- golden files ---------------------------------------------------------------------------------

def _golden_basic() -> Graph:
    g = Graph("basic")
    x = g.add_input("input", TensorType("f32", (1, 3, 4, 4), "NCHW"))
    bias = g.add_constant("bias", np.array([0.5, -0.25, 2.0], np.float32).reshape(1, 3, 1, 1))
    two = g.add_constant("two", np.array([2.0], np.float32))
    a = g.add_node("add", [x, bias], name="Add_0", loc="/stem/Add").outputs[0]
    m = g.add_node("mul", [a, two], loc="/stem/Mul").outputs[0]
    d = g.add_node("div", [m, two]).outputs[0]
    s = g.add_node("sub", [d, a]).outputs[0]
    g.set_outputs([s, a])
    return g


def _golden_quant() -> Graph:
    g = Graph("quant_multi")
    x = g.add_input("x", TensorType("i8", (1, 4, 2, 2), "NHWC", QuantParams((0.0123,))))
    w = g.add_constant("w.q", np.arange(-8, 8, dtype=np.int8).reshape(4, 4), type_=TensorType(
        "i8", (4, 4), quant=QuantParams((0.1, 0.2, 0.30000000000000004, 9.999999747378752e-06),
                                        0)))
    zp = g.add_constant("zp", np.array([3, 0, 1], np.uint8), type_=TensorType(
        "u8", (3,), quant=QuantParams((0.5,), None, (7,))))
    n = g.add_node("test.text_op", [x, w, None], {"axis": 1, "sizes": [2, 2], "alpha": 0.5,
                                                  "mode": "bilinear"},
                   name="split_0", loc="Split_0", output_names=["lo", "hi"],
                   output_types=[
                       TensorType("i8", (1, 4, 2, 2), "NHWC", QuantParams((0.0123,))),
                       TensorType("i32", (1, 4, 2, 2), "NHWC",
                                  QuantParams((0.1, 0.2, 0.3, 0.4), 1, (0, 0, 1, 0))),
                   ])
    k = g.add_node("test.needs_k", [n.outputs[1]], {"k": 3}, name="k").outputs[0]
    g.set_outputs([n.outputs[0], k, zp])
    return g


def _golden_names() -> Graph:
    g = Graph("odd names/and:specials")
    x = g.add_input("x", TensorType("f16", (3,)))
    g.add_constant("specials", np.array([np.nan, -np.inf, -0.0, 65504.0, 6e-08], np.float16))
    g.add_constant("flags", np.array([True, False]))
    g.add_constant("pi_e", np.array([np.pi, np.e]))
    y = g.add_node("add", [x, x], name="add 0").outputs[0]
    g.rename_value(x, "x y")
    g.rename_value(y, "onnx::Add_0")
    g.set_outputs([y])
    return g


@pytest.mark.parametrize("name,build", [("basic", _golden_basic), ("quant", _golden_quant),
                                        ("names", _golden_names)])
def test_golden(name, build):
    path = GOLDEN / f"{name}.hbir"
    graph = build()
    text = to_text(graph)
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{path} differs (UPDATE_GOLDEN=1 rewrites it)"
    again = from_text(path.read_text(), constants=graph.constants, filename=str(path))
    assert to_text(again) == text


# -- errors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("old,new,line,col,message", [
    ("add(%x, %c)", "add(%x %c)", 4, 25, "unexpected '%c'; expected ')', ','"),
    ("add(%x, %c)", "add(%x, $c)", 4, 26, "unexpected character '$'"),
    ("[1.0, 2.0, 3.0]", "[1.0, 2.0, 3.0", 3, 22, "malformed list"),
    ("[1.0, 2.0, 3.0]", "[1.0, 2.x, 3.0]", 3, 28, "bad number '2.x'"),
    ("f32[2,3])", "f32 [2,3])", 2, 14, "unexpected 'f32'; expected a type like f32[1,3]"),
    ("%c: f32[3]", "%c:f32[3]", 3, 9, "(':' may be part of a name: write '%x: f32[...]'"),
    ("  return %y\n}\n", "  return %y\n", 5, 12, "unexpected end of file; expected ',', '}'"),
])
def test_syntax_errors_point_at_line_and_column(old, new, line, col, message):
    text = BASE.replace(old, new)
    first, source, caret = _error(text)
    assert first.startswith(f"m.hbir:{line}:{col}: ")
    assert message in first
    assert source == text.split("\n")[line - 1]
    assert _caret_col(caret) == col


def test_caret_keeps_tabs():
    text = BASE.replace("  %y: f32[2,3] = add(%x, %c)", "\t%y: f32[2,3] = add(%x, %q)")
    first, source, caret = _error(text)
    assert first == "m.hbir:4:25: use of undefined value %q"
    assert caret == "\t" + " " * 23 + "^"


@pytest.mark.parametrize("old,new,line,col,message", [
    ("add(%x, %c)", "add(%x, %d)", 4, 26, "use of undefined value %d"),
    ("%c: f32[3]", "%x: f32[3]", 3, 3, "%x is defined twice (first at line 2)"),
    ("%y: f32[2,3] = add", "%c: f32[2,3] = add", 4, 3, "%c is defined twice (first at line 3)"),
    ("add(", "addd(", 4, 18, "unknown op 'addd' (did you mean add"),
    ("add(%x, %c)", "add(%x, %c) {axis=1}", 4, 31, "op 'add' has no attribute 'axis'"),
    ("%y: f32[2,3] = add(%x, %c)", "%y: f32[2,3] = test.text_op(%x) {sizes=[1.5]}", 4, 42,
     "attribute 'sizes' expects int"),
    ("%y: f32[2,3] = add(%x, %c)", "%y: f32[2,3] = test.text_op(%x) {axis=1, axis=2}", 4, 44,
     "attribute 'axis' given twice"),
    ("%y: f32[2,3] = add(%x, %c)", "%y: f32[2,3] = test.needs_k(%x)", 4, 18,
     "requires attribute 'k'"),
    ("%y: f32[2,3] = add", "%y, %z: f32[2,3] = add", 4, 3, "2 value(s) but 1 type(s)"),
    ("f32[3] = const [1.0, 2.0, 3.0]", "f33[3] = const [1.0, 2.0, 3.0]", 3, 7,
     "unknown dtype 'f33'"),
    ("f32[2,3])", "f32[2,3] NCWH)", 2, 23, "unknown layout 'NCWH'"),
    ("f32[2,3])", "f32[2,3] q(scal=1.0))", 2, 25, "unknown quantization field 'scal'"),
    ("[1.0, 2.0, 3.0]", "[1.0, 2.0]", 3, 22, "2 value(s) for shape [3] (3 elements)"),
    ("%c: f32[3] = const [1.0, 2.0, 3.0]", "%c: i8[3] = const [1, 2, 300]", 3, 28,
     "300 is out of range for i8 [-128, 127]"),
    ("%c: f32[3] = const [1.0, 2.0, 3.0]", "%c: bool[3] = const [true, 1, false]", 3, 30,
     "expected true or false, got '1'"),
    ("add(%x, %c)", 'add(%x, %c) loc("\\q")', 4, 34, "bad string"),
    ("add(%x, %c)", "add(%x, %z)", 4, 26, "%z is used before its definition at line 5"),
])
def test_semantic_errors_point_at_line_and_column(old, new, line, col, message):
    text = BASE.replace(old, new)
    if "%z is used" in message:
        text = text.replace("  return", "  %z: f32[3] = const [1.0, 2.0, 3.0]\n  return")
    first, source, caret = _error(text)
    assert first.startswith(f"m.hbir:{line}:{col}: "), first
    assert message in first
    assert source == text.split("\n")[line - 1]
    assert _caret_col(caret) == col


def test_duplicate_node_name():
    text = BASE.replace("  return %y", '  %y2: f32[2,3] = add(%y, %c) name("y")\n  return %y2')
    first, _, caret = _error(text)
    assert first == "m.hbir:5:31: node name 'y' is used twice"
    assert _caret_col(caret) == 31


def test_missing_constant():
    text = BASE.replace(" [1.0, 2.0, 3.0]", "")
    first, _, _ = _error(text)
    assert first.startswith("m.hbir:3:3: constant %c is out of line")
    assert "no constants were given" in first
    first, _, _ = _error(text, constants={"other": np.zeros(3, np.float32)})
    assert "not found in the constants" in first
    first, _, _ = _error(text, constants={"c": np.zeros(3, np.float64)})
    assert "data float64[3] does not match its type f32[3]" in first
    g = from_text(text, constants={"c": np.arange(3, dtype=np.float32)})
    assert g.constants["c"].tolist() == [0.0, 1.0, 2.0]


def test_version_header():
    first, source, caret = _error(BASE.replace("hbir 1", "hbir 2"))
    assert first == "m.hbir:1:6: unsupported .hbir format version '2' (this hbc reads version 1)"
    assert source == "hbir 2" and _caret_col(caret) == 6
    first, _, _ = _error("# no header\n" + BASE.replace("hbir 1\n", ""))
    assert first == "m.hbir:2:1: missing header: an .hbir file starts with 'hbir 1'"


# -- speed and layering ---------------------------------------------------------------------------

def test_parsing_is_within_20x_of_printing():
    rng = np.random.default_rng(4)
    g = Graph("r")
    cur = g.add_input("x", TensorType("f32", (1, 64, 8, 8), "NCHW"))
    for i in range(300):
        w = g.add_constant(f"layer{i}.weight", rng.standard_normal((64, 1, 1)).astype(np.float32),
                           type_=TensorType("f32", (64, 1, 1), quant=QuantParams(
                               tuple(rng.random(64).tolist()), 0)) if i % 3 == 0 else None)
        if i % 2:
            cur = g.add_node("test.text_op", [cur, w, None], {"axis": 1, "alpha": 0.5},
                             loc=f"/layer{i}/Op").outputs[0]
        else:
            cur = g.add_node("add", [cur, w], loc=f"/layer{i}/Add").outputs[0]
    g.set_outputs([cur])
    text = to_text(g)
    from_text(text, constants=g.constants)  # warm up: builds the cached LALR parser

    def best(fn) -> float:
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_print = best(lambda: to_text(g))
    t_parse = best(lambda: from_text(text, constants=g.constants))
    assert t_parse < 20 * t_print, f"parse {t_parse:.4f}s vs print {t_print:.4f}s"


def test_import_is_light():
    code = ("import sys, hbc.ir; g = hbc.ir.from_text('hbir 1\\ngraph @g() {\\n  return\\n}\\n');"
            "assert not {'torch', 'onnx'} & set(sys.modules), 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
