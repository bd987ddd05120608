"""``MoE``: the PyTorch Mixture-of-Experts layer built from a :class:`~moe_router.MoEConfig`.

Parameters live in the portable layout of :mod:`moe_router.weights`, and the submodule names make
``state_dict()`` keys equal the portable names (``router.weight``, ``experts.w_up``, ...).
Routing is the core's :func:`moe_router.route` in float32 (a short exact fast path is used for
plain top-k at inference); expert compute is :mod:`moe_router_backends.torch.kernels`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_router.api import route
from moe_router.config import MoEConfig
from moe_router.errors import InputError, InputTypeError
from moe_router.losses import update_expert_bias as _bias_step
from moe_router.plan import RouterState, RoutingPlan
from moe_router.registry import default_registry
from moe_router.weights import check_weights, weight_shapes

from .backend import TorchBackend
from .kernels import DISPATCH_NAMES, activate, choose, experts_forward

_STATEFUL = ("top_p", "complexity")
_TORCH = TorchBackend()  # stateless; passed to route() so no registry lookup is traced


def _resolve_plugins(config: MoEConfig) -> None:
    """Resolve the strategy (and estimator) eagerly: fails early on an unknown name, and
    ``torch.compile`` then finds the registry built instead of tracing its construction."""
    registry = default_registry()
    registry.strategy(config.router.strategy)
    if config.router.strategy == "complexity":
        registry.estimator(config.router.complexity_estimator)


def _keep_float32(module: nn.Module, name: str) -> None:
    buffer = module._buffers.get(name)
    if buffer is not None and buffer.dtype != torch.float32:
        module._buffers[name] = buffer.float()


class Router(nn.Module):
    """Router linear layer ``(D, E + N)`` with optional bias, and the aux-free bias buffer."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        r = config.router
        self.weight = nn.Parameter(torch.empty(config.d_model, r.num_choices))
        self.bias = nn.Parameter(torch.zeros(r.num_choices)) if config.router_bias else None
        if r.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(r.num_experts))
        else:
            self.expert_bias = None

    def _apply(self, fn: Any, recurse: bool = True) -> Router:
        super()._apply(fn, recurse)
        _keep_float32(self, "expert_bias")  # balancing state stays float32 under .half() etc.
        return self

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        """``(T, E + N)`` float32 logits, outside autocast."""
        device = x_TD.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device, enabled=False):
                return self._logits(x_TD)
        return self._logits(x_TD)

    def _logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        logits_TE = x_TD.float() @ self.weight.float()
        if self.bias is not None:
            logits_TE = logits_TE + self.bias.float()
        return logits_TE


class Experts(nn.Module):
    """Stacked routed experts: ``w_gate`` / ``w_up`` ``(E, D, F)``, ``w_down`` ``(E, F, D)``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        E, D, F = config.num_experts, config.d_model, config.d_ff
        self.w_gate = nn.Parameter(torch.empty(E, D, F)) if config.is_gated else None
        self.w_up = nn.Parameter(torch.empty(E, D, F))
        self.w_down = nn.Parameter(torch.empty(E, F, D))


class SharedExpert(nn.Module):
    """Always-on FFN ``(D, Fs)`` / ``(Fs, D)`` with an optional sigmoid output gate ``(D, 1)``."""

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        D, Fs = config.d_model, config.shared_width
        self.activation = config.activation
        self.w_gate = nn.Parameter(torch.empty(D, Fs)) if config.is_gated else None
        self.w_up = nn.Parameter(torch.empty(D, Fs))
        self.w_down = nn.Parameter(torch.empty(Fs, D))
        self.gate = nn.Parameter(torch.empty(D, 1)) if config.shared_expert_gate else None

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        dtype = x_TD.dtype
        gate = x_TD @ self.w_gate.to(dtype) if self.w_gate is not None else None
        out_TD = activate(self.activation, gate, x_TD @ self.w_up.to(dtype)) @ self.w_down.to(dtype)
        if self.gate is not None:
            out_TD = out_TD * torch.sigmoid(x_TD @ self.gate.to(dtype))
        return out_TD


class MoE(nn.Module):
    """Mixture-of-Experts layer: ``y = layer(x)`` for ``x`` of shape ``(..., d_model)``.

    After each forward: ``layer.aux_loss`` (scalar float32, ``plan.losses.total``, add it to the
    training loss) and ``layer.last_plan`` (the :class:`~moe_router.RoutingPlan`). With
    ``use_expert_bias`` call ``layer.update_expert_bias()`` after ``optimizer.step()``. Router
    noise and controller updates happen only in ``train()`` mode.
    """

    def __init__(self, config: MoEConfig, *, seed: int | None = None,
                 device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(config, MoEConfig):
            raise InputTypeError("config", f"expected a MoEConfig, got {type(config).__name__}")
        if config.dispatch not in DISPATCH_NAMES:
            raise InputError("config.dispatch", f"{config.dispatch!r}; torch implements "
                             f"{', '.join(DISPATCH_NAMES)}")
        self.config = config
        _resolve_plugins(config)
        self.router = Router(config)
        self.experts = Experts(config)
        self.shared = SharedExpert(config) if config.has_shared else None
        r = config.router
        self.register_buffer("router_state", torch.tensor(
            [r.top_p, 0.0, 1.0, 0.0, 0.0], dtype=torch.float32))
        self.register_buffer("expert_counts", torch.zeros(r.num_experts, dtype=torch.int64),
                             persistent=False)
        self._reset_parameters(seed)
        self.to(device=device, dtype=dtype)
        self._last: dict[str, Any] = {}

    def _apply(self, fn: Any, recurse: bool = True) -> MoE:
        super()._apply(fn, recurse)
        _keep_float32(self, "router_state")  # controller state stays float32
        return self

    # ----- weights ---------------------------------------------------------------------------
    def _reset_parameters(self, seed: int | None) -> None:
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in self.named_parameters():
                if name.endswith("bias"):
                    param.zero_()
                else:
                    param.normal_(0.0, self.config.init_std, generator=generator)

    def _tensors(self) -> dict[str, torch.Tensor]:
        named = dict(self.named_parameters())
        named.update(self.named_buffers())
        return {name: named[name] for name in weight_shapes(self.config)}

    def export_weights(self) -> dict[str, np.ndarray]:
        """The portable weights: ``moe_router.weights.weight_shapes(config)`` names, float32."""
        return {name: t.detach().float().cpu().numpy().copy()
                for name, t in self._tensors().items()}

    def load_weights(self, weights: Mapping[str, Any]) -> None:
        """Copy portable weights (validated by ``check_weights``) into this layer, in place."""
        checked = check_weights(self.config, weights)
        with torch.no_grad():
            for name, tensor in self._tensors().items():
                tensor.copy_(torch.from_numpy(checked[name]))

    @classmethod
    def from_weights(cls, config: MoEConfig, weights: Mapping[str, Any],
                     **kwargs: Any) -> MoE:
        """A layer holding ``weights`` (the portable dict of any framework's layer)."""
        layer = cls(config, **kwargs)
        layer.load_weights(weights)
        return layer

    @classmethod
    def from_hf(cls, block: nn.Module, **router_overrides: Any) -> MoE:
        """A layer equal to a Hugging Face MoE block (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V3)."""
        from .hf import from_hf_block

        return from_hf_block(block, **router_overrides)

    # ----- state -----------------------------------------------------------------------------
    def router_state_tuple(self) -> RouterState:
        """The controller state buffer as a :class:`~moe_router.RouterState`."""
        return RouterState(*self.router_state.unbind(0))

    def reset_router_state(self) -> None:
        with torch.no_grad():
            self.router_state.copy_(torch.tensor([self.config.router.top_p, 0.0, 1.0, 0.0, 0.0]))

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        """Aux-free balancing step from the counts since the last call (then reset them).

        Counts are summed over data-parallel ranks when ``torch.distributed`` is initialized.
        """
        bias = self.router.expert_bias
        if bias is None:
            raise InputError("update_expert_bias", "the router has no expert bias; set "
                             "RouterConfig(use_expert_bias=True)")
        counts = self.expert_counts
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        new = _bias_step(bias, counts, self.config.router.bias_update_rate)
        bias.copy_(new.to(bias.dtype))
        counts.zero_()

    @property
    def last_plan(self) -> RoutingPlan | None:
        """The :class:`RoutingPlan` of the last forward (built on first access when the fast
        top-k path ran)."""
        last = self._last
        if "plan" not in last and "logits" in last:
            last["plan"] = route(last["logits"], self.config.router, backend=_TORCH,
                                 **last["route_kwargs"])
        return last.get("plan")

    @property
    def aux_loss(self) -> torch.Tensor | None:
        """``last_plan.losses.total``: scalar float32 tensor with the router's gradient."""
        if "aux_loss" in self._last:
            return self._last["aux_loss"]
        plan = self.last_plan
        return None if plan is None else plan.losses.total

    # ----- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, token_ids: torch.Tensor | None = None,
                attention_probs: torch.Tensor | None = None,
                complexity_scores: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Route and mix. ``x`` ``(..., D)``; ``token_ids`` / ``complexity_scores`` / ``mask``
        have ``x``'s leading shape (flattened to ``(T,)``); ``attention_probs`` ``(T, S)`` or
        ``(H, T, S)`` for the ``attention_entropy`` estimator."""
        x_TD = self._check_input(x)
        T = x_TD.shape[0]
        if T == 0:
            self._last = {"aux_loss": x_TD.new_zeros((), dtype=torch.float32), "plan": None}
            return x.new_zeros(x.shape)
        dtype = self._compute_dtype(x)
        x_TD = x_TD.to(dtype)
        logits_TE = self.router(x_TD)
        kwargs = self._route_kwargs(x_TD, T, token_ids, attention_probs, complexity_scores, mask)
        fast = self._fast_top_k(logits_TE, kwargs)
        if fast is not None:
            ids_TK, gates_TK = fast
            self._last = {"logits": logits_TE, "route_kwargs": kwargs}
        else:
            plan = route(logits_TE, self.config.router, training=self.training, backend=_TORCH,
                         **kwargs)
            ids_TK, gates_TK = plan.expert_indices, plan.expert_weights
            self._after_route(plan)
            self._last = {"plan": plan}
        e = self.experts
        weights = {name: w if w.dtype == dtype else w.to(dtype)
                   for name, w in (("w_gate", e.w_gate), ("w_up", e.w_up), ("w_down", e.w_down))
                   if w is not None}
        impl = choose(self.config.dispatch, x_TD, weights["w_up"], ids_TK.numel(),
                      self.config.num_experts)
        y_TD = experts_forward(x_TD, ids_TK, gates_TK, weights, self.config.activation, impl)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD.reshape(*x.shape[:-1], y_TD.shape[-1])

    def _check_input(self, x: Any) -> torch.Tensor:
        D = self.config.d_model
        if not isinstance(x, torch.Tensor):
            raise InputTypeError("x", f"expected a torch.Tensor of shape (..., {D}), got "
                                 f"{type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise InputTypeError("x", f"expected a floating dtype (float32/bfloat16/float16/"
                                 f"float64), got {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != D:
            raise InputError("x", f"expected shape (..., d_model={D}), got {tuple(x.shape)}")
        return x.reshape(-1, D)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
        return x.dtype

    def _route_kwargs(self, x_TD: torch.Tensor, T: int, token_ids: Any, attention_probs: Any,
                      complexity_scores: Any, mask: Any) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        for name, value in (("token_ids_T", token_ids), ("complexity_scores_T",
                                                         complexity_scores), ("mask_T", mask)):
            if value is not None:
                if not isinstance(value, torch.Tensor) or value.numel() != T:
                    raise InputError(name.removesuffix("_T"),
                                     f"expected a tensor with one entry per token ({T}), got "
                                     f"{getattr(value, 'shape', type(value).__name__)}")
                kwargs[name] = value.reshape(T)
        if attention_probs is not None:
            kwargs["attention_probs"] = attention_probs
        r = self.config.router
        if r.strategy == "complexity" and r.complexity_estimator == "hidden_norm":
            kwargs["hidden_TD"] = x_TD
        if self.router.expert_bias is not None:
            kwargs["expert_bias_E"] = self.router.expert_bias
        if r.strategy in _STATEFUL:
            kwargs["state"] = self.router_state_tuple()
        return kwargs

    def _after_route(self, plan: RoutingPlan) -> None:
        """Training-time state updates: controller state and the counts for the bias step."""
        if not self.training:
            return
        with torch.no_grad():
            if plan.state is not None and self.config.router.strategy in _STATEFUL:
                self.router_state.copy_(torch.stack([s.detach().float() for s in plan.state]))
            if self.router.expert_bias is not None:
                self.expert_counts.add_(plan.expert_counts.detach())

    def _fast_top_k(self, logits_TE: torch.Tensor,
                    kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Plain top-k at inference in a few ops (same decisions as ``route``), else ``None``."""
        r = self.config.router
        if (self.training or r.strategy != "top_k" or r.num_null_experts or r.balanced_debug
                or r.capacity_factor is not None or (r.num_groups or 1) > 1
                or r.max_slots != r.k or "mask_T" in kwargs):
            return None
        if (r.nan_policy == "raise" and not torch.compiler.is_compiling()
                and not math.isfinite(float(logits_TE.detach().sum()))  # NaN/Inf propagate
                and not bool(torch.isfinite(logits_TE).all())):  # the sum merely overflowed?
            raise InputError("x", "router logits contain NaN or Inf (nan_policy='raise'; set "
                             "RouterConfig(nan_policy='ignore') to route them anyway)")
        if r.score_func == "sigmoid":
            probs_TE = torch.sigmoid(logits_TE)
        else:
            probs_TE = torch.softmax(logits_TE, dim=-1)
        scores_TE = probs_TE
        if self.router.expert_bias is not None:
            scores_TE = probs_TE + self.router.expert_bias.float()[None, :]
        ids_TK = torch.sort(-scores_TE, dim=-1, stable=True).indices[:, : r.k]
        gates_TK = torch.gather(probs_TE, 1, ids_TK)
        if r.normalize_weights is not False:
            total_T1 = gates_TK.sum(dim=-1, keepdim=True)
            if r.score_func == "sigmoid":  # softmax: the top-1 probability is >= 1/E > 0
                total_T1 = torch.where(total_T1 > 0, total_T1, 1.0)
            gates_TK = gates_TK / total_T1
        if r.route_scale != 1.0:
            gates_TK = gates_TK * float(r.route_scale)
        return ids_TK, gates_TK

    def extra_repr(self) -> str:
        c, r = self.config, self.config.router
        return (f"d_model={c.d_model}, d_ff={c.d_ff}, experts={r.num_experts}, "
                f"strategy={r.strategy!r}, activation={c.activation!r}, dispatch={c.dispatch!r}")

