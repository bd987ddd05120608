"""Loading configs from ``MOE_*`` environment variables, JSON files and mappings.

Generic over the config class (passed in), so this module does not import :mod:`.config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

# ----- environment and JSON ------------------------------------------------------------------
#: Aliases of the documented environment variables; every other field is ``MOE_<FIELD>``.
ENV_ALIASES: dict[str, str] = {
    "MOE_INPUT_DIM": "d_model",
    "MOE_HIDDEN_DIM": "d_ff",
    "MOE_ROUTING_STRATEGY": "strategy",
    "MOE_TOP_K": "k",
}


#: Older estimator names, the estimator each one really was, and why.
LEGACY_ESTIMATORS: dict[str, tuple[str, str]] = {
    "gradient_norm": ("hidden_norm", "the older gradient_norm used the hidden-state norm when no "
                      "gradients were given, and routing never has them: hidden_norm is that "
                      "norm"),
    "perplexity_proxy": ("router_entropy", "perplexity is exp(entropy) of the router "
                         "distribution; k follows the score's rank, so entropy gives the same k"),
}


def env_variables(cls: Any) -> dict[str, str]:
    """Map of every environment variable ``from_env`` reads for ``cls`` -> field name."""
    names = {f.name for f in dataclasses.fields(cls) if f.name != "router"}
    table = {f"MOE_{name.upper()}": name for name in names}
    table.update({env: field for env, field in ENV_ALIASES.items() if field in names})
    return table


def _read_env(cls: Any, environ: Mapping[str, str]) -> dict[str, Any]:
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    source: dict[str, str] = {}
    for env, field in env_variables(cls).items():
        if env in environ:
            value = _parse_env(env, field, str(types[field]), environ[env])
            if field in values and values[field] != value:
                raise ConfigError(f"{field} (from ${source[field]} and ${env})", environ[env],
                                  "one value: set only one of the two variables")
            values[field], source[field] = value, env
    return values


def _from_env_values(cls: Any, values: dict[str, Any], environ: Mapping[str, str],
                     overrides: Mapping[str, Any]) -> Any:
    """``_from_mapping`` whose errors name the variable that set (or would set) the field."""
    try:
        return _from_mapping(cls, {**values, **overrides})
    except ConfigError as err:
        if err.field in overrides:
            raise
        names = [env for env, field in env_variables(cls).items()
                 if field == err.field and (env in environ or field not in values)]
        if not names:
            raise
        how = "from" if err.field in values else "set"
        raise err.with_field(f"{err.field} ({how} ${' or $'.join(sorted(names))})") from None


def _parse_env(env: str, field: str, type_name: str, raw: str) -> Any:
    text = raw.strip()
    if text.lower() in ("none", "null", "") and "None" in type_name:
        return None
    try:
        if type_name.startswith("bool"):
            if text.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes")
        if type_name.startswith("int"):
            return int(text)
        if type_name.startswith("float"):
            return float(text)
        if type_name.startswith("tuple"):  # comma-separated names
            return tuple(item.strip() for item in text.split(",") if item.strip())
        if type_name.startswith("TraceConfig"):  # "capacity" or "capacity,tokens_per_call"
            numbers = [int(item) for item in text.split(",")]
            if len(numbers) > 2:
                raise ValueError(text)
            return dict(zip(("capacity", "tokens_per_call"), numbers, strict=False))
    except ValueError:
        raise ConfigError(f"{field} (from ${env})", raw, f"a value of type {type_name}") from None
    return text


def _section(data: Any, names: tuple[str, ...]) -> Any:
    if not isinstance(data, Mapping):
        return None
    for name in names:
        if name in data:
            return data[name]
    return None


def _load_json(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ConfigError("path", str(path), f"a valid JSON file ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError("path", str(path), "a JSON object at top level")
    return data


def _from_mapping(cls: Any, data: Mapping[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(unknown[0], data[unknown[0]], f"a field of {cls.__name__}: "
                          f"{', '.join(sorted(known))}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.name not in data]
    if missing:
        raise ConfigError(missing[0], None, f"a value: {cls.__name__}.{missing[0]} is required")
    return cls(**dict(data))
