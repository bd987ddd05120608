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

``--check-auto``: instead of the table above, ``auto`` against every registered kernel that can
run the case (``torch:*`` and the portable ones; those whose temporaries would be huge are left
out, as ``moe-router tune`` does), each as the layer step of the same 8 layers (the same weight
memory; in one repeat no two implementations use the same layer, so none finds another's weights
in cache) with its expert compute pinned to that kernel (no resolution), interleaved in a random
order,
``--rounds`` independent rounds of at least ``--repeats`` calls each (more, until each kernel
ran 0.5 s); per T the median over rounds of ``auto`` / the fastest kernel (medians), PASS when
<= 1.05; ``q1 ratio`` is the same ratio of lower quartiles (less sensitive to stalls caused by
other processes). Kernels slower than 2x the best after the first timed call are dropped (never
``auto`` nor the kernel it resolves to). ``auto`` reads the tuning cache
(``$MOE_TUNE_CACHE``); ``via`` says whether the cache had an entry for the case (and what the
thresholds would pick) or ``auto`` kept the thresholds.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_router.layer import tuning  # noqa: E402
from moe_router.layer.experts import (  # noqa: E402
    dispatch_info,
    expert_weights,
    permute,
    policy_kernel,
    resolve_kernel,
    run_kernel,
    unpermute,
)
from moe_router.layer.step import layer_step  # noqa: E402
from moe_router.registry import default_registry  # noqa: E402
from moe_router.torch import MoE, TorchBackend, register_hf_experts  # noqa: E402
from moe_router_backends.torch.hf_experts import (  # noqa: E402
    choose_experts_kernel,
    experts_weights,
)
from moe_router_backends.torch.stages import TorchStages  # noqa: E402

D, FF, E, K = 512, 1024, 8, 2
B = TorchBackend()
#: forced kernels: row key -> dispatch name
FORCED = {"grouped_mm": "torch:grouped_mm", "loop": "torch:loop", "padded": "torch:padded"}
#: ``wall``: elapsed time; ``cpu``: CPU time of the process (all threads), which a busy shared
#: machine inflates much less (time spent preempted is not counted)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
#: instances (own weights, 48 MiB each) per implementation, called in turn: > the 32 MiB L3
COPIES = 4
#: ``--check-auto``: layers shared by every implementation, each using another one per call
CHECK_COPIES = 8


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


def _round_ms(fns: dict[str, list[Callable[[], object]]], repeats: int,
              clock: Callable[[], float], keep: tuple[str, ...] = ("auto",),
              min_time_s: float = 0.5, prune: float = 2.0,
              seed: int = 0) -> dict[str, list[float]]:
    """One round of :func:`interleaved_ms` (a random order each repeat, every copy warmed
    up first): at least ``repeats`` calls each, more (up to 40x) until each ran ``min_time_s``;
    after the first timed call, implementations slower than ``prune`` times the best are
    dropped, except those in ``keep``. Returns the samples (ms) of those left."""
    for copies in fns.values():
        for fn in copies:
            fn()
    rng = random.Random(seed)
    live = list(fns)
    shift = {name: j for j, name in enumerate(fns)}
    times: dict[str, list[float]] = {name: [] for name in fns}
    r = 0
    while r < repeats or (r < 40 * repeats and min(sum(times[n]) for n in live) < min_time_s):
        for name in rng.sample(live, len(live)):  # a random order every repeat
            copies = fns[name]  # shifted copies: no two implementations of a repeat share one
            t0 = clock()
            copies[(r + shift[name]) % len(copies)]()
            times[name].append(clock() - t0)
        if r == 0:
            best = min(v[0] for v in times.values())
            live = [n for n in live if n in keep or times[n][0] <= prune * best]
        r += 1
    return {name: [t * 1e3 for t in v] for name, v in times.items() if name in live}


class ForcedStages(TorchStages):
    """Torch's stages with the expert compute pinned to kernel ``name`` (no resolution, so a
    portable name runs the portable kernel, not what torch's policy maps it to)."""

    def __init__(self, name: str) -> None:
        super().__init__(B)
        self.name = name

    def experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                params: Any, config: Any, dispatch: str | None) -> torch.Tensor:
        info = dispatch_info(B, config, x_TD, ids_TK.shape[1])
        return run_kernel(B, self.name, x_TD, ids_TK, gates_TK,
                          expert_weights(B, params, x_TD), config.activation, info)


def forced_step(layer: MoE, params: dict[str, torch.Tensor], x: torch.Tensor,
                stages: TorchStages) -> torch.Tensor:
    """``layer(x)`` as the layer step with ``stages`` (``ForcedStages`` pins the kernel; torch's
    own stages resolve the config's ``auto`` as usual)."""
    return layer_step(B, params, layer.layer_state(), x, layer.config, need_plan=False,
                      stages=stages).y


def check_auto(tokens: list[int], repeats: int, rounds: int, out: Path, console: Console,
               clock_name: str = "wall", device: str = "cpu", dtype: str | None = None) -> dict:
    """``auto`` vs the fastest registered kernel per T (see the module docstring)."""
    dev = torch.device(device)
    dt = getattr(torch, dtype or ("bfloat16" if dev.type == "cuda" else "float32"))
    registry = default_registry()
    base = [MoE.from_hf(hf_block("eager", seed)).eval() for seed in range(CHECK_COPIES)]
    config = base[0].config.replace(dispatch="auto")
    layers = [MoE.from_weights(config, m.export_weights(), device=dev, dtype=dt).eval()
              for m in base]
    params = [dict(m.named_parameters()) for m in layers]
    rows = []
    with torch.inference_mode():
        for T in tokens:
            x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(T)).to(dev, dt)
            info = dispatch_info(B, config, x[0], K)
            chosen = resolve_kernel(B, "auto", info, x[0])
            thresholds = policy_kernel(B, "auto", info, x[0])
            key = tuning.tune_key(B, config, K, T, x[0], registry).text()
            cached = tuning.state(registry).entries(tuning.cache_path()).get(key)
            via = ("thresholds (no cache entry)" if cached is None else
                   "cache" + (" (= thresholds)" if chosen == thresholds
                              else f" (thresholds: {thresholds})"))
            names = tuning.candidates(B, info, FF, x.element_size(), registry)
            # every implementation runs on the same layers (so the same weight memory), as the
            # layer step with its expert compute pinned (auto: resolved as usual)
            reference = layers[0](x)
            fns: dict[str, list[Callable[[], object]]] = {}
            for name in ["auto", *names]:
                stages = B.layer_stages() if name == "auto" else ForcedStages(name)
                fns[name] = [synced(functools.partial(forced_step, m, p, x, stages), dev)
                             for m, p in zip(layers, params)]
                torch.testing.assert_close(fns[name][0](), reference, atol=1e-4, rtol=1e-3)
            reps = repeats if T < 1024 else max(2 * COPIES, repeats // 4)
            per_round = []
            for i in range(rounds):  # a kernel dropped in one round stays out of the next
                per_round.append(_round_ms(fns, reps, CLOCKS[clock_name],
                                           keep=("auto", chosen), seed=i))
                fns = {name: fns[name] for name in per_round[-1]}
            ratios, q1_ratios = [], []
            for samples in per_round:  # per round: auto / that round's fastest kernel
                med = {n: statistics.median(v) for n, v in samples.items()}
                low = {n: tuning.low_quartile(v) for n, v in samples.items()}
                ratios.append(med["auto"] / min(v for n, v in med.items() if n != "auto"))
                q1_ratios.append(low["auto"] / min(v for n, v in low.items() if n != "auto"))
            medians = {name: statistics.median(statistics.median(t[name])
                                               for t in per_round if name in t)
                       for name in ["auto", *names] if any(name in t for t in per_round)}
            best_name = min((n for n in medians if n != "auto"), key=medians.get)
            ratio, q1_ratio = statistics.median(ratios), statistics.median(q1_ratios)
            rows.append({"T": T, "auto_kernel": chosen,
                         "via": via,
                         "threshold_kernel": thresholds, "auto_ms": medians["auto"],
                         "best_kernel": best_name, "best_ms": medians[best_name],
                         "auto_vs_best": ratio, "round_ratios": ratios,
                         "auto_vs_best_q1": q1_ratio, "round_ratios_q1": q1_ratios,
                         "pass": ratio <= 1.05, "kernels_ms": medians})
            console.print(f"T={T} done: auto={chosen} {ratio:.3f} of {best_name}", style="dim")
    where = (f"{torch.get_num_threads()} threads" if dev.type == "cpu"
             else torch.cuda.get_device_name(dev))
    table = Table(title=f"auto vs the fastest registered kernel, d={D} f={FF} E={E} k={K} "
                        f"{str(dt)[6:]} {dev.type.upper()} ({where}), median {clock_name} ms, "
                        f"{rounds} rounds")
    kernels = sorted({n for row in rows for n in row["kernels_ms"] if n != "auto"})
    for title in ("T", "auto", "via", "auto ms", "best", "best ms", "auto/best", "ok",
                  "q1 ratio", *kernels):
        table.add_column(title, justify="right")
    for row in rows:
        table.add_row(str(row["T"]), row["auto_kernel"], row["via"], f"{row['auto_ms']:.3f}",
                      row["best_kernel"], f"{row['best_ms']:.3f}", f"{row['auto_vs_best']:.3f}",
                      "PASS" if row["pass"] else "FAIL", f"{row['auto_vs_best_q1']:.3f}",
                      *(f"{row['kernels_ms'][k]:.3f}" if k in row["kernels_ms"] else "-"
                        for k in kernels))
    console.print(table)
    result = {"benchmark": "bench_torch --check-auto", "sizes": {"d": D, "f": FF, "E": E, "k": K},
              "dtype": str(dt).removeprefix("torch."), "device": dev.type, "device_name": where,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "tune_cache": str(tuning.cache_path()), "clock": clock_name, "rounds": rounds,
              "repeats": repeats, "rows": rows}
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
    parser.add_argument("--check-auto", action="store_true",
                        help="auto vs the fastest registered kernel per T (see above)")
    parser.add_argument("--rounds", type=int, default=3, help="--check-auto: rounds")
    args = parser.parse_args(argv)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device available")
    if args.clock == "cpu" and device == "cuda":
        parser.error("--clock cpu measures host CPU time only; use --clock wall on CUDA")
    suffix = "_cuda" if device == "cuda" else ""
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.check_auto:
        out = args.out or ROOT / (f"benchmarks/results/bench_torch_check_auto{suffix}"
                                  f"_t{torch.get_num_threads()}.json")
        check_auto([int(t) for t in args.tokens.split(",")], args.repeats, args.rounds, out,
                   Console(width=190), args.clock, device, args.dtype)
        return 0
    out = args.out or ROOT / f"benchmarks/results/bench_torch{suffix}.json"
    run([int(t) for t in args.tokens.split(",")], args.repeats, out, Console(width=190),
        args.clock, device, args.dtype)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
