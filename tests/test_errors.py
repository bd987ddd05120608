"""Bad input gets a typed error that names the argument (or field) and what was expected."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import numpy as np
import pytest

from moe_router import (
    BackendNotFoundError,
    ConfigError,
    InputError,
    InputTypeError,
    MoEConfig,
    MoERouterError,
    RouterConfig,
    UnknownNameError,
    init_router_state,
    route,
)
from moe_router import errors as errors_module

E = 4


def logits(T: int = 3, C: int = E) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(T, C)).astype(np.float32)


# ----- router logits ------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_raise_by_default(bad: float) -> None:
    x = logits()
    x[1, 2] = bad
    with pytest.raises(InputError, match="router_logits_TE") as info:
        route(x, RouterConfig(num_experts=E))
    assert info.value.argument == "router_logits_TE"
    assert "NaN or Inf" in str(info.value) and "nan_policy" in str(info.value)


def test_nan_policy_ignore_routes_the_finite_tokens_like_before() -> None:
    x = logits(T=4)
    x[2, :] = np.nan
    x[3, 1] = -np.inf  # an expert that can never be chosen
    config = RouterConfig(num_experts=E, k=2, nan_policy="ignore")
    plan = route(x, config)
    clean = route(x[:2], config)
    np.testing.assert_array_equal(plan.expert_indices[:2], clean.expert_indices)
    np.testing.assert_array_equal(plan.expert_weights[:2], clean.expert_weights)
    assert 1 not in plan.expert_indices[3].tolist()
    assert plan.expert_indices.shape == (4, 2)


@pytest.mark.parametrize("shape", [(E,), (2, 3, E), ()])
def test_wrong_rank_names_the_argument_and_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(InputError, match=r"router_logits_TE: expected rank 2 \(T, E\)") as info:
        route(np.zeros(shape, dtype=np.float32), RouterConfig(num_experts=E))
    assert str(shape) in str(info.value)


def test_width_must_equal_num_experts_plus_null_experts() -> None:
    with pytest.raises(InputError, match=r"router_logits_TE: width 5 != .* = 4"):
        route(logits(C=5), RouterConfig(num_experts=E))
    with pytest.raises(InputError, match=r"width 4 != num_experts \+ num_null_experts = 6"):
        route(logits(C=4), RouterConfig(num_experts=E, num_null_experts=2))
    route(logits(C=6), RouterConfig(num_experts=E, num_null_experts=2))  # the right width works


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.complex64])
def test_non_float_logits_raise_type_error(dtype: type) -> None:
    with pytest.raises(InputTypeError, match="router_logits_TE: expected a floating dtype"):
        route(np.zeros((2, E), dtype=dtype), RouterConfig(num_experts=E))


# ----- config ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "field"), [
    ({"k": 5}, "k"),  # k > E
    ({"k": 0}, "k"),
    ({"k": 7, "num_null_experts": 2}, "k"),  # k > E + N
    ({"strategy": "top_p", "min_experts": 3, "max_experts": 2}, "min_experts"),
    ({"strategy": "top_p", "min_experts": 5}, "min_experts"),
    ({"strategy": "top_p", "max_experts": 5}, "max_experts"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": 1.01}, "threshold"),
    ({"strategy": "complexity", "target_experts": 5.0}, "target_experts"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"drop_policy": "random"}, "drop_policy"),
    ({"score_func": "tanh"}, "score_func"),
    ({"num_groups": 3}, "num_groups"),  # does not divide E
    ({"num_groups": 2, "topk_groups": 3}, "topk_groups"),
    ({"strategy": "expert_choice", "causal": True}, "strategy"),
    ({"num_null_experts": 1, "strategy": "top_p"}, "num_null_experts"),
])
def test_invalid_config_names_field_value_and_allowed(fields: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig(num_experts=E, **fields)
    assert info.value.field == field
    message = str(info.value)
    assert message.startswith(f"{field}=") and "expected" in message


# ----- registered names: refused when the config is built ------------------------------------
def test_unknown_strategy_lists_known_names() -> None:
    with pytest.raises(UnknownNameError, match="strategy='top_q' is invalid") as info:
        RouterConfig(num_experts=E, strategy="top_q")
    assert "top_p" in str(info.value) and "expert_choice" in str(info.value)
    assert "did you mean 'top_p'?" in str(info.value)
    assert isinstance(info.value, ConfigError) and info.value.field == "strategy"
    assert (info.value.kind, info.value.name) == ("strategy", "top_q")


def test_unknown_estimator_lists_known_names() -> None:
    with pytest.raises(ConfigError, match="perplexity") as info:
        RouterConfig(num_experts=E, strategy="complexity", complexity_estimator="perplexity")
    assert info.value.field == "complexity_estimator" and "hidden_norm" in str(info.value)


def test_unknown_dispatch_suggests_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'dense'") as info:
        MoEConfig(d_model=4, d_ff=4, router=RouterConfig(num_experts=E), dispatch="dens")
    assert info.value.field == "dispatch"


# ----- inputs a strategy needs ------------------------------------------------------------------
def test_hash_without_token_ids_names_token_ids() -> None:
    with pytest.raises(InputError, match="token_ids_T") as info:
        route(logits(), RouterConfig(num_experts=E, strategy="hash", k=1))
    assert info.value.argument == "token_ids_T"


@pytest.mark.parametrize(("estimator", "argument"), [
    ("hidden_norm", "hidden_TD"),
    ("attention_entropy", "attention_probs"),
    ("external", "complexity_scores_T"),
])
def test_complexity_estimator_without_its_input_names_it(estimator: str, argument: str) -> None:
    config = RouterConfig(num_experts=E, strategy="complexity", complexity_estimator=estimator)
    with pytest.raises(InputError, match=argument) as info:
        route(logits(), config)
    assert info.value.argument == argument


def test_causal_complexity_without_state_names_state() -> None:
    config = RouterConfig(num_experts=E, strategy="complexity", causal=True)
    with pytest.raises(InputError, match="state") as info:
        route(logits(), config)
    assert info.value.argument == "state"
    route(logits(), config, state=init_router_state(config))  # with a state it routes


# ----- shapes and dtypes of optional arrays ----------------------------------------------------
T = 3
BAD_OPTIONAL = [
    ("mask_T", np.ones(T + 1), InputError, r"expected shape \(3,\)"),
    ("mask_T", np.ones((T, 1)), InputError, r"expected shape \(3,\)"),
    ("expert_bias_E", np.zeros(E + 1, np.float32), InputError, r"expected shape \(4,\)"),
    ("expert_bias_E", np.zeros(E, np.int64), InputTypeError, "floating"),
    ("token_ids_T", np.arange(T + 2), InputError, r"expected shape \(3,\)"),
    ("token_ids_T", np.zeros(T, np.float32), InputTypeError, "integer"),
    ("complexity_scores_T", np.zeros((T, 2), np.float32), InputError, r"expected shape \(3,\)"),
    ("complexity_scores_T", np.zeros(T, np.complex64), InputTypeError, "numeric"),
    ("hidden_TD", np.zeros((T + 1, 8), np.float32), InputError, r"expected shape \(3, D\)"),
    ("hidden_TD", np.zeros(8, np.float32), InputError, r"expected shape \(3, D\)"),
]


@pytest.mark.parametrize(("argument", "value", "error", "message"), BAD_OPTIONAL,
                         ids=[f"{a}-{i}" for i, (a, *_) in enumerate(BAD_OPTIONAL)])
def test_bad_optional_array_names_the_argument(argument: str, value: np.ndarray, error: type,
                                               message: str) -> None:
    config = RouterConfig(num_experts=E, strategy="hash" if argument == "token_ids_T" else "top_k")
    with pytest.raises(error, match=message) as info:
        route(logits(T), config, **{argument: value})
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: ")


@pytest.mark.parametrize("shape", [(1, 1, T, 4), (4,), (T + 1, 4), (1, 4), (2, T - 1, 4)])
def test_attention_probs_of_wrong_shape_names_it(shape: tuple[int, ...]) -> None:
    # (1, S) used to broadcast silently over the T tokens; (T + 1, S) failed inside NumPy
    config = RouterConfig(num_experts=E, strategy="complexity",
                          complexity_estimator="attention_entropy")
    with pytest.raises(InputError, match=r"attention_probs: expected shape \(3, S\) or "
                                         r"\(H, 3, S\)") as info:
        route(logits(T), config, attention_probs=np.ones(shape, np.float32) / 4)
    assert info.value.argument == "attention_probs"


def test_errors_are_the_documented_builtin_types() -> None:
    # callers can catch ValueError / TypeError / LookupError without importing moe_router
    assert issubclass(InputError, ValueError) and issubclass(ConfigError, ValueError)
    assert issubclass(InputTypeError, TypeError) and issubclass(BackendNotFoundError, LookupError)
    assert issubclass(UnknownNameError, ConfigError) and issubclass(UnknownNameError, ValueError)
    assert not issubclass(UnknownNameError, KeyError)
    for cls in ERROR_CLASSES:
        assert issubclass(cls, MoERouterError)


# ----- one message is enough to rebuild an error (Keras re-raises ``type(e)(str(e))``) --------
ERROR_CLASSES = [cls for _, cls in inspect.getmembers(errors_module, inspect.isclass)
                 if issubclass(cls, BaseException) and cls.__module__ == errors_module.__name__]

#: structured constructions, per class; every class is also built from a plain message
EXAMPLES: dict[str, list[tuple[Any, ...]]] = {
    "ConfigError": [("k", 9, "an int in [1, 8]"), ("strategy (from $MOE_STRATEGY)", "x", "a y"),
                    ("num_experts", None, "a value: RouterConfig.num_experts is required"),
                    ("capacity_factor", -1.0)],
    "InputError": [("router_logits_TE", "contains NaN or Inf"),
                   ("weights['w_up']", "expected shape (2, 3), got (3, 2)")],
    "InputTypeError": [("x", "expected a floating dtype")],
    "UnknownNameError": [("strategy", "topk", ["top_k", "top_p"]),
                         ("observer", "zzz", []),
                         ("backend", "cuda", ["numpy", "torch"])],
}
ROUND_TRIP = [(cls, args) for cls in ERROR_CLASSES
              for args in [*EXAMPLES.get(cls.__name__, []), ("something went wrong: badly",)]]


def _attributes(err: BaseException) -> dict[str, Any]:
    names = ("field", "value", "allowed", "argument", "problem", "kind", "name", "known")
    return {name: getattr(err, name) for name in names if hasattr(err, name)}


def test_every_error_class_has_a_round_trip_case() -> None:
    assert {"ConfigError", "InputError", "InputTypeError", "UnknownNameError",
            "BackendNotFoundError", "MoERouterError"} <= {c.__name__ for c in ERROR_CLASSES}


@pytest.mark.parametrize(("cls", "args"), ROUND_TRIP,
                         ids=[f"{c.__name__}-{len(a)}-{i}" for i, (c, a) in enumerate(ROUND_TRIP)])
def test_error_rebuilt_from_its_message(cls: type[BaseException], args: tuple[Any, ...]) -> None:
    err = cls(*args)
    again = type(err)(str(err))
    assert type(again) is cls and str(again) == str(err)
    if len(args) > 1:  # the structured attributes are parsed back from the message
        assert _attributes(again) == _attributes(err)
    assert type(type(again)(str(again))) is cls
    loaded = pickle.loads(pickle.dumps(err))
    assert type(loaded) is cls and str(loaded) == str(err)
    assert _attributes(loaded) == _attributes(err)


def test_attributes_parsed_from_a_message() -> None:
    assert InputError("x: last dimension 3 != d_model 4").argument == "x"
    assert InputError("x: last dimension 3 != d_model 4").problem == "last dimension 3 != d_model 4"
    assert InputError("no prefix here").argument is None
    err = ConfigError("strategy='topk' is invalid: expected a registered strategy "
                      "(did you mean 'top_k'?); known: top_k, top_p")
    assert (err.field, err.value) == ("strategy", "topk")
    assert isinstance(UnknownNameError(str(err)), ConfigError)
    unknown = UnknownNameError(str(err))
    assert (unknown.kind, unknown.name, unknown.known) == ("strategy", "topk", ["top_k", "top_p"])
    assert ConfigError("plain words").field is None


def test_errors_raised_by_the_library_round_trip() -> None:
    caught: list[BaseException] = []
    for call in (lambda: RouterConfig(num_experts=E, k=9),
                 lambda: RouterConfig(num_experts=E, strategy="topk"),
                 lambda: RouterConfig.from_env({"MOE_NUM_EXPERTS": "4",
                                                "MOE_ROUTING_STRATEGY": "garbage"}),
                 lambda: route(np.zeros((2, E + 1), np.float32), RouterConfig(num_experts=E)),
                 lambda: route(np.zeros((2, E), np.int32), RouterConfig(num_experts=E))):
        with pytest.raises(MoERouterError) as info:
            call()
        caught.append(info.value)
    for err in caught:
        again = type(err)(str(err))
        assert type(again) is type(err) and str(again) == str(err)
        assert _attributes(again) == _attributes(err)
