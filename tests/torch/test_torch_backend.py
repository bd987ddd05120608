"""What only PyTorch has: ``torch.compile(fullgraph=True)`` tracing of the primitives and of
``route()``, bfloat16 logits, generator conventions, device placement and autograd details.

Everything the backends share (each primitive and ``route()`` against NumPy, ties, dtypes) is in
tests/test_conformance.py.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from router_cases import assert_same_plan, case_inputs, case_table, plan_fields  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.registry import get_backend  # noqa: E402

pytestmark = pytest.mark.torch

CASES = case_table(8)


@pytest.fixture
def tb():
    return get_backend("torch")


def _compiled(fn):
    """fullgraph capture with the cheap ``aot_eager`` backend (graph breaks fail here)."""
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def test_primitives_trace_under_compile_fullgraph(tb):
    rng = np.random.default_rng(0)
    perm = torch.from_numpy(rng.permutation(300))
    keys = torch.from_numpy(rng.integers(0, 4, size=(5, 37)))
    x = torch.from_numpy((rng.normal(size=(5, 37)) * 4).astype(np.float32))

    def primitives(perm, keys, x):
        return (tb.invert_permutation(perm), tb.argsort(keys), tb.argsort_desc(x),
                tb.gelu(x), tb.silu(x), tb.relu(x), tb.sigmoid(x), tb.softmax(x),
                tb.stop_gradient(x), tb.cast_like(keys, x), tb.cast(keys, "int32"),
                tb.full((2,), 3, "int32", like=x))

    for got, want in zip(_compiled(primitives)(perm, keys, x), primitives(perm, keys, x),
                         strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("names", [("top_p", "capacity_prob"), ("expert_choice", "hash")])
def test_route_traces_under_compile_fullgraph(tb, names):
    inputs = {name: case_inputs(CASES[name], 24, seed=3) for name in names}

    def route_all(tensors):
        return {name: plan_fields(mr.route(tensors[name][0], CASES[name].config,
                                           **tensors[name][1])) for name in names}

    tensors = {name: (torch.from_numpy(logits), {k: torch.from_numpy(v)
                                                 for k, v in extra.items()})
               for name, (logits, extra) in inputs.items()}
    route_all(tensors)  # eager first: the registry imports a strategy on its first use
    out = _compiled(route_all)(tensors)
    for name, (logits, extra) in inputs.items():
        assert_same_plan(tb, out[name], mr.route(logits, CASES[name].config, **extra))


def test_bf16_logits_are_routed_in_float32():
    logits = torch.randn(5, 8, dtype=torch.bfloat16)
    config = CASES["top_k"].config
    plan = mr.route(logits, config)
    assert plan.expert_weights.dtype == torch.float32
    ref = mr.route(logits.float().numpy(), config)
    np.testing.assert_array_equal(plan.expert_indices.numpy(), ref.expert_indices)


def test_random_generator_seed_or_global(tb):
    like = torch.zeros(3, 4)
    assert torch.equal(tb.random_normal(7, like), tb.random_normal(7, like))
    g = torch.Generator().manual_seed(1)
    first, second = tb.random_uniform(g, like), tb.random_uniform(g, like)
    assert first.shape == (3, 4) and not torch.equal(first, second)  # the generator advances
    assert tb.random_uniform(None, like).dtype == torch.float32
    with pytest.raises(TypeError, match="rng"):
        tb.random_uniform("seed", like)


def test_stop_gradient_detaches_and_sigmoid_gradients_stay_finite(tb):
    x = torch.tensor([-200.0, -30.0, 0.0, 1.0, 200.0], requires_grad=True)
    assert not tb.stop_gradient(x).requires_grad
    tb.sigmoid(x).sum().backward()
    s = torch.sigmoid(x.detach())
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad, s * (1 - s))


def test_is_host_on_cpu(tb):
    assert tb.is_host(torch.zeros(2))


@pytest.mark.gpu
def test_is_host_false_on_cuda(tb):
    x = torch.zeros(2, device="cuda")
    assert not tb.is_host(x)
    assert tb.is_host(tb.to_numpy(x)) is not None  # to_numpy copies to the host
