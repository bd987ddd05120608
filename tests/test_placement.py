"""Expert placement planner (moe_router.parallel.placement): EPLB-style replicas and packing."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_router.errors import InputError, InputTypeError
from moe_router.parallel import (
    Placement,
    contiguous_placement,
    load_from_counts,
    load_from_debugger,
    load_from_trace,
    physical_ids,
    placement_report,
    plan_placement,
)


def zipf_load(E: int = 16, s: float = 1.2, tokens: float = 10_000.0) -> np.ndarray:
    """Expected tokens per expert under a Zipf(s) popularity, hottest expert first."""
    w = 1.0 / np.arange(1, E + 1) ** s
    return tokens * w / w.sum()


def max_over_mean(loads: np.ndarray) -> float:
    return float(loads.max() / loads.mean())


@st.composite
def problems(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    """(load_E, num_ranks, num_redundant) with E + num_redundant a multiple of num_ranks."""
    R = draw(st.integers(1, 6))
    E = draw(st.integers(R, 20))
    extra = draw(st.integers(0, 12)) * R + (-E) % R
    load = draw(st.lists(st.one_of(st.just(0.0), st.floats(0, 1e4)), min_size=E, max_size=E))
    return np.asarray(load), R, extra


# ----- Placement and the contiguous layout ---------------------------------------------------
def test_contiguous_is_identity():
    p = contiguous_placement(8, 4)
    assert p.is_contiguous and p.slots_per_rank == 2 and p.num_slots == 8
    assert p.physical_to_logical == tuple(range(8))
    assert p.logical_to_physical == tuple((e,) for e in range(8))
    np.testing.assert_array_equal(p.replicas_E, np.ones(8))
    assert [p.rank_of_slot(s) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.num_replicas(5) == 1
    np.testing.assert_allclose(p.rank_loads(np.arange(8.0)), [1, 5, 9, 13])


def test_replicated_placement_views():
    p = Placement(3, 2, (0, 1, 0, 2))
    assert not p.is_contiguous and p.slots_per_rank == 2
    assert p.logical_to_physical == ((0, 2), (1,), (3,))
    assert p.num_replicas(0) == 2 and p.rank_of_slot(3) == 1
    np.testing.assert_allclose(p.rank_loads([10.0, 1.0, 2.0]), [6.0, 7.0])


def test_round_trip_through_json():
    p = plan_placement(zipf_load(), 4, num_redundant=4)
    data = json.loads(json.dumps(p.to_dict()))
    assert data["slots_per_rank"] == 5
    assert Placement.from_dict(data) == p


# ----- planning -------------------------------------------------------------------------------
def test_zipf_planning_lowers_max_over_mean():
    load = zipf_load(16, 1.2)
    contiguous = max_over_mean(contiguous_placement(16, 4).rank_loads(load))
    planned = plan_placement(load, 4)
    replicated = plan_placement(load, 4, num_redundant=4)
    planned_ratio = max_over_mean(planned.rank_loads(load))
    replicated_ratio = max_over_mean(replicated.rank_loads(load))
    assert contiguous > planned_ratio > replicated_ratio >= 1.0
    # Without replicas the hottest expert alone bounds the busiest rank; replicas break that.
    bound = load.max() / (load.sum() / 4)  # the rank holding the hottest expert, alone
    assert planned_ratio >= bound - 1e-12 and bound > replicated_ratio
    # with 4 slots per rank, the optimum: the hottest expert's rank also holds the 3 lightest
    optimum = (load.max() + np.sort(load)[:3].sum()) / (load.sum() / 4)
    assert planned_ratio == pytest.approx(optimum)
    assert replicated.replicas_E.sum() == 20 and replicated.replicas_E[0] > 1
    report = placement_report(load, replicated)
    assert report.baseline_max_over_mean == pytest.approx(contiguous)
    assert report.max_over_mean == pytest.approx(replicated_ratio)
    assert report.improvement == pytest.approx(contiguous / replicated_ratio)
    table = report.table()
    assert "contiguous" in table and "planned (20 slots)" in table and "improvement" in table


def test_uniform_load_is_already_balanced():
    load = np.full(16, 100.0)
    for extra in (0, 4):
        report = placement_report(load, plan_placement(load, 4, num_redundant=extra))
        assert report.max_over_mean == pytest.approx(1.0)
        assert report.baseline_max_over_mean == pytest.approx(1.0)


def test_all_zero_load_spreads_replicas_and_reads_as_even():
    p = plan_placement(np.zeros(4), 2, num_redundant=2)
    assert sorted(p.replicas_E.tolist()) == [1, 1, 2, 2]
    assert placement_report(np.zeros(4), p).max_over_mean == 1.0


def test_replicas_of_a_hot_expert_land_on_distinct_ranks():
    load = np.array([1000.0, 1, 1, 1, 1, 1, 1, 1])
    p = plan_placement(load, 4, num_redundant=4)
    assert p.num_replicas(0) == 4
    assert sorted(p.rank_of_slot(s) for s in p.logical_to_physical[0]) == [0, 1, 2, 3]
    loads = p.rank_loads(load)  # 4 x 250 from expert 0, then 7 unit experts over 4 ranks
    assert loads.max() - loads.min() <= 1.0 and loads.sum() == pytest.approx(load.sum())


def test_planning_is_deterministic_and_breaks_ties_by_index():
    load = np.array([5.0, 5.0, 5.0, 5.0])
    assert plan_placement(load, 2) == plan_placement(load, 2)
    assert plan_placement(load, 2).physical_to_logical == (0, 2, 1, 3)


@settings(max_examples=60, deadline=None)
@given(problems())
def test_plan_properties(problem):
    load, R, extra = problem
    p = plan_placement(load, R, num_redundant=extra)
    E = load.size
    assert (p.num_experts, p.num_ranks, p.num_slots) == (E, R, E + extra)
    assert p.slots_per_rank * R == E + extra
    assert (p.replicas_E >= 1).all() and p.replicas_E.sum() == E + extra
    loads = p.rank_loads(load)
    assert loads.shape == (R,) and loads.sum() == pytest.approx(load.sum(), rel=1e-9, abs=1e-6)
    if p.replicas_E.max() <= R:  # always possible then: each expert's replicas on distinct ranks
        for slots in p.logical_to_physical:
            assert len({p.rank_of_slot(s) for s in slots}) == len(slots)
    for r in range(R):  # each rank's slots are sorted by expert id
        row = p.physical_to_logical[r * p.slots_per_rank:(r + 1) * p.slots_per_rank]
        assert list(row) == sorted(row)
    assert plan_placement(load, R, num_redundant=extra) == p


@settings(max_examples=40, deadline=None)
@given(problems())
def test_planned_max_rank_load_obeys_the_greedy_bound(problem):
    # Greedy packing: the busiest rank exceeds the mean by at most the heaviest replica.
    load, R, extra = problem
    p = plan_placement(load, R, num_redundant=extra)
    heaviest = (load / p.replicas_E).max()
    assert p.rank_loads(load).max() <= load.sum() / R + heaviest + 1e-6 * (1 + load.sum())


# ----- routing with replicas -------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(problems(), st.integers(1, 40), st.integers(1, 4), st.integers(0, 2**16),
       st.sampled_from(["flat", "occurrence"]))
def test_physical_ids_map_into_the_right_replicas(problem, T, K, seed, rule):
    load, R, extra = problem
    p = plan_placement(load, R, num_redundant=extra)
    ids = np.random.default_rng(seed).integers(-1, p.num_experts, size=(T, K))
    phys = physical_ids(ids, p, rule=rule)
    assert phys.shape == ids.shape
    np.testing.assert_array_equal(phys == -1, ids == -1)
    logical = np.asarray(p.physical_to_logical)
    np.testing.assert_array_equal(logical[phys[ids >= 0]], ids[ids >= 0])
    n_E = p.replicas_E
    for e in range(p.num_experts):
        mask = ids == e
        if rule == "flat":  # exactly the documented rule: replica (t * K + k) % n_e
            flat = np.flatnonzero(mask.reshape(-1))
            expected = np.asarray(p.logical_to_physical[e])[flat % n_E[e]]
            np.testing.assert_array_equal(phys[mask], expected)
        else:  # every expert's slots split over its replicas within one of each other
            counts = [(phys[mask] == s).sum() for s in p.logical_to_physical[e]]
            assert max(counts) - min(counts) <= 1


@pytest.mark.parametrize("rule", ["flat", "occurrence"])
def test_both_rules_balance_a_hot_expert_over_its_replicas(rule):
    p = plan_placement(np.array([1000.0, 1, 1, 1, 1, 1]), 4, num_redundant=2)
    assert p.num_replicas(0) == 3
    ids = np.zeros((30, 1), dtype=np.int64)  # every token routed to expert 0
    counts = np.bincount(physical_ids(ids, p, rule=rule).reshape(-1), minlength=p.num_slots)
    assert counts[list(p.logical_to_physical[0])].tolist() == [10, 10, 10]


def test_flat_rule_aliases_when_k_and_replicas_share_a_factor():
    # The documented caveat: K = 2, expert 0 with 2 replicas, always at k = 0.
    p = Placement(6, 4, (0, 1, 0, 2, 3, 4, 1, 5))
    assert p.num_replicas(0) == 2
    ids = np.stack([np.zeros(40, dtype=np.int64), np.arange(40) % 5 + 1], axis=1)
    first, second = p.logical_to_physical[0]
    flat = physical_ids(ids, p, rule="flat")[:, 0]
    assert (flat == first).all() and not (flat == second).any()
    balanced = physical_ids(ids, p)[:, 0]  # the default rule: occurrence
    assert (balanced == first).sum() == (balanced == second).sum() == 20


# ----- measured load ------------------------------------------------------------------------------
def test_load_from_counts_sums_leading_axes_and_layers():
    c_LE = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(load_from_counts(c_LE[0]), [0, 1, 2, 3])
    np.testing.assert_array_equal(load_from_counts(c_LE), c_LE.sum(0))
    np.testing.assert_array_equal(load_from_counts(np.stack([c_LE, c_LE])), 2 * c_LE.sum(0))
    np.testing.assert_array_equal(load_from_counts({0: c_LE[0], 3: c_LE[1:]}), c_LE.sum(0))
    assert load_from_counts([1, 2]).dtype == np.float64


def test_load_from_trace_counts_steps_per_expert():
    from moe_router.offload import RoutingTrace

    trace = RoutingTrace.from_steps([[[0, 1], [2]], [[0], [2, 3]], [[0, 3], []]], num_experts=5)
    np.testing.assert_array_equal(load_from_trace(trace, layer=0), [3, 1, 0, 1, 0])
    np.testing.assert_array_equal(load_from_trace(trace, layer=1), [0, 0, 2, 1, 0])
    np.testing.assert_array_equal(load_from_trace(trace), [3, 1, 2, 2, 0])
    with pytest.raises(InputError) as err:
        load_from_trace(trace, layer=2)
    assert err.value.argument == "layer"
    with pytest.raises(InputTypeError):
        load_from_trace(np.zeros((2, 2, 2), dtype=int))


def test_load_from_debugger_events():
    events = [{"selected_experts": [0, 1], "layer": 0}, {"selected_experts": [0], "layer": 0},
              {"selected_experts": [2, 3], "layer": 1}, {"selected_experts": [3], "layer": 1}]
    np.testing.assert_array_equal(load_from_debugger(events, layer=0), [2, 1])
    np.testing.assert_array_equal(load_from_debugger(events, layer=1), [0, 0, 1, 2])
    np.testing.assert_array_equal(load_from_debugger(events), [2, 1, 1, 2])


# ----- typed errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("call, argument", [
    (lambda: plan_placement(np.ones((2, 4)), 2), "load_E"),
    (lambda: plan_placement([1.0, np.nan, 1.0, 1.0], 2), "load_E"),
    (lambda: plan_placement([1.0, -1.0, 1.0, 1.0], 2), "load_E"),
    (lambda: plan_placement([1.0, 2.0], 4), "load_E"),
    (lambda: plan_placement([1.0] * 4, 0), "num_ranks"),
    (lambda: plan_placement([1.0] * 4, 2, num_redundant=-2), "num_redundant"),
    (lambda: plan_placement([1.0] * 4, 2, num_redundant=1), "num_redundant"),
    (lambda: contiguous_placement(6, 4), "num_experts"),
    (lambda: Placement(4, 3, (0, 1, 2, 3)), "physical_to_logical"),
    (lambda: Placement(4, 2, (0, 1, 2, 4)), "physical_to_logical"),
    (lambda: Placement(4, 2, (0, 1, 2, 2)), "physical_to_logical"),
    (lambda: Placement(0, 2, (0, 1)), "num_experts"),
    (lambda: Placement.from_dict({"num_experts": 2}), "data"),
    (lambda: contiguous_placement(4, 2).rank_loads([1.0, 2.0]), "load_E"),
    (lambda: contiguous_placement(4, 2).rank_of_slot(4), "slot"),
    (lambda: placement_report([1.0] * 4, contiguous_placement(4, 2), contiguous_placement(4, 4)),
     "baseline"),
    (lambda: physical_ids(np.array([[0, 4]]), contiguous_placement(4, 2)), "ids_TK"),
    (lambda: physical_ids(np.array([0, 1]), contiguous_placement(4, 2)), "ids_TK"),
    (lambda: physical_ids(np.array([[0]]), contiguous_placement(4, 2), rule="x"), "rule"),
    (lambda: load_from_counts(np.float64(3.0)), "counts"),
    (lambda: load_from_counts([1.0, -1.0]), "counts"),
    (lambda: load_from_counts({0: [1, 2], 1: [1, 2, 3]}), "counts"),
    (lambda: load_from_counts({}), "counts"),
])
def test_typed_errors_name_the_argument(call, argument):
    with pytest.raises(InputError) as err:
        call()
    assert err.value.argument == argument
    assert type(err.value)(str(err.value)).argument == argument


def test_float_ids_are_a_type_error():
    with pytest.raises(InputTypeError) as err:
        physical_ids(np.zeros((2, 2)), contiguous_placement(4, 2))
    assert err.value.argument == "ids_TK"


def test_report_without_a_contiguous_baseline():
    load = zipf_load(14)
    report = placement_report(load, plan_placement(load, 4, num_redundant=2))
    assert report.baseline_max_over_mean is None and report.improvement is None
    assert "contiguous" not in report.table()


def test_import_pulls_no_framework():
    code = ("import sys, moe_router.parallel; "
            "print(sorted(m for m in ('torch', 'jax', 'tensorflow', 'moe_router.offload', "
            "'moe_router.debug') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
