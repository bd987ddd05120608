"""One training scenario through the PyTorch, Flax and Keras layers from the same weights.

Training-mode forwards (no optimizer) exercise the top-p controller, the aux-free bias updates
and capacity drops; then each layer's export is imported into the other two frameworks. Outputs
and states must agree within 1e-5 everywhere: the layers share one step, so they must also share
every decision and every state update.
"""

from __future__ import annotations

import numpy as np
import pytest

import moe_router as mr
from moe_router.weights import init_weights

pytest.importorskip("torch")
pytest.importorskip("jax")
pytest.importorskip("tensorflow")

pytestmark = [pytest.mark.torch, pytest.mark.jax, pytest.mark.tensorflow]

D, F, E, T = 16, 32, 8, 24
ATOL = 1e-5
FRAMEWORKS = ("torch", "flax", "keras")


def config() -> mr.MoEConfig:
    router = mr.RouterConfig(num_experts=E, strategy="top_p", top_p=0.5, target_experts=1.6,
                             max_experts=4, controller_rate=0.05, use_expert_bias=True,
                             bias_update_rate=0.01, capacity_factor=1.0)
    return mr.MoEConfig(d_model=D, d_ff=F, router=router, num_shared_experts=1)


def weights() -> dict[str, np.ndarray]:
    w = init_weights(config(), seed=7)
    w["router.weight"] = w["router.weight"] * 30.0  # decisive router: no float32 near-ties
    return w


def build(framework: str, w: dict[str, np.ndarray]):
    if framework == "torch":
        from moe_router.torch import MoE

        return MoE.from_weights(config(), w)
    if framework == "flax":
        from moe_router.flax import MoE

        return MoE.from_weights(config(), w)
    from moe_router.keras import MoE

    return MoE.from_weights(config(), w)


def call(framework: str, layer, x: np.ndarray, training: bool) -> tuple[np.ndarray, object]:
    if framework == "torch":
        import torch

        layer.train(training)
        y, plan = layer(torch.from_numpy(x), return_plan=True)
        return y.detach().numpy(), plan
    if framework == "flax":
        import jax.numpy as jnp

        y, plan = layer(jnp.asarray(x), training=training, return_plan=True)
        return np.asarray(y), plan
    import tensorflow as tf

    y, plan = layer(tf.constant(x), training=training, return_plan=True)
    return np.asarray(y), plan


def inputs(step: int) -> np.ndarray:
    return np.random.default_rng(100 + step).standard_normal((2, T // 2, D)).astype(np.float32)


def assert_states_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> None:
    assert set(a) == set(b), what
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=ATOL, rtol=0, err_msg=f"{what}: {name}")


def test_training_scenario_then_export_import_everywhere() -> None:
    w = weights()
    layers = {fw: build(fw, w) for fw in FRAMEWORKS}
    dropped = 0
    for step in range(4):
        x = inputs(step)
        outs = {fw: call(fw, layer, x, training=True) for fw, layer in layers.items()}
        y_ref, plan_ref = outs["torch"]
        dropped += int(np.asarray(plan_ref.num_dropped))
        for fw in ("flax", "keras"):
            np.testing.assert_allclose(outs[fw][0], y_ref, atol=ATOL, rtol=0,
                                       err_msg=f"{fw} step {step}")
            np.testing.assert_array_equal(np.asarray(outs[fw][1].expert_indices),
                                          plan_ref.expert_indices.numpy())
        if step % 2 == 1:
            for layer in layers.values():
                layer.update_expert_bias()
        states = {fw: layer.export_state() for fw, layer in layers.items()}
        for fw in ("flax", "keras"):
            assert_states_close(states[fw], states["torch"], f"{fw} state after step {step}")
    assert dropped > 0, "the scenario must exercise capacity drops"
    assert float(layers["torch"].router_state.top_p) != pytest.approx(0.5), \
        "the scenario must move the top-p controller"
    assert np.abs(layers["torch"].export_weights()["router.expert_bias"]).max() > 0

    x = inputs(99)
    for source in FRAMEWORKS:
        exported = layers[source].export_weights()
        y_src, _ = call(source, layers[source], x, training=False)
        for target in FRAMEWORKS:
            if target == source:
                continue
            moved = build(target, exported)
            y, _ = call(target, moved, x, training=False)
            np.testing.assert_allclose(y, y_src, atol=ATOL, rtol=0,
                                       err_msg=f"{source} -> {target}")
            state = {k: v for k, v in moved.export_state().items()
                     if not k.startswith("observers.")}
            ref = {k: v for k, v in layers[source].export_state().items()
                   if not k.startswith("observers.")}
            assert_states_close(state, ref, f"{source} -> {target}")


def test_public_surfaces_agree() -> None:
    """The three layers expose the same public API (methods and properties)."""
    from moe_router import flax as mflax
    from moe_router import keras as mkeras
    from moe_router import torch as mtorch

    expected = {"config", "export_weights", "import_weights", "from_weights", "router_state",
                "reset_router_state", "layer_state", "export_state", "update_expert_bias",
                "calibrating"}
    layers = {fw: build(fw, weights()) for fw in FRAMEWORKS}
    for fw, layer in layers.items():
        missing = {name for name in expected if not hasattr(layer, name)}
        assert not missing, f"{fw} layer lacks {sorted(missing)}"
        assert layer.config == config()
        assert isinstance(layer.router_state, mr.RouterState)
    for module in (mtorch, mflax, mkeras):
        for name in ("MoE", "moe_layers", "total_aux_loss", "calibrate"):
            assert hasattr(module, name), f"{module.__name__} lacks {name}"
    assert not hasattr(layers["keras"], "load_weights_dict")
    assert not hasattr(layers["keras"], "moe_config")
    counts = {fw: np.asarray(layer.export_state()["observers.expert_load.counts"]).dtype
              for fw, layer in layers.items()}
    assert set(counts.values()) == {np.dtype(np.int32)}, counts


@pytest.mark.parametrize("framework,foreign", [("torch", "tensorflow:split"),
                                               ("flax", "torch:grouped_mm"),
                                               ("keras", "jax:tiles")])
def test_a_layer_refuses_another_frameworks_kernel(framework: str, foreign: str) -> None:
    import dataclasses

    bad = dataclasses.replace(config(), dispatch=foreign)
    with pytest.raises(mr.ConfigError, match="dispatch="):
        if framework == "torch":
            from moe_router.torch import MoE

            MoE(bad)
        elif framework == "flax":
            from flax import nnx

            from moe_router.flax import MoE

            MoE(bad, rngs=nnx.Rngs(0))
        else:
            from moe_router.keras import MoE

            MoE(bad)
