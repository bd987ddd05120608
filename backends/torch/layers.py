"""``MoE``: the PyTorch Mixture-of-Experts layer built from a :class:`~moe_router.MoEConfig`.

A thin adapter around the core's :func:`~moe_router.layer.step.layer_step`: parameters (the
portable names of :func:`~moe_router.weights.param_shapes`) are ``nn.Parameter`` s and the flat
layer state (:func:`~moe_router.layer.state.state_fields`) lives in buffers, both registered
under nested submodules so that ``state_dict()`` keys equal the portable names
(``router.weight``, ``experts.w_up``, ``router.state``, ``router.expert_bias``; observer
counters ``observers.<name>.<field>`` are non-persistent buffers). Casting the layer
(``.to(dtype)``, ``.half()``) moves the state without touching its dtype or values.

``MoE(config, seed=...)`` initializes the parameters at random; :meth:`MoE.from_tensors` builds a
layer around given tensors instead (no random init, no draw from a generator, any device
including ``meta``): what the Hugging Face drop-in (:mod:`.hf`) uses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_router.config import MoEConfig
from moe_router.errors import InputError, InputTypeError
from moe_router.layer.experts import check_dispatch_framework, warm_registry
from moe_router.layer.state import (
    PERSISTENT,
    ROUTER_STATE,
    LayerState,
    initial_state_arrays,
    observer_names,
    state_change,
    state_fields,
    state_from_arrays,
    state_to_arrays,
)
from moe_router.layer.step import BIAS_STEP_UPDATES, StepOutput, bias_step, layer_step
from moe_router.plan import RouterState, RoutingPlan
from moe_router.weights import check_weights, param_shapes, weight_shapes

from .backend import TorchBackend
from .stages import TorchStages

_TORCH = TorchBackend()
_DTYPES = {"float32": torch.float32, "int32": torch.int32}


class Router(nn.Module):
    """Holds ``weight`` ``(D, E + N)``, ``bias``, ``state`` and ``expert_bias``; calling it gives
    the float32 logits, so forward hooks on ``layer.router`` see them (transformers'
    ``output_router_logits`` capture)."""

    def forward(self, x_TD: torch.Tensor, config: MoEConfig) -> torch.Tensor:
        params = {"router.weight": self.weight}
        if config.router_bias:
            params["router.bias"] = self.bias
        return _TORCH.layer_stages().router_logits(x_TD, params, config)


class _LayerStages(TorchStages):
    """The torch stages with the router logits computed by calling the router module."""

    def __init__(self, router: Router) -> None:
        super().__init__(_TORCH)
        self.router = router

    def router_logits(self, x_TD: torch.Tensor, params: Mapping[str, torch.Tensor],
                      config: MoEConfig) -> torch.Tensor:
        return self.router(x_TD, config)


def _get(module: nn.Module, name: str) -> Any:
    """The parameter or buffer of flat name ``name``, read at call time (``functional_call``
    swaps the entries of ``_parameters`` / ``_buffers``)."""
    *path, leaf = name.split(".")
    for part in path:
        module = module._modules[part]
    tensor = module._parameters.get(leaf)
    return module._buffers[leaf] if tensor is None else tensor


def _rename_old_keys(module: nn.Module, state_dict: dict[str, Any], prefix: str,
                     *args: Any) -> None:
    """Checkpoints from before the flat state names kept the controller in ``router_state``."""
    if prefix + "router_state" in state_dict and prefix + ROUTER_STATE not in state_dict:
        state_dict[prefix + ROUTER_STATE] = state_dict.pop(prefix + "router_state")


class MoE(nn.Module):
    """Mixture-of-Experts layer: ``y = layer(x)`` for ``x`` of shape ``(..., d_model)``.

    ``layer(x, return_plan=True)`` gives ``(y, plan)``. After each forward: ``layer.aux_loss``
    (scalar float32, ``plan.losses.total``, add it to the training loss) and
    ``layer.last_plan``. With ``use_expert_bias`` call ``layer.update_expert_bias()`` after
    ``optimizer.step()``. Router noise and state updates happen in ``train()`` mode (state
    updates also while ``layer.calibrating``).
    """

    #: the router module's class (a subclass may compute the logits its own way)
    _router_class: type[Router] = Router
    #: the process group whose ranks' statistics are pooled (expert-load counts of the aux-free
    #: bias, ``export_state(across_ranks=True)``); ``None``: the default (world) group
    stats_group: Any = None
    #: what pooled statistics cover, in words (reports)
    stats_scope: str = "the default process group (every rank) when torch.distributed runs"
    #: the debugger reads the counters summed over :attr:`stats_group` (expert parallelism)
    pool_stats: bool = False

    def __init__(self, config: MoEConfig, *, seed: int | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup(config, {name: torch.empty(shape)
                             for name, shape in param_shapes(config).items()}, None)
        self._reset_parameters(seed)
        self.to(device=device, dtype=dtype)

    def _setup(self, config: MoEConfig, params: Mapping[str, torch.Tensor],
               device: torch.device | None) -> None:
        """Register ``params`` (used as given) and the initial state (on ``device``)."""
        self._names: tuple[tuple[str, ...], tuple[str, ...]] | None = None
        self.config = config
        self.calibrating = False
        self.router = self._router_class()
        for name, tensor in params.items():
            self._owner(name).register_parameter(name.rpartition(".")[2], nn.Parameter(tensor))
        for name, value in initial_state_arrays(config).items():
            self._owner(name).register_buffer(
                name.rpartition(".")[2], torch.from_numpy(value).to(device),
                persistent=name in PERSISTENT)
        self.register_load_state_dict_pre_hook(_rename_old_keys)
        self._last: list[Any] = [None, None]  # plan, replan of the last forward

    @classmethod
    def from_tensors(cls, config: MoEConfig, tensors: Mapping[str, torch.Tensor]) -> MoE:
        """A layer whose parameters *are* ``tensors`` (no random initialization, no draw from
        any random generator, no copy): the portable names and shapes of
        :func:`~moe_router.weights.param_shapes`, all on one device (the meta device too), each
        keeping its dtype and memory layout. Persistent state (``router.state``,
        ``router.expert_bias``) is taken from ``tensors`` when given (cast to its float32
        dtype), else starts fresh; observer state starts fresh. Pass copies of tensors that
        stay in use elsewhere.

        Raises:
            InputError: a missing or unknown name, a wrong shape, or several devices.
        """
        shapes, state = param_shapes(config), state_fields(config)
        unknown = sorted(set(tensors) - set(shapes) - {n for n in state if n in PERSISTENT})
        missing = sorted(set(shapes) - set(tensors))
        if unknown or missing:
            raise InputError("tensors", f"missing {missing}, unknown {unknown}; expected the "
                             f"parameters {sorted(shapes)} (and optionally {list(PERSISTENT)})")
        for name, tensor in tensors.items():
            expected = shapes[name] if name in shapes else tuple(state[name].shape)
            if tuple(tensor.shape) != expected:
                raise InputError("tensors", f"{name} has shape {tuple(tensor.shape)}, "
                                 f"expected {expected}")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise InputError("tensors", f"expected one device, got {sorted(map(str, devices))}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._setup(config, {name: tensors[name].detach() for name in shapes}, devices.pop())
        for name in state:
            if name in tensors:
                owner, leaf = layer._owner(name), name.rpartition(".")[2]
                owner._buffers[leaf] = tensors[name].detach().to(owner._buffers[leaf].dtype)
        return layer

    @property
    def config(self) -> MoEConfig:
        """The layer's :class:`MoEConfig`; a new one may change the routing, not the weight or
        state names (``set_strategy`` assigns it)."""
        return self._config

    @config.setter
    def config(self, config: MoEConfig) -> None:
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig, got {type(config).__name__}")
        names = (tuple(param_shapes(config)), tuple(state_fields(config)))
        check_dispatch_framework(_TORCH.framework, config)
        changes = state_change(self._config, config) if self._names is not None else None
        warm_registry(config, _TORCH.framework)
        if changes is not None:
            self._change_observers(*changes)
        self._config, self._names = config, names

    def _change_observers(self, added: Mapping[str, Any], removed: tuple[str, ...]) -> None:
        """Drop the ``removed`` observer buffers and register the ``added`` ones (fresh values, on
        the router weight's device): the debugger turning its counters on and off."""
        device = self.router.weight.device
        for name in removed:
            owner = self._owner(name)
            del owner._buffers[name.rpartition(".")[2]]
            parent = self._owner(name.rpartition(".")[0])
            group = name.split(".")[-2]
            if not owner._buffers and not owner._modules:
                del parent._modules[group]
        observers = self._modules.get("observers")
        if observers is not None and not observers._modules and not observers._buffers:
            del self._modules["observers"]
        for name, field in added.items():
            self._owner(name).register_buffer(
                name.rpartition(".")[2], torch.from_numpy(field.initial()).to(device),
                persistent=False)

    def reset_observers(self, observer: str | None = None) -> None:
        """Zero the observers' state (one ``observer`` by name, or all) on the host."""
        fields = state_fields(self.config)
        with torch.no_grad():
            for name in observer_names(self.config, observer):
                _get(self, name).copy_(torch.from_numpy(fields[name].initial()))

    def _owner(self, name: str) -> nn.Module:
        """The submodule holding flat name ``name`` (created on the way: plain containers)."""
        module: nn.Module = self
        for part in name.split(".")[:-1]:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        return module

    def _kept_dtypes(self) -> dict[str, torch.dtype]:
        """Flat names whose dtype a cast of the module (``.to(dtype)``, ``.half()``, ...) leaves
        as is (they still follow device moves): the state (float32 / int32)."""
        return {name: _DTYPES[field.dtype] for name, field in state_fields(self.config).items()}

    def _apply(self, fn: Any, recurse: bool = True) -> MoE:
        # the kept tensors (and their gradients) move without any cast: no round trip through
        # a lower precision
        kept: dict[int, tuple[torch.Tensor, torch.dtype]] = {}
        for name, dtype in self._kept_dtypes().items():
            tensor = _get(self, name)
            for t in (tensor, tensor.grad):
                if t is not None and t.dtype == dtype:
                    kept[id(t)] = (t, dtype)

        def keep(t: torch.Tensor) -> torch.Tensor:
            entry = kept.get(id(t))
            if entry is not None and entry[0] is t:
                target = fn(t.new_empty(0))  # where and in which dtype fn would put it
                if target.dtype != entry[1]:
                    return t.to(device=target.device)
            return fn(t)

        super()._apply(keep if kept else fn, recurse)
        for name, field in state_fields(self.config).items():  # state keeps its dtype
            owner, leaf = self._owner(name), name.rpartition(".")[2]
            if owner._buffers[leaf].dtype != _DTYPES[field.dtype]:
                owner._buffers[leaf] = owner._buffers[leaf].to(_DTYPES[field.dtype])
        return self

    def _reset_parameters(self, seed: int | None) -> None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, self.config.init_std, generator=generator)

    # ----- weights ---------------------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the portable export (parameters and persistent state), by name."""
        return {name: _get(self, name) for name in weight_shapes(self.config)}

    def export_weights(self) -> dict[str, np.ndarray]:
        """The portable weights: ``weight_shapes(config)`` names (parameters, ``router.state``,
        ``router.expert_bias``) as float32 NumPy arrays."""
        return {name: t.detach().float().cpu().numpy().copy()
                for name, t in self._tensors().items()}

    def import_weights(self, weights: Mapping[str, Any]) -> None:
        """Copy portable weights (validated by ``check_weights``) into this layer, in place."""
        checked = check_weights(self.config, weights)
        with torch.no_grad():
            for name, tensor in self._tensors().items():
                tensor.copy_(torch.from_numpy(checked[name]))

    @classmethod
    def from_weights(cls, config: MoEConfig, weights: Mapping[str, Any], **kwargs: Any) -> MoE:
        """A layer holding ``weights`` (the portable dict of any framework's layer)."""
        layer = cls(config, **kwargs)
        layer.import_weights(weights)
        return layer

    @classmethod
    def from_hf(cls, block: nn.Module, **router_overrides: Any) -> MoE:
        """A layer equal to a Hugging Face MoE block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3);
        ``router_dtype=`` and routing overrides as in :func:`~.hf.from_hf_block`."""
        from .hf import from_hf_block

        return from_hf_block(block, **router_overrides)

    # ----- state -----------------------------------------------------------------------------
    def layer_state(self) -> LayerState:
        """The current :class:`~moe_router.layer.state.LayerState` (views of the buffers)."""
        return state_from_arrays(_TORCH, {name: _get(self, name) for name in self._names[1]},
                                 self.config)

    def export_state(self, *, across_ranks: bool = False) -> dict[str, np.ndarray]:
        """Every flat state array (``router.state``, ``router.expert_bias``, observers).

        ``across_ranks``: the observers' counters summed over :attr:`stats_group` (a collective:
        every rank of the group calls it) when ``torch.distributed`` is initialized; ring
        buffers (the routing trace) and the router state stay this rank's."""
        fields = state_fields(self.config)
        reduce = across_ranks and torch.distributed.is_available() and \
            torch.distributed.is_initialized()
        out = {}
        for name in self._names[1]:
            tensor = _get(self, name).detach()
            if reduce and name.startswith("observers.") and fields[name].kind == "counter":
                tensor = tensor.clone()
                torch.distributed.all_reduce(tensor, group=self.stats_group)
            out[name] = tensor.cpu().numpy().copy()
        return out

    def _write_state(self, state: LayerState, names: tuple[str, ...]) -> None:
        arrays = state_to_arrays(_TORCH, state, names)
        with torch.no_grad():
            for name in names:
                _get(self, name).copy_(arrays[name])

    @property
    def router_state(self) -> RouterState:
        """The controller state (``router.state``): a :class:`~moe_router.RouterState` of float32
        0-d tensors (a detached copy on the CPU: host reading, safe to keep)."""
        return RouterState(*_get(self, ROUTER_STATE).detach().cpu().clone().unbind(0))

    def reset_router_state(self) -> None:
        """A fresh controller state (top-p controller, complexity calibration)."""
        fresh = initial_state_arrays(self.config)[ROUTER_STATE]
        with torch.no_grad():
            _get(self, ROUTER_STATE).copy_(torch.from_numpy(fresh))

    @torch.no_grad()
    def update_expert_bias(self, expert_counts: Any = None) -> torch.Tensor:
        """Aux-free balancing step (:func:`~moe_router.layer.step.bias_step`) from the
        ``observers.expert_load.counts`` accumulated since the last call (summed over the ranks
        of :attr:`stats_group` when ``torch.distributed`` is initialized), or from
        ``expert_counts`` (``(E,)``, used as given); the counts then restart from zero.
        Returns the new ``(E,)`` float32 bias.

        Raises:
            InputError: the router has no expert bias.
        """
        state = self.layer_state()
        counts = expert_counts
        if counts is not None:
            counts = torch.as_tensor(counts, device=_get(self, ROUTER_STATE).device)
        elif state.expert_bias is not None:
            counts = state.observers["expert_load"]["counts"]
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                counts = counts.clone()
                torch.distributed.all_reduce(counts, group=self.stats_group)
        new = bias_step(_TORCH, state, self.config, counts)
        self._write_state(new, BIAS_STEP_UPDATES)
        return new.expert_bias.clone()

    @property
    def last_plan(self) -> RoutingPlan | None:
        """The :class:`RoutingPlan` of the last forward (built on first access when the fast
        top-k path ran)."""
        plan, replan = self._last
        if plan is None and replan is not None:
            plan = replan()
            self._last[:] = [plan, None]
        return plan

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """``last_plan.losses.total``: scalar float32 tensor with the router's gradient."""
        plan = self.last_plan
        return None if plan is None else plan.losses.total

    # ----- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, return_plan: bool = False,
                token_ids: torch.Tensor | None = None,
                attention_probs: torch.Tensor | None = None,
                complexity_scores: torch.Tensor | None = None,
                mask: torch.Tensor | None = None,
                forced_experts: torch.Tensor | None = None,
                forced_weights: torch.Tensor | None = None) -> Any:
        """Route and mix. ``x`` ``(..., D)``; ``token_ids`` / ``complexity_scores`` / ``mask``
        have ``x``'s leading shape; ``attention_probs`` ``(T, S)`` or ``(H, T, S)`` for the
        ``attention_entropy`` estimator. Returns ``y`` (``x``'s shape), or ``(y, plan)`` with
        ``return_plan=True``. Experts run in the autocast dtype when autocast is on.

        ``forced_experts`` ``(..., k)`` (and optionally ``forced_weights``) replace the router's
        choice for this call (router replay); without them, the pair set with
        :meth:`force_routing` is used when set."""
        if forced_experts is None and self.__dict__.get("_forced") is not None:
            forced_experts, forced_weights = self.__dict__["_forced"]
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            device = x.device.type
            if torch.is_autocast_enabled(device):
                x = x.to(torch.get_autocast_dtype(device))
        params = {name: _get(self, name) for name in self._names[0]}
        out: StepOutput = layer_step(
            _TORCH, params, self.layer_state(), x, self.config,
            training=self.training and not self.calibrating,
            update_state=self.training or self.calibrating, token_ids=token_ids,
            attention_probs=attention_probs, complexity_scores=complexity_scores, mask=mask,
            need_plan=return_plan, stages=self._stages(), forced_experts=forced_experts,
            forced_weights=forced_weights)
        if out.updated:
            self._write_state(out.state, out.updated)
        self._last[:] = [out.plan, out.replan]
        if self.__dict__.get("_recording"):
            self.__dict__["_recorded"] = self.last_plan.expert_indices.detach()
        return (out.y, self.last_plan) if return_plan else out.y

    def force_routing(self, experts: torch.Tensor | None,
                      weights: torch.Tensor | None = None) -> None:
        """Use ``experts`` ``(..., k)`` (and ``weights``) instead of the router's choice in
        every following call (``forced_experts`` of :meth:`forward`); ``None`` ends it."""
        self.__dict__["_forced"] = None if experts is None else (experts, weights)

    @property
    def forced_routing(self) -> tuple[Any, Any] | None:
        """The ``(experts, weights)`` set by :meth:`force_routing`, or ``None``."""
        return self.__dict__.get("_forced")

    def record_routing(self, on: bool) -> torch.Tensor | None:
        """Start (``True``) or stop (``False``) keeping each call's ``(T, K)`` expert ids; stopping
        returns the last call's ids (``None`` if no call ran)."""
        self.__dict__["_recording"] = bool(on)
        recorded = self.__dict__.pop("_recorded", None)
        return None if on else recorded

    def _stages(self) -> _LayerStages:
        """The layer's stages (made once; rebuilt if ``router`` was replaced)."""
        stages = self.__dict__.get("_stage_cache")
        if stages is None or stages.router is not self.router:
            stages = self.__dict__["_stage_cache"] = _LayerStages(self.router)
        return stages

    def derive_stages(self, prefix: str, mixin: type | None = None,
                      members: Mapping[str, Any] | None = None, *, argument: str = "layer",
                      **attributes: Any) -> _LayerStages:
        """A stages object of a subclass of the current stages' class, named ``prefix`` + its
        name: ``mixin`` in front and ``members`` added (e.g. the offloaded or the
        expert-parallel ``experts`` stage), holding the current stages' fields plus
        ``attributes``. Not installed: pass it to :meth:`set_stages`.

        Raises:
            InputError: naming ``argument``, when ``mixin`` and the current stages both set
                ``replaces_expert_weights`` (offloaded and expert-parallel experts each take
                the expert weights from elsewhere, so they do not combine; either twice
                neither).
        """
        stages = self._stages()
        base = type(stages)
        if getattr(mixin, "replaces_expert_weights", False) and \
                getattr(stages, "replaces_expert_weights", False):
            raise InputError(argument, f"this layer's experts already come from "
                             f"{base.__name__}, which {prefix} experts cannot be combined "
                             f"with; restore the layer first (set_stages(None))")
        cls = type(f"{prefix}{base.__name__}", (base,) if mixin is None else (mixin, base),
                   dict(members or {}))
        new = cls.__new__(cls)
        new.__dict__.update(stages.__dict__)
        new.__dict__.update(attributes)
        return new

    def set_stages(self, stages: _LayerStages | None) -> None:
        """Run the layer step with ``stages`` (a subclass of the layer's own stages, e.g. the
        offloaded expert stage of :mod:`moe_router.offload`); ``None`` restores the default.

        Raises:
            InputTypeError: ``stages`` is not a stages object of this layer's router.
        """
        if stages is None:
            self.__dict__.pop("_stage_cache", None)
            return
        if not isinstance(stages, _LayerStages) or getattr(stages, "router", None) is not \
                self.router:
            raise InputTypeError("stages", f"expected a {_LayerStages.__name__} (subclass) "
                                 f"built for this layer's router, got {type(stages).__name__}")
        self.__dict__["_stage_cache"] = stages

    def extra_repr(self) -> str:
        c, r = self.config, self.config.router
        return (f"d_model={c.d_model}, d_ff={c.d_ff}, experts={r.num_experts}, "
                f"strategy={r.strategy!r}, activation={c.activation!r}, dispatch={c.dispatch!r}")
