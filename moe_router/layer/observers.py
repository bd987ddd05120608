"""The observer seam: per-layer statistics updated inside the layer step.

An observer declares named state fields (shape, dtype, initial value) and an ``update`` written
with :class:`~moe_router.backend.Backend` ops that runs inside the step, so it stays valid under
``torch.compile``, ``nnx.jit``, ``tf.function`` and XLA (no host sync, no Python side effect).
Its values live in :class:`~moe_router.layer.state.LayerState` (``observers[name][field]``);
reading and resetting them happens on the host, outside the step.

Observers are registered through the ``moe_router_register_observers`` hook
(``registrar.observer(name, "module:Class")``). One is active in a layer when the config lists
it (``MoEConfig.observers``) or when its :meth:`Observer.required` says the config needs it.
The first observer is :class:`ExpertLoad`: the per-expert slot counts that the aux-loss-free
bias step consumes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from ..backend import Array, Backend

if TYPE_CHECKING:
    from ..config import MoEConfig
    from ..plan import RoutingPlan

#: the single dtype of every count in the layer state (all three frameworks support it natively;
#: JAX has no int64 without x64)
COUNT_DTYPE = "int32"


@dataclasses.dataclass(frozen=True)
class StateField:
    """One array of an observer's (or the layer's) state: shape, dtype name, fill value(s).

    ``kind``: ``"counter"`` (the default) is additive: an update returns the old value plus an
    increment, so data-parallel replicas can sum their increments (Keras ``aggregation="sum"``);
    ``"buffer"`` is overwritten (a ring buffer such as the routing trace): under
    ``tf.distribute`` the first replica's value is kept.
    """

    shape: tuple[int, ...]
    dtype: str = "float32"  # "float32" | "int32"
    init: float | tuple[float, ...] = 0.0
    kind: str = "counter"  # "counter" | "buffer"

    def initial(self) -> np.ndarray:
        dtype = np.int32 if self.dtype == "int32" else np.float32
        return np.broadcast_to(np.asarray(self.init, dtype), self.shape).copy()


class StepEvent(NamedTuple):
    """What an observer sees of one step.

    Attributes:
        plan: the call's :class:`~moe_router.RoutingPlan`.
        training: a training call (router noise, gradient step).
        update_state: the call updates the layer state (training or calibration).
        mask_T: ``(T,)`` 1 = real token, 0 = padding, or ``None``.
        config: the layer's :class:`~moe_router.MoEConfig`.
        token_ids_T: ``(T,)`` int token ids when the caller passed them, else ``None``.
        seq_len: length of ``x``'s sequence axis (``x.shape[-2]`` for ``x`` of rank >= 3: an
            int, or a scalar array when only known at run time), ``None`` for ``(T, D)`` input.
    """

    plan: RoutingPlan
    training: bool
    update_state: bool
    mask_T: Array | None
    config: MoEConfig
    token_ids_T: Array | None = None
    seq_len: Any = None


@dataclasses.dataclass(frozen=True)
class TraceConfig:
    """The opt-in per-token routing trace (observer ``routing_trace``, active when
    ``MoEConfig.trace`` is set): a ring buffer of ``capacity`` rows kept in the layer state, on
    the device, filled with ``tokens_per_call`` tokens evenly spaced over each call's tokens.

    Memory per layer: ``capacity * (2 * K + 4) * 4`` bytes (K = the router's ``max_slots``).
    """

    capacity: int = 4096
    tokens_per_call: int = 64

    def __post_init__(self) -> None:
        from ..errors import ConfigError

        for name in ("capacity", "tokens_per_call"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"trace.{name}", value, "an int >= 1")
        if self.tokens_per_call > self.capacity:
            raise ConfigError("trace.tokens_per_call", self.tokens_per_call,
                              f"an int <= trace.capacity ({self.capacity})")


class Observer(Protocol):
    """What an observer implements (a class registered by name; instantiated without args).

    Fields are counters: ``update`` returns the old value plus this step's increment (Keras
    sums the increments of ``tf.distribute`` replicas, torch and JAX reduce on read). An
    observer whose ``observes_inference`` is False (the default) is only updated by
    state-updating calls (training, calibration), so inference keeps its fast paths.
    """

    name: str
    observes_inference: bool

    def required(self, config: MoEConfig) -> bool:
        """True when ``config`` needs this observer even if not listed in ``config.observers``."""
        ...

    def fields(self, config: MoEConfig) -> dict[str, StateField]:
        """The state fields of this observer for ``config``'s layer."""
        ...

    def update(self, b: Backend, values: Mapping[str, Array],
               event: StepEvent) -> dict[str, Array]:
        """New field values after one step (backend ops only; traced in compiled code)."""
        ...


class ExpertLoad:
    """Routing slots per expert summed over state-updating calls since the last bias step.

    Field ``counts``: ``(E,)`` int32. Required whenever ``use_expert_bias`` is set: the layers'
    ``update_expert_bias()`` reads it, reduces it across data-parallel ranks and resets it.
    """

    name = "expert_load"
    observes_inference = False

    def required(self, config: MoEConfig) -> bool:
        return bool(config.router.use_expert_bias)

    def fields(self, config: MoEConfig) -> dict[str, StateField]:
        return {"counts": StateField((config.router.num_experts,), COUNT_DTYPE)}

    def update(self, b: Backend, values: Mapping[str, Array],
               event: StepEvent) -> dict[str, Array]:
        if not event.update_state:
            return dict(values)
        counts = b.cast(b.stop_gradient(event.plan.expert_counts), COUNT_DTYPE)
        return {"counts": values["counts"] + counts}


def update_observers(b: Backend, values: Mapping[str, Mapping[str, Array]],
                     event: StepEvent) -> dict[str, dict[str, Array]]:
    """Every active observer of ``event.config`` after one step: observer name -> its new field
    values (``values`` holds the old ones, by observer name). The layer step and any other
    routing site (e.g. a wrapped transformers gate) run their observers through this."""
    return {observer.name: observer.update(b, values[observer.name], event)
            for observer in active_observers(event.config)}


def active_observers(config: MoEConfig) -> tuple[Any, ...]:
    """The observers of ``config``'s layer, sorted by name (resolved through the registry,
    remembered per config until a plugin is registered or removed)."""
    from ..registry import default_registry

    registry = default_registry()
    return registry.memo("active_observers", config, lambda: _find_observers(registry, config))


def _find_observers(registry: Any, config: MoEConfig) -> tuple[Any, ...]:
    found = []
    for name in sorted(set(registry.observer_names()) | set(config.observers)):
        observer = registry.observer(name)
        if isinstance(observer, type):
            observer = observer()
        if name in config.observers or observer.required(config):
            found.append(observer)
    return tuple(found)
