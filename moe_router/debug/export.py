"""Shared numbers of the exporters and the report, computed from a SESSION RECORD.

The TensorBoard writer (:mod:`moe_router.debug.tensorboard`), the Prometheus collector
(:mod:`moe_router.debug.prometheus`) and the HTML report (:mod:`moe_router.debug.report`) all
read the plain-JSON session dict (:mod:`moe_router.debug.session`) through the helpers here, so
they agree on every number. This module imports only the standard library; ``write_tensorboard``,
``MoERouterCollector`` and ``serve_metrics`` are re-exported lazily (importing them loads
``tensorboard`` / ``prometheus_client`` only then).
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .files import validate_session
from .session import FLOAT_FIELDS, INT_FIELDS, MODES, add_counts, empty_counts

if TYPE_CHECKING:
    from .prometheus import MetricsServer, MoERouterCollector, serve_metrics
    from .tensorboard import write_tensorboard

__all__ = ["LAYER_METRICS", "MetricsServer", "MoERouterCollector", "as_session", "layer_metrics",
           "layer_totals", "router_stats_known", "serve_metrics", "utilization",
           "write_tensorboard"]

#: the per-layer metrics of :func:`layer_metrics`, each ``None`` when undefined (no tokens)
LAYER_METRICS = ("max_over_mean_load", "mean_experts", "router_entropy", "drop_rate", "top1_prob",
                 "z_loss", "balance_loss", "aux_loss", "dead_experts")

_LAZY = {"write_tensorboard": "tensorboard", "MoERouterCollector": "prometheus",
         "MetricsServer": "prometheus", "serve_metrics": "prometheus"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__package__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def as_session(source: Any, argument: str = "session") -> dict[str, Any]:
    """The session dict of ``source``: a session dict, or an object with ``to_session()``.

    Checks it with :func:`~moe_router.debug.files.validate_session`, then that every
    LAYER_COUNTS has all its fields and ``steps`` / ``trace`` / ``events`` are lists of dicts
    (``[]`` when absent). Raises :class:`~moe_router.errors.InputError` (a ``ValueError``) or
    :class:`~moe_router.errors.InputTypeError` naming ``argument``.
    """
    if not isinstance(source, Mapping) and callable(getattr(source, "to_session", None)):
        source = source.to_session()
    session = validate_session(source, argument)
    layers = session["layers"]
    for i, layer in enumerate(layers):
        bad = [k for k in ("index", "num_experts", "max_slots")
               if not isinstance(layer, Mapping) or not isinstance(layer.get(k), int)]
        if bad:
            raise InputError(f"{argument}['layers'][{i}]", f"needs the int fields {bad}")
    for mode in MODES:
        _check_counts(session["totals"].get(mode) or [], f"{argument}['totals'][{mode!r}]")
    for key in ("steps", "trace", "events"):
        session[key] = list(session.get(key) or [])
        if not all(isinstance(x, Mapping) for x in session[key]):
            raise InputError(f"{argument}[{key!r}]", "expected a list of dicts")
    for n, entry in enumerate(session["steps"]):
        rows = entry.get("layers")
        if not isinstance(rows, list) or len(rows) != len(layers) or "step" not in entry:
            raise InputError(f"{argument}['steps'][{n}]", f"needs 'step' and one LAYER_COUNTS "
                                                          f"per layer ({len(layers)}) in 'layers'")
        _check_counts(rows, f"{argument}['steps'][{n}]['layers']")
    return session


def _check_counts(rows: Sequence[Any], where: str) -> None:
    """``InputError`` unless each row is a LAYER_COUNTS dict (all fields, lists where lists)."""
    fields = (*INT_FIELDS, *FLOAT_FIELDS, "expert_tokens", "k_hist")
    for i, counts in enumerate(rows):
        if not isinstance(counts, Mapping) or any(f not in counts for f in fields) \
                or not isinstance(counts["expert_tokens"], list) \
                or not isinstance(counts["k_hist"], list):
            raise InputError(f"{where}[{i}]", f"expected a LAYER_COUNTS dict with the fields "
                                              f"{', '.join(fields)}")


def layer_totals(session: Mapping[str, Any], mode: str | None = None) -> list[dict[str, Any]]:
    """One LAYER_COUNTS per layer: ``totals[mode]``, or train + eval when ``mode`` is None."""
    if mode is not None and mode not in MODES:
        raise InputError("mode", f"expected None, 'train' or 'eval', got {mode!r}")
    out = []
    for i, layer in enumerate(session["layers"]):
        counts = empty_counts(int(layer["num_experts"]), int(layer["max_slots"]))
        for m in MODES if mode is None else (mode,):
            rows = session["totals"].get(m) or []
            if rows:
                counts = add_counts(counts, rows[i])
        out.append(counts)
    return out


def _ratio(num: float, den: float) -> float | None:
    return float(num) / float(den) if den else None


def layer_metrics(counts: Mapping[str, Any], known: bool = True) -> dict[str, float | None]:
    """Derived metrics of one LAYER_COUNTS (see :data:`LAYER_METRICS`); ``None`` when undefined.

    ``max_over_mean_load`` is max / mean of ``expert_tokens``; ``mean_experts`` is
    ``sum_k k * k_hist[k] / sum_k k_hist[k]``; ``drop_rate`` is dropped / (routed + dropped) slots;
    ``router_entropy`` (nats), ``top1_prob`` and ``z_loss`` are per-token means; ``balance_loss``
    and ``aux_loss`` per-call means; ``dead_experts`` counts experts that got no slot. With
    ``known=False`` (manual events: see :func:`router_stats_known`) the entropy, z-loss, balance
    and aux-loss means are ``None``.
    """
    expert = [int(v) for v in counts["expert_tokens"]]
    tokens, calls = int(counts["tokens"]), int(counts["calls"])
    routed, dropped = sum(expert), int(counts["dropped"])
    k_slots = sum(k * int(n) for k, n in enumerate(counts["k_hist"]))
    k_tokens = sum(int(n) for n in counts["k_hist"])
    mean_load = routed / len(expert) if expert else 0.0
    out = {
        "max_over_mean_load": _ratio(max(expert), mean_load) if expert and mean_load else None,
        "mean_experts": _ratio(k_slots, k_tokens),
        "router_entropy": _ratio(counts["entropy_sum"], tokens),
        "drop_rate": _ratio(dropped, routed + dropped),
        "top1_prob": _ratio(counts["top1_sum"], tokens),
        "z_loss": _ratio(counts["z_loss_sum"], tokens),
        "balance_loss": _ratio(counts["balance_sum"], calls),
        "aux_loss": _ratio(counts["aux_loss_sum"], calls),
        "dead_experts": float(sum(v == 0 for v in expert)) if tokens else None,
    }
    if not known:
        out.update(router_entropy=None, z_loss=None, balance_loss=None, aux_loss=None)
    return out


def router_stats_known(session: Mapping[str, Any]) -> bool:
    """Whether the entropy / z-loss / aux-loss sums were measured (not a manual-events session,
    whose ``framework`` is ``None``)."""
    return session.get("framework") is not None


def utilization(session: Mapping[str, Any], mode: str | None = None) -> list[list[float] | None]:
    """Per layer, each expert's share of the layer's routed slots (``None``: nothing routed)."""
    out: list[list[float] | None] = []
    for counts in layer_totals(session, mode):
        total = sum(counts["expert_tokens"])
        out.append([v / total for v in counts["expert_tokens"]] if total else None)
    return out


def layer_label(layer: Mapping[str, Any]) -> str:
    """``"<index>: <name>"`` (just the index when the layer has no name)."""
    name = layer.get("name")
    return f"{layer['index']}: {name}" if name else str(layer["index"])


def digest_lines(session: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The reproducibility digest as ``(label, value)`` pairs (``-`` for missing values)."""
    digest = session.get("digest") or {}
    versions = digest.get("versions") or {}
    pairs = [("digest id", digest.get("id")), ("config sha256", digest.get("config")),
             ("weights sha256", digest.get("weights")), ("inputs sha256", digest.get("inputs"))]
    out = [(label, "-" if value is None else str(value)) for label, value in pairs]
    out.append(("versions", ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) or "-"))
    return out


def to_json(value: Any) -> str:
    """Compact JSON of ``value`` (``str()`` for anything JSON cannot hold)."""
    return json.dumps(value, sort_keys=True, default=str)

