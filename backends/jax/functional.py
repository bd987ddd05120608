"""Pure-JAX MoE: ``init_params(config, key)`` and ``apply(params, x, config)`` -> ``(y, plan)``.

``params`` is a plain dict with the portable names of :mod:`moe_router.weights`
(``router.weight``, ``experts.w_up``, ...), so it is a pytree for ``jax.grad`` / optax and is
exchangeable with ``export_weights()`` of every layer. Example::

    import jax, jax.numpy as jnp
    import moe_router as mr
    from moe_router.flax import init_params, apply

    mc = mr.MoEConfig(d_model=64, d_ff=128, router=mr.RouterConfig(num_experts=8, k=2))
    params = init_params(mc, jax.random.key(0))

    @jax.jit
    def loss_fn(params, x):
        y, plan = apply(params, x, mc)
        return jnp.mean(y ** 2) + plan.losses.total

    grads = jax.grad(loss_fn)(params, jnp.ones((4, 16, 64)))

The ``config`` is static (hashable): close over it or pass it with ``static_argnums``.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_router.api import route
from moe_router.config import MoEConfig
from moe_router.errors import InputError, InputTypeError
from moe_router.plan import RouterState, RoutingPlan
from moe_router.weights import check_weights, weight_shapes

from . import dispatch as dp
from .backend import JaxBackend

_JAX = JaxBackend()  # stateless; passed to route() so no registry lookup happens per call
#: strategies that read the controller :class:`RouterState` (the layers keep one for these)
STATEFUL_STRATEGIES = ("top_p", "complexity")


def init_params(config: MoEConfig, key: jax.Array,
                dtype: Any = jnp.float32) -> dict[str, jax.Array]:
    """Random parameters: normal(0, ``init_std``); biases and the expert bias start at zero."""
    shapes = tuple(weight_shapes(config).items())
    return _init_normal(key, shapes, float(config.init_std), jnp.dtype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _init_normal(key: jax.Array, shapes: tuple[tuple[str, tuple[int, ...]], ...], std: float,
                 dtype: Any) -> dict[str, jax.Array]:
    # jitted and keyed by shapes only: configs that differ in routing share one compilation
    keys = jax.random.split(key, len(shapes))
    params = {}
    for (name, shape), k in zip(shapes, keys):
        if name.endswith("bias"):
            params[name] = jnp.zeros(shape, dtype)
        else:
            params[name] = std * jax.random.normal(k, shape, dtype)
    return params


def params_from_weights(config: MoEConfig, weights: Mapping[str, Any]) -> dict[str, jax.Array]:
    """Portable weights (NumPy, any framework's ``export_weights()``) as JAX params, validated."""
    return {name: jnp.asarray(v) for name, v in check_weights(config, weights).items()}


def init_state(config: MoEConfig) -> RouterState:
    """A fresh controller state (float32 scalars), as the layers start with."""
    values = (config.router.top_p, 0.0, 1.0, 0.0, 0.0)
    return RouterState(*(jnp.asarray(v, jnp.float32) for v in values))


def resolve_dispatch(config: MoEConfig, num_tokens: int, platform: str | None = None) -> str:
    """The expert-compute method for ``num_tokens`` tokens (``config.dispatch`` unless auto)."""
    if config.dispatch not in dp.METHODS:
        raise InputError("config.dispatch", f"{config.dispatch!r}; the JAX backend implements "
                         f"{', '.join(dp.METHODS)}")
    if config.dispatch != "auto":
        return config.dispatch
    r = config.router
    return dp.choose_method(platform or jax.default_backend(), num_tokens, r.max_slots,
                            r.num_experts, r.capacity_factor is not None)


def experts_apply(x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
                  params: Mapping[str, jax.Array], config: MoEConfig,
                  method: str | None = None) -> jax.Array:
    """Routed experts only: ``(T, D)`` out, ``sum_k weights[t, k] * expert_{ids[t, k]}(x_t)``."""
    T = x_TD.shape[0]
    if T == 0:  # nothing to compute (reshapes with -1 are undefined on empty arrays)
        return jnp.zeros_like(x_TD)
    method = method or resolve_dispatch(config, T)
    w = {name: params[f"experts.{name}"].astype(x_TD.dtype)
         for name in ("w_gate", "w_up", "w_down") if f"experts.{name}" in params}
    act = config.activation
    if method == "tiles":
        return dp.tiles(x_TD, ids_TK, weights_TK, w, act)
    if method == "capacity":
        return dp.capacity(x_TD, ids_TK, weights_TK, w, act, cap=config.router.capacity(T))
    if method == "ragged_dot":
        return dp.ragged(x_TD, ids_TK, weights_TK, w, act)
    if method == "gather":
        return dp.gather(x_TD, ids_TK, weights_TK, w, act)
    if method == "dense":
        return dp.dense(x_TD, ids_TK, weights_TK, w, act)
    raise InputError("dispatch", f"{method!r}; expected one of {', '.join(dp.METHODS[1:])}")


def shared_apply(x_TD: jax.Array, params: Mapping[str, jax.Array],
                 config: MoEConfig) -> jax.Array:
    """The always-on shared FFN ``(T, D)`` (optionally sigmoid-gated, Qwen2-MoE)."""
    dtype = x_TD.dtype
    gate = x_TD @ params["shared.w_gate"].astype(dtype) if config.is_gated else None
    hidden = dp.activate(config.activation, gate, x_TD @ params["shared.w_up"].astype(dtype))
    out_TD = hidden @ params["shared.w_down"].astype(dtype)
    if config.shared_expert_gate:
        out_TD = out_TD * jax.nn.sigmoid(x_TD @ params["shared.gate"].astype(dtype))
    return out_TD


def check_input(x: Any, d_model: int) -> jax.Array:
    """``x`` as a floating JAX array of shape ``(..., d_model)``; clear errors otherwise."""
    if not isinstance(x, (jax.Array, np.ndarray)):
        raise InputTypeError("x", f"expected a jax.Array of shape (..., {d_model}), got "
                             f"{type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise InputTypeError("x", f"expected a floating dtype (float32/bfloat16/float16/"
                             f"float64), got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] != d_model:
        raise InputError("x", f"expected shape (..., d_model={d_model}), got {tuple(x.shape)}")
    return jnp.asarray(x)


def _per_token(name: str, value: Any, T: int) -> jax.Array | None:
    if value is None:
        return None
    if getattr(value, "size", None) != T:
        raise InputError(name, f"expected one entry per token ({T}, x's leading shape), got "
                         f"{getattr(value, 'shape', type(value).__name__)}")
    return jnp.reshape(jnp.asarray(value), (T,))


def apply(params: Mapping[str, jax.Array], x: jax.Array, config: MoEConfig, *,
          token_ids: Any = None, attention_probs: Any = None, complexity_scores: Any = None,
          mask: Any = None, training: bool = False, state: RouterState | None = None,
          rng: Any = None, dispatch: str | None = None) -> tuple[jax.Array, RoutingPlan]:
    """The MoE layer as a pure function.

    Args:
        params: portable-name dict (:func:`init_params`).
        x: ``(..., D)`` float input; leading dimensions are T tokens.
        config: the static :class:`MoEConfig`.
        token_ids / complexity_scores / mask: one entry per token (x's leading shape).
        attention_probs: ``(T, S)`` or ``(H, T, S)`` (``attention_entropy`` estimator).
        training: router noise and controller updates (the new state is ``plan.state``).
        state: controller :class:`RouterState` (see :func:`init_state`).
        rng: ``jax.random`` key for router noise (training only).
        dispatch: force an expert-compute method (default: ``config.dispatch``).

    Returns:
        ``(y, plan)``: ``y`` of ``x``'s shape and dtype, and the :class:`RoutingPlan`.
    """
    x = check_input(x, config.d_model)
    r = config.router
    x_TD = jnp.reshape(x, (-1, config.d_model))
    T = x_TD.shape[0]
    logits_TE = x_TD.astype(jnp.float32) @ params["router.weight"].astype(jnp.float32)
    if config.router_bias:
        logits_TE = logits_TE + params["router.bias"].astype(jnp.float32)
    kwargs: dict[str, Any] = {"token_ids_T": _per_token("token_ids", token_ids, T),
                              "complexity_scores_T": _per_token("complexity_scores",
                                                                complexity_scores, T),
                              "mask_T": _per_token("mask", mask, T),
                              "attention_probs": attention_probs}
    if r.strategy == "complexity" and r.complexity_estimator == "hidden_norm":
        kwargs["hidden_TD"] = x_TD
    if r.use_expert_bias:
        kwargs["expert_bias_E"] = jax.lax.stop_gradient(params["router.expert_bias"])
    plan = route(logits_TE, r, training=training, state=state, rng=rng, backend=_JAX, **kwargs)
    method = resolve_dispatch(config if dispatch is None else config.replace(dispatch=dispatch),
                              T)
    y_TD = experts_apply(x_TD, plan.expert_indices, plan.expert_weights, params, config, method)
    if config.has_shared:
        y_TD = y_TD + shared_apply(x_TD, params, config)
    return jnp.reshape(y_TD, x.shape).astype(x.dtype), plan
