"""Entry-point target: registers the tensorflow backend and kernels lazily (no tensorflow
import here)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from moe_router.hookspecs import hookimpl

if TYPE_CHECKING:
    from moe_router.registrar import Registrar

_DISPATCH = "moe_router_backends.tensorflow.dispatch"


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("tensorflow", "moe_router_backends.tensorflow.backend:TensorFlowBackend",
                      framework="tensorflow")


@hookimpl
def moe_router_register_kernels(registrar: Registrar) -> None:
    registrar.kernel("tensorflow:split", f"{_DISPATCH}:split_ffn", framework="tensorflow",
                     static_shapes=False, description="tf.split of expert-sorted rows per expert")
    registrar.kernel("tensorflow:tiles", f"{_DISPATCH}:tiles_ffn", framework="tensorflow",
                     description="rows padded to tiles (XLA)")
    registrar.dispatch_policy("tensorflow", f"{_DISPATCH}:choose_kernel")
