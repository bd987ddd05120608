"""MoEAnalyzer and the session files, on hand-made session records with known answers."""

from __future__ import annotations

import csv
import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moe_router.debug.analyzer import LAYER_METRICS, MoEAnalyzer, layer_metrics, load_stats
from moe_router.debug.files import read_json, write_csv, write_json
from moe_router.debug.session import FORMAT, empty_counts
from moe_router.errors import InputError, InputTypeError


def counts(expert_tokens, k: int = 1, *, tokens=None, calls: int = 1, dropped: int = 0,
           entropy=None, top1=0.0, z_loss=0.0, aux=0.0, balance=0.0, k_hist=None) -> dict:
    """LAYER_COUNTS whose tokens all got ``k`` experts (unless ``tokens`` / ``k_hist`` say);
    the router entropy defaults to a healthy 0.8 ln(E) per token."""
    c = empty_counts(len(expert_tokens), k)
    n = sum(expert_tokens) // k if tokens is None else tokens
    hist = [0] * (k + 1)
    hist[k] = n
    c.update(calls=calls, tokens=n, expert_tokens=list(expert_tokens), dropped=dropped,
             k_hist=k_hist or hist, top1_sum=top1, z_loss_sum=z_loss, aux_loss_sum=aux,
             balance_sum=balance,
             entropy_sum=0.8 * n * math.log(len(expert_tokens)) if entropy is None else entropy)
    return c


def session(train, eval_=None, *, framework="numpy", configs=None, trace=(), steps=(),
            events=(), strategy="top_k", min_max=(None, None)) -> dict:
    """A session record with the given per-layer train (and eval) LAYER_COUNTS."""
    eval_ = eval_ or [empty_counts(len(c["expert_tokens"]), len(c["k_hist"]) - 1) for c in train]
    layers = [{"index": i, "name": f"model.layers.{i}.mlp", "num_experts": len(c["expert_tokens"]),
               "max_slots": len(c["k_hist"]) - 1, "strategy": strategy,
               "min_experts": min_max[0], "max_experts": min_max[1],
               "config": None if configs is None else configs[i]} for i, c in enumerate(train)]
    return {"format": FORMAT, "name": "test", "framework": framework,
            "started_at": "2026-01-01T00:00:00+00:00", "ended_at": None,
            "digest": {"config": "0", "weights": None, "inputs": None, "versions": {}, "id": "0"},
            "layers": layers, "totals": {"train": list(train), "eval": list(eval_)},
            "steps": list(steps), "trace": list(trace), "events": list(events)}


def row(layer, call, index, experts, weights, mode="train", position=0) -> dict:
    return {"layer": layer, "call": call, "mode": mode, "index": index, "position": position,
            "token_id": None, "experts": experts, "weights": weights}


# ----- load balance ------------------------------------------------------------------------
def test_utilization_rows_and_modes() -> None:
    s = session([counts([30, 10, 0, 40]), counts([0, 0, 0, 0])],
                [counts([10, 10, 10, 10]), counts([5, 0, 0, 0])])
    a = MoEAnalyzer(s)
    nan = [np.nan] * 4  # a layer that got no slot: undefined
    np.testing.assert_allclose(a.utilization("train"), [[.375, .125, 0, .5], nan])
    np.testing.assert_allclose(a.utilization("eval"), [[.25] * 4, [1, 0, 0, 0]])
    np.testing.assert_allclose(a.utilization(), [[40 / 120, 20 / 120, 10 / 120, 50 / 120],
                                                 [1, 0, 0, 0]])
    assert a.utilization().dtype == np.float64
    with pytest.raises(InputError) as info:
        a.utilization("test")
    assert info.value.argument == "mode"


def test_balance_numbers() -> None:
    a = MoEAnalyzer(session([counts([25] * 4), counts([40, 0, 0, 0]), counts([0] * 4)]))
    equal, one, empty = a.balance()
    assert equal == {"layer": 0, "max_over_mean": 1.0, "cv": 0.0, "jain": 1.0}
    assert one["max_over_mean"] == pytest.approx(4.0)
    # population std of (40, 0, 0, 0) is sqrt(((30)^2 + 3 * 10^2) / 4) = sqrt(300); mean 10
    assert one["cv"] == pytest.approx(math.sqrt(300) / 10)
    assert one["jain"] == pytest.approx(40 ** 2 / (4 * 40 ** 2))  # 1/E
    assert empty == {"layer": 2, "max_over_mean": None, "cv": None, "jain": None}


def test_balance_over_steps() -> None:
    steps = [{"step": 0, "time": 0.0, "mode": "train",
              "layers": [counts([10, 30]), counts([0, 0])]},
             {"step": 1, "time": 1.0, "mode": "train",
              "layers": [counts([20, 20]), counts([1, 3])]}]
    out = MoEAnalyzer(session([counts([30, 50]), counts([1, 3])], steps=steps)).balance_over_steps()
    assert out.shape == (2, 2)
    np.testing.assert_allclose(out, [[30 / 20, np.nan], [1.0, 3 / 2]])


def test_dead_experts() -> None:
    a = MoEAnalyzer(session([counts([100, 100, 100, 0]), counts([100] * 4),
                             counts([5, 5, 5, 0]), counts([100, 100, 100, 3]),
                             counts([100, 100, 100, 5])]))
    dead = a.dead_experts()
    assert [(d["layer"], d["expert"]) for d in dead] == [(0, 3), (3, 3)]
    assert dead[0] == {"layer": 0, "expert": 3, "tokens": 0, "share": 0.0,
                       "uniform_share": 0.25, "threshold_share": 0.05 / 4, "layer_slots": 300,
                       "expected_tokens": 75.0}
    assert dead[1]["share"] == pytest.approx(3 / 303)  # < 0.0125; 5 / 305 is not
    # layer 2: 15 slots over 4 experts = 3.75 expected < 20: too few to judge
    assert [d["layer"] for d in a.dead_experts(min_expected=3)] == [0, 2, 3]
    assert [d["layer"] for d in a.dead_experts(threshold=0.1)] == [0, 3, 4]


def test_collapse() -> None:
    E = 8
    top2_collapsed = counts([100, 100] + [0] * 6, k=2)
    uniform = counts([25] * E, k=2)
    low_entropy = counts([25] * E, k=2, entropy=100 * 0.05 * math.log(E))
    k_equals_e = counts([50, 50], k=2)
    a = MoEAnalyzer(session([top2_collapsed, uniform, low_entropy, k_equals_e,
                             counts([1, 0] + [0] * 6)]))
    result = a.collapse()
    assert [c["collapsing"] for c in result] == [True, False, True, False, None]
    assert result[0]["top_expert"] == 0 and result[0]["max_token_fraction"] == 1.0
    assert result[0]["max_share"] == 0.5
    assert result[2]["normalized_entropy"] == pytest.approx(0.05)
    assert result[2]["by_entropy"] and not result[2]["by_load"] and result[0]["by_load"]
    assert result[1]["normalized_entropy"] == pytest.approx(0.8)
    manual = MoEAnalyzer(session([uniform], framework=None)).collapse()
    assert manual[0]["normalized_entropy"] is None and manual[0]["collapsing"] is False


def test_drop_rate_and_k_distribution() -> None:
    c = counts([30, 60], k=2, tokens=50, dropped=10, k_hist=[5, 5, 40])
    a = MoEAnalyzer(session([c, counts([0, 0])]))
    assert a.drop_rate() == [pytest.approx(0.1), None]   # nothing routed nor dropped: undefined
    by_layer = a.k_distribution()
    assert by_layer[0] == {"layer": 0, "counts": [5, 5, 40], "fractions": [0.1, 0.1, 0.8],
                           "mean": pytest.approx(85 / 50)}
    assert by_layer[1]["mean"] is None and by_layer[1]["fractions"] is None
    with pytest.raises(InputError):
        a.k_distribution(by="expert")


def test_k_distribution_by_position_from_trace_and_events() -> None:
    trace = [row(0, 0, 0, [1], [1.0], position=0), row(0, 0, 1, [0, 1], [.5, .5], position=1),
             row(1, 0, 1, [0], [1.0], position=1)]
    events = [{"layer": 0, "experts": [], "weights": [], "confidence": None, "timestamp": None,
               "token_id": None, "position": 0, "mode": "eval", "extra": {}}]
    a = MoEAnalyzer(session([counts([10, 10], k=2), counts([10, 10], k=2)], trace=trace,
                            events=events))
    assert a.k_distribution("position") == [
        {"position": 0, "counts": [1, 1, 0], "tokens": 2, "mean": 0.5},
        {"position": 1, "counts": [0, 1, 1], "tokens": 2, "mean": 1.5}]
    assert a.k_distribution("position", layer=1) == [
        {"position": 1, "counts": [0, 1], "tokens": 1, "mean": 1.0}]
    assert a.k_distribution("position", mode="eval")[0]["counts"] == [1]


# ----- token level -------------------------------------------------------------------------
def test_coactivation_counts_pairs() -> None:
    trace = [row(0, 0, 0, [0, 2], [.6, .4]), row(0, 0, 1, [2, 0], [.5, .5]),
             row(0, 1, 0, [1, 2, 3], [.2, .3, .5]), row(0, 1, 1, [3], [1.0], mode="eval"),
             row(1, 0, 0, [0, 1], [.5, .5])]
    a = MoEAnalyzer(session([counts([10] * 4, k=3), counts([10] * 4, k=3)], trace=trace))
    expected = np.zeros((4, 4), int)
    for r in trace:
        if r["layer"] == 0:
            for i in r["experts"]:
                expected[i, i] += 1
            for i, j in itertools.permutations(r["experts"], 2):
                expected[i, j] += 1
    got = a.coactivation(0)
    np.testing.assert_array_equal(got, expected)
    assert got[0, 2] == got[2, 0] == 2 and got[1, 3] == 1 and got[3, 3] == 2
    assert a.coactivation(0, mode="eval").sum() == 1
    with pytest.raises(InputError):
        a.coactivation(2)


def test_paths_match_rows_by_call_mode_index() -> None:
    trace = [
        # token (call 0, index 0): top-1 by weight is 2 in layer 0 (second slot), 1 in layer 1
        row(0, 0, 0, [0, 2], [.3, .7]), row(1, 0, 0, [1, 3], [.9, .1]),
        row(0, 0, 1, [2], [1.0]), row(1, 0, 1, [1], [1.0]),
        row(0, 1, 0, [0], [1.0]), row(1, 1, 0, [3], [1.0]),
        row(0, 1, 0, [2], [1.0], mode="eval"), row(1, 1, 0, [1], [1.0], mode="eval"),
        row(0, 2, 5, [0], [1.0]),  # no layer-1 row: incomplete, not counted
    ]
    a = MoEAnalyzer(session([counts([10] * 4, k=2), counts([10] * 4, k=2)], trace=trace))
    assert a.paths() == [
        {"path": [2, 1], "layers": [0, 1], "count": 3, "share": 0.75},
        {"path": [0, 3], "layers": [0, 1], "count": 1, "share": 0.25}]
    with pytest.raises(InputError):
        a.paths(top=-1)
    assert a.paths(top=1, mode="train") == [
        {"path": [2, 1], "layers": [0, 1], "count": 2, "share": 2 / 3}]


# ----- summaries ---------------------------------------------------------------------------
def test_routing_stats_means() -> None:
    c = counts([30, 10, 0, 40], k=2, tokens=40, calls=4, dropped=20, entropy=20.0, top1=24.0,
               z_loss=80.0, aux=0.2, balance=4.4, k_hist=[0, 0, 40])
    stats = MoEAnalyzer(session([c])).routing_stats()
    json.dumps(stats, allow_nan=False)
    layer = stats["layers"][0]
    assert layer["name"] == "model.layers.0.mlp" and layer["tokens"] == 40
    assert layer["calls"] == 4 and layer["slots"] == 80
    assert layer["mean_experts"] == 2.0 and layer["k_histogram"] == [0, 0, 40]
    assert layer["mean_entropy"] == 0.5
    assert layer["normalized_entropy"] == pytest.approx(0.5 / math.log(4))
    assert layer["mean_top1"] == 0.6 and layer["mean_z_loss"] == 2.0
    assert layer["mean_aux_loss"] == pytest.approx(0.05)
    assert layer["mean_balance_loss"] == pytest.approx(1.1)
    assert layer["drop_rate"] == pytest.approx(0.2)
    assert layer["utilization"] == [.375, .125, 0.0, .5]
    assert layer["max_over_mean"] == pytest.approx(2.0)
    assert layer["dead_experts"] == 1   # 80 slots / 4 = 20 expected: judged; expert 2 got none
    assert stats["overall"]["tokens"] == 40 and stats["overall"]["drop_rate"] == pytest.approx(.2)
    assert stats["overall"]["mean_experts"] == 2.0
    manual = MoEAnalyzer(session([c], framework=None)).routing_stats()["layers"][0]
    assert manual["mean_entropy"] is None and manual["mean_aux_loss"] is None
    assert manual["mean_top1"] == 0.6
    empty = MoEAnalyzer(session([counts([0, 0, 0, 0], tokens=0, calls=0)])).routing_stats()
    assert empty["layers"][0]["utilization"] is None
    assert all(empty["layers"][0][k] is None for k in LAYER_METRICS)
    assert empty["overall"]["drop_rate"] is None and empty["overall"]["mean_experts"] is None


def by_hand(c: dict, known: bool = True) -> dict:
    """The derived metrics of one LAYER_COUNTS, computed here without moe_router (``None``:
    undefined: no traffic, too small to judge, or not measured)."""
    x, kh = np.asarray(c["expert_tokens"], float), np.asarray(c["k_hist"], float)
    tokens, calls, E, slots = c["tokens"], c["calls"], x.size, x.sum()

    def div(a, b):
        return a / b if b else None

    entropy = div(c["entropy_sum"], tokens) if known else None
    judge = tokens and slots / E >= 20
    return {"mean_experts": div((np.arange(kh.size) * kh).sum(), kh.sum()),
            "mean_entropy": entropy,
            "normalized_entropy": None if entropy is None else entropy / math.log(E),
            "mean_top1": div(c["top1_sum"], tokens),
            "mean_z_loss": div(c["z_loss_sum"], tokens) if known else None,
            "mean_balance_loss": div(c["balance_sum"], calls) if known else None,
            "mean_aux_loss": div(c["aux_loss_sum"], calls) if known else None,
            "drop_rate": div(c["dropped"], c["dropped"] + slots),
            "max_over_mean": div(x.max(), x.mean()) if slots else None,
            "cv": x.std() / x.mean() if slots else None,
            "jain": slots ** 2 / (E * (x ** 2).sum()) if slots else None,
            "dead_experts": int((x / slots < 0.05 / E).sum()) if judge else None}


@pytest.mark.parametrize("c", [
    counts([30, 10, 0, 40], k=2, tokens=40, calls=4, dropped=20, entropy=20.0, top1=24.0,
           z_loss=80.0, aux=0.2, balance=4.4, k_hist=[0, 0, 40]),
    counts([300, 1, 299, 0], k=2, tokens=300, calls=3, dropped=0, k_hist=[10, 0, 290]),
    counts([5, 5, 0], tokens=10),                            # too small to judge dead experts
    counts([0, 0, 0, 0], tokens=0, calls=0),                 # no traffic: everything undefined
    counts([0, 0], tokens=7, calls=1, dropped=3, k_hist=[7, 0]),  # tokens, but no slot routed
])
@pytest.mark.parametrize("known", [True, False])
def test_layer_metrics_is_the_one_definition(c, known) -> None:
    got = layer_metrics(c, known)
    assert tuple(got) == LAYER_METRICS
    for key, want in by_hand(c, known).items():
        assert (got[key] is None) == (want is None), key
        if want is not None:
            assert got[key] == pytest.approx(want), key
    # every per-layer summary reads this function
    s = session([c], framework="numpy" if known else None)
    a = MoEAnalyzer(s)
    row = a.routing_stats()["layers"][0]
    assert {k: row[k] for k in LAYER_METRICS} == got == a.metrics()[0]
    assert a.drop_rate() == [got["drop_rate"]]
    assert len(a.dead_experts()) == (got["dead_experts"] or 0)


def test_detect_issues() -> None:
    s = session([counts([100, 100, 100, 0]), counts([25] * 4), counts([500, 50, 50, 50]),
                 counts([100, 100], dropped=50)])
    issues = MoEAnalyzer(s).detect_issues()
    kinds = [(i["kind"], i["layer"], i["severity"]) for i in issues]
    assert kinds == [("dead_expert", 0, "warning"), ("imbalance", 2, "warning"),
                     ("drops", 3, "error")]
    dead = issues[0]["evidence"]
    assert dead["experts"] == [3] and dead["tokens"] == [0] and dead["layer_slots"] == 300
    assert dead["threshold"] == 0.05 and "layer 0" in issues[0]["message"]
    imbalance = issues[1]["evidence"]
    assert imbalance["max_over_mean"] == pytest.approx(500 / 162.5)
    assert imbalance["warning_threshold"] == 2.0
    assert issues[2]["evidence"]["drop_rate"] == pytest.approx(0.2)
    errors = MoEAnalyzer(s).detect_issues(imbalance_error=3.0)
    assert ("imbalance", 2, "error") in [(i["kind"], i["layer"], i["severity"]) for i in errors]
    assert MoEAnalyzer(session([counts([25] * 4)])).detect_issues() == []
    collapsed = MoEAnalyzer(session([counts([400, 0, 0, 0])])).detect_issues()
    assert {i["kind"] for i in collapsed} == {"dead_expert", "collapse", "imbalance"}
    assert all(i["severity"] == "error" for i in collapsed)
    low_entropy = counts([100] * 4, entropy=400 * 0.05 * math.log(4))
    issues = MoEAnalyzer(session([low_entropy])).detect_issues()
    assert [(i["kind"], i["severity"]) for i in issues] == [("collapse", "warning")]
    assert issues[0]["evidence"]["normalized_entropy"] == pytest.approx(0.05)
    json.dumps(collapsed, allow_nan=False)


def test_suggestions_come_from_session_numbers() -> None:
    config = {"d_model": 8, "router": {"strategy": "top_p", "top_p": 0.6, "aux_loss_coef": 0.01,
                                       "use_expert_bias": False, "capacity_factor": 1.25,
                                       "z_loss_coef": 0.0, "noise": "none"}}
    imbalanced = counts([500, 50, 50, 50], k=4, tokens=650, dropped=100, z_loss=650 * 200.0,
                        k_hist=[0, 0, 0, 0, 650])
    s = session([imbalanced], configs=[config], strategy="top_p", min_max=(1, 4))
    suggestions = MoEAnalyzer(s).generate_optimization_suggestions()
    texts = [x["suggestion"] for x in suggestions]
    assert "raise router.aux_loss_coef from 0.01 to 0.02 or more" in texts
    assert "enable aux-loss-free balancing (router.use_expert_bias=True)" in texts
    assert any("capacity_factor from 1.25 to 1.5625" in t for t in texts)
    assert "lower router.top_p from 0.6 (or raise router.max_experts)" in texts
    assert any("z_loss_coef > 0" in t for t in texts)
    for x in suggestions:
        assert set(x) == {"suggestion", "reason", "evidence"} and x["evidence"]["layers"] == [0]
    near_max = next(x for x in suggestions if "top_p" in x["suggestion"])
    assert near_max["evidence"]["per_layer"][0]["mean_experts"] == 4.0
    json.dumps(suggestions, allow_nan=False)
    assert MoEAnalyzer(session([counts([25] * 4)])).generate_optimization_suggestions() == []
    # top_k always routes max_slots experts: not a saturated dynamic router
    top_k = session([counts([25] * 4, k=2)], strategy="top_k", min_max=(1, None))
    assert MoEAnalyzer(top_k).generate_optimization_suggestions() == []
    saturated = session([counts([40] * 4, k=4)], strategy="threshold", min_max=(1, None),
                        configs=[{"router": {"threshold": 0.9}}])
    (only,) = MoEAnalyzer(saturated).generate_optimization_suggestions()
    assert only["suggestion"].startswith("lower router.threshold from 0.9")
    assert only["evidence"]["per_layer"][0]["max_experts"] == 4  # max_slots when None


# ----- sources and files -------------------------------------------------------------------
def test_sources(tmp_path) -> None:
    s = session([counts([100, 100, 100, 0])])

    class Debugger:
        def to_session(self) -> dict:
            return s

    path = write_json(s, tmp_path / "run.json")
    for source in (s, Debugger(), path, str(path)):
        np.testing.assert_allclose(MoEAnalyzer(source).utilization(), [[1 / 3] * 3 + [0]])
    from_events = MoEAnalyzer([{"selected_expert": 1}, {"selected_expert": 0}])
    np.testing.assert_allclose(from_events.utilization(), [[.5, .5]])
    with pytest.raises(InputError, match="moe-router-session/1"):
        MoEAnalyzer({**s, "format": "other/2"})
    with pytest.raises(InputError, match="no 'format' key"):
        MoEAnalyzer({"layers": []})
    with pytest.raises(InputTypeError):
        MoEAnalyzer(3.5)
    with pytest.raises(InputError, match="analyze_expert_utilization"):
        MoEAnalyzer().utilization()


def test_ragged_manual_totals_like_the_debugger() -> None:
    """The debugger's manual path grows only the mode that got an event."""
    s = session([counts([3, 1, 2])], framework=None)
    s["totals"]["train"] = [empty_counts(0, 0)]
    s["totals"]["eval"][0] = counts([3, 1, 2])
    s["totals"]["train"][0] = counts([0, 0, 0, 0, 4])
    a = MoEAnalyzer(s)
    np.testing.assert_allclose(a.utilization(), [[.3, .1, .2, 0, .4]])
    np.testing.assert_allclose(a.utilization("eval"), [[.5, 1 / 6, 1 / 3, 0, 0]])


def test_analyze_expert_utilization() -> None:
    events = [{"selected_expert": e, "confidence": 0.5} for e in [0] * 40 + [1] * 40 + [2] * 40]
    result = MoEAnalyzer().analyze_expert_utilization(events, num_experts=4, min_expected=10)
    assert result["total_events"] == 120
    assert result["expert_utilization"] == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0])
    layer = result["layers"][0]
    assert layer["expert_tokens"] == [40, 40, 40, 0] and layer["dead_experts"] == [3]
    assert layer["mean_confidence"] == 0.5
    assert layer["jain"] == pytest.approx(120 ** 2 / (4 * 3 * 40 ** 2))
    assert [d["expert"] for d in result["dead_experts"]] == [3]


def test_json_round_trip_is_stable(tmp_path) -> None:
    s = session([counts([1, 2])], trace=[row(0, 0, 0, [1], [1.0])])
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    write_json(s, first)
    write_json(read_json(first), second)
    assert read_json(first) == s
    assert first.read_text() == second.read_text()
    assert first.read_text().index('"digest"') < first.read_text().index('"format"')  # sorted
    (tmp_path / "bad.json").write_text('{"format": "x"}')
    with pytest.raises(InputError) as info:
        read_json(tmp_path / "bad.json")
    assert info.value.argument == "path['format']"
    (tmp_path / "junk.json").write_text("not json")
    with pytest.raises(InputError, match="not a JSON file"):
        read_json(tmp_path / "junk.json")


def test_write_csv(tmp_path) -> None:
    s = session([counts([30, 10, 0, 40]), counts([5, 5])], [counts([10] * 4), counts([0, 0])])
    path = write_csv(s, tmp_path / "run.csv")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == (4 + 2) * 2  # experts x layers x modes
    first = rows[0]
    assert (first["layer"], first["mode"], first["expert"], first["tokens"]) == ("0", "train",
                                                                                 "0", "30")
    assert float(first["share"]) == pytest.approx(.375)
    assert first["layer_tokens"] == "80" and float(first["max_over_mean"]) == pytest.approx(2.0)
    empty = [r for r in rows if r["layer"] == "1" and r["mode"] == "eval"]
    # undefined numbers are empty cells: no slot, so no shares, balance or drop rate
    assert [r["share"] for r in empty] == ["", ""] and empty[0]["jain"] == ""
    assert empty[0]["drop_rate"] == "" and empty[0]["layer_tokens"] == "0"


def test_modules_import_no_framework() -> None:
    code = ("import sys, moe_router.debug.analyzer, moe_router.debug.events, "
            "moe_router.debug.files, moe_router.debug.suggestions; "
            "print([m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@given(st.lists(st.lists(st.integers(0, 1000), min_size=1, max_size=12), min_size=1, max_size=5))
def test_utilization_and_balance_properties(loads) -> None:
    a = MoEAnalyzer(session([counts(x, tokens=sum(x)) for x in loads]))
    util = a.utilization()
    for x, u, b in zip(loads, util, a.balance()):
        if sum(x):
            assert u.sum() == pytest.approx(1.0) and np.all(u >= 0)
            E = len(x)
            assert 1 / E - 1e-12 <= b["jain"] <= 1 + 1e-12
            assert 1 - 1e-12 <= b["max_over_mean"] <= E + 1e-9
            assert b["cv"] >= 0
            assert load_stats(x) == {k: v for k, v in b.items() if k != "layer"}
        else:
            assert np.isnan(u[: len(x)]).all() and not u[len(x):].any()   # zero padding
            assert b["jain"] is None
