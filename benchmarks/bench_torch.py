"""Torch MoE layer vs transformers v5 Mixtral experts (eager, grouped_mm), dense and the floor.

Run: ``.venv/bin/python benchmarks/bench_torch.py`` (add ``--tokens 1,16`` for a subset).

Sizes: d=512, f=1024, E=8, k=2, SwiGLU, float32, CPU, inference (``torch.inference_mode``).
Every implementation gets the same weights (our layer is built with ``MoE.from_hf``).

Columns (medians, milliseconds):
- ``ours``: ``moe_router.torch.MoE`` (routing + dispatch + experts), ``dispatch="auto"``; the
  ``dispatch`` column names the kernel ``auto`` resolved to (``torch:<name>`` or a portable one).
- ``ours gmm`` / ``ours loop`` / ``ours padded``: the same layer with ``dispatch`` forced to
  ``torch:grouped_mm`` / ``torch:loop`` / ``torch:padded``.
- ``hf eager`` / ``hf grouped_mm``: ``MixtralSparseMoeBlock`` with
  ``config._experts_implementation`` set to that name (router included).
- ``dense eq``: one SwiGLU FFN on T*k tokens (same FLOPs as the routed experts).
- ``floor``: a batched matmul streaming each active expert's weights once, tokens split evenly
  over the min(E, T*k) active experts (the memory-bound floor at small T, FLOP-bound at large T).
- ``route``: our router GEMM and top-k alone (the layer's inference fast path).
- ``route+perm``: our routing (router GEMM, top-k) and the core's permutation (sort, gather,
  un-permute, combine) alone; ``share`` is its fraction of ``ours``.
Implementations are timed round-robin over 4 weight copies each (weights come from memory, code
stays warm; see :func:`interleaved_ms`), median of ``--repeats`` rounds (a quarter of them, at
least 8, for T >= 1024).
- ``eff``: floor / ours (target >= 0.9); ``vs eager``: hf eager / ours.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_router.layer.experts import dispatch_info, permute, resolve_kernel, unpermute  # noqa: E402,E501
from moe_router.torch import MoE, TorchBackend  # noqa: E402

D, FF, E, K = 512, 1024, 8, 2
B = TorchBackend()
#: forced kernels: row key -> dispatch name
FORCED = {"grouped_mm": "torch:grouped_mm", "loop": "torch:loop", "padded": "torch:padded"}
#: ``wall``: elapsed time; ``cpu``: CPU time of the process (all threads), which a busy shared
#: machine inflates much less (time spent preempted is not counted)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
#: instances (own weights, 48 MiB each) per implementation, called in turn: > the 32 MiB L3
COPIES = 4


def interleaved_ms(fns: dict[str, list[Callable[[], object]]], repeats: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median time (ms) of each implementation, measured round-robin after a warm-up round (load
    changes on a shared machine hit every implementation alike). Each implementation has
    ``COPIES`` instances with their own weights, called in turn, so that weights come from
    memory (as in a model whose other layers ran in between) while code stays warm."""
    for copies in fns.values():
        for fn in copies:
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(repeats):
        for name, copies in fns.items():
            fn = copies[r % len(copies)]
            t0 = clock()
            fn()
            times[name].append(clock() - t0)
    return {name: statistics.median(values) * 1e3 for name, values in times.items()}


def hf_block(implementation: str, seed: int = 0) -> torch.nn.Module:
    """A Mixtral block with ``config._experts_implementation = implementation``."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(hidden_size=D, intermediate_size=FF, num_local_experts=E,
                           num_experts_per_tok=K)
    config._experts_implementation = implementation
    torch.manual_seed(seed)
    block = MixtralSparseMoeBlock(config).eval()
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return block


def routing_only(layer: MoE, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our router GEMM and top-k selection (the layer's inference fast path)."""
    logits_TE = layer.router(x_TD, layer.config)
    fast = B.layer_stages().fast_select(logits_TE, layer.config.router, {})
    assert fast is not None
    return fast


def routing_and_permute(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Our layer's work minus the expert GEMMs: router, top-k, and the core's permutation (sort,
    gather) and un-permutation (gather back, combine)."""
    ids_TK, gates_TK = routing_only(layer, x_TD)
    rows_SD, perm = permute(B, x_TD, ids_TK, E)
    return unpermute(B, rows_SD, perm, gates_TK)


def floor_fn(weights: dict[str, torch.Tensor], T: int) -> Callable[[], torch.Tensor]:
    active = min(E, T * K)
    per_expert = math.ceil(T * K / active)
    x = torch.randn(active, per_expert, D)
    wg, wu, wd = (weights[n][:active] for n in ("w_gate", "w_up", "w_down"))

    def floor() -> torch.Tensor:
        return torch.bmm(F.silu(torch.bmm(x, wg)) * torch.bmm(x, wu), wd)

    return floor


def dense_fn(weights: dict[str, torch.Tensor], T: int) -> Callable[[], torch.Tensor]:
    x = torch.randn(T * K, D)
    wg, wu, wd = (weights[n][0] for n in ("w_gate", "w_up", "w_down"))
    return lambda: (F.silu(x @ wg) * (x @ wu)) @ wd


def run(tokens: list[int], repeats: int, out: Path, console: Console,
        clock_name: str = "wall") -> dict:
    eagers = [hf_block("eager", seed) for seed in range(COPIES)]
    grouped = [hf_block("grouped_mm", seed) for seed in range(COPIES)]
    for g, e in zip(grouped, eagers):
        g.load_state_dict(e.state_dict())
    layers = [MoE.from_hf(e).eval() for e in eagers]
    forced = {key: [MoE.from_weights(m.config.replace(dispatch=name), m.export_weights()).eval()
                    for m in layers] for key, name in FORCED.items()}
    weights = [{n: getattr(layer.experts, n).detach().contiguous()
                for n in ("w_gate", "w_up", "w_down")} for layer in layers]
    rows = []
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T))
            torch.testing.assert_close(layers[0](x), eagers[0](x), atol=1e-5, rtol=1e-4)
            config = layers[0].config
            impl = resolve_kernel(B, config.dispatch, dispatch_info(B, config, x[0], K), x[0])
            impl = impl.removeprefix("torch:")  # the table's names: gather, padded, loop, ...
            reps = repeats if T < 1024 else max(2 * COPIES, repeats // 4)
            timed = interleaved_ms({
                "ours_ms": [functools.partial(m, x) for m in layers],
                "ours_grouped_mm_ms": [functools.partial(m, x) for m in forced["grouped_mm"]],
                "ours_loop_ms": [functools.partial(m, x) for m in forced["loop"]],
                "ours_padded_ms": [functools.partial(m, x) for m in forced["padded"]],
                "hf_eager_ms": [functools.partial(m, x) for m in eagers],
                "hf_grouped_mm_ms": [functools.partial(m, x) for m in grouped],
                "dense_eq_ms": [dense_fn(w, T) for w in weights],
                "floor_ms": [floor_fn(w, T) for w in weights],
                "route_permute_ms": [functools.partial(routing_and_permute, m, x[0])
                                     for m in layers],
                "route_ms": [functools.partial(routing_only, m, x[0]) for m in layers],
            }, reps, CLOCKS[clock_name])
            row = {"T": T, "dispatch": impl, **timed}
            row["route_permute_share"] = row["route_permute_ms"] / row["ours_ms"]
            row["efficiency_vs_floor"] = row["floor_ms"] / row["ours_ms"]
            row["speedup_vs_hf_eager"] = row["hf_eager_ms"] / row["ours_ms"]
            row["speedup_vs_hf_grouped_mm"] = row["hf_grouped_mm_ms"] / row["ours_ms"]
            rows.append(row)
            console.print(f"T={T} done", style="dim")
    table = Table(title=f"torch MoE, d={D} f={FF} E={E} k={K} SwiGLU float32 CPU "
                        f"({torch.get_num_threads()} threads), median {clock_name} ms")
    columns = [("T", "T", "{}"), ("dispatch", "dispatch", "{}"), ("ours", "ours_ms", "{:.3f}"),
               ("ours gmm", "ours_grouped_mm_ms", "{:.3f}"),
               ("ours loop", "ours_loop_ms", "{:.3f}"),
               ("ours padded", "ours_padded_ms", "{:.3f}"),
               ("hf eager", "hf_eager_ms", "{:.3f}"),
               ("hf grouped_mm", "hf_grouped_mm_ms", "{:.3f}"),
               ("dense eq", "dense_eq_ms", "{:.3f}"), ("floor", "floor_ms", "{:.3f}"),
               ("route", "route_ms", "{:.3f}"), ("route+perm", "route_permute_ms", "{:.3f}"),
               ("share", "route_permute_share", "{:.0%}"),
               ("eff (>=0.9)", "efficiency_vs_floor", "{:.2f}"),
               ("vs eager", "speedup_vs_hf_eager", "{:.2f}x"),
               ("vs hf gmm", "speedup_vs_hf_grouped_mm", "{:.2f}x")]
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*[fmt.format(row[key]) for _, key, fmt in columns])
    console.print(table)
    result = {"benchmark": "bench_torch", "sizes": {"d": D, "f": FF, "E": E, "k": K},
              "dtype": "float32", "device": "cpu", "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "clock": clock_name, "rows": rows,
              "gpu": "not run (no GPU in this session)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="1,16,256,4096", help="comma list of T")
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/bench_torch.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    run([int(t) for t in args.tokens.split(",")], args.repeats, args.out, Console(width=150),
        args.clock)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
