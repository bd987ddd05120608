"""moe-router: Mixture-of-Experts routing written once, run on NumPy, PyTorch, JAX and TensorFlow.

``import moe_router`` imports no deep-learning framework; backends load when an array of their
framework is first routed (or when ``moe_router.torch`` / ``.flax`` / ``.keras`` is imported).
"""

from . import losses
from .api import route
from .backend import Backend
from .complexity import init_router_state
from .config import MoEConfig, RouterConfig
from .errors import (
    BackendNotFoundError,
    ConfigError,
    InputError,
    InputTypeError,
    MoERouterError,
    UnknownFieldError,
    UnknownNameError,
)
from .hookspecs import hookimpl
from .plan import RouterLosses, RouterState, RoutingPlan, RoutingStats
from .registry import backend_for, default_registry, get_backend

__version__ = "0.1.0"

#: names loaded on first use (``moe_router.RouterFactory``), so ``import moe_router`` stays light
_LAZY = {"RouterFactory": "moe_router.production", "ProductionRouter": "moe_router.production",
         "ProductionSettings": "moe_router.production"}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moe_router' has no attribute {name!r}")

__all__ = [
    "Backend",
    "BackendNotFoundError",
    "ConfigError",
    "InputError",
    "InputTypeError",
    "MoEConfig",
    "MoERouterError",
    "ProductionRouter",
    "ProductionSettings",
    "RouterConfig",
    "RouterFactory",
    "RouterLosses",
    "RouterState",
    "RoutingPlan",
    "RoutingStats",
    "UnknownFieldError",
    "UnknownNameError",
    "backend_for",
    "default_registry",
    "get_backend",
    "hookimpl",
    "init_router_state",
    "losses",
    "route",
]
