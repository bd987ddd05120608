"""The built-in routing strategies, each written once against :class:`~moe_router.backend.Backend`.

Semantics (with sources): ``ROUTING.md`` / ``docs/routing.md``. Each function takes a
:class:`~moe_router.routing.context.RoutingContext` and returns a
:class:`~moe_router.routing.context.Selection` of width K = ``config.max_slots``.
"""

from __future__ import annotations

import einops
import numpy as np

from ..backend import Array
from ..complexity import complexity_k
from ..errors import InputError
from ..plan import RouterState
from .context import RoutingContext, Selection
from .select import clamp_count, prefix_select


def _default(flag: bool | None, default: bool) -> bool:
    return default if flag is None else flag


def _constant_count(ctx: RoutingContext, n: int) -> Array:
    return ctx.backend.full((ctx.num_tokens,), n, "int", like=ctx.logits)


#: the largest float32 below 1.0
_BELOW_ONE = float(np.nextafter(np.float32(1.0), np.float32(0.0)))
#: the lowest finite float32: a selectable key stays above the ``-inf`` of masked ones
_LOWEST = float(np.finfo(np.float32).min)


def _mask(ctx: RoutingContext, keep_TE: Array, order_TE: Array) -> Array:
    """``order_TE`` where ``keep_TE``, else ``-inf`` (kept keys of ``-inf``, a ``-inf`` logit,
    still rank above every masked one)."""
    b = ctx.backend
    return b.where(keep_TE, b.maximum(order_TE, _LOWEST), float("-inf"))


def _exact_order(ctx: RoutingContext, width: int) -> Array | None:
    """The logits of the first ``width`` choices, which order them exactly like their scores.

    softmax and sigmoid are strictly increasing in the logit (within a token), so the logits
    give the order of the exact scores, where float32 scores can tie (sigmoid saturates,
    softmax underflows) or round differently on each framework. ``None`` when a balancing bias
    is added: the order is then that of the float32 ``score + bias``.
    """
    if ctx.expert_bias is not None:
        return None
    return ctx.logits[:, :width]


def _sorted_probs(ctx: RoutingContext) -> tuple[Array, Array, Array]:
    """Real-expert order (descending score), the sorted probabilities and their inclusive
    cumulative sum."""
    b, c = ctx.backend, ctx.config
    probs_TE = ctx.probs[:, : c.num_experts]
    key_TE = ctx.logits[:, : c.num_experts]  # no bias here: the logits order exactly
    order_TE = b.argsort_desc(key_TE, axis=-1)
    sorted_TE = b.take_along_axis(probs_TE, order_TE, axis=-1)
    cum_TE = b.cumsum(sorted_TE, axis=-1)
    if c.score_func == "softmax":
        # softmax probabilities sum to 1 (or less, with null experts) and each is > 0 in exact
        # arithmetic: no cumulative sum exceeds 1. Float32 rounding can push one 1 ulp above,
        # which would decide top_p=1.0 by rounding (it means "all experts").
        cum_TE = b.minimum(cum_TE, 1.0)
    return key_TE, sorted_TE, cum_TE


# ----- top-k family ----------------------------------------------------------------------------
def _selection_order(ctx: RoutingContext) -> Array:
    """Order used to *choose* real experts: scores + balancing bias, group-limited
    (DeepSeek-V3); the logits instead of the scores when there is no bias (exact order)."""
    c = ctx.config
    scores_TE = ctx.probs[:, : c.num_experts]
    order_TE = _exact_order(ctx, c.num_experts)
    if order_TE is None:
        assert ctx.expert_bias is not None
        scores_TE = scores_TE + ctx.expert_bias[None, :]
        order_TE = scores_TE
    if c.num_groups is not None and c.num_groups > 1:
        order_TE = _limit_groups(ctx, scores_TE, order_TE)
    return order_TE


def _limit_groups(ctx: RoutingContext, scores_TE: Array, order_TE: Array) -> Array:
    """Keep the ``topk_groups`` groups with the largest sum of their top-2 scores: ``order_TE``
    with ``-inf`` for the experts of the other groups."""
    b, c = ctx.backend, ctx.config
    G = c.num_groups
    assert G is not None
    per_group = c.num_experts // G
    keep_groups = c.topk_groups if c.topk_groups is not None else G
    if keep_groups >= G:
        return order_TE
    grouped_TGe = einops.rearrange(scores_TE, "t (g e) -> t g e", g=G)
    top2_TG2, _ = b.top_k(grouped_TGe, min(2, per_group))
    group_scores_TG = b.sum(top2_TG2, axis=-1)
    _, best_TG = b.top_k(group_scores_TG, keep_groups)
    keep_TG = b.sum(b.one_hot(best_TG, G, dtype="float32"), axis=1) > 0.0
    keep_TE = einops.repeat(keep_TG, "t g -> t (g e)", e=per_group)
    return _mask(ctx, keep_TE, order_TE)


def _balanced_debug(ctx: RoutingContext, n: int) -> Selection:
    """Round-robin routing that ignores the logits: token t uses experts (t*n + j) mod E."""
    b, c = ctx.backend, ctx.config
    tokens_T = b.arange(ctx.num_tokens, like=ctx.logits)
    slot_K = b.arange(c.max_slots, like=ctx.logits)
    raw_TK = (tokens_T[:, None] * n + slot_K[None, :]) % c.num_experts
    used_TK = slot_K[None, :] < n
    indices_TK = b.where(used_TK, raw_TK, -1)
    weights_TK = b.where(used_TK, b.full((ctx.num_tokens, c.max_slots), 1.0 / n, "float32",
                                         like=ctx.logits), 0.0)
    return Selection(indices_TK, weights_TK, ctx.state)


def top_k(ctx: RoutingContext) -> Selection:
    """Static top-k (Mixtral / Switch), sigmoid + bias + groups (DeepSeek-V3), or null experts."""
    b, c = ctx.backend, ctx.config
    K = c.max_slots
    n = min(c.k, K)
    if c.balanced_debug:
        return _balanced_debug(ctx, n)
    order_TE = _selection_order(ctx)
    if c.num_null_experts:
        # AdaMoE: top-k over E + N choices; the real experts among them are the best real ones.
        all_TC = _exact_order(ctx, c.num_choices)
        if all_TC is None:
            assert ctx.expert_bias is not None
            null_bias = b.full((c.num_null_experts,), 0.0, "float32", like=ctx.probs)
            all_TC = ctx.probs + b.concat([ctx.expert_bias, null_bias], axis=0)[None, :]
        _, chosen_Tk = b.top_k(all_TC, c.k)
        n_T = clamp_count(b, b.sum(chosen_Tk < c.num_experts, axis=-1), c.min_experts, K)
    else:
        n_T = _constant_count(ctx, n)
    weights_TE = ctx.probs[:, : c.num_experts]
    indices, weights = prefix_select(b, order_TE, weights_TE, n_T, K,
                                     _default(c.normalize_weights, True))
    return Selection(indices, weights, ctx.state)


# ----- dynamic strategies ----------------------------------------------------------------------
def top_p(ctx: RoutingContext) -> Selection:
    """Smallest prefix of the sorted probabilities whose sum is strictly greater than p."""
    b, c = ctx.backend, ctx.config
    key_TE, _, cum_TE = _sorted_probs(ctx)
    p = ctx.state.top_p if ctx.state is not None else c.top_p
    n_T = b.minimum(b.sum(cum_TE <= p, axis=-1) + 1, c.num_experts)
    n_T = clamp_count(b, n_T, c.min_experts, c.max_slots)
    probs_TE = ctx.probs[:, : c.num_experts]
    # how many: the token's own probability mass; which: the selection order (balancing bias,
    # groups), as top_k chooses
    order_TE = key_TE if ctx.expert_bias is None and c.num_groups is None else \
        _selection_order(ctx)
    indices, weights = prefix_select(b, order_TE, probs_TE, n_T, c.max_slots,
                                     _default(c.normalize_weights, False))
    return Selection(indices, weights, _update_top_p(ctx, n_T))


def _update_top_p(ctx: RoutingContext, n_T: Array) -> RouterState | None:
    """DTop-p style controller: move p toward the target mean k (training only)."""
    b, c, state = ctx.backend, ctx.config, ctx.state
    if state is None or not ctx.training or c.target_experts is None:
        return state
    T = b.maximum(b.cast(b.asarray(ctx.num_tokens, like=n_T), "float32"), 1.0)
    mean_k = b.sum(b.cast(n_T, "float32")) / T
    new_p = state.top_p + c.controller_rate * (c.target_experts - mean_k)
    return state._replace(top_p=b.minimum(b.maximum(new_p, 1e-3), 1.0))


def threshold(ctx: RoutingContext) -> Selection:
    """XMoE: keep expert j iff the sum of the sorted probabilities before j is < t."""
    b, c = ctx.backend, ctx.config
    key_TE, sorted_TE, cum_TE = _sorted_probs(ctx)
    before_TE = b.concat([sorted_TE[:, :1] * 0.0, cum_TE[:, :-1]], axis=-1)
    if c.score_func == "softmax":
        # every softmax probability is > 0 in exact arithmetic, so the mass before an expert is
        # < 1: threshold=1.0 keeps all experts, also when float32 rounds that mass up to 1.0
        before_TE = b.minimum(before_TE, _BELOW_ONE)
    n_T = clamp_count(b, b.sum(before_TE < c.threshold, axis=-1), c.min_experts, c.max_slots)
    probs_TE = ctx.probs[:, : c.num_experts]
    order_TE = key_TE if ctx.expert_bias is None and c.num_groups is None else \
        _selection_order(ctx)
    indices, weights = prefix_select(b, order_TE, probs_TE, n_T, c.max_slots,
                                     _default(c.normalize_weights, False))
    return Selection(indices, weights, ctx.state)


def relu(ctx: RoutingContext) -> Selection:
    """ReMoE: gates relu(z); an expert is active iff its logit is > 0 (clamped to [min, max])."""
    b, c = ctx.backend, ctx.config
    logits_TE = ctx.logits[:, : c.num_experts]
    n_T = clamp_count(b, b.sum(logits_TE > 0.0, axis=-1), c.min_experts, c.max_slots)
    gates_TE = b.maximum(logits_TE, 0.0)
    indices, weights = prefix_select(b, logits_TE, gates_TE, n_T, c.max_slots,
                                     _default(c.normalize_weights, False))
    return Selection(indices, weights, ctx.state)


def expert_choice(ctx: RoutingContext) -> Selection:
    """Each expert takes its top C = ceil(T * c / E) tokens (c = capacity_factor, else k).

    A token gets 0..K experts; only ``max_experts`` applies (``min_experts`` would break the
    per-expert capacity that defines the strategy). Not causal: refused when ``causal=True``.
    """
    b, c = ctx.backend, ctx.config
    T = ctx.num_tokens
    factor = c.capacity_factor if c.capacity_factor is not None else float(c.k)
    probs_TE = ctx.probs[:, : c.num_experts]
    # tokens by descending score per expert; a sigmoid score depends on the logit alone, so the
    # logits give the exact order across tokens too (softmax scores need their row's normalizer)
    key_TE = ctx.logits[:, : c.num_experts] if c.score_func == "sigmoid" else probs_TE
    key_ET = einops.rearrange(key_TE, "t e -> e t")
    if isinstance(T, int):
        capacity = min(T, max(1, int(np.ceil(round(T * factor / c.num_experts, 9)))))
    else:  # symbolic T (tf.function with unknown batch)
        T_f = b.cast(b.asarray(T, like=probs_TE), "float32")
        capacity = b.cast(b.minimum(b.maximum(b.ceil(T_f * factor / c.num_experts), 1.0), T_f),
                          "int")
    order_ET = b.argsort_desc(key_ET, axis=-1)
    rank_ET = b.argsort(order_ET, axis=-1)  # inverse permutations: an exact integer sort
    chosen_TE = einops.rearrange(rank_ET < capacity, "e t -> t e")
    n_T = clamp_count(b, b.sum(chosen_TE, axis=-1), 0, c.max_slots)
    # within a token its chosen experts by descending score: the logits order them exactly
    order_TE = _mask(ctx, chosen_TE, ctx.logits[:, : c.num_experts])
    indices, weights = prefix_select(b, order_TE, probs_TE, n_T, c.max_slots,
                                     _default(c.normalize_weights, False))
    return Selection(indices, weights, ctx.state)


#: hash tables by (seed, buckets, num_experts, k): a plain dict, not functools.lru_cache, which
#: torch.compile traces through (into NumPy's RNG: a graph break); a cached table is a constant
_HASH_TABLES: dict[tuple[int, int, int, int], np.ndarray] = {}
_HASH_TABLES_MAX = 16


def hash_table(seed: int, buckets: int, num_experts: int, k: int) -> np.ndarray:
    """``(buckets, k)`` int64: k distinct experts per bucket, ascending (fixed, seeded).

    Cached; under ``torch.compile(fullgraph=True)`` the first call for a config must happen
    outside the compiled region (any eager ``route()`` call, or this function)."""
    key = (seed, buckets, num_experts, k)
    table = _HASH_TABLES.get(key)
    if table is None:
        rng = np.random.default_rng(seed)
        table = np.argsort(rng.random((buckets, num_experts)), axis=-1)[:, :k]
        table.sort(axis=-1)
        table.setflags(write=False)
        if len(_HASH_TABLES) >= _HASH_TABLES_MAX:
            _HASH_TABLES.pop(next(iter(_HASH_TABLES)))
        _HASH_TABLES[key] = table
    return table


def hash(ctx: RoutingContext) -> Selection:  # noqa: A001 - the strategy's published name
    """Hash layers: expert(s) fixed by the token id through a seeded random table."""
    b, c = ctx.backend, ctx.config
    if ctx.token_ids is None:
        raise InputError("token_ids_T", "strategy='hash' needs the (T,) int token ids")
    K = c.max_slots
    n = min(c.k, K)  # k experts per token, also when max_experts widens the plan beyond k
    table = b.asarray(hash_table(c.hash_seed, c.hash_buckets, c.num_experts, n), dtype="int",
                      like=ctx.logits)
    bucket_T = b.cast(ctx.token_ids, "int") % c.hash_buckets
    indices_TK = b.gather_rows(table, bucket_T)
    if n < K:
        unused = b.full((ctx.num_tokens, K - n), -1, "int", like=ctx.logits)
        indices_TK = b.concat([indices_TK, unused], axis=-1)
    value = 1.0 / n if _default(c.normalize_weights, False) else 1.0
    weights_TK = b.where(indices_TK >= 0, b.full((ctx.num_tokens, K), value, "float32",
                                                 like=ctx.logits), 0.0)
    return Selection(indices_TK, weights_TK, ctx.state)


def complexity(ctx: RoutingContext) -> Selection:
    """k per token from a complexity score, calibrated so that mean k meets target_experts."""
    from ..registry import default_registry

    b, c = ctx.backend, ctx.config
    score_T = default_registry().estimator(c.complexity_estimator)(ctx)
    n_T, state = complexity_k(b, b.cast(score_T, "float32"), c, ctx.state, ctx.training)
    indices, weights = prefix_select(b, _selection_order(ctx), ctx.probs[:, : c.num_experts],
                                     n_T, c.max_slots, _default(c.normalize_weights, True))
    return Selection(indices, weights, state)
