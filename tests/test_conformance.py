"""The shared conformance suite: every backend routes exactly like the NumPy oracle.

For each backend of the ``backend`` fixture (``MOE_TEST_BACKENDS``, see tests/conftest.py):
``route()`` on the backend's arrays returns arrays of that framework whose routing decisions
(indices, counts, experts per token, drops, k histogram) equal NumPy's exactly and whose values
(weights, probabilities, losses, statistics, controller state) agree within 1e-5; and every
primitive keeps the Backend contract (stable descending sort, ties to the lower index,
``one_hot(-1)`` = zero row, ``bincount`` ignores -1, scalar ``where``, ...).

No framework is imported at module import time; the fixture imports it. Tracing / jit variants
belong to each backend's own tests.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest

from moe_router import RouterConfig, RoutingPlan, init_router_state, route
from moe_router.backend import Backend
from moe_router.demo import realistic_logits
from moe_router.registry import default_registry

E, T = 8, 32
TOL = {"rtol": 1e-5, "atol": 1e-5}


@pytest.fixture(autouse=True)
def _skip_unimplemented_backend(request: pytest.FixtureRequest) -> None:
    """Skip (before conftest's ``backend`` fixture imports it) a backend whose module is absent.

    conftest already fails an unregistered name and skips a missing framework; a registered
    backend whose ``backends/<fw>/backend.py`` is not written yet would otherwise error.
    """
    callspec = getattr(request.node, "callspec", None)
    name = callspec.params.get("backend") if callspec is not None else None
    spec = default_registry().collected.backends.get(name) if name else None
    if spec is None or importlib.util.find_spec(spec.framework) is None:
        return
    module = spec.target.partition(":")[0]
    try:
        found = importlib.util.find_spec(module)
    except ModuleNotFoundError:
        found = None
    if found is None:
        pytest.skip(f"backend {name!r} not implemented yet ({module} is missing)")


# ----- inputs -------------------------------------------------------------------------------------
def logits_of(kind: str, C: int = E, tokens: int = T, seed: int = 0) -> np.ndarray:
    if kind == "quantized":  # many exact ties within rows
        rng = np.random.default_rng(seed)
        return (rng.integers(-2, 3, size=(tokens, C)) * 0.5).astype(np.float32)
    return realistic_logits(kind, tokens, C, seed)


def rng_inputs(seed: int = 0, tokens: int = T) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed + 7)
    attn = np.exp(rng.normal(size=(2, tokens, 16)) * 2.0)
    return {
        "token_ids_T": rng.integers(0, 50000, size=tokens),
        "hidden_TD": rng.normal(size=(tokens, 12)).astype(np.float32),
        "attention_probs": (attn / attn.sum(-1, keepdims=True)).astype(np.float32),
        "complexity_scores_T": rng.gamma(2.0, size=tokens).astype(np.float32),
        "expert_bias_E": (rng.normal(size=E) * 0.05).astype(np.float32),
        "mask_T": (rng.random(tokens) < 0.8).astype(np.float32),
    }


# (config, logits kind, names of the extra inputs it uses)
CASES: dict[str, tuple[RouterConfig, str, tuple[str, ...]]] = {
    "top_k": (RouterConfig(num_experts=E, k=2, z_loss_coef=1e-3), "normal", ()),
    "top_k_ties": (RouterConfig(num_experts=E, k=3), "quantized", ()),
    "top_k_raw_hf_mask": (RouterConfig(num_experts=E, k=2, normalize_weights=False,
                                       balance_convention="hf", entropy_loss_coef=0.1),
                          "skewed", ("mask_T",)),
    "sigmoid_bias_groups": (RouterConfig(num_experts=E, k=2, score_func="sigmoid", num_groups=4,
                                         topk_groups=2, route_scale=2.5),
                            "normal", ("expert_bias_E",)),
    "null_experts": (RouterConfig(num_experts=E, k=2, num_null_experts=3, min_experts=0),
                     "peaked", ()),
    "top_p": (RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, max_experts=4),
              "skewed", ()),
    "top_p_ties": (RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, min_experts=2),
                   "quantized", ()),
    "threshold": (RouterConfig(num_experts=E, strategy="threshold", threshold=0.6), "peaked", ()),
    "relu": (RouterConfig(num_experts=E, strategy="relu", min_experts=0, max_experts=4),
             "normal", ()),
    "expert_choice": (RouterConfig(num_experts=E, strategy="expert_choice", capacity_factor=1.5,
                                   max_experts=4), "low_rank", ()),
    "hash": (RouterConfig(num_experts=E, strategy="hash", k=2), "normal", ("token_ids_T",)),
    "complexity_entropy": (RouterConfig(num_experts=E, strategy="complexity", target_experts=2.0,
                                        max_experts=4), "skewed", ()),
    "complexity_hidden": (RouterConfig(num_experts=E, strategy="complexity",
                                       complexity_estimator="hidden_norm", max_experts=3),
                          "normal", ("hidden_TD",)),
    "complexity_attention": (RouterConfig(num_experts=E, strategy="complexity",
                                          complexity_estimator="attention_entropy"),
                             "normal", ("attention_probs",)),
    "complexity_external": (RouterConfig(num_experts=E, strategy="complexity",
                                         complexity_estimator="external", target_experts=1.5,
                                         max_experts=3), "normal", ("complexity_scores_T",)),
    "capacity_position": (RouterConfig(num_experts=E, k=2, capacity_factor=0.75), "skewed", ()),
    "capacity_probability": (RouterConfig(num_experts=E, k=2, capacity_factor=0.75,
                                          drop_policy="probability"), "skewed", ()),
    "capacity_top_p": (RouterConfig(num_experts=E, strategy="top_p", top_p=0.7,
                                    capacity_factor=0.5), "normal", ()),
}


def convert(b: Backend, extra: dict[str, np.ndarray]) -> dict:
    return {name: b.asarray(value) for name, value in extra.items()}


def assert_same_plan(b: Backend, plan: RoutingPlan, ref: RoutingPlan) -> None:
    """``plan`` (backend arrays) equals ``ref`` (NumPy): decisions exactly, values within 1e-5."""
    exact = ("expert_indices", "num_experts_per_token", "expert_counts", "num_dropped")
    close = ("expert_weights", "router_probs")
    for field in exact + close:
        value = getattr(plan, field)
        assert b.is_array(value), f"plan.{field} is {type(value)}, not a {b.name} array"
        got = b.to_numpy(value)
        want = getattr(ref, field)
        assert got.shape == want.shape, field
        if field in exact:
            assert b.dtype_kind(value) == "i", f"plan.{field} dtype kind {b.dtype_kind(value)}"
            np.testing.assert_array_equal(got, want, err_msg=field)
        else:
            assert str(got.dtype) == "float32", f"plan.{field} is {got.dtype}"
            np.testing.assert_allclose(got, want, err_msg=field, **TOL)
    for group in ("losses", "stats"):
        for name, value, want in zip(getattr(plan, group)._fields, getattr(plan, group),
                                     getattr(ref, group), strict=True):
            assert b.is_array(value), f"plan.{group}.{name} is {type(value)}"
            np.testing.assert_allclose(b.to_numpy(value), want, err_msg=f"{group}.{name}", **TOL)
    assert (plan.state is None) == (ref.state is None)
    if ref.state is not None:
        for name, value, want in zip(ref.state._fields, plan.state, ref.state, strict=True):
            np.testing.assert_allclose(b.to_numpy(value), want, err_msg=f"state.{name}", **TOL)


# ----- route() on every backend ------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_route_matches_numpy(backend: Backend, case: str) -> None:
    config, kind, needs = CASES[case]
    logits = logits_of(kind, config.num_choices, seed=len(case))
    extra = {k: v for k, v in rng_inputs(len(case)).items() if k in needs}
    ref = route(logits, config, **extra)
    plan = route(backend.asarray(logits), config, **convert(backend, extra))
    assert_same_plan(backend, plan, ref)


@pytest.mark.parametrize("case", ["top_k", "top_p", "hash", "capacity_position", "null_experts"])
def test_empty_and_single_token_batches(backend: Backend, case: str) -> None:
    config, kind, needs = CASES[case]
    for tokens in (0, 1):
        logits = logits_of(kind, config.num_choices, tokens=tokens)
        extra = {k: v for k, v in rng_inputs(tokens=tokens).items() if k in needs}
        ref = route(logits, config, **extra)
        plan = route(backend.asarray(logits), config, **convert(backend, extra))
        assert_same_plan(backend, plan, ref)


@pytest.mark.parametrize("strategy", ["top_p", "complexity"])
def test_controller_state_matches_numpy(backend: Backend, strategy: str) -> None:
    config = RouterConfig(num_experts=E, strategy=strategy, target_experts=2.0, max_experts=4,
                          controller_rate=0.05, causal=strategy == "complexity")
    ref_state = init_router_state(config)
    state = init_router_state(config, like=backend.asarray(np.zeros(1, np.float32)))
    assert all(backend.is_array(v) for v in state)
    for step in range(3):  # training steps carry the state in and out
        logits = logits_of("skewed", seed=step)
        ref = route(logits, config, state=ref_state, training=True)
        plan = route(backend.asarray(logits), config, state=state, training=True)
        assert_same_plan(backend, plan, ref)
        ref_state, state = ref.state, plan.state
    logits = logits_of("normal", seed=9)
    ref = route(logits, config, state=ref_state)
    assert_same_plan(backend, route(backend.asarray(logits), config, state=state), ref)


def test_float16_logits_are_routed_in_float32(backend: Backend) -> None:
    logits = logits_of("normal").astype(np.float16)
    x = backend.asarray(logits)
    if backend.to_numpy(x).dtype != np.float16:
        pytest.skip(f"{backend.name}.asarray does not keep float16")
    config = RouterConfig(num_experts=E, k=2)
    assert_same_plan(backend, route(x, config), route(logits, config))


# ----- primitives: the Backend contract ----------------------------------------------------------
def np_of(b: Backend, x) -> np.ndarray:
    return np.asarray(b.to_numpy(x))


def f32(b: Backend, values) -> object:
    return b.asarray(np.asarray(values, dtype=np.float32))


def test_argsort_desc_is_stable_with_ties(backend: Backend) -> None:
    b = backend
    x = np.array([[1, 3, 3, 2, 3], [0, 0, 0, 0, 0], [-np.inf, 1, -np.inf, 1, 5]], np.float32)
    want = [[1, 2, 4, 3, 0], [0, 1, 2, 3, 4], [4, 1, 3, 0, 2]]
    assert np_of(b, b.argsort_desc(f32(b, x), axis=-1)).tolist() == want
    assert np_of(b, b.argsort_desc(f32(b, x.T), axis=0)).T.tolist() == want
    assert b.dtype_kind(b.argsort_desc(f32(b, x))) == "i"


@pytest.mark.parametrize("shape", [(5000,), (64, 33), (3, 4097)])
def test_argsort_desc_stable_on_large_tie_heavy_inputs(backend: Backend,
                                                       shape: tuple[int, ...]) -> None:
    # stable-sort bugs of some kernels only show on long rows
    x = (np.random.default_rng(0).integers(0, 4, size=shape) * 0.5).astype(np.float32)
    got = np_of(backend, backend.argsort_desc(f32(backend, x), axis=-1))
    np.testing.assert_array_equal(got, np.argsort(-x, axis=-1, kind="stable"))


def test_top_k_ties_go_to_the_lower_index(backend: Backend) -> None:
    b = backend
    x = np.array([[0.2, 0.5, 0.5, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)
    values, idx = b.top_k(f32(b, x), 3)
    assert np_of(b, idx).tolist() == [[1, 2, 4], [0, 1, 2]]
    np.testing.assert_allclose(np_of(b, values), [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])


def test_one_hot_of_minus_one_is_a_zero_row(backend: Backend) -> None:
    b = backend
    idx = b.asarray(np.array([[2, -1], [0, 3]]), dtype="int")
    for dtype, kind in (("float32", "f"), ("int", "i")):
        out = b.one_hot(idx, 4, dtype=dtype)
        assert b.dtype_kind(out) == kind
        assert np_of(b, out).tolist() == [[[0, 0, 1, 0], [0, 0, 0, 0]],
                                          [[1, 0, 0, 0], [0, 0, 0, 1]]]


def test_bincount_ignores_minus_one(backend: Backend) -> None:
    b = backend
    idx = b.asarray(np.array([[0, -1, 2], [2, 2, -1]]), dtype="int")
    counts = b.bincount(idx, 5)
    assert b.dtype_kind(counts) == "i"
    assert np_of(b, counts).tolist() == [1, 0, 3, 0, 0]
    empty = b.bincount(b.asarray(np.zeros((0, 2), np.int64), dtype="int"), 3)
    assert np_of(b, empty).tolist() == [0, 0, 0]


def test_where_accepts_python_scalars_and_keeps_dtype(backend: Backend) -> None:
    b = backend
    cond = b.asarray(np.array([True, False, True]))
    x = f32(b, [1.5, 2.5, 3.5])
    ints = b.asarray(np.array([4, 5, 6]), dtype="int")
    out = b.where(cond, x, 0.0)
    assert np_of(b, out).tolist() == [1.5, 0.0, 3.5] and np_of(b, out).dtype == np.float32
    out = b.where(cond, -1.0, x)
    assert np_of(b, out).tolist() == [-1.0, 2.5, -1.0] and np_of(b, out).dtype == np.float32
    out = b.where(cond, ints, -1)
    assert np_of(b, out).tolist() == [4, -1, 6] and b.dtype_kind(out) == "i"
    out = b.where(cond, x, float("-inf"))
    assert np_of(b, out).tolist() == [1.5, -np.inf, 3.5]


def test_cumsum_sum_max(backend: Backend) -> None:
    b = backend
    x = np.array([[1.0, 2.0, 3.0], [0.5, 0.25, 0.25]], np.float32)
    np.testing.assert_allclose(np_of(b, b.cumsum(f32(b, x), axis=-1)), np.cumsum(x, -1))
    np.testing.assert_allclose(np_of(b, b.cumsum(f32(b, x), axis=0)), np.cumsum(x, 0))
    ints = b.asarray(np.array([[1, 0], [1, 1]]), dtype="int")
    cum = b.cumsum(ints, axis=0)
    assert np_of(b, cum).tolist() == [[1, 0], [2, 1]] and b.dtype_kind(cum) == "i"
    flags = b.asarray(np.array([[True, False, True], [False, False, True]]))
    assert np_of(b, b.sum(flags, axis=-1)).tolist() == [2, 1]
    assert float(np_of(b, b.sum(f32(b, x)))) == pytest.approx(7.0)
    assert np_of(b, b.max(f32(b, x), axis=-1)).tolist() == [3.0, 0.5]


def test_softmax_family_handles_minus_inf(backend: Backend) -> None:
    b = backend
    x = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, -np.inf], [1.0, 2.0, 3.0]],
                 np.float32)
    lse = np_of(b, b.logsumexp(f32(b, x), axis=-1))
    assert lse[0] == -np.inf and lse[1] == 0.0
    assert lse[2] == pytest.approx(np.log(np.exp(1) + np.exp(2) + np.exp(3)), rel=1e-6)
    probs = np_of(b, b.softmax(f32(b, x[1:]), axis=-1))
    assert probs[0].tolist() == [1.0, 0.0, 0.0]
    np.testing.assert_allclose(probs[1], np.exp(x[2]) / np.exp(x[2]).sum(), rtol=1e-6)
    logp = np_of(b, b.log_softmax(f32(b, x[2:]), axis=-1))
    np.testing.assert_allclose(np.exp(logp), probs[1:], rtol=1e-6)


def test_sigmoid_exp_log_are_stable(backend: Backend) -> None:
    b = backend
    s = np_of(b, b.sigmoid(f32(b, [-100.0, -1.0, 0.0, 1.0, 100.0])))
    assert np.isfinite(s).all() and s[2] == 0.5 and s[4] == 1.0 and 0.0 <= s[0] < 1e-40
    assert s[1] == pytest.approx(1 / (1 + np.e), rel=1e-6)
    assert np_of(b, b.log(f32(b, [1.0, 0.0]))).tolist() == [0.0, -np.inf]
    assert np_of(b, b.exp(f32(b, [0.0, -np.inf]))).tolist() == [1.0, 0.0]
    np.testing.assert_allclose(np_of(b, b.sqrt(f32(b, [4.0, 2.0]))), [2.0, np.sqrt(2)])
    assert np_of(b, b.floor(f32(b, [1.5, -1.5]))).tolist() == [1.0, -2.0]
    assert np_of(b, b.ceil(f32(b, [1.5, -1.5]))).tolist() == [2.0, -1.0]


def test_maximum_minimum_with_scalars_keep_dtype(backend: Backend) -> None:
    b = backend
    x = f32(b, [-1.0, 0.5, 2.0])
    assert np_of(b, b.maximum(x, 0.0)).tolist() == [0.0, 0.5, 2.0]
    assert np_of(b, b.minimum(x, 1.0)).tolist() == [-1.0, 0.5, 1.0]
    assert np_of(b, b.maximum(x, 0.0)).dtype == np.float32
    ints = b.asarray(np.array([0, 3, 9]), dtype="int")
    low = b.cast(b.asarray(1, like=ints), "int")
    clipped = b.minimum(b.maximum(ints, low), b.cast(b.asarray(4, like=ints), "int"))
    assert np_of(b, clipped).tolist() == [1, 3, 4] and b.dtype_kind(clipped) == "i"


def test_gathers_shapes_and_creation(backend: Backend) -> None:
    b = backend
    x = f32(b, [[10.0, 11.0, 12.0], [20.0, 21.0, 22.0]])
    idx = b.asarray(np.array([[2, 0], [1, 1]]), dtype="int")
    assert np_of(b, b.take_along_axis(x, idx, axis=-1)).tolist() == [[12, 10], [21, 21]]
    rows = b.gather_rows(x, b.asarray(np.array([1, 1, 0]), dtype="int"))
    assert np_of(b, rows)[:, 0].tolist() == [20, 20, 10]
    assert b.shape(x) == (2, 3) and b.dim(x, 1) == 3
    assert np_of(b, b.reshape(x, (3, 2))).shape == (3, 2)
    assert np_of(b, b.concat([x, x], axis=0)).shape == (4, 3)
    ar = b.arange(4, like=x)
    assert np_of(b, ar).tolist() == [0, 1, 2, 3] and b.dtype_kind(ar) == "i"
    full = b.full((2, 2), 1.5, "float32", like=x)
    assert np_of(b, full).tolist() == [[1.5, 1.5], [1.5, 1.5]] and b.dtype_kind(full) == "f"


def test_cast_dtype_kind_and_finiteness(backend: Backend) -> None:
    b = backend
    x = f32(b, [1.7, -0.2, 0.0])
    assert b.is_array(x) and not b.is_array([1.0])
    if b.name != "numpy":
        assert not b.is_array(np.zeros(2, np.float32))
    for dtype, kind in (("float32", "f"), ("int", "i"), ("bool", "b")):
        assert b.dtype_kind(b.cast(x, dtype)) == kind
    assert np_of(b, b.cast(x, "int")).tolist() == [1, 0, 0]  # truncation toward zero
    assert np_of(b, b.cast(x, "bool")).tolist() == [True, True, False]
    assert b.all_finite(x) and not b.all_finite(f32(b, [1.0, np.nan]))
    assert not b.all_finite(f32(b, [np.inf]))


@pytest.mark.parametrize("draw", ["random_uniform", "random_normal"])
def test_seeded_noise(backend: Backend, draw: str) -> None:
    like = f32(backend, np.zeros((64, 8)))
    fn: Callable = getattr(backend, draw)
    first, again = np_of(backend, fn(0, like)), np_of(backend, fn(0, like))
    other = np_of(backend, fn(1, like))
    assert first.shape == (64, 8) and first.dtype == np.float32
    np.testing.assert_array_equal(first, again)  # same seed, same noise
    assert not np.array_equal(first, other)
    if draw == "random_uniform":
        assert first.min() >= 0.0 and first.max() < 1.0 and 0.4 < first.mean() < 0.6
    else:
        assert abs(first.mean()) < 0.2 and 0.8 < first.std() < 1.2


# ----- gradients (where the framework has autodiff) ----------------------------------------------
def backend_gradient(b: Backend, logits: np.ndarray, config: RouterConfig,
                     readout: np.ndarray) -> np.ndarray | None:
    """d/dlogits of sum(weights * readout) + losses.total, by the framework's autodiff."""

    def objective(x):
        plan = route(x, config)
        return b.sum(plan.expert_weights * b.asarray(readout, like=x)) + plan.losses.total

    if b.name == "torch":
        import torch

        x = torch.tensor(logits, requires_grad=True)
        objective(x).backward()
        return x.grad.numpy()
    if b.name == "jax":
        import jax

        return np.asarray(jax.grad(objective)(b.asarray(logits)))
    if b.name == "tensorflow":
        import tensorflow as tf

        x = tf.Variable(logits)
        with tf.GradientTape() as tape:
            value = objective(tf.convert_to_tensor(x))
        return tape.gradient(value, x).numpy()
    return None


@pytest.mark.parametrize("case", ["top_k", "sigmoid_bias_groups", "top_p", "null_experts"])
def test_gradients_match_finite_differences(backend: Backend, case: str) -> None:
    config, _, _ = CASES[case]
    config = config.replace(z_loss_coef=1e-2, entropy_loss_coef=1e-2)
    rng = np.random.default_rng(3)
    # well separated logits: a step of 1e-2 rarely changes which experts are selected
    logits = (rng.permuted(np.tile(np.arange(config.num_choices), (6, 1)), axis=1) * 0.7
              + rng.normal(size=(6, config.num_choices)) * 0.05).astype(np.float32)
    readout = rng.normal(size=(6, config.max_slots)).astype(np.float32)
    grad = backend_gradient(backend, logits, config, readout)
    if grad is None:
        pytest.skip(f"backend {backend.name!r} has no autodiff")

    def objective(x: np.ndarray) -> tuple[float, list]:
        plan = route(x.astype(np.float32), config)
        value = float((plan.expert_weights * readout).sum() + plan.losses.total)
        return value, plan.expert_indices.tolist()

    eps = 1e-2
    _, chosen = objective(logits)
    numeric = np.full(logits.shape, np.nan)
    for i in np.ndindex(logits.shape):
        up, down = logits.astype(np.float64), logits.astype(np.float64)
        up[i] += eps
        down[i] -= eps
        (f_up, chosen_up), (f_down, chosen_down) = objective(up), objective(down)
        if chosen_up == chosen == chosen_down:  # else the step crosses a selection boundary
            numeric[i] = (f_up - f_down) / (2 * eps)
    smooth = np.isfinite(numeric)
    assert smooth.mean() > 0.9
    np.testing.assert_allclose(grad[smooth], numeric[smooth], rtol=2e-2, atol=2e-3)
