"""``moe-router tune``: time the registered expert kernels for a layer shape per token bucket and
thread count, print the table and write the choices to the tuning cache that ``dispatch="auto"``
reads (:mod:`moe_router.layer.tuning`; ``$MOE_TUNE_CACHE`` overrides the cache path)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path
from typing import Any

from .common import CLIError, positive_int, quiet_frameworks

#: backends whose eager ``auto`` resolution reads the cache (JAX and Keras layers run traced)
BACKENDS = ("torch", "numpy")
DTYPES = ("float32", "bfloat16", "float16", "float64")


def int_list(text: str) -> list[int]:
    """``argparse`` type: a comma list of positive integers."""
    try:
        values = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") \
            from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _config(args: argparse.Namespace) -> Any:
    from moe_router.config import MoEConfig, RouterConfig

    router = RouterConfig(num_experts=args.experts, k=args.k, strategy="top_k")
    return MoEConfig(d_model=args.d_model, d_ff=args.d_ff, router=router,
                     activation=args.activation)


def _check(args: argparse.Namespace) -> None:
    if importlib.util.find_spec(args.backend) is None:
        raise CLIError(f"--backend {args.backend}: {args.backend} is not installed")
    if args.backend != "torch" and args.threads:
        raise CLIError("--threads: only the torch backend sets its threads at run time")
    if args.backend == "numpy" and args.dtype == "bfloat16":
        raise CLIError("--dtype bfloat16: NumPy has no bfloat16")


def _table(results: list[Any], title: str) -> Any:
    from rich.table import Table

    kernels = sorted({name for r in results for name in r.times_ms})
    table = Table(title=title)
    wide = max(len(name) for name in kernels)
    for column in ("threads", "T<=", *kernels, "thresholds", "tuned", "gain"):
        table.add_column(column, justify="right", no_wrap=True,
                         min_width=wide if column in ("thresholds", "tuned") else len(column))
    for r in results:
        best = r.times_ms[r.kernel]
        cells = [f"{r.times_ms[k]:.3f}" if k in r.times_ms else "-" for k in kernels]
        old = r.times_ms.get(r.policy_kernel)
        gain = f"{old / best:.2f}x" if old else "-"
        table.add_row(str(r.key.threads or "default"), str(r.key.tokens), *cells,
                      r.policy_kernel, r.kernel, gain)
    return table


def _cmd_tune(args: argparse.Namespace, rest: list[str]) -> int:
    quiet_frameworks()
    _check(args)
    from rich.console import Console

    from moe_router.layer import tuning

    config = _config(args)
    console = Console(width=max(120, Console().width))
    path = Path(args.cache) if args.cache else tuning.cache_path()

    def progress(result: Any) -> None:
        console.print(f"threads={result.key.threads or 'default'} T<={result.key.tokens}: "
                      f"{result.kernel}", style="dim")

    results = tuning.tune(config, args.tokens, backend=args.backend, dtype=args.dtype,
                          device=args.device, threads=args.threads or [None],
                          repeats=args.repeats, clock=args.clock, write=not args.no_write,
                          path=path, min_time_s=args.min_time, progress=progress)
    title = (f"{args.backend} expert kernels, d={args.d_model} f={args.d_ff} E={args.experts} "
             f"k={args.k} {args.activation} {args.dtype}, {args.clock} ms (lower quartile) "
             f"(gain: thresholds' kernel / tuned)")
    kernels = {name for r in results for name in r.times_ms}
    width = 60 + sum(len(name) + 3 for name in kernels) + 2 * max(map(len, kernels))
    Console(width=max(console.width, width)).print(_table(results, title))
    console.print("not written (--no-write)" if args.no_write else f"wrote {path}")
    if args.json:
        data = [{**r.entry(), "key_text": r.key.text()} for r in results]
        Path(args.json).write_text(json.dumps(data, indent=2))
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("tune", help="time the expert kernels and cache the fastest for 'auto'",
                       description=__doc__)
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--d-model", type=positive_int, default=512)
    p.add_argument("--d-ff", type=positive_int, default=1024)
    p.add_argument("--experts", type=positive_int, default=8)
    p.add_argument("--k", type=positive_int, default=2)
    p.add_argument("--activation", choices=("swiglu", "geglu", "gelu", "relu", "silu"),
                   default="swiglu")
    p.add_argument("--tokens", type=int_list, default=[2 ** i for i in range(13)],
                   help="comma list of T, each rounded up to a power of two (default 1..4096)")
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--device", default=None, help="torch device (default cpu)")
    p.add_argument("--threads", type=int_list, default=None,
                   help="comma list of torch thread counts (default: the current one)")
    p.add_argument("--repeats", type=positive_int, default=15,
                   help="timed rounds per case (a third, at least 5, for T >= 1024)")
    p.add_argument("--min-time", type=float, default=0.25, metavar="SECONDS",
                   help="more rounds (up to 40x --repeats) until each kernel ran this long")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time (steadier on a busy machine, one thread)")
    p.add_argument("--cache", metavar="PATH", default=None,
                   help="cache file (default $MOE_TUNE_CACHE or the user cache directory)")
    p.add_argument("--no-write", action="store_true", help="measure and print only")
    p.add_argument("--json", metavar="PATH", default=None, help="also write the results here")
    p.set_defaults(handler=_cmd_tune, passthrough=False)
