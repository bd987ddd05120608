"""Capacity and drop policy (ROUTING.md "Capacity and dropping"): counted, never silent.

Every capacity-limited plan is compared with the dropless plan of the same inputs: the slots it
keeps are dropless slots with unchanged weights, kept + dropped equals the dropless slot count,
no expert exceeds C, and the slots dropped are the ones the policy ranks last.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router import RouterConfig, route

EXAMPLES = settings(max_examples=50, deadline=None)


def slots_of(plan) -> dict[tuple[int, int], tuple[int, float]]:
    """``{(token, expert): (rank in the token's row, weight)}`` of the used slots."""
    out = {}
    for t, (row, weights) in enumerate(zip(plan.expert_indices, plan.expert_weights,
                                           strict=True)):
        for rank, (e, w) in enumerate(zip(row, weights, strict=True)):
            if e >= 0:
                out[(t, int(e))] = (rank, float(w))
    return out


@st.composite
def capacity_cases(draw: st.DrawFn) -> tuple[RouterConfig, np.ndarray, dict]:
    E = draw(st.integers(1, 8))
    T = draw(st.integers(1, 40))
    strategy = draw(st.sampled_from(["top_k", "top_k", "top_p", "threshold", "relu", "hash",
                                     "complexity"]))
    fields = {"num_experts": E, "strategy": strategy, "k": draw(st.integers(1, E)),
              "capacity_factor": draw(st.sampled_from([0.1, 0.5, 1.0, 1.25])),
              "drop_policy": draw(st.sampled_from(["position", "probability"])),
              "normalize_weights": draw(st.sampled_from([None, False]))}
    if strategy in ("top_p", "threshold", "relu", "complexity"):
        fields.update(max_experts=draw(st.integers(1, E)), min_experts=0)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([0.5, 2.0]))
    popularity = np.log(1.0 / np.arange(1, E + 1)) * draw(st.sampled_from([0.0, 2.0]))
    logits = (rng.normal(size=(T, E)) * scale + popularity).astype(np.float32)
    extra = {"token_ids_T": rng.integers(0, 1000, size=T)} if strategy == "hash" else {}
    return RouterConfig(**fields), logits, extra


@EXAMPLES
@given(case=capacity_cases())
def test_drops_are_counted_and_follow_the_policy(case: tuple) -> None:
    config, logits, extra = case
    plan = route(logits, config, **extra)
    free = route(logits, config.replace(capacity_factor=None), **extra)
    C = config.capacity(logits.shape[0])
    kept, before = slots_of(plan), slots_of(free)
    # never silent: used + dropped == slots before capacity; counts and stats agree
    assert int(plan.num_dropped) == len(before) - len(kept)
    assert int(plan.num_experts_per_token.sum()) == len(kept)
    assert int(free.num_dropped) == 0
    assert (plan.expert_counts <= C).all()
    assert plan.expert_counts.sum() == len(kept)
    assert float(plan.stats.mean_experts) == pytest.approx(len(kept) / logits.shape[0])
    # the kept slots are dropless slots with the same weight (no renormalization), in order
    for key, (_, weight) in kept.items():
        assert key in before and before[key][1] == weight
    for t in range(logits.shape[0]):
        row = [int(e) for e in plan.expert_indices[t] if e >= 0]
        assert row == [e for e in free.expert_indices[t] if e >= 0 and (t, int(e)) in kept]
        assert (plan.expert_indices[t, len(row):] == -1).all()
        assert (plan.expert_weights[t, len(row):] == 0.0).all()
    # the dropped slots are the ones the policy ranks last, per expert
    dropped = set(before) - set(kept)
    for e in range(config.num_experts):
        mine_kept = [before[key] + key for key in kept if key[1] == e]
        mine_dropped = [before[key] + key for key in dropped if key[1] == e]
        if not mine_dropped:
            continue
        assert len(mine_kept) == C  # an expert drops only when it is full
        if config.drop_policy == "position":  # (rank, token): first choices first
            assert max((r, t) for r, _, t, _ in mine_kept) < min((r, t) for r, _, t, _ in
                                                                 mine_dropped)
        else:
            assert min(w for _, w, _, _ in mine_kept) >= max(w for _, w, _, _ in mine_dropped)


def two_expert_logits(preferences: list[list[int]]) -> np.ndarray:
    """Logits where token t ranks experts as ``preferences[t]`` (best first)."""
    out = np.zeros((len(preferences), 2), dtype=np.float32)
    for t, order in enumerate(preferences):
        out[t, order[0]], out[t, order[1]] = 1.0, -1.0
    return out


def test_first_choices_beat_earlier_tokens_second_choices() -> None:
    # token 0 ranks [1, 0], tokens 1 and 2 rank [0, 1]; k=2, C = ceil(0.5 * 3 * 2 / 2) = 2.
    # Expert 0 is asked by the first choices of tokens 1, 2 and the second choice of token 0:
    # token order alone would keep token 0, but first choices come first, so token 0 loses it.
    # Expert 1: first choice of token 0, then the second choices of tokens 1 and 2 in order.
    config = RouterConfig(num_experts=2, k=2, capacity_factor=0.5)
    plan = route(two_expert_logits([[1, 0], [0, 1], [0, 1]]), config)
    assert config.capacity(3) == 2
    assert plan.expert_indices.tolist() == [[1, -1], [0, 1], [0, -1]]
    assert int(plan.num_dropped) == 2
    assert plan.expert_counts.tolist() == [2, 2]
    assert plan.stats.k_histogram.tolist() == [0, 2, 1]


def test_a_token_can_lose_every_slot_and_keeps_its_residual_path() -> None:
    # tokens 0-2 rank [0, 1], token 3 ranks [1, 0]; k=2, C = ceil(0.5 * 4 * 2 / 2) = 2.
    # Expert 0 keeps the first choices of tokens 0, 1; expert 1 keeps token 3's first choice
    # and token 0's second. Token 2 loses both slots: an empty row, counted as 2 drops.
    config = RouterConfig(num_experts=2, k=2, capacity_factor=0.5)
    plan = route(two_expert_logits([[0, 1], [0, 1], [0, 1], [1, 0]]), config)
    assert plan.expert_indices.tolist() == [[0, 1], [0, -1], [-1, -1], [1, -1]]
    assert plan.expert_weights[2].tolist() == [0.0, 0.0]
    assert int(plan.num_dropped) == 4
    assert plan.num_experts_per_token.tolist() == [2, 1, 0, 1]


def test_probability_policy_keeps_the_most_confident_tokens() -> None:
    # every token's first choice is expert 0, with rising confidence; C = ceil(0.5*3*1/2) = 1
    logits = np.array([[0.5, 0.0], [1.0, 0.0], [3.0, 0.0]], dtype=np.float32)
    base = RouterConfig(num_experts=2, k=1, capacity_factor=0.5, normalize_weights=False)
    by_position = route(logits, base)
    by_probability = route(logits, base.replace(drop_policy="probability"))
    assert by_position.expert_indices[:, 0].tolist() == [0, -1, -1]
    assert by_probability.expert_indices[:, 0].tolist() == [-1, -1, 0]
    assert int(by_position.num_dropped) == int(by_probability.num_dropped) == 2


def test_dropless_by_default_even_when_every_token_picks_one_expert() -> None:
    logits = np.tile(np.array([[5.0, 0.0, 0.0, 0.0]], dtype=np.float32), (64, 1))
    plan = route(logits, RouterConfig(num_experts=4, k=1))
    assert int(plan.num_dropped) == 0
    assert plan.expert_counts.tolist() == [64, 0, 0, 0]


@pytest.mark.parametrize(("fields", "T", "nominal"), [
    ({"k": 2}, 10, 2.0),
    ({"k": 1}, 7, 1.0),
    ({"k": 3, "strategy": "hash"}, 5, 3.0),
    ({"strategy": "top_p", "target_experts": 1.5, "max_experts": 4}, 9, 1.5),
    ({"strategy": "top_p", "max_experts": 3}, 9, 3.0),  # no target: K
    ({"strategy": "threshold"}, 3, 8.0),  # no target, no max: E
])
@pytest.mark.parametrize("factor", [0.01, 0.5, 1.0, 1.25, 2.0])
def test_capacity_is_ceil_of_factor_times_slots_over_experts(fields: dict, T: int,
                                                             nominal: float,
                                                             factor: float) -> None:
    config = RouterConfig(num_experts=8, capacity_factor=factor, **fields)
    assert config.capacity(T) == max(1, math.ceil(factor * T * nominal / 8))
    assert RouterConfig(num_experts=8, **fields).capacity(T) is None


@pytest.mark.parametrize(("factor", "T", "k", "E", "want"), [
    (1.1, 25, 2, 5, 11),  # 1.1 * 25 * 2 / 5 = 11.000000000000002 in floating point
    (1.1, 45, 2, 3, 33),
    (0.3, 10, 1, 3, 1),
    (1.2, 5, 3, 9, 2),  # 2.0 exactly
    (1.1, 24, 2, 5, 11),  # 10.56
])
def test_capacity_of_decimal_factors_is_not_off_by_one(factor: float, T: int, k: int, E: int,
                                                       want: int) -> None:
    assert RouterConfig(num_experts=E, k=k, capacity_factor=factor).capacity(T) == want


def test_expert_choice_applies_its_own_capacity_and_drops_nothing() -> None:
    logits = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    config = RouterConfig(num_experts=4, strategy="expert_choice", capacity_factor=1.0)
    plan = route(logits, config)
    assert plan.expert_counts.tolist() == [5] * 4  # C = ceil(20 * 1.0 / 4) = 5 tokens each
    assert int(plan.num_dropped) == 0
