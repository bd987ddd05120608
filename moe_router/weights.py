"""The portable weight format shared by the PyTorch, Flax and Keras layers, and the NumPy oracle.

``export_weights()`` of every layer returns exactly these names and layouts (float32 NumPy), and
``MoE.from_weights(config, weights)`` accepts them, so weights move between frameworks:

==========================  ===============  =============================================
name                        shape            meaning
==========================  ===============  =============================================
``router.weight``           ``(D, E + N)``   logits = x @ W (+ bias); N null experts
``router.bias``             ``(E + N,)``     only when ``MoEConfig.router_bias``
``router.expert_bias``      ``(E,)``         aux-free balancing bias (state, not trained);
                                             only when ``RouterConfig.use_expert_bias``
``router.state``            ``(5,)``         router controller state (state, not trained):
                                             top_p, score_mean, score_var, score_count,
                                             k_offset (:class:`~moe_router.RouterState`)
``experts.w_gate``          ``(E, D, F)``    gated activations only (swiglu, geglu)
``experts.w_up``            ``(E, D, F)``
``experts.w_down``          ``(E, F, D)``
``shared.w_gate``           ``(D, Fs)``      shared FFN (gated activations only)
``shared.w_up``             ``(D, Fs)``
``shared.w_down``           ``(Fs, D)``
``shared.gate``             ``(D, 1)``       sigmoid gate of the shared output (Qwen2-MoE)
==========================  ===============  =============================================

Layouts are "input dim first" so an expert is ``act(x @ w_gate) * (x @ w_up) @ w_down``.
The two state entries (``router.state``, ``router.expert_bias``) travel with the weights, so a
trained top-p controller or complexity calibration routes the same after a move between
frameworks; ``router.state`` may be missing from older exports (a fresh state is used then).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from .config import MoEConfig
from .errors import InputError


def weight_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """Every name of the portable export of ``config``'s layer (parameters and persistent
    state) and its shape."""
    shapes = param_shapes(config)
    shapes.update(state_shapes(config))
    return shapes


def state_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """The persistent router state in the export: ``router.state`` and, with
    ``use_expert_bias``, ``router.expert_bias``."""
    shapes: dict[str, tuple[int, ...]] = {"router.state": (5,)}
    if config.router.use_expert_bias:
        shapes["router.expert_bias"] = (config.router.num_experts,)
    return shapes


def param_shapes(config: MoEConfig) -> dict[str, tuple[int, ...]]:
    """The trainable parameters of ``config``'s layer and their shapes."""
    r = config.router
    D, F, E = config.d_model, config.d_ff, r.num_experts
    shapes: dict[str, tuple[int, ...]] = {"router.weight": (D, r.num_choices)}
    if config.router_bias:
        shapes["router.bias"] = (r.num_choices,)
    if config.is_gated:
        shapes["experts.w_gate"] = (E, D, F)
    shapes["experts.w_up"] = (E, D, F)
    shapes["experts.w_down"] = (E, F, D)
    if config.has_shared:
        Fs = config.shared_width
        if config.is_gated:
            shapes["shared.w_gate"] = (D, Fs)
        shapes["shared.w_up"] = (D, Fs)
        shapes["shared.w_down"] = (Fs, D)
        if config.shared_expert_gate:
            shapes["shared.gate"] = (D, 1)
    return shapes


def initial_router_state(config: MoEConfig) -> np.ndarray:
    """The fresh ``(5,)`` float32 controller vector: p = ``top_p``, variance 1, the rest 0."""
    return np.asarray([config.router.top_p, 0.0, 1.0, 0.0, 0.0], np.float32)


def init_weights(config: MoEConfig, seed: Any = 0) -> dict[str, np.ndarray]:
    """Random float32 weights: normal(0, init_std); biases and the expert bias start at zero,
    the router state fresh."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if name == "router.state":
            weights[name] = initial_router_state(config)
        elif name.endswith("bias"):
            weights[name] = np.zeros(shape, np.float32)
        else:
            weights[name] = (rng.standard_normal(shape) * config.init_std).astype(np.float32)
    return weights


def check_weights(config: MoEConfig, weights: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validate names and shapes; returns float32 NumPy copies. Errors name the weight."""
    expected = weight_shapes(config)
    if "router.state" not in weights:  # exports from before the state travelled with them
        weights = {**weights, "router.state": initial_router_state(config)}
    missing = sorted(set(expected) - set(weights))
    extra = sorted(set(weights) - set(expected))
    if missing or extra:
        raise InputError("weights", f"names do not match the config: missing {missing}, "
                         f"unexpected {extra}")
    out = {}
    for name, shape in expected.items():
        array = np.asarray(weights[name], dtype=np.float32)
        if array.shape != shape:
            raise InputError(f"weights[{name!r}]", f"expected shape {shape}, got {array.shape}")
        out[name] = array
    return out


# ----- the NumPy oracle of the whole layer ------------------------------------------------------
def activate(name: str, gate: np.ndarray | None, up: np.ndarray) -> np.ndarray:
    """Expert activation on NumPy arrays: gated ``act(gate) * up`` or plain ``act(up)``."""
    if name in ("swiglu", "geglu"):
        assert gate is not None
        return (_silu(gate) if name == "swiglu" else _gelu(gate)) * up
    return {"gelu": _gelu, "relu": lambda v: np.maximum(v, 0.0), "silu": _silu}[name](up)


def _silu(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.exp(-v))


def _gelu(v: np.ndarray) -> np.ndarray:
    """Exact (erf) GELU, as ``torch.nn.functional.gelu`` and ``jax.nn.gelu(approximate=False)``."""
    erf = np.vectorize(math.erf, otypes=[np.float64])
    return (0.5 * v * (1.0 + erf(v / math.sqrt(2.0)))).astype(v.dtype)


def reference_forward(x: np.ndarray, weights: Mapping[str, Any], config: MoEConfig,
                      **route_kwargs: Any) -> tuple[np.ndarray, Any]:
    """The layer's forward pass token by token in float64 NumPy: the oracle for fast paths.

    Args:
        x: ``(..., D)`` input.
        weights: the portable weight dict (its ``router.state`` is the controller state of
            stateful strategies unless ``route_kwargs`` has a ``state``).
        route_kwargs: passed to :func:`moe_router.route` (``training``, ``state``, ...).

    Returns:
        a tuple ``(y, plan)`` (not ``y`` alone): ``y`` of ``x``'s shape (float64), and the
        :class:`RoutingPlan`.
    """
    from .api import route
    from .plan import RouterState

    w = {k: v.astype(np.float64) for k, v in check_weights(config, weights).items()}
    x = np.asarray(x)
    if x.shape[-1] != config.d_model:
        raise InputError("x", f"last dimension {x.shape[-1]} != d_model {config.d_model}")
    x_TD = x.reshape(-1, config.d_model).astype(np.float64)
    logits_TE = x_TD @ w["router.weight"]
    if "router.bias" in w:
        logits_TE = logits_TE + w["router.bias"]
    if config.router.strategy_spec.stateful and "state" not in route_kwargs:
        vector = check_weights(config, weights)["router.state"]
        route_kwargs["state"] = RouterState(*(vector[i] for i in range(5)))
    plan = route(logits_TE.astype(np.float32), config.router,
                 expert_bias_E=weights.get("router.expert_bias"), **route_kwargs)
    y_TD = np.zeros_like(x_TD)
    for t, (experts, gates) in enumerate(zip(plan.expert_indices, plan.expert_weights)):
        for e, g in zip(experts, gates):
            if e < 0:
                continue
            gate = x_TD[t] @ w["experts.w_gate"][e] if config.is_gated else None
            hidden = activate(config.activation, gate, x_TD[t] @ w["experts.w_up"][e])
            y_TD[t] += float(g) * (hidden @ w["experts.w_down"][e])
    if config.has_shared:
        gate = x_TD @ w["shared.w_gate"] if config.is_gated else None
        shared_TD = activate(config.activation, gate, x_TD @ w["shared.w_up"]) @ w["shared.w_down"]
        if config.shared_expert_gate:
            shared_TD = shared_TD / (1.0 + np.exp(-(x_TD @ w["shared.gate"])))
        y_TD = y_TD + shared_TD
    return y_TD.reshape(x.shape), plan
