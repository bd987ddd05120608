"""Entry-point target: registers the torch backend and kernels lazily (no torch import here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_router.hookspecs import hookimpl

if TYPE_CHECKING:
    from moe_router.registrar import Registrar

_KERNELS = "moe_router_backends.torch.kernels"


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("torch", "moe_router_backends.torch.backend:TorchBackend", framework="torch")


@hookimpl
def moe_router_register_kernels(registrar: Registrar) -> None:
    registrar.kernel("torch:grouped_mm", f"{_KERNELS}:grouped_mm_ffn", framework="torch",
                     description="torch._grouped_mm on expert-sorted rows")
    registrar.kernel("torch:padded", f"{_KERNELS}:padded_ffn", framework="torch",
                     static_shapes=False, description="per-expert rows padded, one bmm")
    registrar.kernel("torch:loop", f"{_KERNELS}:loop_ffn", framework="torch",
                     static_shapes=False, description="a Python loop over the used experts")
    registrar.kernel("torch:gather", f"{_KERNELS}:gather_tokens", framework="torch",
                     kind="tokens", static_shapes=False,
                     description="each slot gathers its expert's weights (decode)")
    registrar.dispatch_policy("torch", f"{_KERNELS}:choose_kernel")
