"""Analyses on top of trained arms: the inference-time strategy switch, mean k per token class
of the synthetic task (bootstrap CIs), the per-byte loss / k correlation, and the choice of
the best dynamic arm against the static top-1 / top-2 frontier."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moe_router.torch import set_strategy

from .data import CLASSES
from .model import TinyMoELM
from .train import LN2, evaluate

BOOTSTRAP = 2000
#: strategies swept on the trained top-2 model without retraining: (family, field, values,
#: extra RouterConfig changes)
SWITCH_SWEEP: tuple[tuple[str, str, tuple[float, ...], dict[str, Any]], ...] = (
    ("top-k", "k", (1, 2, 3), {"strategy": "top_k"}),
    ("top-p (renormalized)", "top_p", (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
     {"strategy": "top_p", "normalize_weights": True}),
    ("top-p (raw P)", "top_p", (0.4, 0.6, 0.8, 0.9), {"strategy": "top_p"}),
    ("threshold (renormalized)", "threshold", (0.3, 0.5, 0.6, 0.7, 0.8, 0.9),
     {"strategy": "threshold", "normalize_weights": True}),
)


# ----- statistics ------------------------------------------------------------------------------
def bootstrap_mean_ci(sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                      n: int = BOOTSTRAP) -> tuple[float, float, float]:
    """Ratio-of-sums mean over units (``sums[i] / counts[i]`` pooled) and its 95% percentile
    bootstrap interval, resampling units (sequences) with replacement."""
    mean = float(sums.sum() / max(counts.sum(), 1))
    idx = rng.integers(0, len(sums), size=(n, len(sums)))
    boot = sums[idx].sum(1) / np.maximum(counts[idx].sum(1), 1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return mean, float(lo), float(hi)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1 with ties given their average rank (for Spearman's rho)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x))
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / counts)[inverse]


def pearson(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson's r; ``None`` when either side is constant (e.g. static top-k)."""
    if a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def loss_k_correlation(ce_NS: np.ndarray, k_LNS: np.ndarray, rng: np.random.Generator,
                       n: int = 200) -> dict[str, Any]:
    """Correlation of per-byte loss with per-byte k (mean over layers) on validation:
    Pearson, Spearman, and a bootstrap 95% interval of Spearman over windows."""
    k_NS = k_LNS.mean(0)
    ce, k = ce_NS.ravel(), k_NS.ravel()
    out: dict[str, Any] = {"pearson": pearson(ce, k),
                           "spearman": pearson(average_ranks(ce), average_ranks(k))}
    if out["spearman"] is None:
        return {**out, "spearman_ci": None}
    N = ce_NS.shape[0]
    boot = []
    for _ in range(n):
        pick = rng.integers(0, N, N)
        value = pearson(average_ranks(ce_NS[pick].ravel()), average_ranks(k_NS[pick].ravel()))
        if value is not None:
            boot.append(value)
    out["spearman_ci"] = [float(v) for v in np.percentile(boot, [2.5, 97.5])]
    # mean k of the hardest and easiest quarter of bytes (by loss)
    lo, hi = np.quantile(ce, [0.25, 0.75])
    out["k_easiest_quarter"] = float(k[ce <= lo].mean())
    out["k_hardest_quarter"] = float(k[ce >= hi].mean())
    return out


def class_stats(ce_NS: np.ndarray, k_LNS: np.ndarray, kind_NS: np.ndarray,
                rng: np.random.Generator) -> dict[str, Any]:
    """Per token class of the synthetic task: mean k (bootstrap 95% CI over sequences), k by
    layer, loss in bits and mean probability of the right token; plus arith - copy."""
    k_NS = k_LNS.mean(0)
    out: dict[str, Any] = {}
    per_seq: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for c, name in enumerate(CLASSES):
        mask = kind_NS == c
        sums, counts = (k_NS * mask).sum(1), mask.sum(1)
        per_seq[name] = (sums, counts)
        mean, lo, hi = bootstrap_mean_ci(sums, counts, rng)
        out[name] = {"k_mean": mean, "k_ci": [lo, hi],
                     "k_by_layer": [float(k[mask].mean()) for k in k_LNS],
                     "bits": float(ce_NS[mask].mean() / LN2),
                     "p_correct": float(np.exp(-ce_NS[mask]).mean()),
                     "tokens": int(mask.sum())}
    (sa, ca), (sc, cc) = per_seq["arith"], per_seq["copy"]
    idx = rng.integers(0, len(sa), size=(BOOTSTRAP, len(sa)))
    diff = sa[idx].sum(1) / ca[idx].sum(1) - sc[idx].sum(1) / cc[idx].sum(1)
    out["arith_minus_copy"] = {"k_diff": out["arith"]["k_mean"] - out["copy"]["k_mean"],
                               "ci": [float(v) for v in np.percentile(diff, [2.5, 97.5])]}
    return out


# ----- inference-time switch -----------------------------------------------------------------
def inference_switch(model: TinyMoELM, windows: np.ndarray) -> list[dict[str, Any]]:
    """Route the trained model with other strategies (``set_strategy``, no retraining) and
    evaluate each: validation bpb against mean k."""
    points = []
    for family, name, values, changes in SWITCH_SWEEP:
        for value in values:
            routed = copy.deepcopy(model)
            set_strategy(routed, **changes, **{name: value})
            ev = evaluate(routed, windows)
            points.append({"family": family, "param": name, "value": value,
                           "val_bpb": ev["val_bpb"], "k_mean": ev["k_mean"],
                           "k_by_layer": ev["k_by_layer"]})
    return points


# ----- comparing arms ------------------------------------------------------------------------
def mean_over_runs(runs: Sequence[Mapping[str, Any]], key: str) -> float:
    """Mean of ``key`` over the seeds' runs."""
    return float(np.mean([r[key] for r in runs]))


def half_range(runs: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """Half the max - min of ``key`` over seeds (the ± of two seeds); ``None`` for one."""
    if len(runs) < 2:
        return None
    values = [r[key] for r in runs]
    return float((max(values) - min(values)) / 2)


def static_frontier(arms: Mapping[str, Any], seed: int | None = None) -> tuple[float, float] | None:
    """The line through (FLOPs, bpb) of top-1 and top-2 as ``(bpb at top-2 FLOPs, slope per
    unit FLOPs)``; ``None`` unless both ran. ``seed`` picks one seed's runs (else the mean)."""
    if "top1" not in arms or "top2" not in arms:
        return None

    def point(name: str) -> tuple[float, float]:
        runs = [r for r in arms[name]["runs"] if seed is None or r["seed"] == seed]
        runs = runs or arms[name]["runs"]
        return mean_over_runs(runs, "flops_rel_top2"), mean_over_runs(runs, "val_bpb")

    (f1, b1), (f2, b2) = point("top1"), point("top2")
    slope = (b2 - b1) / (f2 - f1) if f2 != f1 else 0.0
    return b2, slope


def excess_over_frontier(arms: Mapping[str, Any], name: str, seed: int | None = None) -> float:
    """bpb of the arm minus the static top-1/top-2 line at the arm's FLOPs (negative = better
    than interpolating static top-k); without both static arms, minus top-2's bpb."""
    runs = [r for r in arms[name]["runs"] if seed is None or r["seed"] == seed]
    runs = runs or arms[name]["runs"]
    flops, bpb = mean_over_runs(runs, "flops_rel_top2"), mean_over_runs(runs, "val_bpb")
    line = static_frontier(arms, seed)
    if line is None:
        base = mean_over_runs(arms["top2"]["runs"], "val_bpb") if "top2" in arms else 0.0
        return bpb - base
    b2, slope = line
    return bpb - (b2 + slope * (flops - 1.0))


def best_dynamic(arms: Mapping[str, Any], seed: int | None = None) -> str | None:
    """The dynamic arm with the lowest bpb relative to the static frontier at its FLOPs."""
    dynamic = [name for name, a in arms.items() if a["dynamic"]]
    if not dynamic:
        return None
    return min(dynamic, key=lambda name: excess_over_frontier(arms, name, seed))
