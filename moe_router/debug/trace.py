"""Observer ``routing_trace``: an opt-in per-token trace in a ring buffer on the device.

Active when ``MoEConfig.trace`` is a :class:`~moe_router.layer.observers.TraceConfig`. Each call
samples ``tokens_per_call`` tokens evenly spaced over its T tokens (all of them when T is
smaller; padding is skipped) and writes one row per sampled token at the ring's cursor:

==============  ==============  =======  ===============================================
field           shape           dtype    meaning
==============  ==============  =======  ===============================================
``experts``     ``(N + 1, K)``  int32    expert ids of the token's slots (-1 = unused)
``weights``     ``(N + 1, K)``  float32  the slots' gate weights
``index``       ``(N + 1,)``    int32    the token's flat index in the call (0..T-1)
``position``    ``(N + 1,)``    int32    index on the sequence axis (flat index for 2-D x)
``token``       ``(N + 1,)``    int32    token id when the call got ``token_ids``, else -1
``call``        ``(N + 1,)``    int32    the layer's call number (0-based, while tracing)
``mode``        ``(N + 1,)``    int32    0 = training call, 1 = evaluation call
``written``     ``(1,)``        int32    rows written so far (the cursor)
``calls``       ``(1,)``        int32    calls seen so far
==============  ==============  =======  ===============================================

N = ``capacity``; row N is a discard row that absorbs the writes of unsampled slots, so every
call writes a static number of rows (no shape depends on T: no recompilation). Rows are unused
while ``index`` is -1. All fields are ``kind="buffer"`` state (overwritten, not summed: under
``tf.distribute`` the ring and its cursor are the first replica's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..backend import Array, Backend
from ..layer.observers import COUNT_DTYPE, StateField, StepEvent

if TYPE_CHECKING:
    from ..config import MoEConfig

ROW_FIELDS = ("experts", "weights", "index", "position", "token", "call", "mode")


class RoutingTrace:
    """The ``routing_trace`` observer (see the module docstring)."""

    name = "routing_trace"
    observes_inference = True

    def required(self, config: MoEConfig) -> bool:
        return config.trace is not None

    def fields(self, config: MoEConfig) -> dict[str, StateField]:
        rows, K = config.trace.capacity + 1, config.router.max_slots
        buffer = {"kind": "buffer"}
        return {
            "experts": StateField((rows, K), COUNT_DTYPE, -1, **buffer),
            "weights": StateField((rows, K), "float32", 0.0, **buffer),
            "index": StateField((rows,), COUNT_DTYPE, -1, **buffer),
            "position": StateField((rows,), COUNT_DTYPE, -1, **buffer),
            "token": StateField((rows,), COUNT_DTYPE, -1, **buffer),
            "call": StateField((rows,), COUNT_DTYPE, -1, **buffer),
            "mode": StateField((rows,), COUNT_DTYPE, -1, **buffer),
            "written": StateField((1,), COUNT_DTYPE, **buffer),
            "calls": StateField((1,), COUNT_DTYPE, **buffer),
        }

    def update(self, b: Backend, values: Mapping[str, Array],
               event: StepEvent) -> dict[str, Array]:
        plan, trace = event.plan, event.config.trace
        N, S = trace.capacity, trace.tokens_per_call
        ids_TK = plan.expert_indices
        T = b.dim(ids_TK, 0)
        if isinstance(T, int) and T == 0:
            return dict(values)
        r_S = b.cast(b.arange(S, like=ids_TK), COUNT_DTYPE)
        T_int = b.cast(b.asarray(T, like=r_S), COUNT_DTYPE) if isinstance(T, int) \
            else b.cast(T, COUNT_DTYPE)
        spaced_S = (r_S * T_int) // S
        t_S = b.minimum(b.where(T_int >= S, spaced_S, r_S), T_int - 1)
        valid_S = r_S < T_int
        if event.mask_T is not None:
            real_T = b.cast(b.reshape(event.mask_T, (-1,)), "float32") > 0.0
            valid_S = valid_S & b.gather_rows(real_T, t_S)
        valid_int_S = b.cast(valid_S, COUNT_DTYPE)
        written = values["written"][0]
        dest_S = b.where(valid_S, (written + b.cumsum(valid_int_S, axis=0) - 1) % N, N)
        position_S = t_S if event.seq_len is None else t_S % b.cast(
            b.asarray(event.seq_len, like=r_S) if isinstance(event.seq_len, int)
            else event.seq_len, COUNT_DTYPE)
        token_S = (r_S * 0 - 1 if event.token_ids_T is None
                   else b.cast(b.gather_rows(event.token_ids_T, t_S), COUNT_DTYPE))
        call = values["calls"][0]
        rows = {
            "experts": b.cast(b.gather_rows(ids_TK, t_S), COUNT_DTYPE),
            "weights": b.stop_gradient(b.cast(b.gather_rows(plan.expert_weights, t_S),
                                              "float32")),
            "index": t_S,
            "position": position_S,
            "token": token_S,
            "call": r_S * 0 + call,
            "mode": r_S * 0 + (0 if event.training else 1),
        }
        new = {name: b.scatter_rows(values[name], dest_S, rows[name]) for name in ROW_FIELDS}
        new["written"] = values["written"] + b.sum(valid_int_S)
        new["calls"] = values["calls"] + 1
        return new
