"""The model checker's HTML page: the graph drawn and coloured by verdict, then every problem.

One self-contained page (inline CSS and SVG, no scripts, no external URLs). The drawing is
``hbc.backend.graph_svg`` (shared with the perf report): a box per node, green on the BPU,
orange on the CPU, red when unsupported, grey for quantize/dequantize boundaries; hovering a
box shows its problems. Below it, a table lists each problem with the constraint, the actual and
allowed values and the hint.
"""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .check import CheckReport

FILLS = {"bpu": "#5cb85c", "cpu": "#f0ad4e", "unsupported": "#d9534f", "boundary": "#c8c8c8",
         "input": "#9ec5e8"}
LEGEND = (("BPU", "bpu"), ("CPU fallback", "cpu"), ("unsupported", "unsupported"),
          ("quantize/dequantize", "boundary"), ("model input", "input"))

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; margin-bottom: .2em; }
.summary { font-size: 1.05em; margin: .4em 0 1em; }
.status-bpu { color: #2e7d32; } .status-cpu-fallback { color: #b26a00; }
.status-unsupported { color: #c62828; }
table { border-collapse: collapse; margin: 1em 0; font-size: .92em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; }
td.unit-cpu { background: #fdf0dc; } td.unit-unsupported { background: #f8dcdb; }
.graph-box { overflow: auto; border: 1px solid #ddd; max-height: 80vh; }
code { font-size: .95em; }
"""


def _draw_nodes(report: CheckReport) -> list:
    from hbc.backend.graph_svg import DrawNode

    graph = report.graph
    by_node = {v.node: v for v in report.verdicts}
    by_input = {v.node: v for v in report.inputs}
    out = []
    for value in graph.inputs if graph is not None else ():
        v = by_input.get(value.name)
        fill = FILLS["unsupported"] if v is not None and v.unit == "unsupported" else \
            FILLS["input"]
        out.append(DrawNode(value.name, f"input\n{value.name}", fill, (),
                            _title(value.name, "input", v)))
    nodes = graph.nodes if graph is not None else ()
    for node in nodes:
        v = by_node[node.name]
        key = "boundary" if v.boundary else v.unit
        inputs = tuple(dict.fromkeys(
            x.producer.name if x.producer is not None else x.name
            for x in node.inputs if x is not None and not x.is_const))
        out.append(DrawNode(node.name, f"{node.op}\n{node.name}", FILLS[key], inputs,
                            _title(node.name, node.op, v)))
    return out


def _title(name: str, op: str, v) -> str:
    lines = [f"{op} {name}" + (f" ({v.loc})" if v is not None and v.loc else "")]
    if v is not None:
        lines.append(f"unit: {v.unit}")
        lines += [f"{p.message} - hint: {p.hint}" for p in v.problems]
    return "\n".join(lines)


def check_html(report: CheckReport) -> str:
    """The page for ``report`` (a str of HTML)."""
    from hbc.backend.graph_svg import graph_svg

    legend = [(FILLS[key], text) for text, key in LEGEND]
    svg = graph_svg(_draw_nodes(report), svg_id="check-graph", legend=legend) \
        if report.graph is not None else "<p>(no graph)</p>"
    units, p = report.units(), report.partition
    rows = []
    for v in (*report.inputs, *report.nodes):
        for pr in v.problems:
            rows.append(
                f"<tr><td class=\"unit-{escape(v.unit)}\">{escape(v.unit.upper())}</td>"
                f"<td><code>{escape(v.where())}</code></td><td>{escape(v.op)}</td>"
                f"<td>{escape(pr.constraint)}</td>"
                f"<td>{escape(pr.actual)}</td><td>{escape(pr.allowed)}</td>"
                f"<td>{escape(pr.hint)}</td></tr>")
    problems = (
        "<table><tr><th>unit</th><th>node (source)</th><th>op</th><th>constraint</th>"
        "<th>actual</th><th>allowed</th><th>hint</th></tr>\n" + "\n".join(rows) + "</table>"
        if rows else "<p>No problems: every node runs on the BPU.</p>")
    counts = (f"{units['bpu']} BPU, {units['cpu']} CPU, {units['unsupported']} unsupported "
              f"nodes; {p.count('bpu')} BPU and {p.count('cpu')} CPU subgraphs; "
              f"{p.quantize} quantize and {p.dequantize} dequantize at the CPU fallbacks, "
              f"{p.input_quantize} at the inputs, {p.output_dequantize} at the outputs")
    title = f"model_checker: {report.model} on {report.march}"
    problems_title = f"Problems ({len(rows)})" if rows else "Problems"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>
<style>{_CSS}</style></head>
<body>
<h1>{escape(title)}</h1>
<p class="summary status-{escape(report.status)}">{escape(report.summary())}</p>
<p>{escape(counts)}</p>
<h2>{escape(problems_title)}</h2>
{problems}
<h2>Graph</h2>
<div class="graph-box">
{svg}
</div>
</body></html>
"""
