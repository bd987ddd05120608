"""Entry-point target: registers the jax backend lazily (no jax import here)."""

from __future__ import annotations

from moe_router.hookspecs import hookimpl
from moe_router.registry import Registrar


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("jax", "moe_router_backends.jax.backend:JaxBackend", framework="jax")
