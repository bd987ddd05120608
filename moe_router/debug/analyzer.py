"""MoEAnalyzer: load balance, dead experts, collapse, drops and suggestions from a session record.

Every number comes from the session dict (see :mod:`moe_router.debug.session`). "Slots" are
routing slots (a token routed to k experts fills k), so an expert's *share* is its fraction of
the layer's slots and a uniform layer gives every expert 1/E. Means that a session does not know
(router entropy, z-loss and aux losses of manual events, whose ``framework`` is ``None``; any mean
over zero tokens) are ``None`` in dict results and NaN in arrays.

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

ISSUE_KINDS = ("dead_expert", "collapse", "imbalance", "drops")


def load_stats(expert_tokens: Sequence[float]) -> dict[str, float | None]:
    """``max_over_mean``, ``cv`` (population std / mean) and ``jain`` ((sum x)^2 / (E sum x^2),
    in [1/E, 1], 1 = equal loads) of per-expert loads; ``None`` when the loads sum to 0."""
    x = np.asarray(expert_tokens, dtype=np.float64)
    if x.size == 0 or x.sum() <= 0:
        return {"max_over_mean": None, "cv": None, "jain": None}
    mean = x.mean()
    return {"max_over_mean": float(x.max() / mean), "cv": float(x.std() / mean),
            "jain": float(x.sum() ** 2 / (x.size * (x ** 2).sum()))}


def _div(a: float, b: float) -> float | None:
    return float(a) / b if b else None


def _top1(row: Mapping[str, Any]) -> int | None:
    """The expert of a trace row / event with the largest weight (the first on ties)."""
    experts, weights = row["experts"], row["weights"]
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
        """(L, E) float64 shares of slots (E = the most experts of any layer, zero-padded); each
        row sums to 1, or is all zero for a layer that saw no tokens."""
        counts = self.counts(mode)
        out = np.zeros((len(counts), max((len(c["expert_tokens"]) for c in counts), default=0)))
        for i, c in enumerate(counts):
            x = np.asarray(c["expert_tokens"], dtype=np.float64)
            if x.sum() > 0:
                out[i, : x.size] = x / x.sum()
        return out

    def balance(self, mode: str | None = None) -> list[dict[str, Any]]:
        """Per layer: ``layer`` and :func:`load_stats` of its expert_tokens."""
        return [{"layer": i, **load_stats(c["expert_tokens"])}
                for i, c in enumerate(self.counts(mode))]

    def balance_over_steps(self) -> np.ndarray:
        """(S, L) max/mean of the expert_tokens each step added (NaN: no tokens that step)."""
        steps = self._data().get("steps", [])
        out = np.full((len(steps), len(self.layers)), np.nan)
        for s, step in enumerate(steps):
            for i, c in enumerate(step["layers"][: len(self.layers)]):
                value = load_stats(c["expert_tokens"])["max_over_mean"]
                out[s, i] = np.nan if value is None else value
        return out

    def _judged(self, counts: Mapping[str, Any], min_expected: float) -> tuple[int, float]:
        """(slots, expected per expert), expected 0.0 when the layer is too small to judge."""
        slots, E = int(sum(counts["expert_tokens"])), len(counts["expert_tokens"])
        expected = slots / E if E and counts["tokens"] else 0.0
        return slots, expected if expected >= min_expected else 0.0

    def dead_experts(self, mode: str | None = None, threshold: float = 0.05,
                     min_expected: float = 20.0) -> list[dict[str, Any]]:
        """Experts whose share is below ``threshold / E`` (``threshold`` times the uniform share),
        in layers judged (see the module docstring); each with its numbers."""
        dead = []
        for i, c in enumerate(self.counts(mode)):
            slots, expected = self._judged(c, min_expected)
            if not expected:
                continue
            E = len(c["expert_tokens"])
            for e, n in enumerate(c["expert_tokens"]):
                if n / slots < threshold / E:
                    dead.append({"layer": i, "expert": e, "tokens": int(n), "share": n / slots,
                                 "uniform_share": 1 / E, "threshold_share": threshold / E,
                                 "layer_slots": slots, "expected_tokens": expected})
        return dead

    def collapse(self, mode: str | None = None, max_fraction: float = 0.9,
                 min_entropy: float = 0.1, min_expected: float = 20.0) -> list[dict[str, Any]]:
        """Per layer: ``collapsing`` (``None`` when too small to judge) is ``by_load`` (the
        busiest expert gets more than ``max_fraction`` of the tokens, judged when uniform
        routing gives it less: mean_k / E < ``max_fraction``) or ``by_entropy`` (mean router
        entropy / ln(E) below ``min_entropy``, when measured), with the numbers."""
        out = []
        for i, c in enumerate(self.counts(mode)):
            x, tokens = c["expert_tokens"], c["tokens"]
            slots, expected = self._judged(c, min_expected)
            top = int(np.argmax(x)) if slots else None
            fraction = _div(x[top], tokens) if top is not None else None
            entropy = _div(c["entropy_sum"], tokens) if self.has_router_stats else None
            norm = entropy / math.log(len(x)) if entropy is not None and len(x) > 1 else None
            by_load = bool(expected) and slots / tokens / len(x) < max_fraction < fraction
            by_entropy = bool(expected) and norm is not None and norm < min_entropy
            out.append({"layer": i, "collapsing": (by_load or by_entropy) if expected else None,
                        "by_load": by_load, "by_entropy": by_entropy, "top_expert": top,
                        "max_share": _div(x[top], slots) if top is not None else None,
                        "max_token_fraction": fraction, "normalized_entropy": norm,
                        "max_fraction": max_fraction, "min_entropy": min_entropy,
                        "tokens": int(tokens)})
        return out

    def drop_rate(self, mode: str | None = None) -> list[float]:
        """Per layer: dropped / (dropped + routed slots); 0.0 for a layer with neither."""
        return [_div(c["dropped"], c["dropped"] + sum(c["expert_tokens"])) or 0.0
                for c in self.counts(mode)]

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
        """The ``top`` most frequent cross-layer paths of top-1 experts (largest weight; ``None``
        for a token given no expert). Trace rows are matched across layers by (``call``,
        ``mode``, ``index``); a token counts only when every traced layer has its row. Each:
        ``path`` (one expert per entry of ``layers``), ``layers``, ``count``, ``share``."""
        self.counts(mode)  # checks mode
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise InputError("top", f"expected an int >= 0, got {top!r}")
        rows = [r for r in self._data().get("trace", ()) if mode is None or r["mode"] == mode]
        layers = sorted({r["layer"] for r in rows})
        groups: dict[tuple[Any, ...], dict[int, int | None]] = {}
        for r in rows:
            groups.setdefault((r["call"], r["mode"], r["index"]), {})[r["layer"]] = _top1(r)
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
        "fractions", "mean"}``); ``by="position"`` from trace rows and events with a position
        (``{"position", "counts", "tokens", "mean"}``, of ``layer`` or all layers)."""
        if by == "layer":
            out = []
            for i, c in enumerate(self.counts(mode)):
                h = [int(v) for v in c["k_hist"]]
                n = sum(h)
                out.append({"layer": i, "counts": h,
                            "fractions": [v / n if n else 0.0 for v in h],
                            "mean": _div(sum(k * v for k, v in enumerate(h)), n)})
            return out
        if by != "position":
            raise InputError("by", f"expected 'layer' or 'position', got {by!r}")
        if layer is not None:
            self._layer(layer)
        rows = [r for r in self._rows(mode, layer) if r.get("position") is not None]
        K = max((len(r["experts"]) for r in rows), default=0)
        hist: dict[int, list[int]] = {}
        for r in rows:
            hist.setdefault(int(r["position"]), [0] * (K + 1))[len(r["experts"])] += 1
        return [{"position": p, "counts": h, "tokens": sum(h),
                 "mean": sum(k * v for k, v in enumerate(h)) / sum(h)}
                for p, h in sorted(hist.items())]

    # ----- summaries -----------------------------------------------------------------------
    def routing_stats(self, mode: str | None = None) -> dict[str, Any]:
        """Per-layer statistics and an ``overall`` summary, as plain JSON values."""
        known, layers = self.has_router_stats, []
        for i, (info, c) in enumerate(zip(self.layers, self.counts(mode))):
            tokens, calls = int(c["tokens"]), int(c["calls"])
            x = [int(v) for v in c["expert_tokens"]]
            slots, kh = sum(x), [int(v) for v in c["k_hist"]]
            entropy = _div(c["entropy_sum"], tokens) if known else None
            E = len(x)
            layers.append({
                "layer": i, "name": info.get("name"), "num_experts": E,
                "max_slots": info.get("max_slots"), "tokens": tokens, "calls": calls,
                "slots": slots, "expert_tokens": x, "k_histogram": kh,
                "mean_experts": _div(sum(k * v for k, v in enumerate(kh)), sum(kh)),
                "mean_entropy": entropy,
                "normalized_entropy": entropy / math.log(E) if entropy is not None and E > 1
                else None,
                "mean_top1": _div(c["top1_sum"], tokens),
                "mean_z_loss": _div(c["z_loss_sum"], tokens) if known else None,
                "mean_balance_loss": _div(c["balance_sum"], calls) if known else None,
                "mean_aux_loss": _div(c["aux_loss_sum"], calls) if known else None,
                "dropped": int(c["dropped"]),
                "drop_rate": _div(c["dropped"], c["dropped"] + slots) or 0.0,
                **load_stats(x),
                "utilization": [v / slots if slots else 0.0 for v in x]})
        return {"mode": mode or "all", "layers": layers, "overall": _overall(layers, known)}

    def detect_issues(self, mode: str | None = None, *, dead_threshold: float = 0.05,
                      min_expected: float = 20.0, max_fraction: float = 0.9,
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
        issues: list[dict[str, Any]] = []

        def add(kind: str, layer: int, error: bool, message: str, **evidence: Any) -> None:
            issues.append({"kind": kind, "layer": layer,
                           "severity": "error" if error else "warning",
                           "message": f"layer {layer}: {message}", "evidence": evidence})

        counts = self.counts(mode)
        dead = self.dead_experts(mode, dead_threshold, min_expected)
        for i, c in enumerate(counts):
            mine, E = [d for d in dead if d["layer"] == i], len(c["expert_tokens"])
            if mine:
                add("dead_expert", i, 2 * len(mine) >= E,
                    f"{len(mine)} of {E} experts get < {dead_threshold:g} of the uniform share "
                    f"(experts {', '.join(str(d['expert']) for d in mine)})",
                    experts=[d["expert"] for d in mine], tokens=[d["tokens"] for d in mine],
                    shares=[d["share"] for d in mine], num_experts=E,
                    layer_slots=mine[0]["layer_slots"], threshold=dead_threshold,
                    threshold_share=dead_threshold / E, min_expected=min_expected)
        for col in self.collapse(mode, max_fraction, min_entropy, min_expected):
            why = [f"expert {col['top_expert']} gets {col['max_token_fraction']:.1%} of the "
                   f"tokens"] if col["by_load"] else []
            if col["by_entropy"]:
                why.append(f"normalised router entropy {col['normalized_entropy']:.3f}")
            if col["collapsing"]:  # an error when one expert takes the tokens, else a warning
                add("collapse", col["layer"], col["by_load"], "routing collapse: "
                    + "; ".join(why), **{k: v for k, v in col.items() if k != "layer"})
        for row in self.balance(mode):
            i, ratio = row["layer"], row["max_over_mean"]
            if self._judged(counts[i], min_expected)[1] and ratio is not None \
                    and ratio >= imbalance_warning:
                add("imbalance", i, ratio >= imbalance_error,
                    f"the busiest expert gets {ratio:.2f}x the mean load",
                    **{k: v for k, v in row.items() if k != "layer"},
                    warning_threshold=imbalance_warning, error_threshold=imbalance_error)
        for i, rate in enumerate(self.drop_rate(mode)):
            if rate >= drop_warning:
                add("drops", i, rate >= drop_error,
                    f"{rate:.2%} of routing slots were dropped by the capacity limit",
                    drop_rate=rate, dropped=int(counts[i]["dropped"]),
                    routed_slots=int(sum(counts[i]["expert_tokens"])),
                    warning_threshold=drop_warning, error_threshold=drop_error)
        issues.sort(key=lambda d: (d["layer"], ISSUE_KINDS.index(d["kind"])))
        return issues

    def generate_optimization_suggestions(self, mode: str | None = None, *,
                                          near_max: float = 0.9, z_loss_limit: float = 100.0,
                                          **thresholds: Any) -> list[dict[str, Any]]:
        """Config changes suggested by :meth:`detect_issues` (``thresholds`` pass through to it)
        and by the means of :meth:`routing_stats`: mean experts/token >= ``near_max`` x
        ``max_experts`` in a dynamic layer, mean z-loss > ``z_loss_limit``. Each
        ``{"suggestion", "reason", "evidence"}``; layers with the same suggestion are merged
        (``evidence["layers"]`` and one ``evidence["per_layer"]`` entry each)."""
        return _suggest(self.layers, self.routing_stats(mode)["layers"],
                        self.detect_issues(mode, **thresholds), near_max, z_loss_limit)

    def analyze_expert_utilization(self, events: Iterable[Mapping[str, Any]],
                                   num_experts: int | None = None, *, threshold: float = 0.05,
                                   min_expected: float = 20.0) -> dict[str, Any]:
        """Utilisation of manual events (the older debugger's API): ``total_events``,
        ``expert_utilization`` (shares of all layers' slots per expert id), ``layers`` (tokens,
        expert_tokens, utilization, balance numbers, mean experts and confidence, dead experts
        per layer) and ``dead_experts``. Does not change this analyzer's session."""
        other = MoEAnalyzer(session_from_events(events, num_experts=num_experts))
        stats = other.routing_stats()["layers"]
        dead = other.dead_experts(threshold=threshold, min_expected=min_expected)
        width = max((s["num_experts"] for s in stats), default=0)
        pooled = np.zeros(width)
        for s in stats:
            pooled[: s["num_experts"]] += s["expert_tokens"]
        keys = ("layer", "num_experts", "tokens", "expert_tokens", "utilization",
                "max_over_mean", "cv", "jain", "mean_experts")
        return {"total_events": len(other._data()["events"]),
                "expert_utilization": (pooled / pooled.sum() if pooled.sum() else pooled).tolist(),
                "layers": [{**{k: s[k] for k in keys}, "mean_confidence": s["mean_top1"],
                            "dead_experts": [d["expert"] for d in dead if d["layer"] == s["layer"]]}
                           for s in stats],
                "dead_experts": dead}


def _overall(layers: list[dict[str, Any]], known: bool) -> dict[str, Any]:
    tokens = sum(s["tokens"] for s in layers)
    slots, dropped = sum(s["slots"] for s in layers), sum(s["dropped"] for s in layers)
    k_tokens = sum(sum(s["k_histogram"]) for s in layers)
    ratios = [s["max_over_mean"] for s in layers if s["max_over_mean"] is not None]
    jains = [s["jain"] for s in layers if s["jain"] is not None]
    entropy = sum(s["mean_entropy"] * s["tokens"] for s in layers if s["mean_entropy"] is not None)
    return {"layers": len(layers), "tokens": tokens, "calls": sum(s["calls"] for s in layers),
            "slots": slots, "dropped": dropped, "drop_rate": _div(dropped, dropped + slots) or 0.0,
            "mean_experts": _div(sum(k * v for s in layers for k, v in enumerate(s["k_histogram"])),
                                 k_tokens),
            "mean_entropy": _div(entropy, tokens) if known else None,
            "mean_top1": _div(sum((s["mean_top1"] or 0.0) * s["tokens"] for s in layers), tokens),
            "worst_max_over_mean": max(ratios, default=None),
            "mean_jain": _div(sum(jains), len(jains)), "min_jain": min(jains, default=None)}


def _router(layer: Mapping[str, Any]) -> Mapping[str, Any]:
    """The layer's router config dict (``{}`` when unknown)."""
    config = layer.get("config") or {}
    return config.get("router") or config


def _suggest(layers: list[dict[str, Any]], stats: list[dict[str, Any]],
             issues: list[dict[str, Any]], near_max: float,
             z_loss_limit: float) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}

    def add(text: str, reason: str, layer: int, **evidence: Any) -> None:
        entry = found.setdefault(text, {"suggestion": text, "reason": reason,
                                        "evidence": {"layers": [], "per_layer": []}})
        if layer not in entry["evidence"]["layers"]:
            entry["evidence"]["layers"].append(layer)
        entry["evidence"]["per_layer"].append({"layer": layer, **evidence})

    for issue in issues:
        i, kind, why, ev = issue["layer"], issue["kind"], issue["message"], issue["evidence"]
        rc = _router(layers[i])
        if kind in ("dead_expert", "collapse", "imbalance"):
            coef = rc.get("aux_loss_coef")
            add("raise the load-balancing loss coefficient (router.aux_loss_coef)" if coef is None
                else f"raise router.aux_loss_coef from {coef:g} to {2 * coef:g} or more"
                if coef > 0 else "set router.aux_loss_coef > 0 (e.g. 0.01)", why, i,
                kind=kind, **ev)
            rate = rc.get("bias_update_rate")
            add(f"raise router.bias_update_rate from {rate:g} to {2 * rate:g}"
                if rc.get("use_expert_bias") and rate else
                "enable aux-loss-free balancing (router.use_expert_bias=True)", why, i,
                kind=kind, **ev)
        if kind == "collapse" and rc.get("noise", "none") == "none":
            add("add router noise in training (router.noise='jitter')", why, i, **ev)
        if kind == "drops":
            cf = rc.get("capacity_factor")
            add(f"raise router.capacity_factor from {cf:g} to {1.25 * cf:g} or more, or set it "
                f"to None (dropless)" if cf else
                "raise router.capacity_factor, or set it to None (dropless)", why, i, **ev)
    knobs = {"top_p": "top_p", "threshold": "threshold", "complexity": "target_experts"}
    for s in stats:
        i, info = s["layer"], layers[s["layer"]]
        rc, strategy = _router(info), info.get("strategy")
        lo, hi = info.get("min_experts") or 0, info.get("max_experts") or info.get("max_slots")
        mean, knob = s["mean_experts"], knobs.get(strategy or "")
        if _dynamic(strategy) and None not in (hi, mean) and hi > lo and mean >= near_max * hi:
            value = rc.get(knob) if knob else None
            add(f"lower router.{knob} from {value:g} (or raise router.max_experts)"
                if value is not None else f"route fewer experts per token with strategy "
                f"{strategy!r} (or raise router.max_experts)",
                f"layer {i}: mean experts per token {mean:.2f} >= {near_max:g} x "
                f"max_experts={hi}", i, mean_experts=mean, min_experts=lo, max_experts=hi,
                near_max=near_max, k_histogram=s["k_histogram"])
        z = s["mean_z_loss"]
        if z is not None and z > z_loss_limit:
            coef = rc.get("z_loss_coef")
            add(f"raise router.z_loss_coef from {coef:g} to {10 * coef:g}" if coef else
                "set router.z_loss_coef > 0 (e.g. 1e-3) to keep router logits small",
                f"layer {i}: mean z-loss {z:.3g} > {z_loss_limit:g}", i, mean_z_loss=z,
                z_loss_limit=z_loss_limit)
    return list(found.values())


def _dynamic(strategy: str | None) -> bool:
    """Whether a registered strategy gives tokens a varying number of experts."""
    from ..errors import MoERouterError
    from ..registry import default_registry

    try:
        return strategy is not None and default_registry().strategy_spec(strategy).dynamic
    except MoERouterError:
        return False
