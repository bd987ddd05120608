"""``experts_implementation="moe_router"``: our sorted grouped dispatch behind transformers' seam.

Tiny random experts modules and models of families covering every layout flag, compared with
transformers' own ``eager`` experts on the same (hidden, indices, weights): outputs and gradients
(input, routing weights, every parameter), ``-1`` slots (against eager on the same routing with
those slots dropped by hand), expert-parallel sentinels, whole-model logits and a training step,
``from_pretrained``, ``torch.compile(fullgraph=True)``, registration and the import hook.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from moe_router.errors import InputError  # noqa: E402
from moe_router.torch import (  # noqa: E402
    moe_router_experts_forward,
    register_hf_experts,
    use_moe_router_experts,
)
from moe_router_backends.torch import hf_experts as hx  # noqa: E402

pytestmark = [pytest.mark.torch, pytest.mark.hf]

t = transformers
COMMON = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
#: family -> (config class, causal LM class, config kwargs); layout flags in the comments
MODELS = {
    "mixtral": (t.MixtralConfig, t.MixtralForCausalLM,  # concatenated gate_up (E, 2F, D)
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2)),
    "gpt_oss": (t.GptOssConfig, t.GptOssForCausalLM,  # interleaved, transposed, bias, own gate
                dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                     head_dim=8, layer_types=["sliding_attention", "full_attention"],
                     sliding_window=8)),
    "aria": (t.AriaTextConfig, t.AriaTextForCausalLM,  # transposed (E, D, 2F)
             dict(intermediate_size=24, moe_num_experts=4, moe_topk=2,
                  moe_num_shared_experts=1)),
    "nemotron_h": (t.NemotronHConfig, t.NemotronHForCausalLM,  # has_gate=False: up_proj, relu2
                   dict(layers_block_type=["attention", "moe"], n_routed_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=24,
                        moe_shared_expert_intermediate_size=24, head_dim=8, n_group=1,
                        topk_group=1, intermediate_size=24)),
    "qwen3_moe": (t.Qwen3MoeConfig, t.Qwen3MoeForCausalLM,
                  dict(intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                       num_experts_per_tok=2, head_dim=8)),
    "deepseek_v3": (t.DeepseekV3Config, t.DeepseekV3ForCausalLM,
                    dict(intermediate_size=48, moe_intermediate_size=24, n_routed_experts=8,
                         num_experts_per_tok=2, n_group=4, topk_group=2, n_shared_experts=1,
                         first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                         qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8)),
}
#: experts-only families (their models are multimodal): post_expert_norm; concatenated +
#: transposed + bias with its own gate
EXTRA = ("muse_spark", "privacy_filter")
FAMILIES = [*MODELS, *EXTRA]
KERNELS = ["auto", *hx.KERNELS]


def _randomize(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter ~ N(0, 0.2) (norm weights near 1), deterministic."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise + 1.0 if "norm" in name and p.dim() == 1 else noise)


def _model(family: str) -> torch.nn.Module:
    config_cls, model_cls, kwargs = MODELS[family]
    model = model_cls(config_cls(**COMMON, **kwargs)).eval()
    _randomize(model)
    return model


def _experts(family: str) -> torch.nn.Module:
    """A standalone experts module of ``family`` with random parameters (float32)."""
    if family == "muse_spark":
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

        module = MuseSparkExperts(t.MuseSparkTextConfig(
            hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
            moe_hidden_size=16, moe_intermediate_size=24, num_local_experts=4))
    elif family == "privacy_filter":
        from transformers.models.openai_privacy_filter.modeling_openai_privacy_filter import (
            OpenAIPrivacyFilterExperts,
        )

        module = OpenAIPrivacyFilterExperts(t.OpenAIPrivacyFilterConfig(
            hidden_size=32, intermediate_size=24, num_local_experts=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8))
    else:
        module = next(m for m in _model(family).modules() if hx.is_hf_experts(m))
    _randomize(module, seed=1)
    return module.float()


def _width(module: torch.nn.Module) -> int:
    return module.down_proj.shape[-1 if module.is_transposed else 1]


def _routing(module: torch.nn.Module, T: int = 11, K: int = 3, unused: bool = False,
             seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(x_TD, ids_TK, weights_TK)``: distinct experts per token; with ``unused``, some
    slots (and all of token 2's) are ``-1``."""
    gen = torch.Generator().manual_seed(seed)
    E = module.num_experts
    x_TD = torch.randn(T, _width(module), generator=gen)
    ids_TK = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)])
    weights_TK = torch.rand(T, K, generator=gen) + 0.1
    if unused:
        drop_TK = torch.rand(T, K, generator=gen) < 0.4
        drop_TK[2] = True
        ids_TK = ids_TK.masked_fill(drop_TK, -1)
    return x_TD, ids_TK, weights_TK


def _call(module: torch.nn.Module, impl: str, *args: torch.Tensor) -> torch.Tensor:
    """The module through transformers' seam with ``config._experts_implementation = impl``."""
    module.config._experts_implementation = impl
    return module(*args)


def _ours(module: torch.nn.Module, kernel: str, *args: torch.Tensor) -> torch.Tensor:
    if kernel == "auto":
        register_hf_experts()
        return _call(module, "moe_router", *args)
    return moe_router_experts_forward(module, *args, kernel=kernel)


def _dropped_by_hand(module: torch.nn.Module, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                     weights_TK: torch.Tensor) -> torch.Tensor:
    """Eager on the used slots only: one slot column at a time, ``-1`` / sentinel slots left
    out, summed per token."""
    out_TD = torch.zeros_like(x_TD)
    for k in range(ids_TK.shape[1]):
        rows = ((ids_TK[:, k] >= 0) & (ids_TK[:, k] < module.num_experts)).nonzero()[:, 0]
        if rows.numel():
            part = _call(module, "eager", x_TD[rows], ids_TK[rows, k:k + 1],
                         weights_TK[rows, k:k + 1])
            out_TD = out_TD.index_add(0, rows, part)
    return out_TD


def _grads(module: torch.nn.Module, fn, x_TD: torch.Tensor, ids_TK: torch.Tensor,
           weights_TK: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``(out, grads)`` of ``sum(out * g)`` w.r.t. the input, the routing weights and every
    parameter."""
    module.zero_grad(set_to_none=True)
    x_TD = x_TD.clone().requires_grad_()
    weights_TK = weights_TK.clone().requires_grad_()
    out_TD = fn(module, x_TD, ids_TK, weights_TK)
    g_TD = torch.randn(out_TD.shape, generator=torch.Generator().manual_seed(5))
    (out_TD * g_TD).sum().backward()
    grads = {"input": x_TD.grad, "weights": weights_TK.grad}
    for name, p in module.named_parameters():
        grads[name] = torch.zeros_like(p) if p.grad is None else p.grad
    return out_TD.detach(), grads


def _assert_same(ours: tuple, ref: tuple) -> None:
    torch.testing.assert_close(ours[0], ref[0], atol=1e-5, rtol=1e-5)
    for name, grad in ref[1].items():
        torch.testing.assert_close(ours[1][name], grad, atol=1e-5, rtol=1e-5, msg=name)


# ----- the experts module ------------------------------------------------------------------------
@pytest.mark.parametrize("unused", [False, True], ids=["full", "unused"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", FAMILIES)
def test_output_and_gradients_match_eager(family: str, kernel: str, unused: bool) -> None:
    """Output and gradients (input, routing weights, every parameter) equal eager's on the same
    routing; with ``-1`` slots, eager's on that routing with them dropped by hand (and the ``-1``
    slots get zero output and zero weight gradient)."""
    module = _experts(family)
    x_TD, ids_TK, weights_TK = _routing(module, unused=unused)
    eager = _dropped_by_hand if unused else (lambda m, *a: _call(m, "eager", *a))
    ref = _grads(module, eager, x_TD, ids_TK, weights_TK)
    ours = _grads(module, lambda m, *a: _ours(m, kernel, *a), x_TD, ids_TK, weights_TK)
    _assert_same(ours, ref)
    if unused:
        assert ours[0][2].abs().max() == 0 and ours[1]["weights"][ids_TK < 0].abs().max() == 0
    with torch.no_grad():  # the inference fast paths (raw grouped kernel)
        torch.testing.assert_close(_ours(module, kernel, x_TD, ids_TK, weights_TK), ref[0],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kernel", KERNELS)
def test_expert_parallel_sentinels_are_unused(kernel: str) -> None:
    module = _experts("gpt_oss")
    x_TD, ids_TK, weights_TK = _routing(module, unused=True)
    ids_TK = torch.where(ids_TK < 0, module.num_experts + ids_TK.abs() * 3, ids_TK)
    module._is_expert_parallel = True
    ref = _grads(module, _dropped_by_hand, x_TD, ids_TK, weights_TK)
    ours = _grads(module, lambda m, *a: _ours(m, kernel, *a), x_TD, ids_TK, weights_TK)
    _assert_same(ours, ref)


@pytest.mark.parametrize("K", [1, 4])
def test_any_k_and_edge_cases(K: int) -> None:
    module = _experts("mixtral")
    x_TD, ids_TK, weights_TK = _routing(module, T=7, K=K)
    torch.testing.assert_close(_ours(module, "auto", x_TD, ids_TK, weights_TK),
                               _call(module, "eager", x_TD, ids_TK, weights_TK),
                               atol=1e-5, rtol=1e-5)
    for kernel in KERNELS:  # every slot unused; no tokens
        out = _ours(module, kernel, x_TD, torch.full_like(ids_TK, -1), weights_TK)
        assert out.shape == x_TD.shape and out.abs().max() == 0, kernel
        out = _ours(module, kernel, x_TD[:0], ids_TK[:0], weights_TK[:0])
        assert out.shape == (0, x_TD.shape[1]), kernel


def test_bfloat16_output_dtype_closeness_and_gradients() -> None:
    """bfloat16 experts, float32 routing weights (as transformers' routers give): output in
    bfloat16, close to eager's, and so are the gradients (input, weights, parameters)."""
    module = _experts("mixtral").to(torch.bfloat16)
    x_TD, ids_TK, weights_TK = _routing(module, T=64, K=2, unused=True)
    x_TD = x_TD.to(torch.bfloat16)
    ref = _grads(module, _dropped_by_hand, x_TD, ids_TK, weights_TK)
    for kernel in KERNELS:
        out, grads = _grads(module, lambda m, *a: _ours(m, kernel, *a), x_TD, ids_TK, weights_TK)
        assert out.dtype == torch.bfloat16, kernel
        torch.testing.assert_close(out.float(), ref[0].float(), atol=3e-2, rtol=3e-2,
                                   msg=kernel)
        for name, grad in ref[1].items():
            torch.testing.assert_close(grads[name].float(), grad.float(), atol=6e-2, rtol=5e-2,
                                       msg=f"{kernel} {name}")


@pytest.mark.parametrize("experts", [(1, 4, 7), (6,), (2, 3, 6), (0, 7)])
@pytest.mark.parametrize("kernel", ["auto", "padded"])
def test_padded_over_strided_expert_grids(experts: tuple[int, ...], kernel: str) -> None:
    """Decode-like routings whose used experts are evenly spaced (a strided view of the weights),
    or not (the used range), on GPT-OSS (biases)."""
    module = _experts("gpt_oss")
    for name, p in list(module.named_parameters()):  # 8 experts
        setattr(module, name, torch.nn.Parameter(p.new_empty((8, *p.shape[1:]))))
    module.num_experts = 8
    _randomize(module, seed=2)  # small values: far from the clamps of GPT-OSS's gate
    x_TD, _, weights_TK = _routing(module, T=3, K=2)
    ids_TK = torch.tensor(experts * 6)[:6].view(3, 2)
    ids_TK[1, 1] = -1
    ref = _grads(module, _dropped_by_hand, x_TD, ids_TK, weights_TK)
    _assert_same(_grads(module, lambda m, *a: _ours(m, kernel, *a), x_TD, ids_TK, weights_TK),
                 ref)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("family", ["gpt_oss", "muse_spark", "nemotron_h"])
def test_device_paths_on_cpu(family: str, kernel: str, monkeypatch) -> None:
    """The paths taken off the CPU (CUDA), run here: all S rows through the grouped kernel
    (unused slots in its tail), ``loop`` / ``padded`` rows gathered back and summed over K."""
    monkeypatch.setattr(hx, "on_host", lambda x: False)
    module = _experts(family)
    x_TD, ids_TK, weights_TK = _routing(module, unused=True)
    ref = _grads(module, _dropped_by_hand, x_TD, ids_TK, weights_TK)
    _assert_same(_grads(module, lambda m, *a: _ours(m, kernel, *a), x_TD, ids_TK, weights_TK),
                 ref)
    with torch.no_grad():
        torch.testing.assert_close(_ours(module, kernel, x_TD, ids_TK, weights_TK), ref[0],
                                   atol=1e-5, rtol=1e-5)


def test_combine_gather_path_equals_index_add_path() -> None:
    """The deterministic gather + sum over K (the GPU path) and the CPU index-add agree, with
    unused slots and fewer computed rows than slots."""
    gen = torch.Generator().manual_seed(4)
    ids_TK = torch.randint(0, 4, (9, 3), generator=gen)
    ids_TK[ids_TK == 2] = -1
    perm = hx.permutation(hx._B, ids_TK, 4)
    used = int(perm.counts_E.sum())
    out_UD = torch.randn(used, 5, generator=gen)
    weights_TK = torch.rand(9, 3, generator=gen).masked_fill(ids_TK < 0, 0)
    scattered = hx.combine(out_UD, perm, weights_TK, 9, index_add=True)
    gathered = hx.combine(out_UD, perm, weights_TK, 9, index_add=False)
    torch.testing.assert_close(gathered, scattered)
    expected = torch.zeros(9, 5)
    for row, slot in enumerate(perm.order_S[:used].tolist()):
        expected[slot // 3] += weights_TK.reshape(-1)[slot] * out_UD[row]
    torch.testing.assert_close(gathered, expected)


def test_policy() -> None:
    module = _experts("mixtral")
    w = hx.experts_weights(module)
    x_TD = torch.randn(4, 32)
    assert w.w_in_EDN.data_ptr() == module.gate_up_proj.data_ptr()  # a view, not a copy
    assert hx.expert_grid([1, 0, 0, 1]) == (0, 3, 2)  # evenly spaced: a strided view
    assert hx.expert_grid([0, 2, 1, 0, 5]) == (1, 1, 4)
    assert hx.expert_grid([0, 1, 1, 0, 1]) == (1, 1, 4)  # not evenly spaced: the range
    choose = hx.choose_experts_kernel
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # bmm spreads experts over threads: padded
        assert choose(x_TD, w, 2, [0, 1, 0, 0, 0, 0, 1, 0]) == "padded"
        assert choose(x_TD, w, 8, [0, 3, 5, 0]) == "padded"
        assert choose(x_TD, w, 3, [1, 1, 0, 0, 0, 0, 0, 1]) == "loop"  # 8 streamed for 3 used
        assert choose(x_TD, w, hx.PADDED_ROWS_PER_EXPERT * 4 + 1) == "grouped_mm"  # E = 4
        assert choose(x_TD, w, hx.PADDED_MAX_SLOTS + 1) == "loop"
        w64 = hx.ExpertsWeights(*(None if v is None else v.double() for v in w))
        assert choose(x_TD.double(), w64, 8) == "padded"
        assert choose(x_TD.double(), w64, hx.PADDED_ROWS_PER_EXPERT * 4 + 1) == "padded"
        assert choose(x_TD[:1], w, 2) == "decode"  # one token: no sort
        w16 = hx.ExpertsWeights(*(None if v is None else v.bfloat16() for v in w))
        assert choose(x_TD.bfloat16(), w16, 2, [0, 1, 0, 1]) == "grouped_mm"
        torch.set_num_threads(1)  # one thread: the CPU grouped kernel
        assert choose(x_TD, w, 2, [0, 1, 0, 1]) == "grouped_mm"
        assert choose(x_TD.double(), w64, 8) == "loop"
        assert choose(x_TD, w, hx.PADDED_MAX_SLOTS + 1) == "loop"
    finally:
        torch.set_num_threads(threads)


# ----- whole models --------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(MODELS))
def test_whole_model_logits_match_eager(family: str) -> None:
    model = _model(family)
    n_experts = sum(hx.is_hf_experts(m) for m in model.modules())
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(1))
    model.set_experts_implementation("eager")
    with torch.no_grad():
        ref = model(ids).logits
        assert use_moe_router_experts(model) == n_experts > 0
        assert model.config._experts_implementation == "moe_router"
        torch.testing.assert_close(model(ids).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_training_step_gradients_match_eager(family: str) -> None:
    model = _model(family).train()
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    grads = {}
    for impl in ("eager", "moe_router"):
        model.zero_grad(set_to_none=True)
        register_hf_experts()
        model.set_experts_implementation(impl)
        model(ids, labels=ids).loss.backward()
        grads[impl] = {n: p.grad.clone() for n, p in model.named_parameters()
                       if p.grad is not None}
    assert grads["moe_router"].keys() == grads["eager"].keys()
    assert any("experts" in name for name in grads["eager"])
    for name, grad in grads["eager"].items():
        torch.testing.assert_close(grads["moe_router"][name], grad, atol=1e-5, rtol=1e-4,
                                   msg=name)


def test_from_pretrained_with_experts_implementation(tmp_path) -> None:
    _model("mixtral").save_pretrained(tmp_path)
    register_hf_experts()
    ids = torch.randint(0, 97, (1, 7), generator=torch.Generator().manual_seed(3))
    ours = t.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="moe_router")
    eager = t.AutoModelForCausalLM.from_pretrained(tmp_path, experts_implementation="eager")
    assert ours.config._experts_implementation == "moe_router"
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, eager(ids).logits, atol=1e-5, rtol=1e-5)


# ----- torch.compile ---------------------------------------------------------------------------
@pytest.mark.parametrize("family,dtype", [("mixtral", torch.float32),  # grouped_mm custom op
                                          ("gpt_oss", torch.float64)])  # transformers' fallback
def test_compile_fullgraph(family: str, dtype: torch.dtype) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    module = _experts(family).to(dtype)
    x_TD, ids_TK, weights_TK = _routing(module, unused=True)
    x_TD, weights_TK = x_TD.to(dtype), weights_TK.to(dtype)
    ref = _grads(module, _dropped_by_hand, x_TD, ids_TK, weights_TK)
    register_hf_experts()
    module.config._experts_implementation = "moe_router"
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(module, fullgraph=True, backend=counter)
    ours = _grads(module, lambda m, *a: compiled(*a), x_TD, ids_TK, weights_TK)
    _assert_same(ours, ref)
    assert counter.frame_count == 1


# ----- registration -----------------------------------------------------------------------------
def test_registration_is_idempotent_and_validated() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    register_hf_experts()
    register_hf_experts()
    assert ALL_EXPERTS_FUNCTIONS["moe_router"] is moe_router_experts_forward
    assert ExpertsInterface()["moe_router"] is moe_router_experts_forward  # every instance
    model = _model("mixtral")
    assert model.get_correct_experts_implementation("moe_router") == "moe_router"
    model.set_experts_implementation("moe_router")
    assert model.config._experts_implementation == "moe_router"


def test_use_moe_router_experts_on_a_block_and_refusal() -> None:
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(t.MixtralConfig(**COMMON, intermediate_size=24,
                                                  num_local_experts=4, num_experts_per_tok=2))
    assert use_moe_router_experts(block) == 1
    assert block.experts.config._experts_implementation == "moe_router"
    with pytest.raises(InputError) as info:
        use_moe_router_experts(torch.nn.Linear(4, 4))
    assert info.value.argument == "model" and "experts" in str(info.value)


def test_import_registers_lazily_without_importing_transformers() -> None:
    code = ("import importlib.util, sys, moe_router.torch\n"
            "assert 'transformers' not in sys.modules\n"
            "import transformers\n"
            "importlib.util.find_spec('transformers.integrations.moe')  # a probe: no import\n"
            "from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS as F\n"
            "import transformers.integrations.moe as m\n"
            "hooks = [f for f in sys.meta_path if 'RegisterOnImport' in type(f).__name__]\n"
            "print('moe_router' in F, type(m.__loader__).__name__, len(hooks))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "SourceFileLoader", "0"]
