"""Perf report files (backend/report.py) and the graph drawing (backend/graph_svg.py).

The reports are built from hand-made hbc.perf/1 dicts (a small ResNet-like net with CPU
layers), independent of the estimator."""

from __future__ import annotations

import copy
import json
import re
import time
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from hbc.backend.graph_svg import DrawNode, graph_svg, text_colour
from hbc.backend.report import (
    LAYER_KEYS,
    SUMMARY_KEYS,
    TOP_KEYS,
    nice_ceiling,
    perf_html,
    perf_json,
    unit_fill,
    validate_report,
)
from hbc.errors import InputError


def _layer(name, op, unit, inputs, macs=0, latency=1.0, read=0, write=0, bound=None, loc=""):
    aligned = int(macs * 1.125) if macs else 0
    return {"name": name, "op": op, "unit": unit, "macs": macs, "aligned_macs": aligned,
            "compute_cycles": aligned // 1024, "ddr_read_bytes": read, "ddr_write_bytes": write,
            "latency_us": latency, "bound": bound or ("cpu" if unit == "cpu" else "compute"),
            "inputs": list(inputs), "loc": loc or f"model.onnx:{name}"}


def make_report(blocks: int = 8, *, name: str = "resnet_toy") -> dict:
    """A realistic fake report: quantize (CPU), a stem, residual blocks, a CPU fallback op,
    a classifier and a dequantize (CPU); about 4 layers per block."""
    layers = [_layer("input_quant", "quantize", "cpu", [], latency=38.5, read=150528,
                     write=150528)]
    layers.append(_layer("stem", "conv2d", "bpu", ["input_quant"], macs=118013952,
                         latency=61.25, read=159936, write=802816, bound="ddr"))
    prev = "stem"
    for b in range(blocks):
        c = 64 << min(b // 2, 3)
        macs = 3 * 3 * c * c * 28 * 28
        a = _layer(f"b{b}.conv1", "conv2d", "bpu", [prev], macs=macs, latency=20 + 3.5 * b,
                   read=9 * c * c, write=0)
        m = _layer(f"b{b}.conv2", "conv2d", "bpu", [a["name"]], macs=macs, latency=21 + 3 * b,
                   read=9 * c * c, write=c * 784 if b % 3 == 0 else 0)
        add = _layer(f"b{b}.add", "add", "bpu", [m["name"], prev], latency=2.5 + b / 4,
                     read=c * 784 if b % 3 == 0 else 0, write=c * 784, bound="ddr")
        layers += [a, m, add]
        prev = add["name"]
        if b == blocks // 2:
            layers.append(_layer(f"b{b}.gelu", "gelu", "cpu", [prev], latency=140.0,
                                 read=c * 784, write=c * 784))
            prev = f"b{b}.gelu"
    layers.append(_layer("pool", "global_avg_pool", "bpu", [prev], macs=25088, latency=1.5,
                         bound="overhead"))
    layers.append(_layer("fc", "linear", "bpu", ["pool"], macs=512000, latency=4.25,
                         read=512000, write=1000))
    layers.append(_layer("output_dequant", "dequantize", "cpu", ["fc"], latency=0.75,
                         read=1000, write=4000))
    bpu = sum(x["unit"] == "bpu" for x in layers)
    lat_us = sum(x["latency_us"] for x in layers)
    cpu_us = sum(x["latency_us"] for x in layers if x["unit"] == "cpu")
    summary = {
        "march": "bayes-e", "opt": 3, "macs": sum(x["macs"] for x in layers),
        "latency_ms": lat_us / 1000, "fps": 1e6 / lat_us,
        "ddr_bytes_per_frame": sum(x["ddr_read_bytes"] + x["ddr_write_bytes"] for x in layers),
        "bpu_ops": bpu, "cpu_ops": len(layers) - bpu, "mac_utilization": 0.4375,
        "bpu_ms": (lat_us - cpu_us) / 1000, "cpu_ms": cpu_us / 1000, "cores": 1,
        "clock_mhz": 1000.0, "weight_bytes": 11689512, "peak_tops": 10.0,
    }
    return {"schema": "hbc.perf/1", "model": name, "summary": summary,
            "opt_effects": ["O3: 14 intermediate tensors kept on chip",
                            "O2: conv2d+add+relu fused in 8 places"],
            "assumptions": {"ddr_bytes_per_s": 1.6e10, "macs_per_cycle": {"i8": 5120},
                            "onchip_bytes": 1048576},
            "layers": layers}


@pytest.fixture(scope="module")
def report():
    return make_report()


@pytest.fixture(scope="module")
def html(report):
    return perf_html(report)


def _element_with_id(html: str, tag: str, ident: str) -> str:
    m = re.search(rf'<{tag} id="{ident}".*?</{tag}>', html, re.S)
    assert m, f"no <{tag} id={ident!r}> in the page"
    return m.group(0)


class _Collect(HTMLParser):
    """Attributes of every start tag, in document order."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text_after: dict[int, str] = {}
        self._open: int | None = None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))
        self._open = len(self.tags) - 1

    def handle_data(self, data):
        if self._open is not None and data.strip():
            self.text_after.setdefault(self._open, data.strip())


def _parse(html: str) -> _Collect:
    p = _Collect()
    p.feed(html)
    p.close()
    return p


def _svg(html: str, ident: str) -> ET.Element:
    return ET.fromstring(_element_with_id(html, "svg", ident))


def _classes(el: ET.Element) -> set[str]:
    return set(el.get("class", "").split())


# ---------------------------------------------------------------------------------- JSON

def test_perf_json_is_canonical_and_round_trips(report):
    text = perf_json(report)
    assert text.endswith("}\n") and not text.endswith("\n\n")
    assert json.loads(text) == report
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert perf_json(copy.deepcopy(report)) == text
    assert text.index('"layers"') < text.index('"model"') < text.index('"summary"')


@pytest.mark.parametrize("key", TOP_KEYS)
def test_missing_top_key_is_named(report, key):
    bad = copy.deepcopy(report)
    del bad[key]
    with pytest.raises(InputError, match=rf"perf report: {key}: missing key"):
        perf_json(bad)


@pytest.mark.parametrize("key", SUMMARY_KEYS)
def test_missing_summary_key_is_named(report, key):
    bad = copy.deepcopy(report)
    del bad["summary"][key]
    with pytest.raises(InputError, match=rf"summary\.{key}: missing key"):
        perf_html(bad)


@pytest.mark.parametrize("key", LAYER_KEYS)
def test_missing_layer_key_is_named(report, key):
    bad = copy.deepcopy(report)
    del bad["layers"][5][key]
    with pytest.raises(InputError, match=rf"layers\[5\]\.{key}: missing key"):
        validate_report(bad)


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(schema="hbc.perf/2"), "schema: expected 'hbc.perf/1'"),
    (lambda r: r["summary"].update(fps=float("nan")), "summary.fps: expected a finite number"),
    (lambda r: r["summary"].update(march=3), "summary.march: expected a string"),
    (lambda r: r["summary"].update(opt=True), "summary.opt: expected a finite number"),
    (lambda r: r["layers"][3].update(unit="dsp"), "unit: expected 'bpu' or 'cpu'"),
    (lambda r: r["layers"][3].update(latency_us=-1.0), "latency_us: expected a finite number"),
    (lambda r: r["layers"][3].update(inputs=["nowhere"]), "'nowhere' is not an earlier layer"),
    (lambda r: r["layers"][1].update(inputs=["fc"]), "'fc' is not an earlier layer"),
    (lambda r: r["layers"][4].update(name=r["layers"][3]["name"]), "duplicate layer name"),
    (lambda r: r.update(opt_effects="O3"), "opt_effects: expected a list of strings"),
    (lambda r: r.update(layers={}), "layers: expected a list"),
])
def test_bad_values_are_named(report, mutate, message):
    bad = copy.deepcopy(report)
    mutate(bad)
    with pytest.raises(InputError, match=re.escape(message)):
        validate_report(bad)


def test_validate_names_the_place_and_accepts_extra_keys(report):
    with pytest.raises(InputError, match=r"^model\.hbm model 'x' perf: top level: expected"):
        validate_report([], where="model.hbm model 'x' perf")
    extra = copy.deepcopy(report)
    extra["future"] = {"a": 1}
    extra["summary"]["energy_mj"] = 1.5
    extra["layers"][0]["tile"] = [1, 2]
    validate_report(extra)
    assert 'data-key="energy_mj"' in perf_html(extra)


# ---------------------------------------------------------------------------------- HTML

def test_html_is_deterministic(report, html):
    assert perf_html(copy.deepcopy(report)) == html
    assert html.startswith("<!DOCTYPE html>") and html.endswith("</html>\n")


def test_html_shows_every_summary_value(report, html):
    parsed = _parse(_element_with_id(html, "dl", "summary"))
    shown = {a["data-key"]: (a["data-value"], parsed.text_after.get(i, ""))
             for i, (_, a) in enumerate(parsed.tags) if "data-key" in a}
    for key in SUMMARY_KEYS:
        value, text = shown[key]
        assert json.loads(value) == report["summary"][key], key
        assert text, f"summary {key} has no displayed text"
    assert shown["march"][1] == "bayes-e"
    assert shown["opt"][1] == "O3"
    assert shown["latency_ms"][1] == f"{report['summary']['latency_ms']:.3f} ms"
    assert shown["fps"][1] == f"{report['summary']['fps']:,.1f} FPS"
    assert shown["bpu_ops"][1] == str(report["summary"]["bpu_ops"])
    assert shown["cpu_ops"][1] == "3"
    assert shown["mac_utilization"][1] == "43.8 %"
    assert shown["ddr_bytes_per_frame"][1].endswith("MiB")


def test_html_lists_opt_effects_and_assumptions(report, html):
    effects = _element_with_id(html, "ul", "opt-effects")
    for effect in report["opt_effects"]:
        assert f"<li>{effect}</li>" in effects
    table = _element_with_id(html, "table", "assumptions")
    assert "onchip_bytes" in table and "1048576" in table


def test_html_has_one_table_row_per_layer(report, html):
    rows = [a for t, a in _parse(_element_with_id(html, "table", "layers")).tags
            if t == "tr" and a.get("id", "").startswith("layer-")]
    assert [r["data-name"] for r in rows] == [x["name"] for x in report["layers"]]
    assert [r["id"] for r in rows] == [f"layer-{i}" for i in range(len(rows))]
    assert [r["class"] for r in rows] == [x["unit"] for x in report["layers"]]


def test_latency_chart_is_valid_svg_with_bars(report, html):
    svg = _svg(html, "latency-chart")
    rects = [r for r in svg.iter("rect") if "bar" in _classes(r)]
    layers = report["layers"]
    lat = [r for r in rects if "latency" in _classes(r)]
    assert [r.get("data-layer") for r in lat] == [x["name"] for x in layers]
    assert sum("ddr-read" in _classes(r) for r in rects) == len(layers)
    assert sum("ddr-write" in _classes(r) for r in rects) == len(layers)
    assert {r.get("fill") for r in lat if "cpu" in _classes(r)} == {"#e08a2c"}
    # bar heights follow the values: the slowest layer has the tallest latency bar
    tallest = max(lat, key=lambda r: float(r.get("height")))
    assert tallest.get("data-layer") == max(layers, key=lambda x: x["latency_us"])["name"]
    texts = " ".join(t.text or "" for t in svg.iter("text"))
    assert "latency (us)" in texts and "DDR traffic (" in texts and "layer" in texts


def test_graph_is_valid_svg_coloured_by_unit_and_latency(report, html):
    svg = _svg(html, "graph")
    nodes = [g for g in svg.iter("g") if "node" in _classes(g)]
    layers = report["layers"]
    assert sorted(g.get("data-name") for g in nodes) == sorted(x["name"] for x in layers)
    edges = [p for p in svg.iter("path") if p.get("data-from")]
    assert len(edges) == sum(len(x["inputs"]) for x in layers)
    fill = {g.get("data-name"): g.find("rect").get("fill") for g in nodes}
    slowest = max(x["latency_us"] for x in layers)
    for x in layers:
        assert fill[x["name"]] == unit_fill(x["unit"], x["latency_us"], slowest)
    assert text_colour(unit_fill("bpu", 1.0, 1.0)) == "#fff"
    assert text_colour(unit_fill("cpu", 0.0, 1.0)) == "#000"


def test_unit_fill_darkens_with_latency_and_differs_by_unit():
    def luma(c):
        return sum(int(c[i:i + 2], 16) * w for i, w in ((1, 0.299), (3, 0.587), (5, 0.114)))

    shades = [unit_fill("bpu", t, 10.0) for t in (0.0, 1.0, 4.0, 10.0)]
    assert [luma(c) for c in shades] == sorted((luma(c) for c in shades), reverse=True)
    assert unit_fill("bpu", 5.0, 10.0) != unit_fill("cpu", 5.0, 10.0)
    assert unit_fill("cpu", 0.0, 0.0) == unit_fill("cpu", 0.0, 1.0)  # no division by zero


def test_html_is_self_contained(html):
    low = html.lower()
    assert "http" not in low
    for marker in ("<script", "<link", "@import", "<img", "<iframe", "src="):
        assert marker not in low, marker
    assert re.findall(r"url\(([^)]*)\)", html) and all(
        u.startswith("#") for u in re.findall(r"url\(([^)]*)\)", html))


def test_hostile_names_are_escaped():
    r = make_report(blocks=3, name='<b>"model" & co</b>')
    evil = "<script>alert('x')</script>"
    r["layers"][2]["name"] = evil
    r["layers"][3]["inputs"] = [evil]
    r["layers"][2]["loc"] = '"><img src=x onerror=alert(1)>'
    r["layers"][4]["op"] = "</svg><script>"
    r["opt_effects"].append("<script>alert(2)</script>")
    r["summary"]["march"] = "<i>bayes</i>"
    html = perf_html(r)
    low = html.lower()
    assert "<script" not in low and "<img" not in low and "<i>" not in low
    assert '<b>"model"' not in html and "&lt;b&gt;&#34;model&#34; &amp; co&lt;/b&gt;" in html
    assert "&lt;script&gt;alert(" in html
    chart, graph = _svg(html, "latency-chart"), _svg(html, "graph")
    assert evil in {r.get("data-layer") for r in chart.iter("rect")}
    assert evil in {g.get("data-name") for g in graph.iter("g")}
    assert any(p.get("data-from") == evil for p in graph.iter("path"))
    assert json.loads(perf_json(r))["layers"][2]["name"] == evil


def test_empty_layer_list_renders(report):
    r = copy.deepcopy(report)
    r["layers"] = []
    html = perf_html(r)
    _svg(html, "latency-chart")
    _svg(html, "graph")


def test_nice_ceiling():
    assert [nice_ceiling(v) for v in (0, 0.7, 1, 1.01, 3, 7, 24, 140, 2.6e6)] == \
        [1, 1, 1, 2, 5, 10, 25, 200, 5e6]


# ---------------------------------------------------------------------------------- graph_svg

def _chain(n: int, fill: str = "#dde") -> list[DrawNode]:
    return [DrawNode(f"n{i}", f"op\nn{i}", fill, (f"n{i - 1}",) if i else ("input",))
            for i in range(n)]


def test_graph_svg_lays_out_generations_as_rows():
    nodes = [DrawNode("a", "a", "#fff", ()), DrawNode("b", "b", "#fff", ("a",)),
             DrawNode("c", "c", "#fff", ("a",)), DrawNode("d", "d", "#fff", ("b", "c", "a"))]
    svg = ET.fromstring(graph_svg(list(reversed(nodes))))
    y = {g.get("data-name"): float(g.find("rect").get("y")) for g in svg.iter("g")
         if g.get("data-name")}
    assert y["a"] < y["b"] == y["c"] < y["d"]
    assert len([p for p in svg.iter("path") if p.get("data-from")]) == 5


def test_graph_svg_wraps_wide_generations():
    nodes = [DrawNode("src", "src", "#fff", ())]
    nodes += [DrawNode(f"h{i}", f"h{i}", "#fff", ("src",)) for i in range(10)]
    svg = ET.fromstring(graph_svg(nodes, max_cols=4))
    rows = {float(g.find("rect").get("y")) for g in svg.iter("g") if g.get("data-name")}
    assert len(rows) == 1 + 3  # the source, then 10 heads in rows of 4, 4, 2
    assert float(svg.get("width")) < 4 * 200 + 150


def test_graph_svg_is_deterministic_escaped_and_scales():
    nodes = _chain(300, fill="#123456")
    nodes[7] = DrawNode("n7", 'x<y & "z"', "#123456", ("n6",), title="<title>")
    nodes += [DrawNode(f"skip{i}", "skip", "#fed", (f"n{i}", f"n{i + 5}"))
              for i in range(0, 290, 10)]
    t = time.perf_counter()
    text = graph_svg(nodes, svg_id="g2", legend=[("#123456", "dark <one>")])
    assert time.perf_counter() - t < 2.0
    assert text == graph_svg(list(nodes), svg_id="g2", legend=[("#123456", "dark <one>")])
    svg = ET.fromstring(text)
    assert svg.get("id") == "g2"
    n7 = next(g for g in svg.iter("g") if g.get("data-name") == "n7")
    assert n7.get("id") == "g2-node-7" and n7.find("title").text == "<title>"
    assert n7.find("text").text == 'x<y & "z"' and n7.find("text").get("fill") == "#fff"
    assert "dark <one>" in [t.text for t in svg.iter("text")]
    assert "url(#g2-arrow)" in text


def test_graph_svg_clips_long_labels_and_keeps_the_name_in_the_tooltip():
    name = "backbone.layer4.2.conv3.very_long_suffix"
    svg = ET.fromstring(graph_svg([DrawNode(name, name, "blue", ())]))
    g = next(e for e in svg.iter("g") if e.get("data-name"))
    assert g.find("title").text == name
    label = g.find("text").text
    assert label.endswith("\u2026") and len(label) <= 22
    assert g.find("text").get("fill") == "#000"  # named colours keep black text


def test_graph_svg_rejects_duplicates_and_cycles():
    with pytest.raises(InputError, match="two nodes are named 'a'"):
        graph_svg([DrawNode("a", "a", "#fff", ()), DrawNode("a", "a", "#fff", ())])
    with pytest.raises(InputError, match="cycle"):
        graph_svg([DrawNode("a", "a", "#fff", ("b",)), DrawNode("b", "b", "#fff", ("a",))])
    with pytest.raises(InputError, match="max_cols"):
        graph_svg([], max_cols=0)
    ET.fromstring(graph_svg([]))
