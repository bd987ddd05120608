"""Production router JSON files: the older documented ``production.json`` layout, as it is, and
our own fields beside it.

======================================  ==========================================================
key                                     what it does here
======================================  ==========================================================
``router_config.input_dim``             ``d_model`` (router weight ``(D, E)``)
``router_config.num_experts``           ``RouterConfig.num_experts``
``router_config.min_experts``           ``RouterConfig.min_experts``
``router_config.max_experts``           ``RouterConfig.max_experts``
``router_config.complexity_estimator``  ``RouterConfig.complexity_estimator``; the older
                                        ``gradient_norm`` -> ``hidden_norm``,
                                        ``perplexity_proxy`` -> ``router_entropy``
``router_config.routing_strategy``      ``top_k`` (the older router: k per token from the
                                        estimator, then the top k) -> ``complexity``;
                                        ``threshold`` -> ``threshold``; any registered strategy
``router_config.load_balancing``        ``true``: ``aux_loss_coef=0.01``; ``false``: ``0.0``
``router_config.noise_factor``          ``> 0``: Gaussian router noise of that std in training
``performance.enable_monitoring``       ``ProductionSettings.enable_monitoring`` (the debugger)
``performance.enable_caching``          ignored, with the reason
``performance.cache_size``              ignored, with the reason
``performance.parallel_threshold``      ignored, with the reason
``security.enable_validation``          ``nan_policy``: ``true`` -> ``raise``, ``false`` ->
                                        ``ignore``
``security.max_tensor_size``            ``ProductionSettings.max_tensor_size`` (enforced)
``security.max_batch_size``             ``ProductionSettings.max_batch_size`` (enforced)
======================================  ==========================================================

Our own keys may stand beside them: any :class:`~moe_router.RouterConfig` field in
``router_config``, ``d_model`` at top level, and a ``production`` section of
:class:`~moe_router.production.ProductionSettings` fields. Any other key is a
:class:`~moe_router.errors.ConfigError` that names it and the keys allowed there.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from ..config import RouterConfig
from ..config_io import _load_json
from ..errors import ConfigError, closest
from .settings import ProductionSettings, RouterSpec, legacy_estimator, nan_policy_for

LEGACY_ROUTER_KEYS = ("input_dim", "num_experts", "min_experts", "max_experts",
                      "complexity_estimator", "routing_strategy", "load_balancing", "noise_factor")
PERFORMANCE_KEYS = ("enable_caching", "enable_monitoring", "cache_size", "parallel_threshold")
SECURITY_KEYS = ("enable_validation", "max_tensor_size", "max_batch_size")
TOP_LEVEL_KEYS = ("router_config", "performance", "security", "production", "d_model")

#: Why each ignored older key does nothing.
IGNORED_REASONS: dict[str, str] = {
    "performance.enable_caching": "routing results are not cached: a plan depends on each "
                                  "token's hidden state, so a cache would only hit on repeated "
                                  "identical batches",
    "performance.cache_size": "there is no routing-result cache (see enable_caching)",
    "performance.parallel_threshold": "the backends already run each GEMM on all intra-op "
                                      "threads; a batch is not split over a thread pool",
}
#: The older ``routing_strategy`` values and the strategy each one was.
LEGACY_STRATEGIES: dict[str, tuple[str, str]] = {
    "top_k": ("complexity", "the older router chose each token's k in [min_experts, "
              "max_experts] from the complexity estimator, then took the top k experts"),
}


def spec_from_file(path: str | os.PathLike[str]) -> RouterSpec:
    """Read a production router JSON file (see the module docstring)."""
    return spec_from_mapping(_load_json(path), source=str(path))


def spec_from_mapping(data: Mapping[str, Any], source: str = "mapping") -> RouterSpec:
    """:func:`spec_from_file` for a mapping already parsed."""
    _only(data, TOP_LEVEL_KEYS, "the top level")
    router = _section(data, "router_config")
    performance = _section(data, "performance")
    security = _section(data, "security")
    _only(router, (*LEGACY_ROUTER_KEYS, *_router_fields()), "router_config")
    _only(performance, PERFORMANCE_KEYS, "performance")
    _only(security, SECURITY_KEYS, "security")
    notes: list[str] = []
    fields = {k: v for k, v in router.items() if k not in LEGACY_ROUTER_KEYS}
    for key in ("num_experts", "min_experts", "max_experts"):
        if key in router:
            fields[key] = router[key]
    if "complexity_estimator" in router:
        fields["complexity_estimator"], note = legacy_estimator(
            router["complexity_estimator"], "router_config.complexity_estimator")
        notes += [note] if note else []
    if "routing_strategy" in router:
        fields["strategy"], note = _strategy(router["routing_strategy"])
        notes += [note] if note else []
    if "load_balancing" in router:
        fields["aux_loss_coef"] = _load_balancing(router["load_balancing"])
        notes.append(f"router_config.load_balancing={router['load_balancing']} -> "
                     f"aux_loss_coef={fields['aux_loss_coef']} (the load-balancing loss, "
                     f"applied in training)")
    if "noise_factor" in router:
        fields.update(_noise(router["noise_factor"]))
        notes.append(f"router_config.noise_factor={router['noise_factor']} -> "
                     f"noise={fields['noise']!r}, noise_std={fields['noise_std']} "
                     f"(router noise in training only)")
    if "enable_validation" in security:
        fields["nan_policy"] = nan_policy_for(security["enable_validation"],
                                              "security.enable_validation")
    for key in ("performance.enable_caching", "performance.cache_size",
                "performance.parallel_threshold"):
        section, name = key.split(".")
        if name in (performance if section == "performance" else security):
            notes.append(f"{key} is ignored: {IGNORED_REASONS[key]}")
    settings = dict(_section(data, "production"))
    _only(settings, tuple(f.name for f in dataclasses.fields(ProductionSettings)), "production")
    if "enable_monitoring" in performance:
        settings["enable_monitoring"] = performance["enable_monitoring"]
    for key in ("max_tensor_size", "max_batch_size"):
        if key in security:
            settings[key] = security[key]
    if "num_experts" not in fields:
        raise ConfigError("router_config.num_experts", None, "the number of experts "
                          "(an int >= 1) in the router_config section")
    config = RouterConfig.from_dict(fields)
    return RouterSpec(config, _width(data, router), ProductionSettings(**settings), tuple(notes),
                      source)


def _router_fields() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(RouterConfig))


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    section = data.get(name, {})
    if not isinstance(section, Mapping):
        raise ConfigError(name, section, "a JSON object (a section of keys)")
    return section


def _only(section: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in section:
        if key not in allowed:
            hint = closest(key, allowed)
            prefix = "" if where == "the top level" else f"{where}."
            raise ConfigError(f"{prefix}{key}", section[key],
                              f"a key documented for {where}"
                              + (f" (did you mean {hint!r}?)" if hint else "")
                              + f": {', '.join(allowed)}")


def _strategy(value: Any) -> tuple[Any, str | None]:
    if isinstance(value, str) and value in LEGACY_STRATEGIES:
        real, why = LEGACY_STRATEGIES[value]
        return real, f"router_config.routing_strategy={value!r} -> strategy={real!r}: {why}"
    return value, None


def _load_balancing(value: Any) -> float:
    if not isinstance(value, bool):
        raise ConfigError("router_config.load_balancing", value, "true or false")
    return 0.01 if value else 0.0


def _noise(value: Any) -> dict[str, Any]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ConfigError("router_config.noise_factor", value, "a number in [0, 1]")
    return {"noise": "normal", "noise_std": float(value)} if value > 0 else {"noise": "none",
                                                                            "noise_std": 1.0}


def _width(data: Mapping[str, Any], router: Mapping[str, Any]) -> int:
    values = {key: value for key, value in (("router_config.input_dim", router.get("input_dim")),
                                            ("d_model", data.get("d_model"))) if value is not None}
    if len(set(map(repr, values.values()))) > 1:
        raise ConfigError("d_model", values, "one width: router_config.input_dim and d_model "
                          "disagree")
    if not values:
        raise ConfigError("router_config.input_dim", None, "the hidden-state width (an int "
                          ">= 1): input_dim in router_config or d_model at top level")
    key, value = next(iter(values.items()))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(key, value, "an int >= 1 (the hidden-state width)")
    return value
