"""Flax NNX facade: ``from moe_router.flax import MoE, init_params, init_state, apply``.

Expert parallelism over a mesh axis: ``expert_parallel_apply`` (functional), ``shard_layer`` and
``ep_call`` (an ``MoE`` layer), see ``moe_router_backends.jax.expert_parallel``.

Importing this module imports jax and flax (``import moe_router`` alone never does).
"""

from __future__ import annotations

from moe_router_backends.jax.backend import JaxBackend
from moe_router_backends.jax.debug import find_moe_layers, routing_metrics
from moe_router_backends.jax.expert_parallel import (
                                                     EPOutput,
                                                     choose_exchange,
                                                     ep_call,
                                                     expert_parallel_apply,
                                                     shard_layer,
                                                     shard_params,
                                                     split_tokens,
)
from moe_router_backends.jax.functional import apply, init_params, init_state, params_from_weights
from moe_router_backends.jax.layers import (
                                            AuxLoss,
                                            LayerStateVariable,
                                            MoE,
                                            calibrate,
                                            moe_layers,
                                            total_aux_loss,
)

__all__ = ["AuxLoss", "EPOutput", "JaxBackend", "LayerStateVariable", "MoE", "apply", "calibrate",
           "choose_exchange", "ep_call", "expert_parallel_apply", "find_moe_layers",
           "init_params", "init_state", "moe_layers", "params_from_weights", "routing_metrics",
           "shard_layer", "shard_params", "split_tokens", "total_aux_loss"]
