"""The Flax layer's state surface: export / import with the router state, the expert-bias step,
calibration, ``total_aux_loss`` and the functional API's explicit state."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
from jax_cases import D, inputs, moe_config  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError  # noqa: E402
from moe_router.flax import (  # noqa: E402
    MoE,
    apply,
    calibrate,
    init_state,
    moe_layers,
    params_from_weights,
    total_aux_loss,
)
from moe_router.layer.state import LayerState, state_fields, state_to_arrays  # noqa: E402
from moe_router.weights import weight_shapes  # noqa: E402
from moe_router_backends.jax.functional import JAX  # noqa: E402

pytestmark = pytest.mark.jax


def _controller_config() -> mr.MoEConfig:
    return moe_config("top_p").with_router(target_experts=1.5, controller_rate=0.2,
                                           use_expert_bias=True)


def _train(layer: MoE, steps: int = 3) -> None:
    step = nnx.jit(lambda m, x: m(x, training=True))
    for seed in range(steps):
        step(layer, jnp.asarray(inputs((2, 6), seed=seed)))


def test_public_surface_and_state_storage():
    mc = _controller_config()
    layer = MoE(mc, rngs=nnx.Rngs(0))
    assert layer.config == mc and layer.calibrating is False
    assert isinstance(layer.router_state, mr.RouterState)
    assert isinstance(layer.layer_state(), LayerState)
    assert set(layer.export_state()) == set(state_fields(mc))
    assert set(layer.export_weights()) == set(weight_shapes(mc))
    # params train, state does not: the optimizer filter nnx.Param sees only the weights
    params = nnx.state(layer, nnx.Param)
    assert {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(params)} == {
        "router/weight", "experts/w_gate", "experts/w_up", "experts/w_down"}
    for name in state_fields(mc):
        var = layer._var(name)
        assert isinstance(var, nnx.Variable) and not isinstance(var, nnx.Param), name
    x = jnp.asarray(inputs((3,)))
    assert isinstance(layer(x), jax.Array)
    y, plan = layer(x, return_plan=True)
    assert y.shape == x.shape and isinstance(plan, mr.RoutingPlan)


def test_export_import_carries_the_trained_controller():
    mc = _controller_config()
    layer = MoE(mc, rngs=nnx.Rngs(0))
    _train(layer)
    layer.update_expert_bias()
    exported = layer.export_weights()
    assert exported["router.state"][0] != pytest.approx(mc.router.top_p)  # p has moved
    assert np.abs(exported["router.expert_bias"]).max() > 0
    clone = MoE.from_weights(mc, exported)
    fresh = MoE(mc, rngs=nnx.Rngs(5))
    fresh.import_weights(exported)
    x = jnp.asarray(inputs((2, 6), seed=11))
    y = layer(x)
    for other in (clone, fresh):
        np.testing.assert_array_equal(np.asarray(other(x)), np.asarray(y))
        for name in ("router.state", "router.expert_bias"):
            np.testing.assert_array_equal(other.export_state()[name], exported[name])
    # the functional API takes the same state from the export
    y_fn, _ = apply(params_from_weights(mc, exported), x, mc, state=init_state(mc, exported))
    np.testing.assert_allclose(np.asarray(y_fn), np.asarray(y), rtol=1e-6, atol=1e-6)
    layer.reset_router_state()
    assert float(layer.router_state.top_p) == pytest.approx(mc.router.top_p)
    with pytest.raises(InputError, match="router.state"):
        layer.import_weights(dict(exported, **{"router.state": np.zeros(4, np.float32)}))


def test_update_expert_bias_counts_int32_and_resets():
    mc = moe_config("expert_bias").with_router(bias_update_rate=0.1)
    layer = MoE(mc, rngs=nnx.Rngs(0))
    counts = layer.observers.expert_load.counts
    nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(inputs((8,))))  # eval: no state update
    assert counts[...].dtype == jnp.int32 and int(counts[...].sum()) == 0
    _train(layer, steps=2)
    assert int(counts[...].sum()) == 2 * 12 * 2  # T=12 tokens, k=2, two steps
    given = np.asarray([5, 0, 1, 2], np.int32)
    new = layer.update_expert_bias(given)
    want = mr.losses.update_expert_bias(np.zeros(4, np.float32), given, 0.1)
    np.testing.assert_allclose(np.asarray(new), want, atol=1e-7)
    assert int(counts[...].sum()) == 0  # given counts still restart the accumulation

    # axis_name: the counts are summed over the mapped axis first (data-parallel replicas)
    graphdef, state = nnx.split(layer)
    bias0 = np.asarray(layer.router.expert_bias[...])

    def replica(state, local_counts):
        return nnx.merge(graphdef, state).update_expert_bias(local_counts, axis_name="data")

    local = jnp.asarray([[3, 0, 1, 0], [0, 0, 2, 6]], jnp.int32)
    out = jax.vmap(replica, in_axes=(None, 0), axis_name="data")(state, local)
    want = mr.losses.update_expert_bias(bias0, np.asarray(local).sum(0), 0.1)
    for row in np.asarray(out):
        np.testing.assert_allclose(row, want, atol=1e-7)
    with pytest.raises(InputError, match="expert bias"):
        MoE(moe_config("top_k"), rngs=nnx.Rngs(0)).update_expert_bias(axis_name="data")


def test_calibrate_changes_decode_time_k():
    mc = moe_config("complexity").with_router(complexity_estimator="hidden_norm")

    class Model(nnx.Module):
        def __init__(self, rngs: nnx.Rngs):
            self.blocks = nnx.List([MoE(mc, rngs=rngs), MoE(mc, rngs=rngs)])

        def __call__(self, x):
            for block in self.blocks:
                x = x + block(x)
            return x

    model = Model(nnx.Rngs(0))
    assert moe_layers(model) == list(model.blocks)
    decode = jnp.asarray(inputs((1,), seed=3))
    k = nnx.jit(lambda m, x: m(x, return_plan=True)[1].num_experts_per_token)
    before = int(k(model.blocks[0], decode)[0])
    rng = np.random.default_rng(0)
    batches = [jnp.asarray(rng.standard_normal((16, D)).astype(np.float32) * 3) for _ in range(3)]
    summary = calibrate(model, batches)
    assert summary["batches"] == 3 and len(summary["router_states"]) == 2
    assert all(not layer.calibrating for layer in model.blocks)
    assert float(model.blocks[0].router_state.score_count) == 3.0
    assert int(k(model.blocks[0], decode)[0]) != before  # calibrated statistics, another k
    with pytest.raises(InputError, match="model"):
        calibrate(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), batches)


def test_total_aux_loss_is_differentiable_under_nnx_grad():
    mc = moe_config("top_k").with_router(aux_loss_coef=0.1, z_loss_coef=0.01)
    layers = nnx.List([MoE(mc, rngs=nnx.Rngs(i)) for i in range(2)])
    x = jnp.asarray(inputs((6,)))

    def via_variable(layers):
        h = x
        for layer in layers:
            h = h + layer(h)
        return total_aux_loss(layers)

    def via_plans(layers):
        h, total = x, 0.0
        for layer in layers:
            y, plan = layer(h, return_plan=True)
            h, total = h + y, total + plan.losses.total
        return total

    loss, grads = nnx.jit(nnx.value_and_grad(via_variable))(layers)
    want, want_grads = nnx.jit(nnx.value_and_grad(via_plans))(layers)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-6)
    assert float(jnp.abs(grads[0].router.weight[...]).sum()) > 0.0
    for got, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(float(total_aux_loss(layers)), float(want), rtol=1e-6)


def test_functional_apply_threads_the_state_and_traces_once():
    mc = _controller_config()
    layer = MoE(mc, rngs=nnx.Rngs(0))
    params = params_from_weights(mc, layer.export_weights())
    traces = []

    @jax.jit
    def step(params, state, x):
        traces.append(1)
        y, plan, state = apply(params, x, mc, state=state, training=True, return_state=True)
        return y, state

    state = init_state(mc)
    for seed in range(3):
        _, state = step(params, state, jnp.asarray(inputs((2, 6), seed=seed)))
    _train(layer)
    assert len(traces) == 1
    got = state_to_arrays(JAX, state)
    for name, value in layer.export_state().items():
        np.testing.assert_allclose(np.asarray(got[name]), value, rtol=1e-6, err_msg=name)
