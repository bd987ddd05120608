"""The expert cache: which experts are resident in the fast tier, in which slot, and what it cost.

One :class:`ExpertCache` serves both the offline simulator (:func:`~moe_router.offload.simulate`)
and the torch :class:`ExpertStore` (``moe_router_backends.torch.offload_store``): the store asks
it where an expert is and which slot to fill, and does the copies; the simulator only counts.
So a trace replayed offline and the same routing run live give the same hits and misses.

Slots: ``slots`` per layer (layer ``l`` owns slot ids ``[l * slots, (l + 1) * slots)``), or, for
a policy with ``shared = True`` (``layer_aware``), one pool of ``num_layers * slots`` slots any
layer may use. Pinned experts take slots of their layer and are never evicted.

Prefetch: :meth:`ExpertCache.predict` records the experts predicted for a layer and admits the
missing ones as *speculative* entries (within a byte budget per step); :meth:`ExpertCache.use`
turns a speculative entry into a prefetch hit; :meth:`ExpertCache.end_layer` scores the
prediction (precision, recall) and marks the speculative entries the layer did not use as wrong
guesses, which are evicted first and counted as wasted bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..errors import ConfigError, InputError
from .policies import Key, make_policy

#: how a used expert was served (``LayerMetrics.paths``)
PATHS = ("resident", "moved", "there", "streamed")


@dataclasses.dataclass
class LayerMetrics:
    """Counters of one layer (mutable: owned by its cache).

    Attributes:
        hits / misses: expert uses found resident / not resident.
        prefetch_hits: hits on an expert a prefetch loaded.
        predicted / predicted_used / used_predicted: experts predicted for the layer (after the
            budget), those of them the layer then used, and the experts used on visits that had
            a prediction: precision = predicted_used / predicted, recall = predicted_used /
            used_predicted.
        prefetch_loads / prefetch_wasted: experts loaded by prefetch / loaded and not used on
            the visit they were loaded for.
        bytes_moved / bytes_wasted: bytes copied into the fast tier (demand, streamed and
            prefetch) / bytes
            of wasted prefetches.
        stall_s: seconds the compute waited for weights (synchronous loads and waits for
            prefetches still in flight; the store fills it).
        paths: uses per serving path (:data:`PATHS`).
        resident_bytes / peak_resident_bytes: bytes of the layer's resident experts, now / at
            most (for a shared pool, the layer's own share).
    """

    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    predicted: int = 0
    predicted_used: int = 0
    used_predicted: int = 0
    prefetch_loads: int = 0
    prefetch_wasted: int = 0
    bytes_moved: int = 0
    bytes_wasted: int = 0
    stall_s: float = 0.0
    paths: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(PATHS, 0))
    resident_bytes: int = 0
    peak_resident_bytes: int = 0

    @property
    def hit_rate(self) -> float | None:
        total = self.hits + self.misses
        return self.hits / total if total else None

    @property
    def precision(self) -> float | None:
        return self.predicted_used / self.predicted if self.predicted else None

    @property
    def recall(self) -> float | None:
        return self.predicted_used / self.used_predicted if self.used_predicted else None

    def as_dict(self) -> dict[str, Any]:
        """Plain numbers (with ``hit_rate``, ``precision``, ``recall``; ``None`` = undefined)."""
        out = dataclasses.asdict(self)
        out.update(hit_rate=self.hit_rate, precision=self.precision, recall=self.recall)
        return out


class ExpertCache:
    """Residency of ``(layer, expert)`` pairs in ``num_layers * slots`` slots.

    Args:
        num_layers / num_experts: L and E.
        slots: slots per layer (c); a shared policy pools ``L * c``.
        expert_bytes: bytes of one expert (for the byte counters and the prefetch budget).
        policy: a name of :data:`~moe_router.offload.policies.POLICIES`.
        decay: frequency decay per step (``lfu``, ``layer_aware``).
        pinned: layer -> experts kept resident for good (they take that layer's slots).
        prefetch_bytes: bytes prefetch may move per step (``None``: only the slots limit it).

    Raises:
        ConfigError: bad sizes, policy or decay; more pinned experts than a layer's slots.
    """

    def __init__(self, num_layers: int, num_experts: int, slots: int, expert_bytes: int = 1, *,
                 policy: str = "lru", decay: float = 0.9,
                 pinned: Mapping[int, Iterable[int]] | None = None,
                 prefetch_bytes: int | None = None) -> None:
        for name, value, low in (("num_layers", num_layers, 1), ("num_experts", num_experts, 1),
                                 ("slots", slots, 1), ("expert_bytes", expert_bytes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(name, value, f"an int >= {low}")
        if slots > num_experts:
            raise ConfigError("slots", slots, f"at most num_experts={num_experts}")
        if prefetch_bytes is not None and prefetch_bytes < 0:
            raise ConfigError("prefetch_bytes", prefetch_bytes, "None or an int >= 0")
        self.num_layers, self.num_experts, self.slots = num_layers, num_experts, slots
        self.expert_bytes = expert_bytes
        self.prefetch_bytes = prefetch_bytes
        self.policy = make_policy(policy, decay=decay, num_layers=num_layers)
        self.policy_name = policy
        self.metrics = [LayerMetrics() for _ in range(num_layers)]
        self.now = 0
        self.step = 0
        self._step_prefetch_bytes = 0
        self._slot: dict[Key, int] = {}
        self._layer_keys: list[set[Key]] = [set() for _ in range(num_layers)]
        if self.policy.shared:
            self._free: list[list[int]] = [list(range(num_layers * slots - 1, -1, -1))]
        else:
            self._free = [list(range((i + 1) * slots - 1, i * slots - 1, -1))
                          for i in range(num_layers)]
        self._spec: set[Key] = set()  # loaded by prefetch, not used yet
        self._stale: set[Key] = set()  # wrong guesses: evicted first
        self._pred: dict[int, frozenset[int]] = {}
        self.peak_resident_bytes = 0
        self.pinned: frozenset[Key] = frozenset()
        if pinned:
            self._pin(pinned)

    # ----- state ---------------------------------------------------------------------------
    @property
    def total_slots(self) -> int:
        return self.num_layers * self.slots

    def resident(self, layer: int | None = None) -> dict[Key, int]:
        """``(layer, expert) -> slot`` of the resident experts (of one layer, or all)."""
        if layer is None:
            return dict(self._slot)
        return {k: self._slot[k] for k in self._layer_keys[layer]}

    def lookup(self, layer: int, expert: int) -> int | None:
        """The slot holding the expert, or ``None`` (no side effect)."""
        return self._slot.get((layer, expert))

    @property
    def resident_bytes(self) -> int:
        return len(self._slot) * self.expert_bytes

    def _check(self, layer: int, expert: int) -> None:
        if not 0 <= layer < self.num_layers:
            raise InputError("layer", f"expected 0 <= layer < {self.num_layers}, got {layer}")
        if not 0 <= expert < self.num_experts:
            raise InputError("expert", f"expected 0 <= expert < {self.num_experts}, got "
                             f"{expert}")

    def _pin(self, pinned: Mapping[int, Iterable[int]]) -> None:
        keys = set()
        for layer, experts in pinned.items():
            experts = sorted(set(int(e) for e in experts))
            if len(experts) > self.slots:
                raise ConfigError("pinned", f"{len(experts)} experts of layer {layer}",
                                  f"at most slots={self.slots} per layer")
            for e in experts:
                self._check(int(layer), e)
                keys.add((int(layer), e))
        self.pinned = frozenset(keys)
        for key in sorted(keys):
            slot = self._take_slot(key[0], set())
            assert slot is not None
            self._place(key, slot)

    # ----- the step ------------------------------------------------------------------------
    def begin_step(self) -> None:
        """A new pass through the layers (decays frequencies, resets the prefetch budget)."""
        self.step += 1
        self._step_prefetch_bytes = 0

    def use(self, layer: int, expert: int) -> int | None:
        """Record a use of the expert: its slot on a hit, ``None`` on a miss."""
        self._check(layer, expert)
        key = (layer, expert)
        self.now += 1
        m = self.metrics[layer]
        self.policy.touch(key, self.now, self.step)
        slot = self._slot.get(key)
        if slot is None:
            m.misses += 1
            return None
        m.hits += 1
        m.paths["resident"] += 1
        self._stale.discard(key)
        if key in self._spec:
            self._spec.discard(key)
            m.prefetch_hits += 1
        return slot

    def admit(self, layer: int, expert: int, protect: Iterable[Key] = ()) -> int | None:
        """Make the expert resident after a miss: the slot to fill (counted as moved bytes),
        or ``None`` when every candidate slot is protected or pinned (then stream it)."""
        self._check(layer, expert)
        key = (layer, expert)
        if key in self._slot:
            return self._slot[key]
        slot = self._take_slot(layer, set(protect) | {key})
        if slot is None:
            return None
        self._place(key, slot)
        self.metrics[layer].bytes_moved += self.expert_bytes
        return slot

    def count_path(self, layer: int, path: str) -> None:
        """Count a miss served by ``path`` (``moved``, ``there``, ``streamed``); a streamed
        expert (read into the staging buffer, not cached) counts as moved bytes."""
        self.metrics[layer].paths[path] += 1
        if path == "streamed":
            self.metrics[layer].bytes_moved += self.expert_bytes

    def predict(self, layer: int, experts: Sequence[int],
                protect: Iterable[Key] = ()) -> list[tuple[int, int]]:
        """Record the experts predicted for ``layer`` (best first) and admit the missing ones
        as speculative entries while the step's byte budget lasts; returns the
        ``(expert, slot)`` pairs to load."""
        experts = list(dict.fromkeys(int(e) for e in experts if int(e) >= 0))
        for e in experts:
            self._check(layer, e)
        budget = self.prefetch_bytes
        kept, loads = [], []
        guard = set(protect) | {(layer, e) for e in experts}
        for e in experts:
            key = (layer, e)
            if key in self._slot:
                kept.append(e)
                self._stale.discard(key)
                continue
            if budget is not None and self._step_prefetch_bytes + self.expert_bytes > budget:
                break
            slot = self._take_slot(layer, guard)
            if slot is None:
                break
            self._place(key, slot)
            self._spec.add(key)
            self._step_prefetch_bytes += self.expert_bytes
            m = self.metrics[layer]
            m.prefetch_loads += 1
            m.bytes_moved += self.expert_bytes
            kept.append(e)
            loads.append((e, slot))
        self._pred[layer] = frozenset(kept)
        return loads

    def end_layer(self, layer: int, used: Iterable[int]) -> None:
        """The layer's visit is over: score its prediction, mark unused prefetches stale."""
        used_set = {int(e) for e in used if int(e) >= 0}
        m = self.metrics[layer]
        pred = self._pred.pop(layer, None)
        if pred is not None:
            m.predicted += len(pred)
            m.predicted_used += len(pred & used_set)
            m.used_predicted += len(used_set)
        for key in [k for k in self._spec if k[0] == layer]:
            self._spec.discard(key)
            self._stale.add(key)
            m.prefetch_wasted += 1
            m.bytes_wasted += self.expert_bytes

    # ----- slots ---------------------------------------------------------------------------
    def _pool(self, layer: int) -> int:
        return 0 if self.policy.shared else layer

    def _take_slot(self, layer: int, protect: set[Key]) -> int | None:
        free = self._free[self._pool(layer)]
        if free:
            return free.pop()
        if self.policy.shared:
            candidates = [k for k in self._slot if k not in self.pinned and k not in protect]
        else:
            candidates = [k for k in self._layer_keys[layer]
                          if k not in self.pinned and k not in protect]
        if not candidates:
            return None
        stale = [k for k in candidates if k in self._stale]
        victim = self.policy.victim(stale or candidates, self.now, self.step, layer)
        return self._evict(victim)

    def _place(self, key: Key, slot: int) -> None:
        self._slot[key] = slot
        self._layer_keys[key[0]].add(key)
        self.policy.inserted(key, self.now, self.step)
        m = self.metrics[key[0]]
        m.resident_bytes += self.expert_bytes
        m.peak_resident_bytes = max(m.peak_resident_bytes, m.resident_bytes)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _evict(self, key: Key) -> int:
        slot = self._slot.pop(key)
        self._layer_keys[key[0]].discard(key)
        self.policy.removed(key)
        self._stale.discard(key)
        m = self.metrics[key[0]]
        m.resident_bytes -= self.expert_bytes
        if key in self._spec:  # a prefetch evicted before its layer ran
            self._spec.discard(key)
            m.prefetch_wasted += 1
            m.bytes_wasted += self.expert_bytes
        return slot

    def summary(self) -> dict[str, Any]:
        """Per-layer :meth:`LayerMetrics.as_dict` and totals (hit rate, precision, recall,
        bytes, stall; ``peak_resident_bytes`` of the whole cache), with the policy, slots per
        layer, E and the bytes of one expert: the ``"offload"`` section of a debugger session
        record (:mod:`moe_router.debug.session`)."""
        total = LayerMetrics()
        for m in self.metrics:
            for f in ("hits", "misses", "prefetch_hits", "predicted", "predicted_used",
                      "used_predicted", "prefetch_loads", "prefetch_wasted", "bytes_moved",
                      "bytes_wasted", "stall_s", "resident_bytes"):
                setattr(total, f, getattr(total, f) + getattr(m, f))
            for p in PATHS:
                total.paths[p] += m.paths[p]
        total.peak_resident_bytes = self.peak_resident_bytes
        return {"layers": [m.as_dict() for m in self.metrics], "total": total.as_dict(),
                "policy": self.policy_name, "slots": self.slots, "num_experts": self.num_experts,
                "expert_bytes": self.expert_bytes}
