"""Static-shape expert compute for the Flax layer: slots sorted by expert, then a grouped matmul.

Every method follows the same three steps, all with shapes fixed at trace time:

1. **Layout**: each used slot (token t, choice k) gets a destination row ``dest_S`` in a row buffer
   of static size R (``R`` = "nowhere" for unused, null and dropped slots); the buffer's rows
   are gathered from the tokens (padding rows read a zero row).
2. **Compute**: the expert FFN on the buffer, per method (below).
3. **Combine**: each slot gathers its output row back (unused slots read zero), times its routing
   weight, summed over the K slots of the token.

Methods (``MoEConfig.dispatch``):

============== =========================================================================
``tiles``      dropless; every expert's rows padded to a multiple of a tile of B rows;
               ``lax.scan`` over experts around a ``lax.scan`` over a static bound of
               tiles, one ``(B, D) x (D, F)`` FFN per tile; empty tiles skipped
               (``lax.cond``); each expert's weights are sliced once
``capacity``   a static ``(E, C, D)`` buffer and one batched einsum; C is the router's
               capacity when ``capacity_factor`` is set (exact: routing dropped the
               overflow), else T (dropless, E/K times the dense-equivalent work)
``ragged_dot`` rows sorted by expert, ``jax.lax.ragged_dot`` with the per-expert counts
``gather``     each slot gathers its expert's weights (decode: T*K < E, reads only the
               active experts)
``dense``      every expert on every token, weighted by the (mostly zero) routing weights
============== =========================================================================

``auto`` (see :func:`choose_method`) picks by platform and size from measurements recorded in
``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp

METHODS = ("auto", "tiles", "capacity", "ragged_dot", "gather", "dense")
MAX_TILE = 256
MIN_TILE = 8


class Layout(NamedTuple):
    """Where each slot's row lives: ``dest_S`` (R = nowhere) and ``src_R`` (T = zero row)."""

    dest_S: jax.Array
    src_R: jax.Array


# ----- activations -----------------------------------------------------------------------------
def activate(name: str, gate: jax.Array | None, up: jax.Array) -> jax.Array:
    """Expert activation: gated ``act(gate) * up`` (swiglu, geglu) or plain ``act(up)``."""
    if name == "swiglu":
        return jax.nn.silu(gate) * up
    if name == "geglu":
        return jax.nn.gelu(gate, approximate=False) * up
    if name == "gelu":
        return jax.nn.gelu(up, approximate=False)
    if name == "relu":
        return jax.nn.relu(up)
    if name == "silu":
        return jax.nn.silu(up)
    raise ValueError(f"activation={name!r}")


def ffn(x_ND: jax.Array, w: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """One expert's FFN on rows ``(N, D)``: w_gate / w_up ``(D, F)``, w_down ``(F, D)``."""
    gate = x_ND @ w["w_gate"] if "w_gate" in w else None
    return activate(activation, gate, x_ND @ w["w_up"]) @ w["w_down"]


# ----- slot bookkeeping ------------------------------------------------------------------------
def rank_in_expert(ids_S: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(key_S, rank_S, counts_E)``: expert of each slot (E = unused), its rank among the slots
    of that expert in slot order, and the used slots per expert."""
    S = ids_S.shape[0]
    key_S = jnp.where(ids_S >= 0, ids_S, num_experts).astype(jnp.int32)
    order_S = jnp.argsort(key_S, stable=True)
    counts_E1 = jnp.zeros((num_experts + 1,), jnp.int32).at[key_S].add(1)
    offsets_E1 = jnp.cumsum(counts_E1) - counts_E1
    sorted_rank_S = jnp.arange(S, dtype=jnp.int32) - offsets_E1[key_S[order_S]]
    rank_S = jnp.zeros((S,), jnp.int32).at[order_S].set(sorted_rank_S, unique_indices=True)
    return key_S, rank_S, counts_E1[:num_experts]


def _layout(dest_S: jax.Array, used_S: jax.Array, rows: int, num_tokens: int,
            K: int) -> Layout:
    dest_S = jnp.where(used_S, dest_S, rows).astype(jnp.int32)
    token_S = jnp.arange(dest_S.shape[0], dtype=jnp.int32) // K
    src_R = jnp.full((rows,), num_tokens, jnp.int32).at[dest_S].set(token_S, mode="drop")
    return Layout(dest_S, src_R)


def gather_rows(x_TD: jax.Array, src_R: jax.Array) -> jax.Array:
    """Rows ``x_TD[src_R]``; index T (or beyond) reads zeros."""
    return jnp.take(x_TD, src_R, axis=0, mode="fill", fill_value=0)


def combine(out_RD: jax.Array, dest_S: jax.Array, weights_TK: jax.Array) -> jax.Array:
    """``y_TD = sum_k weight[t, k] * out[dest[t, k]]`` (dest R = nowhere reads zero)."""
    T, K = weights_TK.shape
    rows_TKD = jnp.take(out_RD, dest_S.reshape(T, K), axis=0, mode="fill", fill_value=0)
    return jnp.einsum("tkd,tk->td", rows_TKD, weights_TK.astype(out_RD.dtype))


def tile_size(num_slots: int, num_experts: int) -> int:
    """Rows per tile: about the mean rows per expert, a power of two in [8, 256]."""
    mean_rows = max(1, math.ceil(num_slots / max(num_experts, 1)))
    return int(min(MAX_TILE, max(MIN_TILE, 2 ** math.ceil(math.log2(mean_rows)))))


# ----- methods ---------------------------------------------------------------------------------
def tiles(x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
          w: Mapping[str, jax.Array], activation: str, tile: int | None = None) -> jax.Array:
    """Dropless: expert groups padded to tiles of B rows; a scan over experts (each expert's
    weights sliced once) around a scan over that expert's tiles (static bound, empty ones
    skipped with ``lax.cond``), each tile one ``(B, D) x (D, F)`` FFN written in place."""
    T, K = ids_TK.shape
    E = w["w_up"].shape[0]
    S = T * K
    B = tile or tile_size(S, E)
    n_tiles = math.ceil(S / B) + min(E, S)  # sum_e ceil(c_e / B) never exceeds this
    max_tiles = math.ceil(S / B)  # of one expert
    key_S, rank_S, counts_E = rank_in_expert(ids_TK.reshape(-1), E)
    tiles_E = (counts_E + B - 1) // B
    tile_start_E = jnp.cumsum(tiles_E) - tiles_E
    tile_start_E1 = jnp.concatenate([tile_start_E, jnp.zeros((1,), jnp.int32)])
    lay = _layout(tile_start_E1[key_S] * B + rank_S, key_S < E, n_tiles * B, T, K)
    x_RD = gather_rows(x_TD, lay.src_R)

    def expert_step(out_RD: jax.Array, e: jax.Array) -> tuple[jax.Array, None]:
        w_e = {name: v[e] for name, v in w.items()}  # one weight slice per expert, not per tile

        def tile_step(out_RD: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            row = (tile_start_E[e] + j) * B

            def compute(out_RD: jax.Array) -> jax.Array:
                x_BD = jax.lax.dynamic_slice_in_dim(x_RD, row, B)
                return jax.lax.dynamic_update_slice_in_dim(out_RD, ffn(x_BD, w_e, activation),
                                                           row, 0)

            return jax.lax.cond(j < tiles_E[e], compute, lambda o: o, out_RD), None

        out_RD, _ = jax.lax.scan(tile_step, out_RD, jnp.arange(max_tiles, dtype=jnp.int32))
        return out_RD, None

    out0 = jnp.zeros((n_tiles * B, w["w_down"].shape[-1]), x_TD.dtype)
    out_RD, _ = jax.lax.scan(expert_step, out0, jnp.arange(E, dtype=jnp.int32))
    return combine(out_RD, lay.dest_S, weights_TK)


def capacity(x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
             w: Mapping[str, jax.Array], activation: str, cap: int | None = None) -> jax.Array:
    """Static ``(E, C, D)`` buffer, one batched einsum per matrix; slots past C are dropped."""
    T, K = ids_TK.shape
    E = w["w_up"].shape[0]
    C = int(cap) if cap is not None else T
    key_S, rank_S, _ = rank_in_expert(ids_TK.reshape(-1), E)
    lay = _layout(key_S * C + rank_S, (key_S < E) & (rank_S < C), E * C, T, K)
    x_ECD = einops.rearrange(gather_rows(x_TD, lay.src_R), "(e c) d -> e c d", e=E)
    gate = jnp.einsum("ecd,edf->ecf", x_ECD, w["w_gate"]) if "w_gate" in w else None
    h_ECF = activate(activation, gate, jnp.einsum("ecd,edf->ecf", x_ECD, w["w_up"]))
    out_ECD = jnp.einsum("ecf,efd->ecd", h_ECF, w["w_down"])
    return combine(out_ECD.reshape(E * C, -1), lay.dest_S, weights_TK)


def ragged(x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
           w: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """Rows sorted by expert and ``jax.lax.ragged_dot`` with the per-expert counts."""
    T, K = ids_TK.shape
    E = w["w_up"].shape[0]
    key_S, rank_S, counts_E = rank_in_expert(ids_TK.reshape(-1), E)
    offsets_E1 = jnp.concatenate([jnp.cumsum(counts_E) - counts_E, jnp.zeros((1,), jnp.int32)])
    lay = _layout(offsets_E1[key_S] + rank_S, key_S < E, T * K, T, K)
    x_SD = gather_rows(x_TD, lay.src_R)

    def rdot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return jax.lax.ragged_dot(lhs, rhs, counts_E)

    gate = rdot(x_SD, w["w_gate"]) if "w_gate" in w else None
    out_SD = rdot(activate(activation, gate, rdot(x_SD, w["w_up"])), w["w_down"])
    return combine(out_SD, lay.dest_S, weights_TK)


def gather(x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
           w: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """Each slot reads its own expert's weights (cheap only when T*K is small)."""
    T, K = ids_TK.shape
    ids_S = jnp.maximum(ids_TK.reshape(-1), 0)
    x_SD = jnp.repeat(x_TD, K, axis=0)
    ws = {name: jnp.take(v, ids_S, axis=0) for name, v in w.items()}
    gate = jnp.einsum("sd,sdf->sf", x_SD, ws["w_gate"]) if "w_gate" in ws else None
    h_SF = activate(activation, gate, jnp.einsum("sd,sdf->sf", x_SD, ws["w_up"]))
    out_SD = jnp.einsum("sf,sfd->sd", h_SF, ws["w_down"])
    used_TK = (ids_TK >= 0).astype(out_SD.dtype)
    return jnp.einsum("tkd,tk->td", out_SD.reshape(T, K, -1), weights_TK * used_TK)


def dense(x_TD: jax.Array, ids_TK: jax.Array, weights_TK: jax.Array,
          w: Mapping[str, jax.Array], activation: str) -> jax.Array:
    """Every expert on every token, combined with the dense ``(T, E)`` routing weights."""
    E = w["w_up"].shape[0]
    onehot_TKE = jax.nn.one_hot(ids_TK, E, dtype=x_TD.dtype)  # -1 gives a zero row
    gates_TE = jnp.einsum("tke,tk->te", onehot_TKE, weights_TK.astype(x_TD.dtype))
    gate = jnp.einsum("td,edf->tef", x_TD, w["w_gate"]) if "w_gate" in w else None
    h_TEF = activate(activation, gate, jnp.einsum("td,edf->tef", x_TD, w["w_up"]))
    return jnp.einsum("tef,efd,te->td", h_TEF, w["w_down"], gates_TE)


# ----- choice ----------------------------------------------------------------------------------
def choose_method(platform: str, num_tokens: int, k: int, num_experts: int,
                  capacity_limited: bool) -> str:
    """The method ``auto`` resolves to (static: decided at trace time from shapes and platform).

    CPU (measured, ``benchmarks/RESULTS.md``): ``gather`` while T*K < E (decode: reads only the
    active experts), ``capacity`` when the router has a capacity (static C, exact), else
    ``tiles``. GPU/TPU: ``ragged_dot`` (a grouped GEMM there; not measured in this project yet).
    """
    if num_tokens * k < num_experts:
        return "gather"
    if capacity_limited:
        return "capacity"
    if platform == "cpu":
        return "tiles"
    return "ragged_dot"
