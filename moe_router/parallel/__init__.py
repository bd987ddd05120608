"""Expert parallelism helpers, framework-free (NumPy only).

:mod:`moe_router.parallel.placement` plans where experts live across expert-parallel ranks
(EPLB style: redundant replicas of hot experts, greedy balanced packing) and how routed slots
pick a replica (:func:`physical_ids`)::

    from moe_router.parallel import plan_placement, placement_report
    placement = plan_placement(load_E, num_ranks=4, num_redundant=4)
    print(placement_report(load_E, placement).table())
"""

from __future__ import annotations

from .placement import (
    Placement,
    PlacementReport,
    contiguous_placement,
    load_from_counts,
    load_from_debugger,
    load_from_trace,
    physical_ids,
    placement_report,
    plan_placement,
)

__all__ = ["Placement", "PlacementReport", "contiguous_placement", "load_from_counts",
           "load_from_debugger", "load_from_trace", "physical_ids", "placement_report",
           "plan_placement"]
