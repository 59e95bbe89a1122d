"""An inline SVG drawing of a DAG, shared by the perf report and the model checker's HTML.

The caller describes each node as a :class:`DrawNode` (name, a one- or two-line label, a fill
colour, the names of the nodes it reads, a tooltip); :func:`graph_svg` returns one ``<svg>``
element to paste into an HTML page. It knows nothing about ops, units or verdicts: colour is the
caller's choice.

Layout: nodes are placed by topological generation (``networkx.topological_generations``), one
generation per row from top to bottom; a generation wider than ``max_cols`` wraps onto several
rows. Within a row, nodes are ordered by the mean column of the nodes they read (the barycenter
heuristic, which keeps chains straight and cuts crossings), ties broken by input order, so the
same input always gives the same string. Edges between adjacent rows are vertical curves; an edge
skipping rows (a residual connection) leaves and enters on the right side of the boxes and bulges
out to the right, so it does not run through the nodes in between. A few hundred nodes give a
tall drawing that the page scrolls; every node keeps its size so labels stay readable.

The SVG has no ``xmlns`` (HTML parsers supply it for inline SVG) and references only its own
arrow marker, so a page that inlines it stays free of external URLs. Names, labels and titles are
XML-escaped; node ``<g>`` elements carry ``id="<svg_id>-node-<index>"`` and ``data-name``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

import networkx as nx

from hbc.errors import InputError

NODE_W = 150
NODE_H = 34
COL_GAP = 18
ROW_GAP = 26
MARGIN = 12
SKIP_BULGE = 28  # extra room on the right for edges that skip rows
LABEL_CHARS = 22  # characters per label line before it is cut with an ellipsis
LEGEND_H = 26


@dataclass(frozen=True)
class DrawNode:
    """One box of the drawing.

    ``label`` may hold two lines separated by ``"\\n"``; ``fill`` is any SVG colour (``#rrggbb``
    fills also pick a readable black or white text colour); ``inputs`` name other nodes (names
    not drawn, such as graph inputs, are ignored); ``title`` is the hover tooltip (the name when
    empty).
    """

    name: str
    label: str
    fill: str
    inputs: tuple[str, ...]
    title: str = ""


def _attr(value: str) -> str:
    return escape(value, quote=True)


def _fmt(x: float) -> str:
    """Coordinates with at most one decimal, so output does not depend on float noise."""
    s = f"{x:.1f}"
    return s[:-2] if s.endswith(".0") else s


def text_colour(fill: str) -> str:
    """Black or white, whichever reads better on ``fill`` (black unless fill is a dark #hex)."""
    m = re.fullmatch(r"#([0-9a-fA-F]{3}|[0-9a-fA-F]{6})", fill.strip())
    if not m:
        return "#000"
    h = m.group(1)
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    r, g, b = (int(h[i:i + 2], 16) / 255.0 for i in (0, 2, 4))
    luma = 0.299 * r + 0.587 * g + 0.114 * b
    return "#000" if luma > 0.55 else "#fff"


def _clip(line: str) -> str:
    return line if len(line) <= LABEL_CHARS else line[:LABEL_CHARS - 1] + "\u2026"


def _build(nodes: Sequence[DrawNode]) -> nx.DiGraph:
    g = nx.DiGraph()
    for i, n in enumerate(nodes):
        if n.name in g:
            raise InputError(f"graph drawing: two nodes are named {n.name!r}",
                             hint="node names must be unique")
        g.add_node(n.name, index=i)
    for n in nodes:
        for src in n.inputs:
            if src in g:
                g.add_edge(src, n.name)
    if not nx.is_directed_acyclic_graph(g):
        cycle = " -> ".join(u for u, _ in nx.find_cycle(g))
        raise InputError(f"graph drawing: the nodes form a cycle ({cycle})",
                         hint="the drawing needs a DAG, listed with each node's producers")
    return g


def _rows(g: nx.DiGraph, max_cols: int) -> list[list[str]]:
    """Generations ordered by barycenter of their producers, wrapped at ``max_cols``."""
    rows: list[list[str]] = []
    col: dict[str, float] = {}
    for gen in nx.topological_generations(g):
        def key(name: str) -> tuple[float, int]:
            preds = [col[p] for p in g.predecessors(name)]
            bary = sum(preds) / len(preds) if preds else -1.0
            return (bary, g.nodes[name]["index"])

        order = sorted(gen, key=key)
        for start in range(0, len(order), max_cols):
            row = order[start:start + max_cols]
            offset = (max_cols - len(row)) / 2.0  # centred rows: columns are comparable
            for j, name in enumerate(row):
                col[name] = offset + j
            rows.append(row)
    return rows


def _legend_step(text: str) -> float:
    return 19 + 7.2 * len(text) + 18  # swatch, text at ~7 px a character, gap


def _legend_width(legend: Sequence[tuple[str, str]]) -> float:
    return 2 * MARGIN + sum(_legend_step(text) for _, text in legend)


def _legend(legend: Sequence[tuple[str, str]]) -> list[str]:
    out = ['<g class="legend">']
    x = float(MARGIN)
    for fill, text in legend:
        out.append(f'<rect x="{_fmt(x)}" y="{MARGIN}" width="14" height="14" rx="3" '
                   f'fill="{_attr(fill)}" stroke="#555" stroke-width="0.6"/>')
        out.append(f'<text x="{_fmt(x + 19)}" y="{MARGIN + 11}" font-size="12">'
                   f'{escape(text)}</text>')
        x += _legend_step(text)
    out.append("</g>")
    return out


def graph_svg(nodes: Sequence[DrawNode], *, svg_id: str = "graph", max_cols: int = 8,
              legend: Sequence[tuple[str, str]] = ()) -> str:
    """Draw ``nodes`` (a DAG, any order) as one inline ``<svg id=svg_id>`` element.

    ``legend`` is a list of ``(fill, text)`` swatches drawn above the graph. Raises InputError
    for duplicate names or a cycle. Deterministic: equal inputs give equal strings.
    """
    if max_cols < 1:
        raise InputError(f"graph drawing: max_cols must be at least 1, got {max_cols}")
    g = _build(nodes)
    rows = _rows(g, max_cols)
    by_name = {n.name: n for n in nodes}

    widest = max((len(r) for r in rows), default=1)
    inner_w = widest * NODE_W + (widest - 1) * COL_GAP
    top = MARGIN + (LEGEND_H if legend else 0)
    width = 2 * MARGIN + inner_w + SKIP_BULGE * 3
    if legend:
        width = max(width, _legend_width(legend))
    height = top + len(rows) * (NODE_H + ROW_GAP) - ROW_GAP + MARGIN
    if not rows:
        height = top + MARGIN

    pos: dict[str, tuple[float, float, int]] = {}  # name -> (x, y, row)
    for r, row in enumerate(rows):
        row_w = len(row) * NODE_W + (len(row) - 1) * COL_GAP
        x0 = MARGIN + (inner_w - row_w) / 2.0
        y = top + r * (NODE_H + ROW_GAP)
        for j, name in enumerate(row):
            pos[name] = (x0 + j * (NODE_W + COL_GAP), float(y), r)

    sid = _attr(svg_id)
    out = [f'<svg id="{sid}" class="graph" width="{_fmt(width)}" height="{_fmt(height)}" '
           f'viewBox="0 0 {_fmt(width)} {_fmt(height)}" role="img" '
           f'font-family="system-ui, sans-serif">',
           f'<defs><marker id="{sid}-arrow" viewBox="0 0 10 10" refX="10" refY="5" '
           f'markerWidth="7" markerHeight="7" orient="auto-start-reverse">'
           f'<path d="M 0 0 L 10 5 L 0 10 z" fill="#777"/></marker></defs>']
    if legend:
        out += _legend(legend)

    out.append('<g class="edges" fill="none" stroke="#888" stroke-width="1.2">')
    for src, dst in sorted(g.edges, key=lambda e: (g.nodes[e[1]]["index"],
                                                   g.nodes[e[0]]["index"])):
        x1, y1, r1 = pos[src]
        x2, y2, r2 = pos[dst]
        if r2 - r1 == 1:
            ax, ay, bx, by = x1 + NODE_W / 2, y1 + NODE_H, x2 + NODE_W / 2, y2
            my = (ay + by) / 2
            d = f"M {_fmt(ax)} {_fmt(ay)} C {_fmt(ax)} {_fmt(my)} {_fmt(bx)} {_fmt(my)} " \
                f"{_fmt(bx)} {_fmt(by)}"
        else:
            ax, ay = x1 + NODE_W, y1 + NODE_H / 2
            bx, by = x2 + NODE_W, y2 + NODE_H / 2
            bulge = max(ax, bx) + SKIP_BULGE * min(3.0, 0.8 + 0.25 * (r2 - r1))
            d = f"M {_fmt(ax)} {_fmt(ay)} C {_fmt(bulge)} {_fmt(ay)} {_fmt(bulge)} {_fmt(by)} " \
                f"{_fmt(bx)} {_fmt(by)}"
        out.append(f'<path d="{d}" data-from="{_attr(src)}" data-to="{_attr(dst)}" '
                   f'marker-end="url(#{sid}-arrow)"/>')
    out.append("</g>")

    out.append('<g class="nodes">')
    for name in sorted(pos, key=lambda n: g.nodes[n]["index"]):
        node = by_name[name]
        x, y, _ = pos[name]
        index = g.nodes[name]["index"]
        fg = text_colour(node.fill)
        lines = [_clip(s) for s in node.label.split("\n")[:2]] or [""]
        out.append(f'<g class="node" id="{sid}-node-{index}" data-name="{_attr(name)}">')
        out.append(f"<title>{escape(node.title or name)}</title>")
        out.append(f'<rect x="{_fmt(x)}" y="{_fmt(y)}" width="{NODE_W}" height="{NODE_H}" '
                   f'rx="6" fill="{_attr(node.fill)}" stroke="#444" stroke-width="0.8"/>')
        cx = x + NODE_W / 2
        baselines = [y + 21.5] if len(lines) == 1 else [y + 14.5, y + 28]
        for k, (line, base) in enumerate(zip(lines, baselines, strict=False)):
            size = 12 if k == 0 else 10.5
            out.append(f'<text x="{_fmt(cx)}" y="{_fmt(base)}" text-anchor="middle" '
                       f'font-size="{size}" fill="{fg}">{escape(line)}</text>')
        out.append("</g>")
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)
