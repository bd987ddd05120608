"""RouterConfig / MoEConfig: frozen, hashable, validated field by field, loaded from env and JSON.

Every invalid value must raise :class:`moe_router.ConfigError` whose ``field`` names the field,
whose message shows the value, and whose ``allowed`` says what is accepted. Two coverage checks
keep the tables below complete when a field is added: every dataclass field has an invalid case,
and every environment variable of :func:`moe_router.config.env_variables` has a parse case.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

import moe_router as mr
from moe_router.config import env_variables
from moe_router.layer.observers import TraceConfig
from moe_router.registry import Registrar, default_registry

E = 8
#: the registered names (no hard-coded list: the registry is the source of truth)
STRATEGIES = tuple(default_registry().strategy_names())
ESTIMATORS = tuple(default_registry().estimator_names())

# ----- invalid values, field by field ---------------------------------------------------------
#: (id, RouterConfig kwargs on top of num_experts=8, the field the error must name)
ROUTER_INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("num_experts=0", {"num_experts": 0}, "num_experts"),
    ("num_experts float", {"num_experts": 8.0}, "num_experts"),
    ("num_experts bool", {"num_experts": True}, "num_experts"),
    ("strategy empty", {"strategy": ""}, "strategy"),
    ("strategy not str", {"strategy": 3}, "strategy"),
    ("strategy unknown", {"strategy": "topk"}, "strategy"),
    ("k > E", {"k": 9}, "k"),
    ("k = 0", {"k": 0}, "k"),
    ("k float", {"k": 2.0}, "k"),
    ("k > E + N", {"k": 11, "num_null_experts": 2}, "k"),
    ("top_p = 0", {"top_p": 0.0}, "top_p"),
    ("top_p > 1", {"top_p": 1.5}, "top_p"),
    ("top_p < 0", {"top_p": -0.1}, "top_p"),
    ("threshold = 0", {"threshold": 0.0}, "threshold"),
    ("threshold > 1", {"threshold": 1.01}, "threshold"),
    ("min_experts < 0", {"min_experts": -1}, "min_experts"),
    ("min_experts > E", {"min_experts": 9, "strategy": "top_p"}, "min_experts"),
    ("min > max", {"strategy": "top_p", "min_experts": 4, "max_experts": 2}, "min_experts"),
    ("min > k for top_k", {"min_experts": 3, "k": 2}, "min_experts"),
    ("max_experts = 0", {"max_experts": 0}, "max_experts"),
    ("max_experts > E", {"max_experts": 9}, "max_experts"),
    ("target > max", {"strategy": "complexity", "max_experts": 4, "target_experts": 5.0},
     "target_experts"),
    ("target < min", {"strategy": "complexity", "min_experts": 2, "target_experts": 1.5},
     "target_experts"),
    ("target not a number", {"strategy": "complexity", "target_experts": "2"}, "target_experts"),
    ("score_func", {"score_func": "tanh"}, "score_func"),
    ("normalize_weights", {"normalize_weights": "yes"}, "normalize_weights"),
    ("capacity_factor = 0", {"capacity_factor": 0.0}, "capacity_factor"),
    ("capacity_factor < 0", {"capacity_factor": -1.0}, "capacity_factor"),
    ("drop_policy", {"drop_policy": "random"}, "drop_policy"),
    ("num_null_experts < 0", {"num_null_experts": -1}, "num_null_experts"),
    ("null experts with top_p", {"strategy": "top_p", "num_null_experts": 2}, "num_null_experts"),
    ("use_expert_bias", {"use_expert_bias": "yes"}, "use_expert_bias"),
    ("bias_update_rate < 0", {"bias_update_rate": -1e-3}, "bias_update_rate"),
    ("groups do not divide E", {"num_groups": 3}, "num_groups"),
    ("num_groups = 0", {"num_groups": 0}, "num_groups"),
    ("topk_groups without groups", {"topk_groups": 2}, "topk_groups"),
    ("topk_groups > num_groups", {"num_groups": 4, "topk_groups": 5}, "topk_groups"),
    ("too few groups for k", {"num_groups": 4, "topk_groups": 1, "k": 4}, "topk_groups"),
    ("route_scale = 0", {"route_scale": 0.0}, "route_scale"),
    ("complexity_estimator empty", {"complexity_estimator": ""}, "complexity_estimator"),
    ("complexity_estimator unknown", {"complexity_estimator": "perplexity"},
     "complexity_estimator"),
    ("complexity_spread = 0", {"complexity_spread": 0.0}, "complexity_spread"),
    ("noise", {"noise": "uniform"}, "noise"),
    ("noise_std < 0", {"noise_std": -1.0}, "noise_std"),
    ("aux_loss_coef < 0", {"aux_loss_coef": -0.01}, "aux_loss_coef"),
    ("z_loss_coef < 0", {"z_loss_coef": -1.0}, "z_loss_coef"),
    ("entropy_loss_coef < 0", {"entropy_loss_coef": -1.0}, "entropy_loss_coef"),
    ("balance_convention", {"balance_convention": "mixtral"}, "balance_convention"),
    ("causal not bool", {"causal": "yes"}, "causal"),
    ("expert_choice causal", {"strategy": "expert_choice", "causal": True}, "strategy"),
    ("controller_rate < 0", {"controller_rate": -0.1}, "controller_rate"),
    ("hash_seed float", {"hash_seed": 1.5}, "hash_seed"),
    ("hash_buckets = 0", {"hash_buckets": 0}, "hash_buckets"),
    ("nan_policy", {"nan_policy": "warn"}, "nan_policy"),
    ("nan_policy always", {"nan_policy": "always"}, "nan_policy"),
    ("balanced_debug", {"balanced_debug": 1}, "balanced_debug"),
]

#: (id, MoEConfig kwargs on top of a valid layer, field)
MOE_INVALID: list[tuple[str, dict[str, Any], str]] = [
    ("d_model = 0", {"d_model": 0}, "d_model"),
    ("d_model float", {"d_model": 8.5}, "d_model"),
    ("d_ff = 0", {"d_ff": 0}, "d_ff"),
    ("router not a RouterConfig", {"router": {"num_experts": 8}}, "router"),
    ("activation", {"activation": "tanh"}, "activation"),
    ("num_shared_experts < 0", {"num_shared_experts": -1}, "num_shared_experts"),
    ("shared_d_ff = 0", {"shared_d_ff": 0}, "shared_d_ff"),
    ("shared gate without shared", {"shared_expert_gate": True}, "shared_expert_gate"),
    ("router_bias", {"router_bias": "no"}, "router_bias"),
    ("init_std = 0", {"init_std": 0.0}, "init_std"),
    ("dispatch empty", {"dispatch": ""}, "dispatch"),
    ("dispatch unknown", {"dispatch": "magic"}, "dispatch"),
    ("dispatch not str", {"dispatch": 3}, "dispatch"),
    ("dispatch unqualified framework kernel", {"dispatch": "grouped_mm"}, "dispatch"),
    ("dispatch capacity without capacity", {"dispatch": "capacity"}, "dispatch"),
    ("observers unknown", {"observers": ("nope",)}, "observers"),
    ("observers a str", {"observers": "expert_load"}, "observers"),
    ("observers twice", {"observers": ("expert_load", "expert_load")}, "observers"),
    ("trace a str", {"trace": "on"}, "trace"),
]


def _moe_kwargs(**changes: Any) -> dict[str, Any]:
    return {"d_model": 16, "d_ff": 32, "router": mr.RouterConfig(num_experts=E), **changes}


def _assert_names(err: mr.ConfigError, field: str, value: Any) -> None:
    assert err.field == field
    message = str(err)
    assert field in message and repr(value) in message, message
    assert err.allowed and err.allowed in message


@pytest.mark.parametrize(("kwargs", "field"), [c[1:] for c in ROUTER_INVALID],
                         ids=[c[0] for c in ROUTER_INVALID])
def test_router_config_rejects_invalid_value(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(**{"num_experts": E, **kwargs})
    _assert_names(info.value, field, kwargs.get(field, info.value.value))
    assert isinstance(info.value, ValueError)  # also catchable as a ValueError


@pytest.mark.parametrize(("kwargs", "field"), [c[1:] for c in MOE_INVALID],
                         ids=[c[0] for c in MOE_INVALID])
def test_moe_config_rejects_invalid_value(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.MoEConfig(**_moe_kwargs(**kwargs))
    _assert_names(info.value, field, kwargs[field])


@pytest.mark.parametrize(("cls", "table"), [(mr.RouterConfig, ROUTER_INVALID),
                                            (mr.MoEConfig, MOE_INVALID)])
def test_every_field_has_an_invalid_case(cls: type, table: list) -> None:
    tested = {field for _, _, field in table}
    untested = {f.name for f in dataclasses.fields(cls)} - tested
    assert not untested, f"add invalid-value cases for {sorted(untested)}"


def test_error_message_is_readable() -> None:
    with pytest.raises(mr.ConfigError, match=r"k=9 is invalid: expected an int in \[1, "
                                             r"num_experts \+ num_null_experts\] = \[1, 8\]"):
        mr.RouterConfig(num_experts=8, k=9)


# ----- frozen, hashable, kw-only ----------------------------------------------------------------
def test_configs_are_frozen_and_keyword_only() -> None:
    rc = mr.RouterConfig(num_experts=E)
    mc = mr.MoEConfig(**_moe_kwargs())
    with pytest.raises(dataclasses.FrozenInstanceError):
        rc.k = 4  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.d_model = 4  # type: ignore[misc]
    with pytest.raises(TypeError):
        mr.RouterConfig(8)  # type: ignore[misc]


def test_configs_are_hashable_and_compare_by_value() -> None:
    a = mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5)
    b = mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5)
    c = a.replace(top_p=0.6)
    assert a == b and hash(a) == hash(b)
    assert a != c
    cache = {a: "first"}
    assert cache[b] == "first" and c not in cache
    ma, mb = mr.MoEConfig(**_moe_kwargs(router=a)), mr.MoEConfig(**_moe_kwargs(router=b))
    assert ma == mb and hash(ma) == hash(mb)
    assert ma.with_router(top_p=0.6).router == c


def test_replace_validates_again() -> None:
    rc = mr.RouterConfig(num_experts=E)
    with pytest.raises(mr.ConfigError) as info:
        rc.replace(k=E + 1)
    assert info.value.field == "k"
    with pytest.raises(mr.ConfigError) as info:
        mr.MoEConfig(**_moe_kwargs()).with_router(strategy="expert_choice", causal=True)
    assert info.value.field == "strategy"


def test_derived_quantities() -> None:
    rc = mr.RouterConfig(num_experts=E, k=3)
    assert (rc.max_slots, rc.nominal_experts, rc.is_dynamic) == (3, 3.0, False)
    assert rc.capacity(10) is None
    capped = rc.replace(capacity_factor=1.25)
    assert capped.capacity(10) == math.ceil(1.25 * 10 * 3 / E)
    dyn = mr.RouterConfig(num_experts=E, strategy="top_p", max_experts=4)
    assert (dyn.max_slots, dyn.is_dynamic) == (4, True)
    assert mr.RouterConfig(num_experts=E, strategy="threshold").max_slots == E
    null = mr.RouterConfig(num_experts=E, num_null_experts=2, k=3)
    assert (null.num_choices, null.is_dynamic) == (E + 2, True)


# ----- hypothesis: validation is total, valid configs keep their invariants ---------------------
values = st.one_of(st.none(), st.booleans(), st.integers(-2, 12),
                   st.floats(-1.0, 12.0, allow_nan=False), st.sampled_from(["", "top_p", "x"]))


@given(num_experts=st.one_of(st.integers(-1, 12), values), k=values, min_experts=values,
       max_experts=values, target_experts=values, top_p=values, num_groups=values,
       topk_groups=values, num_null_experts=values,
       strategy=st.sampled_from([*STRATEGIES, "", "top_q"]))
def test_validation_is_total(**kwargs: Any) -> None:
    """Any mix of values gives a ConfigError or a config whose invariants hold; nothing else."""
    try:
        rc = mr.RouterConfig(**kwargs)
    except mr.ConfigError as err:
        assert err.field in kwargs or err.field == "strategy"
        return
    E_, K = rc.num_experts, rc.max_slots
    assert 1 <= K <= E_ and 0 <= rc.min_experts <= K
    assert 1 <= rc.k <= rc.num_choices
    assert 0 < rc.top_p <= 1
    if rc.target_experts is not None:
        assert rc.min_experts <= rc.target_experts <= K
    if rc.num_groups is not None:
        assert E_ % rc.num_groups == 0
    if rc.num_null_experts:
        assert rc.strategy == "top_k"


@st.composite
def router_configs(draw: st.DrawFn) -> mr.RouterConfig:
    """Valid RouterConfigs over the fields that interact (E, k, min/max/target, p, groups...)."""
    E_ = draw(st.integers(1, 16))
    strategy = draw(st.sampled_from(STRATEGIES))
    spec = default_registry().strategy_spec(strategy)
    causal = spec.causal_safe and draw(st.booleans())
    k = draw(st.integers(1, E_))
    max_experts = draw(st.none() | st.integers(1, E_))
    K = max_experts or (k if spec.fixed_k else E_)
    min_experts = draw(st.integers(0, K))
    target = draw(st.none() | st.floats(min_experts, K, allow_nan=False))
    return mr.RouterConfig(
        num_experts=E_, strategy=strategy, k=k, max_experts=max_experts, min_experts=min_experts,
        target_experts=target, causal=causal,
        top_p=draw(st.floats(1e-6, 1.0)), threshold=draw(st.floats(1e-6, 1.0)),
        score_func=draw(st.sampled_from(["softmax", "sigmoid"])),
        normalize_weights=draw(st.sampled_from([None, True, False])),
        capacity_factor=draw(st.none() | st.floats(0.1, 4.0)),
        drop_policy=draw(st.sampled_from(["position", "probability"])),
        complexity_estimator=draw(st.sampled_from(ESTIMATORS)),
        nan_policy=draw(st.sampled_from(["raise", "raise_always", "ignore"])),
        noise=draw(st.sampled_from(["none", "normal", "gumbel", "jitter"])),
        aux_loss_coef=draw(st.floats(0.0, 1.0)), hash_seed=draw(st.integers(-5, 2**31)),
        balance_convention=draw(st.sampled_from(["switch", "hf"])),
    )


def _env_text(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


@given(rc=router_configs())
def test_valid_configs_round_trip_through_dict_json_and_env(rc: mr.RouterConfig,
                                                            tmp_path_factory) -> None:
    data = dataclasses.asdict(rc)
    assert mr.RouterConfig.from_dict(data) == rc
    path = tmp_path_factory.mktemp("cfg") / "router.json"
    path.write_text(json.dumps({"router_config": data}))
    loaded = mr.RouterConfig.from_json(path)
    assert loaded == rc and hash(loaded) == hash(rc)
    environ = {f"MOE_{name.upper()}": _env_text(value) for name, value in data.items()}
    assert mr.RouterConfig.from_env(environ) == rc


@given(E_=st.integers(1, 12), extra=st.integers(1, 4))
def test_k_above_num_choices_always_rejected(E_: int, extra: int) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(num_experts=E_, k=E_ + extra)
    assert info.value.field == "k" and str(E_) in info.value.allowed


# ----- from_env ----------------------------------------------------------------------------------
#: variable -> (raw text, expected field value, other variables it needs)
ROUTER_ENV_CASES: dict[str, tuple[str, Any, dict[str, str]]] = {
    "MOE_NUM_EXPERTS": ("6", 6, {}),
    "MOE_STRATEGY": ("top_p", "top_p", {}),
    "MOE_ROUTING_STRATEGY": (" threshold ", "threshold", {}),
    "MOE_K": ("3", 3, {}),
    "MOE_TOP_K": ("4", 4, {}),
    "MOE_TOP_P": ("0.55", 0.55, {}),
    "MOE_THRESHOLD": ("0.75", 0.75, {}),
    "MOE_MIN_EXPERTS": ("2", 2, {"MOE_ROUTING_STRATEGY": "top_p"}),
    "MOE_MAX_EXPERTS": ("3", 3, {"MOE_ROUTING_STRATEGY": "top_p"}),
    "MOE_TARGET_EXPERTS": ("1.5", 1.5, {"MOE_ROUTING_STRATEGY": "complexity"}),
    "MOE_SCORE_FUNC": ("sigmoid", "sigmoid", {}),
    "MOE_NORMALIZE_WEIGHTS": ("no", False, {}),
    "MOE_CAPACITY_FACTOR": ("1.25", 1.25, {}),
    "MOE_DROP_POLICY": ("probability", "probability", {}),
    "MOE_NUM_NULL_EXPERTS": ("2", 2, {}),
    "MOE_USE_EXPERT_BIAS": ("TRUE", True, {}),
    "MOE_BIAS_UPDATE_RATE": ("0.002", 0.002, {}),
    "MOE_NUM_GROUPS": ("4", 4, {}),
    "MOE_TOPK_GROUPS": ("2", 2, {"MOE_NUM_GROUPS": "4"}),
    "MOE_ROUTE_SCALE": ("2.5", 2.5, {}),
    "MOE_COMPLEXITY_ESTIMATOR": ("hidden_norm", "hidden_norm", {}),
    "MOE_COMPLEXITY_SPREAD": ("2", 2.0, {}),
    "MOE_NOISE": ("gumbel", "gumbel", {}),
    "MOE_NOISE_STD": ("0.5", 0.5, {}),
    "MOE_AUX_LOSS_COEF": ("0.02", 0.02, {}),
    "MOE_Z_LOSS_COEF": ("0.001", 0.001, {}),
    "MOE_ENTROPY_LOSS_COEF": ("0.1", 0.1, {}),
    "MOE_BALANCE_CONVENTION": ("hf", "hf", {}),
    "MOE_CAUSAL": ("1", True, {}),
    "MOE_CONTROLLER_RATE": ("0.05", 0.05, {}),
    "MOE_HASH_SEED": ("7", 7, {}),
    "MOE_HASH_BUCKETS": ("128", 128, {}),
    "MOE_NAN_POLICY": ("ignore", "ignore", {}),
    "MOE_BALANCED_DEBUG": ("yes", True, {}),
}

MOE_ENV_CASES: dict[str, tuple[str, Any, dict[str, str]]] = {
    "MOE_D_MODEL": ("24", 24, {}),
    "MOE_INPUT_DIM": ("40", 40, {}),
    "MOE_D_FF": ("48", 48, {}),
    "MOE_HIDDEN_DIM": ("56", 56, {}),
    "MOE_ACTIVATION": ("gelu", "gelu", {}),
    "MOE_NUM_SHARED_EXPERTS": ("1", 1, {}),
    "MOE_SHARED_D_FF": ("64", 64, {}),
    "MOE_SHARED_EXPERT_GATE": ("true", True, {"MOE_NUM_SHARED_EXPERTS": "1"}),
    "MOE_ROUTER_BIAS": ("true", True, {}),
    "MOE_INIT_STD": ("0.1", 0.1, {}),
    "MOE_DISPATCH": ("sorted", "sorted", {}),
    "MOE_OBSERVERS": (" expert_load, ", ("expert_load",), {}),
    "MOE_TRACE": ("256,16", TraceConfig(256, 16), {}),
}
ROUTER_BASE = {"MOE_NUM_EXPERTS": "8"}
MOE_BASE = {**ROUTER_BASE, "MOE_D_MODEL": "16", "MOE_D_FF": "32"}


@pytest.mark.parametrize(("cls", "cases"), [(mr.RouterConfig, ROUTER_ENV_CASES),
                                            (mr.MoEConfig, MOE_ENV_CASES)])
def test_every_documented_variable_has_a_case(cls: type, cases: dict) -> None:
    assert set(cases) == set(env_variables(cls))


@pytest.mark.parametrize("variable", sorted(ROUTER_ENV_CASES))
def test_router_from_env_reads_variable(variable: str) -> None:
    raw, expected, context = ROUTER_ENV_CASES[variable]
    field = env_variables(mr.RouterConfig)[variable]
    rc = mr.RouterConfig.from_env({**ROUTER_BASE, **context, variable: raw})
    assert getattr(rc, field) == expected
    if variable != "MOE_NUM_EXPERTS":
        assert getattr(mr.RouterConfig.from_env({**ROUTER_BASE, **context}), field) != expected


@pytest.mark.parametrize("variable", sorted(MOE_ENV_CASES))
def test_moe_from_env_reads_variable(variable: str) -> None:
    raw, expected, context = MOE_ENV_CASES[variable]
    field = env_variables(mr.MoEConfig)[variable]
    base = {k: v for k, v in MOE_BASE.items() if env_variables(mr.MoEConfig).get(k) != field}
    mc = mr.MoEConfig.from_env({**base, **context, variable: raw})
    assert getattr(mc, field) == expected
    assert mc.router == mr.RouterConfig(num_experts=8)


def test_the_issue_variables_together() -> None:
    environ = {"MOE_NUM_EXPERTS": "16", "MOE_MIN_EXPERTS": "1", "MOE_MAX_EXPERTS": "4",
               "MOE_INPUT_DIM": "64", "MOE_HIDDEN_DIM": "128",
               "MOE_ROUTING_STRATEGY": "complexity", "MOE_COMPLEXITY_ESTIMATOR": "hidden_norm",
               "MOE_TARGET_EXPERTS": "2.5", "UNRELATED": "x"}
    mc = mr.MoEConfig.from_env(environ)
    assert (mc.d_model, mc.d_ff) == (64, 128)
    assert mc.router == mr.RouterConfig(num_experts=16, min_experts=1, max_experts=4,
                                        strategy="complexity", target_experts=2.5,
                                        complexity_estimator="hidden_norm")
    assert mr.RouterConfig.from_env(environ) == mc.router


def test_from_env_reads_os_environ_and_overrides_win(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOE_NUM_EXPERTS", "4")
    monkeypatch.setenv("MOE_TOP_P", "0.3")
    rc = mr.RouterConfig.from_env(strategy="top_p", top_p=0.9)
    assert (rc.num_experts, rc.strategy, rc.top_p) == (4, "top_p", 0.9)


def test_from_env_optional_fields_accept_none() -> None:
    rc = mr.RouterConfig.from_env({**ROUTER_BASE, "MOE_MAX_EXPERTS": "none",
                                   "MOE_CAPACITY_FACTOR": ""})
    assert rc.max_experts is None and rc.capacity_factor is None


@pytest.mark.parametrize(("environ", "variable"), [
    ({"MOE_NUM_EXPERTS": "eight"}, "MOE_NUM_EXPERTS"),
    ({**ROUTER_BASE, "MOE_TOP_P": "high"}, "MOE_TOP_P"),
    ({**ROUTER_BASE, "MOE_CAUSAL": "maybe"}, "MOE_CAUSAL"),
    ({**ROUTER_BASE, "MOE_MAX_EXPERTS": "2.5"}, "MOE_MAX_EXPERTS"),
    ({**ROUTER_BASE, "MOE_TOP_P": "1.5"}, "MOE_TOP_P"),  # parses, but out of range
    ({**ROUTER_BASE, "MOE_TOP_K": "9"}, "MOE_TOP_K"),
    ({**ROUTER_BASE, "MOE_ROUTING_STRATEGY": "expert_choice", "MOE_CAUSAL": "1"},
     "MOE_ROUTING_STRATEGY"),
    ({**ROUTER_BASE, "MOE_ROUTING_STRATEGY": "top_p", "MOE_MIN_EXPERTS": "5",
      "MOE_MAX_EXPERTS": "3"}, "MOE_MIN_EXPERTS"),
    ({**ROUTER_BASE, "MOE_COMPLEXITY_ESTIMATOR": ""}, "MOE_COMPLEXITY_ESTIMATOR"),
    ({**ROUTER_BASE, "MOE_COMPLEXITY_ESTIMATOR": "nope"}, "MOE_COMPLEXITY_ESTIMATOR"),
    ({**ROUTER_BASE, "MOE_ROUTING_STRATEGY": "garbage"}, "MOE_ROUTING_STRATEGY"),
    ({**ROUTER_BASE, "MOE_STRATEGY": "garbage"}, "MOE_STRATEGY"),
    ({**ROUTER_BASE, "MOE_K": "2", "MOE_TOP_K": "3"}, "MOE_TOP_K"),  # two names, two values
    ({}, "MOE_NUM_EXPERTS"),  # required and missing
])
def test_router_from_env_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig.from_env(environ)
    assert variable in str(info.value)


@pytest.mark.parametrize(("environ", "variable"), [
    ({**MOE_BASE, "MOE_D_MODEL": "0"}, "MOE_D_MODEL"),
    ({**ROUTER_BASE, "MOE_INPUT_DIM": "wide", "MOE_D_FF": "8"}, "MOE_INPUT_DIM"),
    ({**MOE_BASE, "MOE_ACTIVATION": "tanh"}, "MOE_ACTIVATION"),
    ({**MOE_BASE, "MOE_DISPATCH": "magic"}, "MOE_DISPATCH"),
    ({**MOE_BASE, "MOE_DISPATCH": "capacity"}, "MOE_DISPATCH"),
    ({**MOE_BASE, "MOE_OBSERVERS": "expert_load,nope"}, "MOE_OBSERVERS"),
    ({**MOE_BASE, "MOE_ROUTING_STRATEGY": "garbage"}, "MOE_ROUTING_STRATEGY"),
    ({**ROUTER_BASE, "MOE_D_FF": "8"}, "MOE_INPUT_DIM"),  # d_model missing: both names given
    ({"MOE_D_MODEL": "8", "MOE_D_FF": "8"}, "MOE_NUM_EXPERTS"),
])
def test_moe_from_env_errors_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.MoEConfig.from_env(environ)
    assert variable in str(info.value)


def test_same_value_under_two_names_is_accepted() -> None:
    rc = mr.RouterConfig.from_env({**ROUTER_BASE, "MOE_K": "3", "MOE_TOP_K": "3"})
    assert rc.k == 3


# ----- from_json ----------------------------------------------------------------------------------
def _write(tmp_path: Path, data: Any, name: str = "cfg.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_router_from_flat_json(tmp_path: Path) -> None:
    path = _write(tmp_path, {"num_experts": 8, "strategy": "top_p", "top_p": 0.5,
                             "max_experts": 4})
    assert mr.RouterConfig.from_json(path) == mr.RouterConfig(
        num_experts=8, strategy="top_p", top_p=0.5, max_experts=4)


def test_nested_sections_feed_both_configs(tmp_path: Path) -> None:
    router = {"num_experts": 8, "strategy": "threshold", "threshold": 0.8,
              "capacity_factor": 1.25}
    path = _write(tmp_path, {"router_config": router,
                             "moe_config": {"d_model": 32, "d_ff": 64, "activation": "geglu"}})
    rc = mr.RouterConfig.from_json(path)
    assert rc == mr.RouterConfig(**router)
    mc = mr.MoEConfig.from_json(path)
    assert mc == mr.MoEConfig(d_model=32, d_ff=64, activation="geglu", router=rc)


def test_moe_from_json_router_inside_moe_section_and_flat(tmp_path: Path) -> None:
    expected = mr.MoEConfig(d_model=8, d_ff=16, router=mr.RouterConfig(num_experts=4, k=1))
    inside = _write(tmp_path, {"moe_config": {"d_model": 8, "d_ff": 16,
                                              "router_config": {"num_experts": 4, "k": 1}}}, "a")
    flat = _write(tmp_path, {"d_model": 8, "d_ff": 16, "router": {"num_experts": 4, "k": 1}}, "b")
    assert mr.MoEConfig.from_json(inside) == expected
    assert mr.MoEConfig.from_json(flat) == expected


@pytest.mark.parametrize("data", [
    {"num_experts": 8, "top_q": 0.5},
    {"router_config": {"num_experts": 8, "top_q": 0.5}},
])
def test_router_from_json_rejects_unknown_keys(tmp_path: Path, data: dict) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig.from_json(_write(tmp_path, data))
    assert info.value.field == "top_q" and "top_p" in info.value.allowed


@pytest.mark.parametrize(("data", "field"), [
    ({"moe_config": {"d_model": 8, "d_ff": 8, "dmodel": 8}, "router_config": {"num_experts": 2}},
     "dmodel"),
    ({"moe_config": {"d_model": 8, "d_ff": 8}, "router_config": {"num_expert": 2}},
     "num_expert"),
    ({"moe_config": {"d_model": 8, "d_ff": 8}, "router_config": {"num_experts": 2, "k": 3}}, "k"),
    ({"moe_config": {"d_model": 8}, "router_config": {"num_experts": 2}}, "d_ff"),
])
def test_moe_from_json_errors_name_the_field(tmp_path: Path, data: dict, field: str) -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.MoEConfig.from_json(_write(tmp_path, data))
    assert info.value.field == field


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_from_json_rejects_bad_files(tmp_path: Path, text: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig.from_json(path)
    assert info.value.field == "path" and str(path) in str(info.value)


# ----- registered names: checked when the config is built -----------------------------------------
def test_unknown_strategy_suggests_the_closest() -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(num_experts=E, strategy="topk")
    message = str(info.value)
    assert message.startswith("strategy='topk' is invalid: expected a registered strategy "
                              "(did you mean 'top_k'?); known: ")
    assert ", ".join(STRATEGIES) in message
    err = info.value
    assert isinstance(err, mr.UnknownNameError) and isinstance(err, ValueError)
    assert (err.field, err.kind, err.name, err.known) == ("strategy", "strategy", "topk",
                                                          list(STRATEGIES))


def test_unknown_name_without_a_close_one_lists_the_known() -> None:
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(num_experts=E, complexity_estimator="zzzz")
    assert "did you mean" not in str(info.value)
    assert info.value.field == "complexity_estimator"
    assert all(name in str(info.value) for name in ESTIMATORS)


def test_unknown_strategy_from_env_names_the_variable() -> None:
    with pytest.raises(mr.UnknownNameError) as info:
        mr.RouterConfig.from_env({**ROUTER_BASE, "MOE_ROUTING_STRATEGY": "top-p"})
    message = str(info.value)
    assert message.startswith("strategy (from $MOE_ROUTING_STRATEGY)='top-p' is invalid")
    assert "did you mean 'top_p'?" in message and info.value.name == "top-p"


def test_unknown_names_from_json_name_the_field(tmp_path: Path) -> None:
    path = _write(tmp_path, {"router_config": {"num_experts": 8, "strategy": "treshold"}})
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig.from_json(path)
    assert info.value.field == "strategy" and "did you mean 'threshold'?" in str(info.value)
    path = _write(tmp_path, {"moe_config": {"d_model": 8, "d_ff": 8, "dispatch": "sortd"},
                             "router_config": {"num_experts": 2}}, "moe.json")
    with pytest.raises(mr.ConfigError) as info:
        mr.MoEConfig.from_json(path)
    assert info.value.field == "dispatch" and "did you mean 'sorted'?" in str(info.value)


def test_strategy_metadata_is_exposed() -> None:
    rc = mr.RouterConfig(num_experts=E, strategy="expert_choice", k=2)
    spec = rc.strategy_spec
    assert spec.name == "expert_choice" and spec.own_capacity and not spec.causal_safe
    assert (rc.max_slots, rc.is_dynamic, rc.nominal_experts) == (E, True, float(E))
    hashed = mr.RouterConfig(num_experts=E, strategy="hash", k=3)
    assert (hashed.max_slots, hashed.is_dynamic, hashed.nominal_experts) == (3, False, 3.0)


def test_nan_policy_values() -> None:
    for policy in ("raise", "raise_always", "ignore"):
        assert mr.RouterConfig(num_experts=E, nan_policy=policy).nan_policy == policy
    assert mr.RouterConfig(num_experts=E).nan_policy == "raise"


# ----- dispatch and observers ------------------------------------------------------------------
class _StdlibFrameworkKernels:
    """Kernels of a 'framework' that is always installed (json) and of one that never is."""

    @mr.hookimpl
    def moe_router_register_kernels(self, registrar: Registrar) -> None:
        registrar.kernel("json:fastmm", "json:dumps", framework="json")
        registrar.kernel("ghost_fw_not_installed:fastmm", "ghost_fw_not_installed.k:mm",
                         framework="ghost_fw_not_installed")


@pytest.fixture
def framework_kernels() -> Iterator[None]:
    plugin = _StdlibFrameworkKernels()
    default_registry().register(plugin)
    try:
        yield
    finally:
        default_registry().unregister(plugin)


def _moe(**changes: Any) -> mr.MoEConfig:
    return mr.MoEConfig(**_moe_kwargs(**changes))


def test_portable_dispatch_names_are_accepted() -> None:
    portable = [n for n in default_registry().kernel_names()
                if default_registry().kernel_spec(n).framework is None]
    assert {"sorted", "capacity", "dense", "gather"} <= set(portable)
    for name in ["auto", *portable]:
        router = mr.RouterConfig(num_experts=E, capacity_factor=1.25)
        assert _moe(dispatch=name, router=router).dispatch == name


def test_capacity_dispatch_needs_a_capacity() -> None:
    with pytest.raises(mr.ConfigError, match="capacity_factor") as info:
        _moe(dispatch="capacity")
    assert info.value.field == "dispatch"
    assert _moe(dispatch="capacity", router=mr.RouterConfig(num_experts=E, capacity_factor=1.0))
    # expert choice sizes its own capacity
    assert _moe(dispatch="capacity", router=mr.RouterConfig(num_experts=E,
                                                            strategy="expert_choice"))


def test_qualified_kernel_of_an_installed_framework(framework_kernels: None) -> None:
    assert _moe(dispatch="json:fastmm").dispatch == "json:fastmm"
    with pytest.raises(mr.ConfigError) as info:
        _moe(dispatch="fastmm")
    message = str(info.value)
    assert "did you mean 'ghost_fw_not_installed:fastmm' or 'json:fastmm'?" in message
    assert "sorted" in message and "json:fastmm" in message


def test_qualified_kernel_of_a_missing_framework_is_refused(framework_kernels: None) -> None:
    with pytest.raises(mr.ConfigError) as info:
        _moe(dispatch="ghost_fw_not_installed:fastmm")
    assert info.value.field == "dispatch"
    assert "'ghost_fw_not_installed', which is not installed" in str(info.value)
    assert "ghost_fw_not_installed" not in sys.modules


@pytest.mark.parametrize(("short", "qualified"), [("grouped_mm", "torch:grouped_mm"),
                                                  ("padded", "torch:padded"),
                                                  ("loop", "torch:loop"),
                                                  ("ragged_dot", "jax:ragged_dot"),
                                                  ("split", "tensorflow:split")])
def test_unqualified_framework_kernel_suggests_the_qualified(short: str, qualified: str) -> None:
    if qualified not in default_registry().kernel_names():
        pytest.skip(f"{qualified} is registered by an entry point: `pip install -e .` first")
    with pytest.raises(mr.ConfigError, match=f"did you mean '{qualified}'") as info:
        _moe(dispatch=short)
    assert info.value.field == "dispatch"


def test_tiles_suggests_both_frameworks() -> None:
    kernels = default_registry().kernel_names()
    if not {"jax:tiles", "tensorflow:tiles"} <= set(kernels):
        pytest.skip("framework kernels are registered by entry points: `pip install -e .`")
    with pytest.raises(mr.ConfigError, match="did you mean 'jax:tiles' or 'tensorflow:tiles'"):
        _moe(dispatch="tiles")


def test_trace_config_is_validated_and_round_trips_as_a_dict() -> None:
    with pytest.raises(mr.ConfigError, match="trace.capacity"):
        TraceConfig(capacity=0)
    with pytest.raises(mr.ConfigError, match="trace.tokens_per_call"):
        TraceConfig(capacity=8, tokens_per_call=16)
    with pytest.raises(mr.ConfigError, match="rows"):
        _moe(trace={"rows": 3})
    mc = _moe(trace={"capacity": 32, "tokens_per_call": 4})
    assert mc.trace == TraceConfig(32, 4)
    assert mr.MoEConfig.from_dict(dataclasses.asdict(mc)) == mc
    assert hash(mc) == hash(_moe(trace=TraceConfig(32, 4)))


def test_observers_are_stored_as_a_tuple(tmp_path: Path) -> None:
    mc = _moe(observers=["expert_load"])
    assert mc.observers == ("expert_load",) and hash(mc) == hash(_moe(observers=("expert_load",)))
    assert mr.MoEConfig.from_dict({**_moe_kwargs(), "observers": ["expert_load"]}) == mc
    path = _write(tmp_path, {"moe_config": {"d_model": 16, "d_ff": 32,
                                            "observers": ["expert_load"]},
                             "router_config": {"num_experts": E}})
    assert mr.MoEConfig.from_json(path) == mc
    assert mr.MoEConfig.from_env({**MOE_BASE, "MOE_OBSERVERS": "expert_load"}) == mc
    assert _moe().observers == ()
    with pytest.raises(mr.ConfigError, match="did you mean 'expert_load'"):
        _moe(observers=("expert_lod",))
