"""The one table of router cases shared by the tests, with their inputs and the plan comparison.

:func:`case_table` lists every built-in strategy once (the *core* cases, also returned as plain
configs by :func:`router_cases` for the layer tests) plus variants: exact ties, raw weights and
the "hf" loss with a mask, each complexity estimator, capacity with both drop policies, expert
bias. Each case names the logits family it is routed on and the extra ``route()`` inputs it
needs; :func:`router_logits` and :func:`route_inputs` build them, seeded.
:func:`assert_same_plan` is the comparison every backend test uses: decisions exactly, values
within 1e-5.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

import moe_router as mr
from moe_router.demo import realistic_logits

TOL = {"rtol": 1e-5, "atol": 1e-5}
#: plan fields that are routing decisions: equal on every backend, not just close
DECISIONS = ("expert_indices", "num_experts_per_token", "expert_counts", "num_dropped",
             "stats.k_histogram")


class RouterCase(NamedTuple):
    config: mr.RouterConfig
    logits: str = "normal"  # family of router_logits()
    needs: tuple[str, ...] = ()  # extra route() inputs, built by route_inputs()
    core: bool = False  # one of the per-strategy cases of router_cases()


def case_table(num_experts: int = 8, max_dynamic: int = 4, num_groups: int = 4,
               topk_groups: int = 2, num_null: int = 3) -> dict[str, RouterCase]:
    """Every built-in strategy (``core``) and the variants worth checking on every backend."""
    E = num_experts
    C = mr.RouterConfig
    return {
        "top_k": RouterCase(C(num_experts=E, k=2), core=True),
        "top_k_sigmoid_groups": RouterCase(
            C(num_experts=E, k=2, score_func="sigmoid", num_groups=num_groups,
              topk_groups=topk_groups, route_scale=2.5), needs=("expert_bias_E",), core=True),
        "top_p": RouterCase(C(num_experts=E, strategy="top_p", top_p=0.5,
                              max_experts=max_dynamic), "skewed", core=True),
        "threshold": RouterCase(C(num_experts=E, strategy="threshold", threshold=0.6), "peaked",
                                core=True),
        "null": RouterCase(C(num_experts=E, k=2, num_null_experts=num_null), "peaked",
                           core=True),
        "relu": RouterCase(C(num_experts=E, strategy="relu", min_experts=0,
                             max_experts=max_dynamic), core=True),
        "expert_choice": RouterCase(C(num_experts=E, strategy="expert_choice",
                                      max_experts=max_dynamic), "low_rank", core=True),
        "hash": RouterCase(C(num_experts=E, strategy="hash", k=2), needs=("token_ids_T",),
                           core=True),
        "complexity": RouterCase(C(num_experts=E, strategy="complexity", target_experts=2.0,
                                   max_experts=max_dynamic), "skewed", core=True),
        "capacity": RouterCase(C(num_experts=E, k=2, capacity_factor=0.75), "skewed", core=True),
        "capacity_prob": RouterCase(C(num_experts=E, k=2, capacity_factor=0.75,
                                      drop_policy="probability"), "skewed", core=True),
        # ----- variants --------------------------------------------------------------------
        "top_k_ties": RouterCase(C(num_experts=E, k=3, z_loss_coef=1e-3), "quantized"),
        "top_k_raw_hf_mask": RouterCase(
            C(num_experts=E, k=2, normalize_weights=False, balance_convention="hf",
              entropy_loss_coef=0.1), "skewed", ("mask_T",)),
        "expert_bias_hf_loss": RouterCase(
            C(num_experts=E, k=2, use_expert_bias=True, balance_convention="hf",
              z_loss_coef=1e-3, entropy_loss_coef=1e-2), needs=("expert_bias_E", "mask_T")),
        "null_min0": RouterCase(C(num_experts=E, k=2, num_null_experts=num_null,
                                  min_experts=0), "peaked"),
        "top_p_ties": RouterCase(C(num_experts=E, strategy="top_p", top_p=0.5,
                                   min_experts=min(2, E)), "quantized"),
        "top_p_one": RouterCase(C(num_experts=E, strategy="top_p", top_p=1.0,
                                  max_experts=max_dynamic), "sharp"),
        "expert_choice_cf": RouterCase(C(num_experts=E, strategy="expert_choice",
                                         capacity_factor=1.5, max_experts=max_dynamic),
                                       "quantized"),
        "complexity_hidden": RouterCase(C(num_experts=E, strategy="complexity",
                                          complexity_estimator="hidden_norm",
                                          max_experts=min(3, E)), needs=("hidden_TD",)),
        "complexity_attention": RouterCase(C(num_experts=E, strategy="complexity",
                                             complexity_estimator="attention_entropy"),
                                           needs=("attention_probs",)),
        "complexity_external": RouterCase(C(num_experts=E, strategy="complexity",
                                            complexity_estimator="external",
                                            target_experts=1.5, max_experts=min(3, E)),
                                          needs=("complexity_scores_T",)),
        "capacity_top_p": RouterCase(C(num_experts=E, strategy="top_p", top_p=0.7,
                                       capacity_factor=0.5)),
    }


def router_cases(num_experts: int = 8, max_dynamic: int = 4, num_groups: int = 4,
                 topk_groups: int = 2, num_null: int = 3) -> dict[str, mr.RouterConfig]:
    """The configs of the core cases: every built-in strategy once, plus both drop policies."""
    table = case_table(num_experts, max_dynamic, num_groups, topk_groups, num_null)
    return {name: case.config for name, case in table.items() if case.core}


# ----- inputs ----------------------------------------------------------------------------------
def router_logits(kind: str, tokens: int, choices: int, seed: int = 0) -> np.ndarray:
    """``(tokens, choices)`` float32 logits: a :func:`moe_router.demo.realistic_logits` family
    (normal, skewed, peaked, low_rank), ``quantized`` (many exact ties within and across rows)
    or ``sharp`` (x8: probabilities down to ~1e-20)."""
    rng = np.random.default_rng(seed)
    if kind == "quantized":
        return (rng.integers(-2, 3, size=(tokens, choices)) * 0.5).astype(np.float32)
    if kind == "sharp":
        return (rng.normal(size=(tokens, choices)) * 8.0).astype(np.float32)
    return realistic_logits(kind, tokens, choices, seed)


def route_inputs(case: RouterCase, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """The extra ``route()`` keyword inputs ``case`` needs, as NumPy arrays."""
    rng = np.random.default_rng(seed + 7)
    E = case.config.num_experts
    makers = {
        "token_ids_T": lambda: rng.integers(0, 50000, size=tokens).astype(np.int32),
        "hidden_TD": lambda: rng.normal(size=(tokens, 12)).astype(np.float32),
        "attention_probs": lambda: _attention(rng, tokens),
        "complexity_scores_T": lambda: rng.gamma(2.0, size=tokens).astype(np.float32),
        "expert_bias_E": lambda: (rng.normal(size=E) * 0.05).astype(np.float32),
        "mask_T": lambda: (rng.random(tokens) < 0.8).astype(np.float32),
    }
    return {name: makers[name]() for name in case.needs}


def _attention(rng: np.random.Generator, tokens: int) -> np.ndarray:
    attn = np.exp(rng.normal(size=(2, tokens, 16)) * 2.0)
    return (attn / attn.sum(-1, keepdims=True)).astype(np.float32)


def case_inputs(case: RouterCase, tokens: int = 32,
                seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(logits, extra)`` of ``case`` for ``tokens`` tokens."""
    logits = router_logits(case.logits, tokens, case.config.num_choices, seed)
    return logits, route_inputs(case, tokens, seed)


# ----- comparison ------------------------------------------------------------------------------
def plan_fields(plan: mr.RoutingPlan) -> dict[str, Any]:
    """Every array of a plan by (dotted) name: a nest of plain arrays, which ``jax.jit`` and
    ``tf.function`` can return."""
    fields = {name: getattr(plan, name) for name in ("expert_indices", "expert_weights",
                                                     "num_experts_per_token", "expert_counts",
                                                     "num_dropped", "router_probs")}
    for group in ("losses", "stats", "state"):
        value = getattr(plan, group)
        if value is not None:
            fields.update({f"{group}.{k}": v for k, v in value._asdict().items()})
    return fields


def assert_same_plan(b: Any, plan: mr.RoutingPlan | Mapping[str, Any],
                     ref: mr.RoutingPlan) -> None:
    """``plan`` (arrays of backend ``b``, or their :func:`plan_fields`) equals the NumPy ``ref``:
    decisions exactly and with an integer dtype, everything else float32 within 1e-5."""
    got = dict(plan) if isinstance(plan, Mapping) else plan_fields(plan)
    want = plan_fields(ref)
    assert sorted(got) == sorted(want)
    for name, value in got.items():
        assert b.is_array(value), f"plan.{name} is {type(value)}, not a {b.name} array"
        array = np.asarray(b.to_numpy(value))
        assert array.shape == np.shape(want[name]), name
        if name in DECISIONS:
            assert b.dtype_kind(value) == "i", f"plan.{name} dtype kind {b.dtype_kind(value)}"
            np.testing.assert_array_equal(array, want[name], err_msg=name)
        else:
            assert array.dtype == np.float32, f"plan.{name} is {array.dtype}"
            np.testing.assert_allclose(array, want[name], err_msg=name, **TOL)
