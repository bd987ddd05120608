"""JaxBackend primitives, ``route()`` parity with the NumPy oracle (eager and under ``jax.jit``)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from jax_cases import ROUTERS, logits, token_ids  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError  # noqa: E402
from moe_router.registry import get_backend  # noqa: E402

pytestmark = pytest.mark.jax


@pytest.fixture(scope="module")
def jb():
    return get_backend("jax")


def test_registered_and_found_by_type(jb):
    assert jb.name == "jax" and jb.framework == "jax"
    assert mr.backend_for(jnp.zeros(1)) is jb


def test_stable_sort_ties_to_lower_index(jb):
    x = jnp.asarray([[1.0, 3.0, 3.0, 2.0, 3.0], [0.0, -0.0, 0.0, 1.0, 0.0]])
    assert jb.argsort_desc(x).tolist() == [[1, 2, 4, 3, 0], [3, 0, 1, 2, 4]]
    values, idx = jb.top_k(x, 3)
    assert idx.tolist() == [[1, 2, 4], [3, 0, 1]]
    assert values[0].tolist() == [3.0, 3.0, 3.0]
    assert idx.dtype == jnp.int32


def test_sort_is_stable_under_jit(jb):
    x = jnp.asarray(np.tile(np.asarray([[2.0, 1.0]], np.float32), (1, 6)))
    idx = jax.jit(jb.argsort_desc)(x)
    assert idx.tolist() == [[0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]]


def test_one_hot_minus_one_and_bincount(jb):
    idx = jnp.asarray([[0, -1], [2, 2]])
    oh = jb.one_hot(idx, 3)
    assert oh[0, 1].tolist() == [0.0, 0.0, 0.0] and oh[1, 0].tolist() == [0.0, 0.0, 1.0]
    # -1 must not wrap around to the last expert
    assert jb.bincount(idx, 3).tolist() == [1, 0, 2]
    assert jb.bincount(jnp.asarray([-1, -1, 2]), 3).tolist() == [0, 0, 1]


def test_dtypes_and_static_dims(jb):
    x = jnp.zeros((3, 4), jnp.bfloat16)
    assert jb.dtype_kind(x) == "f" and jb.dtype_kind(jnp.zeros(2, jnp.int32)) == "i"
    assert jb.cast(x, "float32").dtype == jnp.float32 and jb.cast(x, "int").dtype == jnp.int32
    assert jb.asarray(np.zeros(2, np.float64)).dtype == jnp.float32
    assert jb.sum(jnp.asarray([True, True, False])).tolist() == 2

    def body(x):
        assert jb.dim(x, 1) == 4 and isinstance(jb.dim(x, 0), int)
        assert jb.is_tracing(x)
        return x

    jax.jit(body)(jnp.zeros((3, 4)))
    assert not jb.is_tracing(jnp.zeros(1))


def test_where_with_python_scalars(jb):
    cond = jnp.asarray([True, False])
    assert jb.where(cond, 1.0, 0.0).tolist() == [1.0, 0.0]
    assert jb.where(cond, jnp.asarray([5, 6], jnp.int32), -1).tolist() == [5, -1]


def test_random_needs_a_key(jb):
    like = jnp.zeros((3, 4))
    a = jb.random_normal(jax.random.key(7), like)
    assert a.shape == (3, 4) and a.dtype == jnp.float32
    assert np.array_equal(a, jb.random_normal(jax.random.key(7), like))
    assert np.array_equal(jb.random_uniform(3, like), jb.random_uniform(jax.random.key(3), like))
    with pytest.raises(InputError, match="rng"):
        jb.random_uniform(None, like)


def test_training_noise_without_rng_is_a_clear_error():
    config = mr.RouterConfig(num_experts=4, noise="normal", noise_std=1.0)
    z = jnp.asarray(logits(4))
    with pytest.raises(InputError, match="jax.random key"):
        jax.jit(lambda z: mr.route(z, config, training=True))(z)
    noisy = jax.jit(lambda z, key: mr.route(z, config, training=True, rng=key))
    a, b = noisy(z, jax.random.key(0)), noisy(z, jax.random.key(1))
    assert not np.array_equal(a.router_probs, b.router_probs)  # the noise is really applied


def _route_kwargs(name: str, as_jax: bool) -> dict:
    if name != "hash":
        return {}
    ids = token_ids()
    return {"token_ids_T": jnp.asarray(ids) if as_jax else ids}


def _assert_same_plan(plan, ref) -> None:
    np.testing.assert_array_equal(np.asarray(plan.expert_indices), ref.expert_indices)
    np.testing.assert_allclose(np.asarray(plan.expert_weights), ref.expert_weights, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(plan.expert_counts), ref.expert_counts)
    np.testing.assert_array_equal(np.asarray(plan.num_experts_per_token),
                                  ref.num_experts_per_token)
    assert int(plan.num_dropped) == int(ref.num_dropped)
    for got, want in zip(plan.losses, ref.losses):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(plan.stats.k_histogram), ref.stats.k_histogram)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_route_matches_numpy_under_jit(name):
    config = ROUTERS[name]
    z = logits(12, config.num_choices)
    bias = np.linspace(-0.2, 0.2, config.num_experts).astype(np.float32)
    extra = {"expert_bias_E": bias} if config.use_expert_bias else {}
    ref = mr.route(z, config, **_route_kwargs(name, False), **extra)
    jextra = {k: jnp.asarray(v) for k, v in extra.items()}
    jitted = jax.jit(lambda z, kw: mr.route(z, config, **kw))(
        jnp.asarray(z), {**_route_kwargs(name, True), **jextra})
    assert isinstance(jitted, mr.RoutingPlan) and jitted.config == config
    _assert_same_plan(jitted, ref)


@pytest.mark.parametrize("name", ["top_p"])
def test_route_matches_numpy_eager(name):
    # eager JAX compiles every primitive on first use (slow): one strategy covers the eager path
    config = ROUTERS[name]
    z = logits(12, config.num_choices)
    _assert_same_plan(mr.route(jnp.asarray(z), config), mr.route(z, config))


def test_route_with_state_and_mask_under_jit():
    config = mr.RouterConfig(num_experts=4, strategy="top_p", top_p=0.5, target_experts=1.5)
    z = logits(10)
    mask = (np.arange(10) < 7).astype(np.float32)
    state_np = mr.init_router_state(config)
    ref = mr.route(z, config, state=state_np, training=True, mask_T=mask)
    state = mr.init_router_state(config, like=jnp.zeros(()))

    @jax.jit
    def step(z, state, mask):
        return mr.route(z, config, state=state, training=True, mask_T=mask)

    plan = step(jnp.asarray(z), state, jnp.asarray(mask))
    _assert_same_plan(plan, ref)
    np.testing.assert_allclose(float(plan.state.top_p), float(ref.state.top_p), rtol=1e-6)
    assert float(plan.state.top_p) != config.top_p  # the controller moved p


def test_route_traces_once_per_shape():
    config = ROUTERS["top_p"]
    traces = []

    @jax.jit
    def f(z):
        traces.append(z.shape)
        return mr.route(z, config)

    for seed in range(3):
        f(jnp.asarray(logits(12, seed=seed)))
    f(jnp.asarray(logits(5)))
    assert traces == [(12, 4), (5, 4)]


def test_nan_check_eager_only():
    z = logits(4)
    z[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        mr.route(jnp.asarray(z), ROUTERS["top_k"])
    jax.jit(lambda z: mr.route(z, ROUTERS["top_k"]))(jnp.asarray(z))  # no data check when traced


def test_bf16_logits_route_in_float32():
    z = logits(8)
    plan = jax.jit(lambda z: mr.route(z, ROUTERS["top_k"]))(jnp.asarray(z, jnp.bfloat16))
    assert plan.expert_weights.dtype == jnp.float32 and plan.router_probs.dtype == jnp.float32
