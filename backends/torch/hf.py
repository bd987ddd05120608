"""Hugging Face drop-in: build a :class:`~moe_router_backends.torch.layers.MoE` equal to a
transformers v5 MoE block, swap blocks in a model, and switch a model's routing strategy in one
call.

Supported blocks (transformers 5.x) and their routing conventions:

=========================  ==========================================================
``MixtralSparseMoeBlock``  softmax, top-k, renormalized
``Qwen2MoeSparseMoeBlock`` softmax, top-k, ``norm_topk_prob`` (False by default),
                           shared expert scaled by sigmoid(``shared_expert_gate``)
``Qwen3MoeSparseMoeBlock`` softmax, top-k, ``norm_topk_prob``
``OlmoeSparseMoeBlock``    softmax, top-k, ``norm_topk_prob``
``DeepseekV3MoE``          sigmoid + ``e_score_correction_bias`` (selection only) + group
                           limit (``n_group`` / ``topk_group``, masked with -inf as in
                           transformers 5.23) + ``norm_topk_prob`` + ``routed_scaling_factor``;
                           ungated shared experts
=========================  ==========================================================

Router logits keep flowing to the model's own ``output_router_logits`` / aux loss: the new
router module gets the same output-capturing hook the replaced one had.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moe_router.config import MoEConfig, RouterConfig
from moe_router.errors import InputError, InputTypeError
from moe_router.weights import weight_shapes

from .layers import MoE
from .model import moe_layers

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
        groups = int(gate.num_group)
        return RouterConfig(num_experts=num_experts, k=k, score_func="sigmoid",
                            normalize_weights=bool(gate.norm_topk_prob), use_expert_bias=True,
                            num_groups=groups if groups > 1 else None,
                            topk_groups=int(gate.topk_group) if groups > 1 else None,
                            route_scale=float(gate.routed_scaling_factor))
    return RouterConfig(num_experts=num_experts, k=k,
                        normalize_weights=bool(getattr(gate, "norm_topk_prob", False)))


def _shared(block: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
    return shared, getattr(block, "shared_expert_gate", None)


def hf_config(block: nn.Module) -> MoEConfig:
    """The :class:`MoEConfig` equal to a supported Hugging Face MoE block."""
    family = SUPPORTED_BLOCKS.get(type(block).__name__)
    if family is None:
        raise InputTypeError("block", f"{type(block).__name__} is not a supported MoE block; "
                             f"supported: {', '.join(SUPPORTED_BLOCKS)}")
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
    F = config.d_ff
    gate_up = experts.gate_up_proj  # (E, 2F, D): rows [:F] gate, [F:] up
    weights = {
        "router.weight": block.gate.weight.t(),
        "experts.w_gate": gate_up[:, :F, :].transpose(1, 2),
        "experts.w_up": gate_up[:, F:, :].transpose(1, 2),
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


def from_hf_block(block: nn.Module, **router_overrides: Any) -> MoE:
    """A :class:`MoE` computing what ``block`` computes (same weights, device and dtype).

    ``router_overrides`` change the routing right away (e.g. ``strategy="top_p"``), checked
    and completed like the changes of :func:`set_strategy`.
    """
    config = hf_config(block)
    if router_overrides:
        config = config.with_router(**_router_changes(config.router, router_overrides))
    weights = hf_weights(block, config)
    ref = block.experts.down_proj
    layer = MoE(config, device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, tensor in layer._tensors().items():
            if name in weights:  # the block has no router.state: the layer's stays fresh
                tensor.copy_(weights[name].to(tensor.dtype))
    return layer.train(block.training)


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


def replace_moe_blocks(model: nn.Module, *, allow_none: bool = False,
                       **router_overrides: Any) -> int:
    """Swap every supported Hugging Face MoE block of ``model`` for a :class:`MoE`, in place.

    Returns how many blocks were replaced. Outputs are unchanged (same weights and routing
    convention) unless ``router_overrides`` are given.

    Raises:
        InputError: naming ``model``, when it has no supported block (say a Phi-MoE model, or
            a module without MoE blocks), unless ``allow_none=True`` (then 0 is returned).
    """
    targets = [(name, module) for name, module in model.named_modules()
               if type(module).__name__ in SUPPORTED_BLOCKS]
    if not targets and not allow_none:
        others = sorted({type(m).__name__ for m in model.modules()
                         if _MOE_LIKE.search(type(m).__name__) and not isinstance(m, MoE)})
        found = f"; it has unsupported MoE blocks: {', '.join(others)}" if others else ""
        raise InputError("model", f"has no supported Hugging Face MoE block (supported: "
                         f"{', '.join(SUPPORTED_BLOCKS)}){found}; nothing was replaced "
                         "(pass allow_none=True to accept that)")
    for name, block in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = from_hf_block(block, **router_overrides)
        _install_router_logits_hook(model, layer)
        setattr(parent, child, layer)
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
    """Change the routing of every :class:`MoE` in ``model`` (after ``replace_moe_blocks``).

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
