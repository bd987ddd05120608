"""Flax NNX facade: ``from moe_router.flax import MoE, init_params, apply``.

Importing this module imports jax and flax (``import moe_router`` alone never does).
"""

from __future__ import annotations

from backends.jax.backend import JaxBackend
from backends.jax.functional import apply, init_params, init_state, params_from_weights
from backends.jax.layers import MoE

__all__ = ["JaxBackend", "MoE", "apply", "init_params", "init_state", "params_from_weights"]
