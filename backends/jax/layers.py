"""``MoE``: the Flax NNX adapter around the one layer step (``moe_router.layer.step.layer_step``).

The layer holds the trainable weights as ``nnx.Param`` and the flat layer state
(:mod:`moe_router.layer.state`) as non-trainable variables, at ``nnx.state`` paths equal to the
portable names (``router/weight``, ``experts/w_up``, ``router/state``, ``router/expert_bias``,
``observers/expert_load/counts``, ...). Every call runs the step and writes back the state it
changed, functionally, so ``nnx.jit`` / ``nnx.grad`` / ``nnx.scan`` carry it. Losses come back
with ``return_plan=True``, are kept in an :class:`AuxLoss` variable (:func:`total_aux_loss`) and,
inside ``nnx.capture(..., nnx.Intermediate)``, are sown as ``router_losses``, ``routing_stats``
and ``expert_counts``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_router.config import MoEConfig
from moe_router.errors import InputError, InputTypeError
from moe_router.layer.calibrate import default_forward, run_calibration
from moe_router.layer.experts import check_dispatch_framework
from moe_router.layer.observers import StateField
from moe_router.layer.state import (
    EXPERT_BIAS,
    ROUTER_STATE,
    LayerState,
    initial_state_arrays,
    observer_names,
    router_state_of,
    state_change,
    state_fields,
    state_from_arrays,
    state_to_arrays,
)
from moe_router.layer.step import BIAS_STEP_UPDATES, bias_step, layer_step
from moe_router.plan import RouterState, RoutingPlan
from moe_router.weights import check_weights, init_weights, param_shapes, weight_shapes

from .functional import JAX


class LayerStateVariable(nnx.Variable):
    """The layer's non-trainable state (no gradient; not seen by an optimizer on ``nnx.Param``)."""


class ControllerState(LayerStateVariable):
    """``router.state``: the :class:`~moe_router.RouterState` as a ``(5,)`` float32 vector."""


class ExpertBias(LayerStateVariable):
    """``router.expert_bias``: the aux-loss-free balancing bias ``(E,)`` float32."""


class ObserverState(LayerStateVariable):
    """``observers.<name>.<field>``: an observer's counters or ring buffer."""


class AuxLoss(nnx.Variable):
    """The last call's ``plan.losses.total``: a float32 scalar, differentiable in ``nnx.grad``."""


class Routing(nnx.Variable):
    """Expert ids (or weights) forced by :meth:`MoE.force_routing` or recorded by
    :meth:`MoE.record_routing` (state: new values of the same shape need no retrace)."""


_KINDS = {ROUTER_STATE: ControllerState, EXPERT_BIAS: ExpertBias}


class Group(nnx.Module):
    """A namespace of the portable names (``router``, ``experts``, ``shared``, ``observers``)."""


def _capturing(module: nnx.Module) -> bool:
    """True inside ``nnx.capture`` (sowing outside it would change the graph: retracing)."""
    return hasattr(module, "__captures__")


class MoE(nnx.Module):
    """Mixture-of-Experts layer: ``y = layer(x)`` for ``x`` of shape ``(..., d_model)``.

    ``layer(x, return_plan=True)`` returns ``(y, plan)``. Router noise and state updates happen
    in training mode (``layer.train()`` or ``training=True``) and while ``layer.calibrating``.
    Assigning ``layer.config`` a config that differs only in routing fields, ``observers`` or
    ``trace`` adds and removes the observer variables (the debugger switching its counters on
    and off); the next ``nnx.jit`` call retraces once (the graph changed).
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs | None = None,
                 param_dtype: Any = jnp.float32,
                 weights: Mapping[str, Any] | None = None) -> None:
        """Args:
            config: the :class:`MoEConfig`.
            rngs: ``nnx.Rngs``: ``params`` stream for the initialisation, ``noise`` stream (or
                ``default``) for router noise in training.
            param_dtype: dtype of the parameters (the state is float32 / int32).
            weights: initial weights in the portable layout instead of random ones.
        """
        self.config = config  # the setter checks it
        if rngs is None and (weights is None or config.router.noise != "none"):
            raise InputError("rngs", "expected nnx.Rngs(...) (needed for the random "
                             "initialisation and for router noise)")
        if weights is None:  # NumPy draws seeded by the params key: no XLA random compiles
            seed = np.asarray(jax.random.key_data(rngs.params())).ravel().tolist()
            weights = init_weights(config, seed=np.random.SeedSequence(seed))
        checked = check_weights(config, weights)
        for name in param_shapes(config):
            self._place(name, nnx.Param(jnp.asarray(checked[name], param_dtype)))
        for name, value in initial_state_arrays(config).items():
            self._place(name, _KINDS.get(name, ObserverState)(jnp.asarray(checked.get(name,
                                                                                      value))))
        self.aux_loss = AuxLoss(jnp.zeros((), jnp.float32))
        noisy = rngs is not None and config.router.noise != "none"
        self.noise_rng = rngs["noise"].fork() if noisy else None
        self.deterministic = True  # nnx convention: layer.train() sets it to False
        self.calibrating = False
        self.recording = False

    @property
    def config(self) -> MoEConfig:
        """The layer's :class:`MoEConfig`; a new one may change the routing and the observers
        (``observers``, ``trace``), not the weight or persistent state names."""
        return self._config

    @config.setter
    def config(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig, got {type(config).__name__}")
        check_dispatch_framework(JAX.framework, config)
        old = vars(self).get("_config")
        if old is not None and old != config:
            self._change_observers(*state_change(old, config))
        self._config = config

    def _change_observers(self, added: Mapping[str, StateField], removed: tuple[str, ...]) -> None:
        """Delete the ``removed`` observer variables (and the groups left empty), then place the
        ``added`` ones with their initial values."""
        for name in removed:
            parts = name.split(".")
            for depth in range(len(parts) - 1, -1, -1):
                owner = functools.reduce(getattr, parts[:depth], self)
                delattr(owner, parts[depth])
                if depth == 0 or any(isinstance(v, (nnx.Variable, nnx.Module))
                                     for v in vars(owner).values()):
                    break
        for name, field in added.items():
            self._place(name, ObserverState(jnp.asarray(field.initial())))

    def reset_observers(self, observer: str | None = None) -> None:
        """Set the observers' state (of one ``observer`` by name, or all; an inactive one: no
        change) back to its initial values (counters zero, trace rows empty)."""
        fields = state_fields(self.config)
        for name in observer_names(self.config, observer):
            self._var(name)[...] = jnp.asarray(fields[name].initial())

    def _place(self, name: str, variable: nnx.Variable) -> None:
        *groups, leaf = name.split(".")
        node: nnx.Module = self
        for group in groups:
            if not hasattr(node, group):
                setattr(node, group, Group())
            node = getattr(node, group)
        setattr(node, leaf, variable)

    def _var(self, name: str) -> nnx.Variable:
        return functools.reduce(getattr, name.split("."), self)

    def _read(self, names: Iterable[str]) -> dict[str, jax.Array]:
        return {name: self._var(name)[...] for name in names}

    def _write(self, state: LayerState, names: Iterable[str]) -> None:
        names = tuple(names)
        arrays = state_to_arrays(JAX, state, names)
        for name in names:
            self._var(name)[...] = arrays[name]

    # ----- weights and state ---------------------------------------------------------------
    def params_dict(self) -> dict[str, jax.Array]:
        """The trainable weights as a portable-name dict (for ``moe_router.flax.apply``)."""
        return self._read(param_shapes(self.config))

    def export_weights(self) -> dict[str, np.ndarray]:
        """The portable weights (``weight_shapes(config)``: parameters and persistent state)."""
        return {name: np.array(v, np.float32) for name, v in
                self._read(weight_shapes(self.config)).items()}

    def import_weights(self, weights: Mapping[str, Any]) -> None:
        """Copy portable weights (validated by ``check_weights``) into this layer."""
        for name, value in check_weights(self.config, weights).items():
            var = self._var(name)
            var[...] = jnp.asarray(value, var[...].dtype)

    @classmethod
    def from_weights(cls, config: MoEConfig, weights: Mapping[str, Any], *,
                     rngs: nnx.Rngs | None = None, **kwargs: Any) -> MoE:
        """A layer holding ``weights`` (the portable dict of any framework's layer)."""
        if rngs is None and config.router.noise != "none":
            rngs = nnx.Rngs(0)
        return cls(config, rngs=rngs, weights=weights, **kwargs)

    def layer_state(self) -> LayerState:
        """The current :class:`~moe_router.layer.state.LayerState`."""
        return state_from_arrays(JAX, self._read(state_fields(self.config)), self.config)

    def export_state(self) -> dict[str, np.ndarray]:
        """Every flat state array (``router.state``, ``router.expert_bias``, ``observers.*``)."""
        return {name: np.asarray(v) for name, v in self._read(state_fields(self.config)).items()}

    @property
    def router_state(self) -> RouterState:
        """The controller state: a :class:`~moe_router.RouterState` of float32 scalars."""
        return router_state_of(JAX, self._var(ROUTER_STATE)[...])

    def reset_router_state(self) -> None:
        """Back to the fresh controller state (before :func:`calibrate`)."""
        self._var(ROUTER_STATE)[...] = jnp.asarray(initial_state_arrays(self.config)[ROUTER_STATE])

    def update_expert_bias(self, expert_counts: Any = None,
                           axis_name: Any = None) -> jax.Array:
        """Aux-free balancing step on the counts accumulated since the last step (or
        ``expert_counts``), which then restart from zero; returns the new ``(E,)`` bias.

        ``axis_name``: inside ``shard_map`` / ``pmap``, ``jax.lax.psum`` the counts over that
        axis first. Under plain ``jit`` with a sharded batch the counts are already global.
        """
        state = self.layer_state()
        counts = None if expert_counts is None else jnp.asarray(expert_counts)
        if axis_name is not None and state.expert_bias is not None:
            local = state.observers["expert_load"]["counts"] if counts is None else counts
            counts = jax.lax.psum(local, axis_name)
        new = bias_step(JAX, state, self.config, counts)
        self._write(new, BIAS_STEP_UPDATES)
        return new.expert_bias

    def force_routing(self, experts: Any, weights: Any = None) -> None:
        """Use ``experts`` ``(..., k)`` (and ``weights``) instead of the router's choice in every
        following call; ``None`` ends it. Kept as :class:`Routing` variables, so under
        ``nnx.jit`` new ids of the same shape need no retrace."""
        for name in ("forced_experts", "forced_weights"):
            if hasattr(self, name):
                delattr(self, name)
        if experts is not None:
            self.forced_experts = Routing(jnp.asarray(experts, jnp.int32))
            if weights is not None:
                self.forced_weights = Routing(jnp.asarray(weights, jnp.float32))

    def record_routing(self, on: bool) -> jax.Array | None:
        """Start (``True``) or stop (``False``) keeping each call's ``(T, K)`` expert ids (the
        first recorded call must be eager: it creates the variable); stopping returns the last
        call's ids (``None`` if no call ran)."""
        self.recording = bool(on)
        recorded = self.recorded_experts[...] if hasattr(self, "recorded_experts") else None
        if hasattr(self, "recorded_experts"):
            del self.recorded_experts
        return None if on else recorded

    # ----- forward -------------------------------------------------------------------------
    def __call__(self, x: jax.Array, *, token_ids: Any = None, attention_probs: Any = None,
                 complexity_scores: Any = None, mask: Any = None, training: bool | None = None,
                 rng: Any = None, return_plan: bool = False, forced_experts: Any = None,
                 forced_weights: Any = None) -> jax.Array | tuple[jax.Array, RoutingPlan]:
        """Route and mix ``x`` ``(..., D)``; ``token_ids`` / ``complexity_scores`` / ``mask``
        have ``x``'s leading shape, ``attention_probs`` is ``(T, S)`` or ``(H, T, S)``.
        ``forced_experts`` ``(..., k)`` (and ``forced_weights``) replace the router's choice
        (router replay); without them, those set by :meth:`force_routing` are used."""
        if forced_experts is None and hasattr(self, "forced_experts"):
            forced_experts = self.forced_experts[...]
            forced_weights = self.forced_weights[...] if hasattr(self, "forced_weights") \
                else None
        training = (not self.deterministic) if training is None else bool(training)
        if training and rng is None and self.noise_rng is not None:
            rng = self.noise_rng()
        capturing = _capturing(self)
        out = layer_step(JAX, self.params_dict(), self.layer_state(),
                         jnp.asarray(x) if isinstance(x, np.ndarray) else x, self.config,
                         training=training, update_state=training or self.calibrating,
                         token_ids=token_ids, attention_probs=attention_probs,
                         complexity_scores=complexity_scores, mask=mask, rng=rng,
                         need_plan=return_plan or capturing or training or self.recording,
                         forced_experts=forced_experts, forced_weights=forced_weights)
        self._write(out.state, out.updated)
        plan = out.plan
        if self.recording:
            self.recorded_experts = Routing(plan.expert_indices)
        self.aux_loss[...] = (jnp.zeros((), jnp.float32) if plan is None
                              else jnp.asarray(plan.losses.total, jnp.float32))
        if capturing and plan is not None:
            self.sow(nnx.Intermediate, "router_losses", plan.losses)
            self.sow(nnx.Intermediate, "routing_stats", plan.stats)
            self.sow(nnx.Intermediate, "expert_counts", plan.expert_counts)
        if not return_plan:
            return out.y
        return out.y, plan if plan is not None else out.replan()


# ----- whole-model helpers (re-exported by moe_router.flax) ---------------------------------------
def moe_layers(model: Any) -> list[MoE]:
    """Every :class:`MoE` in ``model`` (an ``nnx`` graph: module, list, dict), in graph order."""
    found: dict[int, MoE] = {}
    for _, node in nnx.iter_graph(model):
        if isinstance(node, MoE):
            found.setdefault(id(node), node)
    return list(found.values())


def total_aux_loss(model: Any) -> jax.Array:
    """Sum of the last call's ``plan.losses.total`` over the model's MoE layers: add it to the
    training loss inside the function ``nnx.grad`` differentiates (the gradient flows)."""
    return sum((layer.aux_loss[...] for layer in moe_layers(model)), jnp.zeros((), jnp.float32))


def calibrate(model: Any, batches: Iterable[Any], *, forward: Callable[[Any], Any] | None = None,
              reset: bool = True) -> dict[str, Any]:
    """Run ``batches`` through ``model`` with its MoE layers calibrating their router state
    (see :mod:`moe_router.layer.calibrate`). The default forward is ``model(**batch)`` /
    ``model(*batch)`` / ``model(batch)`` under ``nnx.jit`` (every leaf of a batch is traced)."""
    if forward is None:
        step = nnx.jit(lambda model, batch: default_forward(model)(batch))

        def forward(batch: Any) -> Any:
            return step(model, batch)

    return run_calibration(moe_layers(model), batches, forward, reset=reset)
