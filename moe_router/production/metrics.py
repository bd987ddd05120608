"""Request metrics of a production router: counts, a bounded latency window and routing totals.

All updates and reads hold one lock, so a thread pool of callers and a metrics server can share
one :class:`RequestMetrics`. Memory is bounded: latencies live in a ring of ``window`` floats;
routing totals are fixed-size arrays.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..debug.analyzer import layer_metrics
from ..debug.session import add_counts, empty_counts

PERCENTILES = (50, 95, 99)


class RequestMetrics:
    """Counts and latencies of ``route`` calls, and the routing totals they produced."""

    def __init__(self, num_experts: int, max_slots: int, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self._started = time.monotonic()
        self._latencies_ms: deque[float] = deque(maxlen=window)
        self._requests = 0
        self._errors = 0
        self._rejected = 0
        self._counts = empty_counts(num_experts, max_slots)

    def record(self, latency_ms: float, counts: Mapping[str, Any]) -> None:
        """One successful request: its latency and its LAYER_COUNTS."""
        with self._lock:
            self._requests += 1
            self._latencies_ms.append(latency_ms)
            self._counts = add_counts(self._counts, dict(counts))

    def record_error(self, rejected: bool) -> None:
        """One failed request; ``rejected``: refused by input validation (a client error)."""
        with self._lock:
            self._requests += 1
            self._errors += 1
            self._rejected += int(rejected)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self._started

    def snapshot(self) -> dict[str, Any]:
        """``requests``, ``errors``, ``rejected``, ``tokens``, ``latency_ms`` (``p50``, ``p95``,
        ``p99``, ``mean``, ``window``), ``expert_tokens`` / ``expert_usage`` (each expert's
        share of the routed slots), ``mean_experts``, ``balancedness`` (Jain's index of the
        expert loads: 1 = equal, 1/E = one expert), ``max_over_mean``, ``drop_rate`` and
        ``uptime_s``; ``None`` where nothing was measured yet."""
        with self._lock:
            latencies = np.asarray(self._latencies_ms, dtype=np.float64)
            counts = dict(self._counts)
            requests, errors, rejected = self._requests, self._errors, self._rejected
        derived = layer_metrics(counts, known=True)
        routed = sum(counts["expert_tokens"])
        latency: dict[str, Any] = {f"p{q}": None for q in PERCENTILES}
        latency.update(mean=None, window=int(latencies.size))
        if latencies.size:
            for q, value in zip(PERCENTILES, np.percentile(latencies, PERCENTILES), strict=True):
                latency[f"p{q}"] = float(value)
            latency["mean"] = float(latencies.mean())
        return {
            "requests": requests, "errors": errors, "rejected": rejected,
            "tokens": int(counts["tokens"]), "latency_ms": latency,
            "expert_tokens": [int(v) for v in counts["expert_tokens"]],
            "expert_usage": [v / routed for v in counts["expert_tokens"]] if routed else None,
            "mean_experts": derived["mean_experts"], "balancedness": derived["jain"],
            "max_over_mean": derived["max_over_mean"], "drop_rate": derived["drop_rate"],
            "dropped": int(counts["dropped"]), "uptime_s": self.uptime_s,
        }
