"""The ``moe-router`` command line (also ``python -m moe_router``).

Subcommands:

- ``demo [args...]``: run the demo (:mod:`moe_router.demo`); its own ``--help`` lists its options.
- ``info [--json]``: version, registered backends and strategies, which frameworks are installed
  (found without importing them) and the environment variables the configs read.
- ``report SESSION.json [-o REPORT.html]``: the HTML report of a debugger session record
  (:mod:`moe_router.debug.report`; needs matplotlib, the ``debug`` extra).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

DISTRIBUTION = "moe-router"
#: Frameworks reported by ``info``; looked up with ``find_spec``, never imported.
FRAMEWORKS = ("numpy", "torch", "jax", "flax", "tensorflow", "keras", "transformers")


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        import moe_router

        return str(getattr(moe_router, "__version__", "unknown (not installed)"))


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _info() -> dict[str, Any]:
    from moe_router.config import MoEConfig, RouterConfig, env_variables
    from moe_router.registry import default_registry

    registry = default_registry()
    collected = registry.collected
    backends = {
        name: {"framework": spec.framework, "target": spec.target,
               "framework_installed": _installed(spec.framework)}
        for name, spec in sorted(collected.backends.items())
    }
    env = {**env_variables(RouterConfig), **env_variables(MoEConfig)}
    return {
        "version": _version(),
        "python": sys.version.split()[0],
        "backends": backends,
        "backend_names": registry.backend_names(),
        "strategies": sorted(collected.strategies),
        "estimators": sorted(collected.estimators),
        "frameworks": {name: _installed(name) for name in FRAMEWORKS},
        "env_variables": dict(sorted(env.items())),
    }


def _print_info(info: dict[str, Any]) -> None:
    print(f"moe-router {info['version']} (Python {info['python']})")
    print("\nbackends:")
    for name, spec in info["backends"].items():
        state = "installed" if spec["framework_installed"] else "not installed"
        print(f"  {name:<12} {spec['target']:<46} ({spec['framework']} {state})")
    print(f"\nstrategies: {', '.join(info['strategies']) or '-'}")
    print(f"estimators: {', '.join(info['estimators']) or '-'}")
    print("\nframeworks:")
    for name, ok in info["frameworks"].items():
        print(f"  {name:<12} {'yes' if ok else 'no'}")
    print("\nenvironment variables (read by RouterConfig.from_env / MoEConfig.from_env):")
    for env, field in info["env_variables"].items():
        print(f"  {env:<28} -> {field}")


def _cmd_info(args: argparse.Namespace, rest: list[str]) -> int:
    info = _info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-router",
        description="Mixture-of-Experts routing on NumPy, PyTorch, JAX and TensorFlow.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo", add_help=False,
        help="run the demo (options after 'demo' go to it; 'demo --help' lists them)")
    demo.set_defaults(handler=_cmd_demo, passthrough=True)
    info = sub.add_parser("info", help="version, backends, installed frameworks, env variables")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(handler=_cmd_info, passthrough=False)
    report = sub.add_parser("report", help="write the HTML report of a debugger session (JSON)")
    report.add_argument("session", metavar="SESSION.json", help="session record (JSON file)")
    report.add_argument("-o", "--output", metavar="REPORT.html",
                        help="where to write the report (default: SESSION with .html)")
    report.set_defaults(handler=_cmd_report, passthrough=False)
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
    return args.handler(args, rest)


if __name__ == "__main__":
    sys.exit(main())
