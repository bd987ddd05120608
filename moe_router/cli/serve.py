"""``moe-router serve [--session FILE] [--host H] [--port P]``: the live monitoring server
(:mod:`moe_router.server`) in the foreground, until Ctrl-C / SIGTERM.

With ``--session`` it serves a saved session record (re-read when the file changes); without, a
router built from the environment (``moe_router.production.RouterFactory
.create_from_environment()``). Prints the URL (with the real port when ``--port 0``) once it
listens. Needs the ``serve`` extra.
"""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any

from .common import CLIError


def port_number(text: str) -> int:
    """``argparse`` type: a TCP port, 0..65535 (0: a free port)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {text!r}") \
            from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port number in 0..65535, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """``argparse`` type: seconds, a number >= 0.1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds in [0.1, 3600], got {text}")
    return value


def _source(path: str | None) -> tuple[Any, str]:
    """The source to serve and how to describe it."""
    from moe_router.errors import MoERouterError

    if path is not None:
        from moe_router.server import SessionFileSource

        try:
            return SessionFileSource(path, argument="--session"), f"session file {path}"
        except OSError as err:
            raise CLIError(f"--session: cannot read {path!r}: "
                           f"{(err.strerror or str(err)).lower()}") from None
        except (MoERouterError, ValueError) as err:
            raise CLIError(str(err)) from None
    try:
        from moe_router.production import RouterFactory
    except ImportError as err:
        raise CLIError(f"no --session given and the production router is not available "
                       f"({err}); pass --session FILE") from None
    try:
        router = RouterFactory.create_from_environment()
    except (MoERouterError, ValueError, OSError) as err:
        raise CLIError(f"cannot build the router from the environment: {err}") from None
    return router, "the router built from the environment"


def _cmd_serve(args: argparse.Namespace, rest: list[str]) -> int:
    missing = [m for m in ("starlette", "uvicorn", "prometheus_client")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise CLIError(f"serve needs {', '.join(missing)}: pip install 'moe-router[serve]'")
    from moe_router.server import bind, create_app, run

    source, what = _source(args.session)
    app = create_app(source, refresh_s=args.refresh, cache_ttl=min(1.0, args.refresh))
    sock = bind(args.host, args.port)  # an InputError naming the port when it is taken
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"moe-router serve: serving {what} at http://{shown}:{port}/ (metrics at /metrics, "
          f"health at /health; Ctrl-C stops)", flush=True)
    run(app, sock)
    return 0


def add_parser(sub: Any) -> None:
    serve = sub.add_parser("serve", help="serve live routing metrics, health and a page over "
                                         "HTTP (a session file, or the router from the "
                                         "environment)")
    serve.add_argument("--session", metavar="FILE",
                       help="a saved session record (JSON; re-read when it changes); default: a "
                            "router built from the environment")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=port_number, default=9400,
                       help="TCP port (default 9400; 0: a free port, printed)")
    serve.add_argument("--refresh", type=positive_seconds, default=2.0, metavar="SECONDS",
                       help="how often the page refreshes (default 2)")
    serve.set_defaults(handler=_cmd_serve, passthrough=False)

