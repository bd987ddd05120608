"""The layer's mutable state as one immutable value: :class:`LayerState`.

Everything a MoE layer changes between calls lives here, and nowhere else: the router controller
state (top-p controller, complexity calibration), the aux-loss-free expert bias and the
observers' counters. The step takes a ``LayerState`` and returns the next one; each framework
stores it its own way (torch buffers, nnx Variables, Keras non-trainable weights) through the
flat ``name -> array`` form of :func:`state_to_arrays` / :func:`state_from_arrays`, so an adapter
never needs to know what the fields are.

Flat names (also the storage names of the adapters):

================================  ==========  =========  ==========================================
name                              shape       dtype      meaning
================================  ==========  =========  ==========================================
``router.state``                  ``(5,)``    float32    :class:`~moe_router.RouterState` fields
                                                         in order (top_p, score_mean, score_var,
                                                         score_count, k_offset); exported
``router.expert_bias``            ``(E,)``    float32    aux-free balancing bias; exported;
                                                         only with ``use_expert_bias``
``observers.<name>.<field>``      observer's  observer's counters of an active observer
                                                         (transient: not exported)
================================  ==========  =========  ==========================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from ..backend import Array, Backend
from ..config import MoEConfig
from ..plan import RouterState
from ..weights import initial_router_state
from .observers import StateField, active_observers

ROUTER_STATE = "router.state"
EXPERT_BIAS = "router.expert_bias"
OBSERVER_PREFIX = "observers."
#: names of the state that :meth:`export_weights` carries between frameworks
PERSISTENT = (ROUTER_STATE, EXPERT_BIAS)


class LayerState(NamedTuple):
    """All mutable state of one MoE layer (a pytree: JAX carries it through ``jit``).

    Attributes:
        router: the controller :class:`~moe_router.RouterState` (float32 scalars), or ``None``
            when the strategy keeps no controller state (its stored vector is left as it is).
        expert_bias: ``(E,)`` float32 aux-free balancing bias, or ``None``.
        observers: observer name -> field name -> array (see :mod:`moe_router.layer.observers`).
    """

    router: RouterState | None
    expert_bias: Array | None
    observers: Mapping[str, Mapping[str, Array]]


def state_fields(config: MoEConfig) -> dict[str, StateField]:
    """Every flat state name of ``config``'s layer with its shape, dtype and initial value."""
    r = config.router
    fields = {ROUTER_STATE: StateField((5,), "float32", tuple(initial_router_state(config)))}
    if r.use_expert_bias:
        fields[EXPERT_BIAS] = StateField((r.num_experts,), "float32")
    for observer in active_observers(config):
        for field, spec in observer.fields(config).items():
            fields[f"{OBSERVER_PREFIX}{observer.name}.{field}"] = spec
    return fields


def state_change(old: MoEConfig, new: MoEConfig) -> tuple[dict[str, StateField], tuple[str, ...]]:
    """What a layer's storage must add and remove when its config changes from ``old`` to
    ``new``: ``(added name -> field, removed names)``. Only observer state may change (turning
    the debugger's counters or trace on and off); a field whose shape, dtype or kind changes is
    removed and added again (fresh).

    Raises:
        InputError: ``new`` changes the weight names or the persistent state (``router.state``,
            ``router.expert_bias``): build a new layer instead.
    """
    from ..errors import InputError
    from ..weights import param_shapes

    before, after = state_fields(old), state_fields(new)
    def layout(fields: dict[str, StateField]) -> dict[str, tuple[Any, ...]]:
        return {n: (f.shape, f.dtype) for n, f in fields.items() if n in PERSISTENT}

    if param_shapes(old) != param_shapes(new) or layout(before) != layout(after):
        raise InputError("config", "the new config changes the layer's weight or persistent "
                         "state names or shapes; build a new layer instead (only observers and "
                         "routing fields may change)")
    added = {n: f for n, f in after.items() if n.startswith(OBSERVER_PREFIX)
             and before.get(n) != f}
    removed = tuple(n for n, f in before.items() if n.startswith(OBSERVER_PREFIX)
                    and after.get(n) != f)
    return added, removed


def observer_names(config: MoEConfig, observer: str | None = None) -> tuple[str, ...]:
    """The flat state names of ``config``'s observers (of one ``observer`` when given)."""
    prefix = OBSERVER_PREFIX + (f"{observer}." if observer else "")
    return tuple(name for name in state_fields(config) if name.startswith(prefix))


def initial_state_arrays(config: MoEConfig) -> dict[str, np.ndarray]:
    """The flat initial state as NumPy arrays (what adapters copy into their storage)."""
    return {name: field.initial() for name, field in state_fields(config).items()}


def state_from_arrays(b: Backend, arrays: Mapping[str, Array], config: MoEConfig) -> LayerState:
    """A :class:`LayerState` from the flat ``name -> array`` form (arrays of backend ``b``)."""
    router = (router_state_of(b, arrays[ROUTER_STATE])
              if config.router.strategy_spec.stateful else None)
    observers: dict[str, dict[str, Array]] = {}
    for name, value in arrays.items():
        if name.startswith(OBSERVER_PREFIX):
            observer, _, field = name[len(OBSERVER_PREFIX):].rpartition(".")
            observers.setdefault(observer, {})[field] = value
    return LayerState(router=router, expert_bias=arrays.get(EXPERT_BIAS), observers=observers)


def router_state_of(b: Backend, vector: Array) -> RouterState:
    """The ``(5,)`` stored controller vector (``router.state``) as a :class:`RouterState`."""
    return RouterState(*b.unstack(vector))


def state_to_arrays(b: Backend, state: LayerState,
                    names: tuple[str, ...] | None = None) -> dict[str, Array]:
    """The flat ``name -> array`` form of ``state`` (inverse of :func:`state_from_arrays`);
    with ``names``, only those (e.g. a step's ``updated`` names: no work for the others)."""
    arrays: dict[str, Array] = {}
    if state.router is not None and (names is None or ROUTER_STATE in names):
        arrays[ROUTER_STATE] = b.concat([b.reshape(b.cast(v, "float32"), (1,))
                                         for v in state.router], axis=0)
    if state.expert_bias is not None:
        arrays[EXPERT_BIAS] = state.expert_bias
    for observer, values in state.observers.items():
        for field, value in values.items():
            arrays[f"{OBSERVER_PREFIX}{observer}.{field}"] = value
    return arrays


def initial_state(b: Backend, config: MoEConfig, like: Any = None) -> LayerState:
    """A fresh :class:`LayerState` of backend ``b`` (on ``like``'s device)."""
    arrays = {name: b.asarray(value, dtype=_dtype_name(value), like=like)
              for name, value in initial_state_arrays(config).items()}
    return state_from_arrays(b, arrays, config)


def _dtype_name(value: np.ndarray) -> str:
    return "int32" if value.dtype == np.int32 else "float32"
