"""The performance report files: ``model.perf.json`` and ``model.perf.html``.

Both render the estimator's report dict (schema ``hbc.perf/1``, built by
``hbc.backend.perf.estimate``; documented in docs/perf-report.md). :func:`validate_report`
checks the documented keys and types and raises InputError naming the missing or bad field, so a
damaged report read back from an ``.hbm`` fails with a message instead of a template error.

- :func:`perf_json`: the dict as canonical JSON (sorted keys, two-space indent, newline at end).
- :func:`perf_html`: one self-contained page from ``templates/perf.html.j2`` (jinja2, autoescaped):
  the summary, what the opt level did, a per-layer SVG bar chart of latency and DDR traffic, the
  graph drawn by :mod:`hbc.backend.graph_svg` with each node coloured by unit (BPU blue, CPU
  orange) and darker the slower it is, the per-layer table and the march assumptions. No
  scripts, no external CSS, fonts or URLs: the page works offline. Equal reports give equal
  bytes.

Stable hooks for tests and tools: ``id="summary"`` with one ``data-key``/``data-value`` element
per summary field (``data-value`` is the JSON of the raw value), ``id="opt-effects"``,
``id="latency-chart"`` (bars are ``rect.bar`` with ``data-layer``), ``id="graph"``,
``id="layers"`` (rows ``id="layer-<i>"`` with ``data-name``), ``id="assumptions"``.
"""

from __future__ import annotations

import colorsys
import functools
import json
import math
from html import escape
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from hbc.backend.graph_svg import DrawNode, graph_svg
from hbc.errors import InputError

SCHEMA = "hbc.perf/1"
TOP_KEYS = ("schema", "model", "summary", "opt_effects", "assumptions", "layers")
#: summary fields in display order, with their labels
SUMMARY_FIELDS = (
    ("march", "march"), ("opt", "opt level"), ("macs", "MACs"),
    ("latency_ms", "latency (1 frame, 1 core)"), ("fps", "throughput (all cores)"),
    ("ddr_bytes_per_frame", "DDR traffic per frame"), ("bpu_ops", "ops on BPU"),
    ("cpu_ops", "ops on CPU"), ("mac_utilization", "MAC utilisation"),
    ("bpu_ms", "BPU time"), ("cpu_ms", "CPU time"), ("cores", "cores"),
    ("clock_mhz", "clock"), ("weight_bytes", "weights"), ("peak_tops", "peak int8"),
)
SUMMARY_KEYS = tuple(k for k, _ in SUMMARY_FIELDS)
LAYER_KEYS = ("name", "op", "unit", "macs", "aligned_macs", "compute_cycles", "ddr_read_bytes",
              "ddr_write_bytes", "latency_us", "bound", "inputs", "loc")
_LAYER_NUMBERS = ("macs", "aligned_macs", "compute_cycles", "ddr_read_bytes", "ddr_write_bytes",
                  "latency_us")
UNITS = ("bpu", "cpu")
#: hue (HLS) of each unit in the graph drawing and the latency bars
UNIT_HUE = {"bpu": 0.59, "cpu": 0.08}

TEMPLATES = Path(__file__).resolve().parent / "templates"


# ---------------------------------------------------------------------------------- validation

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_report(report: Any, *, where: str = "perf report") -> None:
    """Check ``report`` against schema hbc.perf/1: every documented key present, numbers finite
    (layer figures non-negative), units ``bpu``/``cpu``, unique layer names and ``inputs``
    naming earlier layers. Extra keys are allowed. Raises InputError naming the field."""
    def bad(path: str, what: str) -> InputError:
        return InputError(f"{where}: {path}: {what}",
                          hint="regenerate the report with this hbc (schema hbc.perf/1, "
                               "docs/perf-report.md)")

    if not isinstance(report, dict):
        raise bad("top level", f"expected an object, got {type(report).__name__}")
    for key in TOP_KEYS:
        if key not in report:
            raise bad(key, "missing key")
    if report["schema"] != SCHEMA:
        raise bad("schema", f"expected {SCHEMA!r}, got {report['schema']!r}")
    if not isinstance(report["model"], str):
        raise bad("model", "expected a string")
    summary = report["summary"]
    if not isinstance(summary, dict):
        raise bad("summary", "expected an object")
    for key in SUMMARY_KEYS:
        if key not in summary:
            raise bad(f"summary.{key}", "missing key")
        value = summary[key]
        if key == "march":
            if not isinstance(value, str):
                raise bad("summary.march", f"expected a string, got {value!r}")
        elif not _is_number(value):
            raise bad(f"summary.{key}", f"expected a finite number, got {value!r}")
    effects = report["opt_effects"]
    if not isinstance(effects, list) or not all(isinstance(e, str) for e in effects):
        raise bad("opt_effects", "expected a list of strings")
    if not isinstance(report["assumptions"], dict):
        raise bad("assumptions", "expected an object")
    layers = report["layers"]
    if not isinstance(layers, list):
        raise bad("layers", "expected a list")
    seen: set[str] = set()
    for i, layer in enumerate(layers):
        if not isinstance(layer, dict):
            raise bad(f"layers[{i}]", "expected an object")
        for key in LAYER_KEYS:
            if key not in layer:
                raise bad(f"layers[{i}].{key}", "missing key")
        name = layer["name"]
        if not isinstance(name, str) or not isinstance(layer["op"], str):
            raise bad(f"layers[{i}]", "name and op must be strings")
        here = f"layers[{i}] ({name!r})"
        if name in seen:
            raise bad(here, "duplicate layer name")
        if layer["unit"] not in UNITS:
            raise bad(f"{here}.unit", f"expected 'bpu' or 'cpu', got {layer['unit']!r}")
        for key in _LAYER_NUMBERS:
            v = layer[key]
            if not _is_number(v) or v < 0:
                raise bad(f"{here}.{key}", f"expected a finite number >= 0, got {v!r}")
        if not isinstance(layer["bound"], str):
            raise bad(f"{here}.bound", "expected a string")
        if layer["loc"] is not None and not isinstance(layer["loc"], str):
            raise bad(f"{here}.loc", "expected a string or null")
        inputs = layer["inputs"]
        if not isinstance(inputs, list):
            raise bad(f"{here}.inputs", "expected a list of layer names")
        for src in inputs:
            if src not in seen:
                raise bad(f"{here}.inputs", f"{src!r} is not an earlier layer (layers are in "
                          "topological order and graph inputs are omitted)")
        seen.add(name)


# ---------------------------------------------------------------------------------- JSON

def perf_json(report: dict) -> str:
    """The report as canonical JSON: sorted keys, indent 2, a trailing newline."""
    validate_report(report)
    return json.dumps(report, sort_keys=True, indent=2, allow_nan=False) + "\n"


# ---------------------------------------------------------------------------------- formatting

def fmt_count(n: float) -> str:
    """1234567 -> '1.23 M'; small numbers as they are."""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g} {suffix}"
    return f"{n:g}" if isinstance(n, float) else str(n)


def fmt_bytes(n: float) -> str:
    """Bytes in binary units: 1536 -> '1.50 KiB'."""
    for div, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:g} B"


def _summary_display(key: str, v: Any) -> str:
    if key == "opt":
        return f"O{v}"
    if key == "macs":
        return f"{fmt_count(v)}MAC" if v >= 1000 else f"{v} MAC"
    if key in ("latency_ms", "bpu_ms", "cpu_ms"):
        return f"{v:.3f} ms"
    if key == "fps":
        return f"{v:,.1f} FPS"
    if key in ("ddr_bytes_per_frame", "weight_bytes"):
        return fmt_bytes(v)
    if key == "mac_utilization":
        return f"{100.0 * v:.1f} %"
    if key == "clock_mhz":
        return f"{v:g} MHz"
    if key == "peak_tops":
        return f"{v:g} TOPS"
    return str(v)


def unit_fill(unit: str, latency: float, slowest: float) -> str:
    """The unit's hue, darker the larger ``latency`` is against ``slowest`` (sqrt scale, so
    short layers stay distinguishable)."""
    t = math.sqrt(latency / slowest) if slowest > 0 else 0.0
    r, g, b = colorsys.hls_to_rgb(UNIT_HUE[unit], 0.90 - 0.52 * t, 0.62)
    return "#{:02x}{:02x}{:02x}".format(*(round(c * 255) for c in (r, g, b)))


def _graph(layers: list[dict]) -> str:
    slowest = max((float(x["latency_us"]) for x in layers), default=0.0)
    nodes = []
    for x in layers:
        title = (f"{x['name']}\n{x['op']} on {x['unit'].upper()}\n"
                 f"latency {x['latency_us']:.2f} us ({x['bound']}-bound)\n"
                 f"MACs {fmt_count(x['macs'])}, DDR read {fmt_bytes(x['ddr_read_bytes'])}, "
                 f"write {fmt_bytes(x['ddr_write_bytes'])}")
        if x["loc"]:
            title += f"\n{x['loc']}"
        nodes.append(DrawNode(name=x["name"], label=f"{x['op']}\n{x['name']}",
                              fill=unit_fill(x["unit"], float(x["latency_us"]), slowest),
                              inputs=tuple(x["inputs"]), title=title))
    legend = [(unit_fill("bpu", 0.0, 1.0), "BPU, fast"), (unit_fill("bpu", 1.0, 1.0), "BPU, slow"),
              (unit_fill("cpu", 0.0, 1.0), "CPU, fast"), (unit_fill("cpu", 1.0, 1.0), "CPU, slow")]
    return graph_svg(nodes, svg_id="graph", legend=legend)


def _layer_rows(layers: list[dict]) -> list[dict]:
    rows = []
    for i, x in enumerate(layers):
        macs, aligned = x["macs"], x["aligned_macs"]
        pad = f"+{100.0 * (aligned / macs - 1.0):.0f} %" if macs and aligned > macs else ""
        rows.append({
            "index": i, "name": x["name"], "op": x["op"], "unit": x["unit"],
            "macs": fmt_count(macs), "aligned_macs": fmt_count(aligned), "pad": pad,
            "compute_cycles": fmt_count(x["compute_cycles"]),
            "ddr_read": fmt_bytes(x["ddr_read_bytes"]),
            "ddr_write": fmt_bytes(x["ddr_write_bytes"]),
            "latency_us": f"{x['latency_us']:.2f}", "bound": x["bound"],
            "inputs": ", ".join(x["inputs"]), "loc": x["loc"] or "",
        })
    return rows


# ---------------------------------------------------------------------------------- bar chart

BAR_FILL = {"bpu": "#3b78c2", "cpu": "#e08a2c", "read": "#3f8f5c", "write": "#9fd3aa"}
_CHART_LEFT, _CHART_RIGHT, _PANEL_H, _PANEL_GAP = 78, 16, 170, 58


def nice_ceiling(v: float) -> float:
    """The smallest 1, 2, 2.5 or 5 x 10^k that is >= v (1 for v <= 0): a round axis end."""
    if v <= 0:
        return 1.0
    base = 10.0 ** math.floor(math.log10(v))
    for f in (1.0, 2.0, 2.5, 5.0, 10.0):
        if f * base >= v * (1 - 1e-12):
            return f * base
    return 10.0 * base


def _num(x: float) -> str:
    return f"{x:.1f}".removesuffix(".0")


def _panel(top: float, plot_w: float, vmax: float, scale: float, title: str,
           unit: str) -> list[str]:
    """Axes, gridlines and labels of one panel; values run 0..vmax over _PANEL_H pixels."""
    left, bottom = _CHART_LEFT, top + _PANEL_H
    out = [f'<text x="{left}" y="{_num(top - 10)}" font-size="13" font-weight="600">'
           f"{title}</text>"]
    for k in range(5):
        v = vmax * k / 4
        y = bottom - _PANEL_H * k / 4
        stroke = 'stroke="#555" stroke-width="1"' if k == 0 else \
            'stroke="#ddd" stroke-width="0.6"'
        out.append(f'<line x1="{left}" y1="{_num(y)}" x2="{_num(left + plot_w)}" y2="{_num(y)}" '
                   f"{stroke}/>")
        out.append(f'<text x="{left - 6}" y="{_num(y + 4)}" font-size="11" text-anchor="end">'
                   f"{v / scale:g}</text>")
    mid = top + _PANEL_H / 2
    out.append(f'<text x="14" y="{_num(mid)}" font-size="11" text-anchor="middle" '
               f'transform="rotate(-90 14 {_num(mid)})">{unit}</text>')
    out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{_num(bottom)}" stroke="#555"/>')
    return out


def layer_chart(layers: list[dict]) -> str:
    """Two bar panels sharing the x axis (layers in topological order): latency in us coloured
    by unit, and DDR bytes read + written stacked. Returns ``<svg id="latency-chart">``."""
    n = max(len(layers), 1)
    step = min(24.0, max(5.0, 900.0 / n))
    plot_w = n * step
    width = _CHART_LEFT + plot_w + _CHART_RIGHT
    top1 = 52.0
    top2 = top1 + _PANEL_H + _PANEL_GAP
    height = top2 + _PANEL_H + 44
    lat_max = nice_ceiling(max((x["latency_us"] for x in layers), default=0.0))
    ddr_peak = max((x["ddr_read_bytes"] + x["ddr_write_bytes"] for x in layers), default=0.0)
    ddr_scale, ddr_unit = (1 << 20, "MiB") if ddr_peak >= (1 << 20) else (1 << 10, "KiB")
    ddr_max = nice_ceiling(ddr_peak / ddr_scale) * ddr_scale  # round in the unit shown
    out = [f'<svg id="latency-chart" class="chart" width="{_num(width)}" height="{_num(height)}" '
           f'viewBox="0 0 {_num(width)} {_num(height)}" role="img" '
           f'font-family="system-ui, sans-serif">']
    legend = [(BAR_FILL["bpu"], "latency, BPU"), (BAR_FILL["cpu"], "latency, CPU"),
              (BAR_FILL["read"], "DDR read"), (BAR_FILL["write"], "DDR write")]
    x = float(_CHART_LEFT)
    for fill, text in legend:
        out.append(f'<rect x="{_num(x)}" y="6" width="12" height="12" fill="{fill}"/>'
                   f'<text x="{_num(x + 16)}" y="16" font-size="12">{text}</text>')
        x += 16 + 7 * len(text) + 16
    out += _panel(top1, plot_w, lat_max, 1.0, "latency per layer", "latency (us)")
    out += _panel(top2, plot_w, ddr_max, ddr_scale, "DDR traffic per layer",
                  f"DDR traffic ({ddr_unit})")
    bw = max(1.0, step * 0.8)
    b1, b2 = top1 + _PANEL_H, top2 + _PANEL_H
    for i, layer in enumerate(layers):
        bx = _CHART_LEFT + i * step + (step - bw) / 2
        name = escape(layer["name"], quote=True)
        h = _PANEL_H * layer["latency_us"] / lat_max
        out.append(f'<rect class="bar latency {layer["unit"]}" data-layer="{name}" '
                   f'x="{_num(bx)}" y="{_num(b1 - h)}" width="{_num(bw)}" height="{_num(h)}" '
                   f'fill="{BAR_FILL[layer["unit"]]}"><title>{name}: '
                   f'{layer["latency_us"]:.2f} us ({escape(layer["bound"])}-bound)</title></rect>')
        hr = _PANEL_H * layer["ddr_read_bytes"] / ddr_max
        hw = _PANEL_H * layer["ddr_write_bytes"] / ddr_max
        tip = (f"{name}: read {fmt_bytes(layer['ddr_read_bytes'])}, "
               f"write {fmt_bytes(layer['ddr_write_bytes'])}")
        out.append(f'<rect class="bar ddr-read" data-layer="{name}" x="{_num(bx)}" '
                   f'y="{_num(b2 - hr)}" width="{_num(bw)}" height="{_num(hr)}" '
                   f'fill="{BAR_FILL["read"]}"><title>{tip}</title></rect>')
        out.append(f'<rect class="bar ddr-write" data-layer="{name}" x="{_num(bx)}" '
                   f'y="{_num(b2 - hr - hw)}" width="{_num(bw)}" height="{_num(hw)}" '
                   f'fill="{BAR_FILL["write"]}"><title>{tip}</title></rect>')
    every = max(1, math.ceil(36 / step))  # an x label at least every 36 px
    for i in range(0, len(layers), every):
        cx = _CHART_LEFT + (i + 0.5) * step
        out.append(f'<text x="{_num(cx)}" y="{_num(b2 + 15)}" font-size="10" '
                   f'text-anchor="middle">{i}</text>')
    out.append(f'<text x="{_num(_CHART_LEFT + plot_w / 2)}" y="{_num(height - 8)}" '
               f'font-size="11" text-anchor="middle">layer (topological order, see the table)'
               f"</text>")
    if not layers:
        out.append(f'<text x="{_CHART_LEFT + 10}" y="{_num(top1 + 30)}" font-size="12">'
                   f"no layers</text>")
    out.append("</svg>")
    return "\n".join(out)


# ---------------------------------------------------------------------------------- HTML

@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATES)), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True,
                              lstrip_blocks=True, keep_trailing_newline=True)


def perf_html(report: dict) -> str:
    """The report as one self-contained HTML page (see the module docstring for its ids)."""
    validate_report(report)
    summary = report["summary"]
    known = dict(SUMMARY_FIELDS)
    extra = sorted(k for k in summary if k not in known)
    items = [{"key": k, "label": known.get(k, k.replace("_", " ")),
              "value": json.dumps(summary[k], sort_keys=True),
              "display": _summary_display(k, summary[k]) if k in known else
              json.dumps(summary[k], sort_keys=True)}
             for k in (*SUMMARY_KEYS, *extra)]
    assumptions = [(k, json.dumps(v, sort_keys=True)) for k, v in
                   sorted(report["assumptions"].items())]
    layers = report["layers"]
    page = _environment().get_template("perf.html.j2").render(
        schema=report["schema"], model=report["model"], summary=summary, items=items,
        effects=report["opt_effects"], assumptions=assumptions, rows=_layer_rows(layers),
        chart=Markup(layer_chart(layers)), graph=Markup(_graph(layers)),
    )
    return page
