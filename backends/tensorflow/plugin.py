"""Entry-point target: registers the tensorflow backend lazily (no tensorflow import here)."""

from __future__ import annotations

from moe_router.hookspecs import hookimpl
from moe_router.registry import Registrar


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("tensorflow", "moe_router_backends.tensorflow.backend:TensorFlowBackend",
                      framework="tensorflow")
