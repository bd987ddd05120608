"""``moe-router info``: version, registered backends and strategies, which frameworks are installed
(found without importing them) and the environment variables the configs read."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import sys
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
    from moe_router.envvars import env_table, unknown_env_variables

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
        "environment": [dataclasses.asdict(row) for row in env_table()],
        "unknown_environment": unknown_env_variables(),
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
    print("\nenvironment variables (every MOE_* variable moe-router reads):")
    group = None
    for row in info["environment"]:
        if row["group"] != group:
            group = row["group"]
            print(f"  [{group}]")
        print(f"  {row['name']:<28} {row['target']:<36} {row['meaning']}")
    for name, hint in info["unknown_environment"].items():
        print(f"\nwarning: ${name} is set but moe-router does not read it"
              + (f" (did you mean ${hint}?)" if hint else ""))


def _cmd_info(args: argparse.Namespace, rest: list[str]) -> int:
    info = _info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0



def add_parser(sub: Any) -> None:
    info = sub.add_parser("info", help="version, backends, installed frameworks, env variables")
    info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    info.set_defaults(handler=_cmd_info, passthrough=False)
