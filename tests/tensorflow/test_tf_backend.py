"""What only TensorFlow has: ``tf.function`` with an unknown batch dimension (sizes are scalar
tensors), XLA (``jit_compile=True``), stateless seeds and ``tf.random.Generator``, bfloat16.

Everything the backends share (each primitive and ``route()`` against NumPy, ties, dtypes,
gradients) is in tests/test_conformance.py.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from router_cases import assert_same_plan, case_inputs, case_table, plan_fields  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError  # noqa: E402
from moe_router.registry import get_backend  # noqa: E402

pytestmark = pytest.mark.tensorflow

E, T = 8, 24
CASES = case_table(E)
#: every input a case may need, so one signature serves all (None: unknown batch size)
SIGNATURE = {"token_ids_T": tf.TensorSpec([None], tf.int32),
             "expert_bias_E": tf.TensorSpec([E], tf.float32),
             "mask_T": tf.TensorSpec([None], tf.float32),
             "hidden_TD": tf.TensorSpec([None, 12], tf.float32),
             "complexity_scores_T": tf.TensorSpec([None], tf.float32)}


@pytest.fixture(scope="module")
def b():
    return get_backend("tensorflow")


def _route_fn(name: str):
    config = CASES[name].config

    def fn(logits, extra):
        return plan_fields(mr.route(logits, config, **extra))
    return fn


def _inputs(name: str, tokens: int = T, seed: int = 0) -> tuple[np.ndarray, dict]:
    logits, extra = case_inputs(CASES[name], tokens, seed)
    logits[min(3, tokens - 1)] = logits[min(3, tokens - 1), 0]  # a row of exact ties
    return logits, extra


def _check(b, name: str, fn, logits: np.ndarray, extra: dict) -> None:
    out = fn(tf.constant(logits), {k: tf.constant(v) for k, v in extra.items()})
    assert_same_plan(b, out, mr.route(logits, CASES[name].config, **extra))


# ----- primitives ------------------------------------------------------------------------------
def test_sorts_are_stable_eager_and_under_xla(b) -> None:
    x = np.array([[1.0, 3.0, 3.0, 1.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0, 5.0, 2.0]], np.float32)
    keys = np.array([[3, 1, 3, 0, 1, 3]], np.int32)

    @tf.function(jit_compile=True)
    def sorts(v, k):
        values, idx = b.top_k(v, 3)
        return b.argsort_desc(v), idx, values, b.argsort(k), b.argsort(v, axis=0)

    order, idx, values, asc, asc0 = sorts(tf.constant(x), tf.constant(keys))
    want = np.argsort(-x, axis=-1, kind="stable")
    np.testing.assert_array_equal(order.numpy(), want)
    np.testing.assert_array_equal(idx.numpy(), want[:, :3])
    np.testing.assert_array_equal(values.numpy(), np.take_along_axis(x, want[:, :3], -1))
    np.testing.assert_array_equal(asc.numpy(), np.argsort(keys, axis=-1, kind="stable"))
    np.testing.assert_array_equal(asc0.numpy(), np.argsort(x, axis=0, kind="stable"))
    np.testing.assert_array_equal(b.argsort_desc(tf.constant([False, True, True])).numpy(),
                                  [1, 2, 0])


@pytest.mark.parametrize("jit_compile", [False, True], ids=["graph", "xla"])
def test_primitives_in_tf_function_with_unknown_sizes(b, jit_compile: bool) -> None:
    rng = np.random.default_rng(0)
    perm = rng.permutation(300).astype(np.int32)
    x = (rng.normal(size=(5, 37)) * 4).astype(np.float32)

    def primitives(perm, x):
        return (b.invert_permutation(perm), b.argsort(b.cast(x, "int")), b.sigmoid(x),
                b.softmax(x), b.log(b.maximum(x, 0.5)), b.gelu(x), b.silu(x), b.relu(x),
                b.stop_gradient(x), b.cast_like(perm, x), b.full((b.dim(x, 0),), 2, "int32",
                                                                  like=x))

    fn = tf.function(primitives, jit_compile=jit_compile, input_signature=[
        tf.TensorSpec([None], tf.int32), tf.TensorSpec([None, None], tf.float32)])
    for got, want in zip(fn(perm, x), primitives(tf.constant(perm), tf.constant(x)),
                         strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-7)


def test_dim_is_static_int_or_symbolic_and_is_tracing(b) -> None:
    x = tf.zeros((3, 4))
    assert b.dim(x, 0) == 3 and isinstance(b.dim(x, 0), int)
    assert not b.is_tracing(x) and b.is_host(x)
    seen = {}

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32)])
    def fn(v):
        seen["dim0"], seen["dim1"], seen["tracing"] = b.dim(v, 0), b.dim(v, 1), b.is_tracing(v)
        return b.full((b.dim(v, 0), 2), 1, "int", like=v)

    assert fn(x).shape == (3, 2)
    assert tf.is_tensor(seen["dim0"]) and seen["dim1"] == 4 and seen["tracing"]


def test_random_takes_a_generator_a_seed_or_none(b) -> None:
    like = tf.zeros((5, 3))
    a = b.random_uniform(7, like).numpy()
    np.testing.assert_array_equal(a, b.random_uniform(7, like).numpy())
    np.testing.assert_array_equal(a, b.random_uniform((7, 0), like).numpy())  # stateless pair
    gen = tf.random.Generator.from_seed(1)
    n1, n2 = b.random_normal(gen, like).numpy(), b.random_normal(gen, like).numpy()
    assert not np.array_equal(n1, n2)  # the generator advances
    assert b.random_normal(None, like).shape == (5, 3)
    with pytest.raises(TypeError, match="rng"):
        b.random_uniform("seed", like)


def test_bfloat16_to_numpy_is_float32(b) -> None:
    assert b.to_numpy(tf.constant([1.5], tf.bfloat16)).dtype == np.float32
    assert b.dtype_kind(tf.constant([1.5], tf.bfloat16)) == "f"


# ----- route() ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["top_k", "top_p", "expert_choice", "complexity",
                                  "capacity_prob", "expert_bias_hf_loss", "hash",
                                  "complexity_hidden"])
def test_route_in_tf_function_with_unknown_batch_matches_numpy(b, name: str) -> None:
    signature = {k: SIGNATURE[k] for k in CASES[name].needs}
    fn = tf.function(_route_fn(name), input_signature=[
        tf.TensorSpec([None, CASES[name].config.num_choices], tf.float32), signature])
    for seed, size in ((0, T), (1, 7)):  # one trace, two batch sizes
        _check(b, name, fn, *_inputs(name, size, seed))
    assert fn.experimental_get_tracing_count() == 1


@pytest.mark.parametrize("name", ["top_k_sigmoid_groups", "threshold", "null", "relu",
                                  "capacity", "complexity", "top_p_one", "top_k_ties"])
def test_route_under_xla_matches_numpy(b, name: str) -> None:
    _check(b, name, tf.function(_route_fn(name), jit_compile=True), *_inputs(name, seed=2))


def test_route_bfloat16_logits_are_upcast() -> None:
    config = CASES["top_k"].config
    logits = np.random.default_rng(3).normal(size=(T, E)).astype(np.float32)
    plan = mr.route(tf.cast(tf.constant(logits), tf.bfloat16), config)
    assert plan.expert_weights.dtype == tf.float32
    ref = mr.route(np.asarray(tf.cast(tf.cast(logits, tf.bfloat16), tf.float32)), config)
    np.testing.assert_array_equal(plan.expert_indices.numpy(), ref.expert_indices)


def test_nan_logits_are_not_checked_while_tracing() -> None:
    config = CASES["top_k"].config
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
