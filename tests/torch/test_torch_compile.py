"""``torch.compile(layer, fullgraph=True)``: no graph breaks, backward works, no recompilation.

The default tests use the ``aot_eager`` backend (Dynamo capture + AOTAutograd, which is where
graph breaks and recompilations come from) to stay fast on a 2-core CPU; the inductor run is
marked ``slow``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router.weights import init_weights, param_shapes, reference_forward  # noqa: E402
from moe_router_backends.torch.layers import MoE  # noqa: E402

pytestmark = pytest.mark.torch

CONFIGS = {
    "top_k": mr.RouterConfig(num_experts=4, k=2),
    "top_p": mr.RouterConfig(num_experts=4, strategy="top_p", top_p=0.5, max_experts=3,
                             target_experts=2.5),
    "null": mr.RouterConfig(num_experts=4, k=2, num_null_experts=2),
    "expert_bias": mr.RouterConfig(num_experts=4, k=2, use_expert_bias=True),
}


def _layer(name: str, train: bool):
    config = mr.MoEConfig(d_model=16, d_ff=24, router=CONFIGS[name])
    params = param_shapes(config)
    weights = {k: v * 20.0 if k in params else v for k, v in init_weights(config, 0).items()}
    return config, weights, MoE.from_weights(config, weights).train(train)


def _run(name: str, train: bool, backend: str = "aot_eager"):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    config, weights, layer = _layer(name, train)
    counter = CompileCounterWithBackend(backend)
    compiled = torch.compile(layer, fullgraph=True, backend=counter)
    rng = np.random.default_rng(0)
    for _ in range(2):  # same shapes twice
        x_np = rng.normal(size=(2, 5, 16)).astype(np.float32)
        x = torch.from_numpy(x_np).requires_grad_()
        weights = layer.export_weights()  # the state before this call
        y = compiled(x)
        (y.square().sum() + layer.aux_loss).backward()
        assert x.grad is not None and layer.router.weight.grad.abs().sum() > 0
        assert layer.experts.w_down.grad.abs().sum() > 0
        if not train:
            ref, _ = reference_forward(x_np, weights, config)
            np.testing.assert_allclose(y.detach().numpy(), ref, atol=2e-5, rtol=1e-4)
    assert counter.frame_count == 1, f"recompiled: {counter.frame_count} frames"
    return layer


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fullgraph_forward_backward_no_recompile(name, train):
    layer = _run(name, train)
    if name == "top_p" and train:  # the controller state buffer moved inside the graph
        assert float(layer.router_state.top_p) > 0.5
    if name == "expert_bias":  # the expert_load observer counted inside the graph
        counts = layer.export_state()["observers.expert_load.counts"]
        assert counts.dtype == np.int32
        assert int(counts.sum()) == (2 * 2 * 5 * 2 if train else 0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["top_k", "top_p"])
def test_fullgraph_inductor(name):
    _run(name, True, backend="inductor")
