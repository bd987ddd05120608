"""Offload metrics without a debugger: thin wrappers over the debugger's exporters.

The metrics are defined once: counted by :class:`~moe_router.offload.cache.LayerMetrics`, named
in the session record's ``"offload"`` section (:mod:`moe_router.debug.session`), exported by
:mod:`moe_router.debug.prometheus` (``moe_router_offload_*``) and
:mod:`moe_router.debug.tensorboard` (``offload/<key>/layer_<i>``). A
:class:`~moe_router.debug.MoEDebugger` of an offloaded model carries them in every exporter; the
helpers here serve a bare metrics dict (``store.metrics()``, ``ExpertCache.summary()``, a
simulation's ``{"layers": result.layers}``) or a zero-argument callable returning one.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..debug.files import validate_offload
from ..debug.prometheus import OffloadCollector

__all__ = ["OffloadCollector", "serve_offload_metrics", "write_tensorboard"]

Source = Callable[[], Mapping[str, Any]] | Mapping[str, Any]


def _read(source: Source) -> Mapping[str, Any]:
    section = source if isinstance(source, Mapping) else source()
    validate_offload(section, "source")
    return section


def serve_offload_metrics(source: Source, port: int = 0, addr: str = "127.0.0.1") -> Any:
    """Serve an :class:`OffloadCollector` of ``source`` at ``http://addr:port/metrics`` (a
    daemon thread); returns the debugger's :class:`~moe_router.debug.prometheus.MetricsServer`."""
    from prometheus_client import CollectorRegistry, start_http_server

    from ..debug.prometheus import MetricsServer

    registry = CollectorRegistry()
    registry.register(OffloadCollector(source))  # type: ignore[arg-type]
    server, thread = start_http_server(port, addr=addr, registry=registry)
    return MetricsServer(server, thread, registry)


def write_tensorboard(source: Source, logdir: str | os.PathLike[str], step: int = 0) -> str:
    """Write the ``offload/<key>/layer_<i>`` scalars of ``source`` at ``step`` as a TensorBoard
    event file in ``logdir`` (as the debugger's writer does); returns its path."""
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.summary.writer.record_writer import RecordWriter

    from ..debug.tensorboard import offload_values

    values = offload_values(_read(source))
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
