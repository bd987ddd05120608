"""Pure-JAX MoE: ``init_params``, ``init_state`` and ``apply`` on top of the one layer step.

``params`` is a plain dict of the trainable weights with the portable names of
:mod:`moe_router.weights` (``router.weight``, ``experts.w_up``, ...): a pytree for ``jax.grad`` /
optax, exchangeable with every layer's ``export_weights()``. The layer's mutable state (router
controller, aux-free expert bias, observer counters) is a separate
:class:`~moe_router.layer.state.LayerState` pytree, threaded explicitly. Example::

    import jax, jax.numpy as jnp
    import moe_router as mr
    from moe_router.flax import apply, init_params, init_state

    mc = mr.MoEConfig(d_model=64, d_ff=128, router=mr.RouterConfig(num_experts=8, k=2))
    params, state = init_params(mc, jax.random.key(0)), init_state(mc)

    @jax.jit
    def loss_fn(params, state, x):
        y, plan, state = apply(params, x, mc, state=state, training=True, return_state=True)
        return jnp.mean(y ** 2) + plan.losses.total, state

    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x)

The ``config`` is static (hashable): close over it or pass it with ``static_argnums``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_router.config import MoEConfig
from moe_router.layer.state import PERSISTENT, LayerState, initial_state_arrays, state_from_arrays
from moe_router.layer.step import layer_step
from moe_router.plan import RoutingPlan
from moe_router.weights import check_weights, param_shapes

from .backend import JaxBackend

JAX = JaxBackend()  # stateless; layer_step gets it directly (no registry lookup per call)


def init_params(config: MoEConfig, key: jax.Array,
                dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Random trainable parameters (``param_shapes``): normal(0, ``init_std``), biases zero."""
    shapes = tuple(param_shapes(config).items())
    return _init_normal(key, shapes, float(config.init_std), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_normal(key: jax.Array, shapes: tuple[tuple[str, tuple[int, ...]], ...], std: float,
                 dtype: Any) -> dict[str, jax.Array]:
    # jitted and keyed by shapes only: configs that differ in routing share one compilation
    keys = jax.random.split(key, len(shapes))
    return {name: jnp.zeros(shape, dtype) if name.endswith("bias")
            else std * jax.random.normal(k, shape, dtype) for (name, shape), k in zip(shapes, keys)}


def params_from_weights(config: MoEConfig, weights: Mapping[str, Any]) -> dict[str, jax.Array]:
    """The trainable part of portable weights (any layer's ``export_weights()``), validated;
    the state entries go to :func:`init_state`."""
    checked = check_weights(config, weights)
    return {name: jnp.asarray(checked[name]) for name in param_shapes(config)}


def init_state(config: MoEConfig, weights: Mapping[str, Any] | None = None) -> LayerState:
    """A fresh :class:`LayerState` (what a new layer starts with); the persistent entries
    (``router.state``, ``router.expert_bias``) are taken from ``weights`` when given."""
    source = {} if weights is None else weights
    arrays = {name: jnp.asarray(source.get(name, v) if name in PERSISTENT else v, v.dtype)
              for name, v in initial_state_arrays(config).items()}
    return state_from_arrays(JAX, arrays, config)


def apply(params: Mapping[str, jax.Array], x: jax.Array, config: MoEConfig, *,
          state: LayerState | None = None, training: bool = False,
          update_state: bool | None = None, rng: Any = None, token_ids: Any = None,
          attention_probs: Any = None, complexity_scores: Any = None, mask: Any = None,
          dispatch: str | None = None, return_state: bool = False
          ) -> tuple[jax.Array, RoutingPlan] | tuple[jax.Array, RoutingPlan, LayerState]:
    """The MoE layer as a pure function (the same step as ``moe_router.flax.MoE``).

    Args:
        params: trainable portable-name dict (:func:`init_params`, :func:`params_from_weights`).
        x: ``(..., D)`` float input; leading dimensions are T tokens.
        config: the static :class:`MoEConfig`.
        state: the :class:`LayerState` (:func:`init_state`); ``None``: a fresh one (with the
            persistent entries of ``params`` when it holds the full export).
        training: router noise and state updates.
        update_state: update the state (default ``training``); ``True`` alone calibrates.
        rng: ``jax.random`` key for router noise (training only).
        token_ids / complexity_scores / mask: one entry per token (x's leading shape).
        attention_probs: ``(T, S)`` or ``(H, T, S)`` (``attention_entropy`` estimator).
        dispatch: force an expert-compute kernel (default: ``config.dispatch``).
        return_state: also return the next state.

    Returns:
        ``(y, plan)``, or ``(y, plan, new_state)`` with ``return_state=True``: ``y`` has ``x``'s
        shape and dtype.
    """
    if isinstance(x, np.ndarray):
        x = jnp.asarray(x)
    out = layer_step(JAX, params, init_state(config, params) if state is None else state, x, config,
                     training=training, update_state=update_state, token_ids=token_ids,
                     attention_probs=attention_probs, complexity_scores=complexity_scores,
                     mask=mask, rng=rng, dispatch=dispatch)
    return (out.y, out.plan, out.state) if return_state else (out.y, out.plan)
