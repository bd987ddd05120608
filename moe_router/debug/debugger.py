"""``MoEDebugger``: watch how every MoE layer of a model routes, over a whole run.

The debugger switches the ``routing_stats`` observer (and, opt in, the ``routing_trace`` ring
buffer) on in every MoE layer it finds, so the counting happens on the device inside the layer
step (under ``torch.compile``, ``nnx.jit``, ``tf.function`` and XLA alike). The host reads the
counters only when asked (:meth:`MoEDebugger.step`, :meth:`MoEDebugger.to_session`, ...) and
accumulates them into int64 totals. When no session runs, the layers have their original configs
back: no extra op. Every result is built from one plain-JSON session record
(:mod:`moe_router.debug.session`) and analysed by :class:`~moe_router.debug.MoEAnalyzer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..config import MoEConfig
from ..errors import InputError, InputTypeError
from ..layer.observers import TraceConfig
from . import digest as digests
from .counters import FIELDS, MODES
from .readout import counters_cover, delta_counts, export_state, trace_rows
from .session import FORMAT, add_counts, empty_counts, offload_record, offload_store

STATS = "routing_stats"
TRACE = "routing_trace"
STATS_PREFIX = f"observers.{STATS}."
TRACE_PREFIX = f"observers.{TRACE}."
#: what :meth:`MoEDebugger.register_callback` accepts
CALLBACK_EVENTS = ("session_start", "session_end", "step", "issue", "event")


@dataclasses.dataclass
class _Layer:
    """One watched layer: the adapter object, its config before the debugger, last readings."""

    index: int
    name: str
    layer: Any
    original: MoEConfig | None
    num_experts: int
    max_slots: int
    last: dict[str, np.ndarray] | None = None


class MoEDebugger:
    """Routing statistics, issues, traces and exports for every MoE layer of ``model``.

    Args:
        model: a torch ``nn.Module``, a Flax ``nnx.Module`` (or nnx graph) or a Keras model or
            layer containing moe_router ``MoE`` layers (Hugging Face models after
            ``replace_moe_blocks`` too); ``None`` for the manual path
            (:meth:`process_routing_event`).
        trace: turn the per-token trace on: a :class:`TraceConfig`, an int (its ``capacity``)
            or ``True`` (defaults); ``None`` = off.
        keep_steps: most :meth:`step` records kept (oldest dropped first, and counted).
        digest_weights: hash every layer's weights into the session digest on export.
    """

    def __init__(self, model: Any = None, *, trace: TraceConfig | int | bool | None = None,
                 keep_steps: int = 100_000, digest_weights: bool = True) -> None:
        self.model = model
        self.trace = _trace_config(trace)
        self.framework: str | None = None
        self._hooks: Any = None
        self._layers: list[_Layer] = []
        if model is not None:
            from .discovery import discover

            self.framework, found, self._hooks = discover(model)
            if not found:
                raise InputError("model", f"no moe_router MoE layer found in the "
                                 f"{type(model).__name__} (replace_moe_blocks first for a "
                                 f"Hugging Face model)")
            for i, (name, layer) in enumerate(found):
                r = layer.config.router
                self._layers.append(_Layer(i, name, layer, layer.config, r.num_experts,
                                           r.max_slots))
        if not isinstance(keep_steps, int) or keep_steps < 1:
            raise InputError("keep_steps", f"expected an int >= 1, got {keep_steps!r}")
        self.digest_weights = bool(digest_weights)
        self._callbacks: dict[str, list[Callable[..., Any]]] = {e: [] for e in CALLBACK_EVENTS}
        self._steps: deque[dict[str, Any]] = deque(maxlen=keep_steps)
        self.attached = False
        self._offload: Any = None
        self._lock = threading.RLock()  # the metrics server reads from its own thread
        self._clear("session", None)

    # ----- attaching ------------------------------------------------------------------------
    def attach(self) -> None:
        """Switch the counters (and the trace) on in every layer, from zero."""
        if self.model is None or self.attached:
            return
        for entry in self._layers:
            config = entry.original
            observers = config.observers if STATS in config.observers else (
                *config.observers, STATS)
            entry.layer.config = config.replace(observers=observers,
                                                trace=self.trace or config.trace)
            entry.layer.reset_observers(STATS)
            if self.trace is not None or config.trace is not None:
                entry.layer.reset_observers(TRACE)
            entry.last = None
        self._hooks.invalidate_compiled(self.model)
        self.attached = True

    def detach(self) -> None:
        """Switch the counters (and the trace) off again: every layer gets back the observers and
        trace it had before :meth:`attach` (routing changes made meanwhile, e.g. with
        ``set_strategy``, are kept), so its step runs no counting op."""
        if self.model is None or not self.attached:
            return
        for entry in self._layers:
            entry.layer.config = entry.layer.config.replace(
                observers=entry.original.observers, trace=entry.original.trace)
        self._hooks.invalidate_compiled(self.model)
        self.attached = False

    # ----- sessions -------------------------------------------------------------------------
    def start_session(self, name: str | None = None) -> str:
        """Start counting from zero (attaches the counters); returns the session's name."""
        if self._started_at is not None:
            raise InputError("start_session", f"session {self._name!r} is still running; call "
                             "end_session() first")
        name = name or datetime.datetime.now().strftime("session-%Y%m%d-%H%M%S")
        if not isinstance(name, str):
            raise InputTypeError("name", f"expected a str, got {type(name).__name__}")
        self._clear(name, time.time())
        self.attach()
        self._fire("session_start", name)
        return name

    def end_session(self, *, detach: bool = True) -> dict[str, Any]:
        """Read the counters a last time, stop the session and return its record (the layers get
        their original configs back unless ``detach=False``)."""
        if self._started_at is None:
            raise InputError("end_session", "no session is running; call start_session() first")
        self.sync()
        if self._pending_modes:  # calls since the last step() close one last window
            self.step()
        record = self.to_session()
        self._ended_at = time.time()
        record["ended_at"] = _iso(self._ended_at)
        self._record = record
        self._started_at = None
        if detach:
            self.detach()
        self._fire("session_end", record)
        return record

    @contextlib.contextmanager
    def session(self, name: str | None = None, *, detach: bool = True) -> Iterator[MoEDebugger]:
        """``with debugger.session("eval"): ...`` = start_session / end_session."""
        self.start_session(name)
        try:
            yield self
        finally:
            self.end_session(detach=detach)

    def _clear(self, name: str, started_at: float | None) -> None:
        self._name = name
        self._started_at = started_at
        self._ended_at: float | None = None
        self._record: dict[str, Any] | None = None
        self._totals = {mode: [empty_counts(e.num_experts, e.max_slots) for e in self._layers]
                        for mode in MODES}
        self._pending = [empty_counts(e.num_experts, e.max_slots) for e in self._layers]
        self._pending_modes: set[str] = set()
        self._steps.clear()
        self._steps_dropped = 0
        self._step_count = 0
        self._events: list[dict[str, Any]] = []
        self._inputs = digests.InputHasher()
        for entry in self._layers:
            entry.last = None

    # ----- reading --------------------------------------------------------------------------
    def sync(self) -> None:
        """Read every layer's counters (one host read per layer) into the session totals."""
        if self.model is None or not self.attached:
            return
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        for entry in self._layers:
            state = export_state(entry.layer)
            now = {f: np.asarray(state[STATS_PREFIX + f]) for f in FIELDS}
            last = entry.last or {f: np.zeros_like(v) for f, v in now.items()}
            for row, mode in enumerate(MODES):
                delta = delta_counts(now, last, row)
                if delta["calls"]:
                    self._pending_modes.add(mode)
                self._totals[mode][entry.index] = add_counts(self._totals[mode][entry.index],
                                                             delta)
                self._pending[entry.index] = add_counts(self._pending[entry.index], delta)
            entry.last = now

    def step(self) -> dict[str, Any]:
        """Close one step: read the counters and record what each layer added since the last
        step (the windows of balancedness over steps). Call it once per training step (the
        Keras callback does). Returns the step record."""
        with self._lock:
            return self._step()

    def _step(self) -> dict[str, Any]:
        self.sync()
        modes = self._pending_modes
        record = {"step": self._step_count,
                  "time": 0.0 if self._started_at is None else time.time() - self._started_at,
                  "mode": "mixed" if len(modes) > 1 else next(iter(modes), "none"),
                  "layers": self._pending}
        if len(self._steps) == self._steps.maxlen:
            self._steps_dropped += 1
        self._steps.append(record)
        self._step_count += 1
        self._pending = [empty_counts(e.num_experts, e.max_slots) for e in self._layers]
        self._pending_modes = set()
        self._fire("step", record)
        return record

    def get_trace(self) -> list[dict[str, Any]]:
        """The per-token trace rows of every traced layer (oldest first within a layer)."""
        rows: list[dict[str, Any]] = []
        if self.model is None or not self.attached:
            return rows
        for entry in self._layers:
            if entry.layer.config.trace is None:
                continue
            state = export_state(entry.layer)
            rows.extend(trace_rows(entry.index, {k[len(TRACE_PREFIX):]: np.asarray(v)
                                                  for k, v in state.items()
                                                  if k.startswith(TRACE_PREFIX)}))
        return rows

    def note_inputs(self, *arrays: Any) -> None:
        """Hash input arrays (any framework: converted with ``numpy.asarray``) into the
        session digest's ``inputs``."""
        for array in arrays:
            if hasattr(array, "detach"):
                array = array.detach().cpu()
            self._inputs.update(np.asarray(array))

    # ----- the session record ---------------------------------------------------------------
    def to_session(self) -> dict[str, Any]:
        """The current session record (:mod:`moe_router.debug.session`), counters read now; the
        finished record after :meth:`end_session`. Safe to call from another thread (the
        metrics server's)."""
        with self._lock:
            return self._to_session()

    def _to_session(self) -> dict[str, Any]:
        if self._started_at is None and self._record is not None:
            return self._record
        self.sync()
        layers = [self._layer_record(e) for e in self._layers] if self.model is not None \
            else self._manual_layers()
        configs = [e.original for e in self._layers]
        weights, own = None, offload_store(None, self.model)
        store = self._offload or own
        if self.digest_weights and self.model is not None and own is None:  # (an offloaded
            # model's experts are not in memory: no weights digest)
            weights = digests.weights_hash(e.layer.export_weights() for e in self._layers)
        return {
            "format": FORMAT, "name": self._name, "framework": self.framework,
            "started_at": None if self._started_at is None else _iso(self._started_at),
            "ended_at": None if self._ended_at is None else _iso(self._ended_at),
            "digest": digests.digest(digests.config_hash(configs or [layer["num_experts"]
                                                                     for layer in layers]),
                                     weights, self._inputs.hexdigest()),
            "layers": layers,
            "totals": {mode: [dict(c) for c in self._totals[mode]] for mode in MODES},
            "steps": list(self._steps), "steps_dropped": self._steps_dropped,
            "trace": self.get_trace(),
            "events": list(self._events),
            **offload_record(store),
        }

    def watch_offload(self, store: Any) -> None:
        """Put ``store.metrics()`` (an ``ExpertStore`` of :mod:`moe_router.offload`, or anything
        with that method) in the session record's ``"offload"`` section, read at every
        :meth:`to_session`. A model offloaded with ``moe_router.offload`` is watched without this
        call (``None``: back to that). Raises ``InputTypeError`` without ``metrics()``."""
        self._offload = offload_store(store, None)

    def _layer_record(self, entry: _Layer) -> dict[str, Any]:
        r = entry.original.router
        return {"index": entry.index, "name": entry.name, "num_experts": entry.num_experts,
                "max_slots": entry.max_slots, "strategy": r.strategy,
                "counters_cover": counters_cover(entry.layer),
                "min_experts": r.min_experts, "max_experts": r.max_experts,
                "config": _jsonable(dataclasses.asdict(entry.original))}

    def _manual_layers(self) -> list[dict[str, Any]]:
        return [{"index": i, "name": f"layer_{i}", "num_experts": len(c["expert_tokens"]),
                 "max_slots": len(c["k_hist"]) - 1, "strategy": None, "min_experts": None,
                 "max_experts": None, "config": None}
                for i, c in enumerate(self._totals["eval"])]

    # ----- results --------------------------------------------------------------------------
    def analyzer(self) -> Any:
        """A :class:`~moe_router.debug.MoEAnalyzer` of the current session record."""
        from .analyzer import MoEAnalyzer

        return MoEAnalyzer(self.to_session())

    def get_routing_stats(self, mode: str | None = None) -> dict[str, Any]:
        """Per-layer and overall routing statistics (plain Python values)."""
        return self.analyzer().routing_stats(mode=_mode(mode))

    def get_expert_utilization(self, mode: str | None = None) -> np.ndarray:
        """``(layers, experts)`` float64, each layer's row sums to 1, NaN for a layer without
        tokens (all calls of the session by default; ``mode="train"`` or ``"eval"`` selects one
        kind)."""
        return self.analyzer().utilization(mode=_mode(mode))

    def detect_issues(self, **thresholds: Any) -> list[dict[str, Any]]:
        """Dead experts, collapse, imbalance and drops, each with the numbers behind it (the
        ``issue`` callbacks fire once per issue)."""
        issues = self.analyzer().detect_issues(**thresholds)
        for issue in issues:
            self._fire("issue", issue)
        return issues

    def export_session(self, path: Any) -> dict[str, Any]:
        """Write the session record as JSON to ``path``; returns the record."""
        from .files import write_json

        record = self.to_session()
        write_json(record, path)
        return record

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1",
                      per_expert: bool = False) -> Any:
        """Serve this debugger's statistics at ``http://addr:port/metrics`` for Prometheus
        (:func:`moe_router.debug.prometheus.serve_metrics`; each scrape reads the counters).
        Returns the server (``.port``, ``.url``, ``.close()``)."""
        from .prometheus import serve_metrics

        return serve_metrics(self.to_session, port=port, addr=addr, per_expert=per_expert)

    def serve(self, port: int = 0, host: str = "127.0.0.1", **kw: Any) -> Any:
        """The live monitoring server (``/metrics``, ``/health``, ``/api/session``, a live page at
        ``/``) from a daemon thread: :func:`moe_router.server.serve` (``port=0``: a free one).
        Returns its handle (``.url``, ``.port``, ``.close()``, a context manager)."""
        from ..server import serve

        return serve(self, port=port, host=host, **kw)

    def register_callback(self, event: str, fn: Callable[..., Any]) -> None:
        """Call ``fn(payload)`` on ``event``: ``session_start`` (name), ``session_end``
        (record), ``step`` (step record), ``issue`` (issue dict), ``event`` (manual event)."""
        if event not in CALLBACK_EVENTS:
            raise InputError("event", f"expected one of {', '.join(CALLBACK_EVENTS)}, got "
                             f"{event!r}")
        if not callable(fn):
            raise InputTypeError("fn", f"expected a callable, got {type(fn).__name__}")
        self._callbacks[event].append(fn)

    def _fire(self, event: str, payload: Any) -> None:
        for fn in self._callbacks[event]:
            fn(payload)

    # ----- replay ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def force_expert_selection(self, experts: Any, weights: Any = None) -> Iterator[None]:
        """Run the model with forced expert choices inside the ``with`` block.

        ``experts``: ``"balanced"`` (every layer routes token t to experts ``(t*k + j) % E``: the
        best-case balanced routing of throughput tests, via ``RouterConfig.balanced_debug``), one
        ``(..., k)`` int array of expert ids for every layer, or a mapping of layer name or index
        to such an array (router replay: the ids recorded with :meth:`record_routing`).
        ``weights``: gate weights of the same shape(s) (default: the router's scores at the
        forced experts, so the router still gets a gradient). The forced arrays must match the
        token count of the calls made in the block.
        """
        if self.model is None:
            raise InputError("force_expert_selection", "needs a debugger made with a model")
        if isinstance(experts, str):
            if experts != "balanced":
                raise InputError("experts", f"expected 'balanced', an array or a mapping, got "
                                 f"{experts!r}")
            saved = [(e, e.layer.config) for e in self._layers]
            try:
                for entry, config in saved:
                    entry.layer.config = config.with_router(balanced_debug=True)
                self._hooks.invalidate_compiled(self.model)
                yield
            finally:
                for entry, config in saved:
                    entry.layer.config = config
                self._hooks.invalidate_compiled(self.model)
            return
        chosen = self._per_layer(experts, "experts")
        weights_by = self._per_layer(weights, "weights") if weights is not None else {}
        for index in weights_by:
            if index not in chosen:
                raise InputError("weights", f"weights given for layer {index} without experts")
        try:
            for index, ids in chosen.items():
                self._layers[index].layer.force_routing(ids, weights_by.get(index))
            yield
        finally:
            for entry in self._layers:
                entry.layer.force_routing(None)

    @contextlib.contextmanager
    def record_routing(self) -> Iterator[dict[str, Any]]:
        """Record the expert ids each layer chose in the block's last call: the yielded dict
        (layer name -> ``(T, K)`` int array of the layer's framework) fills when the block ends,
        ready for :meth:`force_expert_selection` (router replay). Uses each layer's
        ``return_plan`` path once per call, so it is an eager-mode tool."""
        if self.model is None:
            raise InputError("record_routing", "needs a debugger made with a model")
        recorded: dict[str, Any] = {}
        for entry in self._layers:
            entry.layer.record_routing(True)
        try:
            yield recorded
        finally:
            for entry in self._layers:
                ids = entry.layer.record_routing(False)
                if ids is not None:
                    recorded[entry.name] = ids

    def _per_layer(self, value: Any, argument: str) -> dict[int, Any]:
        if not isinstance(value, Mapping):
            return {e.index: value for e in self._layers}
        by_name = {e.name: e.index for e in self._layers}
        out = {}
        for key, array in value.items():
            index = by_name.get(key, key if isinstance(key, int) else None)
            if index is None or not 0 <= index < len(self._layers):
                raise InputError(argument, f"unknown layer {key!r}; layers: "
                                 f"{', '.join(by_name)}")
            out[index] = array
        return out

    # ----- the manual path ------------------------------------------------------------------
    def process_routing_event(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """Record one routing decision given by hand: the older ``{'selected_expert',
        'confidence', 'timestamp', ...}`` dict or a richer one (see
        :func:`moe_router.debug.events.normalize_event`). Without a model the events are the
        session's counts; with one they are kept beside the counters. Returns the normalised
        event."""
        from .events import event_counts, normalize_event

        record = normalize_event(event)
        self._events.append(record)
        if self.model is None:
            layer, mode = record["layer"], record["mode"]
            for totals in self._totals.values():
                while len(totals) <= layer:
                    totals.append(empty_counts(0, 0))
            current = self._totals[mode][layer]
            counts = event_counts(record, max(len(current["expert_tokens"]),
                                              max(record["experts"], default=-1) + 1),
                                  max(len(current["k_hist"]) - 1, len(record["experts"])))
            self._totals[mode][layer] = add_counts(current, counts)
        self._fire("event", record)
        return record

    def record_counts(self, counts: Mapping[str, Any], *, layer: int = 0, mode: str = "eval",
                      framework: str | None = None) -> None:
        """Add one routing call's LAYER_COUNTS (:func:`moe_router.debug.counters.plan_counts`)
        to a model-less session: how routing done outside a layer (the production router)
        reports, in bounded memory (no per-token events). ``framework`` marks the counts as
        measured by a router, so entropy and losses are shown."""
        if self.model is not None:
            raise InputError("counts", "record_counts is for a debugger without a model; a "
                             "model's layers count their own routing")
        if mode not in MODES:
            raise InputError("mode", f"expected 'train' or 'eval', got {mode!r}")
        with self._lock:
            if framework is not None and self.framework is None:
                self.framework = framework
            for totals in self._totals.values():
                while len(totals) <= layer:
                    totals.append(empty_counts(0, 0))
            self._totals[mode][layer] = add_counts(self._totals[mode][layer], dict(counts))

    @property
    def layer_names(self) -> list[str]:
        """The watched layers' names, in index order."""
        return [e.name for e in self._layers]


# ----- helpers ---------------------------------------------------------------------------------
def _trace_config(trace: Any) -> TraceConfig | None:
    if trace is None or trace is False:
        return None
    if trace is True:
        return TraceConfig()
    if isinstance(trace, int):
        return TraceConfig(capacity=trace, tokens_per_call=min(64, trace))
    if isinstance(trace, TraceConfig):
        return trace
    raise InputTypeError("trace", f"expected None, True, an int capacity or a TraceConfig, got "
                         f"{type(trace).__name__}")


def _mode(mode: str | None) -> str | None:
    if mode not in (None, *MODES):
        raise InputError("mode", f"expected None, 'train' or 'eval', got {mode!r}")
    return mode


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _iso(timestamp: float) -> str:
    return datetime.datetime.fromtimestamp(timestamp, datetime.UTC).isoformat()

