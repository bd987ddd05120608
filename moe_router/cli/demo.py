"""``moe-router demo [args...]``: run the demo (:mod:`moe_router.demo`); its own ``--help`` lists
its options."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any


def _cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    try:
        demo = importlib.import_module("moe_router.demo")
    except ModuleNotFoundError as err:
        if err.name != "moe_router.demo":
            raise
        print("moe-router: the demo module (moe_router.demo) is not available in this version",
              file=sys.stderr)
        return 2
    result = demo.main(rest)
    return int(result or 0)



def add_parser(sub: Any) -> None:
    demo = sub.add_parser(
        "demo", add_help=False,
        help="run the demo (options after 'demo' go to it; 'demo --help' lists them)")
    demo.set_defaults(handler=_cmd_demo, passthrough=True)
