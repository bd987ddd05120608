"""Every ``MOE_*`` environment variable moe-router reads, in one table.

The table is built from the configs (each field of :class:`~moe_router.RouterConfig` and
:class:`~moe_router.MoEConfig` is ``MOE_<FIELD>``, plus the documented aliases), the production
router's settings (:class:`~moe_router.production.ProductionSettings`), the older production
router's variables (accepted, and either mapped or reported as ignored with the reason), and the
variables of our tools. ``moe-router info`` prints it, ``docs/deployment.md`` shows it, and
:func:`unknown_env_variables` reports a ``MOE_`` variable that is in none of them (a typo is
named with the closest real name, never ignored silently).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping
from typing import Any

from .errors import closest

PREFIX = "MOE_"


@dataclasses.dataclass(frozen=True)
class EnvVariable:
    """One row of the table: ``name`` sets ``target``; ``group`` is one of ``router``,
    ``layer``, ``production``, ``legacy`` (accepted from the older router) or ``tools``."""

    name: str
    target: str
    group: str
    meaning: str


class UnknownEnvironmentWarning(UserWarning):
    """A ``MOE_*`` environment variable that moe-router does not read (probably misspelled)."""


#: Variables of the production router (:mod:`moe_router.production`): name -> (setting, meaning).
PRODUCTION_VARIABLES: dict[str, tuple[str, str]] = {
    "MOE_ENABLE_MONITORING": ("enable_monitoring",
                              "keep routing statistics in a debugger (health issues, /metrics)"),
    "MOE_ENABLE_VALIDATION": ("enable_validation",
                              "check inputs for NaN/Inf: sets nan_policy 'raise' (or 'ignore')"),
    "MOE_MAX_BATCH_SIZE": ("max_batch_size", "largest leading dimension route() accepts"),
    "MOE_MAX_TENSOR_SIZE": ("max_tensor_size", "largest element count route() accepts"),
    "MOE_ROUTER_WEIGHTS": ("weights_path", "router weight file (.npy, .npz, .safetensors)"),
    "MOE_SEED": ("seed", "seed of the router weights when no weight file is given"),
    "MOE_STATIC_K": ("static_k", "the static top-k that FLOPs are compared against"),
}

#: Variables of the older production router that are accepted but do nothing, and why.
LEGACY_IGNORED: dict[str, str] = {
    "MOE_ENABLE_CACHING": "routing results are not cached: a plan depends on each token's hidden "
                          "state, so a cache would only hit on repeated identical batches",
    "MOE_ENABLE_PARALLEL": "the backends already run each GEMM on all intra-op threads; there "
                           "is no separate thread pool to switch",
    "MOE_ENABLE_SECURITY": "input limits are MOE_MAX_BATCH_SIZE / MOE_MAX_TENSOR_SIZE and the "
                           "NaN check is MOE_ENABLE_VALIDATION",
    "MOE_SECURITY_LEVEL": "input limits are MOE_MAX_BATCH_SIZE / MOE_MAX_TENSOR_SIZE and the NaN "
                          "check is MOE_ENABLE_VALIDATION",
    "MOE_MAX_MEMORY_MB": "memory is bounded by the input limits; there is no memory watchdog",
    "MOE_REQUEST_TIMEOUT": "route() is synchronous and bounded by its input size; a server "
                           "sets its own timeouts",
    "MOE_METRICS_LOG_FILE": "metrics are exported through /metrics (Prometheus), TensorBoard "
                            "and the debugger's JSON session",
}

#: Variables of the command line, tests and developer tools.
TOOL_VARIABLES: dict[str, str] = {
    "MOE_AUTOTUNE": "opt-in first-use kernel tuning of dispatch='auto' (moe-router tune)",
    "MOE_TUNE_CACHE": "path of the kernel-tuning cache file (default: the user cache directory)",
    "MOE_TEST_BACKENDS": "tests: comma list of backends to run (default: all installed)",
    "MOE_DEV_WORKERS": "scripts/dev.py test: pytest-xdist workers (0 = no xdist)",
    "MOE_DEV_SKIP_DOCS": "scripts/dev.py test: 1 = skip the strict docs build",
    "MOE_CHROMIUM": "tests: path of the headless Chromium used for screenshots",
    "MOE_INSTALL_CHROMIUM": "tests: 1 = apt-get install chromium when missing (as root)",
    "MOE_FUZZ_CASES": "tests: number of fuzzed routing cases",
    "MOE_FUZZ_SECONDS": "tests: time budget of the routing fuzzer",
    "MOE_FUZZ_SEED": "tests: seed of the routing fuzzer",
    "MOE_VERBOSE_BENCH": "tests: 1 = print the bounded server load test's figures",
}


def env_table() -> list[EnvVariable]:
    """Every variable moe-router reads, sorted by group then name."""
    from .config import MoEConfig, RouterConfig, env_variables

    rows: dict[str, EnvVariable] = {}
    for group, cls in (("router", RouterConfig), ("layer", MoEConfig)):
        for name, field in env_variables(cls).items():
            if name not in rows:
                rows[name] = EnvVariable(name, f"{cls.__name__}.{field}", group,
                                         _field_meaning(cls, field))
    for name, (setting, meaning) in PRODUCTION_VARIABLES.items():
        rows[name] = EnvVariable(name, f"ProductionSettings.{setting}", "production", meaning)
    for name, reason in LEGACY_IGNORED.items():
        rows[name] = EnvVariable(name, "ignored", "legacy", reason)
    for name, meaning in TOOL_VARIABLES.items():
        rows[name] = EnvVariable(name, "tools", "tools", meaning)
    order = {"router": 0, "layer": 1, "production": 2, "legacy": 3, "tools": 4}
    return sorted(rows.values(), key=lambda row: (order[row.group], row.name))


def _field_meaning(cls: Any, field: str) -> str:
    """The first sentence of the field's entry in the class docstring's argument list."""
    lines = (cls.__doc__ or "").splitlines()
    for i, line in enumerate(lines):
        head, colon, rest = line.strip().partition(":")
        if not colon or field not in [name.strip() for name in head.split("/")]:
            continue
        indent = len(line) - len(line.lstrip())
        parts = [rest.strip()]
        for more in lines[i + 1:]:
            if not more.strip() or len(more) - len(more.lstrip()) <= indent:
                break
            parts.append(more.strip())
        entry = " ".join(parts).replace("``", "").replace(":class:`~", "").replace("`", "")
        for stop in (". ", "; "):
            entry = entry.split(stop, 1)[0]
        return entry.rstrip(".")
    return f"{cls.__name__}.{field}"


def known_names() -> set[str]:
    """The names of :func:`env_table`."""
    return {row.name for row in env_table()}


def unknown_env_variables(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """``MOE_*`` variables in ``environ`` (default ``os.environ``) that moe-router does not
    read: name -> the closest real name (or ``None``)."""
    env = os.environ if environ is None else environ
    known = known_names()
    return {name: closest(name, known) for name in sorted(env)
            if name.startswith(PREFIX) and name not in known}


def describe_unknown(unknown: Mapping[str, str | None]) -> str:
    """One sentence naming each unknown variable and its closest real name."""
    parts = [f"${name}" + (f" (did you mean ${hint}?)" if hint else "")
             for name, hint in unknown.items()]
    return (f"moe-router does not read {', '.join(parts)}; "
            f"`moe-router info` lists every MOE_* variable")


def warn_unknown_env(environ: Mapping[str, str] | None = None, stacklevel: int = 3) -> None:
    """Warn once (:class:`UnknownEnvironmentWarning`) about unread ``MOE_*`` variables."""
    unknown = unknown_env_variables(environ)
    if unknown:
        warnings.warn(describe_unknown(unknown), UnknownEnvironmentWarning, stacklevel=stacklevel)


# ----- the docs table --------------------------------------------------------------------------
TABLE_START = "<!-- env-table:start (generated: python -m moe_router.envvars FILE) -->"
TABLE_END = "<!-- env-table:end -->"


def markdown_table() -> str:
    """:func:`env_table` as a Markdown table (what ``docs/deployment.md`` embeds)."""
    lines = ["| variable | sets | group | meaning |", "|---|---|---|---|"]
    for row in env_table():
        meaning = row.meaning.replace("|", "\\|")
        lines.append(f"| `{row.name}` | `{row.target}` | {row.group} | {meaning} |")
    return "\n".join(lines)


def update_markdown(path: str) -> bool:
    """Replace the table between :data:`TABLE_START` and :data:`TABLE_END` in ``path``;
    returns whether the file changed."""
    from pathlib import Path

    file = Path(path)
    text = file.read_text()
    head, start, rest = text.partition(TABLE_START)
    _, end, tail = rest.partition(TABLE_END)
    if not start or not end:
        raise ValueError(f"{path}: no {TABLE_START!r} ... {TABLE_END!r} markers")
    new = f"{head}{TABLE_START}\n{markdown_table()}\n{TABLE_END}{tail}"
    if new != text:
        file.write_text(new)
    return new != text


if __name__ == "__main__":  # python -m moe_router.envvars docs/deployment.md
    import sys

    for target in sys.argv[1:] or ["docs/deployment.md"]:
        print(f"{target}: {'updated' if update_markdown(target) else 'up to date'}")
