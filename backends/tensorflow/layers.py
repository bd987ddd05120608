"""The Keras 3 MoE layer (TensorFlow backend) with sparse dispatch.

``MoE(config)`` is a ``keras.layers.Layer``: ``y = layer(x)`` for ``x`` of shape ``(..., D)``.
Weights are Keras variables in the portable layout of :mod:`moe_router.weights`
(``export_weights()`` / ``MoE.from_weights(config, weights)``). The router runs in float32
whatever the dtype policy (its weight is never autocast); the experts run in the compute dtype
(``mixed_bfloat16`` works).

Keras integration:
- aux losses (``plan.losses.total``) through ``add_loss``, so ``model.fit`` optimizes them;
- routing statistics of the last call as non-trainable variables (``routing_stats()``, readable
  from a callback): mean experts/token, k histogram, expert counts, dropped slots;
- the aux-free expert bias is a non-trainable variable; loads accumulate during training calls
  and :meth:`MoE.update_expert_bias` (or the :class:`ExpertBiasUpdate` callback) applies the step;
- the top-p / complexity controller :class:`~moe_router.RouterState` is non-trainable variables,
  updated on training calls;
- ``get_config`` / ``from_config`` (the MoEConfig as a nested dict), registered serializable.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from moe_router.api import route  # noqa: E402
from moe_router.config import MoEConfig  # noqa: E402
from moe_router.errors import ConfigError, InputError, InputTypeError  # noqa: E402
from moe_router.losses import update_expert_bias as _bias_step  # noqa: E402
from moe_router.plan import RouterState, RoutingPlan  # noqa: E402
from moe_router.weights import check_weights, weight_shapes  # noqa: E402

from .backend import TensorFlowBackend  # noqa: E402
from .dispatch import (  # noqa: E402
    ExpertWeights,
    capacity_dispatch,
    ffn,
    split_dispatch,
    tile_dispatch,
    tile_rows,
)

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"moe_router.keras needs Keras 3 with the TensorFlow backend, but Keras "
                      f"runs on {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before "
                      f"keras is first imported")

DISPATCH_NAMES = ("auto", "split", "capacity", "tiles")
_STATEFUL = ("top_p", "complexity")
_TF = TensorFlowBackend()
#: portable weight name -> Keras variable name
_VAR_NAMES = {name: name.replace(".", "_") for name in (
    "router.weight", "router.bias", "router.expert_bias", "experts.w_gate", "experts.w_up",
    "experts.w_down", "shared.w_gate", "shared.w_up", "shared.w_down", "shared.gate")}
_STATE_FIELDS = RouterState._fields


def in_xla_context() -> bool:
    """True while tracing a function compiled with XLA (``jit_compile=True``)."""
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private module moved: assume no XLA
        return False
    return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def _capacity(config: MoEConfig, T: Any) -> Any:
    """Slots per expert of the capacity buffer (== what routing allows): int or int32 scalar."""
    r = config.router
    E = r.num_experts
    if r.strategy == "expert_choice":  # C = ceil(T * factor / E), capped at T
        factor = r.capacity_factor if r.capacity_factor is not None else float(r.k)
        if isinstance(T, int):
            return min(T, max(1, math.ceil(T * factor / E)))
        T_f = tf.cast(T, tf.float32)
        return tf.cast(tf.minimum(tf.maximum(tf.math.ceil(T_f * factor / E), 1.0), T_f), tf.int32)
    if isinstance(T, int):
        return r.capacity(T)
    assert r.capacity_factor is not None
    slots = tf.math.ceil(tf.cast(T, tf.float32) * (r.capacity_factor * r.nominal_experts / E))
    return tf.cast(tf.maximum(slots, 1.0), tf.int32)


@keras.saving.register_keras_serializable(package="moe_router")
class MoE(keras.layers.Layer):
    """Mixture-of-Experts layer: ``y = layer(x)``, ``x`` ``(..., d_model)``.

    Args:
        config: a :class:`~moe_router.MoEConfig` (or its dict form, as in ``get_config``).
            ``config.dispatch``: ``auto`` (``split`` eagerly and in ``tf.function``; under XLA
            ``capacity`` when the router has a ``capacity_factor``, else ``tiles``), ``split``,
            ``capacity`` or ``tiles``; see :mod:`moe_router_backends.tensorflow.dispatch`.
        seed: seed of the weight initializers and of the training-time router noise.

    Call arguments: ``training``; ``mask`` (Keras mask, ``x``'s leading shape; padding is left
    out of losses and statistics); ``token_ids`` (``hash``), ``complexity_scores``
    (``external`` estimator), ``attention_probs`` (``attention_entropy`` estimator).
    """

    def __init__(self, config: MoEConfig | Mapping[str, Any], *, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(config, Mapping):
            config = MoEConfig.from_dict(config)
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig or its dict, got "
                                 f"{type(config).__name__}")
        if config.dispatch not in DISPATCH_NAMES:
            raise ConfigError("dispatch", config.dispatch, f"one of {', '.join(DISPATCH_NAMES)} "
                              "for the Keras layer")
        r = config.router
        if config.dispatch == "capacity" and r.capacity_factor is None \
                and r.strategy != "expert_choice":
            raise ConfigError("dispatch", config.dispatch, "'capacity' only with "
                              "RouterConfig.capacity_factor set (routing then drops and counts "
                              "the overflow); use 'tiles' for dropless static shapes (XLA)")
        self.moe_config = config
        self.seed = seed
        self.supports_masking = True
        # Keras only XLA-compiles (jit_compile='auto' on GPU) when every layer supports it
        self.supports_jit = config.dispatch != "split"
        self._seed_gen = (keras.random.SeedGenerator(seed) if r.noise != "none" else None)

    # ----- weights -----------------------------------------------------------------------------
    def build(self, input_shape: Any) -> None:
        D = self.moe_config.d_model
        if input_shape is not None and input_shape[-1] not in (None, D):
            raise InputError("x", f"expected shape (..., d_model={D}), got {tuple(input_shape)}")
        std = self.moe_config.init_std
        for i, (name, shape) in enumerate(weight_shapes(self.moe_config).items()):
            is_bias = name.endswith("bias")
            init = (keras.initializers.Zeros() if is_bias else keras.initializers.RandomNormal(
                stddev=std, seed=None if self.seed is None else self.seed + i))
            variable = self.add_weight(
                shape=shape, initializer=init, name=_VAR_NAMES[name], dtype="float32",
                trainable=name != "router.expert_bias",
                autocast=not name.startswith("router."))  # the router stays float32
            setattr(self, _VAR_NAMES[name], variable)
        r = self.moe_config.router
        if r.strategy in _STATEFUL:
            start = {"top_p": r.top_p, "score_var": 1.0}
            self.router_state_vars = [
                self.add_weight(shape=(), name=f"state_{field}", trainable=False, dtype="float32",
                                initializer=keras.initializers.Constant(start.get(field, 0.0)),
                                autocast=False) for field in _STATE_FIELDS]
        else:
            self.router_state_vars = None
        if r.use_expert_bias:
            self.expert_load = self._stat("expert_load", (r.num_experts,))
        stats = {"mean_experts": (), "k_histogram": (r.max_slots + 1,),
                 "expert_counts": (r.num_experts,), "num_dropped": ()}
        self.stat_vars = {name: self._stat(f"stat_{name}", shape) for name, shape in stats.items()}

    def _stat(self, name: str, shape: tuple[int, ...]) -> keras.Variable:
        return self.add_weight(shape=shape, name=name, trainable=False, dtype="float32",
                               initializer="zeros", autocast=False)

    def _weight(self, name: str) -> keras.Variable:
        return getattr(self, _VAR_NAMES[name])

    def export_weights(self) -> dict[str, np.ndarray]:
        """The portable weight dict (float32 NumPy), see :mod:`moe_router.weights`."""
        self._ensure_built()
        return {name: np.asarray(tf.convert_to_tensor(self._weight(name)).numpy(), np.float32)
                for name in weight_shapes(self.moe_config)}

    def load_weights_dict(self, weights: Mapping[str, Any]) -> None:
        """Assign a portable weight dict (names and shapes checked)."""
        self._ensure_built()
        for name, value in check_weights(self.moe_config, weights).items():
            self._weight(name).assign(value)

    @classmethod
    def from_weights(cls, config: MoEConfig, weights: Mapping[str, Any], **kwargs: Any) -> MoE:
        """A built layer holding ``weights`` (a portable weight dict, e.g. from the torch layer)."""
        layer = cls(config, **kwargs)
        layer.load_weights_dict(weights)
        return layer

    def _ensure_built(self) -> None:
        if not self.built:
            self.build((None, self.moe_config.d_model))

    # ----- Keras citizenship -------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        base = super().get_config()
        return {**base, "config": dataclasses.asdict(self.moe_config), "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoE:
        config = dict(config)
        moe = MoEConfig.from_dict(config.pop("config"))
        return cls(moe, **config)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask

    # ----- state ------------------------------------------------------------------------------
    def router_state(self) -> RouterState | None:
        """The controller state as a :class:`~moe_router.RouterState` of float32 scalars."""
        if not self.router_state_vars:
            return None
        return RouterState(*(tf.convert_to_tensor(v) for v in self.router_state_vars))

    def update_expert_bias(self) -> np.ndarray:
        """Aux-free balancing step from the loads accumulated since the last call (then reset).

        Call once per optimizer step (the :class:`ExpertBiasUpdate` callback does). Returns the
        new ``(E,)`` bias.
        """
        r = self.moe_config.router
        if not r.use_expert_bias:
            raise InputError("update_expert_bias", "the router has no expert bias; set "
                             "RouterConfig(use_expert_bias=True)")
        bias = self._weight("router.expert_bias")
        new = _bias_step(tf.convert_to_tensor(bias), tf.convert_to_tensor(self.expert_load),
                         r.bias_update_rate)
        bias.assign(new)
        self.expert_load.assign(tf.zeros_like(self.expert_load))
        return np.asarray(new)

    def routing_stats(self) -> dict[str, Any]:
        """Statistics of the last call (eager): mean_experts, k_histogram, expert_counts,
        num_dropped."""
        out: dict[str, Any] = {}
        for name, var in self.stat_vars.items():
            value = np.asarray(tf.convert_to_tensor(var).numpy())
            out[name] = float(value) if value.ndim == 0 else value.astype(np.int64)
        out["num_dropped"] = int(out["num_dropped"])
        return out

    # ----- forward ----------------------------------------------------------------------------
    def plan(self, inputs: Any, *, training: bool = False, **route_inputs: Any) -> RoutingPlan:
        """The :class:`~moe_router.RoutingPlan` for ``inputs`` (no state is updated)."""
        self._ensure_built()
        x_TD = self._flatten(tf.convert_to_tensor(inputs))
        return self._route(x_TD, training, None, **route_inputs)

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # validated here: Keras re-wraps errors raised inside call() as RuntimeError
        self._check_input(inputs)
        return super().__call__(inputs, *args, **kwargs)

    def _check_input(self, x: Any) -> None:
        D = self.moe_config.d_model
        shape = getattr(x, "shape", None)
        if shape is None:
            raise InputTypeError("x", f"expected a tensor of shape (..., d_model={D}), got "
                                 f"{type(x).__name__}")
        dtype = keras.backend.standardize_dtype(x.dtype)
        if "float" not in dtype:
            raise InputTypeError("x", f"expected a floating dtype (float32/bfloat16/float16), "
                                 f"got {dtype}")
        shape = tuple(shape)
        if len(shape) < 1 or shape[-1] not in (None, D):
            raise InputError("x", f"expected shape (..., d_model={D}), got {shape}")

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None,
             token_ids: Any = None, complexity_scores: Any = None,
             attention_probs: Any = None) -> tf.Tensor:
        x = tf.convert_to_tensor(inputs)
        x_TD = self._flatten(x)
        training = bool(training)
        plan = self._route(x_TD, training, mask, token_ids=token_ids,
                           complexity_scores=complexity_scores, attention_probs=attention_probs)
        self._record(plan, training)
        y_TD = self._experts(x_TD, plan.expert_indices, plan.expert_weights)
        if self.moe_config.has_shared:
            y_TD = y_TD + self._shared(x_TD)
        return tf.reshape(y_TD, tf.shape(x))

    def _flatten(self, x: tf.Tensor) -> tf.Tensor:
        D = self.moe_config.d_model
        self._check_input(x)
        return tf.reshape(tf.cast(x, self.compute_dtype), [-1, D])

    def _route(self, x_TD: tf.Tensor, training: bool, mask: Any, **extra: Any) -> RoutingPlan:
        r = self.moe_config.router
        logits_TE = tf.matmul(tf.cast(x_TD, tf.float32), tf.convert_to_tensor(
            self._weight("router.weight")))
        if self.moe_config.router_bias:
            logits_TE = logits_TE + tf.convert_to_tensor(self._weight("router.bias"))
        kwargs: dict[str, Any] = {}
        for name, value in (("token_ids_T", extra.get("token_ids")),
                            ("complexity_scores_T", extra.get("complexity_scores")),
                            ("mask_T", mask)):
            if value is not None:
                kwargs[name] = tf.reshape(tf.convert_to_tensor(value), [-1])
        if extra.get("attention_probs") is not None:
            kwargs["attention_probs"] = tf.convert_to_tensor(extra["attention_probs"])
        if r.strategy == "complexity" and r.complexity_estimator == "hidden_norm":
            kwargs["hidden_TD"] = tf.cast(x_TD, tf.float32)
        if r.use_expert_bias:
            kwargs["expert_bias_E"] = tf.convert_to_tensor(self._weight("router.expert_bias"))
        if training and self._seed_gen is not None:
            kwargs["rng"] = self._seed_gen.next()
        route_fn = tf.autograph.experimental.do_not_convert(route)
        return route_fn(logits_TE, r, training=training, state=self.router_state(),
                        backend=_TF, **kwargs)

    def _record(self, plan: RoutingPlan, training: bool) -> None:
        """add_loss, statistics of this call, and (training) controller state and loads."""
        r = self.moe_config.router
        if r.aux_loss_coef or r.z_loss_coef or r.entropy_loss_coef:
            self.add_loss(plan.losses.total)
        stats = {"mean_experts": plan.stats.mean_experts, "k_histogram": plan.stats.k_histogram,
                 "expert_counts": plan.expert_counts, "num_dropped": plan.num_dropped}
        for name, value in stats.items():
            self.stat_vars[name].assign(tf.cast(value, tf.float32))
        if not training:
            return
        if self.router_state_vars and plan.state is not None:
            for var, value in zip(self.router_state_vars, plan.state):
                var.assign(tf.stop_gradient(tf.cast(value, tf.float32)))
        if r.use_expert_bias:
            self.expert_load.assign_add(tf.cast(plan.expert_counts, tf.float32))

    def _dispatch_name(self) -> str:
        name = self.moe_config.dispatch
        if name != "auto":
            return name
        if not in_xla_context():
            return "split"
        r = self.moe_config.router
        has_capacity = r.capacity_factor is not None or r.strategy == "expert_choice"
        return "capacity" if has_capacity else "tiles"

    def _experts(self, x_TD: tf.Tensor, ids_TK: tf.Tensor, weights_TK: tf.Tensor) -> tf.Tensor:
        cfg = self.moe_config
        dtype = x_TD.dtype
        experts = ExpertWeights(
            w_gate=tf.cast(self._weight("experts.w_gate"), dtype) if cfg.is_gated else None,
            w_up=tf.cast(self._weight("experts.w_up"), dtype),
            w_down=tf.cast(self._weight("experts.w_down"), dtype))
        name = self._dispatch_name()
        if name == "split":
            return split_dispatch(_TF, x_TD, ids_TK, weights_TK, experts, cfg.activation)
        T = _TF.dim(x_TD, 0)
        if name == "capacity":
            return capacity_dispatch(_TF, x_TD, ids_TK, weights_TK, experts, cfg.activation,
                                     _capacity(cfg, T))
        K = cfg.router.max_slots
        tile = tile_rows(T * K if isinstance(T, int) else None, cfg.num_experts)
        return tile_dispatch(_TF, x_TD, ids_TK, weights_TK, experts, cfg.activation, tile)

    def _shared(self, x_TD: tf.Tensor) -> tf.Tensor:
        cfg = self.moe_config
        dtype = x_TD.dtype

        def w(name: str) -> tf.Tensor:
            return tf.cast(self._weight(name), dtype)

        gate = w("shared.w_gate") if cfg.is_gated else None
        out_TD = ffn(x_TD, gate, w("shared.w_up"), w("shared.w_down"), cfg.activation)
        if cfg.shared_expert_gate:
            out_TD = out_TD * tf.sigmoid(tf.matmul(x_TD, w("shared.gate")))
        return out_TD


class ExpertBiasUpdate(keras.callbacks.Callback):
    """Applies :meth:`MoE.update_expert_bias` to every MoE layer with an expert bias after each
    training batch (the aux-loss-free balancing step of DeepSeek-V3)."""

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        for layer in self.model._flatten_layers(include_self=False):
            if isinstance(layer, MoE) and layer.moe_config.router.use_expert_bias:
                layer.update_expert_bias()
