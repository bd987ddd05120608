"""``from_pretrained``: a Hugging Face MoE checkpoint (``save_pretrained`` safetensors) loaded with
its experts offloaded, without ever holding all experts (or a whole file) in memory.

1. The model is built on the meta device and its MoE blocks are replaced by this library's layers
   (:func:`~.hf.replace_moe_blocks`: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3).
2. Every non-expert tensor is read from the checkpoint one tensor at a time (byte ranges of the
   file) onto the device; the rotary buffers are recomputed by the model's ``_init_weights``.
3. The expert tensors stay in the file: an :class:`~.offload_store.ExpertStore` reads them one
   expert at a time (per-expert checkpoints ``experts.<e>.w1/w2/w3`` or ``gate/up/down_proj``,
   and fused ``experts.gate_up_proj`` / ``down_proj``), into the layer layout.

The experts run as ``torch:loop`` does, so the model equals the same checkpoint loaded in memory
with ``replace_moe_blocks`` and ``dispatch="torch:loop"`` bit for bit.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from moe_router.errors import InputError
from moe_router.layer.state import initial_state_arrays, state_fields
from moe_router.offload.config import OffloadConfig
from moe_router.offload.safetensors_io import ByteReader, TensorEntry, checkpoint_entries

from .hf import HFBlockMoE, replace_moe_blocks
from .offload import STORE_ATTR, expert_layout, install
from .offload_store import _DTYPES as DTYPES
from .offload_store import CheckpointSource, ExpertLayout, ExpertStore, MemorySource, Piece

#: module-name spellings that differ between a checkpoint and the v5 model (checkpoint, model)
RENAMES = ((".block_sparse_moe.", ".mlp."),)
#: per-expert checkpoint names of (gate, up, down), each stored (out, in)
PER_EXPERT = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


class _Checkpoint:
    """Checkpoint tensors by model name (renames applied), read one at a time."""

    def __init__(self, path: str, reader: ByteReader) -> None:
        self.path, self.reader = path, reader
        self.entries: dict[str, TensorEntry] = {}
        for name, entry in checkpoint_entries(path).items():
            for old, new in RENAMES:
                name = name.replace(old, new)
            self.entries[name] = entry

    def get(self, name: str) -> TensorEntry | None:
        return self.entries.get(name)

    def read(self, name: str) -> torch.Tensor:
        entry = self.entries.get(name)
        if entry is None:
            raise InputError("path", f"{self.path} has no tensor for {name}")
        out = torch.empty(entry.shape, dtype=DTYPES.get(entry.dtype) or getattr(torch,
                                                                                  entry.dtype))
        self.reader.read_into(entry.file, entry.offset, out.view(-1).view(torch.uint8).numpy())
        return out


def _expert_pieces(ckpt: _Checkpoint, prefix: str, E: int,
                   layout: ExpertLayout) -> dict[int, list[Piece | None]]:
    """Each expert's (gate, up, down) pieces under ``prefix`` (``model.layers.3.mlp.experts``)."""
    fused = ckpt.get(f"{prefix}.gate_up_proj")
    out: dict[int, list[Piece | None]] = {}
    if fused is not None:
        down = ckpt.get(f"{prefix}.down_proj")
        if down is None:
            raise InputError("path", f"{ckpt.path}: {prefix}.gate_up_proj without down_proj")
        _, two_f, d = fused.shape
        f = two_f // 2
        for e in range(E):
            start, nbytes = fused.row_range(e)
            half = nbytes // 2
            d_start, d_bytes = down.row_range(e)
            out[e] = [Piece(fused, start, half, (f, d), True),
                      Piece(fused, start + half, half, (f, d), True),
                      Piece(down, d_start, d_bytes, tuple(down.shape[1:]), True)]
        return out
    for names in PER_EXPERT:
        if ckpt.get(f"{prefix}.0.{names[1]}.weight") is None:
            continue
        for e in range(E):
            row: list[Piece | None] = []
            for role, name in zip(layout.shapes, names):
                entry = ckpt.get(f"{prefix}.{e}.{name}.weight")
                if role is None:
                    row.append(None)
                    continue
                if entry is None:
                    raise InputError("path", f"{ckpt.path} has no {prefix}.{e}.{name}.weight")
                row.append(Piece(entry, entry.offset, entry.nbytes, tuple(entry.shape), True))
            out[e] = row
        return out
    raise InputError("path", f"{ckpt.path} has no expert tensors under {prefix} (expected "
                     "experts.<e>.w1/w2/w3, experts.<e>.gate_proj/up_proj/down_proj or "
                     "experts.gate_up_proj/down_proj)")


def _set(module: nn.Module, leaf: str, value: torch.Tensor) -> None:
    if leaf in module._parameters:
        old = module._parameters[leaf]
        module._parameters[leaf] = nn.Parameter(value.to(old.dtype), requires_grad=False)
    else:
        old = module._buffers[leaf]
        module._buffers[leaf] = value.to(old.dtype if old is not None else value.dtype)


def _load_layer(layer: HFBlockMoE, name: str, ckpt: _Checkpoint, device: torch.device) -> None:
    """A replaced block's non-expert tensors (router, bias, shared expert) and fresh state."""
    layout = layer.hf_layout
    for hf_name, _, _, _ in layout.tensors:
        if hf_name.startswith("experts."):
            continue
        converted = layout.from_hf(hf_name, ckpt.read(f"{name}.{hf_name}"), f"{name}.")
        if isinstance(converted, str):
            raise InputError("path", converted)
        for portable, value in converted.items():
            owner = layer._owner(portable)
            _set(owner, portable.rpartition(".")[2], value.to(device))
    initial = initial_state_arrays(layer.config)
    for portable in state_fields(layer.config):
        owner, leaf = layer._owner(portable), portable.rpartition(".")[2]
        if owner._buffers[leaf].device.type == "meta":
            owner._buffers[leaf] = torch.from_numpy(initial[portable]).to(device)


def _materialize(model: nn.Module, ckpt: _Checkpoint, device: torch.device,
                 skip: set[int]) -> None:
    """Load every parameter and persistent buffer outside the MoE layers (``skip``: their
    ids); recompute non-persistent meta buffers with the model's ``_init_weights``."""
    for mod_name, module in model.named_modules():
        if id(module) in skip:
            continue
        for leaf, param in list(module._parameters.items()):
            if param is None or param.device.type != "meta":
                continue
            key = f"{mod_name}.{leaf}" if mod_name else leaf
            if ckpt.get(key) is None and getattr(model.config, "tie_word_embeddings", False):
                continue  # tied: set by tie_weights below
            _set(module, leaf, ckpt.read(key).to(device))
        meta = [leaf for leaf, buf in module._buffers.items()
                if buf is not None and buf.device.type == "meta"]
        for leaf in meta:
            key = f"{mod_name}.{leaf}" if mod_name else leaf
            if ckpt.get(key) is not None:
                _set(module, leaf, ckpt.read(key).to(device))
        if any(module._buffers[leaf].device.type == "meta" for leaf in meta):
            for leaf in meta:
                buf = module._buffers[leaf]
                module._buffers[leaf] = torch.empty_like(buf, device=device)
            model._init_weights(module)
    model.tie_weights()


def from_pretrained(path: str | os.PathLike[str], experts_per_layer: int | None = None, *,
                    config: OffloadConfig | None = None, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, **config_fields: Any) -> nn.Module:
    """A transformers MoE model from ``path`` (a ``save_pretrained`` folder) with its experts
    offloaded: ``experts_per_layer`` slots per layer (or ``budget_bytes=``, ``policy=``,
    ``prefetch=``, ``compute=``, ``pinned=``, ``host_tier=``: :class:`OffloadConfig` fields, or
    a whole ``config``). The store is ``moe_router.offload.store_of(model)``. Inference only:
    don't move the model (``.to``), pass ``device``.

    Raises:
        InputError: ``path`` holds no safetensors checkpoint, no supported MoE block, or lacks
            a tensor.
        ConfigError: invalid offload settings.
    """
    import transformers

    if config is None:
        config = OffloadConfig(experts_per_layer=experts_per_layer, **config_fields)
    elif experts_per_layer is not None or config_fields:
        config = dataclasses.replace(config, **{**config_fields, **(
            {"experts_per_layer": experts_per_layer, "budget_bytes": None}
            if experts_per_layer is not None else {})})
    path = os.fspath(path)
    dev = torch.device(device)
    reader = ByteReader()
    ckpt = _Checkpoint(path, reader)
    hf_config = transformers.AutoConfig.from_pretrained(path)
    arch = (getattr(hf_config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        cls = transformers.AutoModelForCausalLM._model_mapping[type(hf_config)]
    with torch.device("meta"):
        model = cls(hf_config)
    if dtype is not None:
        model.to(dtype)
    model.eval()
    replace_moe_blocks(model)
    named = [(n, m) for n, m in model.named_modules() if isinstance(m, HFBlockMoE)]
    for name, layer in named:
        _load_layer(layer, name, ckpt, dev)
    _materialize(model, ckpt, dev, {id(m) for _, layer in named for m in layer.modules()})
    layers = [layer for _, layer in named]
    layout = expert_layout(layers[0])
    E = layers[0].config.num_experts
    pieces: dict[tuple[int, int], list[Piece | None]] = {}
    for i, (name, layer) in enumerate(named):
        if expert_layout(layer) != layout or layer.config.num_experts != E:
            raise InputError("path", f"{name} has another expert shape than {named[0][0]}")
        for e, row in _expert_pieces(ckpt, f"{name}.experts", E, layout).items():
            pieces[(i, e)] = row
    source: CheckpointSource | MemorySource = CheckpointSource(layout, pieces, reader)
    if config.host_tier:
        source = MemorySource.load(source, len(layers), E, pin=dev.type == "cuda")
    store = ExpertStore(source, len(layers), E, config, dev)
    install(layers, store)
    model.__dict__[STORE_ATTR] = store
    return model


def in_memory_reference(path: str | os.PathLike[str], **kwargs: Mapping[str, Any]) -> nn.Module:
    """The same checkpoint loaded by transformers in memory, blocks replaced, experts on
    ``torch:loop``: what an offloaded model equals bit for bit (tests, benchmarks)."""
    import transformers

    from .model import moe_layers

    model = transformers.AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs).eval()
    replace_moe_blocks(model)
    for layer in moe_layers(model):
        layer.config = dataclasses.replace(layer.config, dispatch="torch:loop")
    return model
