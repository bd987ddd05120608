"""The tiny byte-level MoE language model and the routing arms compared on it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import nn

import moe_router as mr
from moe_router.torch import MoE, moe_layers

NUM_EXPERTS = 8
#: settings every arm shares (each arm may override some)
COMMON_ROUTER: dict[str, Any] = {"num_experts": NUM_EXPERTS, "aux_loss_coef": 0.01,
                                 "z_loss_coef": 1e-3, "causal": True}
ENTROPY_LOSS_COEF = 0.01
#: ReMoE's adaptive L1 on the ReLU gates: coef *= RELU_L1_GROWTH ** sign(k - target) per step
RELU_L1_START, RELU_L1_GROWTH = 1e-8, 1.2


@dataclass(frozen=True)
class Arm:
    """One routing configuration: a label, RouterConfig fields, and its training extras."""

    label: str
    router: dict[str, Any]
    relu_k_target: float | None = None  # ReMoE-style adaptive L1 toward this mean k
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def dynamic(self) -> bool:
        """True when the number of experts per token can vary."""
        return self.router_config().is_dynamic

    def router_config(self) -> mr.RouterConfig:
        """The validated RouterConfig of this arm."""
        return mr.RouterConfig(**{**COMMON_ROUTER, **self.router})

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (the full router fields that differ from the defaults)."""
        return {"label": self.label, "router": {**COMMON_ROUTER, **self.router},
                "relu_k_target": self.relu_k_target, "dynamic": self.dynamic,
                **({"extras": self.extras} if self.extras else {})}


ARMS: dict[str, Arm] = {
    # Switch Transformer's top-1: the gate is the router probability. Renormalized (top_k's
    # default) a single gate is always 1 and the router gets no gradient from the task loss,
    # which would make top-1 (and the top-1/top-2 line) an unfairly weak baseline.
    "top1": Arm("top-1", {"strategy": "top_k", "k": 1, "normalize_weights": False}),
    "top2": Arm("top-2", {"strategy": "top_k", "k": 2}),
    "top_p": Arm("top-p (p=0.4)", {"strategy": "top_p", "top_p": 0.4}),
    "top_p_entropy": Arm("top-p (p=0.4) + entropy loss",
                         {"strategy": "top_p", "top_p": 0.4,
                          "entropy_loss_coef": ENTROPY_LOSS_COEF}),
    "top_p_target": Arm("top-p, controller target k=1.7",
                        {"strategy": "top_p", "top_p": 0.4, "target_experts": 1.7}),
    "null": Arm("null experts (8 + 4, top-2 of 12)",
                {"strategy": "top_k", "k": 2, "num_null_experts": 4}),
    # no z-loss for ReLU: it drives every logit below zero, which switches all ReLU gates off
    "relu": Arm("ReLU routing, target k=2", {"strategy": "relu", "min_experts": 0,
                                              "z_loss_coef": 0.0}, relu_k_target=2.0),
    "complexity": Arm("complexity (router entropy), target k=1.7",
                      {"strategy": "complexity", "complexity_estimator": "router_entropy",
                       "target_experts": 1.7}),
    "top2_bias": Arm("top-2 + aux-free bias (no aux loss)",
                     {"strategy": "top_k", "k": 2, "use_expert_bias": True,
                      "aux_loss_coef": 0.0}),
    "top_p_bias": Arm("top-p (p=0.4) + aux-free bias (no aux loss)",
                      {"strategy": "top_p", "top_p": 0.4, "use_expert_bias": True,
                       "aux_loss_coef": 0.0}),
}
#: the dynamic arm named in the headline conclusion (besides the best one found)
HEADLINE_ARM = "top_p_target"


@dataclass(frozen=True)
class ModelSize:
    """Shape of the language model."""

    layers: int = 4
    d_model: int = 128
    heads: int = 4
    seq_len: int = 128
    vocab: int = 256

    def describe(self) -> dict[str, Any]:
        """JSON-ready, with the expert width."""
        return {**asdict(self), "experts": NUM_EXPERTS, "expert_d_ff": 2 * self.d_model,
                "activation": "swiglu"}


def rotary(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (GPT-NeoX halves) of ``x`` ``(b, h, s, d)``."""
    d, s = x.shape[-1], x.shape[-2]
    freqs = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(s, dtype=torch.float32), freqs)
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention (rotary), then the MoE FFN."""

    def __init__(self, size: ModelSize, config: mr.MoEConfig, seed: int) -> None:
        super().__init__()
        self.heads = size.heads
        self.norm1 = nn.LayerNorm(size.d_model)
        self.qkv = nn.Linear(size.d_model, 3 * size.d_model, bias=False)
        self.proj = nn.Linear(size.d_model, size.d_model, bias=False)
        self.norm2 = nn.LayerNorm(size.d_model)
        self.moe = MoE(config, seed=seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = einops.rearrange(self.qkv(self.norm1(x)), "b s (n h d) -> n b h s d",
                                   n=3, h=self.heads)
        att = F.scaled_dot_product_attention(rotary(q), rotary(k), v, is_causal=True)
        x = x + self.proj(einops.rearrange(att, "b h s d -> b s (h d)"))
        return x + self.moe(self.norm2(x))


class TinyMoELM(nn.Module):
    """Byte-level LM: embedding, ``layers`` blocks (rotary attention + MoE), tied head."""

    def __init__(self, size: ModelSize, router: mr.RouterConfig, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        config = mr.MoEConfig(d_model=size.d_model, d_ff=2 * size.d_model, router=router,
                              activation="swiglu")
        self.embed = nn.Embedding(size.vocab, size.d_model)
        self.blocks = nn.ModuleList(Block(size, config, seed * 1000 + i)
                                    for i in range(size.layers))
        self.norm = nn.LayerNorm(size.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.norm(x) @ self.embed.weight.T

    @property
    def moe(self) -> list[MoE]:
        """The MoE layers, first to last."""
        return moe_layers(self)


def build_model(size: ModelSize, arm: Arm, seed: int) -> TinyMoELM:
    """The arm's model, initialised from the seed's shared reference (top-2) initialisation:
    every parameter is copied from it; a router with null-expert columns keeps its own
    initialisation for those columns only."""
    reference = TinyMoELM(size, ARMS["top2"].router_config(), seed).state_dict()
    model = TinyMoELM(size, arm.router_config(), seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            ref = reference.get(name)
            if ref is None or name.endswith(("router.state", "router.expert_bias")):
                continue
            if ref.shape == tensor.shape:
                tensor.copy_(ref)
            elif name.endswith("router.weight"):  # (D, E + N): copy the real experts' columns
                tensor[:, : ref.shape[1]].copy_(ref)
    return model
