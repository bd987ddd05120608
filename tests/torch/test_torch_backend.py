"""TorchBackend primitives and ``route()`` parity with the NumPy oracle."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router.registry import get_backend  # noqa: E402
from router_cases import router_cases  # noqa: E402

pytestmark = pytest.mark.torch

E = 8

STRATEGIES = router_cases(E)


@pytest.fixture
def tb():
    return get_backend("torch")


def test_registered_and_found_by_type(tb):
    assert tb.name == "torch" and tb.framework == "torch"
    assert mr.backend_for(torch.zeros(1)) is tb


def test_stable_sort_ties_to_lower_index(tb):
    x = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0]])
    assert tb.argsort_desc(x).tolist() == [[1, 2, 4, 3, 0]]
    values, idx = tb.top_k(x, 3)
    assert idx.tolist() == [[1, 2, 4]] and values.tolist() == [[3.0, 3.0, 3.0]]
    assert idx.dtype == torch.int64


def test_one_hot_minus_one_and_bincount(tb):
    idx = torch.tensor([[0, -1], [2, 2]])
    oh = tb.one_hot(idx, 3)
    assert oh[0, 1].tolist() == [0.0, 0.0, 0.0] and oh[1, 0].tolist() == [0.0, 0.0, 1.0]
    assert tb.bincount(idx, 3).tolist() == [1, 0, 2]


def test_where_with_python_scalars(tb):
    cond = torch.tensor([True, False])
    assert tb.where(cond, 1.0, 0.0).tolist() == [1.0, 0.0]
    assert tb.where(cond, torch.tensor([5, 6]), -1).tolist() == [5, -1]


def test_random_seeded_and_generator(tb):
    like = torch.zeros(3, 4)
    assert torch.equal(tb.random_normal(7, like), tb.random_normal(7, like))
    g = torch.Generator().manual_seed(1)
    assert tb.random_uniform(g, like).shape == (3, 4)
    assert tb.random_uniform(None, like).dtype == torch.float32


def test_is_tracing_only_under_compile(tb):
    assert not tb.is_tracing(torch.zeros(1))


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_route_matches_numpy(name):
    config = STRATEGIES[name]
    rng = np.random.default_rng(3)
    T = 37
    logits = rng.normal(size=(T, config.num_choices)).astype(np.float32)
    ids = rng.integers(0, 1000, size=T)
    bias = (rng.normal(size=E) * 0.1).astype(np.float32)
    kw_np = dict(token_ids_T=ids)
    kw_t = dict(token_ids_T=torch.from_numpy(ids))
    if name == "top_k_sigmoid_groups":
        kw_np["expert_bias_E"], kw_t["expert_bias_E"] = bias, torch.from_numpy(bias)
    ref = mr.route(logits, config, **kw_np)
    out = mr.route(torch.from_numpy(logits), config, **kw_t)
    assert isinstance(out.expert_indices, torch.Tensor)
    np.testing.assert_array_equal(out.expert_indices.numpy(), ref.expert_indices)
    np.testing.assert_allclose(out.expert_weights.numpy(), ref.expert_weights, atol=1e-6)
    np.testing.assert_array_equal(out.expert_counts.numpy(), ref.expert_counts)
    assert int(out.num_dropped) == int(ref.num_dropped)
    np.testing.assert_allclose(float(out.losses.total), float(ref.losses.total), rtol=1e-5)
    np.testing.assert_array_equal(out.stats.k_histogram.numpy(), ref.stats.k_histogram)


def test_route_bf16_logits_run_in_float32():
    logits = torch.randn(5, E, dtype=torch.bfloat16)
    plan = mr.route(logits, STRATEGIES["top_k"])
    ref = mr.route(logits.float().numpy(), STRATEGIES["top_k"])
    assert plan.expert_weights.dtype == torch.float32
    np.testing.assert_array_equal(plan.expert_indices.numpy(), ref.expert_indices)


def test_route_nan_raises():
    logits = torch.randn(4, E)
    logits[1, 2] = float("nan")
    with pytest.raises(mr.InputError, match="router_logits_TE"):
        mr.route(logits, STRATEGIES["top_k"])
