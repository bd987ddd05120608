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
    config = _config(strategy="top_p", top_p=0.6, max_experts=3).replace(
        dispatch="tensorflow:tiles", observers=("expert_load",))
    layer = MoE(config, seed=3, name="m")
    restored = MoE.from_config(layer.get_config())
    assert restored.config == config and restored.seed == 3 and restored.name == "m"
    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == "moe_router>MoE"
    assert keras.saving.deserialize_keras_object(serialized).config == config


def test_model_saves_to_keras_file_and_loads_with_identical_outputs(tmp_path) -> None:
    config = _config(use_expert_bias=True, strategy="complexity", target_experts=1.5,
                     max_experts=2)
    model = _model(config)
    x, _ = _data(8)
    layer = model.get_layer("moe")
    weights = layer.export_weights()
    weights["router.expert_bias"] = np.linspace(-0.1, 0.1, E).astype(np.float32)
    weights["router.state"][2:4] = [2.5, 4.0]  # a calibrated controller state is saved too
    layer.import_weights(weights)
    layer(x[:2], training=True)  # some expert-load counts
    before = model.predict(x, verbose=0)
    path = tmp_path / "moe.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)
    moe = loaded.get_layer("moe")
    assert isinstance(moe, MoE) and moe.config == config
    for name, value in layer.export_weights().items():
        np.testing.assert_array_equal(moe.export_weights()[name], value)
    for name, value in layer.export_state().items():
        np.testing.assert_array_equal(moe.export_state()[name], value)
        assert moe.export_state()[name].dtype == value.dtype
    assert float(moe.router_state.score_count) == 5.0  # 4 + the training call above


def test_fit_reduces_loss_and_callbacks_read_the_plan() -> None:
    keras.utils.set_random_seed(0)
    model = _model(_config(use_expert_bias=True))
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x, y = _data(96)
    seen: list[float] = []
    stats_cb = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(
        float(model.get_layer("moe")(x[:8], return_plan=True)[1].stats.mean_experts)))
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
    assert [v.dtype for v in layer.weights if v.name == "router_weight"] == ["float32"]
    _, plan = layer(tf.constant(x), return_plan=True)
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


def test_errors_raised_inside_call_keep_their_type_and_message(monkeypatch) -> None:
    """Keras re-raises errors from ``call()`` as ``type(e)(decorated message)``; the layer hands
    the caller our original error (its type, ``argument`` and plain message) instead."""
    from moe_router.errors import ConfigError, InputError, InputTypeError

    config = _config(strategy="hash").with_router(nan_policy="raise")
    x = np.random.default_rng(0).normal(size=(2, S, D)).astype(np.float32)
    ids = np.arange(2 * S, dtype=np.int32).reshape(2, S)
    inputs, token_ids = keras.Input((S, D)), keras.Input((S,), dtype="int32")
    moe = MoE(config, name="moe")
    model = keras.Model([inputs, token_ids], moe(inputs, token_ids=token_ids))
    model([x, ids])  # fine
    bad = x.copy()
    bad[1, 2, 3] = np.nan
    cases = [(lambda: model([bad, ids]), InputError, "x", "NaN"),
             (lambda: moe(x, token_ids=ids[:, :3]), InputError, "token_ids", "one entry per"),
             (lambda: moe(x), InputError, "token_ids_T", "hash"),
             (lambda: moe(tf.zeros((2, D), tf.int32), token_ids=ids[0, :2]), InputTypeError,
              "x", "floating")]
    for run, kind, argument, words in cases:
        with pytest.raises(kind, match=words) as err:
            run()
        assert err.value.argument == argument
        assert "\x1b" not in str(err.value) and "Exception encountered" not in str(err.value)

    def broken(*args, **kwargs):
        raise ConfigError("dispatch", "x", "a test kernel")

    from moe_router_backends.tensorflow.stages import TFStages

    monkeypatch.setattr(TFStages, "experts", broken)
    with pytest.raises(ConfigError) as err:
        keras.Sequential([keras.Input((S, D)), MoE(_config())])(x)
    assert err.value.field == "dispatch" and str(err.value).startswith("dispatch='x'")


def test_calibrate_sets_decode_time_k_of_a_complexity_model() -> None:
    from moe_router.keras import calibrate, moe_layers

    rc = mr.RouterConfig(num_experts=E, strategy="complexity", min_experts=1, max_experts=3,
                         complexity_estimator="hidden_norm")
    config = mr.MoEConfig(d_model=D, d_ff=F, router=rc, init_std=0.2)
    inputs = keras.Input((D,))
    model = keras.Model(inputs, MoE(config, seed=0, name="moe")(inputs))
    layer = moe_layers(model)[0]
    rng = np.random.default_rng(0)
    tokens = (rng.normal(size=(32, D)) * rng.uniform(0.2, 3.0, size=(32, 1))).astype(np.float32)

    def decode_k() -> list[int]:  # one token at a time, as in decoding
        return [int(layer(tokens[i:i + 1], return_plan=True)[1].num_experts_per_token[0])
                for i in range(len(tokens))]

    assert len(set(decode_k())) == 1  # uncalibrated: a lone token is its own batch
    batches = [(rng.normal(size=(16, D)) * rng.uniform(0.2, 3.0, size=(16, 1)))
               .astype(np.float32) for _ in range(4)]
    summary = calibrate(model, batches)
    assert summary["batches"] == 4 and summary["router_states"][0]["score_count"] > 0
    assert layer.calibrating is False
    ks = decode_k()
    assert len(set(ks)) > 1  # calibrated: k follows each token's complexity
    assert 1.5 <= np.mean(ks) <= 2.5  # around the default target (1 + 3) / 2
    with pytest.raises(mr.errors.InputError, match="model"):
        calibrate(keras.Sequential([keras.Input((D,)), keras.layers.Dense(2)]), batches)


def test_moe_layers_and_total_aux_loss() -> None:
    from moe_router.keras import moe_layers, total_aux_loss

    config = _config()
    inputs = keras.Input((S, D))
    first = MoE(config, seed=0, name="first")
    inner = keras.Sequential([keras.Input((S, D)), MoE(config, seed=1, name="second")])
    model = keras.Model(inputs, inner(first(inputs)))
    assert [layer.name for layer in moe_layers(model)] == ["first", "second"]
    x = np.random.default_rng(0).normal(size=(2, S, D)).astype(np.float32)
    hidden, plan_first = first(x, return_plan=True)
    _, plan_second = moe_layers(model)[1](hidden, return_plan=True)
    model(x)
    want = float(plan_first.losses.total) + float(plan_second.losses.total)
    assert float(total_aux_loss(model)) == pytest.approx(want, rel=1e-5) and want > 0
    assert float(total_aux_loss(keras.Sequential([keras.layers.Dense(1)]))) == 0.0


def test_expert_load_counts_sum_over_mirrored_replicas(tmp_path) -> None:
    """Under ``tf.distribute`` each replica adds its own counts (two CPU replicas, a fresh
    process: the logical devices must be set before TensorFlow starts)."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, moe_router as mr
        from moe_router.keras import MoE, ExpertBiasUpdate
        balanced = mr.RouterConfig(num_experts={E}, k=2, use_expert_bias=True)
        controlled = mr.RouterConfig(num_experts={E}, strategy="top_p", top_p=0.5,
                                     max_experts=2, target_experts=1.2, controller_rate=0.1)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        assert strategy.num_replicas_in_sync == 2
        with strategy.scope():
            inputs = keras.Input(({S}, {D}))
            moe = MoE(mr.MoEConfig(d_model={D}, d_ff={F}, router=balanced), seed=0)
            top_p = MoE(mr.MoEConfig(d_model={D}, d_ff={F}, router=controlled), seed=1)
            hidden = top_p(moe(inputs))
            out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
            model = keras.Model(inputs, out)
            model.compile(optimizer="adam", loss="mse")
        x = np.random.default_rng(0).normal(size=(64, {S}, {D})).astype(np.float32)
        y = np.zeros((64, 1), np.float32)
        seen = []
        cb = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: seen.append(
            int(moe.export_state()["observers.expert_load.counts"].sum())))
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[cb])
        assert seen == [32 * {S} * 2, 64 * {S} * 2], seen  # every slot of both replicas, once
        assert float(top_p.router_state.top_p) != 0.5  # the controller state moved
        bias = moe.update_expert_bias()
        assert abs(float(bias.sum())) < 1e-6 and (bias != 0).any(), bias
        assert moe.export_state()["observers.expert_load.counts"].sum() == 0
        model.fit(x, y, epochs=1, batch_size=32, verbose=0, callbacks=[ExpertBiasUpdate()])
        print("ok")
    """)
    env = {**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
