"""Hugging Face drop-in: tiny random transformers v5 models before and after replacement."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_router.torch import MoE, replace_moe_blocks, set_strategy, total_aux_loss  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.hf]

COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)


def _model(family: str):
    t = transformers
    if family == "mixtral":
        config = t.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                 num_experts_per_tok=2)
        cls = t.MixtralForCausalLM
    elif family == "qwen2_moe":
        config = t.Qwen2MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                  shared_expert_intermediate_size=40, num_experts=4,
                                  num_experts_per_tok=2, norm_topk_prob=False)
        cls = t.Qwen2MoeForCausalLM
    elif family == "qwen3_moe":
        config = t.Qwen3MoeConfig(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                  num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                  head_dim=8)
        cls = t.Qwen3MoeForCausalLM
    elif family == "olmoe":
        config = t.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4,
                               num_experts_per_tok=2)
        cls = t.OlmoeForCausalLM
    else:
        config = t.DeepseekV3Config(**COMMON, intermediate_size=48, moe_intermediate_size=24,
                                    n_routed_experts=8, num_experts_per_tok=2, n_group=4,
                                    topk_group=2, n_shared_experts=1, first_k_dense_replace=0,
                                    routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
                                    qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
        cls = t.DeepseekV3ForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    if family == "deepseek_v3":  # a non-zero correction bias, so selection != weights matters
        for layer in model.model.layers:
            layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    return model


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_drop_in_same_logits_generation_and_router_logits(family):
    model = _model(family)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids, output_router_logits=True)
        gen_before = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert replace_moe_blocks(model) == 2
    assert len([m for m in model.modules() if isinstance(m, MoE)]) == 2
    with torch.no_grad():
        after = model(ids, output_router_logits=True)
        gen_after = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(after.logits, before.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(gen_after, gen_before)
    # router logits still reach the model's own aux loss
    assert len(after.router_logits) == len(before.router_logits) == 2
    for a, b in zip(after.router_logits, before.router_logits):
        torch.testing.assert_close(a.float(), b.float(), atol=1e-5, rtol=1e-5)
    if before.aux_loss is not None:
        torch.testing.assert_close(after.aux_loss, before.aux_loss, atol=1e-5, rtol=1e-5)


def test_switch_to_dynamic_strategy_in_one_call():
    model = _model("mixtral")
    replace_moe_blocks(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    assert set_strategy(model, strategy="top_p", top_p=0.3, max_experts=3) == 2
    with torch.no_grad():
        model(ids)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    plan = layers[0].last_plan
    assert plan.config.strategy == "top_p"
    assert plan.num_experts_per_token.max() <= 3
    assert total_aux_loss(model).ndim == 0


def test_training_step_after_replacement():
    model = _model("qwen2_moe").train()
    replace_moe_blocks(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, output_router_logits=True)
    loss = out.loss + total_aux_loss(model)
    loss.backward()
    layer = [m for m in model.modules() if isinstance(m, MoE)][0]
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.experts.w_up.grad.abs().sum() > 0


def test_unsupported_block_is_a_clear_error():
    from moe_router import InputTypeError

    with pytest.raises(InputTypeError, match="not a supported MoE block"):
        MoE.from_hf(torch.nn.Linear(2, 2))


# ----- replace_moe_blocks: nothing to replace ---------------------------------------------------
def test_replacing_nothing_is_an_error_naming_model():
    from moe_router import InputError

    config = transformers.PhimoeConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                       num_experts_per_tok=2)
    torch.manual_seed(0)
    phi = transformers.PhimoeForCausalLM(config).eval()
    with pytest.raises(InputError, match=r"^model: .*PhimoeSparseMoeBlock"):
        replace_moe_blocks(phi)
    with pytest.raises(InputError, match="^model: has no supported"):
        replace_moe_blocks(torch.nn.Linear(2, 2))
    assert replace_moe_blocks(phi, allow_none=True) == 0
    assert not [m for m in phi.modules() if isinstance(m, MoE)]


# ----- set_strategy ---------------------------------------------------------------------------
def test_set_strategy_unknown_field_lists_the_valid_ones():
    from moe_router import ConfigError
    from moe_router.torch import UnknownFieldError

    model = _model("mixtral")
    replace_moe_blocks(model)
    with pytest.raises(UnknownFieldError, match=r"topp=0\.5 is invalid.*'top_p'.*num_experts"):
        set_strategy(model, strategy="top_p", topp=0.5)
    with pytest.raises(ConfigError):
        set_strategy(model, topp=0.5)
    with pytest.raises(TypeError):  # like dataclasses.replace
        set_strategy(model, topp=0.5)
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert all(layer.config.router.strategy == "top_k" for layer in layers)  # unchanged


def test_set_strategy_resets_normalize_weights_unless_given():
    model = _model("mixtral")
    replace_moe_blocks(model)
    layer = [m for m in model.modules() if isinstance(m, MoE)][0]
    assert layer.config.router.normalize_weights is True  # Mixtral renormalizes its top-k
    set_strategy(model, strategy="top_p", top_p=0.5)
    assert layer.config.router.normalize_weights is None  # top_p's default: raw weights
    set_strategy(model, strategy="top_k", normalize_weights=True)
    assert layer.config.router.normalize_weights is True
    set_strategy(model, k=1)  # no new strategy: kept
    assert layer.config.router.normalize_weights is True


def test_set_strategy_resets_the_router_state():
    from moe_router.torch import calibrate

    model = _model("mixtral")
    replace_moe_blocks(model)
    set_strategy(model, strategy="complexity", target_experts=1.5, max_experts=3)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    summary = calibrate(model, [ids, ids[:, :5]])
    assert summary["batches"] == 2 and len(summary["router_states"]) == 2
    layers = [m for m in model.modules() if isinstance(m, MoE)]
    assert all(float(layer.router_state.score_count) == 2.0 for layer in layers)
    assert not model.training
    set_strategy(model, strategy="complexity", target_experts=2.0, max_experts=3)
    assert all(float(layer.router_state.score_count) == 0.0 for layer in layers)
    set_strategy(model, strategy="top_p", top_p=0.3)
    assert all(float(layer.router_state.top_p) == pytest.approx(0.3) for layer in layers)


def test_set_strategy_refuses_weight_shape_changes():
    from moe_router import InputError

    model = _model("mixtral")
    replace_moe_blocks(model)
    with pytest.raises(InputError, match="weight shapes"):
        set_strategy(model, num_null_experts=2)
