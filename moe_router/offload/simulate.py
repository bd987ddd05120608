"""Replay a routing trace through the expert cache offline: per-layer hit rates, prefetch
precision and recall, bytes moved and wasted.

The replay does, per step and layer, what the torch store does live (the same
:class:`~moe_router.offload.cache.ExpertCache`): with ``prefetch=True`` it first admits the
trace's prediction for the layer (as the store does while the previous layer computes), then
uses the layer's experts one at a time (a miss loads the expert into a slot, evicting the
policy's victim; experts the layer still needs are protected), then scores the prediction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ..errors import InputError
from .cache import ExpertCache
from .trace import RoutingTrace


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    """What :func:`simulate` returns.

    Attributes:
        hit_rates: per-layer hit rate (``None`` for a layer never used).
        hit_rate: over all layers.
        precision / recall: prefetch prediction over all layers (``None`` without prefetch).
        layers: per-layer counters (:meth:`~moe_router.offload.cache.LayerMetrics.as_dict`).
        total: the summed counters (``peak_resident_bytes`` of the whole cache).
    """

    hit_rates: tuple[float | None, ...]
    hit_rate: float | None
    precision: float | None
    recall: float | None
    layers: tuple[dict[str, Any], ...]
    total: dict[str, Any]


def _as_trace(trace: Any, num_experts: int | None) -> RoutingTrace:
    if isinstance(trace, RoutingTrace):
        if num_experts is not None and num_experts != trace.num_experts:
            raise InputError("num_experts", f"{num_experts} differs from the trace's "
                             f"{trace.num_experts}")
        return trace
    if num_experts is None:
        raise InputError("num_experts", "required when the trace is a plain array")
    return RoutingTrace(trace, num_experts)


def simulate(trace: Any, num_experts: int | None = None, slots: int = 1, policy: str = "lru",
             *, prefetch: bool = False, prefetch_bytes: int | None = None,
             expert_bytes: int = 1, decay: float = 0.9,
             pinned: Mapping[int, Iterable[int]] | None = None) -> SimulationResult:
    """Replay ``trace`` through a cache of ``slots`` experts per layer.

    Args:
        trace: a :class:`RoutingTrace`, or an ``(S, L, W)`` int array of expert ids (``-1`` =
            unused) with ``num_experts`` given.
        num_experts: N (taken from a :class:`RoutingTrace`).
        slots: c, slots per layer (``layer_aware`` pools ``L * c``).
        policy: ``"lru"``, ``"lfu"`` (decayed) or ``"layer_aware"``.
        prefetch: admit the trace's ``predicted`` experts before each layer runs.
        prefetch_bytes: prefetch byte budget per step (``None``: the slots limit it).
        expert_bytes: bytes per expert (the byte counters' unit; 1 counts experts).
        decay: frequency decay per step (``lfu``, ``layer_aware``).
        pinned: layer -> experts always resident (see
            :func:`~moe_router.offload.trace.pinned_from_profile`).

    Raises:
        InputError: a malformed trace, or ``prefetch=True`` with a trace without predictions.
        ConfigError: bad slots, policy, decay or pinning.
    """
    t = _as_trace(trace, num_experts)
    if prefetch and t.predicted is None:
        raise InputError("prefetch", "the trace has no predictions (RoutingTrace.predicted)")
    cache = ExpertCache(max(t.num_layers, 1), t.num_experts, slots, expert_bytes,
                        policy=policy, decay=decay, pinned=pinned,
                        prefetch_bytes=prefetch_bytes)
    experts = t.experts.tolist()
    predicted = t.predicted.tolist() if prefetch and t.predicted is not None else None
    for s, step in enumerate(experts):
        cache.begin_step()
        for layer, row in enumerate(step):
            used = [e for e in dict.fromkeys(row) if e >= 0]
            if predicted is not None:
                guess = [e for e in predicted[s][layer] if e >= 0]
                if guess:
                    cache.predict(layer, guess)
            for i, e in enumerate(used):
                if cache.use(layer, e) is None:
                    protect = [(layer, x) for x in used[i + 1:]]
                    if cache.admit(layer, e, protect) is None:
                        cache.count_path(layer, "streamed")
                    else:
                        cache.count_path(layer, "moved")
            cache.end_layer(layer, used)
    summary = cache.summary()
    layers = tuple(summary["layers"])
    total = summary["total"]
    return SimulationResult(hit_rates=tuple(m["hit_rate"] for m in layers),
                            hit_rate=total["hit_rate"],
                            precision=total["precision"] if prefetch else None,
                            recall=total["recall"] if prefetch else None,
                            layers=layers, total=total)
