"""``ExpertStore``: tiered expert weights for offloaded MoE layers (PyTorch).

Tiers:

- **fast tier** (the "device" tier): one ``(slots, expert numel)`` pool on the compute device;
  each slot is one contiguous buffer holding one expert's ``w_gate`` ``(D, F)``, ``w_up``
  ``(D, F)`` and ``w_down`` ``(F, D)`` in the layer's layout. Which expert sits in which slot is
  decided by the core's :class:`~moe_router.offload.cache.ExpertCache` (policy, pinning,
  prefetch bookkeeping, metrics). On a CPU-only machine this tier is resident memory.
- **host tier** (:class:`MemorySource`): every expert in host memory (pinned once where a GPU
  is used); a miss may be computed there instead of moved (the Fiddler rule).
- **disk tier** (:class:`CheckpointSource`): safetensors read lazily, one expert's tensors at a
  time, never a whole file (:class:`~moe_router.offload.safetensors_io.ByteReader` counts).

Resident expert bytes never exceed the pool (the budget) plus one staging buffer (one expert, for
a miss that finds every slot protected). Prefetches run on one background thread (CPU) that
reads into the slots chosen by the cache; the compute waits for an in-flight slot before using
or reusing it, and that wait is the stall time.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from moe_router.errors import InputError
from moe_router.offload.cache import ExpertCache
from moe_router.offload.config import OffloadConfig
from moe_router.offload.safetensors_io import ByteReader, TensorEntry

#: the portable names of one expert's tensors, in slot order
ROLES = ("experts.w_gate", "experts.w_up", "experts.w_down")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
           "float64": torch.float64}


@dataclasses.dataclass(frozen=True)
class ExpertLayout:
    """One expert's tensors: ``shapes`` per role of :data:`ROLES` (``None``: no gate), dtype."""

    shapes: tuple[tuple[int, ...] | None, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes if s is not None)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, flat: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """``(w_gate, w_up, w_down)`` contiguous views of one expert's flat buffer."""
        out, start = [], 0
        for shape in self.shapes:
            if shape is None:
                out.append(None)
                continue
            n = int(torch.Size(shape).numel())
            out.append(flat[start:start + n].view(shape))
            start += n
        return tuple(out)


@dataclasses.dataclass(frozen=True)
class Piece:
    """Where one role of one expert is in a checkpoint: ``rows`` of ``entry`` starting at
    ``start`` (a contiguous byte range), stored as ``shape``; ``transpose``: the slot holds its
    transpose."""

    entry: TensorEntry
    start: int
    nbytes: int
    shape: tuple[int, int]
    transpose: bool


class CheckpointSource:
    """The disk tier: experts of a safetensors checkpoint, read one expert at a time.

    ``pieces[(layer, expert)]`` gives each role's :class:`Piece` (``None`` for a missing gate).
    """

    can_compute = False

    def __init__(self, layout: ExpertLayout, pieces: Mapping[tuple[int, int],
                                                           Sequence[Piece | None]],
                 reader: ByteReader | None = None) -> None:
        self.layout, self.pieces = layout, dict(pieces)
        self.reader = reader or ByteReader()

    def read(self, layer: int, expert: int, out: torch.Tensor) -> int:
        """Fill ``out`` (the expert's flat CPU buffer) from the file; returns bytes read."""
        total = 0
        for piece, view in zip(self.pieces[(layer, expert)], self.layout.views(out)):
            if piece is None or view is None:
                continue
            dtype = _DTYPES[piece.entry.dtype]
            if not piece.transpose and dtype == view.dtype:
                total += self.reader.read_into(piece.entry.file, piece.start,
                                               view.view(-1).view(torch.uint8).numpy())
                continue
            tmp = torch.empty(piece.shape, dtype=dtype)
            total += self.reader.read_into(piece.entry.file, piece.start,
                                           tmp.view(-1).view(torch.uint8).numpy())
            view.copy_(tmp.t() if piece.transpose else tmp)
        return total

    def close(self) -> None:
        self.reader.close()


class MemorySource:
    """The host tier: stacked ``(E, ...)`` tensors per layer and role (pinned when asked)."""

    can_compute = True

    def __init__(self, layout: ExpertLayout,
                 tensors: Sequence[tuple[torch.Tensor | None, ...]]) -> None:
        self.layout, self.tensors = layout, list(tensors)

    @classmethod
    def load(cls, source: CheckpointSource, num_layers: int, num_experts: int,
             pin: bool = False) -> MemorySource:
        """Every expert of ``source`` read into host memory, one expert at a time."""
        layout = source.layout
        stacks = []
        buf = torch.empty(layout.numel, dtype=layout.dtype)
        for layer in range(num_layers):
            roles = [None if s is None else torch.empty((num_experts, *s), dtype=layout.dtype,
                                                        pin_memory=pin)
                     for s in layout.shapes]
            for e in range(num_experts):
                source.read(layer, e, buf)
                for stack, view in zip(roles, layout.views(buf)):
                    if stack is not None:
                        stack[e].copy_(view)
            stacks.append(tuple(roles))
        return cls(layout, stacks)

    def views(self, layer: int, expert: int) -> tuple[torch.Tensor | None, ...]:
        return tuple(None if t is None else t[expert] for t in self.tensors[layer])

    def read(self, layer: int, expert: int, out: torch.Tensor) -> int:
        total = 0
        for src, view in zip(self.views(layer, expert), self.layout.views(out)):
            if src is not None and view is not None:
                view.copy_(src, non_blocking=True)
                total += src.numel() * src.element_size()
        return total

    def close(self) -> None:
        pass


@dataclasses.dataclass(frozen=True)
class Costs:
    """Start-up measurements for the compute-where-it-is rule: bytes/s of a source -> fast
    tier copy, FLOP/s of an expert FFN on the host and on the device, and bytes/s of moving
    activations between them (``inf`` when they are the same memory)."""

    copy_bytes_per_s: float
    host_flops: float
    device_flops: float
    link_bytes_per_s: float

    def choose(self, rows: int, layout: ExpertLayout, can_compute: bool) -> str:
        """``"moved"`` or ``"there"`` for a miss with ``rows`` token rows."""
        if not can_compute:
            return "moved"
        flops = 2.0 * rows * layout.numel
        item = torch.empty((), dtype=layout.dtype).element_size()
        width = layout.shapes[1][0] if layout.shapes[1] else 0
        move = layout.nbytes / self.copy_bytes_per_s + flops / self.device_flops
        there = flops / self.host_flops + 2.0 * rows * width * item / self.link_bytes_per_s
        return "there" if there < move else "moved"


def _time(fn: Callable[[], Any], repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


class ExpertStore:
    """Expert weights of L offloaded layers behind a per-layer slot budget (module docstring).

    Args:
        source: :class:`CheckpointSource` or :class:`MemorySource`.
        num_layers / num_experts: L and E of the offloaded layers (uniform expert layout).
        config: the :class:`~moe_router.offload.config.OffloadConfig`.
        device: the compute device of the fast tier.
    """

    def __init__(self, source: CheckpointSource | MemorySource, num_layers: int,
                 num_experts: int, config: OffloadConfig,
                 device: torch.device | str = "cpu") -> None:
        self.source, self.config = source, config
        self.layout = source.layout
        self.device = torch.device(device)
        self.num_layers, self.num_experts = num_layers, num_experts
        nbytes = self.layout.nbytes
        self.slots = config.slots(num_layers, num_experts, nbytes)
        self.cache = ExpertCache(num_layers, num_experts, self.slots, nbytes,
                                 policy=config.policy, decay=config.decay,
                                 pinned=dict(config.pinned) or None,
                                 prefetch_bytes=config.prefetch_bytes)
        pin = self.device.type == "cuda"
        self.pool = torch.empty((self.cache.total_slots, self.layout.numel),
                                dtype=self.layout.dtype, device=self.device)
        self.staging = torch.empty(self.layout.numel, dtype=self.layout.dtype,
                                   device=self.device)
        self._host_buf = torch.empty(self.layout.numel, dtype=self.layout.dtype,
                                     pin_memory=pin) if pin else None
        self._inflight: dict[int, tuple[tuple[int, int], Future[Any]]] = {}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="moe-offload") \
            if config.prefetch else None
        self._stream = torch.cuda.Stream(self.device) if pin else None
        for (layer, expert), slot in sorted(self.cache.resident().items()):  # pinned
            self._fill(layer, expert, self.pool[slot])
        self.costs = self.measure() if config.compute == "auto" else None

    # ----- reading -------------------------------------------------------------------------
    def _fill(self, layer: int, expert: int, out: torch.Tensor) -> None:
        """Copy one expert from the source into ``out`` (a slot or the staging buffer)."""
        if out.device.type == "cpu" or isinstance(self.source, MemorySource):
            self.source.read(layer, expert, out)
            return
        host = torch.empty(self.layout.numel, dtype=self.layout.dtype, pin_memory=True)
        self.source.read(layer, expert, host)
        out.copy_(host, non_blocking=True)

    def _fill_async(self, layer: int, expert: int, slot: int) -> None:
        stream = self._stream
        if stream is None:
            self._fill(layer, expert, self.pool[slot])
            return
        with torch.cuda.stream(stream):
            self._fill(layer, expert, self.pool[slot])
        stream.synchronize()

    def _wait(self, slot: int, layer: int) -> None:
        """Wait for an in-flight prefetch into ``slot`` (counted as the layer's stall)."""
        with self._lock:
            job = self._inflight.pop(slot, None)
        if job is None:
            return
        start = time.perf_counter()
        job[1].result()
        self.cache.metrics[layer].stall_s += time.perf_counter() - start

    def measure(self) -> Costs:
        """Time one expert copy and one expert FFN on each side (the Fiddler constants)."""
        layout = self.layout
        copy_s = _time(lambda: self.source.read(0, 0, self.staging.cpu()
                                                if self.device.type == "cpu" else
                                                torch.empty_like(self.staging, device="cpu")), 2)
        rows, width = 4, layout.shapes[1][0]
        x = torch.randn(rows, width, dtype=layout.dtype)
        w = torch.randn(width, layout.numel // width, dtype=layout.dtype)
        host_s = _time(lambda: x @ w)
        flops = 2.0 * rows * w.numel()
        if self.device.type == "cpu":
            return Costs(layout.nbytes / copy_s, flops / host_s, flops / host_s, float("inf"))
        xd, wd = x.to(self.device), w.to(self.device)

        def device_mm() -> None:
            xd @ wd
            torch.cuda.synchronize(self.device)

        def link() -> None:
            xd.cpu()
        return Costs(layout.nbytes / copy_s, flops / host_s, flops / _time(device_mm),
                     x.numel() * x.element_size() / _time(link))

    # ----- the layer's calls ---------------------------------------------------------------
    def begin_step(self) -> None:
        self.cache.begin_step()

    def weights(self, layer: int, expert: int, rows: int,
                protect: Iterable[tuple[int, int]] = ()) -> tuple[tuple[Any, ...], str]:
        """``((w_gate, w_up, w_down), path)`` for one expert about to run on ``rows`` rows:
        a slot view (``resident`` / ``moved``), the host tensors (``there``: compute on them
        where they are) or the staging buffer (``streamed``)."""
        slot = self.cache.use(layer, expert)
        if slot is not None:
            self._wait(slot, layer)
            return self.layout.views(self.pool[slot]), "resident"
        m = self.cache.metrics[layer]
        choice = self.config.compute
        if choice == "auto":
            assert self.costs is not None
            choice = self.costs.choose(rows, self.layout, self.source.can_compute)
            choice = "there" if choice == "there" else "move"
        if choice == "there" and isinstance(self.source, MemorySource):
            self.cache.count_path(layer, "there")
            return self.source.views(layer, expert), "there"
        start = time.perf_counter()
        slot = self.cache.admit(layer, expert, protect)
        if slot is None:
            out, path = self.staging, "streamed"
        else:
            self._wait(slot, layer)
            out, path = self.pool[slot], "moved"
        self._fill(layer, expert, out)
        m.stall_s += time.perf_counter() - start
        self.cache.count_path(layer, path)
        return self.layout.views(out), path

    def prefetch(self, layer: int, experts: Sequence[int],
                 protect: Iterable[tuple[int, int]] = ()) -> int:
        """Load ``experts`` of ``layer`` ahead (best first, within the budget) on the
        background thread; returns how many loads were issued."""
        loads = self.cache.predict(layer, experts, protect)
        for expert, slot in loads:
            self._wait(slot, layer)  # an older job into the same slot finishes first
            if self._executor is None:
                self._fill(layer, expert, self.pool[slot])
                continue
            job = self._executor.submit(self._fill_async, layer, expert, slot)
            with self._lock:
                self._inflight[slot] = ((layer, expert), job)
        return len(loads)

    def end_layer(self, layer: int, used: Iterable[int]) -> None:
        self.cache.end_layer(layer, used)

    # ----- reporting -----------------------------------------------------------------------
    @property
    def resident_bytes(self) -> int:
        """Bytes of the experts resident in the fast tier now (the staging buffer excluded)."""
        return self.cache.resident_bytes

    @property
    def capacity_bytes(self) -> int:
        """Bytes of the pool plus the staging buffer: the most expert bytes ever resident."""
        item = self.pool.element_size()
        return (self.pool.numel() + self.staging.numel()) * item

    def metrics(self) -> dict[str, Any]:
        """Per-layer and total counters (:meth:`ExpertCache.summary`) plus ``prefetch`` and
        ``compute`` (the config's), the source's read counters (``reads``) and the start-up
        constants (``costs``); a debugger session's ``"offload"`` section is this dict."""
        out = self.cache.summary()
        out["prefetch"], out["compute"] = self.config.prefetch, self.config.compute
        reader = getattr(self.source, "reader", None)
        out["reads"] = dict(reader.stats()) if reader is not None else None
        out["costs"] = None if self.costs is None else dataclasses.asdict(self.costs)
        return out

    def close(self) -> None:
        """Finish the in-flight prefetches, stop the thread, release the files."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._inflight.clear()
        self.source.close()


def check_uniform(layouts: Sequence[ExpertLayout], num_experts: Sequence[int]) -> None:
    """One store needs the same expert layout and count in every layer.

    Raises:
        InputError: naming ``model``, when the offloaded layers differ.
    """
    if len(set(layouts)) > 1 or len(set(num_experts)) > 1:
        raise InputError("model", "its MoE layers have different expert shapes, dtypes or "
                         "counts; one ExpertStore needs them uniform")
