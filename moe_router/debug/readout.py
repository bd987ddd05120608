"""Reading the on-device observer state on the host: the state itself (pooled over ranks for an
expert-parallel layer), counter differences and trace rows."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from .counters import MODES

_WRAP = 2 ** 32


def delta_counts(now: Mapping[str, np.ndarray], last: Mapping[str, np.ndarray],
                  row: int) -> dict[str, Any]:
    """LAYER_COUNTS added to ``row`` since ``last``: int32 counters as differences modulo 2**32
    (exact across wrap-around), float sums as plain differences."""
    out: dict[str, Any] = {}
    for field, value in now.items():
        new, old = value[row], last[field][row]
        if value.dtype.kind == "i":
            diff = (new.astype(np.int64) - old.astype(np.int64)) % _WRAP
            out[field] = diff.tolist() if diff.ndim else int(diff)
        else:
            out[field] = float(new) - float(old)
    return out


def trace_rows(layer: int, fields: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    written = int(fields["written"][0])
    capacity = fields["index"].shape[0] - 1
    start = written % capacity if written > capacity else 0
    order = [(start + i) % capacity for i in range(min(written, capacity))]
    rows = []
    for i in order:
        if fields["index"][i] < 0:
            continue
        used = fields["experts"][i] >= 0
        token = int(fields["token"][i])
        rows.append({"layer": layer, "call": int(fields["call"][i]),
                     "mode": MODES[int(fields["mode"][i])], "index": int(fields["index"][i]),
                     "position": int(fields["position"][i]),
                     "token_id": None if token < 0 else token,
                     "experts": fields["experts"][i][used].tolist(),
                     "weights": [float(w) for w in fields["weights"][i][used]]})
    return rows


def _pooled(layer: Any) -> bool:
    """The layer pools its counters over ranks (an expert-parallel torch layer)."""
    return bool(getattr(layer, "pool_stats", False))


def export_state(layer: Any) -> dict[str, Any]:
    """The layer's state; an expert-parallel layer's counters summed over its ranks (a
    collective: every rank's debugger reads at the same points)."""
    return layer.export_state(across_ranks=True) if _pooled(layer) else layer.export_state()


def counters_cover(layer: Any) -> str:
    """Which tokens the layer's counters count, in words (the session record says it)."""
    return str(layer.stats_scope) if _pooled(layer) else "this process"
