"""The ``moe-router`` command line (also ``python -m moe_router``).

One module per subcommand in this package, each with ``add_parser(sub)`` (see
:mod:`moe_router.cli.common`); :data:`COMMANDS` lists them in the order ``--help`` shows.
Errors in arguments or inputs print one line and exit with status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import MoERouterError
from .common import CLIError
from .info import _version

#: Subcommand modules (``moe_router.cli.<name>``), in help order.
COMMANDS = ("bench", "demo", "info", "profile", "report", "serve", "tune", "validate")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-router",
        description="Mixture-of-Experts routing on NumPy, PyTorch, JAX and TensorFlow.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if args.command is None:
        parser.print_help()
        return 2
    if rest and not args.passthrough:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.handler(args, rest) or 0)
    except (CLIError, MoERouterError) as err:
        print(f"moe-router {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
