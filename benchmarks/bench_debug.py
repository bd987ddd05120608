"""Cost of the debugger's on-device counters: the MoE layer with the debugger off, with the
``routing_stats`` counters on, and with counters plus the per-token trace.

Run: ``.venv/bin/python benchmarks/bench_debug.py`` (``--frameworks torch,jax,tensorflow``,
``--tokens 4096``, ``--repeats 30``). Writes ``benchmarks/results/bench_debug.json``.

Sizes: d=512, f=1024, E=8, k=2, SwiGLU, float32, CPU; torch eager (``inference_mode`` for eval,
forward + backward for train), Flax under ``nnx.jit``, Keras under ``tf.function``. The three
variants are timed round-robin (same process, same weights), median of ``--repeats`` rounds
(``--clock cpu``, the default, is process CPU time: robust on a shared machine; ``wall`` too);
``overhead`` = on / off - 1. Target (issue 9): counters <= 3% of layer time at T=4096.
In eval mode the debugger also costs the plan the inference fast path skips (losses and
statistics): that is included, since the counters need it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import moe_router as mr  # noqa: E402
from moe_router.debug import MoEDebugger, TraceConfig  # noqa: E402

D, FF, E, K = 512, 1024, 8, 2
VARIANTS = ("off", "counters", "counters+trace")
CONFIG = mr.MoEConfig(d_model=D, d_ff=FF, router=mr.RouterConfig(num_experts=E, k=K))


def _variant(debugger: MoEDebugger, variant: str) -> None:
    debugger.detach()
    debugger.trace = TraceConfig(capacity=4096, tokens_per_call=64) \
        if variant == "counters+trace" else None
    if variant != "off":
        debugger.attach()


def torch_runner(T: int, train: bool) -> tuple[Callable[[], None], MoEDebugger]:
    import torch

    from moe_router.torch import MoE

    torch.manual_seed(0)
    layer = MoE(CONFIG, seed=0).train(train)
    x = torch.randn(T, D, requires_grad=train)

    def run() -> None:
        if train:
            (layer(x).square().mean() + layer.aux_loss).backward()
        else:
            with torch.inference_mode():
                layer(x)

    return run, MoEDebugger(layer)


def jax_runner(T: int, train: bool) -> tuple[Callable[[], None], MoEDebugger]:
    import jax
    from flax import nnx

    from moe_router.flax import MoE

    layer = MoE(CONFIG, rngs=nnx.Rngs(0))
    x = jax.numpy.asarray(np.random.default_rng(0).normal(size=(T, D)), jax.numpy.float32)

    @nnx.jit
    def forward(layer, x):
        return layer(x, training=train)

    @nnx.jit
    def step(layer, x):
        def loss(layer):
            y, plan = layer(x, training=True, return_plan=True)
            return (y ** 2).mean() + plan.losses.total
        return nnx.grad(loss)(layer)

    def run() -> None:
        jax.block_until_ready(step(layer, x) if train else forward(layer, x))

    return run, MoEDebugger(layer)


def tensorflow_runner(T: int, train: bool) -> tuple[Callable[[], None], MoEDebugger]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf

    from moe_router.keras import MoE

    layer = MoE(CONFIG, seed=0)
    layer.build((None, D))
    x = tf.constant(np.random.default_rng(0).normal(size=(T, D)), tf.float32)
    box: dict[str, Callable[[], object]] = {}

    def make() -> Callable[[], object]:
        @tf.function
        def forward():
            if not train:
                return layer(x, training=False)
            with tf.GradientTape() as tape:
                y = layer(x, training=True)
                loss = tf.reduce_mean(y ** 2) + tf.add_n(layer.losses or [0.0])
            return tape.gradient(loss, layer.trainable_variables)
        return forward

    def run() -> None:
        key = repr(layer.config.observers) + repr(layer.config.trace)
        if key not in box:  # a new tf.function per variant: its graph holds the new variables
            box[key] = make()
        box[key]()

    return run, MoEDebugger(layer)


RUNNERS = {"torch": torch_runner, "jax": jax_runner, "tensorflow": tensorflow_runner}


#: ``wall``: elapsed time; ``cpu``: CPU time of the process (all threads), which a busy shared
#: machine inflates much less (time spent preempted is not counted)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(framework: str, T: int, train: bool, repeats: int,
            clock: str = "cpu") -> dict[str, float]:
    run, debugger = RUNNERS[framework](T, train)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for variant in VARIANTS:  # warm up every variant (compilation) once
        _variant(debugger, variant)
        run()
        run()
    for _ in range(repeats):
        for variant in VARIANTS:
            _variant(debugger, variant)
            start = CLOCKS[clock]()
            run()
            times[variant].append((CLOCKS[clock]() - start) * 1e3)
    debugger.detach()
    return {v: statistics.median(t) for v, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frameworks", default="torch,jax,tensorflow")
    parser.add_argument("--tokens", default="4096")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/bench_debug.json"))
    args = parser.parse_args(argv)
    table = Table(title=f"debugger overhead, d={D} f={FF} E={E} k={K}, float32 CPU "
                        f"(median {args.clock} ms of {args.repeats})")
    for column in ("framework", "T", "mode", *VARIANTS, "counters", "+trace"):
        table.add_column(column, justify="right")
    rows = []
    for framework in args.frameworks.split(","):
        for T in (int(t) for t in args.tokens.split(",")):
            for train in (False, True):
                ms = measure(framework, T, train, args.repeats, args.clock)
                over = {v: ms[v] / ms["off"] - 1.0 for v in VARIANTS[1:]}
                mode = "train" if train else "eval"
                rows.append({"framework": framework, "tokens": T, "mode": mode, "ms": ms,
                             "overhead": over})
                table.add_row(framework, str(T), mode, *(f"{ms[v]:.2f}" for v in VARIANTS),
                              f"{over['counters']:+.1%}", f"{over['counters+trace']:+.1%}")
    Console().print(table)
    Path(args.out).write_text(json.dumps({
        "command": "python benchmarks/bench_debug.py " + " ".join(argv or sys.argv[1:]),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "clock": args.clock,
        "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
