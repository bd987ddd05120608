"""The TensorFlow backend: the :class:`~moe_router.backend.Backend` primitives on ``tf.Tensor``.

Float math in float32, indices in int32 (TensorFlow's and XLA's native index dtype). Sorting uses
``tf.argsort(..., direction="DESCENDING", stable=True)``, which TensorFlow implements with
``tf.math.top_k`` over the whole axis: equal values keep ascending index order, so ties go to the
lower index exactly like the NumPy oracle (checked in ``tests/tensorflow/test_tf_backend.py``,
also under ``jit_compile=True``). Eigen computes the last ``size % 16`` elements of an
elementwise op with scalar code that rounds differently, so :meth:`sigmoid`, :meth:`log` and the
exponentials of :meth:`softmax` run on a copy padded to whole packets: equal inputs give equal
outputs wherever they sit, and exact ties stay exact.

Every primitive works eagerly, inside ``tf.function`` (also with an unknown batch dimension: sizes
are then scalar ``int32`` tensors) and under XLA. TensorFlow refuses mixed-dtype arithmetic, so
Python scalars given to :meth:`where`, :meth:`maximum` and :meth:`minimum` are cast to the other
operand's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow as tf

from moe_router.backend import NO_SCOPE, Array, Backend, DType

_DTYPES = {"float32": tf.float32, "int": tf.int32, "int32": tf.int32, "bool": tf.bool}


def _is_tf(x: Any) -> bool:
    return isinstance(x, (tf.Tensor, tf.Variable))


#: Eigen evaluates an elementwise op in packets of up to 16 floats and the last ``size % 16``
#: elements with scalar code (``std::exp``, ...), which rounds differently: equal inputs then
#: give unequal outputs, and exact ties break by position. Padding to this many lanes keeps
#: every element on the packet path (Eigen aligns its thread blocks to packets).
_LANES = 64


def _lane_aligned(fn: Any, x: Array) -> Array:
    """``fn`` elementwise on ``x``, equal inputs giving equal outputs wherever they sit."""
    flat = tf.reshape(x, [-1])
    size = flat.shape[0]
    # no annotated locals: AutoGraph (tf.function) cannot convert them
    n = size if size is not None else tf.size(flat)
    pad = -n % _LANES
    padded = tf.concat([flat, tf.ones(tf.reshape(pad, [1]), flat.dtype)], axis=0)
    out = fn(padded)[:n]
    if x.shape.is_fully_defined():
        return tf.reshape(out, x.shape)
    return tf.reshape(out, tf.shape(x))


def _shape_arg(shape: tuple[Any, ...]) -> Any:
    """A shape for ``tf.fill`` / ``tf.reshape``: a tuple of ints, or a packed int32 tensor."""
    if all(isinstance(s, (int, np.integer)) for s in shape):
        return tuple(int(s) for s in shape)
    return tf.stack([tf.cast(s, tf.int32) for s in shape])


class TensorFlowBackend(Backend):
    """Backend over ``tf.Tensor`` (eager, ``tf.function``, XLA); index dtype int32."""

    name = "tensorflow"
    framework = "tensorflow"

    # ----- types, conversion, shapes ----------------------------------------------------------
    def is_array(self, x: Any) -> bool:
        return _is_tf(x)

    def asarray(self, x: Any, dtype: DType | None = None, like: Array | None = None) -> Array:
        tf_dtype = None if dtype is None else _DTYPES[dtype]
        if _is_tf(x):
            return x if tf_dtype is None or x.dtype == tf_dtype else tf.cast(x, tf_dtype)
        if tf_dtype is None:
            array = np.asarray(x)
            if array.dtype == np.float64:
                tf_dtype = tf.float32  # keep the backend's float32 convention
            elif array.dtype == np.int64:
                tf_dtype = tf.int32
        try:
            return tf.convert_to_tensor(x, dtype=tf_dtype)
        except (TypeError, ValueError):  # e.g. int -> bool: cast like numpy.asarray(x, dtype)
            if tf_dtype is None:
                raise
            return tf.convert_to_tensor(np.asarray(x).astype(tf_dtype.as_numpy_dtype))

    def to_numpy(self, x: Array) -> Any:
        if x.dtype == tf.bfloat16:  # NumPy has no native bfloat16
            x = tf.cast(x, tf.float32)
        return np.asarray(x.numpy())

    def cast(self, x: Array, dtype: DType) -> Array:
        tf_dtype = _DTYPES[dtype]
        return x if x.dtype == tf_dtype else tf.cast(x, tf_dtype)

    def cast_like(self, x: Array, like: Array) -> Array:
        return x if x.dtype == like.dtype else tf.cast(x, like.dtype)

    def is_host(self, x: Array) -> bool:
        device = getattr(x, "device", "") or ""
        if not device:  # placement not recorded: on the host unless a GPU could have taken it
            return not tf.config.list_logical_devices("GPU")
        return tf.DeviceSpec.from_string(device).device_type == "CPU"

    def dtype_kind(self, x: Array) -> str:
        d = tf.as_dtype(x.dtype)
        if d.is_bool:
            return "b"
        if d.is_complex:
            return "c"
        if d.is_floating:
            return "f"
        return "u" if d.is_unsigned else "i"

    def shape(self, x: Array) -> tuple[int | None, ...]:
        return tuple(x.shape.as_list())

    def dim(self, x: Array, axis: int) -> Any:
        static = x.shape[axis]
        return int(static) if static is not None else tf.shape(x, out_type=tf.int32)[axis]

    def is_tracing(self, x: Array) -> bool:
        return bool(tf.is_symbolic_tensor(x)) or not tf.executing_eagerly()

    def scope(self, name: str) -> Any:
        """``tf.name_scope(name)`` in a graph (``tf.function``): its ops get the prefix
        (TensorBoard, profiler); nothing when eager, where ops have no names."""
        return NO_SCOPE if tf.executing_eagerly() else tf.name_scope(name)

    def layer_stages(self) -> Any:
        """The layer step's TensorFlow stages (one cached instance): symbolic-shape output
        reshape and ``route()`` outside AutoGraph (``stages.TFStages``)."""
        stages = self.__dict__.get("_layer_stages")
        if stages is None:
            from .stages import TFStages

            stages = self.__dict__["_layer_stages"] = TFStages(self)
        return stages

    # ----- creation ---------------------------------------------------------------------------
    def arange(self, n: Any, like: Array) -> Array:
        return tf.range(tf.cast(n, tf.int32) if _is_tf(n) else int(n), dtype=tf.int32)

    def full(self, shape: tuple[Any, ...], value: float | int | bool, dtype: DType,
             like: Array) -> Array:
        return tf.fill(_shape_arg(shape), self.asarray(value, dtype=dtype))

    # ----- elementwise and reductions ---------------------------------------------------------
    def log(self, x: Array) -> Array:
        return _lane_aligned(tf.math.log, x)

    def sigmoid(self, x: Array) -> Array:
        return _lane_aligned(tf.sigmoid, x)

    def softmax(self, x: Array, axis: int = -1) -> Array:
        # exp(x - max) / sum of the exponentials sorted ascending (the Backend contract: rows
        # that are permutations of each other get bitwise-equal normalizers)
        top = tf.reduce_max(x, axis=axis, keepdims=True)
        top = tf.stop_gradient(tf.where(tf.math.is_finite(top), top, tf.zeros_like(top)))
        ex = _lane_aligned(tf.exp, x - top)
        return ex / tf.reduce_sum(tf.sort(ex, axis=axis), axis=axis, keepdims=True)

    def log_softmax(self, x: Array, axis: int = -1) -> Array:
        return tf.nn.log_softmax(x, axis=axis)

    def logsumexp(self, x: Array, axis: int = -1) -> Array:
        return tf.reduce_logsumexp(x, axis=axis)

    def relu(self, x: Array) -> Array:
        return tf.nn.relu(x)

    def silu(self, x: Array) -> Array:
        return tf.nn.silu(x)

    def gelu(self, x: Array) -> Array:
        return tf.nn.gelu(x, approximate=False)

    def stop_gradient(self, x: Array) -> Array:
        return tf.stop_gradient(x)

    def where(self, cond: Array, a: Array, b: Array) -> Array:
        if _is_tf(a) and not _is_tf(b):
            b = tf.cast(b, a.dtype)
        elif _is_tf(b) and not _is_tf(a):
            a = tf.cast(a, b.dtype)
        elif not _is_tf(a):
            a, b = self.asarray(a), self.asarray(b)
        return tf.where(cond, a, b)

    def maximum(self, a: Array, b: Array | float) -> Array:
        return tf.maximum(a, tf.cast(b, a.dtype))

    def minimum(self, a: Array, b: Array | float) -> Array:
        return tf.minimum(a, tf.cast(b, a.dtype))

    def floor(self, x: Array) -> Array:
        return tf.floor(x)

    def ceil(self, x: Array) -> Array:
        return tf.math.ceil(x)

    def sqrt(self, x: Array) -> Array:
        return tf.sqrt(x)

    def sum(self, x: Array, axis: int | None = None) -> Array:
        if x.dtype == tf.bool:
            x = tf.cast(x, tf.int32)
        return tf.reduce_sum(x, axis=axis)

    def max(self, x: Array, axis: int | None = None) -> Array:
        return tf.reduce_max(x, axis=axis)

    def cumsum(self, x: Array, axis: int) -> Array:
        return tf.cumsum(x, axis=axis)

    def all_finite(self, x: Array) -> bool:
        return bool(tf.reduce_all(tf.math.is_finite(x)))

    # ----- selection ------------------------------------------------------------------------
    def argsort(self, x: Array, axis: int = -1) -> Array:
        if x.dtype == tf.bool:
            x = tf.cast(x, tf.int32)
        # stable ascending: TF negates (ints: bitwise not) and runs top_k over the axis
        return tf.argsort(x, axis=axis, direction="ASCENDING", stable=True)

    def argsort_desc(self, x: Array, axis: int = -1) -> Array:
        if x.dtype == tf.bool:
            x = tf.cast(x, tf.int32)
        # stable descending: implemented by TF as top_k over the axis, lower index first on ties
        return tf.argsort(x, axis=axis, direction="DESCENDING", stable=True)

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        # tf.math.top_k: sorted, and equal values keep ascending index order
        values, indices = tf.math.top_k(x, k=k, sorted=True)
        return values, indices

    def invert_permutation(self, perm_S: Array) -> Array:
        # a scatter, not tf.math.invert_permutation: XLA's InvertPermutation fails ("Dynamic
        # reshape is not implemented") on some inputs whose size is unknown at trace time
        perm_S = tf.cast(perm_S, tf.int32)
        size = tf.shape(perm_S)
        return tf.scatter_nd(perm_S[:, None], tf.range(size[0]), size)

    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        rank = x.shape.rank
        axis = axis % rank
        if axis == rank - 1:
            return tf.gather(x, idx, axis=axis, batch_dims=rank - 1)
        perm = [*range(axis), *range(axis + 1, rank), axis]
        inverse = np.argsort(perm).tolist()
        out = tf.gather(tf.transpose(x, perm), tf.transpose(idx, perm), axis=rank - 1,
                        batch_dims=rank - 1)
        return tf.transpose(out, inverse)

    def gather_rows(self, x: Array, idx: Array) -> Array:
        return tf.gather(x, idx, axis=0)

    def scatter_rows(self, x: Array, idx: Array, rows: Array) -> Array:
        idx = tf.reshape(tf.cast(idx, tf.int32), [-1, 1])
        return tf.tensor_scatter_nd_update(x, idx, tf.cast(rows, x.dtype))

    def one_hot(self, idx: Array, n: int, dtype: DType = "float32") -> Array:
        # tf.one_hot gives an all-zero row for out-of-range indices such as -1
        return tf.one_hot(tf.cast(idx, tf.int32), n, dtype=_DTYPES[dtype])

    def bincount(self, idx: Array, n: int) -> Array:
        flat = tf.reshape(tf.cast(idx, tf.int32), [-1])
        valid = tf.cast(flat >= 0, tf.int32)
        return tf.math.unsorted_segment_sum(valid, tf.maximum(flat, 0), n)

    def reshape(self, x: Array, shape: tuple[Any, ...]) -> Array:
        return tf.reshape(x, _shape_arg(shape))

    def concat(self, xs: list[Array], axis: int) -> Array:
        return tf.concat(xs, axis=axis)

    # ----- randomness -------------------------------------------------------------------------
    def random_uniform(self, rng: Any, like: Array) -> Array:
        shape = tf.shape(like)
        if isinstance(rng, tf.random.Generator):
            return rng.uniform(shape, dtype=tf.float32)
        if rng is None:
            return tf.random.uniform(shape, dtype=tf.float32)
        return tf.random.stateless_uniform(shape, seed=_seed(rng), dtype=tf.float32)

    def random_normal(self, rng: Any, like: Array) -> Array:
        shape = tf.shape(like)
        if isinstance(rng, tf.random.Generator):
            return rng.normal(shape, dtype=tf.float32)
        if rng is None:
            return tf.random.normal(shape, dtype=tf.float32)
        return tf.random.stateless_normal(shape, seed=_seed(rng), dtype=tf.float32)


def _seed(rng: Any) -> Any:
    """A stateless seed pair from an int seed or a ``(2,)`` int tensor / sequence."""
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return tf.constant([int(rng), 0], dtype=tf.int64)
    if _is_tf(rng) or isinstance(rng, (tuple, list, np.ndarray)):
        seed = tf.cast(tf.convert_to_tensor(rng), tf.int64)
        if seed.shape.rank == 0:
            return tf.stack([seed, tf.constant(0, tf.int64)])
        return seed
    raise TypeError(f"rng: expected a tf.random.Generator, an int seed, a (2,) seed or None, "
                    f"got {type(rng)!r}")
