"""Expert compute behind one interface: permute -> grouped FFN -> unpermute.

Shapes: T tokens, K slots per token, S = T*K slots, E experts, D model width, F expert width.

- :func:`permute` sorts the flat slots by expert (stable: token order within an expert; unused
  slots, ``-1``, last) and gathers their token rows: ``x_SD``, with a :class:`Permutation`.
- A *grouped* kernel maps those rows to expert outputs ``out_SD`` (row s through expert
  ``perm.expert_S[s]``); rows of unused slots (the tail, from ``perm.num_used`` on) must come
  out zero. Frameworks register their fast ones (``torch:grouped_mm``, ``jax:ragged_dot``,
  ``tensorflow:split``, ...); the portable ones are here.
- :func:`unpermute` gathers each slot's row back through the inverse permutation and sums the K
  slots of a token with their routing weights.
- A *tokens* kernel skips the permutation altogether (``dense``: every expert on every token;
  ``gather``: each slot reads its own expert's weights, for decode-sized batches).

Portable dispatch names (``MoEConfig.dispatch``) mean the same on every framework: ``sorted``
(dropless, sort-based), ``capacity`` (a static ``(E, C, D)`` buffer, C = the router's capacity),
``dense``, ``gather``, and ``auto`` (the framework's policy picks). A framework's policy may
answer a portable name with a faster exact kernel of its own; qualified names such as
``torch:grouped_mm`` force one. With a tuning cache (:mod:`moe_router.layer.tuning`), ``auto``
takes the kernel measured fastest for the layer's shape, token bucket, dtype, device and threads.

Resilience: a *framework* kernel that raises when eager (unsupported dtype, device or shape) is
replaced by the portable :data:`FALLBACK_KERNEL` (the same result as dispatching it), with one
:class:`KernelFallbackWarning` per (kernel, dtype, device, shape bucket), which is not retried
again, and a count (:func:`fallback_counts`, kept in the registry). Never under tracing: catching a
trace-time error would silently compile another program; our own errors and out-of-memory errors
always propagate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, NamedTuple

import einops

from ..backend import Array, Backend
from ..config import MoEConfig
from ..errors import ConfigError, MoERouterError
from . import tuning
from .tuning import device_name, dtype_name, token_bucket

PORTABLE = ("auto", "sorted", "capacity", "dense", "gather")
#: the portable kernel a failing framework kernel falls back to
FALLBACK_KERNEL = "sorted"
#: ``Backend.scope`` name of each phase of the layer step (``moe-router profile``)
SCOPES = {phase: f"moe_router/{phase}"
          for phase in ("router_gemm", "select", "permute", "experts", "combine", "shared")}


class KernelFallbackWarning(UserWarning):
    """A framework expert kernel raised at run time: the portable :data:`FALLBACK_KERNEL` runs
    instead for that kernel, dtype, device and shape bucket (warned once per such case)."""


class ExpertWeights(NamedTuple):
    """Stacked expert matrices in the compute dtype: ``w_gate`` ``(E, D, F)`` (gated
    activations only, else ``None``), ``w_up`` ``(E, D, F)``, ``w_down`` ``(E, F, D)``."""

    w_gate: Array | None
    w_up: Array
    w_down: Array


class Permutation(NamedTuple):
    """The flat slots sorted by expert.

    Attributes:
        order_S: ``(S,)`` int flat slot id (``t * K + k``) of each sorted row.
        token_S: ``(S,)`` int token of each sorted row.
        expert_S: ``(S,)`` int expert of each sorted row (``E`` for unused slots, at the tail).
        counts_E: ``(E,)`` int used rows per expert (consecutive blocks in expert order).
        inverse_S: ``(S,)`` int sorted row of each flat slot.
        num_slots: K, slots per token (static).
    """

    order_S: Array
    token_S: Array
    expert_S: Array
    counts_E: Array
    inverse_S: Array
    num_slots: int


class DispatchInfo(NamedTuple):
    """Static facts a dispatch policy and a kernel may use.

    Attributes:
        num_tokens: T as a Python int, or ``None`` when unknown at trace time.
        num_slots: K.
        num_experts: E.
        capacity: slots per expert of the router's capacity (int, int array or ``None``).
        traced: inside ``jit`` / ``tf.function`` / ``torch.compile`` (no host reads).
        config: the layer's :class:`MoEConfig`.
    """

    num_tokens: int | None
    num_slots: int
    num_experts: int
    capacity: Any
    traced: bool
    config: MoEConfig


# ----- activations and FFNs ----------------------------------------------------------------------
def activate(b: Backend, name: str, gate: Array | None, up: Array) -> Array:
    """Expert activation: gated ``act(gate) * up`` (swiglu, geglu) or plain ``act(up)``."""
    if name == "swiglu":
        return b.silu(gate) * up
    if name == "geglu":
        return b.gelu(gate) * up
    if name == "gelu":
        return b.gelu(up)
    if name == "relu":
        return b.relu(up)
    if name == "silu":
        return b.silu(up)
    raise ConfigError("activation", name, "swiglu, geglu, gelu, relu or silu")


def ffn(b: Backend, x: Array, w_gate: Array | None, w_up: Array, w_down: Array,
        activation: str) -> Array:
    """One FFN: ``(N, D)`` rows with ``(D, F)`` / ``(F, D)`` weights, or batched ``(B, N, D)``
    rows with ``(B, D, F)`` / ``(B, F, D)`` weights."""
    gate = None if w_gate is None else x @ w_gate
    return activate(b, activation, gate, x @ w_up) @ w_down


def expert_weights(b: Backend, params: Mapping[str, Array], like: Array) -> ExpertWeights:
    """The stacked expert weights of ``params`` in ``like``'s dtype."""
    gate = params.get("experts.w_gate")
    return ExpertWeights(None if gate is None else b.cast_like(gate, like),
                         b.cast_like(params["experts.w_up"], like),
                         b.cast_like(params["experts.w_down"], like))


def shared_expert(b: Backend, x_TD: Array, params: Mapping[str, Array],
                  config: MoEConfig) -> Array:
    """The always-on shared FFN ``(T, D)``, optionally sigmoid-gated (Qwen2-MoE)."""
    gate = params.get("shared.w_gate")
    out_TD = ffn(b, x_TD, None if gate is None else b.cast_like(gate, x_TD),
                 b.cast_like(params["shared.w_up"], x_TD),
                 b.cast_like(params["shared.w_down"], x_TD), config.activation)
    if config.shared_expert_gate:
        out_TD = out_TD * b.sigmoid(x_TD @ b.cast_like(params["shared.gate"], x_TD))
    return out_TD


# ----- permute / unpermute -----------------------------------------------------------------------
def permutation(b: Backend, ids_TK: Array, num_experts: int) -> Permutation:
    """Stable sort of the flat slots by expert (unused slots last)."""
    K = b.shape(ids_TK)[1]
    assert K is not None
    flat_S = b.reshape(ids_TK, (-1,))
    key_S = b.where(flat_S >= 0, flat_S, num_experts)
    order_S = b.argsort(key_S, axis=-1)
    return Permutation(order_S=order_S, token_S=order_S // K,
                       expert_S=b.take_along_axis(key_S, order_S, axis=0),
                       counts_E=b.bincount(flat_S, num_experts),
                       inverse_S=b.invert_permutation(order_S), num_slots=int(K))


def permute(b: Backend, x_TD: Array, ids_TK: Array,
            num_experts: int) -> tuple[Array, Permutation]:
    """``(x_SD, perm)``: each slot's token row, sorted by expert."""
    perm = permutation(b, ids_TK, num_experts)
    return b.gather_rows(x_TD, perm.token_S), perm


def unpermute(b: Backend, out_SD: Array, perm: Permutation, gates_TK: Array) -> Array:
    """``y_TD = sum_k gates[t, k] * out[row of slot (t, k)]`` (unused slots have weight 0)."""
    K = perm.num_slots
    out_TKD = einops.rearrange(b.gather_rows(out_SD, perm.inverse_S), "(t k) d -> t k d", k=K)
    gates_T1K = einops.rearrange(b.cast_like(gates_TK, out_SD), "t k -> t 1 k")
    return einops.rearrange(gates_T1K @ out_TKD, "t 1 d -> t d")


def _offsets(b: Backend, counts_E: Array) -> Array:
    """Exclusive cumulative sum: first sorted row of each expert."""
    return b.cumsum(counts_E, axis=0) - counts_E


def _rows_to_buffer(b: Backend, x_SD: Array, perm: Permutation, capacity: Any) -> Array:
    """Sorted rows into an ``(E * C, D)`` buffer: expert e's rank-c row at ``e * C + c``;
    buffer rows beyond an expert's count read zero."""
    E = b.shape(perm.counts_E)[0]
    rows_R = b.arange(E * capacity, like=perm.order_S)
    expert_R = rows_R // capacity
    rank_R = rows_R - expert_R * capacity
    valid_R = rank_R < b.gather_rows(perm.counts_E, expert_R)
    S = b.dim(x_SD, 0)
    src_R = b.minimum(b.gather_rows(_offsets(b, perm.counts_E), expert_R) + rank_R, S - 1)
    return b.where(valid_R[:, None], b.gather_rows(x_SD, src_R), 0.0)


def _buffer_to_rows(b: Backend, out_RD: Array, perm: Permutation, capacity: Any) -> Array:
    """Inverse of :func:`_rows_to_buffer`: each sorted row's output; unused rows zero."""
    E = b.shape(perm.counts_E)[0]
    S = b.dim(perm.expert_S, 0)
    used_S = perm.expert_S < E
    expert_S = b.minimum(perm.expert_S, E - 1)
    rank_S = b.arange(S, like=perm.order_S) - b.gather_rows(_offsets(b, perm.counts_E), expert_S)
    keep_S = used_S & (rank_S < capacity)
    row_S = b.where(keep_S, expert_S * capacity + rank_S, 0)
    return b.where(keep_S[:, None], b.gather_rows(out_RD, row_S), 0.0)


def _buffered_ffn(b: Backend, x_SD: Array, perm: Permutation, w: ExpertWeights,
                  activation: str, capacity: Any) -> Array:
    x_ECD = einops.rearrange(_rows_to_buffer(b, x_SD, perm, capacity), "(e c) d -> e c d",
                             e=b.shape(perm.counts_E)[0])
    out_ECD = ffn(b, x_ECD, w.w_gate, w.w_up, w.w_down, activation)
    return _buffer_to_rows(b, einops.rearrange(out_ECD, "e c d -> (e c) d"), perm, capacity)


# ----- portable kernels --------------------------------------------------------------------------
def sorted_padded(b: Backend, x_SD: Array, perm: Permutation, w: ExpertWeights, activation: str,
                  info: DispatchInfo) -> Array:
    """Portable dropless grouped FFN: the sorted rows padded to the largest expert's count
    (read on the host when eager; T when traced) and one batched FFN over ``(E, C, D)``."""
    if info.traced or info.num_tokens is None:
        capacity = b.dim(x_SD, 0) // perm.num_slots  # T: no expert can get more
    else:
        capacity = max(1, int(b.to_numpy(b.max(perm.counts_E))))
    return _buffered_ffn(b, x_SD, perm, w, activation, capacity)


def capacity(b: Backend, x_SD: Array, perm: Permutation, w: ExpertWeights, activation: str,
             info: DispatchInfo) -> Array:
    """Static ``(E, C, D)`` buffer with C = the router's capacity; routing has already dropped
    (and counted) every slot beyond it, so this is exact."""
    if info.capacity is None:
            raise ConfigError("dispatch", "capacity", "a router with capacity_factor set (routing "
                          "then drops and counts the overflow); use 'sorted' for dropless")
    return _buffered_ffn(b, x_SD, perm, w, activation, info.capacity)


def dense(b: Backend, x_TD: Array, ids_TK: Array, gates_TK: Array, w: ExpertWeights,
          activation: str, info: DispatchInfo) -> Array:
    """Every expert on every token, combined with the dense ``(T, E)`` routing weights
    (E/K times the routed FLOPs: a static-shape fallback and a debugging aid)."""
    onehot_TKE = b.cast_like(b.one_hot(ids_TK, info.num_experts, dtype="float32"), x_TD)
    combine_TE = einops.einsum(onehot_TKE, b.cast_like(gates_TK, x_TD), "t k e, t k -> t e")
    x_1TD = einops.rearrange(x_TD, "t d -> 1 t d")
    gate = None if w.w_gate is None else x_1TD @ w.w_gate
    out_ETD = activate(b, activation, gate, x_1TD @ w.w_up) @ w.w_down
    return einops.einsum(combine_TE, out_ETD, "t e, e t d -> t d")


def gather(b: Backend, x_TD: Array, ids_TK: Array, gates_TK: Array, w: ExpertWeights,
           activation: str, info: DispatchInfo) -> Array:
    """Each slot gathers its own expert's weights: reads only the active experts (decode)."""
    K = info.num_slots
    ids_S = b.maximum(b.reshape(ids_TK, (-1,)), 0)
    x_S1D = einops.repeat(x_TD, "t d -> (t k) 1 d", k=K)
    gate = None if w.w_gate is None else x_S1D @ b.gather_rows(w.w_gate, ids_S)
    hidden = activate(b, activation, gate, x_S1D @ b.gather_rows(w.w_up, ids_S))
    out_TKD = einops.rearrange(hidden @ b.gather_rows(w.w_down, ids_S), "(t k) 1 d -> t k d", k=K)
    used_TK = b.cast_like(ids_TK >= 0, x_TD) * b.cast_like(gates_TK, x_TD)
    return einops.rearrange(einops.rearrange(used_TK, "t k -> t 1 k") @ out_TKD, "t 1 d -> t d")


# ----- resolution and the expert stage -----------------------------------------------------------
def slots_per_expert(b: Backend, config: MoEConfig | Any, num_tokens: Any, like: Array) -> Any:
    """The router's capacity C for T tokens (slots each expert may take), or ``None`` (dropless).

    A strategy with its own capacity (``expert_choice``): C = ceil(T * factor / E) capped at T,
    factor = ``capacity_factor`` or ``k``. Others: C = ceil(cf * T * nominal_experts / E)
    (:meth:`RouterConfig.capacity`). A Python int for a static T, else an int scalar array.
    """
    r = config.router if isinstance(config, MoEConfig) else config
    own = r.strategy_spec.own_capacity
    if r.capacity_factor is None and not own:
        return None
    if own:
        factor = r.capacity_factor if r.capacity_factor is not None else float(r.k)
    else:
        factor = r.capacity_factor * r.nominal_experts
    if isinstance(num_tokens, int):
        if not own:
            return r.capacity(num_tokens)
        return min(num_tokens, max(1, math.ceil(round(num_tokens * factor / r.num_experts, 9))))
    T_f = b.cast(b.asarray(num_tokens, like=like), "float32")
    slots = b.maximum(b.ceil(T_f * (factor / r.num_experts)), 1.0)
    return b.cast(b.minimum(slots, T_f) if own else slots, "int")


def default_policy(request: str, info: DispatchInfo) -> str:
    """Portable policy (no framework kernel): ``auto`` -> ``gather`` for T*K < E, else
    ``capacity`` when the router has one, else ``sorted``."""
    if request != "auto":
        return request
    if info.num_tokens is not None and info.num_tokens * info.num_slots < info.num_experts:
        return "gather"
    return "capacity" if info.capacity is not None else "sorted"


def resolve_kernel(b: Backend, request: str, info: DispatchInfo, x_TD: Array) -> str:
    """The kernel name ``request`` (a portable or qualified dispatch name) resolves to.

    ``auto`` when eager takes the tuning cache's kernel for this case if there is one
    (:func:`moe_router.layer.tuning.tuned_kernel`), else the framework's policy answers. Eager
    answers are remembered per (request, sizes, config, device, dtype, threads, cache state), so
    a decode loop pays the policy once; traced calls ask the policy (once per trace anyway).
    """
    if ":" in request:
        return request
    from ..registry import default_registry

    registry = default_registry()

    def ask() -> str:
        if request == "auto" and not info.traced:
            tuned = tuning.tuned_kernel(b, info, x_TD, registry)
            if tuned is not None:
                return tuned
        return policy_kernel(b, request, info, x_TD)

    if info.traced or not isinstance(info.capacity, (int, type(None))):
        return ask()
    key = (b.framework, request, info, str(getattr(x_TD, "device", "")),
           str(getattr(x_TD, "dtype", "")),
           tuning.token(b.framework, registry) if request == "auto" else None)
    return registry.memo("kernel", key, ask)


def policy_kernel(b: Backend, request: str, info: DispatchInfo, x_TD: Array) -> str:
    """What the framework's dispatch policy (size thresholds; no tuning cache) answers."""
    from ..registry import default_registry

    policy = default_registry().dispatch_policy(b.framework)
    chosen = policy(request, info, x_TD) if policy is not None else None
    return chosen or default_policy(request, info)


def check_dispatch_framework(framework: str, config: MoEConfig) -> None:
    """Refuse a config whose ``dispatch`` names another framework's kernel (at layer build).

    Raises:
        ConfigError: e.g. ``dispatch='torch:grouped_mm'`` for a Keras layer.
    """
    if ":" not in config.dispatch:
        return
    from ..registry import default_registry

    spec = default_registry().kernel_spec(config.dispatch)
    if spec.framework not in (None, framework):
        raise ConfigError("dispatch", config.dispatch,
                          f"a portable name ({', '.join(PORTABLE)}) or a '{framework}:' kernel "
                          f"for a {framework} layer")


def warm_registry(config: MoEConfig, framework: str) -> None:
    """Resolve now every plugin the step may look up for ``config`` on ``framework`` (strategy,
    estimator, observers, dispatch policy, kernels), so that a tracer (``torch.compile``) finds
    them resolved instead of tracing their import."""
    from ..registry import default_registry
    from .observers import active_observers

    registry = default_registry()
    registry.strategy(config.router.strategy)
    registry.estimator(config.router.complexity_estimator)
    active_observers(config)
    registry.dispatch_policy(framework)
    for name in registry.kernel_names():
        if registry.kernel_spec(name).framework in (None, framework):
            registry.kernel(name)


def dispatch_info(b: Backend, config: MoEConfig, x_TD: Array, num_slots: int,
                  traced: bool = False) -> DispatchInfo:
    """The :class:`DispatchInfo` of ``x_TD``'s tokens with K = ``num_slots`` (what a policy and
    a kernel see; with :func:`resolve_kernel` it tells which kernel a config runs)."""
    T = b.dim(x_TD, 0)
    return DispatchInfo(num_tokens=T if isinstance(T, int) else None, num_slots=int(num_slots),
                        num_experts=config.num_experts,
                        capacity=slots_per_expert(b, config, T, x_TD), traced=traced,
                        config=config)


def expert_compute(b: Backend, x_TD: Array, ids_TK: Array, gates_TK: Array,
                   params: Mapping[str, Array], config: MoEConfig, request: str | None = None,
                   traced: bool = False) -> Array:
    """``(T, D)``: sum over used slots of ``gate * expert(x)`` with the resolved kernel."""
    info = dispatch_info(b, config, x_TD, b.shape(ids_TK)[1], traced)
    name = resolve_kernel(b, request or config.dispatch, info, x_TD)
    return run_kernel(b, name, x_TD, ids_TK, gates_TK, expert_weights(b, params, x_TD),
                      config.activation, info)


def local_expert_compute(b: Backend, x_ND: Array, ids_NK: Array, gates_NK: Array,
                         w: ExpertWeights, config: MoEConfig, request: str, num_experts: int, *,
                         capacity: Any = None, traced: bool = False) -> Array:
    """``(N, D)``: the ``num_experts`` experts of ``w`` (ids in ``[0, num_experts)``, ``-1`` =
    none) on rows ``x_ND``, with the kernel ``request`` resolves to for these sizes: the
    compute of expert parallelism on the rows one rank or device holds (permute, kernel,
    unpermute, as the layer's own experts)."""
    info = DispatchInfo(num_tokens=int(b.shape(x_ND)[0]), num_slots=int(b.shape(ids_NK)[1]),
                        num_experts=num_experts, capacity=capacity, traced=traced,
                        config=config)
    name = resolve_kernel(b, request, info, x_ND)
    return run_kernel(b, name, x_ND, ids_NK, gates_NK, w, config.activation, info)


def run_kernel(b: Backend, name: str, x_TD: Array, ids_TK: Array, gates_TK: Array,
               w: ExpertWeights, activation: str, info: DispatchInfo, *,
               fallback: bool = True) -> Array:
    """``(T, D)`` expert output of kernel ``name`` (no resolution): permute, kernel, unpermute
    for a grouped kernel, the kernel alone for a tokens kernel. A framework kernel that raises
    when eager falls back to :data:`FALLBACK_KERNEL` (see the module docstring) unless
    ``fallback=False``."""
    from ..registry import default_registry

    registry = default_registry()
    spec = registry.kernel_spec(name)
    guard = fallback and spec.framework is not None and not info.traced
    if guard:
        record = kernel_fallbacks(registry)
        if record.failed and _case(b, name, x_TD, w, info) in record.failed:
            record.counts[name] = record.counts.get(name, 0) + 1
            return run_kernel(b, FALLBACK_KERNEL, x_TD, ids_TK, gates_TK, w, activation, info,
                              fallback=False)
    kernel = registry.kernel(name)

    def attempt(*args: Any) -> Array | None:
        if not guard:
            return kernel(*args)
        try:
            return kernel(*args)
        except Exception as err:  # noqa: BLE001 (any framework error; ours re-raised)
            _failed(b, name, x_TD, w, info, err, registry)
            return None

    if spec.kind == "tokens":
        with b.scope(SCOPES["experts"]):
            out_TD = attempt(b, x_TD, ids_TK, gates_TK, w, activation, info)
        return out_TD if out_TD is not None else run_kernel(
            b, FALLBACK_KERNEL, x_TD, ids_TK, gates_TK, w, activation, info, fallback=False)
    with b.scope(SCOPES["permute"]):
        x_SD, perm = permute(b, x_TD, ids_TK, info.num_experts)
    with b.scope(SCOPES["experts"]):
        out_SD = attempt(b, x_SD, perm, w, activation, info)
        if out_SD is None:
            out_SD = registry.kernel(FALLBACK_KERNEL)(b, x_SD, perm, w, activation, info)
    with b.scope(SCOPES["combine"]):
        return unpermute(b, out_SD, perm, gates_TK)


# ----- run-time fallback of failing framework kernels ----------------------------------------
class KernelFallbacks:
    """What failed, per registry (:func:`kernel_fallbacks`).

    Attributes:
        failed: ``(kernel, dtype, device, bucket) -> "ErrorType: message"`` of each failing
            case; bucket = ``(T rounded up to a power of 2, K, E, F, D)``.
        counts: kernel name -> calls that ran :data:`FALLBACK_KERNEL` instead of it.
    """

    def __init__(self) -> None:
        self.failed: dict[tuple[Any, ...], str] = {}
        self.counts: dict[str, int] = {}


def kernel_fallbacks(registry: Any = None) -> KernelFallbacks:
    """The fallback record of ``registry`` (default: the process registry); it lives in the
    registry's memo, so registering or removing a plugin starts a fresh one."""
    if registry is None:
        from ..registry import default_registry

        registry = default_registry()
    return registry.memo("kernel_fallbacks", "record", KernelFallbacks)  # type: ignore[no-any-return]


def fallback_counts(registry: Any = None) -> dict[str, int]:
    """Kernel name -> number of calls that ran the portable fallback instead (for metrics)."""
    return dict(kernel_fallbacks(registry).counts)


def _case(b: Backend, name: str, x_TD: Array, w: ExpertWeights,
          info: DispatchInfo) -> tuple[Any, ...]:
    F, D = b.shape(w.w_down)[1:]
    return (name, dtype_name(x_TD), device_name(x_TD),
            (token_bucket(info.num_tokens), info.num_slots, info.num_experts, F, D))


def _failed(b: Backend, name: str, x_TD: Array, w: ExpertWeights, info: DispatchInfo,
            err: Exception, registry: Any) -> None:
    """Record, count and warn about a failed kernel call; re-raise what must not be caught."""
    if isinstance(err, (MoERouterError, MemoryError)) or "OutOfMemory" in type(err).__name__:
        raise err
    record = kernel_fallbacks(registry)
    case = _case(b, name, x_TD, w, info)
    first_line = (str(err).strip().splitlines() or [""])[0][:200]
    record.failed[case] = f"{type(err).__name__}: {first_line}"
    record.counts[name] = record.counts.get(name, 0) + 1
    _, dtype, device, (bucket, K, E, F, D) = case
    warnings.warn(
        f"expert kernel {name!r} failed ({record.failed[case]}) for {dtype} on "
        f"{device or 'host'}, T<={bucket} tokens, K={K}, E={E}, F={F}, D={D}; the portable "
        f"{FALLBACK_KERNEL!r} kernel runs instead for this case from now on (same result; "
        f"counted in moe_router.layer.experts.fallback_counts())",
        KernelFallbackWarning, stacklevel=4)
