"""Sparse expert computation for the Keras layer: every path computes only the routed slots.

Three implementations of ``y_TD = sum_k w_TK * expert_{ids_TK}(x_TD)`` (``MoEConfig.dispatch``):

``split``    (dropless, dynamic shapes; eager and ``tf.function``, not XLA)
    Used slots sorted by expert (stable), one gather of their tokens, ``tf.split`` by the
    per-expert counts and one matmul chain per expert, then a weighted ``unsorted_segment_sum``
    back to the tokens. Work = exactly the routed slots; fastest on CPU (MEASURED.md: ~1.0 of the
    dense-equivalent matmul as a building block).
``capacity`` (static shapes; XLA)
    A ``(E, C, D)`` buffer with C = the router's capacity (``RouterConfig.capacity_factor`` must be
    set, so routing itself drops and counts the overflow) and one batched matmul per weight.
    Work = E * C rows, about ``capacity_factor`` x the routed slots.
``tiles``    (dropless, static shapes; XLA)
    Each expert's sorted slots are padded to a multiple of a tile of rows; the tiles (a static
    upper bound of them) run as one batched matmul with each tile's expert weights gathered.
    Exact and dropless under XLA; costs the padding (< one tile per active expert) and the weight
    gathers (one ``(D, F)`` copy per tile and matrix), so it is slower than ``split`` on CPU.

None of them ever computes every expert for every token.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import tensorflow as tf

from moe_router.backend import Backend
from moe_router.dispatch import sort_slots


class ExpertWeights(NamedTuple):
    """Stacked expert matrices in the compute dtype: ``w_gate`` ``(E, D, F)`` (gated only, else
    ``None``), ``w_up`` ``(E, D, F)``, ``w_down`` ``(E, F, D)``."""

    w_gate: tf.Tensor | None
    w_up: tf.Tensor
    w_down: tf.Tensor


def activate(name: str, gate: tf.Tensor | None, up: tf.Tensor) -> tf.Tensor:
    """Expert activation: ``act(gate) * up`` for swiglu / geglu, else ``act(up)`` (exact GELU)."""
    if name == "swiglu":
        return tf.nn.silu(gate) * up
    if name == "geglu":
        return tf.nn.gelu(gate, approximate=False) * up
    if name == "gelu":
        return tf.nn.gelu(up, approximate=False)
    if name == "relu":
        return tf.nn.relu(up)
    if name == "silu":
        return tf.nn.silu(up)
    raise ValueError(f"activation={name!r}: expected swiglu, geglu, gelu, relu or silu")


def ffn(x_ND: tf.Tensor, w_gate: tf.Tensor | None, w_up: tf.Tensor, w_down: tf.Tensor,
        activation: str) -> tf.Tensor:
    """One FFN on ``(N, D)`` rows (``(D, F)``/``(F, D)`` weights) or batched ``(B, N, D)`` rows
    (``(B, D, F)``/``(B, F, D)`` weights)."""
    gate = None if w_gate is None else tf.matmul(x_ND, w_gate)
    return tf.matmul(activate(activation, gate, tf.matmul(x_ND, w_up)), w_down)


class _Slots(NamedTuple):
    slot_S: tf.Tensor    # (S,) int32 flat slot id (t * K + k), sorted by expert (unused last)
    token_S: tf.Tensor   # (S,) int32 token of each sorted slot
    expert_S: tf.Tensor  # (S,) int32 expert of each sorted slot (E for unused slots)
    counts_E: tf.Tensor  # (E,) int32 used slots per expert
    weights_TK: tf.Tensor  # (T, K) slot weights (0 for unused), compute dtype


def _sorted_slots(b: Backend, ids_TK: tf.Tensor, weights_TK: tf.Tensor, num_experts: int,
                  dtype: tf.DType) -> _Slots:
    order = sort_slots(b, ids_TK, num_experts)
    return _Slots(order.slot_S, order.token_S, order.expert_S, order.counts_E,
                  tf.cast(weights_TK, dtype))


def _combine(y_RD: tf.Tensor, row_S: tf.Tensor, slots: _Slots) -> tf.Tensor:
    """Weighted sum of the slot outputs onto their tokens: ``(T, D)``.

    ``row_S`` is the row of ``y_RD`` holding each *sorted* slot's output (unused slots point at a
    zero row). Un-sorting is one gather through the inverse permutation, then the K slots of a
    token are summed with their weights (measured faster on CPU than ``unsorted_segment_sum``).
    """
    S = tf.shape(slots.slot_S)
    inverse_S = tf.scatter_nd(slots.slot_S[:, None], tf.range(S[0]), S)  # XLA-safe inverse
    row_of_slot = tf.gather(row_S, inverse_S)
    K = slots.weights_TK.shape[-1]
    y_TKD = tf.reshape(tf.gather(y_RD, row_of_slot), [-1, K, y_RD.shape[-1]])
    return tf.reduce_sum(y_TKD * slots.weights_TK[..., None], axis=1)


def split_dispatch(b: Backend, x_TD: tf.Tensor, ids_TK: tf.Tensor, weights_TK: tf.Tensor,
                   experts: ExpertWeights, activation: str) -> tf.Tensor:
    """Dropless sorted dispatch with ``tf.split`` by per-expert counts (dynamic shapes)."""
    E = experts.w_up.shape[0]
    slots = _sorted_slots(b, ids_TK, weights_TK, E, x_TD.dtype)
    n_used = tf.reduce_sum(slots.counts_E)
    pieces = tf.split(tf.gather(x_TD, slots.token_S[:n_used]), slots.counts_E, num=E, axis=0)
    outs = [ffn(piece, None if experts.w_gate is None else experts.w_gate[e],
                experts.w_up[e], experts.w_down[e], activation)
            for e, piece in enumerate(pieces)]
    y_RD = tf.concat([*outs, tf.zeros_like(x_TD[:1])], axis=0)  # row n_used: zeros
    row_S = tf.minimum(tf.range(tf.shape(slots.slot_S)[0]), n_used)
    return _combine(y_RD, row_S, slots)


def _padded_compute(x_TD: tf.Tensor, slots: _Slots, row_start_E: tf.Tensor, n_rows: Any,
                    rows_per_group: Any, group_expert_G: tf.Tensor | None,
                    experts: ExpertWeights, activation: str) -> tf.Tensor:
    """Scatter sorted slots into ``(G, rows_per_group, D)`` groups, run each group through its
    expert (``group_expert_G``; ``None`` = group g is expert g), and combine back to tokens.

    ``row_start_E`` is the first buffer row of each expert. Unused slots, and (capacity buffer)
    slots ranked beyond ``rows_per_group`` in their expert, read and write a zero dummy row.
    """
    T = tf.shape(x_TD)[0]
    S = tf.shape(slots.token_S)[0]
    E = slots.counts_E.shape[0]
    D = x_TD.shape[-1]
    offsets_E = tf.cumsum(slots.counts_E, exclusive=True)
    expert_S = tf.minimum(slots.expert_S, E - 1)
    rank_S = tf.range(S) - tf.gather(offsets_E, expert_S)
    keep_S = slots.expert_S < E
    if group_expert_G is None:
        keep_S = keep_S & (rank_S < rows_per_group)
    dest_S = tf.where(keep_S, tf.gather(row_start_E, expert_S) + rank_S, n_rows)
    # buffer row -> source token (T = the zero row appended to x)
    row_src = tf.tensor_scatter_nd_update(tf.fill([n_rows + 1], T), dest_S[:, None],
                                          slots.token_S)[:n_rows]
    x_pad = tf.concat([x_TD, tf.zeros_like(x_TD[:1])], axis=0)
    x_GRD = tf.reshape(tf.gather(x_pad, row_src), [-1, rows_per_group, D])
    if group_expert_G is None:
        w_gate, w_up, w_down = experts
    else:
        w_gate = None if experts.w_gate is None else tf.gather(experts.w_gate, group_expert_G)
        w_up = tf.gather(experts.w_up, group_expert_G)
        w_down = tf.gather(experts.w_down, group_expert_G)
    y_RD = tf.reshape(ffn(x_GRD, w_gate, w_up, w_down, activation), [-1, D])
    y_pad = tf.concat([y_RD, tf.zeros_like(y_RD[:1])], axis=0)
    return _combine(y_pad, dest_S, slots)


def capacity_dispatch(b: Backend, x_TD: tf.Tensor, ids_TK: tf.Tensor, weights_TK: tf.Tensor,
                      experts: ExpertWeights, activation: str, capacity: Any) -> tf.Tensor:
    """Static ``(E, C, D)`` buffer; ``capacity`` (int, or int32 scalar when the batch is
    unknown at trace time: XLA folds it) should be >= every expert's count (else the excess
    slots contribute nothing)."""
    E = experts.w_up.shape[0]
    slots = _sorted_slots(b, ids_TK, weights_TK, E, x_TD.dtype)
    C = capacity if isinstance(capacity, int) else tf.cast(capacity, tf.int32)
    row_start_E = tf.range(E, dtype=tf.int32) * C
    return _padded_compute(x_TD, slots, row_start_E, E * C, C, None, experts, activation)


def tile_rows(num_slots: int | None, num_experts: int) -> int:
    """Rows per tile: about a quarter of an expert's mean share, a power of two in [8, 256]."""
    if num_slots is None:
        return 64
    share = max(1, num_slots // (4 * num_experts))
    return int(min(256, max(8, 2 ** math.floor(math.log2(share)))))


def tile_dispatch(b: Backend, x_TD: tf.Tensor, ids_TK: tf.Tensor, weights_TK: tf.Tensor,
                  experts: ExpertWeights, activation: str, tile: int) -> tf.Tensor:
    """Dropless static-shape dispatch: expert groups padded to ``tile`` rows (see module doc)."""
    E = experts.w_up.shape[0]
    slots = _sorted_slots(b, ids_TK, weights_TK, E, x_TD.dtype)
    S = tf.shape(slots.token_S)[0]
    tiles_E = (slots.counts_E + (tile - 1)) // tile
    tile_end_E = tf.cumsum(tiles_E)
    row_start_E = (tile_end_E - tiles_E) * tile
    # static bound on used tiles: sum_e ceil(c_e / tile) <= (S + A * (tile - 1)) // tile
    active = tf.minimum(S, E)
    n_tiles = (S + active * (tile - 1)) // tile
    tile_N = tf.range(n_tiles)
    tile_expert_N = tf.minimum(
        tf.reduce_sum(tf.cast(tile_end_E[None, :] <= tile_N[:, None], tf.int32), axis=-1), E - 1)
    return _padded_compute(x_TD, slots, row_start_E, n_tiles * tile, tile, tile_expert_N,
                           experts, activation)
