"""The .hbm file: format constants and the reader (docs/hbm-format.md is the byte-level spec).

``read_hbm(path)`` memory-maps the file read-only, validates every byte it will trust (magic,
version, header and table checksums, section bounds, alignment and overlaps, each section's
crc32, the meta schema, each program's constants table) and returns an :class:`HbmFile`. The
constants of a model are ``np.frombuffer`` views into the mapping: nothing is copied, and the
views are read-only. Any problem raises :class:`HbmError` naming the file and the section or
field. Loading never runs code: the sections are JSON and raw little-endian arrays.

numpy and the stdlib only (plus hbc.errors and hbc.ir): the runtime must not load torch, onnx,
lark, jinja2, networkx, click or rich.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.limits import check_shape
from hbc.ir.program import JsonReader, decode_program
from hbc.ir.types import DTYPES, LAYOUTS

MAGIC = b"\x89HBM\r\n\x1a\n"
FORMAT_VERSION: tuple[int, int] = (1, 0)
#: magic, major, minor, flags, section count, table offset, march, toolchain, header crc32
HEADER = struct.Struct("<8sHHIIQ16s16sI")
#: name, offset, size, crc32, reserved (zero)
ENTRY = struct.Struct("<16sQQII")
TABLE_CRC = struct.Struct("<I")
ALIGN = 64
#: flag bits a reader must understand (unknown ones: reject); bits 16-31 are informational
REQUIRED_FLAGS = 0x0000FFFF
KNOWN_FLAGS = 0
MAX_MODELS = 1024
MAX_SECTIONS = 1 + 2 * MAX_MODELS
MAX_RANK = 32

assert HEADER.size == 64 and ENTRY.size == 40


class HbmError(InputError):
    """A damaged, foreign or unsupported .hbm file; the message names the file and the
    section or field."""


@dataclass(frozen=True)
class Section:
    """One entry of the section table."""

    name: str
    offset: int
    size: int
    crc32: int


@dataclass(frozen=True)
class HbmModel:
    """One model of an .hbm: its I/O descriptors, compile options, perf summary, program (the
    JSON of ``encode_program``) and constants (read-only views into the file)."""

    name: str
    inputs: list[dict]
    outputs: list[dict]
    options: dict
    perf: dict
    program: dict
    constants: Mapping[str, np.ndarray]
    source: str = field(default="", repr=False)

    def graph(self) -> Graph:
        """The program as a Graph (constants shared with the file mapping, not copied)."""
        try:
            return decode_program(self.program, self.constants,
                                  where=f"{self.source}: model '{self.name}' program")
        except HbmError:
            raise
        except InputError as e:
            raise HbmError(str(e)) from None


@dataclass(frozen=True)
class HbmFile:
    """A validated .hbm file."""

    source: str
    version: tuple[int, int]
    march: str
    toolchain: str
    flags: int
    sections: list[Section]
    models: list[HbmModel]

    def model(self, name: str | None = None) -> HbmModel:
        """The model called ``name``; None means the only model (an error if there are more)."""
        names = [m.name for m in self.models]
        if name is None:
            if len(self.models) == 1:
                return self.models[0]
            raise HbmError(f"{self.source} holds {len(names)} models ({', '.join(names)}); "
                           "name one")
        for m in self.models:
            if m.name == name:
                return m
        raise HbmError(f"{self.source} has no model '{name}' (models: {', '.join(names)})")


def canonical_json(obj: Any) -> bytes:
    """The one JSON serialization of ``obj`` used in .hbm sections (sorted keys, compact,
    UTF-8, no NaN/Infinity tokens)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def read_hbm(source: str | os.PathLike | bytes, *, march: str | None = None) -> HbmFile:
    """Read and validate an .hbm file (a path, memory-mapped; or its bytes). ``march``: the
    march the caller runs, HbmError when the file was compiled for another."""
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        raise HbmError("the .hbm reader needs a little-endian host")
    name, buf = _open(source)
    return _Reader(name, buf).read(march)


def _open(source: str | os.PathLike | bytes) -> tuple[str, Any]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "<bytes>", bytes(source)
    name = os.fspath(source)
    try:
        with open(name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise HbmError(f"{name}: empty file, not an .hbm file")
            return name, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise HbmError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise HbmError(f"{name}: is a directory, not an .hbm file") from None
    except (OSError, ValueError) as e:
        raise HbmError(f"cannot read {name}: {e}") from None


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate key {dup!r}")
    return out


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not JSON")


class _Reader:
    """Validates one file's bytes step by step; every error names ``self.name``."""

    def __init__(self, name: str, buf: Any) -> None:
        self.name = name
        self.buf = buf
        self.size = len(buf)

    def fail(self, what: str, hint: str | None = None) -> HbmError:
        return HbmError(f"{self.name}: {what}", hint=hint)

    def read(self, march: str | None) -> HbmFile:
        version, flags, count, table, file_march, toolchain = self.header()
        if march is not None and march != file_march:
            raise self.fail(f"compiled for {file_march}, not {march}",
                            hint=f"recompile with --march {march}")
        sections = self.table(count, table)
        by_name = {s.name: s for s in sections}
        for s in sections:
            if zlib.crc32(self.view(s)) != s.crc32:
                raise self.fail(f"section '{s.name}' is damaged (checksum mismatch)",
                                hint="copy or compile the file again")
        if "meta" not in by_name:
            raise self.fail("no 'meta' section")
        meta = self.json(by_name["meta"])
        r = JsonReader(f"{self.name}: section 'meta'", HbmError)
        meta = r.dict(meta, "meta")
        if meta.get("format") != "hbm":
            raise r.fail("format", f"expected \"hbm\", got {meta.get('format')!r}")
        for key, want in (("march", file_march), ("toolchain", toolchain)):
            got = r.get(meta, key, "meta")
            if got != want:
                raise r.fail(key, f"{got!r} differs from the header's {want!r}")
        entries = r.list(r.get(meta, "models", "meta"), "models")
        if not entries or len(entries) > MAX_MODELS:
            raise r.fail("models", f"expected 1 to {MAX_MODELS} models, got {len(entries)}")
        models = [self.model(r, e, f"models[{i}]", by_name) for i, e in enumerate(entries)]
        names = [m.name for m in models]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise r.fail("models", f"model name(s) {', '.join(dups)} used twice")
        return HbmFile(self.name, version, file_march, toolchain, flags, sections, models)

    # -- header and section table ----------------------------------------------------------
    def header(self) -> tuple[tuple[int, int], int, int, int, str, str]:
        if self.size < len(MAGIC) or bytes(self.buf[:len(MAGIC)]) != MAGIC:
            raise self.fail("not an .hbm file (wrong magic number)")
        if self.size < HEADER.size:
            raise self.fail(f"truncated: {self.size} bytes, the header alone is {HEADER.size}")
        (_, major, minor, flags, count, table, march, toolchain,
         crc) = HEADER.unpack_from(self.buf, 0)
        if major > FORMAT_VERSION[0]:
            raise self.fail(f"written by a newer hbc (format {major}.{minor}); this hbc reads "
                            f"{FORMAT_VERSION[0]}.x", hint="upgrade hbc")
        if major < FORMAT_VERSION[0]:
            raise self.fail(f"format {major}.{minor} is not supported (this hbc reads "
                            f"{FORMAT_VERSION[0]}.x)", hint="recompile the model")
        if zlib.crc32(self.buf[:HEADER.size - 4]) != crc:
            raise self.fail("header is damaged (checksum mismatch)")
        if flags & REQUIRED_FLAGS & ~KNOWN_FLAGS:
            raise self.fail(f"header flags 0x{flags:08x} use features this hbc does not know",
                            hint="upgrade hbc")
        return ((major, minor), flags, count, table, self.ascii(march, "header march"),
                self.ascii(toolchain, "header toolchain"))

    def ascii(self, raw: bytes, what: str) -> str:
        text = raw.rstrip(b"\0")
        if b"\0" in text or not all(0x20 < c < 0x7F for c in text):
            raise self.fail(f"{what} is not NUL-padded printable ASCII: {raw!r}")
        return text.decode("ascii")

    def table(self, count: int, offset: int) -> list[Section]:
        if not 1 <= count <= MAX_SECTIONS:
            raise self.fail(f"section table: {count} sections (expected 1 to {MAX_SECTIONS})")
        end = offset + count * ENTRY.size + TABLE_CRC.size
        if offset < HEADER.size or end > self.size:
            raise self.fail(f"section table at {offset}..{end} lies outside the file "
                            f"({self.size} bytes): truncated or damaged")
        (crc,) = TABLE_CRC.unpack_from(self.buf, end - TABLE_CRC.size)
        if zlib.crc32(self.buf[offset:end - TABLE_CRC.size]) != crc:
            raise self.fail("section table is damaged (checksum mismatch)")
        sections: list[Section] = []
        names: set[str] = set()
        for i in range(count):
            raw, off, size, crc, reserved = ENTRY.unpack_from(self.buf, offset + i * ENTRY.size)
            name = self.ascii(raw, f"section table entry {i} name")
            if not name or name in names or reserved:
                raise self.fail(f"section table entry {i} ('{name}'): empty or repeated name, "
                                "or reserved bits set")
            names.add(name)
            if off % ALIGN:
                raise self.fail(f"section '{name}' at offset {off} is not {ALIGN}-byte aligned")
            if off < HEADER.size or off + size > self.size:
                raise self.fail(f"section '{name}' ({off}..{off + size}) lies outside the file "
                                f"({self.size} bytes): truncated or damaged")
            if off < end and offset < off + size:
                raise self.fail(f"section '{name}' ({off}..{off + size}) overlaps the section "
                                f"table ({offset}..{end})")
            sections.append(Section(name, off, size, crc))
        ordered = sorted(sections, key=lambda s: s.offset)
        for a, b in zip(ordered, ordered[1:], strict=False):
            if a.offset + a.size > b.offset:
                raise self.fail(f"sections '{a.name}' and '{b.name}' overlap")
        return sections

    def view(self, s: Section) -> memoryview:
        return memoryview(self.buf)[s.offset:s.offset + s.size]

    def json(self, s: Section) -> Any:
        try:
            return json.loads(bytes(self.view(s)).decode("utf-8"), object_pairs_hook=_pairs,
                              parse_constant=_no_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise self.fail(f"section '{s.name}' is not valid JSON ({e})") from None

    # -- models ------------------------------------------------------------------------------
    def model(self, r: JsonReader, e: Any, path: str, by_name: dict[str, Section]) -> HbmModel:
        e = r.dict(e, path)
        name = r.str(r.get(e, "name", path), f"{path}.name", empty=False)
        inputs = [_descriptor(r, d, f"{path}.inputs[{i}]", True)
                  for i, d in enumerate(r.list(r.get(e, "inputs", path), f"{path}.inputs"))]
        outputs = [_descriptor(r, d, f"{path}.outputs[{i}]", False)
                   for i, d in enumerate(r.list(r.get(e, "outputs", path), f"{path}.outputs"))]
        options = r.dict(r.get(e, "options", path), f"{path}.options")
        perf = r.dict(r.get(e, "perf", path), f"{path}.perf")
        refs = {}
        for key, prefix in (("program", "program."), ("weights", "weights.")):
            ref = r.str(r.get(e, key, path), f"{path}.{key}")
            if not ref.startswith(prefix) or ref not in by_name:
                raise r.fail(f"{path}.{key}", f"no section '{ref}' in the file")
            refs[key] = by_name[ref]
        program = r.dict(self.json(refs["program"]), refs["program"].name)
        pr = JsonReader(f"{self.name}: section '{refs['program'].name}'", HbmError)
        table = pr.dict(pr.get(program, "constants", "program"), "constants")
        constants = {k: self.constant(pr, refs["weights"], v, f"constants.{k}")
                     for k, v in table.items()}
        program = {k: v for k, v in program.items() if k != "constants"}
        for key, descs in (("inputs", inputs), ("outputs", outputs)):
            want = [d["name"] for d in descs]
            items = program.get(key)
            got = [x.get("name") if isinstance(x, dict) else x for x in items] \
                if isinstance(items, list) else None
            if got != want:
                raise r.fail(f"{path}.{key}", f"names {want} do not match the program's {got}")
        return HbmModel(name, inputs, outputs, options, perf, program,
                        MappingProxyType(constants), self.name)

    def constant(self, r: JsonReader, weights: Section, e: Any, path: str) -> np.ndarray:
        e = r.dict(e, path)
        offset = r.int(r.get(e, "offset", path), f"{path}.offset")
        nbytes = r.int(r.get(e, "nbytes", path), f"{path}.nbytes")
        dtype = r.str(r.get(e, "dtype", path), f"{path}.dtype")
        shape = r.ints(r.get(e, "shape", path), f"{path}.shape")
        if dtype not in DTYPES:
            raise r.fail(f"{path}.dtype", f"unknown dtype '{dtype}'")
        if len(shape) > MAX_RANK or any(d < 0 for d in shape):
            raise r.fail(f"{path}.shape", f"not a shape: {shape}")
        numel = 1
        for d in shape:
            numel *= d
        if nbytes != numel * DTYPES[dtype].itemsize:
            raise r.fail(f"{path}.nbytes", f"{nbytes} does not match {dtype}{shape}")
        if offset < 0 or offset % ALIGN or offset + nbytes > weights.size:
            raise r.fail(f"{path}.offset", f"{offset}..{offset + nbytes} is not a {ALIGN}-byte "
                         f"aligned extent inside section '{weights.name}' ({weights.size} bytes)")
        # a view of the mapping (its base is the mmap, or the bytes given): nothing is copied
        return np.ndarray(tuple(shape), DTYPES[dtype], buffer=self.buf,
                          offset=weights.offset + offset)


def _descriptor(r: JsonReader, d: Any, path: str, is_input: bool) -> dict:
    """Check one I/O descriptor of the meta section; returns it unchanged."""
    d = r.dict(d, path)
    r.str(r.get(d, "name", path), f"{path}.name", empty=False)
    shape = r.ints(r.get(d, "shape", path), f"{path}.shape")
    if any(x < 0 for x in shape):
        raise r.fail(f"{path}.shape", f"negative dimension in {shape}")
    if r.str(r.get(d, "dtype", path), f"{path}.dtype") not in DTYPES:
        raise r.fail(f"{path}.dtype", f"unknown dtype {d['dtype']!r}")
    check_shape(shape, DTYPES[d["dtype"]].itemsize, f"{r.where}: {path}.shape: {shape}")
    if r.get(d, "layout", path) not in (None, *LAYOUTS):
        raise r.fail(f"{path}.layout", f"expected null or one of {', '.join(LAYOUTS)}")
    if is_input:
        r.str(r.get(d, "input_type", path), f"{path}.input_type", empty=False)
    q = r.get(d, "quant", path)
    if q is not None:
        q = r.dict(q, f"{path}.quant")
        if r.str(r.get(q, "dtype", f"{path}.quant"), f"{path}.quant.dtype") not in DTYPES:
            raise r.fail(f"{path}.quant.dtype", f"unknown dtype {q['dtype']!r}")
        axis = r.get(q, "axis", f"{path}.quant")
        scale = r.get(q, "scale", f"{path}.quant")
        if axis is None:
            r.float(scale, f"{path}.quant.scale")
        else:
            r.int(axis, f"{path}.quant.axis")
            r.floats(scale, f"{path}.quant.scale")
        r.str(r.get(q, "value", f"{path}.quant"), f"{path}.quant.value", empty=False)
    return d


__all__ = ["ALIGN", "ENTRY", "FORMAT_VERSION", "HEADER", "MAGIC", "HbmError", "HbmFile",
           "HbmModel", "Section", "canonical_json", "read_hbm"]
