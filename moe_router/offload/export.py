"""Offload metrics through the debugger's exporters: Prometheus and TensorBoard.

The input is a metrics dict as :meth:`ExpertCache.summary
<moe_router.offload.cache.ExpertCache.summary>` / ``ExpertStore.metrics()`` return it
(``{"layers": [per-layer counters], "total": ...}``), or a zero-argument callable returning one
(read at every scrape).

Prometheus (prefix ``moe_router_offload_``, labels ``{layer}``): counters ``hits_total``,
``misses_total``, ``prefetch_loads_total``, ``prefetch_wasted_total``, ``moved_bytes_total``,
``wasted_bytes_total``, ``stall_seconds_total``, ``served_total{layer, path}``; gauges
``hit_ratio``, ``prefetch_precision_ratio``, ``prefetch_recall_ratio``,
``resident_bytes``, ``peak_resident_bytes`` (an undefined ratio writes no sample). Served with the
debugger's :class:`~moe_router.debug.prometheus.MetricsServer`.

TensorBoard: scalars ``offload/<metric>/layer_<i>`` (the same names, no prefix) at a step, in an
event file written with the ``tensorboard`` package's record writer, as the debugger does.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

PREFIX = "moe_router_offload"
#: counters: (name without ``_total``, help, key of the per-layer counters)
COUNTERS = (
    ("hits", "Expert uses found in the fast tier.", "hits"),
    ("misses", "Expert uses not found in the fast tier.", "misses"),
    ("prefetch_loads", "Experts loaded ahead by prefetch.", "prefetch_loads"),
    ("prefetch_wasted", "Prefetched experts not used on the visit they were loaded for.",
     "prefetch_wasted"),
    ("moved_bytes", "Bytes copied into the fast tier (demand and prefetch).", "bytes_moved"),
    ("wasted_bytes", "Bytes of wasted prefetches.", "bytes_wasted"),
    ("stall_seconds", "Seconds the compute waited for expert weights.", "stall_s"),
)
#: gauges: (name, help, key)
GAUGES = (
    ("hit_ratio", "Hits over expert uses.", "hit_rate"),
    ("prefetch_precision_ratio", "Predicted experts that were used.", "precision"),
    ("prefetch_recall_ratio", "Used experts that were predicted.", "recall"),
    ("resident_bytes", "Bytes of the layer's experts resident in the fast tier.",
     "resident_bytes"),
    ("peak_resident_bytes", "Most bytes of the layer's experts ever resident.",
     "peak_resident_bytes"),
)

Source = Callable[[], Mapping[str, Any]] | Mapping[str, Any]


def _read(source: Source) -> Mapping[str, Any]:
    return source if isinstance(source, Mapping) else source()


class OffloadCollector:
    """A ``prometheus_client`` collector of offload metrics (read at every scrape)."""

    def __init__(self, source: Source) -> None:
        self.source = source

    def _families(self) -> dict[str, Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        fams: dict[str, Any] = {}
        for name, doc, _ in COUNTERS:
            fams[name] = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=["layer"])
        fams["served"] = CounterMetricFamily(f"{PREFIX}_served", "Expert uses per serving path "
                                             "(resident, moved, there, streamed).",
                                             labels=["layer", "path"])
        for name, doc, _ in GAUGES:
            fams[name] = GaugeMetricFamily(f"{PREFIX}_{name}", doc, labels=["layer"])
        return fams

    def describe(self) -> Iterator[Any]:
        yield from self._families().values()

    def collect(self) -> Iterator[Any]:
        fams = self._families()
        for i, layer in enumerate(_read(self.source)["layers"]):
            label = str(i)
            for name, _, key in COUNTERS:
                fams[name].add_metric([label], float(layer[key]))
            for path, n in layer["paths"].items():
                fams["served"].add_metric([label, path], float(n))
            for name, _, key in GAUGES:
                if layer[key] is not None:
                    fams[name].add_metric([label], float(layer[key]))
        yield from fams.values()


def serve_offload_metrics(source: Source, port: int = 0, addr: str = "127.0.0.1") -> Any:
    """Serve an :class:`OffloadCollector` at ``http://addr:port/metrics`` (a daemon thread);
    returns the debugger's :class:`~moe_router.debug.prometheus.MetricsServer`."""
    from prometheus_client import CollectorRegistry, start_http_server

    from ..debug.prometheus import MetricsServer

    registry = CollectorRegistry()
    registry.register(OffloadCollector(source))  # type: ignore[arg-type]
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, registry)


def write_tensorboard(source: Source, logdir: str | os.PathLike[str], step: int = 0) -> str:
    """Write the per-layer offload scalars at ``step`` as a TensorBoard event file in
    ``logdir``; returns its path."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    values = []
    for i, layer in enumerate(_read(source)["layers"]):
        for name, _, key in (*COUNTERS, *GAUGES):
            if layer[key] is not None:
                values.append(Summary.Value(tag=f"offload/{name}/layer_{i}",
                                            simple_value=float(layer[key])))
    os.makedirs(logdir, exist_ok=True)
    now = time.time()
    path = os.path.join(os.fspath(logdir), f"events.out.tfevents.{int(now):010d}."
                        f"{socket.gethostname()}.{os.getpid()}.{time.perf_counter_ns()}"
                        ".moe_router_offload")
    with open(path, "wb") as f:
        writer = RecordWriter(f)
        writer.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        writer.write(Event(wall_time=now, step=int(step),
                           summary=Summary(value=values)).SerializeToString())
    return path
