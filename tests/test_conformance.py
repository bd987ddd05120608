"""The shared conformance suite: every framework backend computes what the NumPy oracle computes.

Two kinds of checks, over the backends of the ``backend`` fixture (``MOE_TEST_BACKENDS``, see
tests/conftest.py):

- *comparisons* run on each framework backend (never NumPy against itself): ``route()`` on the
  framework's arrays returns arrays of that framework whose decisions equal NumPy's exactly and
  whose values agree within 1e-5, for every case of tests/router_cases.py; and every primitive of
  :class:`~moe_router.backend.Backend` returns what the NumPy backend returns on the same inputs
  (:data:`CHECKS`; :func:`test_every_primitive_is_compared` keeps that list complete);
- *contract* checks with hand-written expectations run on every backend, NumPy included: stable
  sorts with ties to the lower index, exact inverse permutations, ``one_hot(-1)`` = zero row,
  ``bincount`` ignoring -1, equal inputs giving equal outputs wherever they sit, dtype names,
  seeded noise, gradients.

No framework is imported at module import time; the fixture imports it. Tracing variants
(``torch.compile``, ``jax.jit``, ``tf.function`` / XLA) belong to each framework's own tests.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest
from conftest import backend_names
from router_cases import assert_same_plan, case_inputs, case_table, router_logits

from moe_router import InputError, RouterConfig, backend_for, init_router_state, route
from moe_router.backend import Backend
from moe_router.registry import default_registry, get_backend

E, T = 8, 32
CASES = case_table(E)
FRAMEWORKS = [name for name in backend_names() if name != "numpy"]
#: comparisons with the NumPy oracle: the framework backends only
on_frameworks = pytest.mark.parametrize("backend", FRAMEWORKS, indirect=True)


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


def convert(b: Backend, extra: dict[str, np.ndarray]) -> dict:
    return {name: b.asarray(value) for name, value in extra.items()}


# ===== route() against NumPy =====================================================================
@on_frameworks
@pytest.mark.parametrize("case", list(CASES))
def test_route_matches_numpy(backend: Backend, case: str) -> None:
    logits, extra = case_inputs(CASES[case], T, seed=len(case))
    ref = route(logits, CASES[case].config, **extra)
    plan = route(backend.asarray(logits), CASES[case].config, **convert(backend, extra))
    assert_same_plan(backend, plan, ref)


@on_frameworks
@pytest.mark.parametrize("case", ["top_k", "top_p", "hash", "capacity", "null_min0"])
def test_empty_and_single_token_batches(backend: Backend, case: str) -> None:
    for tokens in (0, 1):
        logits, extra = case_inputs(CASES[case], tokens)
        ref = route(logits, CASES[case].config, **extra)
        plan = route(backend.asarray(logits), CASES[case].config, **convert(backend, extra))
        assert_same_plan(backend, plan, ref)


@on_frameworks
@pytest.mark.parametrize("strategy", ["top_p", "complexity"])
def test_controller_state_matches_numpy(backend: Backend, strategy: str) -> None:
    config = RouterConfig(num_experts=E, strategy=strategy, target_experts=2.0, max_experts=4,
                          controller_rate=0.05, causal=strategy == "complexity")
    ref_state = init_router_state(config)
    state = init_router_state(config, like=backend.asarray(np.zeros(1, np.float32)))
    assert all(backend.is_array(v) for v in state)
    for step in range(3):  # training steps carry the state in and out
        logits = router_logits("skewed", T, E, seed=step)
        ref = route(logits, config, state=ref_state, training=True)
        plan = route(backend.asarray(logits), config, state=state, training=True)
        assert_same_plan(backend, plan, ref)
        ref_state, state = ref.state, plan.state
    logits = router_logits("normal", T, E, seed=9)
    ref = route(logits, config, state=ref_state)
    assert_same_plan(backend, route(backend.asarray(logits), config, state=state), ref)


@on_frameworks
def test_float16_logits_are_routed_in_float32(backend: Backend) -> None:
    logits = router_logits("normal", T, E).astype(np.float16)
    x = backend.asarray(logits)
    if backend.to_numpy(x).dtype != np.float16:
        pytest.skip(f"{backend.name}.asarray does not keep float16")
    config = RouterConfig(num_experts=E, k=2)
    assert_same_plan(backend, route(x, config), route(logits, config))


def test_nan_logits_raise_eagerly(backend: Backend) -> None:
    logits = router_logits("normal", 4, E)
    logits[1, 2] = np.nan
    with pytest.raises(InputError, match="router_logits_TE"):
        route(backend.asarray(logits), CASES["top_k"].config)


def test_registered_and_found_by_type(backend: Backend) -> None:
    x = backend.asarray(np.zeros(3, np.float32))
    assert backend_for(x) is backend and get_backend(backend.name) is backend
    assert not backend.is_tracing(x)


# ===== every primitive against NumPy =============================================================
class Check(NamedTuple):
    """``fn(b, *args)`` on backend arrays of ``args`` (NumPy values, converted by dtype kind)."""

    primitive: str
    fn: Callable[..., Any]
    args: tuple = ()


_rng = np.random.default_rng(0)
X = np.array([[1.5, -0.25, 3.0, 3.0, -4.0], [0.0, 2.0, -1.0, 0.5, 0.5]], np.float32)
WIDE = np.linspace(-12.0, 12.0, 37, dtype=np.float32)  # 37: also the tail past a full vector
POS = np.array([[4.0, 0.5, 1e-30, 2.0, 7.25]], np.float32)
INF = np.array([[-np.inf, -np.inf, -np.inf], [0.0, -np.inf, -np.inf], [1.0, 2.0, 3.0]],
               np.float32)
TIES = (_rng.integers(0, 4, size=(6, 33)) * 0.5).astype(np.float32)
INTS = np.array([[3, -1, 2, 2, 0], [1, 1, 4, 0, -1]])
IDX = np.array([[2, -1], [0, 3], [3, 3]])
COND = np.array([[True, False, True, False, True], [False, False, True, True, False]])
PERM = _rng.permutation(1000)

CHECKS: dict[str, Check] = {
    "asarray": Check("asarray", lambda b: [b.asarray(np.arange(3), dtype=d)
                                           for d in ("float32", "int", "int32", "bool")]),
    "cast": Check("cast", lambda b, x: [b.cast(x, d) for d in ("float32", "int", "int32",
                                                                 "bool")], (X,)),
    "cast_like": Check("cast_like", lambda b, x, i: [b.cast_like(i, x), b.cast_like(x, i)],
                       (X, INTS)),
    "arange": Check("arange", lambda b, x: b.arange(7, like=x), (X,)),
    "full": Check("full", lambda b, x: [b.full((2, 3), v, d, like=x) for v, d in (
        (1.5, "float32"), (-1, "int"), (7, "int32"), (True, "bool"))], (X,)),
    "log": Check("log", lambda b, x: b.log(x), (POS,)),
    "sigmoid": Check("sigmoid", lambda b, x: b.sigmoid(x), (WIDE,)),
    "softmax": Check("softmax", lambda b, x: [b.softmax(x, axis=-1), b.softmax(x, axis=0)],
                     (X,)),
    "softmax_inf": Check("softmax", lambda b, x: b.softmax(x[1:], axis=-1), (INF,)),
    "log_softmax": Check("log_softmax", lambda b, x: b.log_softmax(x, axis=-1), (X,)),
    "logsumexp": Check("logsumexp", lambda b, x: [b.logsumexp(x, axis=-1),
                                                  b.logsumexp(x, axis=0)], (X,)),
    "logsumexp_inf": Check("logsumexp", lambda b, x: b.logsumexp(x, axis=-1), (INF,)),
    "relu": Check("relu", lambda b, x, i: [b.relu(x), b.relu(i)], (WIDE, INTS)),
    "silu": Check("silu", lambda b, x: b.silu(x), (WIDE,)),
    "gelu": Check("gelu", lambda b, x: b.gelu(x), (WIDE,)),
    "stop_gradient": Check("stop_gradient", lambda b, x: b.stop_gradient(x), (X,)),
    "where": Check("where", lambda b, c, x, i: [b.where(c, x, -x), b.where(c, x, 0.0),
                                                b.where(c, -1.0, x), b.where(c, i, -1),
                                                b.where(c, x, float("-inf"))],
                   (COND, X, INTS)),
    "maximum": Check("maximum", lambda b, x, i: [b.maximum(x, 0.0), b.maximum(x, -x),
                                                 b.maximum(i, b.cast(b.asarray(1, like=i),
                                                                     "int"))], (X, INTS)),
    "minimum": Check("minimum", lambda b, x, i: [b.minimum(x, 1.0), b.minimum(x, -x),
                                                 b.minimum(i, b.cast(b.asarray(1, like=i),
                                                                     "int"))], (X, INTS)),
    "floor": Check("floor", lambda b, x: b.floor(x), (X,)),
    "ceil": Check("ceil", lambda b, x: b.ceil(x), (X,)),
    "sqrt": Check("sqrt", lambda b, x: b.sqrt(x), (POS,)),
    "sum": Check("sum", lambda b, x, i, c: [b.sum(x), b.sum(x, axis=-1), b.sum(i, axis=0),
                                            b.sum(c, axis=-1), b.sum(c)], (X, INTS, COND)),
    "max": Check("max", lambda b, x, i: [b.max(x), b.max(x, axis=-1), b.max(i, axis=0)],
                 (X, INTS)),
    "cumsum": Check("cumsum", lambda b, x, i: [b.cumsum(x, axis=-1), b.cumsum(x, axis=0),
                                               b.cumsum(i, axis=0)], (X, INTS)),
    "argsort": Check("argsort", lambda b, x, i: [b.argsort(x, axis=-1), b.argsort(x, axis=0),
                                                 b.argsort(i, axis=-1), b.argsort(i, axis=0)],
                     (TIES, INTS)),
    "argsort_desc": Check("argsort_desc", lambda b, x, i: [
        b.argsort_desc(x, axis=-1), b.argsort_desc(x, axis=0), b.argsort_desc(i, axis=-1)],
        (TIES, INTS)),
    "invert_permutation": Check("invert_permutation", lambda b, p: b.invert_permutation(p),
                                (PERM,)),
    "top_k": Check("top_k", lambda b, x: list(b.top_k(x, 4)), (TIES,)),
    "take_along_axis": Check("take_along_axis", lambda b, x, i: [
        b.take_along_axis(x, b.cast(b.maximum(i, b.cast(b.asarray(0, like=i), "int")), "int"),
                          axis=-1),
        b.take_along_axis(x[:, :2], b.asarray(np.array([[1, 0], [0, 0]]), dtype="int"),
                          axis=0)], (X, INTS)),
    "gather_rows": Check("gather_rows", lambda b, x, p: b.gather_rows(x, p[:5] % 2), (X, PERM)),
    "scatter_rows": Check("scatter_rows", lambda b, x, i: [
        b.scatter_rows(x, b.asarray(np.array([1, 0]), dtype="int"), x[:2] * 2.0 + 1.0),
        b.scatter_rows(i, b.asarray(np.array([0]), dtype="int32"), i[1:2])], (X, INTS)),
    "one_hot": Check("one_hot", lambda b, i: [b.one_hot(i, 4), b.one_hot(i, 4, dtype="int")],
                     (IDX,)),
    "bincount": Check("bincount", lambda b, i, j: [b.bincount(i, 5), b.bincount(j, 4),
                                                   b.bincount(j[:0], 3)], (INTS, IDX)),
    "reshape": Check("reshape", lambda b, x: [b.reshape(x, (5, 2)), b.reshape(x, (-1,))],
                     (X,)),
    "unstack": Check("unstack", lambda b, x: list(b.unstack(x[0])), (X,)),
    "concat": Check("concat", lambda b, x: [b.concat([x, x], axis=0), b.concat([x, x], axis=1)],
                    (X,)),
}
#: primitives without an array result: checked by the contract tests below
CONTRACT_ONLY = {"is_array", "to_numpy", "dtype_kind", "shape", "dim", "is_tracing",
                 "all_finite", "is_host", "random_uniform", "random_normal", "scope"}


def as_backend(b: Backend, value: np.ndarray) -> Any:
    kind = value.dtype.kind
    dtype = "float32" if kind == "f" else "bool" if kind == "b" else "int"
    return b.asarray(value, dtype=dtype)


def run_check(b: Backend, check: Check) -> list:
    out = check.fn(b, *(as_backend(b, a) for a in check.args))
    return out if isinstance(out, list) else [out]


def test_every_primitive_is_compared() -> None:
    public = {name for name, value in vars(Backend).items()
              if callable(value) and not name.startswith("_")}
    compared = {check.primitive for check in CHECKS.values()}
    assert compared <= public, f"checks of unknown primitives: {compared - public}"
    assert public - compared == CONTRACT_ONLY, (
        f"primitives neither compared with NumPy nor in CONTRACT_ONLY: "
        f"{public - compared - CONTRACT_ONLY}")


@on_frameworks
@pytest.mark.parametrize("name", list(CHECKS))
def test_primitive_matches_numpy(backend: Backend, name: str) -> None:
    ref = run_check(get_backend("numpy"), CHECKS[name])
    got = run_check(backend, CHECKS[name])
    assert len(got) == len(ref)
    for i, (value, want) in enumerate(zip(got, ref, strict=True)):
        assert backend.is_array(value), f"{name}[{i}] is {type(value)}"
        array, want = np.asarray(backend.to_numpy(value)), np.asarray(want)
        assert array.shape == want.shape, f"{name}[{i}]: {array.shape} != {want.shape}"
        assert array.dtype.kind == want.dtype.kind, f"{name}[{i}]: {array.dtype} vs {want.dtype}"
        if want.dtype == np.int32 or want.dtype.kind == "f":  # int32 / float32 everywhere
            assert array.dtype == want.dtype, f"{name}[{i}]: {array.dtype} != {want.dtype}"
        if want.dtype.kind == "f":
            np.testing.assert_allclose(array, want, rtol=1e-5, atol=1e-6, err_msg=f"{name}[{i}]")
        else:
            np.testing.assert_array_equal(array, want, err_msg=f"{name}[{i}]")


# ===== the Backend contract, hand-written expectations (every backend) ===========================
def np_of(b: Backend, x: Any) -> np.ndarray:
    return np.asarray(b.to_numpy(x))


def f32(b: Backend, values: Any) -> Any:
    return b.asarray(np.asarray(values, dtype=np.float32))


def test_sorts_are_stable_with_ties_to_the_lower_index(backend: Backend) -> None:
    b = backend
    x = np.array([[1, 3, 3, 2, 3], [0, 0, 0, 0, 0], [-np.inf, 1, -np.inf, 1, 5]], np.float32)
    want_desc = [[1, 2, 4, 3, 0], [0, 1, 2, 3, 4], [4, 1, 3, 0, 2]]
    want_asc = [[0, 3, 1, 2, 4], [0, 1, 2, 3, 4], [0, 2, 1, 3, 4]]
    assert np_of(b, b.argsort_desc(f32(b, x), axis=-1)).tolist() == want_desc
    assert np_of(b, b.argsort_desc(f32(b, x.T), axis=0)).T.tolist() == want_desc
    assert np_of(b, b.argsort(f32(b, x), axis=-1)).tolist() == want_asc
    assert np_of(b, b.argsort(b.asarray(x[:2].astype(np.int64), dtype="int"))).tolist() == \
        want_asc[:2]
    values, idx = b.top_k(f32(b, [[0.2, 0.5, 0.5, 0.1, 0.5], [1.0, 1.0, 1.0, 1.0, 1.0]]), 3)
    assert np_of(b, idx).tolist() == [[1, 2, 4], [0, 1, 2]]
    np.testing.assert_allclose(np_of(b, values), [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]])
    for out in (b.argsort(f32(b, x)), b.argsort_desc(f32(b, x)), idx):
        assert b.dtype_kind(out) == "i"


@pytest.mark.parametrize("shape", [(5000,), (64, 33), (3, 4097)])
def test_sorts_are_stable_on_long_tie_heavy_rows(backend: Backend,
                                                 shape: tuple[int, ...]) -> None:
    # stable-sort bugs of some kernels only show on long rows: check the defining property
    x = np.random.default_rng(0).integers(0, 4, size=shape)
    for sort, sign in ((backend.argsort, 1), (backend.argsort_desc, -1)):
        for array in (f32(backend, x * 0.5), backend.asarray(x, dtype="int")):
            order = np_of(backend, sort(array, axis=-1))
            keys = np.take_along_axis(x * sign, order, axis=-1)
            assert (np.diff(keys, axis=-1) >= 0).all()  # sorted
            ties = np.diff(keys, axis=-1) == 0
            assert (np.diff(order, axis=-1)[ties] > 0).all()  # ties in index order


def test_invert_permutation_is_exact(backend: Backend) -> None:
    b = backend
    for perm in (np.zeros(0, np.int64), np.arange(5)[::-1].copy(),
                 np.random.default_rng(1).permutation(100_003)):
        inverse = np_of(b, b.invert_permutation(b.asarray(perm, dtype="int")))
        assert b.dtype_kind(b.invert_permutation(b.asarray(perm, dtype="int"))) == "i"
        assert inverse.shape == perm.shape
        assert (inverse[perm] == np.arange(len(perm))).all()


@pytest.mark.slow
def test_invert_permutation_is_exact_beyond_float32_integers(backend: Backend) -> None:
    n = 2**24 + 7  # a float32 round trip cannot tell 2**24 + 1 from 2**24
    perm = np.random.default_rng(2).permutation(n)
    inverse = np_of(backend, backend.invert_permutation(backend.asarray(perm, dtype="int")))
    assert (inverse[perm] == np.arange(n)).all()


def test_equal_inputs_give_equal_outputs_wherever_they_sit(backend: Backend) -> None:
    # some CPU kernels round the elements past their last full vector differently: an exact
    # tie must stay exact (and break to the lower index) whatever the array's length
    b = backend
    rng = np.random.default_rng(3)
    for shape in ((37, 13), (5, 3), (101,)):
        values = (rng.integers(-4, 5, size=shape) * 0.75).astype(np.float32)
        x = f32(b, values)
        outputs = {"sigmoid": b.sigmoid(x), "log": b.log(b.maximum(x, 0.25)),
                   "softmax": b.softmax(x, axis=-1)}
        rows = values.reshape(-1, shape[-1])
        for name, out in outputs.items():
            out = np_of(b, out).reshape(rows.shape)
            for v in np.unique(values):
                if name == "softmax":  # equal logits of one row: equal probabilities
                    for t in range(rows.shape[0]):
                        same = out[t][rows[t] == v]
                        assert (same == same[:1]).all(), (name, shape, v)
                else:
                    same = out[rows == v]
                    assert (same == same[0]).all(), (name, shape, v)


def test_softmax_of_permuted_rows_is_permuted_bitwise(backend: Backend) -> None:
    b = backend
    rng = np.random.default_rng(4)
    for base in (rng.normal(size=9) * 3, rng.integers(-3, 4, size=16).astype(float)):
        rows = np.stack([rng.permutation(base) for _ in range(24)]).astype(np.float32)
        probs = np_of(b, b.softmax(f32(b, rows), axis=-1))
        first = dict(zip(rows[0].tolist(), probs[0].tolist(), strict=False))
        for row, p in zip(rows, probs, strict=True):
            assert [first[v] for v in row.tolist()] == p.tolist()


def test_one_hot_of_minus_one_is_a_zero_row_and_bincount_ignores_it(backend: Backend) -> None:
    b = backend
    idx = b.asarray(np.array([[2, -1], [0, 3]]), dtype="int")
    for dtype, kind in (("float32", "f"), ("int", "i")):
        out = b.one_hot(idx, 4, dtype=dtype)
        assert b.dtype_kind(out) == kind
        assert np_of(b, out).tolist() == [[[0, 0, 1, 0], [0, 0, 0, 0]],
                                          [[1, 0, 0, 0], [0, 0, 0, 1]]]
    counts = b.bincount(b.asarray(np.array([[0, -1, 2], [2, 2, -1], [-1, -1, -1]]),
                                  dtype="int"), 5)
    assert b.dtype_kind(counts) == "i" and np_of(b, counts).tolist() == [1, 0, 3, 0, 0]
    empty = b.bincount(b.asarray(np.zeros((0, 2), np.int64), dtype="int"), 3)
    assert np_of(b, empty).tolist() == [0, 0, 0]


def test_where_maximum_minimum_take_python_scalars_and_keep_dtype(backend: Backend) -> None:
    b = backend
    cond = b.asarray(np.array([True, False, True]))
    x = f32(b, [1.5, 2.5, 3.5])
    ints = b.asarray(np.array([4, 5, 6]), dtype="int")
    assert np_of(b, b.where(cond, x, 0.0)).tolist() == [1.5, 0.0, 3.5]
    assert np_of(b, b.where(cond, -1.0, x)).dtype == np.float32
    out = b.where(cond, ints, -1)
    assert np_of(b, out).tolist() == [4, -1, 6] and b.dtype_kind(out) == "i"
    assert np_of(b, b.maximum(x, 2.0)).dtype == np.float32
    assert np_of(b, b.minimum(x, 2.0)).tolist() == [1.5, 2.0, 2.0]


def test_dtype_names_and_cast_like(backend: Backend) -> None:
    b = backend
    x = f32(b, [1.7, -0.2, 0.0])
    for dtype, kind in (("float32", "f"), ("int", "i"), ("int32", "i"), ("bool", "b")):
        for out in (b.cast(x, dtype), b.asarray([1, 0, 2], dtype=dtype),
                    b.full((2,), 1, dtype, like=x)):
            assert b.dtype_kind(out) == kind, (dtype, out)
    for out in (b.cast(x, "int32"), b.asarray([1, 2], dtype="int32"),
                b.full((2,), 3, "int32", like=x)):
        assert np_of(b, out).dtype == np.int32
    assert np_of(b, b.cast(x, "int")).tolist() == [1, 0, 0]  # truncation toward zero
    assert np_of(b, b.cast(x, "bool")).tolist() == [True, True, False]
    assert b.dtype_kind(b.asarray(np.arange(3))) == "i"
    if b.name != "numpy":  # frameworks keep their float32 convention; NumPy keeps the dtype
        assert np_of(b, b.asarray(np.zeros(2, np.float64))).dtype == np.float32
    ints = b.asarray(np.array([1, 2]), dtype="int")
    assert b.cast_like(x, x) is x and b.cast_like(ints, ints) is ints  # no copy
    assert b.dtype_kind(b.cast_like(ints, x)) == "f" and b.dtype_kind(b.cast_like(x, ints)) == "i"


def test_shapes_finiteness_and_host(backend: Backend) -> None:
    b = backend
    x = f32(b, np.zeros((2, 3)))
    assert b.is_array(x) and not b.is_array([1.0])
    if b.name != "numpy":
        assert not b.is_array(np.zeros(2, np.float32))
    assert b.shape(x) == (2, 3) and b.dim(x, 1) == 3 and isinstance(b.dim(x, 0), int)
    assert isinstance(b.to_numpy(x), np.ndarray)
    assert b.all_finite(x) and not b.all_finite(f32(b, [1.0, np.nan]))
    assert not b.all_finite(f32(b, [np.inf]))
    assert b.is_host(x) is True  # this suite runs on host arrays; device tests: marker gpu


def test_softmax_family_and_sigmoid_at_extremes(backend: Backend) -> None:
    b = backend
    lse = np_of(b, b.logsumexp(f32(b, INF), axis=-1))
    assert lse[0] == -np.inf and lse[1] == 0.0
    assert np_of(b, b.softmax(f32(b, INF[1:2]), axis=-1)).tolist() == [[1.0, 0.0, 0.0]]
    s = np_of(b, b.sigmoid(f32(b, [-100.0, -1.0, 0.0, 1.0, 100.0])))
    assert np.isfinite(s).all() and s[2] == 0.5 and s[4] == 1.0 and 0.0 <= s[0] < 1e-40
    assert s[1] == pytest.approx(1 / (1 + np.e), rel=1e-6)
    assert np_of(b, b.log(f32(b, [1.0, 0.0]))).tolist() == [0.0, -np.inf]


def test_activations_follow_their_definitions(backend: Backend) -> None:
    b = backend
    v = WIDE.astype(np.float64)
    erf = np.array([math.erf(t / math.sqrt(2.0)) for t in v])
    np.testing.assert_allclose(np_of(b, b.gelu(f32(b, WIDE))), 0.5 * v * (1 + erf),
                               rtol=1e-5, atol=1e-6)  # exact (erf) GELU, not the tanh form
    np.testing.assert_allclose(np_of(b, b.silu(f32(b, WIDE))), v / (1 + np.exp(-v)),
                               rtol=1e-5, atol=1e-6)
    assert np_of(b, b.relu(f32(b, [-1.0, 0.0, 2.0]))).tolist() == [0.0, 0.0, 2.0]
    assert np_of(b, b.stop_gradient(f32(b, [1.5]))).tolist() == [1.5]


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


# ===== gradients, by each framework's autodiff ===================================================
def autodiff(b: Backend, objective: Callable[[Any], Any], x: np.ndarray) -> np.ndarray:
    """d objective / dx at ``x`` by the framework's autodiff."""
    if b.name == "torch":
        import torch

        var = torch.tensor(x, requires_grad=True)
        objective(var).backward()
        return var.grad.numpy()
    if b.name == "jax":
        import jax

        return np.asarray(jax.grad(objective)(b.asarray(x)))
    if b.name == "tensorflow":
        import tensorflow as tf

        var = tf.Variable(x)
        with tf.GradientTape() as tape:
            value = objective(tf.convert_to_tensor(var))
        return tape.gradient(value, var).numpy()
    pytest.skip(f"no autodiff helper for backend {b.name!r}")


@on_frameworks
def test_stop_gradient_blocks_the_gradient(backend: Backend) -> None:
    b = backend
    x = np.array([1.0, -2.0, 3.0], np.float32)
    grad = autodiff(b, lambda v: b.sum(b.stop_gradient(v) * v + b.sigmoid(v)), x)
    np.testing.assert_allclose(grad, x + (1 / (1 + np.exp(-x))) * (1 / (1 + np.exp(x))),
                               rtol=1e-5)


@on_frameworks
@pytest.mark.parametrize("case", ["top_k", "top_k_sigmoid_groups", "top_p", "null"])
def test_gradients_match_finite_differences(backend: Backend, case: str) -> None:
    config = CASES[case].config.replace(z_loss_coef=1e-2, entropy_loss_coef=1e-2)
    rng = np.random.default_rng(3)
    # well separated logits: a step of 1e-2 rarely changes which experts are selected
    logits = (rng.permuted(np.tile(np.arange(config.num_choices), (6, 1)), axis=1) * 0.7
              + rng.normal(size=(6, config.num_choices)) * 0.05).astype(np.float32)
    readout = rng.normal(size=(6, config.max_slots)).astype(np.float32)

    def backend_objective(x: Any) -> Any:
        plan = route(x, config)
        return (backend.sum(plan.expert_weights * backend.asarray(readout, like=x))
                + plan.losses.total)

    grad = autodiff(backend, backend_objective, logits)

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
