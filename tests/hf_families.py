"""Catalog of the transformers MoE families that route their experts through the experts seam.

transformers 5.x decorates the experts classes of its MoE families with
``@use_experts_implementation`` (``transformers/integrations/moe.py``): their forward dispatches
on ``config._experts_implementation`` (``"eager"``, ``"grouped_mm"``, ... and ours,
``"moe_router"``) with ``(hidden_states (T, D), top_k_index (T, K), top_k_weights (T, K))``,
which the family's MoE block gets from its own gate module.

This module lists every such family of the installed transformers:

- :data:`FAMILIES`: the testable ones, each with a tiny random config of its own config class
  (2 layers, hidden 32, 8 experts, top-2 where the family allows it, vocabulary 99), the model
  class to test, and the facts about its gate that a router wrapper needs (:class:`Gate`);
- :data:`EXCLUDED`: the ones that cannot be tested, with the reason.

The catalog was built by building and running every family programmatically (see
:func:`seam_families`, which lists the families from the installed transformers' sources, and
``tests/torch/test_hf_families.py``, which checks every fact below against the running model).
``python tests/hf_families.py`` rewrites the table of ``docs/hf-families.md``.

Imports nothing heavy at import time: torch and transformers are imported by the functions that
need them, so a collection without transformers still works.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: the decorator that marks an experts class routed through the seam
SEAM_DECORATOR = "@use_experts_implementation"

#: sizes every tiny config gets, for the keys its config class accepts (families may override)
TINY: dict[str, Any] = dict(
    vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, head_dim=8, intermediate_size=64, moe_intermediate_size=16,
    max_position_embeddings=128, initializer_range=0.02, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, sliding_window=8,
    # experts: 8 routed, top-2, 4 groups of which 2 are kept, 1 shared expert
    num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
    num_experts_per_tok=2, moe_topk=2, num_experts_per_token=2, top_k_experts=2, moe_k=2,
    n_group=4, topk_group=2, num_expert_group=4,
    n_shared_experts=1, num_shared_experts=1, moe_num_shared_experts=1,
    shared_expert_intermediate_size=16, shared_intermediate_size=16,
    shared_experts_intermediate_size=16, moe_shared_expert_intermediate_size=16,
    # the first layer dense where the family has dense layers, the second one MoE
    first_k_dense_replace=1,
    # multi-head latent attention (DeepSeek-style) and its sparse-attention indexer
    q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    qk_head_dim=8, index_head_dim=8, index_n_heads=2, index_topk=4,
    # linear attention (gated delta net and friends)
    linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
    linear_num_value_heads=4, linear_conv_kernel_dim=2,
    # no multi-token-prediction layers
    num_nextn_predict_layers=0, num_mtp_layers=0,
)

_DEFAULT_RETURNS = ("logits", "weights", "indices")


@dataclass(frozen=True)
class Gate:
    """What a family's MoE block does to route, as a router wrapper needs to know it.

    Paths are relative to a decoder layer (``model.layers[i]``). ``tests/torch/test_hf_families.py``
    checks the fields against the running model: paths, returns, the number of inputs, the
    float32 flags (in a bfloat16 model), and for the standard scores (softmax, sigmoid,
    softmax_topk, activations) the weights rebuilt from the logits by ``score`` / ``normalize``
    / ``scale`` and, for ``"topk"`` selection, the indices as the top-k of the scores plus
    ``bias``. ``jitter``, ``post_scale``, the group / hash / sparsemixer rules and ``notes`` are
    read from the sources, not rebuilt.

    Attributes:
        path: the gate (router) module, e.g. ``"mlp.gate"``.
        experts: the experts module (the seam), e.g. ``"mlp.experts"``.
        returns: what the gate returns, in order: ``"logits"`` (pre-score, ``(T, E)``),
            ``"probs"`` (already scored, ``(T, E)``), ``"weights"`` (``(T, K)``, what the
            experts get), ``"indices"`` (``(T, K)``), or a family-specific extra.
        inputs: what the block passes the gate after the hidden states (block attributes or
            model inputs), e.g. ``("mlp.expert_bias",)`` or ``("input_ids",)``.
        score: how logits become scores: ``"softmax"`` / ``"sigmoid"`` over the experts,
            ``"softmax_topk"`` (softmax over the K selected logits), another activation of
            ``transformers.activations.ACT2FN``, ``"config:<key>"`` (the activation the config
            names), or a family-specific rule (``"sparsemixer"``, ``"logsigmoid+shared"``).
        normalize: whether the K selected scores are renormalised to sum to 1: ``True``,
            ``False``, or the config key that decides (``"norm_topk_prob"``).
        bias: the selection-only bias (aux-loss-free balancing), added to the scores before
            top-k but not to the weights, relative to the decoder layer; ``None`` when none.
        bias_on: what the bias is added to: ``"scores"`` or ``"logits"``.
        selection: ``"topk"``; ``"group_topk"`` (``n_group`` / ``topk_group``: top-k within the
            best groups); ``"hash"`` (a frozen token-id -> experts table); ``"hash+topk"`` (hash
            layers then top-k layers); ``"sparsemixer"``.
        scale: factor the gate multiplies the weights by: an attribute of the gate module (a
            number, or a per-expert vector gathered at the selected experts), ``"1/top_k"``.
        post_scale: factor the block multiplies the experts' output by, after the seam (an
            attribute of the block), so it is *not* in the weights.
        jitter: training-time noise the family applies (config keys), ``None`` when none.
        fp32_logits: in a bfloat16 model, the gate returns float32 logits (computed in float32,
            or cast after a bfloat16 matmul: see ``notes``).
        fp32_weights: in a bfloat16 model, the gate returns float32 weights (``None``: as
            ``fp32_logits``); the experts then multiply their outputs by float32 weights.
        skip_expert: the last router class is a "skip" expert: when selected, its slot gets
            weight 0 and index 0.
        notes: anything else a wrapper must reproduce.
    """

    path: str
    experts: str
    returns: tuple[str, ...] = _DEFAULT_RETURNS
    inputs: tuple[str, ...] = ()
    score: str = "softmax"
    normalize: bool | str = True
    bias: str | None = None
    bias_on: str = "scores"
    selection: str = "topk"
    scale: str | None = None
    post_scale: str | None = None
    jitter: str | None = None
    fp32_logits: bool = False
    fp32_weights: bool | None = None
    skip_expert: bool = False
    notes: str = ""

    def but(self, **changes: Any) -> Gate:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    @property
    def weights_fp32(self) -> bool:
        return self.fp32_logits if self.fp32_weights is None else self.fp32_weights


@dataclass(frozen=True)
class Family:
    """One testable family.

    Attributes:
        name: the ``model_type`` (the folder under ``transformers/models``).
        config_class: the config class (in ``configuration_<name>.py``) the tiny config uses.
        model_class: the class to test (in ``modeling_<name>.py``): the causal LM where the
            family has one, else the text model (multimodal-only families) or the head that
            exposes the MoE blocks.
        gate: the gate's conventions.
        overrides: config keys on top of :data:`TINY` (given even when the signature lacks
            them, for keys read from ``**kwargs``).
        head: ``"causal_lm"`` (logits, ``labels``, ``generate``), ``"token_classification"``
            (logits, ``labels``) or ``"base"`` (``last_hidden_state`` only).
        aux_loss: ``output_router_logits=True`` adds ``router_aux_loss_coef * aux_loss`` to
            the loss (families with aux-loss-free balancing return router logits only).
        idle_experts: experts modules (relative to a decoder layer) a text-only forward never
            calls (e.g. a vision tower's experts).
        tp_plan_optional: keys of the tensor-parallel plan that are valid only under other
            config flags (so the tiny config cannot make them all exist at once).
        upstream: known failures of transformers itself, by check (``"init"``, ``"tp_plan"``,
            ``"router_logits"``, ...): the test of that check is an expected failure (strict,
            so a fixed transformers shows up).
        notes: remarks for the docs page.
    """

    name: str
    config_class: str
    model_class: str
    gate: Gate
    overrides: Mapping[str, Any] = field(default_factory=dict)
    head: str = "causal_lm"
    aux_loss: bool = False
    idle_experts: tuple[str, ...] = ()
    tp_plan_optional: tuple[str, ...] = ()
    upstream: Mapping[str, str] = field(default_factory=dict)
    notes: str = ""

    def config_cls(self) -> type:
        name = self.name
        module = importlib.import_module(f"transformers.models.{name}.configuration_{name}")
        return getattr(module, self.config_class)

    def model_cls(self) -> type:
        module = importlib.import_module(f"transformers.models.{self.name}.modeling_{self.name}")
        return getattr(module, self.model_class)

    def config(self, **changes: Any) -> Any:
        """A fresh tiny config (the :data:`TINY` keys its class accepts, then ``overrides``,
        then ``changes``)."""
        import inspect

        cls = self.config_cls()
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in TINY.items() if k in accepted}
        kwargs.update(self.overrides)
        kwargs.update(changes)
        return cls(**kwargs)

    def build(self, seed: int = 0, **changes: Any) -> Any:
        """The tiny model, float32, eval mode, weights from ``torch.manual_seed(seed)``."""
        import torch

        config = self.config(**changes)
        torch.manual_seed(seed)
        return self.model_cls()(config).eval()

    @property
    def generates(self) -> bool:
        return self.head == "causal_lm"

    @property
    def has_labels(self) -> bool:
        return self.head in ("causal_lm", "token_classification")


# ----- gate presets ----------------------------------------------------------------------------
#: DeepSeek-V3 style: sigmoid scores, a selection-only correction bias, group-limited top-k,
#: optional renormalisation, routed scaling factor; router weight and bias kept in float32.
DEEPSEEK_V3 = Gate(
    path="mlp.gate", experts="mlp.experts", score="sigmoid", normalize="norm_topk_prob",
    bias="mlp.gate.e_score_correction_bias", selection="group_topk", scale="routed_scaling_factor",
    fp32_logits=True)
#: DeepSeek-V2 style: softmax, no renormalisation, routed scaling factor; ``topk_method``
#: ``"greedy"`` (the default, plain top-k) or ``"group_limited_greedy"`` (best groups by max).
DEEPSEEK_V2 = Gate(
    path="mlp.gate", experts="mlp.experts", score="softmax", normalize=False,
    scale="routed_scaling_factor", fp32_logits=True,
    notes="topk_method 'group_limited_greedy' selects within the best groups (group score: max)")
#: Qwen / OLMoE style: softmax over the experts, renormalised when ``norm_topk_prob``.
QWEN = Gate(path="mlp.gate", experts="mlp.experts", score="softmax", normalize="norm_topk_prob")
#: Mixtral style: softmax, always renormalised, multiplicative input jitter when training.
MIXTRAL = Gate(path="mlp.gate", experts="mlp.experts", score="softmax", normalize=True,
               fp32_weights=True, jitter="router_jitter_noise (block input, training only)")
#: softmax over the top-k logits (the weights sum to 1 by construction).
SOFTMAX_TOPK = Gate(path="mlp.router", experts="mlp.experts", score="softmax_topk",
                    normalize=False)
GRANITE = SOFTMAX_TOPK.but(
    path="block_sparse_moe.router", experts="block_sparse_moe.experts", fp32_logits=True,
    fp32_weights=False,
    notes="logits: matmul in the model dtype, then cast to float32; weights cast back")
#: Gemma-4 style: the router sits on the decoder layer next to a dense MLP, RMS-normalises and
#: rescales its input, returns softmax probabilities (not logits), renormalises the top-k and
#: multiplies them by a learned per-expert scale.
GEMMA = Gate(
    path="router", experts="experts", returns=("probs", "weights", "indices"), score="softmax",
    normalize=True, scale="per_expert_scale", fp32_logits=True,
    notes="router input is RMS-normed and scaled (router.scale, hidden**-0.5); the experts get "
          "a differently normed input (pre_feedforward_layernorm_2); output added to a dense MLP")


def _f(name: str, model: str, gate: Gate, config: str | None = None, **kw: Any) -> Family:
    prefix = "".join(part.capitalize() for part in name.split("_"))
    return Family(name=name, config_class=config or f"{prefix}Config", model_class=model,
                  gate=gate, **kw)


_MLA_Q = ("layers.*.self_attn.q_proj",)  # valid only without q_lora_rank (MLA)
_LINEAR_ATTN = ["linear_attention", "full_attention"]

FAMILIES: dict[str, Family] = {f.name: f for f in [
    _f("afmoe", "AfmoeForCausalLM", Gate(
        path="mlp.router", experts="mlp.experts", inputs=("mlp.expert_bias",), score="sigmoid",
        normalize=True, bias="mlp.expert_bias", scale="route_scale", fp32_logits=True,
        notes="expert_bias lives on the block (float32, _keep_in_fp32_modules_strict) and is "
              "passed to the router; shared experts added")),
    _f("aria", "AriaTextForCausalLM", SOFTMAX_TOPK.but(notes="shared experts added"),
       config="AriaTextConfig"),
    _f("axk1", "AXK1ForCausalLM", DEEPSEEK_V3.but(
        notes="block applies post_mlp_layernorm after adding the shared experts"),
       config="AXK1Config"),
    _f("axk2", "AXK2ForCausalLM", DEEPSEEK_V3.but(
        notes="group-limited selection only when n_group is set"), config="AXK2Config"),
    _f("bailing_hybrid", "BailingHybridForCausalLM", DEEPSEEK_V3,
       overrides=dict(layer_types=_LINEAR_ATTN, mlp_layer_types=["dense", "sparse"])),
    _f("beam", "BeamForCausalLM", DEEPSEEK_V3.but(
        scale=None, post_scale="routed_scaling_factor",
        notes="routed_scaling_factor multiplies the experts' output in the block, not the weights"),
       overrides=dict(mlp_layer_types=["dense", "sparse"])),
    _f("cohere2_moe", "Cohere2MoeForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="softmax_topk", normalize=False,
        notes="config expert_selection_fn: 'softmax' (default, over the top-k logits) or "
              "'sigmoid' of the top-k logits (renormalised when norm_topk_prob); shared experts "
              "summed or averaged (shared_expert_combination_strategy)"),
       overrides=dict(mlp_layer_types=["dense", "sparse"])),
    _f("deepseek_ocr2", "DeepseekOcr2TextModel", DEEPSEEK_V2, config="DeepseekOcr2TextConfig",
       head="base", overrides=dict(mlp_layer_types=["dense", "sparse"]),
       notes="multimodal only: the text model is tested"),
    _f("deepseek_v2", "DeepseekV2ForCausalLM", DEEPSEEK_V2, tp_plan_optional=_MLA_Q),
    _f("deepseek_v3", "DeepseekV3ForCausalLM", DEEPSEEK_V3),
    _f("deepseek_v32", "DeepseekV32ForCausalLM", DEEPSEEK_V3),
    _f("deepseek_v4", "DeepseekV4ForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="config:scoring_func", normalize=True,
        bias="mlp.gate.e_score_correction_bias", selection="hash+topk",
        scale="routed_scaling_factor",
        notes="'hash_moe' layers route by a frozen token-id table (gate.tid2eid, gate input "
              "(hidden, input_ids), no bias); 'moe' layers by top-k of scoring_func "
              "(sqrtsoftplus) + bias; shared experts added"),
       aux_loss=True, overrides=dict(o_lora_rank=16, mlp_layer_types=["hash_moe", "moe"])),
    _f("diffusion_gemma", "DiffusionGemmaEncoderTextModel", GEMMA,
       config="DiffusionGemmaTextConfig", head="base",
       overrides=dict(global_head_dim=8),
       upstream={"init": "DiffusionGemmaPreTrainedModel._init_weights sets layer_scalar for "
                         "DiffusionGemmaDecoderTextLayer only: the encoder layers' layer_scalar "
                         "buffer stays uninitialised after meta-device loading"},
       notes="block-diffusion model: the encoder text model is tested (no causal LM)"),
    _f("dots1", "Dots1ForCausalLM", DEEPSEEK_V3),
    _f("dots3_note", "Dots3NoteForCausalLM", DEEPSEEK_V3, config="Dots3NoteTextConfig"),
    _f("ernie4_5_moe", "Ernie4_5_MoeForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="softmax", normalize=True,
        bias="mlp.gate.moe_statics.e_score_correction_bias", fp32_logits=True,
        fp32_weights=False,
        notes="renormalisation clamps the sum at moe_norm_min; weights cast back to the input "
              "dtype; shared experts added"),
       config="Ernie4_5_MoeConfig", aux_loss=True),
    _f("ernie4_5_vl_moe", "Ernie4_5_VLMoeTextModel", Gate(
        path="mlp.text_moe.gate", experts="mlp.text_moe.experts", score="softmax",
        normalize=True, bias="mlp.text_moe.gate.moe_statics.e_score_correction_bias",
        fp32_logits=True, fp32_weights=False,
        notes="modality-isolated: text tokens go to mlp.text_moe, image tokens to "
              "mlp.vision_moe (same conventions)"),
       config="Ernie4_5_VLMoeTextConfig", head="base",
       idle_experts=("mlp.vision_moe.experts",),
       overrides=dict(moe_intermediate_size=[16, 16], rope_parameters={
           "rope_theta": 500000.0, "rope_type": "default", "mrope_section": [1, 1, 2]}),
       notes="multimodal only: the text model is tested"),
    _f("exaone_moe", "ExaoneMoeForCausalLM", DEEPSEEK_V3),
    _f("flex_olmo", "FlexOlmoForCausalLM", QWEN, aux_loss=True),
    _f("flint", "FlintForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="sigmoid", normalize="norm_topk_prob",
        fp32_logits=True, notes="shared expert always added in full"),
       aux_loss=True, overrides=dict(mlp_only_layers=[0])),
    _f("gemma4", "Gemma4ForCausalLM", GEMMA, config="Gemma4TextConfig",
       overrides=dict(global_head_dim=8, vocab_size_per_layer_input=99,
                      hidden_size_per_layer_input=8, enable_moe_block=True)),
    _f("glm4_moe", "Glm4MoeForCausalLM", DEEPSEEK_V3),
    _f("glm4_moe_lite", "Glm4MoeLiteForCausalLM", DEEPSEEK_V3),
    _f("glm4v_moe", "Glm4vMoeTextModel", DEEPSEEK_V3, config="Glm4vMoeTextConfig", head="base",
       overrides=dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                       "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 0]}),
       notes="multimodal only: the text model is tested"),
    _f("glm5_next", "Glm5NextTextModel", DEEPSEEK_V3, config="Glm5NextTextConfig", head="base",
       overrides=dict(qk_rope_head_dim=0, index_kpool=2, layer_types=[
           "linear_attention", "indexed_attention"], mlp_layer_types=["dense", "sparse"],
           linear_head_dim=8, linear_num_heads=4),
       notes="multimodal only: the text model is tested"),
    _f("glm_moe_dsa", "GlmMoeDsaForCausalLM", DEEPSEEK_V3),
    _f("gpt_oss", "GptOssForCausalLM", SOFTMAX_TOPK.but(
        notes="router has a bias; experts have biases and a clamped, interleaved SwiGLU; the "
              "block returns (output, router_scores)"),
       aux_loss=True),
    _f("granitemoe", "GraniteMoeForCausalLM", GRANITE, config="GraniteMoeConfig",
       aux_loss=True),
    _f("granitemoe_swa", "GraniteMoeSWAForCausalLM", GRANITE, config="GraniteMoeSWAConfig",
       aux_loss=True),
    _f("granitemoehybrid", "GraniteMoeHybridForCausalLM", GRANITE,
       config="GraniteMoeHybridConfig", aux_loss=True,
       overrides=dict(layer_types=["mamba", "attention"], mamba_n_heads=4, mamba_d_state=4,
                      mamba_chunk_size=8, mamba_d_conv=2)),
    _f("granitemoeshared", "GraniteMoeSharedForCausalLM", GRANITE.but(
        notes=GRANITE.notes + "; shared MLP added by the decoder layer"),
       config="GraniteMoeSharedConfig", aux_loss=True),
    _f("hunyuan_v1_moe", "HunYuanMoEV1ForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="softmax", normalize=True,
        fp32_logits=True,
        notes="logits from gate.wg (an nn.Linear created in float32; the input is upcast when "
              "it is); shared MLP added"),
       config="HunYuanMoEV1Config"),
    _f("hy_v3", "HYV3ForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", inputs=("mlp.e_score_correction_bias",),
        score="sigmoid", normalize=True, bias="mlp.e_score_correction_bias",
        scale="router_scaling_factor", fp32_logits=True,
        notes="the bias lives on the block and is passed to the gate; shared experts added "
              "(in float32 when enable_moe_fp32_combine)"),
       config="HYV3Config"),
    _f("hy_v4", "HYV4ForCausalLM", DEEPSEEK_V3, config="HYV4Config"),
    _f("hy_v4_vl", "HYV4VLTextModel", DEEPSEEK_V3, config="HYV4VLTextConfig", head="base",
       overrides=dict(rope_parameters={"rope_theta": 10000.0, "rope_type": "default",
                                       "mrope_section": [1, 1, 0]}),
       notes="multimodal only: the text model is tested"),
    _f("inkling", "InklingForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts",
        returns=("logits", "weights", "indices", "shared_gammas"), score="logsigmoid+shared",
        normalize=True, bias="mlp.gate.e_score_correction_bias", scale="route_scale",
        fp32_logits=True, fp32_weights=False,
        notes="the gate scores n_shared_experts extra logits: weights are a softmax of "
              "logsigmoid over the K routed + shared logits, times route_scale * global_scale; "
              "the shared part (shared_gammas) scales the shared experts"),
       config="InklingTextConfig",
       overrides=dict(swa_num_attention_heads=4, swa_num_key_value_heads=4, swa_head_dim=8,
                      sliding_window_size=8, rel_extent=8, mlp_layer_types=["dense", "sparse"]),
       notes="not registered in the Auto classes (no CONFIG_MAPPING entry)"),
    _f("inkling2", "Inkling2ForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="config:scoring_func", normalize=True,
        bias="mlp.gate.e_score_correction_bias", scale="routed_scaling_factor",
        fp32_logits=True),
       config="Inkling2TextConfig",
       overrides=dict(unpadded_vocab_size=99, swa_num_attention_heads=4,
                      swa_num_key_value_heads=4, swa_head_dim=8, sliding_window_size=8,
                      rel_extent=8, log_scaling_n_floor=8)),
    _f("inkling2_loop", "Inkling2LoopForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="config:scoring_func", normalize=True,
        bias="mlp.gate.e_score_correction_bias", scale="routed_scaling_factor",
        fp32_logits=True),
       config="Inkling2LoopTextConfig",
       overrides=dict(unpadded_vocab_size=99, swa_num_key_value_heads=4, swa_head_dim=8,
                      sliding_window_size=8, rel_extent=8, log_scaling_n_floor=8,
                      loop_gate_rank=8)),
    _f("jamba", "JambaForCausalLM", Gate(
        path="feed_forward.router", experts="feed_forward.experts", score="softmax",
        normalize=False),
       aux_loss=True,
       overrides=dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                      expert_layer_offset=0, mamba_d_state=4, mamba_d_conv=2, mamba_expand=2,
                      mamba_dt_rank=4)),
    _f("kimi_linear", "KimiLinearForCausalLM", DEEPSEEK_V3,
       overrides=dict(layer_types=_LINEAR_ATTN, mlp_layer_types=["dense", "sparse"],
                      linear_head_dim=8, linear_num_heads=4)),
    _f("kolibri1", "Kolibri1ForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="sigmoid", normalize="norm_topk_prob",
        bias="mlp.gate.e_score_correction_bias", bias_on="logits", fp32_logits=True,
        notes="the bias is added to the logits (not the sigmoid scores) for selection; shared "
              "experts added"),
       config="Kolibri1Config"),
    _f("laguna", "LagunaForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="sigmoid", normalize=True,
        bias="mlp.gate.e_score_correction_bias", post_scale="routed_scaling_factor",
        fp32_logits=True, fp32_weights=False,
        notes="logits: matmul in the model dtype, then cast to float32; optional tanh "
              "soft-capping of the logits (moe_router_logit_softcapping, 0 = off); "
              "routed_scaling_factor multiplies the experts' output in the block; shared "
              "experts added"),
       aux_loss=True),
    _f("lara_mini", "LaraMiniForCausalLM", QWEN.but(
        fp32_logits=True, fp32_weights=False, notes="shared expert always added in full"),
       aux_loss=True),
    _f("lfm2_moe", "Lfm2MoeForCausalLM", Gate(
        path="feed_forward.gate", experts="feed_forward.experts",
        inputs=("feed_forward.expert_bias",), score="sigmoid", normalize="norm_topk_prob",
        bias="feed_forward.expert_bias", scale="routed_scaling_factor",
        notes="the bias lives on the block, used when use_expert_bias"),
       overrides=dict(layer_types=["conv", "full_attention"], num_dense_layers=1)),
    _f("mellum", "MellumForCausalLM", QWEN, aux_loss=True,
       overrides=dict(mlp_layer_types=["dense", "sparse"])),
    _f("mimo_v2_flash", "MiMoV2FlashForCausalLM", DEEPSEEK_V3, config="MiMoV2FlashConfig",
       overrides=dict(num_key_value_heads=2)),
    _f("minimax", "MiniMaxForCausalLM", MIXTRAL, config="MiniMaxConfig", aux_loss=True),
    _f("minimax_m2", "MiniMaxM2ForCausalLM", MIXTRAL.but(
        inputs=("mlp.e_score_correction_bias",), score="sigmoid",
        bias="mlp.e_score_correction_bias",
        notes="the bias lives on the block and is passed to the gate"),
       config="MiniMaxM2Config", aux_loss=True),
    _f("minimax_m3_vl", "MiniMaxM3VLForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="sigmoid", normalize=True,
        bias="mlp.gate.e_score_correction_bias", post_scale="routed_scaling_factor",
        fp32_weights=True,
        notes="routed_scaling_factor multiplies the experts' output in the block; shared "
              "experts added"),
       config="MiniMaxM3VLTextConfig", aux_loss=True),
    _f("mistral4", "Mistral4ForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts", score="softmax", normalize="norm_topk_prob",
        selection="group_topk", scale="routed_scaling_factor",
        notes="groups ranked by the sum of their top-2 softmax scores; no bias")),
    _f("mistral_large4", "MistralLarge4TextModel", Gate(
        path="mlp.gate", experts="mlp.experts", score="softmax", normalize=True,
        selection="group_topk", scale="routed_scaling_factor", fp32_logits=True,
        notes="groups ranked by the sum of their top-2 softmax scores; no bias"),
       config="MistralLarge4TextConfig", head="base",
       overrides=dict(index_kpool=2, kv_source_layers=[0, 1], no_rope_layers=[0, 0]),
       notes="multimodal only: the text model is tested"),
    _f("mixtral", "MixtralForCausalLM", MIXTRAL, aux_loss=True),
    _f("muse_spark", "MuseSparkTextModel", Gate(
        path="mlp.gate", experts="mlp.experts", score="sigmoid", normalize=True,
        bias="mlp.gate.e_score_correction_bias", scale="routed_scaling_factor",
        fp32_logits=True,
        notes="logits multiplied by output_multiplier (the returned logits include it); the "
              "experts run in a projected space (pre_expert_proj + norm, post_expert_proj)"),
       config="MuseSparkTextConfig", head="base",
       overrides=dict(moe_hidden_size=32, mlp_layer_types=["dense", "sparse"]),
       notes="multimodal only: the text model is tested"),
    _f("nemotron_h", "NemotronHForCausalLM", DEEPSEEK_V3.but(
        path="mixer.gate", experts="mixer.experts", bias="mixer.gate.e_score_correction_bias",
        notes="the experts run in a latent space (fc1_latent_proj / fc2_latent_proj); shared "
              "experts added"),
       config="NemotronHConfig",
       overrides=dict(ssm_state_size=8, mamba_num_heads=4, mamba_head_dim=8, chunk_size=8,
                      n_groups=1)),
    _f("olmoe", "OlmoeForCausalLM", QWEN, aux_loss=True),
    _f("openai_privacy_filter", "OpenAIPrivacyFilterForTokenClassification", SOFTMAX_TOPK.but(
        scale="1/top_k", post_scale="num_experts", fp32_logits=True,
        notes="router has a bias and computes in float32; weights divided by top_k, the "
              "experts' output multiplied by num_experts"),
       config="OpenAIPrivacyFilterConfig", head="token_classification",
       upstream={"router_logits": "OpenAIPrivacyFilterForTokenClassification accepts "
                                  "output_router_logits=True but its TokenClassifierOutput drops "
                                  "the router logits (and any aux loss)"},
       notes="bidirectional token classifier: no causal LM"),
    _f("phimoe", "PhimoeForCausalLM", Gate(
        path="mlp.router", experts="mlp.experts", score="sparsemixer", normalize=False,
        selection="sparsemixer",
        jitter="input_jitter_noise (input), router_jitter_noise (sparsemixer), training only",
        notes="sparsemixer: sequential top-2 with a jitter-masked softmax per pick"),
       aux_loss=True),
    _f("qwen2_moe", "Qwen2MoeForCausalLM", QWEN.but(
        notes="shared expert scaled by sigmoid(shared_expert_gate)"), aux_loss=True,
       overrides=dict(mlp_only_layers=[0])),
    _f("qwen3_5_moe", "Qwen3_5MoeForCausalLM", QWEN.but(
        normalize=True, notes="shared expert scaled by sigmoid(shared_expert_gate)"),
       config="Qwen3_5MoeTextConfig", aux_loss=True,
       overrides=dict(layer_types=_LINEAR_ATTN)),
    _f("qwen3_moe", "Qwen3MoeForCausalLM", QWEN, aux_loss=True,
       overrides=dict(mlp_only_layers=[0])),
    _f("qwen3_next", "Qwen3NextForCausalLM", QWEN.but(
        notes="shared expert scaled by sigmoid(shared_expert_gate)"), aux_loss=True,
       overrides=dict(layer_types=_LINEAR_ATTN, mlp_only_layers=[0])),
    _f("qwen3_omni_moe", "Qwen3OmniMoeThinkerTextModel", QWEN,
       config="Qwen3OmniMoeTextConfig", head="base", overrides=dict(mlp_only_layers=[0]),
       notes="multimodal only: the thinker's text model is tested (the talker has the same "
             "experts class)"),
    _f("qwen3_vl_moe", "Qwen3VLMoeTextModel", QWEN.but(normalize=True),
       config="Qwen3VLMoeTextConfig", head="base", overrides=dict(mlp_only_layers=[0]),
       notes="multimodal only: the text model is tested"),
    _f("qwen4_exp", "Qwen4ExpForCausalLM", QWEN.but(
        notes="shared expert scaled by sigmoid(shared_expert_gate)"),
       config="Qwen4ExpTextConfig", aux_loss=True,
       overrides=dict(layer_types=["linear_attention", "indexed_attention"], indexer_n_heads=2,
                      indexer_kv_heads=1, indexer_head_dim=8, indexer_budget=4,
                      indexer_compress_ratio=2, hc_count=2, hc_lowrank=8, mlp_only_layers=[0],
                      ple_layer_ids=[1], ple_embed_dim=16, ple_conv_kernel_size=2, ngram_size=3,
                      heads_per_ngram=2, ngram_vocab_size_base=31,
                      make_ngram_vocab_size_divisible_by=8, split_ngram_parts=4)),
    _f("solar_open", "SolarOpenForCausalLM", DEEPSEEK_V3),
    _f("unlimited_ocr", "UnlimitedOcrTextModel", DEEPSEEK_V2, config="UnlimitedOcrTextConfig",
       head="base", notes="multimodal only: the text model is tested"),
    _f("zaya", "ZayaForCausalLM", Gate(
        path="mlp.gate", experts="mlp.experts",
        returns=("logits", "weights", "indices", "router_states"), inputs=("router_states",),
        score="softmax", normalize=False, bias="mlp.gate.balancing_biases", skip_expert=True,
        notes="an MLP router (down_proj, router_mlp) over num_experts + 1 classes, "
              "the last a skip expert; router hidden states carried from layer to layer (EDA)"),
       overrides=dict(num_experts_per_tok=1, router_hidden_size=16),
       notes="top-1 only (the config rejects num_experts_per_tok != 1)"),
]}

#: families of the installed transformers that use the seam but cannot be tested, with the reason
#: (none in transformers 5.24: every one builds tiny, multimodal-only ones through their text model)
EXCLUDED: dict[str, str] = {}

#: transformers issues that are not one family's check, each pinned by a ``test_upstream_*`` test
UPSTREAM_ISSUES: dict[str, str] = {
    "deepseek_v4": "with output_router_logits=True and no top-k ('moe') layer, e.g. <= 3 layers "
                   "with the default mlp_layer_types (all 'hash_moe'), no router logits are "
                   "recorded and load_balancing_loss_func indexes the empty tuple (IndexError)",
}


# ----- discovery -------------------------------------------------------------------------------
def seam_families() -> list[str]:
    """Every ``model_type`` of the installed transformers whose ``modeling_<type>.py`` decorates
    an experts class with ``@use_experts_implementation`` (sorted)."""
    import transformers

    models = Path(transformers.__file__).parent / "models"
    return sorted(path.parent.name for path in models.glob("*/modeling_*.py")
                  if path.name == f"modeling_{path.parent.name}.py"
                  and SEAM_DECORATOR in path.read_text(encoding="utf-8"))


# ----- docs page -------------------------------------------------------------------------------
DOCS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "hf-families.md"
TABLE_BEGIN = "<!-- BEGIN hf-families table (python tests/hf_families.py) -->"
TABLE_END = "<!-- END hf-families table -->"
#: the experts-implementation column, until a family-specific finding replaces it
EXPERTS_IMPLEMENTATION = "eager = grouped_mm = batched_mm = moe_router"
#: families whose gate ``replace_routers`` / ``set_strategy`` refuses (an ``InputError`` whose
#: message matches the value), and why; ``tests/torch/test_hf_router_families.py`` checks both
#: the refusals and that every other family is reproduced exactly and routes dynamically
ROUTER_REFUSED: dict[str, tuple[str, str]] = {
    "deepseek_v4": ("needs the input 'input_ids'", "hash routing by token id"),
    "diffusion_gemma": ("not understood", "the router returns probabilities with per-expert "
                        "scales, not logits"),
    "gemma4": ("not understood", "the router returns probabilities with per-expert scales, "
               "not logits"),
    "inkling": ("returns tuple", "the gate returns 4 values (shared-expert weights)"),
    "openai_privacy_filter": ("not understood", "softmax over the selected logits divided by "
                              "top_k"),
    "phimoe": ("not understood", "sparsemixer selection"),
    "zaya": ("returns tuple", "the gate returns 4 values and carries router state between "
             "layers"),
}
ROUTER_OK = "yes (verified on a probe)"
DYNAMIC_OK = "top_p, threshold, ... (moe_router experts)"


def _score(gate: Gate) -> str:
    score = gate.score.replace("config:", "config ")
    if gate.normalize is True:
        score += ", renormalised"
    elif isinstance(gate.normalize, str):
        score += f", renormalised if {gate.normalize}"
    return score


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_rows() -> list[str]:
    """The rows of the docs table, one per seam family (tested, then excluded), sorted."""
    header = ("| family | state | model tested | gate | returns | score | bias | selection | "
              "scale | experts implementation | static top-k parity | dynamic strategies |")
    rule = "|" + "---|" * (header.count("|") - 1)
    rows = [header, rule]
    names = sorted(set(FAMILIES) | set(EXCLUDED))
    for name in names:
        if name in FAMILIES:
            fam = FAMILIES[name]
            g = fam.gate
            scale = g.scale or ""
            if g.post_scale:
                scale = (scale + "; " if scale else "") + f"output × {g.post_scale}"
            cells = [
                f"`{name}`", "tested" if fam.head != "base" else "tested (text model)",
                f"`{fam.model_class}`", f"`{g.path}`", ", ".join(g.returns), _score(g),
                f"`{g.bias.rsplit('.', 1)[-1]}` ({g.bias_on})" if g.bias else "",
                g.selection, scale, EXPERTS_IMPLEMENTATION,
                *((f"refused: {ROUTER_REFUSED[name][1]}", "no") if name in ROUTER_REFUSED
                  else (ROUTER_OK, DYNAMIC_OK))]
        else:
            cells = [f"`{name}`", f"excluded: {EXCLUDED[name]}", "", "", "", "", "", "", "",
                     "", "", ""]
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def note_lines() -> list[str]:
    """Per-family remarks (family and gate notes, jitter, float32 handling), then the known
    transformers issues, as Markdown."""
    lines = ["", "### Family notes", ""]
    for name in sorted(FAMILIES):
        fam, g = FAMILIES[name], FAMILIES[name].gate
        parts = [p for p in (fam.notes, g.notes) if p]
        if g.inputs:
            parts.append("gate inputs after the hidden states: " + ", ".join(g.inputs))
        if g.jitter:
            parts.append(f"jitter: {g.jitter}")
        dtypes = {(True, True): "float32 logits and weights", (True, False): "float32 logits",
                  (False, True): "float32 weights"}.get((g.fp32_logits, g.weights_fp32))
        if dtypes:
            parts.append(f"in a bfloat16 model: {dtypes}")
        if g.skip_expert:
            parts.append("skip expert (weight 0, index 0)")
        if fam.head == "base":
            parts.append("router logits (the text model computes no loss)")
        else:
            parts.append("aux loss added to the loss" if fam.aux_loss
                         else "router logits only (no aux loss)")
        lines.append(f"- `{name}`: " + "; ".join(parts) + ".")
    upstream = [(name, check, reason) for name in sorted(FAMILIES)
                for check, reason in FAMILIES[name].upstream.items()]
    upstream += [(name, "other", reason) for name, reason in sorted(UPSTREAM_ISSUES.items())]
    lines += ["", "### Known transformers issues (expected failures)", ""]
    lines += [f"- `{name}` ({check}): {reason}." for name, check, reason in upstream] or ["- none"]
    lines += ["", "### Excluded families", ""]
    lines += [f"- `{name}`: {why}." for name, why in sorted(EXCLUDED.items())] or [
        "- none: every seam family of the installed transformers is tested"]
    return lines


def render_table() -> str:
    return "\n".join([TABLE_BEGIN, *table_rows(), *note_lines(), TABLE_END])


def write_docs(page: Path = DOCS_PAGE) -> bool:
    """Rewrite the table between the markers of ``page``; True when it changed."""
    text = page.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(TABLE_BEGIN) + ".*?" + re.escape(TABLE_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{page}: table markers not found")
    new = pattern.sub(lambda _: render_table(), text)
    if new != text:
        page.write_text(new, encoding="utf-8")
    return new != text


if __name__ == "__main__":
    print(("rewrote " if write_docs() else "up to date: ") + str(DOCS_PAGE))
