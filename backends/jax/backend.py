"""The JAX backend: the :class:`~moe_router.backend.Backend` primitives on ``jax.Array``.

Float math in float32, indices in int32 (JAX's default index dtype). Sorting is
``jnp.argsort(-x, stable=True)``, so ties go to the lower index exactly like the NumPy oracle.
Shapes are always static under ``jax.jit``: :meth:`JaxBackend.dim` returns a Python int. Importing
this module registers :class:`~moe_router.plan.RoutingPlan` as a pytree (``config`` is static
metadata) so ``route()`` can be returned from ``jax.jit``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moe_router.backend import Array, Backend, DType
from moe_router.errors import InputError
from moe_router.plan import PLAN_ARRAY_FIELDS, RoutingPlan

_DTYPES = {"float32": jnp.float32, "int": jnp.int32, "int32": jnp.int32, "bool": jnp.bool_}


def register_plan_pytree() -> None:
    """Register :class:`RoutingPlan` as a JAX pytree (idempotent; ``config`` is static)."""
    try:
        jax.tree_util.register_dataclass(RoutingPlan, data_fields=list(PLAN_ARRAY_FIELDS),
                                         meta_fields=["config"])
    except ValueError as err:  # registered before (module reloaded): nothing to do
        if "Duplicate" not in str(err):
            raise


register_plan_pytree()


def key_from(rng: Any) -> jax.Array:
    """A ``jax.random`` key from a key, an ``nnx`` RNG stream or an int seed."""
    if rng is None:
        raise InputError("rng", "router noise in training mode needs a jax.random key (e.g. "
                         "rng=jax.random.key(0)) or an int seed; got None")
    if isinstance(rng, (int, np.integer)):
        return jax.random.key(int(rng))
    if callable(rng) and not isinstance(rng, jax.Array):  # nnx.RngStream: calling gives a key
        return rng()
    return rng


class JaxBackend(Backend):
    """Backend over ``jax.Array`` (and tracers under ``jit``); index dtype int32."""

    name = "jax"
    framework = "jax"

    # ----- types, conversion, shapes ----------------------------------------------------------
    def is_array(self, x: Any) -> bool:
        return isinstance(x, jax.Array)

    def asarray(self, x: Any, dtype: DType | None = None, like: Array | None = None) -> Array:
        if dtype is None and isinstance(x, (np.ndarray, np.generic)) and x.dtype == np.float64:
            dtype = "float32"  # keep the float32 convention even with jax_enable_x64
        return jnp.asarray(x, dtype=None if dtype is None else _DTYPES[dtype])

    def to_numpy(self, x: Array) -> Any:
        return np.asarray(x)

    def cast(self, x: Array, dtype: DType) -> Array:
        return jnp.asarray(x).astype(_DTYPES[dtype])

    def cast_like(self, x: Array, like: Array) -> Array:
        x = jnp.asarray(x)
        return x if x.dtype == like.dtype else x.astype(like.dtype)

    def is_host(self, x: Array) -> bool:
        if isinstance(x, jax.core.Tracer):  # no placement while tracing
            return False
        return all(device.platform == "cpu" for device in x.devices())

    def dtype_kind(self, x: Array) -> str:
        return np.dtype(x.dtype).kind if x.dtype != jnp.bfloat16 else "f"

    def shape(self, x: Array) -> tuple[int | None, ...]:
        return tuple(int(s) for s in jnp.shape(x))

    def dim(self, x: Array, axis: int) -> Any:
        return int(jnp.shape(x)[axis])

    def is_tracing(self, x: Array) -> bool:
        return isinstance(x, jax.core.Tracer)

    def scope(self, name: str) -> Any:
        """``jax.named_scope(name)``: the traced ops carry the name (XLA metadata, profiler)."""
        return jax.named_scope(name)

    # ----- creation ---------------------------------------------------------------------------
    def arange(self, n: Any, like: Array) -> Array:
        return jnp.arange(int(n), dtype=jnp.int32)

    def full(self, shape: tuple[Any, ...], value: float | int | bool, dtype: DType,
             like: Array) -> Array:
        return jnp.full(tuple(int(s) for s in shape), value, dtype=_DTYPES[dtype])

    # ----- elementwise and reductions ---------------------------------------------------------
    def log(self, x: Array) -> Array:
        return jnp.log(x)

    def sigmoid(self, x: Array) -> Array:
        return jax.nn.sigmoid(x)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        # exp(x - max) / sum of the exponentials sorted ascending (the Backend contract: rows
        # that are permutations of each other get bitwise-equal normalizers)
        x = jnp.asarray(x)
        top = jnp.max(x, axis=axis, keepdims=True, initial=-jnp.inf)
        ex = jnp.exp(x - jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0.0)))
        return ex / jnp.sum(jnp.sort(ex, axis=axis), axis=axis, keepdims=True)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return jax.nn.log_softmax(x, axis=axis)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        return jax.nn.logsumexp(x, axis=axis)

    def relu(self, x: Array) -> Array:
        return jax.nn.relu(x)

    def silu(self, x: Array) -> Array:
        return jax.nn.silu(x)

    def gelu(self, x: Array) -> Array:
        return jax.nn.gelu(x, approximate=False)

    def stop_gradient(self, x: Array) -> Array:
        return jax.lax.stop_gradient(x)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        out = jnp.where(cond, a, b)
        ref = a if isinstance(a, jax.Array) else b
        return out.astype(ref.dtype) if isinstance(ref, jax.Array) else out

    def maximum(self, a: Array, b: Array | float) -> Array:
        return jnp.maximum(a, jnp.asarray(b, dtype=jnp.asarray(a).dtype))

    def minimum(self, a: Array, b: Array | float) -> Array:
        return jnp.minimum(a, jnp.asarray(b, dtype=jnp.asarray(a).dtype))

    def floor(self, x: Array) -> Array:
        return jnp.floor(x)

    def ceil(self, x: Array) -> Array:
        return jnp.ceil(x)

    def sqrt(self, x: Array) -> Array:
        return jnp.sqrt(x)

    def sum(self, x: Array, axis: int | None = None) -> Array:
        x = jnp.asarray(x)
        if x.dtype == jnp.bool_:
            x = x.astype(jnp.int32)
        return jnp.sum(x, axis=axis, dtype=x.dtype)

    def max(self, x: Array, axis: int | None = None) -> Array:
        return jnp.max(x, axis=axis)

    def cumsum(self, x: Array, axis: int) -> Array:
        return jnp.cumsum(x, axis=axis, dtype=jnp.asarray(x).dtype)

    def all_finite(self, x: Array) -> bool:
        return bool(jnp.all(jnp.isfinite(x)))

    # ----- selection --------------------------------------------------------------------------
    def argsort(self, x: Array, axis: int = -1) -> Array:
        return jnp.argsort(jnp.asarray(x), axis=axis, stable=True).astype(jnp.int32)

    def argsort_desc(self, x: Array, axis: int = -1) -> Array:
        # negate then stable ascending sort: equal values keep ascending index order
        return jnp.argsort(-jnp.asarray(x), axis=axis, stable=True).astype(jnp.int32)

    def invert_permutation(self, perm_S: Array) -> Array:
        perm_S = jnp.asarray(perm_S).astype(jnp.int32)
        arange_S = jnp.arange(perm_S.shape[0], dtype=jnp.int32)
        return jnp.zeros_like(perm_S).at[perm_S].set(arange_S, unique_indices=True)

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        return jnp.take_along_axis(x, idx, axis=axis, mode="clip")

    def gather_rows(self, x: Array, idx: Array) -> Array:
        return jnp.take(jnp.asarray(x), idx, axis=0, mode="clip")

    def scatter_rows(self, x: Array, idx: Array, rows: Array) -> Array:
        return jnp.asarray(x).at[idx].set(jnp.asarray(rows, jnp.asarray(x).dtype))

    def one_hot(self, idx: Array, n: int, dtype: DType = "float32") -> Array:
        # -1 matches no class, so its row is all zero
        return (jnp.asarray(idx)[..., None] == jnp.arange(n, dtype=jnp.int32)).astype(
            _DTYPES[dtype])

    def bincount(self, idx: Array, n: int) -> Array:
        flat = jnp.reshape(idx, (-1,)).astype(jnp.int32)
        # -1 (and anything out of range) goes to index n, which the scatter drops; a negative
        # index would wrap around to the end, so it must not reach the scatter
        flat = jnp.where((flat >= 0) & (flat < n), flat, n)
        return jnp.zeros((n,), jnp.int32).at[flat].add(1, mode="drop")

    def reshape(self, x: Array, shape: tuple[Any, ...]) -> Array:
        return jnp.reshape(x, shape)

    def concat(self, xs: list[Array], axis: int) -> Array:
        return jnp.concatenate(xs, axis=axis)

    # ----- randomness -------------------------------------------------------------------------
    def random_uniform(self, rng: Any, like: Array) -> Array:
        return jax.random.uniform(key_from(rng), jnp.shape(like), dtype=jnp.float32)

    def random_normal(self, rng: Any, like: Array) -> Array:
        return jax.random.normal(key_from(rng), jnp.shape(like), dtype=jnp.float32)
