"""Dynamic routing, measured (issue 12): does choosing the number of experts per token save
expert compute at equal quality against static top-k? A reproducible CPU experiment.

Run: ``python3 scripts/dev.py bench dynamic_routing`` (the full preset, 25-30 minutes on 2 idle
cores). Writes ``benchmarks/results/dynamic_routing.json``, the plots
``benchmarks/results/dynamic_routing_*.png`` and the page ``docs/dynamic-routing.md``.

- ``--preset toy`` runs a few steps of a tiny model (the smoke test's size); its outputs go to
  ``$TMPDIR/dynamic_routing_toy/`` unless ``--out`` says otherwise.
- ``--arms top2,top_p_target`` picks arms; ``--steps N`` overrides the text steps.
- ``--report-only`` regenerates the page and the plots from an existing JSON in ``--out``.
- ``--threads`` (default 2): on a machine shared with other jobs use 1; two threads on two busy
  cores can be many times slower than one.

What runs: every arm on the standard library's text from one initialisation and data order
(seed 0); the trained top-2 model routed with other strategies without retraining; second
seeds of top-2, of top-p with the controller and of the best dynamic arm; the dynamic arms on a
synthetic task with known per-token difficulty. The page's conclusions are computed from the
JSON (``dynamic_routing_lib/report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from dynamic_routing_lib.analysis import best_dynamic, inference_switch
from dynamic_routing_lib.data import load_corpus, val_windows
from dynamic_routing_lib.experiment import SyntheticSettings, run_synthetic_arm, run_text_arm
from dynamic_routing_lib.model import ARMS, HEADLINE_ARM, ModelSize
from dynamic_routing_lib.report import arm_row, write_report
from dynamic_routing_lib.train import TrainSettings
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
JSON_NAME = "dynamic_routing.json"
DEFAULT_OUT = ROOT / "benchmarks" / "results"
DEFAULT_DOCS = ROOT / "docs" / "dynamic-routing.md"
#: arms trained on the synthetic task: the dynamic ones, and top-2 for reference
SYNTHETIC_ARMS = ("top2", "top_p", "top_p_entropy", "top_p_target", "null", "relu",
                  "complexity")
SEEDS = (0, 1)


@dataclass(frozen=True)
class Preset:
    """Sizes of one preset."""

    size: ModelSize
    train: TrainSettings
    synthetic: SyntheticSettings
    val_windows: int
    max_files: int | None


PRESETS = {
    "full": Preset(ModelSize(layers=4, d_model=128, heads=4, seq_len=128),
                   TrainSettings(steps=500, batch=16, lr=3e-3, evals=4, curve_windows=32,
                                 log_points=50),
                   SyntheticSettings(steps=500, batch=32, blocks=16, modulus=7, layers=2,
                                     eval_sequences=256),
                   val_windows=256, max_files=None),
    "toy": Preset(ModelSize(layers=2, d_model=32, heads=2, seq_len=32),
                  TrainSettings(steps=6, batch=4, lr=3e-3, evals=1, curve_windows=4,
                                log_points=3),
                  SyntheticSettings(steps=6, batch=4, blocks=4, modulus=7, layers=2,
                                    eval_sequences=16),
                  val_windows=8, max_files=40),
}


def machine(threads: int) -> dict[str, Any]:
    """CPU model, cores, threads, torch / Python versions, platform."""
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="full")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma list of arms (default: all): {', '.join(ARMS)}")
    p.add_argument("--steps", type=int, help="training steps per text arm (preset's default)")
    p.add_argument("--synthetic-steps", type=int, help="training steps per synthetic arm")
    p.add_argument("--no-synthetic", action="store_true", help="skip the synthetic task")
    p.add_argument("--no-second-seed", action="store_true", help="one seed only")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--out", type=Path, help="JSON and plots folder (full: benchmarks/results; "
                                            "toy: $TMPDIR/dynamic_routing_toy)")
    p.add_argument("--docs", type=Path, help="the page (full: docs/dynamic-routing.md; toy: "
                                             "OUT/dynamic-routing.md)")
    p.add_argument("--report-only", action="store_true",
                   help="regenerate the page and plots from OUT/dynamic_routing.json")
    args = p.parse_args(argv)
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        p.error(f"unknown arms {unknown}; known: {', '.join(ARMS)}")
    if args.out is None:
        args.out = DEFAULT_OUT if args.preset == "full" else \
            Path(tempfile.gettempdir()) / "dynamic_routing_toy"
    if args.docs is None:
        args.docs = DEFAULT_DOCS if args.preset == "full" else args.out / "dynamic-routing.md"
    return args


def command_line(argv: list[str]) -> str:
    """The command as run through scripts/dev.py (the documented entry point)."""
    return " ".join(["python3 scripts/dev.py bench dynamic_routing", *argv]).strip()


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def results_table(data: dict[str, Any]) -> Table:
    """The rich summary table of the arms."""
    table = Table(title="Dynamic routing: arms (validation, evaluation routing)")
    for col in ("arm", "seeds", "bits/byte", "k eval", "FLOPs/top-2", "k train",
                "max/mean load", "z-loss", "dropped", "wall s"):
        table.add_column(col, justify="left" if col == "arm" else "right")
    for arm in data["arms"].values():
        r = arm_row(arm)
        pm = f" ±{r['bpb_pm']:.3f}" if r["bpb_pm"] is not None else ""
        table.add_row(arm["label"], ",".join(map(str, r["seeds"])), f"{r['bpb']:.3f}{pm}",
                      f"{r['k']:.2f}", f"{r['flops']:.2f}", f"{r['train_k']:.2f}",
                      f"{r['load']:.2f}", f"{r['z']:.2f}", str(r["dropped"]),
                      f"{r['wall']:.0f}")
    return table


def run(args: argparse.Namespace, argv: list[str], console: Console) -> dict[str, Any]:
    """Everything but the report: returns the JSON-ready results."""
    preset = PRESETS[args.preset]
    train = preset.train if args.steps is None else replace(preset.train, steps=args.steps)
    syn = preset.synthetic if args.synthetic_steps is None else \
        replace(preset.synthetic, steps=args.synthetic_steps)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    corpus = load_corpus(preset.max_files)
    val = val_windows(corpus.val, preset.val_windows, preset.size.seq_len)
    names = args.arms.split(",")
    data: dict[str, Any] = {"meta": {
        "command": command_line(argv), "preset": args.preset, "json": _shown(args.out /
                                                                             JSON_NAME),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M"), "machine": machine(args.threads),
        "seeds": list(SEEDS[:1] if args.no_second_seed else SEEDS),
        "model": preset.size.describe(), "train": train.describe(),
        "data": corpus.describe(), "val_windows": int(len(val)),
        "val_bytes": int(val[:, 1:].size),
        "tokens_per_arm": train.steps * train.batch * preset.size.seq_len},
        "headline": HEADLINE_ARM, "arms": {}, "second_seed_arms": []}
    console.print(f"[bold]dynamic routing[/]: preset {args.preset}, arms {', '.join(names)}; "
                  f"{train.steps} steps x {train.batch} x {preset.size.seq_len} bytes per arm; "
                  f"train {corpus.train.size:,} / val {corpus.val.size:,} bytes; "
                  f"{args.threads} threads")

    def text(name: str, seed: int) -> Any:
        def log(step: int, v: dict[str, float]) -> None:
            if step % max(1, train.steps // 5) == 0 or step == train.steps:
                console.print(f"  {name} seed {seed} step {step}/{train.steps}: train "
                              f"{v['bpb']:.3f} bits/byte, k {v['k']:.2f}, "
                              f"{v['s/step']:.3f} s/step, {time.perf_counter() - start:.0f} s")
        run_, model = run_text_arm(name, seed, preset.size, train, corpus, val, log)
        entry = data["arms"].setdefault(name, {**ARMS[name].describe(), "runs": []})
        entry["runs"].append(run_)
        console.print(f"[green]{ARMS[name].label}[/] seed {seed}: val {run_['val_bpb']:.3f} "
                      f"bits/byte, k {run_['k_mean']:.2f}, {run_['wall_s']:.0f} s")
        return model

    for name in names:
        model = text(name, SEEDS[0])
        if name == "top2":
            console.print("inference-time switch of the trained top-2 model ...")
            data["inference_switch"] = {"base": "top2", "seed": SEEDS[0],
                                        "points": inference_switch(model, val)}
    # the best dynamic arm is chosen on the first seed, before its second seed runs
    best = data["best_dynamic"] = best_dynamic(data["arms"], SEEDS[0])
    if not args.no_second_seed:
        again = [n for n in dict.fromkeys(["top2", HEADLINE_ARM, best]) if n in names]
        data["second_seed_arms"] = again
        for name in again:
            text(name, SEEDS[1])
    syn_names = [n for n in SYNTHETIC_ARMS if n in names]
    if syn_names and not args.no_synthetic:
        data["synthetic"] = {"config": syn.describe(), "arms": {}}
        for name in syn_names:
            result = run_synthetic_arm(name, preset.size, train, syn)
            data["synthetic"]["arms"][name] = result
            c = result["classes"]
            console.print(f"[green]synthetic {ARMS[name].label}[/]: k copy "
                          f"{c['copy']['k_mean']:.2f}, arith {c['arith']['k_mean']:.2f}, "
                          f"random {c['random']['k_mean']:.2f}; p(right) copy "
                          f"{c['copy']['p_correct']:.2f}, arith {c['arith']['p_correct']:.2f}; "
                          f"{result['wall_s']:.0f} s")
    data["total_wall_s"] = time.perf_counter() - start
    return data


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 150)
    path = args.out / JSON_NAME
    if args.report_only:
        if not path.is_file():
            console.print(f"[red]no {_shown(path)}: run the experiment first[/]")
            return 1
        data = json.loads(path.read_text())
    else:
        data = run(args, argv, console)
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")
    console.print(results_table(data))
    written = write_report(data, args.out, args.docs)
    console.print("wrote " + ", ".join(_shown(p) for p in [path, *written]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
