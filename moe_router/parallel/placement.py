"""Expert placement for expert parallelism: which rank holds which experts (EPLB style).

With expert parallelism over R ranks, each rank holds ``slots_per_rank`` *physical* slots; slot
``p`` lives on rank ``p // slots_per_rank`` and holds a replica of logical expert
``physical_to_logical[p]``. The contiguous layout (expert ``e`` on rank ``e // (E / R)``) puts a
hot expert's whole load on one rank. Like DeepSeek's EPLB (also in vLLM and SGLang),
:func:`plan_placement` takes the measured load per expert, gives ``num_redundant`` extra replicas
to the experts with the most load per replica, then packs the replicas heaviest first onto the
least loaded rank with a free slot, so the slowest rank (it sets the step time) carries as little
as possible. :func:`placement_report` compares max / mean rank loads (:meth:`Placement.rank_loads`
splits an expert's load evenly over its replicas).

Routing with replicas (every backend mirrors :func:`physical_ids`): the ``j``-th slot routed to
logical expert ``e`` in flat order (flat index ``t * K + k``; ``j`` is the slot's position in
``e``'s segment after the stable sort of the dispatch, so it costs nothing there) goes to physical
slot ``logical_to_physical[e][j % num_replicas(e)]``; ``-1`` stays ``-1``. This splits every
expert's slots over its replicas evenly (within one). ``rule="flat"`` (replica ``(t * K + k) %
num_replicas(e)``) is kept for comparison: it aliases when ``K`` and the replica count share a
factor and ``e`` sits mostly at one ``k`` (a hot expert is often the first choice): ``K = 2``,
2 replicas, ``e`` always at ``k = 0`` puts every slot on replica 0.

Measured load: :func:`load_from_counts` (arrays, per-layer mappings), :func:`load_from_trace` (an
offload ``RoutingTrace``), :func:`load_from_debugger` (a ``MoEDebugger``, session or events).
Each MoE layer has its own experts: plan one placement per layer from that layer's load::

    load_E = load_from_debugger(debugger, layer=3)
    placement = plan_placement(load_E, num_ranks=8, num_redundant=8)
    print(placement_report(load_E, placement).table())
    json.dump(placement.to_dict(), open("placement_layer3.json", "w"))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError

__all__ = ["Placement", "PlacementReport", "contiguous_placement", "load_from_counts",
           "load_from_debugger", "load_from_trace", "physical_ids", "placement_report",
           "plan_placement"]


def _count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(name, f"expected an int >= {minimum}, got {value!r}")
    return int(value)


def _load(load_E: Any, num_experts: int | None = None, name: str = "load_E") -> np.ndarray:
    try:
        arr = np.asarray(load_E, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise InputError(name, f"expected a 1-D array of per-expert loads, got {err}") from err
    if arr.ndim != 1 or (num_experts is not None and arr.size != num_experts):
        raise InputError(name, f"expected shape ({num_experts or 'experts'},), got {arr.shape}")
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise InputError(name, "expected finite loads >= 0")
    return arr


def _max_over_mean(loads: np.ndarray) -> float:
    mean = float(loads.mean()) if loads.size else 0.0
    return float(loads.max() / mean) if mean > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class Placement:
    """Physical expert slots over ranks: rank ``r`` owns slots ``[r * slots_per_rank, (r + 1)
    * slots_per_rank)``; ``physical_to_logical[p]`` is the logical expert (of ``num_experts``)
    slot ``p`` holds, every expert at least once.

    Raises:
        InputError: counts not ints >= 1, a length not a multiple of ``num_ranks``, an id
            outside ``[0, num_experts)`` or an expert without a slot.
    """

    num_experts: int
    num_ranks: int
    physical_to_logical: tuple[int, ...]

    def __post_init__(self) -> None:
        _count("num_experts", self.num_experts, 1)
        _count("num_ranks", self.num_ranks, 1)
        name = "physical_to_logical"
        try:
            ids = tuple(int(e) for e in self.physical_to_logical)
        except (TypeError, ValueError) as err:
            raise InputTypeError(name, f"expected a sequence of ints ({err})") from err
        if not ids or len(ids) % self.num_ranks:
            raise InputError(name, f"expected a non-empty length divisible by num_ranks="
                                   f"{self.num_ranks}, got {len(ids)}")
        if min(ids) < 0 or max(ids) >= self.num_experts:
            raise InputError(name, f"expected ids in [0, {self.num_experts}), got "
                                   f"{min(ids)}..{max(ids)}")
        missing = sorted(set(range(self.num_experts)) - set(ids))
        if missing:
            raise InputError(name, f"every expert needs a slot; missing {missing[:8]}")
        object.__setattr__(self, "physical_to_logical", ids)

    @property
    def num_slots(self) -> int:  # num_ranks * slots_per_rank
        return len(self.physical_to_logical)

    @property
    def slots_per_rank(self) -> int:
        return self.num_slots // self.num_ranks

    @property
    def replicas_E(self) -> np.ndarray:
        """``(E,)`` int64: physical copies of each expert."""
        return np.bincount(self.physical_to_logical, minlength=self.num_experts).astype(np.int64)

    def num_replicas(self, expert: int) -> int:
        return int(self.replicas_E[expert])

    @property
    def logical_to_physical(self) -> tuple[tuple[int, ...], ...]:
        """The physical slots of each expert, ascending."""
        out: list[list[int]] = [[] for _ in range(self.num_experts)]
        for p, e in enumerate(self.physical_to_logical):
            out[e].append(p)
        return tuple(tuple(slots) for slots in out)

    def rank_of_slot(self, slot: int) -> int:
        if not 0 <= slot < self.num_slots:
            raise InputError("slot", f"expected a slot in [0, {self.num_slots}), got {slot!r}")
        return int(slot) // self.slots_per_rank

    @property
    def is_contiguous(self) -> bool:
        """The identity placement (slot ``p`` holds expert ``p``, no replicas)."""
        return self.physical_to_logical == tuple(range(self.num_experts))

    def rank_loads(self, load_E: Any) -> np.ndarray:
        """``(R,)`` float64 predicted load (tokens) per rank: each expert's load split evenly
        over its replicas. Sums to ``load_E.sum()``."""
        load = _load(load_E, self.num_experts)
        ids = np.asarray(self.physical_to_logical)
        per_slot = load[ids] / self.replicas_E[ids]
        return np.bincount(np.arange(self.num_slots) // self.slots_per_rank, weights=per_slot,
                           minlength=self.num_ranks)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (to save next to a checkpoint)."""
        return {"num_experts": self.num_experts, "num_ranks": self.num_ranks,
                "slots_per_rank": self.slots_per_rank,
                "physical_to_logical": list(self.physical_to_logical)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Placement:
        """Rebuild from :meth:`to_dict` (``slots_per_rank`` is derived, not read)."""
        try:
            return cls(int(data["num_experts"]), int(data["num_ranks"]),
                       tuple(data["physical_to_logical"]))
        except KeyError as err:
            raise InputError("data", f"missing key {err}") from err


def contiguous_placement(num_experts: int, num_ranks: int) -> Placement:
    """Expert ``e`` on rank ``e // (E / R)``, no replicas (the usual EP layout).

    Raises:
        InputError: ``num_experts`` is not a multiple of ``num_ranks``.
    """
    E, R = _count("num_experts", num_experts, 1), _count("num_ranks", num_ranks, 1)
    if E % R:
        raise InputError("num_experts", f"expected a multiple of num_ranks={R}, got {E}")
    return Placement(E, R, tuple(range(E)))


def _replicas(load: np.ndarray, num_redundant: int, num_ranks: int) -> np.ndarray:
    """Replica counts: each extra replica goes to the expert with the most load per replica
    (ties: fewer replicas, then lower index), preferring experts with fewer than R replicas."""
    n, index = np.ones(load.size, dtype=np.int64), np.arange(load.size)
    for _ in range(num_redundant):
        n[np.lexsort((index, n, -(load / n), n >= num_ranks))[0]] += 1
    return n


def _repair(slots: list[list[int]], weight: np.ndarray) -> None:
    """Swap slots until no rank holds two replicas of one expert, where a swap can fix it
    (each swap removes a duplicate and adds none; the closest weights are swapped)."""
    changed = True
    while changed:
        changed = False
        for row in slots:
            dup = next((e for e in row if row.count(e) > 1), None)
            swaps = [] if dup is None else [
                (abs(weight[dup] - weight[f]), r2, j) for r2, row2 in enumerate(slots)
                if dup not in row2 for j, f in enumerate(row2) if f not in row]
            if swaps:
                _, r2, j = min(swaps)
                row[row.index(dup)], slots[r2][j] = slots[r2][j], dup
                changed = True


def plan_placement(load_E: Any, num_ranks: int, *, num_redundant: int = 0) -> Placement:
    """A balanced placement of ``E + num_redundant`` replicas on ``num_ranks`` ranks (greedy
    EPLB), deterministic (ties go to the lower index).

    1. Each of the ``num_redundant`` extra replicas goes, one at a time, to the expert with the
       most load per replica (among those with fewer than ``num_ranks`` replicas while any is).
    2. The replicas (``load_e / replicas_e`` each) are placed heaviest first, each on the least
       loaded rank that still has a free slot, preferring ranks that hold no replica of the same
       expert; then swaps move any remaining second copy of an expert off a rank when possible.
       Every rank gets ``(E + num_redundant) / num_ranks`` slots, sorted by expert id.

    Raises:
        InputError: ``load_E`` not 1-D, finite, >= 0 with >= ``num_ranks`` experts; ``num_ranks``
            < 1; ``num_redundant`` < 0 or ``E + num_redundant`` not a multiple of ``num_ranks``.
    """
    R, load = _count("num_ranks", num_ranks, 1), _load(load_E)
    E = load.size
    if E < R:
        raise InputError("load_E", f"expected at least num_ranks={R} experts, got {E}")
    extra = _count("num_redundant", num_redundant, 0)
    if (E + extra) % R:
        raise InputError("num_redundant", f"expected num_experts + num_redundant ({E} + "
                                          f"{extra}) to be a multiple of num_ranks={R}")
    per_rank = (E + extra) // R
    n = _replicas(load, extra, R)
    weight = load / n
    items = np.repeat(np.arange(E), n)
    items = items[np.argsort(-weight[items], kind="stable")]  # heaviest first, ties by id
    slots: list[list[int]] = [[] for _ in range(R)]
    rank_load = np.zeros(R)
    for e in items:
        free = [r for r in range(R) if len(slots[r]) < per_rank]
        fresh = [r for r in free if e not in slots[r]]
        r = min(fresh or free, key=lambda r: (rank_load[r], r))
        slots[r].append(int(e))
        rank_load[r] += weight[e]
    _repair(slots, weight)
    return Placement(E, R, tuple(e for row in slots for e in sorted(row)))


def physical_ids(ids_TK: Any, placement: Placement, *, rule: str = "occurrence") -> np.ndarray:
    """The physical slot of every routed slot (see the module docstring), ``-1`` kept.

    ``rule="flat"``: slot ``(t, k)`` of expert ``e`` goes to replica ``(t * K + k) %
    num_replicas(e)``; ``rule="occurrence"``: to replica ``j % num_replicas(e)`` where ``j``
    counts the earlier slots (flat order) routed to ``e``.

    Raises:
        InputError: ``ids_TK`` is not 2-D with ids in ``[-1, E)``; an unknown ``rule``.
        InputTypeError: ``ids_TK`` is not an integer array.
    """
    ids, E = np.asarray(ids_TK), placement.num_experts
    if ids.dtype.kind not in "iu":
        raise InputTypeError("ids_TK", f"expected integer expert ids, got dtype {ids.dtype}")
    if ids.ndim != 2 or (ids.size and (ids.min() < -1 or ids.max() >= E)):
        raise InputError("ids_TK", f"expected a (tokens, slots) array of ids in [-1, {E}), "
                                   f"got shape {ids.shape}")
    if rule not in ("flat", "occurrence"):
        raise InputError("rule", f"expected 'flat' or 'occurrence', got {rule!r}")
    n_E = placement.replicas_E
    table_EM = np.zeros((E, int(n_E.max())), dtype=np.int64)
    for e, slots in enumerate(placement.logical_to_physical):
        table_EM[e, : len(slots)] = slots
    flat = ids.reshape(-1).astype(np.int64)
    e = np.maximum(flat, 0)
    index = np.arange(flat.size)
    if rule == "occurrence":  # position in the expert's segment of a stable sort (dispatch)
        order = np.argsort(flat, kind="stable")
        index[order] = index - np.searchsorted(flat[order], flat[order], side="left")
    return np.where(flat >= 0, table_EM[e, index % n_E[e]], -1).reshape(ids.shape)


@dataclasses.dataclass(frozen=True)
class PlacementReport:
    """Predicted rank loads (:meth:`Placement.rank_loads`) of a placement and a baseline.

    ``max_over_mean`` is max / mean of ``rank_loads_R`` (1.0 = even; 1.0 too when all loads are
    0); ``baseline_*`` are the same for the baseline (``None`` without one); ``improvement`` is
    ``baseline_max_over_mean / max_over_mean`` (> 1: the busiest rank carries that many times
    less); ``num_replicas`` counts the placement's physical slots.
    """

    max_over_mean: float
    rank_loads_R: np.ndarray
    baseline_max_over_mean: float | None
    baseline_rank_loads_R: np.ndarray | None
    improvement: float | None
    num_replicas: int
    baseline_name: str = "contiguous"

    def table(self) -> str:
        """A Markdown table of both placements."""
        rows = [(f"planned ({self.num_replicas} slots)", self.max_over_mean, self.rank_loads_R)]
        if self.baseline_rank_loads_R is not None:
            rows.insert(0, (self.baseline_name, self.baseline_max_over_mean,
                            self.baseline_rank_loads_R))
        lines = ["| placement | max/mean | rank loads |", "|---|---|---|"]
        lines += [f"| {name} | {ratio:.3f} | {', '.join(f'{x:.4g}' for x in loads)} |"
                  for name, ratio, loads in rows]
        if self.improvement is not None:
            lines.append(f"\nimprovement: {self.improvement:.3f}x lower max/mean")
        return "\n".join(lines)


def placement_report(load_E: Any, placement: Placement,
                     baseline: Placement | None = None) -> PlacementReport:
    """Compare ``placement`` with ``baseline`` (default: :func:`contiguous_placement`, when E
    is a multiple of R) on the measured ``load_E``.

    Raises:
        InputError: ``load_E`` is not E finite loads >= 0, or ``baseline`` has another E or R.
    """
    load = _load(load_E, placement.num_experts)
    loads, name = placement.rank_loads(load), "baseline" if baseline else "contiguous"
    if baseline is None and placement.num_experts % placement.num_ranks == 0:
        baseline = contiguous_placement(placement.num_experts, placement.num_ranks)
    if baseline is not None and (baseline.num_experts, baseline.num_ranks) != \
            (placement.num_experts, placement.num_ranks):
        raise InputError("baseline", f"expected {placement.num_experts} experts on "
                                     f"{placement.num_ranks} ranks, got {baseline.num_experts} "
                                     f"on {baseline.num_ranks}")
    ratio = _max_over_mean(loads)
    base = None if baseline is None else baseline.rank_loads(load)
    base_ratio = None if base is None else _max_over_mean(base)
    return PlacementReport(ratio, loads, base_ratio, base, None if base_ratio is None
                           else base_ratio / ratio, placement.num_slots, name)


def load_from_counts(counts: Any) -> np.ndarray:
    """``(E,)`` float64 load per expert: ``counts`` summed over every leading axis (an
    ``(E,)``, ``(L, E)`` layers or ``(steps, E)`` array, e.g. ``plan.expert_counts`` stacked
    over steps), or a mapping ``layer -> counts`` whose values (each summed the same way, all
    with one E) are added up. Sum over layers only to share one placement between layers.

    Raises:
        InputError: no expert axis, non-finite or negative counts, an empty mapping or one
            whose values have different numbers of experts.
    """
    if isinstance(counts, Mapping):
        parts = [load_from_counts(v) for v in counts.values()]
        if len({p.size for p in parts}) != 1:
            raise InputError("counts", f"expected a non-empty mapping, one number of experts "
                                       f"for all layers; got {sorted({p.size for p in parts})}")
        return np.sum(parts, axis=0)
    try:
        arr = np.asarray(counts, dtype=np.float64)
    except (ValueError, TypeError) as err:
        raise InputError("counts", f"expected an array of per-expert counts, got {err}") from err
    if arr.ndim < 1 or not np.isfinite(arr).all() or (arr < 0).any():
        raise InputError("counts", f"expected finite counts >= 0 of shape (..., experts), got "
                                   f"shape {arr.shape}")
    return arr.reshape(-1, arr.shape[-1]).sum(axis=0)


def _layer(layer: Any, num_layers: int) -> int | None:
    if layer is None:
        return None
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
            or not 0 <= layer < num_layers:
        raise InputError("layer", f"expected None or a layer in [0, {num_layers}), got {layer!r}")
    return int(layer)


def load_from_trace(trace: Any, layer: int | None = None) -> np.ndarray:
    """``(E,)`` float64: how many steps of an offload :class:`~moe_router.offload.RoutingTrace`
    used each expert, in ``layer`` or summed over all layers (``None``). A trace keeps the
    distinct experts per step, so these are token counts only for a trace recorded per token
    (``record_trace(..., per_token=True)``); batch steps undercount hot experts.

    Raises:
        InputTypeError: ``trace`` is not a RoutingTrace.
        InputError: ``layer`` out of range.
    """
    from ..offload.trace import RoutingTrace

    if not isinstance(trace, RoutingTrace):
        raise InputTypeError("trace", f"expected a RoutingTrace, got {type(trace).__name__}")
    index = _layer(layer, trace.num_layers)
    ids = (trace.experts if index is None else trace.experts[:, index]).reshape(-1)
    return np.bincount(ids[ids >= 0], minlength=trace.num_experts).astype(np.float64)


def load_from_debugger(source: Any, layer: int | None = None,
                       mode: str | None = None) -> np.ndarray:
    """``(E,)`` float64 routed slots per expert (after capacity) measured by the debugger, of
    ``layer`` or summed over all layers (``None``; narrower layers zero-padded). ``source``: what
    :class:`~moe_router.debug.MoEAnalyzer` takes (a ``MoEDebugger``, a session dict or JSON
    path, routing events); ``mode``: ``"train"``, ``"eval"`` or ``None`` (both).

    Raises:
        InputError: ``layer`` out of range, an invalid session or ``mode``.
    """
    from ..debug.analyzer import MoEAnalyzer

    counts = [np.asarray(c["expert_tokens"], dtype=np.float64)
              for c in MoEAnalyzer(source).counts(mode)]
    index, width = _layer(layer, len(counts)), max((c.size for c in counts), default=0)
    return counts[index] if index is not None else \
        np.sum([np.pad(c, (0, width - c.size)) for c in counts], axis=0).reshape(width)
