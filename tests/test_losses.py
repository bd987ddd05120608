"""Router losses: the "hf" convention against the real transformers function, known values,
masks, the plan's losses, the aux-free bias update, and invariances (hypothesis)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_router as mr
from moe_router.losses import (
    load_balancing_loss,
    router_entropy_loss,
    router_z_loss,
    update_expert_bias,
)


def _logits(T: int, E: int, seed: int = 0, scale: float = 2.0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((T, E)) * scale).astype(np.float32)


def _top_k(logits: np.ndarray, k: int) -> np.ndarray:
    """Expert indices from ``moe_router.route`` with strategy top_k."""
    rc = mr.RouterConfig(num_experts=logits.shape[1], strategy="top_k", k=k)
    return mr.route(logits, rc).expert_indices


# ----- the "hf" convention is transformers' Mixtral load_balancing_loss_func ------------------
@pytest.fixture(scope="module")
def hf_loss() -> Any:
    torch = pytest.importorskip("torch")
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")

    def call(logits_TE: np.ndarray, E: int, k: int, mask_BS: np.ndarray | None) -> float:
        mask = None if mask_BS is None else torch.from_numpy(mask_BS)
        out = mixtral.load_balancing_loss_func((torch.from_numpy(logits_TE),), num_experts=E,
                                               top_k=k, attention_mask=mask)
        return float(out)

    return call


def _padding_mask(B: int, S: int, seed: int) -> np.ndarray:
    """(B, S) int64 attention mask, right padding, at least one real token per row."""
    lengths = np.random.default_rng(seed).integers(1, S + 1, size=B)
    return (np.arange(S)[None, :] < lengths[:, None]).astype(np.int64)


@pytest.mark.hf
@pytest.mark.torch
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
@pytest.mark.parametrize("scale", [0.5, 4.0], ids=["flat", "peaked"])
def test_hf_convention_equals_transformers_mixtral(hf_loss: Any, k: int, masked: bool,
                                                   scale: float) -> None:
    B, S, E = 3, 7, 8
    logits = _logits(B * S, E, seed=k, scale=scale)
    logits[:, 0] += 1.5  # skewed: expert 0 is popular, so the loss is far from its minimum
    mask_BS = _padding_mask(B, S, seed=k) if masked else None
    expected = hf_loss(logits, E, k, mask_BS)
    mask_T = None if mask_BS is None else mask_BS.reshape(-1)
    ours = load_balancing_loss(logits, _top_k(logits, k), E, convention="hf", mask_T=mask_T)
    assert abs(float(ours) - expected) <= 1e-6
    # the plan computes the same value when configured with the hf convention
    rc = mr.RouterConfig(num_experts=E, k=k, balance_convention="hf")
    plan = mr.route(logits, rc, mask_T=mask_T)
    assert abs(float(plan.losses.load_balancing) - expected) <= 1e-6


@pytest.mark.hf
@pytest.mark.torch
@settings(max_examples=25)
@given(B=st.integers(1, 4), S=st.integers(1, 9), E=st.integers(2, 10), data=st.data())
def test_hf_convention_matches_transformers_on_random_shapes(hf_loss: Any, B: int, S: int,
                                                             E: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(1, E), label="k")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    logits = _logits(B * S, E, seed=seed, scale=3.0)
    mask_BS = data.draw(st.sampled_from([None, _padding_mask(B, S, seed)]), label="mask")
    expected = hf_loss(logits, E, k, mask_BS)
    ours = load_balancing_loss(logits, _top_k(logits, k), E, convention="hf",
                               mask_T=None if mask_BS is None else mask_BS.reshape(-1))
    # 1e-6, relative above 1: the loss reaches k (up to 10 here), where one float32 ulp is ~1e-6
    # and the two implementations sum in different orders
    assert abs(float(ours) - expected) <= 1e-6 * max(1.0, abs(expected))


# ----- known values ----------------------------------------------------------------------------
def _round_robin(T: int, E: int, k: int) -> np.ndarray:
    """Perfectly balanced routing: token t uses experts (t*k + j) mod E."""
    return ((np.arange(T)[:, None] * k + np.arange(k)[None, :]) % E).astype(np.int64)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_switch_is_one_at_perfect_balance_uniform_probs(k: int) -> None:
    E, T = 8, 16
    logits = np.zeros((T, E), np.float32)  # uniform router probabilities
    indices = _round_robin(T, E, k)
    assert np.all(np.bincount(indices.ravel(), minlength=E) == T * k // E)
    switch = load_balancing_loss(logits, indices, E, convention="switch")
    hf = load_balancing_loss(logits, indices, E, convention="hf")
    assert float(switch) == pytest.approx(1.0, abs=1e-6)
    assert float(hf) == pytest.approx(k, abs=1e-5)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_switch_is_one_at_perfect_balance_peaked_probs(k: int) -> None:
    """Each token is confident, but the batch is balanced: token t's logits are a rotation."""
    E, T = 8, 24
    base = np.sort(np.random.default_rng(k).standard_normal(E) * 3.0).astype(np.float32)
    logits = np.stack([np.roll(base, t) for t in range(T)])
    indices = _top_k(logits, k)
    assert np.all(np.bincount(indices.ravel(), minlength=E) == T * k // E)
    assert float(load_balancing_loss(logits, indices, E)) == pytest.approx(1.0, abs=1e-5)
    assert float(load_balancing_loss(logits, indices, E, convention="hf")) == pytest.approx(
        k, abs=1e-5)


def test_switch_penalizes_collapse() -> None:
    """All tokens confidently on one expert: the loss approaches E (its maximum)."""
    E, T = 8, 16
    logits = np.zeros((T, E), np.float32)
    logits[:, 3] = 20.0
    indices = _top_k(logits, 1)
    assert np.all(indices == 3)
    assert float(load_balancing_loss(logits, indices, E)) == pytest.approx(E, rel=1e-4)


def test_z_loss_of_zero_logits_is_ln8_squared() -> None:
    value = float(router_z_loss(np.zeros((5, 8), np.float32)))
    assert value == pytest.approx(math.log(8) ** 2, rel=1e-6)
    assert round(value, 3) == 4.324


@pytest.mark.parametrize("E", [1, 2, 8, 64])
def test_entropy_of_uniform_logits_is_ln_e(E: int) -> None:
    logits = np.full((4, E), 1.7, np.float32)
    assert float(router_entropy_loss(logits)) == pytest.approx(math.log(E), abs=1e-6)


def test_entropy_of_confident_router_is_zero() -> None:
    logits = np.zeros((4, 8), np.float32)
    logits[:, 2] = 200.0  # probabilities underflow to exactly 0 and 1: no NaN from 0 * log 0
    assert float(router_entropy_loss(logits)) == pytest.approx(0.0, abs=1e-6)


def test_z_and_entropy_match_a_per_token_loop() -> None:
    logits = _logits(9, 6, seed=11, scale=5.0)
    lse = [math.log(sum(math.exp(float(v)) for v in row)) for row in logits]
    z = sum(v * v for v in lse) / len(lse)
    entropies = []
    for row, norm in zip(logits, lse):
        probs = [math.exp(float(v) - norm) for v in row]
        entropies.append(-sum(p * math.log(p) for p in probs if p > 0))
    assert float(router_z_loss(logits)) == pytest.approx(z, rel=1e-5)
    assert float(router_entropy_loss(logits)) == pytest.approx(np.mean(entropies), rel=1e-5)


def test_load_balancing_matches_a_per_token_loop() -> None:
    """Dynamic routing (unused -1 slots) with a mask, against the formula written out by hand."""
    E, T = 6, 11
    logits = _logits(T, E, seed=12)
    plan = mr.route(logits, mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.7))
    mask = np.array([1] * 8 + [0] * 3)
    slots = [0] * E
    prob_sum = [0.0] * E
    for t in range(T):
        if not mask[t]:
            continue
        row = [math.exp(float(v)) for v in logits[t]]
        for e in range(E):
            prob_sum[e] += row[e] / sum(row)
        for e in plan.expert_indices[t]:
            if e >= 0:
                slots[e] += 1
    n = int(mask.sum())
    switch = E * sum(slots[e] / sum(slots) * prob_sum[e] / n for e in range(E))
    hf = E * sum(slots[e] / n * prob_sum[e] / n for e in range(E))
    assert float(load_balancing_loss(logits, plan.expert_indices, E, mask_T=mask)) == (
        pytest.approx(switch, rel=1e-5))
    assert float(load_balancing_loss(logits, plan.expert_indices, E, convention="hf",
                                     mask_T=mask)) == pytest.approx(hf, rel=1e-5)


def test_null_expert_logits_use_the_first_e_columns_without_k() -> None:
    """With N null experts the logits are (T, E + N); P is the softmax over all E + N; without
    ``k`` only the first E columns enter."""
    E, N, T = 4, 2, 10
    logits = _logits(T, E + N, seed=13)
    plan = mr.route(logits, mr.RouterConfig(num_experts=E, num_null_experts=N, k=2))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    counts = np.bincount(plan.expert_indices[plan.expert_indices >= 0], minlength=E)
    expected = E * np.sum(counts / counts.sum() * probs[:, :E].mean(0))
    assert float(load_balancing_loss(logits, plan.expert_indices, E)) == pytest.approx(
        expected, rel=1e-5)


def _null_aware(logits: np.ndarray, indices: np.ndarray, E: int, k: int,
                convention: str = "switch") -> float:
    """AdaMoE's balance over E + N choices, null experts pooled, written out per choice."""
    T, C = logits.shape
    N = C - E
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    real = np.bincount(indices[indices >= 0], minlength=E).astype(np.float64)
    null_slots = float(np.sum(k - (indices >= 0).sum(-1)))
    slots = np.concatenate([real, np.full(N, null_slots / N)])  # each null: 1/N of them
    pmean = np.concatenate([probs[:, :E].mean(0), np.full(N, probs[:, E:].sum(-1).mean() / N)])
    fraction = slots / slots.sum() if convention == "switch" else slots / T
    return float(C * np.sum(fraction * pmean))


@pytest.mark.parametrize("convention", ["switch", "hf"])
def test_null_aware_balance_loss_pools_the_null_experts(convention: str) -> None:
    """The routed plan's loss balances over all E + N choices (AdaMoE): 1.0 at perfect balance,
    and moving probability onto the null experts is not free."""
    E, N, T, k = 4, 2, 64, 3
    logits = _logits(T, E + N, seed=5)
    rc = mr.RouterConfig(num_experts=E, num_null_experts=N, k=k, balance_convention=convention)
    plan = mr.route(logits, rc)
    expected = _null_aware(logits, np.asarray(plan.expert_indices), E, k, convention)
    assert float(plan.losses.load_balancing) == pytest.approx(expected, rel=1e-5)
    assert float(load_balancing_loss(logits, plan.expert_indices, E, convention=convention,
                                     k=k)) == pytest.approx(expected, rel=1e-5)
    # all logits equal and every choice used equally often: the switch loss is exactly 1
    flat = np.zeros((6, E + N), np.float32)
    even = np.array([[0, 1, -1], [2, 3, -1], [0, -1, -1], [1, -1, -1], [2, -1, -1], [3, -1, -1]])
    assert _null_aware(flat, even, E, k) == pytest.approx(1.0)
    assert float(load_balancing_loss(flat, even, E, k=k)) == pytest.approx(1.0, rel=1e-6)
    # tokens that lean on the null experts (one real expert each of k = 3): piling more
    # probability onto the nulls now costs, where the first-E-columns loss rewarded it
    lean = np.stack([np.arange(T) % E, -np.ones(T, int), -np.ones(T, int)], axis=1)
    shifted = logits.copy()
    shifted[:, E:] += 3.0
    assert float(load_balancing_loss(shifted, lean, E, k=k)) > float(
        load_balancing_loss(logits, lean, E, k=k))
    assert float(load_balancing_loss(shifted, lean, E)) < float(
        load_balancing_loss(logits, lean, E))


def test_unknown_convention_is_a_typed_error() -> None:
    logits = _logits(4, 4)
    with pytest.raises(mr.InputError, match="convention"):
        load_balancing_loss(logits, _top_k(logits, 2), 4, convention="mixtral")  # type: ignore


# ----- masks -----------------------------------------------------------------------------------
@given(T=st.integers(1, 24), E=st.integers(1, 8), seed=st.integers(0, 2**16), data=st.data())
def test_masked_tokens_are_excluded(T: int, E: int, seed: int, data: st.DataObject) -> None:
    """Every loss with a mask equals the loss of the unmasked tokens alone."""
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=T, max_size=T), label="mask"))
    if not mask.any():
        mask[data.draw(st.integers(0, T - 1), label="keep")] = True
    logits = _logits(T, E, seed=seed, scale=3.0)
    indices = _top_k(logits, data.draw(st.integers(1, E), label="k"))
    kept_logits, kept_indices = logits[mask], indices[mask]
    for as_type in (bool, np.float32, np.int32):
        m = mask.astype(as_type)
        for convention in ("switch", "hf"):
            np.testing.assert_allclose(
                load_balancing_loss(logits, indices, E, convention=convention, mask_T=m),
                load_balancing_loss(kept_logits, kept_indices, E, convention=convention),
                rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(router_z_loss(logits, mask_T=m), router_z_loss(kept_logits),
                                   rtol=1e-5)
        np.testing.assert_allclose(router_entropy_loss(logits, mask_T=m),
                                   router_entropy_loss(kept_logits), rtol=1e-5, atol=1e-6)


def test_padding_values_do_not_leak_into_losses() -> None:
    logits = _logits(8, 4, seed=3)
    mask = np.array([1, 1, 1, 1, 1, 0, 0, 0])
    poisoned = logits.copy()
    poisoned[5:] = 1e4  # huge padding logits would dominate every loss if they were counted
    indices = _top_k(logits, 2)
    for fn in (router_z_loss, router_entropy_loss):
        np.testing.assert_allclose(fn(poisoned, mask_T=mask), fn(logits, mask_T=mask), rtol=1e-6)
    np.testing.assert_allclose(load_balancing_loss(poisoned, indices, 4, mask_T=mask),
                               load_balancing_loss(logits, indices, 4, mask_T=mask), rtol=1e-6)


# ----- the plan carries the same losses -----------------------------------------------------------
@pytest.mark.parametrize(("config", "width"), [
    (dict(strategy="top_k", k=2), 8),
    (dict(strategy="top_k", k=2, balance_convention="hf"), 8),
    (dict(strategy="top_p", top_p=0.5, max_experts=4), 8),
    (dict(strategy="top_k", k=3, num_null_experts=2), 10),
    (dict(strategy="top_k", k=2, capacity_factor=0.5), 8),
])
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_plan_losses_equal_the_standalone_functions(config: dict, width: int,
                                                    masked: bool) -> None:
    E, T = 8, 20
    rc = mr.RouterConfig(num_experts=E, aux_loss_coef=0.01, z_loss_coef=1e-3,
                         entropy_loss_coef=0.1, **config)
    logits = _logits(T, width, seed=21)
    mask = (np.arange(T) % 4 != 3).astype(np.float32) if masked else None
    plan = mr.route(logits, rc, mask_T=mask)
    lb = load_balancing_loss(logits, plan.expert_indices, E, convention=rc.balance_convention,
                             mask_T=mask, k=rc.k if rc.num_null_experts else None)
    z = router_z_loss(logits, mask_T=mask)
    ent = router_entropy_loss(logits, mask_T=mask)
    np.testing.assert_allclose(plan.losses.load_balancing, lb, rtol=1e-6)
    np.testing.assert_allclose(plan.losses.z_loss, z, rtol=1e-6)
    np.testing.assert_allclose(plan.losses.entropy, ent, rtol=1e-6)
    np.testing.assert_allclose(plan.losses.total, 0.01 * lb + 1e-3 * z + 0.1 * ent, rtol=1e-6)
    np.testing.assert_allclose(plan.stats.router_entropy, ent, rtol=1e-6)
    for value in plan.losses:
        assert np.asarray(value).shape == () and np.asarray(value).dtype == np.float32


def test_loss_coefficients_of_zero_give_zero_total() -> None:
    rc = mr.RouterConfig(num_experts=4, aux_loss_coef=0.0)
    plan = mr.route(_logits(6, 4), rc)
    assert float(plan.losses.total) == 0.0 and float(plan.losses.load_balancing) > 0.0


# ----- aux-loss-free bias update ------------------------------------------------------------------
def test_update_expert_bias_moves_by_rate_and_centers() -> None:
    counts = np.array([10, 2, 6, 6])  # mean 6: expert 0 overloaded, expert 1 underloaded
    new = update_expert_bias(np.zeros(4, np.float32), counts, rate=0.01)
    np.testing.assert_allclose(new, [-0.01, 0.01, 0.0, 0.0], atol=1e-8)
    bias = np.array([0.3, -0.1, 0.05, 0.0], np.float32)
    new = update_expert_bias(bias, counts, rate=0.01)
    moved = bias + 0.01 * np.array([-1, 1, 0, 0])
    np.testing.assert_allclose(new, moved - moved.mean(), atol=1e-7)
    assert abs(float(np.sum(new))) < 1e-6 and new.dtype == np.float32


def test_update_expert_bias_balanced_load_only_centers() -> None:
    bias = np.array([0.5, 0.1, -0.2], np.float32)
    new = update_expert_bias(bias, np.array([4, 4, 4]), rate=0.1)
    np.testing.assert_allclose(new, bias - bias.mean(), atol=1e-7)


def test_bias_updates_balance_a_skewed_router() -> None:
    """DeepSeek-V3 loop: route with the bias, update it from the counts; max load falls."""
    E, T = 8, 256
    logits = _logits(T, E, seed=5, scale=1.0)
    logits[:, :2] += 1.5  # experts 0 and 1 are favoured by the router
    rc = mr.RouterConfig(num_experts=E, k=2, score_func="sigmoid", use_expert_bias=True)
    bias = np.zeros(E, np.float32)
    first = mr.route(logits, rc, expert_bias_E=bias)
    for _ in range(60):
        counts = mr.route(logits, rc, expert_bias_E=bias).expert_counts
        bias = update_expert_bias(bias, counts, rate=0.02)
    last = mr.route(logits, rc, expert_bias_E=bias)
    before = first.expert_counts.max() / first.expert_counts.mean()
    after = last.expert_counts.max() / last.expert_counts.mean()
    assert before > 2.0 and after < 1.3, (before, after)
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down
    # the bias only selects: weights are still the renormalized sigmoid scores of the chosen
    scores = 1.0 / (1.0 + np.exp(-logits))
    chosen = np.take_along_axis(scores, last.expert_indices, axis=-1)
    np.testing.assert_allclose(last.expert_weights, chosen / chosen.sum(-1, keepdims=True),
                               rtol=1e-5)


# ----- invariances --------------------------------------------------------------------------------
@given(T=st.integers(1, 24), E=st.integers(2, 8), seed=st.integers(0, 2**16), data=st.data())
def test_losses_invariant_to_token_and_expert_permutations(T: int, E: int, seed: int,
                                                           data: st.DataObject) -> None:
    logits = _logits(T, E, seed=seed, scale=3.0)
    indices = _top_k(logits, data.draw(st.integers(1, E), label="k"))
    tokens = np.array(data.draw(st.permutations(range(T)), label="token_perm"))
    experts = np.array(data.draw(st.permutations(range(E)), label="expert_perm"))
    relabel = np.argsort(experts)  # old expert id -> new column
    moved_logits = logits[tokens][:, experts]
    moved_indices = relabel[indices[tokens]]
    for convention in ("switch", "hf"):
        np.testing.assert_allclose(
            load_balancing_loss(moved_logits, moved_indices, E, convention=convention),
            load_balancing_loss(logits, indices, E, convention=convention), rtol=1e-5)
    np.testing.assert_allclose(router_z_loss(moved_logits), router_z_loss(logits), rtol=1e-5)
    np.testing.assert_allclose(router_entropy_loss(moved_logits), router_entropy_loss(logits),
                               rtol=1e-5, atol=1e-6)


@given(T=st.integers(1, 24), E=st.integers(2, 8), p=st.floats(0.05, 1.0),
       seed=st.integers(0, 2**16), data=st.data())
def test_hf_equals_switch_times_mean_k(T: int, E: int, p: float, seed: int,
                                       data: st.DataObject) -> None:
    """hf divides slot counts by tokens, switch by slots: hf = switch * mean experts/token."""
    logits = _logits(T, E, seed=seed, scale=2.0)
    mask = np.array(data.draw(st.lists(st.booleans(), min_size=T, max_size=T), label="mask"))
    mask[0] = True
    plan = mr.route(logits, mr.RouterConfig(num_experts=E, strategy="top_p", top_p=p),
                    mask_T=mask)
    switch = load_balancing_loss(logits, plan.expert_indices, E, mask_T=mask)
    hf = load_balancing_loss(logits, plan.expert_indices, E, convention="hf", mask_T=mask)
    np.testing.assert_allclose(hf, switch * plan.stats.mean_experts, rtol=1e-5)


@given(T=st.integers(1, 16), E=st.integers(1, 8), shift=st.floats(-50, 50),
       seed=st.integers(0, 2**16))
def test_shifting_logits_changes_only_the_z_loss(T: int, E: int, shift: float,
                                                 seed: int) -> None:
    """Softmax is shift invariant; the z-loss is exactly what penalizes large logits."""
    logits = _logits(T, E, seed=seed)
    shifted = (logits + np.float32(shift)).astype(np.float32)
    indices = _top_k(logits, 1)
    np.testing.assert_allclose(load_balancing_loss(shifted, indices, E),
                               load_balancing_loss(logits, indices, E), rtol=1e-4)
    np.testing.assert_allclose(router_entropy_loss(shifted), router_entropy_loss(logits),
                               rtol=1e-4, atol=1e-5)
    lse = np.log(np.exp(logits.astype(np.float64)).sum(-1)) + shift
    np.testing.assert_allclose(router_z_loss(shifted), np.mean(lse**2), rtol=1e-4, atol=1e-4)
