"""TensorFlow's layer stages: the generic :class:`~moe_router.layer.step.LayerStages` with the
overrides TensorFlow needs to stay exact in ``tf.function`` and XLA.

- :meth:`TFStages.restore_shape`: ``tf.reshape(y_TD, tf.shape(x))``, so the output keeps ``x``'s
  shape when several leading dimensions are unknown at trace time (``input_signature`` with
  ``None`` batch and sequence), which a static shape tuple cannot express.
- :meth:`TFStages.route`: ``route()`` runs unconverted by AutoGraph (``do_not_convert``): it is
  written with Python control flow on static facts only, so converting it would only slow tracing
  down (and AutoGraph would turn a few host-side checks into graph conditionals).
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from moe_router.backend import Array
from moe_router.config import RouterConfig
from moe_router.layer.step import LayerStages
from moe_router.plan import RoutingPlan


class TFStages(LayerStages):
    """The layer stages of the TensorFlow backend (exact overrides only)."""

    def route(self, logits_TE: Array, config: RouterConfig, **kwargs: Any) -> RoutingPlan:
        return tf.autograph.experimental.do_not_convert(super().route)(logits_TE, config,
                                                                        **kwargs)

    def restore_shape(self, y_TD: Array, x: Array) -> Array:
        """``y_TD`` in ``x``'s shape, also with unknown leading dimensions (symbolic shape)."""
        if all(s is not None for s in x.shape):
            return tf.reshape(y_TD, x.shape)
        return tf.reshape(y_TD, tf.shape(x))
