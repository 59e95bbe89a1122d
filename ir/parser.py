"""The .hbir parser: ``from_text(text)`` rebuilds the Graph that ``to_text`` printed.

The grammar is ``hbir.lark`` (LALR, loaded once); this module walks the parse tree and builds the
graph through the Graph API, checking what the grammar leaves generic: dtypes, layouts, op names
and attributes against the registry, names against their definitions. Recorded output types are
kept as written (the verifier compares them with inference); names are kept exactly.

Every error is a ``ParseError`` whose message is ``FILE:LINE:COL: what went wrong`` followed by
the source line and a caret under the column. Parsed nodes get ``loc=""`` unless the text has a
``loc(...)``; their ``FILE:LINE`` is recorded in ``graph.meta["hbir_lines"]`` (node name -> place)
for later error messages.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hbc.errors import InputError, ParseError, ResourceLimitError

from .graph import Graph, Value
from .registry import OpDef, all_ops, get_op
from .text import FORMAT_VERSION, bits_of, default_nan_bits, format_name, value_kind
from .types import DTYPES, LAYOUTS, QuantParams, TensorType, dtype_of

_GRAMMAR = Path(__file__).with_name("hbir.lark")
_F64 = np.dtype(np.float64)

# at most 1000 digits: int() refuses more than 4300 (CVE-2020-10735), and no dtype needs them
_INT_RE = r"[-+]?\d{1,1000}"
_NUMBER_RE = (
    r"(?:[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?|inf"
    r"|nan(?:\(0x[0-9a-fA-F]+\))?)|true|false)"
)
_INT = re.compile(_INT_RE)
_NUMBER = re.compile(_NUMBER_RE)
# Whole lists checked by one regex match (the fast path; errors are then located item by item).
_INT_LIST = re.compile(rf"\s*{_INT_RE}\s*(?:,\s*{_INT_RE}\s*)*")
_NUMBER_LIST = re.compile(rf"\s*{_NUMBER_RE}\s*(?:,\s*{_NUMBER_RE}\s*)*")
# `%x:f32[3]`: the name is `x:f32` (names may hold ':'), so the type seems to be missing.
_GLUED_COLON = re.compile(r"%[A-Za-z0-9_.\-/:]*:[A-Za-z_][A-Za-z0-9_]*\Z")
_HEADER_SKIP = re.compile(r"(?:\s|#[^\n]*)*")
_HEADER = re.compile(r"hbir[ \t]+([^\s#]+)")

# How syntax errors name the grammar's regex terminals.
_TERMINAL_NAMES = {
    "VALUE": "a %value",
    "GRAPH_NAME": "an @name",
    "IDENT": "an identifier",
    "STRING": 'a "string"',
    "SCALAR": "a number",
    "NUMLIST": "a [list]",
    "TENSOR": "a type like f32[1,3]",
    "NODE_NAME": 'name("...")',
    "NODE_LOC": 'loc("...")',
    "$END": "end of file",
}


@functools.lru_cache(maxsize=1)
def _lark():
    from lark import Lark

    return Lark(_GRAMMAR.read_text(encoding="utf-8"), parser="lalr", lexer="contextual",
                maybe_placeholders=True, propagate_positions=False)


def from_text(text: str, constants: Mapping[str, np.ndarray] | None = None,
              filename: str = "<string>") -> Graph:
    """Parse .hbir text into a Graph.

    ``constants`` maps names to the data of out-of-line constants (``%w: T = const``); arrays are
    used as given, not copied. ``filename`` only appears in error messages.
    """
    from lark.exceptions import UnexpectedInput

    _check_header(text, filename)
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as e:
        raise _syntax_error(e, text, filename) from None
    return _Builder(text, filename, constants).build(tree)


# -- errors ------------------------------------------------------------------------------------

def _error(text: str, filename: str, line: int, col: int, what: str,
           cls: type[InputError] = ParseError) -> InputError:
    lines = text.split("\n")
    src = lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
    caret = "".join("\t" if c == "\t" else " " for c in src[: max(col - 1, 0)]) + "^"
    return cls(f"{filename}:{line}:{col}: {what}\n{src}\n{caret}")


def _line_col(text: str, pos: int) -> tuple[int, int]:
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


def _check_header(text: str, filename: str) -> None:
    """Reject a missing header or another format version before the grammar sees the file."""
    pos = _HEADER_SKIP.match(text).end()
    if not text.startswith("hbir", pos):
        raise _error(text, filename, *_line_col(text, pos),
                     f"missing header: an .hbir file starts with 'hbir {FORMAT_VERSION}'")
    m = _HEADER.match(text, pos)
    if m and m.group(1) != str(FORMAT_VERSION):
        raise _error(text, filename, *_line_col(text, m.start(1)),
                     f"unsupported .hbir format version {m.group(1)!r} "
                     f"(this hbc reads version {FORMAT_VERSION})")


def _describe_terminal(name: str) -> str:
    if name in _TERMINAL_NAMES:
        return _TERMINAL_NAMES[name]
    try:
        pattern = _lark().get_terminal(name).pattern
    except KeyError:
        return name
    return f"'{pattern.value}'" if pattern.type == "str" else name


def _describe_expected(names) -> str:
    items = sorted({_describe_terminal(n) for n in names or ()})
    if len(items) > 8:
        items = items[:8] + ["..."]
    return ", ".join(items)


def _syntax_error(e, text: str, filename: str) -> ParseError:
    from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedToken

    if isinstance(e, UnexpectedToken):
        tok = e.token
        if tok.type == "$END":
            line, col = tok.end_line or tok.line, tok.end_column or tok.column
            what = "unexpected end of file"
        else:
            line, col = tok.line, tok.column
            shown = tok.value if len(tok.value) <= 40 else tok.value[:37] + "..."
            what = f"unexpected {shown!r}"
        what = f"{what}; expected {_describe_expected(e.expected)}"
        if tok.type != "$END" and _GLUED_COLON.search(text, 0, tok.start_pos):
            what += " (':' may be part of a name: write '%x: f32[...]' with a space)"
        return _error(text, filename, line, col, what)
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else ""
        if ch == "[":
            what = "malformed list: '[' without a matching ']' (lists hold numbers only)"
        else:
            what = f"unexpected character {ch!r}"
            if e.allowed:
                what += f"; expected {_describe_expected(e.allowed)}"
        return _error(text, filename, e.line, e.column, what)
    if isinstance(e, UnexpectedEOF):
        line, col = _line_col(text, len(text))
        return _error(text, filename, line, col,
                      f"unexpected end of file; expected {_describe_expected(e.expected)}")
    return _error(text, filename, getattr(e, "line", 0), getattr(e, "column", 0), str(e))


# -- numbers -------------------------------------------------------------------------------------

def _nan_bits(item: str, dtype: np.dtype) -> int | None:
    """The bit pattern in ``dtype`` of a NaN literal; None if it is not a NaN of that dtype."""
    default = default_nan_bits(dtype)
    body = item.lstrip("+")
    if body == "nan":
        bits = default
    elif body == "-nan":
        bits = default | (1 << (8 * dtype.itemsize - 1))
    elif body.startswith("nan("):
        bits = int(body[4:-1], 16)
        if bits >= 1 << (8 * dtype.itemsize):
            return None
    else:
        return None
    as_float = np.array([bits], dtype=bits_of(np.zeros(1, dtype)).dtype).view(dtype)
    with np.errstate(invalid="ignore"):
        return bits if np.isnan(as_float[0]) else None


def _int_bounds(dtype: np.dtype) -> tuple[int, int]:
    try:
        info = np.iinfo(dtype)
    except ValueError:  # int4 and friends from ml_dtypes
        import ml_dtypes

        info = ml_dtypes.iinfo(dtype)
    return int(info.min), int(info.max)


def _parse_double(item: str) -> float | None:
    """A Python float from a number literal (NaN payloads kept); None if not a float."""
    if "nan" in item:
        bits = _nan_bits(item, _F64)
        return None if bits is None else struct.unpack("<d", struct.pack("<Q", bits))[0]
    if item in ("true", "false"):
        return None
    return float(item)


# -- the tree walk -------------------------------------------------------------------------------

class _Builder:
    def __init__(self, text: str, filename: str, constants: Mapping[str, Any] | None) -> None:
        self.text = text
        self.filename = filename
        self.constants = constants
        self.defined: dict[str, tuple[Value, int]] = {}
        self.node_names: set[str] = set()
        self.stmts: list = []
        self.graph: Graph | None = None
        self.types: dict[tuple, TensorType] = {}

    def error(self, tok, what: str, offset: int = 0, cls: type[InputError] = ParseError
              ) -> InputError:
        """A ParseError (or ``cls``) at token ``tok`` (or ``offset`` characters into it)."""
        line, col = tok.line, tok.column
        if offset:
            before = tok.value[:offset]
            newlines = before.count("\n")
            line += newlines
            col = offset - before.rfind("\n") if newlines else col + offset
        return _error(self.text, self.filename, line, col, what, cls)

    def wrap(self, tok, e: InputError) -> InputError:
        """``e`` from the Graph API, placed at ``tok``; a resource-limit error keeps its class."""
        cls = ResourceLimitError if isinstance(e, ResourceLimitError) else ParseError
        err = self.error(tok, e.args[0] if e.args else str(e), cls=cls)
        err.hint = e.hint
        return err

    # -- top level ---------------------------------------------------------------------------
    def build(self, tree) -> Graph:
        header, graph_tree = tree.children
        version = header.children[0]
        if version.value != str(FORMAT_VERSION):  # _check_header normally catches this
            raise self.error(version, f"unsupported .hbir format version {version.value!r}")
        name_tok, params, *stmts, ret = graph_tree.children
        g = self.graph = Graph(self.string(name_tok, name_tok.value[1:]))
        g.meta["source"] = self.filename
        g.meta["hbir_lines"] = {}
        self.stmts = stmts
        for p in params.children:
            self.param(p)
        for s in stmts:
            self.stmt(s)
        g.set_outputs([self.use(t) for t in ret.children])
        return g

    def param(self, tree) -> None:
        tok, type_tree = tree.children
        name = self.define(tok)
        type_ = self.type(type_tree)
        try:
            value = self.graph.add_input(name, type_)
        except InputError as e:
            raise self.wrap(tok, e) from None
        self.bind(value, name, tok)

    def stmt(self, tree) -> None:
        *lhs, rhs = tree.children
        out_toks = [c for c in lhs if not hasattr(c, "data")]
        types = [self.type(c) for c in lhs if hasattr(c, "data")]
        names: list[str] = []
        for tok in out_toks:
            name = self.define(tok)
            if name in names:
                raise self.error(tok, f"{_fmt(name)} is defined twice in one statement")
            names.append(name)
        if len(names) != len(types):
            raise self.error(out_toks[0], f"{len(names)} value(s) but {len(types)} type(s)")
        if rhs.data == "const":
            if len(names) != 1:
                raise self.error(out_toks[1], "a constant defines exactly one value")
            self.const(out_toks[0], names[0], types[0], rhs.children[0])
        else:
            self.node(out_toks, names, types, rhs)

    # -- names -------------------------------------------------------------------------------
    def string(self, tok, text: str) -> str:
        """A bare name or the JSON string ``text`` (taken from ``tok`` for errors)."""
        if not text.startswith('"'):
            return text
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self.error(tok, f"bad string {text}: {e.msg}") from None

    def define(self, tok) -> str:
        name = self.string(tok, tok.value[1:])
        prev = self.defined.get(name)
        if prev is not None:
            raise self.error(tok, f"{_fmt(name)} is defined twice (first at line {prev[1]})")
        return name

    def bind(self, value: Value, name: str, tok) -> None:
        self.defined[name] = (value, tok.line)

    def use(self, tok) -> Value:
        name = self.string(tok, tok.value[1:])
        entry = self.defined.get(name)
        if entry is not None:
            return entry[0]
        for s in self.stmts:
            for c in s.children:
                if getattr(c, "type", None) == "VALUE" and self.string(c, c.value[1:]) == name:
                    raise self.error(tok, f"{_fmt(name)} is used before its definition "
                                          f"at line {c.line}")
        raise self.error(tok, f"use of undefined value {_fmt(name)}")

    # -- numbers and types -------------------------------------------------------------------
    def items(self, tok) -> list[str]:
        """The elements of a NUMLIST token, each checked to be a number literal."""
        inner = tok.value[1:-1]
        if not inner.strip():
            return []
        parts = inner.split(",")
        items = [p.strip() for p in parts]
        for i, item in enumerate(items):
            if not _NUMBER.fullmatch(item):
                offset = 1 + sum(len(p) + 1 for p in parts[:i])
                offset += len(parts[i]) - len(parts[i].lstrip())
                what = "empty list element" if not item else f"bad number {item!r}"
                raise self.error(tok, what, offset)
        return items

    def item_error(self, tok, index: int, what: str) -> ParseError:
        if tok.type != "NUMLIST":
            return self.error(tok, what)
        parts = tok.value[1:-1].split(",")
        offset = 1 + sum(len(p) + 1 for p in parts[:index])
        return self.error(tok, what, offset + len(parts[index]) - len(parts[index].lstrip()))

    def ints(self, tok, what: str = "integer") -> list[int]:
        if tok.type == "NUMLIST" and _INT_LIST.fullmatch(tok.value, 1, len(tok.value) - 1):
            return list(map(int, tok.value[1:-1].split(",")))
        items = [tok.value] if tok.type == "SCALAR" else self.items(tok)
        for i, item in enumerate(items):
            if not _INT.fullmatch(item):
                raise self.item_error(tok, i, f"expected an {what}, got {item!r}")
        return [int(s) for s in items]

    def floats(self, tok) -> list[float]:
        inner = tok.value[1:-1]
        if (tok.type == "NUMLIST" and "nan" not in inner and "t" not in inner
                and _NUMBER_LIST.fullmatch(inner)):
            return list(map(float, inner.split(",")))
        items = [tok.value] if tok.type == "SCALAR" else self.items(tok)
        out = []
        for i, item in enumerate(items):
            value = _parse_double(item)
            if value is None:
                raise self.item_error(tok, i, f"expected a float, got {item!r}")
            out.append(value)
        return out

    def numbers(self, tok) -> Any:
        """An attribute value: int, float or a list of them (the registry coerces the kind)."""
        items = [tok.value] if tok.type == "SCALAR" else self.items(tok)
        out: list[Any] = []
        for i, item in enumerate(items):
            if _INT.fullmatch(item):
                out.append(int(item))
            elif item in ("true", "false"):
                out.append(item == "true")
            else:
                value = _parse_double(item)
                if value is None:
                    raise self.item_error(tok, i, f"bad number {item!r}")
                out.append(value)
        return out[0] if tok.type == "SCALAR" else out

    def type(self, tree) -> TensorType:
        tensor_tok, layout_tok, quant_tree = tree.children
        if quant_tree is None:  # plain types repeat a lot: parse each text once
            key = (tensor_tok.value, layout_tok and layout_tok.value)
            t = self.types.get(key)
            if t is None:
                t = self.types[key] = self.parse_type(tensor_tok, layout_tok, None)
            return t
        return self.parse_type(tensor_tok, layout_tok, quant_tree)

    def parse_type(self, tensor_tok, layout_tok, quant_tree) -> TensorType:
        dtype, _, dims = tensor_tok.value.partition("[")
        if dtype not in DTYPES:
            raise self.error(tensor_tok, f"unknown dtype {dtype!r} (expected one of "
                                         f"{', '.join(DTYPES)})")
        dims = dims[:-1]
        if _INT_LIST.fullmatch(dims):
            shape = [int(d) for d in dims.split(",")]
        elif not dims.strip():
            shape = []
        else:
            shape_tok = _sub_token(tensor_tok, "NUMLIST", len(dtype), "[" + dims + "]")
            shape = self.ints(shape_tok, "integer dimension")
        layout = None
        if layout_tok is not None:
            layout = layout_tok.value
            if layout not in LAYOUTS:
                raise self.error(layout_tok, f"unknown layout {layout!r} (expected "
                                             f"{' or '.join(LAYOUTS)} or a 'q(...)')")
        quant = self.quant(quant_tree) if quant_tree is not None else None
        return TensorType(dtype, tuple(shape), layout, quant)

    def quant(self, tree) -> QuantParams:
        fields: dict[str, Any] = {}
        first = tree.children[0].children[0]
        for f in tree.children:
            key_tok, val_tok = f.children
            key = key_tok.value
            if key not in ("scale", "axis", "zero_point"):
                raise self.error(key_tok, f"unknown quantization field {key!r} "
                                          "(expected scale, axis, zero_point)")
            if key in fields:
                raise self.error(key_tok, f"quantization field {key!r} given twice")
            if key == "scale":
                fields[key] = self.floats(val_tok)
            elif key == "axis":
                if val_tok.type != "SCALAR" or not _INT.fullmatch(val_tok.value):
                    raise self.error(val_tok, "axis must be an integer")
                fields[key] = int(val_tok.value)
            else:
                fields[key] = self.ints(val_tok)
        if "scale" not in fields:
            raise self.error(first, "quantization parameters need a scale")
        try:
            return QuantParams(tuple(fields["scale"]), fields.get("axis"),
                               fields.get("zero_point"))
        except InputError as e:
            raise self.wrap(first, e) from None

    # -- constants ---------------------------------------------------------------------------
    def const(self, tok, name: str, type_: TensorType, literal) -> None:
        if literal is None:
            data = self.constants.get(name) if self.constants is not None else None
            if data is None:
                where = ("no constants were given" if self.constants is None else
                         f"not found in {getattr(self.constants, 'source', 'the constants')}")
                raise self.error(tok, f"constant {_fmt(name)} is out of line (`= const` "
                                      f"without a value) and has no data: {where}")
            data = np.asarray(data)
            want = type_.np_dtype
            if (data.dtype != want and data.dtype.kind in "uV" and want.kind == "V"
                    and data.dtype.itemsize == want.itemsize):
                data = data.view(want)  # .npy stores ml_dtypes arrays (bf16, f8...) as raw bytes
            if data.dtype != type_.np_dtype or tuple(data.shape) != type_.shape:
                raise self.error(tok, f"constant {_fmt(name)}: data {data.dtype}"
                                      f"{list(data.shape)} does not match its type "
                                      f"{type_.dtype}{list(type_.shape)}")
        else:
            data = self.literal(literal, type_)
        try:
            value = self.graph.add_constant(name, data, exact=True, type_=type_)
        except InputError as e:
            raise self.wrap(tok, e) from None
        self.bind(value, name, tok)

    def literal(self, tok, type_: TensorType) -> np.ndarray:
        items = [tok.value] if tok.type == "SCALAR" else self.items(tok)
        if len(items) != type_.numel:
            raise self.error(tok, f"{len(items)} value(s) for shape {list(type_.shape)} "
                                  f"({type_.numel} elements)")
        dt = type_.np_dtype
        kind = value_kind(dt)
        if kind == "b":
            for i, item in enumerate(items):
                if item not in ("true", "false"):
                    raise self.item_error(tok, i, f"expected true or false, got {item!r}")
            array = np.array([s == "true" for s in items], dtype=dt)
        elif kind == "i":
            low, high = _int_bounds(dt)
            values = []
            for i, item in enumerate(items):
                if not _INT.fullmatch(item):
                    raise self.item_error(tok, i, f"expected an integer, got {item!r}")
                value = int(item)
                if not low <= value <= high:
                    raise self.item_error(tok, i, f"{value} is out of range for {type_.dtype} "
                                                  f"[{low}, {high}]")
                values.append(value)
            array = np.array(values, dtype=dt)
        else:
            array = self.float_literal(tok, items, dt)
        return array.reshape(type_.shape)

    def float_literal(self, tok, items: list[str], dt: np.dtype) -> np.ndarray:
        values: list[float] = []
        nans: list[tuple[int, int]] = []
        for i, item in enumerate(items):
            if "nan" in item:
                bits = _nan_bits(item, dt)
                if bits is None:
                    raise self.item_error(tok, i, f"{item!r} is not a NaN of {dtype_of(dt)}")
                nans.append((i, bits))
                values.append(0.0)
            elif item in ("true", "false"):
                raise self.item_error(tok, i, f"expected a float, got {item!r}")
            else:
                values.append(float(item))
        with np.errstate(over="ignore", invalid="ignore"):
            array = np.array(values, dtype=np.float64).astype(dt)
        if nans:
            raw = bits_of(array)
            for i, bits in nans:
                raw[i] = bits
        return array

    # -- nodes -------------------------------------------------------------------------------
    def node(self, out_toks, names: list[str], types: list[TensorType], tree) -> None:
        op_tok, operands, attrs_tree, name_tree, loc_tree = tree.children
        opdef = self.opdef(op_tok)
        inputs = [None if hasattr(c, "data") else self.use(c) for c in operands.children]
        attrs = self.attrs(opdef, attrs_tree) if attrs_tree is not None else {}
        node_name, name_tok = names[0], out_toks[0]
        if name_tree is not None:
            name_tok = name_tree
            node_name = self.clause(name_tree)
        if node_name in self.node_names:
            raise self.error(name_tok, f"node name {node_name!r} is used twice")
        loc = self.clause(loc_tree) if loc_tree is not None else ""
        try:
            node = self.graph.add_node(opdef.name, inputs, attrs, name=node_name, loc=loc,
                                       output_names=names, output_types=types,
                                       exact_names=True)
        except InputError as e:
            raise self.wrap(op_tok, e) from None
        for value, name, tok in zip(node.outputs, names, out_toks, strict=True):
            self.bind(value, name, tok)
        self.node_names.add(node_name)
        self.graph.meta["hbir_lines"][node_name] = f"{self.filename}:{out_toks[0].line}"

    def clause(self, tok) -> str:
        """The string of a ``name("...")`` or ``loc("...")`` token."""
        v = tok.value
        start, end = v.index('"'), v.rindex('"') + 1
        return self.string(_sub_token(tok, "STRING", start, v[start:end]), v[start:end])

    def opdef(self, tok) -> OpDef:
        try:
            return get_op(tok.value)
        except InputError:
            close = difflib.get_close_matches(tok.value, list(all_ops()), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise self.error(tok, f"unknown op {tok.value!r}{hint}") from None

    def attrs(self, opdef: OpDef, tree) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for a in tree.children:
            key_tok, val_tok = a.children
            key = key_tok.value
            try:
                decl = opdef.attr(key)
            except KeyError:
                known = ", ".join(x.name for x in opdef.attrs) or "none"
                raise self.error(key_tok, f"op '{opdef.name}' has no attribute {key!r} "
                                          f"(known: {known})") from None
            if key in out:
                raise self.error(key_tok, f"attribute {key!r} given twice")
            if val_tok.type == "STRING":
                value: Any = self.string(val_tok, val_tok.value)
            else:
                value = self.numbers(val_tok)
            try:
                out[key] = decl.coerce(value)
            except InputError as e:
                raise self.wrap(val_tok, e) from None
        return out


def _fmt(name: str) -> str:
    return format_name(name)


def _sub_token(tok, type_: str, offset: int, value: str):
    """A token for ``value``, found ``offset`` characters into ``tok`` (for error positions)."""
    from lark import Token

    return Token(type_, value, tok.start_pos + offset, tok.line, tok.column + offset)


