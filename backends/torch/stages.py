"""Torch's exact overrides of the layer step's stages (:class:`~moe_router.layer.step.LayerStages`).

- :meth:`TorchStages.router_logits`: the router GEMM in float32 *outside* autocast (autocast would
  otherwise run it in bfloat16/float16 and change routing decisions).
- :meth:`TorchStages.fast_select`: plain top-k at inference in a few tensor ops, with the same
  decisions and weights as :func:`moe_router.route` (the same order keys, stable sort: ties to
  the lower expert index); ``None`` whenever anything beyond plain top-k is configured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from moe_router.config import MoEConfig, RouterConfig
from moe_router.layer.step import LayerStages

Array = torch.Tensor


class TorchStages(LayerStages):
    """The torch stages (``TorchBackend().layer_stages()``)."""

    def router_logits(self, x_TD: Array, params: Mapping[str, Array],
                      config: MoEConfig) -> Array:
        """``(T, E + N)`` float32 logits, computed with autocast disabled."""
        device = x_TD.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return super().router_logits(x_TD, params, config)
        return super().router_logits(x_TD, params, config)

    def fast_select(self, logits_TE: Array, config: RouterConfig,
                    route_kwargs: Mapping[str, Any]) -> tuple[Array, Array] | None:
        """``(ids_TK, gates_TK)`` of plain top-k (softmax or sigmoid scores, optional expert
        bias for the selection, renormalization, ``route_scale``), exactly as ``route`` gives
        them; ``None`` for anything else (null experts, capacity, groups, a mask,
        ``balanced_debug``, ``max_experts != k``, other strategies). The step calls it only at
        inference (no training, no state update, no observer, no plan requested)."""
        r = config
        if (r.strategy != "top_k" or r.num_null_experts or r.balanced_debug
                or r.capacity_factor is not None or (r.num_groups or 1) > 1
                or r.max_experts not in (None, r.k) or route_kwargs.get("mask_T") is not None):
            # (top_k without null experts has K = max_experts or k)
            return None
        logits_TE = logits_TE.float()
        if r.score_func == "sigmoid":
            probs_TE = torch.sigmoid(logits_TE)
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1)
        # the order of route(): the logits (exact: the scores are increasing in them, where
        # float32 scores may tie by underflow or saturation), or the float32 score + bias
        order_TE = logits_TE
        bias_E = route_kwargs.get("expert_bias_E")
        if bias_E is not None:
            order_TE = probs_TE + bias_E.float()[None, :]
        ids_TK = torch.sort(-order_TE, dim=-1, stable=True).indices[:, : r.k]
        gates_TK = torch.gather(probs_TE, 1, ids_TK)
        if r.normalize_weights is not False:  # top_k renormalizes by default
            total_T1 = gates_TK.sum(dim=-1, keepdim=True)
            if r.score_func == "sigmoid":  # softmax: the top-1 probability is >= 1/E > 0
                total_T1 = torch.where(total_T1 > 0, total_T1, 1.0)
            gates_TK = gates_TK / total_T1
        if r.route_scale != 1.0:
            gates_TK = gates_TK * float(r.route_scale)
        return ids_TK, gates_TK
