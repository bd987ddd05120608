"""Flax NNX facade: ``from moe_router.flax import MoE, init_params, init_state, apply``.

Importing this module imports jax and flax (``import moe_router`` alone never does).
"""

from __future__ import annotations

from moe_router_backends.jax.backend import JaxBackend
from moe_router_backends.jax.debug import find_moe_layers, routing_metrics
from moe_router_backends.jax.functional import apply, init_params, init_state, params_from_weights
from moe_router_backends.jax.layers import (
                                            AuxLoss,
                                            LayerStateVariable,
                                            MoE,
                                            calibrate,
                                            moe_layers,
                                            total_aux_loss,
)

__all__ = ["AuxLoss", "JaxBackend", "LayerStateVariable", "MoE", "apply", "calibrate",
           "find_moe_layers", "init_params", "init_state", "moe_layers", "params_from_weights",
           "routing_metrics", "total_aux_loss"]
