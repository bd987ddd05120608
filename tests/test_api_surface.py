"""The fixed public API contract of ARCHITECTURE.md ("Public API contract (fixed)"), on NumPy.

Names, signatures, the plan's fields, shapes, dtypes and conventions (-1 / 0.0 in unused slots,
descending weights, ties to the lower index, immutability), and the whole-layer oracle
``moe_router.weights.reference_forward`` against a hand-written loop.
"""

from __future__ import annotations

import dataclasses
import inspect
import math

import numpy as np
import pytest

import moe_router as mr
from moe_router.weights import init_weights, reference_forward, weight_shapes


def _logits(T: int, E: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((T, E)) * 2.0).astype(np.float32)


# ----- names and signatures --------------------------------------------------------------------
def test_public_names() -> None:
    for name in ("RouterConfig", "MoEConfig", "RoutingPlan", "route", "losses", "ConfigError",
                 "InputError", "InputTypeError", "hookimpl", "RouterState"):
        assert name in mr.__all__ and hasattr(mr, name), name
    for name in ("load_balancing_loss", "router_z_loss", "router_entropy_loss",
                 "update_expert_bias"):
        assert callable(getattr(mr.losses, name)), name


def _params(fn: object) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(fn).parameters)  # type: ignore[arg-type]


def test_losses_signatures() -> None:
    lb = _params(mr.losses.load_balancing_loss)
    assert list(lb)[:3] == ["router_logits_TE", "expert_indices_TK", "num_experts"]
    assert lb["convention"].default == "switch" and lb["mask_T"].default is None
    for fn in (mr.losses.router_z_loss, mr.losses.router_entropy_loss):
        params = _params(fn)
        assert list(params) == ["router_logits_TE", "mask_T"]
        assert params["mask_T"].default is None


def test_route_signature() -> None:
    params = _params(mr.route)
    assert list(params)[:2] == ["router_logits_TE", "config"]
    for name, default in (("hidden_TD", None), ("token_ids_T", None), ("attention_probs", None),
                          ("training", False), ("state", None), ("mask_T", None)):
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY, name
        assert params[name].default is default, name


# ----- the plan -----------------------------------------------------------------------------------
def test_top_k_plan_contract() -> None:
    rc = mr.RouterConfig(num_experts=8, strategy="top_k", k=2)
    logits = _logits(10, 8)
    plan = mr.route(logits, rc)
    assert isinstance(plan, mr.RoutingPlan)
    for name in ("expert_indices", "expert_weights", "num_experts_per_token", "expert_counts"):
        assert isinstance(getattr(plan, name), np.ndarray), name  # NumPy in, NumPy out
    assert plan.expert_indices.shape == (10, 2) and plan.expert_indices.dtype.kind == "i"
    assert plan.expert_weights.shape == (10, 2) and plan.expert_weights.dtype == np.float32
    assert plan.num_experts_per_token.shape == (10,)
    assert plan.num_experts_per_token.dtype.kind == "i"
    assert plan.expert_counts.shape == (8,) and plan.expert_counts.dtype.kind == "i"
    # the two best experts, best first, Mixtral weights (renormalized softmax over the two)
    expected = np.argsort(-logits, axis=-1, kind="stable")[:, :2]
    np.testing.assert_array_equal(plan.expert_indices, expected)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    top = np.take_along_axis(probs, expected, axis=-1)
    np.testing.assert_allclose(plan.expert_weights, top / top.sum(-1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(plan.num_experts_per_token, np.full(10, 2))
    np.testing.assert_array_equal(plan.expert_counts, np.bincount(expected.ravel(), minlength=8))
    assert int(plan.num_dropped) == 0 and plan.config is rc and plan.num_slots == 2


def test_dynamic_plan_unused_slots() -> None:
    rc = mr.RouterConfig(num_experts=8, strategy="top_p", top_p=0.5)
    logits = _logits(32, 8, seed=1)
    logits[:4, 0] += 10.0  # confident tokens: one expert suffices
    plan = mr.route(logits, rc)
    K = rc.max_slots
    idx, w, n = plan.expert_indices, plan.expert_weights, plan.num_experts_per_token
    assert idx.shape == (32, K) and len(np.unique(n)) > 1
    used = idx >= 0
    np.testing.assert_array_equal(n, used.sum(-1))
    np.testing.assert_array_equal(used, np.arange(K)[None, :] < n[:, None])  # used slots first
    assert np.all(idx[~used] == -1) and np.all(w[~used] == 0.0) and np.all(w[used] > 0.0)
    assert np.all(np.diff(w, axis=-1) <= 0.0)  # descending weight
    np.testing.assert_array_equal(plan.expert_counts, np.bincount(idx[used], minlength=8))
    assert int(plan.expert_counts.sum()) == int(n.sum())


def test_ties_go_to_the_lower_expert_index() -> None:
    logits = np.zeros((3, 6), np.float32)
    logits[1, [2, 4]] = 1.0  # a tie between experts 2 and 4 above the rest
    plan = mr.route(logits, mr.RouterConfig(num_experts=6, k=3))
    np.testing.assert_array_equal(plan.expert_indices, [[0, 1, 2], [2, 4, 0], [0, 1, 2]])


def test_plan_losses_and_stats_fields() -> None:
    rc = mr.RouterConfig(num_experts=8, strategy="top_p", max_experts=4)
    plan = mr.route(_logits(16, 8, seed=2), rc)
    assert set(plan.losses._fields) == {"load_balancing", "z_loss", "entropy", "total"}
    stats = plan.stats
    assert stats.k_histogram.shape == (rc.max_slots + 1,)
    np.testing.assert_array_equal(stats.k_histogram,
                                  np.bincount(plan.num_experts_per_token, minlength=5))
    assert float(stats.mean_experts) == pytest.approx(plan.num_experts_per_token.mean())
    assert float(stats.max_load) == plan.expert_counts.max()
    assert float(stats.mean_load) == pytest.approx(plan.expert_counts.mean())
    assert set(plan.summary()) >= {"mean_experts", "k_histogram", "num_dropped", "total_loss"}


def test_plan_is_immutable() -> None:
    plan = mr.route(_logits(4, 8), mr.RouterConfig(num_experts=8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.expert_indices = np.zeros((4, 2), np.int64)  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.losses.total = 0.0  # type: ignore[misc]
    with pytest.raises(AttributeError):
        plan.stats.mean_experts = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("T", [0, 1])
def test_tiny_batches(T: int) -> None:
    plan = mr.route(_logits(T, 8), mr.RouterConfig(num_experts=8, k=2))
    assert plan.expert_indices.shape == (T, 2) and plan.expert_weights.shape == (T, 2)
    assert plan.num_experts_per_token.shape == (T,) and plan.expert_counts.shape == (8,)
    assert int(plan.expert_counts.sum()) == 2 * T
    assert np.isfinite(float(plan.losses.total))


@pytest.mark.parametrize(("logits", "error"), [
    (np.full((2, 8), np.nan, np.float32), mr.InputError),
    (np.zeros((2, 3, 8), np.float32), mr.InputError),
    (np.zeros((2, 7), np.float32), mr.InputError),
    (np.zeros((2, 8), np.int32), mr.InputTypeError),
], ids=["nan", "rank3", "width", "int"])
def test_bad_logits_are_typed_errors_naming_the_argument(logits: np.ndarray,
                                                         error: type) -> None:
    with pytest.raises(error, match="router_logits_TE"):
        mr.route(logits, mr.RouterConfig(num_experts=8))


# ----- MoEConfig -------------------------------------------------------------------------------
def test_moe_config_contract() -> None:
    rc = mr.RouterConfig(num_experts=8, strategy="top_k", k=2)
    mc = mr.MoEConfig(d_model=512, d_ff=1024, router=rc, activation="swiglu")
    assert (mc.d_model, mc.d_ff, mc.router, mc.activation) == (512, 1024, rc, "swiglu")
    assert mc.num_experts == 8 and mc.is_gated
    assert mc.expert_flops_per_token == 2 * 3 * 512 * 1024
    assert weight_shapes(mc) == {"router.weight": (512, 8), "experts.w_gate": (8, 512, 1024),
                                 "experts.w_up": (8, 512, 1024), "experts.w_down": (8, 1024, 512),
                                 "router.state": (5,)}  # the controller state travels too


# ----- reference_forward against a hand loop -----------------------------------------------------
def _act(name: str, v: float) -> float:
    if name in ("swiglu", "silu"):
        return v / (1.0 + math.exp(-v))
    if name in ("geglu", "gelu"):
        return 0.5 * v * (1.0 + math.erf(v / math.sqrt(2.0)))
    return max(v, 0.0)


def _hand_forward(x_TD: np.ndarray, w: dict[str, np.ndarray], mc: mr.MoEConfig) -> np.ndarray:
    """Token by token, scalar by scalar: softmax, top-k by sorting, renormalize, experts."""
    D, F, E, k = mc.d_model, mc.d_ff, mc.num_experts, mc.router.k
    gated = mc.activation in ("swiglu", "geglu")
    out = np.zeros_like(x_TD, dtype=np.float64)

    def ffn(x: np.ndarray, gate: np.ndarray | None, up: np.ndarray, down: np.ndarray) -> np.ndarray:
        width = up.shape[1]
        hidden = []
        for f in range(width):
            u = sum(float(x[d]) * float(up[d, f]) for d in range(D))
            if gated:
                g = sum(float(x[d]) * float(gate[d, f]) for d in range(D))
                hidden.append(_act(mc.activation, g) * u)
            else:
                hidden.append(_act(mc.activation, u))
        return np.array([sum(hidden[f] * float(down[f, d]) for f in range(width))
                         for d in range(D)])

    for t, x in enumerate(x_TD):
        logits = [sum(float(x[d]) * float(w["router.weight"][d, e]) for d in range(D))
                  + (float(w["router.bias"][e]) if "router.bias" in w else 0.0)
                  for e in range(E)]
        top = max(logits)
        probs = [math.exp(v - top) for v in logits]
        probs = [p / sum(probs) for p in probs]
        chosen = sorted(range(E), key=lambda e: (-probs[e], e))[:k]
        norm = sum(probs[e] for e in chosen)
        for e in chosen:
            out[t] += probs[e] / norm * ffn(x, w["experts.w_gate"][e] if gated else None,
                                            w["experts.w_up"][e], w["experts.w_down"][e])
        if mc.has_shared:
            shared = ffn(x, w.get("shared.w_gate"), w["shared.w_up"], w["shared.w_down"])
            if mc.shared_expert_gate:
                gate = sum(float(x[d]) * float(w["shared.gate"][d, 0]) for d in range(D))
                shared = shared / (1.0 + math.exp(-gate))
            out[t] += shared
    assert out.shape == (x_TD.shape[0], D) and F == mc.d_ff
    return out


@pytest.mark.parametrize("layer", [
    dict(activation="swiglu"),
    dict(activation="gelu", num_shared_experts=1, shared_expert_gate=True, router_bias=True),
    dict(activation="relu", shared_d_ff=5),
], ids=["swiglu", "gelu-shared-gate-bias", "relu-shared"])
def test_reference_forward_matches_a_hand_loop(layer: dict) -> None:
    rc = mr.RouterConfig(num_experts=4, k=2)
    mc = mr.MoEConfig(d_model=4, d_ff=3, router=rc, init_std=0.5, **layer)
    weights = init_weights(mc, seed=7)
    if "router.bias" in weights:
        weights["router.bias"] = np.linspace(-0.5, 0.5, 4).astype(np.float32)
    x = np.random.default_rng(8).standard_normal((2, 3, 4)).astype(np.float32)
    y, plan = reference_forward(x, weights, mc)
    assert y.shape == x.shape and isinstance(plan, mr.RoutingPlan)
    assert plan.expert_indices.shape == (6, 2)
    expected = _hand_forward(x.reshape(-1, 4), weights, mc).reshape(x.shape)
    assert np.abs(expected).max() > 1e-2  # a real signal, not a vanishing one
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-7)


def test_reference_forward_rejects_bad_weights() -> None:
    mc = mr.MoEConfig(d_model=4, d_ff=3, router=mr.RouterConfig(num_experts=4))
    weights = init_weights(mc)
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(mr.InputError, match="experts.w_up"):
        reference_forward(x, {**weights, "experts.w_up": np.zeros((4, 4, 4))}, mc)
    missing = {k: v for k, v in weights.items() if k != "experts.w_down"}
    with pytest.raises(mr.InputError, match="experts.w_down"):
        reference_forward(x, missing, mc)
    with pytest.raises(mr.InputError, match="d_model"):
        reference_forward(np.zeros((2, 5), np.float32), weights, mc)
