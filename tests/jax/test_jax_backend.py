"""What only JAX has: ``jax.jit`` tracing of the primitives and of ``route()`` (static shapes, one
trace per shape, no data checks on tracers), PRNG-key conventions and bfloat16 logits.

Everything the backends share (each primitive and ``route()`` against NumPy, ties, dtypes) is in
tests/test_conformance.py.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
import jax.numpy as jnp  # noqa: E402
from router_cases import assert_same_plan, case_inputs, case_table, plan_fields  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError  # noqa: E402
from moe_router.registry import get_backend  # noqa: E402

pytestmark = pytest.mark.jax

E, T = 4, 12  # small: XLA compile time dominates
CASES = case_table(E, max_dynamic=3, num_groups=2, topk_groups=1, num_null=2)
JIT_CASES = [name for name, case in CASES.items() if case.core] + [
    "top_k_ties", "expert_bias_hf_loss", "top_p_one", "expert_choice_cf", "complexity_external"]


@pytest.fixture(scope="module")
def jb():
    return get_backend("jax")


def test_primitives_under_jit_equal_eager(jb):
    rng = np.random.default_rng(0)
    perm = jnp.asarray(rng.permutation(300))
    keys = jnp.asarray(rng.integers(0, 4, size=(5, 37)), jnp.int32)
    x = jnp.asarray((rng.normal(size=(5, 37)) * 4).astype(np.float32))

    def primitives(perm, keys, x):
        return (jb.invert_permutation(perm), jb.argsort(keys), jb.argsort_desc(x),
                jb.argsort_desc(jnp.tile(jnp.asarray([2.0, 1.0]), 6)), jb.gelu(x), jb.silu(x),
                jb.relu(x), jb.sigmoid(x), jb.softmax(x), jb.stop_gradient(x),
                jb.cast_like(keys, x), jb.cast(keys, "int32"))

    for got, want in zip(jax.jit(primitives)(perm, keys, x), primitives(perm, keys, x),
                         strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-7)


def test_dims_are_static_and_tracers_are_known(jb):
    def body(x):
        assert jb.dim(x, 1) == 4 and isinstance(jb.dim(x, 0), int)
        assert jb.is_tracing(x) and not jb.is_host(x)  # no placement while tracing
        return x

    jax.jit(body)(jnp.zeros((3, 4)))
    assert not jb.is_tracing(jnp.zeros(1)) and jb.is_host(jnp.zeros(1))
    assert jb.dtype_kind(jnp.zeros(2, jnp.bfloat16)) == "f"


@pytest.mark.gpu
def test_is_host_false_on_gpu(jb):
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("JAX sees no GPU")
    assert not jb.is_host(jax.device_put(jnp.zeros(2), gpus[0]))


def test_random_takes_a_key_or_an_int_seed(jb):
    like = jnp.zeros((3, 4))
    a = jb.random_normal(jax.random.key(7), like)
    assert a.shape == (3, 4) and a.dtype == jnp.float32
    assert np.array_equal(a, jb.random_normal(jax.random.key(7), like))
    assert np.array_equal(jb.random_uniform(3, like), jb.random_uniform(jax.random.key(3), like))
    with pytest.raises(InputError, match="rng"):
        jb.random_uniform(None, like)


def test_training_noise_without_rng_is_a_clear_error():
    config = mr.RouterConfig(num_experts=E, noise="normal", noise_std=1.0)
    z = jnp.asarray(case_inputs(CASES["top_k"], T)[0])
    with pytest.raises(InputError, match="jax.random key"):
        jax.jit(lambda z: mr.route(z, config, training=True))(z)
    noisy = jax.jit(lambda z, key: mr.route(z, config, training=True, rng=key))
    a, b = noisy(z, jax.random.key(0)), noisy(z, jax.random.key(1))
    assert not np.array_equal(a.router_probs, b.router_probs)  # the noise is really applied


def test_route_under_jit_matches_numpy(jb):
    inputs = {name: case_inputs(CASES[name], T, seed=i) for i, name in enumerate(JIT_CASES)}

    @jax.jit
    def route_all(arrays):  # one compile for every case
        return {name: plan_fields(mr.route(z, CASES[name].config, **extra))
                for name, (z, extra) in arrays.items()}

    out = route_all(jax.tree.map(jnp.asarray, inputs))
    for name, (z, extra) in inputs.items():
        assert_same_plan(jb, out[name], mr.route(z, CASES[name].config, **extra))


def test_plan_is_a_pytree_returned_by_jit():
    config = CASES["top_p"].config
    z = case_inputs(CASES["top_p"], T)[0]
    plan = jax.jit(lambda z: mr.route(z, config))(jnp.asarray(z))
    assert isinstance(plan, mr.RoutingPlan) and plan.config == config
    assert_same_plan(get_backend("jax"), plan, mr.route(z, config))


def test_route_with_state_and_mask_under_jit():
    config = mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, target_experts=1.5)
    z = case_inputs(CASES["top_p"], 10)[0]
    mask = (np.arange(10) < 7).astype(np.float32)
    ref = mr.route(z, config, state=mr.init_router_state(config), training=True, mask_T=mask)
    state = mr.init_router_state(config, like=jnp.zeros(()))

    @jax.jit
    def step(z, state, mask):
        return mr.route(z, config, state=state, training=True, mask_T=mask)

    plan = step(jnp.asarray(z), state, jnp.asarray(mask))
    assert_same_plan(get_backend("jax"), plan, ref)
    assert float(plan.state.top_p) != config.top_p  # the controller moved p


def test_route_traces_once_per_shape():
    config = CASES["top_p"].config
    traces = []

    @jax.jit
    def f(z):
        traces.append(z.shape)
        return mr.route(z, config)

    for seed in range(3):
        f(jnp.asarray(case_inputs(CASES["top_p"], T, seed=seed)[0]))
    f(jnp.asarray(case_inputs(CASES["top_p"], 5)[0]))
    assert traces == [(T, E), (5, E)]


def test_nan_check_eager_only():
    z = case_inputs(CASES["top_k"], 4)[0]
    z[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        mr.route(jnp.asarray(z), CASES["top_k"].config)
    # no data check on tracers
    jax.jit(lambda z: mr.route(z, CASES["top_k"].config))(jnp.asarray(z))


def test_bf16_logits_route_in_float32():
    z = case_inputs(CASES["top_k"], 8)[0]
    plan = jax.jit(lambda z: mr.route(z, CASES["top_k"].config))(jnp.asarray(z, jnp.bfloat16))
    assert plan.expert_weights.dtype == jnp.float32 and plan.router_probs.dtype == jnp.float32
