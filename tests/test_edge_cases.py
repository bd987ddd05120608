"""Edge cases of ``route()`` on NumPy: T=0, T=1, E=1, k=E, all-equal logits, dtypes, 1.0 rows."""

from __future__ import annotations

import numpy as np
import pytest
from loops import assert_matches, route_loop

from moe_router import RouterConfig, route


def configs(E: int) -> dict[str, RouterConfig]:
    """One config per strategy (and the top-k variants) for E experts."""
    half, k = max(1, E // 2), min(2, E)  # k must be <= E even where the strategy ignores it
    return {
        "top_k": RouterConfig(num_experts=E, k=k),
        "top_k_sigmoid_groups": RouterConfig(num_experts=E, k=1, score_func="sigmoid",
                                             num_groups=1 if E % 2 else 2, route_scale=2.0),
        "null": RouterConfig(num_experts=E, k=2, num_null_experts=2, max_experts=k),
        "top_p": RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, k=k),
        "threshold": RouterConfig(num_experts=E, strategy="threshold", threshold=0.5, k=k),
        "relu": RouterConfig(num_experts=E, strategy="relu", min_experts=0, k=k),
        "expert_choice": RouterConfig(num_experts=E, strategy="expert_choice", k=1),
        "hash": RouterConfig(num_experts=E, strategy="hash", k=k),
        "complexity": RouterConfig(num_experts=E, strategy="complexity", max_experts=half, k=k),
        "capacity": RouterConfig(num_experts=E, k=k, capacity_factor=1.0),
    }


def extras(config: RouterConfig, T: int) -> dict:
    if config.strategy == "hash":
        return {"token_ids_T": np.arange(T, dtype=np.int64)}
    return {}


@pytest.mark.parametrize("name", list(configs(8)))
def test_empty_batch_gives_empty_plan(name: str) -> None:
    config = configs(8)[name]
    logits = np.zeros((0, config.num_choices), dtype=np.float32)
    plan = route(logits, config, **extras(config, 0))
    K = config.max_slots
    assert plan.expert_indices.shape == (0, K) and plan.expert_indices.dtype == np.int64
    assert plan.expert_weights.shape == (0, K) and plan.expert_weights.dtype == np.float32
    assert plan.num_experts_per_token.shape == (0,)
    assert plan.expert_counts.tolist() == [0] * 8
    assert int(plan.num_dropped) == 0
    for loss in plan.losses:
        assert np.isfinite(loss) and float(loss) == 0.0
    assert plan.stats.k_histogram.tolist() == [0] * (K + 1)
    assert float(plan.stats.mean_experts) == 0.0


@pytest.mark.parametrize("name", list(configs(8)))
def test_single_token(name: str) -> None:
    config = configs(8)[name]
    logits = np.random.default_rng(0).normal(size=(1, config.num_choices)).astype(np.float32)
    plan = route(logits, config, **extras(config, 1))
    ref = route_loop(logits, config, token_ids=extras(config, 1).get("token_ids_T"))
    assert_matches(plan, ref)
    assert plan.expert_indices.shape == (1, config.max_slots)
    if name == "expert_choice":  # C = ceil(1 * 1 / 8) = 1: every expert takes the only token
        assert int(plan.num_experts_per_token[0]) == config.max_slots


@pytest.mark.parametrize("name", list(configs(1)))
def test_single_expert(name: str) -> None:
    config = configs(1)[name]
    logits = np.random.default_rng(1).normal(size=(5, config.num_choices)).astype(np.float32)
    plan = route(logits, config, **extras(config, 5))
    ref = route_loop(logits, config, token_ids=extras(config, 5).get("token_ids_T"))
    assert_matches(plan, ref)
    used = plan.expert_indices[plan.expert_indices >= 0]
    assert set(used.tolist()) <= {0}
    if name in ("top_k", "top_p", "threshold", "hash", "complexity"):
        assert plan.num_experts_per_token.tolist() == [1] * 5


@pytest.mark.parametrize("E", [1, 3, 8])
def test_k_equals_num_experts_uses_every_expert_in_score_order(E: int) -> None:
    logits = np.random.default_rng(E).normal(size=(6, E)).astype(np.float32)
    plan = route(logits, RouterConfig(num_experts=E, k=E))
    order = np.argsort(-logits, axis=-1, kind="stable")
    np.testing.assert_array_equal(plan.expert_indices, order)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(plan.expert_weights, np.take_along_axis(probs, order, -1),
                               rtol=1e-5)
    assert plan.expert_counts.tolist() == [6] * E


@pytest.mark.parametrize("strategy", ["top_k", "top_p", "threshold", "complexity", "relu"])
def test_all_equal_logits_break_ties_to_lower_index(strategy: str) -> None:
    config = RouterConfig(num_experts=6, strategy=strategy, k=3, top_p=0.5, threshold=0.5,
                          max_experts=None if strategy == "top_k" else 4,
                          min_experts=1 if strategy != "relu" else 2)
    logits = np.full((4, 6), 0.75, dtype=np.float32)
    plan = route(logits, config)
    for t in range(4):
        n = int(plan.num_experts_per_token[t])
        assert n >= 1
        assert plan.expert_indices[t, :n].tolist() == list(range(n))
        assert (plan.expert_indices[t, n:] == -1).all()
        assert (plan.expert_weights[t, n:] == 0.0).all()
    assert_matches(plan, route_loop(logits, config))


def test_all_equal_rows_tie_across_tokens_in_expert_choice() -> None:
    # every token scores every expert equally: each expert takes the lowest-index tokens
    config = RouterConfig(num_experts=4, strategy="expert_choice", k=1)
    plan = route(np.zeros((8, 4), dtype=np.float32), config)
    # C = ceil(8 * 1 / 4) = 2: tokens 0 and 1 get all 4 experts, the rest none
    assert plan.num_experts_per_token.tolist() == [4, 4, 0, 0, 0, 0, 0, 0]
    assert plan.expert_indices[0].tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_low_and_high_precision_inputs_are_routed_in_float32(dtype: type) -> None:
    logits = np.random.default_rng(2).normal(size=(10, 8)).astype(dtype)
    for config in configs(8).values():
        kw = extras(config, 10)
        x = logits if config.num_choices == 8 else np.concatenate([logits, logits[:, :2]], -1)
        plan = route(x, config, **kw)
        expected = route(x.astype(np.float32), config, **kw)
        assert plan.expert_weights.dtype == np.float32
        assert plan.router_probs.dtype == np.float32
        np.testing.assert_array_equal(plan.expert_indices, expected.expert_indices)
        np.testing.assert_array_equal(plan.expert_weights, expected.expert_weights)
        assert float(plan.losses.total) == float(expected.losses.total)


def test_bfloat16_numpy_input_is_upcast() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    logits = np.random.default_rng(3).normal(size=(6, 8)).astype(ml_dtypes.bfloat16)
    config = RouterConfig(num_experts=8, k=2)
    plan = route(logits, config)
    expected = route(logits.astype(np.float32), config)
    np.testing.assert_array_equal(plan.expert_indices, expected.expert_indices)
    assert plan.expert_weights.dtype == np.float32


@pytest.mark.parametrize("config", [
    RouterConfig(num_experts=8, k=1),
    RouterConfig(num_experts=8, k=1, score_func="sigmoid"),
    RouterConfig(num_experts=8, strategy="hash", k=1),
    RouterConfig(num_experts=8, strategy="complexity", max_experts=1),
], ids=["top1", "top1_sigmoid", "hash", "complexity_k1"])
def test_single_expert_rows_have_weight_exactly_one(config: RouterConfig) -> None:
    logits = np.random.default_rng(4).normal(size=(7, 8)).astype(np.float32)
    plan = route(logits, config, **extras(config, 7))
    assert plan.expert_weights[:, 0].tolist() == [1.0] * 7


def test_extreme_but_finite_logits_route_without_nan() -> None:
    logits = np.array([[1e4, -1e4, 0.0, 0.0], [-3e3, 3e3, -3e3, 0.0]], dtype=np.float32)
    for config in configs(4).values():
        x = logits if config.num_choices == 4 else np.concatenate([logits, logits[:, :2]], -1)
        plan = route(x, config, **extras(config, 2))
        assert np.isfinite(plan.expert_weights).all()
        assert all(np.isfinite(loss) for loss in plan.losses)
        ref = route_loop(x, config, token_ids=extras(config, 2).get("token_ids_T"))
        np.testing.assert_array_equal(plan.expert_indices, ref.indices)
