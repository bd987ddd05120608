"""Keras 3 facade: ``from moe_router.keras import MoE, ExpertBiasUpdate, MoEMetrics``.

Importing this module imports TensorFlow and Keras (with ``KERAS_BACKEND=tensorflow`` unless set
otherwise; another Keras backend raises a clear ``ImportError``). ``import moe_router`` alone
never imports it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from moe_router.layer.calibrate import default_forward, run_calibration
from moe_router_backends.tensorflow.backend import TensorFlowBackend
from moe_router_backends.tensorflow.debug import MoEMetrics, find_moe_layers, invalidate_compiled
from moe_router_backends.tensorflow.layers import ExpertBiasUpdate, MoE

__all__ = ["ExpertBiasUpdate", "MoE", "MoEMetrics", "TensorFlowBackend", "calibrate",
           "find_moe_layers", "invalidate_compiled", "moe_layers", "total_aux_loss"]


def moe_layers(model: Any) -> list[MoE]:
    """Every :class:`MoE` layer of ``model`` (a Keras layer or model; nested ones included)."""
    return [layer for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, MoE)]


def total_aux_loss(model: Any) -> Any:
    """The sum of the aux losses (``plan.losses.total``) the MoE layers of ``model`` added on
    their last call: a float32 scalar tensor (0.0 when none)."""
    import tensorflow as tf

    losses = [loss for layer in moe_layers(model) for loss in layer.losses]
    return tf.add_n(losses) if losses else tf.constant(0.0)


def calibrate(model: Any, batches: Iterable[Any], *, forward: Callable[[Any], Any] | None = None,
              reset: bool = True) -> dict[str, Any]:
    """Calibrate the router state of every MoE layer of ``model`` on ``batches`` (eager calls:
    ``forward(batch)``, default ``model(batch)``); see :mod:`moe_router.layer.calibrate`."""
    return run_calibration(moe_layers(model), batches, forward or default_forward(model),
                           reset=reset)
