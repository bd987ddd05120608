"""Complexity estimators and the calibrated map from a complexity score to k experts per token.

The map (used by ``strategy="complexity"``) turns a score into a quantile q in [0, 1) and sets

    k_t = clip(floor(target + 1/2 + offset + w * (q_t - 1/2)), min_experts, max_experts)

For q uniform on [0, 1) and no clipping, E[floor(U)] = E[U] - 1/2 for U uniform on an interval of
integer length w, so the mean k equals ``target_experts`` exactly while k spreads over w + 1
levels. The default w is the widest symmetric ramp that fits in [min, max] without clipping.
(An earlier prototype squashed a norm through a fixed sigmoid and always returned the maximum k;
here the quantile comes from the data, so k really varies and the mean is really the target.)

Where q comes from:
- no state: the token's rank among the batch's scores (exact mean; looks across the batch, so it
  is refused with ``causal=True``);
- with a :class:`~moe_router.plan.RouterState`: a standardized score under running mean/variance,
  q = sigmoid(1.702 z) (a logistic approximation of the normal CDF); in training the statistics
  and a small ``k_offset`` controller (toward the target mean k) are updated.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backend import Array, Backend
from .config import RouterConfig
from .errors import InputError
from .plan import RouterState

if TYPE_CHECKING:
    from .routing.context import RoutingContext


# ----- estimators: ctx -> (T,) float32 score, higher = harder token -----------------------------
def _ascending(b: Backend, probs: Array) -> Array:
    return b.take_along_axis(probs, b.argsort(probs, axis=-1), axis=-1)


def _entropy(b: Backend, probs: Array, presorted: bool = False) -> Array:
    """``-sum p log p`` over the last axis, summed in ascending order of p: rows that are
    permutations of each other (equal entropies) get bitwise-equal scores, so their batch
    quantiles tie exactly (and break to the lower token index) on every backend."""
    if not presorted:
        probs = _ascending(b, probs)
    safe = b.where(probs > 0.0, probs, 1.0)
    return -b.sum(probs * b.log(safe), axis=-1)


def router_entropy(ctx: RoutingContext) -> Array:
    """Entropy of the router distribution over real experts: an unsure router asks for more."""
    b = ctx.backend
    probs_TE = _ascending(b, ctx.probs[:, : ctx.config.num_experts])
    total_T1 = b.sum(probs_TE, axis=-1)[:, None]  # ascending too: permutation-invariant
    return _entropy(b, probs_TE / b.where(total_T1 > 0.0, total_T1, 1.0), presorted=True)


def hidden_norm(ctx: RoutingContext) -> Array:
    """L2 norm of the token's hidden state (needs ``hidden_TD``)."""
    b = ctx.backend
    if ctx.hidden is None:
        raise InputError("hidden_TD", "complexity_estimator='hidden_norm' needs the (T, D) "
                         "hidden states")
    hidden = b.cast(ctx.hidden, "float32")
    return b.sqrt(b.sum(hidden * hidden, axis=-1))


def attention_entropy(ctx: RoutingContext) -> Array:
    """Entropy of the token's attention distribution, mean over heads if ``(H, T, S)``."""
    b = ctx.backend
    attn = ctx.attention_probs
    if attn is None:
        raise InputError("attention_probs", "complexity_estimator='attention_entropy' needs "
                         "(T, S) or (H, T, S) attention probabilities")
    rank = len(b.shape(attn))
    if rank not in (2, 3):
        raise InputError("attention_probs", f"expected rank 2 (T, S) or 3 (H, T, S), got "
                         f"shape {b.shape(attn)}")
    entropy = _entropy(b, b.cast(attn, "float32"))
    if rank == 3:
        entropy = b.sum(entropy, axis=0) / float(b.shape(attn)[0] or 1)
    return entropy


def external(ctx: RoutingContext) -> Array:
    """A score supplied by the caller (e.g. a per-token gradient norm at training time)."""
    if ctx.complexity_scores is None:
        raise InputError("complexity_scores_T", "complexity_estimator='external' needs a (T,) "
                         "score per token")
    return ctx.complexity_scores


# ----- calibrated score -> k ----------------------------------------------------------------
def k_ramp(config: RouterConfig) -> tuple[float, float]:
    """``(target, w)``: the mean k aimed at and the width of the ramp."""
    low, high = config.min_experts, config.max_slots
    target = config.target_experts if config.target_experts is not None else (low + high) / 2
    widest = min(2 * (target - low) + 1, 2 * (high - target) + 1)
    width = config.complexity_spread if config.complexity_spread is not None else widest
    return float(target), float(width)


def batch_quantiles(b: Backend, score_T: Array) -> Array:
    """``(rank + 1/2) / T`` of each score in the batch (ties: lower index ranks higher)."""
    order_T = b.argsort_desc(score_T, axis=-1)
    rank_desc_T = b.invert_permutation(order_T)  # exact integer inverse
    T = b.maximum(b.cast(b.asarray(b.dim(score_T, 0), like=score_T), "float32"), 1.0)
    return 1.0 - (b.cast(rank_desc_T, "float32") + 0.5) / T


def complexity_k(b: Backend, score_T: Array, config: RouterConfig, state: RouterState | None,
                 training: bool) -> tuple[Array, RouterState | None]:
    """Experts per token ``(T,)`` int and the updated state (see the module docstring)."""
    target, width = k_ramp(config)
    if state is None:
        if config.causal:
            raise InputError("state", "complexity routing with causal=True needs a RouterState "
                             "(moe_router.init_router_state): batch quantiles would look at "
                             "later tokens")
        quantile_T = batch_quantiles(b, score_T)
        offset = 0.0  # no annotation: AutoGraph (tf.function) cannot convert annotated locals
    else:
        mean, var = _score_moments(b, score_T, state)
        z_T = (score_T - mean) / b.sqrt(var + 1e-12)
        quantile_T = b.sigmoid(1.702 * z_T)
        offset = state.k_offset
    raw_T = b.floor(target + 0.5 + offset + width * (quantile_T - 0.5))
    low = float(config.min_experts)
    high = float(config.max_slots)
    k_T = b.cast(b.minimum(b.maximum(raw_T, low), high), "int")
    if state is not None and training:
        state = _update(b, score_T, k_T, state, target, config.controller_rate)
    return k_T, state


def _score_moments(b: Backend, score_T: Array, state: RouterState) -> tuple[Array, Array]:
    """Running mean/var, or the batch's own while the state is still uncalibrated."""
    batch_mean, batch_var = _batch_moments(b, score_T)
    calibrated = state.score_count > 0.0
    return (b.where(calibrated, state.score_mean, batch_mean),
            b.where(calibrated, state.score_var, batch_var))


def _batch_moments(b: Backend, score_T: Array) -> tuple[Array, Array]:
    T = b.maximum(b.cast(b.asarray(b.dim(score_T, 0), like=score_T), "float32"), 1.0)
    mean = b.sum(score_T) / T
    var = b.sum((score_T - mean) * (score_T - mean)) / T
    return mean, var


def _update(b: Backend, score_T: Array, k_T: Array, state: RouterState, target: float,
            rate: float) -> RouterState:
    batch_mean, batch_var = _batch_moments(b, score_T)
    count = state.score_count + 1.0
    momentum = b.maximum(1.0 / count, 0.01)  # cumulative average first, then an EMA
    mean = state.score_mean + momentum * (batch_mean - state.score_mean)
    var = state.score_var + momentum * (batch_var - state.score_var)
    var = b.where(state.score_count > 0.0, var, batch_var)
    mean = b.where(state.score_count > 0.0, mean, batch_mean)
    T = b.maximum(b.cast(b.asarray(b.dim(k_T, 0), like=score_T), "float32"), 1.0)
    mean_k = b.sum(b.cast(k_T, "float32")) / T
    offset = state.k_offset + rate * (target - mean_k)
    return state._replace(score_mean=mean, score_var=var, score_count=count, k_offset=offset)


def init_router_state(config: RouterConfig, like: Any = None) -> RouterState:
    """A fresh :class:`RouterState` (float32 scalars) of ``like``'s framework (NumPy by default)."""
    from .registry import backend_for, get_backend

    b = get_backend("numpy") if like is None else backend_for(like)

    def scalar(value: float) -> Array:
        return b.asarray(value, dtype="float32", like=like)

    return RouterState(top_p=scalar(config.top_p), score_mean=scalar(0.0), score_var=scalar(1.0),
                       score_count=scalar(0.0), k_offset=scalar(0.0))
