"""The core's own plugin: the NumPy backend, built-in strategies and estimators."""

from __future__ import annotations

from .hookspecs import hookimpl
from .registry import Registrar

_STRATEGIES = ("top_k", "top_p", "threshold", "relu", "expert_choice", "hash", "complexity")
_ESTIMATORS = ("router_entropy", "hidden_norm", "attention_entropy", "external")


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("numpy", "moe_router.reference:NumpyBackend", framework="numpy")


@hookimpl
def moe_router_register_strategies(registrar: Registrar) -> None:
    for name in _STRATEGIES:
        registrar.strategy(name, f"moe_router.routing.strategies:{name}")


@hookimpl
def moe_router_register_estimators(registrar: Registrar) -> None:
    for name in _ESTIMATORS:
        registrar.estimator(name, f"moe_router.complexity:{name}")
