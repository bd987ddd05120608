"""Torch layer demo: structured activations through a small ``moe_router.torch.MoE``.

The activations are clustered, low-rank hidden states (tokens of a few "topics" plus noise),
which gives the router the skewed, correlated inputs trained models see, unlike i.i.d. noise.
For each strategy: mean experts/token, the k distribution, max/mean expert load, dropped slots,
routed-expert FLOPs relative to static top-2, and the max difference to the NumPy reference
forward on the same weights (max abs difference / max abs output).
"""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from moe_router.config import MoEConfig, RouterConfig
from moe_router.demo import histogram_text
from moe_router.weights import init_weights, param_shapes, reference_forward

from .layers import MoE

D, F, E, T = 64, 128, 8, 512


def structured_activations(num_tokens: int = T, d_model: int = D, seed: int = 0) -> np.ndarray:
    """``(T, D)`` float32: 6 topic centroids in an 8-dim subspace, plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, d_model)) / np.sqrt(8)
    centroids = rng.normal(size=(6, 8)) * 2.0
    topic = rng.integers(0, 6, size=num_tokens)
    hidden = (centroids[topic] + 0.5 * rng.normal(size=(num_tokens, 8))) @ basis
    hidden += 0.1 * rng.normal(size=(num_tokens, d_model))
    return hidden.astype(np.float32)


def demo_configs() -> dict[str, RouterConfig]:
    """The strategies of the torch table."""
    return {
        "top_k (k=2)": RouterConfig(num_experts=E, k=2),
        "top_p (p=0.5, max 4)": RouterConfig(num_experts=E, strategy="top_p", top_p=0.5,
                                             max_experts=4),
        "threshold (t=0.6)": RouterConfig(num_experts=E, strategy="threshold", threshold=0.6,
                                          max_experts=4),
        "null experts (N=4, k=2)": RouterConfig(num_experts=E, k=2, num_null_experts=4),
        "complexity (target 1.5)": RouterConfig(num_experts=E, strategy="complexity",
                                                target_experts=1.5, max_experts=4),
        "top_k capacity 1.0": RouterConfig(num_experts=E, k=2, capacity_factor=1.0),
    }


def run_demo(console: Console, num_tokens: int = T, seed: int = 0) -> None:
    """Print the torch layer table (see the module docstring)."""
    x = structured_activations(num_tokens, seed=seed)
    table = Table(title=f"torch MoE layer on structured activations, T={num_tokens}, D={D}, "
                        f"E={E}")
    for column in ("strategy", "mean k", "tokens per k", "max/mean load", "dropped",
                   "FLOPs vs top-2", "rel. err vs numpy"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name, router in demo_configs().items():
        config = MoEConfig(d_model=D, d_ff=F, router=router)
        params = param_shapes(config)  # scaled up; the router state (in the dict too) stays fresh
        weights = {k: v * 10.0 if k in params else v
                   for k, v in init_weights(config, seed=1).items()}
        layer = MoE.from_weights(config, weights).eval()
        with torch.no_grad():
            y, plan = layer(torch.from_numpy(x), return_plan=True)
        ref, _ = reference_forward(x, weights, config)  # the same (fresh) router state
        s = plan.summary()
        y = y.numpy()
        table.add_row(name, f"{s['mean_experts']:.2f}", histogram_text(s["k_histogram"]),
                      f"{s['max_load'] / max(s['mean_load'], 1e-9):.2f}", str(s["num_dropped"]),
                      f"{s['mean_experts'] / 2:.2f}x",
                      f"{np.abs(y - ref).max() / np.abs(ref).max():.1e}")
    console.print(table)


if __name__ == "__main__":
    run_demo(Console())
