"""The Keras side of the debugger: ``routing_stats`` counters and the ``routing_trace`` ring buffer
in the Keras layer (eager, ``tf.function``, XLA) checked against hand counts from the plans,
switching observers at run time, ``reset_observers``, ``.keras`` save/load, ``MoEMetrics`` in
``fit`` and ``find_moe_layers``."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError, InputTypeError  # noqa: E402
from moe_router.keras import (  # noqa: E402
    MoE,
    MoEMetrics,
    find_moe_layers,
    invalidate_compiled,
)
from moe_router.layer.observers import TraceConfig  # noqa: E402
from moe_router.weights import init_weights  # noqa: E402

pytestmark = pytest.mark.tensorflow

E, D, F, B, S = 6, 8, 16, 2, 5  # experts, d_model, d_ff, batch, sequence
STATS = "observers.routing_stats."
TRACE = "observers.routing_trace."
ROUTERS = {
    "top_p_capacity": mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5,
                                      max_experts=3, capacity_factor=0.7),
    "top_k": mr.RouterConfig(num_experts=E, k=2, aux_loss_coef=0.01),
}


def _config(router: str = "top_p_capacity", **moe: object) -> mr.MoEConfig:
    return mr.MoEConfig(d_model=D, d_ff=F, router=ROUTERS[router], init_std=0.3, **moe)


def _layer(config: mr.MoEConfig, seed: int = 0) -> MoE:
    return MoE.from_weights(config, init_weights(config, seed=seed))


def _batch(seed: int, masked: bool) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, S, D)).astype(np.float32) * (1.0 + seed % 3)
    mask = None
    if masked:
        mask = np.ones((B, S), bool)
        mask[0, S - 1 - seed % 2:] = False
        mask[1, S - 2:] = False
    return x, mask


def _hand_counts(calls: list, config: mr.MoEConfig) -> dict[str, np.ndarray]:
    """``routing_stats`` computed by hand from ``(plan, mask, training)`` of each call."""
    K = config.router.max_slots
    want = {"calls": np.zeros(2, np.int64), "tokens": np.zeros(2, np.int64),
            "expert_tokens": np.zeros((2, E), np.int64), "dropped": np.zeros(2, np.int64),
            "k_hist": np.zeros((2, K + 1), np.int64), "aux_loss_sum": np.zeros(2),
            "top1_sum": np.zeros(2)}
    for plan, mask, training in calls:
        row = 0 if training else 1
        ids_TK = plan.expert_indices.numpy()
        real_T = np.ones(len(ids_TK), bool) if mask is None else mask.reshape(-1)
        used = ids_TK[real_T]
        want["calls"][row] += 1
        want["tokens"][row] += real_T.sum()
        want["expert_tokens"][row] += np.bincount(used[used >= 0], minlength=E)
        want["dropped"][row] += int(plan.num_dropped)
        want["k_hist"][row] += np.bincount(plan.num_experts_per_token.numpy()[real_T],
                                           minlength=K + 1)
        want["aux_loss_sum"][row] += float(plan.losses.total)
        want["top1_sum"][row] += plan.router_probs.numpy()[:, :E].max(-1)[real_T].sum()
    return want


def _assert_counts(state: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, value in want.items():
        got = state[STATS + name]
        if value.dtype == np.int64:
            assert got.dtype == np.int32, name
            np.testing.assert_array_equal(got, value, err_msg=name)
        else:
            np.testing.assert_allclose(got, value, rtol=1e-5, atol=1e-5, err_msg=name)


# ----- (a) counters vs hand counts ---------------------------------------------------------------
def test_counters_after_eager_calls_equal_hand_counts_from_the_plans() -> None:
    config = _config(observers=("routing_stats",))
    layer = _layer(config)
    calls = []
    for i, (training, masked) in enumerate([(True, False), (True, True), (False, False),
                                            (False, True), (True, True)]):
        x, mask = _batch(i, masked)
        _, plan = layer(x, training=training, mask=mask, return_plan=True)
        calls.append((plan, mask, training))
    want = _hand_counts(calls, config)
    assert want["dropped"].sum() > 0 and (want["k_hist"][:, 1:] > 0).sum() >= 3  # worth testing
    assert want["tokens"][1] < 2 * B * S  # a mask removed tokens from the eval row
    _assert_counts(layer.export_state(), want)


# ----- (b) tf.function / XLA ---------------------------------------------------------------------
@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf_function", "xla"])
def test_counters_in_tf_function_equal_eager_and_trace_once(jit_compile: bool) -> None:
    config = _config("top_k", observers=("routing_stats",))
    eager, compiled = _layer(config), _layer(config)

    @tf.function(jit_compile=jit_compile)
    def step(x, mask):
        return compiled(x, training=True, mask=mask) + compiled(x, training=False)

    calls = []
    for i in range(3):
        x, mask = _batch(i, masked=True)
        step(tf.constant(x), tf.constant(mask))
        for training, m in ((True, mask), (False, None)):
            _, plan = eager(x, training=training, mask=m, return_plan=True)
            calls.append((plan, m, training))
    assert step.experimental_get_tracing_count() == 1
    want = _hand_counts(calls, config)
    _assert_counts(eager.export_state(), want)
    _assert_counts(compiled.export_state(), want)


# ----- (c) the trace ring buffer -----------------------------------------------------------------
def _hand_trace(calls: list, trace: TraceConfig, K: int) -> dict[str, np.ndarray]:
    """The ring buffer by hand from ``(plan, mask, training, token_ids)`` of each call."""
    N, n = trace.capacity, trace.tokens_per_call
    rows = {"experts": np.full((N, K), -1), "weights": np.zeros((N, K), np.float32),
            **{f: np.full(N, -1) for f in ("index", "position", "token", "call", "mode")}}
    written = 0
    for call, (plan, mask, training, token_ids) in enumerate(calls):
        T = plan.expert_indices.shape[0]
        for r in range(min(n, T)):
            t = (r * T) // n if T >= n else r
            if mask is not None and not mask.reshape(-1)[t]:
                continue
            dest = written % N
            written += 1
            rows["experts"][dest] = plan.expert_indices.numpy()[t]
            rows["weights"][dest] = plan.expert_weights.numpy()[t]
            rows["index"][dest], rows["position"][dest] = t, t % S
            rows["token"][dest] = -1 if token_ids is None else token_ids.reshape(-1)[t]
            rows["call"][dest], rows["mode"][dest] = call, 0 if training else 1
    rows["written"] = np.array([written])
    rows["calls"] = np.array([len(calls)])
    return rows


def _assert_trace(state: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    for name, value in want.items():
        got = state[TRACE + name]
        got = got if name in ("written", "calls") else got[:-1]  # the last row is the discard row
        if name == "weights":
            np.testing.assert_allclose(got, value, atol=1e-6, err_msg=name)
        else:
            np.testing.assert_array_equal(got, value, err_msg=name)


def test_trace_ring_buffer_wraps_and_records_the_plans_experts_and_weights() -> None:
    trace = TraceConfig(capacity=7, tokens_per_call=4)  # 4 rows a call: wraps on the 2nd call
    config = _config(trace=trace)
    layer = _layer(config)
    calls = []
    for i, (training, masked) in enumerate([(True, False), (False, True), (True, True),
                                            (False, False)]):
        x, mask = _batch(i, masked)
        ids = np.arange(B * S, dtype=np.int32).reshape(B, S) + 100 * i if i % 2 else None
        _, plan = layer(x, training=training, mask=mask, token_ids=ids, return_plan=True)
        calls.append((plan, mask, training, ids))
        _assert_trace(layer.export_state(), _hand_trace(calls, trace, config.router.max_slots))
    assert layer.export_state()[TRACE + "written"][0] > trace.capacity  # it wrapped


@pytest.mark.parametrize("jit_compile", [False, True], ids=["tf_function", "xla"])
def test_trace_in_tf_function_equals_eager(jit_compile: bool) -> None:
    config = _config("top_k", trace=TraceConfig(capacity=9, tokens_per_call=4))
    eager, compiled = _layer(config), _layer(config)
    step = tf.function(lambda x, m: compiled(x, training=True, mask=m), jit_compile=jit_compile)
    calls = []
    for i in range(4):
        x, mask = _batch(i, masked=True)
        step(tf.constant(x), tf.constant(mask))
        _, plan = eager(x, training=True, mask=mask, return_plan=True)
        calls.append((plan, mask, True, None))
    assert step.experimental_get_tracing_count() == 1
    want = _hand_trace(calls, config.trace, config.router.max_slots)
    _assert_trace(eager.export_state(), want)
    _assert_trace(compiled.export_state(), want)


def test_state_aggregation_under_tf_distribute_follows_the_field_kind() -> None:
    layer = _layer(_config())
    layer.config = _config(observers=("routing_stats",), trace=TraceConfig(4, 2))  # added later
    aggregation = {v.name: v.aggregation for v in layer.weights}
    assert aggregation["observers_routing_trace_experts"] == "only_first_replica"
    assert aggregation["observers_routing_trace_written"] == "only_first_replica"  # its cursor
    assert aggregation["observers_routing_stats_k_hist"] == "sum"
    assert aggregation["router_state"] == "mean"


# ----- (d) switching observers, reset, save/load --------------------------------------------------
def _names(layer: MoE) -> list[str]:
    return [v.name for v in layer.weights]


def test_switching_observers_on_and_off_adds_and_removes_weights() -> None:
    plain = _config("top_k")
    layer = _layer(plain)
    x, _ = _batch(0, False)
    y0 = layer(x).numpy()
    before = _names(layer)
    layer.config = plain.replace(trace=TraceConfig(capacity=6, tokens_per_call=3))
    layer.config = layer.config.replace(observers=("routing_stats",))
    fresh = _layer(layer.config)  # built (from_weights) with the observers, never called
    assert _names(layer) == _names(fresh)  # same order as a fresh build (.keras stores by index)
    assert list(layer.export_state()) == list(fresh.export_state())
    for name, value in fresh.export_state().items():
        np.testing.assert_array_equal(layer.export_state()[name], value)  # initial values
    np.testing.assert_array_equal(layer(x, training=True).numpy(), y0)  # top_k: no noise
    assert layer.export_state()[STATS + "calls"].tolist() == [1, 0]
    layer.config = plain
    assert _names(layer) == before and list(layer.export_state()) == ["router.state"]
    np.testing.assert_array_equal(layer(x).numpy(), y0)


def test_invalid_config_changes_raise_typed_errors() -> None:
    layer = _layer(_config("top_k"))
    with pytest.raises(InputTypeError, match="config"):
        layer.config = {"d_model": D}
    layer(_batch(0, False)[0])
    with pytest.raises(InputError, match="config"):
        layer.config = _config("top_k").replace(d_ff=F + 8)
    assert layer.config == _config("top_k") and layer.supports_jit
    layer.config = _config("top_k", dispatch="tensorflow:split")  # routing fields may change
    assert not layer.supports_jit  # a dynamic-shape kernel: Keras must not XLA-compile
    unbuilt = MoE(_config("top_k"))  # before build: just stored
    unbuilt.config = _config("top_k").replace(d_ff=F + 8)
    unbuilt(_batch(0, False)[0])
    assert unbuilt.export_weights()["experts.w_up"].shape[-1] == F + 8


def test_reset_observers_restores_initial_values_per_observer() -> None:
    config = _config("top_k", observers=("routing_stats",), trace=TraceConfig(5, 3))
    layer = _layer(config)
    x, _ = _batch(0, False)
    layer(x, training=True)
    layer(x, training=True)
    initial = _layer(config)  # built (from_weights), never called: the initial values
    state = layer.export_state()
    layer.reset_observers("routing_stats")
    after = layer.export_state()
    for name, value in initial.export_state().items():
        if name.startswith(STATS):
            np.testing.assert_array_equal(after[name], value)
        elif name.startswith(TRACE):
            np.testing.assert_array_equal(after[name], state[name])
    assert state[TRACE + "written"][0] == 6 and state[STATS + "calls"][0] == 2
    layer.reset_observers()
    for name, value in initial.export_state().items():
        np.testing.assert_array_equal(layer.export_state()[name], value)
        assert layer.export_state()[name].dtype == value.dtype


def _model(config: mr.MoEConfig) -> keras.Model:
    inputs = keras.Input((S, D))
    hidden = MoE(config, seed=0, name="moe")(inputs)
    outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(hidden))
    return keras.Model(inputs, outputs)


def test_keras_file_round_trip_with_the_debugger_attached_and_detached(tmp_path) -> None:
    plain = _config("top_p_capacity")
    model = _model(plain)
    layer = model.get_layer("moe")
    x = np.concatenate([_batch(i, False)[0] for i in range(4)])
    model.predict(x, verbose=0)  # a compiled predict function made before the switch
    layer.config = plain.replace(trace=TraceConfig(capacity=6, tokens_per_call=4))
    layer.config = layer.config.replace(observers=("expert_load", "routing_stats"))
    invalidate_compiled(model)
    before = model.predict(x, verbose=0)
    layer(x[:2], training=True)
    assert layer.export_state()[STATS + "calls"].tolist() == [1, 1]  # predict used them
    model.save(tmp_path / "on.keras")
    loaded = keras.saving.load_model(tmp_path / "on.keras")
    moe = loaded.get_layer("moe")
    assert moe.config == layer.config and _names(moe) == _names(layer)
    saved = layer.export_state()
    assert list(moe.export_state()) == list(saved)
    for name, value in moe.export_state().items():  # counters and trace too
        np.testing.assert_array_equal(value, saved[name], err_msg=name)
        assert value.dtype == saved[name].dtype
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), before)

    layer.config = plain
    invalidate_compiled(model)
    model.save(tmp_path / "off.keras")
    off = keras.saving.load_model(tmp_path / "off.keras")
    assert off.get_layer("moe").config == plain
    assert list(off.get_layer("moe").export_state()) == ["router.state"]
    np.testing.assert_array_equal(off.predict(x, verbose=0), model.predict(x, verbose=0))


# ----- (e) MoEMetrics in fit ---------------------------------------------------------------------
def _fit_data(n: int, scale: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, S, D)) * scale + scale).astype(np.float32)
    return x, x[:, :, :1].mean(1)


def _expected_metrics(layer: MoE, x: np.ndarray, batch_size: int) -> dict[str, float]:
    """The epoch's metrics by hand: the training calls of the epoch replayed eagerly (the
    optimizer's learning rate is 0, the router stateless and noiseless)."""
    loads, aux, experts, dropped = np.zeros(E), [], [], 0
    for start in range(0, len(x), batch_size):
        _, plan = layer(x[start:start + batch_size], training=True, return_plan=True)
        loads += plan.expert_counts.numpy()
        aux.append(float(plan.losses.total))
        experts.append(plan.num_experts_per_token.numpy())
        dropped += int(plan.num_dropped)
    return {"moe_max_over_mean_load": loads.max() / loads.mean(), "moe_aux_loss": np.mean(aux),
            "moe_mean_experts": np.concatenate(experts).mean(), "moe_dropped": dropped}


@pytest.mark.parametrize("stats_on", [False, True], ids=["switched_on", "already_on"])
def test_moe_metrics_in_fit_count_training_batches_only(stats_on: bool) -> None:
    keras.utils.set_random_seed(0)
    router = ROUTERS["top_k"].replace(capacity_factor=0.8)
    plain = mr.MoEConfig(d_model=D, d_ff=F, router=router, init_std=0.3)
    config = plain.replace(observers=("routing_stats",)) if stats_on else plain
    model = _model(config)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    x, y = _fit_data(48, 1.0, 0)
    x_val, y_val = _fit_data(40, 4.0, 1)  # other loads: would move the metrics if counted
    model.fit(x, y, batch_size=16, verbose=0)  # train and test functions traced before
    model.evaluate(x_val, y_val, verbose=0)  # MoEMetrics switches routing_stats on
    layer = model.get_layer("moe")
    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        validation_data=(x_val, y_val), validation_batch_size=20,
                        callbacks=[MoEMetrics(keep_observers=stats_on)])
    assert layer.config == config  # switched off again after fit unless it was on
    if stats_on:
        calls = layer.export_state()[STATS + "calls"]
        assert calls.tolist() == [3 + 2 * 3, 2 + 2 * 2]  # train steps; evaluate + validation
    want = _expected_metrics(layer, x, 16)
    assert want["moe_dropped"] > 0 and want["moe_max_over_mean_load"] > 1.0
    for name, value in want.items():
        assert len(history.history[name]) == 2, name
        np.testing.assert_allclose(history.history[name], [value] * 2, rtol=1e-4, err_msg=name)
    val_want = _expected_metrics(layer, x_val, 20)
    assert val_want["moe_max_over_mean_load"] != pytest.approx(want["moe_max_over_mean_load"])


def test_moe_metrics_without_moe_layers_names_the_model() -> None:
    model = keras.Sequential([keras.Input((D,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(InputError, match="model"):
        model.fit(np.zeros((4, D)), np.zeros((4, 1)), verbose=0, callbacks=[MoEMetrics()])


# ----- (f) find_moe_layers -----------------------------------------------------------------------
class _Block(keras.layers.Layer):
    """A custom layer holding a MoE (a transformer block, say)."""

    def __init__(self, config: mr.MoEConfig, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.norm = keras.layers.LayerNormalization()
        self.moe = MoE(config, seed=2, name="block_moe")

    def call(self, x):
        return x + self.moe(self.norm(x))


def test_find_moe_layers_in_nested_models_in_graph_order() -> None:
    config = _config("top_k")
    inputs = keras.Input((S, D))
    first = MoE(config, seed=0, name="first")
    inner = keras.Sequential([keras.Input((S, D)), MoE(config, seed=1, name="second")],
                             name="inner")
    block = _Block(config, name="block")
    model = keras.Model(inputs, block(inner(first(inputs))))
    found = find_moe_layers(model)
    assert [layer for _, layer in found] == [first, inner.layers[0], block.moe]
    assert [name for name, _ in found] == ["first", "inner/second", "block/block_moe"]
    assert find_moe_layers(first) == [("first", first)]
    assert find_moe_layers(block) == [(block.moe.path, block.moe)]
    assert find_moe_layers(keras.Sequential([keras.layers.Dense(1)])) == []
    assert find_moe_layers(object()) is None and find_moe_layers([first]) is None


def test_mirrored_replicas_sum_counters_and_keep_the_first_replicas_trace(tmp_path) -> None:
    """Two CPU replicas (a fresh process: logical devices are set before TensorFlow starts):
    MoEMetrics switches the observers on inside the strategy, the counters sum both replicas,
    the trace buffer holds the first replica's rows (assigned, not summed)."""
    import os
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import keras, moe_router as mr
        from moe_router.keras import MoE, MoEMetrics
        from moe_router.layer.observers import TraceConfig
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        config = mr.MoEConfig(d_model={D}, d_ff={F}, router=mr.RouterConfig(num_experts={E}, k=2),
                              trace=TraceConfig(capacity=16, tokens_per_call=4))
        with strategy.scope():
            inputs = keras.Input(({S}, {D}))
            moe = MoE(config, seed=0, name="moe")
            out = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling1D()(moe(inputs)))
            model = keras.Model(inputs, out)
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
        x = np.random.default_rng(0).normal(size=(8, {S}, {D})).astype(np.float32)
        history = model.fit(x, np.zeros((8, 1), np.float32), batch_size=8, epochs=1,
                            verbose=0, shuffle=False, callbacks=[MoEMetrics(keep_observers=True)])
        state = moe.export_state()
        assert state["observers.routing_stats.calls"].tolist() == [2, 0], state
        assert state["observers.routing_stats.tokens"].tolist() == [8 * {S}, 0], state
        assert state["observers.routing_trace.calls"].tolist() == [1]  # the first replica's cursor
        assert state["observers.routing_trace.written"].tolist() == [4]
        _, plan = moe(x[:4], return_plan=True)  # the first replica's half of the batch
        T = 4 * {S}
        rows = [(r * T) // 4 for r in range(4)]
        np.testing.assert_array_equal(state["observers.routing_trace.experts"][:4],
                                      plan.expert_indices.numpy()[rows])
        np.testing.assert_allclose(state["observers.routing_trace.weights"][:4],
                                   plan.expert_weights.numpy()[rows], atol=1e-6)
        assert (state["observers.routing_trace.index"][4:] == -1).all()
        assert history.history["moe_mean_experts"] == [2.0], history.history
        print("ok")
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
