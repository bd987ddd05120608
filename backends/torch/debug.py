"""The torch side of :class:`moe_router.debug.MoEDebugger`: finding our layers in a module tree."""

from __future__ import annotations

from typing import Any

from torch import nn

from .hf_router import ATTR
from .layers import MoE


def find_moe_layers(model: Any) -> list[tuple[str, MoE]] | None:
    """Every :class:`MoE` in ``model`` (an ``nn.Module``, e.g. a Hugging Face model after
    ``replace_moe_blocks``) and every transformers gate wrapped by ``replace_routers`` /
    ``set_strategy`` (its :class:`~moe_router_backends.torch.hf_router.GateRouting`, which has
    the same debugger surface), with its module path, in registration order; ``None`` when
    ``model`` is not a torch module."""
    if not isinstance(model, nn.Module):
        return None
    found: list[tuple[str, Any]] = []
    for name, module in model.named_modules():
        if isinstance(module, MoE):
            found.append((name or type(model).__name__, module))
        elif ATTR in module.__dict__:  # a transformers gate routed by us (replace_routers)
            found.append((name, module.__dict__[ATTR]))
    return found


def invalidate_compiled(model: Any) -> None:
    """Nothing to do: ``torch.compile`` guards on the layer's config and recompiles once after the
    debugger switches observers on or off."""
