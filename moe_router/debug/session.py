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
                  "config": dict | None}],          # MoEConfig as a dict (None: manual events)
      "totals": {"train": [LAYER_COUNTS, ...], "eval": [LAYER_COUNTS, ...]},  # one per layer
      "steps": [{"step": int, "time": float,      # seconds since started_at
                 "mode": "train" | "eval" | "mixed" | "none",
                 "layers": [LAYER_COUNTS, ...]}],  # what each layer added since the last step
      "trace": [TRACE_ROW, ...],                    # oldest first
      "events": [EVENT, ...],                       # manual events, normalised
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

The sums in LAYER_COUNTS are over real (unmasked) tokens (``*_sum`` of entropy, top-1 score and
z-loss) or over calls (``balance_sum``, ``aux_loss_sum``); divide by ``tokens`` or ``calls`` for
means. ``expert_tokens`` counts routing slots, so its sum is ``sum_k k * k_hist[k]``.
"""

from __future__ import annotations

from typing import Any

FORMAT = "moe-router-session/1"
MODES = ("train", "eval")
INT_FIELDS = ("calls", "tokens", "dropped")
FLOAT_FIELDS = ("entropy_sum", "top1_sum", "z_loss_sum", "balance_sum", "aux_loss_sum")


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
