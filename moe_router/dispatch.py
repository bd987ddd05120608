"""The capacity / drop policy shared by every backend.

A *slot* is one (token, k) pair of a plan. The sort-by-expert permutation of expert compute is
:func:`moe_router.layer.experts.permutation`.
"""

from __future__ import annotations

import einops

from .backend import Array, Backend
from .config import DropPolicy
from .routing.select import compact


def apply_capacity(b: Backend, indices_TK: Array, weights_TK: Array, capacity: int | None,
                   num_experts: int, policy: DropPolicy) -> tuple[Array, Array, Array]:
    """Drop slots beyond ``capacity`` per expert; returns ``(indices, weights, num_dropped)``.

    Priority ``position``: every token's first choice before any second choice, then by token
    position. Priority ``probability``: by weight, highest first (batch-prioritized routing).
    Dropped slots become unused (``-1`` / ``0.0``; the token keeps its residual path) and the
    remaining slots are compacted to the front. ``num_dropped`` is an int scalar, never hidden.
    """
    used_TK = indices_TK >= 0
    if capacity is None:
        return indices_TK, weights_TK, b.sum(used_TK & ~used_TK)
    K = b.shape(indices_TK)[1]  # static; T may be 0 (einops cannot infer k from t=0)
    flat_S = einops.rearrange(indices_TK, "t k -> (k t)")  # slot-major: first choices first
    if policy == "probability":
        weights_S = einops.rearrange(weights_TK, "t k -> (k t)")
        order_S = b.argsort_desc(b.where(flat_S >= 0, weights_S, -1.0), axis=-1)
        position_S = _position_in_expert(b, b.take_along_axis(flat_S, order_S, axis=0),
                                         num_experts)
        # back to slot order: exact integer inverse, for any number of slots
        position_S = b.take_along_axis(position_S, b.invert_permutation(order_S), axis=0)
    else:
        position_S = _position_in_expert(b, flat_S, num_experts)
    position_TK = einops.rearrange(position_S, "(k t) -> t k", k=K)
    keep_TK = used_TK & (position_TK < capacity)
    num_dropped = b.sum(used_TK & ~keep_TK)
    indices_TK = b.where(keep_TK, indices_TK, -1)
    weights_TK = b.where(keep_TK, weights_TK, 0.0)
    indices_TK, weights_TK = compact(b, indices_TK, weights_TK)
    return indices_TK, weights_TK, num_dropped


def _position_in_expert(b: Backend, expert_S: Array, num_experts: int) -> Array:
    """For each slot in the given order, how many earlier slots chose the same expert."""
    onehot_SE = b.one_hot(expert_S, num_experts, dtype="int")
    before_SE = b.cumsum(onehot_SE, axis=0) - onehot_SE
    return b.sum(before_SE * onehot_SE, axis=-1)
