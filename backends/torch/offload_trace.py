"""Record a :class:`~moe_router.offload.trace.RoutingTrace` from real forwards of a torch model.

:func:`record_trace` puts a recording ``experts`` stage in front of each MoE layer's own (an
offloaded layer keeps its store), runs the batches without gradients in eval mode, and restores
the layers' stages and modes afterwards. At each layer ``l`` it records the experts the layer
used (its routing, ``ids_TK``, whatever the strategy) and, as the prediction for layer ``l + 1``,
layer ``l + 1``'s router applied to layer ``l``'s input (:func:`~.offload.predict_next`, the
rule the offloaded stage prefetches with). Layer 0 has no prediction (``-1``).

Steps: one per batch (the union of the batch's tokens, as the live store sees one forward), or
with ``per_token=True`` one per token row, in the order of the flattened input (batch-major):
a decode-like trace from teacher-forced forwards, which for a causal model route each token as
incremental decoding would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_router.errors import InputError
from moe_router.layer.calibrate import default_forward
from moe_router.offload.trace import RoutingTrace

from .layers import MoE
from .model import moe_layers
from .offload import predict_next, router_scores


class _Tap:
    """What one forward recorded: per layer, the used ids and the prediction for the next."""

    def __init__(self, layers: Sequence[MoE], predict_k: int | None, per_token: bool) -> None:
        self.layers, self.predict_k, self.per_token = list(layers), predict_k, per_token
        self.E = layers[0].config.router.num_experts
        self.reset()

    def reset(self) -> None:
        L = len(self.layers)
        self.used: list[np.ndarray | None] = [None] * L
        self.pred: list[np.ndarray | None] = [None] * L

    def see(self, layer: int, x_TD: torch.Tensor, ids_TK: torch.Tensor) -> None:
        if self.used[layer] is not None:
            raise InputError("model", f"MoE layer {layer} ran twice in one forward; record_trace "
                             "needs each layer once per batch")
        ids = ids_TK.detach().to("cpu", torch.int64).numpy()
        ids = np.where((ids >= 0) & (ids < self.E), ids, -1)
        self.used[layer] = ids
        if layer + 1 < len(self.layers):
            nxt = self.layers[layer + 1]
            if self.per_token:
                self.pred[layer + 1] = token_predictions(nxt, x_TD, self.predict_k)
            else:
                self.pred[layer + 1] = np.asarray(predict_next(nxt, x_TD, self.predict_k),
                                                  dtype=np.int64)[None, :]

    def rows(self) -> tuple[list[list[list[int]]], list[list[list[int]]]]:
        """``(experts, predicted)`` of this forward: ``[step][layer] -> ids`` (used ids sorted,
        as the offloaded stage runs them; predictions best first)."""
        T = next((u.shape[0] for u in self.used if u is not None), 0)
        steps = T if self.per_token else 1
        experts = [[[] for _ in self.layers] for _ in range(steps)]
        predicted = [[[] for _ in self.layers] for _ in range(steps)]
        for layer, ids in enumerate(self.used):
            if ids is None:
                continue
            groups = [ids[t] for t in range(T)] if self.per_token else [ids.reshape(-1)]
            for s, group in enumerate(groups):
                experts[s][layer] = sorted({int(e) for e in group if e >= 0})
            pred = self.pred[layer]
            if pred is not None:
                for s in range(steps):
                    predicted[s][layer] = [int(e) for e in pred[s]]
        return experts, predicted


def token_predictions(layer: MoE, x_TD: torch.Tensor, k: int | None = None) -> np.ndarray:
    """``(T, k)`` int64: each row's top-``k`` experts of ``layer``'s router (``k`` default the
    router's), best score first (ties to the lower expert), as :func:`predict_next` orders a
    single token's."""
    r = layer.config.router
    kk = min(k or r.k, r.num_experts)
    scores = router_scores(layer, x_TD).cpu().numpy()
    order = np.lexsort((np.broadcast_to(np.arange(scores.shape[1]), scores.shape), -scores),
                       axis=-1)
    return order[:, :kk].astype(np.int64)


def _recording_stages(layer: MoE, index: int, tap: _Tap) -> Any:
    base = type(layer._stages())

    def experts(self: Any, x_TD: torch.Tensor, ids_TK: torch.Tensor, *args: Any) -> Any:
        tap.see(index, x_TD, ids_TK)
        return base.experts(self, x_TD, ids_TK, *args)

    return layer.derive_stages("Recording", members={"experts": experts})


def record_trace(model: nn.Module | Sequence[MoE], batches: Iterable[Any], *,
                 forward: Callable[[Any], Any] | None = None, predict_k: int | None = None,
                 per_token: bool = False) -> RoutingTrace:
    """Run ``batches`` through ``model`` and return their :class:`RoutingTrace` (module
    docstring), with next-router predictions of ``predict_k`` experts per token (default the
    router's k). ``forward(batch)`` runs one batch (default ``model(**batch)`` /
    ``model(*batch)`` / ``model(batch)``); ``model`` may be a list of :class:`MoE` layers when
    ``forward`` is given.

    Raises:
        InputError: no MoE layer, layers with different expert counts, a layer run twice per
            batch, or ``predict_k`` < 1.
    """
    layers = moe_layers(model) if isinstance(model, nn.Module) else list(model)
    if not layers:
        raise InputError("model", "has no moe_router MoE layer")
    counts = {layer.config.router.num_experts for layer in layers}
    if len(counts) > 1:
        raise InputError("model", f"its MoE layers have different expert counts {sorted(counts)}")
    if predict_k is not None and (not isinstance(predict_k, int) or predict_k < 1):
        raise InputError("predict_k", f"expected None or an int >= 1, got {predict_k!r}")
    if forward is None:
        if not isinstance(model, nn.Module):
            raise InputError("forward", "required when model is a list of layers")
        forward = default_forward(model)
    tap = _Tap(layers, predict_k, per_token)
    saved = [layer._stages() for layer in layers]
    modules = [m for layer in layers for m in layer.modules()]
    if isinstance(model, nn.Module):
        modules += list(model.modules())
    modes = {m: m.training for m in modules}
    experts: list[list[list[int]]] = []
    predicted: list[list[list[int]]] = []
    try:
        for i, layer in enumerate(layers):
            layer.set_stages(_recording_stages(layer, i, tap))
        for m in modes:
            m.training = False
        with torch.no_grad():
            for batch in batches:
                tap.reset()
                forward(batch)
                used, pred = tap.rows()
                experts += used
                predicted += pred
    finally:
        for layer, stages in zip(layers, saved):
            layer.set_stages(stages)
        for m, training in modes.items():
            m.training = training
    E = counts.pop()
    if not experts:
        L = len(layers)
        empty = np.full((0, L, 1), -1, dtype=np.int32)
        return RoutingTrace(empty, E, empty.copy())
    return RoutingTrace.from_steps(experts, E, predicted)
