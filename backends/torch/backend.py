"""The PyTorch backend: the :class:`~moe_router.backend.Backend` primitives on ``torch.Tensor``.

Float math in float32, indices in int64. Sorting uses ``torch.sort(stable=True)`` on the negated
values, so ties go to the lower index exactly like the NumPy oracle (``torch.topk`` gives no such
guarantee). :meth:`TorchBackend.sigmoid` is built on ``torch.exp``: ``torch.sigmoid``'s CPU kernel
rounds the elements past its last full vector differently, so equal logits could get unequal
scores. Everything is traceable by ``torch.compile(fullgraph=True)`` (no Python branches on
tensor values; NumPy constants are left to Dynamo).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from moe_router.backend import NO_SCOPE, Array, Backend, DType

_DTYPES = {"float32": torch.float32, "int": torch.int64, "int32": torch.int32,
           "bool": torch.bool}


def _device(like: Any) -> torch.device | None:
    return like.device if isinstance(like, torch.Tensor) else None


class TorchBackend(Backend):
    """Backend over ``torch.Tensor`` (any device); index dtype int64."""

    name = "torch"
    framework = "torch"

    # ----- types, conversion, shapes ----------------------------------------------------------
    def is_array(self, x: Any) -> bool:
        return isinstance(x, torch.Tensor)

    def asarray(self, x: Any, dtype: DType | None = None, like: Array | None = None) -> Array:
        torch_dtype = None if dtype is None else _DTYPES[dtype]
        device = _device(like)
        if isinstance(x, torch.Tensor):
            return x.to(device=device or x.device, dtype=torch_dtype or x.dtype)
        if isinstance(x, np.ndarray) and not torch.compiler.is_compiling():
            # (under torch.compile an ndarray is a constant Dynamo converts itself; it cannot
            # read ndarray attributes)
            if x.dtype == np.float64 and torch_dtype is None:
                torch_dtype = torch.float32  # keep the backend's float32 convention
            if not x.flags.writeable:  # torch refuses to alias read-only memory
                x = x.copy()
        return torch.as_tensor(x, dtype=torch_dtype, device=device)

    def to_numpy(self, x: Array) -> Any:
        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            x = x.float()
        return x.numpy()

    def cast(self, x: Array, dtype: DType) -> Array:
        target = _DTYPES[dtype]
        return x if x.dtype == target else x.to(target)  # skip the dispatch of a no-op .to()

    def cast_like(self, x: Array, like: Array) -> Array:
        return x if x.dtype == like.dtype else x.to(like.dtype)

    def is_host(self, x: Array) -> bool:
        return x.device.type == "cpu"

    def dtype_kind(self, x: Array) -> str:
        d = x.dtype
        if d == torch.bool:
            return "b"
        if d.is_complex:
            return "c"
        if d.is_floating_point:
            return "f"
        return "u" if d == torch.uint8 else "i"

    def shape(self, x: Array) -> tuple[int | None, ...]:
        return tuple(int(s) for s in x.shape)

    def dim(self, x: Array, axis: int) -> Any:
        return int(x.shape[axis])

    def is_tracing(self, x: Array) -> bool:
        return bool(torch.compiler.is_compiling())

    def scope(self, name: str) -> Any:
        """``torch.profiler.record_function(name)`` while a profiler runs; nothing otherwise
        (about 0.1 us) and under ``torch.compile`` (Dynamo would drop it with a warning)."""
        if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
            return NO_SCOPE
        return torch.profiler.record_function(name)

    def layer_stages(self) -> Any:
        """The layer step's torch stages (one cached instance): float32 router logits outside
        autocast and a short exact top-k path at inference (``stages.TorchStages``)."""
        stages = self.__dict__.get("_layer_stages")
        if stages is None:
            from .stages import TorchStages

            stages = self.__dict__["_layer_stages"] = TorchStages(self)
        return stages

    # ----- creation ---------------------------------------------------------------------------
    def arange(self, n: Any, like: Array) -> Array:
        return torch.arange(int(n), dtype=torch.int64, device=_device(like))

    def full(self, shape: tuple[Any, ...], value: float | int | bool, dtype: DType,
             like: Array) -> Array:
        return torch.full(tuple(int(s) for s in shape), value, dtype=_DTYPES[dtype],
                          device=_device(like))

    # ----- elementwise and reductions ---------------------------------------------------------
    def log(self, x: Array) -> Array:
        return torch.log(x)

    def sigmoid(self, x: Array) -> Array:
        # torch.sigmoid's CPU kernel rounds the elements past its last full vector (scalar
        # std::exp) unlike the others (SLEEF): equal logits could get unequal scores and break
        # exact ties by position. exp is consistent; the split by sign avoids overflow (and keeps
        # both branches' gradients finite for torch.where).
        exp_neg = torch.exp(-torch.clamp(x, min=0.0))
        exp_pos = torch.exp(torch.clamp(x, max=0.0))
        return torch.where(x >= 0, 1.0 / (1.0 + exp_neg), exp_pos / (1.0 + exp_pos))

    def softmax(self, x: Array, axis: int = -1) -> Array:
        # exp(x - max) / sum of the exponentials sorted ascending (the Backend contract: rows
        # that are permutations of each other get bitwise-equal normalizers)
        top = torch.amax(x, dim=axis, keepdim=True) if x.shape[axis] else torch.zeros_like(
            x.sum(dim=axis, keepdim=True))
        top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
        ex = torch.exp(x - top)
        return ex / torch.sort(ex, dim=axis).values.sum(dim=axis, keepdim=True)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return torch.log_softmax(x, dim=axis)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        return torch.logsumexp(x, dim=axis)

    def relu(self, x: Array) -> Array:
        return torch.relu(x)

    def silu(self, x: Array) -> Array:
        return torch.nn.functional.silu(x)

    def gelu(self, x: Array) -> Array:
        return torch.nn.functional.gelu(x)  # approximate="none": the exact erf form

    def stop_gradient(self, x: Array) -> Array:
        return x.detach()

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        if not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor):
            a = torch.as_tensor(a, device=cond.device)
        return torch.where(cond, a, b)

    def maximum(self, a: Array, b: Array | float) -> Array:
        if isinstance(b, torch.Tensor):
            return torch.maximum(a, b.to(a.dtype))
        return torch.clamp(a, min=b)

    def minimum(self, a: Array, b: Array | float) -> Array:
        if isinstance(b, torch.Tensor):
            return torch.minimum(a, b.to(a.dtype))
        return torch.clamp(a, max=b)

    def floor(self, x: Array) -> Array:
        return torch.floor(x)

    def ceil(self, x: Array) -> Array:
        return torch.ceil(x)

    def sqrt(self, x: Array) -> Array:
        return torch.sqrt(x)

    def sum(self, x: Array, axis: int | None = None) -> Array:
        if x.dtype == torch.bool:
            x = x.to(torch.int64)
        return torch.sum(x) if axis is None else torch.sum(x, dim=axis)

    def max(self, x: Array, axis: int | None = None) -> Array:
        return torch.amax(x) if axis is None else torch.amax(x, dim=axis)

    def cumsum(self, x: Array, axis: int) -> Array:
        return torch.cumsum(x, dim=axis, dtype=x.dtype)

    def all_finite(self, x: Array) -> bool:
        # one reduction: a finite sum proves every entry finite; only an overflowing (or
        # non-finite) sum needs the elementwise check
        return math.isfinite(float(x.detach().sum())) or bool(torch.isfinite(x).all())

    # ----- selection ------------------------------------------------------------------------
    def argsort(self, x: Array, axis: int = -1) -> Array:
        if x.dtype == torch.bool:
            x = x.to(torch.int64)
        return torch.sort(x, dim=axis, stable=True).indices

    def argsort_desc(self, x: Array, axis: int = -1) -> Array:
        if x.dtype == torch.bool:
            x = x.to(torch.int64)
        # stable ascending sort of the negation: ties keep ascending index order
        return torch.sort(-x, dim=axis, stable=True).indices

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        values, indices = torch.sort(-x, dim=-1, stable=True)
        return -values[..., :k], indices[..., :k]

    def invert_permutation(self, perm_S: Array) -> Array:
        perm_S = perm_S.to(torch.int64)
        arange_S = torch.arange(perm_S.shape[0], dtype=torch.int64, device=perm_S.device)
        return torch.empty_like(perm_S).scatter(0, perm_S, arange_S)

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        return torch.take_along_dim(x, idx, dim=axis)

    def gather_rows(self, x: Array, idx: Array) -> Array:
        return x[idx]

    def scatter_rows(self, x: Array, idx: Array, rows: Array) -> Array:
        return x.index_copy(0, idx.to(torch.int64), rows.to(x.dtype))

    def one_hot(self, idx: Array, n: int, dtype: DType = "float32") -> Array:
        arange = torch.arange(n, dtype=idx.dtype, device=idx.device)
        return (idx[..., None] == arange).to(_DTYPES[dtype])

    def bincount(self, idx: Array, n: int) -> Array:
        flat = idx.reshape(-1)
        valid = (flat >= 0).to(torch.int64)
        counts = torch.zeros(n, dtype=torch.int64, device=idx.device)
        return counts.scatter_add(0, torch.clamp(flat, min=0).to(torch.int64), valid)

    def reshape(self, x: Array, shape: tuple[Any, ...]) -> Array:
        return torch.reshape(x, tuple(int(s) for s in shape))

    def unstack(self, x: Array) -> tuple[Array, ...]:
        return x.unbind(0)

    def concat(self, xs: list[Array], axis: int) -> Array:
        return torch.cat(xs, dim=axis)

    # ----- randomness -------------------------------------------------------------------------
    def random_uniform(self, rng: Any, like: Array) -> Array:
        return torch.rand(like.shape, generator=_generator(rng, like), dtype=torch.float32,
                          device=like.device)

    def random_normal(self, rng: Any, like: Array) -> Array:
        return torch.randn(like.shape, generator=_generator(rng, like), dtype=torch.float32,
                           device=like.device)


def _generator(rng: Any, like: Array) -> torch.Generator | None:
    """A ``torch.Generator`` from a generator, an int seed, or ``None`` (the global one)."""
    if rng is None or isinstance(rng, torch.Generator):
        return rng
    if isinstance(rng, (int, np.integer)):
        return torch.Generator(device=like.device).manual_seed(int(rng))
    raise TypeError(f"rng: expected a torch.Generator, an int seed or None, got {type(rng)!r}")
