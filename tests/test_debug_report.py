"""The HTML report: its sections and digest, rendering in headless Chromium, and the ``report``
subcommand of the CLI (hand-made sessions from ``test_debug_exporters.make_session``)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_debug_exporters import DIGEST_ID, LAYERS, combined, make_session

from moe_router import cli
from moe_router.debug.analyzer import MoEAnalyzer
from moe_router.debug.report import render_report, write_report
from moe_router.debug.session import empty_counts

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("utilisation", "layers", "balance", "k-hist", "issues", "tokens")


def images(page: str) -> dict[str, bytes]:
    """The embedded PNGs by ``<img>`` id."""
    found = re.findall(r'<img id="([^"]+)"[^>]*src="data:image/png;base64,([^"]+)"', page)
    return {ident: base64.b64decode(data) for ident, data in found}


def test_report_has_every_section_and_the_digest() -> None:
    session = make_session()
    page = render_report(session)
    for section in SECTIONS:
        assert f"<section id='{section}'>" in page
    assert page.index("id='utilisation'") < page.index("id='layers'")   # heatmap comes first
    pngs = images(page)
    assert set(pngs) == {"heatmap", "balance-plot", "k-plot"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000 for png in pngs.values())
    # the reproducibility digest, stamped visibly
    assert f"digest {DIGEST_ID}</h1>" in page
    for value in ("c" * 64, "a" * 64, "moe_router 0.1.0"):
        assert value in page
    # self-contained, no script, every session text escaped
    assert not re.search(r"(?:src|href)=\"?https?:", page) and "<script" not in page.lower()
    assert "run &lt;1&gt; &amp; &quot;quotes&quot;" in page and "run <1>" not in page
    assert "model.layers.0.mlp&lt;&amp;&gt;" in page and "mlp<&>" not in page


def test_token_view_colours_tokens_by_their_top1_expert() -> None:
    session = make_session()
    page = render_report(session)
    tokens = page[page.index("<section id='tokens'>"):]
    boxes = re.findall(r'<span class="tok( none)?"(?: data-expert="(\d+)")?[^>]*title="([^"]*)"'
                       r'>([^<]*)</span>', tokens)
    by_layer = sorted(session["trace"], key=lambda r: r["layer"])   # grouped by layer, then call
    for row, (none, expert, _, label) in zip(by_layer, boxes, strict=True):
        if row["experts"]:
            top1 = row["experts"][max(range(len(row["weights"])), key=row["weights"].__getitem__)]
            assert not none and int(expert) == top1
        else:
            assert none and not expert
        assert label == (str(row["token_id"]) if row["token_id"] is not None
                         else f"#{row['position']}")
    assert "call 2 \u00b7 eval" in tokens


def test_issues_come_from_the_analyzer_and_are_escaped(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_issues(self: MoEAnalyzer) -> list[dict[str, Any]]:
        assert self.session is not None and self.session["digest"]["id"] == DIGEST_ID
        return [{"kind": "imbalance", "layer": 1, "severity": "error",
                 "message": "<b>hot</b> expert", "evidence": {"max_over_mean": 3.5}}]

    monkeypatch.setattr(MoEAnalyzer, "detect_issues", fake_issues)
    page = render_report(make_session())
    assert "<tr class='issue'>" in page and "&lt;b&gt;hot&lt;/b&gt; expert" in page
    assert "sev-error" in page and "max_over_mean" in page

    monkeypatch.setattr(MoEAnalyzer, "detect_issues", lambda self: 1 / 0)
    assert "Issue detection failed: ZeroDivisionError" in render_report(make_session())


def test_real_analyzer_issues_are_listed() -> None:
    session = make_session()
    page = render_report(session)
    issues = MoEAnalyzer(session).detect_issues()
    assert page.count("<tr class='issue'>") == len(issues)
    if not issues:
        assert "id='no-issues'" in page
    big = make_session(tokens=(100, 160))   # large enough to judge: layer 1's expert 2 is dead
    page = render_report(big)
    issues = MoEAnalyzer(big).detect_issues()
    assert ("dead_expert", 1) in [(i["kind"], i["layer"]) for i in issues]
    assert page.count("<tr class='issue'>") == len(issues) and "dead_expert" in page


def layer_rows(page: str) -> list[list[str]]:
    """The cells of the layers table, one list per layer."""
    table = page[page.index("<section id='layers'>"):page.index("<section id='balance'>")]
    rows = re.findall(r"<tr>(<td.*?)</tr>", table)
    return [re.findall(r"<td[^>]*>([^<]*)</td>", r) for r in rows]


@pytest.mark.parametrize("tokens", [(6, 12), (100, 160)])
def test_layers_table_shows_the_analyzer_numbers(tokens: tuple[int, int]) -> None:
    """The table's numbers, computed here by hand from the totals (``-``: undefined)."""
    session = make_session(tokens=tokens)
    rows = layer_rows(render_report(session))
    assert len(rows) == 2
    for i, cells in enumerate(rows):
        c = combined(session, i)
        slots, E = sum(c["expert_tokens"]), len(c["expert_tokens"])
        want = [c["calls"], c["tokens"],
                sum(k * n for k, n in enumerate(c["k_hist"])) / sum(c["k_hist"]),
                c["entropy_sum"] / c["tokens"], c["top1_sum"] / c["tokens"],
                c["dropped"] / (c["dropped"] + slots), max(c["expert_tokens"]) * E / slots]
        assert cells[5:12] == [str(want[0]), str(want[1])] + [f"{v:.3g}" for v in want[2:]]
        dead = sum(n / slots < 0.05 / E for n in c["expert_tokens"])
        assert cells[12] == ("-" if slots / E < 20 else str(dead))
    if tokens == (100, 160):
        assert [r[12] for r in rows] == ["0", "1"]


def test_report_of_a_layer_without_traffic() -> None:
    session = make_session()
    for mode in ("train", "eval"):
        session["totals"][mode][1] = empty_counts(*LAYERS[1])
    session["steps"] = []
    page = render_report(session)
    assert layer_rows(page)[1][5:] == ["0", "0", "-", "-", "-", "-", "-", "-"]
    assert set(images(page)) == {"heatmap", "balance-plot", "k-plot"}


def test_report_without_steps_or_trace_and_from_events() -> None:
    session = {**make_session(), "steps": [], "trace": []}
    page = render_report(session)
    assert "id='no-steps'" in page
    assert "No trace recorded" in page and set(images(page)) == {"heatmap", "balance-plot",
                                                                 "k-plot"}
    events = [{"layer": 0, "experts": [1, 0], "weights": [0.7, 0.3], "token_id": 42,
               "position": 0, "mode": "eval"},
              {"layer": 0, "experts": [2], "weights": [1.0], "token_id": 43, "position": 1,
               "mode": "eval"}]
    from moe_router.debug.events import session_from_events

    page = render_report(session_from_events(events))
    assert 'data-expert="1"' in page and 'data-expert="2"' in page and ">42</span>" in page
    assert "manual events" in page


# ----- headless Chromium ---------------------------------------------------------------------
def find_chromium() -> str:
    """The Chromium binary ($MOE_CHROMIUM, chromium, chromium-browser, google-chrome); with
    MOE_INSTALL_CHROMIUM=1 as root, installs the Debian package first; else skips."""
    names = (os.environ.get("MOE_CHROMIUM", ""), "chromium", "chromium-browser",
             "google-chrome")
    found = next((p for p in (shutil.which(n) for n in names if n) if p), None)
    if found is None and os.environ.get("MOE_INSTALL_CHROMIUM") == "1" \
            and hasattr(os, "geteuid") and os.geteuid() == 0:
        subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True,
                       timeout=600, check=False)
        found = shutil.which("chromium")
    if found is None:
        pytest.skip("Chromium not found (install the 'chromium' package, or set MOE_CHROMIUM; "
                    "MOE_INSTALL_CHROMIUM=1 installs it when running as root)")
    return found


def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    import matplotlib.image
    import numpy as np

    chromium = find_chromium()
    page = write_report(make_session(), tmp_path / "report.html")
    shot = tmp_path / "shot.png"
    result = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--window-size=1200,1600",
         f"--screenshot={shot}", "--dump-dom", Path(page).resolve().as_uri()],
        capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    # the page parsed (the DOM dump has the heatmap) and logged nothing to the console
    assert '<img id="heatmap"' in result.stdout and "</html>" in result.stdout
    console = [line for line in result.stderr.splitlines()
               if ":CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # the heatmap, the first coloured thing on the page, is drawn: a large block of
    # saturated (viridis) pixels of several colours near the top
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1600, 1200)
    top = pixels[:700]
    saturated = top.max(axis=-1) - top.min(axis=-1) > 0.2
    rows, cols = np.nonzero(saturated)
    assert rows.size > 10_000, "no heatmap colours near the top of the page"
    box = top[rows.min(): rows.max() + 1, cols.min(): cols.max() + 1]
    assert box.shape[0] > 100 and box.shape[1] > 200, box.shape
    assert box.std() > 0.1
    assert len(np.unique((box[saturated[rows.min(): rows.max() + 1,
                                         cols.min(): cols.max() + 1]] * 8).astype(int),
                         axis=0)) >= 4


# ----- CLI -----------------------------------------------------------------------------------
def test_cli_report_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    path.write_text(json.dumps(make_session()))
    out = tmp_path / "out" / "report.html"
    out.parent.mkdir()
    result = subprocess.run([sys.executable, "-m", "moe_router", "report", str(path), "-o",
                             str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert str(out) in result.stdout
    page = out.read_text(encoding="utf-8")
    assert f"digest {DIGEST_ID}" in page and '<img id="heatmap"' in page


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "is not a JSON file"),
    (json.dumps({"format": "other/1"}), "is not supported"),
    (json.dumps([1, 2]), "expected a session record"),
    (json.dumps({**make_session(), "totals": {"train": [{"calls": 1}] * 2}}), "LAYER_COUNTS"),
])
def test_cli_report_rejects_bad_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      content: str | None, message: str) -> None:
    path = tmp_path / "session.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["report", str(path), "-o", str(tmp_path / "r.html")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-router report: error: ") and message in err, err
    assert "Traceback" not in err and not (tmp_path / "r.html").exists()


def test_cli_report_default_output_next_to_the_session(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "run.json"
    path.write_text(json.dumps(make_session()))
    assert cli.main(["report", str(path)]) == 0
    assert (tmp_path / "run.html").exists()
    assert "report" in cli.build_parser().format_help()
