"""The torch MoE layer against the NumPy oracle ``moe_router.weights.reference_forward``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router_backends.torch.layers import MoE  # noqa: E402
from moe_router.weights import init_weights, reference_forward, weight_shapes  # noqa: E402

pytestmark = pytest.mark.torch

E, D, F = 6, 16, 24


def _config(activation: str = "swiglu", dispatch: str = "auto", **router) -> mr.MoEConfig:
    router.setdefault("num_experts", E)
    return mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(**router),
                        activation=activation, dispatch=dispatch)


CASES = {
    "top_k": _config(k=2),
    "top_p": _config(strategy="top_p", top_p=0.5, max_experts=4),
    "threshold": _config(strategy="threshold", threshold=0.6),
    "null": _config(k=2, num_null_experts=2),
    "relu": _config(strategy="relu", min_experts=0, max_experts=3),
    "expert_choice": _config(strategy="expert_choice", max_experts=4),
    "hash": _config(strategy="hash", k=2),
    "complexity": _config(strategy="complexity", target_experts=2.0, max_experts=4),
    "sigmoid_bias_groups": _config(k=2, score_func="sigmoid", num_groups=3, topk_groups=2,
                                   use_expert_bias=True, route_scale=2.0),
    "capacity": _config(k=2, capacity_factor=0.5),
    "shared_gate": mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=E, k=2),
                                num_shared_experts=1, shared_d_ff=20, shared_expert_gate=True,
                                router_bias=True),
}


def _weights(config: mr.MoEConfig, seed: int = 0) -> dict[str, np.ndarray]:
    # larger than init_std so that routing and activations are far from trivial
    w = {k: v * 20.0 for k, v in init_weights(config, seed).items()}
    if "router.expert_bias" in w:
        w["router.expert_bias"] = np.linspace(-0.2, 0.2, config.num_experts).astype(np.float32)
    if "router.bias" in w:
        w["router.bias"] = np.linspace(-0.5, 0.5, w["router.bias"].shape[0]).astype(np.float32)
    return w


def _x(shape=(3, 7), seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(*shape, D)).astype(np.float32)


def _check(config, dispatch="auto", train=False, **fw):
    config = config.replace(dispatch=dispatch)
    w = _weights(config)
    x = _x()
    layer = MoE.from_weights(config, w).train(train)
    kw = {}
    if config.router.strategy == "hash":
        ids = np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[:-1]) * 7
        kw["token_ids_T"], fw["token_ids"] = ids.reshape(-1), torch.from_numpy(ids)
    if config.router.strategy in ("top_p", "complexity"):
        kw["state"] = mr.init_router_state(config.router)
    y = layer(torch.from_numpy(x), **fw)
    ref, plan = reference_forward(x, w, config, **kw)
    assert y.shape == x.shape and y.dtype == torch.float32
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(layer.last_plan.expert_indices.numpy(), plan.expert_indices)
    np.testing.assert_allclose(layer.aux_loss.item(), float(plan.losses.total), rtol=1e-5)
    return layer, plan


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(name):
    layer, plan = _check(CASES[name])
    if name == "capacity":
        assert int(plan.num_dropped) > 0  # the case really drops slots
    if name in ("top_p", "relu", "null", "complexity"):
        assert len(set(plan.num_experts_per_token.tolist())) > 1  # really dynamic


@pytest.mark.parametrize("dispatch", ["grouped_mm", "loop", "padded", "gather", "dense"])
@pytest.mark.parametrize("name", ["top_k", "top_p", "null", "capacity"])
def test_every_dispatch_matches_reference(name, dispatch):
    _check(CASES[name], dispatch=dispatch)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_every_activation(activation):
    _check(_config(activation=activation, k=2))


def test_weights_roundtrip_and_names():
    config = CASES["shared_gate"].with_router(use_expert_bias=True)
    w = _weights(config)
    layer = MoE.from_weights(config, w)
    out = layer.export_weights()
    assert set(out) == set(weight_shapes(config))
    for name, value in w.items():
        np.testing.assert_array_equal(out[name], value)
        assert out[name].dtype == np.float32
    sd = layer.state_dict()
    assert set(weight_shapes(config)) <= set(sd)  # state_dict keys are the portable names


def test_from_weights_rejects_wrong_shape():
    w = _weights(CASES["top_k"])
    w["experts.w_up"] = w["experts.w_up"][:, :, :5]
    with pytest.raises(mr.InputError, match="experts.w_up"):
        MoE.from_weights(CASES["top_k"], w)


def test_gradcheck_float64_router_and_experts():
    config = mr.MoEConfig(d_model=4, d_ff=3, router=mr.RouterConfig(num_experts=3, k=2),
                          num_shared_experts=1, shared_expert_gate=True)
    layer = MoE(config, seed=0).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(25.0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())

    def f(x, router_w, w_up, w_down):
        out = torch.func.functional_call(layer, {**params, "router.weight": router_w,
                                                 "experts.w_up": w_up,
                                                 "experts.w_down": w_down}, (x,))
        return out

    inputs = (x, params["router.weight"].detach().clone().requires_grad_(),
              params["experts.w_up"].detach().clone().requires_grad_(),
              params["experts.w_down"].detach().clone().requires_grad_())
    # route() runs in float32 (ROUTING.md), so the router path is only float32-accurate
    assert torch.autograd.gradcheck(f, inputs, eps=1e-4, atol=2e-3, rtol=2e-3)
    y = layer(x)
    (y.square().sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_gate.grad.abs().sum() > 0
    assert layer.shared.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["loop", "padded", "dense", "gather"])
def test_gradcheck_float64_expert_kernels_exact(impl):
    from moe_router_backends.torch.kernels import experts_forward

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [1, 2]])
    gates = torch.rand(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = {n: torch.randn(3, *s, dtype=torch.float64, generator=g, requires_grad=True)
         for n, s in (("w_gate", (4, 3)), ("w_up", (4, 3)), ("w_down", (3, 4)))}

    def f(x, gates, wg, wu, wd):
        return experts_forward(x, ids, gates, {"w_gate": wg, "w_up": wu, "w_down": wd},
                               "swiglu", impl)

    assert torch.autograd.gradcheck(f, (x, gates, w["w_gate"], w["w_up"], w["w_down"]))


def test_grouped_mm_backward_matches_loop():
    config = CASES["top_p"]
    grads = {}
    for dispatch in ("grouped_mm", "loop"):
        layer = MoE.from_weights(config.replace(dispatch=dispatch), _weights(config))
        x = torch.from_numpy(_x()).requires_grad_()
        (layer(x).square().sum() + layer.aux_loss).backward()
        grads[dispatch] = [x.grad] + [p.grad for p in layer.parameters()]
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_router_in_float32():
    config = CASES["top_k"]
    w = _weights(config)
    layer = MoE.from_weights(config, w).eval()
    x = _x()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.from_numpy(x))
    assert y.dtype == torch.bfloat16
    plan = layer.last_plan
    assert plan.router_probs.dtype == torch.float32
    ref, ref_plan = reference_forward(x, w, config)
    np.testing.assert_array_equal(plan.expert_indices.numpy(), ref_plan.expert_indices)
    np.testing.assert_allclose(y.detach().float().numpy(), ref, atol=0.1, rtol=0.05)


def test_noise_only_in_training():
    config = _config(k=2, noise="normal", noise_std=5.0)
    layer = MoE.from_weights(config, _weights(config))
    x = torch.from_numpy(_x())
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.allclose(a, layer(x))


def test_expert_bias_update_after_step():
    config = _config(k=1, use_expert_bias=True, bias_update_rate=0.1)
    layer = MoE.from_weights(config, _weights(config)).train()
    x = torch.from_numpy(_x())
    layer(x)
    counts = layer.last_plan.expert_counts.clone()
    before = layer.router.expert_bias.clone()
    assert int(layer.expert_counts.sum()) == x.shape[0] * x.shape[1]
    expected = mr.losses.update_expert_bias(layer.router.expert_bias.clone(), counts, 0.1)
    layer.update_expert_bias()
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert int(layer.expert_counts.sum()) == 0
    busiest = int(counts.argmax())
    assert float(layer.router.expert_bias[busiest]) < float(before[busiest])  # pushed down
    assert not layer.router.expert_bias.requires_grad


def test_top_p_controller_state_updates_in_training_only():
    config = _config(strategy="top_p", top_p=0.5, target_experts=1.2, max_experts=4)
    layer = MoE.from_weights(config, _weights(config))
    x = torch.from_numpy(_x())
    layer.eval()
    layer(x)
    assert float(layer.router_state[0]) == pytest.approx(0.5)
    layer.train()
    layer(x)
    mean_k = float(layer.last_plan.stats.mean_experts)
    assert float(layer.router_state[0]) == pytest.approx(0.5 + 0.01 * (1.2 - mean_k), abs=1e-6)


# ----- bad inputs ------------------------------------------------------------------------------
def test_wrong_last_dim():
    layer = MoE(CASES["top_k"])
    with pytest.raises(mr.InputError, match=r"x: expected shape \(\.\.\., d_model=16\)"):
        layer(torch.zeros(2, D + 1))


def test_int_dtype():
    with pytest.raises(mr.InputTypeError, match="x: expected a floating dtype"):
        MoE(CASES["top_k"])(torch.zeros(2, D, dtype=torch.int64))


def test_nan_input_policy():
    x = torch.from_numpy(_x())
    x[0, 1, 3] = float("nan")
    with pytest.raises(mr.InputError, match="NaN"):
        MoE(CASES["top_k"]).eval()(x)
    with pytest.raises(mr.InputError, match="NaN"):
        MoE(CASES["top_p"])(x)
    config = _config(k=2, nan_policy="ignore")
    layer = MoE.from_weights(config, _weights(config)).eval()
    y = layer(x)
    assert torch.isnan(y[0, 1]).all()
    clean = layer(torch.nan_to_num(x))
    mask = torch.ones(x.shape[:-1], dtype=torch.bool)
    mask[0, 1] = False
    torch.testing.assert_close(y[mask], clean[mask])


def test_empty_batch():
    layer = MoE(CASES["top_p"])
    y = layer(torch.zeros(0, 5, D))
    assert y.shape == (0, 5, D)
    assert float(layer.aux_loss) == 0.0 and layer.last_plan is None


def test_hash_without_token_ids_is_a_clear_error():
    with pytest.raises(mr.InputError, match="token_ids"):
        MoE(CASES["hash"])(torch.zeros(2, D))


def test_half_precision_keeps_router_state_float32():
    config = _config(k=2, use_expert_bias=True)
    layer = MoE(config, dtype=torch.bfloat16)
    assert layer.experts.w_up.dtype == torch.bfloat16
    assert layer.router_state.dtype == torch.float32
    assert layer.router.expert_bias.dtype == torch.float32
    y = layer(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["null", "capacity", "relu"])
def test_unused_slots_cost_no_compute(name, monkeypatch):
    from moe_router_backends.torch import kernels

    rows = []
    original = kernels._ffn_one

    def counting(x, weights, e, activation):
        rows.append(x.shape[0])
        return original(x, weights, e, activation)

    monkeypatch.setattr(kernels, "_ffn_one", counting)
    layer, plan = _check(CASES[name], dispatch="loop")
    used = int((plan.expert_indices >= 0).sum())
    assert used < plan.expert_indices.size  # the case has unused slots
    assert sum(rows) == used  # exactly one expert row per used slot


def test_auto_dispatch_choice():
    from moe_router_backends.torch.kernels import choose

    w = torch.zeros(8, 4, 4)
    assert choose("auto", torch.zeros(1, 4), w, 2, 8) == "gather"
    assert choose("auto", torch.zeros(16, 4), w, 32, 8) == "padded"  # CPU eager
    assert choose("auto", torch.zeros(4096, 4), w, 8192, 8) == "loop"
    assert choose("auto", torch.zeros(16, 4, dtype=torch.float64), w.double(), 32, 8) == "padded"
    assert choose("grouped_mm", torch.zeros(1, 4), w, 2, 8) == "grouped_mm"
    with pytest.raises(mr.ConfigError, match="dispatch"):
        choose("nope", torch.zeros(1, 4), w, 2, 8)


def test_unknown_dispatch_name_is_refused_at_construction():
    with pytest.raises(mr.InputError, match="dispatch"):
        MoE(_config(k=2, dispatch="magic"))
