"""The Backend interface: the few array primitives routing, dispatch and losses are written on.

Every routing strategy, the capacity policy, the losses and the statistics are written once
against this class; a framework backend (NumPy, PyTorch, JAX, TensorFlow, or a third party's)
only implements these methods. Python operators (``+ - * / < <= == & | ~``), basic slicing
(``x[:, :K]``) and ``einops`` rearranges are used directly on the arrays, since every supported
framework provides them. Mixed dtypes are never relied on: code casts explicitly with
:meth:`Backend.cast` (TensorFlow refuses ``int32 + float32``).

Dtype names accepted by :meth:`Backend.asarray`, :meth:`Backend.cast` and :meth:`Backend.full`:
``"float32"``, ``"int"`` (the backend's index dtype: int64 for NumPy and PyTorch, int32 for JAX
and TensorFlow), ``"int32"`` (int32 on every backend, e.g. for a portable int32 counter) and
``"bool"``. :meth:`Backend.cast_like` converts to another array's dtype whatever it is.

Contract that the conformance suite checks on every backend against NumPy:
- :meth:`argsort`, :meth:`argsort_desc` and :meth:`top_k` are *stable*: equal values keep
  ascending index order (ties go to the lower expert index); they sort ints and floats.
- :meth:`invert_permutation` is exact for any length (integer ops, no float round trip).
- Equal inputs give bitwise-equal outputs wherever they sit in an array (:meth:`sigmoid`,
  :meth:`log`, :meth:`softmax`: some CPU kernels round the tail past their last full vector
  differently), and :meth:`softmax` rows that are permutations of each other give permuted,
  bitwise-equal probabilities: exact ties stay exact, and break to the lower index.
- :meth:`one_hot` of ``-1`` is an all-zero row, and :meth:`bincount` ignores ``-1``.
- :meth:`gelu` is the exact (erf) GELU, like ``torch.nn.functional.gelu`` and
  ``jax.nn.gelu(approximate=False)``.
- Everything except the eager-only helpers (:meth:`to_numpy`, :meth:`all_finite`,
  :meth:`is_host`) is traceable: ``torch.compile(fullgraph=True)``, ``jax.jit``,
  ``tf.function`` and XLA; nothing has Python side effects on traced values.
"""

from __future__ import annotations

import abc
import contextlib
from typing import Any

Array = Any  # a framework array: numpy.ndarray, torch.Tensor, jax.Array, tf.Tensor
DType = str  # "float32" | "int" | "int32" | "bool"

#: the do-nothing scope (reusable and reentrant)
NO_SCOPE: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class Backend(abc.ABC):
    """Array primitives of one framework. Subclasses are stateless and cheap to construct."""

    #: registry name, e.g. ``"numpy"``
    name: str = ""
    #: the framework's top-level module, e.g. ``"torch"``; the registry only considers a backend
    #: whose framework module is already imported
    framework: str = ""

    # ----- types, conversion, shapes ----------------------------------------------------------
    @abc.abstractmethod
    def is_array(self, x: Any) -> bool:
        """True when ``x`` is an array of this framework."""

    @abc.abstractmethod
    def asarray(self, x: Any, dtype: DType | None = None, like: Array | None = None) -> Array:
        """Convert ``x`` (array, list or scalar) to this framework, on ``like``'s device."""

    @abc.abstractmethod
    def to_numpy(self, x: Array) -> Any:
        """A NumPy copy of ``x`` (eager only)."""

    @abc.abstractmethod
    def cast(self, x: Array, dtype: DType) -> Array:
        """``x`` converted to ``dtype``."""

    @abc.abstractmethod
    def cast_like(self, x: Array, like: Array) -> Array:
        """``x`` in ``like``'s dtype; ``x`` itself (no copy) when the dtypes are already equal."""

    @abc.abstractmethod
    def is_host(self, x: Array) -> bool:
        """Eager only: True when ``x`` lives in host (CPU) memory."""

    @abc.abstractmethod
    def dtype_kind(self, x: Array) -> str:
        """NumPy-style dtype kind: ``'f'`` float, ``'i'``/``'u'`` int, ``'b'`` bool, ``'c'``."""

    @abc.abstractmethod
    def shape(self, x: Array) -> tuple[int | None, ...]:
        """Static shape; ``None`` for a dimension unknown at trace time."""

    @abc.abstractmethod
    def dim(self, x: Array, axis: int) -> Any:
        """Size of ``axis``: a Python int when static, else a scalar int array."""

    def is_tracing(self, x: Array) -> bool:
        """True when ``x`` is symbolic (jit / tf.function / compile): no data checks then."""
        return False

    def scope(self, name: str) -> contextlib.AbstractContextManager[Any]:
        """A named region for the framework's profiler (``moe_router/router_gemm``, ...): the
        layer step wraps its phases in it. Must cost next to nothing when no profiler runs and
        must not break tracing; the default does nothing."""
        return NO_SCOPE

    # ----- creation ---------------------------------------------------------------------------
    @abc.abstractmethod
    def arange(self, n: Any, like: Array) -> Array:
        """``[0, 1, ..., n-1]`` with the index dtype, on ``like``'s device."""

    @abc.abstractmethod
    def full(self, shape: tuple[Any, ...], value: float | int | bool, dtype: DType,
             like: Array) -> Array:
        """An array of ``shape`` filled with ``value``."""

    # ----- elementwise and reductions ---------------------------------------------------------
    @abc.abstractmethod
    def log(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def sigmoid(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def softmax(self, x: Array, axis: int = -1) -> Array:
        """``exp(x - max) / sum``, the sum taken over the exponentials sorted ascending: rows
        that are permutations of each other (mathematically equal probabilities) give bitwise
        equal probabilities, so a tie between two tokens stays an exact tie."""

    @abc.abstractmethod
    def log_softmax(self, x: Array, axis: int = -1) -> Array: ...

    @abc.abstractmethod
    def logsumexp(self, x: Array, axis: int = -1) -> Array: ...

    @abc.abstractmethod
    def relu(self, x: Array) -> Array:
        """``max(x, 0)`` in ``x``'s dtype."""

    @abc.abstractmethod
    def silu(self, x: Array) -> Array:
        """``x * sigmoid(x)`` (swish)."""

    @abc.abstractmethod
    def gelu(self, x: Array) -> Array:
        """Exact GELU ``x * Phi(x) = x/2 * (1 + erf(x / sqrt 2))`` (not the tanh approximation)."""

    @abc.abstractmethod
    def stop_gradient(self, x: Array) -> Array:
        """``x`` as a constant for autodiff (its gradient is zero); identity without autodiff."""

    @abc.abstractmethod
    def where(self, cond: Array, a: Array, b: Array) -> Array:
        """Elementwise select; ``a`` and ``b`` may be Python scalars."""

    @abc.abstractmethod
    def maximum(self, a: Array, b: Array | float) -> Array: ...

    @abc.abstractmethod
    def minimum(self, a: Array, b: Array | float) -> Array: ...

    @abc.abstractmethod
    def floor(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def ceil(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def sqrt(self, x: Array) -> Array: ...

    @abc.abstractmethod
    def sum(self, x: Array, axis: int | None = None) -> Array:
        """Sum; bool arrays count as int."""

    @abc.abstractmethod
    def max(self, x: Array, axis: int | None = None) -> Array: ...

    @abc.abstractmethod
    def cumsum(self, x: Array, axis: int) -> Array: ...

    @abc.abstractmethod
    def all_finite(self, x: Array) -> bool:
        """Eager only: True when no NaN/Inf is in ``x``."""

    # ----- selection ------------------------------------------------------------------------
    @abc.abstractmethod
    def argsort(self, x: Array, axis: int = -1) -> Array:
        """Indices (index dtype) that sort ``x`` ascending along ``axis``; stable (ties: lower
        index first); ``x`` int or float."""

    @abc.abstractmethod
    def argsort_desc(self, x: Array, axis: int = -1) -> Array:
        """Indices that sort ``x`` descending along ``axis``; stable (ties: lower index first)."""

    def invert_permutation(self, perm_S: Array) -> Array:
        """The inverse of a 1-D permutation: ``out[perm[i]] = i`` (index dtype), exact for any
        length. The default sorts the permutation; backends override it with a scatter."""
        return self.argsort(perm_S, axis=-1)

    def top_k(self, x: Array, k: int) -> tuple[Array, Array]:
        """The ``k`` largest along the last axis, descending, ties to the lower index."""
        idx = self.argsort_desc(x, axis=-1)[..., :k]
        return self.take_along_axis(x, idx, axis=-1), idx

    @abc.abstractmethod
    def take_along_axis(self, x: Array, idx: Array, axis: int) -> Array:
        """NumPy ``take_along_axis``; ``idx`` entries are valid indices (no -1)."""

    @abc.abstractmethod
    def gather_rows(self, x: Array, idx: Array) -> Array:
        """``x[idx]`` along axis 0 for a 1-D index array of valid indices."""

    @abc.abstractmethod
    def scatter_rows(self, x: Array, idx: Array, rows: Array) -> Array:
        """A copy of ``x`` with ``x[idx[i]] = rows[i]`` along axis 0 (1-D ``idx`` of valid
        indices; which write wins for a repeated index is unspecified)."""

    @abc.abstractmethod
    def one_hot(self, idx: Array, n: int, dtype: DType = "float32") -> Array:
        """One-hot over a new last axis of size ``n``; ``-1`` gives an all-zero row."""

    def bincount(self, idx: Array, n: int) -> Array:
        """Counts of each value in ``[0, n)`` over all of ``idx`` (index dtype); ``-1`` ignored."""
        flat = self.reshape(idx, (-1,))
        return self.sum(self.one_hot(flat, n, dtype="int"), axis=0)

    @abc.abstractmethod
    def reshape(self, x: Array, shape: tuple[Any, ...]) -> Array: ...

    @abc.abstractmethod
    def concat(self, xs: list[Array], axis: int) -> Array: ...

    def unstack(self, x: Array) -> tuple[Array, ...]:
        """The entries of a 1-D array of static length as 0-d arrays (a backend may do it in
        one op)."""
        n = self.shape(x)[0]
        assert n is not None
        return tuple(x[i] for i in range(n))

    # ----- randomness (training-time router noise only) ---------------------------------------
    @abc.abstractmethod
    def random_uniform(self, rng: Any, like: Array) -> Array:
        """Uniform [0, 1) float32 noise of ``like``'s shape from ``rng`` (a seed, generator, key
        or ``None`` for the framework default generator where one exists)."""

    @abc.abstractmethod
    def random_normal(self, rng: Any, like: Array) -> Array:
        """Standard normal float32 noise of ``like``'s shape from ``rng`` (as above)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"

