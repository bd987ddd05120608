"""JAX grouped kernels and the JAX dispatch policy (registered by ``plugin.py``).

Both kernels implement the *grouped* interface of :mod:`moe_router.layer.experts`: they get the
T*K slot rows already sorted by expert (``x_SD``, unused slots at the tail) with their
:class:`~moe_router.layer.experts.Permutation`, and return each row's expert output (the tail
zero). Permute / unpermute, the activations and the portable kernels (``capacity``, ``dense``,
``gather``, ``sorted``) are the core's; nothing here is a copy of them. Shapes are static.

================== =========================================================================
``jax:tiles``      dropless; a ``lax.scan`` over experts (each expert's weights sliced once)
                   around a ``lax.scan`` over a static bound of B-row tiles of that expert's
                   consecutive rows, empty tiles skipped (``lax.cond``); one ``(B, D) x (D, F)``
                   FFN per tile, written in place. Fast on CPU.
``jax:ragged_dot`` ``jax.lax.ragged_dot`` with the per-expert counts (a grouped GEMM on GPU /
                   TPU; on CPU it computes every group densely, about E times the work).
================== =========================================================================

:func:`choose_kernel` is the policy: ``auto`` -> ``gather`` while T*K < E (decode: reads only
the active experts), ``capacity`` when the router has a capacity (static C, exact), else
``sorted``; ``sorted`` -> ``jax:tiles`` on CPU, ``jax:ragged_dot`` on GPU / TPU (measurements in
``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from moe_router.backend import Backend
from moe_router.layer.experts import (
    DispatchInfo,
    ExpertWeights,
    Permutation,
    activate,
    default_policy,
    ffn,
)

MAX_TILE = 256
MIN_TILE = 8


def tile_size(num_slots: int, num_experts: int) -> int:
    """Rows per tile: about the mean rows per expert, a power of two in [8, 256]."""
    mean_rows = max(1, math.ceil(num_slots / max(num_experts, 1)))
    return int(min(MAX_TILE, max(MIN_TILE, 2 ** math.ceil(math.log2(mean_rows)))))


def tiles_ffn(b: Backend, x_SD: jax.Array, perm: Permutation, w: ExpertWeights,
              activation: str, info: DispatchInfo, tile: int | None = None) -> jax.Array:
    """Dropless grouped FFN over B-row tiles of each expert's consecutive sorted rows.

    Tile j of expert e covers rows ``offset_e + j*B ...`` (the window is moved back to stay
    inside the S rows, so no padded copy is made); only the rows of expert e that this tile
    owns are written, everything else keeps its value, and the unused tail stays zero.
    """
    S = x_SD.shape[0]
    E = info.num_experts
    B = max(1, min(tile or tile_size(S, E), S))
    max_tiles = math.ceil(S / B)  # of one expert: no expert has more than S rows
    counts_E = perm.counts_E.astype(jnp.int32)
    offsets_E = jnp.cumsum(counts_E) - counts_E
    tiles_E = (counts_E + B - 1) // B
    rows_B = jnp.arange(B, dtype=jnp.int32)

    def expert_step(out_SD: jax.Array, e: jax.Array) -> tuple[jax.Array, None]:
        w_gate = None if w.w_gate is None else w.w_gate[e]  # sliced once per expert
        w_up, w_down = w.w_up[e], w.w_down[e]
        start, end = offsets_E[e], offsets_E[e] + counts_E[e]

        def tile_step(out_SD: jax.Array, j: jax.Array) -> tuple[jax.Array, None]:
            def compute(out_SD: jax.Array) -> jax.Array:
                first = start + j * B
                row = jnp.minimum(first, S - B)
                owned_B1 = ((row + rows_B >= first) & (row + rows_B < end))[:, None]
                new_BD = ffn(b, jax.lax.dynamic_slice_in_dim(x_SD, row, B), w_gate, w_up,
                             w_down, activation)
                old_BD = jax.lax.dynamic_slice_in_dim(out_SD, row, B)
                return jax.lax.dynamic_update_slice_in_dim(
                    out_SD, jnp.where(owned_B1, new_BD, old_BD), row, 0)

            return jax.lax.cond(j < tiles_E[e], compute, lambda o: o, out_SD), None

        out_SD, _ = jax.lax.scan(tile_step, out_SD, jnp.arange(max_tiles, dtype=jnp.int32))
        return out_SD, None

    # zeros *like* the rows: inside shard_map the carry then varies over the mesh axes as the
    # rows do (a plain jnp.zeros is invariant, and lax.cond refuses to join the two)
    out0 = jnp.zeros_like(x_SD, shape=(S, w.w_down.shape[-1]))
    out_SD, _ = jax.lax.scan(expert_step, out0, jnp.arange(E, dtype=jnp.int32))
    return out_SD


def ragged_ffn(b: Backend, x_SD: jax.Array, perm: Permutation, w: ExpertWeights,
               activation: str, info: DispatchInfo) -> jax.Array:
    """``jax.lax.ragged_dot`` with the per-expert counts; rows of unused slots zeroed."""
    counts_E = perm.counts_E.astype(jnp.int32)

    def rdot(lhs: jax.Array, rhs: jax.Array) -> jax.Array:
        return jax.lax.ragged_dot(lhs, rhs, counts_E)

    gate = None if w.w_gate is None else rdot(x_SD, w.w_gate)
    out_SD = rdot(activate(b, activation, gate, rdot(x_SD, w.w_up)), w.w_down)
    return jnp.where((perm.expert_S < info.num_experts)[:, None], out_SD, 0)


def _platform(x: Any) -> str:
    """The platform ``x`` lives on (the default backend while tracing)."""
    if isinstance(x, jax.core.Tracer) or not hasattr(x, "devices"):
        return jax.default_backend()
    return next(iter(x.devices())).platform


def choose_kernel(request: str, info: DispatchInfo, x_TD: Any) -> str | None:
    """The kernel a portable dispatch name runs as on JAX (see the module docstring); ``None``
    leaves ``capacity`` / ``dense`` / ``gather`` to the portable kernels."""
    chosen = default_policy(request, info)
    if chosen != "sorted":
        return chosen
    return "jax:tiles" if _platform(x_TD) == "cpu" else "jax:ragged_dot"
