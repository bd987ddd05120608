"""Hugging Face drop-in, the block-replacement path: a replaced model keeps transformers' names
(``state_dict`` / ``save_pretrained`` / ``load_state_dict``), draws no random numbers, and can be
built on the meta device then initialized or loaded."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_torch_hf import COMMON, FAMILIES, _model  # noqa: E402

from moe_router import InputError  # noqa: E402
from moe_router.torch import MoE, replace_moe_blocks, set_strategy  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.hf]

IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def _logits(model):
    with torch.no_grad():
        return model.eval()(IDS).logits


def _layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_is_transformers_own(family):
    """Same keys, order, shapes, dtypes and values as the stock model; no library-only key
    (``router.state``, observer counters such as DeepSeek-V3's expert-load counts)."""
    stock, model = _model(family), _model(family)
    replace_moe_blocks(model)
    ours, theirs = model.state_dict(), stock.state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert ours[key].shape == value.shape and ours[key].dtype == value.dtype, key
        assert torch.equal(ours[key], value), key
    assert not [k for k in ours if ".router." in k or ".observers." in k or ".experts.w_" in k]


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_stock_transformers_and_back(family, tmp_path):
    model = _model(family)
    replace_moe_blocks(model)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched key
    assert not _layers(stock)
    torch.testing.assert_close(_logits(stock), expected, atol=1e-5, rtol=1e-5)
    # the stock checkpoint into a replaced model: replacing the loaded model, or load_state_dict
    replace_moe_blocks(stock)
    torch.testing.assert_close(_logits(stock), expected, atol=1e-5, rtol=1e-5)
    other = _model(family)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    replace_moe_blocks(other)
    assert str(other.load_state_dict(stock.state_dict())) == "<All keys matched successfully>"
    torch.testing.assert_close(_logits(other), expected, atol=1e-5, rtol=1e-5)


def test_load_state_dict_accepts_the_library_names_too():
    """Checkpoints written before (``mlp.router.weight``, ``mlp.experts.w_up``, ...) still load."""
    model = _model("qwen2_moe")
    replace_moe_blocks(model)
    expected = _logits(model)
    old = model.state_dict()
    for name, layer in model.named_modules():
        if isinstance(layer, MoE):  # the library's names: MoE's own state_dict
            for key in [k for k in old if k.startswith(name + ".")]:
                del old[key]
            for key, value in MoE.state_dict(layer).items():
                old[f"{name}.{key}"] = value
    assert "model.layers.0.mlp.router.weight" in old
    assert "model.layers.0.mlp.gate.weight" not in old
    fresh = _model("qwen2_moe")
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    replace_moe_blocks(fresh)
    assert str(fresh.load_state_dict(old)) == "<All keys matched successfully>"
    torch.testing.assert_close(_logits(fresh), expected, atol=0, rtol=0)


def test_loading_transformers_names_restarts_the_controller():
    """``router.state`` is not saved (transformers has no place for it): a load without it
    starts a fresh controller, as ``set_strategy`` does; weights load as usual."""
    from moe_router.torch import calibrate

    model = _model("mixtral")
    replace_moe_blocks(model)
    set_strategy(model, strategy="complexity", target_experts=1.5, max_experts=3)
    calibrate(model, [IDS])
    assert all(float(layer.router_state.score_count) == 1.0 for layer in _layers(model))
    assert not [k for k in model.state_dict() if k.endswith("router.state")]
    model.load_state_dict(model.state_dict())
    assert all(float(layer.router_state.score_count) == 0.0 for layer in _layers(model))


def test_unexpressible_layer_refuses_to_save(tmp_path):
    """A layer whose tensors no longer fit the family's layout (here: experts narrowed by hand to
    F=40 while transformers' Mixtral config says 48) makes ``state_dict`` and
    ``save_pretrained`` raise, instead of writing a checkpoint a stock load would not take."""
    model = _model("mixtral")
    replace_moe_blocks(model)
    experts = model.model.layers[1].mlp.experts
    experts.w_down = torch.nn.Parameter(experts.w_down.detach()[:, :40].clone())
    with pytest.raises(InputError, match=r"^state_dict: model\.layers\.1\.mlp \(a replaced "
                       r"MixtralSparseMoeBlock\) no longer fits transformers' mixtral layout: "
                       r"experts\.down_proj would have shape \(4, 32, 40\), expected "
                       r"\(4, 32, 48\)"):
        model.state_dict()
    with pytest.raises(InputError, match="a stock from_pretrained would drop it"):
        model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.safetensors"))


@pytest.mark.parametrize("family", FAMILIES)
def test_replacing_draws_no_random_numbers(family):
    model = _model(family)
    before = torch.random.get_rng_state()
    replace_moe_blocks(model)
    assert torch.equal(torch.random.get_rng_state(), before)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_meta_device_replace_then_init_weights_and_load(family):
    """Build on the meta device, replace (the layers stay on meta), ``to_empty``, then the
    model's own ``init_weights`` initializes the new layers (it learned them) and a real state
    dict in transformers' names gives the stock logits."""
    stock = _model(family)
    with torch.device("meta"):
        model = type(stock)(stock.config)
    assert replace_moe_blocks(model) == 2
    layers = _layers(model)
    assert {p.device.type for layer in layers for p in layer.parameters()} == {"meta"}
    model.to_empty(device="cpu")
    with torch.no_grad():
        for layer in layers:  # garbage, as to_empty leaves it
            for t in [*layer.parameters(), *layer.buffers()]:
                t.fill_(float("nan") if t.is_floating_point() else 7)
    model.init_weights()
    std = stock.config.initializer_range
    for layer in layers:
        for name, param in layer.named_parameters():
            assert torch.isfinite(param).all(), name
            assert 0.5 * std < float(param.detach().std()) < 1.5 * std, name
        state = layer.export_state()
        for name, value in MoE(layer.config).export_state().items():  # a fresh layer's state
            np.testing.assert_array_equal(state[name], value, err_msg=name)
        if layer.config.router.use_expert_bias:
            assert not layer.router.expert_bias.any()
    assert str(model.load_state_dict(stock.state_dict())) == "<All keys matched successfully>"
    torch.testing.assert_close(_logits(model), _logits(stock), atol=1e-5, rtol=1e-5)


def test_init_weights_leaves_replaced_layers_of_a_built_model_alone():
    """transformers marks initialized modules; the replaced layers inherit the mark, so a later
    ``init_weights()`` does not re-draw them (as it does not re-draw the stock blocks)."""
    model = _model("deepseek_v3")
    replace_moe_blocks(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights()
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_deep_copy_keeps_names_and_init():
    model = _model("qwen3_moe")
    replace_moe_blocks(model)
    twin = copy.deepcopy(model)
    assert list(twin.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(_logits(twin), _logits(model), atol=0, rtol=0)
    assert twin.model._init_weights.model is twin.model  # the copy's own, not the original's


def test_from_hf_block_copies_the_block_on_its_device():
    """The layer owns copies (training it leaves the block alone); no random draw either."""
    model = _model("mixtral")
    block = model.model.layers[0].mlp
    before = {k: v.clone() for k, v in block.state_dict().items()}
    state = torch.random.get_rng_state()
    layer = MoE.from_hf(block)
    assert torch.equal(torch.random.get_rng_state(), state)
    with torch.no_grad():
        for param in layer.parameters():
            param.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in block.state_dict().items())
    with torch.device("meta"):
        meta_block = type(block)(model.config)
    meta_layer = MoE.from_hf(meta_block)
    assert {t.device.type for t in [*meta_layer.parameters(), *meta_layer.buffers()]} == {"meta"}


def test_deepseek_degenerate_groups_save_and_load(tmp_path):
    """transformers' own DeepSeek-V3 test config (8 experts, n_group=2, topk_group=1, k=8)
    round-trips too."""
    config = transformers.DeepseekV3Config(
        **COMMON, intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
        num_experts_per_tok=8, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=0, routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config).eval()
    expected = _logits(model)
    replace_moe_blocks(model)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(stock), expected, atol=1e-5, rtol=1e-5)


def test_moe_from_tensors_uses_the_tensors_as_given():
    """``MoE.from_tensors``: the parameters are the given tensors (no copy, no random draw, their
    dtype and layout kept); wrong names or shapes are an InputError."""
    import moe_router as mr
    from moe_router.weights import param_shapes

    config = mr.MoEConfig(d_model=8, d_ff=6, router=mr.RouterConfig(num_experts=4, k=2))
    tensors = {name: torch.randn(shape) for name, shape in param_shapes(config).items()}
    tensors["router.weight"] = torch.randn(4, 8).t()  # (D, E) view of (E, D) storage
    state = torch.random.get_rng_state()
    layer = MoE.from_tensors(config, tensors)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert layer.router.weight.data_ptr() == tensors["router.weight"].data_ptr()
    assert layer.router.weight.stride() == (1, 8)
    assert float(layer.router_state.top_p) == pytest.approx(0.4)  # fresh state
    with pytest.raises(InputError, match=r"^tensors: missing \['experts.w_up'\]"):
        MoE.from_tensors(config, {k: v for k, v in tensors.items() if k != "experts.w_up"})
    with pytest.raises(InputError, match=r"^tensors: experts.w_down has shape \(4, 8, 6\)"):
        MoE.from_tensors(config, {**tensors, "experts.w_down": torch.zeros(4, 8, 6)})
    with torch.device("meta"):
        meta = {k: torch.empty(v.shape) for k, v in tensors.items()}
    assert {t.device.type for t in MoE.from_tensors(config, meta).buffers()} == {"meta"}
