"""Independent per-token reference loops for every routing strategy of ROUTING.md.

Written from the spec (the shared ``ROUTING.md``, ``docs/routing.md``) and the documented k map
of :mod:`moe_router.complexity`, not from the core's code: one token at a time, plain Python
lists, float32 NumPy scalars where the spec says float32, sequential float32 cumulative sums so
boundary decisions (``cum > p``, ``before < t``) are taken exactly as the spec states them.
Only the hash *table* (data) is imported from the core; the routing logic is ours.

The oracle the tests compare ``moe_router.route`` on NumPy against.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np
import pytest

from moe_router import RouterConfig, RouterState, RoutingPlan
from moe_router.routing.strategies import hash_table

F32 = np.float32


@dataclasses.dataclass
class LoopPlan:
    """What the loop computes for one call, as NumPy arrays and Python numbers."""

    indices: np.ndarray  # (T, K) int64, -1 in unused slots
    weights: np.ndarray  # (T, K) float32, 0.0 in unused slots
    num_per_token: np.ndarray  # (T,) int64
    counts: np.ndarray  # (E,) int64
    num_dropped: int
    losses: dict[str, float]
    stats: dict[str, object]
    state: dict[str, float] | None = None


# ----- per-row scalar math --------------------------------------------------------------------
def softmax_row(z: Sequence[float]) -> list[np.float32]:
    """Softmax of one row in float32, max-shifted. The normalizer is NumPy's float32 sum of the
    row's exponentials sorted ascending, as the Backend contract specifies (so that permuted rows
    get bitwise-equal probabilities): cumulative sums near p and ties between tokens must round
    as the vectorized softmax rounds them."""
    m = max(F32(v) for v in z)
    ex = np.array([np.exp(F32(v) - m) for v in z], dtype=F32)
    total = np.sum(np.sort(ex), dtype=F32)
    return [F32(v / total) for v in ex]


def sigmoid_scalar(x: float) -> np.float32:
    x = F32(x)
    if x >= 0:
        return F32(F32(1.0) / (F32(1.0) + F32(np.exp(-x))))
    ex = F32(np.exp(x))
    return F32(ex / (F32(1.0) + ex))


def ranked(scores: Sequence[float]) -> list[int]:
    """Indices by descending score; ties go to the lower index."""
    return sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))


def exact_key(scores: Sequence[float], z: Sequence[float], bias: np.ndarray | None,
              width: int) -> list[float]:
    """What orders one token's first ``width`` choices by their *exact* score.

    softmax and sigmoid are strictly increasing in the logit, so without a bias the order of the
    exact scores is the order of the logits (float32 scores can tie where the exact ones do not:
    a saturated sigmoid, an underflowed softmax). With a bias: the float32 ``score + bias``.
    """
    if bias is None:
        return [float(F32(v)) for v in z[:width]]
    return [float(F32(scores[c] + (F32(bias[c]) if c < len(bias) else F32(0.0))))
            for c in range(width)]


def capped_mass(value: np.float32, config: RouterConfig, cap: float = 1.0) -> np.float32:
    """A float32 partial sum of softmax probabilities, at most ``cap``: the exact sum of some
    softmax probabilities never exceeds 1 (and is < 1 before the last expert, every exact
    probability being > 0), while float32 rounding or underflow can reach or pass 1."""
    return F32(min(value, F32(cap))) if config.score_func == "softmax" else value


def clamp(n: int, low: int, high: int) -> int:
    return max(low, min(n, high))


def normalized(weights: list[np.float32], width: int) -> list[np.float32]:
    """Divide by the sum; the sum is NumPy's float32 sum over the K-wide slot row (zeros in
    unused slots), as a vectorized implementation rounds it: weights that are equal in exact
    arithmetic must stay bitwise equal, the drop policy "probability" compares them."""
    total = np.sum(np.array(list(weights) + [0.0] * (width - len(weights)), dtype=F32))
    if total <= 0:
        return weights
    return [F32(w / total) for w in weights]


def entropy(probs: Sequence[float]) -> float:
    return -sum(float(p) * math.log(float(p)) for p in probs if p > 0)


# ----- selection scores ---------------------------------------------------------------------
def selection_scores(scores: list[np.float32], z: Sequence[float], config: RouterConfig,
                     bias: np.ndarray | None) -> list[float]:
    """Order keys used to choose real experts: the exact order of score + bias (see
    :func:`exact_key`), ``-inf`` outside the groups kept by the DeepSeek-V3 group limit (ranked
    by the sum of each group's two best float32 score + bias)."""
    E = config.num_experts
    key = exact_key(scores, z, bias, E)
    sel = [F32(scores[e] + (F32(bias[e]) if bias is not None else F32(0.0))) for e in range(E)]
    G = config.num_groups
    if G is None or G <= 1:
        return key
    per = E // G
    keep = config.topk_groups if config.topk_groups is not None else G
    group_score = []
    for g in range(G):
        members = sorted((sel[g * per + j] for j in range(per)), reverse=True)
        total = F32(0.0)
        for v in members[: min(2, per)]:
            total = F32(total + v)
        group_score.append(total)
    kept = set(ranked(group_score)[:keep])
    lowest = float(np.finfo(F32).min)  # a kept expert, even of logit -inf, beats a masked one
    return [max(key[e], lowest) if e // per in kept else -math.inf for e in range(E)]


# ----- strategies: one token (or one batch for cross-token ones) -> list of (expert, weight) -----
Row = list[tuple[int, np.float32]]


def _normalize_flag(config: RouterConfig, default: bool) -> bool:
    return default if config.normalize_weights is None else config.normalize_weights


def _finish(chosen: list[int], weight_of: Sequence[float], normalize: bool, width: int) -> Row:
    weights = [F32(weight_of[e]) for e in chosen]
    if normalize:
        weights = normalized(weights, width)
    return list(zip(chosen, weights, strict=True))


def top_k_row(t: int, scores: list[np.float32], z: Sequence[float], config: RouterConfig,
              bias: np.ndarray | None) -> Row:
    E, N, K = config.num_experts, config.num_null_experts, config.max_slots
    if config.balanced_debug:
        n = min(config.k, K)
        return [((t * n + j) % E, F32(1.0 / n)) for j in range(n)]
    sel = selection_scores(scores, z, config, bias)
    if N:
        # AdaMoE: top-k over E + N choices; the count of real experts among them, clamped
        real = sum(1 for c in ranked(exact_key(scores, z, bias, E + N))[: config.k] if c < E)
        n = clamp(real, config.min_experts, K)
    else:
        n = min(config.k, K)
    return _finish(ranked(sel)[:n], scores, _normalize_flag(config, True), K)


def top_p_row(probs: list[np.float32], z: Sequence[float], config: RouterConfig,
              p: float, bias: np.ndarray | None = None) -> Row:
    """How many: the smallest prefix of the sorted probabilities with mass > p; which: the
    selection order (bias, groups), as top_k chooses."""
    E = config.num_experts
    order = ranked(exact_key(probs, z, None, E))
    cum, n = F32(0.0), E  # if no prefix sum exceeds p: all experts
    for i, e in enumerate(order):
        cum = F32(cum + probs[e])
        if capped_mass(cum, config) > F32(p):
            n = i + 1
            break
    n = clamp(n, config.min_experts, config.max_slots)
    return _finish(_chosen(probs, z, config, bias, order)[:n], probs,
                   _normalize_flag(config, False), config.max_slots)


def _chosen(probs: list[np.float32], z: Sequence[float], config: RouterConfig,
            bias: np.ndarray | None, order: list[int]) -> list[int]:
    """The experts in selection order: ``order`` (exact score order) without bias and groups."""
    if bias is None and config.num_groups is None:
        return order
    return ranked(selection_scores(probs, z, config, bias))


def threshold_row(probs: list[np.float32], z: Sequence[float], config: RouterConfig,
                  bias: np.ndarray | None = None) -> Row:
    E = config.num_experts
    order = ranked(exact_key(probs, z, None, E))
    below_one = float(np.nextafter(F32(1.0), F32(0.0)))
    before, n = F32(0.0), 0
    for i, e in enumerate(order):
        if i == 0 or capped_mass(before, config, below_one) < F32(config.threshold):
            n += 1
        before = F32(before + probs[e])
    n = clamp(n, config.min_experts, config.max_slots)
    return _finish(_chosen(probs, z, config, bias, order)[:n], probs,
                   _normalize_flag(config, False), config.max_slots)


def relu_row(z: Sequence[float], config: RouterConfig) -> Row:
    E = config.num_experts
    real = [F32(v) for v in z[:E]]
    gates = [F32(max(v, F32(0.0))) for v in real]
    n = clamp(sum(1 for v in real if v > 0), config.min_experts, config.max_slots)
    return _finish(ranked(real)[:n], gates, _normalize_flag(config, False), config.max_slots)


def expert_choice_rows(probs_T: list[list[np.float32]], z: np.ndarray,
                       config: RouterConfig) -> list[Row]:
    T, E = len(probs_T), config.num_experts
    factor = config.capacity_factor if config.capacity_factor is not None else config.k
    C = min(T, max(1, math.ceil(exact(factor) * T / E))) if T else 0
    chosen: list[set[int]] = [set() for _ in range(T)]
    # exact score order across tokens: a sigmoid score is a function of the logit alone
    key = z if config.score_func == "sigmoid" else probs_T
    for e in range(E):
        for t in ranked([float(key[t][e]) for t in range(T)])[:C]:
            chosen[t].add(e)
    rows = []
    for t in range(T):
        mine = [e for e in ranked(exact_key(probs_T[t], z[t], None, E))
                if e in chosen[t]][: config.max_slots]
        rows.append(_finish(mine, probs_T[t], _normalize_flag(config, False), config.max_slots))
    return rows


def hash_row(token_id: int, config: RouterConfig) -> Row:
    n = min(config.k, config.max_slots)  # k experts, even when max_experts is wider
    table = hash_table(config.hash_seed, config.hash_buckets, config.num_experts, n)
    experts = sorted(int(e) for e in table[int(token_id) % config.hash_buckets])  # equal weights
    value = F32(1.0 / n) if _normalize_flag(config, False) else F32(1.0)
    return [(e, value) for e in experts]


# ----- complexity ------------------------------------------------------------------------------
def entropy32(p: np.ndarray) -> np.float32:
    """-sum p log p of one float32 row, summed in ascending order of p as NumPy sums a float32
    row (the core's order: rows that are permutations of each other get equal scores)."""
    p = np.sort(np.asarray(p, dtype=F32))
    logs = np.log(np.where(p > 0, p, F32(1.0)))
    return F32(-np.sum(p * logs, dtype=F32))


def complexity_score(t: int, probs: list[np.float32], config: RouterConfig, *,
                     hidden: np.ndarray | None, attention: np.ndarray | None,
                     external: np.ndarray | None) -> np.float32:
    """The estimator's score of token t, in float32."""
    name = config.complexity_estimator
    if name == "router_entropy":  # entropy of the real experts' distribution, renormalized
        real = np.sort(np.array(probs[: config.num_experts], dtype=F32))
        return entropy32(real / np.sum(real, dtype=F32))
    if name == "hidden_norm":
        h = np.asarray(hidden[t], dtype=F32)
        return F32(np.sqrt(np.sum(h * h, dtype=F32)))
    if name == "attention_entropy":  # mean over heads
        heads = attention[None] if attention.ndim == 2 else attention
        total = F32(0.0)
        for h in heads:
            total = F32(total + entropy32(h[t]))
        return F32(total / F32(len(heads)))
    if name == "external":
        return F32(external[t])
    raise ValueError(name)


def k_ramp(config: RouterConfig) -> tuple[float, float]:
    low, high = config.min_experts, config.max_slots
    target = config.target_experts if config.target_experts is not None else (low + high) / 2
    width = config.complexity_spread
    if width is None:
        width = min(2 * (target - low) + 1, 2 * (high - target) + 1)
    return float(target), float(width)


def complexity_ks(scores: list[np.float32], config: RouterConfig,
                  state: dict[str, float] | None, training: bool
                  ) -> tuple[list[int], dict[str, float] | None]:
    """k per token from the documented map ``clip(floor(target + 1/2 + offset + w (q - 1/2)))``."""
    T = len(scores)
    target, width = k_ramp(config)
    if state is None:  # q from the token's rank in the batch (ties: lower index ranks higher)
        rank = {t: r for r, t in enumerate(ranked(scores))}
        quantiles = [F32(1.0) - (F32(rank[t]) + F32(0.5)) / F32(max(T, 1)) for t in range(T)]
        offset = 0.0
    else:
        batch_mean, batch_var = _moments(scores)
        calibrated = state["score_count"] > 0
        mean = F32(state["score_mean"]) if calibrated else batch_mean
        var = F32(state["score_var"]) if calibrated else batch_var
        quantiles = [sigmoid_scalar(F32(1.702) * ((s - mean) / F32(np.sqrt(var + F32(1e-12)))))
                     for s in scores]
        offset = float(state["k_offset"])
    ks = []
    for q in quantiles:
        raw = math.floor(F32(target + 0.5 + offset) + F32(width) * (q - F32(0.5)))
        ks.append(clamp(raw, config.min_experts, config.max_slots))
    if state is not None and training:
        state = _complexity_update(scores, ks, state, target, config.controller_rate)
    return ks, state


def _moments(scores: list[np.float32]) -> tuple[np.float32, np.float32]:
    T = max(len(scores), 1)
    mean = sum(float(s) for s in scores) / T
    var = sum((float(s) - mean) ** 2 for s in scores) / T
    return F32(mean), F32(var)


def _complexity_update(scores: list[np.float32], ks: list[int], state: dict[str, float],
                       target: float, rate: float) -> dict[str, float]:
    batch_mean, batch_var = _moments(scores)
    count = state["score_count"] + 1.0
    if state["score_count"] > 0:
        momentum = max(1.0 / count, 0.01)
        mean = state["score_mean"] + momentum * (batch_mean - state["score_mean"])
        var = state["score_var"] + momentum * (batch_var - state["score_var"])
    else:
        mean, var = float(batch_mean), float(batch_var)
    mean_k = sum(ks) / max(len(ks), 1)
    return {**state, "score_mean": mean, "score_var": var, "score_count": count,
            "k_offset": state["k_offset"] + rate * (target - mean_k)}


# ----- capacity --------------------------------------------------------------------------------
def exact(x: float) -> Fraction:
    """A config number as the decimal the user wrote (1.1 is 11/10, not 1.100000000000000088)."""
    return Fraction(repr(float(x)))


def capacity_of(config: RouterConfig, T: int) -> int | None:
    """C = ceil(cf * T * nominal / E); nominal = k (top_k, hash), else target, else max_experts."""
    if config.capacity_factor is None:
        return None
    if config.strategy in ("top_k", "hash"):
        nominal = exact(min(config.k, config.num_experts))
    elif config.target_experts is not None:
        nominal = exact(config.target_experts)
    else:
        nominal = exact(config.max_slots)
    return max(1, math.ceil(exact(config.capacity_factor) * T * nominal / config.num_experts))


def apply_capacity(rows: list[Row], capacity: int | None, num_experts: int,
                   policy: str) -> tuple[list[Row], int]:
    """Drop slots beyond ``capacity`` per expert (ROUTING.md "Capacity and dropping")."""
    if capacity is None:
        return rows, 0
    slots = [(t, s) for t, row in enumerate(rows) for s in range(len(row))]
    if policy == "position":  # every first choice before any second choice, then token order
        slots.sort(key=lambda ts: (ts[1], ts[0]))
    else:  # batch-prioritized: highest weight first (ties: slot rank, then token position)
        slots.sort(key=lambda ts: (-float(rows[ts[0]][ts[1]][1]), ts[1], ts[0]))
    taken = [0] * num_experts
    kept: set[tuple[int, int]] = set()
    for t, s in slots:
        e = rows[t][s][0]
        if taken[e] < capacity:
            taken[e] += 1
            kept.add((t, s))
    out = [[slot for s, slot in enumerate(row) if (t, s) in kept] for t, row in enumerate(rows)]
    return out, len(slots) - len(kept)


# ----- the whole call ----------------------------------------------------------------------------
def route_loop(logits: np.ndarray, config: RouterConfig, *, token_ids: np.ndarray | None = None,
               hidden: np.ndarray | None = None, attention: np.ndarray | None = None,
               external: np.ndarray | None = None, bias: np.ndarray | None = None,
               mask: np.ndarray | None = None, state: dict[str, float] | None = None,
               training: bool = False) -> LoopPlan:
    """Route ``(T, E + N)`` logits token by token, following ROUTING.md (noise off)."""
    z = np.asarray(logits).astype(F32)
    T, E = z.shape[0], config.num_experts
    if config.score_func == "sigmoid":
        scores = [[sigmoid_scalar(v) for v in row] for row in z]
    else:
        scores = [softmax_row(row) for row in z]
    new_state = state
    strategy = config.strategy
    if strategy == "top_k":
        rows = [top_k_row(t, scores[t], z[t], config, bias) for t in range(T)]
    elif strategy == "top_p":
        p = state["top_p"] if state is not None else config.top_p
        rows = [top_p_row(scores[t], z[t], config, p, bias) for t in range(T)]
        if state is not None and training and config.target_experts is not None:
            mean_k = sum(len(r) for r in rows) / max(T, 1)
            new_p = p + config.controller_rate * (config.target_experts - mean_k)
            new_state = {**state, "top_p": min(max(new_p, 1e-3), 1.0)}
    elif strategy == "threshold":
        rows = [threshold_row(scores[t], z[t], config, bias) for t in range(T)]
    elif strategy == "relu":
        rows = [relu_row(z[t], config) for t in range(T)]
    elif strategy == "expert_choice":
        rows = expert_choice_rows(scores, z, config)
    elif strategy == "hash":
        rows = [hash_row(int(token_ids[t]), config) for t in range(T)]
    elif strategy == "complexity":
        cscores = [complexity_score(t, scores[t], config, hidden=hidden, attention=attention,
                                    external=external) for t in range(T)]
        ks, new_state = complexity_ks(cscores, config, state, training)
        rows = []
        for t in range(T):
            order = ranked(selection_scores(scores[t], z[t], config, bias))[: ks[t]]
            rows.append(_finish(order, scores[t], _normalize_flag(config, True),
                                config.max_slots))
    else:
        raise ValueError(f"no loop for strategy {strategy!r}")
    if config.route_scale != 1.0:
        rows = [[(e, F32(w * F32(config.route_scale))) for e, w in row] for row in rows]
    capacity = None if strategy == "expert_choice" else capacity_of(config, T)
    rows, dropped = apply_capacity(rows, capacity, E, config.drop_policy)
    return _assemble(z, rows, dropped, config, mask, new_state)


def _assemble(z: np.ndarray, rows: list[Row], dropped: int, config: RouterConfig,
              mask: np.ndarray | None, state: dict[str, float] | None) -> LoopPlan:
    T, E, K = z.shape[0], config.num_experts, config.max_slots
    indices = np.full((T, K), -1, dtype=np.int64)
    weights = np.zeros((T, K), dtype=F32)
    counts = np.zeros(E, dtype=np.int64)
    for t, row in enumerate(rows):
        assert len(row) <= K, (t, row, K)
        for s, (e, w) in enumerate(row):
            indices[t, s], weights[t, s] = e, w
            counts[e] += 1
    num_per_token = np.array([len(r) for r in rows], dtype=np.int64)
    real = [True] * T if mask is None else [float(m) > 0 for m in np.asarray(mask).reshape(-1)]
    losses = loop_losses(z, rows, E, real, config.k if config.num_null_experts else None)
    losses["total"] = (config.aux_loss_coef * losses[config.balance_convention]
                       + config.z_loss_coef * losses["z_loss"]
                       + config.entropy_loss_coef * losses["entropy"])
    n_real = max(sum(real), 1)
    histogram = [0] * (K + 1)
    for t in range(T):
        if real[t]:
            histogram[len(rows[t])] += 1
    stats = {"mean_experts": sum(len(rows[t]) for t in range(T) if real[t]) / n_real,
             "k_histogram": histogram, "router_entropy": losses["entropy"],
             "max_load": float(counts.max()) if E else 0.0, "mean_load": float(counts.sum()) / E}
    return LoopPlan(indices, weights, num_per_token, counts, dropped, losses, stats, state)


def loop_losses(z: np.ndarray, rows: list[Row], num_experts: int,
                real: list[bool], k: int | None = None) -> dict[str, float]:
    """Switch / hf load balancing, z-loss and entropy, over the unmasked tokens (ROUTING.md).
    With null experts (z wider than E) and ``k``: AdaMoE's balance over all E + N choices, the
    null experts pooled (each gets 1/N of the null slots, k minus the token's real slots, and of
    the null probability)."""
    T, E = z.shape[0], num_experts
    N = z.shape[1] - E if k is not None else 0
    n_real = max(sum(real), 1)
    slots = [0.0] * (E + N)
    mean_prob = [0.0] * (E + N)
    z_loss = ent = 0.0
    for t in range(T):
        if not real[t]:
            continue
        full = [float(v) for v in z[t]]
        m = max(full)
        lse = m + math.log(sum(math.exp(v - m) for v in full))
        probs = [math.exp(v - lse) for v in full]  # softmax of the full logits (nulls too)
        z_loss += lse * lse / n_real
        ent += entropy(probs) / n_real
        for e in range(E):
            mean_prob[e] += probs[e] / n_real
        for e, _ in rows[t]:
            slots[e] += 1
        for j in range(N):
            mean_prob[E + j] += sum(probs[E:]) / N / n_real
            slots[E + j] += max(k - len(rows[t]), 0) / N  # type: ignore[operator]
    used = max(sum(slots), 1)
    C = E + N
    switch = C * sum(slots[e] / used * mean_prob[e] for e in range(C))
    hf = C * sum(slots[e] / n_real * mean_prob[e] for e in range(C))
    return {"switch": switch, "hf": hf, "z_loss": z_loss, "entropy": ent}


# ----- comparison with a plan ------------------------------------------------------------------
def state_dict(state: RouterState | None) -> dict[str, float] | None:
    return None if state is None else {k: float(v) for k, v in state._asdict().items()}


def assert_matches(plan: RoutingPlan, ref: LoopPlan) -> None:
    """Identical decisions, weights within 1e-6 (relative for weights > 1), losses within 1e-5."""
    assert plan.expert_indices.dtype == np.int64 and plan.expert_weights.dtype == np.float32
    np.testing.assert_array_equal(plan.expert_indices, ref.indices)
    np.testing.assert_allclose(plan.expert_weights, ref.weights, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(plan.num_experts_per_token, ref.num_per_token)
    np.testing.assert_array_equal(plan.expert_counts, ref.counts)
    assert int(plan.num_dropped) == ref.num_dropped
    lo = plan.losses
    convention = plan.config.balance_convention
    for got, want in ((lo.load_balancing, ref.losses[convention]),
                      (lo.z_loss, ref.losses["z_loss"]), (lo.entropy, ref.losses["entropy"]),
                      (lo.total, ref.losses["total"])):
        assert float(got) == pytest.approx(want, rel=1e-5, abs=1e-5)
    st_ = plan.stats
    assert float(st_.mean_experts) == pytest.approx(ref.stats["mean_experts"], rel=1e-6)
    assert st_.k_histogram.tolist() == ref.stats["k_histogram"]
    assert float(st_.max_load) == ref.stats["max_load"]
    assert float(st_.mean_load) == pytest.approx(ref.stats["mean_load"], rel=1e-6)
