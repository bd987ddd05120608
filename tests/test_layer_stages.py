"""Every backend override of a layer-step stage and framework kernel, against the generic one.

A backend may replace a stage of :class:`~moe_router.layer.step.LayerStages` (router logits,
fast selection, route, experts, shared expert, shape restoration) and register grouped-FFN
kernels of its own, but only with *exact* versions. This file finds the overrides by
introspection, so a new override without a comparison here fails instead of going untested.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from router_cases import router_cases

import moe_router as mr
from moe_router.layer.experts import expert_compute
from moe_router.layer.step import LayerStages, stages_for
from moe_router.registry import default_registry
from moe_router.weights import init_weights, param_shapes

D, F = 16, 24
TOL = {"rtol": 2e-5, "atol": 2e-6}


def _overrides(stages: LayerStages) -> list[str]:
    return sorted(name for name, value in vars(type(stages)).items()
                  if callable(value) and not name.startswith("_") and hasattr(LayerStages, name)
                  and value is not getattr(LayerStages, name))


def _np(b, x) -> np.ndarray:
    return np.asarray(b.to_numpy(x), dtype=np.float64)


def _logits_inputs(seed: int, width: int = 8) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    normal = rng.standard_normal((40, width)).astype(np.float32) * 3
    ties = (rng.integers(-2, 3, size=(40, width)) * 0.5).astype(np.float32)  # exact ties
    return [normal, ties]


def _check_router_logits(b, stages: LayerStages, generic: LayerStages) -> None:
    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=8),
                          router_bias=True)
    weights = init_weights(config, seed=1)
    params = {name: b.asarray(weights[name]) for name in param_shapes(config)}
    x = b.asarray(np.random.default_rng(0).standard_normal((12, D)).astype(np.float32))
    np.testing.assert_allclose(_np(b, stages.router_logits(x, params, config)),
                               _np(b, generic.router_logits(x, params, config)), **TOL)


def _check_fast_select(b, stages: LayerStages, generic: LayerStages) -> None:
    used = 0
    cases = {**router_cases(), "bias": mr.RouterConfig(num_experts=8, k=3, use_expert_bias=True),
             "k1": mr.RouterConfig(num_experts=8, k=1), "raw": mr.RouterConfig(
                 num_experts=8, k=2, normalize_weights=False, route_scale=1.5)}
    for name, config in cases.items():
        for seed, logits in enumerate(_logits_inputs(len(name), config.num_choices)):
            kwargs = {}
            if config.use_expert_bias:
                kwargs["expert_bias_E"] = b.asarray(np.linspace(-0.1, 0.1, 8).astype(np.float32))
            if config.strategy == "hash":
                kwargs["token_ids_T"] = b.asarray(np.arange(40))
            fast = stages.fast_select(b.asarray(logits), config, kwargs)
            if fast is None:
                continue
            used += 1
            plan = generic.route(b.asarray(logits), config, **kwargs)
            np.testing.assert_array_equal(_np(b, fast[0]), _np(b, plan.expert_indices),
                                          err_msg=f"{name} seed {seed}")
            np.testing.assert_allclose(_np(b, fast[1]), _np(b, plan.expert_weights), **TOL)
    assert used >= 4, "the fast path applied to almost no case: the comparison proves nothing"


def _check_route(b, stages: LayerStages, generic: LayerStages) -> None:
    for name, config in router_cases().items():
        logits = b.asarray(_logits_inputs(0, config.num_choices)[0])
        kwargs = {"token_ids_T": b.asarray(np.arange(40))}
        ours, theirs = stages.route(logits, config, **kwargs), generic.route(logits, config,
                                                                             **kwargs)
        np.testing.assert_array_equal(_np(b, ours.expert_indices), _np(b, theirs.expert_indices),
                                      err_msg=name)
        np.testing.assert_allclose(_np(b, ours.expert_weights), _np(b, theirs.expert_weights),
                                   **TOL)


def _layer_case(b):
    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=8, k=2),
                          num_shared_experts=1, shared_expert_gate=True)
    weights = init_weights(config, seed=2)
    params = {name: b.asarray(weights[name]) for name in param_shapes(config)}
    x = b.asarray(np.random.default_rng(1).standard_normal((20, D)).astype(np.float32))
    return config, params, x


def _check_experts(b, stages: LayerStages, generic: LayerStages) -> None:
    config, params, x = _layer_case(b)
    plan = generic.route(generic.router_logits(x, params, config), config.router)
    for dispatch in ("auto", "sorted", "dense", "gather"):
        ours = stages.experts(x, plan.expert_indices, plan.expert_weights, params, config,
                              dispatch)
        theirs = generic.experts(x, plan.expert_indices, plan.expert_weights, params, config,
                                 "dense")
        np.testing.assert_allclose(_np(b, ours), _np(b, theirs), **TOL)


def _check_shared(b, stages: LayerStages, generic: LayerStages) -> None:
    config, params, x = _layer_case(b)
    np.testing.assert_allclose(_np(b, stages.shared(x, params, config)),
                               _np(b, generic.shared(x, params, config)), **TOL)


def _check_restore_shape(b, stages: LayerStages, generic: LayerStages) -> None:
    x = b.asarray(np.zeros((2, 3, D), np.float32))
    y = b.asarray(np.arange(6 * D, dtype=np.float32).reshape(6, D))
    np.testing.assert_array_equal(_np(b, stages.restore_shape(y, x)),
                                  _np(b, generic.restore_shape(y, x)))


CHECKS: dict[str, Callable[..., None]] = {
    "router_logits": _check_router_logits, "fast_select": _check_fast_select,
    "route": _check_route, "experts": _check_experts, "shared": _check_shared,
    "restore_shape": _check_restore_shape,
}


def test_every_stage_has_a_check() -> None:
    public = {name for name, value in vars(LayerStages).items()
              if not name.startswith("_") and callable(value)}
    assert public == set(CHECKS), "add a comparison for each LayerStages stage"


def test_overrides_equal_the_generic_stage(backend) -> None:
    stages = stages_for(backend)
    generic = LayerStages(backend)
    for name in _overrides(stages):
        CHECKS[name](backend, stages, generic)


def test_framework_kernels_equal_the_portable_ones(backend) -> None:
    registry = default_registry()
    names = [name for name in registry.kernel_names()
             if registry.kernel_spec(name).framework == backend.framework]
    if backend.framework != "numpy":
        assert names, f"{backend.name} registers no kernel"
    for strategy in ("top_k", "top_p"):
        router = mr.RouterConfig(num_experts=8, k=2, strategy=strategy, top_p=0.6,
                                 max_experts=4)
        config = mr.MoEConfig(d_model=D, d_ff=F, router=router, activation="swiglu")
        weights = init_weights(config, seed=4)
        params = {name: backend.asarray(weights[name]) for name in param_shapes(config)}
        for T in (1, 3, 37):
            x = backend.asarray(np.random.default_rng(T).standard_normal((T, D))
                                .astype(np.float32))
            plan = mr.route(LayerStages(backend).router_logits(x, params, config), router)
            ids, gates = plan.expert_indices, plan.expert_weights
            expected = _np(backend, expert_compute(backend, x, ids, gates, params, config,
                                                   "dense"))
            for name in names:
                got = expert_compute(backend, x, ids, gates, params, config, name)
                np.testing.assert_allclose(_np(backend, got), expected, **TOL,
                                           err_msg=f"{name} T={T} {strategy}")
