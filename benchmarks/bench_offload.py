"""Decode tokens/s with offloaded experts: several budgets, with and without router prefetch,
against on-demand loading (one slot per layer, no prefetch) and against every expert in memory.
Also replays the live routing through the offline simulator (same hits, checked) and through
synthetic Zipf + Markov traces (LRU vs LRU + next-router prefetch at c = N/2).

Run: ``.venv/bin/python benchmarks/bench_offload.py`` (``--layers 6 --experts 16 --d-model 256
--d-ff 768 --steps 48``). Writes ``benchmarks/results/bench_offload.json``.

The model: ``--layers`` residual moe-router MoE blocks (``x + moe(x)``, top-2, SwiGLU, float32,
``dispatch="torch:loop"``), the routers of consecutive layers made similar (a shared component,
as consecutive decoder layers' routers see similar residual streams), decode inputs following a
Markov chain (consecutive tokens alike). CPU: the fast tier is resident memory, the slow tier the
safetensors file on disk. Before each run the file's pages are dropped from the OS page cache with
``posix_fadvise(POSIX_FADV_DONTNEED)`` where available (advisory, no root needed); with
``--drop-all-caches`` (root only) the whole page cache is dropped through
``/proc/sys/vm/drop_caches`` instead. The ``page cache`` column says which was done.
GPU (when present): host tier pinned in
host memory, fast tier on the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moe_router as mr  # noqa: E402
import moe_router.offload as mo  # noqa: E402
from moe_router.torch import MoE  # noqa: E402


class Residual(torch.nn.Module):
    def __init__(self, layers: list[MoE]) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def build(args: argparse.Namespace) -> Residual:
    mc = mr.MoEConfig(d_model=args.d_model, d_ff=args.d_ff,
                      router=mr.RouterConfig(num_experts=args.experts, k=2),
                      activation="swiglu", dispatch="torch:loop", init_std=0.02)
    layers = [MoE(mc, seed=i).eval() for i in range(args.layers)]
    g = torch.Generator().manual_seed(123)
    common = torch.randn(layers[0].router.weight.shape, generator=g)
    with torch.no_grad():
        for layer in layers:
            layer.router.weight.mul_(0.5).add_(common)
    return Residual(layers)


def inputs(args: argparse.Namespace) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x, out = torch.randn(1, args.d_model, generator=g), []
    for _ in range(args.steps):
        x = 0.5 * x + 0.87 * torch.randn(1, args.d_model, generator=g)
        out.append(x.clone())
    return out


def drop_cache(path: Path, everything: bool) -> str:
    """Drop the file's pages from the page cache (``posix_fadvise``), or with ``everything``
    the whole page cache (``/proc/sys/vm/drop_caches``, root only); says what was done."""
    if everything and os.access("/proc/sys/vm/drop_caches", os.W_OK):
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return "drop_caches"
    if hasattr(os, "posix_fadvise"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"
    return "none"


def decode(model: torch.nn.Module, xs: list[torch.Tensor], device: str) -> float:
    """Seconds for the decode loop (one token per step)."""
    start = time.perf_counter()
    with torch.inference_mode():
        for x in xs:
            model(x.to(device))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run(args: argparse.Namespace, device: str, console: Console) -> list[dict]:
    base, xs = build(args), inputs(args)
    E, rows = args.experts, []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "experts.safetensors"
        mo.save_experts(base, path)
        ref_model = copy.deepcopy(base).to(device)
        decode(ref_model, xs[:2], device)
        seconds = decode(ref_model, xs, device)
        with torch.inference_mode():
            ref = [ref_model(x.to(device)) for x in xs[:4]]
        rows.append({"mode": "all in memory", "slots": E, "tokens_per_s": len(xs) / seconds})
        cases = [("on demand (1 slot, no prefetch)", 1, False)]
        for c in sorted({max(1, E // 4), E // 2, (3 * E) // 4}):
            cases += [(f"c={c} lru", c, False), (f"c={c} lru+prefetch", c, True)]
        for name, c, prefetch in cases:
            model = copy.deepcopy(base)
            dropped = drop_cache(path, args.drop_all_caches)
            store = mo.offload_model(model, experts_per_layer=c, prefetch=prefetch,
                                     compute="move", checkpoint=path, host_tier=device == "cuda",
                                     device=device)
            with torch.inference_mode():
                same = all(torch.equal(model(x.to(device)), r) for x, r in zip(xs[:4], ref))
            before = store.metrics()["total"]
            seconds = decode(model, xs, device)
            after = store.metrics()["total"]
            store.close()
            m = {key: after[key] - before[key] for key in
                 ("hits", "misses", "predicted", "predicted_used", "used_predicted",
                  "bytes_moved", "bytes_wasted", "stall_s")}
            m["hit_rate"] = m["hits"] / max(1, m["hits"] + m["misses"])
            m["recall"] = m["predicted_used"] / m["used_predicted"] if prefetch else None
            m["precision"] = m["predicted_used"] / m["predicted"] if prefetch else None
            rows.append({"mode": name, "slots": c, "tokens_per_s": len(xs) / seconds,
                         "hit_rate": m["hit_rate"], "recall": m["recall"],
                         "precision": m["precision"], "stall_share": m["stall_s"] / seconds,
                         "moved_MB": m["bytes_moved"] / 2**20,
                         "wasted_MB": m["bytes_wasted"] / 2**20, "page_cache": dropped,
                         "bit_identical": same})
    table = Table(title=f"decode, {device}: L={args.layers} E={E} D={args.d_model} "
                        f"F={args.d_ff}, {args.steps} tokens")
    for col in ("mode", "tok/s", "vs on-demand", "hit", "recall", "prec", "stall/step",
                "moved MB", "page cache", "exact"):
        table.add_column(col)
    demand = next(r for r in rows if r["mode"].startswith("on demand"))["tokens_per_s"]
    fmt = (lambda v: "-" if v is None else f"{v:.2f}")  # noqa: E731
    for r in rows:
        table.add_row(r["mode"], f"{r['tokens_per_s']:.1f}", f"{r['tokens_per_s'] / demand:.2f}x",
                      fmt(r.get("hit_rate")), fmt(r.get("recall")), fmt(r.get("precision")),
                      fmt(r.get("stall_share")), fmt(r.get("moved_MB")),
                      r.get("page_cache", "-"), str(r.get("bit_identical", "-")))
    console.print(table)
    return rows


def synthetic(console: Console) -> list[dict]:
    rows = []
    for N in (8, 64, 256):
        trace = mo.zipf_markov_trace(N, num_layers=8, steps=600, k=2 if N < 256 else 8, seed=0)
        plain = mo.simulate(trace, slots=N // 2)
        ahead = mo.simulate(trace, slots=N // 2, prefetch=True)
        rows.append({"N": N, "lru": plain.hit_rate, "lru_prefetch": ahead.hit_rate,
                     "recall": ahead.recall, "precision": ahead.precision,
                     "per_layer_lru": plain.hit_rates, "per_layer_prefetch": ahead.hit_rates})
    table = Table(title="synthetic Zipf+Markov traces, c = N/2 (8 layers, 600 steps)")
    for col in ("N", "LRU", "LRU+prefetch", "gain", "recall", "precision", "per layer (prefetch)"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["N"]), f"{r['lru']:.3f}", f"{r['lru_prefetch']:.3f}",
                      f"{100 * (r['lru_prefetch'] - r['lru']):+.1f} pt", f"{r['recall']:.3f}",
                      f"{r['precision']:.3f}",
                      " ".join(f"{h:.2f}" for h in r["per_layer_prefetch"]))
    console.print(table)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=768)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--drop-all-caches", action="store_true",
                        help="drop the whole OS page cache before each run (root only; it slows "
                             "every other process on the machine)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_offload.json"))
    args = parser.parse_args()
    console = Console(width=170)
    result = {"machine": platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "args": vars(args),
              "cpu": run(args, "cpu", console), "synthetic": synthetic(console)}
    if torch.cuda.is_available():
        result["gpu"] = run(args, "cuda", console)
    else:
        console.print("no GPU: the host -> device section did not run")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
