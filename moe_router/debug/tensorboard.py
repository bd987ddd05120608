"""TensorBoard export of a session record: scalars and histograms per layer and step.

Tags are ``moe/<metric>/layer_<index>``: the scalars of
:func:`~moe_router.debug.analyzer.layer_metrics`, under its key names
(``moe/max_over_mean/layer_0``, ``moe/mean_experts/layer_0``, ``moe/mean_entropy/layer_0``,
``moe/drop_rate/layer_0``, ``moe/dead_experts/layer_0``, ...; an undefined value, ``None`` there,
writes no point) and the histograms ``moe/expert_tokens/layer_<i>`` (routed slots per expert
index) and ``moe/k/layer_<i>`` (tokens per number of experts). Event files are written with the
``tensorboard`` package's record writer and protos (no TensorFlow, no torch): the classic
``simple_value`` scalars and ``HistogramProto`` histograms, which TensorBoard and
``EventAccumulator`` read directly.

A session with an ``"offload"`` section (:mod:`moe_router.debug.session`) also gets the scalars
``offload/<key>/layer_<i>`` of each OFFLOAD_LAYER counter and gauge (``offload/hits/layer_0``,
``offload/hit_rate/layer_0``, ``offload/recall/layer_1``, ``offload/bytes_moved/layer_0``,
``offload/stall_s/layer_0``, ``offload/peak_resident_bytes/layer_0``, ...; undefined ones
skipped). The section is cumulative (read when the record was made), so it is written once, at
the last point's step: call ``write_tensorboard(debugger, logdir, step=n)`` periodically for a
curve.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .analyzer import LAYER_METRICS, MoEAnalyzer, layer_metrics
from .files import load_session
from .session import OFFLOAD_COUNTERS, OFFLOAD_GAUGES

__all__ = ["HISTOGRAMS", "SCALARS", "offload_values", "write_tensorboard"]

#: scalar metrics written per layer (``None`` values, e.g. a layer with no tokens, are skipped)
SCALARS = LAYER_METRICS
#: histogram metrics written per layer
HISTOGRAMS = ("expert_tokens", "k")

_uid = itertools.count()


def _tag(metric: str, layer: Mapping[str, Any]) -> str:
    return f"moe/{metric}/layer_{int(layer['index'])}"


def _start_time(session: Mapping[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(session["started_at"])).timestamp()
    except (KeyError, TypeError, ValueError):
        return time.time()


def _histogram(counts: Sequence[int]) -> Any:
    """``HistogramProto`` of the integer values ``0..n-1`` seen ``counts[v]`` times."""
    from tensorboard.compat.proto.summary_pb2 import HistogramProto

    present = [v for v, c in enumerate(counts) if c]
    return HistogramProto(
        min=float(present[0]) if present else 0.0,
        max=float(present[-1]) if present else 0.0,
        num=float(sum(counts)),
        sum=float(sum(v * c for v, c in enumerate(counts))),
        sum_squares=float(sum(v * v * c for v, c in enumerate(counts))),
        bucket_limit=[v + 0.5 for v in range(len(counts))],
        bucket=[float(c) for c in counts])


def _summary(layers: Sequence[Mapping[str, Any]], counts: Sequence[Mapping[str, Any]],
             known: bool) -> Any:
    """One ``Summary`` with every layer's scalars and histograms (layers with no tokens skipped)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = []
    for layer, c in zip(layers, counts):  # a manual step may list fewer layers
        if not int(c["tokens"]) and not sum(c["expert_tokens"]):
            continue
        for metric, value in layer_metrics(c, known).items():
            if value is not None:
                values.append(Summary.Value(tag=_tag(metric, layer), simple_value=value))
        values.append(Summary.Value(tag=_tag("expert_tokens", layer),
                                    histo=_histogram([int(v) for v in c["expert_tokens"]])))
        values.append(Summary.Value(tag=_tag("k", layer),
                                    histo=_histogram([int(v) for v in c["k_hist"]])))
    return Summary(value=values)


def offload_values(section: Mapping[str, Any]) -> list[Any]:
    """``Summary.Value`` scalars ``offload/<key>/layer_<i>`` of an OFFLOAD section."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    values = []
    for i, layer in enumerate(section["layers"]):
        for key in (*OFFLOAD_COUNTERS, *OFFLOAD_GAUGES):
            if layer.get(key) is not None:
                values.append(Summary.Value(tag=f"offload/{key}/layer_{i}",
                                            simple_value=float(layer[key])))
    return values


def write_tensorboard(session: Any, logdir: str | os.PathLike[str],
                      step: int | None = None) -> str:
    """Write ``session`` as a TensorBoard event file in ``logdir``; returns the file's path.

    With ``step=None``: one TensorBoard step per entry of ``session["steps"]`` (what each layer
    added in that step, at the entry's ``step`` number and wall time), or the totals at step 0 when
    the session has no steps. With an int ``step``: one snapshot of the totals (train + eval) at
    that step, e.g. to call periodically from a training loop. ``session`` is anything
    :func:`~moe_router.debug.files.load_session` takes (a debugger, a session dict, a JSON path,
    a list of events).
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    s = load_session(session, "session")
    analyzer = MoEAnalyzer(s)
    known, start = analyzer.has_router_stats, _start_time(s)
    points: list[tuple[int, float, Sequence[Mapping[str, Any]]]]
    if step is None and s["steps"]:
        points = [(int(e["step"]), start + float(e.get("time") or 0.0), e["layers"])
                  for e in s["steps"]]
    else:
        points = [(int(step or 0), time.time(), analyzer.counts())]

    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_uid)}.moe_router")
    path = os.path.join(os.fspath(logdir), name)
    with open(path, "wb") as f:
        writer = RecordWriter(f)
        writer.write(Event(wall_time=start, file_version="brain.Event:2").SerializeToString())
        for n, (number, wall_time, counts) in enumerate(points):
            summary = _summary(s["layers"], counts, known)
            if n == len(points) - 1 and s.get("offload") is not None:
                summary.value.extend(offload_values(s["offload"]))
            event = Event(wall_time=wall_time, step=number, summary=summary)
            writer.write(event.SerializeToString())
    return path
