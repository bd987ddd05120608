"""Shared selection mechanics: keep a per-token prefix of the experts sorted by score.

Every built-in strategy reduces to: an ordering score per (token, expert), a number of experts
``n_T`` per token, and a weight source. :func:`prefix_select` turns those into the plan's
``(T, K)`` layout; :func:`compact` restores "used slots first" after slots are removed.
"""

from __future__ import annotations

from ..backend import Array, Backend


def prefix_select(b: Backend, order_TE: Array, weight_TE: Array, n_T: Array, K: int,
                  normalize: bool) -> tuple[Array, Array]:
    """Keep, for each token, its ``n_T`` best experts by ``order_TE`` (at most ``K``).

    Args:
        order_TE: ``(T, E)`` float32 selection scores (``-inf`` = never selectable).
        weight_TE: ``(T, E)`` float32 weight of each expert if selected.
        n_T: ``(T,)`` int experts per token, already clamped to ``[0, K]``.
        K: static width of the result.
        normalize: divide the kept weights by their sum.

    Returns:
        ``(indices_TK, weights_TK)``: ``-1`` / ``0.0`` in unused slots.
    """
    order_TK = b.argsort_desc(order_TE, axis=-1)[:, :K]
    slot_K = b.arange(K, like=n_T)
    used_TK = slot_K[None, :] < b.cast(n_T, "int")[:, None]
    indices_TK = b.where(used_TK, order_TK, -1)
    weights_TK = b.where(used_TK, b.take_along_axis(weight_TE, order_TK, axis=-1), 0.0)
    if normalize:
        weights_TK = normalize_rows(b, weights_TK)
    return indices_TK, weights_TK


def normalize_rows(b: Backend, weights_TK: Array) -> Array:
    """Divide each row by its sum; an all-zero row stays zero."""
    total_T1 = b.sum(weights_TK, axis=-1)[:, None]
    safe_T1 = b.where(total_T1 > 0.0, total_T1, 1.0)
    return weights_TK / safe_T1


def clamp_count(b: Backend, n_T: Array, low: int, high: int) -> Array:
    """Clamp an int count per token into ``[low, high]``."""
    n_T = b.cast(n_T, "int")
    return b.minimum(b.maximum(n_T, b.cast(b.asarray(low, like=n_T), "int")),
                     b.cast(b.asarray(high, like=n_T), "int"))


def compact(b: Backend, indices_TK: Array, weights_TK: Array) -> tuple[Array, Array]:
    """Move used slots (index >= 0) to the front, keeping their order."""
    perm_TK = b.argsort(b.cast(indices_TK < 0, "int"), axis=-1)  # stable: used (0) first
    return (b.take_along_axis(indices_TK, perm_TK, axis=-1),
            b.take_along_axis(weights_TK, perm_TK, axis=-1))
