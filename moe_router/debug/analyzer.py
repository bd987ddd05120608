"""MoEAnalyzer: load balance, dead experts, collapse, drops and suggestions from a session record.

Every per-layer number is defined here once, from the session dict (see
:mod:`moe_router.debug.session`): :func:`layer_metrics` of one LAYER_COUNTS and the methods of
:class:`MoEAnalyzer`; the CSV file, the exporters and the HTML report read them from here.
"Slots" are routing slots (a token routed to k experts fills k): an expert's *share* is its
fraction of the layer's slots.

Undefined numbers (a mean over zero tokens or calls; shares or a drop rate with no slot routed or
dropped; dead experts of a layer too small to judge; router entropy, z-loss and aux-loss means of
manual events, whose ``framework`` is ``None``) are ``None`` in every dict and list returned here
(``null`` in JSON, an empty CSV cell, no TensorBoard point or Prometheus sample), NaN in arrays.

Small samples: a layer is judged for dead experts, collapse and imbalance only when the count
each expert would get under uniform routing, ``slots / E``, is at least ``min_expected``
(default 20); below that an expert can get nothing by chance (Poisson P(0) = e^-20 ~ 2e-9).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from .events import session_from_events
from .files import load_session
from .session import MODES, add_counts, empty_counts

#: default dead-expert threshold: a share below this fraction of the uniform share 1/E
DEAD_THRESHOLD = 0.05
#: default smallest expected count per expert (slots / E) for a layer to be judged
MIN_EXPECTED = 20.0
#: the keys of :func:`layer_metrics`, each ``None`` when undefined
LAYER_METRICS = ("mean_experts", "mean_entropy", "normalized_entropy", "mean_top1", "mean_z_loss",
                 "mean_balance_loss", "mean_aux_loss", "drop_rate", "max_over_mean", "cv", "jain",
                 "dead_experts")


def _div(a: float, b: float) -> float | None:
    return float(a) / b if b else None


def load_stats(expert_tokens: Sequence[float]) -> dict[str, float | None]:
    """``max_over_mean``, ``cv`` (population std / mean) and ``jain`` ((sum x)^2 / (E sum x^2),
    in [1/E, 1], 1 = equal loads) of per-expert loads; ``None`` when the loads sum to 0."""
    x = np.asarray(expert_tokens, dtype=np.float64)
    if x.size == 0 or x.sum() <= 0:
        return {"max_over_mean": None, "cv": None, "jain": None}
    mean = x.mean()
    return {"max_over_mean": float(x.max() / mean), "cv": float(x.std() / mean),
            "jain": float(x.sum() ** 2 / (x.size * (x ** 2).sum()))}


def shares(values: Sequence[float]) -> list[float] | None:
    """Each value over their sum (an expert's share of the slots, a k's share of the tokens);
    ``None`` when they sum to 0."""
    total = sum(values)
    return [v / total for v in values] if total else None


def mean_k(k_hist: Sequence[int]) -> float | None:
    """Mean experts per token, ``sum_k k * k_hist[k] / sum_k k_hist[k]``."""
    return _div(sum(k * int(v) for k, v in enumerate(k_hist)), sum(int(v) for v in k_hist))


def judged(counts: Mapping[str, Any], min_expected: float = MIN_EXPECTED) -> tuple[int, float]:
    """``(slots, expected per expert)`` of one LAYER_COUNTS; expected is 0.0 when the layer is too
    small to judge (``slots / E < min_expected``, or no tokens)."""
    slots, E = int(sum(counts["expert_tokens"])), len(counts["expert_tokens"])
    expected = slots / E if E and counts["tokens"] else 0.0
    return slots, expected if expected >= min_expected else 0.0


def dead_expert_ids(counts: Mapping[str, Any], threshold: float = DEAD_THRESHOLD,
                    min_expected: float = MIN_EXPECTED) -> list[int] | None:
    """The experts of one LAYER_COUNTS whose share of the slots is below ``threshold / E``
    (``threshold`` times the uniform share); ``None`` when the layer is too small to judge."""
    slots, expected = judged(counts, min_expected)
    if not expected:
        return None
    E = len(counts["expert_tokens"])
    return [e for e, n in enumerate(counts["expert_tokens"]) if n / slots < threshold / E]


def layer_metrics(counts: Mapping[str, Any], known: bool = True, *,
                  dead_threshold: float = DEAD_THRESHOLD,
                  min_expected: float = MIN_EXPECTED) -> dict[str, Any]:
    """The derived metrics of one LAYER_COUNTS (:data:`LAYER_METRICS`, ``None`` when undefined):
    ``mean_experts`` (:func:`mean_k`); per-token means ``mean_entropy`` (nats), ``mean_top1``
    (top-1 weight or event confidence), ``mean_z_loss``, and ``normalized_entropy`` (mean_entropy
    / ln E); per-call means ``mean_balance_loss``, ``mean_aux_loss``; ``drop_rate`` (dropped /
    (dropped + routed) slots); :func:`load_stats`; ``dead_experts`` (how many
    :func:`dead_expert_ids`). ``known=False`` (manual events) leaves the entropy, z-loss, balance
    and aux-loss means ``None`` (not measured)."""
    x = [int(v) for v in counts["expert_tokens"]]
    tokens, calls, dropped = int(counts["tokens"]), int(counts["calls"]), int(counts["dropped"])
    entropy = _div(counts["entropy_sum"], tokens) if known else None
    dead = dead_expert_ids(counts, dead_threshold, min_expected)
    return {"mean_experts": mean_k(counts["k_hist"]), "mean_entropy": entropy,
            "normalized_entropy": entropy / math.log(len(x))
            if entropy is not None and len(x) > 1 else None,
            "mean_top1": _div(counts["top1_sum"], tokens),
            "mean_z_loss": _div(counts["z_loss_sum"], tokens) if known else None,
            "mean_balance_loss": _div(counts["balance_sum"], calls) if known else None,
            "mean_aux_loss": _div(counts["aux_loss_sum"], calls) if known else None,
            "drop_rate": _div(dropped, dropped + sum(x)), **load_stats(x),
            "dead_experts": None if dead is None else len(dead)}


def top1_expert(row: Mapping[str, Any]) -> int | None:
    """The expert of a trace row / event with the largest weight (the first on ties; the first
    expert when the weights are missing); ``None`` for a token given no expert."""
    experts, weights = list(row.get("experts") or []), list(row.get("weights") or [])
    if not experts:
        return None
    return int(experts[int(np.argmax(weights))] if len(weights) == len(experts) else experts[0])


class MoEAnalyzer:
    """Analysis of one session record.

    Args:
        source: an object with ``to_session()`` (a :class:`MoEDebugger`), a session dict, a path
            to a session written by :func:`~moe_router.debug.files.write_json`, a list of event
            dicts (:func:`~moe_router.debug.events.session_from_events`), or ``None`` (then only
            :meth:`analyze_expert_utilization` works).
    """

    def __init__(self, source: Any = None) -> None:
        self.session: dict[str, Any] | None = None if source is None else load_session(source)

    # ----- access --------------------------------------------------------------------------
    def _data(self) -> dict[str, Any]:
        if self.session is None:
            raise InputError("source", "MoEAnalyzer(None) has no session: pass a debugger, a "
                                       "session dict, a JSON path or a list of events (or call "
                                       "analyze_expert_utilization(events))")
        return self.session

    @property
    def layers(self) -> list[dict[str, Any]]:
        """The session's layer descriptions."""
        return self._data()["layers"]

    @property
    def has_router_stats(self) -> bool:
        """Whether entropy, z-loss and aux-loss sums are measured (not manual events)."""
        return self._data().get("framework") is not None

    def counts(self, mode: str | None = None) -> list[dict[str, Any]]:
        """LAYER_COUNTS per layer of ``mode`` (``None``: train + eval)."""
        if mode is not None and mode not in MODES:
            raise InputError("mode", f"expected None, 'train' or 'eval', got {mode!r}")
        totals, layers = self._data()["totals"], self.layers
        rows = {m: totals.get(m) or [None] * len(layers) for m in MODES}
        out = []
        for i, info in enumerate(layers):  # pad both modes to one width (manual sessions grow)
            got = [rows[m][i] for m in MODES if rows[m][i] is not None]
            E = max([info.get("num_experts") or 0, *(len(c["expert_tokens"]) for c in got)])
            K = max([info.get("max_slots") or 0, *(len(c["k_hist"]) - 1 for c in got)])
            counts = empty_counts(E, K)
            for m in MODES if mode is None else (mode,):
                counts = add_counts(counts, rows[m][i]) if rows[m][i] is not None else counts
            out.append(counts)
        return out

    def metrics(self, mode: str | None = None, **thresholds: Any) -> list[dict[str, Any]]:
        """:func:`layer_metrics` (``thresholds``: its keywords) of each layer's :meth:`counts`."""
        return [layer_metrics(c, self.has_router_stats, **thresholds) for c in self.counts(mode)]

    def _rows(self, mode: str | None, layer: int | None = None) -> list[dict[str, Any]]:
        """Token-level records (trace rows, then events) of ``mode`` and ``layer``."""
        self.counts(mode)  # checks mode
        data = self._data()
        return [r for r in (*data.get("trace", ()), *data.get("events", ()))
                if (mode is None or r["mode"] == mode) and (layer is None or r["layer"] == layer)]

    def _layer(self, layer: int) -> dict[str, Any]:
        if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
                or not 0 <= layer < len(self.layers):
            raise InputError("layer", f"expected a layer index in [0, {len(self.layers)}), "
                                      f"got {layer!r}")
        return self.layers[int(layer)]

    # ----- load balance ------------------------------------------------------------------
    def utilization(self, mode: str | None = None) -> np.ndarray:
        """(L, E) float64 :func:`shares` of slots (E = the most experts of any layer; a narrower
        layer's row is zero-padded); each row sums to 1, or is NaN for a layer that got no
        slot."""
        counts = self.counts(mode)
        out = np.zeros((len(counts), max((len(c["expert_tokens"]) for c in counts), default=0)))
        for i, c in enumerate(counts):
            row = shares(c["expert_tokens"])
            out[i, : len(c["expert_tokens"])] = np.nan if row is None else row
        return out

    def balance(self, mode: str | None = None) -> list[dict[str, Any]]:
        """Per layer: ``layer`` and :func:`load_stats` of its expert_tokens."""
        return [{"layer": i, **load_stats(c["expert_tokens"])}
                for i, c in enumerate(self.counts(mode))]

    def balance_over_steps(self) -> np.ndarray:
        """(S, L) max/mean of the expert_tokens each step added (NaN: no slots that step, or a
        step taken before the layer existed)."""
        steps = self._data().get("steps", [])
        out = np.full((len(steps), len(self.layers)), np.nan)
        for s, step in enumerate(steps):
            for i, c in enumerate(step["layers"][: len(self.layers)]):
                out[s, i] = load_stats(c["expert_tokens"])["max_over_mean"] or np.nan
        return out

    def dead_experts(self, mode: str | None = None, threshold: float = DEAD_THRESHOLD,
                     min_expected: float = MIN_EXPECTED) -> list[dict[str, Any]]:
        """:func:`dead_expert_ids` of every layer judged (see the module docstring), each with
        its numbers."""
        dead = []
        for i, c in enumerate(self.counts(mode)):
            (slots, expected), x = judged(c, min_expected), c["expert_tokens"]
            dead += [{"layer": i, "expert": e, "tokens": int(x[e]), "share": x[e] / slots,
                      "uniform_share": 1 / len(x), "threshold_share": threshold / len(x),
                      "layer_slots": slots, "expected_tokens": expected}
                     for e in dead_expert_ids(c, threshold, min_expected) or ()]
        return dead

    def collapse(self, mode: str | None = None, max_fraction: float = 0.9,
                 min_entropy: float = 0.1,
                 min_expected: float = MIN_EXPECTED) -> list[dict[str, Any]]:
        """Per layer: ``collapsing`` (``None`` when too small to judge) is ``by_load`` (the
        busiest expert gets more than ``max_fraction`` of the tokens, judged when uniform
        routing gives it less: mean_k / E < ``max_fraction``) or ``by_entropy`` (mean router
        entropy / ln(E) below ``min_entropy``, when measured), with the numbers."""
        out = []
        for i, c in enumerate(self.counts(mode)):
            x, tokens = c["expert_tokens"], c["tokens"]
            slots, expected = judged(c, min_expected)
            top = int(np.argmax(x)) if slots else None
            fraction = _div(x[top], tokens) if top is not None else None
            norm = layer_metrics(c, self.has_router_stats)["normalized_entropy"]
            by_load = bool(expected) and slots / tokens / len(x) < max_fraction < fraction
            by_entropy = bool(expected) and norm is not None and norm < min_entropy
            out.append({"layer": i, "collapsing": (by_load or by_entropy) if expected else None,
                        "by_load": by_load, "by_entropy": by_entropy, "top_expert": top,
                        "max_share": _div(x[top], slots) if top is not None else None,
                        "max_token_fraction": fraction, "normalized_entropy": norm,
                        "max_fraction": max_fraction, "min_entropy": min_entropy,
                        "tokens": int(tokens)})
        return out

    def drop_rate(self, mode: str | None = None) -> list[float | None]:
        """Per layer: dropped / (dropped + routed slots); ``None`` for a layer with neither."""
        return [m["drop_rate"] for m in self.metrics(mode)]

    # ----- token level ---------------------------------------------------------------------
    def coactivation(self, layer: int, mode: str | None = None) -> np.ndarray:
        """(E, E) int64: ``[i, j]`` (i != j) counts sampled tokens (trace rows and events) of
        ``layer`` routed to both i and j; ``[i, i]`` counts those routed to i."""
        self._layer(layer)
        E = len(self.counts()[int(layer)]["expert_tokens"])
        out = np.zeros((E, E), dtype=np.int64)
        for row in self._rows(mode, int(layer)):
            ids = np.asarray([e for e in row["experts"] if 0 <= e < E], dtype=np.int64)
            out[np.ix_(ids, ids)] += 1
        return out

    def paths(self, top: int = 10, mode: str | None = None) -> list[dict[str, Any]]:
        """The ``top`` most frequent cross-layer paths of :func:`top1_expert` (``None`` for a
        token given no expert). Trace rows are matched across layers by (``call``, ``mode``,
        ``index``); a token counts only when every traced layer has its row. Each: ``path``
        (one expert per entry of ``layers``), ``layers``, ``count``, ``share``."""
        self.counts(mode)  # checks mode
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise InputError("top", f"expected an int >= 0, got {top!r}")
        rows = [r for r in self._data().get("trace", ()) if mode is None or r["mode"] == mode]
        layers = sorted({r["layer"] for r in rows})
        groups: dict[tuple[Any, ...], dict[int, int | None]] = {}
        for r in rows:
            groups.setdefault((r["call"], r["mode"], r["index"]), {})[r["layer"]] = top1_expert(r)
        complete = Counter(tuple(g[i] for i in layers) for g in groups.values()
                           if len(g) == len(layers))
        total = sum(complete.values())
        ranked = sorted(complete.items(),
                        key=lambda kv: (-kv[1], [-1 if e is None else e for e in kv[0]]))
        return [{"path": list(p), "layers": layers, "count": n, "share": n / total}
                for p, n in ranked[:top]]

    def k_distribution(self, by: str = "layer", mode: str | None = None,
                       layer: int | None = None) -> list[dict[str, Any]]:
        """Experts-per-token histograms: ``by="layer"`` from the totals (``{"layer", "counts",
        "fractions", "mean"}``; ``fractions`` and ``mean`` are ``None`` without tokens);
        ``by="position"`` from trace rows and events with a position (``{"position", "counts",
        "tokens", "mean"}``, of ``layer`` or all layers)."""
        if by == "layer":
            return [{"layer": i, "counts": [int(v) for v in c["k_hist"]],
                     "fractions": shares([int(v) for v in c["k_hist"]]),
                     "mean": mean_k(c["k_hist"])} for i, c in enumerate(self.counts(mode))]
        if by != "position":
            raise InputError("by", f"expected 'layer' or 'position', got {by!r}")
        if layer is not None:
            self._layer(layer)
        rows = [r for r in self._rows(mode, layer) if r.get("position") is not None]
        K = max((len(r["experts"]) for r in rows), default=0)
        hist: dict[int, list[int]] = {}
        for r in rows:
            hist.setdefault(int(r["position"]), [0] * (K + 1))[len(r["experts"])] += 1
        return [{"position": p, "counts": h, "tokens": sum(h), "mean": mean_k(h)}
                for p, h in sorted(hist.items())]

    # ----- summaries -----------------------------------------------------------------------
    def routing_stats(self, mode: str | None = None) -> dict[str, Any]:
        """Per-layer statistics (the layer's counts, ``utilization`` (:func:`shares`) and
        :func:`layer_metrics`) and an ``overall`` summary, as plain JSON values."""
        layers, known = [], self.has_router_stats
        for i, (info, c) in enumerate(zip(self.layers, self.counts(mode), strict=True)):
            x = [int(v) for v in c["expert_tokens"]]
            layers.append({
                "layer": i, "name": info.get("name"), "num_experts": len(x),
                "max_slots": info.get("max_slots"), "tokens": int(c["tokens"]),
                "calls": int(c["calls"]), "slots": sum(x), "expert_tokens": x,
                "k_histogram": [int(v) for v in c["k_hist"]], "dropped": int(c["dropped"]),
                "utilization": shares(x), **layer_metrics(c, known)})
        return {"mode": mode or "all", "layers": layers, "overall": _overall(layers, known)}

    def detect_issues(self, mode: str | None = None, *, dead_threshold: float = DEAD_THRESHOLD,
                      min_expected: float = MIN_EXPECTED, max_fraction: float = 0.9,
                      min_entropy: float = 0.1, imbalance_warning: float = 2.0,
                      imbalance_error: float = 4.0, drop_warning: float = 0.01,
                      drop_error: float = 0.1) -> list[dict[str, Any]]:
        """Problems found, each ``{"kind", "layer", "severity", "message", "evidence"}``:

        * ``dead_expert``: :meth:`dead_experts` of a layer (error when half of its experts);
        * ``collapse``: :meth:`collapse` (error when one expert takes the tokens, a warning
          for low entropy alone);
        * ``imbalance``: max/mean >= ``imbalance_warning`` (error from ``imbalance_error``),
          in layers judged;
        * ``drops``: drop rate >= ``drop_warning`` (error from ``drop_error``).
        """
        from .suggestions import find_issues

        return find_issues(self, mode, dead_threshold=dead_threshold, min_expected=min_expected,
                           max_fraction=max_fraction, min_entropy=min_entropy,
                           imbalance_warning=imbalance_warning, imbalance_error=imbalance_error,
                           drop_warning=drop_warning, drop_error=drop_error)

    def generate_optimization_suggestions(self, mode: str | None = None, *,
                                          near_max: float = 0.9, z_loss_limit: float = 100.0,
                                          **thresholds: Any) -> list[dict[str, Any]]:
        """Config changes suggested by :meth:`detect_issues` (``thresholds`` pass through to it)
        and by the means of :meth:`routing_stats`: mean experts/token >= ``near_max`` x
        ``max_experts`` in a dynamic layer, mean z-loss > ``z_loss_limit``. Each
        ``{"suggestion", "reason", "evidence"}``; layers with the same suggestion are merged
        (``evidence["layers"]`` and one ``evidence["per_layer"]`` entry each). See
        :mod:`moe_router.debug.suggestions`."""
        from .suggestions import suggest

        return suggest(self.layers, self.routing_stats(mode)["layers"],
                       self.detect_issues(mode, **thresholds), near_max, z_loss_limit)

    def analyze_expert_utilization(self, events: Iterable[Mapping[str, Any]],
                                   num_experts: int | None = None, *,
                                   threshold: float = DEAD_THRESHOLD,
                                   min_expected: float = MIN_EXPECTED) -> dict[str, Any]:
        """Utilisation of manual events (the older debugger's API): ``total_events``,
        ``expert_utilization`` (shares of all layers' slots per expert id; ``None`` without
        slots), ``layers`` (tokens, expert_tokens, utilization, balance numbers, mean experts and
        confidence, the ids of the dead experts) and ``dead_experts`` (:meth:`dead_experts`).
        Does not change this analyzer's session."""
        other = MoEAnalyzer(session_from_events(events, num_experts=num_experts))
        stats = other.routing_stats()["layers"]
        dead = other.dead_experts(threshold=threshold, min_expected=min_expected)
        pooled = [0] * max((s["num_experts"] for s in stats), default=0)
        for s in stats:
            pooled[: s["num_experts"]] = [a + b for a, b in zip(pooled, s["expert_tokens"])]
        keys = ("layer", "num_experts", "tokens", "expert_tokens", "utilization",
                "max_over_mean", "cv", "jain", "mean_experts")
        return {"total_events": len(other._data()["events"]),
                "expert_utilization": shares(pooled),
                "layers": [{**{k: s[k] for k in keys}, "mean_confidence": s["mean_top1"],
                            "dead_experts": [d["expert"] for d in dead if d["layer"] == s["layer"]]}
                           for s in stats],
                "dead_experts": dead}


def _overall(layers: list[dict[str, Any]], known: bool) -> dict[str, Any]:
    """Token-weighted means and extremes over the rows of :meth:`MoEAnalyzer.routing_stats`."""
    tokens = sum(s["tokens"] for s in layers)
    slots, dropped = sum(s["slots"] for s in layers), sum(s["dropped"] for s in layers)
    ratios = [s["max_over_mean"] for s in layers if s["max_over_mean"] is not None]
    jains = [s["jain"] for s in layers if s["jain"] is not None]
    entropy = sum(s["mean_entropy"] * s["tokens"] for s in layers if s["mean_entropy"] is not None)
    return {"layers": len(layers), "tokens": tokens, "calls": sum(s["calls"] for s in layers),
            "slots": slots, "dropped": dropped, "drop_rate": _div(dropped, dropped + slots),
            "mean_experts": _div(sum(s["mean_experts"] * sum(s["k_histogram"]) for s in layers
                                     if s["mean_experts"] is not None),
                                 sum(sum(s["k_histogram"]) for s in layers)),
            "mean_entropy": _div(entropy, tokens) if known else None,
            "mean_top1": _div(sum((s["mean_top1"] or 0.0) * s["tokens"] for s in layers), tokens),
            "worst_max_over_mean": max(ratios, default=None),
            "mean_jain": _div(sum(jains), len(jains)), "min_jain": min(jains, default=None)}
