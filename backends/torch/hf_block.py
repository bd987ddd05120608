"""The layer a replaced Hugging Face block becomes: :class:`HFBlockMoE` (a
:class:`~moe_router_backends.torch.layers.MoE`) with its router (:class:`HFRouter`) and stages,
built by :func:`~moe_router_backends.torch.hf.from_hf_block` from the block's
:class:`~moe_router_backends.torch.hf_layout.HFLayout`.

What a replaced block keeps of the original:

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
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from moe_router.config import MoEConfig, RouterConfig
from moe_router.errors import InputError
from moe_router.layer.state import ROUTER_STATE, initial_state_arrays
from moe_router.weights import weight_shapes

from .hf_layout import HFLayout
from .layers import MoE, Router, _LayerStages

#: RouterConfig fields that decide which experts a token gets: while they equal the block's
#: own, a default (``router_dtype=None``) layer selects with transformers' expression
_SELECTION_FIELDS = ("strategy", "k", "max_experts", "score_func", "normalize_weights",
                     "capacity_factor", "num_null_experts", "use_expert_bias", "num_groups",
                     "topk_groups", "route_scale", "noise", "balanced_debug")
#: persistent state transformers has no place for: left out of the state dict (not saved)
_NOT_SAVED = (ROUTER_STATE,)


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
    """A :class:`MoE` made from a transformers block (:func:`~.hf.from_hf_block`,
    :func:`~.hf.replace_moe_blocks`): transformers' router precision and selection (by default),
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
