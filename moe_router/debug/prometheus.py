"""Prometheus export of a session record: a custom ``prometheus_client`` collector and a server.

:class:`MoERouterCollector` reads the current session at every scrape (its ``source`` is a
zero-argument callable such as ``debugger.to_session``) and yields, following Prometheus naming
rules (prefix ``moe_router_``, base units, ``_total`` counters):

- counters ``moe_router_routing_calls_total``, ``moe_router_tokens_total``,
  ``moe_router_routed_slots_total``, ``moe_router_dropped_slots_total`` labelled ``{layer, mode}``;
- gauges ``moe_router_load_max_over_mean_ratio``, ``moe_router_experts_per_token``,
  ``moe_router_router_entropy_nats``, ``moe_router_dropped_slots_ratio``,
  ``moe_router_dead_experts`` and ``moe_router_experts`` labelled ``{layer}`` over train + eval
  totals, from :meth:`MoEAnalyzer.routing_stats
  <moe_router.debug.analyzer.MoEAnalyzer.routing_stats>` (a gauge is absent while its value is
  undefined, ``None`` there: e.g. the ratios of a layer that has seen no tokens, the dead experts
  of a layer too small to judge);
- info ``moe_router_layer_info{layer, name, strategy}`` and
  ``moe_router_session_info{name, framework, digest}``;
- with ``per_expert=True``: ``moe_router_expert_tokens_total{layer, expert, mode}``;
- when the session has an ``"offload"`` section (an offloaded model, see
  :mod:`moe_router.offload`), labelled ``{layer}`` (the store's layer): counters
  ``moe_router_offload_hits_total``, ``..._misses_total``, ``..._prefetch_hits_total``,
  ``..._prefetch_loads_total``, ``..._prefetch_wasted_total``, ``..._moved_bytes_total``,
  ``..._wasted_bytes_total``, ``..._stall_seconds_total`` and
  ``..._served_total{layer, path}``; gauges ``..._hit_ratio``,
  ``..._prefetch_precision_ratio``, ``..._prefetch_recall_ratio``, ``..._resident_bytes``,
  ``..._peak_resident_bytes``, ``..._slots``; info ``moe_router_offload_info{policy}``
  (:class:`OffloadCollector` alone exports them from any offload metrics dict).

:func:`serve_metrics` serves one collector on a fresh registry over HTTP.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from .analyzer import DEAD_THRESHOLD, MIN_EXPECTED, MoEAnalyzer
from .files import load_session, validate_offload
from .session import MODES, OFFLOAD_COUNTERS, OFFLOAD_GAUGES

__all__ = ["MetricsServer", "MoERouterCollector", "OffloadCollector", "serve_metrics"]

PREFIX = "moe_router"
#: counters: (name without ``_total``, help, value of one LAYER_COUNTS)
COUNTERS: tuple[tuple[str, str, Callable[[Mapping[str, Any]], float]], ...] = (
    ("routing_calls", "Router calls per layer and mode.", lambda c: c["calls"]),
    ("tokens", "Real (unmasked) tokens routed per layer and mode.", lambda c: c["tokens"]),
    ("routed_slots", "Routing slots kept (token-expert assignments) per layer and mode.",
     lambda c: sum(c["expert_tokens"])),
    ("dropped_slots", "Routing slots removed by the capacity limit per layer and mode.",
     lambda c: c["dropped"]),
)
#: gauges: (name, help, key of :func:`~moe_router.debug.analyzer.layer_metrics`)
GAUGES = (
    ("load_max_over_mean_ratio", "Max over mean routed slots per expert (1 = balanced).",
     "max_over_mean"),
    ("experts_per_token", "Mean number of experts per token.", "mean_experts"),
    ("router_entropy_nats", "Mean router entropy per token, in nats.", "mean_entropy"),
    ("dropped_slots_ratio", "Dropped over routed + dropped slots.", "drop_rate"),
    ("dead_experts", f"Experts below {DEAD_THRESHOLD:.0%} of the uniform share of the slots "
                     f"(judged from {MIN_EXPECTED:g} expected slots per expert).", "dead_experts"),
)

#: offload metric name (after ``moe_router_offload_``, without ``_total``) per OFFLOAD_LAYER key
OFFLOAD_NAMES = MappingProxyType({
    "hits": "hits", "misses": "misses", "prefetch_hits": "prefetch_hits",
    "prefetch_loads": "prefetch_loads", "prefetch_wasted": "prefetch_wasted",
    "bytes_moved": "moved_bytes", "bytes_wasted": "wasted_bytes", "stall_s": "stall_seconds",
    "hit_rate": "hit_ratio", "precision": "prefetch_precision_ratio",
    "recall": "prefetch_recall_ratio", "resident_bytes": "resident_bytes",
    "peak_resident_bytes": "peak_resident_bytes"})
OFFLOAD_PREFIX = f"{PREFIX}_offload"


def _offload_families() -> dict[str, Any]:
    """Empty offload metric families by OFFLOAD_LAYER key (plus ``served``, ``slots``,
    ``info``)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    fams: dict[str, Any] = {}
    for key, doc in OFFLOAD_COUNTERS.items():
        fams[key] = CounterMetricFamily(f"{OFFLOAD_PREFIX}_{OFFLOAD_NAMES[key]}", doc,
                                        labels=["layer"])
    fams["served"] = CounterMetricFamily(f"{OFFLOAD_PREFIX}_served", "Expert uses per serving "
                                         "path (resident, moved, there, streamed).",
                                         labels=["layer", "path"])
    for key, doc in OFFLOAD_GAUGES.items():
        fams[key] = GaugeMetricFamily(f"{OFFLOAD_PREFIX}_{OFFLOAD_NAMES[key]}", doc,
                                      labels=["layer"])
    fams["slots"] = GaugeMetricFamily(f"{OFFLOAD_PREFIX}_slots", "Fast-tier expert slots per "
                                      "layer.")
    fams["info"] = InfoMetricFamily(OFFLOAD_PREFIX, "The expert store's eviction policy.")
    return fams


def _offload_metrics(section: Mapping[str, Any]) -> Iterator[Any]:
    """The offload families of one OFFLOAD section (an undefined gauge writes no sample)."""
    fams = _offload_families()
    for i, layer in enumerate(section["layers"]):
        label = str(i)
        for key in OFFLOAD_COUNTERS:
            fams[key].add_metric([label], float(layer[key]))
        for path, n in (layer.get("paths") or {}).items():
            fams["served"].add_metric([label, str(path)], float(n))
        for key in OFFLOAD_GAUGES:
            if layer.get(key) is not None:
                fams[key].add_metric([label], float(layer[key]))
    if section.get("slots") is not None:
        fams["slots"].add_metric([], float(section["slots"]))
    fams["info"].add_metric([], {"policy": str(section.get("policy") or "")})
    yield from fams.values()


class OffloadCollector:
    """A ``prometheus_client`` collector of expert-offload metrics alone: ``source`` is an
    OFFLOAD dict (``ExpertStore.metrics()``, ``ExpertCache.summary()``, a session's
    ``"offload"``) or a zero-argument callable returning one (read at every scrape)."""

    def __init__(self, source: Callable[[], Mapping[str, Any]] | Mapping[str, Any]) -> None:
        self.source = source

    def describe(self) -> Iterator[Any]:
        yield from _offload_families().values()

    def collect(self) -> Iterator[Any]:
        section = self.source if isinstance(self.source, Mapping) else self.source()
        validate_offload(section, "source")
        yield from _offload_metrics(section)


def _families(per_expert: bool) -> dict[str, Any]:
    """Empty metric families by name (also what :meth:`MoERouterCollector.describe` yields)."""
    from prometheus_client.core import (
        CounterMetricFamily,
        GaugeMetricFamily,
        InfoMetricFamily,
    )

    fams: dict[str, Any] = {}
    for name, doc, _ in COUNTERS:
        fams[name] = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["layer", "mode"])
    for name, doc, _ in GAUGES:
        fams[name] = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["layer"])
    fams["experts"] = GaugeMetricFamily(f"{PREFIX}_experts", "Experts of the layer.",
                                        labels=["layer"])
    fams["layer"] = InfoMetricFamily(f"{PREFIX}_layer", "The MoE layers of the session.",
                                     labels=["layer"])
    fams["session"] = InfoMetricFamily(f"{PREFIX}_session", "The debugged session.")
    if per_expert:
        fams["expert_tokens"] = CounterMetricFamily(
            f"{PREFIX}_expert_tokens", "Routing slots each expert received, per layer and mode.",
            labels=["layer", "expert", "mode"])
    return fams


class MoERouterCollector:
    """A ``prometheus_client`` collector reading ``source()`` (a session dict) at every scrape.

    ``source`` is a zero-argument callable returning the current session dict (e.g.
    ``debugger.to_session``; it is called from the HTTP server's thread), or a session dict.
    ``per_expert`` adds ``moe_router_expert_tokens_total{layer, expert, mode}`` (E series per
    layer and mode: mind the cardinality).
    """

    def __init__(self, source: Callable[[], Any] | Mapping[str, Any],
                 per_expert: bool = False) -> None:
        self.source = source
        self.per_expert = per_expert

    def describe(self) -> Iterator[Any]:
        """The metric families without samples (registration does not call ``source``)."""
        yield from _families(self.per_expert).values()
        yield from _offload_families().values()

    def collect(self) -> Iterator[Any]:
        """The metric families of the current session."""
        s = load_session(self.source if isinstance(self.source, Mapping) else self.source(),
                         "session")
        analyzer = MoEAnalyzer(s)
        fams = _families(self.per_expert)
        per_mode = {mode: analyzer.counts(mode) for mode in MODES}
        stats = analyzer.routing_stats()["layers"]
        for i, layer in enumerate(s["layers"]):
            index = str(layer["index"])
            for mode in MODES:
                counts = per_mode[mode][i]
                for name, _, value in COUNTERS:
                    fams[name].add_metric([index, mode], float(value(counts)))
                if self.per_expert:
                    for e, n in enumerate(counts["expert_tokens"]):
                        fams["expert_tokens"].add_metric([index, str(e), mode], float(n))
            for name, _, key in GAUGES:
                if stats[i][key] is not None:
                    fams[name].add_metric([index], float(stats[i][key]))
            fams["experts"].add_metric([index], float(layer["num_experts"]))
            fams["layer"].add_metric([index], {"name": str(layer.get("name") or ""),
                                               "strategy": str(layer.get("strategy") or "")})
        digest = s.get("digest") or {}
        fams["session"].add_metric([], {"name": str(s.get("name") or ""),
                                        "framework": str(s.get("framework") or ""),
                                        "digest": str(digest.get("id") or "")})
        yield from fams.values()
        if s.get("offload") is not None:
            yield from _offload_metrics(s["offload"])


class MetricsServer:
    """A running metrics HTTP server: ``port``, ``url``, ``registry``; ``close()`` stops it."""

    def __init__(self, server: Any, thread: threading.Thread, registry: Any) -> None:
        self.server, self.thread, self.registry = server, thread, registry

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def url(self) -> str:
        host = self.server.server_address[0]
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(source: Callable[[], Any] | Mapping[str, Any], port: int = 0,
                  addr: str = "127.0.0.1", per_expert: bool = False) -> MetricsServer:
    """Serve a :class:`MoERouterCollector` of ``source`` on a fresh registry at
    ``http://addr:port/metrics`` (``port=0``: a free port, see ``.port``) from a daemon thread."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry()
    registry.register(MoERouterCollector(source, per_expert=per_expert))  # type: ignore[arg-type]
    started = start_http_server(port, addr=addr, registry=registry)
    if started is None:  # old prometheus_client versions return nothing to shut down
        raise RuntimeError("serve_metrics needs a newer prometheus_client (its "
                           "start_http_server returned no server): pip install -U "
                           "prometheus_client")
    server, thread = started
    return MetricsServer(server, thread, registry)
