"""The core's own plugin: the NumPy backend, built-in strategies, estimators, portable kernels
and observers, registered exactly the way a third-party plugin registers its own."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .hookspecs import hookimpl

if TYPE_CHECKING:
    from .registrar import Registrar

_STRATEGIES = "moe_router.routing.strategies"
_ESTIMATORS = "moe_router.complexity"
_EXPERTS = "moe_router.layer.experts"


@hookimpl
def moe_router_register_backends(registrar: Registrar) -> None:
    registrar.backend("numpy", "moe_router.reference:NumpyBackend", framework="numpy")


@hookimpl
def moe_router_register_strategies(registrar: Registrar) -> None:
    def strategy(name: str, **metadata: object) -> None:
        registrar.strategy(name, f"{_STRATEGIES}:{name}", **metadata)

    strategy("top_k", reads_k=True, dynamic=False, null_experts=True, normalizes=True,
             biased_selection=True)
    strategy("hash", reads_k=True, dynamic=False, inputs=("token_ids",))
    strategy("expert_choice", reads_k=True, dynamic=True, causal_safe=False, own_capacity=True)
    strategy("top_p", stateful=True, biased_selection=True)
    strategy("threshold", biased_selection=True)
    strategy("relu")
    strategy("complexity", stateful=True, normalizes=True, biased_selection=True)


@hookimpl
def moe_router_register_estimators(registrar: Registrar) -> None:
    registrar.estimator("router_entropy", f"{_ESTIMATORS}:router_entropy")
    registrar.estimator("hidden_norm", f"{_ESTIMATORS}:hidden_norm", inputs=("hidden",))
    registrar.estimator("attention_entropy", f"{_ESTIMATORS}:attention_entropy",
                        inputs=("attention_probs",))
    registrar.estimator("external", f"{_ESTIMATORS}:external", inputs=("complexity_scores",))


@hookimpl
def moe_router_register_kernels(registrar: Registrar) -> None:
    registrar.kernel("sorted", f"{_EXPERTS}:sorted_padded", static_shapes=False,
                     description="rows sorted by expert, each expert's rows padded (dropless)")
    registrar.kernel("capacity", f"{_EXPERTS}:capacity",
                     description="a static (E, C, D) buffer; needs capacity_factor")
    registrar.kernel("dense", f"{_EXPERTS}:dense", kind="tokens",
                     description="every expert on every token, weighted (reference)")
    registrar.kernel("gather", f"{_EXPERTS}:gather", kind="tokens",
                     description="each slot gathers its expert's weights (decode, T*K < E)")


@hookimpl
def moe_router_register_observers(registrar: Registrar) -> None:
    registrar.observer("expert_load", "moe_router.layer.observers:ExpertLoad")
    registrar.observer("routing_stats", "moe_router.debug.counters:RoutingCounters")
    registrar.observer("routing_trace", "moe_router.debug.trace:RoutingTrace")
