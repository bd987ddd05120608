"""The live monitoring server: ``/metrics`` (Prometheus), ``/health``, ``/api/session`` and a
self-refreshing page (``/``) over a debugger, a saved session file or a serving router.

``debugger.serve(port=0)`` (or :func:`serve`) runs it in a daemon thread beside a training or
serving loop; ``moe-router serve [--session FILE]`` runs it in the foreground. Needs the
``serve`` extra (starlette, uvicorn, prometheus_client); ``import moe_router.server`` loads none
of them (they are imported when an app is built). See ``docs/debugging.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .runner import ServerHandle, bind, run, serve
from .sources import (
    DebuggerSource,
    MonitorSource,
    RouterSource,
    SessionFileSource,
    Snapshots,
    as_source,
)

if TYPE_CHECKING:
    from starlette.applications import Starlette

__all__ = ["DebuggerSource", "MonitorSource", "RouterSource", "ServerHandle",
           "SessionFileSource", "Snapshots", "as_source", "bind", "create_app", "run", "serve"]


def create_app(source: Any, **kw: Any) -> Starlette:
    """The Starlette app of ``source`` (:func:`moe_router.server.app.create_app`)."""
    from .app import create_app as _create_app

    return _create_app(source, **kw)
