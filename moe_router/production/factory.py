"""``RouterFactory``: the constructors users of the older production router know, each building
a :class:`~moe_router.production.ProductionRouter` whose routing really does what it says.

==================================  =========================================================
constructor                         routing
==================================  =========================================================
``create_optimized_for_inference``  ``top_p`` (p = 0.5, 1..3 experts of 8, D = 768): each
                                    token's k depends on that token only, so a request's
                                    result never depends on what it was batched with
``create_optimized_for_training``   ``top_p`` with the controller aiming at 2 experts of 16
                                    (1..4, D = 1024), load-balancing and z-loss on
``create_from_environment``         ``MOE_*`` variables (``moe-router info`` lists them)
``create_from_config_file``         a JSON file: the older ``production.json`` layout or ours
``create_from_layer``               the router of a torch / Flax / Keras ``MoE`` layer
==================================  =========================================================

Every constructor takes ``**changes`` (:class:`~moe_router.RouterConfig` fields) and
``settings=`` (:class:`~moe_router.production.ProductionSettings`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..config import RouterConfig
from ..errors import InputError
from .config_file import spec_from_file
from .router import ProductionRouter
from .settings import ProductionSettings, RouterSpec, spec_from_env

INFERENCE_PRESET: dict[str, Any] = {"num_experts": 8, "strategy": "top_p", "top_p": 0.5,
                                    "min_experts": 1, "max_experts": 3, "causal": True}
TRAINING_PRESET: dict[str, Any] = {"num_experts": 16, "strategy": "top_p", "top_p": 0.4,
                                   "target_experts": 2.0, "min_experts": 1, "max_experts": 4,
                                   "aux_loss_coef": 0.01, "z_loss_coef": 1e-3}


class RouterFactory:
    """Constructors of :class:`ProductionRouter` (see the module docstring)."""

    @staticmethod
    def create_optimized_for_inference(*, d_model: int = 768,
                                       settings: ProductionSettings | None = None,
                                       **changes: Any) -> ProductionRouter:
        """Serving preset: per-token ``top_p`` (batch-independent), 1..3 of 8 experts."""
        config = RouterConfig(**{**INFERENCE_PRESET, **changes})
        return ProductionRouter(RouterSpec(config, d_model, settings or ProductionSettings(),
                                           source="inference preset"))

    @staticmethod
    def create_optimized_for_training(*, d_model: int = 1024,
                                      settings: ProductionSettings | None = None,
                                      **changes: Any) -> ProductionRouter:
        """Training preset: ``top_p`` whose controller aims at a mean of 2 experts of 16."""
        config = RouterConfig(**{**TRAINING_PRESET, **changes})
        return ProductionRouter(RouterSpec(config, d_model, settings or ProductionSettings(),
                                           source="training preset"))

    @staticmethod
    def create_from_environment(environ: Mapping[str, str] | None = None, *,
                                settings: ProductionSettings | None = None,
                                **changes: Any) -> ProductionRouter:
        """From ``MOE_*`` variables (default ``os.environ``); unknown ``MOE_*`` names warn."""
        spec = spec_from_env(environ, **changes)
        if settings is not None:
            spec = dataclasses.replace(spec, settings=settings)
        return ProductionRouter(spec)

    @staticmethod
    def create_from_config_file(path: str | os.PathLike[str], *,
                                settings: ProductionSettings | None = None,
                                **changes: Any) -> ProductionRouter:
        """From a JSON file (:mod:`moe_router.production.config_file`)."""
        spec = spec_from_file(path)
        if changes:
            spec = dataclasses.replace(spec, config=spec.config.replace(**changes))
        if settings is not None:
            spec = dataclasses.replace(spec, settings=settings)
        return ProductionRouter(spec)

    @staticmethod
    def create_from_layer(layer: Any, *, settings: ProductionSettings | None = None,
                          **changes: Any) -> ProductionRouter:
        """The router of a ``moe_router`` ``MoE`` layer of any framework: its config, router
        weight and bias, and its controller state (so a trained top-p routes the same)."""
        export = getattr(layer, "export_weights", None)
        config = getattr(layer, "config", None)
        if export is None or config is None:
            raise InputError("layer", f"expected a moe_router MoE layer (torch, Flax or Keras), "
                             f"got {type(layer).__name__}")
        weights = export()
        from ..plan import RouterState

        state = weights.get("router.state")
        spec = RouterSpec(config.router.replace(**changes) if changes else config.router,
                          config.d_model, settings or ProductionSettings(),
                          source=f"layer {type(layer).__name__}")
        return ProductionRouter(spec, weights["router.weight"], weights.get("router.bias"),
                                None if state is None else RouterState(*state))
