"""TensorFlow's grouped expert kernels and its dispatch policy.

The core permutes the routed slots (:func:`moe_router.layer.experts.permute`: rows sorted by
expert, unused slots last) and unpermutes the result; a *grouped* kernel maps the sorted rows
``x_SD`` to the expert outputs ``out_SD`` (tail rows, from ``sum(counts)`` on, zero). Both kernels
here compute exactly the routed rows' FFNs, with :func:`moe_router.layer.experts.ffn`:

``tensorflow:split``  (dropless, dynamic shapes; eager and ``tf.function``, not XLA)
    ``tf.split`` of the used rows by the per-expert counts and one matmul chain per expert.
    Work = exactly the routed slots; the fastest on CPU.
``tensorflow:tiles``  (dropless, static shapes; XLA)
    Each expert's rows padded to a multiple of a tile of rows; the tiles (a static upper bound
    of them) run as one batched matmul with each tile's expert weights gathered. Costs the
    padding (< one tile per active expert) and one weight copy per tile.

The portable ``capacity`` kernel (an ``(E, C, D)`` buffer, C = the router's capacity, also an
``int32`` scalar tensor when the batch is unknown at trace time) serves XLA when the router has a
capacity. :func:`choose_kernel` is the policy behind ``dispatch="auto"`` / ``"sorted"``.
"""

from __future__ import annotations

import math

import tensorflow as tf

from moe_router.backend import Array, Backend
from moe_router.layer.experts import DispatchInfo, ExpertWeights, Permutation, ffn


def in_xla_context() -> bool:
    """True while tracing a function compiled with XLA (``jit_compile=True``)."""
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private module moved: assume no XLA
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def choose_kernel(request: str, info: DispatchInfo, x_TD: Array) -> str | None:
    """``auto`` and ``sorted``: ``tensorflow:split`` eagerly and in ``tf.function``; under XLA
    ``capacity`` (``auto`` with a router capacity) or the dropless ``tensorflow:tiles``. Other
    portable names run the portable kernels (``None``)."""
    if request not in ("auto", "sorted"):
        return None
    if not in_xla_context():
        return "tensorflow:split"
    return "capacity" if request == "auto" and info.capacity is not None else "tensorflow:tiles"


def split_ffn(b: Backend, x_SD: Array, perm: Permutation, w: ExpertWeights, activation: str,
              info: DispatchInfo) -> Array:
    """Dropless: ``tf.split`` of the used rows by the per-expert counts (dynamic shapes)."""
    n_used = tf.reduce_sum(perm.counts_E)
    pieces = tf.split(x_SD[:n_used], perm.counts_E, num=info.num_experts, axis=0)
    outs = [ffn(b, piece, None if w.w_gate is None else w.w_gate[e], w.w_up[e], w.w_down[e],
                activation) for e, piece in enumerate(pieces)]
    tail = tf.zeros(tf.stack([tf.shape(x_SD)[0] - n_used, tf.shape(x_SD)[1]]), x_SD.dtype)
    return tf.concat([*outs, tail], axis=0)


def tile_rows(num_slots: int | None, num_experts: int) -> int:
    """Rows per tile: about a quarter of an expert's mean share, a power of two in [8, 256]."""
    if num_slots is None:
        return 64
    share = max(1, num_slots // (4 * num_experts))
    return int(min(256, max(8, 2 ** math.floor(math.log2(share)))))


def tiles_ffn(b: Backend, x_SD: Array, perm: Permutation, w: ExpertWeights, activation: str,
              info: DispatchInfo) -> Array:
    """Dropless with static shapes: each expert's rows padded to whole tiles (see module doc)."""
    E = info.num_experts
    S = b.dim(x_SD, 0)
    tile = tile_rows(S if isinstance(S, int) else None, E)
    counts_E = perm.counts_E
    offsets_E = tf.cumsum(counts_E, exclusive=True)  # first sorted row of each expert
    tiles_E = (counts_E + (tile - 1)) // tile
    tile_end_E = tf.cumsum(tiles_E)
    start_E = (tile_end_E - tiles_E) * tile  # first buffer row of each expert
    # static bound on used tiles: sum_e ceil(c_e / tile) <= (S + A * (tile - 1)) // tile
    n_tiles = (S + tf.minimum(S, E) * (tile - 1)) // tile
    tile_expert_N = tf.minimum(tf.reduce_sum(tf.cast(
        tile_end_E[None, :] <= tf.range(n_tiles)[:, None], tf.int32), axis=-1), E - 1)
    # buffer row -> sorted row (rows past an expert's count read zero)
    expert_R = tf.repeat(tile_expert_N, tile)
    rank_R = tf.range(n_tiles * tile) - tf.gather(start_E, expert_R)
    valid_R = rank_R < tf.gather(counts_E, expert_R)
    src_R = tf.minimum(tf.gather(offsets_E, expert_R) + rank_R, S - 1)
    x_R = tf.where(valid_R[:, None], tf.gather(x_SD, src_R), tf.zeros([], x_SD.dtype))
    x_NtD = tf.reshape(x_R, tf.stack([n_tiles, tile, tf.shape(x_SD)[1]]))
    gate = None if w.w_gate is None else tf.gather(w.w_gate, tile_expert_N)
    out_NtD = ffn(b, x_NtD, gate, tf.gather(w.w_up, tile_expert_N),
                  tf.gather(w.w_down, tile_expert_N), activation)
    out_RD = tf.reshape(out_NtD, tf.shape(x_R))
    # sorted row -> buffer row (unused rows: zero)
    used_S = perm.expert_S < E
    expert_S = tf.minimum(perm.expert_S, E - 1)
    rank_S = tf.range(S) - tf.gather(offsets_E, expert_S)
    row_S = tf.where(used_S, tf.gather(start_E, expert_S) + rank_S, 0)
    return tf.where(used_S[:, None], tf.gather(out_RD, row_S), tf.zeros([], out_RD.dtype))
