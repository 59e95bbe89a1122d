"""The perf report HTML in a real browser: headless Chromium renders it to a screenshot and dumps
its DOM.

.ci/run installs Debian's ``chromium`` before ``make test``. The test skips (with the reason)
only when no browser binary is found; set ``HBC_BROWSER`` to use a specific one. A browser that
is found but fails or hangs is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hbc.backend.report import BAR_FILL, SUMMARY_KEYS, perf_html
from tests.test_report import _Collect, make_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
TIMEOUT_S = 60
WINDOW = (1280, 2000)


def find_browser() -> str | None:
    """$HBC_BROWSER, else the first of BROWSERS on PATH."""
    forced = os.environ.get("HBC_BROWSER")
    if forced:
        return shutil.which(forced) or forced
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _run(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        pytest.fail(f"browser {browser!r} (from $HBC_BROWSER) cannot be run: not found")
    except subprocess.TimeoutExpired:
        pytest.fail(f"{browser} did not finish within {TIMEOUT_S} s: {' '.join(cmd)}")
    if proc.returncode != 0:
        pytest.fail(f"{browser} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    browser = find_browser()
    if browser is None:
        pytest.skip("no headless browser found (looked for $HBC_BROWSER and "
                    f"{', '.join(BROWSERS)}); .ci/run installs Debian's chromium: "
                    "apt-get install -y chromium")
    tmp = tmp_path_factory.mktemp("browser")
    report = make_report(blocks=12)
    page = tmp / "model.perf.html"
    page.write_text(perf_html(report), encoding="utf-8")
    shot = tmp / "model.perf.png"
    url = page.resolve().as_uri()
    _run(browser, tmp / "profile-shot", f"--screenshot={shot}",
         f"--window-size={WINDOW[0]},{WINDOW[1]}", url)
    dom = _run(browser, tmp / "profile-dom", "--dump-dom", url).stdout
    return report, shot, dom


def test_browser_dom_has_summary_and_chart(rendered):
    report, _, dom = rendered
    parsed = _Collect()
    parsed.feed(dom)
    tags = parsed.tags
    assert any(t == "title" for t, _ in tags), "the page did not load: no <title> in the DOM"
    values = {a["data-key"]: a["data-value"] for _, a in tags if "data-key" in a}
    for key in SUMMARY_KEYS:
        assert key in values, f"summary {key} missing from the rendered DOM"
    assert float(values["latency_ms"]) == report["summary"]["latency_ms"]
    assert float(values["fps"]) == report["summary"]["fps"]
    # the chart svg is in the DOM with one latency bar and two DDR bars per layer
    start = next(i for i, (t, a) in enumerate(tags) if t == "svg" and a.get("id") ==
                 "latency-chart")
    end = next((i for i in range(start + 1, len(tags)) if tags[i][0] == "svg"), len(tags))
    bars = [a for t, a in tags[start:end] if t == "rect" and "bar" in a.get("class", "").split()]
    assert len(bars) == 3 * len(report["layers"])
    assert any(t == "svg" and a.get("id") == "graph" for t, a in tags)
    rows = [a for t, a in tags if t == "tr" and a.get("id", "").startswith("layer-")]
    assert len(rows) == len(report["layers"])


def test_browser_screenshot_is_a_drawn_page(rendered):
    from PIL import Image

    _, shot, _ = rendered
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(shot) as img:
        assert img.size == WINDOW
        rgb = img.convert("RGB")
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 16, "the screenshot is (nearly) blank"
    counts = {c: n for n, c in colours}
    # the chart's bars were painted: solid runs of the BPU and CPU latency colours
    for unit in ("bpu", "cpu"):
        h = BAR_FILL[unit].lstrip("#")
        rgb_fill = tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))
        assert counts.get(rgb_fill, 0) > 200, f"no {unit} latency bars visible in {shot}"
