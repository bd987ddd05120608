"""``OffloadConfig``: how experts are offloaded (frozen, validated, hashable)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from ..errors import ConfigError
from .policies import POLICIES

#: values of ``OffloadConfig.compute``
COMPUTE = ("auto", "move", "there")
#: the attribute (in a model's ``__dict__``) holding its expert store; the debugger looks here
STORE_ATTR = "expert_store"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """How an :class:`~moe_router_backends.torch.offload_store.ExpertStore` keeps experts.

    Attributes:
        experts_per_layer: slots per MoE layer in the fast tier (c); or give ``budget_bytes``.
        budget_bytes: fast-tier bytes for all layers; slots per layer = budget // (L * expert
            bytes). Exactly one of the two is given.
        policy: eviction policy (``lru``, ``lfu``, ``layer_aware``).
        decay: frequency decay per step (``lfu``, ``layer_aware``).
        prefetch: predict layer L+1's experts by applying its router to layer L's input and load
            them ahead (background thread on CPU, copy stream on GPU).
        prefetch_k: experts predicted per token (default: the router's k).
        prefetch_bytes: bytes prefetch may move per step (``None``: limited by the slots).
        compute: for a miss, ``"move"`` the weights into the fast tier, compute ``"there"``
            where they are (host memory; a disk tier is always moved), or ``"auto"``: whichever
            the start-up measurements say is cheaper for the miss's rows (the Fiddler rule).
        pinned: ``((layer, (experts...)), ...)`` kept resident for good (see
            :func:`~moe_router.offload.trace.pinned_from_profile`); counted in the slots.
        host_tier: read every expert into host memory at load (pinned where a GPU is used) and
            serve misses from there instead of the disk.
    """

    experts_per_layer: int | None = None
    budget_bytes: int | None = None
    policy: str = "lru"
    decay: float = 0.9
    prefetch: bool = True
    prefetch_k: int | None = None
    prefetch_bytes: int | None = None
    compute: str = "auto"
    pinned: tuple[tuple[int, tuple[int, ...]], ...] = ()
    host_tier: bool = False

    def __post_init__(self) -> None:
        if (self.experts_per_layer is None) == (self.budget_bytes is None):
            raise ConfigError("experts_per_layer", self.experts_per_layer,
                              "exactly one of experts_per_layer and budget_bytes")
        for name in ("experts_per_layer", "budget_bytes", "prefetch_k"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ConfigError(name, value, "None or an int >= 1")
        if self.prefetch_bytes is not None and (not isinstance(self.prefetch_bytes, int)
                                                or self.prefetch_bytes < 0):
            raise ConfigError("prefetch_bytes", self.prefetch_bytes, "None or an int >= 0")
        if self.policy not in POLICIES:
            raise ConfigError("policy", self.policy, f"one of {', '.join(POLICIES)}")
        if not 0.0 < self.decay <= 1.0:
            raise ConfigError("decay", self.decay, "a number in (0, 1]")
        if self.compute not in COMPUTE:
            raise ConfigError("compute", self.compute, f"one of {', '.join(COMPUTE)}")
        if isinstance(self.pinned, Mapping):
            object.__setattr__(self, "pinned", tuple(
                (int(k), tuple(sorted(int(e) for e in v))) for k, v in sorted(self.pinned.items())))

    def slots(self, num_layers: int, num_experts: int, expert_bytes: int) -> int:
        """Slots per layer for L layers of E experts of ``expert_bytes`` each.

        Raises:
            ConfigError: the budget holds no expert per layer.
        """
        if self.experts_per_layer is not None:
            return min(self.experts_per_layer, num_experts)
        slots = int(self.budget_bytes or 0) // (num_layers * expert_bytes)
        if slots < 1:
            raise ConfigError("budget_bytes", self.budget_bytes,
                              f">= {num_layers * expert_bytes} (one {expert_bytes}-byte expert "
                              f"per layer for {num_layers} layers)")
        return min(slots, num_experts)
