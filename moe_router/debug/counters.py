"""Observer ``routing_stats``: the debugger's per-layer counters, accumulated on the device.

Every field has a leading mode axis of 2: row 0 counts training calls, row 1 evaluation calls
(inference, calibration). All fields are additive counters updated with backend ops inside the
layer step (no host sync), read and reset on the host (:class:`~moe_router.debug.MoEDebugger`).

=================  ===========  =======  ================================================
field              shape        dtype    one call adds
=================  ===========  =======  ================================================
``calls``          ``(2,)``     int32    1
``tokens``         ``(2,)``     int32    real (unmasked) tokens
``expert_tokens``  ``(2, E)``   int32    slots each expert received from real tokens
``dropped``        ``(2,)``     int32    slots removed by the capacity limit
``k_hist``         ``(2, K+1)`` int32    real tokens that got 0, 1, ..., K experts
``entropy_sum``    ``(2,)``     float32  sum over real tokens of the router entropy (nats)
``top1_sum``       ``(2,)``     float32  sum over real tokens of the top-1 router score
``z_loss_sum``     ``(2,)``     float32  sum over real tokens of logsumexp(logits)^2
``balance_sum``    ``(2,)``     float32  the call's load-balancing loss
``aux_loss_sum``   ``(2,)``     float32  the call's total aux loss (``plan.losses.total``)
=================  ===========  =======  ================================================

int32 counts wrap after 2**31; the debugger reads them as differences modulo 2**32 into int64
totals, so reading at least once per 2**31 tokens keeps them exact.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..backend import Array, Backend
from ..layer.observers import COUNT_DTYPE, StateField, StepEvent

if TYPE_CHECKING:
    from ..config import MoEConfig

#: the rows of the mode axis
MODES = ("train", "eval")
FIELDS = ("calls", "tokens", "expert_tokens", "dropped", "k_hist", "entropy_sum", "top1_sum",
          "z_loss_sum", "balance_sum", "aux_loss_sum")


class RoutingCounters:
    """The ``routing_stats`` observer (see the module docstring for its fields)."""

    name = "routing_stats"
    observes_inference = True

    def required(self, config: MoEConfig) -> bool:
        return False

    def fields(self, config: MoEConfig) -> dict[str, StateField]:
        r = config.router
        ints = {"calls": (2,), "tokens": (2,), "expert_tokens": (2, r.num_experts),
                "dropped": (2,), "k_hist": (2, r.max_slots + 1)}
        fields = {name: StateField(shape, COUNT_DTYPE) for name, shape in ints.items()}
        for name in ("entropy_sum", "top1_sum", "z_loss_sum", "balance_sum", "aux_loss_sum"):
            fields[name] = StateField((2,), "float32")
        return fields

    def update(self, b: Backend, values: Mapping[str, Array],
               event: StepEvent) -> dict[str, Array]:
        plan, r = event.plan, event.config.router
        ids_TK = plan.expert_indices
        per_token_T = plan.num_experts_per_token
        if event.mask_T is not None:
            real_T = b.cast(b.reshape(event.mask_T, (-1,)), "float32") > 0.0
            ids_TK = b.where(real_T[:, None], ids_TK, -1)
            tokens = b.sum(b.cast(real_T, COUNT_DTYPE))
            top1_T = b.where(real_T, b.max(plan.router_probs[:, : r.num_experts], axis=-1), 0.0)
        else:
            tokens = b.sum(b.cast(per_token_T >= 0, COUNT_DTYPE))
            top1_T = b.max(plan.router_probs[:, : r.num_experts], axis=-1)
        n_real = b.cast(tokens, "float32")
        losses = plan.losses
        increments = {
            "calls": tokens * 0 + 1,
            "tokens": tokens,
            "expert_tokens": b.cast(b.bincount(ids_TK, r.num_experts), COUNT_DTYPE),
            "dropped": b.cast(plan.num_dropped, COUNT_DTYPE),
            "k_hist": b.cast(plan.stats.k_histogram, COUNT_DTYPE),
            "entropy_sum": plan.stats.router_entropy * n_real,
            "top1_sum": b.sum(top1_T),
            "z_loss_sum": losses.z_loss * n_real,
            "balance_sum": b.cast(losses.load_balancing, "float32"),
            "aux_loss_sum": b.cast(losses.total, "float32"),
        }
        row = 0 if event.training else 1
        return {name: values[name] + _in_row(b, b.stop_gradient(increments[name]), row)
                for name in FIELDS}


def _in_row(b: Backend, increment: Array, row: int) -> Array:
    """``(2, ...)``: ``increment`` in ``row`` (0 or 1), zeros in the other row."""
    one = b.reshape(increment, (1, *b.shape(increment)))
    pair = [one, one * 0]
    return b.concat(pair if row == 0 else pair[::-1], axis=0)


def mode_row(mode: str) -> int:
    """The row of ``mode`` (``"train"`` or ``"eval"``) in the counters."""
    return MODES.index(mode)



def plan_counts(plan: Any, *, training: bool = False, mask_T: Array | None = None
                ) -> dict[str, Any]:
    """One routing call's LAYER_COUNTS (:mod:`moe_router.debug.session`) from its
    :class:`~moe_router.RoutingPlan`, read on the host (eager only): the same increments the
    ``routing_stats`` observer adds inside a layer, for routing done outside one (the production
    router, :meth:`MoEDebugger.record_counts`)."""
    from types import SimpleNamespace

    from ..registry import backend_for

    b = backend_for(plan.expert_indices)
    r = plan.config
    config = SimpleNamespace(router=r)
    observer = RoutingCounters()
    like = plan.expert_weights
    zeros = {name: b.full(field.shape, 0, field.dtype, like=like)
             for name, field in observer.fields(config).items()}  # type: ignore[arg-type]
    event = SimpleNamespace(plan=plan, config=config, mask_T=mask_T, training=training)
    row = mode_row("train" if training else "eval")
    values = observer.update(b, zeros, event)  # type: ignore[arg-type]
    out: dict[str, Any] = {}
    for name in FIELDS:
        value = b.to_numpy(values[name])[row]
        out[name] = value.tolist() if getattr(value, "ndim", 0) else value.item()
    return out
