"""Hugging Face block conversion: recognize a transformers v5 MoE block's family and describe it
in this library's terms: its :class:`~moe_router.config.MoEConfig` (:func:`hf_config`), its
tensors in the portable layout (:func:`hf_weights`), and an :class:`HFLayout` (the block's
transformers names and layouts, and its own expert selection), used by
:mod:`~moe_router_backends.torch.hf` and :mod:`~moe_router_backends.torch.hf_block`.

Supported blocks (transformers 5.x) and their routing conventions:

=========================  ==========================================================
``MixtralSparseMoeBlock``  softmax, top-k, renormalized; ``router_jitter_noise`` (training)
``Qwen2MoeSparseMoeBlock`` softmax, top-k, ``norm_topk_prob`` (False by default),
                           shared expert scaled by sigmoid(``shared_expert_gate``)
``Qwen3MoeSparseMoeBlock`` softmax, top-k, ``norm_topk_prob``
``OlmoeSparseMoeBlock``    softmax, top-k, ``norm_topk_prob``
``DeepseekV3MoE``          sigmoid + ``e_score_correction_bias`` (selection only) + group
                           limit (``n_group`` / ``topk_group``, masked with -inf as in
                           transformers 5.23) + ``norm_topk_prob`` + ``routed_scaling_factor``;
                           ungated shared experts
=========================  ==========================================================
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from moe_router.config import MoEConfig, RouterConfig
from moe_router.errors import InputError, InputTypeError

#: class name of the supported blocks -> short family name
SUPPORTED_BLOCKS = {
    "MixtralSparseMoeBlock": "mixtral",
    "Qwen2MoeSparseMoeBlock": "qwen2_moe",
    "Qwen3MoeSparseMoeBlock": "qwen3_moe",
    "OlmoeSparseMoeBlock": "olmoe",
    "DeepseekV3MoE": "deepseek_v3",
}
_ACTIVATIONS = {"SiLUActivation": "swiglu", "SiLU": "swiglu", "GELUActivation": "geglu",
                "GELU": "geglu"}
#: values of ``router_dtype``
ROUTER_DTYPES = (None, "float32")


def _activation(act_fn: nn.Module) -> str:
    name = type(act_fn).__name__
    if name not in _ACTIVATIONS:
        raise InputError("block.experts.act_fn", f"{name} is not supported; expected SiLU "
                         "(swiglu) or exact GELU (geglu) experts")
    return _ACTIVATIONS[name]


def _router_config(block: nn.Module, family: str, num_experts: int) -> RouterConfig:
    gate = block.gate
    k = int(gate.top_k)
    if family == "mixtral":
        return RouterConfig(num_experts=num_experts, k=k, normalize_weights=True)
    if family == "deepseek_v3":
        groups, topk_groups = int(gate.num_group), int(gate.topk_group)
        allowed = topk_groups * (num_experts // groups)
        if groups > 1 and topk_groups < groups and allowed < k < num_experts:
            raise InputError("block", f"DeepseekV3MoE with n_group={groups}, topk_group="
                             f"{topk_groups} keeps {allowed} experts but selects k={k} of "
                             f"{num_experts}: transformers then fills the other slots with "
                             "experts of the masked groups in torch.topk's tie order among "
                             "-inf scores (device-dependent); not supported")
        # the group limit changes nothing when every group is kept or every expert is chosen
        # (transformers' own test config: 8 experts, n_group=2, topk_group=1, k=8)
        limited = groups > 1 and topk_groups < groups and k < num_experts
        return RouterConfig(num_experts=num_experts, k=k, score_func="sigmoid",
                            normalize_weights=bool(gate.norm_topk_prob), use_expert_bias=True,
                            num_groups=groups if limited else None,
                            topk_groups=topk_groups if limited else None,
                            route_scale=float(gate.routed_scaling_factor))
    return RouterConfig(num_experts=num_experts, k=k,
                        normalize_weights=bool(getattr(gate, "norm_topk_prob", False)))


def _shared(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return shared, getattr(block, "shared_expert_gate", None)


def _family(block: nn.Module) -> str:
    family = SUPPORTED_BLOCKS.get(type(block).__name__)
    if family is None:
        raise InputTypeError("block", f"{type(block).__name__} is not a supported MoE block; "
                             f"supported: {', '.join(SUPPORTED_BLOCKS)}")
    return family


def hf_config(block: nn.Module) -> MoEConfig:
    """The :class:`MoEConfig` equal to a supported Hugging Face MoE block."""
    family = _family(block)
    experts = block.experts
    E, two_F, D = experts.gate_up_proj.shape
    shared, shared_gate = _shared(block)
    return MoEConfig(d_model=int(D), d_ff=int(two_F) // 2,
                     router=_router_config(block, family, int(E)),
                     activation=_activation(experts.act_fn),
                     shared_d_ff=None if shared is None else int(shared.up_proj.weight.shape[0]),
                     shared_expert_gate=shared_gate is not None)


def hf_weights(block: nn.Module, config: MoEConfig) -> dict[str, torch.Tensor]:
    """The block's weights in the portable layout (transposed views, no copies)."""
    experts = block.experts
    F_ = config.d_ff
    gate_up = experts.gate_up_proj  # (E, 2F, D): rows [:F] gate, [F:] up
    weights = {
        "router.weight": block.gate.weight.t(),
        "experts.w_gate": gate_up[:, :F_, :].transpose(1, 2),
        "experts.w_up": gate_up[:, F_:, :].transpose(1, 2),
        "experts.w_down": experts.down_proj.transpose(1, 2),
    }
    if config.router.use_expert_bias:
        weights["router.expert_bias"] = block.gate.e_score_correction_bias
    shared, shared_gate = _shared(block)
    if shared is not None:
        weights["shared.w_gate"] = shared.gate_proj.weight.t()
        weights["shared.w_up"] = shared.up_proj.weight.t()
        weights["shared.w_down"] = shared.down_proj.weight.t()
    if shared_gate is not None:
        weights["shared.gate"] = shared_gate.weight.t()
    return weights


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """What a replaced block keeps of its transformers origin (plain data: pickles, copies).

    Attributes:
        family: short family name (``SUPPORTED_BLOCKS`` values).
        block: the transformers class name.
        router_dtype: ``None`` (transformers' router expression and selection) or ``"float32"``.
        jitter: Mixtral's ``router_jitter_noise`` (0.0: none).
        tensors: ``(transformers name, portable names, kind, shape)`` per tensor of the block's
            ``state_dict``, in its order; kind: how the transformers tensor is made of the
            portable ones: ``t`` transposed matrix, ``t3`` last two dims transposed, ``same``,
            ``gate_up`` ``(E, 2F, D)`` = ``[w_gate^T | w_up^T]``.
        router: the block's own routing (:class:`RouterConfig`).
        num_group / topk_group: DeepSeek-V3's raw group settings (1 / 1 for the others).
    """

    family: str
    block: str
    router_dtype: str | None
    jitter: float
    tensors: tuple[tuple[str, tuple[str, ...], str, tuple[int, ...]], ...]
    router: RouterConfig
    num_group: int = 1
    topk_group: int = 1

    def portable_names(self) -> set[str]:
        return {name for _, names, _, _ in self.tensors for name in names}

    # the transformers tensors from the portable ones, and back
    def to_hf(self, values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for hf_name, names, kind, _ in self.tensors:
            parts = [values[name] for name in names]
            if kind == "gate_up":
                out[hf_name] = torch.cat([p.transpose(1, 2) for p in parts], dim=1)
            elif kind == "t":
                out[hf_name] = parts[0].t()
            elif kind == "t3":
                out[hf_name] = parts[0].transpose(1, 2)
            else:
                out[hf_name] = parts[0]
        return out

    def from_hf(self, hf_name: str, value: torch.Tensor,
                prefix: str = "") -> dict[str, torch.Tensor] | str:
        """The portable tensors of one transformers tensor, or the reason it does not fit
        (torch's size-mismatch message)."""
        names, kind, shape = next((n, k, s) for h, n, k, s in self.tensors if h == hf_name)
        if tuple(value.shape) != shape:
            return (f"size mismatch for {prefix}{hf_name}: copying a param with shape "
                    f"{tuple(value.shape)} from checkpoint, the shape in current model is "
                    f"{shape}.")
        if kind == "gate_up":
            d_ff = shape[1] // 2
            return {names[0]: value[:, :d_ff, :].transpose(1, 2).contiguous(),
                    names[1]: value[:, d_ff:, :].transpose(1, 2).contiguous()}
        if kind == "t":  # the router keeps transformers' (E, D) storage (see _block_tensors)
            return {names[0]: value.t() if names[0] == "router.weight"
                    else value.t().contiguous()}
        if kind == "t3":
            return {names[0]: value.transpose(1, 2).contiguous()}
        return {names[0]: value}

    # transformers' selection (used while the routing is the block's own, router_dtype=None)
    def select(self, logits_TE: torch.Tensor,
               bias_E: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids_TK, weights_TK)`` exactly as the family's transformers router computes them
        from the float32 (upcast) logits: the same ``torch.topk`` calls, so the same ties."""
        r = self.router
        if self.family != "deepseek_v3":  # Mixtral / Qwen2-MoE / Qwen3-MoE / OLMoE
            probs_TE = torch.softmax(logits_TE, dim=-1)
            weights_TK, ids_TK = torch.topk(probs_TE, r.k, dim=-1)
            if r.normalize_weights:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            return ids_TK, weights_TK
        # DeepseekV3TopkRouter.forward
        scores_TE = logits_TE.sigmoid()
        choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
        E, G = r.num_experts, self.num_group
        if self.topk_group < G:  # else every group is kept: the mask is all ones
            group_TG = choice_TE.view(-1, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            group_idx = torch.topk(group_TG, k=self.topk_group, dim=-1, sorted=False)[1]
            group_mask = torch.zeros_like(group_TG)
            group_mask.scatter_(1, group_idx, 1)
            score_mask = group_mask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            choice_TE = choice_TE.masked_fill(~score_mask.bool(), float("-inf"))
        ids_TK = torch.topk(choice_TE, k=r.k, dim=-1, sorted=False)[1]
        weights_TK = scores_TE.gather(1, ids_TK)
        if r.normalize_weights:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return ids_TK, weights_TK * r.route_scale


def _layout(block: nn.Module, family: str, config: MoEConfig,
            router_dtype: str | None) -> HFLayout:
    """The block's transformers names, checked to be exactly the ones this library maps."""
    shared, shared_gate = _shared(block)
    maps: dict[str, tuple[tuple[str, ...], str]] = {
        "gate.weight": (("router.weight",), "t"),
        "experts.gate_up_proj": (("experts.w_gate", "experts.w_up"), "gate_up"),
        "experts.down_proj": (("experts.w_down",), "t3"),
    }
    if config.router.use_expert_bias:
        maps["gate.e_score_correction_bias"] = (("router.expert_bias",), "same")
    if shared is not None:
        name = "shared_expert" if getattr(block, "shared_expert", None) is shared \
            else "shared_experts"
        for proj, ours in (("gate_proj", "shared.w_gate"), ("up_proj", "shared.w_up"),
                           ("down_proj", "shared.w_down")):
            maps[f"{name}.{proj}.weight"] = ((ours,), "t")
    if shared_gate is not None:
        maps["shared_expert_gate.weight"] = (("shared.gate",), "t")
    stock = block.state_dict(keep_vars=True)
    if set(stock) != set(maps):
        raise InputError("block", f"{type(block).__name__} has the tensors {sorted(stock)}, "
                         f"expected {sorted(maps)}: the replaced layer could not be saved in "
                         "transformers' layout")
    gate = block.gate
    return HFLayout(family=family, block=type(block).__name__, router_dtype=router_dtype,
                    jitter=float(getattr(block, "jitter_noise", 0.0) or 0.0),
                    tensors=tuple((name, *maps[name], tuple(stock[name].shape))
                                  for name in stock),
                    router=config.router, num_group=int(getattr(gate, "num_group", 1)),
                    topk_group=int(getattr(gate, "topk_group", 1)))


def _block_tensors(block: nn.Module, config: MoEConfig, family: str) -> dict[str, torch.Tensor]:
    """Fresh copies of the block's tensors in the portable layout (one copy, no random init).
    The router weight ``(D, E)`` keeps transformers' ``(E, D)`` storage, so ``F.linear`` runs
    the very GEMM transformers runs; DeepSeek-V3's router and bias are float32."""
    contiguous = torch.contiguous_format
    with torch.no_grad():
        tensors = {name: t.detach().clone(memory_format=contiguous)
                   for name, t in hf_weights(block, config).items() if name != "router.weight"}
        weight = block.gate.weight.detach()
        dtype = torch.float32 if family == "deepseek_v3" else weight.dtype
        tensors["router.weight"] = weight.to(dtype=dtype, copy=True).t()
        if "router.expert_bias" in tensors:
            tensors["router.expert_bias"] = tensors["router.expert_bias"].float()
    return tensors
