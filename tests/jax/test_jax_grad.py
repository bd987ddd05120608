"""``jax.grad`` through the layer: a numeric gradient check in float64 (``jax.enable_x64``).

The context manager scopes float64 to this test, so other tests keep JAX's float32 default.
Expert weights and the shared expert are computed in the input's dtype (float64 here) and are
checked tightly; the router runs in float32 by design (ROUTING.md), so the router weight and
the input (which also feeds the router) get a float32-sized tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
from jax_cases import inputs, moe_config  # noqa: E402

from moe_router.flax import MoE, apply  # noqa: E402

pytestmark = pytest.mark.jax


def _shift(params, name: str, index: tuple[int, ...], delta: float):
    """``params`` with one entry moved by ``delta`` (in NumPy: no eager XLA scatter compiles)."""
    moved = np.array(params[name])
    moved[index] += delta
    return {**params, name: jnp.asarray(moved)}


def _numeric(loss, params, name: str, index: tuple[int, ...], eps: float) -> float:
    def shifted(delta: float) -> float:
        return float(loss(_shift(params, name, index, delta)))

    return (shifted(eps) - shifted(-eps)) / (2 * eps)


def test_numeric_gradient_check_float64():
    mc = moe_config("top_k", num_shared_experts=1, shared_expert_gate=True, dispatch="jax:tiles")
    with jax.enable_x64(True):
        layer = MoE(mc, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
        params = layer.params_dict()
        assert params["experts.w_up"].dtype == jnp.float64
        x = jnp.asarray(inputs((6,)), jnp.float64)
        target = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape))

        @jax.jit
        def loss(params, x=x):
            y, plan = apply(params, x, mc)
            return jnp.sum(y * target) + plan.losses.total, plan.expert_indices

        def value(params, x=x):
            return loss(params, x)[0]

        grads = jax.jit(jax.grad(value))(params)
        ids0 = np.asarray(loss(params)[1])
        rng = np.random.default_rng(2)
        for name, g in grads.items():
            assert g.dtype == jnp.float64 and g.shape == params[name].shape
            router = name.startswith("router")
            eps, rtol = (1e-3, 2e-2) if router else (1e-6, 1e-6)
            atol = (1e-3 if router else 1e-9) * float(jnp.abs(g).max())
            for _ in range(4):
                index = tuple(int(rng.integers(0, s)) for s in g.shape)
                moved = _shift(params, name, index, eps)
                np.testing.assert_array_equal(np.asarray(loss(moved)[1]), ids0)  # same decisions
                num = _numeric(value, params, name, index, eps)
                np.testing.assert_allclose(float(g[index]), num, rtol=rtol, atol=atol,
                                           err_msg=f"{name}{index}")
        assert float(jnp.abs(grads["router.weight"]).max()) > 0.0
        # and with respect to the input
        gx = jax.jit(jax.grad(lambda x: value(params, x)))(x)
        index = (3, 5)
        dx = np.zeros(x.shape)
        dx[index] = 1e-3
        num = (float(value(params, x + dx)) - float(value(params, x - dx))) / 2e-3
        np.testing.assert_allclose(float(gx[index]), num, rtol=2e-2,
                                   atol=1e-3 * float(jnp.abs(gx).max()))
    assert jnp.ones(1).dtype == jnp.float32  # x64 did not leak out of the context


def test_every_kernel_has_the_same_gradients():
    # top_p leaves unused slots; capacity drops: gradients must ignore both alike
    mc = moe_config("top_p")
    params = MoE(mc, rngs=nnx.Rngs(3)).params_dict()
    x = jnp.asarray(inputs((10,), seed=4))
    target = jnp.asarray(np.random.default_rng(5).standard_normal(x.shape), jnp.float32)
    kernels = ("jax:tiles", "jax:ragged_dot", "sorted", "dense", "gather")

    @jax.jit
    def all_grads(params, x):
        def loss(params, x, dispatch):
            y, plan = apply(params, x, mc, dispatch=dispatch)
            return jnp.sum(y * target) + plan.losses.total

        return [jax.grad(loss, argnums=(0, 1))(params, x, k) for k in kernels]

    grads = all_grads(params, x)
    for kernel, got in zip(kernels[1:], grads[1:]):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(grads[0])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                       err_msg=kernel)
