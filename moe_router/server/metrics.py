"""The monitoring server's Prometheus registry: routing counters of the session (the debugger's
:class:`~moe_router.debug.prometheus.MoERouterCollector`, with the ``moe_router_offload_*`` metrics
of an offloaded model's expert store when the session has them), health, a serving router's request
metrics and the server's own request durations. Every name has the ``moe_router_`` prefix, base
units (seconds) and ``_total`` on counters:

- ``moe_router_health_status{status}`` (1 for the current status, 0 for the others),
  ``moe_router_issues{severity}`` (issues found now), ``moe_router_uptime_seconds``;
- with router metrics: counters ``moe_router_requests_total``,
  ``moe_router_request_errors_total``, ``moe_router_request_rejections_total``,
  ``moe_router_request_tokens_total``, ``moe_router_fallbacks_total``; the summary
  ``moe_router_request_latency_seconds{quantile}`` (0.5 / 0.95 / 0.99 over the router's latency
  window, so no ``_sum`` / ``_count``: a windowed mean times a total would not be monotonic) and
  gauges ``moe_router_request_latency_mean_seconds`` (same window),
  ``moe_router_request_drop_ratio``, ``moe_router_balancedness`` (Jain's index) and
  ``moe_router_expert_usage_ratio{expert}`` (a sample is absent while its value is ``None``);
- ``moe_router_monitor_request_duration_seconds{endpoint}`` (histogram) and
  ``moe_router_monitor_requests_total{endpoint, code}``: the server's own requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from ..debug.prometheus import MoERouterCollector
from .sources import STATUSES, Snapshot

__all__ = ["ENDPOINTS", "HealthCollector", "RouterMetricsCollector", "SessionCollector",
           "build_registry"]

#: the ``endpoint`` label values of the server's own metrics (anything else is ``other``)
ENDPOINTS = ("/", "/metrics", "/health", "/api/session", "other")
#: latency quantiles of the summary, keyed as :meth:`ProductionRouter.get_metrics` names them
QUANTILES = (("p50", "0.5"), ("p95", "0.95"), ("p99", "0.99"))
SEVERITIES = ("warning", "error")


def _number(value: Any) -> float | None:
    """``value`` as a finite float, else ``None``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


class SessionCollector:
    """The routing counters and gauges of the snapshot's session (none without a session)."""

    def __init__(self, snapshot: Callable[[], Snapshot], per_expert: bool = False) -> None:
        self.snapshot, self.per_expert = snapshot, per_expert

    def describe(self) -> Iterator[Any]:
        yield from MoERouterCollector({}, self.per_expert).describe()

    def collect(self) -> Iterator[Any]:
        session = self.snapshot().session
        if session is not None:
            yield from MoERouterCollector(session, self.per_expert).collect()


class HealthCollector:
    """``moe_router_health_status``, ``moe_router_issues`` and ``moe_router_uptime_seconds``."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def _families(self) -> dict[str, Any]:
        from prometheus_client.core import GaugeMetricFamily

        return {
            "status": GaugeMetricFamily("moe_router_health_status",
                                        "1 for the current health status, 0 for the others.",
                                        labels=["status"]),
            "issues": GaugeMetricFamily("moe_router_issues",
                                        "Routing issues found now (dead experts, collapse, "
                                        "imbalance, drops) by severity.", labels=["severity"]),
            "uptime": GaugeMetricFamily("moe_router_uptime_seconds",
                                        "Seconds since the monitored router (or the server) "
                                        "started."),
        }

    def describe(self) -> Iterator[Any]:
        yield from self._families().values()

    def collect(self) -> Iterator[Any]:
        health = self.snapshot().health
        fams = self._families()
        for status in STATUSES:
            fams["status"].add_metric([status], float(health.get("status") == status))
        issues = [i for i in health.get("issues") or [] if isinstance(i, Mapping)]
        for severity in SEVERITIES:
            fams["issues"].add_metric([severity], float(sum(i.get("severity") == severity
                                                            for i in issues)))
        uptime = _number(health.get("uptime_s"))
        if uptime is not None:
            fams["uptime"].add_metric([], uptime)
        yield from fams.values()


class RouterMetricsCollector:
    """A serving router's ``get_metrics()`` as Prometheus families (none without a router)."""

    COUNTERS = (("requests", "requests", "Requests routed."),
                ("request_errors", "errors", "Requests that failed."),
                ("request_rejections", "rejected", "Requests refused by input validation."),
                ("request_tokens", "tokens", "Tokens routed over all requests."),
                ("fallbacks", "fallbacks", "Requests served by a fallback backend or route."))
    GAUGES = (("request_drop_ratio", "drop_rate", "Share of routing slots dropped."),
              ("balancedness", "balancedness", "Jain's index of the expert loads (1 = even)."))

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def _families(self) -> dict[str, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

        fams: dict[str, Any] = {}
        for name, _, doc in self.COUNTERS:
            fams[name] = CounterMetricFamily(f"moe_router_{name}", doc)
        for name, _, doc in self.GAUGES:
            fams[name] = GaugeMetricFamily(f"moe_router_{name}", doc)
        fams["usage"] = GaugeMetricFamily("moe_router_expert_usage_ratio",
                                          "Share of the routed load each expert gets.",
                                          labels=["expert"])
        fams["latency"] = Metric("moe_router_request_latency_seconds",
                                 "Request latency quantiles over the router's latency window.",
                                 "summary")
        fams["mean"] = GaugeMetricFamily("moe_router_request_latency_mean_seconds",
                                         "Mean request latency over the router's window.")
        return fams

    def describe(self) -> Iterator[Any]:
        yield from self._families().values()

    def collect(self) -> Iterator[Any]:
        metrics = self.snapshot().router
        if metrics is None:
            return
        fams = self._families()
        for name, key, _ in self.COUNTERS:
            value = _number(metrics.get(key))
            if value is not None:
                fams[name].add_metric([], value)
        for name, key, _ in self.GAUGES:
            value = _number(metrics.get(key))
            if value is not None:
                fams[name].add_metric([], value)
        for expert, share in enumerate(metrics.get("expert_usage") or []):
            if _number(share) is not None:
                fams["usage"].add_metric([str(expert)], float(share))
        latency = metrics.get("latency_ms") or {}
        name = "moe_router_request_latency_seconds"
        for key, quantile in QUANTILES:
            value = _number(latency.get(key))
            if value is not None:
                fams["latency"].add_sample(name, {"quantile": quantile}, value / 1000)
        mean = _number(latency.get("mean"))
        if mean is not None:
            fams["mean"].add_metric([], mean / 1000)
        yield from (f for f in fams.values() if f.samples)


def build_registry(snapshot: Callable[[], Snapshot], per_expert: bool = False) -> tuple[Any, Any]:
    """``(registry, (duration histogram, request counter))``: a fresh registry (never the
    process-wide default one) with the three collectors and the server's own metrics."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    registry.register(SessionCollector(snapshot, per_expert))  # type: ignore[arg-type]
    registry.register(HealthCollector(snapshot))  # type: ignore[arg-type]
    registry.register(RouterMetricsCollector(snapshot))  # type: ignore[arg-type]
    duration = Histogram("moe_router_monitor_request_duration_seconds",
                         "Time the monitoring server took to answer, by endpoint.",
                         ["endpoint"], registry=registry,
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                                  2.5))
    requests = Counter("moe_router_monitor_requests", "Requests the monitoring server answered, "
                       "by endpoint and status code.", ["endpoint", "code"], registry=registry)
    return registry, (duration, requests)
