"""The demo (the project's main job) runs and reports every strategy honestly."""

from __future__ import annotations

import numpy as np
import pytest

from moe_router import route
from moe_router.demo import demo_configs, main, realistic_logits


def test_demo_prints_every_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--tokens", "256", "--frameworks", ""]) == 0
    out = capsys.readouterr().out
    for name in demo_configs():
        assert name.split(" (")[0] in out
    for kind in ("normal", "skewed", "peaked", "low_rank"):
        assert f"{kind} logits" in out


@pytest.mark.parametrize("kind", ["normal", "skewed", "peaked", "low_rank"])
def test_realistic_logits_are_distinct_distributions(kind: str) -> None:
    logits = realistic_logits(kind, 512, 8, seed=1)
    assert logits.shape == (512, 8) and logits.dtype == np.float32
    top1_share = np.bincount(logits.argmax(-1), minlength=8) / 512
    if kind == "skewed":
        assert top1_share[0] > 0.3  # expert 0 is popular
    if kind == "normal":
        assert top1_share.max() < 0.2


def test_dynamic_demo_strategies_really_vary_k() -> None:
    logits = realistic_logits("normal", 1024, 8)
    for name, config in demo_configs().items():
        if not config.is_dynamic or config.num_null_experts:
            continue
        k_T = route(logits, config).num_experts_per_token
        assert len(np.unique(k_T)) >= 2, name
