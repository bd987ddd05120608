"""The token exchange of expert parallelism: the routed slots go to the rank holding their expert,
through the local grouped FFN, and back (``torch.distributed`` all-to-all only).

One call of :func:`exchange_experts` on every rank of the expert-parallel group, in this order:

1. each routed slot's logical expert becomes a *physical* slot (:func:`physical_slots`: the
   placement's replica of that expert, the ``j``-th slot of expert ``e`` going to replica
   ``j % num_replicas(e)``, as :func:`moe_router.parallel.physical_ids` with its default rule);
2. the slots are sorted by physical slot (stable: token order within one), so each destination
   rank's rows are one contiguous block, and the per-slot counts ``(P, S)`` are exchanged with an
   equal-split ``all_to_all_single`` (``P`` ranks, ``S`` slots per rank);
3. the rows go out with a variable-size ``all_to_all_single`` (differentiable: its backward is
   the reverse exchange); this rank receives its slots' rows grouped by source rank;
4. ``local_fn(x_RD, slot_R)`` computes them (the layer's grouped FFN over ``S`` local experts);
5. the outputs return with the reverse all-to-all and are summed per token with the gates.

Every rank takes part in both exchanges even with zero tokens or zero routed slots (empty splits),
so unequal token counts, empty ranks and idle experts never leave a rank waiting. Split sizes
are read on the host: eager only (no ``torch.compile`` / CUDA graphs through the exchange).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

try:  # the autograd-aware functional collective (torch >= 2.3)
    from torch.distributed._functional_collectives import (
        all_to_all_single_autograd as _a2a_autograd,
    )
    from torch.distributed._functional_collectives import wait_tensor as _wait
except ImportError:  # pragma: no cover - older torch
    _a2a_autograd = None

#: ``local_fn(x_RD, slot_R) -> out_RD``: the local experts on the received rows
LocalFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SlotTable(NamedTuple):
    """A placement as tensors on the compute device.

    Attributes:
        replicas_EM: ``(E, M)`` physical slots of each logical expert (padded with its first).
        num_replicas_E: ``(E,)`` number of replicas of each expert.
        slots_per_rank: S, physical slots (local experts) per rank.
        num_ranks: P, ranks of the expert-parallel group.
        identity: physical slot == logical expert (contiguous, no replicas): step 1 is skipped.
    """

    replicas_EM: torch.Tensor
    num_replicas_E: torch.Tensor
    slots_per_rank: int
    num_ranks: int
    identity: bool

    @classmethod
    def of(cls, placement: Any, device: torch.device) -> SlotTable:
        """The table of a :class:`moe_router.parallel.Placement`."""
        rows = placement.logical_to_physical
        width = max(len(r) for r in rows)
        table = [list(r) + [r[0]] * (width - len(r)) for r in rows]
        return cls(torch.tensor(table, dtype=torch.int64, device=device),
                   torch.tensor([len(r) for r in rows], dtype=torch.int64, device=device),
                   placement.slots_per_rank, placement.num_ranks, placement.is_contiguous)


def physical_slots(ids_TK: torch.Tensor, table: SlotTable) -> torch.Tensor:
    """``(T, K)`` physical slot of each routed slot (``-1`` kept): the ``j``-th slot routed to
    expert ``e`` (flat order) goes to replica ``j % num_replicas(e)``."""
    if table.identity:
        return ids_TK
    E = table.replicas_EM.shape[0]
    flat_S = ids_TK.reshape(-1).long()
    used_S = flat_S >= 0
    expert_S = flat_S.clamp_min(0)
    key_S = torch.where(used_S, flat_S, E)
    order_S = torch.sort(key_S, stable=True).indices
    sorted_S = key_S[order_S]
    rank_in_segment = torch.arange(sorted_S.numel(), device=ids_TK.device) - torch.searchsorted(
        sorted_S, sorted_S, side="left")
    occurrence_S = torch.empty_like(rank_in_segment)
    occurrence_S[order_S] = rank_in_segment
    replica_S = occurrence_S % table.num_replicas_E[expert_S]
    phys_S = table.replicas_EM[expert_S, replica_S]
    return torch.where(used_S, phys_S, -1).reshape(ids_TK.shape)


def _all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group: Any) -> torch.Tensor:
    """Variable-size, differentiable ``all_to_all_single`` of rows."""
    group = dist.group.WORLD if group is None else group
    if _a2a_autograd is not None:
        return _wait(_a2a_autograd(x.contiguous(), out_splits, in_splits, group))
    from torch.distributed.nn.functional import all_to_all_single  # pragma: no cover

    out = x.new_empty((sum(out_splits), *x.shape[1:]))  # pragma: no cover
    return all_to_all_single(out, x.contiguous(), out_splits, in_splits, group)  # pragma: no cover


class ExchangeStats(NamedTuple):
    """Rows of one exchange: sent to each rank and received from each (for benchmarks)."""

    sent_P: list[int]
    received_P: list[int]


def exchange_experts(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                     table: SlotTable, group: Any, local_fn: LocalFn,
                     on_stats: Callable[[ExchangeStats], None] | None = None) -> torch.Tensor:
    """``(T, D)`` = sum over routed slots of ``gate * expert(x)``, the experts spread over the
    ranks of ``group`` (one call on every rank; see the module docstring).

    Args:
        x_TD: this rank's tokens (any T, 0 included).
        ids_TK: ``(T, K)`` int logical experts, ``-1`` for unused (dropped, null) slots.
        gates_TK: ``(T, K)`` routing weights.
        table: the placement (:class:`SlotTable`).
        group: the expert-parallel process group (``None``: the default group).
        local_fn: the local experts on received rows and their local slot ids.
        on_stats: called with the rows sent and received per rank.
    """
    T, K = ids_TK.shape
    P, S = table.num_ranks, table.slots_per_rank
    phys_S = physical_slots(ids_TK, table).reshape(-1).long()
    used_S = phys_S >= 0
    order_S = torch.sort(torch.where(used_S, phys_S, P * S), stable=True).indices
    counts_PS = torch.bincount(phys_S[used_S], minlength=P * S)
    received_PS = torch.empty_like(counts_PS)
    dist.all_to_all_single(received_PS, counts_PS, group=group)  # S counts to each rank
    counts_PS, received_PS = counts_PS.view(P, S), received_PS.view(P, S)
    both = torch.stack([counts_PS.sum(1), received_PS.sum(1)]).tolist()  # one host read
    sent_P, recv_P = both
    U = sum(sent_P)
    order_U = order_S[:U]
    token_U = order_U // K
    x_RD = _all_to_all(x_TD[token_U], recv_P, sent_P, group)
    slot_R = torch.repeat_interleave(
        torch.arange(S, device=x_TD.device).repeat(P), received_PS.reshape(-1))
    out_RD = local_fn(x_RD, slot_R)
    out_UD = _all_to_all(out_RD, sent_P, recv_P, group)
    if on_stats is not None:
        on_stats(ExchangeStats(sent_P, recv_P))
    gate_U1 = gates_TK.reshape(-1)[order_U].to(out_UD.dtype)[:, None]
    y_TD = x_TD.new_zeros((T, x_TD.shape[1]), dtype=out_UD.dtype)
    return y_TD.index_add(0, token_U, out_UD * gate_U1)
