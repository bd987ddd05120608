"""Flax MoE layer (each dispatch method) vs the dense-equivalent FFN and the torch layer, on CPU.

Run: ``.venv/bin/python benchmarks/bench_jax.py`` (``--tokens 16,4096`` for a subset,
``--repeats N``). Writes ``benchmarks/results/bench_jax.json``.

Sizes: d=512, f=1024, E=8, k=2, SwiGLU, float32, inference. Every implementation gets the same
weights (the torch layer is built from the Flax layer's ``export_weights()``).

Columns (medians, milliseconds, whole layer: router GEMM + routing + dispatch + experts):
- ``dense eq``: one SwiGLU FFN on T*k tokens through one expert (the same FLOPs), jitted.
- one column per dispatch name of ``moe_router.flax.MoE`` (``jax.jit`` of the functional
  apply: the same layer step): ``auto`` and the kernel it resolves to, ``jax:tiles``,
  ``jax:ragged_dot``, ``sorted`` (resolved by the JAX policy), ``gather`` (only while
  T*k <= 64: it copies a weight matrix per slot), ``dense``; ``capacity`` runs a router with
  ``capacity_factor=1.25`` (it drops overflow: not the same output, reported for reference).
  ``--methods`` also takes the old short names ``tiles`` / ``ragged_dot``.
- ``torch``: ``moe_router.torch.MoE`` under ``torch.inference_mode`` (when importable), timed
  in a child process right after the JAX rows of the same T (see :func:`torch_ms`).
- ``eff``: dense eq / auto (target >= 0.6 at T=4096); ``vs torch``: auto / torch (target
  <= 1.2).
Implementations are timed round-robin (load changes on the shared machine hit all alike), median
of ``--repeats`` rounds after a warm-up (compile) round. ``--clock cpu`` measures process CPU
time (robust to a busy machine); for a single-threaded comparison with torch run
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"`` with
``--torch-threads 1``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_router as mr  # noqa: E402
from moe_router.flax import apply, params_from_weights  # noqa: E402
from moe_router.layer.experts import dispatch_info, ffn, resolve_kernel  # noqa: E402
from moe_router.weights import init_weights  # noqa: E402
from moe_router_backends.jax.functional import JAX  # noqa: E402

D, FF, E, K = 512, 1024, 8, 2
METHODS = ("auto", "jax:tiles", "capacity", "jax:ragged_dot", "gather", "dense")
#: names the script took before the kernels were qualified
ALIASES = {"tiles": "jax:tiles", "ragged_dot": "jax:ragged_dot"}


def config(dispatch: str = "auto", capacity_factor: float | None = None) -> mr.MoEConfig:
    router = mr.RouterConfig(num_experts=E, k=K, capacity_factor=capacity_factor)
    return mr.MoEConfig(d_model=D, d_ff=FF, router=router, dispatch=dispatch)


#: ``wall``: elapsed time; ``cpu``: CPU time of the process summed over its threads, which a busy
#: shared machine inflates much less (time spent descheduled is not counted)
CLOCKS = {"wall": "perf_counter", "cpu": "process_time"}


def interleaved_ms(fns: dict[str, Callable[[], object]], repeats: int,
                   clock: str = "wall") -> dict[str, float]:
    """Median time (ms) of each function, round-robin, after one warm-up call each."""
    now = getattr(time, CLOCKS[clock])
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = now()
            fn()
            times[name].append(now() - t0)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def jax_fns(T: int, weights: dict[str, np.ndarray], methods: tuple[str, ...]
            ) -> tuple[dict[str, Callable[[], object]], dict[str, str]]:
    """Timed callables for the dense equivalent and each dispatch method at T tokens."""
    rng = np.random.default_rng(T)
    x = jnp.asarray(rng.standard_normal((T, D)).astype(np.float32))
    x_eq = jnp.asarray(rng.standard_normal((T * K, D)).astype(np.float32))
    params = params_from_weights(config(), weights)
    expert0 = [params[f"experts.{name}"][0] for name in ("w_gate", "w_up", "w_down")]
    dense_eq = jax.jit(lambda x: ffn(JAX, x, *expert0, "swiglu"))
    fns: dict[str, Callable[[], object]] = {"dense eq": lambda: dense_eq(x_eq).block_until_ready()}
    notes = {"auto": resolve_kernel(JAX, "auto", dispatch_info(JAX, config(), x, K), x)}
    for method in methods:
        if method == "gather" and T * K > 64:
            continue
        mc = config(method, 1.25 if method == "capacity" else None)
        fn = jax.jit(lambda p, x, mc=mc: apply(p, x, mc)[0])
        fns[method] = lambda fn=fn: fn(params, x).block_until_ready()
    return fns, notes


_TORCH_CHILD = """
import json, statistics, sys, time
import numpy as np, torch
sys.path.insert(0, {root!r})
import moe_router as mr
from moe_router.torch import MoE
T, repeats, now = {T}, {repeats}, time.{clock}
if {threads}:
    torch.set_num_threads({threads})
router = mr.RouterConfig(num_experts={E}, k={K})
config = mr.MoEConfig(d_model={D}, d_ff={FF}, router=router)
layer = MoE.from_weights(config, dict(np.load({weights!r}))).eval()
x = torch.from_numpy(np.random.default_rng(T).standard_normal((T, {D})).astype(np.float32))
times = []
with torch.inference_mode():
    layer(x)
    for _ in range(repeats):
        t0 = now()
        layer(x)
        times.append(now() - t0)
print(json.dumps(statistics.median(times) * 1e3))
"""


def torch_ms(T: int, weights_path: Path, repeats: int, clock: str = "wall",
             threads: int = 0) -> float | None:
    """Median ms of ``moe_router.torch.MoE`` on the same weights, in a child process.

    Not interleaved with JAX in one process: torch's OpenMP threads and XLA's thread pool then
    compete for the 2 cores and both slow down several-fold (seen here: 3-50x on torch)."""
    code = _TORCH_CHILD.format(root=str(ROOT), T=T, repeats=repeats, E=E, K=K, D=D, FF=FF,
                               weights=str(weights_path), clock=CLOCKS[clock],
                               threads=threads)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=900)
    if done.returncode != 0:
        print(f"torch layer not timed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,256,4096")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch.set_num_threads in the torch child (0: torch's default)")
    parser.add_argument("--no-torch", action="store_true", help="skip the torch layer")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_jax.json"))
    args = parser.parse_args(argv)
    console = Console(width=170)
    weights = init_weights(config(), seed=0)
    weights_path = Path(tempfile.mkdtemp()) / "weights.npz"
    np.savez(weights_path, **weights)
    methods = tuple(ALIASES.get(m, m) for m in args.methods.split(",") if m)
    rows = []
    for T in (int(t) for t in args.tokens.split(",")):
        fns, notes = jax_fns(T, weights, methods)
        repeats = args.repeats if T < 1024 else max(3, args.repeats // 2)
        ms = interleaved_ms(fns, repeats, args.clock)
        del fns  # free the compiled executables and buffers before the torch child runs
        if not args.no_torch:
            torch_time = torch_ms(T, weights_path, repeats, args.clock, args.torch_threads)
            if torch_time is not None:
                ms["torch"] = torch_time
        row = {"tokens": T, "auto_is": notes["auto"], "ms": ms,
               "efficiency": ms["dense eq"] / ms["auto"] if "auto" in ms else None,
               "vs_torch": ms["auto"] / ms["torch"] if "auto" in ms and "torch" in ms else None}
        rows.append(row)
        console.print(f"T={T}: " + ", ".join(f"{k} {v:.2f}" for k, v in ms.items()))
    table = Table(title=f"Flax MoE layer vs dense-equivalent, CPU (d={D}, f={FF}, E={E}, k={K}, "
                        f"SwiGLU, float32), median ms ({args.clock} clock)")
    columns = ["dense eq", *methods, "torch"]
    table.add_column("T", justify="right")
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("eff (auto)", justify="right")
    table.add_column("auto / torch", justify="right")
    for row in rows:
        cells = [f"{row['ms'][c]:.2f}" if c in row["ms"] else "-" for c in columns]
        if "auto" in methods:
            cells[1 + list(methods).index("auto")] += f" ({row['auto_is']})"
        table.add_row(str(row["tokens"]), *cells,
                      f"{row['efficiency']:.2f}" if row["efficiency"] else "-",
                      f"{row['vs_torch']:.2f}" if row["vs_torch"] else "-")
    console.print(table)
    result = {"benchmark": "bench_jax", "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {jax.default_backend()}, "
                         f"{len(jax.devices())} device(s)",
              "jax": jax.__version__, "sizes": {"d": D, "f": FF, "E": E, "k": K},
              "clock": args.clock, "torch_threads": args.torch_threads,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "command": "python " + " ".join(sys.argv), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
