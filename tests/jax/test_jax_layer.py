"""The Flax NNX layer: parity with the NumPy oracle, dispatch methods, state, losses, weights."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
from jax_cases import ROUTERS, D, inputs, moe_config, token_ids  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import ConfigError, InputError, InputTypeError  # noqa: E402
from moe_router.flax import MoE, apply, params_from_weights  # noqa: E402
from moe_router.layer.experts import DispatchInfo  # noqa: E402
from moe_router.weights import reference_forward, weight_shapes  # noqa: E402
from moe_router_backends.jax.dispatch import choose_kernel  # noqa: E402

pytestmark = pytest.mark.jax

STATEFUL = ("top_p", "complexity")


def _call_kwargs(name: str, shape: tuple[int, ...]) -> tuple[dict, dict]:
    """(layer kwargs, reference route kwargs) for strategy ``name`` and leading ``shape``."""
    T = int(np.prod(shape))
    layer_kw, ref_kw = {}, {}
    if name == "hash":
        ids = token_ids(T)
        layer_kw["token_ids"] = jnp.asarray(ids.reshape(shape))
        ref_kw["token_ids_T"] = ids
    if ROUTERS[name].strategy in STATEFUL:
        ref_kw["state"] = mr.init_router_state(ROUTERS[name])
    return layer_kw, ref_kw


def _forward(layer: MoE, x: np.ndarray, **kwargs):
    return nnx.jit(lambda m, x, kw: m(x, return_plan=True, **kw))(layer, jnp.asarray(x), kwargs)


def _forward_many(layers: list[MoE], x: np.ndarray, kwargs: list[dict] | None = None):
    """Every layer on ``x`` inside ONE ``nnx.jit`` (one XLA compile instead of one per config)."""
    kwargs = kwargs or [{} for _ in layers]

    @nnx.jit
    def run(x, kwargs, *layers):
        return [m(x, return_plan=True, **kw) for m, kw in zip(layers, kwargs)]

    return run(jnp.asarray(x), kwargs, *layers)


def test_layer_matches_reference_for_every_strategy():
    names = sorted(ROUTERS)
    layers = [MoE(moe_config(name), rngs=nnx.Rngs(i)) for i, name in enumerate(names)]
    for layer in layers:
        if layer.config.router.use_expert_bias:  # a non-zero bias that changes decisions
            layer.router.expert_bias[...] = jnp.asarray([0.3, -0.1, 0.0, -0.2])
    x = inputs((2, 6))
    cases = [_call_kwargs(name, (2, 6)) for name in names]
    outputs = _forward_many(layers, x, [layer_kw for layer_kw, _ in cases])
    for name, layer, (_, ref_kw), (y, plan) in zip(names, layers, cases, outputs):
        want, ref = reference_forward(x, layer.export_weights(), layer.config, **ref_kw)
        assert y.shape == x.shape and y.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(plan.expert_indices), ref.expert_indices,
                                      err_msg=name)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(float(plan.losses.total), float(ref.losses.total),
                                   rtol=1e-5, err_msg=name)


def test_every_dispatch_method_is_exact_on_a_dynamic_strategy():
    # top_p leaves unused (-1) slots; they must cost nothing and contribute nothing
    methods = ["jax:tiles", "jax:ragged_dot", "sorted", "gather", "dense", "auto"]
    weights = MoE(moe_config("top_p"), rngs=nnx.Rngs(1)).export_weights()
    layers = [MoE.from_weights(moe_config("top_p", dispatch=m), weights) for m in methods]
    x = inputs((3, 5), seed=3)
    want, ref = reference_forward(x, weights, layers[0].config,
                                  state=mr.init_router_state(layers[0].config.router))
    assert int(np.sum(ref.expert_indices < 0)) > 0
    for method, (y, _) in zip(methods, _forward_many(layers, x)):
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=method)


def test_capacity_routing_drops_and_stays_exact():
    methods = ["capacity", "jax:tiles", "jax:ragged_dot", "auto"]
    weights = MoE(moe_config("capacity"), rngs=nnx.Rngs(2)).export_weights()
    layers = [MoE.from_weights(moe_config("capacity", dispatch=m), weights) for m in methods]
    x = inputs((16,), seed=4)
    want, ref = reference_forward(x, weights, layers[0].config)
    for method, (y, plan) in zip(methods, _forward_many(layers, x)):
        assert int(plan.num_dropped) == int(ref.num_dropped) > 0
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=method)


def test_dispatch_policy():
    def info(T: int, capacity: int | None = None) -> DispatchInfo:
        return DispatchInfo(num_tokens=T, num_slots=2, num_experts=8, capacity=capacity,
                            traced=True, config=moe_config())

    cpu = jnp.zeros((4, D))  # a CPU array: the policy reads its platform
    assert choose_kernel("auto", info(1), cpu) == "gather"  # T*K < E: decode
    assert choose_kernel("auto", info(4096), cpu) == "jax:tiles"
    assert choose_kernel("sorted", info(1), cpu) == "jax:tiles"
    assert choose_kernel("auto", info(4096, capacity=1280), cpu) == "capacity"
    assert choose_kernel("dense", info(4096), cpu) == "dense"
    with pytest.raises(ConfigError, match="dispatch"):
        moe_config(dispatch="nope")
    with pytest.raises(ConfigError, match="dispatch"):
        moe_config(dispatch="tiles")  # a JAX kernel is qualified: "jax:tiles"


def test_tiles_kernel_with_partial_tiles_is_exact():
    # small tiles: experts span several tiles, the last window is moved back inside the rows
    import functools

    from moe_router.layer.experts import dense, expert_weights, permute, unpermute
    from moe_router_backends.jax.dispatch import tiles_ffn
    from moe_router_backends.jax.functional import JAX

    mc = moe_config("top_p")
    params = params_from_weights(mc, MoE(mc, rngs=nnx.Rngs(4)).export_weights())
    x_TD = jnp.asarray(inputs((11,), seed=8))
    ids_TK = jnp.asarray([[0, 1], [0, -1], [0, 2], [0, 1], [3, -1], [0, 1], [2, 0], [0, -1],
                          [1, 0], [0, 3], [0, 1]], jnp.int32)
    gates_TK = jnp.where(ids_TK >= 0, 0.5, 0.0)
    info = DispatchInfo(num_tokens=11, num_slots=2, num_experts=4, capacity=None, traced=True,
                        config=mc)
    w = expert_weights(JAX, params, x_TD)
    want = dense(JAX, x_TD, ids_TK, gates_TK, w, mc.activation, info)
    used = int(np.sum(np.asarray(ids_TK) >= 0))

    @functools.partial(jax.jit, static_argnums=0)
    def run(tile, x_TD):
        x_SD, perm = permute(JAX, x_TD, ids_TK, 4)
        out_SD = tiles_ffn(JAX, x_SD, perm, w, mc.activation, info, tile=tile)
        return unpermute(JAX, out_SD, perm, gates_TK), out_SD[used:]

    for tile in (1, 3, 4, 16, 64):
        y, unused = run(tile, x_TD)
        np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-6,
                                   err_msg=f"tile {tile}")
        assert not np.asarray(unused).any()  # rows of unused slots stay zero


def test_shared_expert_gate_bias_and_activations():
    from moe_router.weights import init_weights

    configs = [moe_config("top_k", activation=act, router_bias=True, num_shared_experts=n,
                          shared_expert_gate=n > 0)
               for act, n in (("geglu", 1), ("relu", 1), ("gelu", 0), ("silu", 0))]
    all_weights = []
    for i, mc in enumerate(configs):
        weights = init_weights(mc, seed=5 + i)
        weights["router.bias"] = np.linspace(-1, 1, mc.router.num_choices).astype(np.float32)
        all_weights.append(weights)
    layers = [MoE.from_weights(mc, w) for mc, w in zip(configs, all_weights)]
    x = inputs((7,), seed=6)
    for mc, weights, (y, _) in zip(configs, all_weights, _forward_many(layers, x)):
        want, _ = reference_forward(x, weights, mc)
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5,
                                   err_msg=mc.activation)


def test_nnx_jit_traces_once_per_shape_with_state_updates():
    mc = moe_config("top_p", dispatch="jax:tiles").with_router(target_experts=1.5)
    layer = MoE(mc, rngs=nnx.Rngs(0))
    layer.train()
    traces = []

    @nnx.jit
    def step(model, x):
        traces.append(x.shape)
        y, plan = model(x, return_plan=True)
        return jnp.sum(y), plan.stats.mean_experts

    for seed in range(3):
        step(layer, jnp.asarray(inputs((2, 6), seed=seed)))
    p_after_three = float(layer.router_state.top_p)
    step(layer, jnp.asarray(inputs((3, 6))))
    step(layer, jnp.asarray(inputs((3, 6), seed=9)))
    assert traces == [(2, 6, D), (3, 6, D)]
    # outside nnx.capture nothing is sown: the module keeps its structure (no retracing)
    assert not nnx.state(layer, nnx.Intermediate)
    assert p_after_three != mc.router.top_p  # the controller state really was updated


def test_jax_jit_of_functional_apply_traces_once():
    mc = moe_config("complexity")
    params = params_from_weights(mc, MoE(mc, rngs=nnx.Rngs(0)).export_weights())
    traces = []

    mask = np.asarray([1, 1, 0, 1], np.float32)  # padding: out of losses and statistics

    @jax.jit
    def f(params, x, mask):
        traces.append(1)
        y, plan = apply(params, x, mc, mask=mask)
        return y, plan

    for seed in range(3):
        y, plan = f(params, jnp.asarray(inputs((4,), seed=seed)), jnp.asarray(mask))
    assert len(traces) == 1 and isinstance(plan, mr.RoutingPlan)
    want, ref = reference_forward(inputs((4,), seed=2), {k: np.asarray(v) for k, v in
                                                         params.items()}, mc, mask_T=mask)
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(plan.stats.k_histogram), ref.stats.k_histogram)
    np.testing.assert_allclose(float(plan.losses.total), float(ref.losses.total), rtol=1e-5)


def test_router_noise_only_in_training_from_the_layer_rng_stream():
    mc = moe_config("top_k").with_router(noise="normal", noise_std=1.0)
    layer = MoE(mc, rngs=nnx.Rngs(0, noise=1))
    traces = []

    @nnx.jit
    def ids(model, x):
        traces.append(1)
        return model(x, return_plan=True)[1].expert_indices

    x = jnp.asarray(inputs((16,)))
    layer.train()
    first, second = ids(layer, x), ids(layer, x)
    assert not np.array_equal(first, second)  # the noise stream advances between steps
    layer.eval()
    _, ref = reference_forward(np.asarray(x), layer.export_weights(), mc)
    np.testing.assert_array_equal(np.asarray(ids(layer, x)), ref.expert_indices)  # no noise
    assert len(traces) == 2  # one trace per mode, none per step


def test_complexity_controller_updates_under_jit_in_training():
    mc = moe_config("complexity")
    layer = MoE(mc, rngs=nnx.Rngs(0))
    step = nnx.jit(lambda m, x: m(x, training=True))
    for seed in range(3):
        step(layer, jnp.asarray(inputs((8,), seed=seed)))
    state = layer.router_state
    assert float(state.score_count) == 3.0 and float(state.score_var) > 0.0


def test_losses_are_sown_under_capture_and_differentiable():
    mc = moe_config("top_k").with_router(aux_loss_coef=0.1, z_loss_coef=0.01)
    layer = MoE(mc, rngs=nnx.Rngs(0))
    x = jnp.asarray(inputs((6,)))

    def loss_fn(model):
        _, sown = nnx.capture(model, nnx.Intermediate)(x)
        losses = sown["router_losses"][0]
        return losses.total, sown

    (loss, sown), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(layer)
    _, ref = reference_forward(np.asarray(x), layer.export_weights(), mc)
    np.testing.assert_allclose(float(loss), float(ref.losses.total), rtol=1e-5)
    counts = sown["expert_counts"][0]
    np.testing.assert_array_equal(np.asarray(counts), ref.expert_counts)
    assert float(jnp.abs(grads.router.weight[...]).sum()) > 0.0  # the aux loss trains the router
    assert float(jnp.abs(grads.experts.w_up[...]).sum()) == 0.0


def test_losses_survive_scan_over_stacked_layers():
    mc = moe_config("threshold")
    stacked = [params_from_weights(mc, MoE(mc, rngs=nnx.Rngs(i)).export_weights())
               for i in range(3)]
    x = jnp.asarray(inputs((5,)))

    def body(h, p):
        y, plan = apply(p, h, mc)
        return y + h, (plan.losses.total, plan.stats.mean_experts)

    @jax.jit
    def scanned_and_unrolled(stacked, x):
        params = jax.tree.map(lambda *v: jnp.stack(v), *stacked)
        scanned = jax.lax.scan(body, x, params)
        h, totals, mean_k = x, [], []
        for p in stacked:
            h, (total, k) = body(h, p)
            totals.append(total)
            mean_k.append(k)
        return scanned, (h, (jnp.stack(totals), jnp.stack(mean_k)))

    (h, (totals, mean_k)), (h_loop, (totals_loop, mean_k_loop)) = scanned_and_unrolled(stacked, x)
    assert totals.shape == (3,) and float(totals.min()) > 0.0
    np.testing.assert_allclose(np.asarray(totals), np.asarray(totals_loop), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mean_k), np.asarray(mean_k_loop), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(h), np.asarray(h_loop), rtol=1e-5, atol=1e-6)
    # and the first layer's loss is the oracle's
    _, ref = reference_forward(np.asarray(x), {k: np.asarray(v) for k, v in stacked[0].items()},
                               mc)
    np.testing.assert_allclose(float(totals[0]), float(ref.losses.total), rtol=1e-5)


def test_expert_bias_is_state_with_an_explicit_update():
    mc = moe_config("expert_bias").with_router(bias_update_rate=0.05)
    layer = MoE(mc, rngs=nnx.Rngs(0))
    assert isinstance(layer.router.expert_bias, nnx.Variable)
    assert not isinstance(layer.router.expert_bias, nnx.Param)  # not trained by the optimizer
    step = nnx.jit(lambda m, x: m(x, training=True, return_plan=True)[1].expert_counts)
    counts = sum(np.asarray(step(layer, jnp.asarray(inputs((8,), seed=s)))) for s in range(2))
    load = layer.observers.expert_load.counts
    np.testing.assert_array_equal(np.asarray(load[...]), counts)
    assert load[...].dtype == jnp.int32
    new = nnx.jit(lambda m: m.update_expert_bias())(layer)
    want = mr.losses.update_expert_bias(np.zeros(4, np.float32), counts, 0.05)
    np.testing.assert_allclose(np.asarray(new), want, atol=1e-7)
    np.testing.assert_allclose(np.asarray(layer.router.expert_bias[...]), want, atol=1e-7)
    assert int(np.asarray(load[...]).sum()) == 0
    with pytest.raises(InputError, match="expert bias"):
        MoE(moe_config("top_k"), rngs=nnx.Rngs(0)).update_expert_bias()


def test_weights_round_trip_and_validation():
    mc = moe_config("top_k", num_shared_experts=1)
    layer = MoE(mc, rngs=nnx.Rngs(3))
    weights = layer.export_weights()
    assert set(weights) == set(weight_shapes(mc))
    assert all(v.dtype == np.float32 for v in weights.values())
    clone = MoE.from_weights(mc, weights)
    (y_clone, _), (y, _) = _forward_many([clone, layer], inputs((4,)))
    np.testing.assert_array_equal(np.asarray(y_clone), np.asarray(y))
    bad = dict(weights, **{"experts.w_up": weights["experts.w_up"][:, :-1]})
    with pytest.raises(InputError, match="experts.w_up"):
        MoE.from_weights(mc, bad)


def test_input_errors_name_the_argument():
    layer = MoE(moe_config("top_k"), rngs=nnx.Rngs(0))
    bad_x = [(InputError, "d_model", jnp.zeros((3, D + 1))),
             (InputTypeError, "floating", jnp.zeros((3, D), jnp.int32)),
             (InputTypeError, "jax array", [[0.0] * D]),
             (InputError, "NaN or Inf", jnp.full((2, D), jnp.nan))]
    for error, words, x in bad_x:
        for call in (layer, lambda x: apply(layer.params_dict(), x, layer.config)):
            with pytest.raises(error, match=words) as info:
                call(x)
            assert info.value.argument == "x"
    with pytest.raises(InputTypeError, match="MoEConfig"):
        MoE(ROUTERS["top_k"], rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="token_ids"):
        MoE(moe_config("hash"), rngs=nnx.Rngs(0))(jnp.zeros((3, D)))
    with pytest.raises(ConfigError):
        moe_config(dispatch="")


def test_empty_batch_gives_empty_output():
    mc = moe_config("top_k")
    params = params_from_weights(mc, MoE(mc, rngs=nnx.Rngs(0)).export_weights())
    y, plan = jax.jit(lambda p, x: apply(p, x, mc))(params, jnp.zeros((2, 0, D)))
    assert y.shape == (2, 0, D) and plan.expert_indices.shape == (0, 2)
    assert int(plan.expert_counts.sum()) == 0


def test_plan_pytree_registration_is_idempotent():
    from moe_router_backends.jax.backend import register_plan_pytree

    register_plan_pytree()
    register_plan_pytree()
    plan = jax.jit(lambda z: mr.route(z, ROUTERS["top_k"]))(jnp.zeros((3, 4)))
    leaves, treedef = jax.tree.flatten(plan)
    assert len(leaves) > 5 and jax.tree.unflatten(treedef, leaves).config == ROUTERS["top_k"]


def test_bfloat16_input_keeps_its_dtype():
    mc = moe_config("top_k")
    layer = MoE(mc, rngs=nnx.Rngs(0))
    x = inputs((6,))
    y = nnx.jit(lambda m, x: m(x))(layer, jnp.asarray(x, jnp.bfloat16))
    want, _ = reference_forward(x, layer.export_weights(), mc)
    assert y.dtype == jnp.bfloat16
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=0.05, atol=0.03 * scale)


def test_loads_torch_layer_weights_with_same_outputs():
    torch = pytest.importorskip("torch", reason="torch is not installed: no cross-framework "
                                "parity check")
    try:
        from moe_router.torch import MoE as TorchMoE
    except ImportError as err:  # the torch layer is written by another engineer
        pytest.skip(f"moe_router.torch.MoE is not available yet: {err}")
    names = ("top_k", "top_p", "null")
    configs = [moe_config(name, num_shared_experts=1, shared_expert_gate=True) for name in names]
    torch_layers = [TorchMoE(mc, seed=i).eval() for i, mc in enumerate(configs)]
    x = inputs((2, 5), seed=7)
    layers = [MoE.from_weights(mc, t.export_weights()) for mc, t in zip(configs, torch_layers)]
    for name, torch_layer, (y, _) in zip(names, torch_layers, _forward_many(layers, x)):
        with torch.no_grad():
            want = torch_layer(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5, err_msg=name)
