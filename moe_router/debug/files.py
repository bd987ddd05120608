"""Session sources and files: loading and validating a session record (the one place that does),
JSON (the whole record) and CSV (per-expert rows for spreadsheets)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, InputTypeError
from .events import session_from_events
from .session import (
    FLOAT_FIELDS,
    FORMAT,
    INT_FIELDS,
    MODES,
    OFFLOAD_COUNTERS,
    OFFLOAD_GAUGES,
)

PathLike = str | os.PathLike[str]

#: the columns of :func:`write_csv`, in order
CSV_COLUMNS = ("layer", "layer_name", "mode", "expert", "tokens", "share",
               "layer_tokens", "layer_calls", "layer_slots", "dropped", "drop_rate",
               "mean_experts", "mean_entropy", "mean_top1", "max_over_mean", "cv", "jain")


def validate_session(session: Any, argument: str = "session") -> dict[str, Any]:
    """A shallow copy of ``session`` once it is a session record: its ``format``; a ``layers``
    list of dicts with the int fields ``index``, ``num_experts`` and ``max_slots``; ``totals``
    with one LAYER_COUNTS (every field, lists where lists) per layer, or none, for each mode;
    ``steps`` / ``trace`` / ``events`` lists of dicts (``[]`` in the copy when absent), each step
    with a ``step`` and a LAYER_COUNTS per layer in ``layers`` (fewer when the step was taken
    before a layer existed, as in a debugger's manual path); an optional ``offload`` section
    (absent or ``None`` in older records) with a ``layers`` list of OFFLOAD_LAYER dicts.

    Raises:
        InputTypeError: not a dict.
        InputError: anything else above, naming ``argument`` and where in it.
    """
    if not isinstance(session, Mapping):
        raise InputTypeError(argument, f"expected a session record (a dict with format "
                                       f"{FORMAT!r}), got {type(session).__name__}")
    if "format" not in session:
        raise InputError(argument, f"is not a moe-router session record: no 'format' key "
                                   f"(expected format {FORMAT!r}; keys: "
                                   f"{', '.join(map(repr, list(session)[:8])) or 'none'})")
    if session["format"] != FORMAT:
        raise InputError(f"{argument}['format']", f"{session['format']!r} is not supported: "
                                                  f"expected {FORMAT!r}")
    layers, totals = session.get("layers"), session.get("totals")
    if not isinstance(layers, list):
        raise InputError(f"{argument}['layers']", f"expected a list, got {layers!r:.80}")
    if not isinstance(totals, Mapping) or any(
            not isinstance(totals.get(m, []), list) or len(totals.get(m, [])) not in
            (0, len(layers)) for m in MODES):
        raise InputError(f"{argument}['totals']",
                         f"expected {{'train': [...], 'eval': [...]}} with one LAYER_COUNTS per "
                         f"layer ({len(layers)}) or none")
    session = dict(session)
    for i, layer in enumerate(layers):
        bad = [k for k in ("index", "num_experts", "max_slots")
               if not isinstance(layer, Mapping) or not isinstance(layer.get(k), int)]
        if bad:
            raise InputError(f"{argument}['layers'][{i}]", f"needs the int fields {bad}")
    for mode in MODES:
        _check_counts(totals.get(mode) or [], f"{argument}['totals'][{mode!r}]")
    for key in ("steps", "trace", "events"):
        session[key] = list(session.get(key) or [])
        if not all(isinstance(x, Mapping) for x in session[key]):
            raise InputError(f"{argument}[{key!r}]", "expected a list of dicts")
    for n, entry in enumerate(session["steps"]):
        rows = entry.get("layers")
        if not isinstance(rows, list) or len(rows) > len(layers) or "step" not in entry:
            raise InputError(f"{argument}['steps'][{n}]", f"needs 'step' and at most one "
                                                          f"LAYER_COUNTS per layer "
                                                          f"({len(layers)}) in 'layers'")
        _check_counts(rows, f"{argument}['steps'][{n}]['layers']")
    if session.get("offload") is not None:
        validate_offload(session["offload"], f"{argument}['offload']")
    return session


def validate_offload(section: Any, where: str) -> None:
    """``InputError`` unless ``section`` is an OFFLOAD dict: ``layers`` (and ``total`` when
    present) OFFLOAD_LAYER dicts with every counter a number and every gauge a number or
    ``None``."""
    if not isinstance(section, Mapping) or not isinstance(section.get("layers"), list):
        raise InputError(where, "expected an OFFLOAD dict with a 'layers' list (see "
                                "moe_router.debug.session)")
    rows = [(f"{where}['layers'][{i}]", row) for i, row in enumerate(section["layers"])]
    if section.get("total") is not None:
        rows.append((f"{where}['total']", section["total"]))
    number = (int, float)
    for at, row in rows:
        bad = [k for k in OFFLOAD_COUNTERS if not isinstance(row, Mapping)
               or isinstance(row.get(k), bool) or not isinstance(row.get(k), number)]
        bad += [k for k in OFFLOAD_GAUGES if isinstance(row, Mapping)
                and (k not in row or not (row[k] is None or isinstance(row[k], number)))]
        if bad:
            raise InputError(at, f"expected an OFFLOAD_LAYER dict; bad or missing: "
                                 f"{', '.join(bad)}")


def _check_counts(rows: Sequence[Any], where: str) -> None:
    """``InputError`` unless each row is a LAYER_COUNTS dict (all fields, lists where lists)."""
    fields = (*INT_FIELDS, *FLOAT_FIELDS, "expert_tokens", "k_hist")
    for i, counts in enumerate(rows):
        if not isinstance(counts, Mapping) or any(f not in counts for f in fields) \
                or not isinstance(counts["expert_tokens"], list) \
                or not isinstance(counts["k_hist"], list):
            raise InputError(f"{where}[{i}]", f"expected a LAYER_COUNTS dict with the fields "
                                              f"{', '.join(fields)}")


def load_session(source: Any, argument: str = "source") -> dict[str, Any]:
    """The session record of ``source``: an object with ``to_session()`` (a debugger), a session
    dict, a path to a JSON session (:func:`read_json`) or an iterable of event dicts
    (:func:`~moe_router.debug.events.session_from_events`); checked by :func:`validate_session`.

    Raises:
        InputTypeError: ``source`` is none of these.
        InputError: not a valid session record.
    """
    if hasattr(source, "to_session") and not isinstance(source, Mapping):
        return validate_session(source.to_session(), f"{argument}.to_session()")
    if isinstance(source, Mapping):
        return validate_session(source, argument)
    if isinstance(source, (str, os.PathLike)):
        return read_json(source, argument)
    if isinstance(source, Iterable) and not isinstance(source, bytes):
        return session_from_events(source)
    raise InputTypeError(argument, f"expected a debugger (with to_session()), a session dict, a "
                                   f"path to a session JSON or a list of event dicts; got "
                                   f"{type(source).__name__}")


def write_json(session: Any, path: PathLike) -> Path:
    """Write a session (anything :func:`load_session` takes) as indented JSON with sorted keys
    (so equal sessions give equal files); returns the path. Non-finite floats are written as
    ``NaN`` / ``Infinity``, which :func:`read_json` reads back."""
    data = load_session(session, "session")
    path = Path(path)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return path


def read_json(path: PathLike, argument: str = "path") -> dict[str, Any]:
    """Read a session record written by :func:`write_json` (checked by :func:`validate_session`;
    errors name ``argument``).

    Raises:
        OSError: the file cannot be read.
        InputError / InputTypeError: the file is not JSON or not a session record.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(argument, f"{os.fspath(path)!r} is not a JSON file ({err})") from None
    return validate_session(data, argument)


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else value


def write_csv(session: Any, path: PathLike) -> Path:
    """Write one row per layer x mode (``train``, ``eval``) x expert: the expert's ``tokens``
    (routing slots) and ``share`` of the layer's slots, then layer-level columns of that mode
    (see :data:`CSV_COLUMNS`; from :meth:`MoEAnalyzer.routing_stats`; empty cells for undefined
    numbers, e.g. the shares of a layer that got no slot). Returns the path."""
    from .analyzer import MoEAnalyzer  # the analyzer imports this module

    analyzer = MoEAnalyzer(load_session(session, "session"))
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for mode in MODES:
            for stats in analyzer.routing_stats(mode)["layers"]:
                layer_cells = [stats["tokens"], stats["calls"], stats["slots"], stats["dropped"],
                               stats["drop_rate"], stats["mean_experts"], stats["mean_entropy"],
                               stats["mean_top1"], stats["max_over_mean"], stats["cv"],
                               stats["jain"]]
                shares = stats["utilization"] or [None] * len(stats["expert_tokens"])
                for expert, (tokens, share) in enumerate(zip(stats["expert_tokens"], shares)):
                    writer.writerow([_cell(v) for v in (
                        stats["layer"], stats["name"], mode, expert, tokens, share,
                        *layer_cells)])
    return path
