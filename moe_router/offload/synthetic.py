"""Synthetic routing traces with skewed (Zipf) popularity and temporal (Markov) locality, and an
honest next-layer prediction.

The generator simulates what a decoder does to its routers, not the answer: each step has a hidden
state that follows a Markov chain over steps (``h_0(s) = stay * h_0(s-1) + sqrt(1 - stay^2) *
noise``: consecutive tokens look alike); each layer adds a residual update (``h_l = norm(h_{l-1} +
drift * noise)``); layer ``l``'s router scores ``scale * R_l h_l + zipf * log(1 / rank_l)``
(a random per-layer popularity ranking: Zipf-skewed use) and the top-``k`` experts are used.

The prediction for layer ``l >= 1`` applies layer ``l``'s router to layer ``l - 1``'s hidden
state, the one a real system has when it must start the copy; it is right only as far as the
residual update leaves the ranking unchanged. Layer 0 has no prediction (``-1``).
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError
from .trace import RoutingTrace


def _topk(scores_E: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-scores_E, kind="stable")[:k].astype(np.int32)


def zipf_markov_trace(num_experts: int = 64, num_layers: int = 8, steps: int = 2000, k: int = 2,
                      *, zipf: float = 1.0, stay: float = 0.5, drift: float = 0.15,
                      scale: float = 3.0, dim: int = 64, predict: int | None = None,
                      seed: int = 0) -> RoutingTrace:
    """A :class:`RoutingTrace` of ``steps`` decode steps (one token each).

    Args:
        num_experts / num_layers / k: E, L and the experts per token.
        zipf: popularity skew (0 = none; 1 = score bonus ``log(1 / rank)``).
        stay: step-to-step correlation of the hidden state (0 = independent tokens).
        drift: size of each layer's residual update (0 = the prediction is exact).
        scale: router sharpness (score of the hidden-state term).
        dim: hidden size of the simulated state.
        predict: experts predicted per layer (default ``k``).
        seed: the NumPy generator's seed.

    Raises:
        ConfigError: a size out of range.
    """
    for name, value, low in (("num_experts", num_experts, 1), ("num_layers", num_layers, 1),
                             ("steps", steps, 0), ("k", k, 1), ("dim", dim, 1)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(name, value, f"an int >= {low}")
    if k > num_experts:
        raise ConfigError("k", k, f"at most num_experts={num_experts}")
    if not 0.0 <= stay < 1.0:
        raise ConfigError("stay", stay, "a number in [0, 1)")
    P = k if predict is None else predict
    if not isinstance(P, int) or not 1 <= P <= num_experts:
        raise ConfigError("predict", predict, f"None or an int in [1, {num_experts}]")
    rng = np.random.default_rng(seed)
    R_LED = rng.standard_normal((num_layers, num_experts, dim))
    ranks_LE = np.stack([rng.permutation(num_experts) + 1 for _ in range(num_layers)])
    bias_LE = zipf * np.log(1.0 / ranks_LE)
    experts = np.full((steps, num_layers, k), -1, dtype=np.int32)
    predicted = np.full((steps, num_layers, P), -1, dtype=np.int32)
    h = rng.standard_normal(dim)
    fresh = np.sqrt(1.0 - stay * stay)
    for s in range(steps):
        h = stay * h + fresh * rng.standard_normal(dim)
        state = h / np.linalg.norm(h)
        for layer in range(num_layers):
            if layer > 0:
                predicted[s, layer] = _topk(scale * R_LED[layer] @ state + bias_LE[layer], P)
                state = state + drift * rng.standard_normal(dim) / np.sqrt(dim)
                state = state / np.linalg.norm(state)
            experts[s, layer] = _topk(scale * R_LED[layer] @ state + bias_LE[layer], k)
    return RoutingTrace(experts, num_experts, predicted)


def uniform_trace(num_experts: int, num_layers: int, steps: int, k: int = 1, *,
                  seed: int = 0) -> RoutingTrace:
    """Each step each layer uses ``k`` distinct experts drawn uniformly (no prediction)."""
    if not isinstance(k, int) or not 1 <= k <= num_experts:
        raise ConfigError("k", k, f"an int in [1, num_experts={num_experts}]")
    rng = np.random.default_rng(seed)
    keys = rng.random((steps, num_layers, num_experts))
    return RoutingTrace(np.argsort(keys, axis=-1)[..., :k].astype(np.int32), num_experts)
