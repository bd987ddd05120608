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
  autograd or ``torch.compile`` needs it), ``padded`` (one ``bmm`` over an ``(E, C, D)`` buffer),
  ``loop`` (per-expert matmuls), or under ``torch.compile`` without ``_grouped_mm`` support
  transformers' own opaque ``grouped_mm_fallback`` op;
- numerics as transformers' ``grouped_mm``: activations cast to the weights' dtype, outputs times
  the routing weights (torch's type promotion), summed over K, cast to ``hidden_states``' dtype.

Shapes: T tokens, K slots per token, S = T*K slots, E experts, D model width, N = 2F (gated) or
F, F expert width.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import itertools
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moe_router.errors import InputError
from moe_router.layer.experts import Permutation, permutation

from .backend import TorchBackend
from .kernels import PADDED_MAX_SLOTS, _zero_tail, grouped_mm

#: the name under which transformers finds us (``experts_implementation="moe_router"``)
NAME = "moe_router"
#: the module holding ``ALL_EXPERTS_FUNCTIONS``
_MOE_MODULE = "transformers.integrations.moe"
#: kernels :func:`choose_experts_kernel` may answer
KERNELS = ("grouped_mm", "padded", "loop", "fallback")
#: CPU, several threads: ``padded`` up to this many slots per expert, then ``grouped_mm``
PADDED_ROWS_PER_EXPERT = 32
#: CPU, one thread: ``loop`` below this many slots per expert, then ``grouped_mm``
ONE_THREAD_GMM_ROWS = 8
_GMM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_B = TorchBackend()

Mm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class ExpertsWeights(NamedTuple):
    """An experts module's tensors as views in the ``x @ w`` layout.

    Attributes:
        w_in_EDN: ``gate_up_proj`` (N = 2F) or ``up_proj`` (N = F) as ``(E, D, N)``.
        b_in_EN: its bias ``(E, N)`` or ``None``.
        w_out_EFD: ``down_proj`` as ``(E, F, D)``.
        b_out_ED: its bias ``(E, D)`` or ``None``.
    """

    w_in_EDN: torch.Tensor
    b_in_EN: torch.Tensor | None
    w_out_EFD: torch.Tensor
    b_out_ED: torch.Tensor | None


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


def grouped_rows(experts: nn.Module, x_SD: torch.Tensor, perm: Permutation, w: ExpertsWeights,
                 kernel: str = "grouped_mm") -> torch.Tensor:
    """``grouped_mm`` / ``fallback``: one grouped GEMM per projection over all S rows (static
    shapes: the ``torch.compile`` paths). The GEMMs skip the tail rows and leave them zero; they
    get no bias (the post-expert norm sees zeros), and their routing weight is zero."""
    offs_E = torch.cumsum(perm.counts_E, 0, dtype=torch.int32)
    needs_grad = torch.is_grad_enabled() and (
        x_SD.requires_grad or any(t is not None and t.requires_grad for t in w))
    if kernel == "fallback":  # transformers' opaque per-expert loop (any dtype), zero tail
        op = torch.ops.transformers.grouped_mm_fallback
        mm_in = mm_out = lambda a, b: op(a, b, offs_E)  # noqa: E731
    elif torch.compiler.is_compiling() or needs_grad:
        mm_in = mm_out = lambda a, b: grouped_mm(a, b, offs_E)  # noqa: E731
    else:  # eager inference: the raw kernel; tail rows of the hidden are never read
        mm_in = lambda a, b: torch._grouped_mm(a, b, offs=offs_E)  # noqa: E731
        mm_out = lambda a, b: _zero_tail(torch._grouped_mm(a, b, offs=offs_E), offs_E)  # noqa: E731
    return _ffn(experts, x_SD, w, mm_in, mm_out, _row_bias(w.b_in_EN, perm.expert_S),
                _row_bias(w.b_out_ED, perm.expert_S))


def expert_grid(counts: Sequence[int]) -> tuple[int, int, int]:
    """``(first, step, n)``: the fewest evenly spaced experts ``first + i * step`` (i < n)
    covering every used one (their used set itself when it is evenly spaced, e.g. 1 or 2 experts,
    else the whole used range); ``counts`` has at least one non-zero entry."""
    active = [e for e, c in enumerate(counts) if c]
    step = active[1] - active[0] if len(active) > 1 else 1
    if any(b - a != step for a, b in zip(active, active[1:])):
        step = 1
    return active[0], step, (active[-1] - active[0]) // step + 1


def padded_rows(experts: nn.Module, x_SD: torch.Tensor, perm: Permutation, w: ExpertsWeights,
                counts: Sequence[int]) -> torch.Tensor:
    """``padded``: rows scattered into an ``(n, C, D)`` buffer over the :func:`expert_grid`
    experts (strided views of the weights, no copy; C = the largest count, host-read) and one
    ``bmm`` per projection (it spreads the experts over threads); tail rows zero."""
    used = sum(counts)
    first, step, n = expert_grid(counts)
    grid = [first + i * step for i in range(n)]
    starts = list(itertools.accumulate([counts[e] for e in grid[:-1]], initial=0))
    expert_U = perm.expert_S[:used]
    slot_U = torch.div(expert_U - first, step, rounding_mode="floor")
    start_n = torch.tensor(starts, device=x_SD.device, dtype=expert_U.dtype)
    rank_U = torch.arange(used, device=x_SD.device) - start_n[slot_U]
    x_nCD = x_SD.new_zeros((n, max(counts), x_SD.shape[1]))
    x_nCD = x_nCD.index_put((slot_U, rank_U), x_SD[:used])
    end = first + (n - 1) * step + 1
    w_grid = ExpertsWeights(*(None if t is None else t[first:end:step] for t in w))
    b_in, b_out = (None if b is None else b[:, None, :] for b in w_grid[1::2])
    out_nCD = _ffn(experts, x_nCD, w_grid, torch.bmm, torch.bmm, b_in, b_out)
    out_UD = out_nCD[slot_U, rank_U]
    if used == x_SD.shape[0]:
        return out_UD
    return torch.cat([out_UD, out_UD.new_zeros((x_SD.shape[0] - used, out_UD.shape[1]))])


def loop_rows(experts: nn.Module, x_SD: torch.Tensor, perm: Permutation, w: ExpertsWeights,
              counts: Sequence[int]) -> torch.Tensor:
    """``loop``: each used expert's FFN on its contiguous slice of rows; tail rows zero."""
    pieces, start = [], 0
    for e, count in enumerate(counts):
        if count:
            w_e = ExpertsWeights(*(None if t is None else t[e] for t in w))
            pieces.append(_ffn(experts, x_SD[start:start + count], w_e, torch.matmul,
                               torch.matmul, w_e.b_in_EN, w_e.b_out_ED))
        start += count
    if start < x_SD.shape[0]:
        pieces.append(x_SD.new_zeros((x_SD.shape[0] - start, w.w_out_EFD.shape[-1])))
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


# ----- the policy and the forward ---------------------------------------------------------------
def grouped_mm_ok(x: torch.Tensor, w: ExpertsWeights) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands: CUDA SM80+ bfloat16, or CPU
    float32/bfloat16/float16 with 16-byte aligned data (any strides; alignment is unknown, and
    not needed, under ``torch.compile``)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.w_in_EDN.dtype:
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    if x.device.type != "cpu" or x.dtype not in _GMM_CPU_DTYPES:
        return False
    return torch.compiler.is_compiling() or all(
        t.data_ptr() % 16 == 0 for t in (x, w.w_in_EDN, w.w_out_EFD))


def choose_experts_kernel(x_TD: torch.Tensor, w: ExpertsWeights, num_slots: int,
                          counts: Sequence[int] | None = None) -> str:
    """The kernel for these operands, S = ``num_slots`` and (eager) the host-read per-expert
    counts (one of :data:`KERNELS`).

    Under ``torch.compile``: ``grouped_mm`` where supported, else ``fallback``. Eager:
    ``grouped_mm`` on CUDA where supported. Else (CPU, or dtypes ``_grouped_mm`` lacks), as
    measured on CPU (``bench_torch.py``, 1 and 2 threads): ``loop`` above ``PADDED_MAX_SLOTS``
    slots; with several threads ``padded`` while rows per expert are few (S <=
    ``PADDED_ROWS_PER_EXPERT`` * E: ``bmm`` spreads the experts over the threads, where the
    grouped kernel's small per-expert GEMMs do not), ``grouped_mm`` above where supported; with
    one thread ``loop`` below ``ONE_THREAD_GMM_ROWS`` * E slots (the CPU grouped kernel visits
    every expert, ``loop`` only the used ones), ``grouped_mm`` from there where supported.
    ``padded`` gives way to ``loop`` when its :func:`expert_grid` would stream over twice the
    used experts' weights.
    """
    gmm = grouped_mm_ok(x_TD, w)
    if torch.compiler.is_compiling():
        return "grouped_mm" if gmm else "fallback"
    if gmm and x_TD.device.type != "cpu":
        return "grouped_mm"
    if num_slots > PADDED_MAX_SLOTS:
        return "loop"
    E = w.w_in_EDN.shape[0]
    if torch.get_num_threads() == 1 and x_TD.device.type == "cpu":
        return "grouped_mm" if gmm and num_slots >= ONE_THREAD_GMM_ROWS * E else "loop"
    if gmm and num_slots > PADDED_ROWS_PER_EXPERT * E:
        return "grouped_mm"
    if counts is not None and any(counts):
        _, _, n = expert_grid(counts)
        if n > 2 * sum(1 for c in counts if c):
            return "loop"
    return "padded"


def moe_router_experts_forward(self: nn.Module, hidden_states: torch.Tensor,
                               top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                               kernel: str | None = None) -> torch.Tensor:
    """``(T, D)``: sum over the used slots of ``weight * expert(x)``, for any transformers
    experts module ``self``; ``top_k_index`` may hold ``-1`` (unused slots). ``kernel`` forces
    one of :data:`KERNELS` (tests, benchmarks)."""
    T, K = top_k_index.shape
    E = int(self.num_experts)
    w = experts_weights(self)
    dtype = w.w_in_EDN.dtype
    x_TD = hidden_states if hidden_states.dtype == dtype else hidden_states.to(dtype)
    ids_TK = top_k_index
    if self._is_expert_parallel:  # ids >= E belong to other ranks: unused here
        ids_TK = torch.where(ids_TK < E, ids_TK, -1)
    unused_TK = ids_TK < 0
    perm = permutation(_B, ids_TK, E)
    x_SD = x_TD[perm.token_S]
    chosen = kernel or choose_experts_kernel(x_TD, w, T * K)
    if chosen in ("grouped_mm", "fallback"):
        out_SD = grouped_rows(self, x_SD, perm, w, chosen)
    else:
        counts = perm.counts_E.tolist()
        kernel = kernel or choose_experts_kernel(x_TD, w, T * K, counts)
        if not any(counts):
            out_SD = x_SD.new_zeros((T * K, w.w_out_EFD.shape[-1]))
        elif kernel == "padded":
            out_SD = padded_rows(self, x_SD, perm, w, counts)
        else:
            out_SD = loop_rows(self, x_SD, perm, w, counts)
    out_TKD = out_SD[perm.inverse_S].view(T, K, out_SD.shape[-1])
    weights_TK1 = top_k_weights.masked_fill(unused_TK, 0)[..., None]
    y_TD = (out_TKD * weights_TK1).sum(dim=1)
    return y_TD if y_TD.dtype == hidden_states.dtype else y_TD.to(hidden_states.dtype)


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
    """Registers ``"moe_router"`` right after ``transformers.integrations.moe`` is imported
    (then leaves ``sys.meta_path``), so the name works whatever the import order."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _MOE_MODULE:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader  # the real loader again (get_source, reload)
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        register_hf_experts()


def register_hf_experts_lazily() -> None:
    """Register now if transformers' MoE integration is loaded, else when it gets imported;
    never imports transformers (what ``import moe_router.torch`` calls)."""
    if _MOE_MODULE in sys.modules:
        register_hf_experts()
    elif not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
