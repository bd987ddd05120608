"""The NumPy backend: the CPU fallback and the oracle every other backend is tested against."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .backend import Array, Backend, DType

_DTYPES = {"float32": np.float32, "int": np.int64, "int32": np.int32, "bool": np.bool_}
_ERF = np.vectorize(math.erf, otypes=[np.float64])


class NumpyBackend(Backend):
    """Backend over ``numpy.ndarray``; float math in float32, indices in int64."""

    name = "numpy"
    framework = "numpy"

    def is_array(self, x: Any) -> bool:
        return isinstance(x, (np.ndarray, np.generic))

    def asarray(self, x: Any, dtype: DType | None = None, like: Array | None = None) -> Array:
        return np.asarray(x, dtype=None if dtype is None else _DTYPES[dtype])

    def to_numpy(self, x: Array) -> Any:
        return np.asarray(x)

    def cast(self, x: Array, dtype: DType) -> Array:
        return np.asarray(x).astype(_DTYPES[dtype], copy=False)

    def cast_like(self, x: Array, like: Array) -> Array:
        return np.asarray(x).astype(np.asarray(like).dtype, copy=False)

    def is_host(self, x: Array) -> bool:
        return True

    def dtype_kind(self, x: Array) -> str:
        dtype = np.asarray(x).dtype
        if dtype.kind == "V" and "float" in dtype.name:  # ml_dtypes bfloat16 / float8 (kind 'V')
            return "f"
        return dtype.kind

    def shape(self, x: Array) -> tuple[int | None, ...]:
        return tuple(np.shape(x))

    def dim(self, x: Array, axis: int) -> Any:
        return int(np.shape(x)[axis])

    def arange(self, n: Any, like: Array) -> Array:
        return np.arange(int(n), dtype=np.int64)

    def full(self, shape: tuple[Any, ...], value: float | int | bool, dtype: DType,
             like: Array) -> Array:
        return np.full(tuple(int(s) for s in shape), value, dtype=_DTYPES[dtype])

    def log(self, x: Array) -> Array:
        with np.errstate(divide="ignore"):
            return np.log(x)

    def sigmoid(self, x: Array) -> Array:
        # split by sign so neither branch overflows
        x = np.asarray(x)
        out = np.empty_like(x)
        pos = x >= 0
        out[pos] = 1.0 / (1.0 + np.exp(-x[pos]))
        ex = np.exp(x[~pos])
        out[~pos] = ex / (1.0 + ex)
        return out

    def softmax(self, x: Array, axis: int = -1) -> Array:
        ex = np.exp(x - self._safe_max(x, axis))
        # sum in ascending order: permuted rows get bitwise-equal normalizers
        return ex / np.sum(np.sort(ex, axis=axis), axis=axis, keepdims=True)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return x - np.expand_dims(self.logsumexp(x, axis), axis)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        m = self._safe_max(x, axis)
        with np.errstate(divide="ignore"):  # an all -inf row: log(0) = -inf
            return np.log(np.sum(np.exp(x - m), axis=axis)) + np.squeeze(m, axis=axis)

    def relu(self, x: Array) -> Array:
        x = np.asarray(x)
        return np.maximum(x, np.zeros((), x.dtype))

    def silu(self, x: Array) -> Array:
        return np.asarray(x) * self.sigmoid(x)

    def gelu(self, x: Array) -> Array:
        # exact erf GELU in float64, cast back (NumPy has no vectorized erf)
        x = np.asarray(x)
        x64 = x.astype(np.float64)
        return (0.5 * x64 * (1.0 + _ERF(x64 / math.sqrt(2.0)))).astype(x.dtype)

    def stop_gradient(self, x: Array) -> Array:
        return x

    @staticmethod
    def _safe_max(x: Array, axis: int) -> Array:
        if x.shape[axis] == 0:
            return np.zeros_like(np.sum(x, axis=axis, keepdims=True))
        m = np.max(x, axis=axis, keepdims=True)
        return np.where(np.isfinite(m), m, 0.0).astype(x.dtype)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        out = np.where(cond, a, b)
        ref = a if isinstance(a, np.ndarray) else b
        return out.astype(ref.dtype, copy=False) if isinstance(ref, np.ndarray) else out

    def maximum(self, a: Array, b: Array | float) -> Array:
        return np.maximum(a, np.asarray(b, dtype=np.asarray(a).dtype))

    def minimum(self, a: Array, b: Array | float) -> Array:
        return np.minimum(a, np.asarray(b, dtype=np.asarray(a).dtype))

    def floor(self, x: Array) -> Array:
        return np.floor(x)

    def ceil(self, x: Array) -> Array:
        return np.ceil(x)

    def sqrt(self, x: Array) -> Array:
        return np.sqrt(x)

    def sum(self, x: Array, axis: int | None = None) -> Array:
        x = np.asarray(x)
        if x.dtype == np.bool_:
            x = x.astype(np.int64)
        return np.sum(x, axis=axis)

    def max(self, x: Array, axis: int | None = None) -> Array:
        return np.max(x, axis=axis)

    def cumsum(self, x: Array, axis: int) -> Array:
        return np.cumsum(x, axis=axis, dtype=np.asarray(x).dtype)

    def all_finite(self, x: Array) -> bool:
        return bool(np.all(np.isfinite(x)))

    def argsort(self, x: Array, axis: int = -1) -> Array:
        return np.argsort(np.asarray(x), axis=axis, kind="stable").astype(np.int64)

    def argsort_desc(self, x: Array, axis: int = -1) -> Array:
        # negate then stable ascending sort: equal values keep ascending index order
        return np.argsort(-np.asarray(x), axis=axis, kind="stable").astype(np.int64)

    def invert_permutation(self, perm_S: Array) -> Array:
        perm_S = np.asarray(perm_S)
        inverse_S = np.empty(perm_S.shape, dtype=np.int64)
        inverse_S[perm_S] = np.arange(perm_S.shape[0], dtype=np.int64)
        return inverse_S

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        return np.take_along_axis(x, idx, axis=axis)

    def gather_rows(self, x: Array, idx: Array) -> Array:
        return np.asarray(x)[idx]

    def scatter_rows(self, x: Array, idx: Array, rows: Array) -> Array:
        out = np.array(x, copy=True)
        out[np.asarray(idx)] = rows
        return out

    def one_hot(self, idx: Array, n: int, dtype: DType = "float32") -> Array:
        idx = np.asarray(idx)
        return (idx[..., None] == np.arange(n)).astype(_DTYPES[dtype])

    def bincount(self, idx: Array, n: int) -> Array:
        flat = np.asarray(idx).reshape(-1)
        return np.bincount(flat[flat >= 0], minlength=n)[:n].astype(np.int64)

    def reshape(self, x: Array, shape: tuple[Any, ...]) -> Array:
        return np.reshape(x, shape)

    def concat(self, xs: list[Array], axis: int) -> Array:
        return np.concatenate(xs, axis=axis)

    def random_uniform(self, rng: Any, like: Array) -> Array:
        return _generator(rng).random(np.shape(like), dtype=np.float32)

    def random_normal(self, rng: Any, like: Array) -> Array:
        return _generator(rng).standard_normal(np.shape(like), dtype=np.float32)


def _generator(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)
