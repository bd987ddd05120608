"""Issues and optimisation suggestions: judgements on the numbers of
:class:`~moe_router.debug.analyzer.MoEAnalyzer`.

Nothing is computed here that the analyzer module does not define (:func:`layer_metrics
<moe_router.debug.analyzer.layer_metrics>`, :meth:`dead_experts
<moe_router.debug.analyzer.MoEAnalyzer.dead_experts>`, :meth:`collapse
<moe_router.debug.analyzer.MoEAnalyzer.collapse>`, ...): :func:`find_issues` compares those
numbers with thresholds, :func:`suggest` turns issues and per-layer means into config changes.
The public entry points are :meth:`MoEAnalyzer.detect_issues
<moe_router.debug.analyzer.MoEAnalyzer.detect_issues>` and
:meth:`MoEAnalyzer.generate_optimization_suggestions
<moe_router.debug.analyzer.MoEAnalyzer.generate_optimization_suggestions>`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .analyzer import judged

ISSUE_KINDS = ("dead_expert", "collapse", "imbalance", "drops")

if TYPE_CHECKING:
    from .analyzer import MoEAnalyzer


def find_issues(analyzer: MoEAnalyzer, mode: str | None, *, dead_threshold: float,
                min_expected: float, max_fraction: float, min_entropy: float,
                imbalance_warning: float, imbalance_error: float, drop_warning: float,
                drop_error: float) -> list[dict[str, Any]]:
    """What :meth:`MoEAnalyzer.detect_issues` returns (see there)."""
    issues: list[dict[str, Any]] = []

    def add(kind: str, layer: int, error: bool, message: str, **evidence: Any) -> None:
        issues.append({"kind": kind, "layer": layer, "severity": "error" if error else "warning",
                       "message": f"layer {layer}: {message}", "evidence": evidence})

    counts = analyzer.counts(mode)
    dead = analyzer.dead_experts(mode, dead_threshold, min_expected)
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
    for col in analyzer.collapse(mode, max_fraction, min_entropy, min_expected):
        why = [f"expert {col['top_expert']} gets {col['max_token_fraction']:.1%} of the "
               f"tokens"] if col["by_load"] else []
        if col["by_entropy"]:
            why.append(f"normalised router entropy {col['normalized_entropy']:.3f}")
        if col["collapsing"]:  # an error when one expert takes the tokens, else a warning
            add("collapse", col["layer"], col["by_load"], "routing collapse: " + "; ".join(why),
                **{k: v for k, v in col.items() if k != "layer"})
    for row in analyzer.balance(mode):
        i, ratio = row["layer"], row["max_over_mean"]
        if judged(counts[i], min_expected)[1] and ratio is not None \
                and ratio >= imbalance_warning:
            add("imbalance", i, ratio >= imbalance_error,
                f"the busiest expert gets {ratio:.2f}x the mean load",
                **{k: v for k, v in row.items() if k != "layer"},
                warning_threshold=imbalance_warning, error_threshold=imbalance_error)
    for i, rate in enumerate(analyzer.drop_rate(mode)):
        if rate is not None and rate >= drop_warning:
            add("drops", i, rate >= drop_error,
                f"{rate:.2%} of routing slots were dropped by the capacity limit",
                drop_rate=rate, dropped=int(counts[i]["dropped"]),
                routed_slots=int(sum(counts[i]["expert_tokens"])),
                warning_threshold=drop_warning, error_threshold=drop_error)
    issues.sort(key=lambda d: (d["layer"], ISSUE_KINDS.index(d["kind"])))
    return issues


def _router(layer: Mapping[str, Any]) -> Mapping[str, Any]:
    """The layer's router config dict (``{}`` when unknown)."""
    config = layer.get("config") or {}
    return config.get("router") or config


def suggest(layers: list[dict[str, Any]], stats: list[dict[str, Any]],
            issues: list[dict[str, Any]], near_max: float,
            z_loss_limit: float) -> list[dict[str, Any]]:
    """What :meth:`MoEAnalyzer.generate_optimization_suggestions` returns, from the session's
    ``layers``, the rows of :meth:`MoEAnalyzer.routing_stats` and the issues found."""
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
