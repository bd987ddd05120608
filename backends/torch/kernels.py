"""Expert compute for the torch layer: dropless sort-based dispatch and its implementations.

Shapes: T tokens, K slots per token, S = T*K slots, E experts, D model width, F expert width.
Every implementation computes, for each used slot (token t, expert e, weight g),
``g * expert_e(x_t)`` and sums them per token; unused slots (``-1``: null, dropped, below the
threshold) are sorted to the tail where no implementation spends compute on them.

Implementations (``MoEConfig.dispatch``):

- ``grouped_mm``: one grouped GEMM per projection over the expert-sorted rows
  (``torch._grouped_mm`` with per-expert offsets; forward and backward). CPU (float32 / bfloat16 /
  float16) and CUDA SM80+ (bfloat16). Static shapes: the path used under ``torch.compile``.
- ``loop``: per-expert matmuls over contiguous slices of the sorted rows (exact on any dtype and
  device, e.g. float64 for ``gradcheck``); reads the counts on the host, so it graph-breaks
  under ``torch.compile``.
- ``padded``: the sorted rows scattered into an ``(E, C, D)`` buffer (C = the largest expert's
  row count, read on the host) and three batched matmuls: padding rows cost FLOPs but no extra
  weight traffic, and ``bmm`` spreads the experts over threads (CPU, small and medium T).
- ``gather``: decode-sized batches: per token, one batched matmul over a strided view of its
  experts' weights (no sort, no weight copy); reads the indices on the host.
- ``dense``: every expert on every token, masked by the routing weights (E/K times the FLOPs;
  a static-shape fallback for devices without grouped GEMM, and a debugging aid).
- ``auto``: eager: ``gather`` for a single token, ``grouped_mm`` on CUDA where supported, else
  ``padded`` up to ``PADDED_MAX_SLOTS`` slots and ``loop`` above (on CPU both measured faster
  than the CPU grouped kernel at every T); under ``torch.compile``: ``grouped_mm`` where
  supported, else ``dense``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from moe_router.errors import ConfigError

DISPATCH_NAMES = ("auto", "grouped_mm", "loop", "padded", "gather", "dense")
_GMM_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: ``auto`` on CPU uses ``padded`` up to this many slots (T*K), ``loop`` above
PADDED_MAX_SLOTS = 2048


def activate(name: str, gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """Expert activation: gated ``act(gate) * up`` (swiglu, geglu) or plain ``act(up)``."""
    if name == "swiglu":
        assert gate is not None
        return F.silu(gate) * up
    if name == "geglu":
        assert gate is not None
        return F.gelu(gate) * up
    if name == "gelu":
        return F.gelu(up)
    if name == "relu":
        return F.relu(up)
    if name == "silu":
        return F.silu(up)
    raise ConfigError("activation", name, "swiglu, geglu, gelu, relu or silu")


def grouped_mm_supported(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` runs for these operands (device, dtype, alignment)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype != w.dtype:
        return False
    if x.device.type == "cpu":
        if x.dtype not in _GMM_CPU_DTYPES:
            return False
        if torch.compiler.is_compiling():
            return True
        return w.data_ptr() % 16 == 0 and w.stride(-1) == 1
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
    return False


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


def _ffn_grouped(x_SD: torch.Tensor, weights: dict[str, torch.Tensor], activation: str,
                 offs: torch.Tensor) -> torch.Tensor:
    needs_grad = torch.is_grad_enabled() and (
        x_SD.requires_grad or any(w.requires_grad for w in weights.values()))
    if torch.compiler.is_compiling() or needs_grad:
        gate = grouped_mm(x_SD, weights["w_gate"], offs) if "w_gate" in weights else None
        hidden = activate(activation, gate, grouped_mm(x_SD, weights["w_up"], offs))
        return grouped_mm(hidden, weights["w_down"], offs)
    # eager inference: the raw kernel (no custom-op dispatch); the tail rows of the
    # intermediates are never read by the next grouped GEMM, so only the output is zeroed
    mm = torch._grouped_mm
    gate = mm(x_SD, weights["w_gate"], offs=offs) if "w_gate" in weights else None
    hidden = activate(activation, gate, mm(x_SD, weights["w_up"], offs=offs))
    return _zero_tail(mm(hidden, weights["w_down"], offs=offs), offs)


def _ffn_one(x: torch.Tensor, weights: dict[str, torch.Tensor], e: int,
             activation: str) -> torch.Tensor:
    gate = x @ weights["w_gate"][e] if "w_gate" in weights else None
    return activate(activation, gate, x @ weights["w_up"][e]) @ weights["w_down"][e]


def _ffn_loop(x_SD: torch.Tensor, weights: dict[str, torch.Tensor], activation: str,
              offs: torch.Tensor) -> torch.Tensor:
    ends = offs.tolist()
    pieces, start = [], 0
    for e, end in enumerate(ends):
        if end > start:
            pieces.append(_ffn_one(x_SD[start:end], weights, e, activation))
        start = end
    tail = x_SD.shape[0] - start
    if tail or not pieces:
        pieces.append(x_SD.new_zeros((tail, weights["w_down"].shape[-1])))
    return torch.cat(pieces, dim=0)


def _ffn_padded(x_SD: torch.Tensor, key_S: torch.Tensor, weights: dict[str, torch.Tensor],
                activation: str, offs: torch.Tensor) -> torch.Tensor:
    """Sorted rows scattered into an ``(E, C, D)`` buffer (C = the largest expert's row count,
    read on the host), three batched matmuls, rows gathered back. Padding rows cost FLOPs but no
    extra weight traffic, and ``bmm`` splits the experts over threads: the fast CPU path when
    the layer is bound by streaming the weights (small and medium T)."""
    E = weights["w_up"].shape[0]
    ends = offs.tolist()
    starts = [0, *ends[:-1]]
    capacity = max(end - start for start, end in zip(starts, ends))
    used = ends[-1]
    out_SD = x_SD.new_zeros((x_SD.shape[0], weights["w_down"].shape[-1]))
    if used == 0:
        return out_SD
    expert_U = key_S[:used]
    start_E = torch.tensor(starts, device=x_SD.device, dtype=torch.int64)
    rank_U = torch.arange(used, device=x_SD.device) - start_E[expert_U]
    x_ECD = x_SD.new_zeros((E, capacity, x_SD.shape[1]))
    x_ECD = x_ECD.index_put((expert_U, rank_U), x_SD[:used])
    gate = torch.bmm(x_ECD, weights["w_gate"]) if "w_gate" in weights else None
    hidden = activate(activation, gate, torch.bmm(x_ECD, weights["w_up"]))
    out_ECD = torch.bmm(hidden, weights["w_down"])
    return out_SD.index_put((torch.arange(used, device=x_SD.device),), out_ECD[expert_U, rank_U])


def choose(dispatch: str, x: torch.Tensor, w: torch.Tensor, num_slots: int,
           num_experts: int) -> str:
    num_tokens = x.shape[0]
    """The implementation ``auto`` (or a forced name) resolves to for these operands."""
    if dispatch not in DISPATCH_NAMES:
        raise ConfigError("dispatch", dispatch, f"one of {', '.join(DISPATCH_NAMES)}")
    if dispatch != "auto":
        return dispatch
    if torch.compiler.is_compiling():  # static shapes, no host reads
        return "grouped_mm" if grouped_mm_supported(x, w) else "dense"
    if num_slots <= num_experts and num_tokens == 1:
        return "gather"
    if x.device.type != "cpu" and grouped_mm_supported(x, w):
        return "grouped_mm"
    # CPU (bench_torch.py): the CPU grouped kernel lost to both below at every T; the padded
    # batched matmul wins while weight traffic dominates, per-expert GEMMs at large T
    return "padded" if num_slots <= PADDED_MAX_SLOTS else "loop"


def experts_forward(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
                    weights: dict[str, torch.Tensor], activation: str,
                    impl: str) -> torch.Tensor:
    """``(T, D)`` sum over used slots of ``gate * expert(x)``; ``impl`` is a resolved name.

    Args:
        x_TD: tokens in the compute dtype.
        ids_TK: ``(T, K)`` int64 experts, ``-1`` in unused slots.
        gates_TK: ``(T, K)`` weights (any float dtype; cast to the compute dtype).
        weights: ``w_gate`` (gated only), ``w_up`` ``(E, D, F)``, ``w_down`` ``(E, F, D)``.
    """
    T, K = ids_TK.shape
    E = weights["w_up"].shape[0]
    gates_TK = gates_TK.to(x_TD.dtype)
    if impl == "gather":
        return _gather(x_TD, ids_TK, gates_TK, weights, activation)
    if impl == "dense":
        return _dense(x_TD, ids_TK, gates_TK, weights, activation)
    key_S = torch.where(ids_TK >= 0, ids_TK, E).reshape(-1)
    key_sorted_S, slot_S = torch.sort(key_S, stable=True)
    bounds_E = torch.arange(1, E + 1, device=key_S.device, dtype=key_S.dtype)
    offs_E = torch.searchsorted(key_sorted_S, bounds_E).to(torch.int32)
    x_SD = x_TD[slot_S // K]
    if impl == "grouped_mm":
        out_SD = _ffn_grouped(x_SD, weights, activation, offs_E)
    elif impl == "loop":
        out_SD = _ffn_loop(x_SD, weights, activation, offs_E)
    elif impl == "padded":
        out_SD = _ffn_padded(x_SD, key_sorted_S, weights, activation, offs_E)
    else:
        raise ConfigError("dispatch", impl, f"one of {', '.join(DISPATCH_NAMES)}")
    out_TKD = torch.zeros_like(out_SD).index_copy(0, slot_S, out_SD).reshape(T, K, -1)
    return torch.bmm(gates_TK[:, None, :], out_TKD)[:, 0]


def _strided_experts(w: torch.Tensor, first: int, step: int, n: int) -> torch.Tensor:
    """``w[first], w[first + step], ...`` (n of them) as a view: no copy of the weights."""
    return w.as_strided((n, *w.shape[1:]), (step * w.stride(0), *w.stride()[1:]),
                        w.storage_offset() + first * w.stride(0))


def _gather(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
            weights: dict[str, torch.Tensor], activation: str) -> torch.Tensor:
    """Decode-sized batches: each token's experts as one batched matmul over a strided view
    of the stacked weights when they are evenly spaced (always true for 1 or 2 experts), else
    per-expert matmuls. Reads the indices on the host; no sort, no copy of the weights."""
    rows = []
    for t, experts in enumerate(ids_TK.tolist()):
        used = sorted((e, k) for k, e in enumerate(experts) if e >= 0)
        if not used:
            rows.append(x_TD.new_zeros((1, x_TD.shape[1])))
            continue
        ids = [e for e, _ in used]
        order = [k for _, k in used]
        n = len(ids)
        gates_1n = gates_TK[t:t + 1, :n] if order == list(range(n)) else gates_TK[t:t + 1, order]
        step = ids[1] - ids[0] if n > 1 else 1
        if all(b - a == step for a, b in zip(ids, ids[1:])):
            x_n1D = x_TD[t].expand(n, 1, -1)
            view = {name: _strided_experts(w, ids[0], step, n) for name, w in weights.items()}
            gate = torch.bmm(x_n1D, view["w_gate"]) if "w_gate" in view else None
            hidden = activate(activation, gate, torch.bmm(x_n1D, view["w_up"]))
            out_nD = torch.bmm(hidden, view["w_down"])[:, 0]
        else:
            out_nD = torch.cat([_ffn_one(x_TD[t:t + 1], weights, e, activation) for e in ids])
        rows.append(gates_1n @ out_nD)
    if len(rows) == 1:
        return rows[0]
    return torch.cat(rows, dim=0) if rows else x_TD.new_zeros(x_TD.shape)


def _dense(x_TD: torch.Tensor, ids_TK: torch.Tensor, gates_TK: torch.Tensor,
           weights: dict[str, torch.Tensor], activation: str) -> torch.Tensor:
    """Every expert on every token; the combine matrix zeroes what was not routed."""
    E = weights["w_up"].shape[0]
    onehot_TKE = (ids_TK[..., None] == torch.arange(E, device=ids_TK.device)).to(x_TD.dtype)
    combine_TE = torch.einsum("tk,tke->te", gates_TK, onehot_TKE)
    gate = torch.einsum("td,edf->etf", x_TD, weights["w_gate"]) if "w_gate" in weights else None
    hidden_ETF = activate(activation, gate, torch.einsum("td,edf->etf", x_TD, weights["w_up"]))
    out_ETD = torch.bmm(hidden_ETF, weights["w_down"])
    return torch.einsum("te,etd->td", combine_TE, out_ETD)
