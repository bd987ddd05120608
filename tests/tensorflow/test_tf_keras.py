"""Keras citizenship of the MoE layer: config round trip, ``.keras`` save/load, ``fit``,
``mixed_bfloat16``, callbacks, and weights exported by the torch layer."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import moe_router as mr  # noqa: E402
from moe_router.keras import ExpertBiasUpdate, MoE  # noqa: E402
from moe_router.weights import init_weights, reference_forward  # noqa: E402

pytestmark = pytest.mark.tensorflow

E, D, F, S = 4, 8, 16, 6


def _config(**router: object) -> mr.MoEConfig:
    rc = mr.RouterConfig(num_experts=E, k=2, aux_loss_coef=0.01, **router)
    return mr.MoEConfig(d_model=D, d_ff=F, router=rc, num_shared_experts=1, init_std=0.2)


def _model(config: mr.MoEConfig, seed: int = 0) -> keras.Model:
    inputs = keras.Input((S, D))
    hidden = MoE(config, seed=seed, name="moe")(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    return keras.Model(inputs, outputs)


def _data(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, S, D)).astype(np.float32)
    y = (np.sin(x[:, :, 0]).mean(-1, keepdims=True) + 0.5 * x[:, :, 1].mean(-1, keepdims=True))
    return x, y.astype(np.float32)


def test_get_config_round_trip() -> None:
    config = _config(strategy="top_p", top_p=0.6, max_experts=3).replace(dispatch="tiles")
    layer = MoE(config, seed=3, name="m")
    restored = MoE.from_config(layer.get_config())
    assert restored.moe_config == config and restored.seed == 3 and restored.name == "m"
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "moe_router>MoE"
    assert keras.saving.deserialize_keras_object(serialized).moe_config == config


def test_model_saves_to_keras_file_and_loads_with_identical_outputs(tmp_path) -> None:
    config = _config(use_expert_bias=True, strategy="complexity", target_experts=1.5,
                     max_experts=2)
    model = _model(config)
    x, _ = _data(8)
    layer = model.get_layer("moe")
    layer._weight("router.expert_bias").assign(np.linspace(-0.1, 0.1, E))
    layer.router_state_vars[2].assign(2.5)  # a calibrated controller state is saved too
    layer.router_state_vars[3].assign(4.0)
    before = model.predict(x, verbose=0)
    path = tmp_path / "moe.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    moe = loaded.get_layer("moe")
    assert isinstance(moe, MoE) and moe.moe_config == config
    for name, value in layer.export_weights().items():
        np.testing.assert_array_equal(moe.export_weights()[name], value)
    assert float(moe.router_state().score_count) == 4.0


def test_fit_reduces_loss_and_callbacks_read_statistics() -> None:
    keras.utils.set_random_seed(0)
    model = _model(_config(use_expert_bias=True))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data(96)
    seen: list[float] = []
    stats_cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(
        model.get_layer("moe").routing_stats()["mean_experts"]))
    bias_before = model.get_layer("moe").export_weights()["router.expert_bias"]
    initial = model.evaluate(x, y, verbose=0)
    history = model.fit(x, y, epochs=6, batch_size=32, verbose=0,
                        callbacks=[stats_cb, ExpertBiasUpdate()])
    final = model.evaluate(x, y, verbose=0)
    assert final < 0.6 * initial, (initial, history.history["loss"], final)
    assert seen == [2.0] * 6  # static top-2: every token used 2 experts
    bias_after = model.get_layer("moe").export_weights()["router.expert_bias"]
    assert not np.array_equal(bias_before, bias_after)
    assert abs(float(bias_after.sum())) < 1e-5  # centered after each step


def test_fit_optimizes_the_aux_loss() -> None:
    """With only the aux loss to minimize, fit must move the router toward balance."""
    keras.utils.set_random_seed(1)
    rc = mr.RouterConfig(num_experts=E, k=1, aux_loss_coef=1.0)
    config = mr.MoEConfig(d_model=D, d_ff=F, router=rc, init_std=0.2)
    weights = init_weights(config, seed=0)
    weights["router.weight"][:, 0] += 1.0  # expert 0 is favoured: imbalanced start
    inputs = keras.Input((D,))
    layer = MoE.from_weights(config, weights)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.Adam(5e-2), loss=lambda y, p: 0.0 * p)
    x = np.abs(np.random.default_rng(0).normal(size=(128, D))).astype(np.float32)
    start = float(reference_forward(x, layer.export_weights(), config)[1].losses.load_balancing)
    model.fit(x, np.zeros_like(x), epochs=5, batch_size=64, verbose=0)
    end = float(reference_forward(x, layer.export_weights(), config)[1].losses.load_balancing)
    assert end < start - 0.1, (start, end)


def test_mixed_bfloat16_policy_keeps_the_router_in_float32() -> None:
    config = _config()
    weights = init_weights(config, seed=4)
    layer = MoE.from_weights(config, weights, dtype="mixed_bfloat16")
    x = np.random.default_rng(4).normal(size=(2, S, D)).astype(np.float32)
    y = layer(tf.constant(x))
    assert y.dtype == tf.bfloat16
    assert layer._weight("router.weight").dtype == "float32"
    plan = layer.plan(tf.constant(x))
    assert plan.router_probs.dtype == tf.float32
    x_bf16 = np.asarray(tf.cast(tf.cast(x, tf.bfloat16), tf.float32)).reshape(-1, D)
    ref = mr.route(x_bf16 @ weights["router.weight"], config.router)
    np.testing.assert_array_equal(plan.expert_indices.numpy(), ref.expert_indices)
    want, _ = reference_forward(x_bf16.reshape(x.shape), weights, config)
    got = np.asarray(tf.cast(y, tf.float32))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()  # bf16 experts


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
@pytest.mark.parametrize("strategy", ["top_k", "top_p"])
def test_weights_exported_by_the_torch_layer_give_the_same_outputs(strategy: str) -> None:
    torch = pytest.importorskip("torch")
    try:
        from moe_router.torch import MoE as TorchMoE
    except ImportError as err:  # the torch layer is written in parallel
        pytest.skip(f"moe_router.torch.MoE is not available: {err}")
    extra = {"strategy": "top_p", "top_p": 0.6, "max_experts": 3} if strategy == "top_p" else {}
    config = _config(**extra).replace(shared_expert_gate=True, router_bias=True)
    torch_layer = TorchMoE(config, seed=7).eval()
    weights = torch_layer.export_weights()
    x = np.random.default_rng(7).normal(size=(3, S, D)).astype(np.float32)
    with torch.no_grad():
        want = torch_layer(torch.from_numpy(x)).numpy()
    got = MoE.from_weights(config, weights)(tf.constant(x)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
