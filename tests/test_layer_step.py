"""The layer step (moe_router.layer) on every backend against the float64 NumPy oracle.

``reference_forward`` routes with NumPy and runs every expert token by token in float64; the
step must give the same output (within float32 tolerance) through every portable dispatch name,
on every backend of the ``backend`` fixture (``MOE_TEST_BACKENDS``), and update the layer state
(controller, calibration, expert load) exactly as ``route()`` and the bias step say.
"""

from __future__ import annotations

import numpy as np
import pytest
from router_cases import router_cases

import moe_router as mr
from moe_router.layer.state import initial_state, state_to_arrays
from moe_router.layer.step import bias_step, layer_step
from moe_router.weights import init_weights, param_shapes, reference_forward

D, F, T = 16, 24, 24
CASES = router_cases(num_experts=8)
TOL = {"rtol": 2e-4, "atol": 2e-5}


def make(config: mr.MoEConfig, b, seed: int = 0):
    weights = init_weights(config, seed=seed)
    weights = {name: value * 8 if name == "router.weight" else value
               for name, value in weights.items()}  # sharper router: fewer near-ties
    params = {name: b.asarray(weights[name]) for name in param_shapes(config)}
    return weights, params


def inputs(seed: int = 0, tokens: int = T) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, tokens // 2, D)).astype(np.float32)


def to_np(b, x) -> np.ndarray:
    return np.asarray(b.to_numpy(x), dtype=np.float64)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dispatch", ["auto", "sorted", "capacity", "dense", "gather"])
def test_step_matches_reference(backend, case: str, dispatch: str) -> None:
    router = CASES[case]
    if dispatch == "capacity" and router.capacity_factor is None \
            and not router.strategy_spec.own_capacity:
        pytest.skip("capacity dispatch needs a router capacity")
    config = mr.MoEConfig(d_model=D, d_ff=F, router=router, activation="swiglu",
                          num_shared_experts=1, dispatch=dispatch)
    weights, params = make(config, backend)
    x = inputs()
    token_ids = np.arange(T, dtype=np.int64).reshape(2, T // 2) * 7
    state = initial_state(backend, config, like=backend.asarray(x))
    out = layer_step(backend, params, state, backend.asarray(x), config,
                     token_ids=backend.asarray(token_ids))
    y_ref, plan_ref = reference_forward(x, weights, config, token_ids_T=token_ids.reshape(-1))
    np.testing.assert_array_equal(to_np(backend, out.plan.expert_indices),
                                  plan_ref.expert_indices)
    np.testing.assert_allclose(to_np(backend, out.y), y_ref, **TOL)
    assert out.updated == ()  # inference changes no state


@pytest.mark.parametrize("activation", ["geglu", "gelu", "relu", "silu"])
def test_activations_match_reference(backend, activation: str) -> None:
    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=4, k=2),
                          activation=activation)
    weights, params = make(config, backend, seed=3)
    x = inputs(1)
    state = initial_state(backend, config)
    out = layer_step(backend, params, state, backend.asarray(x), config)
    np.testing.assert_allclose(to_np(backend, out.y), reference_forward(x, weights, config)[0],
                               **TOL)


def test_training_updates_controller_and_expert_load(backend) -> None:
    router = mr.RouterConfig(num_experts=8, strategy="top_p", top_p=0.5, target_experts=1.5,
                             controller_rate=0.1, use_expert_bias=True, capacity_factor=1.0)
    config = mr.MoEConfig(d_model=D, d_ff=F, router=router)
    weights, params = make(config, backend)
    state = initial_state(backend, config)
    counts = np.zeros(8)
    p = router.top_p
    for step in range(3):
        x = inputs(step)
        out = layer_step(backend, params, state, backend.asarray(x), config, training=True)
        _, plan = reference_forward(x, {**weights, "router.state": np.asarray(
            [p, 0, 1, 0, 0], np.float32)}, config, training=True)
        np.testing.assert_array_equal(to_np(backend, out.plan.expert_indices),
                                      plan.expert_indices)
        p = float(plan.state.top_p)
        counts += plan.expert_counts
        state = out.state
        assert set(out.updated) == {"router.state", "observers.expert_load.counts"}
    assert float(to_np(backend, state.router.top_p)) == pytest.approx(p, abs=1e-6)
    np.testing.assert_array_equal(to_np(backend, state.observers["expert_load"]["counts"]),
                                  counts)
    assert backend.to_numpy(state.observers["expert_load"]["counts"]).dtype == np.int32
    new = bias_step(backend, state, config)
    expected = mr.losses.update_expert_bias(np.zeros(8, np.float32), counts.astype(np.int64),
                                            router.bias_update_rate)
    np.testing.assert_allclose(to_np(backend, new.expert_bias), expected, atol=1e-7)
    assert not to_np(backend, new.observers["expert_load"]["counts"]).any()


def test_calibration_updates_state_without_noise(backend) -> None:
    router = mr.RouterConfig(num_experts=8, strategy="complexity", target_experts=2.0,
                             max_experts=4, noise="normal", noise_std=5.0)
    config = mr.MoEConfig(d_model=D, d_ff=F, router=router)
    _, params = make(config, backend)
    state = initial_state(backend, config)
    x = backend.asarray(inputs(0))
    calibrated = layer_step(backend, params, state, x, config, update_state=True)
    plain = layer_step(backend, params, state, x, config)
    # no noise: the same decisions as inference; but the statistics were fitted
    np.testing.assert_array_equal(to_np(backend, calibrated.plan.expert_indices),
                                  to_np(backend, plain.plan.expert_indices))
    assert float(to_np(backend, calibrated.state.router.score_count)) == 1.0
    assert float(to_np(backend, plain.state.router.score_count)) == 0.0


def test_empty_batch(backend) -> None:
    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=4, k=2))
    _, params = make(config, backend)
    out = layer_step(backend, params, initial_state(backend, config),
                     backend.asarray(np.zeros((0, D), np.float32)), config)
    assert backend.shape(out.y) == (0, D)


def test_state_round_trips_through_flat_arrays(backend) -> None:
    from moe_router.layer.state import state_fields, state_from_arrays

    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(
        num_experts=8, strategy="top_p", use_expert_bias=True))
    state = initial_state(backend, config)
    arrays = state_to_arrays(backend, state)
    assert set(arrays) == set(state_fields(config))
    again = state_from_arrays(backend, arrays, config)
    for a, b_ in zip(state.router, again.router):
        assert float(to_np(backend, a)) == float(to_np(backend, b_))


def test_errors_name_the_users_arguments() -> None:
    b = mr.get_backend("numpy")
    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=4, k=2))
    _, params = make(config, b)
    state = initial_state(b, config)
    x = inputs()
    with pytest.raises(mr.InputError, match=r"^x: expected shape \(\.\.\., d_model=16\)"):
        layer_step(b, params, state, x[..., :3], config)
    with pytest.raises(mr.InputTypeError, match="^x: expected a floating dtype"):
        layer_step(b, params, state, x.astype(np.int32), config)
    with pytest.raises(mr.InputError, match="^mask: expected one entry per token"):
        layer_step(b, params, state, x, config, mask=np.ones(T + 1))
    bad = x.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(mr.InputError, match="^x: the router logits computed from it contain"):
        layer_step(b, params, state, bad, config)
    with pytest.raises(mr.InputError, match="update_expert_bias"):
        bias_step(b, state, config)
