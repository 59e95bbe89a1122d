"""``hbc inspect model.hbm``: a readable summary of an .hbm file.

``describe_hbm(path)`` validates the file (``read_hbm``) and lists the header, the section
table (offset, size, crc32 of each section), and each model with its I/O descriptors, compile
options and perf summary; with ``program=True`` each model's program follows as .hbir text.
"""

from __future__ import annotations

import os
from typing import Any

from hbc.runtime.hbm import HbmModel, read_hbm


def _size(n: int) -> str:
    for unit, step in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= step:
            return f"{n / step:.1f} {unit}"
    return f"{n} B"


def _scale(s: Any) -> str:
    if isinstance(s, list):
        return f"[{len(s)} scales]"
    return f"{s:.6g}" if isinstance(s, float) else str(s)


def _io(d: dict, is_input: bool) -> str:
    text = f"{d['name']}: {d['dtype']}{list(d['shape'])}"
    if d.get("layout"):
        text += f" {d['layout']}"
    if is_input:
        text += f" {d['input_type']}"
    q = d.get("quant")
    if q is not None:
        axis = "" if q.get("axis") is None else f" axis {q['axis']}"
        verb = "quantized to" if is_input else "dequantized from"
        text += f", {verb} {q['dtype']} scale {_scale(q['scale'])}{axis} (%{q['value']})"
    else:
        text += ", no integer boundary"
    return text


def _items(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(d.items()) if not isinstance(v, (dict, list)))


def _model(m: HbmModel) -> list[str]:
    weights = sum(int(a.nbytes) for a in m.constants.values())
    lines = [f"model '{m.name}': {len(m.program.get('nodes', []))} nodes, "
             f"{len(m.constants)} constants ({_size(weights)})"]
    lines += [f"  input  {_io(d, True)}" for d in m.inputs]
    lines += [f"  output {_io(d, False)}" for d in m.outputs]
    if m.options:
        lines.append(f"  options: {_items(m.options)}")
    summary = m.perf.get("summary", m.perf)
    if isinstance(summary, dict) and summary:
        lines.append(f"  perf: {_items(summary)}")
    return lines


def describe_hbm(path: str | os.PathLike, program: bool = False) -> str:
    """The summary of an .hbm file (validated first); ``program``: add each model's .hbir."""
    f = read_hbm(path)
    size = max((s.offset + s.size for s in f.sections), default=0)
    lines = [f"{f.source}: hbm format {f.version[0]}.{f.version[1]}, march {f.march}, "
             f"toolchain hbc {f.toolchain}, flags 0x{f.flags:x}, {len(f.models)} model(s)",
             "sections:",
             f"  {'name':<16} {'offset':>12} {'size':>12}  crc32"]
    lines += [f"  {s.name:<16} {s.offset:>12} {s.size:>12}  {s.crc32:08x}" for s in f.sections]
    lines.append(f"  ({_size(size)} in all)")
    for m in f.models:
        lines += _model(m)
    text = "\n".join(lines) + "\n"
    if program:
        from hbc.ir.text import to_text

        for m in f.models:
            text += f"\n# model '{m.name}'\n" + to_text(m.graph())
    return text


__all__ = ["describe_hbm"]
