"""Our sorted grouped dispatch behind transformers' experts seam (``experts_implementation``).

transformers 5.x routes the experts of its MoE families through one seam: classes decorated with
``@use_experts_implementation`` call ``ALL_EXPERTS_FUNCTIONS[config._experts_implementation]``
with ``(hidden_states (T, D), top_k_index (T, K), top_k_weights (T, K))``.
:func:`register_hf_experts` adds :func:`moe_router_experts_forward` there as ``"moe_router"``:

- any layout, read in place (views, no copies): ``gate_up_proj`` ``(E, 2F, D)`` or transposed
  ``(E, D, 2F)`` (``is_transposed``), concatenated or interleaved gate/up (the module's own
  ``_apply_gate``), ``up_proj`` + ``act_fn`` (``has_gate=False``), biases, ``post_expert_norm``;
- slots sorted by expert with the core's :func:`~moe_router.layer.experts.permutation`: unused
  slots (``-1``, and expert-parallel sentinels ``>= num_experts``) go to the tail, cost no compute
  and contribute zero, so a dynamic router (top-p, null experts) can feed it; any K;
- one grouped GEMM per projection, chosen like torch's policy (:func:`choose_experts_kernel`):
  ``grouped_mm`` (``torch._grouped_mm``; through our ``moe_router::grouped_mm`` custom op when
  autograd or ``torch.compile`` needs it), ``padded`` (one ``bmm`` over an ``(n, C, D)``
  buffer of the used experts), ``loop`` (per-expert matmuls), or under ``torch.compile`` without
  ``_grouped_mm`` support transformers' own opaque ``grouped_mm_fallback`` op; a single token
  (decode) skips the sort (``decode``);
- numerics as transformers' ``grouped_mm``: activations cast to the weights' dtype, outputs times
  the routing weights (torch's type promotion: float32 weights on bfloat16 experts sum in
  float32), summed per token (:func:`combine`), cast to ``hidden_states``' dtype.

Shapes: T tokens, K slots per token, S = T*K slots, E experts, D model width, N = 2F (gated) or
F, F expert width.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import itertools
import sys
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_router.errors import InputError
from moe_router.layer.experts import Permutation, permutation

from .backend import TorchBackend
from .kernels import PADDED_MAX_SLOTS, _zero_tail, grouped_mm

#: set on an experts module made expert-parallel (:mod:`.expert_parallel`)
EP_ATTR = "_moe_router_expert_parallel"
#: the name under which transformers finds us (``experts_implementation="moe_router"``)
NAME = "moe_router"
#: the module holding ``ALL_EXPERTS_FUNCTIONS``
_MOE_MODULE = "transformers.integrations.moe"
#: kernels :func:`choose_experts_kernel` may answer
KERNELS = ("grouped_mm", "padded", "loop", "decode", "fallback")
#: CPU, several threads: ``padded`` up to this many slots per expert, then ``grouped_mm``
PADDED_ROWS_PER_EXPERT = 32
_GMM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_B = TorchBackend()

Mm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertsWeights(NamedTuple):
    """An experts module's tensors as views in the ``x @ w`` layout (biases may be ``None``)."""

    w_in_EDN: torch.Tensor  # gate_up_proj (N = 2F) or up_proj (N = F)
    b_in_EN: torch.Tensor | None
    w_out_EFD: torch.Tensor  # down_proj
    b_out_ED: torch.Tensor | None

    def pick(self, index: Any) -> ExpertsWeights:
        """The experts at ``index`` (an int or a slice: views)."""
        return ExpertsWeights(*(None if t is None else t[index] for t in self))


def experts_weights(experts: nn.Module) -> ExpertsWeights:
    """The module's weights as ``x @ w`` views (transposes of the parameters, never copies)."""
    prefix = "gate_up_proj" if experts.has_gate else "up_proj"
    w_in, w_out = getattr(experts, prefix), experts.down_proj
    if not experts.is_transposed:  # stored (E, out, in)
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    bias = experts.has_bias
    return ExpertsWeights(w_in, getattr(experts, f"{prefix}_bias", None) if bias else None,
                          w_out, getattr(experts, "down_proj_bias", None) if bias else None)


def _ffn(experts: nn.Module, x: torch.Tensor, w: ExpertsWeights, mm_in: Mm, mm_out: Mm,
         b_in: torch.Tensor | None, b_out: torch.Tensor | None) -> torch.Tensor:
    """The expert FFN on rows ``x`` with the given matmuls and (broadcastable) biases."""
    h = mm_in(x, w.w_in_EDN)
    if b_in is not None:
        h = h + b_in
    h = experts._apply_gate(h) if experts.has_gate else experts.act_fn(h)
    out = mm_out(h, w.w_out_EFD)
    if b_out is not None:
        out = out + b_out
    return experts.post_expert_norm(out) if experts.has_post_expert_norm else out


# ----- kernels over the expert-sorted rows (tail rows: no compute, finite) ----------------------
def _row_bias(b_EN: torch.Tensor | None, expert_S: torch.Tensor) -> torch.Tensor | None:
    """Each sorted row's bias; tail rows (expert ``E``) read an appended zero row."""
    return None if b_EN is None else F.pad(b_EN, (0, 0, 0, 1))[expert_S]


def grouped_rows(experts: nn.Module, x_RD: torch.Tensor, perm: Permutation, w: ExpertsWeights,
                 kernel: str = "grouped_mm", tail: bool = True) -> torch.Tensor:
    """``grouped_mm`` / ``fallback``: one grouped GEMM per projection over the first R sorted
    rows: all S (static shapes: CUDA, ``torch.compile``), or the U used ones (CPU eager:
    ``tail=False``). The GEMMs skip the tail rows (unused slots) and leave them zero; they get
    no bias (the post-expert norm sees zeros), and their routing weight is zero."""
    offs_E = torch.cumsum(perm.counts_E, 0, dtype=torch.int32)
    needs_grad = torch.is_grad_enabled() and (
        x_RD.requires_grad or any(t is not None and t.requires_grad for t in w))
    if kernel == "fallback":  # transformers' opaque per-expert loop (any dtype), zero tail
        op = torch.ops.transformers.grouped_mm_fallback
        mm_in = mm_out = lambda a, b: op(a, b, offs_E)  # noqa: E731
    elif torch.compiler.is_compiling() or needs_grad:
        mm_in = mm_out = lambda a, b: grouped_mm(a, b, offs_E)  # noqa: E731
    else:  # eager inference: the raw kernel; tail rows of the hidden are never read
        mm_in = lambda a, b: torch._grouped_mm(a, b, offs=offs_E)  # noqa: E731
        mm_out = mm_in
        if tail:  # rows past offs[-1] may be there, unwritten
            mm_out = lambda a, b: _zero_tail(mm_in(a, b), offs_E)  # noqa: E731
    expert_R = perm.expert_S[:x_RD.shape[0]]
    return _ffn(experts, x_RD, w, mm_in, mm_out, _row_bias(w.b_in_EN, expert_R),
                _row_bias(w.b_out_ED, expert_R))


def expert_grid(counts: Sequence[int]) -> tuple[int, int, int]:
    """``(first, step, n)``: the fewest evenly spaced experts ``first + i * step`` (i < n)
    covering every used one (their used set itself when it is evenly spaced, e.g. 1 or 2 experts,
    else the whole used range); ``counts`` has at least one non-zero entry."""
    active = [e for e, c in enumerate(counts) if c]
    step = active[1] - active[0] if len(active) > 1 else 1
    if any(b - a != step for a, b in zip(active, active[1:])):
        step = 1
    return active[0], step, (active[-1] - active[0]) // step + 1


def padded_rows(experts: nn.Module, x_UD: torch.Tensor, perm: Permutation, w: ExpertsWeights,
                counts: Sequence[int]) -> torch.Tensor:
    """``padded``: the U used rows (the head of the sorted ones) scattered into an
    ``(n, C, D)`` buffer over the :func:`expert_grid` experts (strided views of the weights, no
    copy; C = the largest count, host-read) and one ``bmm`` per projection (it spreads the
    experts over threads); returns the U output rows."""
    first, step, n = expert_grid(counts)
    grid = [first + i * step for i in range(n)]
    starts = list(itertools.accumulate([counts[e] for e in grid[:-1]], initial=0))
    expert_U = perm.expert_S[:x_UD.shape[0]]
    slot_U = torch.div(expert_U - first, step, rounding_mode="floor")
    start_n = torch.tensor(starts, device=x_UD.device, dtype=expert_U.dtype)
    rank_U = torch.arange(x_UD.shape[0], device=x_UD.device) - start_n[slot_U]
    x_nCD = x_UD.new_zeros((n, max(counts), x_UD.shape[1])).index_put((slot_U, rank_U), x_UD)
    end = first + (n - 1) * step + 1
    w_grid = w.pick(slice(first, end, step))
    b_in, b_out = (None if b is None else b[:, None, :] for b in w_grid[1::2])
    return _ffn(experts, x_nCD, w_grid, torch.bmm, torch.bmm, b_in, b_out)[slot_U, rank_U]


def _loop_pieces(experts: nn.Module, rows: Callable[[int, int], torch.Tensor],
                 w: ExpertsWeights, counts: Sequence[int]) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, output rows)`` of each used expert's FFN on its slice ``rows(a, b)`` of
    the sorted rows."""
    start = 0
    for e, count in enumerate(counts):
        if count:
            w_e = w.pick(e)
            yield start, _ffn(experts, rows(start, start + count), w_e, torch.matmul,
                              torch.matmul, w_e.b_in_EN, w_e.b_out_ED)
        start += count


def loop_rows(experts: nn.Module, x_UD: torch.Tensor, perm: Permutation, w: ExpertsWeights,
              counts: Sequence[int]) -> torch.Tensor:
    """``loop``: each used expert's FFN on its contiguous slice of the U used rows; returns
    the U output rows."""
    pieces = [out for _, out in _loop_pieces(experts, lambda a, b: x_UD[a:b], w, counts)]
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def loop_combined(experts: nn.Module, x_TD: torch.Tensor, perm: Permutation,
                  w: ExpertsWeights, counts: Sequence[int],
                  weights_TK: torch.Tensor) -> torch.Tensor:
    """``loop`` fused with the gather and the index-add :func:`combine` (CPU): each expert
    gathers its token rows, and its outputs are scaled and added into their tokens while still
    in cache; returns ``y_TD``."""
    dtype = torch.promote_types(x_TD.dtype, weights_TK.dtype)
    weights_U1 = weights_TK.reshape(-1)[perm.order_S[:sum(counts)], None].to(dtype)
    y_TD = x_TD.new_zeros((x_TD.shape[0], w.w_out_EFD.shape[-1]), dtype=dtype)
    rows = lambda a, b: x_TD[perm.token_S[a:b]]  # noqa: E731
    for start, out in _loop_pieces(experts, rows, w, counts):
        stop = start + out.shape[0]
        y_TD.index_add_(0, perm.token_S[start:stop], _scaled(out, weights_U1[start:stop]))
    return y_TD


def _scaled(out_ND: torch.Tensor, weights_N1: torch.Tensor) -> torch.Tensor:
    """Rows times weights in the weights' (promoted) dtype: cast first, then scale in place (a
    mixed-dtype multiply is ~4x slower on CPU)."""
    if out_ND.dtype == weights_N1.dtype:
        return out_ND * weights_N1
    return out_ND.to(weights_N1.dtype).mul_(weights_N1)


def decode_tokens(experts: nn.Module, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                  weights_TK: torch.Tensor, w: ExpertsWeights) -> torch.Tensor:
    """``decode``: no sort; each token's used experts (indices read on the host), as one
    ``bmm`` over a strided view of their weights when evenly spaced (float32 / float64, several
    threads), else per-expert matmuls; then the token's weighted sum. For T = 1."""
    dtype = torch.promote_types(x_TD.dtype, weights_TK.dtype)
    spread = torch.get_num_threads() > 1 and x_TD.dtype in (torch.float32, torch.float64)
    rows = []
    for t, ids_K in enumerate(ids_TK.tolist()):
        used = sorted((e, k) for k, e in enumerate(ids_K) if e >= 0)
        if not used:
            rows.append(x_TD.new_zeros((1, w.w_out_EFD.shape[-1]), dtype=dtype))
            continue
        es = [e for e, _ in used]
        step = es[1] - es[0] if len(es) > 1 else 0
        if spread and step > 0 and all(b - a == step for a, b in zip(es, es[1:])):
            w_n = w.pick(slice(es[0], es[-1] + 1, step))
            b_in, b_out = (None if b is None else b[:, None, :] for b in w_n[1::2])
            out_nD = _ffn(experts, x_TD[t].expand(len(es), 1, -1), w_n, torch.bmm, torch.bmm,
                          b_in, b_out)[:, 0]
        else:
            w_e = [w.pick(e) for e in es]
            out_nD = torch.cat([_ffn(experts, x_TD[t:t + 1], we, torch.matmul, torch.matmul,
                                     we.b_in_EN, we.b_out_ED) for we in w_e])
        weights_n1 = weights_TK[t, [k for _, k in used], None].to(dtype)
        rows.append((out_nD.to(dtype) * weights_n1).sum(dim=0, keepdim=True))
    return torch.cat(rows) if rows else x_TD.new_zeros((0, w.w_out_EFD.shape[-1]), dtype=dtype)


def on_host(x: torch.Tensor) -> bool:
    """CPU: host reads are free and ``index_add_`` is deterministic, so the sorted paths use
    only the used rows, fuse ``loop`` with the combine, and index-add (tests patch this to run
    the device paths on CPU)."""
    return x.device.type == "cpu"


def combine(out_RD: torch.Tensor, perm: Permutation, weights_TK: torch.Tensor,
            num_tokens: int, index_add: bool | None = None) -> torch.Tensor:
    """``y_TD``: each of the first R sorted rows times its slot's weight, summed into its
    token (rows beyond R, and zero-weight slots, contribute nothing). ``index_add`` (default:
    :func:`on_host`) index-adds the scaled rows (2x faster than the gather at T = 4096); else
    they are gathered back through the inverse permutation and summed over K, as transformers'
    ``grouped_mm`` does (deterministic on every device: no atomics)."""
    R, D = out_RD.shape
    if index_add if index_add is not None else on_host(out_RD):
        dtype = torch.promote_types(out_RD.dtype, weights_TK.dtype)
        weighted_RD = _scaled(out_RD, weights_TK.reshape(-1)[perm.order_S[:R], None].to(dtype))
        return weighted_RD.new_zeros((num_tokens, D)).index_add_(0, perm.token_S[:R],
                                                                  weighted_RD)
    S = perm.order_S.shape[0]
    out_SD = out_RD if R == S else F.pad(out_RD, (0, 0, 0, S - R))
    out_TKD = out_SD[perm.inverse_S].view(num_tokens, perm.num_slots, D)
    return (out_TKD * weights_TK[..., None]).sum(dim=1)


# ----- the policy and the forward ---------------------------------------------------------------
def grouped_mm_ok(x: torch.Tensor, w: ExpertsWeights) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: CUDA SM80+ bfloat16, or CPU
    float32/bfloat16/float16 with 16-byte aligned weights (any strides; the alignment, unknown
    while tracing, is not checked under ``torch.compile``; the rows it multiplies are fresh,
    hence aligned, tensors)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.w_in_EDN.dtype:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu" or x.dtype not in _GMM_CPU_DTYPES:
        return False
    return torch.compiler.is_compiling() or all(
        t.data_ptr() % 16 == 0 for t in (w.w_in_EDN, w.w_out_EFD))


def choose_experts_kernel(x_TD: torch.Tensor, w: ExpertsWeights, num_slots: int,
                          counts: Sequence[int] | None = None) -> str:
    """The kernel for these operands, S = ``num_slots`` and (eager) the host-read per-expert
    counts (one of :data:`KERNELS`).

    - ``torch.compile``: ``grouped_mm`` where supported, else ``fallback`` (static shapes).
    - Eager, CUDA: ``grouped_mm`` where supported (SM80+ bfloat16).
    - Else ``decode`` for a single token (no sort: fewest ops, for decode steps).
    - Else (CPU, or dtypes ``_grouped_mm`` lacks), as measured on CPU (``bench_torch.py``, 1 and
      2 threads): ``loop`` above ``PADDED_MAX_SLOTS`` slots; below, bfloat16 / float16 take
      ``grouped_mm`` where supported (CPU ``bmm`` of half types over strided weights is slow);
      float32 with several threads takes ``padded`` up to ``PADDED_ROWS_PER_EXPERT`` * E slots
      (``bmm`` spreads the experts over the threads; the grouped kernel's small per-expert GEMMs
      do not), ``grouped_mm`` above; with one thread ``grouped_mm``. Without ``_grouped_mm``
      support, ``padded`` / ``loop`` stand in.
    - ``padded`` gives way to ``loop`` when its :func:`expert_grid` would stream over twice the
      used experts' weights.
    """
    gmm = grouped_mm_ok(x_TD, w)
    if torch.compiler.is_compiling():
        return "grouped_mm" if gmm else "fallback"
    if gmm and x_TD.device.type != "cpu":
        return "grouped_mm"
    if x_TD.shape[0] == 1:
        return "decode"
    if num_slots > PADDED_MAX_SLOTS:
        return "loop"
    half = x_TD.dtype in (torch.bfloat16, torch.float16)
    if x_TD.device.type == "cpu" and (half or torch.get_num_threads() == 1):
        return "grouped_mm" if gmm else "loop"
    if gmm and num_slots > PADDED_ROWS_PER_EXPERT * w.w_in_EDN.shape[0]:
        return "grouped_mm"
    return "loop" if counts is not None and _sparse_grid(counts) else "padded"


def _sparse_grid(counts: Sequence[int]) -> bool:
    """Whether ``padded`` would stream over twice the used experts' weights."""
    if not any(counts):
        return False
    return expert_grid(counts)[2] > 2 * sum(1 for c in counts if c)


def moe_router_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                               top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                               kernel: str | None = None) -> torch.Tensor:
    """``(T, D)``: sum over the used slots of ``weight * expert(x)``, for any transformers
    experts module ``self``; ``top_k_index`` may hold ``-1`` (unused slots). ``kernel`` forces
    one of :data:`KERNELS` (tests, benchmarks)."""
    T, K = top_k_index.shape
    w = experts_weights(self)
    dtype = w.w_in_EDN.dtype
    x_TD = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
    ids_TK = top_k_index
    if EP_ATTR in self.__dict__:  # our expert parallelism: the local experts after the exchange
        from .expert_parallel import hf_experts_forward

        y_TD = hf_experts_forward(self, x_TD, ids_TK, top_k_weights, lambda x, ids, gates: (
            moe_router_experts_forward(_Local(self), x, ids, gates, kernel)))
        return y_TD if y_TD.dtype == hidden_states.dtype else y_TD.to(hidden_states.dtype)
    if self._is_expert_parallel:  # ids >= E belong to other ranks: unused here
        ids_TK = torch.where(ids_TK < self.num_experts, ids_TK, -1)
    chosen = kernel or choose_experts_kernel(x_TD, w, T * K)
    if chosen == "decode":
        y_TD = decode_tokens(self, x_TD, ids_TK, top_k_weights, w)
    else:
        y_TD = _sorted_forward(self, x_TD, ids_TK, top_k_weights, w, chosen, kernel is None)
    return y_TD if y_TD.dtype == hidden_states.dtype else y_TD.to(hidden_states.dtype)


class _Local:
    """An expert-parallel experts module seen as its local experts only (attribute proxy)."""

    def __init__(self, experts: nn.Module) -> None:
        self.__dict__["_experts"] = experts

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_experts"], name)


def _sorted_forward(experts: nn.Module, x_TD: torch.Tensor, ids_TK: torch.Tensor,
                    weights_TK: torch.Tensor, w: ExpertsWeights, kernel: str,
                    auto: bool) -> torch.Tensor:
    """Slots sorted by expert (the core's permutation), ``kernel`` on the sorted rows,
    :func:`combine`."""
    perm = permutation(_B, ids_TK, int(experts.num_experts))
    weights_TK = weights_TK.masked_fill(ids_TK < 0, 0)
    if kernel == "fallback" or (kernel == "grouped_mm" and (
            not on_host(x_TD) or torch.compiler.is_compiling())):
        out_RD = grouped_rows(experts, x_TD[perm.token_S], perm, w, kernel)  # S rows, no sync
    else:  # only the U used rows (host-read counts)
        counts = perm.counts_E.tolist()
        if auto and kernel == "padded" and _sparse_grid(counts):
            kernel = "loop"
        if kernel == "loop" and on_host(x_TD) and any(counts):
            return loop_combined(experts, x_TD, perm, w, counts, weights_TK)
        x_UD = x_TD[perm.token_S[:sum(counts)]]
        if not x_UD.shape[0]:
            out_RD = x_UD.new_zeros((0, w.w_out_EFD.shape[-1]))
        elif kernel == "grouped_mm":
            out_RD = grouped_rows(experts, x_UD, perm, w, tail=False)
        else:
            rows = padded_rows if kernel == "padded" else loop_rows
            out_RD = rows(experts, x_UD, perm, w, counts)
    return combine(out_RD, perm, weights_TK, x_TD.shape[0])


# ----- registration ------------------------------------------------------------------------------
def register_hf_experts() -> None:
    """Register :func:`moe_router_experts_forward` as ``"moe_router"`` in transformers'
    ``ALL_EXPERTS_FUNCTIONS`` (all instances; idempotent). Imports transformers."""
    from transformers.integrations.moe import ExpertsInterface

    if ExpertsInterface._global_mapping.get(NAME) is not moe_router_experts_forward:
        ExpertsInterface.register(NAME, moe_router_experts_forward)


def is_hf_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module (``@use_experts_implementation``)."""
    return (all(hasattr(module, a) for a in ("num_experts", "has_gate", "is_transposed",
                                             "_is_expert_parallel", "down_proj"))
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def use_moe_router_experts(model: nn.Module) -> int:
    """Register ``"moe_router"`` and switch every experts module of ``model`` to it (through
    ``model.set_experts_implementation`` when it has one). Returns how many experts modules
    now use it.

    Raises:
        InputError: naming ``model``, when it has no transformers experts module.
    """
    experts = [m for m in model.modules() if is_hf_experts(m)]
    if not experts:
        raise InputError("model", f"{type(model).__name__} has no transformers experts module "
                         "(a class decorated with @use_experts_implementation, transformers "
                         ">= 5); nothing was switched")
    register_hf_experts()
    if callable(getattr(model, "set_experts_implementation", None)):
        model.set_experts_implementation(NAME)
    for m in experts:  # modules the model-level switch did not reach (e.g. a bare block)
        if m.config._experts_implementation != NAME:
            m.config._experts_implementation = NAME
    return sum(m.config._experts_implementation == NAME for m in experts)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Registers ``"moe_router"`` right after ``transformers.integrations.moe`` is imported,
    then leaves ``sys.meta_path``: the name works whatever the import order."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MOE_MODULE:
            return None
        for finder in sys.meta_path:  # the spec the others would give, its loader wrapped
            find = None if finder is self else getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any, finder: _RegisterOnImport) -> None:
        self._loader, self._finder = loader, finder

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # the real loader again (get_source, reload)
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        register_hf_experts()
        if self._finder in sys.meta_path:
            sys.meta_path.remove(self._finder)


def register_hf_experts_lazily() -> None:
    """Register now if transformers' MoE integration is loaded, else when it gets imported;
    never imports transformers (what ``import moe_router.torch`` calls)."""
    if _MOE_MODULE in sys.modules:
        register_hf_experts()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
