"""Expert parallelism throughput: tokens/s and the communication share for 1, 2 and 4 processes.

Run: ``.venv/bin/python benchmarks/bench_ep.py`` (``--worlds 1,2,4 --tokens 1024 --experts 16
--d-model 256 --d-ff 512 --steps 10``). It launches itself with ``torchrun --standalone`` once per
world size (gloo on CPU; NCCL with one GPU per process when ``--device cuda`` and enough GPUs),
prints a table and writes ``benchmarks/results/bench_ep.json``.

Each process routes its own ``--tokens`` tokens (weak scaling: the global batch grows with the
world) through one moe-router ``MoE`` layer (top-2, SwiGLU, float32) made expert-parallel with
``moe_router.torch.expert_parallel``. Measured per step, the slowest rank counting:

- ``fwd`` / ``fwd+bwd``: the forward alone (inference) and a training step (forward, backward,
  ``sync_gradients``); tokens/s = world x tokens / the slowest rank's step time;
- ``comm share``: the forward's time inside the three collectives of the exchange (count
  exchange, rows out, rows back), measured by timing those calls, over the forward time;
- world 1 runs the same code path with a one-rank group (its exchange is a local copy), and the
  plain single-process layer for reference (``no EP``);
- with 2+ processes, also a *skewed* router (columns scaled 2 -> 0.25: a few hot experts), first
  with the contiguous placement, then with the placement ``plan_placement`` proposes from the
  load measured on that router (one redundant replica per rank); ``rows/rank max/mean`` is the
  measured max / mean over ranks of the rows each received (what sets the slowest rank).

On the 2-core CPU machine 4 processes share 2 cores (1 thread each): the figures show the
exchange's cost, not a speed-up. The GPU section needs one GPU per process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bench_ep.json"
LABELS = {"plain": "no EP", "ep": "EP", "skewed": "EP, skewed router",
          "planned": "EP, skewed, planned placement"}


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worlds", default="1,2,4", help="process counts (comma list)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per process")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--d-ff", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps (after 2 warm-up)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: rank mode
    return p.parse_args(argv)


# ----- one rank ---------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    import moe_router as mr
    from moe_router.torch import MoE, expert_parallel, sync_gradients
    from moe_router_backends.torch import ep_exchange

    cuda = args.device == "cuda"
    rank_env = int(os.environ["LOCAL_RANK"])
    if cuda:
        torch.cuda.set_device(rank_env)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank_env) if cuda else torch.device("cpu")
    config = mr.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, activation="swiglu",
                          router=mr.RouterConfig(num_experts=args.experts, k=2))
    comm = [0.0]

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Any) -> Any:
        def run(*a: Any, **k: Any) -> Any:
            sync()
            start = time.perf_counter()
            out = fn(*a, **k)
            sync()
            comm[0] += time.perf_counter() - start
            return out
        return run

    x = torch.randn(args.tokens, args.d_model, generator=torch.Generator().manual_seed(rank))
    x = x.to(device)
    results: dict[str, Any] = {}
    ep_exchange._all_to_all = timed(ep_exchange._all_to_all)
    ep_exchange.dist = _TimedDist(dist, timed)
    modes = (["plain"] if world == 1 else []) + ["ep"] + (
        ["skewed", "planned"] if world > 1 else [])
    placement = predicted = None
    for mode in modes:
        layer = MoE(config, seed=0).to(device)
        if mode in ("skewed", "planned"):
            skew_router(layer)
        if mode == "planned":
            placement, predicted = plan_from_load(layer, x, world)
        if mode != "plain":
            expert_parallel(layer, placement=placement)
        received = 0
        fwd, train, comm_fwd = [], [], []
        for step in range(args.steps + 2):
            layer.eval()
            comm[0] = 0.0
            sync()
            start = time.perf_counter()
            with torch.no_grad():
                layer(x)
            sync()
            t_fwd, c_fwd = time.perf_counter() - start, comm[0]
            if mode != "plain" and step >= 2:
                received += sum(layer._stages()._ep.last_exchange.received_P)
            layer.train()
            start = time.perf_counter()
            y = layer(x)
            (y.square().mean() + layer.aux_loss).backward()
            if mode == "ep":
                sync_gradients(layer)
            sync()
            t_train = time.perf_counter() - start
            layer.zero_grad(set_to_none=True)
            if step >= 2:
                fwd.append(t_fwd)
                train.append(t_train)
                comm_fwd.append(c_fwd)
        stats = torch.tensor([sum(fwd), sum(train), sum(comm_fwd), received],
                             dtype=torch.float64)
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats.to(device) if cuda else stats)
        per_rank = [g.cpu().tolist() for g in gathered]
        slow_fwd = max(r[0] for r in per_rank) / args.steps
        slow_train = max(r[1] for r in per_rank) / args.steps
        results[mode] = {
            "fwd_ms": slow_fwd * 1e3, "train_ms": slow_train * 1e3,
            "fwd_tokens_per_s": world * args.tokens / slow_fwd,
            "train_tokens_per_s": world * args.tokens / slow_train,
            "comm_share_fwd": max(r[2] / r[0] for r in per_rank) if mode != "plain" else 0.0,
            "rows_max_over_mean": _max_over_mean([r[3] for r in per_rank]),
            "placement": None if placement is None or mode != "planned" else
            placement.to_dict(),
            "predicted": predicted if mode == "planned" else None}
    if rank == 0:
        args.worker.write_text(json.dumps(results))
    dist.destroy_process_group()


def skew_router(layer: Any) -> None:
    """Scale the router's columns from 2 down to 0.25 (geometrically): the experts with wide
    columns win most tokens, a skewed load like a trained model's hot experts."""
    import torch

    E = layer.router.weight.shape[1]
    with torch.no_grad():
        layer.router.weight.mul_(torch.logspace(0.3, -0.6, E, device=layer.router.weight.device))


def plan_from_load(layer: Any, x: Any, world: int) -> tuple[Any, dict[str, Any]]:
    """A placement (one redundant replica per rank) from the load measured on every rank, and
    its predicted max / mean rank load against the contiguous placement."""
    import torch
    import torch.distributed as dist

    from moe_router.parallel import placement_report, plan_placement

    with torch.no_grad():
        counts = layer(x, return_plan=True)[1].expert_counts.double()
    dist.all_reduce(counts)
    load = counts.cpu().numpy()
    placement = plan_placement(load, world, num_redundant=world)
    report = placement_report(load, placement)
    predicted = {"load_E": load.tolist(), "contiguous": report.baseline_max_over_mean,
                 "planned": report.max_over_mean, "replicas": report.num_replicas}
    return placement, predicted


def _max_over_mean(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return max(values) / mean if mean else 1.0


class _TimedDist:
    """``torch.distributed`` with ``all_to_all_single`` timed (the count exchange)."""

    def __init__(self, dist: Any, timed: Any) -> None:
        self._dist = dist
        self.all_to_all_single = timed(dist.all_to_all_single)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dist, name)


# ----- the launcher -----------------------------------------------------------------------------
def launch(args: argparse.Namespace, world: int) -> dict[str, Any]:
    out = args.out.with_suffix(f".w{world}.tmp")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={world}", __file__, "--worker", str(out),
               "--tokens", str(args.tokens), "--experts", str(args.experts),
               "--d-model", str(args.d_model), "--d-ff", str(args.d_ff),
               "--steps", str(args.steps), "--device", args.device]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(command, env=env, check=True, timeout=1200, cwd=ROOT)
    data = json.loads(out.read_text())
    out.unlink()
    return data


BEGIN, END = "<!-- bench_ep:begin -->", "<!-- bench_ep:end -->"
DOCS = ROOT / "docs" / "scaling.md"


def render(record: dict[str, Any]) -> str:
    """The docs' tables from a results record (``docs/scaling.md`` between the markers)."""
    m, st = record["machine"], record["settings"]
    lines = [f"`{record['command']}` on {m['cpus']} CPUs ({m['platform']}), torch {m['torch']}, "
             f"{m['device']}; {st['tokens']} tokens per process, E={st['experts']}, "
             f"D={st['d_model']}, F={st['d_ff']}, top-2, {st['steps']} timed steps; the slowest "
             f"rank counts.", "",
             "| processes | layer | fwd ms | fwd tokens/s | comm share (fwd) | fwd+bwd ms | "
             "fwd+bwd tokens/s | rows/rank max/mean |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in record["rows"]:
        rows = "" if r["mode"] == LABELS["plain"] else f"{r['rows_max_over_mean']:.2f}"
        lines.append(f"| {r['world']} | {r['mode']} | {r['fwd_ms']:.1f} | "
                     f"{r['fwd_tokens_per_s']:,.0f} | {100 * r['comm_share_fwd']:.0f}% | "
                     f"{r['train_ms']:.1f} | {r['train_tokens_per_s']:,.0f} | {rows} |")
    planned = [r for r in record["rows"] if r.get("predicted")]
    if planned:
        lines += ["", "Placement on the skewed router's measured load (one redundant replica "
                  "per rank): predicted max/mean rank load, and the measured max/mean of rows "
                  "received per rank:", "",
                  "| processes | predicted, contiguous | predicted, planned | measured, "
                  "contiguous | measured, planned |", "|---:|---:|---:|---:|---:|"]
        for r in planned:
            skewed = next(s for s in record["rows"] if s["world"] == r["world"]
                          and s["mode"] == LABELS["skewed"])
            p = r["predicted"]
            lines.append(f"| {r['world']} | {p['contiguous']:.2f} | {p['planned']:.2f} | "
                         f"{skewed['rows_max_over_mean']:.2f} | {r['rows_max_over_mean']:.2f} |")
    return "\n".join(lines)


def write_docs(record: dict[str, Any], page: Path = DOCS) -> None:
    """Replace the page's generated block with :func:`render`."""
    text = page.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    page.write_text(f"{head}{BEGIN}\n{render(record)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker is not None:
        worker(args)
        return 0
    from rich.console import Console
    from rich.table import Table

    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda":  # one GPU per process (NCCL)
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus:
            raise SystemExit("--device cuda: no GPU visible")
        skipped = [w for w in worlds if w > gpus]
        worlds = [w for w in worlds if w <= gpus]
        if skipped:
            print(f"skipping {skipped} processes: {gpus} GPU(s) visible, one per process")
    rows = []
    for world in worlds:
        data = launch(args, world)
        for mode, r in data.items():
            rows.append({"world": world, "mode": LABELS[mode], **r})
    table = Table(title=f"expert parallelism, {args.device}: {args.tokens} tokens/process, "
                        f"E={args.experts}, D={args.d_model}, F={args.d_ff}, top-2")
    for col in ("processes", "layer", "fwd ms", "fwd tokens/s", "comm share (fwd)",
                "fwd+bwd ms", "fwd+bwd tokens/s", "rows/rank max/mean"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["world"]), r["mode"], f"{r['fwd_ms']:.1f}",
                      f"{r['fwd_tokens_per_s']:,.0f}", f"{100 * r['comm_share_fwd']:.0f}%",
                      f"{r['train_ms']:.1f}", f"{r['train_tokens_per_s']:,.0f}",
                      "" if r["mode"] == LABELS["plain"] else f"{r['rows_max_over_mean']:.2f}")
    Console().print(table)
    import torch

    record = {"command": " ".join(["python", "benchmarks/bench_ep.py", *(argv or sys.argv[1:])]),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "device": args.device},
              "settings": {k: v for k, v in vars(args).items() if k not in ("out", "worker")},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1, default=str))
    if args.out == RESULTS:
        write_docs(json.loads(args.out.read_text()))
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
