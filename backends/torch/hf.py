"""Hugging Face drop-in: build a :class:`~moe_router_backends.torch.layers.MoE` equal to a
transformers v5 MoE block, swap blocks in a model, and switch a model's routing strategy in one
call.

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

What a replaced block (:class:`HFBlockMoE`, a :class:`MoE`) keeps of the original:

- **Router precision** (``router_dtype=None``, the default): the router logits are computed by
  transformers' own expression, ``F.linear(x, W)`` in the model's dtype (Mixtral, Qwen2/3-MoE,
  OLMoE: bfloat16 logits in a bfloat16 model) or ``F.linear(x.float(), W.float())``
  (DeepSeek-V3), and while the routing is the block's own (no strategy change) the experts are
  chosen by transformers' own ``torch.topk`` expression (same tie order), so a bfloat16 model
  picks exactly the experts transformers picks from the same hidden states. DeepSeek-V3's router
  weight and ``e_score_correction_bias`` stay float32 whatever the model is cast to (as
  ``from_pretrained`` keeps them, ``_keep_in_fp32_modules_strict``). ``router_dtype="float32"``
  uses this library's router instead: float32 logits (outside autocast) from the weight in its
  own dtype and the library's selection (ties to the lower expert index): more accurate in
  bfloat16, not bit-identical to transformers. Either way the expert FFNs run on this library's
  kernels, whose bfloat16 rounding differs from transformers' per-expert loop (float32: equal
  within 1e-5), so deeper layers see slightly different hidden states.
- **Jitter**: Mixtral's ``router_jitter_noise`` multiplies the block input by
  ``U(1 - j, 1 + j)`` in training mode, drawn exactly as transformers draws it (same generator,
  shape and dtype), so a training step with the same seed matches.
- **Names** (``state_dict`` / ``save_pretrained`` / ``load_state_dict``): the layer's state dict
  uses the family's transformers names and layouts (``gate.weight`` ``(E, D)``,
  ``experts.gate_up_proj`` ``(E, 2F, D)``, ``experts.down_proj`` ``(E, D, F)``,
  ``gate.e_score_correction_bias``, ``shared_expert(s).*``, ``shared_expert_gate.weight``), so a
  stock ``from_pretrained`` of a saved replaced model loads every weight. The routing settings
  and the controller state (``router.state``: top-p controller, complexity calibration) are not
  saved (transformers has no place for them; read them with ``layer.export_state()``); loading
  a state dict without ``router.state`` restarts the controller. ``load_state_dict`` accepts both
  the transformers names and the library's own (older checkpoints). A layer whose tensors no
  longer fit the family's layout makes ``state_dict()`` (so ``save_pretrained``) raise
  :class:`~moe_router.errors.InputError` instead of writing keys stock loading would drop.
- **Initialization**: replacing draws no random numbers and builds the layer from the block's
  tensors (on their device: the meta device too); the model's ``_init_weights`` learns the
  replaced layers (the family's normal(``initializer_range``) init, zero bias, fresh state), so
  ``init_weights()`` after ``to_empty`` initializes them.

Router logits keep flowing to the model's own ``output_router_logits`` / aux loss: the new
router module gets the same output-capturing hook the replaced one had (its output has
transformers' dtype with the default ``router_dtype``).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_router.config import MoEConfig, RouterConfig
from moe_router.errors import ConfigError, InputError, InputTypeError
from moe_router.layer.state import ROUTER_STATE, initial_state_arrays
from moe_router.weights import weight_shapes

from .layers import MoE, Router, _LayerStages
from .model import moe_layers

_LOG = logging.getLogger("moe_router")

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
#: RouterConfig fields that decide which experts a token gets: while they equal the block's
#: own, a default (``router_dtype=None``) layer selects with transformers' expression
_SELECTION_FIELDS = ("strategy", "k", "max_experts", "score_func", "normalize_weights",
                     "capacity_factor", "num_null_experts", "use_expert_bias", "num_groups",
                     "topk_groups", "route_scale", "noise", "balanced_debug")


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


# ----- transformers' names and layouts ----------------------------------------------------------
#: persistent state transformers has no place for: left out of the state dict (not saved)
_NOT_SAVED = (ROUTER_STATE,)


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


class HFRouter(Router):
    """The router of a replaced block: ``mode`` ``"linear"`` computes transformers'
    ``F.linear(x, W)`` in ``x``'s dtype (Mixtral, Qwen2/3-MoE, OLMoE), ``"linear_float32"``
    ``F.linear(x.float(), W.float())`` (DeepSeek-V3), ``None`` the library's float32 logits
    (``router_dtype="float32"``)."""

    mode: str | None = None

    def forward(self, x_TD: torch.Tensor, config: MoEConfig) -> torch.Tensor:
        mode = self.mode
        if mode is None or config.router_bias or config.router.num_null_experts:
            return super().forward(x_TD, config)
        weight_ED = self.weight.t()  # contiguous: transformers' own (E, D) layout
        if mode == "linear_float32":
            return F.linear(x_TD.float(), weight_ED.float())
        return F.linear(x_TD, weight_ED if weight_ED.dtype == x_TD.dtype
                        else weight_ED.to(x_TD.dtype))


class _HFStages(_LayerStages):
    """A replaced block's stages: the router's logits upcast to float32 (exact), and
    transformers' own selection while the routing is the block's own (``router_dtype=None``):
    directly at inference, as forced experts of the plan otherwise (training, plans)."""

    def __init__(self, router: Router, layout: HFLayout) -> None:
        super().__init__(router)
        self.layout = layout

    def router_logits(self, x_TD: torch.Tensor, params: Mapping[str, torch.Tensor],
                      config: MoEConfig) -> torch.Tensor:
        return self.router(x_TD, config).float()

    def _parity(self, config: RouterConfig) -> bool:
        own = self.layout.router
        return self.layout.router_dtype is None and all(
            getattr(config, name) == getattr(own, name) for name in _SELECTION_FIELDS)

    def fast_select(self, logits_TE: torch.Tensor, config: RouterConfig,
                    route_kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._parity(config):
            return super().fast_select(logits_TE, config, route_kwargs)
        if route_kwargs.get("mask_T") is not None:
            return None
        return self.layout.select(logits_TE, route_kwargs.get("expert_bias_E"))

    def route(self, logits_TE: torch.Tensor, config: RouterConfig, **kwargs: Any) -> Any:
        if self._parity(config) and kwargs.get("forced_experts_TK") is None:
            kwargs["forced_experts_TK"] = self.layout.select(
                logits_TE, kwargs.get("expert_bias_E"))[0]
        return super().route(logits_TE, config, **kwargs)


class HFBlockMoE(MoE):
    """A :class:`MoE` made from a transformers block (:func:`from_hf_block`,
    :func:`replace_moe_blocks`): transformers' router precision and selection (by default),
    Mixtral's training jitter, and transformers' names in ``state_dict`` / ``load_state_dict``
    (see the module docstring). ``hf_layout`` describes the origin."""

    _router_class = HFRouter

    @property
    def hf_layout(self) -> HFLayout:
        """The :class:`HFLayout` of the replaced block."""
        return self.__dict__["_hf"]

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """:meth:`MoE.forward`, after Mixtral's training jitter of the input (transformers'
        ``hidden_states *= torch.empty_like(hidden_states).uniform_(1 - j, 1 + j)``)."""
        jitter = self.hf_layout.jitter
        if jitter > 0 and self.training and isinstance(x, torch.Tensor):
            x = x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter)
        return super().forward(x, **kwargs)

    def _kept_dtypes(self) -> dict[str, torch.dtype]:
        kept = super()._kept_dtypes()
        layout = self.__dict__.get("_hf")
        if layout is not None and layout.family == "deepseek_v3":
            kept["router.weight"] = torch.float32  # _keep_in_fp32_modules_strict
        return kept

    def _stages(self) -> _HFStages:
        stages = self.__dict__.get("_stage_cache")
        if not isinstance(stages, _HFStages) or stages.router is not self.router:
            stages = self.__dict__["_stage_cache"] = _HFStages(self.router, self.hf_layout)
        return stages

    # ----- transformers' names ---------------------------------------------------------------
    def state_dict(self, *args: Any, destination: Any = None, prefix: str = "",
                   keep_vars: bool = False) -> Any:
        """The state dict in transformers' names and layouts (``router.state`` left out: see
        the module docstring).

        Raises:
            InputError: a tensor no longer fits the family's layout (then ``save_pretrained``
                refuses too, instead of writing keys a stock load would drop).
        """
        if args:  # torch's deprecated positional form (destination, prefix, keep_vars)
            destination, prefix, keep_vars = (*args, *(destination, prefix, keep_vars)[len(args):])
        out = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        layout = self.hf_layout
        ours = list(weight_shapes(self.config))
        unmapped = sorted(set(ours) - layout.portable_names() - set(_NOT_SAVED))
        values = {name: out.pop(prefix + name) for name in ours if prefix + name in out}
        for name in _NOT_SAVED:
            values.pop(name, None)
        problem = f"{unmapped} have no place in it" if unmapped else None
        if problem is None:
            with torch.set_grad_enabled(keep_vars and torch.is_grad_enabled()):
                hf = layout.to_hf(values)
            for hf_name, _, _, shape in layout.tensors:
                if tuple(hf[hf_name].shape) != shape:
                    problem = (f"{hf_name} would have shape {tuple(hf[hf_name].shape)}, "
                               f"expected {shape}")
                    break
        if problem is not None:
            raise InputError("state_dict", f"{prefix.rstrip('.') or 'the layer'} (a replaced "
                             f"{layout.block}) no longer fits transformers' {layout.family} "
                             f"layout: {problem}; a stock from_pretrained would drop it. Keep "
                             "it with layer.export_weights() / export_state() instead")
        for hf_name, _, _, _ in layout.tensors:
            out[prefix + hf_name] = hf[hf_name]
        return out

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        """Accept transformers' names (converted here, in place, before the children load)
        next to the library's own; without ``router.state`` the controller restarts."""
        layout, error_msgs = self.hf_layout, args[-1]
        found = [entry for entry in layout.tensors if prefix + entry[0] in state_dict]
        if found:
            for hf_name, _, _, _ in found:
                converted = layout.from_hf(hf_name, state_dict.pop(prefix + hf_name), prefix)
                if isinstance(converted, str):
                    error_msgs.append(converted)
                    continue
                for name, value in converted.items():
                    state_dict[prefix + name] = value
            if prefix + ROUTER_STATE not in state_dict:
                state_dict[prefix + ROUTER_STATE] = torch.from_numpy(
                    initial_state_arrays(self.config)[ROUTER_STATE])
        super()._load_from_state_dict(state_dict, prefix, *args)

    @torch.no_grad()
    def _init_hf(self, std: float) -> None:
        """The family's initialization: normal(0, ``std``) weights (those transformers has not
        marked initialized), zero expert bias, fresh state."""
        for param in self.parameters():
            if not getattr(param, "_is_hf_initialized", False):
                param.normal_(0.0, std)
        if self.config.router.use_expert_bias:
            self.router.expert_bias.zero_()
        self.reset_router_state()
        self.reset_observers()

    def extra_repr(self) -> str:
        layout = self.hf_layout
        return (f"{super().extra_repr()}, from={layout.block}, "
                f"router_dtype={layout.router_dtype!r}")


def _conversion(block: nn.Module, router_dtype: str | None,
                router_overrides: Mapping[str, Any]) -> tuple[str, MoEConfig, HFLayout]:
    """Everything :func:`from_hf_block` checks, without touching the tensors."""
    if router_dtype not in ROUTER_DTYPES:
        raise ConfigError("router_dtype", router_dtype, "None (transformers' router precision "
                          "and selection) or 'float32' (this library's float32 router)")
    family = _family(block)
    config = hf_config(block)
    layout = _layout(block, family, config, router_dtype)
    if router_overrides:
        new = config.with_router(**_router_changes(config.router, router_overrides))
        if weight_shapes(new) != weight_shapes(config):
            raise InputError("router_overrides", f"{sorted(router_overrides)} would change the "
                             "layer's weight shapes")
        config = new
    return family, config, layout


def from_hf_block(block: nn.Module, *, router_dtype: str | None = None,
                  **router_overrides: Any) -> HFBlockMoE:
    """A :class:`MoE` (an :class:`HFBlockMoE`) computing what ``block`` computes, built from a
    copy of the block's tensors on their device (the meta device too) in their dtypes: no random
    initialization, no draw from any random generator.

    ``router_dtype``: ``None`` (default) computes the router logits and, while the routing is the
    block's own, the selection exactly as transformers does for the family (bfloat16 logits in a
    bfloat16 Mixtral/Qwen/OLMoE model; float32 for DeepSeek-V3); ``"float32"`` uses this
    library's float32 router (more accurate, not bit-identical). ``router_overrides`` change the
    routing right away (e.g. ``strategy="top_p"``), checked and completed like the changes of
    :func:`set_strategy`.

    Raises:
        InputTypeError: ``block`` is not a supported block.
        InputError: its experts' activation or tensors are not supported, or the overrides
            would change the weight shapes.
        ConfigError: an invalid ``router_dtype`` or override.
    """
    family, config, layout = _conversion(block, router_dtype, router_overrides)
    layer = HFBlockMoE.from_tensors(config, _block_tensors(block, config, family))
    layer.__dict__["_hf"] = layout
    if router_dtype is None:
        layer.router.mode = "linear_float32" if family == "deepseek_v3" else "linear"
    sources = hf_weights(block, config)
    for name, param in layer.named_parameters():
        param.requires_grad_(sources[name].requires_grad)
    if getattr(block, "_is_hf_initialized", False):  # transformers' init_weights skips it
        layer._is_hf_initialized = True
    return layer.train(block.training)


class _InitWeights:
    """A transformers model's ``_init_weights`` after :func:`replace_moe_blocks`: the model's
    own, then the family's initialization of the replaced layers, so that ``init_weights()`` /
    ``initialize_weights()`` (e.g. after building on the meta device and ``to_empty``) reach
    them. Set on the model instance; plain data (pickles and deep-copies with the model)."""

    def __init__(self, model: nn.Module, inner: Any = None) -> None:
        self.model = model
        self.inner = inner  # an instance-level _init_weights set before ours, if any

    def __call__(self, module: nn.Module) -> None:
        if self.inner is not None:
            self.inner(module)
        else:
            type(self.model)._init_weights(self.model, module)
        if isinstance(module, HFBlockMoE):
            config = getattr(self.model, "config", None)
            std = getattr(config, "initializer_range", None)
            module._init_hf(0.02 if std is None else float(std))


def _teach_init_weights(model: nn.Module) -> None:
    """Install :class:`_InitWeights` on every transformers model (``PreTrainedModel``: found by
    its ``_init_weights`` / ``_initialize_weights`` methods) of ``model``."""
    for module in model.modules():
        if not (callable(getattr(type(module), "_init_weights", None))
                and callable(getattr(module, "_initialize_weights", None))):
            continue
        current = module.__dict__.get("_init_weights")
        if not isinstance(current, _InitWeights):
            module.__dict__["_init_weights"] = _InitWeights(module, current)


def _install_router_logits_hook(model: nn.Module, layer: MoE) -> None:
    """Let ``output_router_logits`` see our router, as it saw the replaced block's gate."""
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:  # another transformers version: logits capture is then not wired
        return
    recorders = getattr(model, "_can_record_outputs", None) or {}
    if "router_logits" in recorders:
        install_output_capuring_hook(layer.router, "router_logits", 0)


#: class names that look like a MoE block (to name the unsupported ones in an error)
_MOE_LIKE = re.compile(r"(?i)(sparsemoeblock|moe(block|layer)?)$")


def _check_block(model: nn.Module, name: str, router_dtype: str | None,
                 router_overrides: Mapping[str, Any]) -> None:
    """:func:`_conversion` of the block at ``name``; a problem of the block names its path."""
    block = model.get_submodule(name)
    try:
        _conversion(block, router_dtype, router_overrides)
    except InputError as err:
        if err.argument != "block":
            raise
        raise InputError("model", f"{name} ({type(block).__name__}): {err.problem}") from err


def replace_moe_blocks(model: nn.Module, *, allow_none: bool = False,
                       router_dtype: str | None = None, **router_overrides: Any) -> int:
    """Swap every supported Hugging Face MoE block of ``model`` for a :class:`MoE`
    (:func:`from_hf_block`), in place.

    Returns how many blocks were replaced. Outputs are unchanged (same weights, routing
    convention and, by default, router precision and selection; see the module docstring)
    unless ``router_overrides`` are given. Draws no random numbers and works on the meta device;
    the model's ``state_dict`` / ``save_pretrained`` keep transformers' names and its
    ``_init_weights`` learns the new layers.

    Raises:
        InputError: naming ``model``, when it has no supported block (say a Phi-MoE model, or
            a module without MoE blocks), unless ``allow_none=True`` (then 0 is returned).
    """
    targets = [name for name, module in model.named_modules()
               if type(module).__name__ in SUPPORTED_BLOCKS]
    if not targets and not allow_none:
        others = sorted({type(m).__name__ for m in model.modules()
                         if _MOE_LIKE.search(type(m).__name__) and not isinstance(m, MoE)})
        found = f"; it has unsupported MoE blocks: {', '.join(others)}" if others else ""
        raise InputError("model", f"has no supported Hugging Face MoE block (supported: "
                         f"{', '.join(SUPPORTED_BLOCKS)}){found}; nothing was replaced "
                         "(pass allow_none=True to accept that)")
    for name in targets:  # every block checked before any is swapped
        _check_block(model, name, router_dtype, router_overrides)
    for name in targets:  # one block at a time: its tensors are freed once it is swapped
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = from_hf_block(getattr(parent, child), router_dtype=router_dtype,
                              **router_overrides)
        _install_router_logits_hook(model, layer)
        setattr(parent, child, layer)
    if targets:
        _teach_init_weights(model)
    return len(targets)


def _router_changes(router: RouterConfig, changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` with, for a new ``strategy`` without an explicit ``normalize_weights``, the
    weights' normalization reset to the strategy's default (``None``). Unknown fields are
    refused by ``RouterConfig.replace`` (:class:`~moe_router.errors.UnknownFieldError`)."""
    out = dict(changes)
    if ("strategy" in out and out["strategy"] != router.strategy
            and "normalize_weights" not in out):
        out["normalize_weights"] = None
    return out


def set_strategy(model: nn.Module, **router_changes: Any) -> int:
    """Change the routing of every :class:`MoE` in ``model`` (after ``replace_moe_blocks``), or,
    in a transformers model without our layers, route every experts-seam block's gate with our
    router (:func:`~moe_router_backends.torch.hf_router.replace_routers`: the gate keeps its
    parameters; a strategy that can leave slots unused switches the model to the
    ``"moe_router"`` experts implementation, which is logged).

    Example: ``set_strategy(model, strategy="top_p", top_p=0.5, max_experts=4)``.

    - A new ``strategy`` resets ``normalize_weights`` to that strategy's default (``None``:
      ``top_k`` renormalizes, ``top_p`` does not), since a converted Mixtral block says
      ``normalize_weights=True`` for its top-k; pass ``normalize_weights`` to choose.
    - Every layer's router state is reset: the new routing starts with a fresh controller
      (calibrate it again with :func:`~moe_router_backends.torch.model.calibrate`).
    - Changes that would alter the weight shapes (e.g. ``num_null_experts``) are refused, and
      nothing is changed when any layer refuses.

    Returns the number of layers changed.

    Raises:
        UnknownFieldError: a name that is no RouterConfig field (lists the valid ones; also a
            ``TypeError``).
        ConfigError: an invalid value.
        InputError: the change would alter the weight shapes.
    """
    layers = moe_layers(model)
    if not layers:
        from .hf_router import replace_routers

        result = replace_routers(model, **router_changes)
        if result["experts_implementation"]:
            _LOG.info("set_strategy: %d gates routed by moe_router; experts implementation "
                      "switched to %r (it skips unused slots)", result["blocks"],
                      result["experts_implementation"])
        return int(result["blocks"])
    configs = []
    for layer in layers:
        new = layer.config.with_router(**_router_changes(layer.config.router, router_changes))
        if weight_shapes(new) != weight_shapes(layer.config):
            raise InputError("router_changes", f"{sorted(router_changes)} would change the "
                             "layer's weight shapes; build a new layer instead")
        configs.append(new)
    for layer, new in zip(layers, configs):
        layer.config = new
        layer.reset_router_state()
    return len(layers)
