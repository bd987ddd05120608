"""Tiny shared configs and data for the JAX tests (small sizes: jit compile time dominates)."""

from __future__ import annotations

import numpy as np
from router_cases import router_cases

import moe_router as mr

E = 4
D, F = 8, 16

ROUTERS: dict[str, mr.RouterConfig] = {
    **router_cases(E, max_dynamic=3, num_groups=2, topk_groups=1, num_null=2),
    "expert_bias": mr.RouterConfig(num_experts=E, k=2, use_expert_bias=True),
}


def logits(T: int = 12, C: int = E, seed: int = 0, scale: float = 1.5) -> np.ndarray:
    """``(T, C)`` float32 router logits with distinct values (no accidental ties)."""
    return (np.random.default_rng(seed).standard_normal((T, C)) * scale).astype(np.float32)


def token_ids(T: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, size=T).astype(np.int32)


def moe_config(router: str = "top_k", **changes) -> mr.MoEConfig:
    return mr.MoEConfig(d_model=D, d_ff=F, router=ROUTERS[router], init_std=0.5, **changes)


def inputs(shape: tuple[int, ...] = (2, 6), seed: int = 2) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((*shape, D)).astype(np.float32)
