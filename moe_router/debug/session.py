"""The session record: one plain-JSON dict that every debugger output is built from.

A :class:`~moe_router.debug.MoEDebugger` session, a list of manual routing events and an exported
file all become this dict (format ``moe-router-session/1``); :class:`~moe_router.debug.MoEAnalyzer`,
the exporters and the HTML report read only this. Every value is plain JSON (ints, floats,
strings, lists, dicts, ``None``)::

    {
      "format": "moe-router-session/1",
      "name": "run-1",
      "framework": "torch" | "jax" | "tensorflow" | "numpy" | None,   # None: manual events
      "started_at": "2026-12-02T16:30:00+00:00", "ended_at": str | None,
      "digest": {"config": hex, "weights": hex | None, "inputs": hex | None,
                 "versions": {"moe_router": str, "python": str, "numpy": str, ...},
                 "id": hex16},                     # sha256 of the other four, first 16 hex
      "layers": [{"index": 0, "name": "model.layers.0.mlp", "num_experts": E, "max_slots": K,
                  "strategy": "top_p", "min_experts": int, "max_experts": int,
                  "counters_cover": "this process" | "data-parallel group (4 ranks: ...)",
                  "config": dict | None}],          # MoEConfig as a dict (None: manual events)
      "totals": {"train": [LAYER_COUNTS, ...], "eval": [LAYER_COUNTS, ...]},  # one per layer
      "steps": [{"step": int, "time": float,      # seconds since started_at
                 "mode": "train" | "eval" | "mixed" | "none",
                 "layers": [LAYER_COUNTS, ...]}],  # what each layer added since the last step
      "trace": [TRACE_ROW, ...],                    # oldest first
      "events": [EVENT, ...],                       # manual events, normalised
      "offload": OFFLOAD,                           # optional: only with an expert store
    }

    LAYER_COUNTS = {"calls": int, "tokens": int, "expert_tokens": [int] * E, "dropped": int,
                    "k_hist": [int] * (K + 1), "entropy_sum": float, "top1_sum": float,
                    "z_loss_sum": float, "balance_sum": float, "aux_loss_sum": float}
    TRACE_ROW = {"layer": int, "call": int, "mode": "train" | "eval", "index": int,
                 "position": int, "token_id": int | None,
                 "experts": [int, ...], "weights": [float, ...]}   # used slots only
    EVENT = {"layer": int, "experts": [int, ...], "weights": [float, ...],
             "confidence": float | None, "timestamp": float | None, "token_id": int | None,
             "position": int | None, "mode": "train" | "eval"}

    OFFLOAD = {"policy": str, "slots": int, "num_experts": int, "expert_bytes": int,
               "layers": [OFFLOAD_LAYER, ...],   # the store's layers (the model's MoE layers
               "total": OFFLOAD_LAYER,           #   in forward order); peak of the whole pool
               ...}                               # other keys kept as given (reads, costs, ...)
    OFFLOAD_LAYER = {"hits": int, "misses": int, "prefetch_hits": int, "predicted": int,
                     "predicted_used": int, "used_predicted": int, "prefetch_loads": int,
                     "prefetch_wasted": int, "bytes_moved": int, "bytes_wasted": int,
                     "stall_s": float, "resident_bytes": int, "peak_resident_bytes": int,
                     "paths": {"resident": int, "moved": int, "there": int, "streamed": int},
                     "hit_rate": float | None, "precision": float | None,
                     "recall": float | None}        # None: undefined (no use, no prediction)

``OFFLOAD`` is what ``ExpertStore.metrics()`` / ``ExpertCache.summary()`` of
:mod:`moe_router.offload` return (cumulative since the store was made; the counters are
defined in :class:`~moe_router.offload.cache.LayerMetrics`); a record without it (older files,
models without offloading) is as valid.

The sums in LAYER_COUNTS are over real (unmasked) tokens (``*_sum`` of entropy, top-1 score and
z-loss) or over calls (``balance_sum``, ``aux_loss_sum``); divide by ``tokens`` or ``calls`` for
means. ``expert_tokens`` counts routing slots, so its sum is ``sum_k k * k_hist[k]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from ..errors import InputTypeError

FORMAT = "moe-router-session/1"
MODES = ("train", "eval")
INT_FIELDS = ("calls", "tokens", "dropped")
FLOAT_FIELDS = ("entropy_sum", "top1_sum", "z_loss_sum", "balance_sum", "aux_loss_sum")
#: OFFLOAD_LAYER counters (cumulative): key -> what it counts
OFFLOAD_COUNTERS = MappingProxyType({
    "hits": "Expert uses found in the fast tier.",
    "misses": "Expert uses not found in the fast tier.",
    "prefetch_hits": "Hits on an expert a prefetch loaded.",
    "prefetch_loads": "Experts loaded ahead by prefetch.",
    "prefetch_wasted": "Prefetched experts not used on the visit they were loaded for.",
    "bytes_moved": "Bytes copied into the fast tier (demand, streamed and prefetch).",
    "bytes_wasted": "Bytes of wasted prefetches.",
    "stall_s": "Seconds the compute waited for expert weights.",
})
#: OFFLOAD_LAYER gauges (``None`` while undefined): key -> what it is
OFFLOAD_GAUGES = MappingProxyType({
    "hit_rate": "Hits over expert uses.",
    "precision": "Prefetch precision: predicted experts that were used.",
    "recall": "Prefetch recall: used experts that were predicted.",
    "resident_bytes": "Bytes of the layer's experts resident in the fast tier now.",
    "peak_resident_bytes": "Most bytes of the layer's experts ever resident in the fast tier.",
})


def empty_counts(num_experts: int, max_slots: int) -> dict[str, Any]:
    """LAYER_COUNTS of a layer that saw nothing."""
    counts: dict[str, Any] = {name: 0 for name in INT_FIELDS}
    counts["expert_tokens"] = [0] * num_experts
    counts["k_hist"] = [0] * (max_slots + 1)
    counts.update({name: 0.0 for name in FLOAT_FIELDS})
    return counts


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Field-wise sum of two LAYER_COUNTS (list fields are padded to the longer length)."""
    out: dict[str, Any] = {}
    for name in (*INT_FIELDS, *FLOAT_FIELDS):
        out[name] = a[name] + b[name]
    for name in ("expert_tokens", "k_hist"):
        n = max(len(a[name]), len(b[name]))
        out[name] = [(a[name][i] if i < len(a[name]) else 0)
                     + (b[name][i] if i < len(b[name]) else 0) for i in range(n)]
    return out


def offload_section(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The OFFLOAD section of ``metrics`` (``ExpertStore.metrics()`` or
    ``ExpertCache.summary()``) as plain JSON values: dicts with str keys, lists for tuples."""
    def plain(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy scalars
            return value.item()
        return value

    return plain(metrics)


def offload_store(store: Any, model: Any) -> Any:
    """``store`` once it has ``metrics()``; without one, the expert store of ``model`` (set by
    ``moe_router.offload``), or ``None``.

    Raises:
        InputTypeError: ``store`` is given and has no ``metrics()``.
    """
    if store is None:
        from ..offload.config import STORE_ATTR

        store = getattr(model, "__dict__", {}).get(STORE_ATTR) if model is not None else None
        return store if callable(getattr(store, "metrics", None)) else None
    if not callable(getattr(store, "metrics", None)):
        raise InputTypeError("store", f"expected an expert store with metrics() (e.g. "
                             f"moe_router.offload.store_of(model)), got {type(store).__name__}")
    return store


def offload_record(store: Any) -> dict[str, Any]:
    """``{"offload": OFFLOAD}`` of ``store.metrics()``, or ``{}`` without a store."""
    return {} if store is None else {"offload": offload_section(store.metrics())}
