"""Calibration of the router state of pretrained models (complexity statistics, top-p controller).

A layer trained with ``strategy="complexity"`` keeps running statistics of its complexity score;
a model converted from a checkpoint (``replace_moe_blocks``, ``set_strategy``) has none, so its
k map would use each batch's own quantiles (not causal) or a fixed k. :func:`calibrate` runs
sample batches through the model with every MoE layer in *calibration mode*: the layer step
updates the router state (``update_state=True``) without training noise and without gradients,
so decoding afterwards uses the calibrated k. The framework facades
(``moe_router.torch.calibrate``, ``moe_router.flax.calibrate``, ``moe_router.keras.calibrate``)
call this with their ``moe_layers`` and their way of running a batch.

The default ``target_experts`` of complexity routing is ``(min_experts + max_experts) / 2``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def run_calibration(layers: Sequence[Any], batches: Iterable[Any], forward: Callable[[Any], Any],
                    *, reset: bool = True) -> dict[str, Any]:
    """Run ``forward(batch)`` for each batch with ``layers`` in calibration mode.

    Each layer must have a boolean attribute ``calibrating`` read by its forward, a
    ``reset_router_state()`` method and a ``router_state`` property. Returns a summary:
    ``{"batches": n, "router_states": [per-layer RouterState as floats]}``.
    """
    if not layers:
        from ..errors import InputError

        raise InputError("model", "contains no moe_router MoE layer to calibrate")
    if reset:
        for layer in layers:
            layer.reset_router_state()
    count = 0
    for layer in layers:
        layer.calibrating = True
    try:
        for batch in batches:
            forward(batch)
            count += 1
    finally:
        for layer in layers:
            layer.calibrating = False
    states = [{name: float(value) for name, value in layer.router_state._asdict().items()}
              for layer in layers]  # float(): any framework's scalar, on any device
    return {"batches": count, "router_states": states}


def default_forward(model: Any) -> Callable[[Any], Any]:
    """``model(**batch)`` for a mapping batch, ``model(*batch)`` for a tuple, else
    ``model(batch)``."""
    from collections.abc import Mapping

    def forward(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, tuple):
            return model(*batch)
        return model(batch)

    return forward
