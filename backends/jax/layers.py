"""``MoE``: the Flax NNX Mixture-of-Experts layer built from a :class:`~moe_router.MoEConfig`.

Parameters live in the portable layout of :mod:`moe_router.weights`; the submodule and attribute
names make the ``nnx.state`` paths equal the portable names (``router/weight``,
``experts/w_up``, ...). The forward pass is :func:`moe_router_backends.jax.functional.apply`, so the layer and
the functional API compute the same thing. Nothing has Python side effects in traced code:

- losses and statistics are returned with ``return_plan=True`` and, inside
  ``nnx.capture(..., nnx.Intermediate)``, sown as ``router_losses``, ``routing_stats`` and
  ``expert_counts`` (outside a capture nothing is sown: the module's graph stays fixed);
- the aux-free bias (:class:`ExpertBias`), the step's expert load (:class:`ExpertLoad`) and the
  controller state (:class:`ControllerState`) are non-trainable ``nnx.Variable`` state, updated
  functionally, so ``nnx.jit`` / ``nnx.grad`` / ``nnx.scan`` carry them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_router.config import MoEConfig
from moe_router.errors import InputError, InputTypeError
from moe_router.losses import update_expert_bias as _bias_step
from moe_router.plan import RouterState, RoutingPlan
from moe_router.weights import check_weights, init_weights, weight_shapes

from .functional import STATEFUL_STRATEGIES, apply, resolve_dispatch


def _capturing(module: nnx.Module) -> bool:
    """True inside ``nnx.capture``. Sowing outside it would add attributes to the module (a
    deprecated path in flax 0.12) and change its graph, so ``nnx.jit`` would retrace each call."""
    return hasattr(module, "__captures__")


class ExpertBias(nnx.Variable):
    """Aux-loss-free balancing bias ``(E,)``: state, not a parameter (no gradient, no optimizer)."""


class ExpertLoad(nnx.Variable):
    """Routing slots per expert ``(E,)`` int32 summed over training calls since the bias step."""


class ControllerState(nnx.Variable):
    """The router's :class:`~moe_router.RouterState` as a ``(5,)`` float32 vector."""


class Router(nnx.Module):
    """Router linear ``weight`` ``(D, E + N)``, optional ``bias``, optional ``expert_bias``."""

    def __init__(self, config: MoEConfig, params: Mapping[str, jax.Array]) -> None:
        self.weight = nnx.Param(params["router.weight"])
        self.bias = nnx.Param(params["router.bias"]) if config.router_bias else None
        self.expert_bias = (ExpertBias(params["router.expert_bias"])
                            if config.router.use_expert_bias else None)


class Experts(nnx.Module):
    """Stacked routed experts: ``w_gate`` / ``w_up`` ``(E, D, F)``, ``w_down`` ``(E, F, D)``."""

    def __init__(self, config: MoEConfig, params: Mapping[str, jax.Array]) -> None:
        self.w_gate = nnx.Param(params["experts.w_gate"]) if config.is_gated else None
        self.w_up = nnx.Param(params["experts.w_up"])
        self.w_down = nnx.Param(params["experts.w_down"])


class SharedExpert(nnx.Module):
    """Always-on FFN ``(D, Fs)`` / ``(Fs, D)`` with an optional sigmoid output gate ``(D, 1)``."""

    def __init__(self, config: MoEConfig, params: Mapping[str, jax.Array]) -> None:
        self.w_gate = nnx.Param(params["shared.w_gate"]) if config.is_gated else None
        self.w_up = nnx.Param(params["shared.w_up"])
        self.w_down = nnx.Param(params["shared.w_down"])
        self.gate = nnx.Param(params["shared.gate"]) if config.shared_expert_gate else None


class MoE(nnx.Module):
    """Mixture-of-Experts layer: ``y = layer(x)`` for ``x`` of shape ``(..., d_model)``.

    ``layer(x, return_plan=True)`` returns ``(y, plan)``; add ``plan.losses.total`` to the
    training loss, or collect the sown ``router_losses`` with ``nnx.capture(fn, nnx.Intermediate)``.
    Router noise and controller updates happen only in training mode (``layer.train()`` or
    ``training=True``); with ``use_expert_bias`` call :meth:`update_expert_bias` after the
    optimizer step.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs | None = None,
                 param_dtype: Any = jnp.float32,
                 weights: Mapping[str, Any] | None = None) -> None:
        """Args:
            config: the :class:`MoEConfig`.
            rngs: ``nnx.Rngs``: ``params`` stream for the initialisation, ``noise`` stream (or
                ``default``) for router noise in training.
            param_dtype: dtype of the parameters.
            weights: initial weights in the portable layout instead of random ones.
        """
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig, got {type(config).__name__}")
        resolve_dispatch(config, 1)  # fails early on an unknown dispatch name
        if rngs is None and (weights is None or config.router.noise != "none"):
            raise InputError("rngs", "expected nnx.Rngs(...) (needed for the random "
                             "initialisation and for router noise)")
        self.config = config
        if weights is None:
            # NumPy draws seeded by the params key: eager layer construction then compiles no
            # XLA random kernels (seconds per weight shape on CPU); jit users have init_params
            seed = np.asarray(jax.random.key_data(rngs.params())).ravel().tolist()
            weights = init_weights(config, seed=np.random.SeedSequence(seed))
        params = {name: jnp.asarray(v, param_dtype)
                  for name, v in check_weights(config, weights).items()}
        self.router = Router(config, params)
        self.experts = Experts(config, params)
        self.shared = SharedExpert(config, params) if config.has_shared else None
        r = config.router
        self.router_state = ControllerState(jnp.asarray([r.top_p, 0.0, 1.0, 0.0, 0.0],
                                                        jnp.float32))
        self.expert_load = (ExpertLoad(jnp.zeros((r.num_experts,), jnp.int32))
                            if r.use_expert_bias else None)
        self.noise_rng = rngs["noise"].fork() if rngs is not None and r.noise != "none" else None
        self.deterministic = True  # nnx convention: layer.train() sets it to False

    # ----- weights ---------------------------------------------------------------------------
    def _variables(self) -> dict[str, nnx.Variable]:
        found = {"router.weight": self.router.weight, "router.bias": self.router.bias,
                 "router.expert_bias": self.router.expert_bias, "experts.w_gate":
                 self.experts.w_gate, "experts.w_up": self.experts.w_up,
                 "experts.w_down": self.experts.w_down}
        if self.shared is not None:
            found.update({"shared.w_gate": self.shared.w_gate, "shared.w_up": self.shared.w_up,
                          "shared.w_down": self.shared.w_down, "shared.gate": self.shared.gate})
        return {name: found[name] for name in weight_shapes(self.config)}

    def params_dict(self) -> dict[str, jax.Array]:
        """The current weights as a portable-name dict of JAX arrays (for :func:`apply`)."""
        return {name: var[...] for name, var in self._variables().items()}

    def export_weights(self) -> dict[str, np.ndarray]:
        """The portable weights: ``moe_router.weights.weight_shapes(config)`` names, float32."""
        return {name: np.array(value, dtype=np.float32)
                for name, value in self.params_dict().items()}

    def load_weights(self, weights: Mapping[str, Any]) -> None:
        """Copy portable weights (validated by ``check_weights``) into this layer."""
        checked = check_weights(self.config, weights)
        for name, var in self._variables().items():
            var[...] = jnp.asarray(checked[name], dtype=var[...].dtype)

    @classmethod
    def from_weights(cls, config: MoEConfig, weights: Mapping[str, Any], *,
                     rngs: nnx.Rngs | None = None, **kwargs: Any) -> MoE:
        """A layer holding ``weights`` (the portable dict of any framework's layer)."""
        if rngs is None and config.router.noise != "none":
            rngs = nnx.Rngs(0)
        return cls(config, rngs=rngs, weights=weights, **kwargs)

    # ----- state -----------------------------------------------------------------------------
    def router_state_tuple(self) -> RouterState:
        """The controller state as a :class:`~moe_router.RouterState` of float32 scalars."""
        vec = self.router_state[...]
        return RouterState(*(vec[i] for i in range(5)))

    def reset_router_state(self) -> None:
        r = self.config.router
        self.router_state[...] = jnp.asarray([r.top_p, 0.0, 1.0, 0.0, 0.0], jnp.float32)

    def update_expert_bias(self, expert_counts: Any = None) -> jax.Array:
        """Aux-free balancing step; returns the new ``(E,)`` bias.

        Uses ``expert_counts`` when given (e.g. summed over data-parallel devices with
        ``jax.lax.psum``), else the load accumulated by training calls since the last step, which
        is then reset. Pure ``nnx`` state updates: works eagerly and inside ``nnx.jit``.
        """
        bias = self.router.expert_bias
        if bias is None or self.expert_load is None:
            raise InputError("update_expert_bias", "the router has no expert bias; set "
                             "RouterConfig(use_expert_bias=True)")
        counts = self.expert_load[...] if expert_counts is None else jnp.asarray(expert_counts)
        new = _bias_step(bias[...].astype(jnp.float32), counts,
                         self.config.router.bias_update_rate)
        bias[...] = new.astype(bias[...].dtype)
        self.expert_load[...] = jnp.zeros_like(self.expert_load[...])
        return new

    # ----- forward ---------------------------------------------------------------------------
    def __call__(self, x: jax.Array, *, token_ids: Any = None, attention_probs: Any = None,
                 complexity_scores: Any = None, mask: Any = None, training: bool | None = None,
                 rng: Any = None,
                 return_plan: bool = False) -> jax.Array | tuple[jax.Array, RoutingPlan]:
        """Route and mix ``x`` ``(..., D)``; ``token_ids`` / ``complexity_scores`` / ``mask``
        have ``x``'s leading shape, ``attention_probs`` is ``(T, S)`` or ``(H, T, S)``."""
        training = (not self.deterministic) if training is None else training
        r = self.config.router
        stateful = r.strategy in STATEFUL_STRATEGIES
        if training and rng is None and self.noise_rng is not None:
            rng = self.noise_rng()
        y, plan = apply(self.params_dict(), x, self.config, token_ids=token_ids,
                        attention_probs=attention_probs, complexity_scores=complexity_scores,
                        mask=mask, training=training,
                        state=self.router_state_tuple() if stateful else None, rng=rng)
        if training and stateful and plan.state is not None:
            new_state = jnp.stack([jnp.asarray(v, jnp.float32) for v in plan.state])
            self.router_state[...] = jax.lax.stop_gradient(new_state)
        if training and self.expert_load is not None:
            self.expert_load[...] = self.expert_load[...] + jax.lax.stop_gradient(
                plan.expert_counts).astype(jnp.int32)
        if _capturing(self):
            self.sow(nnx.Intermediate, "router_losses", plan.losses)
            self.sow(nnx.Intermediate, "routing_stats", plan.stats)
            self.sow(nnx.Intermediate, "expert_counts", plan.expert_counts)
        return (y, plan) if return_plan else y
