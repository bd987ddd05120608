"""Torch MoE layer vs transformers v5 Mixtral experts (eager, grouped_mm), dense and the floor.

Run: ``.venv/bin/python benchmarks/bench_torch.py`` (add ``--tokens 1,16`` for a subset).

Sizes: d=512, f=1024, E=8, k=2, SwiGLU, inference (``torch.inference_mode``); float32 on CPU.
``--device cuda`` (or ``auto``: CUDA when present) runs the same table on the GPU, in bfloat16
unless ``--dtype`` says otherwise (every call timed up to ``torch.cuda.synchronize()``).
Every implementation gets the same weights (our layer is built with ``MoE.from_hf``).

Columns (medians, milliseconds):
- ``ours``: ``moe_router.torch.MoE`` (routing + dispatch + experts), ``dispatch="auto"``; the
  ``dispatch`` column names the kernel ``auto`` resolved to (``torch:<name>`` or a portable one).
- ``ours gmm`` / ``ours loop`` / ``ours padded``: the same layer with ``dispatch`` forced to
  ``torch:grouped_mm`` / ``torch:loop`` / ``torch:padded``.
- ``hf eager`` / ``hf grouped_mm``: ``MixtralSparseMoeBlock`` with
  ``config._experts_implementation`` set to that name (router included).
- ``hf moe_router``: the same block with ``"moe_router"`` (our sorted grouped dispatch behind
  transformers' experts seam, :mod:`moe_router_backends.torch.hf_experts`); ``mr kernel`` names
  the kernel it picked; ``mr/eager``, ``mr/gmm``: hf eager / hf moe_router and hf grouped_mm /
  hf moe_router (> 1: ours faster).
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
from moe_router.torch import MoE, TorchBackend, register_hf_experts  # noqa: E402
from moe_router_backends.torch.hf_experts import (  # noqa: E402
    choose_experts_kernel,
    experts_weights,
)

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


def synced(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """``fn`` timed to completion: followed by ``torch.cuda.synchronize()`` on a GPU."""
    if device.type != "cuda":
        return fn

    def call() -> object:
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return call


def mr_kernel(block: torch.nn.Module, x_TD: torch.Tensor) -> str:
    """The kernel ``"moe_router"`` picks for the block's routing of ``x_TD``."""
    _, _, ids_TK = block.gate(x_TD)
    counts = torch.bincount(ids_TK.reshape(-1), minlength=E).tolist()
    return choose_experts_kernel(x_TD, experts_weights(block.experts), ids_TK.numel(), counts)


def hf_block(implementation: str, seed: int = 0) -> torch.nn.Module:
    """A Mixtral block with ``config._experts_implementation = implementation`` (CPU,
    float32)."""
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
    like = weights["w_up"]
    x = torch.randn(active, per_expert, D, device=like.device, dtype=like.dtype)
    wg, wu, wd = (weights[n][:active] for n in ("w_gate", "w_up", "w_down"))

    def floor() -> torch.Tensor:
        return torch.bmm(F.silu(torch.bmm(x, wg)) * torch.bmm(x, wu), wd)

    return floor


def dense_fn(weights: dict[str, torch.Tensor], T: int) -> Callable[[], torch.Tensor]:
    like = weights["w_up"]
    x = torch.randn(T * K, D, device=like.device, dtype=like.dtype)
    wg, wu, wd = (weights[n][0] for n in ("w_gate", "w_up", "w_down"))
    return lambda: (F.silu(x @ wg) * (x @ wu)) @ wd


def run(tokens: list[int], repeats: int, out: Path, console: Console,
        clock_name: str = "wall", device: str = "cpu", dtype: str | None = None) -> dict:
    dev = torch.device(device)
    dt = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    tol = dict(atol=1e-5, rtol=1e-4) if dt == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    register_hf_experts()
    eagers = [hf_block("eager", seed).to(dev, dt) for seed in range(COPIES)]
    grouped = [hf_block("grouped_mm", seed).to(dev, dt) for seed in range(COPIES)]
    routers = [hf_block("moe_router", seed).to(dev, dt) for seed in range(COPIES)]
    for g, r, e in zip(grouped, routers, eagers):
        g.load_state_dict(e.state_dict())
        r.load_state_dict(e.state_dict())
    layers = [MoE.from_hf(e).eval() for e in eagers]
    forced = {key: [MoE.from_weights(m.config.replace(dispatch=name), m.export_weights(),
                                     device=dev, dtype=dt).eval() for m in layers]
              for key, name in FORCED.items()}
    weights = [{n: getattr(layer.experts, n).detach().contiguous()
                for n in ("w_gate", "w_up", "w_down")} for layer in layers]
    rows = []
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T)).to(dev, dt)
            torch.testing.assert_close(layers[0](x), eagers[0](x), **tol)
            torch.testing.assert_close(routers[0](x), eagers[0](x), **tol)
            config = layers[0].config
            impl = resolve_kernel(B, config.dispatch, dispatch_info(B, config, x[0], K), x[0])
            impl = impl.removeprefix("torch:")  # the table's names: gather, padded, loop, ...
            reps = repeats if T < 1024 else max(2 * COPIES, repeats // 4)
            fns = {
                "ours_ms": [functools.partial(m, x) for m in layers],
                "ours_grouped_mm_ms": [functools.partial(m, x) for m in forced["grouped_mm"]],
                "ours_loop_ms": [functools.partial(m, x) for m in forced["loop"]],
                "ours_padded_ms": [functools.partial(m, x) for m in forced["padded"]],
                "hf_eager_ms": [functools.partial(m, x) for m in eagers],
                "hf_grouped_mm_ms": [functools.partial(m, x) for m in grouped],
                "hf_moe_router_ms": [functools.partial(m, x) for m in routers],
                "dense_eq_ms": [dense_fn(w, T) for w in weights],
                "floor_ms": [floor_fn(w, T) for w in weights],
                "route_permute_ms": [functools.partial(routing_and_permute, m, x[0])
                                     for m in layers],
                "route_ms": [functools.partial(routing_only, m, x[0]) for m in layers],
            }
            timed = interleaved_ms({name: [synced(fn, dev) for fn in copies]
                                    for name, copies in fns.items()}, reps, CLOCKS[clock_name])
            row = {"T": T, "dispatch": impl, "mr_kernel": mr_kernel(routers[0], x[0]), **timed}
            row["route_permute_share"] = row["route_permute_ms"] / row["ours_ms"]
            row["efficiency_vs_floor"] = row["floor_ms"] / row["ours_ms"]
            row["speedup_vs_hf_eager"] = row["hf_eager_ms"] / row["ours_ms"]
            row["speedup_vs_hf_grouped_mm"] = row["hf_grouped_mm_ms"] / row["ours_ms"]
            row["moe_router_vs_hf_eager"] = row["hf_eager_ms"] / row["hf_moe_router_ms"]
            row["moe_router_vs_hf_grouped_mm"] = row["hf_grouped_mm_ms"] / row["hf_moe_router_ms"]
            rows.append(row)
            console.print(f"T={T} done", style="dim")
    where = (f"{torch.get_num_threads()} threads" if dev.type == "cpu"
             else torch.cuda.get_device_name(dev))
    table = Table(title=f"torch MoE, d={D} f={FF} E={E} k={K} SwiGLU {str(dt)[6:]} "
                        f"{dev.type.upper()} ({where}), median {clock_name} ms")
    columns = [("T", "T", "{}"), ("dispatch", "dispatch", "{}"), ("ours", "ours_ms", "{:.3f}"),
               ("ours gmm", "ours_grouped_mm_ms", "{:.3f}"),
               ("ours loop", "ours_loop_ms", "{:.3f}"),
               ("ours padded", "ours_padded_ms", "{:.3f}"),
               ("hf eager", "hf_eager_ms", "{:.3f}"),
               ("hf grouped_mm", "hf_grouped_mm_ms", "{:.3f}"),
               ("hf moe_router", "hf_moe_router_ms", "{:.3f}"),
               ("mr kernel", "mr_kernel", "{}"),
               ("dense eq", "dense_eq_ms", "{:.3f}"), ("floor", "floor_ms", "{:.3f}"),
               ("route", "route_ms", "{:.3f}"), ("route+perm", "route_permute_ms", "{:.3f}"),
               ("share", "route_permute_share", "{:.0%}"),
               ("eff (>=0.9)", "efficiency_vs_floor", "{:.2f}"),
               ("vs eager", "speedup_vs_hf_eager", "{:.2f}x"),
               ("vs hf gmm", "speedup_vs_hf_grouped_mm", "{:.2f}x"),
               ("mr/eager", "moe_router_vs_hf_eager", "{:.2f}x"),
               ("mr/gmm", "moe_router_vs_hf_grouped_mm", "{:.2f}x")]
    for title, _, _ in columns:
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(*[fmt.format(row[key]) for _, key, fmt in columns])
    console.print(table)
    result = {"benchmark": "bench_torch", "sizes": {"d": D, "f": FF, "E": E, "k": K},
              "dtype": str(dt).removeprefix("torch."), "device": dev.type,
              "device_name": where, "threads": torch.get_num_threads(),
              "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "clock": clock_name, "rows": rows}
    if dev.type == "cpu":
        result["gpu"] = ("not run (no GPU in this session)" if not torch.cuda.is_available()
                         else "not run (pass --device cuda)")
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
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu",
                        help="auto: cuda when available")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default benchmarks/results/bench_torch[_cuda].json)")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.clock == "cpu" and device == "cuda":
        parser.error("--clock cpu measures host CPU time only; use --clock wall on CUDA")
    suffix = "_cuda" if device == "cuda" else ""
    out = args.out or ROOT / f"benchmarks/results/bench_torch{suffix}.json"
    if args.threads:
        torch.set_num_threads(args.threads)
    run([int(t) for t in args.tokens.split(",")], args.repeats, out, Console(width=190),
        args.clock, device, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
