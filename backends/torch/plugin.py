"""Entry-point target: registers the torch backend lazily (no torch import here)."""

from __future__ import annotations

from moe_router.hookspecs import hookimpl
from moe_router.registry import Registrar


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("torch", "moe_router_backends.torch.backend:TorchBackend", framework="torch")
