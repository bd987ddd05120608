"""The Keras 3 MoE layer (TensorFlow backend): a thin adapter around the core layer step.

``MoE(config)`` is a ``keras.layers.Layer``; ``y = layer(x)`` for ``x`` of shape ``(..., D)``
runs :func:`moe_router.layer.step.layer_step`. The layer only stores things the Keras way:

- parameters (:func:`~moe_router.weights.param_shapes`) are Keras weights; the router's are never
  autocast (routing stays float32), the experts run in the compute dtype (``mixed_bfloat16``);
- the flat layer state (:func:`~moe_router.layer.state.state_fields`: ``router.state``,
  ``router.expert_bias``, ``observers.*``) is non-trainable weights, saved with the model.
  Under ``tf.distribute`` the observers' counters aggregate with ``"sum"`` (each replica adds its
  own counts: the layer writes the step's increment with ``assign_add``), their ``"buffer"``
  fields (the routing trace) are overwritten with ``assign`` and keep the first replica's value
  (``"only_first_replica"``), the rest aggregate with ``"mean"``;
- assigning ``layer.config`` a config that changes only observers / trace / routing fields adds
  and removes the observer weights in place (the debugger switching its counters on and off);
- ``plan.losses.total`` goes to ``add_loss``, so ``model.fit`` optimizes the aux losses.

Errors raised inside ``call()`` (bad ``token_ids``, NaN input, ...) reach the caller as our own
typed error with its own message (Keras would re-raise them with an ANSI-formatted message).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from moe_router.config import MoEConfig  # noqa: E402
from moe_router.errors import InputError, InputTypeError, MoERouterError  # noqa: E402
from moe_router.layer.experts import check_dispatch_framework  # noqa: E402
from moe_router.layer.observers import StateField  # noqa: E402
from moe_router.layer.state import (  # noqa: E402
    OBSERVER_PREFIX,
    PERSISTENT,
    ROUTER_STATE,
    LayerState,
    initial_state_arrays,
    observer_names,
    router_state_of,
    state_change,
    state_fields,
    state_from_arrays,
    state_to_arrays,
)
from moe_router.layer.step import BIAS_STEP_UPDATES, bias_step, layer_step  # noqa: E402
from moe_router.plan import RouterState  # noqa: E402
from moe_router.registry import default_registry  # noqa: E402
from moe_router.weights import check_weights, param_shapes  # noqa: E402

from .backend import TensorFlowBackend  # noqa: E402

if keras.backend.backend() != "tensorflow":
    raise ImportError(f"moe_router.keras needs Keras 3 with the TensorFlow backend, but Keras "
                      f"runs on {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow before "
                      f"keras is first imported")

_TF = TensorFlowBackend()
_step = tf.autograph.experimental.do_not_convert(layer_step)


def _var_name(name: str) -> str:
    return name.replace(".", "_")


def _aggregation(name: str, field: StateField) -> str:
    """``tf.distribute`` aggregation of state ``name``: observer counters sum the replicas'
    increments, observer buffers keep the first replica's value, the rest average."""
    if not name.startswith(OBSERVER_PREFIX):
        return "mean"
    return "only_first_replica" if field.kind == "buffer" else "sum"


@contextlib.contextmanager
def _scope_of(variable: keras.Variable) -> Iterator[None]:
    """The ``tf.distribute`` scope ``variable`` was created in (new state joins its strategy)."""
    strategy = getattr(variable.value, "_distribute_strategy", None)
    if strategy is None or tf.distribute.has_strategy():
        yield
    else:
        with strategy.scope():
            yield


@keras.saving.register_keras_serializable(package="moe_router")
class MoE(keras.layers.Layer):
    """Mixture-of-Experts layer: ``y = layer(x)``, ``x`` ``(..., d_model)``.

    Args:
        config: a :class:`~moe_router.MoEConfig` (or its dict form, as in ``get_config``);
            ``config.dispatch``: a portable name (``auto``: ``tensorflow:split`` eagerly and in
            ``tf.function``; under XLA ``capacity`` when the router has one, else
            ``tensorflow:tiles``) or a ``tensorflow:`` kernel.
        seed: seed of the weight initializers and of the training-time router noise.

    Call arguments: ``training``; ``mask`` (Keras mask, ``x``'s leading shape); ``token_ids``,
    ``complexity_scores``, ``attention_probs`` (strategies / estimators that need them);
    ``return_plan`` (``True``: ``(y, plan)``).
    """

    def __init__(self, config: MoEConfig | Mapping[str, Any], *, seed: int | None = None,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(config, Mapping):
            config = MoEConfig.from_dict(config)
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig or its dict, got "
                                 f"{type(config).__name__}")
        self.seed = seed
        self.calibrating = False
        self.supports_masking = True
        self._seed_gen: keras.random.SeedGenerator | None = None
        self.config = config

    @property
    def config(self) -> MoEConfig:
        """The layer's :class:`~moe_router.MoEConfig`. After build a new one may change the
        observers, the trace and the routing, not the weight or persistent state names: the
        observer weights are added (fresh) and removed in place; recompile functions that
        called the layer (:func:`moe_router_backends.tensorflow.debug.invalidate_compiled`).

        Raises:
            InputTypeError: not a ``MoEConfig``.
            InputError: the new config changes weight or persistent state names or shapes.
        """
        return self._moe_config

    @config.setter
    def config(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig, got {type(config).__name__}")
        check_dispatch_framework(_TF.framework, config)
        if self.built:
            added, removed = state_change(self._moe_config, config)
            self._change_observers(config, added, removed)
        self._moe_config = config
        self._kinds = {name: field.kind for name, field in state_fields(config).items()
                       if name.startswith(OBSERVER_PREFIX)}
        # Keras only XLA-compiles (jit_compile="auto") when every layer supports it; portable
        # names do (the policy picks a static-shape kernel under XLA)
        spec = default_registry().kernel_spec(config.dispatch) if config.dispatch != "auto" \
            else None
        self.supports_jit = spec is None or spec.framework is None or spec.static_shapes
        if config.router.noise != "none" and self._seed_gen is None:
            with self._unlocked():
                self._seed_gen = keras.random.SeedGenerator(self.seed)

    @contextlib.contextmanager
    def _unlocked(self) -> Iterator[None]:
        """Keras locks a built layer's state; the observers may still change."""
        tracker = self._tracker
        locked = tracker.locked
        tracker.unlock()
        try:
            yield
        finally:
            if locked:
                tracker.lock()

    def _change_observers(self, config: MoEConfig, added: Mapping[str, StateField],
                          removed: tuple[str, ...]) -> None:
        """Untrack the ``removed`` observer weights and add the ``added`` ones (initial values),
        in the order a fresh build of ``config`` has them (``.keras`` files store by index)."""
        with self._unlocked():
            for name in removed:
                self._state.pop(name)  # a tracked dict: untracks the variable
            with _scope_of(self._state[ROUTER_STATE]):
                for name, field in added.items():
                    self._state[name] = self._add_state(name, field)
            state = {name: self._state[name] for name in state_fields(config)}
            ids = {id(v) for v in state.values()}
            store = self._non_trainable_variables
            store[:] = [v for v in store if id(v) not in ids] + list(state.values())
            self._state = state

    def _add_state(self, name: str, field: StateField) -> keras.Variable:
        return self.add_weight(
            shape=field.shape, initializer=keras.initializers.Constant(field.initial()),
            name=_var_name(name), dtype=field.dtype, trainable=False, autocast=False,
            aggregation=_aggregation(name, field))

    # ----- weights and state -------------------------------------------------------------------
    def build(self, input_shape: Any) -> None:
        D = self.config.d_model
        if input_shape is not None and input_shape[-1] not in (None, D):
            raise InputError("x", f"expected shape (..., d_model={D}), got {tuple(input_shape)}")
        self._params: dict[str, keras.Variable] = {}
        for i, (name, shape) in enumerate(param_shapes(self.config).items()):
            init = (keras.initializers.Zeros() if name.endswith("bias") else
                    keras.initializers.RandomNormal(stddev=self.config.init_std, seed=None if
                                                    self.seed is None else self.seed + i))
            self._params[name] = self.add_weight(
                shape=shape, initializer=init, name=_var_name(name), dtype="float32",
                autocast=not name.startswith("router."))  # the router stays float32
        self._state: dict[str, keras.Variable] = {}
        for name, field in state_fields(self.config).items():
            self._state[name] = self._add_state(name, field)

    def _ensure_built(self) -> None:
        if not self.built:
            self.build((None, self.config.d_model))

    def export_weights(self) -> dict[str, np.ndarray]:
        """The portable weight dict (float32 NumPy): parameters, ``router.state`` and
        ``router.expert_bias`` (:mod:`moe_router.weights`)."""
        self._ensure_built()
        variables = {**self._params, **{k: self._state[k] for k in PERSISTENT if k in self._state}}
        return {name: np.asarray(var.numpy(), np.float32) for name, var in variables.items()}

    def import_weights(self, weights: Mapping[str, Any]) -> None:
        """Assign a portable weight dict (names and shapes checked by ``check_weights``)."""
        self._ensure_built()
        for name, value in check_weights(self.config, weights).items():
            (self._params[name] if name in self._params else self._state[name]).assign(value)

    @classmethod
    def from_weights(cls, config: MoEConfig, weights: Mapping[str, Any], **kwargs: Any) -> MoE:
        """A built layer holding ``weights`` (a portable weight dict, e.g. from the torch layer)."""
        layer = cls(config, **kwargs)
        layer.import_weights(weights)
        return layer

    def layer_state(self) -> LayerState:
        """The current :class:`~moe_router.layer.state.LayerState` (TensorFlow tensors)."""
        self._ensure_built()
        return state_from_arrays(_TF, {k: tf.convert_to_tensor(v.value)
                                       for k, v in self._state.items()}, self.config)

    def export_state(self) -> dict[str, np.ndarray]:
        """Every flat state array (router state, expert bias, observer counters) as NumPy."""
        self._ensure_built()
        return {name: np.asarray(var.numpy()) for name, var in self._state.items()}

    def reset_observers(self, observer: str | None = None) -> None:
        """Set the observers' state (of one ``observer`` by name, or all) to its initial values
        (host assignment, outside any compiled function)."""
        if not self.built:
            return
        fields = state_fields(self.config)
        for name in observer_names(self.config, observer):
            self._state[name].assign(fields[name].initial())

    @property
    def router_state(self) -> RouterState:
        """The controller state: a :class:`~moe_router.RouterState` of float32 scalars."""
        self._ensure_built()
        return router_state_of(_TF, tf.convert_to_tensor(self._state[ROUTER_STATE].value))

    def reset_router_state(self) -> None:
        """Back to the fresh controller state (before :func:`moe_router.keras.calibrate`)."""
        self._ensure_built()
        self._state[ROUTER_STATE].assign(initial_state_arrays(self.config)[ROUTER_STATE])

    def update_expert_bias(self, expert_counts: Any = None) -> np.ndarray:
        """Aux-free balancing step from the ``observers.expert_load.counts`` accumulated since the
        last call (or ``expert_counts``), then the counts restart from zero; returns the new
        ``(E,)`` bias. Under ``tf.distribute`` the counts are already summed over replicas (the
        variable aggregates with ``"sum"``). Call once per optimizer step (:class:`ExpertBiasUpdate`
        does)."""
        counts = None if expert_counts is None else tf.convert_to_tensor(expert_counts)
        state = bias_step(_TF, self.layer_state(), self.config, counts)
        arrays = state_to_arrays(_TF, state, BIAS_STEP_UPDATES)
        for name in BIAS_STEP_UPDATES:
            self._state[name].assign(arrays[name])
        return np.asarray(state.expert_bias.numpy())

    # ----- Keras citizenship -------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "config": dataclasses.asdict(self.config),
                "seed": self.seed}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> MoE:
        config = dict(config)
        return cls(MoEConfig.from_dict(config.pop("config")), **config)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def compute_mask(self, inputs: Any, mask: Any = None) -> Any:
        return mask

    # ----- forward -----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except MoERouterError as err:  # Keras re-raised it as type(err)(decorated message)
            original = err.__context__
            if type(original) is not type(err) or str(original) not in str(err):
                raise
            original._keras_call_info_injected = True  # outer Keras layers pass it through
            raise original from None

    def call(self, inputs: Any, training: bool | None = None, mask: Any = None,
             token_ids: Any = None, complexity_scores: Any = None, attention_probs: Any = None,
             return_plan: bool = False, forced_experts: Any = None,
             forced_weights: Any = None) -> Any:
        r = self.config.router
        forced = self.__dict__.get("_forced")
        if forced_experts is None and forced is not None:
            forced_experts, forced_weights = forced
        recording = self.__dict__.get("_recording", False)
        training = bool(training)
        has_losses = bool(r.aux_loss_coef or r.z_loss_coef or r.entropy_loss_coef)
        params = {name: var.value for name, var in self._params.items()}
        arrays = {name: tf.convert_to_tensor(var.value) for name, var in self._state.items()}
        out = _step(_TF, params, state_from_arrays(_TF, arrays, self.config), inputs, self.config,
                    training=training, update_state=training or self.calibrating,
                    token_ids=token_ids, attention_probs=attention_probs,
                    complexity_scores=complexity_scores, mask=mask,
                    need_plan=return_plan or has_losses or recording,
                    rng=self._seed_gen.next() if training and r.noise != "none" else None,
                    forced_experts=forced_experts, forced_weights=forced_weights)
        new = state_to_arrays(_TF, out.state, out.updated)
        for name in out.updated:  # counters: the increment (summed over replicas); Keras'
            if self._kinds.get(name) == "counter":  # assign_add would assign old + increment
                self._state[name].value.assign_add(new[name] - arrays[name])
            else:  # controller state, observer buffers: overwritten
                self._state[name].assign(new[name])
        plan = out.plan
        if recording and tf.executing_eagerly():
            self.__dict__["_recorded"] = plan.expert_indices
        if has_losses:
            self.add_loss(plan.losses.total)
        return (out.y, plan) if return_plan else out.y

    def force_routing(self, experts: Any, weights: Any = None) -> None:
        """Use ``experts`` ``(..., k)`` (and ``weights``) instead of the router's choice in every
        following call (``forced_experts`` of ``call``); ``None`` ends it. A ``tf.function``
        traced while it is set keeps the forced arrays as constants: use it eagerly
        (``run_eagerly=True``) or pass ``forced_experts`` to the call."""
        self.__dict__["_forced"] = None if experts is None else (
            tf.convert_to_tensor(experts), None if weights is None
            else tf.convert_to_tensor(weights, tf.float32))

    def record_routing(self, on: bool) -> Any:
        """Start (``True``) or stop (``False``) keeping each eager call's ``(T, K)`` expert ids;
        stopping returns the last call's ids (``None`` if no eager call ran)."""
        self.__dict__["_recording"] = bool(on)
        recorded = self.__dict__.pop("_recorded", None)
        return None if on else recorded


class ExpertBiasUpdate(keras.callbacks.Callback):
    """Applies :meth:`MoE.update_expert_bias` to every MoE layer with an expert bias after each
    training batch (the aux-loss-free balancing step of DeepSeek-V3)."""

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        for layer in self.model._flatten_layers(include_self=False):
            if isinstance(layer, MoE) and layer.config.router.use_expert_bias:
                layer.update_expert_bias()
