"""Fuzzing the .hbir parser (ir/parser.py), the verifier and the sidecar .npz reader: random and
mutated text ends in an HbcError naming the file (``FILE:LINE:COL`` for syntax), or parses;
never another exception, never a hang (tests/fuzz.py).

Seeds are the golden .hbir files (tests/golden). Mutations: deleted, inserted and replaced spans
and tokens from the grammar's vocabulary, duplicated and swapped lines, numbers replaced by
extreme ones (huge dimensions, 5000-digit integers, NaN payloads, denormals). A text that
parses must print and parse back to the same text (the round trip of docs/hbir.md) and go
through the verifier with at most a VerifyError.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hbc.errors import HbcError, ResourceLimitError
from hbc.ir import from_text, load_hbir, save, to_text
from hbc.ir.graph import Graph
from hbc.ir.types import TensorType
from hbc.ir.verify import verify

from .fuzz import Fixture, case, fuzz_settings

GOLDEN = Path(__file__).parent / "golden"
FILENAME = "fuzz.hbir"


def _seeds() -> list[str]:
    out = []
    for path in sorted(GOLDEN.rglob("*.hbir")):
        text = path.read_text()
        try:
            from_text(text)
        except HbcError:
            continue  # needs test-only ops or a sidecar
        out.append(text)
    return out


SEEDS = _seeds()
VOCAB = [
    "hbir 1\n", "graph", "@g", "(", ")", "{", "}", "%x", "%y", '%"a b"', ":", ",", "=", "const",
    "return", "_", "f32[1,3]", "i8[2]", "bool[0]", "f16[]", "x9[1]", "f32[", "]", "[", "NCHW",
    "NHWC", "q(scale=0.5)", "q(scale=[0.1, 0.2], axis=1)", "q(", "scale=", "axis=",
    "zero_point=[1]", 'name("n")', 'loc("l")', "conv", "relu", "add", "qconv", "reshape",
    "{strides=[1, 1]}", '{mode="nearest"}', "nan", "-nan", "nan(0x7ff0000000000001)",
    "nan(0xffffffffffffffffffff)", "inf", "-inf", "1e309", "5e-324", "-0.0", "true", "false",
    "9" * 5000, "99999999999999999999", "-1", "0", "\n", "  ", "#", '"', "\\", "\x00", "\ufeff",
    "é", "\r\n",
]
NUMBERS = ["0", "-1", "-0", "1", "2147483648", "4294967296", "9223372036854775808", "1e308",
           "1e309", "-1e309", "nan", "inf", "5e-324", "0.1", "9" * 30, "9" * 5000, "1048576",
           "nan(0x1)", "true"]
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(SEEDS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["delete", "insert", "replace", "line", "swap", "number"]))
        n = len(text)
        if kind in ("delete", "insert", "replace"):
            i = draw(st.integers(0, n))
            j = min(n, i + draw(st.integers(0, 12)))
            token = "" if kind == "delete" else draw(st.sampled_from(VOCAB) | st.text(max_size=4))
            text = text[:i] + token + text[j if kind != "insert" else i:]
        elif kind in ("line", "swap"):
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            if kind == "line":
                lines.insert(b, lines[a])
            else:
                lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
        else:
            spots = list(_NUMBER.finditer(text))
            if spots:
                m = draw(st.sampled_from(spots))
                text = text[:m.start()] + draw(st.sampled_from(NUMBERS)) + text[m.end():]
    return text


def parse_and_check(text: str) -> Graph:
    """Parse; a graph that parses prints and parses back to the same text, and verifies (or
    raises VerifyError, an HbcError)."""
    g = from_text(text, filename=FILENAME)
    printed = to_text(g)
    again = from_text(printed, constants=g.constants, filename="printed.hbir")
    assert to_text(again) == printed, f"round trip differs:\n{printed}"
    verify(g)
    return g


def test_seeds_parse():
    assert len(SEEDS) >= 10
    for text in SEEDS:
        parse_and_check(text)


@fuzz_settings(4000)
@given(text=mutated())
def test_mutated_text(text):
    case("hbir: mutated text", lambda: parse_and_check(text), names=(FILENAME,))


@fuzz_settings(1500)
@given(text=st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(VOCAB), max_size=40).map(lambda t: "hbir 1\n" + "".join(t)),
    st.lists(st.sampled_from(VOCAB), max_size=40).map(lambda t: "hbir 1\ngraph @g(" + " ".join(t)),
))
def test_random_text(text):
    case("hbir: random text", lambda: parse_and_check(text), names=(FILENAME,))


# -- the sidecar .npz -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    g = Graph("side")
    x = g.add_input("x", TensorType("f32", (4, 64)))
    w = g.add_constant("w", np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100)
    b = g.add_constant("b", np.arange(32, dtype=np.int64) - 16)
    y = g.add_node("matmul", [x, w]).outputs[0]
    g.set_outputs([y, g.add_node("cast", [y], {"to": "i64"}).outputs[0]])
    g.meta["keep"] = b.name
    folder = tmp_path_factory.mktemp("fuzz_sidecar")
    save(g, folder / "m.hbir")
    return Fixture(folder=folder, npz=(folder / "m.npz").read_bytes())


@fuzz_settings(1000)
@given(data=st.data())
def test_damaged_sidecar(saved, data):
    raw = bytearray(saved["npz"])
    kind = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if kind == "flip":
        for at, x in data.draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                  st.integers(1, 255)), min_size=1, max_size=6)):
            raw[at] ^= x
    elif kind == "truncate":
        del raw[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        raw += data.draw(st.binary(min_size=1, max_size=100))
    path = saved["folder"] / "m.hbir"
    (saved["folder"] / "m.npz").write_bytes(bytes(raw))
    case("hbir: sidecar .npz", lambda: load_hbir(path), names=(str(saved["folder"] / "m."),))


# -- resource limits ----------------------------------------------------------------------------
@pytest.mark.parametrize("text, size", [
    ("graph @g(%x: f32[65536,65536,65536]) {\n  return %x\n}\n", "1,125,899,906,842,624 bytes"),
    ("graph @g(%x: f32[2,2]) {\n  %y: f32[2,1099511627778] = pad(%x) "
     "{pads=[0, 0, 0, 1099511627776]}\n  return %y\n}\n", "8,796,093,022,224 bytes"),
])
def test_huge_shapes_are_refused_with_the_size(text, size):
    with pytest.raises(ResourceLimitError) as e:
        from_text("hbir 1\n" + text, filename=FILENAME)
    assert str(e.value).startswith(f"{FILENAME}:2:") or str(e.value).startswith(f"{FILENAME}:3:")
    assert f"needs {size}" in str(e.value)
