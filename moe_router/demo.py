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
from collections.abc import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from .api import route
from .cli.common import (
    choice_list,
    native_logs_dropped,
    non_negative_int,
    positive_int,
    quiet_frameworks,
)
from .config import RouterConfig

NUM_EXPERTS = 8
STATIC_K = 2
#: the router logit distributions of :func:`realistic_logits`
KINDS = ("normal", "skewed", "peaked", "low_rank")
#: frameworks with a layer demo (``moe_router_backends.<name>.demo``)
FRAMEWORKS = ("torch", "jax", "tensorflow")
#: an absl / glog line (``I0000 00:00:1796245561.901085   11860 port.cc:153] ...``) or absl's
#: notice that it logs to stderr before ``InitializeLog()``


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
    raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")


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


def framework_demos(console: Console, only: Sequence[str] | None = None, *,
                    num_tokens: int = 512, seed: int = 0, verbose: bool = False) -> None:
    """Run each installed backend's ``run_demo`` (torch, jax, tensorflow) on ``num_tokens``
    tokens; their native start-up logging is dropped unless ``verbose``."""
    for framework in FRAMEWORKS:
        if only is not None and framework not in only:
            continue
        if importlib.util.find_spec(framework) is None:
            console.print(f"[dim]{framework} is not installed: its layer demo is skipped[/dim]")
            continue
        try:
            with native_logs_dropped(not verbose):
                demo_module = importlib.import_module(f"moe_router_backends.{framework}.demo")
        except ModuleNotFoundError as err:
            console.print(f"[dim]{framework} layer demo not available ({err.name})[/dim]")
            continue
        demo_module.run_demo(console, num_tokens=num_tokens, seed=seed)


def build_parser() -> argparse.ArgumentParser:
    """The ``moe-router demo`` options."""
    parser = argparse.ArgumentParser(prog="moe-router demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=positive_int, default=4096,
                        help="tokens per batch (T) of every table (default: %(default)s)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--kinds", type=choice_list(KINDS), default=list(KINDS),
                        help=f"comma list of logit distributions among {', '.join(KINDS)} "
                             "(default: all)")
    parser.add_argument("--frameworks", type=choice_list(FRAMEWORKS, allow_empty=True),
                        default=list(FRAMEWORKS),
                        help=f"comma list of framework layer demos among {', '.join(FRAMEWORKS)}"
                             " ('' for none; default: all installed)")
    parser.add_argument("--verbose", action="store_true",
                        help="keep the frameworks' own start-up logging and warnings")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the demo with ``argv``; bad arguments exit with status 2 (``argparse``)."""
    args = build_parser().parse_args(argv)
    quiet_frameworks(args.verbose)  # before any framework is imported
    console = Console(width=None if Console().is_terminal else 130)
    console.print("[bold]moe-router demo[/bold]: mean k is experts/token actually computed "
                  "(null and dropped slots cost nothing); FLOPs are relative to static top-2 "
                  "and to running all experts.")
    for kind in args.kinds:
        console.print(routing_table(kind, args.tokens, args.seed))
    if args.frameworks:
        framework_demos(console, args.frameworks, num_tokens=args.tokens, seed=args.seed,
                        verbose=args.verbose)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
