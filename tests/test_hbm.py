"""The .hbm file: the program encoding (ir/program.py), the writer (backend/hbm_writer.py) and the
validating reader (runtime/hbm.py), against docs/hbm-format.md.

Round trips are exact (the program gives back the same .hbir text, constants equal and memory-
mapped), the bytes are deterministic, and every kind of damage (a flipped byte in each part,
truncation, a foreign or newer file, sections or constants pointing outside) is rejected with a
message naming the part. Test graphs: a lowered ResNet-18 (calibrated on two random samples,
``lower-int`` for bayes, as tests/test_zoo_int.py builds them), a small model with a CPU-
fallback node, and hand-built graphs with every attribute kind and special floats.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import hbc
from hbc import models
from hbc.backend.hbm_inspect import describe_hbm
from hbc.backend.hbm_writer import HbmModelSpec, hbm_bytes, pack, write_hbm
from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.program import decode_program, encode_program, io_descriptors
from hbc.ir.text import to_text
from hbc.ir.types import QuantParams, TensorType
from hbc.passes import run
from hbc.runtime.hbm import ENTRY, TABLE_CRC, HbmError, canonical_json, read_hbm

NAN_BITS = 0x7FF4000000000123  # a signaling NaN with a payload
ODD_NAN = struct.unpack("<d", struct.pack("<Q", NAN_BITS))[0]


# -- test graphs --------------------------------------------------------------------------------
def _lower(module: nn.Module, example: tuple, march: str = "bayes") -> tuple[Graph, Graph]:
    from hbc.passes.calibrate import calibrate

    floats = run(hbc.load((module, example)), opt=3)
    rng = np.random.default_rng(0)
    samples = [{v.name: rng.standard_normal(v.shape).astype(v.type.np_dtype)
                for v in floats.inputs} for _ in range(2)]
    lowered = run(calibrate(floats, samples, method="max"),
                  passes=[("lower-int", {"march": march})])
    return floats, lowered


class _Tiny(nn.Module):
    """A conv head plus a channel sum, which has no integer form on bayes (a CPU fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(y), y.sum(dim=1, keepdim=True)


@pytest.fixture(scope="module")
def resnet() -> tuple[Graph, Graph]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        module, example = models.build("resnet18", input_size=32)
        return _lower(module, example)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny() -> Graph:
    torch.manual_seed(0)
    _, lowered = _lower(_Tiny().eval(), (torch.randn(1, 3, 8, 8),))
    lowered.meta["input_types"] = {"x": "rgb"}
    return lowered


def _special_graph() -> Graph:
    """Every attribute kind, absent inputs, odd names, special floats and many dtypes."""
    g = Graph("special")
    x = g.add_input("x", TensorType("f32", (2, 3), quant=QuantParams((ODD_NAN,))))
    y = g.add_node("clip", [x], {"min": -math.inf, "max": ODD_NAN}, name="odd name",
                   loc="a.py:3", output_names=["odd value"], exact_names=True).outputs[0]
    y = g.add_node("leaky_relu", [y], {"alpha": -0.0}).outputs[0]
    w = g.add_constant("w", np.arange(12, dtype=np.float32).reshape(3, 4))
    z = g.add_node("gemm", [y, w, None], {"alpha": 5e-324, "beta": 1e308}).outputs[0]
    g.set_quant(z, QuantParams((0.5, math.inf, 0.1), axis=1, zero_point=(0, 1, 0)))
    g.add_constant("scalar", np.array(math.pi))
    g.add_constant("empty", np.zeros((0, 3), np.int64))
    g.add_constant("flags", np.array([True, False, True]))
    g.add_constant("half", np.array([1.5, -np.inf, np.nan], np.float16))
    g.add_constant("u8", np.arange(300, dtype=np.uint8)[:256].reshape(16, 16))
    g.set_outputs([z, y])
    g.meta.update({"shape": (1, 2), "obj": object(), "nan": math.nan, "n": np.int64(3)})
    return g


def _spec(name: str, graph: Graph) -> HbmModelSpec:
    return HbmModelSpec(name, graph, {"march": "bayes", "opt": 3, "shape": (1, 2)},
                        {"latency_ms": 1.25, "fps": math.inf})


# -- the program ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["float", "lowered", "cpu_fallback", "special"])
def test_program_round_trip_is_exact(which, resnet, tiny):
    graph = {"float": resnet[0], "lowered": resnet[1], "cpu_fallback": tiny,
             "special": _special_graph()}[which]
    program, constants = encode_program(graph)
    program = json.loads(canonical_json(program))  # plain JSON, no NaN tokens
    back = decode_program(program, constants)
    assert to_text(back) == to_text(graph)
    for name, arr in constants.items():
        assert back.constants[name] is arr  # used as given, never copied
        np.testing.assert_array_equal(arr, graph.constants[name])
    assert back.meta == json.loads(json.dumps(program["meta"]))


def test_program_keeps_special_floats_bit_exact():
    g = decode_program(*encode_program(_special_graph()))
    bits = struct.pack("<d", g.node("odd name").attrs["max"])
    assert bits == struct.pack("<Q", NAN_BITS)
    assert struct.pack("<d", g.inputs[0].type.quant.scale[0]) == bits
    assert math.copysign(1, g.nodes[1].attrs["alpha"]) == -1
    assert g.outputs[0].type.quant.scale == (0.5, math.inf, 0.1)
    assert g.meta == {"shape": [1, 2], "n": 3}  # object and NaN entries left out


def test_io_descriptors(tiny):
    inputs, outputs = io_descriptors(tiny)
    scale = tiny.value("x.q").type.quant.scale[0]
    assert inputs == [{"name": "x", "shape": [1, 3, 8, 8], "dtype": "f32", "layout": None,
                       "input_type": "rgb", "quant": {"dtype": "i8", "scale": scale,
                                                      "axis": None, "value": "x.q"}}]
    assert [d["name"] for d in outputs] == ["output0", "output1"]
    assert outputs[0]["quant"]["value"] == "output0.q" and outputs[0]["quant"]["dtype"] == "i8"
    assert outputs[1]["quant"] is None  # the float result of the CPU-fallback sum


def _mutate(program: dict, path: str, value) -> dict:
    p = json.loads(json.dumps(program))
    *keys, last = path.split("/")
    obj = p
    for k in keys:
        obj = obj[int(k)] if isinstance(obj, list) else obj[k]
    if value is KeyError:
        del obj[last]
    else:
        obj[int(last) if isinstance(obj, list) else last] = value
    return p


@pytest.mark.parametrize("path,value,message", [
    ("nodes/1/attrs/strides", "2", "nodes[1].attrs.strides: expected a list of ints"),
    ("nodes/1/attrs/pads", [1, 1.5, 1, 1], "nodes[1].attrs.pads[1]: expected an int, got num"),
    ("nodes/1/attrs/bogus", 1, "nodes[1].attrs.bogus: op 'qconv' has no such attribute"),
    ("nodes/0/attrs/scale", [1.0, "x"], "nodes[0].attrs.scale[1]: expected a number"),
    ("nodes/1/op", "frobnicate", "nodes[1].op: unknown op 'frobnicate'"),
    ("nodes/1/inputs", [], "nodes[1].inputs: op 'qconv' takes 4 to 8 inputs, got 0"),
    ("nodes/1/inputs/1", None, "nodes[1].inputs[1]: input 'w' of op 'qconv' is required"),
    ("nodes/1/inputs/0", "nowhere", "nodes[1].inputs[0]: %nowhere is not defined"),
    ("nodes/1/outputs/0/type/shape", [1, 8, 8, 9], "nodes[1].outputs[0].type: recorded as"),
    ("nodes/1/outputs/0/type/dtype", "q8", "nodes[1].outputs[0].type.dtype: unknown dtype"),
    ("nodes/1/outputs/0/name", "x", "nodes[1]: graph '_Tiny': value name '%x' is defined twice"),
    ("nodes/1/name", KeyError, "nodes[1]: missing field 'name'"),
    ("consts/0/type/shape", [8, 3, 3], "consts[0]: constant '%conv.weight': data int8"),
    ("consts/0/name", "ghost", "consts[0]: constant %ghost has no data"),
    ("inputs/0/type/quant/scale", [0.5, 0.5], "inputs[0].type.quant: per-tensor"),
    ("outputs/0", "ghost", "outputs[0]: %ghost is not defined"),
    ("version", 3, "version: program version 3 is not supported"),
    # version 1 had the older residual rule: refused, never run under version 2's
    ("version", 1, "version: program version 1 is not supported (this hbc reads version 2"),
    ("nodes", {}, "nodes: expected a list, got an object"),
])
def test_program_errors_name_the_json_path(tiny, path, value, message):
    program, constants = encode_program(tiny)
    with pytest.raises(InputError) as e:
        decode_program(_mutate(program, path, value), constants, where="model 'm' program")
    assert str(e.value).startswith(f"model 'm' program: {message}"), str(e.value)


def _json_paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) \
        else ()
    for k, v in items:
        yield from _json_paths(v, (*prefix, k))


def test_damaged_programs_raise_input_errors_only(tiny):
    """Random field replacements (seeded): decoding fails with InputError or succeeds, never
    with another exception."""
    rng = np.random.default_rng(7)
    junk = [None, 0, -1, 1 << 70, 1e300, -0.0, "", "x", "inf", [], [None], [[1]], {}, True,
            {"dtype": "i8", "shape": [2]}]
    for graph in (tiny, _special_graph()):
        program, constants = encode_program(graph)
        paths = list(_json_paths(program))[1:]
        for _ in range(300):
            *keys, last = paths[rng.integers(len(paths))]
            p = json.loads(json.dumps(program))
            obj = p
            for k in keys:
                obj = obj[k]
            obj[last] = junk[rng.integers(len(junk))]
            try:
                decode_program(p, constants)
            except InputError:
                pass


# -- the file -----------------------------------------------------------------------------------
def test_hbm_round_trip_every_field(tmp_path, resnet, tiny):
    path = tmp_path / "two.hbm"
    write_hbm(path, [_spec("r18", resnet[1]), _spec("tiny", tiny)], "bayes")
    f = read_hbm(path, march="bayes")
    assert (f.version, f.march, f.toolchain, f.flags) == ((1, 0), "bayes", hbc.__version__, 0)
    assert [s.name for s in f.sections] == ["meta", "program.0", "weights.0", "program.1",
                                            "weights.1"]
    assert all(s.offset % 64 == 0 for s in f.sections)
    for m, graph in zip(f.models, (resnet[1], tiny), strict=True):
        assert [m.inputs, m.outputs] == json.loads(json.dumps(io_descriptors(graph)))
        assert m.options == {"march": "bayes", "opt": 3, "shape": [1, 2]}
        assert m.perf == {"latency_ms": 1.25, "fps": "inf"}
        back = m.graph()
        assert to_text(back) == to_text(graph)
        for name, arr in back.constants.items():
            np.testing.assert_array_equal(arr, graph.constants[name])
            assert arr.dtype == graph.constants[name].dtype
            assert not arr.flags.owndata and not arr.flags.writeable
            assert isinstance(arr.base, mmap.mmap)  # a view of the mapped file
    assert f.model("tiny").name == "tiny"


def test_constants_sit_at_aligned_file_offsets(resnet):
    data = hbm_bytes([_spec("r18", resnet[1])], "bayes")
    f = read_hbm(data)
    base = np.frombuffer(data, np.uint8).ctypes.data
    for arr in f.model().constants.values():
        assert (arr.ctypes.data - base) % 64 == 0


def test_same_input_gives_identical_bytes(tmp_path, resnet, tiny):
    specs = [_spec("r18", resnet[1]), _spec("tiny", tiny)]
    a = hbm_bytes(specs, "bayes")
    assert a == hbm_bytes([_spec("r18", resnet[1].copy()), _spec("tiny", tiny.copy())], "bayes")
    write_hbm(tmp_path / "m.hbm", specs, "bayes")
    assert (tmp_path / "m.hbm").read_bytes() == a
    assert [p.name for p in tmp_path.iterdir()] == ["m.hbm"]  # no temporary left behind


@pytest.fixture(scope="module")
def tiny_bytes(tiny) -> bytes:
    return hbm_bytes([_spec("tiny", tiny)], "bayes")


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def _table(data: bytes) -> dict[str, tuple[int, int]]:
    count, table = struct.unpack_from("<IQ", data, 16)
    out = {}
    for i in range(count):
        name, off, size, _, _ = ENTRY.unpack_from(data, table + i * ENTRY.size)
        out[name.rstrip(b"\0").decode()] = (off, size)
    return out


@pytest.mark.parametrize("part,message", [
    ("header", "header is damaged (checksum mismatch)"),
    ("table", "section table is damaged (checksum mismatch)"),
    ("meta", "section 'meta' is damaged (checksum mismatch)"),
    ("program.0", "section 'program.0' is damaged (checksum mismatch)"),
    ("weights.0", "section 'weights.0' is damaged (checksum mismatch)"),
])
def test_a_flipped_byte_is_named(tiny_bytes, part, message):
    if part == "header":
        at = 30  # inside the march name
    elif part == "table":
        at = 64 + ENTRY.size + 20  # the offset of program.0
    else:
        off, size = _table(tiny_bytes)[part]
        at = off + size // 2
    with pytest.raises(HbmError) as e:
        read_hbm(_flip(tiny_bytes, at))
    assert str(e.value).startswith(f"<bytes>: {message}")


def _patch_header(data: bytes, fmt: str, offset: int, *values) -> bytes:
    raw = bytearray(data)
    struct.pack_into(fmt, raw, offset, *values)
    struct.pack_into("<I", raw, 60, zlib.crc32(raw[:60]))
    return bytes(raw)


def _patch_entry(data: bytes, index: int, **fields) -> bytes:
    """Change fields of one section table entry and fix the table checksum."""
    raw = bytearray(data)
    count = struct.unpack_from("<I", raw, 16)[0]
    at = 64 + index * ENTRY.size
    name, off, size, crc, res = ENTRY.unpack_from(raw, at)
    values = dict(name=name, offset=off, size=size, crc=crc, reserved=res) | fields
    ENTRY.pack_into(raw, at, *values.values())
    end = 64 + count * ENTRY.size
    TABLE_CRC.pack_into(raw, end, zlib.crc32(raw[64:end]))
    return bytes(raw)


@pytest.mark.parametrize("case,message", [
    ("magic", "not an .hbm file (wrong magic number)"),
    ("empty", "not an .hbm file (wrong magic number)"),
    ("short header", "truncated: 40 bytes, the header alone is 64"),
    ("newer", "written by a newer hbc (format 2.0); this hbc reads 1.x"),
    ("flags", "header flags 0x00000004 use features this hbc does not know"),
    ("count", "section table: 0 sections"),
    ("table outside", "section table at 1000000.."),
    ("truncated", "section 'weights.0' ("),
    ("section outside", "section 'program.0' ("),
    ("unaligned", "section 'weights.0' at offset"),
    ("overlap", "sections 'program.0' and 'weights.0' overlap"),
    ("over table", "section 'meta' (64.."),
])
def test_damaged_or_foreign_files_are_rejected(tiny_bytes, case, message):
    data = tiny_bytes
    offs = _table(data)
    bad = {
        "magic": lambda: b"PK\x03\x04" + data[4:],
        "empty": lambda: b"",
        "short header": lambda: data[:40],
        "newer": lambda: _patch_header(data, "<HH", 8, 2, 0),
        "flags": lambda: _patch_header(data, "<I", 12, 4),
        "count": lambda: _patch_header(data, "<I", 16, 0),
        "table outside": lambda: _patch_header(data, "<Q", 20, 1_000_000),
        "truncated": lambda: data[:offs["weights.0"][0] + 100],
        "section outside": lambda: _patch_entry(data, 1, offset=len(data)),
        "unaligned": lambda: _patch_entry(data, 2, offset=offs["weights.0"][0] + 8),
        "overlap": lambda: _patch_entry(data, 2, offset=offs["program.0"][0]),
        "over table": lambda: _patch_entry(data, 0, offset=64),
    }[case]()
    with pytest.raises(HbmError) as e:
        read_hbm(bad)
    assert message in str(e.value), str(e.value)


def test_truncated_and_empty_paths(tmp_path, tiny_bytes):
    (tmp_path / "empty.hbm").write_bytes(b"")
    (tmp_path / "cut.hbm").write_bytes(tiny_bytes[:len(tiny_bytes) // 2])
    with pytest.raises(HbmError, match="empty.hbm: empty file"):
        read_hbm(tmp_path / "empty.hbm")
    with pytest.raises(HbmError, match=r"cut.hbm: section '.*' .* truncated"):
        read_hbm(tmp_path / "cut.hbm")
    with pytest.raises(HbmError, match="missing.hbm: no such file"):
        read_hbm(tmp_path / "missing.hbm")


def test_march_mismatch(tmp_path, tiny_bytes):
    (tmp_path / "m.hbm").write_bytes(tiny_bytes)
    with pytest.raises(HbmError) as e:
        read_hbm(tmp_path / "m.hbm", march="bernoulli2")
    assert "m.hbm: compiled for bayes, not bernoulli2" in str(e.value)


def _rebuild(data: bytes, edit=None, raw: dict[str, bytes] | None = None) -> bytes:
    """The file with the JSON of its sections edited by ``edit(name, obj)`` (or replaced by
    ``raw[name]``) and every offset and checksum recomputed, so only the edited field is wrong."""
    f = read_hbm(data)
    parts = []
    for s in f.sections:
        content = data[s.offset:s.offset + s.size]
        if raw and s.name in raw:
            content = raw[s.name]
        elif edit and not s.name.startswith("weights."):
            obj = json.loads(content)
            edit(s.name, obj)
            content = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        parts.append((s.name, content))
    table_size = len(parts) * ENTRY.size + TABLE_CRC.size
    offset = -(-(64 + table_size) // 64) * 64
    rows, body = b"", b""
    for name, content in parts:
        rows += ENTRY.pack(name.encode(), offset + len(body), len(content), zlib.crc32(content),
                           0)
        body += content + bytes(-len(content) % 64)
    table = rows + TABLE_CRC.pack(zlib.crc32(rows))
    table += bytes(offset - 64 - len(table))
    head = bytearray(data[:64])
    struct.pack_into("<I", head, 16, len(parts))
    struct.pack_into("<I", head, 60, zlib.crc32(head[:60]))
    return bytes(head) + table + body


def _set(section: str, path: str, value):
    def edit(name, obj):
        if name == section:
            obj.update(_mutate(obj, path, value))
    return edit


@pytest.mark.parametrize("edit,message", [
    (_set("program.0", "constants/conv.weight/offset", 1 << 20),
     "section 'program.0': constants.conv.weight.offset: 1048576..1048792 is not a 64-byte"),
    (_set("program.0", "constants/conv.weight/offset", 8), "constants.conv.weight.offset: 8.."),
    (_set("program.0", "constants/conv.weight/nbytes", 4), "constants.conv.weight.nbytes: 4 "),
    (_set("program.0", "constants/conv.weight/dtype", "f128"), "unknown dtype 'f128'"),
    (_set("program.0", "constants/conv.weight/shape", [-1, 216]), "not a shape: [-1, 216]"),
    (_set("program.0", "constants/conv.weight/shape", [1 << 40] * 4), ".nbytes: 216 does not"),
    (_set("meta", "format", "zip"), "section 'meta': format: expected \"hbm\""),
    (_set("meta", "march", "nash"), "march: 'nash' differs from the header's 'bayes'"),
    (_set("meta", "models/0/program", "weights.0"), "models[0].program: no section"),
    (_set("meta", "models/0/inputs/0/shape", "big"), "models[0].inputs[0].shape: expected a"),
    (_set("meta", "models/0/inputs/0/quant/scale", None), "inputs[0].quant.scale: expected a"),
    (_set("meta", "models/0/outputs/0/name", "y"), "models[0].outputs: names ['y', 'output1']"),
    (_set("meta", "models", []), "models: expected 1 to 1024 models, got 0"),
    (_set("meta", "models/0/perf", [1]), "models[0].perf: expected an object"),
])
def test_bad_fields_are_named(tiny_bytes, edit, message):
    with pytest.raises(HbmError) as e:
        read_hbm(_rebuild(tiny_bytes, edit))
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("meta,message", [
    (b'{"format":"hbm","x":NaN}', "NaN is not JSON"),
    (b'{"format":"hbm","format":"hbm"}', "duplicate key 'format'"),
    (b'{"format":"hbm"', "section 'meta' is not valid JSON"),
    (b'\xff', "section 'meta' is not valid JSON"),
])
def test_meta_json_is_strict(tiny_bytes, meta, message):
    with pytest.raises(HbmError, match=message):
        read_hbm(_rebuild(tiny_bytes, raw={"meta": meta}))


def test_program_errors_surface_from_graph_naming_the_file(tiny_bytes):
    data = _rebuild(tiny_bytes, _set("program.0", "nodes/1/attrs/strides", [1]))
    model = read_hbm(data).model()
    with pytest.raises(HbmError, match=r"<bytes>: model 'tiny' program: nodes\[1\]"):
        model.graph()


# -- several models, pack -----------------------------------------------------------------------
def test_several_models(tiny, resnet):
    f = read_hbm(hbm_bytes([_spec("a", tiny), _spec("b", resnet[1])], "bayes"))
    assert [m.name for m in f.models] == ["a", "b"]
    assert to_text(f.model("b").graph()) == to_text(resnet[1])
    with pytest.raises(HbmError, match=r"holds 2 models \(a, b\); name one"):
        f.model()
    with pytest.raises(HbmError, match=r"has no model 'c' \(models: a, b\)"):
        f.model("c")
    with pytest.raises(InputError, match="unique"):
        hbm_bytes([_spec("a", tiny), _spec("a", tiny)], "bayes")
    with pytest.raises(InputError, match="march"):
        hbm_bytes([_spec("a", tiny)], "a-march-name-too-long")


def test_pack(tmp_path, tiny, resnet):
    write_hbm(tmp_path / "a.hbm", [_spec("tiny", tiny)], "bayes")
    write_hbm(tmp_path / "b.hbm", [_spec("r18", resnet[1])], "bayes")
    write_hbm(tmp_path / "c.hbm", [_spec("other", tiny)], "bernoulli2")
    pack([tmp_path / "a.hbm", tmp_path / "b.hbm"], tmp_path / "ab.hbm")
    f = read_hbm(tmp_path / "ab.hbm")
    assert [m.name for m in f.models] == ["tiny", "r18"]
    assert to_text(f.model("r18").graph()) == to_text(resnet[1])
    assert f.model("tiny").perf == {"latency_ms": 1.25, "fps": "inf"}
    # packing is deterministic: the same as writing both models at once
    assert (tmp_path / "ab.hbm").read_bytes() == hbm_bytes(
        [_spec("tiny", tiny), _spec("r18", resnet[1])], "bayes")
    with pytest.raises(InputError) as e:
        pack([tmp_path / "a.hbm", tmp_path / "c.hbm"], tmp_path / "ac.hbm")
    assert "different marches" in str(e.value) and "c.hbm (bernoulli2)" in str(e.value)
    with pytest.raises(InputError) as e:
        pack([tmp_path / "a.hbm", tmp_path / "a.hbm"], tmp_path / "aa.hbm")
    assert "model name 'tiny' appears twice" in str(e.value) and "--names" in str(e.value)
    pack([tmp_path / "a.hbm", tmp_path / "a.hbm"], tmp_path / "aa.hbm", names=["t1", "t2"])
    assert [m.name for m in read_hbm(tmp_path / "aa.hbm").models] == ["t1", "t2"]
    with pytest.raises(InputError, match="2 names for 1 models"):
        pack([tmp_path / "a.hbm"], tmp_path / "x.hbm", names=["t1", "t2"])


def test_describe_hbm(tmp_path, tiny):
    write_hbm(tmp_path / "m.hbm", [_spec("tiny", tiny)], "bayes")
    text = describe_hbm(tmp_path / "m.hbm")
    assert "hbm format 1.0, march bayes" in text and "weights.0" in text
    assert "input  x: f32[1, 3, 8, 8] rgb, quantized to i8" in text
    assert "output output1: f32[1, 1, 8, 8], no integer boundary" in text
    assert "hbir 1" not in text
    assert to_text(tiny) in describe_hbm(tmp_path / "m.hbm", program=True)


def test_reader_loads_no_heavy_modules():
    code = ("import sys, hbc.runtime.hbm, hbc.ir.program; "
            "print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'lark', 'jinja2', "
            "'networkx', 'click', 'rich') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
