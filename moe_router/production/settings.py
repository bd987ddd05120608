"""What a production router is built from: a :class:`RouterSpec` (the routing config, the model
width and the serving settings) and the notes on how its sources were read.

Sources: presets (:class:`~moe_router.production.RouterFactory`), ``MOE_*`` environment variables
(:func:`spec_from_env`) and JSON files (:mod:`moe_router.production.config_file`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..config import RouterConfig
from ..config_io import LEGACY_ESTIMATORS, _from_env_values, _parse_env, _read_env
from ..envvars import LEGACY_IGNORED, PRODUCTION_VARIABLES, warn_unknown_env
from ..errors import ConfigError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProductionSettings:
    """How a :class:`~moe_router.production.ProductionRouter` serves (not how it routes).

    Attributes:
        enable_monitoring: keep routing statistics in a :class:`~moe_router.debug.MoEDebugger`
            (its issues appear in ``health_check()`` and ``/health``).
        max_batch_size: largest leading dimension ``route`` accepts (B of ``(B, S, D)``, T of
            ``(T, D)``); ``None`` = no limit.
        max_tensor_size: largest element count ``route`` accepts; ``None`` = no limit.
        weights_path: router weight file (``.npy``, ``.npz``, ``.safetensors``); ``None`` =
            initialised from ``seed``.
        seed: seed of initialised router weights.
        static_k: the static top-k that ``routing_info`` compares FLOPs against (``None`` =
            the config's ``k``).
        latency_window: how many recent request latencies the percentiles cover (bounded
            memory).
    """

    enable_monitoring: bool = True
    max_batch_size: int | None = None
    max_tensor_size: int | None = None
    weights_path: str | None = None
    seed: int = 0
    static_k: int | None = None
    latency_window: int = 4096

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_tensor_size", "static_k"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(name, value, "an int >= 1 or None")
        if not _is_int(self.latency_window) or self.latency_window < 1:
            raise ConfigError("latency_window", self.latency_window, "an int >= 1")
        if not isinstance(self.enable_monitoring, bool):
            raise ConfigError("enable_monitoring", self.enable_monitoring, "true or false")
        if not _is_int(self.seed):
            raise ConfigError("seed", self.seed, "an int")
        if self.weights_path is not None and not isinstance(self.weights_path, str):
            raise ConfigError("weights_path", self.weights_path, "a file path or None")


@dataclasses.dataclass(frozen=True)
class RouterSpec:
    """Everything a production router is built from.

    Attributes:
        config: the routing config.
        d_model: D, the width of the hidden states routed (router weight ``(D, E + N)``).
        settings: the serving settings.
        notes: how the source was read: each mapped older key and each ignored key with its
            reason (reported once, by the router's constructor, on the ``moe_router`` logger).
        source: where the spec came from (a preset name, ``environment`` or a file path).
    """

    config: RouterConfig
    d_model: int
    settings: ProductionSettings = dataclasses.field(default_factory=ProductionSettings)
    notes: tuple[str, ...] = ()
    source: str = "arguments"

    def __post_init__(self) -> None:
        if not _is_int(self.d_model) or self.d_model < 1:
            raise ConfigError("d_model", self.d_model, "an int >= 1 (the hidden-state width)")


def legacy_estimator(name: Any, where: str) -> tuple[Any, str | None]:
    """``(estimator, note)``: an older estimator name mapped to the real one, with a note."""
    if isinstance(name, str) and name in LEGACY_ESTIMATORS:
        real, why = LEGACY_ESTIMATORS[name]
        return real, f"{where}={name!r} -> complexity_estimator={real!r}: {why}"
    return name, None


def nan_policy_for(enable_validation: Any, where: str) -> str:
    """``enable_validation`` -> ``RouterConfig.nan_policy``."""
    if not isinstance(enable_validation, bool):
        raise ConfigError(where, enable_validation, "true or false")
    return "raise" if enable_validation else "ignore"


# ----- environment -----------------------------------------------------------------------------
def spec_from_env(environ: Mapping[str, str] | None = None, *, d_model: int = 768,
                  **changes: Any) -> RouterSpec:
    """A :class:`RouterSpec` from ``MOE_*`` variables (see ``moe-router info``): the routing
    config from :meth:`RouterConfig.from_env` (``num_experts`` defaults to 8), ``d_model`` from
    ``$MOE_INPUT_DIM`` / ``$MOE_D_MODEL`` (default 768), the serving settings from the
    production variables. Older variables that do nothing are noted with the reason; unknown
    ``MOE_*`` variables raise an :class:`~moe_router.envvars.UnknownEnvironmentWarning`."""
    env = dict(os.environ if environ is None else environ)
    warn_unknown_env(env, stacklevel=4)
    notes: list[str] = []
    if "MOE_COMPLEXITY_ESTIMATOR" in env:
        real, note = legacy_estimator(env["MOE_COMPLEXITY_ESTIMATOR"],
                                      "$MOE_COMPLEXITY_ESTIMATOR")
        if note:
            env["MOE_COMPLEXITY_ESTIMATOR"] = real
            notes.append(note)
    router_env = {k: v for k, v in env.items() if k not in ("MOE_INPUT_DIM", "MOE_D_MODEL")}
    defaults = {} if "MOE_NUM_EXPERTS" in env else {"num_experts": 8}
    settings_values: dict[str, Any] = {}
    for name, (setting, _meaning) in PRODUCTION_VARIABLES.items():
        if name not in env:
            continue
        if setting == "enable_validation":
            value = _parse_env(name, setting, "bool", env[name])
            defaults["nan_policy"] = nan_policy_for(value, f"${name}")
            continue
        type_name = {"enable_monitoring": "bool", "weights_path": "str"}.get(setting,
                                                                              "int | None")
        settings_values[setting] = _parse_env(name, setting, type_name, env[name])
    for name, reason in LEGACY_IGNORED.items():
        if name in env:
            notes.append(f"${name} is ignored: {reason}")
    config = _from_env_values(RouterConfig, _read_env(RouterConfig, router_env), router_env,
                              {**defaults, **changes})
    width = _parse_width(env, d_model)
    return RouterSpec(config, width, ProductionSettings(**settings_values), tuple(notes),
                      "environment")


def _parse_width(env: Mapping[str, str], default: int) -> int:
    values = {name: _parse_env(name, "d_model", "int", env[name])
              for name in ("MOE_INPUT_DIM", "MOE_D_MODEL") if name in env}
    if len(set(values.values())) > 1:
        raise ConfigError("d_model (from $MOE_INPUT_DIM and $MOE_D_MODEL)", values,
                          "one value: set only one of the two variables")
    return next(iter(values.values()), default)
