"""Writing .hbm files: ``hbm_bytes``, ``write_hbm`` (atomic) and ``pack`` (several files in one).

The layout (docs/hbm-format.md is the spec; runtime/hbm.py the reader and the format
constants): a 64-byte header, the section table right after it, then the sections, each at a
64-byte aligned offset, in a fixed order: ``meta``, then ``program.i`` and ``weights.i`` for each
model i. ``meta`` and ``program.i`` are canonical JSON; ``weights.i`` holds the model's
constant arrays raw (little-endian), each at a 64-byte aligned file offset; arrays with identical
bytes are stored once. The same models, options and march give the same bytes: nothing depends
on time, paths or dict order.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hbc.errors import InputError
from hbc.ir.graph import Graph
from hbc.ir.io import write_atomic
from hbc.ir.program import encode_float, encode_program, io_descriptors
from hbc.ir.types import dtype_of
from hbc.runtime.hbm import (
    ALIGN,
    ENTRY,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MAX_MODELS,
    TABLE_CRC,
    canonical_json,
    read_hbm,
)


@dataclass
class HbmModelSpec:
    """One model to write: its name, lowered graph, compile options and perf summary."""

    name: str
    graph: Graph
    options: dict = field(default_factory=dict)
    perf: dict = field(default_factory=dict)


@dataclass
class _Section:
    name: str
    chunks: list[bytes | memoryview]
    size: int = 0
    crc: int = 0

    def add(self, chunk: bytes | memoryview) -> None:
        self.chunks.append(chunk)
        self.size += len(chunk)
        self.crc = zlib.crc32(chunk, self.crc)


def _json_section(name: str, obj: Any) -> _Section:
    s = _Section(name, [])
    s.add(canonical_json(obj))
    return s


def _plain(x: Any, path: str) -> Any:
    """Options/perf data as JSON data (tuples to lists, numpy scalars to numbers, non-finite
    floats to the strings of ``encode_float``); InputError naming ``path`` otherwise."""
    if x is None or isinstance(x, (str, bool, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else encode_float(x)
    if isinstance(x, np.generic) and x.dtype.kind in "biuf":
        return _plain(x.item(), path)
    if isinstance(x, (list, tuple)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise InputError(f"{path}: key {k!r} is not a string")
            out[k] = _plain(v, f"{path}.{k}")
        return out
    raise InputError(f"{path}: {type(x).__name__} is not JSON data")


def _weights(name: str, constants: dict[str, np.ndarray]) -> tuple[_Section, dict]:
    """The weights section of one model and its constants table (name -> extent)."""
    section = _Section(name, [])
    table: dict[str, dict] = {}
    stored: dict[tuple[int, bytes], tuple[int, np.ndarray]] = {}
    for cname, arr in constants.items():
        raw = arr.reshape(-1).view(np.uint8)  # C-contiguous, little-endian (encode_program)
        key = (raw.nbytes, hashlib.sha256(raw.data).digest())
        hit = stored.get(key)
        if hit is not None and np.array_equal(hit[1], raw):
            offset = hit[0]
        else:
            pad = -section.size % ALIGN
            if pad:
                section.add(bytes(pad))
            offset = section.size
            section.add(raw.data)
            stored[key] = (offset, raw)
        table[cname] = {"dtype": dtype_of(arr), "nbytes": int(arr.nbytes), "offset": offset,
                        "shape": list(arr.shape)}
    return section, table


def _ascii_field(value: str, what: str) -> bytes:
    raw = value.encode("ascii", "replace")
    if not value or len(raw) > 16 or not all(0x20 < c < 0x7F for c in raw):
        raise InputError(f"{what} {value!r} must be 1 to 16 printable ASCII characters")
    return raw.ljust(16, b"\0")


def _layout(models: Sequence[HbmModelSpec], march: str) -> list[bytes | memoryview]:
    """Every chunk of the file, in order."""
    from hbc import __version__

    march_raw = _ascii_field(march, "march")
    tool_raw = _ascii_field(__version__, "toolchain version")
    if not models or len(models) > MAX_MODELS:
        raise InputError(f"an .hbm holds 1 to {MAX_MODELS} models, got {len(models)}")
    names = [m.name for m in models]
    for n in names:
        if not isinstance(n, str) or not n or names.count(n) > 1:
            raise InputError(f"model names must be unique and non-empty: {names}",
                             hint="rename the models (hbc compile/pack --names)")
    sections: list[_Section] = []
    entries = []
    for i, m in enumerate(models):
        program, constants = encode_program(m.graph)
        inputs, outputs = io_descriptors(m.graph)
        weights, table = _weights(f"weights.{i}", constants)
        program["constants"] = table
        sections += [_json_section(f"program.{i}", program), weights]
        entries.append({
            "name": m.name, "inputs": inputs, "outputs": outputs,
            "options": _plain(dict(m.options), f"model '{m.name}' options"),
            "perf": _plain(dict(m.perf), f"model '{m.name}' perf"),
            "program": f"program.{i}", "weights": f"weights.{i}",
        })
    meta = {"format": "hbm", "march": march, "toolchain": __version__, "models": entries}
    sections.insert(0, _json_section("meta", meta))

    table_size = len(sections) * ENTRY.size + TABLE_CRC.size
    offset = _align(HEADER.size + table_size)
    rows, body = [], []
    for s in sections:
        rows.append(ENTRY.pack(s.name.encode("ascii").ljust(16, b"\0"), offset, s.size, s.crc, 0))
        body += s.chunks
        end = offset + s.size
        offset = _align(end)
        if offset > end:
            body.append(bytes(offset - end))
    table = b"".join(rows)
    table += TABLE_CRC.pack(zlib.crc32(table)) + bytes(-(HEADER.size + table_size) % ALIGN)
    head = HEADER.pack(MAGIC, *FORMAT_VERSION, 0, len(sections), HEADER.size, march_raw,
                       tool_raw, 0)[:-4]
    head += zlib.crc32(head).to_bytes(4, "little")
    return [head, table, *body]


def _align(n: int) -> int:
    return n + (-n % ALIGN)


def hbm_bytes(models: Sequence[HbmModelSpec], march: str) -> bytes:
    """The .hbm file of ``models`` (lowered graphs) for ``march``, as bytes."""
    return b"".join(_layout(models, march))


def write_hbm(path: str | os.PathLike, models: Sequence[HbmModelSpec], march: str) -> None:
    """Write the .hbm of ``models`` to ``path`` atomically (a reader never sees half a file)."""
    chunks = _layout(models, march)

    def write(f) -> None:
        for c in chunks:
            f.write(c)

    write_atomic(Path(path), write)


def pack(sources: Sequence[str | os.PathLike], output: str | os.PathLike, *,
         names: Sequence[str] | None = None) -> None:
    """Combine the models of several .hbm files into ``output``. Every file must target the
    same march; model names must be unique (``names`` renames the models, one per model in
    order). Each program is decoded and written again (so it is validated), perf and options
    kept."""
    if not sources:
        raise InputError("pack needs at least one .hbm file")
    files = [read_hbm(s) for s in sources]
    marches = {f.march for f in files}
    if len(marches) > 1:
        which = ", ".join(f"{f.source} ({f.march})" for f in files)
        raise InputError(f"cannot pack models compiled for different marches: {which}",
                         hint="compile every model with the same --march")
    models = [(f, m) for f in files for m in f.models]
    if names is not None:
        names = list(names)
        if len(names) != len(models):
            raise InputError(f"--names gives {len(names)} names for {len(models)} models "
                             f"({', '.join(m.name for _, m in models)})")
    else:
        names = [m.name for _, m in models]
    seen: dict[str, str] = {}
    for (f, _), n in zip(models, names, strict=True):
        if n in seen:
            raise InputError(f"model name '{n}' appears twice ({seen[n]} and {f.source})",
                             hint="rename with --names a,b,... (one name per model) or "
                                  "compile the models under distinct names")
        seen[n] = f.source
    specs = [HbmModelSpec(n, m.graph(), dict(m.options), dict(m.perf))
             for (_, m), n in zip(models, names, strict=True)]
    write_hbm(output, specs, marches.pop())


__all__ = ["HbmModelSpec", "hbm_bytes", "pack", "write_hbm"]
