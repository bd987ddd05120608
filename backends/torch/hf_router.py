"""Our router on any transformers MoE family of the experts seam, keeping the gate's parameters.

transformers' MoE blocks call ``self.gate(hidden)`` (``self.router`` in some families) for
``(router_logits, top_k_weights, top_k_index)`` and then ``self.experts(hidden, top_k_index,
top_k_weights)``. :func:`replace_routers` installs a forward hook on each block's gate that keeps
the gate's own logits (computed in the gate's own dtype, so the drop-in is exact) and replaces its
selection by :func:`moe_router.route` of those logits. No parameter or buffer is renamed, added to
the checkpoint or re-laid out: the model saves, loads and shards as before.

The family's conventions (softmax or sigmoid scores, ``norm_topk_prob``,
``e_score_correction_bias``, ``n_group`` / ``topk_group``, ``routed_scaling_factor``) are read
from the gate and the config, then **verified**: our static top-k of the gate's logits must pick
the same experts with the same weights as the gate on a probe batch. A gate whose convention
is not understood is refused with :class:`~moe_router.errors.InputError`, never guessed.
A strategy that can leave slots unused (``-1``: dynamic k) needs an experts implementation that
handles them; :func:`replace_routers` switches the model to ours (``"moe_router"``) then.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from moe_router.api import route
from moe_router.complexity import init_router_state
from moe_router.config import MoEConfig, RouterConfig
from moe_router.errors import InputError
from moe_router.layer.observers import StepEvent, active_observers
from moe_router.layer.state import (
    OBSERVER_PREFIX,
    observer_names,
    state_fields,
)
from moe_router.plan import RouterState

from .backend import TorchBackend

_TORCH = TorchBackend()

#: names of a block's gate attribute, in the order they are tried
GATE_NAMES = ("gate", "router")
#: attribute of a wrapped gate holding its :class:`GateRouting`
ATTR = "_moe_router"
_PROBE_TOKENS = 64


class GateRouting:
    """A wrapped gate's routing: the family's static top-k config (``base``), the current one
    (``router``), the hook handle, and the surface :class:`moe_router.debug.MoEDebugger` reads
    (``config`` as a :class:`MoEConfig`, observer state, forced and recorded routing), so the
    debugger counts wrapped gates exactly like our own layers."""

    def __init__(self, gate: nn.Module, base: RouterConfig, router: RouterConfig, handle: Any,
                 d_model: int, d_ff: int) -> None:
        self.gate, self.base, self.router, self.handle = gate, base, router, handle
        self._moe = MoEConfig(d_model=d_model, d_ff=d_ff, router=router)
        self.state: dict[str, torch.Tensor] = {}
        self.forced: tuple[Any, Any] | None = None
        self.recording, self.recorded = False, None

    @property
    def config(self) -> MoEConfig:
        """The routing as a :class:`MoEConfig` (``d_ff`` is the experts' width)."""
        return self._moe

    @config.setter
    def config(self, config: MoEConfig) -> None:
        self.router = config.router
        fields = {n: f for n, f in state_fields(config).items() if n.startswith(OBSERVER_PREFIX)}
        device = _device(self.gate)
        self.state = {n: self.state[n] if n in self.state and tuple(self.state[n].shape) ==
                      f.shape else torch.from_numpy(f.initial()).to(device)
                      for n, f in fields.items()}
        self._moe = config

    def export_state(self) -> dict[str, np.ndarray]:
        return {n: t.detach().cpu().numpy().copy() for n, t in self.state.items()}

    def reset_observers(self, observer: str | None = None) -> None:
        fields = state_fields(self._moe)
        for name in observer_names(self._moe, observer):
            self.state[name] = torch.from_numpy(fields[name].initial()).to(_device(self.gate))

    def export_weights(self) -> dict[str, np.ndarray]:
        return {n: t.detach().float().cpu().numpy() for n, t in self.gate.state_dict().items()}

    def force_routing(self, experts: Any, weights: Any = None) -> None:
        self.forced = None if experts is None else (experts, weights)

    def record_routing(self, on: bool) -> Any:
        self.recording = bool(on)
        recorded, self.recorded = self.recorded, None
        return None if on else recorded

    def observe(self, plan: Any) -> None:
        """Run the active observers on one call's plan (the debugger's counters)."""
        if not self.state:
            return
        values: dict[str, dict[str, torch.Tensor]] = {}
        for name, tensor in self.state.items():
            observer, _, field = name[len(OBSERVER_PREFIX):].rpartition(".")
            values.setdefault(observer, {})[field] = tensor
        event = StepEvent(plan=plan, training=self.gate.training,
                          update_state=self.gate.training, mask_T=None, config=self._moe)
        for observer in active_observers(self._moe):
            if not (observer.observes_inference or event.update_state):
                continue
            new = observer.update(_TORCH, values[observer.name], event)
            for field, value in new.items():
                self.state[f"{OBSERVER_PREFIX}{observer.name}.{field}"] = value.detach()


def seam_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module, nn.Module]]:
    """``(name, block, gate)`` of every MoE block whose ``experts`` use transformers' experts
    seam (``use_experts_implementation``) and whose gate is ``block.gate`` / ``block.router``."""
    for name, block in model.named_modules():
        experts = block._modules.get("experts") if hasattr(block, "_modules") else None
        if experts is None or not hasattr(experts, "has_gate"):
            continue
        gate = next((block._modules[g] for g in GATE_NAMES if block._modules.get(g) is not None),
                    None)
        if gate is not None:
            yield name, block, gate


def _device(gate: nn.Module) -> torch.device:
    return next(itertools.chain(gate.parameters(), gate.buffers())).device


def _gate_output(gate: nn.Module, hidden_TD: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = gate(hidden_TD)
    if not (isinstance(out, tuple) and len(out) == 3 and out[2].dtype in (torch.int64,
                                                                           torch.int32)):
        raise InputError("model", f"{type(gate).__name__} returns "
                         f"{type(out).__name__}, not (router_logits, top_k_weights, "
                         "top_k_index): its routing convention is not understood")
    return out


def _attr(gate: nn.Module, config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        for owner in (gate, config):
            value = getattr(owner, name, None)
            if value is not None:
                return value
    return default


def _candidates(gate: nn.Module, config: Any, E: int, k: int) -> Iterator[RouterConfig]:
    """The conventions to try, the ones the gate and config name first."""
    bias = getattr(gate, "e_score_correction_bias", None) is not None
    groups = _attr(gate, config, "num_group", "n_group")
    topk_group = _attr(gate, config, "topk_group")
    grouped = groups is not None and int(groups) > 1 and topk_group is not None
    norm = _attr(gate, config, "norm_topk_prob")
    scale = float(_attr(gate, config, "routed_scaling_factor", default=1.0) or 1.0)
    scoring = _attr(gate, config, "scoring_func", "score_function")
    scores = ["sigmoid", "softmax"] if bias or scoring == "sigmoid" else ["softmax", "sigmoid"]
    norms = [bool(norm), not bool(norm)] if norm is not None else [True, False]
    for score, normalize, route_scale in itertools.product(scores, norms, [scale, 1.0]):
        yield RouterConfig(num_experts=E, k=k, score_func=score, normalize_weights=normalize,
                           use_expert_bias=bias, route_scale=route_scale,
                           num_groups=int(groups) if grouped else None,
                           topk_groups=int(topk_group) if grouped else None)


def _selection(ids_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts and their weights in expert order (order-free comparison)."""
    order = torch.argsort(ids_TK, dim=-1)
    return ids_TK.gather(-1, order), w_TK.float().gather(-1, order)


def _route(gate: nn.Module, logits_TE: torch.Tensor, config: RouterConfig,
           training: bool = False, state: RouterState | None = None) -> Any:
    bias = getattr(gate, "e_score_correction_bias", None) if config.use_expert_bias else None
    return route(logits_TE, config, expert_bias_E=bias, training=training, state=state,
                 validate=False)


@torch.no_grad()
def gate_config(gate: nn.Module, config: Any) -> RouterConfig:
    """The family's static top-k routing as a :class:`RouterConfig`, verified on a probe batch:
    our top-k of the gate's logits equals the gate's own choice (same experts, weights within
    1e-5).

    Raises:
        InputError: no convention reproduces the gate (named in the message).
    """
    param = next(itertools.chain(gate.parameters(), gate.buffers()))
    D = int(getattr(gate, "hidden_dim", 0) or getattr(config, "hidden_size"))
    generator = torch.Generator().manual_seed(0)  # a local generator: no global RNG draw
    probe = torch.randn(_PROBE_TOKENS, D, generator=generator).to(param.device, param.dtype)
    was_training = gate.training
    gate.eval()
    try:
        logits_TE, weights_TK, ids_TK = _gate_output(gate, probe)
    finally:
        gate.train(was_training)
    want_ids, want_w = _selection(ids_TK, weights_TK)
    E, k = int(logits_TE.shape[-1]), int(ids_TK.shape[-1])
    for candidate in _candidates(gate, config, E, k):
        try:
            plan = _route(gate, logits_TE.float(), candidate)
        except Exception:  # noqa: BLE001 - an impossible candidate (e.g. groups) is no match
            continue
        got_ids, got_w = _selection(plan.expert_indices.to(ids_TK.dtype), plan.expert_weights)
        if torch.equal(got_ids, want_ids) and torch.allclose(got_w, want_w, atol=1e-5,
                                                             rtol=1e-4):
            return candidate
    raise InputError("model", f"the routing convention of {type(gate).__name__} is not "
                     "understood (no softmax/sigmoid, normalized or not, scaled or not, "
                     "biased/grouped top-k reproduces its choice); it is refused rather than "
                     "guessed")


def _hook(gate: nn.Module, args: Any, output: Any) -> Any:
    routing: GateRouting = gate.__dict__[ATTR]
    logits_TE, weights_TK, ids_TK = output
    config = routing.router
    stateful = config.strategy_spec.stateful
    state = None
    if stateful:
        state = RouterState(*gate._buffers["moe_router_state"].unbind(0))
    forced = routing.forced or (None, None)
    bias = getattr(gate, "e_score_correction_bias", None) if config.use_expert_bias else None
    plan = route(logits_TE.float(), config, expert_bias_E=bias, training=gate.training,
                 state=state, validate=False, forced_experts_TK=_rows(forced[0]),
                 forced_weights_TK=_rows(forced[1]))
    if stateful and gate.training and plan.state is not None:
        with torch.no_grad():
            gate._buffers["moe_router_state"].copy_(torch.stack([v.float() for v in plan.state]))
    routing.observe(plan)
    if routing.recording:
        routing.recorded = plan.expert_indices.detach()
    return logits_TE, plan.expert_weights.to(weights_TK.dtype), plan.expert_indices.to(
        ids_TK.dtype)


def _rows(value: Any) -> Any:
    """A forced ``(..., k)`` array as ``(T, k)``."""
    return None if value is None else torch.as_tensor(value).reshape(-1, value.shape[-1])


def replace_routers(model: nn.Module, **router_changes: Any) -> dict[str, Any]:
    """Route every seam MoE block of ``model`` with our router (``route()`` of the gate's own
    logits), with the family's static top-k convention changed by ``router_changes`` (e.g.
    ``strategy="top_p", top_p=0.4, max_experts=4``; none: exact static top-k parity).

    Returns ``{"blocks": n, "experts_implementation": name or None, "dynamic": bool}``: when the
    routing can leave slots unused, the model is switched to the ``"moe_router"`` experts
    implementation (which skips them) and its name is returned.

    Raises:
        InputError: ``model`` has no seam MoE block, or a gate's convention is not understood
            (nothing is changed then).
        UnknownFieldError / ConfigError: bad ``router_changes``.
    """
    hf_config = getattr(model, "config", None)
    blocks = list(seam_blocks(model))
    if not blocks:
        raise InputError("model", f"{type(model).__name__} has no transformers MoE block with "
                         "a gate and an experts module of the experts seam")
    plans = []
    for _name, _block, gate in blocks:
        routing = gate.__dict__.get(ATTR)
        base = routing.base if routing is not None else gate_config(gate, hf_config)
        changes = dict(router_changes)
        if "strategy" in changes and changes["strategy"] != "top_k":
            changes.setdefault("normalize_weights", None)
        plans.append((gate, base, base.replace(**changes)))
    dynamic = any(new.is_dynamic or new.max_slots != base.max_slots for _, base, new in plans)
    for (_name, block, gate), (_, base, new) in zip(blocks, plans, strict=True):
        routing = gate.__dict__.get(ATTR)
        if routing is None:
            D, F = _widths(block, hf_config)
            routing = gate.__dict__[ATTR] = GateRouting(gate, base, new,
                                                        gate.register_forward_hook(_hook), D, F)
        routing.config = routing.config.replace(router=new)
        if new.strategy_spec.stateful:
            fresh = init_router_state(new)
            gate.register_buffer("moe_router_state", torch.tensor(
                [float(v) for v in fresh], device=_device(gate)), persistent=False)
    implementation = None
    if dynamic:
        from .hf_experts import use_moe_router_experts

        use_moe_router_experts(model)
        implementation = "moe_router"
    return {"blocks": len(blocks), "experts_implementation": implementation,
            "dynamic": dynamic}


def restore_routers(model: nn.Module) -> int:
    """Remove our router from every wrapped gate (the family's own routing again)."""
    count = 0
    for _name, _block, gate in seam_blocks(model):
        routing = gate.__dict__.pop(ATTR, None)
        if routing is not None:
            routing.handle.remove()
            gate._buffers.pop("moe_router_state", None)
            count += 1
    return count


def wrapped_gates(model: nn.Module) -> list[tuple[str, nn.Module, GateRouting]]:
    """``(block name, gate, routing)`` of every gate routed by us."""
    return [(name, gate, gate.__dict__[ATTR]) for name, _b, gate in seam_blocks(model)
            if ATTR in gate.__dict__]


def _widths(block: nn.Module, config: Any) -> tuple[int, int]:
    """``(d_model, d_ff)`` of a block's experts (for the debugger's config)."""
    experts = block.experts
    down = experts.down_proj  # (E, D, F), or (E, F, D) transposed
    D, F = (down.shape[2], down.shape[1]) if experts.is_transposed else (down.shape[1],
                                                                         down.shape[2])
    return int(D), int(F)
