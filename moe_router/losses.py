"""Router losses as pure functions of arrays (any registered framework; backend from the type).

Sources: Switch Transformer (load balancing), ST-MoE (z-loss), Huang et al. 2024 (entropy loss
for top-p), DeepSeek-V3 / Wang et al. 2024 (aux-loss-free bias). Exact semantics: ROUTING.md.
Every function takes an optional ``mask_T`` (1 = real token, 0 = padding) and runs in float32.
"""

from __future__ import annotations

from typing import Any

from .backend import Array, Backend
from .config import LossConvention
from .errors import InputError

__all__ = [
    "load_balancing_loss",
    "router_z_loss",
    "router_entropy_loss",
    "update_expert_bias",
]


def _backend(x: Any) -> Backend:
    from .registry import backend_for

    return backend_for(x)


def _mask_and_count(b: Backend, mask_T: Array | None, like_TE: Array) -> tuple[Array, Array]:
    """``(mask_T float32, number of unmasked tokens >= 1)``."""
    if mask_T is None:
        mask = b.full((b.dim(like_TE, 0),), 1.0, "float32", like=like_TE)
    else:
        mask = b.cast(b.reshape(mask_T, (-1,)), "float32")
    return mask, b.maximum(b.sum(mask), 1.0)


def _masked_mean(b: Backend, values_T: Array, mask_T: Array | None, like_TE: Array) -> Array:
    mask, count = _mask_and_count(b, mask_T, like_TE)
    return b.sum(values_T * mask) / count


# ----- load balancing --------------------------------------------------------------------------
def load_balancing_from_probs(b: Backend, probs_TE: Array, indices_TK: Array, num_experts: int,
                              convention: LossConvention, mask_T: Array | None = None,
                              k: int | None = None) -> Array:
    """Load-balancing loss from ``(T, E)`` float32 softmax probabilities (backend given).

    With null experts (``probs`` ``(T, E + N)`` and ``k`` the top-k over all E + N choices),
    the loss is null-aware (AdaMoE): it balances over all E + N choices, the N null experts
    counted together (each gets 1/N of the null slots and of the null probability), where a
    token's null slots are ``k`` minus its real slots. It is 1.0 (``switch``) when every choice
    gets 1/(E + N) of the slots and of the probability, so moving probability onto the null
    experts does not lower it for free.
    """
    mask, count = _mask_and_count(b, mask_T, probs_TE)
    width = b.shape(probs_TE)[1]
    null = width is not None and width > num_experts and k is not None
    slots_TKE = b.one_hot(indices_TK, num_experts, dtype="float32")
    slots_TE = b.sum(slots_TKE, axis=1)
    slots_E = b.sum(slots_TE * mask[:, None], axis=0)
    prob_E = b.sum(probs_TE[:, :num_experts] * mask[:, None], axis=0) / count
    null_slots = prob_null = None
    if null:
        real_T = b.sum(slots_TE, axis=-1)
        null_slots = b.sum(b.maximum(float(k) - real_T, 0.0) * mask)
        prob_null = b.sum(b.sum(probs_TE[:, num_experts:], axis=-1) * mask) / count
    if convention == "switch":
        total_slots = b.sum(slots_E) if null_slots is None else b.sum(slots_E) + null_slots
        denominator = b.maximum(total_slots, 1.0)
    elif convention == "hf":
        denominator = count
    else:
        raise InputError("convention", f"expected 'switch' or 'hf', got {convention!r}")
    balance = b.sum(slots_E / denominator * prob_E)
    if null_slots is None or prob_null is None:
        return float(num_experts) * balance
    num_null = width - num_experts
    return float(width) * (balance + null_slots / denominator * prob_null / float(num_null))


def load_balancing_loss(router_logits_TE: Array, expert_indices_TK: Array, num_experts: int,
                        convention: LossConvention = "switch",
                        mask_T: Array | None = None, k: int | None = None) -> Array:
    """Auxiliary load-balancing loss.

    ``switch``: E * sum_e f_e * P_e with f_e the fraction of used slots routed to e (1.0 at
    perfect balance for any k). ``hf``: what transformers' Mixtral ``load_balancing_loss_func``
    returns for one layer (k at perfect balance). P_e is the mean softmax probability of e over
    unmasked tokens. With null experts (logits wider than ``num_experts``) pass ``k``, the top-k
    over all E + N choices, for the null-aware loss the routed plan carries (see
    :func:`load_balancing_from_probs`); without ``k`` only the first E columns enter.

    Args:
        router_logits_TE: ``(T, E')`` router logits, E' >= num_experts.
        expert_indices_TK: ``(T, K)`` int selected experts, ``-1`` for unused slots.
        num_experts: E.
        convention: ``"switch"`` or ``"hf"``.
        mask_T: ``(T,)`` 1 for real tokens, 0 for padding (``None``: all real).
        k: with null experts, the number of choices per token over E + N.
    """
    b = _backend(router_logits_TE)
    probs_TE = b.softmax(b.cast(router_logits_TE, "float32"), axis=-1)
    if k is None:
        probs_TE = probs_TE[:, :num_experts]
    return load_balancing_from_probs(b, probs_TE, expert_indices_TK, num_experts, convention,
                                     mask_T, k)


# ----- z-loss and entropy ----------------------------------------------------------------------
def z_loss_from_logits(b: Backend, logits_TE: Array, mask_T: Array | None = None) -> Array:
    return z_loss_from_lse(b, b.logsumexp(logits_TE, axis=-1), mask_T, logits_TE)


def z_loss_from_lse(b: Backend, lse_T: Array, mask_T: Array | None, like_TE: Array) -> Array:
    """z-loss from the per-token ``logsumexp`` of the logits ``(T,)``."""
    return _masked_mean(b, lse_T * lse_T, mask_T, like_TE)


def router_z_loss(router_logits_TE: Array, mask_T: Array | None = None) -> Array:
    """ST-MoE z-loss: mean over unmasked tokens of logsumexp(z_t)^2."""
    b = _backend(router_logits_TE)
    return z_loss_from_logits(b, b.cast(router_logits_TE, "float32"), mask_T)


def entropy_from_logits(b: Backend, logits_TE: Array, mask_T: Array | None = None) -> Array:
    return entropy_from_probs(b, b.softmax(logits_TE, axis=-1),
                              b.log_softmax(logits_TE, axis=-1), mask_T)


def entropy_from_probs(b: Backend, probs_TE: Array, log_probs_TE: Array,
                       mask_T: Array | None = None) -> Array:
    """Mean router entropy from softmax probabilities and their logs ``(T, E)``."""
    plogp_TE = probs_TE * b.where(probs_TE > 0.0, log_probs_TE, 0.0)  # 0 log 0 = 0, no NaN
    return _masked_mean(b, -b.sum(plogp_TE, axis=-1), mask_T, probs_TE)


def router_entropy_loss(router_logits_TE: Array, mask_T: Array | None = None) -> Array:
    """Mean over unmasked tokens of the router entropy -sum_e P log P (nats)."""
    b = _backend(router_logits_TE)
    return entropy_from_logits(b, b.cast(router_logits_TE, "float32"), mask_T)


# ----- aux-loss-free balancing -----------------------------------------------------------------
def update_expert_bias(expert_bias_E: Array, expert_counts_E: Array,
                       rate: float = 1e-3) -> Array:
    """DeepSeek-V3 aux-free update: ``b += rate * sign(mean_load - load)``, then centered.

    Call it after the optimizer step with the step's ``plan.expert_counts`` (summed over
    micro-batches and data-parallel ranks by the caller). Returns the new ``(E,)`` bias.
    """
    b = _backend(expert_bias_E)
    load_E = b.cast(expert_counts_E, "float32")
    mean_load = b.sum(load_E) / float(b.shape(load_E)[0] or 1)
    diff_E = mean_load - load_E
    sign_E = b.cast(diff_E > 0.0, "float32") - b.cast(diff_E < 0.0, "float32")
    bias_E = b.cast(expert_bias_E, "float32") + rate * sign_E
    return bias_E - b.sum(bias_E) / float(b.shape(bias_E)[0] or 1)
