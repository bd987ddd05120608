"""The MoE layer step, written once against the :class:`~moe_router.backend.Backend` interface.

::

    x (..., D) -> x_TD -> float32 router logits -> route() -> RoutingPlan
       -> state update (controller / calibration)           LayerState in, LayerState out
       -> observers (expert load for the aux-free bias, debugger counters, ...)
       -> expert compute: permute -> grouped FFN -> unpermute   (moe_router.layer.experts)
       -> + shared expert -> y (..., D)

Every framework layer (torch ``nn.Module``, Flax ``nnx.Module``, Keras ``Layer``) is a thin
adapter: it holds the parameters and stores the :class:`LayerState`, and calls :func:`layer_step`.
The step has no Python side effects on traced values, so it runs under ``torch.compile``,
``jax.jit`` / ``nnx.jit``, ``tf.function`` and XLA.

A backend may replace a stage with a faster *exact* version by returning a subclass of
:class:`LayerStages` from ``Backend.layer_stages()`` (e.g. torch computes the router logits
outside autocast and has a short top-k path for inference); ``tests/test_layer_stages.py`` checks
every override against the generic stage.

Profiling: the phases run inside ``Backend.scope`` regions named by
:data:`~moe_router.layer.experts.SCOPES` (``moe_router/router_gemm``, ``moe_router/select``,
``moe_router/permute``, ``moe_router/experts``, ``moe_router/combine``, ``moe_router/shared``):
``torch.profiler.record_function`` while a torch profiler runs, ``jax.named_scope``,
``tf.name_scope`` in graphs; ``moe-router profile`` adds them up.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from ..api import check_finite, route
from ..backend import Array, Backend
from ..config import MoEConfig, RouterConfig
from ..errors import InputError, InputTypeError
from ..plan import RouterState, RoutingPlan
from .experts import SCOPES, expert_compute, shared_expert
from .observers import StepEvent, active_observers, update_observers
from .state import EXPERT_BIAS, OBSERVER_PREFIX, ROUTER_STATE, LayerState

#: per-token inputs of the layer call and the route() argument each becomes
PER_TOKEN = {"token_ids": "token_ids_T", "complexity_scores": "complexity_scores_T",
             "mask": "mask_T"}


class StepOutput(NamedTuple):
    """What one layer step returns.

    Attributes:
        y: the output, ``x``'s shape, in ``x``'s (compute) dtype.
        plan: the :class:`~moe_router.RoutingPlan`, or ``None`` when the step took a fast
            path that skips it (``need_plan=False``); ``replan()`` builds it then.
        state: the next :class:`LayerState`.
        updated: flat state names (:mod:`moe_router.layer.state`) whose value changed: what
            an adapter writes back to its storage.
        replan: builds the plan on demand (the same decisions), or ``None``.
    """

    y: Array
    plan: RoutingPlan | None
    state: LayerState
    updated: tuple[str, ...]
    replan: Callable[[], RoutingPlan] | None = None


class LayerStages:
    """The overridable stages of the step; a backend may subclass it (exact overrides only)."""

    #: ``experts`` must run even for zero tokens (a collective stage, such as expert
    #: parallelism's all-to-all, where the other ranks wait for this one)
    collective: bool = False

    def __init__(self, backend: Backend) -> None:
        self.b = backend

    def router_logits(self, x_TD: Array, params: Mapping[str, Array],
                      config: MoEConfig) -> Array:
        """``(T, E + N)`` float32 router logits ``x @ W (+ bias)``."""
        b = self.b
        logits_TE = b.cast(x_TD, "float32") @ b.cast(params["router.weight"], "float32")
        if config.router_bias:
            logits_TE = logits_TE + b.cast(params["router.bias"], "float32")
        return logits_TE

    def fast_select(self, logits_TE: Array, config: RouterConfig,
                    route_kwargs: Mapping[str, Any]) -> tuple[Array, Array] | None:
        """``(ids_TK, gates_TK)`` by a shorter exact path when the plan is not needed, or
        ``None`` (the generic stage has no fast path)."""
        return None

    def route(self, logits_TE: Array, config: RouterConfig, **kwargs: Any) -> RoutingPlan:
        return route(logits_TE, config, backend=self.b, validate=False, **kwargs)

    def experts(self, x_TD: Array, ids_TK: Array, gates_TK: Array,
                params: Mapping[str, Array], config: MoEConfig, dispatch: str | None) -> Array:
        return expert_compute(self.b, x_TD, ids_TK, gates_TK, params, config, dispatch,
                              traced=self.b.is_tracing(x_TD))

    def shared(self, x_TD: Array, params: Mapping[str, Array], config: MoEConfig) -> Array:
        return shared_expert(self.b, x_TD, params, config)

    def restore_shape(self, y_TD: Array, x: Array) -> Array:
        """``y_TD`` reshaped to ``x``'s shape (static; a backend with symbolic shapes, such as
        TensorFlow in ``tf.function``, overrides it)."""
        b = self.b
        shape = b.shape(x)
        if any(s is None for s in shape[:-1]):
            shape = (-1, *shape[1:])
        return b.reshape(y_TD, shape)


def stages_for(b: Backend) -> LayerStages:
    """The backend's stages (``Backend.layer_stages()`` when it defines one)."""
    factory = getattr(b, "layer_stages", None)
    return factory() if factory is not None else LayerStages(b)


# ----- validation --------------------------------------------------------------------------------
def check_input(b: Backend, x: Any, d_model: int) -> None:
    """Typed errors naming ``x`` for a non-array, a non-float dtype or a wrong last dim."""
    if not b.is_array(x):
        raise InputTypeError("x", f"expected a {b.framework} array of shape (..., {d_model}), "
                             f"got {type(x).__name__}")
    if b.dtype_kind(x) != "f":
        raise InputTypeError("x", f"expected a floating dtype (float32/bfloat16/float16/"
                             f"float64), got dtype kind {b.dtype_kind(x)!r}")
    shape = b.shape(x)
    if len(shape) < 1 or shape[-1] not in (None, d_model):
        raise InputError("x", f"expected shape (..., d_model={d_model}), got {shape}")


def per_token(b: Backend, name: str, value: Any, T: Any) -> Array | None:
    """A per-token input flattened to ``(T,)``; the error names the user's argument."""
    if value is None:
        return None
    if not b.is_array(value):
        value = b.asarray(value)
    shape = b.shape(value)
    size = None if any(s is None for s in shape) else math.prod(shape)
    if isinstance(T, int) and size is not None and size != T:
        raise InputError(name, f"expected one entry per token ({T}, x's leading shape), got "
                         f"shape {shape}")
    return b.reshape(value, (-1,))


def _per_token_slots(b: Backend, name: str, value: Any, T: Any) -> Array:
    """A per-token ``(..., k)`` input flattened to ``(T, k)``; the error names the argument."""
    if not b.is_array(value):
        value = b.asarray(value)
    shape = b.shape(value)
    if len(shape) < 2 or shape[-1] is None:
        raise InputError(name, f"expected shape (<x's leading shape>, k), got {shape}")
    flat = b.reshape(value, (-1, shape[-1]))
    rows = b.shape(flat)[0]
    if isinstance(T, int) and rows is not None and rows != T:
        raise InputError(name, f"expected {T} tokens (x's leading shape) of k slots, got shape "
                         f"{shape}")
    return flat


# ----- the step ----------------------------------------------------------------------------------
def layer_step(b: Backend, params: Mapping[str, Array], state: LayerState, x: Array,
               config: MoEConfig, *, training: bool = False, update_state: bool | None = None,
               token_ids: Any = None, attention_probs: Any = None,
               complexity_scores: Any = None, mask: Any = None, rng: Any = None,
               dispatch: str | None = None, need_plan: bool = True,
               stages: LayerStages | None = None, forced_experts: Any = None,
               forced_weights: Any = None) -> StepOutput:
    """One forward of a MoE layer.

    Args:
        b: the backend of ``x`` and ``params``.
        params: portable-name weights (:mod:`moe_router.weights`), arrays of ``b``.
        state: the current :class:`LayerState`.
        x: ``(..., D)`` input in the compute dtype; leading dimensions are T tokens.
        config: the layer's :class:`MoEConfig`.
        training: a training call: router noise (if configured) and state updates.
        update_state: update the layer state (default ``training``); ``True`` alone calibrates.
        token_ids: ``x``'s leading shape, int token ids (``hash`` strategy).
        complexity_scores: ``x``'s leading shape, float scores (``external`` estimator).
        mask: ``x``'s leading shape, 1 = real token, 0 = padding (losses and statistics).
        attention_probs: ``(T, S)`` or ``(H, T, S)`` (``attention_entropy`` estimator).
        rng: randomness for router noise (the framework's seed / generator / key).
        dispatch: force an expert-compute name (default ``config.dispatch``).
        need_plan: the caller needs the plan now; ``False`` lets a stage skip building it.
        stages: override the backend's stages (tests).
        forced_experts: ``(..., k)`` int expert ids per token (``x``'s leading shape, ``-1`` =
            unused) replacing the router's choice (router replay, forced balanced routing);
            see :func:`~moe_router.route`'s ``forced_experts_TK``.
        forced_weights: ``forced_experts``' shape, their gate weights (default: router scores).

    Returns:
        :class:`StepOutput` ``(y, plan, state, updated, replan)``.
    """
    stages = stages or stages_for(b)
    r = config.router
    update = training if update_state is None else bool(update_state)
    check_input(b, x, config.d_model)
    x_TD = b.reshape(x, (-1, config.d_model))
    T = b.dim(x_TD, 0)
    with b.scope(SCOPES["router_gemm"]):
        logits_TE = stages.router_logits(x_TD, params, config)
    with b.scope(SCOPES["select"]):  # the finite check, the options, top-k or route()
        check_finite(b, logits_TE, r, "x", "the router logits computed from it contain")
        kwargs: dict[str, Any] = {"hidden_TD": x_TD}
        for name, value in (("token_ids", token_ids), ("complexity_scores", complexity_scores),
                            ("mask", mask)):
            if value is not None:
                kwargs[PER_TOKEN[name]] = per_token(b, name, value, T)
        if attention_probs is not None:
            kwargs["attention_probs"] = attention_probs
        if forced_experts is not None:
            kwargs["forced_experts_TK"] = _per_token_slots(b, "forced_experts", forced_experts, T)
            if forced_weights is not None:
                kwargs["forced_weights_TK"] = _per_token_slots(b, "forced_weights", forced_weights,
                                                               T)
        if state.expert_bias is not None:
            kwargs["expert_bias_E"] = b.stop_gradient(state.expert_bias)
        stateful = r.strategy_spec.stateful
        if stateful:
            kwargs["state"] = state.router
        observers = active_observers(config)
        watching = update or any(getattr(o, "observes_inference", False) for o in observers)
        plan: RoutingPlan | None = None
        fast = None
        if not (need_plan or training or watching or forced_experts is not None):
            fast = stages.fast_select(logits_TE, r, kwargs)
        if fast is not None:
            ids_TK, gates_TK = fast
        else:
            plan = stages.route(logits_TE, r, training=training, update_state=update, rng=rng,
                                **kwargs)
            ids_TK, gates_TK = plan.expert_indices, plan.expert_weights
    updated: list[str] = []
    router_state = state.router
    if plan is not None and update and stateful and plan.state is not None:
        router_state = RouterState(*(b.stop_gradient(v) for v in plan.state))
        updated.append(ROUTER_STATE)
    observed = dict(state.observers)
    if plan is not None and observers and watching:
        rank = len(b.shape(x))
        event = StepEvent(plan=plan, training=training, update_state=update,
                          mask_T=kwargs.get("mask_T"), config=config,
                          token_ids_T=kwargs.get("token_ids_T"),
                          seq_len=b.dim(x, rank - 2) if rank >= 3 else None)
        for name, fields in update_observers(b, state.observers, event).items():
            observed[name] = fields
            updated.extend(f"{OBSERVER_PREFIX}{name}.{field}" for field in fields)
    if isinstance(T, int) and T == 0 and not stages.collective:
        y_TD = x_TD * 0.0
    else:
        y_TD = stages.experts(x_TD, ids_TK, gates_TK, params, config, dispatch)
        if config.has_shared:
            with b.scope(SCOPES["shared"]):
                y_TD = y_TD + stages.shared(x_TD, params, config)
    y = stages.restore_shape(y_TD, x)
    new_state = LayerState(router=router_state, expert_bias=state.expert_bias,
                           observers=observed)
    replan = None
    if plan is None:
        def replan() -> RoutingPlan:
            return stages.route(logits_TE, r, training=False, update_state=False, **kwargs)
    return StepOutput(y=y, plan=plan, state=new_state, updated=tuple(updated), replan=replan)


def bias_step(b: Backend, state: LayerState, config: MoEConfig,
              counts_E: Array | None = None) -> LayerState:
    """The aux-loss-free bias step: ``b += u * sign(mean_load - load)`` (centered) from the
    expert-load counts (``counts_E`` when given, e.g. already reduced across ranks), after which
    the counts restart from zero.

    Raises:
        InputError: the router has no expert bias (``use_expert_bias=False``).
    """
    from ..losses import update_expert_bias

    if state.expert_bias is None:
        raise InputError("update_expert_bias", "the router has no expert bias; set "
                         "RouterConfig(use_expert_bias=True)")
    load = state.observers["expert_load"]["counts"]
    counts = load if counts_E is None else counts_E
    new_bias = update_expert_bias(state.expert_bias, counts, config.router.bias_update_rate)
    observers = dict(state.observers)
    observers["expert_load"] = {"counts": load * 0}
    return state._replace(expert_bias=b.cast_like(new_bias, state.expert_bias),
                          observers=observers)


#: flat names :func:`bias_step` changes
BIAS_STEP_UPDATES = (EXPERT_BIAS, f"{OBSERVER_PREFIX}expert_load.counts")
