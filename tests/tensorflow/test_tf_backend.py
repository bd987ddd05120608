"""TensorFlowBackend primitives and ``route()`` parity with the NumPy oracle: eager, inside
``tf.function`` with an unknown batch dimension, and under XLA (``jit_compile=True``)."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError  # noqa: E402
from moe_router.registry import get_backend  # noqa: E402
from router_cases import router_cases  # noqa: E402

pytestmark = pytest.mark.tensorflow

E = 8
T = 24

STRATEGIES = {
    **router_cases(E),
    "bias_hf_loss": mr.RouterConfig(num_experts=E, k=2, use_expert_bias=True,
                                    balance_convention="hf", z_loss_coef=1e-3,
                                    entropy_loss_coef=1e-2),
}


@pytest.fixture(scope="module")
def b():
    return get_backend("tensorflow")


def _inputs(config: mr.RouterConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, config.num_choices)).astype(np.float32)
    logits[3] = logits[3, 0]  # a row of exact ties: lower index must win
    return {"logits": logits, "token_ids": rng.integers(0, 1000, size=T).astype(np.int32),
            "bias": (rng.normal(size=E) * 0.1).astype(np.float32),
            "mask": (rng.random(T) > 0.2).astype(np.float32)}


def _plan_arrays(plan: mr.RoutingPlan) -> tuple:
    return (plan.expert_indices, plan.expert_weights, plan.num_experts_per_token,
            plan.expert_counts, plan.num_dropped, plan.losses.total, plan.losses.load_balancing,
            plan.stats.mean_experts, plan.stats.k_histogram)


def _route_fn(config: mr.RouterConfig):
    def fn(logits, token_ids, bias, mask):
        return _plan_arrays(mr.route(logits, config, token_ids_T=token_ids,
                                     expert_bias_E=bias if config.use_expert_bias else None,
                                     mask_T=mask))
    return fn


def _check_against_numpy(config: mr.RouterConfig, outputs: tuple, data: dict) -> None:
    ref = mr.route(data["logits"], config, token_ids_T=data["token_ids"],
                   expert_bias_E=data["bias"] if config.use_expert_bias else None,
                   mask_T=data["mask"])
    names = ("indices", "weights", "k", "counts", "dropped", "loss", "lb", "mean_k", "hist")
    for name, got, want in zip(names, outputs, _plan_arrays(ref)):
        got = np.asarray(got)
        if np.asarray(want).dtype.kind in "iu":
            np.testing.assert_array_equal(got, want, err_msg=name)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)


# ----- primitives ------------------------------------------------------------------------------
def test_argsort_and_top_k_are_stable_descending_eager_and_xla(b) -> None:
    x = np.array([[1.0, 3.0, 3.0, 1.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 5.0, 2.0]], np.float32)
    want = np.argsort(-x, axis=-1, kind="stable")
    np.testing.assert_array_equal(b.argsort_desc(tf.constant(x)).numpy(), want)

    @tf.function(jit_compile=True)
    def both(v):
        values, idx = b.top_k(v, 3)
        return b.argsort_desc(v), idx, values

    order, idx, values = both(tf.constant(x))
    np.testing.assert_array_equal(order.numpy(), want)
    np.testing.assert_array_equal(idx.numpy(), want[:, :3])
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(x, want[:, :3], -1))
    # axis 0 and bool input
    col = np.array([[0.0], [1.0], [1.0], [0.0]], np.float32)
    np.testing.assert_array_equal(b.argsort_desc(tf.constant(col), axis=0).numpy()[:, 0],
                                  [1, 2, 0, 3])
    np.testing.assert_array_equal(b.argsort_desc(tf.constant([False, True, True])).numpy(),
                                  [1, 2, 0])


def test_one_hot_of_minus_one_is_zero_and_bincount_ignores_it(b) -> None:
    idx = tf.constant([[0, -1], [2, 2]], tf.int32)
    np.testing.assert_array_equal(b.one_hot(idx, 3, "int").numpy()[0, 1], [0, 0, 0])
    np.testing.assert_array_equal(b.bincount(idx, 3).numpy(), [1, 0, 2])
    assert b.bincount(idx, 3).dtype == tf.int32


def test_where_maximum_minimum_accept_python_scalars(b) -> None:
    ints = tf.constant([1, 5, 3], tf.int32)
    floats = tf.constant([0.5, -1.0, 2.0], tf.float32)
    cond = tf.constant([True, False, True])
    assert b.where(cond, ints, -1).dtype == tf.int32
    np.testing.assert_array_equal(b.where(cond, ints, -1).numpy(), [1, -1, 3])
    np.testing.assert_array_equal(b.where(cond, 0.0, floats).numpy(), [0.0, -1.0, 0.0])
    np.testing.assert_array_equal(b.maximum(ints, 2).numpy(), [2, 5, 3])
    np.testing.assert_array_equal(b.minimum(floats, 1).numpy(), [0.5, -1.0, 1.0])


def test_dim_is_static_int_or_symbolic_and_is_tracing(b) -> None:
    x = tf.zeros((3, 4))
    assert b.dim(x, 0) == 3 and isinstance(b.dim(x, 0), int)
    assert not b.is_tracing(x)
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def fn(v):
        seen["dim0"], seen["dim1"], seen["tracing"] = b.dim(v, 0), b.dim(v, 1), b.is_tracing(v)
        return b.full((b.dim(v, 0), 2), 1, "int", like=v)

    assert fn(x).shape == (3, 2)
    assert tf.is_tensor(seen["dim0"]) and seen["dim1"] == 4 and seen["tracing"]


def test_random_functions_take_generator_seed_or_none(b) -> None:
    like = tf.zeros((5, 3))
    a = b.random_uniform(7, like).numpy()
    np.testing.assert_array_equal(a, b.random_uniform(7, like).numpy())
    assert a.min() >= 0.0 and a.max() < 1.0 and a.dtype == np.float32
    gen = tf.random.Generator.from_seed(1)
    n1, n2 = b.random_normal(gen, like).numpy(), b.random_normal(gen, like).numpy()
    assert not np.array_equal(n1, n2)  # the generator advances
    assert b.random_normal(None, like).shape == (5, 3)
    with pytest.raises(TypeError, match="rng"):
        b.random_uniform("seed", like)


def test_asarray_cast_dtype_kind(b) -> None:
    assert b.asarray(np.zeros(3)).dtype == tf.float32
    assert b.asarray(np.arange(3)).dtype == tf.int32
    assert b.asarray([1, 2], dtype="float32").dtype == tf.float32
    assert [b.dtype_kind(tf.constant(v)) for v in (1.0, 1, True)] == ["f", "i", "b"]
    assert b.dtype_kind(tf.constant(1, tf.uint8)) == "u"
    bf = tf.constant([1.5], tf.bfloat16)
    assert b.to_numpy(bf).dtype == np.float32


# ----- route() parity --------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(STRATEGIES))
def test_route_eager_matches_numpy(name: str) -> None:
    config = STRATEGIES[name]
    data = _inputs(config)
    outputs = _route_fn(config)(*(tf.constant(data[k]) for k in ("logits", "token_ids", "bias",
                                                                 "mask")))
    assert outputs[0].dtype == tf.int32
    _check_against_numpy(config, outputs, data)


@pytest.mark.parametrize("name", ["top_k", "top_p", "expert_choice", "complexity",
                                  "capacity_prob", "bias_hf_loss", "hash"])
def test_route_in_tf_function_with_unknown_batch_matches_numpy(name: str) -> None:
    config = STRATEGIES[name]
    fn = tf.function(_route_fn(config), input_signature=[
        tf.TensorSpec([None, config.num_choices], tf.float32), tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([E], tf.float32), tf.TensorSpec([None], tf.float32)])
    for seed, size in ((0, T), (1, 7)):  # one trace, two batch sizes
        data = _inputs(config, seed)
        data = {k: (v[:size] if k != "bias" else v) for k, v in data.items()}
        outputs = fn(*(tf.constant(data[k]) for k in ("logits", "token_ids", "bias", "mask")))
        _check_against_numpy(config, outputs, data)
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("name", ["top_k_sigmoid_groups", "threshold", "null", "relu",
                                  "capacity", "complexity"])
def test_route_under_xla_matches_numpy(name: str) -> None:
    config = STRATEGIES[name]
    data = _inputs(config, seed=2)
    fn = tf.function(_route_fn(config), jit_compile=True)
    outputs = fn(*(tf.constant(data[k]) for k in ("logits", "token_ids", "bias", "mask")))
    _check_against_numpy(config, outputs, data)


def test_route_bfloat16_logits_are_upcast() -> None:
    config = STRATEGIES["top_k"]
    logits = np.random.default_rng(3).normal(size=(T, E)).astype(np.float32)
    plan = mr.route(tf.cast(tf.constant(logits), tf.bfloat16), config)
    assert plan.expert_weights.dtype == tf.float32
    ref = mr.route(np.asarray(tf.cast(tf.cast(logits, tf.bfloat16), tf.float32)), config)
    np.testing.assert_array_equal(plan.expert_indices.numpy(), ref.expert_indices)


def test_nan_logits_raise_eagerly_but_not_while_tracing() -> None:
    config = STRATEGIES["top_k"]
    bad = np.zeros((4, E), np.float32)
    bad[1, 2] = np.nan
    with pytest.raises(InputError, match="router_logits_TE"):
        mr.route(tf.constant(bad), config)
    fn = tf.function(lambda v: mr.route(v, config).expert_indices)
    assert fn(tf.constant(bad)).shape == (4, 2)


def test_training_noise_is_seeded() -> None:
    config = mr.RouterConfig(num_experts=E, k=2, noise="gumbel", noise_std=1.0)
    logits = tf.constant(np.random.default_rng(4).normal(size=(64, E)).astype(np.float32))
    first = mr.route(logits, config, training=True, rng=5).expert_indices.numpy()
    again = mr.route(logits, config, training=True, rng=5).expert_indices.numpy()
    other = mr.route(logits, config, training=True, rng=6).expert_indices.numpy()
    clean = mr.route(logits, config, training=False, rng=5).expert_indices.numpy()
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    np.testing.assert_array_equal(clean, mr.route(logits.numpy(), config).expert_indices)


def test_gradients_flow_through_route_weights() -> None:
    config = STRATEGIES["top_k"]
    logits = tf.Variable(np.random.default_rng(5).normal(size=(T, E)).astype(np.float32))
    with tf.GradientTape() as tape:
        plan = mr.route(logits, config)
        loss = tf.reduce_sum(plan.expert_weights * tf.range(2, dtype=tf.float32)) \
            + plan.losses.total
    grad = tape.gradient(loss, logits)
    assert grad is not None and np.isfinite(grad.numpy()).all() and np.abs(grad.numpy()).sum() > 0
