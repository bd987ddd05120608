"""The production router: presets, config files and environment, ``route`` for arrays of any
framework, request metrics and health.

>>> from moe_router.production import RouterFactory
>>> router = RouterFactory.create_optimized_for_inference(d_model=64)
>>> result = router.route(hidden_BSD)            # doctest: +SKIP
>>> result.routing_info["flops_vs_static"]       # doctest: +SKIP

See ``docs/deployment.md``.
"""

from .config_file import spec_from_file, spec_from_mapping
from .factory import RouterFactory
from .router import ProductionRouter, RoutedResult, load_router_weight
from .settings import ProductionSettings, RouterSpec, spec_from_env

__all__ = [
    "ProductionRouter",
    "ProductionSettings",
    "RoutedResult",
    "RouterFactory",
    "RouterSpec",
    "load_router_weight",
    "spec_from_env",
    "spec_from_file",
    "spec_from_mapping",
]
