"""Keras layer demo: every strategy through ``moe_router.keras.MoE`` inside one ``tf.function``.

Hidden states are clustered and low-rank (tokens of a few "topics" plus noise), the skewed,
correlated inputs a trained model's router sees. For each strategy: mean experts/token, the k
distribution, max/mean expert load, dropped slots, routed-expert FLOPs relative to static top-2,
and the parity with the NumPy reference forward on the same weights (max abs difference / max
abs output).

All layers run in a single ``tf.function`` traced once (like the Flax demo's one ``nnx.jit``):
a new ``tf.function`` per strategy, each traced on its first call, is the pattern TensorFlow
warns about ("triggered tf.function retracing").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tensorflow as tf
from rich.console import Console
from rich.table import Table

from moe_router.config import MoEConfig
from moe_router.demo import demo_configs, histogram_text
from moe_router.weights import init_weights, param_shapes, reference_forward

from .layers import MoE

D, F, E, T = 64, 128, 8, 512
STATIC_K = 2

#: per layer: (y_TD, mean experts/token, k histogram, expert counts, dropped slots)
LayerOutputs = tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]


def clustered_hidden(num_tokens: int = T, d_model: int = D, seed: int = 0) -> np.ndarray:
    """``(T, D)`` float32: 6 topic centroids in an 8-dim subspace plus small isotropic noise."""
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(8, d_model)) / np.sqrt(8)
    topic = rng.integers(0, 6, size=num_tokens)
    centroids = rng.normal(size=(6, 8)) * 2.0
    hidden = (centroids[topic] + 0.5 * rng.normal(size=(num_tokens, 8))) @ basis
    return (hidden + 0.1 * rng.normal(size=(num_tokens, d_model))).astype(np.float32)


def demo_layers() -> list[tuple[str, dict[str, np.ndarray], MoE]]:
    """``(name, weights, layer)`` per demo strategy; expert weights scaled up, router state
    fresh."""
    layers = []
    for name, router in demo_configs(E).items():
        config = MoEConfig(d_model=D, d_ff=F, router=router)
        weights = {k: v * 10.0 if k in param_shapes(config) else v  # not the router state
                   for k, v in init_weights(config, seed=1).items()}
        layers.append((name, weights, MoE.from_weights(config, weights)))
    return layers


def make_forward(layers: Sequence[MoE]) -> Callable[[tf.Tensor, tf.Tensor], list[LayerOutputs]]:
    """One ``tf.function`` running every layer on ``(x_TD, token_ids_T)`` (``token_ids`` goes
    to ``hash`` routers only); traced once for a given input signature."""

    @tf.function
    def forward(x_TD: tf.Tensor, token_ids_T: tf.Tensor) -> list[LayerOutputs]:
        outputs = []
        for layer in layers:  # a Python loop: unrolled into the one graph
            kwargs = {"token_ids": token_ids_T} if layer.config.router.strategy == "hash" else {}
            y, plan = layer(x_TD, return_plan=True, **kwargs)
            outputs.append((y, plan.stats.mean_experts, plan.stats.k_histogram,
                            plan.expert_counts, plan.num_dropped))
        return outputs

    return forward


def run_demo(console: Console, num_tokens: int = T, seed: int = 0) -> None:
    """Print the Keras layer table (see the module docstring)."""
    x_TD = clustered_hidden(num_tokens, seed=seed)
    token_ids_T = np.random.default_rng(seed + 1).integers(0, 32000, size=num_tokens,
                                                           dtype=np.int32)
    table = Table(title=f"Keras MoE layer (TensorFlow, one tf.function, 'tensorflow:split') on "
                        f"clustered hidden states, T={num_tokens}, D={D}, E={E}")
    for column in ("strategy", "mean k", "tokens per k", "max/mean load", "dropped",
                   "FLOPs vs top-2", "rel. err vs numpy"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    layers = demo_layers()
    forward = make_forward([layer for _, _, layer in layers])
    outputs = forward(tf.constant(x_TD), tf.constant(token_ids_T))
    for (name, weights, layer), tensors in zip(layers, outputs):
        y, mean_k, k_hist, counts, dropped = (t.numpy() for t in tensors)
        hashed = layer.config.router.strategy == "hash"
        ref, _ = reference_forward(x_TD, weights, layer.config,
                                   **({"token_ids_T": token_ids_T} if hashed else {}))
        counts = counts.astype(np.float64)
        mean_k = float(mean_k)
        table.add_row(name, f"{mean_k:.2f}", histogram_text([int(c) for c in k_hist]),
                      f"{counts.max() / max(counts.mean(), 1e-9):.2f}", str(int(dropped)),
                      f"{mean_k / STATIC_K:.2f}x",
                      f"{np.abs(y - ref).max() / max(np.abs(ref).max(), 1e-12):.1e}")
    console.print(table)


if __name__ == "__main__":
    run_demo(Console())
