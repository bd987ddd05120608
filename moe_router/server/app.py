"""The monitoring server's Starlette app: ``/metrics``, ``/health``, ``/api/session`` and ``/``.

Read-only: every route answers GET and HEAD; any other method gets 405 (with an ``Allow``
header). The handlers are plain functions, so Starlette runs them in its worker threads and a
slow read of the debugger never blocks the event loop. Each answer comes from the current
:class:`~moe_router.server.sources.Snapshot` (at most one read of the source per ``cache_ttl``
seconds), so memory does not grow with the number of requests.
"""

from __future__ import annotations

import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..errors import InputError
from .metrics import ENDPOINTS, build_registry
from .page import render_page
from .sources import Snapshots, as_source, dumps

__all__ = ["create_app"]

JSON = "application/json"


class _Timing:
    """ASGI middleware: observe each request's duration and status in the server's own metrics
    (the ``endpoint`` label is one of :data:`~moe_router.server.metrics.ENDPOINTS`)."""

    def __init__(self, app: ASGIApp, duration: Any, requests: Any) -> None:
        self.app, self.duration, self.requests = app, duration, requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "other"
        code = [500]

        async def send_status(message: Any) -> None:
            if message["type"] == "http.response.start":
                code[0] = int(message["status"])
            await send(message)

        start = time.perf_counter()
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.duration.labels(endpoint).observe(time.perf_counter() - start)
            self.requests.labels(endpoint, str(code[0])).inc()


def create_app(source: Any, *, cache_ttl: float = 1.0, refresh_s: float = 2.0,
               per_expert: bool = False, title: str | None = None) -> Starlette:
    """The app serving ``source`` (anything :func:`~moe_router.server.sources.as_source` takes).

    Args:
        cache_ttl: seconds a snapshot of the source is reused (0: read at every request).
        refresh_s: how often the live page re-fetches the session and the health.
        per_expert: add ``moe_router_expert_tokens_total{layer, expert, mode}`` to ``/metrics``.
        title: the page's title (default: from the source).
    """
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    if isinstance(refresh_s, bool) or not isinstance(refresh_s, (int, float)) \
            or not 0.1 <= refresh_s <= 3600:
        raise InputError("refresh_s", f"expected seconds in [0.1, 3600], got {refresh_s!r}")
    src = as_source(source)
    snapshots = Snapshots(src, cache_ttl)
    registry, (duration, requests) = build_registry(snapshots.get, per_expert)
    page = render_page(title or f"moe-router live monitor ({src.kind})", refresh_s).encode()

    def metrics(request: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def health(request: Request) -> Response:
        body = snapshots.get().health
        return Response(dumps(body), status_code=503 if body.get("status") == "error" else 200,
                        media_type=JSON, headers={"Cache-Control": "no-store"})

    def session(request: Request) -> Response:
        snap = snapshots.get()
        if snap.session is None:
            return Response(dumps({"error": f"the {src.kind} source has no session (no "
                                            "debugger attached)"}),
                            status_code=404, media_type=JSON)
        return Response(snap.session_json, media_type=JSON, headers={"Cache-Control": "no-store"})

    def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    routes = [Route("/", index, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/api/session", session, methods=["GET"])]
    app = Starlette(routes=routes)
    app.state.source, app.state.snapshots, app.state.registry = src, snapshots, registry
    app.add_middleware(_Timing, duration=duration, requests=requests)  # type: ignore[arg-type]
    return app
