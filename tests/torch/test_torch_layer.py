"""The torch MoE layer against the NumPy oracle ``moe_router.weights.reference_forward``."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router.layer.experts import DispatchInfo, expert_compute  # noqa: E402
from moe_router.layer.state import LayerState  # noqa: E402
from moe_router.weights import (  # noqa: E402
    init_weights,
    param_shapes,
    reference_forward,
    weight_shapes,
)
from moe_router_backends.torch.backend import TorchBackend  # noqa: E402
from moe_router_backends.torch.layers import MoE  # noqa: E402

pytestmark = pytest.mark.torch

E, D, F = 6, 16, 24
B = TorchBackend()


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
    # parameters larger than init_std so that routing and activations are far from trivial
    params = param_shapes(config)
    w = {k: v * 20.0 if k in params else v for k, v in init_weights(config, seed).items()}
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


DISPATCHES = ["torch:grouped_mm", "torch:loop", "torch:padded", "torch:gather", "sorted",
              "dense", "gather"]


@pytest.mark.parametrize(("name", "dispatch"), [
    *((name, dispatch) for name in ("top_k", "top_p", "null", "capacity")
      for dispatch in DISPATCHES),
    ("capacity", "capacity"),  # the capacity kernel needs a router with capacity_factor
])
def test_every_dispatch_matches_reference(name, dispatch):
    _check(CASES[name], dispatch=dispatch)


@pytest.mark.parametrize("activation", ["swiglu", "geglu", "gelu", "relu", "silu"])
def test_every_activation(activation):
    _check(_config(activation=activation, k=2))


# ----- the public surface ----------------------------------------------------------------------
def test_weights_roundtrip_and_names():
    config = CASES["shared_gate"].with_router(use_expert_bias=True)
    w = _weights(config)
    layer = MoE.from_weights(config, w)
    out = layer.export_weights()
    assert set(out) == set(weight_shapes(config))
    assert {"router.state", "router.expert_bias"} <= set(out)
    for name, value in w.items():
        np.testing.assert_array_equal(out[name], value)
        assert out[name].dtype == np.float32
    sd = layer.state_dict()
    assert set(sd) == set(weight_shapes(config))  # state_dict keys are the portable names
    assert "observers.expert_load.counts" in layer.export_state()  # transient: not in sd
    layer2 = MoE(config)
    layer2.import_weights(out)
    for name, value in layer2.export_weights().items():
        np.testing.assert_array_equal(value, out[name])


def test_state_dict_roundtrip_and_old_checkpoints():
    config = _config(strategy="top_p", top_p=0.5, target_experts=1.2, max_experts=4)
    layer = MoE.from_weights(config, _weights(config)).train()
    layer(torch.from_numpy(_x()))
    saved = layer.state_dict()
    fresh = MoE(config)
    fresh.load_state_dict(saved)
    assert float(fresh.router_state.top_p) == float(layer.router_state.top_p)
    old = {("router_state" if k == "router.state" else k): v for k, v in saved.items()}
    model = torch.nn.Sequential(MoE(config))  # older checkpoints named the buffer router_state
    model.load_state_dict({f"0.{k}": v for k, v in old.items()})
    assert float(model[0].router_state.top_p) == float(layer.router_state.top_p)


def test_from_weights_rejects_wrong_shape():
    w = _weights(CASES["top_k"])
    w["experts.w_up"] = w["experts.w_up"][:, :, :5]
    with pytest.raises(mr.InputError, match="experts.w_up"):
        MoE.from_weights(CASES["top_k"], w)


def test_old_exports_without_router_state_still_load():
    w = _weights(CASES["top_p"])
    del w["router.state"]
    layer = MoE.from_weights(CASES["top_p"], w)
    assert float(layer.router_state.top_p) == pytest.approx(0.5)


def test_return_plan_and_fast_path_plan():
    config = CASES["top_k"]
    layer = MoE.from_weights(config, _weights(config)).eval()
    x = torch.from_numpy(_x())
    y, plan = layer(x, return_plan=True)
    assert isinstance(plan, mr.RoutingPlan) and plan is layer.last_plan
    torch.testing.assert_close(y, layer(x))
    assert layer._last[0] is None  # eval top-k took the fast path: no plan built ...
    lazy = layer.last_plan  # ... until asked for, with the same decisions
    torch.testing.assert_close(lazy.expert_indices, plan.expert_indices)
    torch.testing.assert_close(layer.aux_loss, plan.losses.total)


def test_layer_state_and_export_state():
    config = _config(strategy="top_p", top_p=0.5, target_experts=1.5, max_experts=4,
                     use_expert_bias=True)
    layer = MoE.from_weights(config, _weights(config))
    state = layer.layer_state()
    assert isinstance(state, LayerState)
    assert state.router.top_p.dtype == torch.float32
    assert state.observers["expert_load"]["counts"].dtype == torch.int32
    exported = layer.export_state()
    assert set(exported) == {"router.state", "router.expert_bias", "observers.expert_load.counts"}
    assert exported["router.state"].dtype == np.float32
    assert exported["observers.expert_load.counts"].dtype == np.int32
    snapshot = layer.router_state
    assert isinstance(snapshot, mr.RouterState)
    assert snapshot.top_p.dtype == torch.float32 and snapshot.top_p.ndim == 0
    layer.train()(torch.from_numpy(_x()))
    assert float(layer.router_state.top_p) != pytest.approx(0.5)
    assert float(snapshot.top_p) == pytest.approx(0.5)  # a copy, not a view of the buffer


def test_trained_controller_moves_with_the_weights():
    config = _config(strategy="top_p", top_p=0.5, target_experts=1.2, max_experts=4)
    layer = MoE.from_weights(config, _weights(config)).train()
    x = torch.from_numpy(_x())
    for _ in range(5):
        layer(x)
    trained = float(layer.router_state.top_p)
    assert trained != pytest.approx(0.5)
    moved = MoE.from_weights(config, layer.export_weights()).eval()
    assert float(moved.router_state.top_p) == pytest.approx(trained)
    layer.eval()
    torch.testing.assert_close(moved(x), layer(x))
    layer.reset_router_state()
    assert float(layer.router_state.top_p) == pytest.approx(0.5)


def test_gradcheck_float64_router_and_experts():
    config = mr.MoEConfig(d_model=4, d_ff=3, router=mr.RouterConfig(num_experts=3, k=2),
                          num_shared_experts=1, shared_expert_gate=True)
    layer = MoE(config, seed=0).double()
    assert layer.router.state.dtype == torch.float32  # state stays float32 under .double()
    with torch.no_grad():
        for p in layer.parameters():
            p.mul_(25.0)
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    params = dict(layer.named_parameters())

    def f(x, router_w, w_up, w_down):
        return torch.func.functional_call(layer, {**params, "router.weight": router_w,
                                                  "experts.w_up": w_up,
                                                  "experts.w_down": w_down}, (x,))

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


@pytest.mark.parametrize("kernel", ["torch:loop", "torch:padded", "torch:gather", "dense",
                                    "sorted", "gather"])
def test_gradcheck_float64_expert_kernels_exact(kernel):
    config = mr.MoEConfig(d_model=4, d_ff=3, router=mr.RouterConfig(num_experts=3, k=2))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    ids = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1], [1, 2]])
    gates = torch.rand(5, 2, dtype=torch.float64, generator=g, requires_grad=True)
    w = {n: torch.randn(3, *s, dtype=torch.float64, generator=g, requires_grad=True)
         for n, s in (("w_gate", (4, 3)), ("w_up", (4, 3)), ("w_down", (3, 4)))}

    def f(x, gates, wg, wu, wd):
        params = {"experts.w_gate": wg, "experts.w_up": wu, "experts.w_down": wd}
        return expert_compute(B, x, ids, gates, params, config, kernel)

    assert torch.autograd.gradcheck(f, (x, gates, w["w_gate"], w["w_up"], w["w_down"]))


def test_grouped_mm_backward_matches_loop():
    config = CASES["top_p"]
    grads = {}
    for dispatch in ("torch:grouped_mm", "torch:loop"):
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
        y, plan = layer(torch.from_numpy(x), return_plan=True)
    assert y.dtype == torch.bfloat16
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
    torch.manual_seed(0)
    torch.testing.assert_close(layer(x), a)  # the global generator drives the noise


# ----- aux-free balancing: expert_load counts and update_expert_bias ---------------------------
def _counts(layer) -> np.ndarray:
    return layer.export_state()["observers.expert_load.counts"]


def test_expert_bias_update_after_step():
    config = _config(k=1, use_expert_bias=True, bias_update_rate=0.1)
    layer = MoE.from_weights(config, _weights(config)).train()
    x = torch.from_numpy(_x())
    layer(x)
    counts = layer.last_plan.expert_counts.clone()
    layer(x)  # counts accumulate over training calls ...
    layer.eval()
    layer(x)  # ... but not at inference
    assert _counts(layer).dtype == np.int32
    np.testing.assert_array_equal(_counts(layer), 2 * counts.numpy())
    before = layer.router.expert_bias.clone()
    expected = mr.losses.update_expert_bias(before.clone(), 2 * counts, 0.1)
    new = layer.update_expert_bias()
    torch.testing.assert_close(new, expected)
    torch.testing.assert_close(layer.router.expert_bias, expected)
    assert int(_counts(layer).sum()) == 0  # reset
    busiest = int(counts.argmax())
    assert float(new[busiest]) < float(before[busiest])  # pushed down
    assert not layer.router.expert_bias.requires_grad
    assert layer.router.expert_bias.dtype == torch.float32


def test_update_expert_bias_with_given_counts_and_without_bias():
    config = _config(k=1, use_expert_bias=True, bias_update_rate=0.5)
    layer = MoE(config)
    given = np.array([5, 0, 0, 0, 0, 1], np.int32)
    new = layer.update_expert_bias(given)
    expected = mr.losses.update_expert_bias(torch.zeros(E), torch.from_numpy(given), 0.5)
    torch.testing.assert_close(new, expected)
    with pytest.raises(mr.InputError, match="update_expert_bias"):
        MoE(CASES["top_k"]).update_expert_bias()


def test_update_expert_bias_sums_counts_over_ranks(monkeypatch):
    config = _config(k=1, use_expert_bias=True, bias_update_rate=0.1)
    layer = MoE.from_weights(config, _weights(config)).train()
    layer(torch.from_numpy(_x()))
    local = _counts(layer).copy()
    before = layer.router.expert_bias.clone()
    reduced = []

    def all_reduce(t, group=None):  # a second rank with the same counts
        reduced.append((t.dtype, group))
        t.mul_(2)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    new = layer.update_expert_bias()
    assert reduced == [(torch.int32, None)]  # over the layer's stats_group: the default group
    expected = mr.losses.update_expert_bias(before, torch.from_numpy(2 * local), 0.1)
    torch.testing.assert_close(new, expected)


def test_top_p_controller_state_updates_in_training_only():
    config = _config(strategy="top_p", top_p=0.5, target_experts=1.2, max_experts=4)
    layer = MoE.from_weights(config, _weights(config))
    x = torch.from_numpy(_x())
    layer.eval()
    layer(x)
    assert float(layer.router_state.top_p) == pytest.approx(0.5)
    layer.train()
    layer(x)
    mean_k = float(layer.last_plan.stats.mean_experts)
    assert float(layer.router_state.top_p) == pytest.approx(0.5 + 0.01 * (1.2 - mean_k),
                                                            abs=1e-6)


def test_calibrate_changes_decode_time_k_of_a_complexity_layer():
    from moe_router.torch import calibrate

    config = _config(strategy="complexity", target_experts=2.0, min_experts=1, max_experts=4,
                     complexity_estimator="hidden_norm")
    layer = MoE.from_weights(config, _weights(config)).eval()
    rng = np.random.default_rng(3)
    scales = np.exp(rng.normal(size=(64, 1)))  # tokens of very different norms
    tokens = torch.from_numpy((rng.normal(size=(64, D)) * scales).astype(np.float32))

    def decode_k() -> list[int]:
        return [int(layer(tokens[t:t + 1], return_plan=True)[1].num_experts_per_token[0])
                for t in range(tokens.shape[0])]

    before = decode_k()
    assert len(set(before)) == 1  # uncalibrated: one token has no spread of its own
    summary = calibrate(layer, [tokens[:32], tokens[32:]])
    assert summary["batches"] == 2
    assert float(layer.router_state.score_count) == 2.0
    assert not layer.calibrating and not layer.training
    after = decode_k()
    assert len(set(after)) > 1  # calibrated statistics: k follows each token's score
    assert abs(np.mean(after) - 2.0) < 0.75


def test_calibrate_needs_a_moe_layer():
    from moe_router.torch import calibrate

    with pytest.raises(mr.InputError, match="model"):
        calibrate(torch.nn.Linear(2, 2), [torch.zeros(1, 2)])


def test_calibrating_updates_state_without_noise():
    config = _config(strategy="top_p", top_p=0.5, target_experts=1.2, max_experts=4,
                     noise="normal", noise_std=5.0)
    layer = MoE.from_weights(config, _weights(config)).eval()
    x = torch.from_numpy(_x())
    reference = layer(x)
    layer.calibrating = True
    y = layer(x)
    layer.calibrating = False
    torch.testing.assert_close(y, reference)  # no noise: same routing as eval
    assert float(layer.router_state.top_p) != pytest.approx(0.5)


# ----- the fast top-k path: the same choices as route() ----------------------------------------
FAST_CASES = {
    "k2": mr.RouterConfig(num_experts=8, k=2),
    "k1": mr.RouterConfig(num_experts=8, k=1),
    "k8": mr.RouterConfig(num_experts=8, k=8),
    "k3_bias": mr.RouterConfig(num_experts=8, k=3, use_expert_bias=True),
    "sigmoid_bias_scale": mr.RouterConfig(num_experts=8, k=2, score_func="sigmoid",
                                          use_expert_bias=True, route_scale=2.5),
    "raw": mr.RouterConfig(num_experts=8, k=2, normalize_weights=False, route_scale=1.5),
    "sigmoid_raw": mr.RouterConfig(num_experts=5, k=4, score_func="sigmoid",
                                   normalize_weights=False),
    "max_equals_k": mr.RouterConfig(num_experts=8, k=2, max_experts=2),
}
NOT_FAST = {
    "null": mr.RouterConfig(num_experts=8, k=2, num_null_experts=2),
    "capacity": mr.RouterConfig(num_experts=8, k=2, capacity_factor=1.0),
    "groups": mr.RouterConfig(num_experts=8, k=2, num_groups=4, topk_groups=2),
    "balanced_debug": mr.RouterConfig(num_experts=8, k=2, balanced_debug=True),
    "top_p": mr.RouterConfig(num_experts=8, strategy="top_p"),
    "hash": mr.RouterConfig(num_experts=8, strategy="hash"),
    "max_not_k": mr.RouterConfig(num_experts=8, k=2, max_experts=3),
}


def _fast_inputs(seed: int, T: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "normal": (rng.standard_normal((T, width)) * 3).astype(np.float32),
        "ties": (rng.integers(-2, 3, size=(T, width)) * 0.5).astype(np.float32),
        "all_equal": np.zeros((T, width), np.float32),
        "large": (rng.standard_normal((T, width)) * 80).astype(np.float32),
    }


@pytest.mark.parametrize("name", sorted(FAST_CASES))
def test_fast_select_chooses_exactly_what_route_chooses(name):
    config = FAST_CASES[name]
    stages = B.layer_stages()
    for seed in range(3):
        for kind, logits in _fast_inputs(seed, 33, config.num_choices).items():
            kwargs = {"hidden_TD": torch.zeros(33, 4)}
            if config.use_expert_bias:
                bias = np.random.default_rng(seed).choice([-0.1, 0.0, 0.1], config.num_experts)
                kwargs["expert_bias_E"] = torch.tensor(bias, dtype=torch.float32)
            fast = stages.fast_select(torch.from_numpy(logits), config, kwargs)
            assert fast is not None
            plan = mr.route(torch.from_numpy(logits), config, **kwargs)
            msg = f"{name} {kind} seed {seed}"
            assert torch.equal(fast[0], plan.expert_indices), msg
            torch.testing.assert_close(fast[1], plan.expert_weights, rtol=1e-6, atol=1e-7,
                                       msg=msg)


@pytest.mark.parametrize("name", sorted(NOT_FAST))
def test_fast_select_declines_what_it_does_not_implement(name):
    config = NOT_FAST[name]
    logits = torch.zeros(3, config.num_choices)
    assert B.layer_stages().fast_select(logits, config, {}) is None
    mask = {"mask_T": torch.ones(3)}
    assert B.layer_stages().fast_select(logits, FAST_CASES["k2"], mask) is None


def test_router_logits_outside_autocast():
    config = CASES["shared_gate"]
    params = {k: torch.from_numpy(v) for k, v in _weights(config).items()}
    x = torch.from_numpy(_x()).reshape(-1, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = B.layer_stages().router_logits(x, params, config)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, x @ params["router.weight"] + params["router.bias"])


# ----- bad inputs ------------------------------------------------------------------------------
def test_wrong_last_dim():
    layer = MoE(CASES["top_k"])
    with pytest.raises(mr.InputError, match=r"x: expected shape \(\.\.\., d_model=16\)"):
        layer(torch.zeros(2, D + 1))


def test_int_dtype_and_not_a_tensor():
    with pytest.raises(mr.InputTypeError, match="x: expected a floating dtype"):
        MoE(CASES["top_k"])(torch.zeros(2, D, dtype=torch.int64))
    with pytest.raises(mr.InputTypeError, match="^x: "):
        MoE(CASES["top_k"])(np.zeros((2, D), np.float32))


def test_per_token_input_of_the_wrong_size_names_it():
    with pytest.raises(mr.InputError, match="token_ids"):
        MoE(CASES["hash"])(torch.zeros(2, 3, D), token_ids=torch.arange(5))


def test_nan_input_policy():
    x = torch.from_numpy(_x())
    x[0, 1, 3] = float("nan")
    with pytest.raises(mr.InputError, match="^x: .*NaN"):
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
    assert layer.aux_loss.item() == 0.0
    assert tuple(layer.last_plan.expert_indices.shape) == (0, 4)


def test_hash_without_token_ids_is_a_clear_error():
    with pytest.raises(mr.InputError, match="token_ids"):
        MoE(CASES["hash"])(torch.zeros(2, D))


def test_half_precision_keeps_router_state_float32():
    config = _config(k=2, use_expert_bias=True)
    layer = MoE(config, dtype=torch.bfloat16)
    assert layer.experts.w_up.dtype == torch.bfloat16
    assert layer.router.state.dtype == torch.float32
    assert layer.router.expert_bias.dtype == torch.float32
    assert layer.observers.expert_load.counts.dtype == torch.int32
    layer.half()
    assert layer.router.state.dtype == torch.float32
    y = layer.to(torch.bfloat16)(torch.randn(3, D, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.parametrize("name", ["null", "capacity", "relu"])
def test_unused_slots_cost_no_compute(name, monkeypatch):
    from moe_router_backends.torch import kernels

    rows = []
    original = kernels._ffn_one

    def counting(b, x, w, e, activation):
        rows.append(x.shape[0])
        return original(b, x, w, e, activation)

    monkeypatch.setattr(kernels, "_ffn_one", counting)
    layer, plan = _check(CASES[name], dispatch="torch:loop")
    used = int((plan.expert_indices >= 0).sum())
    assert used < plan.expert_indices.size  # the case has unused slots
    assert sum(rows) == used  # exactly one expert row per used slot


def _info(T: int | None, K: int, traced: bool = False) -> DispatchInfo:
    return DispatchInfo(num_tokens=T, num_slots=K, num_experts=8, capacity=None, traced=traced,
                        config=CASES["top_k"])


def test_torch_dispatch_policy():
    from moe_router_backends.torch.kernels import choose_kernel

    x = torch.zeros(16, 4)
    assert choose_kernel("auto", _info(1, 2), x[:1]) == "torch:gather"
    assert choose_kernel("auto", _info(16, 2), x) == "torch:padded"  # CPU eager
    assert choose_kernel("auto", _info(4096, 2), torch.zeros(4096, 4)) == "torch:loop"
    assert choose_kernel("auto", _info(16, 2), x.double()) == "torch:padded"
    assert choose_kernel("auto", _info(16, 2, traced=True), x) == "torch:grouped_mm"
    assert choose_kernel("auto", _info(16, 2, traced=True), x.double()) == "dense"
    assert choose_kernel("sorted", _info(1, 2), x[:1]) == "torch:padded"  # dropless grouped
    assert choose_kernel("sorted", _info(16, 2, traced=True), x.double()) is None
    assert choose_kernel("gather", _info(16, 2), x) == "torch:gather"
    assert choose_kernel("gather", _info(16, 2, traced=True), x) is None
    for request in ("capacity", "dense"):
        assert choose_kernel(request, _info(16, 2), x) is None


def test_unknown_dispatch_name_is_refused_by_the_config():
    with pytest.raises(mr.ConfigError, match="dispatch"):
        _config(k=2, dispatch="magic")
    with pytest.raises(mr.ConfigError, match="torch:grouped_mm"):
        _config(k=2, dispatch="grouped_mm")  # suggests the qualified name
