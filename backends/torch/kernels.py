"""Torch expert kernels behind the core's expert-compute interface, and torch's dispatch policy.

Shapes: T tokens, K slots per token, S = T*K slots, E experts, D model width, F expert width.
The core (:mod:`moe_router.layer.experts`) sorts the slots by expert (unused slots, ``-1``, at the
tail), gathers their rows and un-permutes the result; the *grouped* kernels here map the sorted
rows ``x_SD`` to ``out_SD`` (tail rows zero, and no compute spent on them). Registered in
``plugin.py`` as:

- ``torch:grouped_mm`` (:func:`grouped_mm_ffn`): one grouped GEMM per projection over the sorted
  rows (``torch._grouped_mm``, offsets = cumulative expert counts; forward and backward). CPU
  (float32 / bfloat16 / float16) and CUDA SM80+ (bfloat16). Static shapes: the path used under
  ``torch.compile``.
- ``torch:padded`` (:func:`padded_ffn`): the sorted rows scattered into an ``(E, C, D)`` buffer
  (C = the largest expert's row count, read on the host) and three batched matmuls: padding rows
  cost FLOPs but no extra weight traffic, and ``bmm`` spreads the experts over threads (CPU,
  small and medium T).
- ``torch:loop`` (:func:`loop_ffn`): per-expert matmuls over contiguous slices of the sorted rows
  (any dtype and device, e.g. float64 for ``gradcheck``); reads the counts on the host.
- ``torch:gather`` (:func:`gather_tokens`, a *tokens* kernel: no permutation): decode-sized
  batches; per token, one batched matmul over a strided view of its experts' weights (no sort,
  no weight copy); reads the indices on the host.

:func:`choose_kernel` is torch's dispatch policy. ``auto``: eager: ``torch:gather`` for a single
token (K <= E), ``torch:grouped_mm`` on CUDA where supported, else ``torch:padded`` up to
``PADDED_MAX_SLOTS`` slots and ``torch:loop`` above (on CPU both measured faster than the CPU
grouped kernel at every T); under ``torch.compile``: ``torch:grouped_mm`` where supported, else
the portable ``dense``. ``sorted`` maps to the best dropless grouped kernel of the same choice,
``gather`` to ``torch:gather`` when eager; ``capacity`` and ``dense`` stay portable.

These thresholds are the answer without measurements: when the tuning cache has an entry for the
layer's shape, token bucket, dtype, device and thread count (``moe-router tune``,
``MOE_AUTOTUNE=1``; :mod:`moe_router.layer.tuning`), eager ``auto`` takes the measured kernel
instead and this policy is not asked.
"""

from __future__ import annotations

from typing import Any

import torch

from moe_router.backend import Backend
from moe_router.layer.experts import DispatchInfo, ExpertWeights, Permutation, activate

_GMM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: ``auto`` on CPU uses ``torch:padded`` up to this many slots (T*K), ``torch:loop`` above
PADDED_MAX_SLOTS = 2048


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor | None = None) -> bool:
    """Whether ``torch._grouped_mm`` runs for these operands (device, dtype, alignment)."""
    if not hasattr(torch, "_grouped_mm") or (w is not None and x.dtype != w.dtype):
        return False
    if x.device.type == "cpu":
        if x.dtype not in _GMM_CPU_DTYPES:
            return False
        if torch.compiler.is_compiling() or w is None:
            return True
        return w.data_ptr() % 16 == 0 and w.stride(-1) == 1
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


# ----- torch:grouped_mm ----------------------------------------------------------------------
def _zero_tail(rows: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Zero the rows at or beyond ``offs[-1]`` (the kernel leaves them unwritten)."""
    row_S = torch.arange(rows.shape[0], device=rows.device)
    return torch.where((row_S < offs[-1])[:, None], rows, torch.zeros((), dtype=rows.dtype,
                                                                      device=rows.device))


# The grouped GEMM as custom ops: torch.compile sees them as opaque calls with a shape-only
# fake implementation (the built-in meta kernel of ``_grouped_mm`` accepts only bfloat16), and
# the backward is ours (the CPU kernel's own backward rejects broadcast gradients in 2.13).
@torch.library.custom_op("moe_router::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``out[s] = a[s] @ w[group of s]`` over group-sorted rows ``(S, D) x (E, D, N) -> (S, N)``;
    ``offs`` ``(E,)`` int32 cumulative row ends; rows beyond ``offs[-1]`` are zero."""
    return _zero_tail(torch._grouped_mm(a, w, offs=offs), offs)


@grouped_mm.register_fake
def _(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], w.shape[-1]))


@torch.library.custom_op("moe_router::grouped_mm_wgrad", mutates_args=())
def grouped_mm_wgrad(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Per-group ``a_g^T @ grad_g``: ``(S, D), (S, N) -> (E, D, N)`` (empty groups give 0)."""
    return torch._grouped_mm(a.t(), _zero_tail(grad.contiguous(), offs), offs=offs)


@grouped_mm_wgrad.register_fake
def _(a: torch.Tensor, grad: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return a.new_empty((offs.shape[0], a.shape[1], grad.shape[1]))


def _gmm_setup(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
    a, w, offs = inputs
    ctx.save_for_backward(a, w, offs)


def _gmm_backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
    a, w, offs = ctx.saved_tensors
    grad = grad.contiguous()
    grad_a = grad_w = None
    if ctx.needs_input_grad[0]:
        grad_a = grouped_mm(grad, w.transpose(-2, -1), offs)
    if ctx.needs_input_grad[1]:
        grad_w = grouped_mm_wgrad(a, grad, offs)
    return grad_a, grad_w, None


grouped_mm.register_autograd(_gmm_backward, setup_context=_gmm_setup)


def grouped_mm_ffn(b: Backend, x_SD: torch.Tensor, perm: Permutation, w: ExpertWeights,
                   activation: str, info: DispatchInfo) -> torch.Tensor:
    """``torch:grouped_mm``: one ``torch._grouped_mm`` per projection over the sorted rows."""
    offs_E = torch.cumsum(perm.counts_E, 0, dtype=torch.int32)
    needs_grad = torch.is_grad_enabled() and (
        x_SD.requires_grad or any(t is not None and t.requires_grad for t in w))
    if torch.compiler.is_compiling() or needs_grad:
        gate = None if w.w_gate is None else grouped_mm(x_SD, w.w_gate, offs_E)
        hidden = activate(b, activation, gate, grouped_mm(x_SD, w.w_up, offs_E))
        return grouped_mm(hidden, w.w_down, offs_E)
    # eager inference: the raw kernel (no custom-op dispatch); the tail rows of the
    # intermediates are never read by the next grouped GEMM, so only the output is zeroed
    mm = torch._grouped_mm
    gate = None if w.w_gate is None else mm(x_SD, w.w_gate, offs=offs_E)
    hidden = activate(b, activation, gate, mm(x_SD, w.w_up, offs=offs_E))
    return _zero_tail(mm(hidden, w.w_down, offs=offs_E), offs_E)


# ----- torch:loop and torch:padded -----------------------------------------------------------
def _ffn_one(b: Backend, x: torch.Tensor, w: ExpertWeights, e: int,
             activation: str) -> torch.Tensor:
    """Expert ``e`` on rows ``x`` ``(N, D)``."""
    gate = None if w.w_gate is None else x @ w.w_gate[e]
    return activate(b, activation, gate, x @ w.w_up[e]) @ w.w_down[e]


def loop_ffn(b: Backend, x_SD: torch.Tensor, perm: Permutation, w: ExpertWeights,
             activation: str, info: DispatchInfo) -> torch.Tensor:
    """``torch:loop``: per-expert matmuls over the contiguous slices of the sorted rows."""
    pieces, start = [], 0
    for e, count in enumerate(perm.counts_E.tolist()):
        if count:
            pieces.append(_ffn_one(b, x_SD[start:start + count], w, e, activation))
        start += count
    tail = x_SD.shape[0] - start
    if tail or not pieces:
        pieces.append(x_SD.new_zeros((tail, w.w_down.shape[-1])))
    return torch.cat(pieces, dim=0)


def padded_ffn(b: Backend, x_SD: torch.Tensor, perm: Permutation, w: ExpertWeights,
               activation: str, info: DispatchInfo) -> torch.Tensor:
    """``torch:padded``: sorted rows scattered into an ``(E, C, D)`` buffer (C = the largest
    expert's row count, read on the host), three batched matmuls, rows gathered back. Padding
    rows cost FLOPs but no extra weight traffic, and ``bmm`` splits the experts over threads:
    the fast CPU path when the layer is bound by streaming the weights (small and medium T)."""
    counts = perm.counts_E.tolist()
    used, capacity = sum(counts), max(counts)
    out_SD = x_SD.new_zeros((x_SD.shape[0], w.w_down.shape[-1]))
    if used == 0:
        return out_SD
    starts, total = [], 0
    for count in counts:
        starts.append(total)
        total += count
    expert_U = perm.expert_S[:used]
    start_E = torch.tensor(starts, device=x_SD.device, dtype=expert_U.dtype)
    rank_U = torch.arange(used, device=x_SD.device) - start_E[expert_U]
    x_ECD = x_SD.new_zeros((len(counts), capacity, x_SD.shape[1]))
    x_ECD = x_ECD.index_put((expert_U, rank_U), x_SD[:used])
    gate = None if w.w_gate is None else torch.bmm(x_ECD, w.w_gate)
    hidden = activate(b, activation, gate, torch.bmm(x_ECD, w.w_up))
    out_ECD = torch.bmm(hidden, w.w_down)
    return out_SD.index_put((torch.arange(used, device=x_SD.device),), out_ECD[expert_U, rank_U])


# ----- torch:gather --------------------------------------------------------------------------
def _strided_experts(w: torch.Tensor, first: int, step: int, n: int) -> torch.Tensor:
    """``w[first], w[first + step], ...`` (n of them) as a view: no copy of the weights."""
    return w.as_strided((n, *w.shape[1:]), (step * w.stride(0), *w.stride()[1:]),
                        w.storage_offset() + first * w.stride(0))


def gather_tokens(b: Backend, x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                  w: ExpertWeights, activation: str, info: DispatchInfo) -> torch.Tensor:
    """``torch:gather``: each token's experts as one batched matmul over a strided view of the
    stacked weights when they are evenly spaced (always true for 1 or 2 experts), else
    per-expert matmuls. Reads the indices on the host; no sort, no copy of the weights."""
    gates_TK = gates_TK.to(x_TD.dtype)
    rows = []
    for t, experts in enumerate(ids_TK.tolist()):
        used = sorted((e, k) for k, e in enumerate(experts) if e >= 0)
        if not used:
            rows.append(x_TD.new_zeros((1, w.w_down.shape[-1])))
            continue
        ids = [e for e, _ in used]
        order = [k for _, k in used]
        n = len(ids)
        gates_1n = gates_TK[t:t + 1, :n] if order == list(range(n)) else gates_TK[t:t + 1, order]
        step = ids[1] - ids[0] if n > 1 else 1
        if all(j - i == step for i, j in zip(ids, ids[1:])):
            x_n1D = x_TD[t].expand(n, 1, -1)
            gate = (None if w.w_gate is None
                    else torch.bmm(x_n1D, _strided_experts(w.w_gate, ids[0], step, n)))
            hidden = activate(b, activation, gate,
                              torch.bmm(x_n1D, _strided_experts(w.w_up, ids[0], step, n)))
            out_nD = torch.bmm(hidden, _strided_experts(w.w_down, ids[0], step, n))[:, 0]
        else:
            out_nD = torch.cat([_ffn_one(b, x_TD[t:t + 1], w, e, activation) for e in ids])
        rows.append(gates_1n @ out_nD)
    if len(rows) == 1:
        return rows[0]
    return torch.cat(rows, dim=0) if rows else x_TD.new_zeros((0, w.w_down.shape[-1]))


# ----- the policy ----------------------------------------------------------------------------
def choose_kernel(request: str, info: DispatchInfo, x_TD: torch.Tensor) -> str | None:
    """The kernel a portable dispatch name resolves to on torch, or ``None`` (the portable
    default). See the module docstring."""
    if request == "gather":
        return None if info.traced else "torch:gather"
    if request not in ("auto", "sorted"):
        return None  # capacity, dense: the portable kernels
    if info.traced:  # static shapes, no host reads
        if grouped_mm_supported(x_TD):
            return "torch:grouped_mm"
        return "dense" if request == "auto" else None
    T, K = info.num_tokens, info.num_slots
    if request == "auto" and T == 1 and K <= info.num_experts:
        return "torch:gather"
    if x_TD.device.type != "cpu" and grouped_mm_supported(x_TD):
        return "torch:grouped_mm"
    # CPU (bench_torch.py): the CPU grouped kernel lost to both below at every T; the padded
    # batched matmul wins while weight traffic dominates, per-expert GEMMs at large T
    slots = (T or 0) * K
    return "torch:padded" if slots <= PADDED_MAX_SLOTS else "torch:loop"
