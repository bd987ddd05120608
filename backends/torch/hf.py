"""Hugging Face drop-in: build a :class:`~moe_router_backends.torch.layers.MoE` equal to a
transformers v5 MoE block, swap blocks in a model, and switch a model's routing strategy in one
call.

Three modules share the work:

- :mod:`~moe_router_backends.torch.hf_layout`: the supported blocks (Mixtral, Qwen2-MoE,
  Qwen3-MoE, OLMoE, DeepSeek-V3) and their routing conventions; a block's family, config,
  tensors and transformers layout (:class:`HFLayout`);
- :mod:`~moe_router_backends.torch.hf_block`: the replaced layer (:class:`HFBlockMoE`) and what
  it keeps of the original: router precision and selection, Mixtral's jitter, transformers'
  names in its state dict, the family's initialization;
- this module: the model-level calls (:func:`from_hf_block`, :func:`replace_moe_blocks`,
  :func:`set_strategy`); it re-exports the public names of the other two.

Router logits keep flowing to the model's own ``output_router_logits`` / aux loss: the new
router module gets the same output-capturing hook the replaced one had (its output has
transformers' dtype with the default ``router_dtype``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from moe_router.config import MoEConfig, RouterConfig
from moe_router.errors import ConfigError, InputError
from moe_router.weights import weight_shapes

from .hf_block import HFBlockMoE, HFRouter
from .hf_layout import (
    ROUTER_DTYPES,
    SUPPORTED_BLOCKS,
    HFLayout,
    _block_tensors,
    _family,
    _layout,
    hf_config,
    hf_weights,
)
from .layers import MoE
from .model import moe_layers

__all__ = ["ROUTER_DTYPES", "SUPPORTED_BLOCKS", "HFBlockMoE", "HFLayout", "HFRouter",
           "from_hf_block", "hf_config", "hf_weights", "replace_moe_blocks", "set_strategy"]

_LOG = logging.getLogger("moe_router")


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
    convention and, by default, router precision and selection; see :mod:`~.hf_block`)
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
