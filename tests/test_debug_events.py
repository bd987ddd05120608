"""Manual routing events: normalisation, per-event counts and sessions built from events."""

from __future__ import annotations

import datetime
import json
import math

import numpy as np
import pytest

from moe_router.debug.events import event_counts, normalize_event, session_from_events
from moe_router.debug.files import validate_session
from moe_router.debug.session import FORMAT, empty_counts
from moe_router.errors import InputError, InputTypeError


def test_old_style_event() -> None:
    event = normalize_event({"selected_expert": 3, "confidence": 0.8, "timestamp": 1700000000.0})
    assert event == {"layer": 0, "experts": [3], "weights": [1.0], "confidence": 0.8,
                     "timestamp": 1700000000.0, "token_id": None, "position": None,
                     "mode": "eval", "extra": {}}


def test_rich_event_with_numpy_values_and_extra_keys() -> None:
    event = normalize_event({
        "expert_ids": np.array([2, 5]), "routing_weights": np.array([0.75, 0.25], np.float32),
        "layer_idx": np.int32(2), "token": np.int64(17), "position": 4, "training": True,
        "logits": np.array([[1.0, np.nan]]), "note": ("a", 1), "score": np.float64(np.inf)})
    assert event["experts"] == [2, 5] and event["weights"] == [0.75, 0.25]
    assert (event["layer"], event["token_id"], event["position"], event["mode"]) == (2, 17, 4,
                                                                                      "train")
    assert event["extra"] == {"logits": [[1.0, None]], "note": ["a", 1], "score": None}
    assert all(type(e) is int for e in event["experts"])
    json.dumps(event, allow_nan=False)  # plain JSON


def test_defaults_and_aliases() -> None:
    event = normalize_event({"experts": [4, 1, 0], "layer_id": 1, "mode": "train",
                             "token": "hello"})
    assert event["weights"] == pytest.approx([1 / 3] * 3)  # unweighted: 1/k each
    assert event["layer"] == 1 and event["mode"] == "train"
    assert event["token_id"] is None and event["extra"] == {"token": "hello"}
    assert normalize_event({"experts": [], "training": False})["weights"] == []
    assert normalize_event({"selected_expert": 1, "experts": [1]})["experts"] == [1]
    when = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    assert normalize_event({"selected_expert": 0, "timestamp": when})["timestamp"] == \
        when.timestamp()


def test_normalising_twice_changes_nothing() -> None:
    once = normalize_event({"selected_experts": [1, 2], "weights": [0.5, 0.5], "x": {"y": 1},
                            "token_id": 9})
    assert normalize_event(once) == once


@pytest.mark.parametrize("event, error, argument, words", [
    ([3], InputTypeError, "event", "mapping"),
    ({"confidence": 0.8}, InputError, "event", "selected_expert"),
    ({"selected_expert": -1}, InputError, "event['selected_expert']", ">= 0"),
    ({"experts": [1, 2], "weights": [1.0]}, InputError, "event['weights']", "has 1 values"),
    ({"experts": [1, 2], "weights": [0.5, float("nan")]}, InputError, "event['weights']",
     "finite"),
    ({"experts": [1, 1]}, InputError, "event['experts']", "repeats"),
    ({"experts": [True]}, InputTypeError, "event['experts']", "int"),
    ({"experts": [1.5]}, InputTypeError, "event['experts']", "int"),
    ({"experts": "1"}, InputTypeError, "event['experts']", "list"),
    ({"selected_expert": 1, "experts": [2]}, InputError, "event['selected_expert']",
     "disagrees"),
    ({"experts": [1], "mode": "predict"}, InputError, "event['mode']", "'train' or 'eval'"),
    ({"experts": [1], "mode": "eval", "training": True}, InputError, "event['training']", "is"),
    ({"experts": [1], "confidence": float("inf")}, InputError, "event['confidence']", "finite"),
    ({"experts": [1], "layer": -2}, InputError, "event['layer']", ">= 0"),
])
def test_bad_events_name_argument_and_key(event, error, argument, words) -> None:
    with pytest.raises(error) as info:
        normalize_event(event)
    assert info.value.argument == argument
    assert words in str(info.value)


def test_session_errors_name_the_event_index() -> None:
    with pytest.raises(InputError) as info:
        session_from_events([{"selected_expert": 0}, {"experts": [0, 1], "weights": [1.0]}])
    assert info.value.argument == "events[1]['weights']"
    with pytest.raises(InputTypeError):
        session_from_events({"selected_expert": 0})


def test_event_counts() -> None:
    counts = event_counts({"experts": [2, 0], "weights": [0.7, 0.3]}, num_experts=4, max_slots=3)
    expected = empty_counts(4, 3)
    expected.update(calls=1, tokens=1, expert_tokens=[1, 0, 1, 0], k_hist=[0, 0, 1, 0],
                    top1_sum=0.7)
    assert counts == expected
    assert event_counts({"selected_expert": 1, "confidence": 0.25}, 2, 1)["top1_sum"] == 0.25
    assert event_counts({"experts": []}, 2, 1)["k_hist"] == [1, 0]
    with pytest.raises(InputError, match="num_experts=2"):
        event_counts({"selected_expert": 2}, 2, 1)
    with pytest.raises(InputError, match="max_slots=1"):
        event_counts({"experts": [0, 1]}, 2, 1)


def test_session_from_events_matches_hand_counts() -> None:
    rng = np.random.default_rng(0)
    events = []
    for i in range(60):
        layer, k = i % 2, 1 + i % 3
        experts = rng.choice(6, size=k, replace=False).tolist()
        weights = rng.dirichlet(np.ones(k)).tolist()
        events.append({"layer": layer, "experts": experts, "weights": weights,
                       "timestamp": 1000.0 + i, "mode": "train" if i % 5 == 0 else "eval"})
    session = session_from_events(events, name="manual")
    validate_session(session)
    json.dumps(session, allow_nan=False)
    assert session["format"] == FORMAT and session["framework"] is None
    assert session["name"] == "manual" and session["trace"] == [] and session["steps"] == []
    assert len(session["events"]) == 60
    assert session["started_at"].startswith("1970-01-01T00:16:40")
    assert session["ended_at"].startswith("1970-01-01T00:17:39")
    assert len(session["digest"]["id"]) == 16
    for layer in (0, 1):
        mine = [e for e in events if e["layer"] == layer]
        info = session["layers"][layer]
        assert info["num_experts"] == 1 + max(x for e in mine for x in e["experts"])
        assert info["max_slots"] == max(len(e["experts"]) for e in mine)
        assert info["name"] == f"layer_{layer}" and info["config"] is None
        for mode in ("train", "eval"):
            chosen = [e for e in mine if e["mode"] == mode]
            counts = session["totals"][mode][layer]
            tokens = np.zeros(info["num_experts"], int)
            for e in chosen:
                tokens[e["experts"]] += 1
            assert counts["expert_tokens"] == tokens.tolist()
            assert counts["tokens"] == counts["calls"] == len(chosen)
            assert counts["k_hist"] == np.bincount([len(e["experts"]) for e in chosen],
                                                   minlength=info["max_slots"] + 1).tolist()
            assert math.isclose(counts["top1_sum"], sum(max(e["weights"]) for e in chosen))
            assert counts["entropy_sum"] == counts["z_loss_sum"] == 0.0


def test_session_layers_and_num_experts_override() -> None:
    session = session_from_events([{"selected_expert": 1, "layer": 2}], num_experts=8)
    assert [info["num_experts"] for info in session["layers"]] == [8, 8, 8]
    assert session["totals"]["eval"][2]["expert_tokens"] == [0, 1, 0, 0, 0, 0, 0, 0]
    assert session["totals"]["eval"][0]["tokens"] == 0
    assert session["started_at"] and session["ended_at"] is None
    with pytest.raises(InputError, match="num_experts=8"):
        session_from_events([{"selected_expert": 8}], num_experts=8)
    empty = session_from_events([])
    assert empty["layers"] == [] and empty["totals"] == {"train": [], "eval": []}
