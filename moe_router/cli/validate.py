"""``moe-router validate [CONFIG.json] [--backends a,b] [--json]``: is this deployment sound?

Checks, each a row of the table (status ``ok``, ``note``, ``skip`` or ``FAIL``):

- the config file, if given: read as the production router reads it (the older
  ``production.json`` layout or ours), with each mapped or ignored key as a note;
- the environment: ``MOE_*`` variables moe-router does not read (a typo fails), and whether the
  router ``create_from_environment`` would build can be built;
- every registered backend: whether its framework is installed, and, when it is, a conformance
  check against NumPy: each strategy routes the same fixed logits on both, and the decisions must
  be equal and the weights agree within 1e-5.

Exit status 0 when nothing failed, 1 when a check failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import warnings
from typing import Any

import numpy as np

from .common import choice_list, native_logs_dropped, quiet_frameworks

#: strategies (with their settings) the conformance check routes on each backend
CONFORMANCE = {
    "top_k": {"k": 2},
    "top_p": {"top_p": 0.5, "max_experts": 4},
    "threshold": {"threshold": 0.6, "max_experts": 4},
    "relu": {"min_experts": 0, "max_experts": 4},
    "expert_choice": {"capacity_factor": 2.0, "max_experts": 4},
    "complexity": {"max_experts": 4},
    "top_k capacity": {"k": 2, "capacity_factor": 1.0},
}


def check_config_file(path: str) -> list[dict[str, Any]]:
    from ..errors import MoERouterError
    from ..production import spec_from_file

    try:
        spec = spec_from_file(path)
    except FileNotFoundError:
        return [_row("config", "FAIL", f"{path}: no such file")]
    except (MoERouterError, OSError) as err:
        return [_row("config", "FAIL", f"{path}: {err}")]
    c = spec.config
    rows = [_row("config", "ok", f"{path}: strategy={c.strategy}, experts={c.num_experts}, "
                 f"k in [{c.min_experts}, {c.max_slots}], d_model={spec.d_model}")]
    rows += [_row("config", "note", note) for note in spec.notes]
    return rows


def check_environment() -> list[dict[str, Any]]:
    from ..envvars import describe_unknown, unknown_env_variables
    from ..errors import MoERouterError
    from ..production.settings import spec_from_env

    unknown = unknown_env_variables()
    rows = [_row("environment", "FAIL", describe_unknown(unknown))] if unknown else []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reported above
            spec = spec_from_env()
    except MoERouterError as err:
        return [*rows, _row("environment", "FAIL", str(err))]
    c = spec.config
    rows.append(_row("environment", "ok", f"router from MOE_* variables: strategy={c.strategy}, "
                     f"experts={c.num_experts}, d_model={spec.d_model}"))
    return rows + [_row("environment", "note", note) for note in spec.notes]


def check_backend(name: str, tokens: int = 64, experts: int = 8) -> dict[str, Any]:
    """Route fixed logits with each :data:`CONFORMANCE` strategy on ``name`` and on NumPy."""
    from .. import RouterConfig, route
    from ..registry import default_registry, get_backend

    framework = default_registry().collected.backends[name].framework
    if importlib.util.find_spec(framework) is None:
        return _row(f"backend {name}", "skip", f"{framework} is not installed")
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(tokens, experts)) * 1.5).astype(np.float32)
    b, ref = get_backend(name), get_backend("numpy")
    failures = []
    for label, settings in CONFORMANCE.items():
        strategy = label.split()[0]
        config = RouterConfig(num_experts=experts, strategy=strategy, **settings)
        want = route(logits, config, backend=ref)
        got = route(b.asarray(logits), config, backend=b)
        ids = np.asarray(b.to_numpy(got.expert_indices))
        weights = np.asarray(b.to_numpy(got.expert_weights))
        if not np.array_equal(ids, want.expert_indices):
            failures.append(f"{label}: expert choice differs")
        elif not np.allclose(weights, want.expert_weights, rtol=1e-5, atol=1e-5):
            failures.append(f"{label}: weights differ by "
                            f"{np.abs(weights - want.expert_weights).max():.2e}")
    if failures:
        return _row(f"backend {name}", "FAIL", "; ".join(failures))
    return _row(f"backend {name}", "ok", f"{len(CONFORMANCE)} strategies equal NumPy "
                f"(T={tokens}, E={experts})")


def _row(check: str, status: str, detail: str) -> dict[str, Any]:
    return {"check": check, "status": status, "detail": detail}


def _cmd_validate(args: argparse.Namespace, rest: list[str]) -> int:
    quiet_frameworks(args.verbose)
    from ..registry import default_registry

    rows: list[dict[str, Any]] = []
    if args.config is not None:
        rows += check_config_file(args.config)
    rows += check_environment()
    names = args.backends or default_registry().backend_names()
    with native_logs_dropped(not args.verbose):  # TF's import-time C++ lines
        for name in names:
            if name != "numpy":
                rows.append(check_backend(name))
    failed = sum(row["status"] == "FAIL" for row in rows)
    if args.json:
        print(json.dumps({"ok": not failed, "checks": rows}, indent=2))
    else:
        _print(rows, failed)
    return 1 if failed else 0


def _print(rows: list[dict[str, Any]], failed: int) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    styles = {"ok": "green", "note": "cyan", "skip": "yellow", "FAIL": "bold red"}
    table = Table(title="moe-router validate")
    for column in ("check", "status", "detail"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(row["check"], f"[{styles[row['status']]}]{row['status']}[/]",
                      escape(row["detail"]))
    console = Console()
    console.print(table)
    console.print(f"[bold red]{failed} check(s) failed[/]" if failed else "[green]all checks "
                  "passed[/]")


def add_parser(sub: Any) -> None:
    from ..registry import default_registry

    names = default_registry().backend_names()
    parser = sub.add_parser("validate", help="check a config file, the MOE_* environment and "
                            "each installed backend against NumPy")
    parser.add_argument("config", nargs="?", metavar="CONFIG.json",
                        help="production router config (the older production.json or ours)")
    parser.add_argument("--backends", type=choice_list(names), metavar="NAMES",
                        help=f"comma list of backends to check (default all: {', '.join(names)})")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--verbose", action="store_true", help="keep framework logging")
    parser.set_defaults(handler=_cmd_validate, passthrough=False)


__all__ = ["check_backend", "check_config_file", "check_environment"]
