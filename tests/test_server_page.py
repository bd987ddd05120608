"""The live page of the monitoring server (``/``) rendered by headless Chromium against a real
server: it draws the report's views from ``/api/session`` and ``/health``, refreshes by itself,
logs nothing to the console, and the screenshot is not blank. Skipped without Chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from test_debug_exporters import make_session
from test_debug_report import find_chromium
from test_server import FakeRouter

from moe_router.debug.analyzer import MoEAnalyzer
from moe_router.server import serve
from moe_router.server.page import render_page


def render(url: str, tmp_path: Path, budget_ms: int = 3000) -> tuple[str, np.ndarray]:
    """(DOM after ``budget_ms`` of virtual time, screenshot pixels); fails on console output."""
    import matplotlib.image

    chromium = find_chromium()
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,1600",
         f"--virtual-time-budget={budget_ms}", f"--screenshot={shot}", "--dump-dom", url],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    console = [line for line in result.stderr.splitlines()
               if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    return result.stdout, matplotlib.image.imread(shot)[..., :3]


def rounds(dom: str) -> int:
    found = re.search(r'<body[^>]*data-rounds="(\d+)"', dom)
    return int(found.group(1)) if found else 0


def cells(dom: str, table_id: str) -> list[list[str]]:
    table = re.search(rf'<table[^>]*id="{table_id}".*?</table>', dom, re.S)
    assert table, f"no table {table_id}"
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(0), re.S)
            if "<td" in row]


def test_page_template_is_self_contained_and_escaped() -> None:
    page = render_page('<script>alert("x")</script></script>', refresh_s=0.5)
    assert "<title>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;/script&gt;</title>" \
        in page
    assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", page)   # no external URL
    assert '"refresh_ms": 500' in page and "innerHTML" not in page


def test_live_page_draws_the_report_views(tmp_path: Path) -> None:
    session = make_session(tokens=(100, 160))
    analyzer = MoEAnalyzer(session)
    stats = analyzer.routing_stats()["layers"]
    issues = analyzer.detect_issues()
    with serve(FakeRouter(session, status="degraded"), refresh_s=0.5) as server:
        dom, pixels = render(server.url, tmp_path)
    assert rounds(dom) >= 2, "the page did not refresh by itself"
    assert re.search(r'id="status"[^>]*>degraded<', dom)
    # layers table: the analyzer's numbers
    rows = cells(dom, "layers-table")
    assert len(rows) == 2
    for row, s in zip(rows, stats, strict=True):
        assert int(row[5]) == s["calls"] and int(row[6]) == s["tokens"]
        for cell, key in zip(row[7:12], ("mean_experts", "mean_entropy", "mean_top1",
                                         "drop_rate", "max_over_mean"), strict=True):
            assert float(cell) == pytest.approx(s[key], rel=5e-3), (key, cell)
    assert [r[12] for r in rows] == ["0", "1"]                   # layer 1's dead expert
    # heatmap: one cell per (layer, expert), shares as the analyzer's utilisation
    util = analyzer.utilization()
    shares = re.findall(r'class="cell" [^>]*data-layer="(\d)" data-expert="(\d)" '
                        r'data-share="([^"]*)"', dom)
    assert len(shares) == 2 * 4
    for layer, expert, share in shares:
        if int(expert) >= session["layers"][int(layer)]["num_experts"]:
            assert share == ""                                   # no such expert: grey
        else:
            assert float(share) == pytest.approx(util[int(layer), int(expert)], abs=1e-6)
    # k histograms, balance over steps, issues, tokens, serving
    assert dom.count('class="k-svg"') == 2 and dom.count('class="series"') == 2
    assert dom.count('<tr class="issue">') == len(issues) and "dead_expert" in dom
    assert len(re.findall(r'<span class="tok', dom)) == len(session["trace"])
    serving = dict((r[0], r[1]) for r in cells(dom, "serving-table"))
    assert serving["requests"] == "40" and serving["fallbacks"] == "3"
    # not blank: many saturated pixels (heatmap, tokens, badge) of several colours
    saturated = pixels.max(axis=-1) - pixels.min(axis=-1) > 0.2
    assert saturated.sum() > 10_000
    colours = np.unique((pixels[saturated] * 8).astype(int), axis=0)
    assert len(colours) >= 6 and pixels.std() > 0.05


def test_live_page_follows_a_growing_session(tmp_path: Path) -> None:
    """Each read of the source has one step more: the page shows a later read than its first."""

    class Growing:
        kind = "growing"
        reads = 0

        def session(self) -> dict[str, Any]:
            self.reads += 1
            return make_session(steps=self.reads)

        def health(self, session: Any) -> dict[str, Any]:
            return {"status": "ok", "issues": []}

        def router_metrics(self) -> None:
            return None

    source = Growing()
    with serve(source, cache_ttl=0, refresh_s=0.25) as server:
        dom, _ = render(server.url, tmp_path, budget_ms=2500)
        assert httpx.get(server.url + "health", timeout=10).status_code == 200
    shown = re.search(r'id="headline">session [^<]*? (\d+) steps<', dom)
    assert shown, dom[:2000]
    assert rounds(dom) >= 3 and int(shown.group(1)) >= 3   # redrawn from later reads
    assert int(shown.group(1)) <= source.reads
    assert '<table class="grid" id="serving-table"' not in dom and 'id="no-issues"' in dom
