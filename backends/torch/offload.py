"""Offloaded experts for torch MoE layers: the layer step's ``experts`` stage served from an
:class:`~.offload_store.ExpertStore`, and :func:`offload` to set it up on a model.

The offloaded stage computes the used experts one at a time, in expert order, on their
contiguous rows of the sorted slots, exactly as the ``torch:loop`` kernel does (permute ->
per-expert FFN -> unpermute, the same ops on the same layouts), whichever tier each expert's
weights come from. So an offloaded layer gives bit-identical outputs to the same layer with every
expert in memory and ``dispatch="torch:loop"``, for every policy, budget and compute path
(``tests/torch/test_offload_torch.py``). Other kernels batch the experts in one ``bmm`` / grouped
GEMM whose rounding depends on the batch (float32 differences of a few ulps).

Before computing layer ``l`` it applies layer ``l + 1``'s router to layer ``l``'s input and
hands the predicted experts to the store, which loads them on its background thread while layer
``l`` computes. Inference only (no gradients through the store, no ``torch.compile``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from moe_router.errors import InputError, InputTypeError
from moe_router.layer.experts import SCOPES, activate, permute, unpermute
from moe_router.offload.config import STORE_ATTR, OffloadConfig
from moe_router.offload.safetensors_io import ByteReader, checkpoint_entries

from .layers import MoE
from .model import moe_layers
from .offload_store import (
    ROLES,
    CheckpointSource,
    ExpertLayout,
    ExpertStore,
    MemorySource,
    Piece,
    check_uniform,
)


@dataclasses.dataclass
class _Link:
    """What one offloaded layer's stage needs: its store, its index, the next layer."""

    store: ExpertStore
    layer: int
    next_layer: MoE | None
    prefetch_k: int | None


class _OffloadStages:
    """Mixin put in front of a layer's stages class: the ``experts`` stage from the store."""

    _offload: _Link
    #: the expert weights come from the store (:meth:`MoE.derive_stages` refuses to combine)
    replaces_expert_weights = True

    def experts(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                params: Any, config: Any, dispatch: str | None) -> torch.Tensor:
        return offloaded_experts(self.b, self._offload, x_TD, ids_TK, gates_TK, config)


def router_scores(layer: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """``(T, E)`` float32 selection scores of ``layer``'s router for ``x_TD`` (softmax-free:
    logits, or sigmoid scores; plus the expert bias when the router uses one), no gradient."""
    r = layer.config.router
    with torch.no_grad():
        scores = layer.router(x_TD, layer.config).float()[:, :r.num_experts]
        if r.score_func == "sigmoid":
            scores = torch.sigmoid(scores)
        bias = getattr(layer.router, "expert_bias", None)
        if r.use_expert_bias and isinstance(bias, torch.Tensor) and bias.device.type != "meta":
            scores = scores + bias.float()
    return scores


def predict_next(layer: MoE, x_TD: torch.Tensor, k: int | None = None) -> list[int]:
    """Experts ``layer`` would pick for ``x_TD`` (top-``k`` per token of its router, ``k``
    default the router's), most often picked first, then best score."""
    r = layer.config.router
    kk = min(k or r.k, r.num_experts)
    top = torch.topk(router_scores(layer, x_TD), kk, dim=-1)
    counts: dict[int, tuple[int, float]] = {}
    for e, s in zip(top.indices.reshape(-1).tolist(), top.values.reshape(-1).tolist()):
        n, best = counts.get(e, (0, float("-inf")))
        counts[e] = (n + 1, max(best, s))
    return sorted(counts, key=lambda e: (-counts[e][0], -counts[e][1], e))


def offloaded_experts(b: Any, link: _Link, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                      gates_TK: torch.Tensor, config: Any) -> torch.Tensor:
    """``(T, D)``: the ``torch:loop`` computation with each expert's weights from the store."""
    store, layer = link.store, link.layer
    if layer == 0:
        store.begin_step()
    with b.scope(SCOPES["permute"]):
        x_SD, perm = permute(b, x_TD, ids_TK, config.num_experts)
    counts = perm.counts_E.tolist()
    used = [e for e, c in enumerate(counts) if c]
    if link.next_layer is not None and store.config.prefetch:
        guess = predict_next(link.next_layer, x_TD, link.prefetch_k)
        store.prefetch(layer + 1, guess, protect=[(layer, e) for e in used])
    pieces, start = [], 0
    with b.scope(SCOPES["experts"]):
        for e, count in enumerate(counts):
            if count:
                rest = [(layer, x) for x in used if x > e]
                (w_gate, w_up, w_down), path = store.weights(layer, e, count, rest)
                x = x_SD[start:start + count]
                if path == "there" and w_up.device != x.device:
                    out = _ffn(b, x.to(w_up.device), w_gate, w_up, w_down, config.activation)
                    pieces.append(out.to(x.device))
                else:
                    pieces.append(_ffn(b, x, w_gate, w_up, w_down, config.activation))
            start += count
        tail = x_SD.shape[0] - start
        if tail or not pieces:
            pieces.append(x_SD.new_zeros((tail, config.d_model)))
        out_SD = torch.cat(pieces, dim=0)
    store.end_layer(layer, used)
    with b.scope(SCOPES["combine"]):
        return unpermute(b, out_SD, perm, gates_TK)


def _ffn(b: Any, x: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor,
         w_down: torch.Tensor, activation: str) -> torch.Tensor:
    """One expert on rows ``x`` ``(N, D)``, as ``torch:loop`` computes it (weights cast to the
    rows' dtype when they differ)."""
    cast = (lambda w: w if w.dtype == x.dtype else w.to(x.dtype))  # noqa: E731
    gate = None if w_gate is None else x @ cast(w_gate)
    return activate(b, activation, gate, x @ cast(w_up)) @ cast(w_down)


# ----- setting it up --------------------------------------------------------------------------
def expert_layout(layer: MoE, dtype: torch.dtype | None = None) -> ExpertLayout:
    """One expert's :class:`ExpertLayout` in ``layer`` (its expert parameters' dtype)."""
    c = layer.config
    w_up = layer.experts.w_up
    gated = getattr(layer.experts, "w_gate", None) is not None
    return ExpertLayout(((c.d_model, c.d_ff) if gated else None, (c.d_model, c.d_ff),
                         (c.d_ff, c.d_model)), dtype or w_up.dtype)


def _drop_experts(layer: MoE) -> None:
    """Replace the layer's expert parameters by meta tensors (no memory)."""
    for name in ROLES:
        leaf = name.rpartition(".")[2]
        param = layer.experts._parameters.get(leaf)
        if param is not None and param.device.type != "meta":
            layer.experts._parameters[leaf] = nn.Parameter(
                torch.empty(param.shape, dtype=param.dtype, device="meta"), requires_grad=False)


def install(layers: Sequence[MoE], store: ExpertStore) -> None:
    """Serve the experts of ``layers`` (in forward order) from ``store``."""
    for i, layer in enumerate(layers):
        link = _Link(store, i, layers[i + 1] if i + 1 < len(layers) else None,
                     store.config.prefetch_k)
        layer.set_stages(layer.derive_stages("Offloaded", _OffloadStages, argument="model",
                                             _offload=link))
        _drop_experts(layer)


def save_experts(layers: Sequence[MoE] | nn.Module, path: str | os.PathLike[str]) -> None:
    """Write the experts of ``layers`` (or of a model's MoE layers) to a safetensors file in
    the portable layout (``layers.<i>.experts.w_up`` ``(E, D, F)``, ...), the disk tier
    :func:`offload` reads with ``checkpoint=path``."""
    from safetensors.torch import save_file

    found = moe_layers(layers) if isinstance(layers, nn.Module) else list(layers)
    tensors = {}
    for i, layer in enumerate(found):
        for name in ROLES:
            param = getattr(layer.experts, name.rpartition(".")[2], None)
            if param is not None:
                tensors[f"layers.{i}.{name}"] = param.detach().contiguous().cpu()
    save_file(tensors, os.fspath(path))


def _portable_pieces(path: str, layers: Sequence[MoE]) -> dict[tuple[int, int], list[Any]]:
    entries = checkpoint_entries(path)
    pieces: dict[tuple[int, int], list[Any]] = {}
    for i, layer in enumerate(layers):
        for e in range(layer.config.num_experts):
            row = []
            for name in ROLES:
                entry = entries.get(f"layers.{i}.{name}")
                if entry is None:
                    row.append(None)
                    continue
                start, nbytes = entry.row_range(e)
                row.append(Piece(entry, start, nbytes, tuple(entry.shape[1:]), False))
            pieces[(i, e)] = row
    return pieces


def offload(model: nn.Module | Sequence[MoE], config: OffloadConfig | None = None, *,
            checkpoint: str | os.PathLike[str] | None = None,
            device: torch.device | str | None = None, **config_fields: Any) -> ExpertStore:
    """Offload the experts of a model's :class:`MoE` layers (or of ``layers``) into an
    :class:`ExpertStore`; their expert parameters become meta tensors.

    ``checkpoint``: a file written by :func:`save_experts` (the disk tier); without it the
    layers' current expert tensors become the host tier. ``config`` or ``config_fields``
    (:class:`~moe_router.offload.config.OffloadConfig` fields, e.g. ``experts_per_layer=4``).

    Raises:
        InputError: no MoE layer, or layers with different expert shapes.
        ConfigError: an invalid offload setting.
    """
    config = config or OffloadConfig(**config_fields)
    layers = moe_layers(model) if isinstance(model, nn.Module) else list(model)
    if not layers:
        raise InputError("model", "has no moe_router MoE layer (call replace_moe_blocks on a "
                         "transformers model first, or use moe_router.offload.from_pretrained)")
    layouts = [expert_layout(layer) for layer in layers]
    check_uniform(layouts, [layer.config.num_experts for layer in layers])
    layout, E = layouts[0], layers[0].config.num_experts
    dev = torch.device(device) if device is not None else layers[0].router.weight.device
    source: CheckpointSource | MemorySource
    if checkpoint is not None:
        source = CheckpointSource(layout, _portable_pieces(os.fspath(checkpoint), layers),
                                  ByteReader())
        if config.host_tier:
            source = MemorySource.load(source, len(layers), E, pin=dev.type == "cuda")
    else:
        pin = dev.type == "cuda"
        stacks = []
        for layer in layers:
            stack = []
            for name in ROLES:
                p = getattr(layer.experts, name.rpartition(".")[2], None)
                if p is None:
                    stack.append(None)
                    continue
                t = p.detach().to("cpu").contiguous()
                stack.append(t.pin_memory() if pin else t)
            stacks.append(tuple(stack))
        source = MemorySource(layout, stacks)
    store = ExpertStore(source, len(layers), E, config, dev)
    install(layers, store)
    if isinstance(model, nn.Module):
        model.__dict__[STORE_ATTR] = store
    return store


def store_of(model: nn.Module) -> ExpertStore:
    """The :class:`ExpertStore` of a model set up by :func:`offload` / ``from_pretrained``.

    Raises:
        InputTypeError: the model has none.
    """
    store = model.__dict__.get(STORE_ATTR)
    if store is None:
        raise InputTypeError("model", f"{type(model).__name__} has no expert store (use "
                             "moe_router.offload.from_pretrained or offload_model)")
    return store
