"""Fuzzing the ONNX frontend (frontend/onnx_import.py and the converters): mutated valid models
end in an HbcError naming the file, or import to a graph that verifies; never another
exception, never a hang (tests/fuzz.py).

Base models, built with onnx.helper: a small CNN (Conv, BatchNormalization, Relu, Add, MaxPool,
Resize, Concat, GlobalAveragePool, Reshape, Gemm, Softmax) behind a QuantizeLinear/
DequantizeLinear pair, and a shape-arithmetic graph (Shape/Gather/Unsqueeze/Concat feeding
Reshape, Constant, ConstantOfShape, Add, Slice, Pad, Transpose, Split, Cast, Mul, Sigmoid).
Mutations: initializers removed or given other dims and types; attributes replaced by ones of
another type or with extreme values; node inputs rewired (to later nodes: cycles; to missing
names), removed, added; nodes removed, duplicated, reordered, given other op types; graph inputs
with negative, zero, huge or symbolic dims, other element types, no shape; empty graphs; opset
imports removed or odd; raw protobuf bytes damaged.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from hbc.errors import InputError, ResourceLimitError
from hbc.frontend.onnx_import import import_onnx
from hbc.ir.verify import verify

from .fuzz import Fixture, case, fuzz_settings


def _init(name: str, array) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def cnn() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    inits = [
        _init("w1", f(8, 3, 3, 3)), _init("b1", f(8)),
        _init("g", f(8)), _init("beta", f(8)), _init("mean", f(8)),
        _init("var", np.abs(f(8)) + 0.5),
        _init("w2", f(8, 8, 1, 1)), _init("scales", np.array([1, 1, 2, 2], np.float32)),
        _init("shape", np.array([1, -1], np.int64)), _init("wl", f(10, 16)), _init("bl", f(10)),
        _init("xs", np.array(0.02, np.float32)), _init("xz", np.array(0, np.int8)),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="xq"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="xd"),
        helper.make_node("Conv", ["xd", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1],
                         strides=[1, 1], kernel_shape=[3, 3]),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn"],
                         name="bn", epsilon=1e-5),
        helper.make_node("Relu", ["bn"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", group=1),
        helper.make_node("Add", ["c2", "r1"], ["a1"], name="add"),
        helper.make_node("MaxPool", ["a1"], ["p1"], name="pool", kernel_shape=[2, 2],
                         strides=[2, 2]),
        helper.make_node("Resize", ["p1", "", "scales"], ["up"], name="resize", mode="nearest"),
        helper.make_node("Concat", ["up", "a1"], ["cat"], name="concat", axis=1),
        helper.make_node("GlobalAveragePool", ["cat"], ["gp"], name="gap"),
        helper.make_node("Reshape", ["gp", "shape"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "wl", "bl"], ["logits"], name="fc", transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], name="softmax", axis=-1),
    ]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, [1, 10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def shapes() -> onnx.ModelProto:
    inits = [_init("idx", np.array(0, np.int64)), _init("axes0", np.array([0], np.int64)),
             _init("minus1", np.array([-1], np.int64)),
             _init("starts", np.array([0, 1], np.int64)),
             _init("ends", np.array([4, 6], np.int64)),
             _init("sl_axes", np.array([0, 1], np.int64)),
             _init("pads", np.array([0, 1, 0, 1], np.int64)),
             _init("split", np.array([2, 2], np.int64))]
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape"),
        helper.make_node("Gather", ["s", "idx"], ["n"], name="gather", axis=0),
        helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"], name="unsq"),
        helper.make_node("Concat", ["n1", "minus1"], ["new_shape"], name="cat_shape", axis=0),
        helper.make_node("Reshape", ["x", "new_shape"], ["flat"], name="reshape"),
        helper.make_node("Constant", [], ["two"], name="const",
                         value=numpy_helper.from_array(np.array([4, 6], np.int64))),
        helper.make_node("ConstantOfShape", ["two"], ["ones"], name="cos",
                         value=numpy_helper.from_array(np.array([1.0], np.float32))),
        helper.make_node("Add", ["flat", "ones"], ["ex"], name="add"),
        helper.make_node("Mul", ["ex", "ones"], ["m"], name="mul"),
        helper.make_node("Slice", ["m", "starts", "ends", "sl_axes"], ["sl"], name="slice"),
        helper.make_node("Pad", ["sl", "pads"], ["pd"], name="pad", mode="constant"),
        helper.make_node("Transpose", ["pd"], ["t"], name="transpose", perm=[1, 0]),
        helper.make_node("Split", ["t", "split"], ["s1", "s2"], name="split", axis=1),
        helper.make_node("Cast", ["s1"], ["c"], name="cast", to=TensorProto.FLOAT16),
        helper.make_node("Sigmoid", ["s2"], ["y"], name="sigmoid"),
    ]
    graph = helper.make_graph(
        nodes, "shapes", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [7, 2]),
         helper.make_tensor_value_info("c", TensorProto.FLOAT16, [7, 2])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    return Fixture(cnn=cnn(), shapes=shapes(), folder=tmp_path_factory.mktemp("fuzz_onnx"))


def test_bases_import(bases):
    for which in ("cnn", "shapes"):
        path = bases["folder"] / f"{which}.onnx"
        path.write_bytes(bases[which].SerializeToString())
        verify(import_onnx(path))


def import_and_verify(path) -> None:
    verify(import_onnx(path))


def check(bases, data: bytes, reader: str = "onnx: mutated models") -> None:
    path = bases["folder"] / "fuzz.onnx"
    path.write_bytes(data)
    case(reader, lambda: import_and_verify(path), names=(str(path),))


# -- mutations ------------------------------------------------------------------------------------
EXTREME_INTS = [0, -1, 1, 2, 3, 7, -(2**31), 2**31 - 1, 2**40, -(2**63), 2**63 - 1]
attribute_value = st.one_of(
    st.sampled_from(EXTREME_INTS), st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.lists(st.sampled_from(EXTREME_INTS), max_size=6),
    st.lists(st.floats(width=32), min_size=1, max_size=4),
    st.sampled_from(["", "nearest", "linear", "constant", "reflect", "NOTSET", "x" * 300]),
    st.sampled_from([np.array([], np.float32), np.array([1.0, 2.0], np.float32),
                     np.array(7, np.int64), np.zeros((2, 0), np.float32)]),
)
ELEM_TYPES = [TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT8, TensorProto.BOOL,
              TensorProto.STRING, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.UNDEFINED,
              TensorProto.COMPLEX64, TensorProto.BFLOAT16, TensorProto.UINT4, 999]
OP_TYPES = ["Relu", "Conv", "Add", "Reshape", "MaxPool", "Gemm", "Concat", "Resize", "Slice",
            "Softmax", "Identity", "ConstantOfShape", "Expand", "Loop", "If", "Unknown", ""]


def _make_attr(name: str, value) -> onnx.AttributeProto:
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value))
    if isinstance(value, list) and not value:
        return helper.make_attribute(name, [], attr_type=onnx.AttributeProto.INTS)
    return helper.make_attribute(name, value)


def mutate(model: onnx.ModelProto, data) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    kind = data.draw(st.sampled_from([
        "drop_init", "init_dims", "init_type", "attr", "attr", "rewire", "rewire", "drop_input",
        "add_input", "drop_node", "dup_node", "reorder", "op_type", "input_dims", "input_dims",
        "input_type", "empty", "opset", "dup_output", "drop_output"]))
    nodes = list(g.node)
    if kind == "drop_init" and len(g.initializer):
        del g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
    elif kind == "init_dims" and len(g.initializer):
        t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
        dims = data.draw(st.lists(st.sampled_from([0, 1, 2, 3, 8, -1, 2**20, 2**40]),
                                  max_size=4))
        del t.dims[:]
        t.dims.extend(dims)
    elif kind == "init_type" and len(g.initializer):
        t = g.initializer[data.draw(st.integers(0, len(g.initializer) - 1))]
        t.data_type = data.draw(st.sampled_from(ELEM_TYPES))
    elif kind == "attr" and nodes:
        n = g.node[data.draw(st.integers(0, len(nodes) - 1))]
        names = [a.name for a in n.attribute] + ["axis", "pads", "kernel_shape", "value", "to",
                                                "perm", "mode", "group", "strides", "bogus"]
        name = data.draw(st.sampled_from(names))
        kept = [a for a in n.attribute if a.name != name]
        del n.attribute[:]
        n.attribute.extend(kept)
        n.attribute.append(_make_attr(name, data.draw(attribute_value)))
    elif kind == "rewire" and nodes:
        i = data.draw(st.integers(0, len(nodes) - 1))
        n = g.node[i]
        names = [o for x in nodes for o in x.output] + ["x", "nope", ""] + \
            [t.name for t in g.initializer]
        if len(n.input):
            n.input[data.draw(st.integers(0, len(n.input) - 1))] = data.draw(
                st.sampled_from(names))
    elif kind == "drop_input" and nodes:
        n = g.node[data.draw(st.integers(0, len(nodes) - 1))]
        if len(n.input):
            del n.input[data.draw(st.integers(0, len(n.input) - 1))]
    elif kind == "add_input" and nodes:
        n = g.node[data.draw(st.integers(0, len(nodes) - 1))]
        n.input.append(data.draw(st.sampled_from(["x", "", "nope", *nodes[0].output])))
    elif kind == "drop_node" and nodes:
        del g.node[data.draw(st.integers(0, len(nodes) - 1))]
    elif kind == "dup_node" and nodes:
        g.node.append(nodes[data.draw(st.integers(0, len(nodes) - 1))])
    elif kind == "reorder" and nodes:
        order = data.draw(st.permutations(range(len(nodes))))
        del g.node[:]
        g.node.extend(nodes[i] for i in order)
    elif kind == "op_type" and nodes:
        g.node[data.draw(st.integers(0, len(nodes) - 1))].op_type = data.draw(
            st.sampled_from(OP_TYPES))
    elif kind == "input_dims":
        vi = g.input[0]
        choice = data.draw(st.sampled_from(["dims", "symbolic", "noshape"]))
        if choice == "noshape":
            vi.type.tensor_type.ClearField("shape")
        else:
            dims = vi.type.tensor_type.shape.dim
            k = data.draw(st.integers(0, max(len(dims) - 1, 0)))
            if len(dims):
                if choice == "symbolic":
                    dims[k].dim_param = "N"
                else:
                    dims[k].dim_value = data.draw(st.sampled_from(
                        [0, -1, -5, 2**20, 2**31, 2**40, 2**62]))
    elif kind == "input_type":
        g.input[0].type.tensor_type.elem_type = data.draw(st.sampled_from(ELEM_TYPES))
    elif kind == "empty":
        del g.node[:]
        if data.draw(st.booleans()):
            del g.output[:]
    elif kind == "opset":
        del m.opset_import[:]
        v = data.draw(st.sampled_from([None, 0, 1, 7, 11, 13, 21, 99]))
        if v is not None:
            m.opset_import.append(helper.make_opsetid(data.draw(st.sampled_from(
                ["", "ai.onnx", "com.microsoft"])), v))
    elif kind == "dup_output" and nodes:
        g.node[data.draw(st.integers(0, len(nodes) - 1))].output[0] = nodes[0].output[0]
    elif kind == "drop_output" and len(g.output):
        g.output[0].name = data.draw(st.sampled_from(
            ["nope", "x", *(nodes[0].output[:1] if nodes else [])]))
    return m


@fuzz_settings(1500)
@given(which=st.sampled_from(["cnn", "shapes"]), data=st.data())
def test_mutated_model_files(bases, which, data):
    """From a file: onnx.checker sees the model first."""
    m = bases[which]
    for _ in range(data.draw(st.integers(1, 3))):
        m = mutate(m, data)
    check(bases, m.SerializeToString())


@fuzz_settings(3000)
@given(which=st.sampled_from(["cnn", "shapes"]), data=st.data())
def test_mutated_model_protos(bases, which, data):
    """An in-memory ModelProto (the API takes one) is not run through onnx.checker, so every
    mutation reaches the importer and the converters."""
    m = bases[which]
    for _ in range(data.draw(st.integers(1, 3))):
        m = mutate(m, data)
    case("onnx: mutated ModelProtos", lambda: verify(import_onnx(m)), names=(which,))


@fuzz_settings(800)
@given(which=st.sampled_from(["cnn", "shapes"]), data=st.data())
def test_damaged_protobuf(bases, which, data):
    raw = bytearray(bases[which].SerializeToString())
    kind = data.draw(st.sampled_from(["flip", "truncate", "garbage"]))
    if kind == "flip":
        for at, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                  st.integers(1, 255)), min_size=1, max_size=4)):
            raw[at] ^= x
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw = bytearray(data.draw(st.binary(max_size=200)))
    check(bases, bytes(raw), "onnx: damaged protobuf")


# -- resource limits ----------------------------------------------------------------------------
def _one_node(node, inits=(), shape=(2, 2)) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("what, model, size", [
    ("ConstantOfShape", lambda: _one_node(
        helper.make_node("ConstantOfShape", ["s"], ["y"], name="cos"),
        [_init("s", np.array([2**20, 2**20, 2**10], np.int64))]), "4,503,599,627,370,496 bytes"),
    ("Resize", lambda: _one_node(
        helper.make_node("Resize", ["x", "", "s"], ["y"], name="up"),
        [_init("s", np.array([1, 1, 2**20, 2**20], np.float32))], shape=(1, 1, 2, 2)),
     "17,592,186,044,416 bytes"),
    ("input", lambda: _one_node(helper.make_node("Relu", ["x"], ["y"]), shape=(2**25, 2**25)),
     "4,503,599,627,370,496 bytes"),
])
def test_huge_shapes_are_refused_with_the_size(bases, what, model, size):
    path = bases["folder"] / f"huge_{what}.onnx"
    path.write_bytes(model().SerializeToString())
    with pytest.raises(ResourceLimitError) as e:
        import_onnx(path)
    assert str(e.value).startswith(f"{path}: "), str(e.value)
    assert f"needs {size}" in str(e.value), str(e.value)


def test_huge_initializer_dims_are_refused_before_reading(bases):
    """From a file onnx.checker refuses data shorter than the dims; an in-memory ModelProto
    (not checked) meets the size limit before numpy_helper reads it."""
    t = _init("w", np.zeros(4, np.float32))
    del t.dims[:]
    t.dims.extend([2**30, 2**30])
    path = bases["folder"] / "huge_init.onnx"
    model = _one_node(helper.make_node("Add", ["x", "w"], ["y"]), [t])
    path.write_bytes(model.SerializeToString())
    with pytest.raises(InputError, match="raw_data size .* is too small"):
        import_onnx(path)
    with pytest.raises(ResourceLimitError, match=r"initializer 'w' \[1073741824, 1073741824\] "
                                                 r"needs 4,611,686,018,427,387,904 bytes"):
        import_onnx(model)


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname", "sub/../../secret.bin"])
def test_external_data_stays_in_the_model_folder(tmp_path, location):
    """An initializer's external data may not point outside the model's folder."""
    (tmp_path / "secret.bin").write_bytes(b"S" * 16)
    (tmp_path / "model").mkdir()
    t = _init("w", np.zeros(4, np.float32))
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", location
    path = tmp_path / "model" / "m.onnx"
    path.write_bytes(_one_node(helper.make_node("Add", ["x", "w"], ["y"]), [t],
                               shape=(4,)).SerializeToString())
    with pytest.raises(InputError, match=r"m.onnx: cannot load external tensor data"):
        import_onnx(path)
