"""``route()``: router logits in, an immutable :class:`~moe_router.plan.RoutingPlan` out.

The same code runs on every backend: validation (eager only), float32 upcast, training noise,
the strategy, route_scale, capacity, then losses and statistics computed with backend ops.
"""

from __future__ import annotations

from typing import Any

from .backend import Array, Backend
from .config import RouterConfig
from .dispatch import apply_capacity
from .errors import InputError, InputTypeError
from .layer.experts import slots_per_expert
from .losses import entropy_from_probs, load_balancing_from_probs, z_loss_from_lse
from .plan import RouterLosses, RouterState, RoutingPlan, RoutingStats
from .registry import backend_for, default_registry, get_backend
from .routing.context import RoutingContext


def route(router_logits_TE: Array, config: RouterConfig, *, hidden_TD: Array | None = None,
          token_ids_T: Array | None = None, attention_probs: Array | None = None,
          complexity_scores_T: Array | None = None, expert_bias_E: Array | None = None,
          mask_T: Array | None = None, training: bool = False,
          state: RouterState | None = None, rng: Any = None,
          backend: str | Backend | None = None, update_state: bool | None = None,
          validate: bool = True, forced_experts_TK: Array | None = None,
          forced_weights_TK: Array | None = None) -> RoutingPlan:
    """Route T tokens to experts.

    Args:
        router_logits_TE: ``(T, E + N)`` float router logits (N null experts); any registered
            framework; the plan's arrays are of the same framework.
        config: the :class:`RouterConfig`.
        hidden_TD: ``(T, D)`` hidden states (``hidden_norm`` estimator).
        token_ids_T: ``(T,)`` int token ids (``hash`` strategy).
        attention_probs: ``(T, S)`` or ``(H, T, S)`` attention probabilities
            (``attention_entropy`` estimator).
        complexity_scores_T: ``(T,)`` float scores (``external`` estimator).
        expert_bias_E: ``(E,)`` aux-free balancing bias, added to the selection scores only.
        mask_T: ``(T,)`` 1 = real token, 0 = padding; applies to losses and statistics.
        training: training step: router noise (if configured) and controller updates.
        state: controller state (top-p controller, complexity calibration); the updated state is
            ``plan.state``.
        rng: seed / generator / PRNG key for training noise.
        backend: force a backend by name or instance (default: from the logits' type).
        update_state: update the controller state (default: ``training``); ``True`` without
            ``training`` calibrates without noise (:func:`moe_router.layer.calibrate`).
        validate: check the inputs' data (NaN/Inf, per ``config.nan_policy``); the layer step
            passes ``False`` because it has already checked them, naming the user's ``x``.
        forced_experts_TK: ``(T, k)`` int expert ids (``-1`` = unused slot, ``k <=
            max_slots``) that replace the strategy's choice: router replay (the experts recorded
            in a rollout) or forced balanced routing. Capacity, losses and statistics then
            describe the forced choice; the controller state still updates from the router.
        forced_weights_TK: ``(T, k)`` gate weights of the forced slots; default: the router
            scores at the forced experts, renormalized over each token's slots as the strategy
            renormalizes its own (``normalize_weights``, else the strategy's default), times
            ``route_scale``; the gradient reaches the router.
    """
    b = get_backend(backend) if backend is not None else backend_for(router_logits_TE)
    logits_TE = _validate_logits(b, router_logits_TE, config, validate)
    T = b.dim(logits_TE, 0)
    _validate_optional(b, config, T, hidden_TD=hidden_TD, token_ids_T=token_ids_T,
                       complexity_scores_T=complexity_scores_T, expert_bias_E=expert_bias_E,
                       mask_T=mask_T, attention_probs=attention_probs)
    if training and config.noise != "none" and config.noise_std > 0:
        logits_TE = _add_noise(b, logits_TE, config, rng)
    softmax_TE = b.softmax(logits_TE, axis=-1)  # once: scores (softmax) and losses
    probs_TE = b.sigmoid(logits_TE) if config.score_func == "sigmoid" else softmax_TE
    if expert_bias_E is not None:
        expert_bias_E = b.cast(expert_bias_E, "float32")
    ctx = RoutingContext(
        backend=b, config=config, logits=logits_TE, probs=probs_TE, hidden=hidden_TD,
        token_ids=token_ids_T, attention_probs=attention_probs,
        complexity_scores=None if complexity_scores_T is None else b.cast(complexity_scores_T,
                                                                          "float32"),
        expert_bias=expert_bias_E, training=training if update_state is None else update_state,
        state=state)
    selection = default_registry().strategy(config.strategy)(ctx)
    indices_TK, weights_TK = selection.indices, b.cast(selection.weights, "float32")
    if forced_experts_TK is not None:
        indices_TK, weights_TK = _forced(b, config, probs_TE, T, forced_experts_TK,
                                         forced_weights_TK)
    if config.route_scale != 1.0:
        weights_TK = weights_TK * float(config.route_scale)
    capacity = (None if config.strategy_spec.own_capacity
                else slots_per_expert(b, config, T, logits_TE))
    indices_TK, weights_TK, num_dropped = apply_capacity(
        b, indices_TK, weights_TK, capacity, config.num_experts, config.drop_policy)
    num_per_token_T = b.sum(indices_TK >= 0, axis=-1)
    expert_counts_E = b.bincount(indices_TK, config.num_experts)
    losses = _losses(b, logits_TE, softmax_TE, indices_TK, config, mask_T)
    stats = _stats(b, num_per_token_T, expert_counts_E, losses.entropy, config, mask_T,
                   logits_TE)
    return RoutingPlan(expert_indices=indices_TK, expert_weights=weights_TK,
                       num_experts_per_token=num_per_token_T, expert_counts=expert_counts_E,
                       num_dropped=num_dropped, router_probs=probs_TE, losses=losses,
                       stats=stats, state=selection.state, config=config)


# ----- validation ----------------------------------------------------------------------------
def _validate_logits(b: Backend, logits: Array, config: RouterConfig, validate: bool) -> Array:
    shape = b.shape(logits)
    if len(shape) != 2:
        raise InputError("router_logits_TE", f"expected rank 2 (T, E), got shape {shape}; "
                         "flatten leading dimensions first")
    if shape[1] is not None and shape[1] != config.num_choices:
        raise InputError("router_logits_TE", f"width {shape[1]} != num_experts + "
                         f"num_null_experts = {config.num_choices}")
    if b.dtype_kind(logits) != "f":
        raise InputTypeError("router_logits_TE", f"expected a floating dtype (float16/bfloat16/"
                             f"float32/float64), got kind {b.dtype_kind(logits)!r}")
    logits = b.cast(logits, "float32")
    if validate:
        check_finite(b, logits, config, "router_logits_TE", "contains")
    return logits


def check_finite(b: Backend, x: Array, config: RouterConfig, argument: str, what: str) -> None:
    """Raise :class:`InputError` naming ``argument`` if ``x`` has NaN/Inf, per ``nan_policy``.

    ``raise`` checks eager arrays in host memory only: on an accelerator the check would force a
    device-to-host sync in every layer of every forward (stalling decoding), so it is skipped
    there; ``raise_always`` checks on every device (one sync per call: a debugging mode);
    ``ignore`` never checks. Traced code (jit, tf.function, compile) is never checked.
    """
    policy = config.nan_policy
    if policy == "ignore" or b.is_tracing(x):
        return
    if policy == "raise" and not b.is_host(x):
        return
    if not b.all_finite(x):
        raise InputError(argument, f"{what} NaN or Inf (nan_policy={policy!r}; set "
                         "RouterConfig(nan_policy='ignore') to route them anyway)")


def _check_vector(b: Backend, name: str, x: Array, T: Any, kinds: str, what: str) -> None:
    shape = b.shape(x)
    if len(shape) != 1 or (isinstance(T, int) and shape[0] is not None and shape[0] != T):
        raise InputError(name, f"expected shape ({T},), got {shape}")
    if b.dtype_kind(x) not in kinds:
        raise InputTypeError(name, f"expected {what}, got dtype kind {b.dtype_kind(x)!r}")


def _validate_optional(b: Backend, config: RouterConfig, T: Any, **arrays: Array | None) -> None:
    token_ids, scores = arrays["token_ids_T"], arrays["complexity_scores_T"]
    if token_ids is not None:
        _check_vector(b, "token_ids_T", token_ids, T, "iu", "an integer dtype")
    if scores is not None:
        _check_vector(b, "complexity_scores_T", scores, T, "fiu", "a numeric dtype")
    if arrays["mask_T"] is not None:
        _check_vector(b, "mask_T", arrays["mask_T"], T, "fiub", "a bool or numeric dtype")
    bias = arrays["expert_bias_E"]
    if bias is not None:
        _check_vector(b, "expert_bias_E", bias, config.num_experts, "f", "a floating dtype")
    hidden = arrays["hidden_TD"]
    if hidden is not None:
        shape = b.shape(hidden)
        if len(shape) != 2 or (isinstance(T, int) and shape[0] not in (None, T)):
            raise InputError("hidden_TD", f"expected shape ({T}, D), got {shape}")
    attention = arrays["attention_probs"]
    if attention is not None:
        shape = b.shape(attention)
        if len(shape) not in (2, 3) or (isinstance(T, int) and shape[-2] not in (None, T)):
            raise InputError("attention_probs", f"expected shape ({T}, S) or (H, {T}, S), "
                             f"got {shape}")


# ----- pieces of the plan ----------------------------------------------------------------------
def _forced(b: Backend, config: RouterConfig, probs_TE: Array, T: Any, experts_TK: Array,
            weights_TK: Array | None) -> tuple[Array, Array]:
    """The plan's ``(T, max_slots)`` ids and weights from a forced choice (see ``route``)."""
    from .routing.select import normalize_rows

    shape, K, E = b.shape(experts_TK), config.max_slots, config.num_experts
    if len(shape) != 2 or (isinstance(T, int) and shape[0] not in (None, T)) or \
            shape[1] is None or shape[1] > K:
        raise InputError("forced_experts", f"expected shape ({T}, k) with k <= max_slots={K}, "
                         f"got {shape}")
    if b.dtype_kind(experts_TK) not in "iu":
        raise InputTypeError("forced_experts", f"expected an integer dtype, got kind "
                             f"{b.dtype_kind(experts_TK)!r}")
    ids_TK = b.cast(experts_TK, "int")
    if not b.is_tracing(ids_TK) and bool(b.to_numpy(b.sum(b.cast(ids_TK >= E, "int")) > 0)):
        raise InputError("forced_experts", f"expected ids in [-1, {E}) (-1 = unused slot)")
    used_TK = ids_TK >= 0
    if weights_TK is None:
        safe_TK = b.where(used_TK, ids_TK, 0)
        weights_TK = b.where(used_TK, b.take_along_axis(probs_TE[:, :E], safe_TK, axis=-1), 0.0)
        normalize = config.normalize_weights
        if normalize if normalize is not None else config.strategy_spec.normalizes:
            weights_TK = normalize_rows(b, weights_TK)
    else:
        if b.shape(weights_TK) != shape:
            raise InputError("forced_weights", f"expected forced_experts' shape {shape}, got "
                             f"{b.shape(weights_TK)}")
        weights_TK = b.where(used_TK, b.cast(weights_TK, "float32"), 0.0)
    pad = K - shape[1]
    if pad:
        fill_TP = b.reshape(ids_TK[:, :1] * 0 - 1, (-1, 1))
        ids_TK = b.concat([ids_TK, *([fill_TP] * pad)], axis=1)
        weights_TK = b.concat([weights_TK, *([b.cast(fill_TP * 0, "float32")] * pad)], axis=1)
    order_TK = b.argsort_desc(b.where(ids_TK >= 0, weights_TK + 1.0, 0.0), axis=-1)
    return (b.take_along_axis(ids_TK, order_TK, axis=-1),
            b.take_along_axis(weights_TK, order_TK, axis=-1))



def _add_noise(b: Backend, logits_TE: Array, config: RouterConfig, rng: Any) -> Array:
    std = float(config.noise_std)
    if config.noise == "normal":
        return logits_TE + std * b.random_normal(rng, logits_TE)
    uniform = b.random_uniform(rng, logits_TE)
    if config.noise == "gumbel":
        u = b.minimum(b.maximum(uniform, 1e-7), 1.0 - 1e-7)
        return logits_TE + std * -b.log(-b.log(u))
    return logits_TE * (1.0 + std * (2.0 * uniform - 1.0))  # "jitter"


def _losses(b: Backend, logits_TE: Array, softmax_TE: Array, indices_TK: Array,
            config: RouterConfig, mask_T: Array | None) -> RouterLosses:
    null = config.num_null_experts > 0  # null-aware balance over all E + N choices (AdaMoE)
    probs_TE = softmax_TE if null else softmax_TE[:, : config.num_experts]
    balance = load_balancing_from_probs(b, probs_TE, indices_TK, config.num_experts,
                                        config.balance_convention, mask_T,
                                        config.k if null else None)
    lse_T = b.logsumexp(logits_TE, axis=-1)  # once: z-loss and the log-probabilities
    z_loss = z_loss_from_lse(b, lse_T, mask_T, logits_TE)
    entropy = entropy_from_probs(b, softmax_TE, logits_TE - lse_T[:, None], mask_T)
    total = (config.aux_loss_coef * balance + config.z_loss_coef * z_loss
             + config.entropy_loss_coef * entropy)
    return RouterLosses(load_balancing=balance, z_loss=z_loss, entropy=entropy, total=total)


def _stats(b: Backend, num_per_token_T: Array, counts_E: Array, entropy: Array,
           config: RouterConfig, mask_T: Array | None, like: Array) -> RoutingStats:
    k_T = num_per_token_T
    if mask_T is not None:
        real_T = b.cast(b.reshape(mask_T, (-1,)), "float32") > 0.0
        k_T = b.where(real_T, num_per_token_T, -1)
        n_real = b.maximum(b.sum(b.cast(real_T, "float32")), 1.0)
        mean_k = b.sum(b.cast(b.where(real_T, num_per_token_T, 0), "float32")) / n_real
    else:
        n_tokens = b.maximum(b.cast(b.asarray(b.dim(like, 0), like=like), "float32"), 1.0)
        mean_k = b.sum(b.cast(num_per_token_T, "float32")) / n_tokens
    loads_E = b.cast(counts_E, "float32")
    return RoutingStats(mean_experts=mean_k,
                        k_histogram=b.bincount(k_T, config.max_slots + 1),
                        router_entropy=entropy,
                        max_load=b.max(loads_E),
                        mean_load=b.sum(loads_E) / float(config.num_experts))
