"""Before/after: run one benchmark in two checkouts, alternating, and compare the layer's time.

Each round runs the benchmark script of the *baseline* checkout and of this one (the order
alternates between rounds, so background load hits both alike), each in its own process with
its own tree first on ``PYTHONPATH``, and reads the layer's default-dispatch time per T from the
JSON each run writes. Prints a table of medians over rounds and writes
``benchmarks/results/compare_<bench>.json``.

Usage::

    git worktree add /tmp/baseline <commit>          # the commit before the change
    ln -s /tmp/baseline/backends /tmp/baseline/moe_router_backends   # older trees only
    python benchmarks/compare_commits.py torch --baseline /tmp/baseline --rounds 3 -- --repeats 9

Arguments after ``--`` go to both benchmark scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parent.parent


def layer_ms(bench: str, row: dict[str, Any]) -> tuple[int, float]:
    """``(T, ms)`` of the layer with its default dispatch in one JSON row of ``bench``."""
    if bench == "torch":
        return int(row["T"]), float(row["ours_ms"])
    if bench == "jax":
        return int(row["tokens"]), float(row["ms"]["auto"])
    for key in ("layer auto", "layer split"):  # tensorflow: the default dispatch's column
        if key in row:
            return int(row["T"]), float(row[key])
    raise KeyError(f"no layer column in {sorted(row)}")


def run_once(tree: Path, bench: str, extra: list[str]) -> dict[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, str(tree / "benchmarks" / f"bench_{bench}.py"), "--out", str(out),
               *extra]
        subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
        rows = json.loads(out.read_text())["rows"]
    return dict(layer_ms(bench, row) for row in rows)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bench", choices=("torch", "jax", "tensorflow"))
    parser.add_argument("--baseline", type=Path, required=True, help="checkout of the old commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[int, float]]] = {"before": [], "after": []}
    trees = {"before": args.baseline.resolve(), "after": ROOT}
    for round_ in range(args.rounds):
        order = ("before", "after") if round_ % 2 == 0 else ("after", "before")
        for which in order:
            runs[which].append(run_once(trees[which], args.bench, extra))
            print(f"round {round_ + 1}/{args.rounds} {which}: "
                  + ", ".join(f"T={t}: {ms:.2f} ms" for t, ms in sorted(runs[which][-1].items())),
                  flush=True)
    table = Table(title=f"bench_{args.bench}: layer (default dispatch), median ms over "
                        f"{args.rounds} alternating rounds")
    for column in ("T", "before", "after", "after / before"):
        table.add_column(column, justify="right")
    rows = []
    for T in sorted(runs["after"][0]):
        before = statistics.median(run[T] for run in runs["before"])
        after = statistics.median(run[T] for run in runs["after"])
        rows.append({"T": T, "before_ms": before, "after_ms": after, "ratio": after / before})
        table.add_row(str(T), f"{before:.3f}", f"{after:.3f}", f"{after / before:.2f}")
    Console().print(table)
    out = args.out or ROOT / "benchmarks" / "results" / f"compare_{args.bench}.json"
    out.write_text(json.dumps({"bench": args.bench, "baseline": str(args.baseline),
                               "rounds": args.rounds, "extra_args": extra, "rows": rows,
                               "runs": runs}, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
