"""Tiny shared configs and data for the JAX tests (small sizes: jit compile time dominates)."""

from __future__ import annotations

import numpy as np

import moe_router as mr

E = 4
D, F = 8, 16

ROUTERS: dict[str, mr.RouterConfig] = {
    "top_k": mr.RouterConfig(num_experts=E, k=2),
    "top_k_sigmoid_groups": mr.RouterConfig(num_experts=E, k=2, score_func="sigmoid",
                                            num_groups=2, topk_groups=1, route_scale=2.5),
    "top_p": mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, max_experts=3),
    "threshold": mr.RouterConfig(num_experts=E, strategy="threshold", threshold=0.6),
    "null": mr.RouterConfig(num_experts=E, k=2, num_null_experts=2),
    "relu": mr.RouterConfig(num_experts=E, strategy="relu", min_experts=0, max_experts=3),
    "expert_choice": mr.RouterConfig(num_experts=E, strategy="expert_choice", max_experts=3),
    "hash": mr.RouterConfig(num_experts=E, strategy="hash", k=2),
    "complexity": mr.RouterConfig(num_experts=E, strategy="complexity", target_experts=2.0,
                                  max_experts=3),
    "capacity": mr.RouterConfig(num_experts=E, k=2, capacity_factor=0.75),
    "capacity_prob": mr.RouterConfig(num_experts=E, k=2, capacity_factor=0.75,
                                     drop_policy="probability"),
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
