"""Keras MoE layer (TensorFlow) vs compute-all-experts-then-mask vs the dense-equivalent FFN.

Sizes: d=512, f=1024, E=8, k=2, SwiGLU, float32, T in {1, 16, 256, 4096}, all inside
``tf.function``. Rows:
- ``layer auto``: ``moe_router.keras.MoE`` with the default dispatch (``auto``, which is
  ``tensorflow:split`` in ``tf.function``: router, ``route()``, the core's permutation by expert,
  per-expert matmuls, unpermute) in ``tf.function``;
- ``layer tiles (XLA)`` / ``layer capacity 1.25 (XLA)``: the same layer under ``jit_compile=True``
  (``tensorflow:tiles``, dropless; the portable ``capacity`` buffer with
  ``capacity_factor=1.25``, which may drop slots);
- ``all experts + mask``: every expert on every token, combined with the top-k weights (what
  keras-hub's Mixtral / Qwen-MoE layers do), ``tf.function``;
- ``dense-equivalent``: one SwiGLU FFN over T*k rows with one expert's weights (same FLOPs as the
  routed work), ``tf.function``.

Efficiency = dense-equivalent time / layer time; targets at T=4096: >= 0.9 and >= 3x faster than
all experts + mask. Prints a rich table and writes ``benchmarks/results/bench_tensorflow.json``.

    python benchmarks/bench_tensorflow.py [--tokens 1,16,256,4096] [--repeats 5]
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.keras import MoE, TensorFlowBackend  # noqa: E402
from moe_router.layer.experts import ffn  # noqa: E402
from moe_router.weights import init_weights  # noqa: E402

D, F, E, K = 512, 1024, 8, 2
RESULTS = Path(__file__).resolve().parent / "results" / "bench_tensorflow.json"


def interleaved_median_ms(fns: dict[str, Callable[[], object]],
                          repeats: int) -> dict[str, float]:
    """Median wall time of each function; the functions take turns in every round, so load from
    other processes on the (shared) machine hits all of them alike."""
    for fn in fns.values():  # trace / compile, then one warm run
        np.asarray(fn())
        np.asarray(fn())
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            np.asarray(fn())  # wait for the result
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def masked_all_experts(weights: dict[str, np.ndarray]) -> Callable[[tf.Tensor], tf.Tensor]:
    """Every expert on every token, then the top-k weights mask the sum (keras-hub style)."""
    router = tf.constant(weights["router.weight"])
    w_gate, w_up, w_down = (tf.constant(weights[f"experts.{n}"])
                            for n in ("w_gate", "w_up", "w_down"))

    @tf.function
    def forward(x_TD: tf.Tensor) -> tf.Tensor:
        probs_TE = tf.nn.softmax(x_TD @ router)
        top_TK, ids_TK = tf.math.top_k(probs_TE, K)
        top_TK = top_TK / tf.reduce_sum(top_TK, -1, keepdims=True)
        dense_TE = tf.reduce_sum(tf.one_hot(ids_TK, E) * top_TK[..., None], axis=1)
        h_ETF = tf.nn.silu(tf.einsum("td,edf->etf", x_TD, w_gate)) \
            * tf.einsum("td,edf->etf", x_TD, w_up)
        y_ETD = tf.einsum("etf,efd->etd", h_ETF, w_down)
        return tf.einsum("etd,te->td", y_ETD, dense_TE)

    return forward


def dense_equivalent(weights: dict[str, np.ndarray]) -> Callable[[tf.Tensor], tf.Tensor]:
    """One SwiGLU FFN over T*k rows: the routed FLOPs as a single dense matmul chain."""
    w_gate, w_up, w_down = (tf.constant(weights[f"experts.{n}"][0])
                            for n in ("w_gate", "w_up", "w_down"))

    @tf.function
    def forward(x_ND: tf.Tensor) -> tf.Tensor:
        return ffn(TensorFlowBackend(), x_ND, w_gate, w_up, w_down, "swiglu")

    return forward


def layer_fn(config: mr.MoEConfig, weights: dict[str, np.ndarray],
             jit: bool) -> Callable[[tf.Tensor], tf.Tensor]:
    layer = MoE.from_weights(config, weights)
    return tf.function(lambda x: layer(x), jit_compile=jit)


def run(tokens: list[int], repeats: int, console: Console) -> list[dict[str, float]]:
    rc = mr.RouterConfig(num_experts=E, k=K)
    config = mr.MoEConfig(d_model=D, d_ff=F, router=rc)  # dispatch "auto"
    weights = init_weights(config, seed=0)
    weights["router.weight"] *= 10.0  # a router with opinions (not near-uniform)
    layers = {
        "layer auto": layer_fn(config, weights, jit=False),
        "layer tiles (XLA)": layer_fn(config.replace(dispatch="tensorflow:tiles"), weights,
                                      jit=True),
        "layer capacity 1.25 (XLA)": layer_fn(
            config.with_router(capacity_factor=1.25).replace(dispatch="capacity"), weights,
            jit=True),
    }
    masked = masked_all_experts(weights)
    dense = dense_equivalent(weights)
    rows = []
    rng = np.random.default_rng(0)
    for T in tokens:
        x = tf.constant(rng.normal(size=(T, D)).astype(np.float32))
        x_rep = tf.constant(rng.normal(size=(T * K, D)).astype(np.float32))
        reps = repeats if T >= 1024 else repeats * 4
        fns = {"dense-equivalent": lambda: dense(x_rep), "all experts + mask": lambda: masked(x)}
        fns.update({name: (lambda fn=fn: fn(x)) for name, fn in layers.items()})
        row: dict[str, float] = {"T": T, **interleaved_median_ms(fns, reps)}
        row["efficiency auto"] = row["dense-equivalent"] / row["layer auto"]
        row["efficiency tiles (XLA)"] = row["dense-equivalent"] / row["layer tiles (XLA)"]
        row["speedup vs mask"] = row["all experts + mask"] / row["layer auto"]
        rows.append(row)
        console.print(f"T={T} done", style="dim")
    return rows


def table(rows: list[dict[str, float]]) -> Table:
    out = Table(title=f"Keras MoE (TensorFlow {tf.__version__}), d={D} f={F} E={E} k={K} "
                      "SwiGLU float32, CPU, median ms")
    columns = [c for c in rows[0] if c != "T"]
    out.add_column("T", justify="right")
    for column in columns:
        out.add_column(column, justify="right")
    for row in rows:
        cells = [f"{row[c]:.2f}" if "efficiency" in c else
                 f"{row[c]:.1f}x" if "speedup" in c else f"{row[c]:.2f}" for c in columns]
        out.add_row(str(row["T"]), *cells)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,16,256,4096")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs at T >= 1024 "
                        "(4x as many below)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    console = Console(width=max(Console().width, 180))
    rows = run([int(t) for t in args.tokens.split(",")], args.repeats, console)
    console.print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "benchmark": "bench_tensorflow", "tensorflow": tf.__version__,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "sizes": {"d_model": D, "d_ff": F, "num_experts": E, "k": K, "activation": "swiglu"},
        "rows": rows}, indent=2))
    console.print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
