"""What the monitoring server reads: the :class:`MonitorSource` protocol, its adapters, and a
lock-guarded snapshot cache.

A source answers three questions: the current session record (``session()``, format
``moe-router-session/1``, or ``None`` when it has none), its health given that record
(``health(session)``) and, for a serving router, its request metrics (``router_metrics()``).
Adapters: :class:`DebuggerSource` (a live :class:`~moe_router.debug.MoEDebugger`),
:class:`SessionFileSource` (a saved session file, re-read when it changes) and
:class:`RouterSource` (duck-typed: ``health_check()``, ``get_metrics()``, ``.debugger``).

:class:`Snapshots` holds the last :class:`Snapshot` only (memory stays bounded however long the
server runs) and recomputes it at most once per ``ttl`` seconds, under a lock, so concurrent
requests share one read of the debugger (whose training loop updates it meanwhile).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ..errors import InputError, InputTypeError

__all__ = ["STATUSES", "DebuggerSource", "MonitorSource", "RouterSource", "SessionFileSource",
           "Snapshot", "Snapshots", "as_source", "dumps"]

#: health statuses, best first (``error`` answers HTTP 503)
STATUSES = ("ok", "degraded", "error")


@runtime_checkable
class MonitorSource(Protocol):
    """What the server reads; every method is called from a server worker thread."""

    kind: str

    def session(self) -> dict[str, Any] | None:
        """The current session record, or ``None`` when there is none."""

    def health(self, session: Mapping[str, Any] | None) -> dict[str, Any]:
        """``{"status": one of STATUSES, "issues": [...], ...}`` given ``session()``'s record."""

    def router_metrics(self) -> dict[str, Any] | None:
        """Serving metrics (``requests``, ``errors``, ``latency_ms``, ...) or ``None``."""


def _issue_health(session: Mapping[str, Any] | None,
                  thresholds: Mapping[str, Any]) -> dict[str, Any]:
    """ok without issues, degraded with any (routing problems do not stop the process)."""
    if session is None:
        return {"status": "ok", "issues": []}
    from ..debug.analyzer import MoEAnalyzer

    issues = MoEAnalyzer(session).detect_issues(**thresholds)
    return {"status": "degraded" if issues else "ok", "issues": issues}


class DebuggerSource:
    """A live :class:`~moe_router.debug.MoEDebugger`: ``to_session()`` (thread-safe there) and
    the issues of :meth:`MoEAnalyzer.detect_issues` on that record (the same findings as
    ``debugger.detect_issues()``, without firing its ``issue`` callbacks at every poll)."""

    kind = "debugger"

    def __init__(self, debugger: Any, thresholds: Mapping[str, Any] | None = None) -> None:
        if not callable(getattr(debugger, "to_session", None)):
            raise InputTypeError("debugger", f"expected a MoEDebugger (with to_session()), got "
                                             f"{type(debugger).__name__}")
        self.debugger = debugger
        self.thresholds = dict(thresholds or {})

    def session(self) -> dict[str, Any] | None:
        return self.debugger.to_session()

    def health(self, session: Mapping[str, Any] | None) -> dict[str, Any]:
        return _issue_health(session, self.thresholds)

    def router_metrics(self) -> dict[str, Any] | None:
        return None


class SessionFileSource:
    """A saved session record (a JSON file, or a session dict given directly). The file is
    checked now (errors name ``path``) and re-read whenever its mtime or size changes, so a run
    that rewrites it with ``export_session`` is followed live; a later bad rewrite keeps the last
    good record and reports health ``error``. Errors name ``argument`` (default: the path)."""

    kind = "session-file"

    def __init__(self, path: str | os.PathLike[str] | Mapping[str, Any],
                 thresholds: Mapping[str, Any] | None = None,
                 argument: str | None = None) -> None:
        from ..debug.files import load_session

        self.thresholds = dict(thresholds or {})
        self.argument = argument
        self.error: str | None = None
        self._lock = threading.Lock()
        if isinstance(path, Mapping):
            self.kind = "session"
            self.path: str | None = None
            self._record = load_session(dict(path), "session")
            self._stamp: tuple[int, int] | None = None
            return
        if not isinstance(path, (str, os.PathLike)):
            raise InputTypeError("path", f"expected a session file path or a session dict, got "
                                         f"{type(path).__name__}")
        self.path = os.fspath(path)
        self._stamp = self._stat()
        self._record = self._read()

    def _stat(self) -> tuple[int, int]:
        assert self.path is not None
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size

    def _read(self) -> dict[str, Any]:
        from ..debug.files import read_json

        assert self.path is not None
        return read_json(self.path, argument=self.argument or self.path)

    def session(self) -> dict[str, Any] | None:
        if self.path is None:
            return self._record
        with self._lock:
            try:
                stamp = self._stat()
                if stamp != self._stamp:
                    self._record, self._stamp, self.error = self._read(), stamp, None
            except (OSError, ValueError) as err:  # InputError is a ValueError
                self.error = f"cannot reload {self.path}: {err}"
            return self._record

    def health(self, session: Mapping[str, Any] | None) -> dict[str, Any]:
        out = _issue_health(session, self.thresholds)
        if self.error is not None:
            out.update(status="error", error=self.error)
        return out

    def router_metrics(self) -> dict[str, Any] | None:
        return None


class RouterSource:
    """A serving router (duck-typed, e.g. ``moe_router.production.ProductionRouter``):
    ``health_check()`` gives the health (its ``issues`` come from the router's debugger),
    ``get_metrics()`` the request metrics, ``.debugger`` (may be ``None``) the session."""

    kind = "router"

    def __init__(self, router: Any) -> None:
        missing = [m for m in ("health_check", "get_metrics")
                   if not callable(getattr(router, m, None))]
        if missing:
            raise InputTypeError("router", f"expected a router with health_check() and "
                                           f"get_metrics(); {type(router).__name__} lacks "
                                           f"{', '.join(missing)}")
        self.router = router

    def session(self) -> dict[str, Any] | None:
        debugger = getattr(self.router, "debugger", None)
        return None if debugger is None else debugger.to_session()

    def health(self, session: Mapping[str, Any] | None) -> dict[str, Any]:
        out = dict(self.router.health_check())
        if out.get("status") not in STATUSES:
            out["error"] = f"router health_check() gave status {out.get('status')!r}"
            out["status"] = "error"
        out["issues"] = list(out.get("issues") or [])
        return out

    def router_metrics(self) -> dict[str, Any] | None:
        return dict(self.router.get_metrics())


def as_source(obj: Any, thresholds: Mapping[str, Any] | None = None) -> MonitorSource:
    """``obj`` as a :class:`MonitorSource`: a source as is, a router (``health_check`` and
    ``get_metrics``), a debugger (``to_session``), a session file path or a session dict."""
    if isinstance(obj, (DebuggerSource, SessionFileSource, RouterSource)):
        return obj
    if callable(getattr(obj, "health_check", None)) and callable(getattr(obj, "get_metrics",
                                                                         None)):
        return RouterSource(obj)
    if callable(getattr(obj, "to_session", None)):
        return DebuggerSource(obj, thresholds)
    if isinstance(obj, (str, os.PathLike, Mapping)):
        return SessionFileSource(obj, thresholds)
    if isinstance(obj, MonitorSource):
        return obj
    raise InputTypeError("source", f"expected a MoEDebugger, a router, a session file path, a "
                                   f"session dict or a MonitorSource, got {type(obj).__name__}")


# ----- snapshots -------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def dumps(value: Any) -> bytes:
    """Strict JSON bytes (NaN / inf become ``null``; unknown objects their ``str``)."""
    try:
        text = json.dumps(value, allow_nan=False, default=str, separators=(",", ":"))
    except ValueError:
        text = json.dumps(_finite(value), allow_nan=False, default=str, separators=(",", ":"))
    return text.encode("utf-8")


def _summary(session: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A few headline numbers of the session for ``/health`` (with the expert store's overall
    hit rate when the session has an ``"offload"`` section)."""
    if session is None:
        return None
    totals = session.get("totals") or {}
    rows = [c for mode in ("train", "eval") for c in totals.get(mode) or []]
    offload = session.get("offload")
    extra = {} if not offload else {"offload_hit_rate": (offload.get("total") or {})
                                    .get("hit_rate")}
    return {"name": session.get("name"), "framework": session.get("framework"),
            "running": session.get("ended_at") is None and session.get("started_at") is not None,
            "layers": len(session.get("layers") or []),
            "calls": sum(int(c["calls"]) for c in rows),
            "tokens": sum(int(c["tokens"]) for c in rows),
            "steps": len(session.get("steps") or []),
            "digest": (session.get("digest") or {}).get("id"), **extra}


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One read of a source: the session (and its JSON), the health body, router metrics."""

    taken_at: float
    session: dict[str, Any] | None
    session_json: bytes
    health: dict[str, Any]
    router: dict[str, Any] | None


class Snapshots:
    """The last :class:`Snapshot` of ``source``, recomputed when older than ``ttl`` seconds
    (``0``: at every request); one thread computes while the others wait for its result."""

    def __init__(self, source: MonitorSource, ttl: float = 1.0) -> None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl >= 0:
            raise InputError("cache_ttl", f"expected seconds >= 0, got {ttl!r}")
        self.source, self.ttl = source, float(ttl)
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._last: Snapshot | None = None

    def get(self) -> Snapshot:
        """The cached snapshot, or a fresh one when it is older than ``ttl``."""
        with self._lock:
            now = time.monotonic()
            if self._last is None or now - self._last.taken_at >= self.ttl or self.ttl == 0:
                self._last = self._take(now)
            return self._last

    def _take(self, now: float) -> Snapshot:
        source, error = self.source, None
        session = router = None
        try:
            session = source.session()
            health = dict(source.health(session))
        except Exception as err:  # a broken source is an unhealthy one, not a dead server
            error = f"{type(err).__name__}: {err}"
            health = {"status": "error", "issues": [], "error": error}
        if error is None:
            try:
                router = source.router_metrics()
            except Exception as err:
                health.update(status="error", error=f"router metrics: {type(err).__name__}: "
                                                    f"{err}")
        if router is not None:
            health["router_metrics"] = router
        health.setdefault("uptime_s", round(now - self.started, 3))
        health.update(source=source.kind, session=_summary(session),
                      checked_at=datetime.datetime.now(datetime.UTC).isoformat(
                          timespec="seconds"))
        body = dumps(session) if session is not None else b"null"
        return Snapshot(now, session, body, _finite(health), router)
