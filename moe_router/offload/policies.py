"""Eviction policies of the expert cache, behind one small interface.

A policy ranks the resident experts of a cache; :class:`~moe_router.offload.cache.ExpertCache`
asks it for a victim when a slot is needed. Keys are ``(layer, expert)`` pairs. ``now`` is the
cache's access clock (one tick per expert access) and ``step`` its step counter (one forward pass
through every layer, e.g. one decoded token).

- ``lru``: per layer, the least recently used expert leaves.
- ``lfu``: per layer, the lowest frequency with exponential decay per step (``decay`` in (0, 1];
  1 = plain LFU), ties to the least recently used. Frequencies are kept for evicted experts too,
  so an expert that comes back keeps its history.
- ``layer_aware``: one pool for all layers (the budget is global): each layer's decayed
  frequencies are normalised to probabilities, and the expert least likely to be used on the
  layer's next visit leaves, wherever it is; ties go to the layer whose next visit is furthest
  (in a decode loop, the layer just computed), then to the least recently used. Skewed layers
  thus keep fewer slots than flat ones.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ..errors import ConfigError

Key = tuple[int, int]  # (layer, expert)


class Policy(Protocol):
    """What the cache needs from a policy (one instance per cache: it holds state)."""

    #: one pool shared by every layer (``True``) or one budget per layer
    shared: bool

    def touch(self, key: Key, now: int, step: int) -> None:
        """``key`` was used (hit, or loaded for use) at ``now``."""

    def inserted(self, key: Key, now: int, step: int) -> None:
        """``key`` became resident (a demand load or a prefetch)."""

    def removed(self, key: Key) -> None:
        """``key`` was evicted."""

    def victim(self, candidates: Iterable[Key], now: int, step: int, layer: int) -> Key:
        """The candidate to evict (``candidates`` is non-empty); ``layer`` is being served."""


class LRU:
    """Per-layer least recently used."""

    shared = False

    def __init__(self) -> None:
        self._last: dict[Key, int] = {}

    def touch(self, key: Key, now: int, step: int) -> None:
        self._last[key] = now

    def inserted(self, key: Key, now: int, step: int) -> None:
        self._last[key] = now

    def removed(self, key: Key) -> None:
        self._last.pop(key, None)

    def victim(self, candidates: Iterable[Key], now: int, step: int, layer: int) -> Key:
        return min(candidates, key=lambda k: (self._last.get(k, -1), k))


class LFU:
    """Per-layer least frequently used, frequencies decayed by ``decay`` per step."""

    shared = False

    def __init__(self, decay: float = 0.9) -> None:
        self.decay = decay
        self._freq: dict[Key, tuple[float, int]] = {}  # value at step
        self._last: dict[Key, int] = {}

    def frequency(self, key: Key, step: int) -> float:
        value, at = self._freq.get(key, (0.0, step))
        return value * self.decay ** (step - at) if value else 0.0

    def touch(self, key: Key, now: int, step: int) -> None:
        self._freq[key] = (self.frequency(key, step) + 1.0, step)
        self._last[key] = now

    def inserted(self, key: Key, now: int, step: int) -> None:
        self._last[key] = now

    def removed(self, key: Key) -> None:
        self._last.pop(key, None)  # the frequency history stays

    def victim(self, candidates: Iterable[Key], now: int, step: int, layer: int) -> Key:
        return min(candidates, key=lambda k: (self.frequency(k, step), self._last.get(k, -1), k))


class LayerAware(LFU):
    """One pool for all layers: evict the expert least likely to be used on its layer's next
    visit (decayed frequency over the layer's total), ties to the layer visited furthest ahead,
    then the least recently used."""

    shared = True

    def __init__(self, decay: float = 0.9, num_layers: int = 1) -> None:
        super().__init__(decay)
        self.num_layers = max(1, num_layers)
        self._total: dict[int, tuple[float, int]] = {}

    def touch(self, key: Key, now: int, step: int) -> None:
        super().touch(key, now, step)
        value, at = self._total.get(key[0], (0.0, step))
        self._total[key[0]] = (value * self.decay ** (step - at) + 1.0, step)

    def _probability(self, key: Key, step: int) -> float:
        value, at = self._total.get(key[0], (0.0, step))
        total = value * self.decay ** (step - at)
        return self.frequency(key, step) / total if total > 0 else 0.0

    def victim(self, candidates: Iterable[Key], now: int, step: int, layer: int) -> Key:
        L = self.num_layers

        def rank(k: Key) -> tuple[float, int, int, Key]:
            ahead = (k[0] - layer - 1) % L  # 0: the next layer to run, L - 1: this one
            return (self._probability(k, step), -ahead, self._last.get(k, -1), k)

        return min(candidates, key=rank)


#: policy names (``OffloadConfig.policy``, ``simulate(policy=...)``)
POLICIES = ("lru", "lfu", "layer_aware")


def make_policy(name: str, *, decay: float = 0.9, num_layers: int = 1) -> Policy:
    """A fresh policy instance by name (one of :data:`POLICIES`).

    Raises:
        ConfigError: an unknown name or a decay outside (0, 1].
    """
    if not 0.0 < decay <= 1.0:
        raise ConfigError("decay", decay, "a number in (0, 1] (1 = no decay)")
    if name == "lru":
        return LRU()
    if name == "lfu":
        return LFU(decay)
    if name == "layer_aware":
        return LayerAware(decay, num_layers)
    raise ConfigError("policy", name, f"one of {', '.join(POLICIES)}")
