"""One run of an arm on the text task or on the synthetic task: build from the shared
initialisation, train, evaluate, and return JSON-ready results (plus the model)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .analysis import class_stats, loss_k_correlation
from .data import Corpus, synthetic_batch, train_batches
from .model import ARMS, ModelSize, TinyMoELM, build_model
from .train import Logger, TrainSettings, bias_effect, evaluate, train_arm


@dataclass(frozen=True)
class SyntheticSettings:
    """The synthetic task: its shape and its training length."""

    steps: int
    batch: int = 32
    blocks: int = 16
    modulus: int = 7
    layers: int = 2
    eval_sequences: int = 256
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def run_text_arm(name: str, seed: int, size: ModelSize, settings: TrainSettings,
                 corpus: Corpus, val: np.ndarray,
                 log: Logger | None = None) -> tuple[dict[str, Any], TinyMoELM]:
    """Train arm ``name`` with ``seed`` on the text and evaluate it on ``val`` windows."""
    arm = ARMS[name]
    start = time.perf_counter()
    model = build_model(size, arm, seed)
    batches = train_batches(corpus.train, settings.steps, settings.batch, size.seq_len, seed)
    result = train_arm(model, arm, batches, settings, val[: settings.curve_windows], log)
    final = evaluate(model, val, keep_tokens=True)
    tokens = final.pop("tokens")
    run: dict[str, Any] = {"seed": seed, **result, **final,
                           "flops_rel_top2": final["k_mean"] / 2.0,
                           "train_flops_rel_top2": result["train_k_mean"] / 2.0}
    if arm.dynamic:
        run["loss_k_corr"] = loss_k_correlation(tokens["ce"], tokens["k"],
                                                np.random.default_rng(seed))
    if arm.router.get("use_expert_bias"):
        run["bias_effect"] = bias_effect(model, val[: max(8, len(val) // 4)])
    run["wall_s"] = time.perf_counter() - start
    return run, model


def synthetic_eval_set(s: SyntheticSettings) -> tuple[np.ndarray, np.ndarray]:
    """The held-out sequences (a seed apart from training) and their token classes."""
    return synthetic_batch(np.random.default_rng(10_000 + s.seed), s.eval_sequences, s.blocks,
                           s.modulus)


def _synthetic_batches(s: SyntheticSettings) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(s.seed)
    for _ in range(s.steps):
        yield synthetic_batch(rng, s.batch, s.blocks, s.modulus)[0]


def run_synthetic_arm(name: str, size: ModelSize, train: TrainSettings, s: SyntheticSettings,
                      log: Logger | None = None) -> dict[str, Any]:
    """Train arm ``name`` on the synthetic task; mean k per token class with bootstrap CIs."""
    arm = ARMS[name]
    start = time.perf_counter()
    model = build_model(replace(size, layers=s.layers), arm, s.seed)
    tokens, kind = synthetic_eval_set(s)
    settings = TrainSettings(**{**asdict(train), "steps": s.steps, "batch": s.batch,
                                "evals": 0})
    result = train_arm(model, arm, _synthetic_batches(s), settings, tokens[:1], log)
    final = evaluate(model, tokens, keep_tokens=True)
    ce, k = final["tokens"]["ce"], final["tokens"]["k"]
    return {"label": arm.label, "dynamic": arm.dynamic, "seed": s.seed,
            "k_mean": final["k_mean"], "train_k_mean": result["train_k_mean"],
            "bits_per_token": final["val_bpb"],
            "classes": class_stats(ce, k, kind, np.random.default_rng(s.seed)),
            "wall_s": time.perf_counter() - start}
