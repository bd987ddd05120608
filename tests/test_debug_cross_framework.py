"""The debugger's statistics are the same on PyTorch, Flax and Keras: two MoE layers from the same
weights, several steps in training and evaluation mode (with a padding mask, capacity drops and
the top-p controller moving), then the session records are compared field by field."""

from __future__ import annotations

import numpy as np
import pytest

import moe_router as mr
from moe_router.debug import MoEAnalyzer, MoEDebugger, TraceConfig
from moe_router.weights import init_weights

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("tensorflow")

pytestmark = [pytest.mark.torch, pytest.mark.jax, pytest.mark.tensorflow]

D, F, E, B, S = 16, 32, 8, 2, 12
CONFIG = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(
    num_experts=E, strategy="top_p", top_p=0.5, target_experts=1.6, max_experts=4,
    controller_rate=0.05, capacity_factor=1.0))
INTS = ("calls", "tokens", "expert_tokens", "dropped", "k_hist")
FLOATS = ("entropy_sum", "top1_sum", "z_loss_sum", "balance_sum", "aux_loss_sum")


def _weights(seed: int) -> dict[str, np.ndarray]:
    w = init_weights(CONFIG, seed=seed)
    w["router.weight"] = w["router.weight"] * 30.0  # decisive router: no float32 near-ties
    return w


def _model(framework: str):
    """(container for the debugger, [layer, layer], call(layer, x, mask, training))."""
    ws = [_weights(7), _weights(8)]
    if framework == "torch":
        import torch

        from moe_router.torch import MoE

        layers = [MoE.from_weights(CONFIG, w) for w in ws]

        def call(layer, x, mask, training):
            layer.train(training)
            return layer(torch.from_numpy(x), mask=torch.from_numpy(mask)).detach().numpy()

        return torch.nn.ModuleList(layers), layers, call
    if framework == "flax":
        import jax.numpy as jnp
        from flax import nnx

        from moe_router.flax import MoE

        class Pair(nnx.Module):
            def __init__(self) -> None:
                self.layers = nnx.List([MoE.from_weights(CONFIG, w) for w in ws])

        pair = Pair()

        def call(layer, x, mask, training):
            return np.asarray(layer(jnp.asarray(x), mask=jnp.asarray(mask), training=training))

        return pair, list(pair.layers), call
    import keras
    import tensorflow as tf

    from moe_router.keras import MoE

    layers = [MoE.from_weights(CONFIG, w, name=f"moe_{i}") for i, w in enumerate(ws)]

    def call(layer, x, mask, training):
        return np.asarray(layer(tf.constant(x), mask=tf.constant(mask), training=training))

    return keras.Sequential([keras.Input((S, D)), *layers]), layers, call


def _session(framework: str) -> dict:
    container, layers, call = _model(framework)
    debugger = MoEDebugger(container, trace=TraceConfig(capacity=16, tokens_per_call=6))
    rng = np.random.default_rng(0)
    with debugger.session("same"):
        for step in range(4):
            training = step % 2 == 0
            x = rng.standard_normal((B, S, D)).astype(np.float32)
            mask = (rng.random((B, S)) > 0.25)
            h = x
            for layer in layers:
                h = h + call(layer, h, mask, training)
            debugger.step()
    return debugger.to_session()


def test_the_three_frameworks_give_the_same_statistics():
    records = {fw: _session(fw) for fw in ("torch", "flax", "keras")}
    ref = records["torch"]
    assert sum(ref["totals"]["train"][0]["expert_tokens"]) > 0
    assert sum(layer["dropped"] for layer in ref["totals"]["train"]) > 0  # capacity dropped
    assert ref["digest"]["weights"] == records["flax"]["digest"]["weights"]
    for framework in ("flax", "keras"):
        got = records[framework]
        assert len(got["layers"]) == 2 and got["framework"] != ref["framework"]
        for mode in ("train", "eval"):
            for i in range(2):
                a, b = ref["totals"][mode][i], got["totals"][mode][i]
                assert {f: a[f] for f in INTS} == {f: b[f] for f in INTS}, (framework, mode, i)
                for f in FLOATS:
                    np.testing.assert_allclose(b[f], a[f], rtol=1e-4, atol=1e-5,
                                               err_msg=f"{framework} {mode} layer {i} {f}")
        assert [s["mode"] for s in got["steps"]] == [s["mode"] for s in ref["steps"]]
        for sa, sb in zip(ref["steps"], got["steps"], strict=True):
            assert [la["expert_tokens"] for la in sa["layers"]] == \
                [lb["expert_tokens"] for lb in sb["layers"]]
        assert [{k: v for k, v in r.items() if k != "weights"} for r in got["trace"]] == \
            [{k: v for k, v in r.items() if k != "weights"} for r in ref["trace"]]
        np.testing.assert_allclose(MoEAnalyzer(got).utilization(),
                                   MoEAnalyzer(ref).utilization(), atol=1e-12)
