"""``moe-router bench``: time ``route()`` per backend x strategy x batch size, against top-2.

Each cell times ``moe_router.route(logits, RouterConfig(...))`` on the backend's own arrays
(converted from one NumPy batch before timing; every call ends by copying the plan's indices,
weights and counts to NumPy, which waits for asynchronous frameworks). For each (backend, size)
static top-k (k=2) is timed in the same rounds as the other strategies, interleaved with them, so
every row reports its median time *and* the median of its per-round ratio to that reference; the
reference row's ratio is 1.0 by construction. Mean experts/token and expert FLOPs vs top-2
(``mean_k / 2``) come from the last plan. A rich table goes to stdout; ``--json`` writes the
machine, the command line and every row.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from .common import (
    CLIError,
    choice_list,
    native_logs_dropped,
    non_negative_int,
    positive_int,
    quiet_frameworks,
)

#: the reference every row is compared with: static top-k, k = REFERENCE_K
REFERENCE, REFERENCE_K = "top_k", 2
#: not a registered strategy: top-k (k=2) with E/2 null experts (AdaMoE)
NULL_EXPERTS = "null_experts"
DEFAULT_STRATEGIES = ("top_k", "top_p", "threshold", "relu", NULL_EXPERTS, "complexity",
                      "expert_choice")
DEFAULT_TOKENS = (256, 4096)
#: dynamic strategies get this budget of experts per token (at most E)
MAX_EXPERTS = 4
LOGIT_KINDS = ("normal", "skewed", "peaked", "low_rank")


def positive_int_list(text: str) -> list[int]:
    """``argparse`` type: a comma list of positive integers (order kept, duplicates dropped)."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma list of positive integers")
    return list(dict.fromkeys(positive_int(item) for item in items))


positive_int_list.__name__ = "integer list"


def _installed(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _pick(option: str, text: str | None, choices: Sequence[str], default: Sequence[str]
          ) -> list[str]:
    """``text`` parsed as a comma list of ``choices`` (``default`` when not given)."""
    if text is None:
        return [name for name in default if name in choices]
    try:
        return choice_list(choices)(text)
    except argparse.ArgumentTypeError as err:
        raise CLIError(f"argument {option}: {err}") from None


def strategy_config(name: str, num_experts: int) -> tuple[str, Any]:
    """``(row label, RouterConfig)`` of the benchmarked case ``name``."""
    from moe_router.config import RouterConfig
    from moe_router.registry import default_registry

    E, K = num_experts, min(MAX_EXPERTS, num_experts)
    presets: dict[str, tuple[str, dict[str, Any]]] = {
        "top_k": (f"top_k (k={REFERENCE_K})", {"k": REFERENCE_K}),
        "top_p": ("top_p (p=0.4)", {"top_p": 0.4, "max_experts": K}),
        "threshold": ("threshold (t=0.6)", {"threshold": 0.6, "max_experts": K}),
        "relu": ("relu", {"min_experts": 0, "max_experts": K}),
        "expert_choice": ("expert_choice (c=2)", {"capacity_factor": 2.0, "max_experts": K}),
        "hash": ("hash (k=1)", {"k": 1}),
        "complexity": ("complexity (target 1.5)", {"target_experts": 1.5, "max_experts": K}),
    }
    if name == NULL_EXPERTS:
        return (f"null experts (N={E // 2}, k={REFERENCE_K})",
                RouterConfig(num_experts=E, k=REFERENCE_K, num_null_experts=E // 2,
                             max_experts=REFERENCE_K))
    if name in presets:
        label, fields = presets[name]
    else:  # a plug-in's strategy: its defaults, the dynamic budget, k=2 where it reads k
        spec = default_registry().collected.strategies[name]
        fields = {"max_experts": K, **({"k": REFERENCE_K} if spec.reads_k else {})}
        label = name
    return label, RouterConfig(num_experts=E, strategy=name, **fields)


def route_inputs(config: Any, num_tokens: int, seed: int) -> dict[str, Any]:
    """NumPy extra ``route()`` inputs the strategy and estimator of ``config`` declare."""
    import numpy as np

    from moe_router.registry import default_registry

    collected = default_registry().collected
    needs = set(collected.strategies[config.strategy].inputs)
    estimator = collected.estimators.get(getattr(config, "complexity_estimator", None) or "")
    needs.update(getattr(estimator, "inputs", ()) or ())
    rng = np.random.default_rng(seed + 7)
    made = {
        "token_ids": lambda: ("token_ids_T", rng.integers(0, 32000, num_tokens, dtype=np.int32)),
        "hidden": lambda: ("hidden_TD", rng.normal(size=(num_tokens, 64)).astype(np.float32)),
        "complexity_scores": lambda: ("complexity_scores_T",
                                      rng.uniform(size=num_tokens).astype(np.float32)),
        "attention_probs": lambda: ("attention_probs", np.full((num_tokens, 64), 1 / 64,
                                                               np.float32)),
    }
    return dict(made[name]() for name in sorted(needs) if name in made)


def machine_info() -> dict[str, Any]:
    """Where the figures were taken: platform, CPUs, versions of the frameworks imported."""
    import numpy as np

    from .info import _version

    info: dict[str, Any] = {
        "platform": platform.platform(), "machine": platform.machine(),
        "processor": platform.processor() or None, "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else None,
        "moe_router": _version(), "numpy": np.__version__,
    }
    for name in ("torch", "jax", "tensorflow"):
        module = sys.modules.get(name)
        if module is not None:
            info[name] = getattr(module, "__version__", "unknown")
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
    return info


def _timed_call(backend: Any, logits: Any, config: Any, inputs: dict[str, Any]
                ) -> tuple[float, Any]:
    """Seconds for one ``route()`` until its plan is on the host, and the plan."""
    from moe_router.api import route

    start = time.perf_counter()
    plan = route(logits, config, backend=backend, **inputs)
    for array in (plan.expert_indices, plan.expert_weights, plan.expert_counts):
        backend.to_numpy(array)  # waits for asynchronous frameworks (JAX, GPU)
    return time.perf_counter() - start, plan


def bench_cell(backend: Any, num_tokens: int, cases: dict[str, tuple[str, Any]], args: Any,
               advance: Callable[[], None]) -> list[dict[str, Any]]:
    """Rows of one (backend, size): every case timed in each round, reference first."""
    import numpy as np

    from moe_router.demo import realistic_logits

    base = realistic_logits(args.logits, num_tokens, args.experts, args.seed)
    prepared = {}
    for name, (_, config) in cases.items():
        logits = base
        if config.num_null_experts:
            extra = np.random.default_rng(args.seed + 1).normal(
                size=(num_tokens, config.num_null_experts)).astype(np.float32)
            logits = np.concatenate([base, extra], axis=1)
        inputs = {key: backend.asarray(value)
                  for key, value in route_inputs(config, num_tokens, args.seed).items()}
        prepared[name] = (backend.asarray(logits), inputs)
    times: dict[str, list[float]] = {name: [] for name in cases}
    plans: dict[str, Any] = {}
    gc.collect()
    for round_ in range(args.warmup + args.repeats):
        for name, (_, config) in cases.items():
            logits, inputs = prepared[name]
            seconds, plans[name] = _timed_call(backend, logits, config, inputs)
            if round_ >= args.warmup:
                times[name].append(seconds)
            advance()
    ref_times = times[REFERENCE]
    rows = []
    for name, (label, config) in cases.items():
        k_T = backend.to_numpy(plans[name].num_experts_per_token)
        mean_k = float(np.mean(k_T))
        rows.append({
            "backend": backend.name, "tokens": num_tokens, "experts": args.experts,
            "strategy": name, "label": label, "reference": name == REFERENCE,
            "median_ms": statistics.median(times[name]) * 1e3,
            "min_ms": min(times[name]) * 1e3,
            "time_vs_reference": statistics.median(
                t / r for t, r in zip(times[name], ref_times)),
            "reference_median_ms": statistics.median(ref_times) * 1e3,
            "mean_experts": mean_k, "flops_vs_top2": mean_k / REFERENCE_K,
            "times_ms": [t * 1e3 for t in times[name]],
        })
    return rows


def _command_line(args: argparse.Namespace, backends: list[str], strategies: list[str]) -> str:
    parts = ["moe-router", "bench", "--backends", ",".join(backends), "--strategies",
             ",".join(strategies), "--tokens", ",".join(map(str, args.tokens)), "--experts",
             str(args.experts), "--logits", args.logits, "--repeats", str(args.repeats),
             "--warmup", str(args.warmup), "--seed", str(args.seed)]
    if args.json:
        parts += ["--json", args.json]
    return " ".join(parts)


def _print_table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"route() timings, E={rows[0]['experts']}: time and FLOPs relative to "
                        f"static top-{REFERENCE_K} on the same backend, same run")
    for column in ("backend", "T", "strategy", "median ms", "time vs top-2", "mean k",
                   "FLOPs vs top-2"):
        table.add_column(column, justify="left" if column in ("backend", "strategy")
                         else "right")
    for row in rows:
        table.add_row(row["backend"], str(row["tokens"]), row["label"],
                      f"{row['median_ms']:.3f}", f"{row['time_vs_reference']:.2f}x",
                      f"{row['mean_experts']:.2f}", f"{row['flops_vs_top2']:.2f}x")
    Console(width=None if Console().is_terminal else 120).print(table)


def _cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    quiet_frameworks(args.verbose)  # before any framework is imported
    from rich.console import Console
    from rich.progress import Progress

    from moe_router.registry import default_registry

    registry = default_registry()
    specs = registry.collected.backends
    installed = [name for name, spec in sorted(specs.items()) if _installed(spec.framework)]
    backends = _pick("--backends", args.backends, sorted(specs),
                     ["numpy"] + [name for name in installed if name != "numpy"])
    missing = [name for name in backends if name not in installed]
    if missing:
        raise CLIError(f"argument --backends: {', '.join(missing)} needs "
                       f"{', '.join(specs[name].framework for name in missing)}, which is not "
                       f"installed (usable here: {', '.join(installed)})")
    strategies = _pick("--strategies", args.strategies,
                       sorted([*registry.collected.strategies, NULL_EXPERTS]), DEFAULT_STRATEGIES)
    if args.experts < 2:
        raise CLIError(f"argument --experts: expected an integer >= 2 (the reference is "
                       f"top-{REFERENCE_K}), got {args.experts}")
    cases = dict.fromkeys([REFERENCE, *strategies])  # the reference first, once
    case_configs = {name: strategy_config(name, args.experts) for name in cases}
    with native_logs_dropped(not args.verbose):
        instances = [registry.backend(name) for name in backends]
    rows: list[dict[str, Any]] = []
    calls = len(case_configs) * (args.warmup + args.repeats)
    with Progress(console=Console(stderr=True), transient=True,
                  disable=not sys.stderr.isatty()) as progress:
        task = progress.add_task("bench", total=len(instances) * len(args.tokens) * calls)
        for backend in instances:
            for num_tokens in args.tokens:
                progress.update(task, description=f"{backend.name} T={num_tokens}")
                rows += bench_cell(backend, num_tokens, case_configs, args,
                                   lambda: progress.advance(task))
    _print_table(rows)
    if args.json:
        record = {"command": _command_line(args, backends, strategies),
                  "machine": machine_info(), "reference": f"top_k k={REFERENCE_K}",
                  "rows": rows}
        try:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
        except OSError as err:
            raise CLIError(f"cannot write {args.json}: {err.strerror or err}") from None
        print(f"wrote {args.json}")
    return 0


def add_parser(sub: Any) -> None:
    bench = sub.add_parser(
        "bench", help="time route() per backend x strategy x size, relative to top-2",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--backends", metavar="NAMES",
                       help="comma list of registered backends (default: numpy and every "
                            "backend whose framework is installed)")
    bench.add_argument("--strategies", metavar="NAMES",
                       help=f"comma list of registered strategies, or {NULL_EXPERTS} (top-2 with "
                            f"E/2 null experts); default: {','.join(DEFAULT_STRATEGIES)}")
    bench.add_argument("--tokens", type=positive_int_list, default=list(DEFAULT_TOKENS),
                       metavar="T,...", help="comma list of batch sizes (default: "
                                             f"{','.join(map(str, DEFAULT_TOKENS))})")
    bench.add_argument("--experts", type=positive_int, default=8, metavar="E",
                       help="routed experts (>= 2; default: %(default)s)")
    bench.add_argument("--logits", choices=LOGIT_KINDS, default="normal",
                       help="router logit distribution (moe_router.demo.realistic_logits)")
    bench.add_argument("--repeats", type=positive_int, default=7,
                       help="timed rounds (default: %(default)s)")
    bench.add_argument("--warmup", type=non_negative_int, default=2,
                       help="untimed rounds first (default: %(default)s)")
    bench.add_argument("--json", nargs="?", const="bench.json", metavar="PATH",
                       help="also write the results as JSON (PATH default: bench.json)")
    bench.add_argument("--seed", type=non_negative_int, default=0)
    bench.add_argument("--verbose", action="store_true",
                       help="keep the frameworks' own start-up logging")
    bench.set_defaults(handler=_cmd_bench, passthrough=False)
