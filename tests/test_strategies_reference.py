"""Every strategy of ``route()`` on NumPy equals the independent per-token loop of tests/loops.py.

Hypothesis draws T, E, k, p, t, min/max, the normalize flag, score_func, null experts, bias,
groups, capacity and drop policy, over logits that are i.i.d. normal, quantized (ties), all-equal
rows, skewed (popular experts), peaked (one confident expert) and exact dyadic rows that put a
cumulative sum exactly on the top-p / threshold boundary.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from loops import assert_matches, route_loop, state_dict

from moe_router import ConfigError, RouterConfig, RouterState, route

EXAMPLES = settings(max_examples=40, deadline=None)
KINDS = ("normal", "quantized", "equal", "skewed", "peaked", "dyadic")


# ----- inputs ----------------------------------------------------------------------------------
def make_logits(kind: str, T: int, C: int, seed: int) -> np.ndarray:
    """``(T, C)`` float32 router logits of one family (see the module docstring)."""
    rng = np.random.default_rng(seed)
    if kind == "normal":
        return (rng.normal(size=(T, C)) * rng.choice([0.1, 1.0, 4.0])).astype(np.float32)
    if kind == "quantized":  # few distinct values: many exact ties within a row
        return (rng.integers(-2, 3, size=(T, C)) * 0.5).astype(np.float32)
    if kind == "equal":  # all-equal rows mixed with normal ones
        out = rng.normal(size=(T, C))
        equal = rng.random(T) < 0.5
        out[equal] = rng.normal(size=(int(equal.sum()), 1))
        return out.astype(np.float32)
    if kind == "skewed":  # Zipf-like expert popularity
        popularity = np.log(1.0 / np.arange(1, C + 1)) * 2.0
        return (rng.normal(size=(T, C)) + popularity).astype(np.float32)
    if kind == "peaked":  # one confident expert per token
        out = rng.normal(scale=0.3, size=(T, C))
        out[np.arange(T), rng.integers(0, C, size=T)] += rng.uniform(2.0, 8.0, size=T)
        return out.astype(np.float32)
    return dyadic_logits(T, C, rng)


def dyadic_logits(T: int, C: int, rng: np.random.Generator) -> np.ndarray:
    """Rows whose softmax is exact in float32 (1/m for m live experts, or 1/2, 1/4, 1/4), so
    cumulative sums land exactly on 0.25, 0.5, 0.75, 1.0."""
    out = np.full((T, C), -1000.0, dtype=np.float32)  # exp underflows to exactly 0
    for t in range(T):
        live = rng.permutation(C)
        if C >= 3 and rng.random() < 0.4:
            out[t, live[0]] = np.log(2.0)
            out[t, live[1:3]] = 0.0
        else:
            m = min(C, int(rng.choice([1, 2, 4, 8])))
            out[t, live[:m]] = 0.0
    return out


def with_mask(draw: st.DrawFn, T: int, seed: int) -> np.ndarray | None:
    if not draw(st.booleans()):
        return None
    return (np.random.default_rng(seed + 1).random(T) < 0.7).astype(np.float32)


def config_or_reject(**fields) -> RouterConfig:
    try:
        return RouterConfig(**fields)
    except ConfigError:
        assume(False)
        raise  # unreachable


@st.composite
def common(draw: st.DrawFn, max_e: int = 10) -> dict:
    E = draw(st.integers(1, max_e))
    return {"T": draw(st.integers(1, 24)), "E": E, "seed": draw(st.integers(0, 2**32 - 1)),
            "kind": draw(st.sampled_from(KINDS))}


def clamps(draw: st.DrawFn, E: int) -> dict:
    max_experts = draw(st.one_of(st.none(), st.integers(1, E)))
    high = E if max_experts is None else max_experts
    return {"max_experts": max_experts, "min_experts": draw(st.integers(0, min(high, 3)))}


def capacity(draw: st.DrawFn) -> dict:
    return {"capacity_factor": draw(st.sampled_from([None, None, 0.25, 0.3, 1.0, 1.1, 1.25, 2.2])),
            "drop_policy": draw(st.sampled_from(["position", "probability"]))}


def bias_for(draw: st.DrawFn, E: int, seed: int) -> np.ndarray | None:
    if not draw(st.booleans()):
        return None
    rng = np.random.default_rng(seed + 2)
    if draw(st.booleans()):
        return (rng.integers(-1, 2, size=E) * 0.25).astype(np.float32)
    return (rng.normal(size=E) * 0.1).astype(np.float32)


# ----- comparison ------------------------------------------------------------------------------
def run_both(config: RouterConfig, logits: np.ndarray, **extra) -> tuple:
    names = {"token_ids": "token_ids_T", "hidden": "hidden_TD", "attention": "attention_probs",
             "external": "complexity_scores_T", "bias": "expert_bias_E", "mask": "mask_T"}
    kwargs = {names[k]: v for k, v in extra.items() if k in names and v is not None}
    state = extra.get("state")
    training = extra.get("training", False)
    plan = route(logits, config, state=state, training=training, **kwargs)
    loop_extra = {k: v for k, v in extra.items() if k in names}
    ref = route_loop(logits, config, state=state_dict(state), training=training, **loop_extra)
    return plan, ref


# ----- the top-k family ------------------------------------------------------------------------
@EXAMPLES
@given(data=st.data(), c=common())
def test_top_k_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    k = draw(st.integers(1, E))
    groups: dict = {}
    if draw(st.booleans()):
        G = draw(st.sampled_from([g for g in range(1, E + 1) if E % g == 0]))
        groups = {"num_groups": G, "topk_groups": draw(st.integers(1, G))}
    config = config_or_reject(
        num_experts=E, strategy="top_k", k=k,
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.sampled_from([None, True, False])),
        max_experts=draw(st.one_of(st.none(), st.integers(1, E))),
        route_scale=draw(st.sampled_from([1.0, 2.5])),
        balance_convention=draw(st.sampled_from(["switch", "hf"])),
        z_loss_coef=1e-3, entropy_loss_coef=1e-2, **groups, **capacity(draw))
    logits = make_logits(c["kind"], c["T"], E, c["seed"])
    plan, ref = run_both(config, logits, bias=bias_for(draw, E, c["seed"]),
                         mask=with_mask(draw, c["T"], c["seed"]))
    assert_matches(plan, ref)


@EXAMPLES
@given(data=st.data(), c=common(max_e=8))
def test_null_experts_match_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    N = draw(st.integers(1, 4))
    config = config_or_reject(
        num_experts=E, strategy="top_k", num_null_experts=N, k=draw(st.integers(1, E + N)),
        normalize_weights=draw(st.sampled_from([None, True, False])),
        score_func=draw(st.sampled_from(["softmax", "softmax", "sigmoid"])),
        **clamps(draw, E), **capacity(draw))
    logits = make_logits(c["kind"], c["T"], E + N, c["seed"])
    plan, ref = run_both(config, logits, bias=bias_for(draw, E, c["seed"]))
    assert_matches(plan, ref)


# ----- dynamic strategies ----------------------------------------------------------------------
P_VALUES = st.one_of(st.sampled_from([0.25, 0.5, 0.75, 1.0]),
                     st.floats(0.01, 1.0, allow_nan=False))


@EXAMPLES
@given(data=st.data(), c=common())
def test_top_p_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    config = config_or_reject(num_experts=E, strategy="top_p", top_p=draw(P_VALUES),
                              score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                              normalize_weights=draw(st.sampled_from([None, True, False])),
                              **clamps(draw, E), **capacity(draw))
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]),
                         mask=with_mask(draw, c["T"], c["seed"]))
    assert_matches(plan, ref)


@EXAMPLES
@given(data=st.data(), c=common())
def test_threshold_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    config = config_or_reject(num_experts=E, strategy="threshold", threshold=draw(P_VALUES),
                              score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
                              normalize_weights=draw(st.sampled_from([None, True, False])),
                              **clamps(draw, E), **capacity(draw))
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]))
    assert_matches(plan, ref)


@EXAMPLES
@given(data=st.data(), c=common())
def test_relu_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    config = config_or_reject(num_experts=E, strategy="relu",
                              normalize_weights=draw(st.sampled_from([None, True, False])),
                              route_scale=draw(st.sampled_from([1.0, 0.5])),
                              **clamps(draw, E), **capacity(draw))
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]))
    assert_matches(plan, ref)


@EXAMPLES
@given(data=st.data(), c=common())
def test_expert_choice_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    config = config_or_reject(
        num_experts=E, strategy="expert_choice", k=draw(st.integers(1, E)),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        capacity_factor=draw(st.sampled_from([None, 0.5, 1.1, 1.25, 2.2, 3.0])),
        normalize_weights=draw(st.sampled_from([None, True, False])),
        max_experts=draw(st.one_of(st.none(), st.integers(1, E))))
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]))
    assert_matches(plan, ref)
    assert int(plan.num_dropped) == 0  # expert choice has its own capacity, nothing dropped


@EXAMPLES
@given(data=st.data(), c=common())
def test_hash_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    config = config_or_reject(
        num_experts=E, strategy="hash", k=draw(st.integers(1, E)),
        hash_buckets=draw(st.sampled_from([1, 7, 65536])), hash_seed=draw(st.integers(0, 3)),
        normalize_weights=draw(st.sampled_from([None, True, False])),
        max_experts=draw(st.one_of(st.none(), st.integers(1, E))), **capacity(draw))
    token_ids = np.random.default_rng(c["seed"]).integers(-5, 50000, size=c["T"])
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]),
                         token_ids=token_ids)
    assert_matches(plan, ref)


ESTIMATORS = ("router_entropy", "hidden_norm", "attention_entropy", "external")


def estimator_inputs(name: str, T: int, seed: int) -> dict:
    rng = np.random.default_rng(seed + 3)
    if name == "hidden_norm":
        return {"hidden": rng.normal(size=(T, 6)).astype(np.float32) * rng.uniform(0.5, 2.0,
                                                                                   (T, 1))}
    if name == "attention_entropy":
        shape = (T, 5) if rng.random() < 0.5 else (2, T, 5)
        raw = rng.normal(size=shape) * 2.0
        attn = np.exp(raw) / np.exp(raw).sum(-1, keepdims=True)
        return {"attention": attn.astype(np.float32)}
    if name == "external":  # quantized: ties in the score
        return {"external": (rng.integers(0, 4, size=T) * 0.5).astype(np.float32)}
    return {}


@EXAMPLES
@given(data=st.data(), c=common())
def test_complexity_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    cl = clamps(draw, E)
    high = E if cl["max_experts"] is None else cl["max_experts"]
    target = draw(st.one_of(st.none(), st.floats(cl["min_experts"], high, allow_nan=False)))
    estimator = draw(st.sampled_from(ESTIMATORS))
    config = config_or_reject(
        num_experts=E, strategy="complexity", complexity_estimator=estimator,
        target_experts=target, complexity_spread=draw(st.sampled_from([None, 1.0, 2.5])),
        normalize_weights=draw(st.sampled_from([None, True, False])), **cl, **capacity(draw))
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]),
                         bias=bias_for(draw, E, c["seed"]),
                         **estimator_inputs(estimator, c["T"], c["seed"]))
    assert_matches(plan, ref)


@EXAMPLES
@given(data=st.data(), c=common(max_e=8))
def test_complexity_with_state_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    assume(E >= 2)
    config = config_or_reject(num_experts=E, strategy="complexity", min_experts=1,
                              target_experts=draw(st.floats(1.0, E, allow_nan=False)),
                              causal=draw(st.booleans()))
    count = draw(st.sampled_from([0.0, 1.0, 5.0]))
    state = RouterState(top_p=np.float32(0.5), score_mean=np.float32(draw(st.floats(0, 2))),
                        score_var=np.float32(draw(st.floats(0.01, 1))),
                        score_count=np.float32(count),
                        k_offset=np.float32(draw(st.floats(-0.5, 0.5))))
    training = draw(st.booleans())
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]), state=state,
                         training=training)
    assert_matches(plan, ref)
    got = state_dict(plan.state)
    for key, want in ref.state.items():
        assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key


@EXAMPLES
@given(data=st.data(), c=common())
def test_top_p_controller_matches_loop(data: st.DataObject, c: dict) -> None:
    draw, E = data.draw, c["E"]
    config = config_or_reject(num_experts=E, strategy="top_p",
                              target_experts=draw(st.floats(1.0, E, allow_nan=False)),
                              controller_rate=0.05)
    state = RouterState(top_p=np.float32(draw(P_VALUES)), score_mean=np.float32(0),
                        score_var=np.float32(1), score_count=np.float32(0),
                        k_offset=np.float32(0))
    training = draw(st.booleans())
    plan, ref = run_both(config, make_logits(c["kind"], c["T"], E, c["seed"]), state=state,
                         training=training)
    assert_matches(plan, ref)
    assert float(plan.state.top_p) == pytest.approx(ref.state["top_p"], rel=1e-6)


# ----- exact boundaries, worked by hand from ROUTING.md ----------------------------------------
HALF_QUARTERS = np.array([[np.log(2.0), 0.0, 0.0]], dtype=np.float32)  # probs 0.5, 0.25, 0.25
QUARTERS = np.zeros((1, 4), dtype=np.float32)  # probs 0.25 x 4, all tied


@pytest.mark.parametrize(("logits", "p", "want"), [
    (HALF_QUARTERS, 0.5, [0, 1]),  # cum 0.5 is not > 0.5: the next expert is needed
    (HALF_QUARTERS, 0.75, [0, 1, 2]),  # cum 0.75 is not > 0.75
    (HALF_QUARTERS, 0.49, [0]),
    (HALF_QUARTERS, 1.0, [0, 1, 2]),  # no prefix sum > 1: all experts
    (QUARTERS, 0.5, [0, 1, 2]),  # ties: lower index first
    (QUARTERS, 0.25, [0, 1]),
])
def test_top_p_boundary(logits: np.ndarray, p: float, want: list[int]) -> None:
    config = RouterConfig(num_experts=logits.shape[1], strategy="top_p", top_p=p)
    plan, ref = run_both(config, logits)
    assert_matches(plan, ref)
    assert plan.expert_indices[0, : len(want)].tolist() == want
    assert int(plan.num_experts_per_token[0]) == len(want)


@pytest.mark.parametrize(("logits", "t", "want"), [
    (HALF_QUARTERS, 0.5, [0]),  # before expert 1: 0.5, not < 0.5
    (HALF_QUARTERS, 0.51, [0, 1]),
    (HALF_QUARTERS, 0.75, [0, 1]),  # before expert 2: 0.75, not < 0.75
    (HALF_QUARTERS, 1.0, [0, 1, 2]),
    (QUARTERS, 0.5, [0, 1]),
    (QUARTERS, 0.01, [0]),  # always the first
])
def test_threshold_boundary(logits: np.ndarray, t: float, want: list[int]) -> None:
    config = RouterConfig(num_experts=logits.shape[1], strategy="threshold", threshold=t)
    plan, ref = run_both(config, logits)
    assert_matches(plan, ref)
    assert plan.expert_indices[0, : len(want)].tolist() == want


def test_clamps_apply_to_dynamic_strategies() -> None:
    # one confident expert: top_p would pick 1 expert, the clamp raises it to 2 (and caps at 3)
    logits = np.array([[8.0, 0.0, 0.0, 0.0, 0.0], [0.0] * 5], dtype=np.float32)
    config = RouterConfig(num_experts=5, strategy="top_p", top_p=0.9, min_experts=2,
                          max_experts=3)
    plan, ref = run_both(config, logits)
    assert_matches(plan, ref)
    assert plan.num_experts_per_token.tolist() == [2, 3]


def test_group_limit_masks_whole_groups() -> None:
    # groups {0,1} {2,3} {4,5}; by top-2 sums group 2 wins, then group 0: expert 2 is excluded
    # even though it has the best score overall
    scores = np.array([[0.5, 0.4, 0.8, -3.0, 0.6, 0.55]], dtype=np.float32)
    config = RouterConfig(num_experts=6, k=2, score_func="sigmoid", num_groups=3,
                          topk_groups=2, route_scale=2.0)
    plan, ref = run_both(config, scores)
    assert_matches(plan, ref)
    assert plan.expert_indices[0].tolist() == [4, 5]
    assert float(plan.expert_weights[0].sum()) == pytest.approx(2.0, rel=1e-6)


# ----- exact scores where float32 ones tie or round (ROUTING.md is about the exact scores) -----
@pytest.mark.parametrize(("score_func", "logits", "k", "want"), [
    ("sigmoid", [20.0, 30.0, 25.0], 2, [1, 2]),  # every sigmoid rounds to 1.0 in float32
    ("softmax", [0.0, -200.0, -150.0, -300.0], 3, [0, 2, 1]),  # 2 and 1 underflow to 0.0
])
def test_selection_follows_the_exact_scores(score_func: str, logits: list, k: int,
                                            want: list[int]) -> None:
    z = np.array([logits], dtype=np.float32)
    config = RouterConfig(num_experts=z.shape[1], k=k, score_func=score_func)
    plan, ref = run_both(config, z)
    assert_matches(plan, ref)
    assert plan.expert_indices[0].tolist() == want
    ec = RouterConfig(num_experts=z.shape[1], strategy="expert_choice", k=k,
                      score_func=score_func, max_experts=k)
    plan, ref = run_both(ec, np.concatenate([z, z[:, ::-1]]))
    assert_matches(plan, ref)


def test_top_p_one_keeps_every_expert_when_float32_sums_pass_one() -> None:
    # the float32 cumulative sum of these sorted probabilities is 1.0000001 before the last
    # expert; the exact one never exceeds 1, so no prefix sum is > 1: all experts
    z = np.array([[-1.1082926988601685, 9.823249816894531, -2.248196601867676,
                   -3.903069019317627, 4.501016139984131, -7.22557258605957]], np.float32)
    sorted_probs = np.sort(route(z, RouterConfig(num_experts=6)).router_probs[0])[::-1]
    assert np.cumsum(sorted_probs, dtype=np.float32)[-2] > 1.0
    plan, ref = run_both(RouterConfig(num_experts=6, strategy="top_p", top_p=1.0), z)
    assert_matches(plan, ref)
    assert int(plan.num_experts_per_token[0]) == 6


def test_threshold_one_keeps_every_expert_when_the_tail_underflows() -> None:
    # probabilities 1, 0, 0 in float32: the mass before experts 1 and 2 rounds to 1.0, but the
    # exact mass is < 1 (every exact softmax probability is > 0), so t = 1.0 keeps them
    z = np.array([[0.0, -200.0, -300.0]], np.float32)
    plan, ref = run_both(RouterConfig(num_experts=3, strategy="threshold", threshold=1.0), z)
    assert_matches(plan, ref)
    assert plan.expert_indices[0].tolist() == [0, 1, 2]


def test_hash_uses_k_experts_when_max_experts_is_wider() -> None:
    # k is "experts per token for top_k and hash"; max_experts only widens the plan
    config = RouterConfig(num_experts=8, strategy="hash", k=1, max_experts=3)
    plan, ref = run_both(config, np.zeros((5, 8), np.float32), token_ids=np.arange(5))
    assert_matches(plan, ref)
    assert plan.num_experts_per_token.tolist() == [1] * 5
    assert (plan.expert_indices[:, 1:] == -1).all() and (plan.expert_weights[:, 0] == 1.0).all()


@pytest.mark.parametrize("noise", ["normal", "gumbel", "jitter"])
def test_noise_only_in_training_and_seeded(noise: str) -> None:
    logits = make_logits("normal", 64, 8, seed=0)
    config = RouterConfig(num_experts=8, k=2, noise=noise, noise_std=1.0)
    clean = route(logits, config.replace(noise="none"))
    at_eval = route(logits, config, rng=0)
    np.testing.assert_array_equal(at_eval.expert_indices, clean.expert_indices)
    np.testing.assert_array_equal(at_eval.expert_weights, clean.expert_weights)
    first = route(logits, config, training=True, rng=1)
    again = route(logits, config, training=True, rng=1)
    other = route(logits, config, training=True, rng=2)
    np.testing.assert_array_equal(first.expert_indices, again.expert_indices)
    assert not np.array_equal(first.expert_indices, clean.expert_indices)
    assert not np.array_equal(first.expert_indices, other.expert_indices)
    no_std = route(logits, config.replace(noise_std=0.0), training=True, rng=1)
    np.testing.assert_array_equal(no_std.expert_indices, clean.expert_indices)


@pytest.mark.parametrize(("factor", "T", "E", "want"), [(1.1, 50, 5, 11), (2.2, 25, 11, 5),
                                                         (1.1, 48, 5, 11), (1.5, 7, 4, 3)])
def test_expert_choice_capacity_of_decimal_factors(factor: float, T: int, E: int,
                                                   want: int) -> None:
    # C = ceil(T * c / E): 50 * 1.1 / 5 is 11.000000000000002 in floating point, C must be 11
    config = RouterConfig(num_experts=E, strategy="expert_choice", capacity_factor=factor)
    plan, ref = run_both(config, make_logits("normal", T, E, seed=T))
    assert_matches(plan, ref)
    assert plan.expert_counts.tolist() == [want] * E


def test_balanced_debug_routes_round_robin() -> None:
    config = RouterConfig(num_experts=5, k=2, balanced_debug=True)
    plan, ref = run_both(config, make_logits("peaked", 10, 5, seed=4))
    assert_matches(plan, ref)
    assert plan.expert_counts.tolist() == [4] * 5  # 10 tokens x 2 slots over 5 experts
    assert plan.expert_indices[:2].tolist() == [[0, 1], [2, 3]]


@pytest.mark.parametrize("strategy", ["top_p", "threshold"])
def test_dynamic_strategies_choose_by_the_balancing_bias(strategy: str) -> None:
    """top_p / threshold take as many experts as the token's own probability mass asks, and
    choose them in the selection order: a large bias on an expert puts it first."""
    E, T = 6, 40
    logits = np.random.default_rng(3).normal(size=(T, E)).astype(np.float32) * 2
    rc = RouterConfig(num_experts=E, strategy=strategy, top_p=0.5, threshold=0.5,
                      max_experts=3, use_expert_bias=True)
    plain = route(logits, rc)
    bias = np.zeros(E, np.float32)
    bias[4] = 10.0
    biased = route(logits, rc, expert_bias_E=bias)
    np.testing.assert_array_equal(biased.num_experts_per_token, plain.num_experts_per_token)
    assert (biased.expert_indices[:, 0] == 4).all()
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    for t in range(T):  # the rest follow the scores, weights are the router's probabilities
        used = biased.expert_indices[t][biased.expert_indices[t] >= 0]
        rest = [e for e in np.argsort(-probs[t], kind="stable") if e != 4][: len(used) - 1]
        assert list(used) == [4, *rest]
        np.testing.assert_allclose(biased.expert_weights[t][: len(used)], probs[t][used],
                                   rtol=1e-5)


@pytest.mark.parametrize("strategy", ["relu", "expert_choice", "hash"])
def test_strategies_without_a_selection_order_refuse_bias_and_groups(strategy: str) -> None:
    with pytest.raises(ConfigError, match="use_expert_bias"):
        RouterConfig(num_experts=4, strategy=strategy, use_expert_bias=True)
    with pytest.raises(ConfigError, match="num_groups"):
        RouterConfig(num_experts=4, strategy=strategy, num_groups=2)
