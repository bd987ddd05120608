"""Load on the live monitoring server: ``moe-router serve --session FILE`` in a subprocess (so
its RSS is the server's alone) answering ``--requests`` GETs from ``--clients`` threads (one
keep-alive ``httpx`` client each), cycling over ``/metrics``, ``/health`` and ``/api/session``.

Run: ``.venv/bin/python benchmarks/bench_server.py`` (``--requests 2000 --clients 4``,
``--layers 4 --experts 16 --steps 200``, ``--json PATH`` to keep the numbers).

The session file is synthetic (``--layers`` x ``--experts``, top-4, ``--steps`` step windows, a
512-row trace). After a warm-up of ``--warmup`` requests, two passes of ``--requests`` each run
back to back; RSS is read before, between and after them: a server that keeps per-request state
grows in both passes, a bounded one stays flat after the first. Prints one row per endpoint and
one for all (requests, errors, req/s, p50 / p99 latency in ms) and the RSS figures; exits 1 on
any error or when the second pass grows RSS by more than ``--max-growth-mib``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_router.debug.session import FORMAT, add_counts, empty_counts  # noqa: E402

PATHS = ("metrics", "health", "api/session")


def synthetic_session(layers: int, experts: int, steps: int, k: int = 4,
                      seed: int = 0) -> dict[str, Any]:
    """A consistent session record: per-step counts with skewed expert loads, totals = sum."""
    rng = np.random.default_rng(seed)
    totals = {m: [empty_counts(experts, k) for _ in range(layers)] for m in ("train", "eval")}
    step_rows = []
    for s in range(steps):
        mode = "eval" if s % 10 == 9 else "train"
        per_layer = []
        for i in range(layers):
            tokens = 2048
            c = empty_counts(experts, k)
            hist = rng.multinomial(tokens, [0.05, 0.45, 0.3, 0.15, 0.05][: k + 1])
            slots = int(sum(j * n for j, n in enumerate(hist)))
            load = rng.dirichlet(np.linspace(4, 1, experts) * (i + 1))
            c.update(calls=1, tokens=tokens, dropped=int(rng.integers(0, 8)),
                     expert_tokens=[int(v) for v in rng.multinomial(slots, load)],
                     k_hist=[int(v) for v in hist], entropy_sum=tokens * 1.7,
                     top1_sum=tokens * 0.4, z_loss_sum=tokens * 0.2, balance_sum=1.1,
                     aux_loss_sum=0.01)
            per_layer.append(c)
            totals[mode][i] = add_counts(totals[mode][i], c)
        step_rows.append({"step": s, "time": 0.5 * s, "mode": mode, "layers": per_layer})
    trace = [{"layer": r % layers, "call": r // 64, "mode": "train", "index": r % 64,
              "position": r % 64, "token_id": int(rng.integers(0, 32000)),
              "experts": [int(e) for e in rng.choice(experts, 2, replace=False)],
              "weights": [0.6, 0.4]} for r in range(512)]
    return {"format": FORMAT, "name": "bench", "framework": "torch",
            "started_at": "2026-01-01T00:00:00+00:00", "ended_at": None,
            "digest": {"config": "0" * 64, "weights": None, "inputs": None,
                       "versions": {"moe_router": "bench"}, "id": "0" * 16},
            "layers": [{"index": i, "name": f"model.layers.{i}.mlp", "num_experts": experts,
                        "max_slots": k, "strategy": "top_p", "min_experts": 1, "max_experts": k,
                        "config": None} for i in range(layers)],
            "totals": totals, "steps": step_rows, "steps_dropped": 0, "trace": trace,
            "events": []}


def start_server(session_path: Path, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "moe_router", "serve", "--session",
                             str(session_path), "--port", "0"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    found = re.search(r" at (http://\S+/) ", line)
    if not found:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    url = found.group(1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            httpx.get(url + "health", timeout=2)
            return proc, url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit("the server did not answer") from None
            time.sleep(0.05)


def load(url: str, requests: int, clients: int) -> tuple[dict[str, list[float]], list[str], float]:
    """(latencies in s by path, errors, wall seconds) of ``requests`` GETs."""
    latencies: dict[str, list[float]] = {p: [] for p in PATHS}
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int, offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as client:
            for i in range(n):
                path = PATHS[(i + offset) % len(PATHS)]
                start = time.perf_counter()
                try:
                    r = client.get(path)
                    problem = None if r.status_code == 200 else f"{path}: HTTP {r.status_code}"
                except httpx.HTTPError as err:
                    problem = f"{path}: {err!r}"
                with lock:
                    latencies[path].append(time.perf_counter() - start)
                    if problem:
                        errors.append(problem)

    shares = [requests // clients + (k < requests % clients) for k in range(clients)]
    threads = [threading.Thread(target=worker, args=(n, k)) for k, n in enumerate(shares)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--max-growth-mib", type=float, default=8.0)
    parser.add_argument("--json", type=Path, help="write the numbers here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "session.json"
        path.write_text(json.dumps(synthetic_session(args.layers, args.experts, args.steps)))
        proc, url = start_server(path)
        try:
            server = psutil.Process(proc.pid)
            sizes = {p: len(httpx.get(url + p, timeout=30).content) for p in PATHS}
            load(url, args.warmup, args.clients)
            rss = [server.memory_info().rss]
            passes = []
            for _ in range(2):
                passes.append(load(url, args.requests, args.clients))
                rss.append(server.memory_info().rss)
        finally:
            proc.terminate()
            proc.wait(timeout=15)

    mib = [r / 2**20 for r in rss]
    table = Table(title=f"moe-router serve: {args.requests} requests x 2 passes, "
                        f"{args.clients} clients, session {args.layers}x{args.experts}, "
                        f"{args.steps} steps ({os.cpu_count()} CPUs, shared)")
    for col in ("pass", "endpoint", "bytes", "requests", "errors", "req/s", "p50 ms", "p99 ms"):
        table.add_column(col, justify="left" if col in ("pass", "endpoint") else "right")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()},
                               "rss_mib": {"before": mib[0], "after_pass_1": mib[1],
                                           "after_pass_2": mib[2]}, "passes": []}
    for n, (latencies, errors, wall) in enumerate(passes, 1):
        rows = {p: latencies[p] for p in PATHS}
        rows["all"] = [x for p in PATHS for x in latencies[p]]
        for name, xs in rows.items():
            ms = np.asarray(xs) * 1e3
            nerr = len(errors) if name == "all" else sum(e.startswith(name + ":")
                                                         for e in errors)
            row = {"pass": n, "endpoint": name, "bytes": sizes.get(name),
                   "requests": len(xs), "errors": nerr,
                   "req_per_s": len(xs) / wall if name == "all" else None,
                   "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}
            results["passes"].append(row)
            table.add_row(str(n), "/" + name if name != "all" else "all",
                          "-" if row["bytes"] is None else str(row["bytes"]), str(len(xs)),
                          str(nerr), "-" if row["req_per_s"] is None
                          else f"{row['req_per_s']:.0f}",
                          f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}")
    console = Console()
    console.print(table)
    console.print(f"server RSS: before {mib[0]:.1f} MiB, after pass 1 {mib[1]:.1f} MiB "
                  f"({mib[1] - mib[0]:+.2f}), after pass 2 {mib[2]:.1f} MiB "
                  f"({mib[2] - mib[1]:+.2f})")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    failed = sum(len(p[1]) for p in passes) or (mib[2] - mib[1]) > args.max_growth_mib
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
