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


@pytest.mark.parametrize("router_dtype", [None, "float32"])
@pytest.mark.parametrize("family", FAMILIES)
def test_drop_in_same_logits_generation_and_router_logits(family, router_dtype):
    model = _model(family)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids, output_router_logits=True)
        gen_before = model.generate(ids[:1, :5], max_new_tokens=4, do_sample=False)
    assert replace_moe_blocks(model, router_dtype=router_dtype) == 2
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


# ----- router precision (bfloat16), jitter, DeepSeek-V3 groups ----------------------------------
def _wide(family):
    """16 experts, 4 per token: bfloat16 router logits often tie or round across the k-th."""
    t = transformers
    if family == "mixtral":
        config = t.MixtralConfig(**COMMON, intermediate_size=16, num_local_experts=16,
                                 num_experts_per_tok=4)
        cls = t.MixtralForCausalLM
    else:
        config = t.Qwen3MoeConfig(**COMMON, intermediate_size=16, moe_intermediate_size=8,
                                  num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
                                  head_dim=8)
        cls = t.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    return cls(config).eval()


def _stock_routing(model, ids):
    """Each stock block's input and transformers' top-k ids, per layer (hooks)."""
    inputs, chosen, handles = [], [], []
    for layer in model.model.layers:
        handles.append(layer.mlp.register_forward_pre_hook(
            lambda m, a: inputs.append(a[0].clone())))
        handles.append(layer.mlp.gate.register_forward_hook(
            lambda m, a, out: chosen.append(out[2].sort(dim=-1).values)))
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    return inputs, chosen


def _replaced_choice(layer, x):
    layer.record_routing(True)
    with torch.no_grad():
        layer(x)
    return layer.record_routing(False).sort(dim=-1).values


@pytest.mark.parametrize("family", [*FAMILIES, "mixtral_wide", "qwen3_moe_wide"])
def test_bfloat16_router_matches_transformers(family):
    """In a bfloat16 model the replaced router computes transformers' logits (same dtype, same
    values) and picks transformers' experts: per layer from the same hidden states, exactly;
    end to end, the first layer's logits are bit-equal and greedy generation is identical."""
    import copy

    stock = (_wide(family[:-5]) if family.endswith("_wide") else _model(family))
    stock = stock.to(torch.bfloat16)
    model = copy.deepcopy(stock)
    replace_moe_blocks(model)
    ids = torch.randint(0, 97, (8, 64 if family.endswith("_wide") else 16),
                        generator=torch.Generator().manual_seed(1))
    inputs, chosen = _stock_routing(stock, ids)
    for layer, x, ids_TK in zip(model.model.layers, inputs, chosen):
        assert torch.equal(_replaced_choice(layer.mlp, x), ids_TK)
    with torch.no_grad():
        before = stock(ids[:2], output_router_logits=True)
        after = model(ids[:2], output_router_logits=True)
        gen_before = stock.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
        gen_after = model.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    assert after.router_logits[0].dtype == before.router_logits[0].dtype
    assert torch.equal(after.router_logits[0], before.router_logits[0])
    assert torch.equal(gen_after, gen_before)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe", "deepseek_v3"])
def test_tied_router_logits_pick_what_transformers_picks(family):
    """Experts 0, 1 and 2 with the same router row tie exactly: the replaced router breaks the tie
    as transformers' torch.topk does (this library's own selection, router_dtype='float32',
    takes the lower index)."""
    import copy

    stock = _model(family)
    with torch.no_grad():
        for layer in stock.model.layers:
            layer.mlp.gate.weight[1:3] = layer.mlp.gate.weight[0]
    stock = stock.to(torch.bfloat16)
    model = copy.deepcopy(stock)
    replace_moe_blocks(model)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    inputs, chosen = _stock_routing(stock, ids)
    for layer, x, ids_TK in zip(model.model.layers, inputs, chosen):
        assert torch.equal(_replaced_choice(layer.mlp, x), ids_TK)


def test_float32_router_option():
    """router_dtype='float32': this library's float32 router (float32 logits in a bfloat16
    model, close to transformers' but not bit-identical); an unknown value is refused."""
    from moe_router import ConfigError

    model = _model("mixtral").to(torch.bfloat16)
    replace_moe_blocks(model, router_dtype="float32")
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(ids, output_router_logits=True)
    assert out.router_logits[0].dtype == torch.float32
    assert model.model.layers[0].mlp.router.weight.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match=r"^router_dtype='bfloat16' is invalid: expected None"):
        replace_moe_blocks(_model("mixtral"), router_dtype="bfloat16")


def test_deepseek_router_and_bias_stay_float32(tmp_path):
    """As transformers' from_pretrained keeps them (_keep_in_fp32_modules_strict): the replaced
    router weight and e_score_correction_bias are float32 copies, never rounded by a cast of the
    model; the selection equals the stock bfloat16 model's."""
    import copy

    _model("deepseek_v3").save_pretrained(tmp_path)
    stock = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    stock.eval()
    gate = stock.model.layers[0].mlp.gate
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    model = copy.deepcopy(stock)
    replace_moe_blocks(model)
    layer = model.model.layers[0].mlp
    model.to(torch.bfloat16).half().to(torch.bfloat16)
    assert layer.router.weight.dtype == layer.router.expert_bias.dtype == torch.float32
    assert layer.experts.w_up.dtype == torch.bfloat16
    assert torch.equal(layer.router.weight.t(), gate.weight)
    assert torch.equal(layer.router.expert_bias, gate.e_score_correction_bias)
    sd = model.state_dict()
    assert sd["model.layers.0.mlp.gate.weight"].dtype == torch.float32
    ids = torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(1))
    inputs, chosen = _stock_routing(stock, ids)
    for block, x, ids_TK in zip(model.model.layers, inputs, chosen):
        assert torch.equal(_replaced_choice(block.mlp, x), ids_TK)


@pytest.mark.parametrize("router_dtype", [None, "float32"])
def test_mixtral_jitter_in_training_matches_transformers(router_dtype):
    """router_jitter_noise multiplies the block input in training exactly as transformers does
    (same draws from the same generator): same loss, logits and gradients for the same seed."""
    import copy

    config = transformers.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4,
                                        num_experts_per_tok=2, router_jitter_noise=0.1)
    torch.manual_seed(0)
    stock = transformers.MixtralForCausalLM(config).train()
    model = copy.deepcopy(stock)
    replace_moe_blocks(model, router_dtype=router_dtype)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    outs, states = [], []
    for m in (stock, model):
        torch.manual_seed(5)
        outs.append(m(ids, labels=ids))
        states.append(torch.random.get_rng_state())
        outs[-1].loss.backward()
    assert torch.equal(states[0], states[1])  # the same number of draws
    torch.testing.assert_close(outs[1].logits, outs[0].logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.model.layers[0].mlp.router.weight.grad.t(),
                               stock.model.layers[0].mlp.gate.weight.grad, atol=1e-6, rtol=1e-4)
    torch.manual_seed(6)  # the jitter is really there: another seed, other outputs
    assert not torch.allclose(model(ids).logits, outs[1].logits, atol=1e-3)
    model.eval()  # and gone at inference
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, stock.eval()(ids).logits, atol=1e-5,
                                   rtol=1e-5)


def _deepseek(**changes):
    config = transformers.DeepseekV3Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=8, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=0, routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    for name, value in changes.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    for layer in model.model.layers:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.linspace(-0.05, 0.05, 8))
    return model


@pytest.mark.parametrize("router_dtype", [None, "float32"])
def test_deepseek_degenerate_group_config_matches_transformers(router_dtype):
    """transformers' own DeepSeek-V3 test config: 8 experts, n_group=2, topk_group=1 and
    num_experts_per_tok=8 (every expert chosen, so the group limit changes nothing)."""
    model = _deepseek()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    assert replace_moe_blocks(model, router_dtype=router_dtype) == 2
    layer = model.model.layers[0].mlp
    assert layer.config.router.k == 8 and layer.config.router.num_groups is None
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-5, rtol=1e-5)


def test_deepseek_groups_holding_fewer_experts_than_k_are_refused():
    """n_group=2, topk_group=1 keeps 4 of 8 experts but k=6: transformers fills the other slots
    from the masked groups in torch.topk's tie order among -inf; refused, naming the block."""
    from moe_router import InputError

    model = _deepseek(num_experts_per_tok=6)
    with pytest.raises(InputError, match=r"^model: model\.layers\.0\.mlp \(DeepseekV3MoE\): "
                       r".*keeps 4 experts but selects k=6"):
        replace_moe_blocks(model)
    assert not [m for m in model.modules() if isinstance(m, MoE)]  # nothing was swapped
