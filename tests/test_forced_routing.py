"""Forced / replayed routing through ``route(forced_experts_TK=...)`` on every backend: the plan
describes the forced choice (ids, counts, k histogram, capacity), gates come from the router's
scores with the strategy's own normalisation, and bad forced inputs are typed errors."""

from __future__ import annotations

import numpy as np
import pytest

import moe_router as mr

E = 6
LOGITS = np.random.default_rng(0).normal(size=(5, E)).astype(np.float32)
FORCED = np.array([[2, 0], [5, -1], [1, 3], [-1, -1], [4, 4]])


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize(("strategy", "normalizes"), [("top_k", True), ("top_p", False)])
def test_forced_plan_describes_the_forced_choice(backend, strategy: str, normalizes: bool):
    config = mr.RouterConfig(num_experts=E, k=2, strategy=strategy, max_experts=3)
    logits = backend.asarray(LOGITS, dtype="float32")
    forced = backend.asarray(FORCED, dtype="int")
    plan = mr.route(logits, config, forced_experts_TK=forced)
    ids = np.asarray(backend.to_numpy(plan.expert_indices))
    weights = np.asarray(backend.to_numpy(plan.expert_weights))
    probs = _softmax(LOGITS.astype(np.float64))
    assert ids.shape == (5, config.max_slots)
    for t, row in enumerate(FORCED):
        used = [e for e in row if e >= 0]
        gates = probs[t, used]
        if normalizes and used:
            gates = gates / gates.sum()
        order = np.argsort(-gates, kind="stable")
        assert ids[t, : len(used)].tolist() == [used[i] for i in order]
        assert (ids[t, len(used):] == -1).all()
        np.testing.assert_allclose(weights[t, : len(used)], gates[order], rtol=1e-5, atol=1e-6)
    counts = np.bincount(FORCED[FORCED >= 0], minlength=E)
    assert np.asarray(backend.to_numpy(plan.expert_counts)).tolist() == counts.tolist()
    assert np.asarray(backend.to_numpy(plan.stats.k_histogram)).tolist()[:3] == [1, 1, 3]


def test_forced_weights_are_used_as_given_and_capacity_still_applies():
    config = mr.RouterConfig(num_experts=E, k=2, capacity_factor=0.5)  # 5*2*0.5/6 -> 1 slot
    weights = np.where(FORCED >= 0, 0.5, 0.0).astype(np.float32)
    plan = mr.route(LOGITS, config, forced_experts_TK=FORCED, forced_weights_TK=weights)
    assert int(plan.num_dropped) > 0 and plan.expert_counts.max() <= 1
    assert set(np.unique(plan.expert_weights)) <= {0.0, 0.5}


@pytest.mark.parametrize(("forced", "weights", "match"), [
    (FORCED[:, :1].reshape(-1), None, "forced_experts"),                  # rank 1
    (np.zeros((5, 9), int), None, "forced_experts"),                     # k > max_slots
    (FORCED.astype(np.float32), None, "forced_experts"),                 # float ids
    (np.full((5, 2), E), None, "forced_experts"),                        # id out of range
    (FORCED, np.ones((5, 1), np.float32), "forced_weights"),             # shape mismatch
])
def test_bad_forced_inputs_are_typed_errors(forced, weights, match):
    config = mr.RouterConfig(num_experts=E, k=2)
    with pytest.raises((mr.InputError, mr.InputTypeError), match=match):
        mr.route(LOGITS, config, forced_experts_TK=forced, forced_weights_TK=weights)
