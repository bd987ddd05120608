"""Model-level helpers over the :class:`~moe_router_backends.torch.layers.MoE` layers of a model:
find them, sum their aux losses, calibrate their router state."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from moe_router.layer.calibrate import default_forward, run_calibration

from .layers import MoE


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every moe-router :class:`MoE` inside ``model`` (``model`` itself included)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def total_aux_loss(model: nn.Module) -> torch.Tensor:
    """Sum of ``layer.aux_loss`` over the model's :class:`MoE` layers (last forward); a float32
    zero when there is none."""
    losses = [loss for loss in (m.aux_loss for m in moe_layers(model)) if loss is not None]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.float() for loss in losses]).sum()


def calibrate(model: nn.Module, batches: Iterable[Any], *,
              forward: Callable[[Any], Any] | None = None, reset: bool = True) -> dict[str, Any]:
    """Calibrate the router state (complexity statistics, top-p controller) of every
    :class:`MoE` in ``model`` on sample ``batches``: each batch runs through ``forward(batch)``
    (default: ``model(**batch)`` / ``model(*batch)`` / ``model(batch)``) in eval mode, without
    gradients, with the layers updating their router state. ``reset`` starts from a fresh state.
    Returns ``{"batches": n, "router_states": [...]}``.

    Raises:
        InputError: ``model`` has no :class:`MoE` layer.
    """
    run = forward or default_forward(model)
    modes = {module: module.training for module in model.modules()}

    def forward_no_grad(batch: Any) -> Any:
        with torch.no_grad():
            return run(batch)

    model.eval()
    try:
        return run_calibration(moe_layers(model), batches, forward_no_grad, reset=reset)
    finally:
        for module, training in modes.items():
            module.training = training
