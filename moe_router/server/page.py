"""The live page (``/``): one self-contained HTML template, plain JavaScript and inline SVG, no
external URL. Every ``refresh_s`` seconds it fetches ``api/session`` and ``health`` (relative URLs,
so it also works behind a path prefix) and redraws the views of the static report
(:mod:`moe_router.debug.report`): the digest, the layer x expert utilisation heatmap, the layers
table, balancedness over steps, the k histograms, the issues (from ``/health``, i.e.
:meth:`MoEAnalyzer.detect_issues <moe_router.debug.analyzer.MoEAnalyzer.detect_issues>`) and the
token view of the trace, plus the serving metrics of a router and, when the session has an
``"offload"`` section, the expert store's per-layer table (as in the report). The numbers are the
session record's definitions (:mod:`moe_router.debug.session`): shares of slots, k fractions, max /
mean load, means over tokens; the dead-expert rule uses the analyzer's defaults. Text from the
session is only ever set with ``textContent`` / ``setAttribute``, never parsed as HTML.
"""

from __future__ import annotations

import html
import json

from ..debug.analyzer import DEAD_THRESHOLD, MIN_EXPECTED

__all__ = ["MAX_TOKENS", "render_page"]

#: most trace rows drawn in the token view
MAX_TOKENS = 1024

_TEMPLATE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<link rel="icon" href="data:,">
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:DejaVu Sans,Arial,sans-serif;margin:12px 16px;color:#111;background:#fff}
h1{font-size:20px;margin:0 0 6px}h2{font-size:17px;margin:18px 0 6px;border-bottom:1px solid #ccc}
h3{font-size:13px;margin:8px 0 2px}
.digest{font:12px monospace;background:#f4f4f4;border:1px solid #ccc;padding:4px 8px}
.digest td{padding:0 10px 0 0}table.grid{border-collapse:collapse;font-size:12px}
table.grid td,table.grid th{border:1px solid #ccc;padding:2px 6px;text-align:right}
table.grid td.l,table.grid th.l{text-align:left}
.sev-error,.sev-critical{color:#b00020;font-weight:bold}.sev-warning{color:#8a5a00}
.badge{display:inline-block;padding:2px 10px;border-radius:10px;color:#fff;font-weight:bold}
.st-ok{background:#2e7d32}.st-degraded{background:#c77700}.st-error{background:#b00020}
.st-unknown{background:#777}
.tok{display:inline-block;font:11px monospace;padding:1px 3px;margin:1px;border-radius:2px;
color:#000;min-width:14px;text-align:center}.tok.none{background:#fff;border:1px dashed #999}
.call{margin:2px 0}.callhdr{font:11px monospace;color:#555;display:inline-block;width:110px}
.note{color:#555;font-size:12px}.kgrid{display:flex;flex-wrap:wrap;gap:8px}
svg text{font:10px DejaVu Sans,Arial,sans-serif;fill:#222}
#fetch-error{color:#b00020;font-weight:bold}
</style></head><body>
<header><h1>__TITLE__</h1>
<div><span id="status" class="badge st-unknown">loading</span> <span id="headline"></span>
 <span class="note" id="updated"></span> <span id="fetch-error"></span></div>
<div class="digest" id="digest"></div></header>
<section id="serving" hidden><h2>Serving</h2><div id="serving-body"></div></section>
<section id="utilisation"><h2>Expert utilisation</h2><div id="heatmap"></div></section>
<section id="layers"><h2>Layers</h2><div id="layers-body"></div></section>
<section id="offload" hidden><h2>Expert offloading</h2><div id="offload-body"></div></section>
<section id="balance"><h2>Balancedness</h2><div id="balance-plot"></div></section>
<section id="k-hist"><h2>Experts per token</h2><div id="k-plot" class="kgrid"></div></section>
<section id="issues"><h2>Issues</h2><div id="issues-body"></div></section>
<section id="tokens"><h2>Token routing</h2><div id="tokens-body"></div></section>
<footer><p class="note">moe-router live monitor: refreshes every <span id="every"></span> s
from <code>api/session</code> and <code>health</code>; Prometheus metrics at
<code>metrics</code>.</p></footer>
<script type="application/json" id="cfg">__CONFIG__</script>
<script>
"use strict";
const CFG = JSON.parse(document.getElementById("cfg").textContent);
const SVGNS = "http://www.w3.org/2000/svg";
const VIRIDIS = [[68,1,84],[59,82,139],[33,145,140],[94,201,98],[253,231,37]];

function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k instanceof Node ? k : String(k));
  return e;
}
function s(tag, attrs, text) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (text !== undefined) e.textContent = String(text);
  return e;
}
function put(id, ...kids) { const e = document.getElementById(id); e.replaceChildren(...kids); }
function fin(v) { return typeof v === "number" && isFinite(v); }
function fmt(v) { return fin(v) ? String(Number(v.toPrecision(3))) : "-"; }
function sum(a) { return a.reduce((x, y) => x + y, 0); }
function label(layer) { return layer.name ? layer.index + ": " + layer.name : String(layer.index); }
function short(t, n) { return t.length <= n ? t : t.slice(0, n - 1) + "\u2026"; }
function viridis(t) {
  const x = Math.min(Math.max(t, 0), 1) * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), 3);
  const f = x - i, a = VIRIDIS[i], b = VIRIDIS[i + 1];
  return "rgb(" + a.map((c, j) => Math.round(c + f * (b[j] - c))).join(",") + ")";
}
function hue(e) {
  return "hsl(" + ((e * 137.508) % 360).toFixed(1) + ",65%," + (e % 2 ? 72 : 60) + "%)";
}
function lineColour(i) { return "hsl(" + ((i * 137.508 + 210) % 360).toFixed(1) + ",70%,40%)"; }
function addInto(acc, xs) { (xs || []).forEach((x, j) => { acc[j] = (acc[j] || 0) + x; }); }
function note(text, id) { return h("p", id ? {class: "note", id: id} : {class: "note"}, text); }
function txt(x, y, text, anchor, extra) {
  return s("text", Object.assign({x: x, y: y, "text-anchor": anchor || "start"}, extra), text);
}
function svgBox(W, H, attrs) {
  return s("svg", Object.assign({width: W, height: H, viewBox: "0 0 " + W + " " + H}, attrs));
}

function combined(session) {
  return session.layers.map((info, i) => {
    const c = {calls: 0, tokens: 0, dropped: 0, entropy_sum: 0, top1_sum: 0,
               expert_tokens: new Array(info.num_experts).fill(0),
               k_hist: new Array(info.max_slots + 1).fill(0)};
    for (const m of ["train", "eval"]) {
      const r = ((session.totals || {})[m] || [])[i];
      if (!r) continue;
      for (const f of ["calls", "tokens", "dropped", "entropy_sum", "top1_sum"]) c[f] += r[f] || 0;
      addInto(c.expert_tokens, r.expert_tokens);
      addInto(c.k_hist, r.k_hist);
    }
    return c;
  });
}
function metrics(c, known) {
  const x = c.expert_tokens, E = x.length, slots = sum(x), ks = sum(c.k_hist);
  const expected = E && c.tokens ? slots / E : 0;
  return {
    slots: slots, shares: slots ? x.map(v => v / slots) : null,
    mean_experts: ks ? sum(c.k_hist.map((v, k) => v * k)) / ks : null,
    entropy: known && c.tokens ? c.entropy_sum / c.tokens : null,
    top1: c.tokens ? c.top1_sum / c.tokens : null,
    drop: c.dropped + slots ? c.dropped / (c.dropped + slots) : null,
    max_over_mean: slots ? Math.max(...x) * E / slots : null,
    dead: expected >= CFG.min_expected
      ? x.filter(v => v / slots < CFG.dead_threshold / E).length : null};
}

function drawDigest(session) {
  const d = session ? session.digest || {} : {}, v = d.versions || {};
  const rows = [["digest id", d.id], ["config sha256", d.config], ["weights sha256", d.weights],
    ["inputs sha256", d.inputs],
    ["versions", Object.keys(v).sort().map(k => k + " " + v[k]).join(", ")]];
  const table = h("table", {}, ...rows.map(([k, val]) => h("tr", {}, h("td", {}, k),
    h("td", {}, val === null || val === undefined || val === "" ? "-" : val))));
  const meta = !session ? "no session" : "framework " + (session.framework || "manual events") +
    " \u00b7 started " + (session.started_at || "-") + " \u00b7 ended " + (session.ended_at || "-");
  put("digest", table, meta);
}

function drawHeatmap(session, ms) {
  const layers = session.layers, E = Math.max(1, ...layers.map(l => l.num_experts));
  if (!layers.length) { put("heatmap", note("No MoE layer in the session.")); return; }
  const cw = Math.max(14, Math.min(48, Math.floor(760 / E))), ch = 24, left = 190, top = 20;
  const W = left + cw * E + 90, H = top + Math.max(ch * layers.length + 34, 126);
  const right = left + cw * E;
  const g = svgBox(W, H, {id: "heatmap-svg"});
  const peak = Math.max(1e-9, ...ms.flatMap(m => m.shares || []));
  layers.forEach((layer, i) => {
    const y = top + ch * i;
    g.append(txt(left - 6, y + ch / 2 + 4, short(label(layer), 30), "end"));
    for (let e = 0; e < E; e++) {
      const share = ms[i].shares && e < ms[i].shares.length ? ms[i].shares[e] : null;
      const r = s("rect", {x: left + cw * e, y: y, width: cw - 1, height: ch - 1, class: "cell",
        fill: share === null ? "#dddddd" : viridis(share / peak), "data-layer": i,
        "data-expert": e, "data-share": share === null ? "" : share.toFixed(6)});
      r.append(s("title", {}, "layer " + label(layer) + ", expert " + e + ": " +
        (share === null ? "no slots" : (100 * share).toFixed(1) + "% of the slots")));
      g.append(r);
      if (share !== null && cw >= 28 && layers.length * E <= 256) {
        const colour = "fill:" + (share / peak < 0.6 ? "#fff" : "#000");
        g.append(txt(left + cw * e + cw / 2, y + ch / 2 + 4, share.toFixed(2), "middle",
                     {style: colour}));
      }
    }
  });
  for (let e = 0; e < E; e += Math.ceil(E / 32))
    g.append(txt(left + cw * e + cw / 2, top + ch * layers.length + 14, e, "middle"));
  g.append(txt(left + cw * E / 2, H - 4, "expert", "middle"));
  for (let j = 0; j < 10; j++)
    g.append(s("rect", {x: right + 20, y: top + (9 - j) * 12, width: 14, height: 12,
                        fill: viridis(j / 9)}));
  g.append(txt(right + 38, top + 10, (100 * peak).toFixed(0) + "%"));
  g.append(txt(right + 38, top + 118, "0%"));
  put("heatmap", note("Share of each layer's routed slots per expert (train + eval); " +
                      "grey: no slots."), g);
}

function drawLayers(session, cs, ms) {
  const head = ["layer", "name", "strategy", "E", "K", "calls", "tokens", "experts/token",
    "entropy (nats)", "top-1 prob", "drop rate", "max/mean load", "dead experts"];
  const cls = j => j === 1 || j === 2 ? {class: "l"} : {};
  const rows = session.layers.map((layer, i) => {
    const m = ms[i], c = cs[i];
    const cells = [layer.index, layer.name || "", layer.strategy || "", layer.num_experts,
      layer.max_slots, c.calls, c.tokens, fmt(m.mean_experts), fmt(m.entropy), fmt(m.top1),
      fmt(m.drop), fmt(m.max_over_mean), m.dead === null ? "-" : m.dead];
    return h("tr", {class: "layer-row"}, ...cells.map((v, j) => h("td", cls(j), v)));
  });
  put("layers-body", h("table", {class: "grid", id: "layers-table"},
    h("tr", {}, ...head.map((t, j) => h("th", cls(j), t))), ...rows));
}

function axes(g, x0, y0, w, hgt, ymin, ymax, xlabel) {
  g.append(s("line", {x1: x0, y1: y0, x2: x0 + w, y2: y0, stroke: "#444"}));
  g.append(s("line", {x1: x0, y1: y0, x2: x0, y2: y0 - hgt, stroke: "#444"}));
  for (let j = 0; j <= 4; j++)
    g.append(txt(x0 - 4, y0 - hgt * j / 4 + 3, fmt(ymin + (ymax - ymin) * j / 4), "end"));
  g.append(txt(x0 + w / 2, y0 + 28, xlabel, "middle"));
}
function dashed(g, x0, w, y) {
  g.append(s("line", {x1: x0, x2: x0 + w, y1: y, y2: y, stroke: "#888",
                      "stroke-dasharray": "4 3"}));
}
function stepRatio(step, i) {
  const c = (step.layers || [])[i];
  if (!c) return NaN;
  const x = c.expert_tokens, t = sum(x);
  return t ? Math.max(...x) * x.length / t : NaN;
}

function drawBalance(session, ms) {
  const steps = session.steps || [], layers = session.layers;
  const W = 860, H = 260, x0 = 50, y0 = 220, w = 640, hgt = 190;
  const g = svgBox(W, H, {id: "balance-svg"});
  if (!steps.length) {
    const ys = ms.map(m => m.max_over_mean), top = Math.max(1.5, ...ys.filter(fin)) * 1.05;
    const bw = w / Math.max(layers.length, 1);
    axes(g, x0, y0, w, hgt, 0, top, "layer");
    ys.forEach((y, i) => {
      if (fin(y))
        g.append(s("rect", {x: x0 + bw * (i + 0.15), y: y0 - hgt * y / top, width: bw * 0.7,
                            height: hgt * y / top, fill: "#4c72b0", class: "bar"}));
      g.append(txt(x0 + bw * (i + 0.5), y0 + 12, layers[i].index, "middle"));
    });
    dashed(g, x0, w, y0 - hgt / top);
    put("balance-plot", note("No steps recorded: the balance of the totals per layer " +
                             "(max / mean load).", "no-steps"), g);
    return;
  }
  const stride = Math.ceil(steps.length / 600);
  const shown = steps.filter((_, j) => j % stride === 0 || j === steps.length - 1);
  const vals = shown.flatMap(st => layers.map((_, i) => stepRatio(st, i))).filter(fin);
  const ymin = Math.min(1, ...vals), ymax = Math.max(ymin + 0.5, ...vals) * 1.05;
  const xs = shown.map(st => st.step), xmin = Math.min(...xs), xmax = Math.max(xmin + 1, ...xs);
  const X = v => x0 + w * (v - xmin) / (xmax - xmin);
  const Y = v => y0 - hgt * (v - ymin) / (ymax - ymin);
  axes(g, x0, y0, w, hgt, ymin, ymax, "step");
  g.append(txt(x0, y0 + 12, xmin, "middle"));
  g.append(txt(x0 + w, y0 + 12, xs[xs.length - 1], "middle"));
  dashed(g, x0, w, Y(1));
  layers.forEach((layer, i) => {
    let d = "", pen = "M";
    for (const st of shown) {
      const r = stepRatio(st, i);
      if (!fin(r)) { pen = "M"; continue; }
      d += pen + X(st.step).toFixed(1) + " " + Y(r).toFixed(1) + " ";
      pen = "L";
    }
    if (d) g.append(s("path", {d: d, fill: "none", stroke: lineColour(i), "stroke-width": 1.5,
                               class: "series"}));
    if (layers.length <= 10) {
      g.append(s("rect", {x: x0 + w + 20, y: 20 + 14 * i, width: 10, height: 10,
                          fill: lineColour(i)}));
      g.append(txt(x0 + w + 34, 29 + 14 * i, short(label(layer), 22)));
    }
  });
  put("balance-plot", note("Max / mean routed slots per expert in each step's window " +
                           "(1 = balanced); " + steps.length + " steps."), g);
}

function drawK(session, cs) {
  const parts = [], W = 190, H = 120, x0 = 26, y0 = 96, w = 156, hgt = 76;
  session.layers.slice(0, 16).forEach((layer, i) => {
    const kh = cs[i].k_hist, n = sum(kh), bw = w / kh.length;
    const g = svgBox(W, H, {class: "k-svg"});
    g.append(txt(W / 2, 11, short(label(layer), 30), "middle"));
    g.append(s("line", {x1: x0, y1: y0, x2: x0 + w, y2: y0, stroke: "#444"}));
    g.append(txt(x0 - 3, y0 - hgt + 4, "1", "end"));
    g.append(txt(x0 - 3, y0, "0", "end"));
    kh.forEach((v, k) => {
      const f = n ? v / n : 0;
      const r = s("rect", {x: x0 + bw * k + 1, y: y0 - hgt * f, width: Math.max(bw - 2, 1),
        height: hgt * f, fill: "#55a868", class: "bar", "data-k": k,
        "data-fraction": f.toFixed(6)});
      r.append(s("title", {}, "k=" + k + ": " + (100 * f).toFixed(1) + "% of " + n + " tokens"));
      g.append(r);
      g.append(txt(x0 + bw * (k + 0.5), y0 + 12, k, "middle"));
    });
    g.append(txt(x0 + w / 2, H - 1, "k", "middle"));
    parts.push(g);
  });
  if (session.layers.length > 16)
    parts.push(note("First 16 of " + session.layers.length + " layers."));
  put("k-plot", ...parts);
}

function drawIssues(health) {
  const issues = (health && health.issues) || [], parts = [];
  if (health && health.error)
    parts.push(h("p", {class: "sev-error", id: "issues-failed"},
                 "Health check failed: " + health.error));
  if (!issues.length) {
    put("issues-body", ...parts, h("p", {id: "no-issues"}, "No issues detected."));
    return;
  }
  const names = ["severity", "kind", "layer", "message", "evidence"];
  const head = h("tr", {}, ...names.map((t, j) => h("th", j === 2 ? {} : {class: "l"}, t)));
  const rows = issues.map(i => {
    let ev = JSON.stringify(i.evidence === undefined ? null : i.evidence);
    if (ev.length > 300) ev = ev.slice(0, 299) + "\u2026";
    const sev = String(i.severity || "");
    const layer = i.layer === undefined || i.layer === null ? "-" : i.layer;
    return h("tr", {class: "issue"}, h("td", {class: "l sev-" + sev.toLowerCase()}, sev),
      h("td", {class: "l"}, i.kind || ""), h("td", {}, layer),
      h("td", {class: "l"}, i.message || ""), h("td", {class: "l"}, h("code", {}, ev)));
  });
  put("issues-body", ...parts, h("table", {class: "grid", id: "issues-table"}, head, ...rows));
}

function top1(row) {
  const ex = row.experts || [], w = row.weights || [];
  if (!ex.length) return null;
  if (w.length !== ex.length) return ex[0];
  let best = 0;
  w.forEach((v, j) => { if (v > w[best]) best = j; });
  return ex[best];
}
function token(t) {
  const e = top1(t), has = v => v !== null && v !== undefined;
  const lab = has(t.token_id) ? t.token_id : "#" + (has(t.position) ? t.position : "?");
  const weights = (t.weights || []).map(v => Number(v).toFixed(3)).join(", ");
  const tip = "position " + t.position + " \u00b7 token " + t.token_id + " \u00b7 experts [" +
    (t.experts || []).join(", ") + "] \u00b7 weights [" + weights + "]";
  if (e === null) return h("span", {class: "tok none", title: tip}, lab);
  return h("span", {class: "tok", "data-expert": e, style: "background:" + hue(e), title: tip},
           lab);
}
function drawTokens(session) {
  let rows = session.trace || [], source = "trace";
  if (!rows.length && (session.events || []).length) {
    rows = session.events.map(e => Object.assign({}, e, {call: "events"}));
    source = "manual events";
  }
  if (!rows.length) {
    put("tokens-body", note("No trace recorded (set MoEConfig.trace to a TraceConfig to " +
                            "sample tokens)."));
    return;
  }
  const shown = rows.slice(-CFG.max_tokens), groups = new Map();
  const names = new Map(session.layers.map(l => [l.index, label(l)]));
  for (const r of shown) {
    if (!groups.has(r.layer)) groups.set(r.layer, new Map());
    const key = r.call + " \u00b7 " + r.mode, g = groups.get(r.layer);
    if (!g.has(key)) g.set(key, []);
    g.get(key).push(r);
  }
  const parts = [note("The last " + shown.length + " of " + rows.length + " sampled tokens " +
    "from the " + source + ", grouped by layer and call, each coloured by its top-1 expert; " +
    "hover a token for its experts and weights.")];
  for (const layer of [...groups.keys()].sort((a, b) => a - b)) {
    parts.push(h("h3", {}, "Layer " + (names.has(layer) ? names.get(layer) : layer)));
    for (const [key, toks] of groups.get(layer))
      parts.push(h("div", {class: "call"}, h("span", {class: "callhdr"}, "call " + key),
                   ...toks.map(token)));
  }
  put("tokens-body", ...parts);
}

function drawServing(health) {
  const m = health && health.router_metrics, sec = document.getElementById("serving");
  sec.hidden = !m;
  if (!m) return;
  const lat = m.latency_ms || {}, show = v => v === undefined || v === null ? "-" : v;
  const rows = [["requests", m.requests], ["errors", m.errors], ["tokens", m.tokens],
    ["latency p50 / p95 / p99 / mean (ms)",
     [lat.p50, lat.p95, lat.p99, lat.mean].map(fmt).join(" / ")],
    ["drop rate", fmt(m.drop_rate)], ["balancedness", fmt(m.balancedness)],
    ["fallbacks", m.fallbacks], ["config valid", health.config_valid],
    ["backends", health.backends === undefined ? "-" : JSON.stringify(health.backends)]];
  put("serving-body", h("table", {class: "grid", id: "serving-table"}, ...rows.map(([k, v]) =>
    h("tr", {}, h("td", {class: "l"}, k), h("td", {}, show(v))))));
}

function mib(v) { return fin(v) ? fmt(v / 1048576) : "-"; }
function drawOffload(session) {
  const o = session && session.offload, sec = document.getElementById("offload");
  sec.hidden = !o;
  if (!o) return;
  const head = ["layer", "hits", "misses", "hit rate", "prefetch precision", "prefetch recall",
    "moved MiB", "wasted MiB", "stall s", "peak resident MiB"];
  const rows = (o.layers || []).map((m, i) => [String(i), m]);
  if (o.total) rows.push(["total", o.total]);
  const trs = rows.map(([name, m]) => h("tr", {class: "offload-row"}, ...[name, m.hits,
    m.misses, fmt(m.hit_rate), fmt(m.precision), fmt(m.recall), mib(m.bytes_moved),
    mib(m.bytes_wasted), fmt(m.stall_s), mib(m.peak_resident_bytes)].map(v => h("td", {}, v))));
  const line = "policy " + (o.policy || "-") + " \u00b7 " + o.slots + " slots per layer of " +
    o.num_experts + " experts \u00b7 one expert " + mib(o.expert_bytes) + " MiB \u00b7 " +
    "prefetch " + (o.prefetch === undefined ? "-" : o.prefetch) + "; counts since the store " +
    "was made.";
  put("offload-body", note(line), h("table", {class: "grid", id: "offload-table"},
    h("tr", {}, ...head.map(t => h("th", {}, t))), ...trs));
}

function drawHeadline(session, health) {
  const status = health && health.status ? health.status : "unknown";
  const known = ["ok", "degraded", "error"].includes(status);
  const badge = document.getElementById("status");
  badge.className = "badge st-" + (known ? status : "unknown");
  badge.textContent = status;
  const info = health && health.session;
  let line = session ? "session " + (session.name || "-") : "no session";
  if (session && info) line += " \u00b7 " + info.tokens + " tokens, " + info.steps + " steps";
  if (info && info.running) line += " \u00b7 running";
  document.getElementById("headline").textContent = line;
}

function draw(session, health) {
  drawHeadline(session, health);
  drawDigest(session);
  drawServing(health);
  drawIssues(health);
  drawOffload(session);
  if (!session) {
    for (const id of ["heatmap", "layers-body", "balance-plot", "k-plot", "tokens-body"])
      put(id, note("No session (the source has no debugger)."));
    return;
  }
  const known = session.framework !== null && session.framework !== undefined;
  const cs = combined(session), ms = cs.map(c => metrics(c, known));
  drawHeatmap(session, ms);
  drawLayers(session, cs, ms);
  drawBalance(session, ms);
  drawK(session, cs);
  drawTokens(session);
}

async function getJSON(url, okStatuses) {
  const r = await fetch(url, {cache: "no-store", headers: {Accept: "application/json"}});
  if (!r.ok && !okStatuses.includes(r.status)) throw new Error(url + ": HTTP " + r.status);
  return r.status === 404 ? null : r.json();
}
let rounds = 0;
async function tick() {
  try {
    const [session, health] = await Promise.all([getJSON("api/session", [404]),
                                                 getJSON("health", [503])]);
    draw(session, health);
    rounds += 1;
    document.body.setAttribute("data-rounds", rounds);
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    document.getElementById("fetch-error").textContent = "";
  } catch (err) {
    document.getElementById("fetch-error").textContent = "refresh failed: " + err.message;
    console.error("moe-router monitor: refresh failed:", err);
  } finally {
    setTimeout(tick, CFG.refresh_ms);
  }
}
document.getElementById("every").textContent = CFG.refresh_ms / 1000;
tick();
</script></body></html>
"""


def render_page(title: str, refresh_s: float = 2.0) -> str:
    """The page's HTML: ``title`` (escaped) and the refresh interval in seconds."""
    config = {"refresh_ms": int(round(refresh_s * 1000)), "dead_threshold": DEAD_THRESHOLD,
              "min_expected": MIN_EXPECTED, "max_tokens": MAX_TOKENS}
    blob = json.dumps(config).replace("<", "\\u003c")
    return _TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__CONFIG__", blob)
