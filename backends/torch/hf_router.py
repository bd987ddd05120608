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

import inspect
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
from moe_router.layer.observers import StepEvent, update_observers
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
                 d_model: int, d_ff: int, bias_source: BiasSource = None) -> None:
        self.gate, self.base, self.router, self.handle = gate, base, router, handle
        self.bias_source = bias_source
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
        for observer, fields in update_observers(_TORCH, values, event).items():
            for field, value in fields.items():
                self.state[f"{OBSERVER_PREFIX}{observer}.{field}"] = value.detach()


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


def _gate_output(gate: nn.Module, hidden_TD: torch.Tensor,
                 *extra: Any) -> tuple[torch.Tensor, ...]:
    out = gate(hidden_TD, *extra)
    if not (isinstance(out, tuple) and len(out) == 3 and out[2].dtype in (torch.int64,
                                                                           torch.int32)):
        raise InputError("model", f"{type(gate).__name__} returns "
                         f"{type(out).__name__}, not (router_logits, top_k_weights, "
                         "top_k_index): its routing convention is not understood")
    return out


def _attr(gate: nn.Module, config: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` set on the gate, else on the model config."""
    for owner in (gate, config):
        for name in names:
            value = getattr(owner, name, None)
            if value is not None:
                return value
    return default


#: where a gate's selection-only bias comes from: ``("attr", name)`` of the gate, ``("arg", i)``
#: the i-th extra input the block passes it, or ``None``
BiasSource = tuple[str, Any] | None


def _extra_inputs(block: nn.Module, gate: nn.Module) -> tuple[list[str], list[Any]]:
    """The inputs the block passes the gate after the hidden states, as block attributes of the
    same name (``self.gate(hidden, self.e_score_correction_bias)``).

    Raises:
        InputError: the gate needs an input the block does not hold (token ids of hash routing).
    """
    params = list(inspect.signature(gate.forward).parameters.values())[1:]
    names, values = [], []
    for param in params:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if hasattr(block, param.name):
            names.append(param.name)
            values.append(getattr(block, param.name))
        elif param.default is param.empty:
            raise InputError("model", f"{type(gate).__name__} needs the input "
                             f"{param.name!r}, which its block does not hold (e.g. token ids of "
                             "hash routing): its routing is not supported")
        else:
            break
    return names, values


def _bias_sources(gate: nn.Module, names: list[str], values: list[Any]) -> list[BiasSource]:
    """The selection-bias candidates, most likely first (and ``None``: no bias)."""
    found: list[BiasSource] = [
        ("attr", name) for name, tensor in itertools.chain(gate.named_buffers(),
                                                           gate.named_parameters())
        if name.rpartition(".")[2] in ("e_score_correction_bias", "expert_bias")]
    found += [("arg", i) for i, (n, v) in enumerate(zip(names, values, strict=True))
              if "bias" in n and isinstance(v, torch.Tensor)]
    return [*found, None]


def _bias(gate: nn.Module, args: tuple[Any, ...], source: BiasSource) -> torch.Tensor | None:
    if source is None:
        return None
    kind, where = source
    if kind == "arg":
        return args[1 + where]
    owner, _, leaf = where.rpartition(".")
    return getattr(gate.get_submodule(owner) if owner else gate, leaf).reshape(-1)


def _candidates(gate: nn.Module, config: Any, E: int, k: int,
                biases: list[BiasSource]) -> Iterator[tuple[RouterConfig, BiasSource]]:
    """The conventions to try, the ones the gate and config name first."""
    groups = _attr(gate, config, "num_group", "n_group")
    topk_group = _attr(gate, config, "topk_group")
    grouped = groups is not None and int(groups) > 1 and topk_group is not None
    norm = _attr(gate, config, "norm_topk_prob")
    scale = float(_attr(gate, config, "routed_scaling_factor", "router_scaling_factor",
                        "route_scale",
                        default=1.0) or 1.0)
    scoring = _attr(gate, config, "scoring_func", "score_function")
    sigmoid_first = biases[0] is not None or scoring == "sigmoid"
    scores = ["sigmoid", "softmax"] if sigmoid_first else ["softmax", "sigmoid"]
    norms = [bool(norm), not bool(norm)] if norm is not None else [True, False]
    group_options = [(int(groups), int(topk_group)), (None, None)] if grouped else [(None, None)]
    for bias, group, score, normalize, route_scale in itertools.product(
            biases, group_options, scores, norms, [scale, 1.0]):
        yield RouterConfig(num_experts=E, k=k, score_func=score, normalize_weights=normalize,
                           use_expert_bias=bias is not None, route_scale=route_scale,
                           num_groups=group[0], topk_groups=group[1]), bias


def _selection(ids_TK: torch.Tensor, w_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The chosen experts and their weights in expert order (order-free comparison)."""
    order = torch.argsort(ids_TK, dim=-1)
    return ids_TK.gather(-1, order), w_TK.float().gather(-1, order)


def _tied(plan: Any, want_ids_TK: torch.Tensor, got_ids_TK: torch.Tensor) -> bool:
    """Whether the two choices differ only among experts of equal score (an untrained gate
    with zero weights ties everywhere; ``torch.topk`` breaks ties in no documented order)."""
    scores_TE = plan.router_probs[:, : plan.config.num_experts]
    want = scores_TE.gather(-1, want_ids_TK.long()).sort(-1).values
    got = scores_TE.gather(-1, got_ids_TK.long()).sort(-1).values
    return bool(torch.equal(want, got))


@torch.no_grad()
def gate_config(gate: nn.Module, config: Any,
                block: nn.Module | None = None) -> tuple[RouterConfig, BiasSource]:
    """The family's static top-k routing as a :class:`RouterConfig` and where its selection
    bias comes from, verified on a probe batch: our top-k of the gate's logits equals the gate's
    own choice (same experts, weights within 1e-5).

    Raises:
        InputError: no convention reproduces the gate, or the gate needs inputs we cannot give
            it (named in the message).
    """
    param = next(itertools.chain(gate.parameters(), gate.buffers()))
    weight = getattr(gate, "weight", None)
    D = int(getattr(gate, "hidden_dim", 0) or (weight.shape[-1] if isinstance(
        weight, torch.Tensor) and weight.dim() == 2 else config.get_text_config().hidden_size))
    generator = torch.Generator().manual_seed(0)  # a local generator: no global RNG draw
    dtype = next(block.experts.parameters()).dtype if block is not None else param.dtype
    probe = torch.randn(_PROBE_TOKENS, D, generator=generator).to(param.device, dtype)
    names, values = _extra_inputs(block, gate) if block is not None else ([], [])
    was_training = gate.training
    gate.eval()
    try:
        try:
            logits_TE, weights_TK, ids_TK = _gate_output(gate, probe, *values)
        except (ValueError, RuntimeError, IndexError):  # a gate that wants (B, S, D)
            logits_TE, weights_TK, ids_TK = _gate_output(gate, probe[None], *values)
    except InputError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure to call it: not understood
        raise InputError("model", f"{type(gate).__name__} could not be probed ({err}); its "
                         "routing convention is not understood") from err
    finally:
        gate.train(was_training)
    if logits_TE.dim() != 2 or weights_TK.shape != ids_TK.shape:
        raise InputError("model", f"{type(gate).__name__} returns shapes "
                         f"{tuple(logits_TE.shape)}, {tuple(weights_TK.shape)}, "
                         f"{tuple(ids_TK.shape)}: its routing convention is not understood")
    want_ids, want_w = _selection(ids_TK, weights_TK)
    E, k = int(logits_TE.shape[-1]), int(ids_TK.shape[-1])
    args = (probe, *values)
    for candidate, source in _candidates(gate, config, E, k, _bias_sources(gate, names, values)):
        try:
            plan = route(logits_TE.float(), candidate, expert_bias_E=_bias(gate, args, source),
                         validate=False)
        except Exception:  # noqa: BLE001 - an impossible candidate (e.g. groups) is no match
            continue
        got_ids, got_w = _selection(plan.expert_indices.to(ids_TK.dtype),
                                    plan.expert_weights.to(weights_TK.dtype))
        tol = max(1e-5, 2 * torch.finfo(weights_TK.dtype).eps)  # the gate's weight dtype
        if not torch.allclose(got_w, want_w, atol=tol, rtol=tol) and not torch.allclose(
                got_w.sort(-1).values, want_w.sort(-1).values, atol=tol, rtol=tol):
            continue
        if torch.equal(got_ids, want_ids) or _tied(plan, ids_TK, got_ids):
            return candidate, source
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
    bias = _bias(gate, args, routing.bias_source) if config.use_expert_bias else None
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
    for _name, block, gate in blocks:
        routing = gate.__dict__.get(ATTR)
        base, source = ((routing.base, routing.bias_source) if routing is not None
                        else gate_config(gate, hf_config, block))
        changes = dict(router_changes)
        if "strategy" in changes and changes["strategy"] != "top_k":
            changes.setdefault("normalize_weights", None)
        plans.append((source, base, base.replace(**changes)))
    dynamic = any(new.is_dynamic or new.max_slots != base.max_slots for _, base, new in plans)
    for (_name, block, gate), (source, base, new) in zip(blocks, plans, strict=True):
        routing = gate.__dict__.get(ATTR)
        if routing is None:
            D, F = _widths(block, hf_config)
            routing = gate.__dict__[ATTR] = GateRouting(
                gate, base, new, gate.register_forward_hook(_hook), D, F, source)
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
