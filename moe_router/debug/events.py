"""Manual routing events: the debugger's path without a model.

An event is one token's routing decision, given as a dict. The older "Explainable MoE Debugger"
keys (``{'selected_expert': 3, 'confidence': 0.8, 'timestamp': 1700000000.0}``) and richer ones
are accepted; :func:`normalize_event` turns either into the session's EVENT dict (see
:mod:`moe_router.debug.session`) and :func:`session_from_events` builds a whole session record.

=====================================================  ========================================
accepted keys (first one present wins)                 EVENT field
=====================================================  ========================================
``selected_expert`` (int), ``selected_experts``,       ``experts`` (required; ids >= 0, distinct;
``experts``, ``expert_ids`` (lists)                    an empty list is a token given no expert)
``weights``, ``expert_weights``, ``routing_weights``   ``weights`` (default: ``1/k`` each)
``confidence``                                         ``confidence`` (default ``None``)
``timestamp`` (seconds, or a ``datetime``)             ``timestamp`` (default ``None``)
``layer``, ``layer_id``, ``layer_idx``                 ``layer`` (default 0)
``token_id``, ``token`` (an int)                       ``token_id`` (default ``None``)
``position``                                           ``position`` (default ``None``)
``mode`` (``train`` / ``eval``) or ``training``        ``mode`` (default ``"eval"``)
(bool)
anything else (and a non-int ``token``)                ``extra`` (a JSON-safe dict)
=====================================================  ========================================

NumPy scalars and arrays (and anything with ``tolist()``) are accepted wherever a number or list
is. Normalising an EVENT again returns an equal EVENT.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError
from .digest import config_hash, digest
from .session import FORMAT, MODES, add_counts, empty_counts

EXPERT_KEYS = ("selected_expert", "selected_experts", "experts", "expert_ids")
WEIGHT_KEYS = ("weights", "expert_weights", "routing_weights")
LAYER_KEYS = ("layer", "layer_id", "layer_idx")
TOKEN_KEYS = ("token_id", "token")
_MODE_ALIASES = {"train": "train", "training": "train", "eval": "eval", "evaluation": "eval",
                 "inference": "eval", "test": "eval"}
_KNOWN = {*EXPERT_KEYS, *WEIGHT_KEYS, *LAYER_KEYS, *TOKEN_KEYS, "confidence", "timestamp",
          "position", "mode", "training", "extra"}


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON: NumPy and ``tolist()`` values unpacked, tuples and sets as lists,
    mapping keys as strings, non-finite floats as ``None``, other objects as their ``repr``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist"):
        return json_safe(value.tolist())
    if isinstance(value, (_dt.datetime, _dt.date)):
        return value.isoformat()
    return repr(value)


def _pick(event: Mapping[str, Any], keys: tuple[str, ...], argument: str) -> tuple[str, Any]:
    """The first of ``keys`` present (and its value); ``("", None)`` when none is."""
    found = [key for key in keys if key in event]
    if len(found) > 1:
        values = [_as_list(event[key]) for key in found]
        if any(v != values[0] for v in values[1:]):
            raise InputError(f"{argument}[{found[0]!r}]",
                             f"disagrees with {argument}[{found[1]!r}] ({values[0]!r} != "
                             f"{values[1]!r}); give one of {', '.join(map(repr, keys))}")
    return (found[0], event[found[0]]) if found else ("", None)


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def _as_list(value: Any) -> Any:
    value = _plain(value)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _int(value: Any, where: str, *, minimum: int | None = 0) -> int:
    value = _plain(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(where, f"expected an int, got {value!r} ({type(value).__name__})")
    if minimum is not None and value < minimum:
        raise InputError(where, f"expected an int >= {minimum}, got {value}")
    return value


def _float(value: Any, where: str) -> float:
    value = _plain(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(where, f"expected a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise InputError(where, f"expected a finite number, got {value!r}")
    return float(value)


def _list(value: Any, where: str) -> list[Any]:
    value = _plain(value)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [value]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InputTypeError(where, f"expected a number or a list of numbers, got {value!r} "
                                f"({type(value).__name__})")


def normalize_event(event: Mapping[str, Any], *, argument: str = "event") -> dict[str, Any]:
    """The session's EVENT dict of one routing event (keys: see the module docstring).

    Raises:
        InputTypeError: ``event`` is not a mapping, or a field has the wrong type.
        InputError: no expert key, a negative or repeated expert id, weights whose length is
            not the number of experts, a non-finite number, two keys that disagree, or an
            unknown ``mode``.
    """
    if not isinstance(event, Mapping):
        raise InputTypeError(argument, f"expected a mapping of routing-event fields (such as "
                                       f"{{'selected_expert': 3}}), got {type(event).__name__}")
    key, raw = _pick(event, EXPERT_KEYS, argument)
    if not key:
        raise InputError(argument, f"has no expert key: expected one of "
                                   f"{', '.join(map(repr, EXPERT_KEYS))} (keys: "
                                   f"{', '.join(map(repr, event)) or 'none'})")
    where = f"{argument}[{key!r}]"
    experts = [_int(e, where) for e in _list(raw, where)]
    if len(set(experts)) != len(experts):
        raise InputError(where, f"repeats an expert id: {experts}")

    wkey, wraw = _pick(event, WEIGHT_KEYS, argument)
    if wkey and wraw is not None:
        where = f"{argument}[{wkey!r}]"
        weights = [_float(w, where) for w in _list(wraw, where)]
        if len(weights) != len(experts):
            raise InputError(where, f"has {len(weights)} values but {argument}[{key!r}] has "
                                    f"{len(experts)} experts")
    else:
        weights = [1.0 / len(experts)] * len(experts) if experts else []

    optional: dict[str, Any] = {}
    for name in ("confidence", "timestamp"):
        value = event.get(name)
        if isinstance(value, _dt.datetime) and name == "timestamp":
            value = value.timestamp()
        optional[name] = None if value is None else _float(value, f"{argument}[{name!r}]")
    lkey, layer = _pick(event, LAYER_KEYS, argument)
    layer = 0 if layer is None else _int(layer, f"{argument}[{lkey!r}]")
    extra: dict[str, Any] = {}
    token_event = dict((k, event[k]) for k in TOKEN_KEYS if event.get(k) is not None)
    if "token" in token_event and not isinstance(_plain(token_event["token"]), (int, float)):
        extra["token"] = json_safe(token_event.pop("token"))  # token text, not an id
    tkey, token = _pick(token_event, TOKEN_KEYS, argument)
    token_id = None if token is None else _int(token, f"{argument}[{tkey!r}]", minimum=None)
    position = event.get("position")
    position = None if position is None else _int(position, f"{argument}['position']")
    mode = _mode(event, argument)

    if isinstance(event.get("extra"), Mapping):
        extra.update(json_safe(event["extra"]))
    elif "extra" in event:
        extra["extra"] = json_safe(event["extra"])
    for name, value in event.items():
        if name not in _KNOWN:
            extra[str(name)] = json_safe(value)
    return {"layer": layer, "experts": experts, "weights": weights, **optional,
            "token_id": token_id, "position": position, "mode": mode, "extra": extra}


def _mode(event: Mapping[str, Any], argument: str) -> str:
    mode = None
    if event.get("mode") is not None:
        raw = event["mode"]
        mode = _MODE_ALIASES.get(str(raw).lower()) if isinstance(raw, str) else None
        if mode is None:
            raise InputError(f"{argument}['mode']", f"expected 'train' or 'eval', got {raw!r}")
    if event.get("training") is not None:
        flag = _plain(event["training"])
        if not isinstance(flag, bool):
            raise InputTypeError(f"{argument}['training']", f"expected a bool, got {flag!r}")
        from_flag = "train" if flag else "eval"
        if mode is not None and mode != from_flag:
            raise InputError(f"{argument}['training']",
                             f"is {flag} but {argument}['mode'] is {event['mode']!r}")
        mode = from_flag
    return mode or "eval"


def event_counts(event: Mapping[str, Any], num_experts: int, max_slots: int) -> dict[str, Any]:
    """LAYER_COUNTS of one event, counted as one call of one token.

    ``calls = tokens = 1``; ``expert_tokens[e] = 1`` for each chosen expert;
    ``k_hist[len(experts)] = 1``; ``dropped = 0``; ``top1_sum`` = ``confidence``, else the
    largest weight (0.0 for a token given no expert); ``entropy_sum``, ``z_loss_sum``,
    ``balance_sum`` and ``aux_loss_sum`` are unknown and set to 0.0 (the analyzer reports them
    as ``None`` for a session without a framework).

    Raises:
        InputError: an expert id >= ``num_experts`` or more than ``max_slots`` experts.
    """
    event = normalize_event(event)
    counts = empty_counts(num_experts, max_slots)
    experts = event["experts"]
    if len(experts) > max_slots:
        raise InputError("event['experts']", f"has {len(experts)} experts, more than "
                                             f"max_slots={max_slots}")
    for e in experts:
        if e >= num_experts:
            raise InputError("event['experts']", f"expert id {e} >= num_experts={num_experts}")
        counts["expert_tokens"][e] += 1
    counts["calls"] = counts["tokens"] = 1
    counts["k_hist"][len(experts)] = 1
    confidence = event["confidence"]
    counts["top1_sum"] = float(confidence if confidence is not None
                               else max(event["weights"], default=0.0))
    return counts


def _iso(seconds: float | None) -> str | None:
    if seconds is None:
        return None
    return _dt.datetime.fromtimestamp(seconds, _dt.UTC).isoformat()


def session_from_events(events: Iterable[Mapping[str, Any]], name: str = "events", *,
                        num_experts: int | None = None) -> dict[str, Any]:
    """A session record (``framework`` ``None``) of manual routing events.

    Layers ``0 .. max(layer)`` are listed (named ``layer_<i>``, like the debugger's manual
    path; a layer with no event gets no experts). A layer's ``num_experts`` is its largest
    expert id + 1 (or ``num_experts`` when given, which must cover every id), ``max_slots`` its
    largest k; ``strategy``, ``min_experts``, ``max_experts`` and ``config`` are unknown
    (``None``). ``totals`` add :func:`event_counts` per mode; ``steps`` and ``trace`` are empty.
    ``started_at`` / ``ended_at`` are the first / last timestamps (``started_at`` is the current
    time when no event has one). ``digest.config`` hashes the expert counts (as the debugger
    does without a model), ``digest.inputs`` the normalised events.
    """
    if isinstance(events, (Mapping, str, bytes)) or not isinstance(events, Iterable):
        raise InputTypeError("events", f"expected an iterable of event dicts, got "
                                       f"{type(events).__name__}")
    normalized = [normalize_event(e, argument=f"events[{i}]") for i, e in enumerate(events)]
    if num_experts is not None:
        num_experts = _int(num_experts, "num_experts", minimum=1)
        for i, event in enumerate(normalized):
            if any(e >= num_experts for e in event["experts"]):
                raise InputError(f"events[{i}]", f"expert ids {event['experts']} are not all "
                                                 f"< num_experts={num_experts}")
    num_layers = 1 + max((e["layer"] for e in normalized), default=-1)
    layers = []
    for index in range(num_layers):
        mine = [e for e in normalized if e["layer"] == index]
        ks = [len(e["experts"]) for e in mine]
        experts = num_experts if num_experts is not None else \
            1 + max((x for e in mine for x in e["experts"]), default=-1)
        layers.append({"index": index, "name": f"layer_{index}", "num_experts": experts,
                       "max_slots": max(ks, default=0), "strategy": None, "min_experts": None,
                       "max_experts": None, "config": None})
    totals: dict[str, list[dict[str, Any]]] = {
        mode: [empty_counts(info["num_experts"], info["max_slots"]) for info in layers]
        for mode in MODES}
    for event in normalized:
        layer = layers[event["layer"]]
        counts = event_counts(event, layer["num_experts"], layer["max_slots"])
        row = totals[event["mode"]]
        row[event["layer"]] = add_counts(row[event["layer"]], counts)
    stamps = [e["timestamp"] for e in normalized if e["timestamp"] is not None]
    started = _iso(min(stamps)) if stamps else _dt.datetime.now(_dt.UTC).isoformat()
    inputs = hashlib.sha256(json.dumps(normalized, sort_keys=True).encode()).hexdigest()
    record = digest(config_hash([info["num_experts"] for info in layers]), None, inputs)
    return {"format": FORMAT, "name": name, "framework": None, "started_at": started,
            "ended_at": _iso(max(stamps)) if stamps else None, "digest": record,
            "layers": layers, "totals": totals, "steps": [], "trace": [],
            "events": normalized}

