"""Keras 3 facade: ``from moe_router.keras import MoE, ExpertBiasUpdate``.

Importing this module imports TensorFlow and Keras (with ``KERAS_BACKEND=tensorflow`` unless set
otherwise; another Keras backend raises a clear ``ImportError``). ``import moe_router`` alone
never imports it.
"""

from __future__ import annotations

from moe_router_backends.tensorflow.backend import TensorFlowBackend
from moe_router_backends.tensorflow.layers import DISPATCH_NAMES, ExpertBiasUpdate, MoE

__all__ = ["DISPATCH_NAMES", "ExpertBiasUpdate", "MoE", "TensorFlowBackend"]
