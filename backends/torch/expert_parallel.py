"""Expert parallelism for torch models: each rank of an expert-parallel process group keeps only
its experts, routes its own tokens, and exchanges the routed rows with ``all_to_all_single``
(:mod:`.ep_exchange`) between permute and the grouped FFN.

::

    dist.init_process_group("gloo")              # or "nccl"; torchrun sets the rank variables
    groups = expert_parallel_groups(ep_size=2)   # collective: every rank calls it
    expert_parallel(model, groups=groups)        # our MoE layers and transformers experts modules
    loss = ...; loss.backward()
    sync_gradients(model, groups)                # instead of DDP's all-reduce

What an expert-parallel layer equals: on every rank, the single-process layer applied to that
rank's tokens (the same routing, capacity and drops from the rank's own T, the same aux loss);
after :func:`sync_gradients` every parameter's gradient equals the single-process gradient of
the sum (``average=False``) or the mean (``average=True``, DDP's convention) of the ranks' losses
(``tests/torch/test_expert_parallel_torch.py`` checks both, on gloo, with 2 and 4 processes).

Process groups (:class:`ExpertParallelGroups`): ``data`` holds every rank sharing the replicated
parameters (router, shared expert, the rest of the model): the whole world by default;
``expert`` splits the experts (consecutive ranks); ``expert_data`` links the ranks holding the
same experts (strided). With ``ep_size == world`` the expert-data group has one rank.

Statistics: the aux-free bias steps and the debugger's counters are reduced over ``data``
(:meth:`MoE.update_expert_bias`, ``MoE.export_state(across_ranks=True)``); a stateful router's
controller state (top-p controller, complexity calibration) is averaged over ``data`` after each
state update, so every rank keeps routing alike. Those reductions are collectives: every rank
runs the same forward calls and debugger reads.

Not supported (typed errors): ``torch.compile`` through the exchange (host-read split sizes),
offloaded experts together with expert parallelism, a model converted twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moe_router.errors import ConfigError, InputError, InputTypeError
from moe_router.layer.experts import expert_weights, local_expert_compute

from .ep_exchange import ExchangeStats, SlotTable, exchange_experts
from .hf_experts import EP_ATTR, NAME, is_hf_experts
from .layers import MoE


@dataclasses.dataclass(frozen=True)
class ExpertParallelGroups:
    """The process groups of expert parallelism (``None`` = the default, world, group).

    Attributes:
        expert: ranks that split the experts among them (the all-to-all group).
        data: ranks sharing the replicated parameters and whose statistics are pooled.
        expert_data: ranks holding the same experts (their gradients are reduced over it);
            ``None`` when it would hold one rank.
    """

    expert: Any = None
    data: Any = None
    expert_data: Any = None

    @property
    def expert_size(self) -> int:
        return dist.get_world_size(self.expert)

    @property
    def expert_rank(self) -> int:
        return dist.get_rank(self.expert)

    @property
    def data_size(self) -> int:
        return dist.get_world_size(self.data)

    @property
    def expert_data_size(self) -> int:
        return 1 if self.expert_data is None else dist.get_world_size(self.expert_data)

    def describe(self) -> str:
        """E.g. ``'4 ranks: expert-parallel 2 x expert-data-parallel 2'``."""
        return (f"{self.data_size} ranks: expert-parallel {self.expert_size} x "
                f"expert-data-parallel {self.expert_data_size}")


def _require_initialized(argument: str) -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise InputError(argument, "torch.distributed is not initialized: call "
                         "torch.distributed.init_process_group first (gloo on CPU, nccl on GPU)")


def expert_parallel_groups(ep_size: int | None = None) -> ExpertParallelGroups:
    """Groups for ``ep_size``-way expert parallelism over the world: expert groups of
    consecutive ranks ``[i * ep_size, (i + 1) * ep_size)``, expert-data groups of the ranks with
    the same position in theirs. A collective: every rank calls it, in the same order.

    Raises:
        InputError: ``ep_size`` does not divide the world size, or no process group.
    """
    _require_initialized("ep_size")
    world, rank = dist.get_world_size(), dist.get_rank()
    ep = world if ep_size is None else ep_size
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise InputError("ep_size", f"expected a divisor of the world size {world}, got "
                         f"{ep_size!r}")
    if ep == world:
        return ExpertParallelGroups()
    expert = expert_data = None
    for i in range(world // ep):  # every rank creates every group (new_group is collective)
        g = dist.new_group(list(range(i * ep, (i + 1) * ep)))
        if rank // ep == i:
            expert = g
    for j in range(ep):
        g = dist.new_group(list(range(j, world, ep)))
        if rank % ep == j:
            expert_data = g
    return ExpertParallelGroups(expert=expert, expert_data=expert_data)


@dataclasses.dataclass
class _Link:
    """One converted layer's expert-parallel facts."""

    groups: ExpertParallelGroups
    placement: Any  # moe_router.parallel.Placement
    local_experts: tuple[int, ...]  # logical expert of each local slot
    table: SlotTable | None = None
    last_exchange: ExchangeStats | None = None

    def slot_table(self, device: torch.device) -> SlotTable:
        if self.table is None or self.table.replicas_EM.device != device:
            self.table = SlotTable.of(self.placement, device)
        return self.table

    def remember(self, stats: ExchangeStats) -> None:
        self.last_exchange = stats


# ----- our MoE layer ----------------------------------------------------------------------------
class _ExpertParallelStages:
    """Mixin put in front of a layer's stages class: the ``experts`` stage over the ranks."""

    _ep: _Link
    #: the step must call ``experts`` even for zero tokens (the other ranks wait for this one)
    collective = True
    #: the expert weights are spread over ranks (:meth:`MoE.derive_stages` refuses to combine)
    replaces_expert_weights = True

    def experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                params: Mapping[str, torch.Tensor], config: Any,
                dispatch: str | None) -> torch.Tensor:
        b, link = self.b, self._ep
        if b.is_tracing(x_TD):
            raise InputError("x", "expert parallelism runs eagerly (its all-to-all split sizes "
                             "are read on the host); do not torch.compile through an "
                             "expert-parallel layer")
        w = expert_weights(b, params, x_TD)
        request = dispatch or config.dispatch
        if request == "capacity":  # the drops happened in routing: the rest is dropless
            request = "sorted"

        def local(x_RD: torch.Tensor, slot_R: torch.Tensor) -> torch.Tensor:
            if not x_RD.shape[0]:
                return _empty_output(x_RD, [t for t in w if t is not None])
            ones_R1 = x_RD.new_ones((x_RD.shape[0], 1), dtype=torch.float32)
            return local_expert_compute(b, x_RD, slot_R[:, None], ones_R1, w, config, request,
                                        len(link.local_experts))

        return exchange_experts(x_TD, ids_TK, gates_TK, link.slot_table(x_TD.device),
                                link.groups.expert, local, link.remember)


def _empty_output(x_RD: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
    """``(0, D)`` output for zero received rows that still depends on the rows and the weights:
    backward then runs this rank's side of both all-to-alls (the other ranks wait for it) and
    gives the weights zero gradients."""
    zero = (x_RD.sum() + sum(t.sum() for t in weights)) * 0.0
    return x_RD.new_zeros((0, x_RD.shape[1])) + zero


def _convert_layer(layer: MoE, groups: ExpertParallelGroups, placement: Any) -> None:
    if isinstance(layer._stages(), _ExpertParallelStages):
        raise InputError("layer_or_model", "this layer is already expert-parallel")
    link = _make_link(groups, placement, layer.config.num_experts, "layer")
    stages = layer.derive_stages("ExpertParallel", _ExpertParallelStages,
                                 argument="layer_or_model", _ep=link)
    _keep_local_experts(layer.experts, link, layer.config.num_experts)
    layer.set_stages(stages)
    layer.stats_group = groups.data
    layer.stats_scope = f"data-parallel group ({groups.describe()})"
    layer.pool_stats = True
    if layer.config.router.strategy_spec.stateful:
        layer.register_forward_hook(_average_router_state)


@torch.no_grad()
def _keep_local_experts(container: nn.Module, link: _Link, num_experts: int) -> None:
    """Replace ``container``'s per-expert parameters (leading dim ``num_experts``) by this
    rank's slices (its slots' experts, replicas included) and mark it converted."""
    for leaf, param in list(container._parameters.items()):
        if param is not None and param.dim() and param.shape[0] == num_experts:
            index = torch.tensor(link.local_experts, dtype=torch.long, device=param.device)
            container._parameters[leaf] = nn.Parameter(param.detach()[index].clone(),
                                                       requires_grad=param.requires_grad)
    container.__dict__[EP_ATTR] = link


def _average_router_state(layer: MoE, args: Any, output: Any) -> None:
    """After a state-updating call: the controller state averaged over the data group."""
    if not (layer.training or layer.calibrating):
        return
    state = layer.router.state
    with torch.no_grad():
        dist.all_reduce(state, group=layer.stats_group)
        state.div_(dist.get_world_size(layer.stats_group))


def _make_link(groups: ExpertParallelGroups, placement: Any, num_experts: int,
               what: str) -> _Link:
    from moe_router.parallel import Placement, contiguous_placement

    P, rank = groups.expert_size, groups.expert_rank
    if placement is None:
        if num_experts % P:
            raise ConfigError("num_experts", num_experts, f"a multiple of the expert-parallel "
                              f"group size {P} (or pass a placement with replicas)")
        placement = contiguous_placement(num_experts, P)
    if not isinstance(placement, Placement):
        raise InputTypeError("placement", f"expected a moe_router.parallel.Placement, got "
                             f"{type(placement).__name__}")
    if placement.num_experts != num_experts or placement.num_ranks != P:
        raise InputError("placement", f"expected a placement of {num_experts} experts over {P} "
                         f"ranks for this {what}, got {placement.num_experts} over "
                         f"{placement.num_ranks}")
    S = placement.slots_per_rank
    return _Link(groups, placement, placement.physical_to_logical[rank * S:(rank + 1) * S])


# ----- transformers experts modules (experts_implementation="moe_router") -----------------------
def _convert_hf_experts(experts: nn.Module, groups: ExpertParallelGroups, placement: Any) -> None:
    if EP_ATTR in experts.__dict__:
        raise InputError("layer_or_model", "this experts module is already expert-parallel")
    link = _make_link(groups, placement, int(experts.num_experts), "experts module")
    _keep_local_experts(experts, link, int(experts.num_experts))
    experts.num_experts = len(link.local_experts)


def hf_experts_forward(experts: nn.Module, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                       weights_TK: torch.Tensor, forward_local: Any) -> torch.Tensor:
    """The expert-parallel path of ``moe_router_experts_forward``: ``forward_local(x, ids,
    weights)`` runs the module's local experts on the received rows."""
    link: _Link = experts.__dict__[EP_ATTR]

    def local(x_RD: torch.Tensor, slot_R: torch.Tensor) -> torch.Tensor:
        if not x_RD.shape[0]:
            return _empty_output(x_RD, list(experts.parameters()))
        return forward_local(x_RD, slot_R[:, None], x_RD.new_ones((x_RD.shape[0], 1)))

    return exchange_experts(x_TD, ids_TK, weights_TK, link.slot_table(x_TD.device),
                            link.groups.expert, local, link.remember)


# ----- the entry point, gradients ----------------------------------------------------------------
def expert_parallel(layer_or_model: nn.Module, group: Any = None, *,
                    groups: ExpertParallelGroups | None = None,
                    placement: Any = None) -> int:
    """Make every moe-router :class:`MoE` layer and every transformers experts module running
    ``experts_implementation="moe_router"`` in ``layer_or_model`` expert-parallel, in place:
    each keeps only this rank's experts (their parameters are replaced by the local slices).
    Call it on every rank with the same full model (same weights). Returns the number of
    layers converted.

    Args:
        layer_or_model: a :class:`MoE`, or any module holding them.
        group: the expert-parallel process group (default: the world); the data group is the
            world. For EP x expert-data parallelism pass ``groups`` instead.
        groups: :class:`ExpertParallelGroups` (e.g. from :func:`expert_parallel_groups`).
        placement: a :class:`moe_router.parallel.Placement` (the same for every layer), a
            sequence of them (one per converted layer, in module order), or ``None`` for the
            contiguous placement. With replicas, :func:`sync_gradients` sums each expert's
            replica gradients.

    Raises:
        InputError: no process group, no layer to convert, a layer converted twice, a
            placement of the wrong size; ConfigError: E not divisible by the group size.
    """
    _require_initialized("group")
    if not isinstance(layer_or_model, nn.Module):
        raise InputTypeError("layer_or_model", f"expected a torch nn.Module, got "
                             f"{type(layer_or_model).__name__}")
    if groups is None:
        groups = ExpertParallelGroups(expert=group)
        if groups.expert_size != groups.data_size:
            raise InputError("group", "an expert group smaller than the world needs the "
                             "expert-data groups too: pass groups=expert_parallel_groups(ep_size)")
    targets = [m for m in layer_or_model.modules() if isinstance(m, MoE)
               or (is_hf_experts(m) and m.config._experts_implementation == NAME)]
    if not targets:
        raise InputError("layer_or_model", "found no moe-router MoE layer and no transformers "
                         "experts module using experts_implementation='moe_router'")
    placements = list(placement) if isinstance(placement, Sequence) else [placement] * len(
        targets)
    if len(placements) != len(targets):
        raise InputError("placement", f"expected one placement per converted layer "
                         f"({len(targets)}), got {len(placements)}")
    for module, layer_placement in zip(targets, placements):
        if isinstance(module, MoE):
            _convert_layer(module, groups, layer_placement)
        else:
            _convert_hf_experts(module, groups, layer_placement)
    layer_or_model.__dict__["_moe_router_ep_groups"] = groups
    return len(targets)


def expert_containers(model: nn.Module) -> Iterator[tuple[nn.Module, _Link]]:
    """The converted expert containers of ``model`` and their links."""
    for module in model.modules():
        link = module.__dict__.get(EP_ATTR)
        if link is not None:
            yield module, link


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The rank-local expert parameters of ``model`` (reduced over the expert-data group; give
    them to DDP's ignore list if DDP wraps the model)."""
    return [p for module, _ in expert_containers(model) for p in module.parameters()]


def _all_reduce(tensors: list[torch.Tensor], group: Any) -> None:
    """Sum ``tensors`` over ``group`` in one flat buffer per dtype."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in same:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@torch.no_grad()
def sync_gradients(model: nn.Module, groups: ExpertParallelGroups | None = None, *,
                   average: bool = True) -> None:
    """Reduce gradients after ``backward()`` on every rank: replicated parameters over the data
    group, expert parameters over the expert-data group (their all-to-all backward already
    summed every rank's tokens of the expert group); replicas of one expert (a placement with
    redundant experts) are summed over the expert group. ``average``: divide by the data-group
    size (DDP's mean over ranks); else the gradient of the sum of the ranks' losses. A missing
    gradient counts as zero (every rank takes part in every reduction).
    """
    groups = groups or model.__dict__.get("_moe_router_ep_groups") or ExpertParallelGroups()
    for p in model.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    expert_ids = {id(p) for p in expert_parameters(model)}
    replicated = [p.grad for p in model.parameters() if p.requires_grad and id(p) not in
                  expert_ids]
    if replicated:
        _all_reduce(replicated, groups.data)
    for module, link in expert_containers(model):
        if not link.placement.replicas_E.max() > 1:
            continue
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        index = torch.tensor(link.local_experts, dtype=torch.long, device=grads[0].device)
        for g in grads:  # sum the replicas of each logical expert: a logical-size buffer
            full = g.new_zeros((link.placement.num_experts, *g.shape[1:]))
            full.index_add_(0, index, g)
            dist.all_reduce(full, group=link.groups.expert)
            g.copy_(full[index])
    expert_grads = [p.grad for p in model.parameters() if p.requires_grad and id(p) in
                    expert_ids]
    if expert_grads and groups.expert_data is not None:
        _all_reduce(expert_grads, groups.expert_data)
    if average:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(groups.data_size)


@torch.no_grad()
def gather_experts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The full ``(E, ...)`` expert parameters of every converted module, by their names in
    ``model`` (``experts.w_up``, ``model.layers.0.mlp.experts.gate_up_proj``, ...), in logical
    expert order (a replicated expert's first replica): what a single-process checkpoint holds.
    A collective over each module's expert group: every rank calls it; every rank gets all."""
    out: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        link = module.__dict__.get(EP_ATTR)
        if link is None:
            continue
        P = link.groups.expert_size
        first = torch.tensor([slots[0] for slots in link.placement.logical_to_physical])
        for leaf, param in module.named_parameters(recurse=False):
            pieces = [torch.empty_like(param) for _ in range(P)]
            dist.all_gather(pieces, param.detach().contiguous(), group=link.groups.expert)
            physical = torch.cat(pieces)  # rank r's slots at [r * S, (r + 1) * S)
            out[f"{prefix}.{leaf}" if prefix else leaf] = physical[first.to(physical.device)]
    return out


def last_exchange(model: nn.Module) -> list[ExchangeStats | None]:
    """Rows sent / received per rank in each converted layer's last forward."""
    return [link.last_exchange for _, link in expert_containers(model)]
