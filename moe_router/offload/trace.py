"""Routing traces: which experts each layer used at each step, and what was predicted.

A :class:`RoutingTrace` holds ``experts`` ``(S, L, W)`` int32: the distinct experts layer ``l``
used at step ``s`` (a decode step, or one forward of a batch: the union over its tokens), ``-1``
in unused places; and optionally ``predicted`` ``(S, L, P)``: the experts predicted for layer
``l`` at step ``s`` *before* it ran (e.g. layer ``l``'s router applied to layer ``l - 1``'s
hidden state), best first, ``-1`` where there is no prediction (layer 0). Traces are plain
NumPy (``.npz`` on disk), recorded from real forwards of a torch model by
:func:`~moe_router.offload.record_trace` or made by
:func:`~moe_router.offload.synthetic.zipf_markov_trace`, and replayed by
:func:`~moe_router.offload.simulate`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import InputError, InputTypeError


def _ids(name: str, value: Any, num_experts: int | None) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as err:  # ragged nested lists
        raise InputError(name, f"expected an (S, L, W) int array, got {err}") from err
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and arr.size == 0):
        raise InputTypeError(name, f"expected integer expert ids, got dtype {arr.dtype}")
    if arr.ndim != 3:
        raise InputError(name, f"expected shape (steps, layers, slots), got {arr.shape}")
    arr = arr.astype(np.int32)
    if arr.size and arr.min() < -1:
        raise InputError(name, f"expected ids >= -1 (-1 = unused), got {int(arr.min())}")
    if num_experts is not None and arr.size and arr.max() >= num_experts:
        raise InputError(name, f"expected ids < num_experts={num_experts}, got "
                         f"{int(arr.max())}")
    return arr


@dataclasses.dataclass(frozen=True)
class RoutingTrace:
    """Experts per step and layer (see the module docstring).

    Attributes:
        experts: ``(S, L, W)`` int32, ``-1`` = unused.
        num_experts: E.
        predicted: ``(S, L, P)`` int32 or ``None``.
    """

    experts: np.ndarray
    num_experts: int
    predicted: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise InputError("num_experts", f"expected an int >= 1, got {self.num_experts!r}")
        object.__setattr__(self, "experts", _ids("experts", self.experts, self.num_experts))
        if self.predicted is not None:
            pred = _ids("predicted", self.predicted, self.num_experts)
            if pred.shape[:2] != self.experts.shape[:2]:
                raise InputError("predicted", f"expected (S, L) = {self.experts.shape[:2]} "
                                 f"leading dims, got {pred.shape}")
            object.__setattr__(self, "predicted", pred)

    @property
    def steps(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @classmethod
    def from_steps(cls, steps: Sequence[Sequence[Sequence[int]]], num_experts: int,
                   predicted: Sequence[Sequence[Sequence[int]]] | None = None) -> RoutingTrace:
        """From nested lists ``steps[s][l] = experts used`` (ragged allowed; duplicates are
        dropped, order kept)."""
        return cls(_pad(steps), num_experts, None if predicted is None else _pad(predicted))

    def profile(self) -> np.ndarray:
        """``(L, E)`` float64: each layer's share of uses per expert (rows sum to 1, NaN for a
        layer without uses): the input :func:`pinned_from_profile` takes, like the debugger's
        ``get_expert_utilization()``."""
        L, E = self.num_layers, self.num_experts
        counts = np.zeros((L, E), dtype=np.float64)
        for layer in range(L):
            ids = self.experts[:, layer].reshape(-1)
            counts[layer] = np.bincount(ids[ids >= 0], minlength=E)[:E]
        with np.errstate(invalid="ignore", divide="ignore"):
            return counts / counts.sum(axis=1, keepdims=True)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write an ``.npz`` file."""
        arrays = {"experts": self.experts, "num_experts": np.int64(self.num_experts)}
        if self.predicted is not None:
            arrays["predicted"] = self.predicted
        np.savez_compressed(path, **arrays)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RoutingTrace:
        """Read a file written by :meth:`save`."""
        with np.load(path) as data:
            return cls(data["experts"], int(data["num_experts"]),
                       data["predicted"] if "predicted" in data else None)


def _pad(steps: Sequence[Sequence[Sequence[int]]]) -> np.ndarray:
    rows = [[list(dict.fromkeys(int(e) for e in layer if int(e) >= 0)) for layer in step]
            for step in steps]
    S = len(rows)
    L = max((len(step) for step in rows), default=0)
    W = max((len(layer) for step in rows for layer in step), default=0)
    out = np.full((S, L, max(W, 1)), -1, dtype=np.int32)
    for s, step in enumerate(rows):
        for layer, ids in enumerate(step):
            out[s, layer, :len(ids)] = ids
    return out


def pinned_from_profile(profile: Any, per_layer: int) -> dict[int, tuple[int, ...]]:
    """The ``per_layer`` hottest experts of each layer of a ``(L, E)`` utilisation profile
    (e.g. ``MoEDebugger.get_expert_utilization()`` or :meth:`RoutingTrace.profile`; a NaN row,
    a layer without tokens, pins nothing), as ``OffloadConfig.pinned`` / ``simulate(pinned=)``
    take them.

    Raises:
        InputError: ``profile`` is not 2-D or ``per_layer`` is negative.
    """
    arr = np.asarray(profile, dtype=np.float64)
    if arr.ndim != 2:
        raise InputError("profile", f"expected a (layers, experts) array, got shape {arr.shape}")
    if not isinstance(per_layer, int) or per_layer < 0:
        raise InputError("per_layer", f"expected an int >= 0, got {per_layer!r}")
    out: dict[int, tuple[int, ...]] = {}
    for layer, row in enumerate(arr):
        if per_layer == 0 or not np.isfinite(row).all():
            continue
        order = np.argsort(-row, kind="stable")[:per_layer]
        out[layer] = tuple(sorted(int(e) for e in order if row[e] > 0))
    return out
