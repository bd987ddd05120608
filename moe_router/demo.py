"""``moe-router demo``: every strategy on realistic router logits, with honest FLOP accounting.

Router logits come from four distributions seen in trained MoE models: i.i.d. normal (fresh
router), skewed (a few popular experts), peaked (one confident expert per token) and low-rank
(logits = hidden states x router weights, correlated tokens). For each strategy the table shows
mean experts/token, the k distribution, max/mean expert load, dropped slots and expert FLOPs
relative to static top-2 and to dense (all experts). Framework layers add their own tables when
the framework is installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from .api import route
from .config import RouterConfig

NUM_EXPERTS = 8
STATIC_K = 2


def realistic_logits(kind: str, num_tokens: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """``(T, E)`` float32 router logits of one of: normal, skewed, peaked, low_rank."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return rng.normal(size=(num_tokens, num_experts)).astype(np.float32)
    if kind == "skewed":  # expert popularity follows a Zipf-like prior
        popularity = np.log(1.0 / np.arange(1, num_experts + 1)) * 1.5
        return (rng.normal(size=(num_tokens, num_experts)) + popularity).astype(np.float32)
    if kind == "peaked":  # one confident expert per token, the rest flat
        logits = rng.normal(scale=0.3, size=(num_tokens, num_experts))
        winners = rng.integers(0, num_experts, size=num_tokens)
        logits[np.arange(num_tokens), winners] += rng.uniform(1.0, 4.0, size=num_tokens)
        return logits.astype(np.float32)
    if kind == "low_rank":  # hidden states through a router matrix
        hidden = rng.normal(size=(num_tokens, 16)) @ rng.normal(size=(16, 64))
        router = rng.normal(scale=0.05, size=(64, num_experts))
        return (hidden @ router).astype(np.float32)
    raise ValueError(f"kind={kind!r}: expected normal, skewed, peaked or low_rank")


def demo_configs(num_experts: int = NUM_EXPERTS) -> dict[str, RouterConfig]:
    """The strategies shown, all with a K = 4 budget for dynamic ones."""
    E = num_experts
    return {
        "top_k (k=2)": RouterConfig(num_experts=E, k=STATIC_K),
        "top_k sigmoid+groups": RouterConfig(num_experts=E, k=STATIC_K, score_func="sigmoid",
                                             num_groups=4, topk_groups=2),
        "top_p (p=0.4)": RouterConfig(num_experts=E, strategy="top_p", top_p=0.4, max_experts=4),
        "threshold (t=0.6)": RouterConfig(num_experts=E, strategy="threshold", threshold=0.6,
                                          max_experts=4),
        "null experts (N=4)": RouterConfig(num_experts=E, k=STATIC_K, num_null_experts=4,
                                           max_experts=STATIC_K),
        "relu": RouterConfig(num_experts=E, strategy="relu", min_experts=0, max_experts=4),
        "expert_choice (c=2)": RouterConfig(num_experts=E, strategy="expert_choice",
                                            capacity_factor=2.0, max_experts=4),
        "hash (k=1)": RouterConfig(num_experts=E, strategy="hash", k=1),
        "complexity (target 1.5)": RouterConfig(num_experts=E, strategy="complexity",
                                                target_experts=1.5, max_experts=4),
        "top_k capacity 1.0": RouterConfig(num_experts=E, k=STATIC_K, capacity_factor=1.0),
    }


def routing_table(kind: str, num_tokens: int, seed: int) -> Table:
    """One row per strategy for logits of ``kind``."""
    table = Table(title=f"NumPy routing, {kind} logits, T={num_tokens}, E={NUM_EXPERTS}")
    for column in ("strategy", "mean k", "tokens per k", "max/mean load", "dropped",
                   "FLOPs vs top-2", "FLOPs vs dense"):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    base = realistic_logits(kind, num_tokens, NUM_EXPERTS, seed)
    token_ids = np.random.default_rng(seed).integers(0, 32000, size=num_tokens)
    for name, config in demo_configs().items():
        logits = base
        if config.num_null_experts:
            extra = np.random.default_rng(seed + 1).normal(size=(num_tokens,
                                                                 config.num_null_experts))
            logits = np.concatenate([base, extra.astype(np.float32)], axis=1)
        plan = route(logits, config, token_ids_T=token_ids)
        s = plan.summary()
        mean_k = s["mean_experts"]
        table.add_row(name, f"{mean_k:.2f}", histogram_text(s["k_histogram"]),
                      f"{s['max_load'] / max(s['mean_load'], 1e-9):.2f}", str(s["num_dropped"]),
                      f"{mean_k / STATIC_K:.2f}x", f"{mean_k / NUM_EXPERTS:.2f}x")
    return table


def histogram_text(counts: Sequence[int]) -> str:
    """``k=1:29% 2:67% 3:4%``: share of tokens per k, zero entries left out."""
    total = max(sum(counts), 1)
    parts = [f"{k}:{100 * c / total:.0f}%" for k, c in enumerate(counts) if c]
    return "k=" + " ".join(parts)


def framework_demos(console: Console, only: Sequence[str] | None = None) -> None:
    """Run each installed backend's ``run_demo`` (torch, jax, tensorflow)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's C++ start-up chatter
    for framework, module in (("torch", "moe_router_backends.torch.demo"),
                              ("jax", "moe_router_backends.jax.demo"),
                              ("tensorflow", "moe_router_backends.tensorflow.demo")):
        if only is not None and framework not in only:
            continue
        if importlib.util.find_spec(framework) is None:
            console.print(f"[dim]{framework} is not installed: its layer demo is skipped[/dim]")
            continue
        try:
            demo_module = importlib.import_module(module)
        except ModuleNotFoundError as err:
            console.print(f"[dim]{framework} layer demo not available ({err.name})[/dim]")
            continue
        demo_module.run_demo(console)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="moe-router demo", description=__doc__)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per batch (T)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="normal,skewed,peaked,low_rank",
                        help="comma list of logit distributions")
    parser.add_argument("--frameworks", default="torch,jax,tensorflow",
                        help="comma list of framework layer demos to run ('' for none)")
    args = parser.parse_args(argv)
    console = Console(width=None if Console().is_terminal else 130)
    console.print("[bold]moe-router demo[/bold]: mean k is experts/token actually computed "
                  "(null and dropped slots cost nothing); FLOPs are relative to static top-2 "
                  "and to running all experts.")
    for kind in args.kinds.split(","):
        console.print(routing_table(kind.strip(), args.tokens, args.seed))
    frameworks = [f for f in args.frameworks.split(",") if f]
    if frameworks:
        framework_demos(console, frameworks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
