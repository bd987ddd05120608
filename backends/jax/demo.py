"""The Flax layer in the ``moe-router demo``: a few strategies through ``moe_router.flax.MoE``.

All layers share the expert weights and run inside one ``nnx.jit``; each row is checked against
the NumPy oracle (:func:`moe_router.weights.reference_forward`) on the same weights.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console
from rich.table import Table

from moe_router.config import MoEConfig, RouterConfig
from moe_router.demo import histogram_text
from moe_router.layer.experts import dispatch_info, resolve_kernel
from moe_router.weights import init_weights, reference_forward

from .functional import JAX
from .layers import MoE

E, STATIC_K, D, FF, T = 8, 2, 64, 128, 512


def demo_configs() -> dict[str, RouterConfig]:
    """The strategies of the Flax table."""
    return {
        "top_k (k=2)": RouterConfig(num_experts=E, k=STATIC_K),
        "top_p (p=0.4)": RouterConfig(num_experts=E, strategy="top_p", top_p=0.4, max_experts=4),
        "threshold (t=0.6)": RouterConfig(num_experts=E, strategy="threshold", threshold=0.6,
                                          max_experts=4),
        "null experts (N=4)": RouterConfig(num_experts=E, k=STATIC_K, num_null_experts=4),
        "complexity (target 1.5)": RouterConfig(num_experts=E, strategy="complexity",
                                                target_experts=1.5, max_experts=4),
        "top_k capacity 1.0": RouterConfig(num_experts=E, k=STATIC_K, capacity_factor=1.0),
    }


def _layers(seed: int) -> tuple[list[str], list[MoE]]:
    names, layers = [], []
    rng = np.random.default_rng(seed)
    for name, router in demo_configs().items():
        mc = MoEConfig(d_model=D, d_ff=FF, router=router)
        weights = init_weights(mc, seed=seed)  # same experts for every strategy
        # a trained-looking router: logits of std ~1.5 instead of the tiny init
        weights["router.weight"] = (rng.standard_normal(weights["router.weight"].shape)
                                    * 1.5 / np.sqrt(D)).astype(np.float32)
        names.append(name)
        layers.append(MoE.from_weights(mc, weights))
    return names, layers


def run_demo(console: Console, num_tokens: int = T, seed: int = 0) -> None:
    """Print one table: each strategy through the Flax layer, with parity vs NumPy."""
    names, layers = _layers(seed)
    x = np.random.default_rng(seed + 1).standard_normal((num_tokens, D)).astype(np.float32)

    @nnx.jit
    def forward(x, *layers):
        return [layer(x, return_plan=True) for layer in layers]

    x_TD = jnp.asarray(x)
    outputs = forward(x_TD, *layers)
    table = Table(title=f"Flax NNX layer (moe_router.flax.MoE under nnx.jit), T={num_tokens}, "
                        f"d={D}, f={FF}, E={E}")
    for column in ("strategy", "dispatch", "mean k", "tokens per k", "max/mean load", "dropped",
                   "FLOPs vs top-2", "max |y - NumPy|"):
        table.add_column(column, justify="left" if column in ("strategy", "dispatch")
                         else "right")
    for name, layer, (y, plan) in zip(names, layers, outputs):
        mc = layer.config  # the reference reads the controller state from the export
        want, _ = reference_forward(x, layer.export_weights(), mc)
        kernel = resolve_kernel(JAX, mc.dispatch, dispatch_info(
            JAX, mc, x_TD, plan.expert_indices.shape[1]), x_TD)
        s = plan.summary()
        hist = histogram_text(s["k_histogram"])
        table.add_row(name, kernel, f"{s['mean_experts']:.2f}", hist,
                      f"{s['max_load'] / max(s['mean_load'], 1e-9):.2f}", str(s["num_dropped"]),
                      f"{s['mean_experts'] / STATIC_K:.2f}x",
                      f"{float(np.abs(np.asarray(y) - want).max()):.1e}")
    console.print(table)
