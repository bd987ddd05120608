"""One RouterConfig per strategy (and capacity variant), shared by the backend parity tests."""

from __future__ import annotations

import moe_router as mr


def router_cases(num_experts: int = 8, max_dynamic: int = 4, num_groups: int = 4,
                 topk_groups: int = 2, num_null: int = 3) -> dict[str, mr.RouterConfig]:
    """Every built-in strategy once, plus the two capacity drop policies."""
    E = num_experts
    return {
        "top_k": mr.RouterConfig(num_experts=E, k=2),
        "top_k_sigmoid_groups": mr.RouterConfig(num_experts=E, k=2, score_func="sigmoid",
                                                num_groups=num_groups, topk_groups=topk_groups,
                                                route_scale=2.5),
        "top_p": mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5,
                                 max_experts=max_dynamic),
        "threshold": mr.RouterConfig(num_experts=E, strategy="threshold", threshold=0.6),
        "null": mr.RouterConfig(num_experts=E, k=2, num_null_experts=num_null),
        "relu": mr.RouterConfig(num_experts=E, strategy="relu", min_experts=0,
                                max_experts=max_dynamic),
        "expert_choice": mr.RouterConfig(num_experts=E, strategy="expert_choice",
                                         max_experts=max_dynamic),
        "hash": mr.RouterConfig(num_experts=E, strategy="hash", k=2),
        "complexity": mr.RouterConfig(num_experts=E, strategy="complexity", target_experts=2.0,
                                      max_experts=max_dynamic),
        "capacity": mr.RouterConfig(num_experts=E, k=2, capacity_factor=0.75),
        "capacity_prob": mr.RouterConfig(num_experts=E, k=2, capacity_factor=0.75,
                                         drop_policy="probability"),
    }
