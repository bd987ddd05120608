"""Running the monitoring app with uvicorn: in a daemon thread beside a training or serving loop
(:func:`serve`, returning a :class:`ServerHandle`) or in the foreground (:func:`run`, the CLI).

The listening socket is bound here before uvicorn starts, so ``port=0`` picks a free port and the
handle reports the real one, and a port in use fails at once with an error naming it.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from typing import Any

from ..errors import InputError, InputTypeError

__all__ = ["ServerHandle", "bind", "run", "serve"]


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``0``: a free port).

    Raises:
        InputTypeError / InputError: a bad ``host`` or ``port``, or one that cannot be bound
            (in use, not an address of this machine), naming the argument.
    """
    if not isinstance(host, str) or not host:
        raise InputTypeError("host", f"expected a host name or address, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise InputError("port", f"expected an int in 0..65535 (0: a free port), got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as err:
        raise InputError("host", f"cannot resolve {host!r}: {err.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise InputError("port", f"cannot listen on {host}:{port}: "
                                 f"{(err.strerror or str(err)).lower()}") from None
    sock.set_inheritable(True)
    return sock


def _url(sock: socket.socket) -> tuple[str, int, str]:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return host, int(port), f"http://{shown}:{port}/"


def _server(app: Any, log_level: str, embedded: bool) -> Any:
    """A uvicorn server; ``embedded`` (inside someone's script): leave their logging config
    alone (uvicorn's loggers then propagate to the root logger)."""
    import uvicorn

    extra: dict[str, Any] = {"log_config": None} if embedded else {}
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=2, server_header=False, **extra)
    return uvicorn.Server(config)


class ServerHandle:
    """A monitoring server running in a daemon thread: ``url`` (of the page; ``/metrics``,
    ``/health`` and ``/api/session`` under it), ``host``, ``port``, ``app``; ``close()`` (or the
    ``with`` block's end) stops it and frees the port."""

    def __init__(self, app: Any, sock: socket.socket, log_level: str = "warning",
                 start_timeout: float = 10.0) -> None:
        self.app = app
        self.host, self.port, self.url = _url(sock)
        self._sock = sock
        self._server = _server(app, log_level, embedded=True)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"moe-router-serve:{self.port}",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the monitoring server on {self.url} did not start"
                                   + (f": {self._error!r}" if self._error else ""))
            time.sleep(0.01)

    def _run(self) -> None:
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as err:  # reported by __init__ / close
            self._error = err

    @property
    def running(self) -> bool:
        """Whether the server thread still serves."""
        return self._thread.is_alive() and not self._server.should_exit

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving (idempotent) and release the port."""
        self._server.should_exit = True
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._sock.close()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ServerHandle({self.url!r}, running={self.running})"


def serve(source: Any, port: int = 0, host: str = "127.0.0.1", *, cache_ttl: float = 1.0,
          refresh_s: float = 2.0, per_expert: bool = False, log_level: str = "warning",
          title: str | None = None) -> ServerHandle:
    """Serve ``source`` (a debugger, a router, a session file or dict, a MonitorSource) from a
    daemon thread; returns once it accepts connections. Binds 127.0.0.1 by default; ``port=0``
    picks a free port (``handle.port``). Keywords: :func:`~moe_router.server.app.create_app`."""
    from .app import create_app

    app = create_app(source, cache_ttl=cache_ttl, refresh_s=refresh_s, per_expert=per_expert,
                     title=title)
    return ServerHandle(app, bind(host, port), log_level)


def run(app: Any, sock: socket.socket, log_level: str = "warning") -> list[int]:
    """Serve ``app`` on ``sock`` in this thread until SIGINT / SIGTERM; returns the signals that
    stopped it. uvicorn shuts down gracefully, then re-raises the signal into the handlers it
    found: here ones that only note it, so Ctrl-C ends quietly, with no traceback."""
    stops = [signal.SIGINT, signal.SIGTERM]
    caught: list[int] = []
    main = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, lambda n, _: caught.append(n)) for s in stops} if main else {}
    try:
        _server(app, log_level, embedded=False).run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    return caught
