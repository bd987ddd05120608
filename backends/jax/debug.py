"""The Flax NNX side of :class:`moe_router.debug.MoEDebugger`: finding our layers in an nnx graph,
and :func:`routing_metrics`, the per-layer routing statistics as arrays (usable in ``nnx.jit``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moe_router.debug.counters import MODES, mode_row
from moe_router.errors import InputError

from .layers import MoE, moe_layers, total_aux_loss

#: the observer whose counters :func:`routing_metrics` reads
STATS = "routing_stats"


def find_moe_layers(model: Any) -> list[tuple[str, MoE]] | None:
    """Every :class:`MoE` in ``model`` (an nnx module, or a list / tuple / dict of them, nested)
    with its ``.``-joined graph path (``blocks.0.moe``; the class name for ``model`` itself), in
    nnx graph order, each layer once; ``None`` when ``model`` holds no nnx object."""
    if not isinstance(model, (nnx.Pytree, nnx.Variable, list, tuple, dict)):
        return None
    found: dict[int, tuple[str, MoE]] = {}
    nnx_seen = isinstance(model, nnx.Pytree)
    for path, node in nnx.iter_graph(model):
        nnx_seen = nnx_seen or isinstance(node, (nnx.Pytree, nnx.Variable))
        if isinstance(node, MoE) and id(node) not in found:
            name = ".".join(map(str, path)) or type(model).__name__
            found[id(node)] = (name, node)
    return list(found.values()) if nnx_seen else None


def invalidate_compiled(model: Any) -> None:
    """Nothing to do: ``nnx.jit`` keys its cache on the graph definition, which holds each
    layer's config and observer variables, so it retraces once after the debugger switches
    observers on or off (and reuses the old trace when they are switched back)."""


def routing_metrics(model: Any) -> dict[str, jax.Array]:
    """Aux loss and routing statistics of ``model``'s MoE layers, as arrays (traceable: call it
    inside ``nnx.jit``, log it outside).

    Keys (L = MoE layers in graph order, E = experts; ``<mode>`` is ``train`` (training calls) or
    ``eval`` (inference and calibration calls)):

    ======================  ======  ==========================================================
    key                     shape   value
    ======================  ======  ==========================================================
    ``aux_loss``            ()      :func:`~moe_router.flax.total_aux_loss` (last call's loss)
    ``<mode>/calls``        (L,)    layer calls counted
    ``<mode>/tokens``       (L,)    real (unmasked) tokens routed
    ``<mode>/expert_load``  (L, E)  slots each expert received (zero-padded to the largest E)
    ``<mode>/mean_experts`` (L,)    mean experts per real token (0 before any token)
    ``<mode>/max_load``     (L,)    largest ``expert_load`` of the layer
    ``<mode>/mean_load``    (L,)    mean ``expert_load`` of the layer (``max / mean``: imbalance)
    ``<mode>/dropped``      (L,)    slots removed by the capacity limit
    ======================  ======  ==========================================================

    The ``<mode>/...`` keys come from the ``routing_stats`` counters (accumulated since the
    observer was switched on or :meth:`MoE.reset_observers`); they are present when every layer
    has that observer (``MoEConfig(observers=("routing_stats",))`` or the debugger attached).

    Raises:
        InputError: ``model`` has no MoE layer, or only some of its layers count ``routing_stats``.
    """
    layers = moe_layers(model)
    if not layers:
        raise InputError("model", "expected an nnx graph containing moe_router MoE layers")
    metrics = {"aux_loss": total_aux_loss(model)}
    counters = [layer.layer_state().observers.get(STATS) for layer in layers]
    missing = [i for i, c in enumerate(counters) if c is None]
    if len(missing) == len(layers):
        return metrics
    if missing:
        raise InputError("model", f"MoE layers {missing} do not count {STATS!r} (switch the "
                         f"observer on in every layer, or in none)")
    width = max(int(c["expert_tokens"].shape[-1]) for c in counters)
    for mode in MODES:
        row = mode_row(mode)
        per_layer = [_layer_metrics(c, row, width) for c in counters]
        for key in per_layer[0]:
            metrics[f"{mode}/{key}"] = jnp.stack([m[key] for m in per_layer])
    return metrics


def _layer_metrics(counters: Mapping[str, jax.Array], row: int, width: int) -> dict[str, jax.Array]:
    """One layer's metrics from its ``routing_stats`` counters (mode ``row``)."""
    load_E = counters["expert_tokens"][row]
    k_hist = counters["k_hist"][row]
    tokens = counters["tokens"][row]
    slots = jnp.sum(k_hist * jnp.arange(k_hist.shape[0], dtype=k_hist.dtype))
    return {
        "calls": counters["calls"][row],
        "tokens": tokens,
        "expert_load": jnp.pad(load_E, (0, width - load_E.shape[0])),
        "mean_experts": slots.astype(jnp.float32) / jnp.maximum(tokens, 1).astype(jnp.float32),
        "max_load": jnp.max(load_E).astype(jnp.float32),
        "mean_load": jnp.mean(load_E.astype(jnp.float32)),
        "dropped": counters["dropped"][row],
    }
