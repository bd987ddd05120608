"""Entry-point target: registers the jax backend and kernels lazily (no jax import here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_router.hookspecs import hookimpl

if TYPE_CHECKING:
    from moe_router.registrar import Registrar

_DISPATCH = "moe_router_backends.jax.dispatch"


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("jax", "moe_router_backends.jax.backend:JaxBackend", framework="jax")


@hookimpl
def moe_router_register_kernels(registrar: Registrar) -> None:
    registrar.kernel("jax:tiles", f"{_DISPATCH}:tiles_ffn", framework="jax",
                     description="dropless, rows padded to tiles; scan over experts and tiles")
    registrar.kernel("jax:ragged_dot", f"{_DISPATCH}:ragged_ffn", framework="jax",
                     description="jax.lax.ragged_dot on expert-sorted rows")
    registrar.dispatch_policy("jax", f"{_DISPATCH}:choose_kernel")
