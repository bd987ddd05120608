"""The Keras MoE layer vs the NumPy oracle (``reference_forward``) for every strategy and every
dispatch path, eagerly, in ``tf.function`` and under XLA; state, plan, bias, errors."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

from router_cases import router_cases  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import ConfigError, InputError, InputTypeError  # noqa: E402
from moe_router.keras import MoE  # noqa: E402
from moe_router.weights import init_weights, reference_forward  # noqa: E402
from moe_router_backends.tensorflow.dispatch import choose_kernel  # noqa: E402

pytestmark = pytest.mark.tensorflow

E, D, F = 8, 16, 24
COUNTS = "observers.expert_load.counts"
STRATEGIES = {  # the shared table (tests/router_cases.py) plus the aux-free bias
    **router_cases(E),
    "bias": mr.RouterConfig(num_experts=E, k=2, use_expert_bias=True),
}


def _setup(rc: mr.RouterConfig, dispatch: str = "tensorflow:split", seed: int = 0, **moe: object):
    config = mr.MoEConfig(d_model=D, d_ff=F, router=rc, dispatch=dispatch, init_std=0.3, **moe)
    weights = init_weights(config, seed=seed)
    if rc.use_expert_bias:
        weights["router.expert_bias"] = np.linspace(-0.2, 0.2, E).astype(np.float32)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 10, D)).astype(np.float32)
    ids = rng.integers(0, 1000, size=(2, 10)).astype(np.int32)
    return config, weights, x, ids


def _reference(config, weights, x, ids):
    kwargs = {"token_ids_T": ids.reshape(-1)} if config.router.strategy == "hash" else {}
    return reference_forward(x, weights, config, **kwargs)


def _call_kwargs(config, ids):
    return {"token_ids": tf.constant(ids)} if config.router.strategy == "hash" else {}


def _close(got, want) -> None:
    got = np.asarray(got, np.float64)
    scale = max(np.abs(want).max(), 1e-6)
    np.testing.assert_allclose(got / scale, want / scale, atol=2e-6)


def _variable(layer: MoE, name: str):
    """The Keras variable holding portable name ``name`` (``router.weight`` -> router_weight)."""
    found = [v for v in layer.weights if v.name == name.replace(".", "_")]
    assert len(found) == 1, [v.name for v in layer.weights]
    return found[0]


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_layer_matches_reference_for_every_strategy(name: str) -> None:
    config, weights, x, ids = _setup(STRATEGIES[name])
    layer = MoE.from_weights(config, weights)
    want, plan = _reference(config, weights, x, ids)
    got, got_plan = layer(tf.constant(x), return_plan=True, **_call_kwargs(config, ids))
    assert got.shape == x.shape and got.dtype == tf.float32
    _close(got, want)
    np.testing.assert_array_equal(got_plan.expert_indices.numpy(), plan.expert_indices)
    assert float(got_plan.stats.mean_experts) == pytest.approx(float(plan.stats.mean_experts),
                                                               abs=1e-6)
    np.testing.assert_array_equal(got_plan.expert_counts.numpy(), plan.expert_counts)
    np.testing.assert_array_equal(got_plan.stats.k_histogram.numpy(), plan.stats.k_histogram)
    assert int(got_plan.num_dropped) == int(plan.num_dropped)
    np.testing.assert_array_equal(layer(tf.constant(x), **_call_kwargs(config, ids)), got)


@pytest.mark.parametrize("name,dispatch", [
    ("top_k", "tensorflow:tiles"), ("top_p", "tensorflow:tiles"), ("capacity", "capacity"),
    ("relu", "tensorflow:tiles"), ("expert_choice", "capacity"), ("top_p", "sorted"),
    ("capacity", "dense"), ("null", "gather"), ("hash", "auto")])
def test_dispatch_paths_match_reference_eager_and_xla(name: str, dispatch: str) -> None:
    config, weights, x, ids = _setup(STRATEGIES[name], dispatch=dispatch, seed=1)
    layer = MoE.from_weights(config, weights)
    want, _ = _reference(config, weights, x, ids)
    kwargs = _call_kwargs(config, ids)
    _close(layer(tf.constant(x), **kwargs), want)
    xla = tf.function(lambda v, **kw: layer(v, **kw), jit_compile=True)
    _close(xla(tf.constant(x), **kwargs), want)
    assert layer.supports_jit


def test_tf_function_with_unknown_batch_and_auto_dispatch_under_xla() -> None:
    config, weights, x, ids = _setup(STRATEGIES["top_k"], dispatch="auto", seed=2,
                                     num_shared_experts=1, shared_expert_gate=True)
    layer = MoE.from_weights(config, weights)
    want, _ = reference_forward(x, weights, config)
    spec = tf.TensorSpec([None, None, D], tf.float32)
    graph = tf.function(lambda v: layer(v), input_signature=[spec])
    _close(graph(tf.constant(x)), want)
    _close(graph(tf.constant(x[:1, :3])), want[:1, :3])  # same trace, other batch
    assert graph.experimental_get_tracing_count() == 1

    @tf.function(input_signature=[spec], jit_compile=True)
    def xla(v):
        y, plan = layer(v, return_plan=True)
        return y, plan.num_dropped

    y, num_dropped = xla(tf.constant(x))  # auto -> dropless tensorflow:tiles under XLA
    _close(y, want)
    assert int(num_dropped) == 0


@pytest.mark.parametrize("name", ["capacity", "expert_choice"])
def test_capacity_kernel_with_unknown_batch_in_tf_function_and_xla(name: str) -> None:
    """C is an int32 scalar tensor when T is unknown at trace time."""
    config, weights, x, ids = _setup(STRATEGIES[name], dispatch="capacity", seed=3)
    layer = MoE.from_weights(config, weights)
    want, _ = _reference(config, weights, x, ids)
    spec = tf.TensorSpec([None, D], tf.float32)
    for jit in (False, True):
        fn = tf.function(lambda v: layer(v), input_signature=[spec], jit_compile=jit)
        _close(fn(tf.constant(x.reshape(-1, D))), want.reshape(-1, D))


def test_auto_policy_choices() -> None:
    from moe_router.layer.experts import DispatchInfo

    config = mr.MoEConfig(d_model=D, d_ff=F, router=STRATEGIES["top_k"])
    dropless = DispatchInfo(None, 2, E, None, True, config)
    capped = dropless._replace(capacity=5)
    x = tf.zeros((4, D))
    assert choose_kernel("auto", capped, x) == "tensorflow:split"  # eager / tf.function
    assert choose_kernel("sorted", dropless, x) == "tensorflow:split"
    assert choose_kernel("dense", dropless, x) is None
    seen = {}

    @tf.function(jit_compile=True)
    def probe(v):
        seen["auto"] = choose_kernel("auto", dropless, v)
        seen["capped"] = choose_kernel("auto", capped, v)
        seen["sorted"] = choose_kernel("sorted", capped, v)
        return v

    probe(x)
    assert seen == {"auto": "tensorflow:tiles", "capped": "capacity",
                    "sorted": "tensorflow:tiles"}
    assert not MoE(config.replace(dispatch="tensorflow:split")).supports_jit


@pytest.mark.parametrize("activation", ["geglu", "gelu", "relu", "silu"])
def test_activations_and_shared_expert(activation: str) -> None:
    config, weights, x, ids = _setup(STRATEGIES["top_k"], activation=activation,
                                     shared_d_ff=12, router_bias=True)
    weights["router.bias"] = np.linspace(-1, 1, E).astype(np.float32)
    layer = MoE.from_weights(config, weights)
    want, _ = reference_forward(x, weights, config)
    _close(layer(tf.constant(x)), want)


def test_export_import_round_trip_with_router_state() -> None:
    config, weights, *_ = _setup(STRATEGIES["bias"], num_shared_experts=1)
    layer = MoE.from_weights(config, weights)
    exported = layer.export_weights()
    assert set(exported) == set(mr.weights.weight_shapes(config)) == set(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(exported[name], value)
        assert exported[name].dtype == np.float32
    assert not _variable(layer, "router.expert_bias").trainable
    assert not _variable(layer, "router.state").trainable
    with pytest.raises(InputError, match="experts.w_up"):
        MoE.from_weights(config, {**weights, "experts.w_up": weights["experts.w_up"][:, :2]})
    state = layer.export_state()
    assert set(state) == {"router.state", "router.expert_bias", COUNTS}
    assert state[COUNTS].dtype == np.int32


def test_trained_controller_moves_with_the_weights() -> None:
    rc = mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, max_experts=4,
                         target_experts=1.0, controller_rate=0.2)
    config, weights, x, _ = _setup(rc)
    layer = MoE.from_weights(config, weights)
    for _ in range(3):
        layer(tf.constant(x), training=True)
    exported = layer.export_weights()
    assert exported["router.state"][0] < 0.5  # the trained p travels in the export
    moved = MoE.from_weights(config, exported)
    np.testing.assert_array_equal(moved.export_state()["router.state"],
                                  layer.export_state()["router.state"])
    np.testing.assert_array_equal(moved(tf.constant(x)), layer(tf.constant(x)))
    want, _ = reference_forward(x, exported, config)  # the oracle reads router.state too
    _close(moved(tf.constant(x)), want)
    layer.reset_router_state()
    assert float(layer.router_state.top_p) == pytest.approx(0.5)


def test_aux_loss_is_added_and_differentiable() -> None:
    rc = mr.RouterConfig(num_experts=E, k=2, aux_loss_coef=0.5, z_loss_coef=0.1)
    config, weights, x, ids = _setup(rc)
    layer = MoE.from_weights(config, weights)
    _, plan = reference_forward(x, weights, config)
    with tf.GradientTape() as tape:
        layer(tf.constant(x), training=True)
        loss = tf.add_n(layer.losses)
    assert len(layer.losses) == 1
    assert float(loss) == pytest.approx(float(plan.losses.total), rel=1e-5)
    grad = tape.gradient(loss, _variable(layer, "router.weight"))
    assert grad is not None and float(tf.reduce_sum(tf.abs(grad))) > 0
    plain = MoE.from_weights(config.with_router(aux_loss_coef=0.0, z_loss_coef=0.0), weights)
    plain(tf.constant(x), training=True)
    assert plain.losses == []


def test_controller_state_updates_only_in_training_or_calibration() -> None:
    rc = mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, max_experts=4,
                         target_experts=1.0, controller_rate=0.1)
    config, weights, x, _ = _setup(rc)
    layer = MoE.from_weights(config, weights)
    layer(tf.constant(x), training=False)
    assert isinstance(layer.router_state, mr.RouterState)
    assert float(layer.router_state.top_p) == pytest.approx(0.5)
    _, plan = reference_forward(x, weights, config, training=True)
    layer(tf.constant(x), training=True)
    assert float(layer.router_state.top_p) == pytest.approx(float(plan.state.top_p), abs=1e-6)
    assert float(layer.router_state.top_p) < 0.5  # mean k > 1 pushes p down
    layer.reset_router_state()
    layer.calibrating = True
    layer(tf.constant(x))
    assert float(layer.router_state.top_p) == pytest.approx(float(plan.state.top_p), abs=1e-6)


def test_state_updates_inside_tf_function() -> None:
    config, weights, x, _ = _setup(STRATEGIES["bias"])
    layer = MoE.from_weights(config, weights)
    step = tf.function(lambda v: layer(v, training=True))
    step(tf.constant(x))
    step(tf.constant(x))
    assert layer.export_state()[COUNTS].sum() == 2 * x.shape[0] * x.shape[1] * 2


def test_expert_bias_update_uses_accumulated_int32_counts() -> None:
    config, weights, x, _ = _setup(STRATEGIES["bias"])
    layer = MoE.from_weights(config, weights)
    before = layer.export_weights()["router.expert_bias"]
    layer(tf.constant(x), training=False)
    np.testing.assert_array_equal(layer.export_state()[COUNTS], 0)  # inference does not count
    layer(tf.constant(x), training=True)
    layer(tf.constant(x), training=True)
    loads = layer.export_state()[COUNTS]
    assert loads.dtype == np.int32 and loads.sum() == 2 * x.shape[0] * x.shape[1] * 2
    new = layer.update_expert_bias()
    want = mr.losses.update_expert_bias(before, loads, config.router.bias_update_rate)
    np.testing.assert_allclose(new, want, atol=1e-7)
    np.testing.assert_allclose(layer.export_weights()["router.expert_bias"], want, atol=1e-7)
    np.testing.assert_array_equal(layer.export_state()[COUNTS], 0)
    given = np.arange(E, dtype=np.int32)  # e.g. counts already reduced elsewhere
    newer = layer.update_expert_bias(given)
    np.testing.assert_allclose(newer, mr.losses.update_expert_bias(
        new, given, config.router.bias_update_rate), atol=1e-7)
    plain = MoE(mr.MoEConfig(d_model=D, d_ff=F, router=STRATEGIES["top_k"]))
    plain.build((None, D))
    with pytest.raises(InputError, match="use_expert_bias"):
        plain.update_expert_bias()


def test_bad_inputs_and_configs_raise_typed_errors() -> None:
    config, weights, x, _ = _setup(STRATEGIES["top_k"])
    layer = MoE.from_weights(config, weights)
    with pytest.raises(InputError, match=r"d_model=16") as err:
        layer(tf.zeros((3, D + 1)))
    assert err.value.argument == "x"
    with pytest.raises(InputTypeError, match="floating") as err:
        layer(tf.zeros((3, D), tf.int32))
    assert err.value.argument == "x"
    with pytest.raises(ConfigError, match="dispatch"):
        MoE(config.replace(dispatch="grouped_mm"))
    with pytest.raises(ConfigError, match="capacity"):
        MoE(config.replace(dispatch="capacity"))
    with pytest.raises(InputTypeError, match="config"):
        MoE("top_k")
    if "torch:grouped_mm" in mr.registry.default_registry().kernel_names():
        try:
            other = config.replace(dispatch="torch:grouped_mm")
        except ConfigError:  # torch not installed
            return
        with pytest.raises(ConfigError, match="tensorflow"):
            MoE(other)
