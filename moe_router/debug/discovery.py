"""Find the MoE layers of a model of any installed framework, without importing frameworks the
user has not imported (``import moe_router`` stays framework-free)."""

from __future__ import annotations

import importlib
import sys
from typing import Any

from ..errors import InputTypeError

#: framework name, the module whose presence shows a model could be of it, its debug module
FRAMEWORKS = (("torch", "torch", "moe_router_backends.torch.debug"),
              ("jax", "flax", "moe_router_backends.jax.debug"),
              ("tensorflow", "keras", "moe_router_backends.tensorflow.debug"))


def discover(model: Any) -> tuple[str, list[tuple[str, Any]], Any]:
    """``(framework, [(name, layer), ...], debug_module)`` for ``model``.

    Raises:
        InputTypeError: ``model`` is no model of an installed framework.
    """
    for framework, root, module_name in FRAMEWORKS:
        if root not in sys.modules:
            continue
        module = importlib.import_module(module_name)
        found = module.find_moe_layers(model)
        if found is not None:
            return framework, found, module
    raise InputTypeError("model", f"expected a torch nn.Module, a Flax nnx.Module or a Keras "
                         f"model/layer containing moe_router MoE layers (or None for manual "
                         f"events), got {type(model).__name__}")
