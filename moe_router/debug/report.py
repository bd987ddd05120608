"""A self-contained HTML report of a session record (one file: no external URLs, no JavaScript).

Sections: the reproducibility digest (stamped at the top), the layer x expert utilisation heatmap
(``<img id="heatmap">``, first in the page), a per-layer summary table, balancedness (max / mean
load) over steps, the k (experts per token) histograms, the issues found by
:meth:`MoEAnalyzer.detect_issues <moe_router.debug.analyzer.MoEAnalyzer.detect_issues>` and a
token view of the trace (each sampled token a box coloured by its top-1 expert), and, when the
session has an ``"offload"`` section, a table of the expert store's per-layer metrics. Plots are
drawn with matplotlib's Agg canvas and embedded as base64 PNG; every text from the session is
escaped. Every number shown comes from :class:`~moe_router.debug.analyzer.MoEAnalyzer` (the
offload table: from the section); undefined ones (``None`` there, NaN in its arrays) are shown as
``-``, grey heatmap cells or gaps in a plot.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from .analyzer import MoEAnalyzer, top1_expert
from .files import load_session, read_json

__all__ = ["MAX_TOKENS", "read_session", "render_report", "write_report"]

#: most trace rows shown in the token view (the rest are counted, not drawn)
MAX_TOKENS = 4096
_CSS = """
body{font-family:DejaVu Sans,Arial,sans-serif;margin:12px 16px;color:#111;background:#fff}
h1{font-size:20px;margin:0 0 6px}h2{font-size:17px;margin:18px 0 6px;border-bottom:1px solid #ccc}
h3{font-size:14px;margin:10px 0 4px}img{max-width:100%;height:auto;display:block}
.digest{font:12px monospace;background:#f4f4f4;border:1px solid #ccc;padding:4px 8px}
.digest td{padding:0 10px 0 0}table.grid{border-collapse:collapse;font-size:12px}
table.grid td,table.grid th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.grid td.l,table.grid th.l{text-align:left}
.sev-error,.sev-critical{color:#b00020;font-weight:bold}.sev-warning{color:#8a5a00}
.tok{display:inline-block;font:11px monospace;padding:1px 3px;margin:1px;border-radius:2px;
color:#000;min-width:14px;text-align:center}.tok.none{background:#fff;border:1px dashed #999}
.call{margin:2px 0}.callhdr{font:11px monospace;color:#555;display:inline-block;width:110px}
.note{color:#555;font-size:12px}.legend{font-size:12px}
"""


def read_session(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a session record from a JSON file (:func:`~moe_router.debug.files.read_json`, errors
    naming the path).

    Raises:
        OSError: the file cannot be read.
        InputError / InputTypeError: it is not JSON or not a session record (clear message).
    """
    return read_json(path, argument=os.fspath(path))


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}g}"


def _label(layer: Mapping[str, Any]) -> str:
    """``"<index>: <name>"`` (just the index when the layer has no name)."""
    name = layer.get("name")
    return f"{layer['index']}: {name}" if name else str(layer["index"])


def _plain(text: str, width: int = 40) -> str:
    """A label safe for matplotlib (no mathtext), shortened to ``width`` characters."""
    text = text if len(text) <= width else text[: width - 1] + "\u2026"
    return text.replace("$", r"\$")


# ----- plots ---------------------------------------------------------------------------------
def _png(fig: Any) -> tuple[str, int, int]:
    """``(base64 PNG, width px, height px)`` of a matplotlib figure."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    w, h = (int(round(v * fig.dpi)) for v in fig.get_size_inches())
    return base64.b64encode(buf.getvalue()).decode("ascii"), w, h


def _img(png: tuple[str, int, int], alt: str, ident: str) -> str:
    data, w, h = png
    return (f'<img id="{ident}" alt="{_e(alt)}" width="{w}" height="{h}" '
            f'src="data:image/png;base64,{data}">')


def _heatmap(analyzer: MoEAnalyzer) -> tuple[str, int, int]:
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    layers, util = analyzer.layers, analyzer.utilization()
    n_e = max(1, util.shape[1])
    data = np.full((max(len(layers), 1), n_e), np.nan)  # grey: no slots, or no such expert
    for i, c in enumerate(analyzer.counts()):
        data[i, : len(c["expert_tokens"])] = util[i, : len(c["expert_tokens"])]
    fig = Figure(figsize=(min(14.0, max(6.0, 3 + 0.45 * n_e)),
                          min(16.0, max(2.6, 1.3 + 0.42 * len(layers)))), dpi=100)
    ax = fig.add_subplot()
    cmap = colormaps["viridis"].with_extremes(bad="#dddddd")
    top = float(np.nanmax(data)) if np.isfinite(data).any() else 1.0
    im = ax.imshow(data, aspect="auto", cmap=cmap, vmin=0.0, vmax=max(top, 1e-9),
                   interpolation="nearest")
    ax.set_yticks(range(len(layers)), [_plain(_label(x)) for x in layers], fontsize=8)
    if n_e <= 32:
        ax.set_xticks(range(n_e))
    ax.set_xlabel("expert")
    ax.set_title("Expert utilisation: share of each layer's routed slots (train + eval)",
                 fontsize=10)
    if data.size <= 256:
        for (i, j), v in np.ndenumerate(data):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label="share of slots")
    fig.tight_layout()
    return _png(fig)


def _balance(analyzer: MoEAnalyzer, steps: Sequence[Mapping[str, Any]]) -> tuple[str, int, int]:
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    layers = analyzer.layers
    fig = Figure(figsize=(10, 3.6), dpi=100)
    ax = fig.add_subplot()
    if steps:
        xs = [int(e["step"]) for e in steps]
        ratios = analyzer.balance_over_steps()  # (S, L), NaN: a gap
        for i, layer in enumerate(layers):
            ax.plot(xs, ratios[:, i], marker=".", label=_plain(_label(layer), 24))
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title("Balancedness over steps: max / mean routed slots per expert", fontsize=10)
        if len(layers) <= 10:
            ax.legend(fontsize=7, loc="upper right")
    else:
        ys = [row["max_over_mean"] for row in analyzer.balance()]
        ax.bar(range(len(layers)), [math.nan if y is None else y for y in ys], color="#4c72b0")
        ax.set_xticks(range(len(layers)), [str(x["index"]) for x in layers])
        ax.set_xlabel("layer")
        ax.set_title("Balancedness of the totals (no steps recorded): max / mean load",
                     fontsize=10)
    ax.axhline(1.0, color="#888", linestyle="--", linewidth=1)
    ax.set_ylabel("max / mean")
    fig.tight_layout()
    return _png(fig)


def _k_hists(analyzer: MoEAnalyzer) -> tuple[str, int, int]:
    import numpy as np
    from matplotlib.figure import Figure

    layers = analyzer.layers
    fracs = [np.asarray(d["fractions"] or [0.0] * len(d["counts"]))  # None: no tokens
             for d in analyzer.k_distribution()]
    if len(layers) > 16:
        n_k = max(len(f) for f in fracs)
        data = np.zeros((len(layers), n_k))
        for i, f in enumerate(fracs):
            data[i, : len(f)] = f
        fig = Figure(figsize=(8, min(16.0, 1.5 + 0.25 * len(layers))), dpi=100)
        ax = fig.add_subplot()
        im = ax.imshow(data, aspect="auto", cmap="magma", vmin=0, vmax=1)
        ax.set(xlabel="experts per token (k)", ylabel="layer")
        fig.colorbar(im, ax=ax, label="share of tokens")
    else:
        ncols = min(max(len(layers), 1), 4)
        nrows = max(math.ceil(len(layers) / ncols), 1)
        fig = Figure(figsize=(3 * ncols + 0.5, 2.3 * nrows + 0.3), dpi=100)
        for i, (layer, f) in enumerate(zip(layers, fracs, strict=True)):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            ax.bar(range(len(f)), f, color="#55a868")
            ax.set_xticks(range(len(f)))
            ax.set_ylim(0, 1)
            ax.set_title(_plain(_label(layer), 30), fontsize=8)
            ax.set_xlabel("k", fontsize=8)
    fig.suptitle("Experts per token: share of tokens with k experts (train + eval)", fontsize=10)
    fig.tight_layout()
    return _png(fig)


# ----- HTML sections -------------------------------------------------------------------------
def _digest_lines(session: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The reproducibility digest as ``(label, value)`` pairs (``-`` for missing values)."""
    digest = session.get("digest") or {}
    versions = digest.get("versions") or {}
    pairs = [("digest id", digest.get("id")), ("config sha256", digest.get("config")),
             ("weights sha256", digest.get("weights")), ("inputs sha256", digest.get("inputs"))]
    out = [(label, "-" if value is None else str(value)) for label, value in pairs]
    out.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "-"))
    return out


def _digest(session: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in _digest_lines(session))
    meta = (f"framework {_e(session.get('framework') or 'manual events')} \u00b7 started "
            f"{_e(session.get('started_at') or '-')} \u00b7 ended "
            f"{_e(session.get('ended_at') or '-')}")
    return f'<div class="digest" id="digest"><table>{rows}</table>{meta}</div>'


def _layers_table(analyzer: MoEAnalyzer) -> str:
    head = ("<tr><th>layer</th><th class='l'>name</th><th class='l'>strategy</th><th>E</th>"
            "<th>K</th><th>calls</th><th>tokens</th><th>experts/token</th><th>entropy (nats)</th>"
            "<th>top-1 prob</th><th>drop rate</th><th>max/mean load</th><th>dead experts</th></tr>")
    rows = []
    for layer, m in zip(analyzer.layers, analyzer.routing_stats()["layers"], strict=True):
        cells = [layer["index"], layer.get("name") or "", layer.get("strategy") or "",
                 layer["num_experts"], layer["max_slots"], m["calls"], m["tokens"]]
        nums = [_fmt(m[k]) for k in ("mean_experts", "mean_entropy", "mean_top1", "drop_rate",
                                     "max_over_mean")]
        nums.append("-" if m["dead_experts"] is None else str(m["dead_experts"]))
        tds = [f"<td{' class=l' if j in (1, 2) else ''}>{_e(v)}</td>" for j, v in enumerate(cells)]
        rows.append("<tr>" + "".join(tds) + "".join(f"<td>{v}</td>" for v in nums) + "</tr>")
    return f"<table class='grid'>{head}{''.join(rows)}</table>"


def _issues(analyzer: MoEAnalyzer) -> str:
    try:
        issues = list(analyzer.detect_issues())
    except Exception as err:  # a report with the error beats no report
        return (f"<p class='sev-error' id='issues-failed'>Issue detection failed: "
                f"{_e(type(err).__name__)}: {_e(err)}</p>")
    if not issues:
        return "<p id='no-issues'>No issues detected.</p>"
    head = ("<tr><th class='l'>severity</th><th class='l'>kind</th><th>layer</th>"
            "<th class='l'>message</th><th class='l'>evidence</th></tr>")
    rows = []
    for issue in issues:
        sev = str(issue.get("severity", ""))
        evidence = json.dumps(issue.get("evidence"), sort_keys=True, default=str)
        evidence = evidence if len(evidence) <= 300 else evidence[:299] + "\u2026"
        rows.append(f"<tr class='issue'><td class='l sev-{_e(sev.lower())}'>{_e(sev)}</td>"
                    f"<td class='l'>{_e(issue.get('kind', ''))}</td>"
                    f"<td>{_e(issue.get('layer', '-'))}</td>"
                    f"<td class='l'>{_e(issue.get('message', ''))}</td>"
                    f"<td class='l'><code>{_e(evidence)}</code></td></tr>")
    return f"<table class='grid' id='issues-table'>{head}{''.join(rows)}</table>"


def _mb(value: Any) -> str:
    return "-" if value is None else f"{float(value) / 2**20:.3g}"


def _offload(section: Mapping[str, Any]) -> str:
    """The expert store's per-layer table (and a total row), from the OFFLOAD section."""
    head = ("<tr><th>layer</th><th>hits</th><th>misses</th><th>hit rate</th>"
            "<th>prefetch precision</th><th>prefetch recall</th><th>moved MiB</th>"
            "<th>wasted MiB</th><th>stall s</th><th>peak resident MiB</th></tr>")
    rows = [(str(i), m) for i, m in enumerate(section["layers"])]
    if section.get("total") is not None:
        rows.append(("total", section["total"]))
    body = []
    for name, m in rows:
        cells = [name, m["hits"], m["misses"], _fmt(m.get("hit_rate")),
                 _fmt(m.get("precision")), _fmt(m.get("recall")), _mb(m["bytes_moved"]),
                 _mb(m["bytes_wasted"]), _fmt(float(m["stall_s"])),
                 _mb(m.get("peak_resident_bytes"))]
        body.append("<tr class='offload-row'>" + "".join(f"<td>{_e(c)}</td>" for c in cells)
                    + "</tr>")
    note = (f"<p class='note'>policy {_e(section.get('policy') or '-')} \u00b7 "
            f"{_e(section.get('slots', '-'))} slots per layer of "
            f"{_e(section.get('num_experts', '-'))} experts \u00b7 one expert "
            f"{_mb(section.get('expert_bytes'))} MiB \u00b7 prefetch "
            f"{_e(section.get('prefetch', '-'))}; counts since the store was made.</p>")
    return f"{note}<table class='grid' id='offload-table'>{head}{''.join(body)}</table>"


def _colour(expert: int) -> str:
    """A distinct light background colour for ``expert`` (golden-angle hues)."""
    return f"hsl({(expert * 137.508) % 360:.1f},65%,{72 if expert % 2 else 60}%)"


def _token(row: Mapping[str, Any]) -> str:
    top1 = top1_expert(row)
    label = row["token_id"] if row.get("token_id") is not None else f"#{row.get('position', '?')}"
    weights = ", ".join(f"{float(w):.3f}" for w in row.get("weights") or [])
    tip = (f"position {row.get('position')} \u00b7 token {row.get('token_id')} \u00b7 experts "
           f"{list(row.get('experts') or [])} \u00b7 weights [{weights}]")
    if top1 is None:
        return f'<span class="tok none" title="{_e(tip)}">{_e(label)}</span>'
    return (f'<span class="tok" data-expert="{top1}" style="background:{_colour(top1)}" '
            f'title="{_e(tip)}">{_e(label)}</span>')


def _tokens(session: Mapping[str, Any]) -> str:
    rows: Sequence[Mapping[str, Any]] = session["trace"]
    source = "trace"
    if not rows and session["events"]:
        rows, source = [{**e, "call": "events"} for e in session["events"]], "manual events"
    if not rows:
        return ("<p class='note'>No trace recorded (set <code>MoEConfig.trace</code> to a "
                "<code>TraceConfig</code> to sample tokens).</p>")
    shown = rows[:MAX_TOKENS]
    labels = {int(x["index"]): _label(x) for x in session["layers"]}
    groups: dict[int, dict[tuple[Any, Any], list[Mapping[str, Any]]]] = {}
    for row in shown:
        key = (row.get("call"), row.get("mode"))
        groups.setdefault(int(row["layer"]), {}).setdefault(key, []).append(row)
    parts = [f"<p class='note'>{len(shown)} sampled tokens from the {source}, grouped by layer and "
             "call, each coloured by its top-1 expert; the label is the token id (or #position "
             "when the call had no token ids); hover a token for its experts and weights."]
    if len(rows) > len(shown):
        parts.append(f" {len(rows) - len(shown)} more rows are not shown.")
    parts.append("</p>")
    for layer in sorted(groups):
        experts = sorted({t for r in (x for g in groups[layer].values() for x in g)
                          if (t := top1_expert(r)) is not None})
        legend = "".join(f'<span class="tok" style="background:{_colour(e)}">e{e}</span>'
                         for e in experts)
        parts.append(f"<h3>Layer {_e(labels.get(layer, layer))}</h3>"
                     f"<div class='legend'>top-1 experts: {legend}</div>")
        for (call, mode), toks in groups[layer].items():
            parts.append(f"<div class='call'><span class='callhdr'>call {_e(call)} \u00b7 "
                         f"{_e(mode)}</span>{''.join(_token(t) for t in toks)}</div>")
    return "".join(parts)


def render_report(session: Any) -> str:
    """The report of ``session`` (anything :func:`~moe_router.debug.files.load_session` takes: a
    debugger, a session dict, a JSON path, a list of events) as HTML."""
    s = load_session(session, "session")
    analyzer = MoEAnalyzer(s)
    name = s.get("name") or "session"
    digest_id = (s.get("digest") or {}).get("id") or "-"
    plots = balance = k_plot = ""
    if s["layers"]:
        heatmap = _img(_heatmap(analyzer), "layer x expert utilisation heatmap", "heatmap")
        plots = f"<section id='utilisation'><h2>Expert utilisation</h2>{heatmap}</section>"
        balance = _img(_balance(analyzer, s["steps"]), "max over mean load", "balance-plot")
        k_plot = _img(_k_hists(analyzer), "k histograms per layer", "k-plot")
    no_steps = "" if s["steps"] else ("<p class='note' id='no-steps'>No steps recorded: the "
                                      "balance of the totals per layer.</p>")
    sections = [
        f"<section id='layers'><h2>Layers</h2>{_layers_table(analyzer)}</section>",
        f"<section id='balance'><h2>Balancedness</h2>{no_steps}{balance}</section>",
        f"<section id='k-hist'><h2>Experts per token</h2>{k_plot}</section>",
        f"<section id='issues'><h2>Issues</h2>{_issues(analyzer)}</section>",
        f"<section id='tokens'><h2>Token routing</h2>{_tokens(s)}</section>",
    ]
    if s.get("offload") is not None:
        sections.insert(1, "<section id='offload'><h2>Expert offloading</h2>"
                           f"{_offload(s['offload'])}</section>")
    now = datetime.now(UTC).isoformat(timespec="seconds")
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>MoE routing report: {_e(name)} ({_e(digest_id)})</title>"
            f"<style>{_CSS}</style></head><body>"
            f"<header><h1>MoE routing report: {_e(name)} \u2014 digest {_e(digest_id)}</h1>"
            f"{_digest(s)}</header>{plots}{''.join(sections)}"
            f"<footer><p class='note'>generated by moe-router at {_e(now)} from session format "
            f"{_e(s['format'])}</p></footer></body></html>\n")


def write_report(session: Any, path: str | os.PathLike[str]) -> str:
    """Write :func:`render_report` of ``session`` to ``path`` (UTF-8); returns the path."""
    text = render_report(session)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)
