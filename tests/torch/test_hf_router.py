"""Our router on transformers' own MoE blocks (``replace_routers``): the gate keeps its
parameters; static top-k reproduces every family exactly; dynamic strategies lower k."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_router.errors import InputError  # noqa: E402
from moe_router_backends.torch.hf_router import (  # noqa: E402
    gate_config,
    replace_routers,
    restore_routers,
    seam_blocks,
    wrapped_gates,
)

pytestmark = [pytest.mark.torch, pytest.mark.hf]

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


def _config(family: str):
    t = transformers
    if family == "mixtral":
        return t.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                               num_experts_per_tok=2)
    if family == "qwen2_moe":
        return t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                shared_expert_intermediate_size=24, num_experts=8,
                                num_experts_per_tok=2)
    if family == "qwen3_moe":
        return t.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                num_experts=8, num_experts_per_tok=2, norm_topk_prob=True)
    if family == "gpt_oss":
        return t.GptOssConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                              num_experts_per_tok=2, head_dim=8)
    return t.DeepseekV3Config(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                              n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
                              n_shared_experts=1, first_k_dense_replace=0,
                              routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
                              qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)


def _model(family: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(family)).eval().to(dtype)
    for _, _, gate in seam_blocks(model):
        if hasattr(gate, "e_score_correction_bias"):  # selection != weights must matter
            gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    return model


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3"]


def _choices(model, ids):
    """Each gate's (top_k_index, top_k_weights) of a forward, by block name."""
    seen = {}
    handles = [gate.register_forward_hook(
        lambda m, a, out, name=name: seen.__setitem__(name, (out[2].clone(), out[1].clone())))
        for name, _, gate in seam_blocks(model)]
    model(ids)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_static_top_k_reproduces_the_family_exactly(family):
    model = _model(family)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    names = sorted(model.state_dict())
    with torch.no_grad():
        ref = model(ids).logits
        rng = torch.random.get_rng_state()
        info = replace_routers(model)
        assert torch.equal(torch.random.get_rng_state(), rng)  # no global RNG draw
        assert info == {"blocks": 2, "experts_implementation": None, "dynamic": False}
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)
    assert sorted(model.state_dict()) == names  # the gate keeps its parameters and names
    assert len(wrapped_gates(model)) == 2
    assert restore_routers(model) == 2 and not wrapped_gates(model)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_bf16_choices_equal_stock(family):
    model = _model(family, torch.bfloat16)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        stock = _choices(model, ids)
        replace_routers(model)
        ours = _choices(model, ids)
    for name, (idx, w) in stock.items():
        got_idx, got_w = ours[name]
        assert torch.equal(torch.sort(got_idx, -1).values, torch.sort(idx, -1).values), name


def test_convention_is_verified_not_guessed():
    model = _model("mixtral")
    gate = next(seam_blocks(model))[2]
    assert gate_config(gate, model.config)[0].normalize_weights is True

    def renormalize_badly(module, args, out):  # a gate whose weights follow no known rule
        logits, w, idx = out
        return logits, w * 0.5 + 0.1, idx

    handle = gate.register_forward_hook(renormalize_badly)
    with pytest.raises(InputError, match="not understood"):
        gate_config(gate, model.config)
    handle.remove()


def test_model_without_seam_blocks_is_refused():
    with pytest.raises(InputError, match="model"):
        replace_routers(torch.nn.Linear(2, 2))


def test_debugger_counts_wrapped_gates_like_our_layers():
    import numpy as np

    from moe_router.debug import MoEDebugger

    model = _model("qwen3_moe")
    replace_routers(model)
    debugger = MoEDebugger(model)
    assert debugger.layer_names == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(3))
    with debugger.session("hf"):
        want = {name: np.bincount(idx.reshape(-1).numpy(), minlength=8)
                for name, (idx, _) in _choices(model, ids).items()}
        record = debugger.to_session()
    for i, name in enumerate(["model.layers.0.mlp", "model.layers.1.mlp"]):
        assert record["totals"]["eval"][i]["expert_tokens"] == want[name].tolist()
        assert record["totals"]["eval"][i]["tokens"] == 18
    assert all(not g.state for _, _, g in wrapped_gates(model))  # detached: no counting


@pytest.mark.parametrize("family", FAMILIES)
def test_dynamic_top_p_lowers_k_and_generates(family):
    model = _model(family)
    for _, _, gate in seam_blocks(model):  # a trained router's sharper scores
        gate.weight.data *= 10.0
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(4))
    info = replace_routers(model, strategy="top_p", top_p=0.5, max_experts=2)
    assert info["dynamic"] and info["experts_implementation"] == "moe_router"
    assert model.config._experts_implementation == "moe_router"
    used = []
    handles = [gate.register_forward_hook(lambda m, a, out: used.append(out[2] >= 0))
               for _, _, gate in seam_blocks(model)]
    with torch.no_grad():
        model(ids)
        out = model.generate(ids[:, :4], max_new_tokens=3, do_sample=False)
    for h in handles:
        h.remove()
    mean_k = torch.cat([u.sum(-1).float() for u in used]).mean().item()
    assert 1.0 <= mean_k < 2.0, mean_k  # fewer than the family's static top-2
    assert out.shape == (2, 7)


def test_set_strategy_routes_a_stock_model_through_its_gates(caplog):
    import logging

    from moe_router.torch import set_strategy

    model = _model("qwen3_moe")
    with caplog.at_level(logging.INFO, logger="moe_router"):
        assert set_strategy(model, strategy="top_p", top_p=0.5, max_experts=2) == 2
    assert "moe_router" in caplog.text and model.config._experts_implementation == "moe_router"
    assert all(r.router.strategy == "top_p" for _, _, r in wrapped_gates(model))


def test_wrapped_model_saves_the_stock_checkpoint(tmp_path):
    model = _model("qwen3_moe")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        stock = model(ids).logits
    replace_routers(model, strategy="top_p", top_p=0.5, max_experts=2)
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert sorted(loaded.state_dict()) == sorted(model.state_dict())
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with torch.no_grad():  # the saved model is the stock one: its own routing
        torch.testing.assert_close(loaded(ids).logits, stock, atol=1e-5, rtol=1e-5)
