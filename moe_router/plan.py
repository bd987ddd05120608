"""The immutable results of routing: :class:`RoutingPlan` with its losses, statistics and state.

All array fields are arrays of the input's framework (computed with backend ops), so a plan stays
valid inside ``jax.jit``, ``tf.function`` and ``torch.compile``. The config is static metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from .backend import Array
from .config import RouterConfig


class RouterState(NamedTuple):
    """Controller state carried between calls (all float32 scalars; a JAX pytree as a tuple).

    Attributes:
        top_p: current p of the top-p controller (starts at ``config.top_p``).
        score_mean / score_var: running mean and variance of the complexity score.
        score_count: number of updates of the running statistics (0 = uncalibrated).
        k_offset: additive correction of the complexity controller's k ramp.
    """

    top_p: Array
    score_mean: Array
    score_var: Array
    score_count: Array
    k_offset: Array


class RouterLosses(NamedTuple):
    """Auxiliary losses of one routing call (float32 scalars) and their weighted ``total``."""

    load_balancing: Array
    z_loss: Array
    entropy: Array
    total: Array


class RoutingStats(NamedTuple):
    """Routing statistics. ``mean_experts``, ``k_histogram`` and ``router_entropy`` cover the
    unmasked tokens; ``max_load`` / ``mean_load`` describe ``expert_counts``, i.e. every routed
    token (padding included, since padding also occupied the experts).

    Attributes:
        mean_experts: mean experts per token (float32 scalar).
        k_histogram: ``(K + 1,)`` int, tokens that got 0, 1, ..., K experts.
        router_entropy: mean entropy of the router probabilities, in nats.
        max_load / mean_load: max and mean of ``expert_counts`` (float32).
    """

    mean_experts: Array
    k_histogram: Array
    router_entropy: Array
    max_load: Array
    mean_load: Array


@dataclasses.dataclass(frozen=True)
class RoutingPlan:
    """Which experts each token uses, with what weight, and what it cost.

    Attributes:
        expert_indices: ``(T, K)`` int; ``-1`` in unused slots; used slots first, by descending
            weight (selection score), ties to the lower expert index.
        expert_weights: ``(T, K)`` float32; ``0.0`` in unused slots.
        num_experts_per_token: ``(T,)`` int, used slots per token (after capacity).
        expert_counts: ``(E,)`` int, slots each expert received (after capacity).
        num_dropped: int scalar, slots removed by the capacity limit.
        router_probs: ``(T, E + N)`` float32 router scores (softmax or sigmoid) before selection.
        losses: :class:`RouterLosses`.
        stats: :class:`RoutingStats`.
        state: the updated :class:`RouterState` (``None`` when routing used none).
        config: the :class:`~moe_router.config.RouterConfig` that produced the plan.
    """

    expert_indices: Array
    expert_weights: Array
    num_experts_per_token: Array
    expert_counts: Array
    num_dropped: Array
    router_probs: Array
    losses: RouterLosses
    stats: RoutingStats
    state: RouterState | None
    config: RouterConfig

    @property
    def num_slots(self) -> int:
        """K, the static width of the plan."""
        return self.config.max_slots

    def summary(self) -> dict[str, Any]:
        """Plain-Python numbers (eager only): for printing, logging and tests."""
        from .registry import backend_for

        b = backend_for(self.expert_indices)

        def number(x: Array) -> float:
            return float(b.to_numpy(x))

        k_static = self.config.nominal_experts if not self.config.is_dynamic else None
        return {
            "strategy": self.config.strategy,
            "mean_experts": number(self.stats.mean_experts),
            "k_histogram": [int(v) for v in b.to_numpy(self.stats.k_histogram)],
            "router_entropy": number(self.stats.router_entropy),
            "max_load": number(self.stats.max_load),
            "mean_load": number(self.stats.mean_load),
            "num_dropped": int(number(self.num_dropped)),
            "load_balancing_loss": number(self.losses.load_balancing),
            "z_loss": number(self.losses.z_loss),
            "entropy_loss": number(self.losses.entropy),
            "total_loss": number(self.losses.total),
            "static_k": k_static,
        }


#: the array-valued fields of :class:`RoutingPlan` (everything but the static ``config``): what a
#: framework registers as pytree children (JAX) or nested structure (TensorFlow)
PLAN_ARRAY_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(RoutingPlan) if f.name != "config")
