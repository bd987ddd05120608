"""The Keras side of the debugger: finding our layers, recompiling after observers change, and
:class:`MoEMetrics` (routing balance metrics in ``model.fit(...).history``)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from moe_router.debug.analyzer import layer_metrics
from moe_router.debug.counters import FIELDS, mode_row
from moe_router.debug.readout import delta_counts
from moe_router.errors import InputError
from moe_router.layer.state import OBSERVER_PREFIX, observer_names

from .layers import MoE

STATS = "routing_stats"
_STATS_PREFIX = f"{OBSERVER_PREFIX}{STATS}."
_TRAIN = mode_row("train")


def find_moe_layers(model: Any) -> list[tuple[str, MoE]] | None:
    """Every :class:`MoE` in ``model`` (a Keras model or layer; nested models and layers too)
    with its name (``layer.path`` once built, else ``layer.name``), in Keras' graph order (a
    layer shared by several calls once); ``None`` when ``model`` is not a Keras layer."""
    if not isinstance(model, keras.layers.Layer):
        return None
    return [(layer.path or layer.name, layer)
            for layer in model._flatten_layers(include_self=True, recursive=True)
            if isinstance(layer, MoE)]


def invalidate_compiled(model: Any) -> None:
    """Rebuild the compiled ``train`` / ``test`` / ``predict`` functions of a Keras ``model``
    (those it has made), so their next call retraces with the layers' current observer weights
    (a ``tf.function`` captures the variables it saw when traced). ``fit`` reads
    ``model.train_function`` at every step, so this also works from a callback. Your own
    ``tf.function`` s that call the layers must be re-created."""
    if not isinstance(model, keras.Model):
        return
    for kind in ("train", "test", "predict"):
        if getattr(model, f"{kind}_function", None) is not None:
            getattr(model, f"make_{kind}_function")(force=True)


def _stats_on(layer: MoE) -> bool:
    return bool(observer_names(layer.config, STATS))


def _counters(layer: MoE) -> dict[str, np.ndarray] | None:
    """``layer``'s ``routing_stats`` counters (both mode rows), or ``None`` when off."""
    if not (layer.built and _stats_on(layer)):
        return None
    return {name: np.asarray(layer._state[_STATS_PREFIX + name].numpy()) for name in FIELDS}


def _train_delta(now: Mapping[str, np.ndarray],
                 start: Mapping[str, np.ndarray] | None) -> dict[str, Any]:
    """The LAYER_COUNTS the training row gained since ``start`` (wrap-safe, as the debugger
    reads them)."""
    return delta_counts(now, start or {k: np.zeros_like(v) for k, v in now.items()}, _TRAIN)


def epoch_metrics(deltas: list[dict[str, Any]]) -> dict[str, float]:
    """The :class:`MoEMetrics` values from each layer's train-row LAYER_COUNTS (layers that made
    no training call are left out; NaN when none made one). The per-layer numbers are the
    analyzer's (:func:`moe_router.debug.analyzer.layer_metrics`)."""
    seen = [d for d in deltas if d["calls"] > 0]
    metrics = [layer_metrics(d) for d in seen]
    load_ratios = [m["max_over_mean"] for m in metrics if m["max_over_mean"] is not None]
    experts = [m["mean_experts"] for m in metrics if m["mean_experts"] is not None]
    nan = math.nan
    return {
        "moe_max_over_mean_load": float(np.mean(load_ratios)) if load_ratios else nan,
        "moe_aux_loss": float(sum(m["mean_aux_loss"] for m in metrics)) if seen else nan,
        "moe_mean_experts": float(np.mean(experts)) if experts else nan,
        "moe_dropped": float(sum(int(d["dropped"]) for d in seen)) if seen else nan,
    }


class MoEMetrics(keras.callbacks.Callback):
    """Routing metrics of the MoE layers in the logs (and ``history``) at each epoch's end, from
    the ``routing_stats`` counters of the epoch's TRAINING calls only (validation calls count in
    the counters' eval row and do not change them):

    - ``moe_max_over_mean_load``: max / mean of the slots per expert, mean over layers;
    - ``moe_aux_loss``: the mean aux loss (``plan.losses.total``) per call, summed over layers;
    - ``moe_mean_experts``: the mean number of experts per real token, mean over layers;
    - ``moe_dropped``: slots dropped by the capacity limit, summed over layers.

    Layers without ``routing_stats`` get it at ``on_train_begin`` (config with
    ``observers=(..., "routing_stats")``; the train function is rebuilt) and lose it again at
    ``on_train_end`` unless ``keep_observers``. The counters are read on the host twice per
    epoch; resetting them during an epoch (``reset_observers``) spoils that epoch's values.

    Raises (from ``fit``):
        InputError: the model has no MoE layer, or its train function ran without updating the
            counters (a custom training loop: switch ``routing_stats`` on before compiling).
    """

    def __init__(self, *, keep_observers: bool = False) -> None:
        super().__init__()
        self.keep_observers = keep_observers
        self._layers: list[MoE] = []
        self._switched: list[tuple[MoE, Any]] = []
        self._start: list[dict[str, np.ndarray] | None] = []
        self._iterations = 0

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self._layers = [layer for _, layer in find_moe_layers(self.model) or []]
        if not self._layers:
            raise InputError("model", "MoEMetrics found no moe_router MoE layer in the model")
        self._switched = []
        for layer in self._layers:
            if not _stats_on(layer):
                old = layer.config
                layer.config = old.replace(observers=(*old.observers, STATS))
                self._switched.append((layer, old))
        if self._switched:
            invalidate_compiled(self.model)
            self.model.make_train_function(force=True)

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self._start = [_counters(layer) for layer in self._layers]
        self._iterations = self._optimizer_steps()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        deltas = []
        for layer, start in zip(self._layers, self._start):
            now = _counters(layer)
            if now is not None:
                deltas.append(_train_delta(now, start))
        if self._optimizer_steps() > self._iterations and not any(d["calls"] for d in deltas):
            raise InputError("model", "the training steps of this epoch did not update the MoE "
                             "layers' routing_stats counters (fit kept a train function made "
                             "before MoEMetrics switched them on); switch them on before fit: "
                             "layer.config = layer.config.replace(observers=(*layer.config."
                             "observers, 'routing_stats')) for each MoE layer, then "
                             "invalidate_compiled(model)")
        if logs is not None:
            logs.update(epoch_metrics(deltas))

    def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
        if self.keep_observers or not self._switched:
            return
        for layer, old in self._switched:
            layer.config = layer.config.replace(observers=old.observers)
        self._switched = []
        invalidate_compiled(self.model)

    def _optimizer_steps(self) -> int:
        optimizer = getattr(self.model, "optimizer", None)
        iterations = getattr(optimizer, "iterations", None)
        return 0 if iterations is None else int(iterations.numpy())
