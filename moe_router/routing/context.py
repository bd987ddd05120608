"""What a strategy receives (:class:`RoutingContext`) and returns (:class:`Selection`)."""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

from ..backend import Array, Backend
from ..config import RouterConfig
from ..plan import RouterState


@dataclasses.dataclass(frozen=True)
class RoutingContext:
    """Inputs of one routing call, already validated and in float32.

    Attributes:
        backend: the array backend; strategies use only its primitives.
        config: the router config.
        logits: ``(T, E + N)`` float32 router logits, noise applied when training.
        probs: ``(T, E + N)`` float32 scores: softmax or sigmoid of ``logits``.
        hidden: ``(T, D)`` hidden states or ``None``.
        token_ids: ``(T,)`` int token ids or ``None``.
        attention_probs: ``(T, S)`` or ``(H, T, S)`` attention probabilities or ``None``.
        complexity_scores: ``(T,)`` float externally supplied complexity or ``None``.
        expert_bias: ``(E,)`` float32 aux-free balancing bias or ``None``.
        training: routing for a training step (noise, controller updates).
        state: controller :class:`RouterState` or ``None``.
    """

    backend: Backend
    config: RouterConfig
    logits: Array
    probs: Array
    hidden: Array | None = None
    token_ids: Array | None = None
    attention_probs: Array | None = None
    complexity_scores: Array | None = None
    expert_bias: Array | None = None
    training: bool = False
    state: RouterState | None = None

    @property
    def num_tokens(self) -> Any:
        """T: a Python int when static, else a scalar int array."""
        return self.backend.dim(self.logits, 0)


class Selection(NamedTuple):
    """A strategy's answer, before null-expert removal, route_scale and capacity.

    ``indices`` ``(T, K)`` int with ``-1`` in unused slots (used slots first, best first);
    ``weights`` ``(T, K)`` float32 with ``0.0`` in unused slots; ``state`` the updated
    controller state (or the one received).
    """

    indices: Array
    weights: Array
    state: RouterState | None = None
