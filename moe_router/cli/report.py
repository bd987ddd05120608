"""``moe-router report SESSION.json [-o REPORT.html]``: the HTML report of a debugger session
record (:mod:`moe_router.debug.report`; needs matplotlib, the ``debug`` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _report_error(message: str) -> int:
    print(f"moe-router report: error: {message}", file=sys.stderr)
    return 2


def _cmd_report(args: argparse.Namespace, rest: list[str]) -> int:
    from moe_router.debug.report import read_session, write_report
    from moe_router.errors import MoERouterError

    try:
        session = read_session(args.session)
    except OSError as err:
        return _report_error(f"cannot read {args.session}: {err.strerror or err}")
    except (MoERouterError, ValueError) as err:
        return _report_error(str(err))
    output = args.output or os.path.splitext(args.session)[0] + ".html"
    if not args.output and output == args.session:
        output += ".html"
    try:
        write_report(session, output)
    except ModuleNotFoundError as err:
        if err.name not in ("matplotlib", "numpy"):
            raise
        return _report_error(f"the report needs {err.name}: pip install 'moe-router[debug]'")
    except OSError as err:
        return _report_error(f"cannot write {output}: {err.strerror or err}")
    print(f"wrote {output}")
    return 0



def add_parser(sub: Any) -> None:
    report = sub.add_parser("report", help="write the HTML report of a debugger session (JSON)")
    report.add_argument("session", metavar="SESSION.json", help="session record (JSON file)")
    report.add_argument("-o", "--output", metavar="REPORT.html",
                        help="where to write the report (default: SESSION with .html)")
    report.set_defaults(handler=_cmd_report, passthrough=False)
