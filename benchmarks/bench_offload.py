"""Decode tokens/s with offloaded experts: several budgets, with and without router prefetch,
against on-demand loading (one slot per layer, no prefetch) and against every expert in memory.
Also replays the live routing through the offline simulator (same hits, checked) and through
synthetic Zipf + Markov traces (LRU vs LRU + next-router prefetch at c = N/2).

Run: ``.venv/bin/python benchmarks/bench_offload.py`` (``--layers 6 --experts 16 --d-model 256
--d-ff 768 --steps 48``). Writes ``benchmarks/results/bench_offload.json``.

``--trained`` runs the trained-model section instead: a tiny byte-level MoE language model
trained here on Python's standard library sources, its routing recorded on held-out files one
token per step with ``moe_router.offload.record_trace``, and LRU against LRU + next-router
prefetch at c = N/2, per layer. Writes ``benchmarks/results/bench_offload_trained.json``.

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
import math
import os
import platform
import sys
import sysconfig
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
from moe_router.torch import MoE, total_aux_loss  # noqa: E402


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


# ----- a trained model's routing ------------------------------------------------------------------
def stdlib_bytes(held_out: bool, limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of the standard library's top-level ``.py`` files (sorted by name):
    every 10th file is held out, the others are for training."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    chosen = [f for i, f in enumerate(files) if (i % 10 == 0) == held_out]
    data = b"".join(f.read_bytes() for f in chosen)[:limit]
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class Block(torch.nn.Module):
    """Pre-norm decoder block: causal self-attention, then a moe-router MoE FFN."""

    def __init__(self, d: int, heads: int, config: mr.MoEConfig, seed: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        self.moe = MoE(config, seed=seed)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False, is_causal=True)[0]
        return x + self.moe(self.ln2(x))


class TinyLM(torch.nn.Module):
    """A byte-level MoE language model: embeddings, ``layers`` blocks, a tied-free head."""

    def __init__(self, layers: int, d: int, experts: int, k: int, d_ff: int, ctx: int,
                 heads: int = 4) -> None:
        super().__init__()
        config = mr.MoEConfig(d_model=d, d_ff=d_ff, activation="swiglu", init_std=0.02,
                              router=mr.RouterConfig(num_experts=experts, k=k))
        self.embed, self.pos = torch.nn.Embedding(256, d), torch.nn.Embedding(ctx, d)
        self.blocks = torch.nn.ModuleList(Block(d, heads, config, i) for i in range(layers))
        self.ln, self.head = torch.nn.LayerNorm(d), torch.nn.Linear(d, 256)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[-1]
        mask = torch.ones(T, T, dtype=torch.bool, device=ids.device).triu(1)
        x = self.embed(ids) + self.pos(torch.arange(T, device=ids.device))
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def train_lm(args: argparse.Namespace, log: bool = True) -> tuple[TinyLM, dict]:
    """Train :class:`TinyLM` for ``args.train_steps`` AdamW steps of ``args.batch`` random
    windows of ``args.ctx`` bytes; returns the model (eval mode) and the training record."""
    torch.manual_seed(args.seed)
    data = stdlib_bytes(False, args.train_bytes)
    model = TinyLM(args.lm_layers, args.lm_d, args.lm_experts, args.lm_k, args.lm_d_ff, args.ctx)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    start, losses = time.perf_counter(), []
    for step in range(args.train_steps):
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step
                                                                     / args.train_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        at = torch.randint(0, len(data) - args.ctx - 1, (args.batch,), generator=g)
        window = torch.stack([data[i:i + args.ctx + 1] for i in at.tolist()])
        logits = model(window[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256),
                                                 window[:, 1:].reshape(-1))
        (loss + total_aux_loss(model)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == args.train_steps - 1):
            print(f"  step {step:4d}  loss {loss.item():.3f} nats/byte  "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
    model.eval()
    held = stdlib_bytes(True, args.eval_windows * args.ctx + 1)
    with torch.no_grad():
        ids = held[:args.eval_windows * args.ctx].view(args.eval_windows, args.ctx)
        nxt = held[1:args.eval_windows * args.ctx + 1].view(args.eval_windows, args.ctx)
        held_loss = torch.nn.functional.cross_entropy(model(ids).reshape(-1, 256),
                                                      nxt.reshape(-1)).item()
    return model, {"train_s": time.perf_counter() - start, "train_bytes": len(data),
                   "first_train_loss": losses[0],
                   "final_train_loss": sum(losses[-20:]) / len(losses[-20:]),
                   "held_out_loss": held_loss}


def trained_trace(model: TinyLM, args: argparse.Namespace) -> mo.RoutingTrace:
    """A decode-like trace: held-out windows of ``args.ctx`` bytes, one after the other, each
    token one step (a causal model routes token t as incremental decoding would), predicting
    ``2 k`` experts per token (best first, so the first ``k`` are the top-``k`` guess)."""
    held = stdlib_bytes(True, args.eval_windows * args.ctx)
    windows = [held[i:i + args.ctx][None] for i in range(0, len(held), args.ctx)]
    return mo.record_trace(model, windows, per_token=True, predict_k=2 * args.lm_k)


def replay(trace: mo.RoutingTrace, slots: int, predict: int | None) -> dict:
    """LRU (``predict=None``) or LRU + the first ``predict`` predicted experts per step."""
    if predict is not None:
        assert trace.predicted is not None
        trace = mo.RoutingTrace(trace.experts, trace.num_experts, trace.predicted[..., :predict])
    r = mo.simulate(trace, slots=slots, prefetch=predict is not None)
    visits = trace.steps * trace.num_layers
    return {"hit_rate": r.hit_rate, "recall": r.recall, "precision": r.precision,
            "per_layer_hit_rate": list(r.hit_rates),
            "per_layer_recall": [m["recall"] for m in r.layers],
            "per_layer_precision": [m["precision"] for m in r.layers],
            "moved_experts_per_visit": r.total["bytes_moved"] / visits,
            "wasted_experts_per_visit": r.total["bytes_wasted"] / visits}


def trained(args: argparse.Namespace, console: Console) -> dict:
    console.print(f"training a byte-level MoE LM: {args.lm_layers} layers, d={args.lm_d}, "
                  f"E={args.lm_experts}, top-{args.lm_k}, {args.train_steps} steps x "
                  f"{args.batch} x {args.ctx} bytes")
    model, record = train_lm(args)
    start = time.perf_counter()
    trace = trained_trace(model, args)
    record["record_s"] = time.perf_counter() - start
    N, k = args.lm_experts, args.lm_k
    c = N // 2
    rows = {"lru": replay(trace, c, None)}
    for p in (k, 2 * k):
        rows[f"lru+prefetch k={p}"] = replay(trace, c, p)
    table = Table(title=f"trained byte LM, decode trace of {trace.steps} held-out tokens: "
                        f"c = N/2 = {c} of {N} experts, top-{k}")
    for col in ("replay (prefetch_k)", "hit rate", "recall", "precision", "moved/wasted",
                *(f"L{i} hit/recall" for i in range(trace.num_layers))):
        table.add_column(col)
    fmt = (lambda v: "-" if v is None else f"{v:.3f}")  # noqa: E731
    for name, r in rows.items():
        table.add_row(name, fmt(r["hit_rate"]), fmt(r["recall"]), fmt(r["precision"]),
                      f"{r['moved_experts_per_visit']:.2f} / {r['wasted_experts_per_visit']:.2f}",
                      *(f"{fmt(h)} / {fmt(q)}" for h, q in zip(r["per_layer_hit_rate"],
                                                               r["per_layer_recall"])))
    console.print(table)
    console.print("moved/wasted: experts moved / wasted per layer visit")
    console.print(f"held-out loss {record['held_out_loss']:.3f} nats/byte "
                  f"(train {record['final_train_loss']:.3f}), trained in "
                  f"{record['train_s']:.0f} s; target: LRU + prefetch >= LRU + 15 points, "
                  "recall >= 0.80")
    acceptance = {}
    for name, r in rows.items():
        if r["recall"] is None:
            continue
        gain = r["hit_rate"] - rows["lru"]["hit_rate"]
        ok = gain >= 0.15 and r["recall"] >= 0.80
        acceptance[name] = {"gain_points": 100 * gain, "recall": r["recall"], "met": ok}
        console.print(f"  {name}: {100 * gain:+.1f} points, recall {r['recall']:.3f}: "
                      f"{'MET' if ok else 'NOT MET'}")
    return {**record, "trace_steps": trace.steps, "slots": c, "replays": rows,
            "acceptance": acceptance}

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
    parser.add_argument("--out", default=None, help="the JSON file (default "
                        "benchmarks/results/bench_offload.json, or bench_offload_trained.json "
                        "with --trained)")
    lm = parser.add_argument_group("--trained: the tiny byte-level MoE LM")
    lm.add_argument("--trained", action="store_true",
                    help="run only the trained-model section")
    lm.add_argument("--lm-layers", type=int, default=4)
    lm.add_argument("--lm-d", type=int, default=128)
    lm.add_argument("--lm-experts", type=int, default=16)
    lm.add_argument("--lm-k", type=int, default=2)
    lm.add_argument("--lm-d-ff", type=int, default=256)
    lm.add_argument("--ctx", type=int, default=128)
    lm.add_argument("--batch", type=int, default=16)
    lm.add_argument("--train-steps", type=int, default=300)
    lm.add_argument("--train-bytes", type=int, default=4_000_000)
    lm.add_argument("--lr", type=float, default=3e-3)
    lm.add_argument("--eval-windows", type=int, default=16)
    lm.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    console = Console(width=170)
    if args.trained:
        out = Path(args.out or ROOT / "benchmarks/results/bench_offload_trained.json")
        result = {"machine": platform.machine(), "threads": torch.get_num_threads(),
                  "torch": torch.__version__, "args": vars(args),
                  "trained": trained(args, console)}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        console.print(f"wrote {out}")
        return
    args.out = args.out or str(ROOT / "benchmarks/results/bench_offload.json")
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
