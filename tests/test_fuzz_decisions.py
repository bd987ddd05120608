"""Random-config fuzz: every framework takes NumPy's routing decisions, except at float32 ties.

Seeded cases draw a :class:`~moe_router.RouterConfig` (every built-in strategy, softmax and
sigmoid, expert groups, null experts, min/max experts, top_p up to 1.0, expert bias, route_scale,
capacity with both drop policies) and logits that are normal, integer (exact ties within and
across rows), sharpened x8, or rows that are permutations of one row (mathematically equal
probabilities in different rows). Each case is routed on NumPy and on the framework; the
decisions (expert indices, experts per token, expert counts, drops) must be equal.

A mismatch is accepted only as a float32 *tie* (:class:`NearTies`): the decision it flips rests
on two quantities that are within ``REL`` (1e-6, a few float32 ulps) of each other when
recomputed in float64, and that come from different inputs. Quantities computed from the same
inputs (equal logits; rows that are permutations of each other under softmax, whose
probabilities the Backend contract makes bitwise equal) are equal on every backend, so their tie
must break the same way (to the lower index). Anything else fails, naming the case's seed.

Time-bounded: each framework gets ``MOE_FUZZ_SECONDS`` (default 8) seconds of cases, starting
from the same seeds, so a slower machine runs a prefix of the same sequence;
``MOE_FUZZ_CASES`` caps the number of comparisons (fixed sequences for before/after figures) and
``MOE_FUZZ_SEED`` starts elsewhere (``MOE_FUZZ_SEED=17 MOE_FUZZ_CASES=12`` reruns seed 17's
config). The mismatch rate is printed (``-s``) and recorded in ``user_properties`` (JUnit XML).
"""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import pytest
from conftest import backend_names

from moe_router import ConfigError, RouterConfig, route
from moe_router.backend import Backend

FRAMEWORKS = [name for name in backend_names() if name != "numpy"]
BUDGET_S = float(os.environ.get("MOE_FUZZ_SECONDS", "8"))
DRAWS = 12  # inputs per config (JAX compiles once per config)
FIRST_SEED = int(os.environ.get("MOE_FUZZ_SEED", "0"))
MAX_CASES = int(os.environ.get("MOE_FUZZ_CASES", "1000000"))
REL = 1e-6  # float64 relative gap that counts as a float32 tie (~8 ulps)
REL_SUM = 2e-6  # cumulative sums: up to 16 float32 roundings
DECISIONS = ("expert_indices", "num_experts_per_token", "expert_counts", "num_dropped")

NUM_EXPERTS = (4, 6, 8, 12, 16)
NUM_TOKENS = (1, 5, 16, 40)
STRATEGIES = ("top_k", "top_k", "top_k", "top_p", "threshold", "relu", "expert_choice", "hash",
              "complexity")
LOGITS = ("normal", "integer", "sharp", "sharp_integer", "permuted")


@dataclasses.dataclass
class Case:
    seed: int
    config: RouterConfig
    logits_kind: str
    logits: np.ndarray  # (T, E + N) float32
    extra: dict[str, np.ndarray]  # route() keyword inputs


# ----- random cases --------------------------------------------------------------------------
def _pick(rng: np.random.Generator, *options):
    return options[int(rng.integers(len(options)))]


def _fields(rng: np.random.Generator) -> dict:
    E = int(_pick(rng, *NUM_EXPERTS))
    strategy = _pick(rng, *STRATEGIES)
    f: dict = {"num_experts": E, "strategy": strategy,
               "normalize_weights": _pick(rng, None, None, True, False),
               "route_scale": _pick(rng, 1.0, 1.0, 2.5)}
    if strategy in ("top_k", "hash", "expert_choice"):
        f["k"] = int(rng.integers(1, min(E, 4) + 1))
    if strategy in ("top_p", "threshold", "expert_choice"):
        f["score_func"] = _pick(rng, "softmax", "softmax", "sigmoid")
    if strategy in ("top_k", "complexity"):
        f["score_func"] = _pick(rng, "softmax", "sigmoid")
        groups = [g for g in (2, 3, 4) if E % g == 0]
        if groups and rng.random() < 0.4:
            G = _pick(rng, *groups)
            f["num_groups"], f["topk_groups"] = G, int(rng.integers(1, G + 1))
    if strategy == "top_k" and rng.random() < 0.3:
        f["num_null_experts"] = int(rng.integers(1, E + 1))
    if strategy != "hash" and (strategy != "top_k" or "num_null_experts" in f):
        high = _pick(rng, None, int(rng.integers(1, E + 1)))
        f["max_experts"] = high
        f["min_experts"] = int(rng.integers(0, min(high or E, 3) + 1))
    if strategy == "top_p":
        f["top_p"] = _pick(rng, 0.3, 0.5, 0.8, 0.95, 1.0, 1.0)
    if strategy == "threshold":
        f["threshold"] = _pick(rng, 0.3, 0.5, 0.8, 1.0)
    if strategy == "complexity":
        f["complexity_estimator"] = _pick(rng, "router_entropy", "router_entropy", "external")
    if strategy == "expert_choice":
        f["capacity_factor"] = _pick(rng, None, 0.5, 1.0, 2.0)
    elif rng.random() < 0.5:
        f["capacity_factor"] = _pick(rng, 0.25, 0.5, 1.0, 1.25)
        f["drop_policy"] = _pick(rng, "position", "probability")
    return f


def random_config(rng: np.random.Generator) -> RouterConfig:
    while True:
        try:
            return RouterConfig(**_fields(rng))
        except ConfigError:
            continue  # e.g. too few groups for max_experts: draw again


def random_logits(rng: np.random.Generator, kind: str, T: int, C: int) -> np.ndarray:
    if kind == "normal":
        out = rng.normal(size=(T, C))
    elif kind == "integer":  # exact ties within and across rows
        out = rng.integers(-3, 4, size=(T, C))
    elif kind == "sharp":  # confident router: probabilities down to ~1e-20, sigmoids saturate
        out = rng.normal(size=(T, C)) * 8.0
    elif kind == "sharp_integer":
        out = rng.integers(-3, 4, size=(T, C)) * 8.0
    else:  # "permuted": every row a permutation of one row, equal probabilities across rows
        base = _pick(rng, rng.integers(-3, 4, size=C), rng.normal(size=C))
        out = rng.permuted(np.tile(base, (T, 1)), axis=1)
    return np.asarray(out, dtype=np.float32)


def random_cases(seed: int) -> list[Case]:
    """One config and ``DRAWS`` inputs of one shape (so a traced backend compiles once)."""
    rng = np.random.default_rng(seed)
    config = random_config(rng)
    T = int(_pick(rng, *NUM_TOKENS))
    biased = config.strategy in ("top_k", "complexity") and rng.random() < 0.3
    cases = []
    for _ in range(DRAWS):
        kind = _pick(rng, *LOGITS)
        logits = random_logits(rng, kind, T, config.num_choices)
        extra: dict[str, np.ndarray] = {}
        if config.strategy == "hash":
            extra["token_ids_T"] = rng.integers(0, 1000, size=T)
        if biased:
            scale = _pick(rng, 0.05, 0.25)
            bias = _pick(rng, rng.normal(size=config.num_experts) * scale,
                         rng.integers(-1, 2, size=config.num_experts) * scale)
            extra["expert_bias_E"] = np.asarray(bias, np.float32)
        if config.strategy == "complexity" and config.complexity_estimator == "external":
            extra["complexity_scores_T"] = (rng.integers(0, 6, size=T) * 0.5).astype(np.float32)
        cases.append(Case(seed, config, kind, logits, extra))
    return cases


def router_of(b: Backend, config: RouterConfig):
    """``(logits, extra) -> plan`` on ``b``: eager, but compiled once per config on JAX (whose
    eager mode compiles every primitive for every new shape)."""
    def run(logits, extra):
        return route(logits, config, **extra)

    if b.name == "jax":
        import jax

        return jax.jit(run)
    return run


# ----- decisions and float64 near-ties ---------------------------------------------------------
def decisions(b: Backend, plan) -> dict[str, np.ndarray]:
    return {f: np.asarray(b.to_numpy(getattr(plan, f))).astype(np.int64) for f in DECISIONS}


def _close(a: float, b: float, rel: float = REL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b))


def _any_close_pair(values: np.ndarray, keys: list, rel: float = REL) -> bool:
    """Two finite values within ``rel`` of each other whose keys (their exact inputs) differ."""
    finite = [i for i in range(len(values)) if np.isfinite(values[i])]
    order = sorted(finite, key=lambda i: values[i])
    for a, i in enumerate(order):
        for j in order[a + 1:]:
            if not _close(values[i], values[j], rel):
                break
            if keys[i] != keys[j]:
                return True
    return False


def _boundary_tie(values: np.ndarray, keys: list, cut: int, rel: float = REL) -> bool:
    """Taking the ``cut`` largest of ``values`` flips under float32 rounding: a value kept and
    a value left out are within ``rel`` and come from different inputs."""
    if cut <= 0 or cut >= len(values):
        return False
    order = sorted(range(len(values)), key=lambda i: -values[i])
    kept, left = order[:cut], order[cut:]
    near_kept = [i for i in kept if _close(values[i], values[left[0]], rel)]
    near_left = [j for j in left if _close(values[j], values[kept[-1]], rel)]
    return any(keys[i] != keys[j] for i in near_kept for j in near_left)


class NearTies:
    """Where a case's decisions rest on float32 ties: its scores recomputed in float64, each with
    a *key* naming the exact inputs it is computed from (equal keys: bitwise-equal float32
    values on every backend, so no tie between them may flip).

    ``row[t]``: token t's own decisions (selection order, group limit, top-p / threshold count)
    are at a tie; ``batch``: a decision across tokens is (expert choice, complexity ranks,
    capacity), which may move any token. ``reasons`` says which.
    """

    def __init__(self, case: Case) -> None:
        c, z = case.config, case.logits.astype(np.float64)
        self.case, self.config, self.z = case, c, z
        T = z.shape[0]
        self.bias = case.extra.get("expert_bias_E")
        shifted = case.logits - case.logits.max(axis=-1, keepdims=True)  # float32, as softmax
        # softmax probabilities depend on the multiset of the row's shifted logits
        rows = [np.sort(row).tobytes() for row in shifted]
        if c.score_func == "sigmoid":
            self.P = 1.0 / (1.0 + np.exp(-z))
            self.pkey = [[(float(z[t, e]),) for e in range(z.shape[1])] for t in range(T)]
        else:
            ex = np.exp(z - z.max(axis=-1, keepdims=True))
            self.P = ex / ex.sum(axis=-1, keepdims=True)
            self.pkey = [[(rows[t], float(shifted[t, e])) for e in range(z.shape[1])]
                         for t in range(T)]
        self.rows = rows
        self.reasons: list[str] = []
        self.row = np.array([self._row_tie(t) for t in range(T)], dtype=bool)
        self.batch = self._batch_tie()

    # selection scores P + bias (bias only for choosing) and their exact inputs
    def _selection(self, t: int, width: int) -> tuple[np.ndarray, list]:
        P, keys = self.P[t, :width].copy(), list(self.pkey[t][:width])
        if self.bias is not None:
            b = np.zeros(width)
            n = min(width, self.config.num_experts)
            b[:n] = self.bias[:n]
            P = P + b
            keys = [(k, float(b[e])) for e, k in enumerate(keys)]
        return P, keys

    def _row_tie(self, t: int) -> bool:
        c = self.config
        E = c.num_experts
        if c.strategy in ("top_k", "complexity"):
            sel, keys = self._selection(t, E)
            groups = c.num_groups or 1
            if groups > 1 and (c.topk_groups or groups) < groups:
                per = E // c.num_groups
                gsum, gkey = [], []
                for g in range(c.num_groups):
                    top = sorted(range(g * per, (g + 1) * per), key=lambda e: -sel[e])[:2]
                    gsum.append(sum(sel[e] for e in top))
                    gkey.append(tuple(sorted(keys[e] for e in top)))
                if _boundary_tie(np.array(gsum), gkey, c.topk_groups or c.num_groups):
                    self.reasons.append(f"token {t}: group scores")
                    return True
            if self.bias is not None and _any_close_pair(sel, keys):
                self.reasons.append(f"token {t}: biased selection scores")
                return True
            if c.num_null_experts and self.bias is not None:
                allsel, allkeys = self._selection(t, c.num_choices)
                if _boundary_tie(allsel, allkeys, c.k):
                    self.reasons.append(f"token {t}: null-expert count")
                    return True
        if c.strategy in ("top_p", "threshold"):
            sorted_p = np.sort(self.P[t, :E])[::-1]
            cum = np.cumsum(sorted_p)
            bound = c.top_p if c.strategy == "top_p" else c.threshold
            if any(_close(v, bound, REL_SUM) for v in cum):
                self.reasons.append(f"token {t}: cumulative sum at {bound}")
                return True
        return False

    def _batch_tie(self) -> bool:
        c, T = self.config, self.z.shape[0]
        E = c.num_experts
        if c.strategy == "expert_choice" and c.score_func == "softmax":  # sigmoid: by logits
            factor = c.capacity_factor if c.capacity_factor is not None else float(c.k)
            C = min(T, max(1, int(np.ceil(round(T * factor / E, 9)))))
            for e in range(E):
                if _boundary_tie(self.P[:, e], [self.pkey[t][e] for t in range(T)], C):
                    self.reasons.append(f"expert {e}: tokens at its capacity {C}")
                    return True
        if c.strategy == "complexity" and c.complexity_estimator == "router_entropy":
            real = self.P[:, :E] / self.P[:, :E].sum(axis=-1, keepdims=True)
            logs = np.log(np.where(real > 0, real, 1.0))
            score = -(real * logs).sum(axis=-1)
            if _any_close_pair(score, self.rows):
                self.reasons.append("complexity scores of two tokens")
                return True
        if c.capacity_factor is not None and c.strategy != "expert_choice":
            if self.row.any():  # one token's choice moves the others' capacity positions
                self.reasons.append("capacity after a token-level tie")
                return True
            if c.drop_policy == "probability" and self._weight_tie():
                return True
        return False

    def _weight_tie(self) -> bool:
        """Drop policy 'probability': two slots of one expert whose weights tie at capacity."""
        c, case = self.config, self.case
        free = route(case.logits, c.replace(capacity_factor=None), **case.extra)
        idx, T = free.expert_indices, self.z.shape[0]
        capacity = c.capacity(T)
        assert capacity is not None
        by_expert: dict[int, tuple[list, list]] = {}
        for t in range(T):
            used = [int(e) for e in idx[t] if e >= 0]
            if c.strategy == "relu":
                raw = [max(self.z[t, e], 0.0) for e in used]
                keys = [(float(self.z[t, e]),) for e in used]
            elif c.strategy == "hash":
                raw, keys = [1.0] * len(used), [()] * len(used)
            else:
                raw = [self.P[t, e] for e in used]
                keys = [self.pkey[t][e] for e in used]
            normalize = c.normalize_weights
            if normalize is None:
                normalize = c.strategy in ("top_k", "complexity")
            if normalize and sum(raw) > 0:
                total = sum(raw)
                raw = [w / total for w in raw]
                keys = [(self.rows[t], k) for k in keys]
            for e, w, k in zip(used, raw, keys, strict=True):
                values, ks = by_expert.setdefault(e, ([], []))
                values.append(w)
                ks.append(k)
        for e, (values, ks) in by_expert.items():
            if _boundary_tie(np.array(values), ks, capacity):
                self.reasons.append(f"expert {e}: slot weights at capacity {capacity}")
                return True
        return False

    def explains(self, bad_rows: np.ndarray) -> bool:
        """True when every mismatching token (``bad_rows``) is explained by a float32 tie."""
        if self.batch:
            return True
        return bool(bad_rows.size) and bool(self.row[bad_rows].all())


# ----- the test --------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FRAMEWORKS, indirect=True)
def test_decisions_match_numpy_except_float32_ties(backend: Backend,
                                                   request: pytest.FixtureRequest) -> None:
    start = time.perf_counter()
    compared, ties, failures = 0, [], []
    seed = FIRST_SEED
    while compared < MAX_CASES and time.perf_counter() - start < BUDGET_S:
        cases = random_cases(seed)
        seed += 1
        run = router_of(backend, cases[0].config)
        for draw, case in enumerate(cases):
            if compared >= MAX_CASES:
                break
            numpy_plan = route(case.logits, case.config, **case.extra)
            ref = {f: np.asarray(getattr(numpy_plan, f)).astype(np.int64) for f in DECISIONS}
            got = decisions(backend, run(backend.asarray(case.logits),
                                         {k: backend.asarray(v) for k, v in case.extra.items()}))
            compared += 1
            if all(np.array_equal(got[f], ref[f]) for f in DECISIONS):
                continue
            bad_rows = np.flatnonzero((got["expert_indices"] != ref["expert_indices"]).any(-1))
            near = NearTies(case)
            fields = [f for f in DECISIONS if not np.array_equal(got[f], ref[f])]
            what = (f"seed {case.seed} draw {draw}: {case.config.strategy} {case.logits_kind} "
                    f"logits, {', '.join(fields)} differ (tokens {bad_rows.tolist()})")
            if near.explains(bad_rows):
                ties.append(f"{what} ({'; '.join(near.reasons[:3])})")
            else:
                failures.append(f"{what}\n    config={case.config!r}\n    "
                                f"extra={sorted(case.extra)}")
    rate = (len(ties) + len(failures)) / max(compared, 1)
    summary = (f"{backend.name}: {compared} cases in {time.perf_counter() - start:.1f}s, "
               f"{len(ties)} float32 ties, {len(failures)} other mismatches "
               f"(mismatch rate {rate:.2%})")
    print(summary, *ties, sep="\n  ")
    request.node.user_properties.extend([("fuzz_cases", compared), ("fuzz_ties", len(ties)),
                                         ("fuzz_mismatches", len(failures)),
                                         ("fuzz_mismatch_rate", rate)])
    assert compared > 0
    assert not failures, summary + "\n" + "\n".join(failures)
