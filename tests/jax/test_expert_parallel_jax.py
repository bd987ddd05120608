"""JAX expert parallelism (``backends/jax/expert_parallel.py``) against the single-device layer.

The checks need several devices, so they run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` set before jax is imported (this process
may already hold a one-device jax): this file is also the worker script (``python
test_expert_parallel_jax.py N``), which prints one JSON line of named results. One worker per device
count; each test below asserts on its share of the results, so a failure names the case.

Reference: the single-device ``moe_router.flax.apply`` on each shard's tokens separately; the
loss differentiated is the sum over shards of ``sum(y * g) + losses.total``.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from typing import Any

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

TOL = 1e-5
D, F, E = 16, 32, 8
T_SHARD = 16
TIMEOUT_S = 420


# ----- the worker ----------------------------------------------------------------------------
def _configs() -> dict[str, Any]:
    import moe_router as mr

    def mc(**router: Any) -> mr.MoEConfig:
        shared = router.pop("shared", False)
        return mr.MoEConfig(d_model=D, d_ff=F, init_std=0.3, num_shared_experts=int(shared),
                            router=mr.RouterConfig(num_experts=E, **router))

    return {
        "top_k": mc(strategy="top_k", k=2, shared=True),
        "top_p": mc(strategy="top_p", top_p=0.5),
        "capacity": mc(strategy="top_k", k=2, capacity_factor=0.5),
    }


def _close(a: Any, b: Any) -> float:
    """Largest ``|a - b| / (1 + |b|)`` over matching leaves (inf on a shape mismatch): the
    absolute error for values up to 1, the relative one above."""
    import jax
    import numpy as np

    worst = 0.0
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u.shape != v.shape:
            return float("inf")
        worst = max(worst, float(np.max(np.abs(u - v) / (1 + np.abs(v)), initial=0.0)))
    return worst


def _compare(name: str, config: Any, P: int, mesh: Any, exchange: str, x: Any, g: Any,
             params: Any, mask: Any, results: dict[str, Any]) -> None:
    import jax
    import jax.numpy as jnp

    from moe_router.flax import apply, expert_parallel_apply

    def ref_loss(params: Any) -> Any:
        total, ys, losses = 0.0, [], []
        for p in range(P):
            sl = slice(p * T_SHARD, (p + 1) * T_SHARD)
            y, plan = apply(params, x[sl], config, mask=None if mask is None else mask[sl])
            total = total + jnp.sum(y * g[sl]) + plan.losses.total
            ys.append(y)
            losses.append(plan.losses)
        stacked = jax.tree.map(lambda *v: jnp.stack(v), *losses)
        return total, (jnp.concatenate(ys), stacked)

    def ep_loss(params: Any) -> Any:
        out = expert_parallel_apply(params, x, config, mesh, "expert", exchange=exchange,
                                    mask=mask)
        return jnp.sum(out.y * g) + jnp.sum(out.losses.total), out

    (_, (y_ref, l_ref)), g_ref = jax.jit(jax.value_and_grad(ref_loss, has_aux=True))(params)
    (_, out), g_ep = jax.jit(jax.value_and_grad(ep_loss, has_aux=True))(params)
    key = f"{name}/{exchange}"
    results[f"{key}/y"] = _close(out.y, y_ref)
    results[f"{key}/losses"] = _close(out.losses, l_ref)
    results[f"{key}/mean_losses"] = _close(out.mean_losses, jax.tree.map(jnp.mean, l_ref))
    results[f"{key}/grads"] = {n: _close(g_ep[n], g_ref[n]) for n in sorted(params)}
    results[f"{key}/dropped"] = int(jnp.sum(out.num_dropped))
    results[f"{key}/unused_experts"] = int(jnp.sum(jnp.sum(out.expert_counts, axis=0) == 0))
    results[f"{key}/y_sharding"] = str(out.y.sharding.spec)


def _state_case(P: int, mesh: Any, results: dict[str, Any]) -> None:
    """Training with a stateful router (top-p controller) and expert-load counters."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import moe_router as mr
    from moe_router.flax import apply, expert_parallel_apply, init_params, init_state

    config = mr.MoEConfig(d_model=D, d_ff=F, init_std=0.3, router=mr.RouterConfig(
        num_experts=E, strategy="top_p", top_p=0.5, target_experts=2.0, use_expert_bias=True))
    params = init_params(config, jax.random.key(3))
    state = init_state(config)
    x = jnp.asarray(np.random.default_rng(5).standard_normal((P * T_SHARD, D)), jnp.float32)
    out = jax.jit(lambda p, s, x: expert_parallel_apply(p, x, config, mesh, state=s,
                                                       training=True))(params, state, x)
    refs = [apply(params, x[p * T_SHARD:(p + 1) * T_SHARD], config, state=state, training=True,
                  return_state=True)[2] for p in range(P)]
    counts = sum(np.asarray(r.observers["expert_load"]["counts"]) for r in refs)
    results["state/counts"] = _close(out.state.observers["expert_load"]["counts"], counts)
    results["state/counts_total"] = float(np.sum(counts))
    router_mean = jax.tree.map(lambda *v: np.mean(np.stack(v), axis=0), *[r.router for r in refs])
    results["state/router"] = _close(out.state.router, router_mean)
    results["state/replicated"] = all(
        leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(out.state))


def _flax_case(P: int, mesh: Any, results: dict[str, Any]) -> None:
    """``shard_layer`` + ``ep_call`` under ``nnx.jit`` / ``nnx.grad`` against ``layer(x)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from moe_router.flax import MoE, ep_call, shard_layer

    config = _configs()["top_k"]
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.standard_normal((P, T_SHARD, D)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((P, T_SHARD, D)), jnp.float32)
    ref = MoE(config, rngs=nnx.Rngs(0))
    layer = MoE(config, rngs=nnx.Rngs(0))
    shard_layer(layer, mesh, "expert")
    w_up = layer.experts.w_up
    results["flax/w_up_spec"] = str(w_up[...].sharding.spec)
    spec = nnx.get_partition_spec(nnx.state(layer))["experts"]["w_up"]
    results["flax/partition_spec"] = str(tuple(spec.get_value() if hasattr(spec, "get_value")
                                                 else spec))

    @nnx.jit
    def ep_grad(layer: MoE, x: jax.Array) -> Any:
        def loss(layer: MoE) -> Any:
            y = ep_call(layer, x, mesh, "expert")
            return jnp.sum(y * g) + P * layer.aux_loss[...], y
        return nnx.grad(loss, has_aux=True)(layer)

    @nnx.jit
    def ref_grad(layer: MoE, x: jax.Array) -> Any:
        def loss(layer: MoE) -> Any:
            total, ys = 0.0, []
            for p in range(P):
                y = layer(x[p])
                total = total + jnp.sum(y * g[p]) + layer.aux_loss[...]
                ys.append(y)
            return total, jnp.stack(ys)
        return nnx.grad(loss, has_aux=True)(layer)

    g_ep, y_ep = ep_grad(layer, x)
    g_ref, y_ref = ref_grad(ref, x)
    results["flax/y"] = _close(y_ep, y_ref)
    results["flax/grads"] = _close(nnx.state(g_ep, nnx.Param), nnx.state(g_ref, nnx.Param))


def _explicit_mesh(P: int, results: dict[str, Any]) -> None:
    """A mesh from ``jax.make_mesh`` (explicit axes in recent jax), jitted, params pre-sharded."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_router.flax import apply, expert_parallel_apply, init_params, shard_params

    mesh = jax.make_mesh((P,), ("expert",))
    config = _configs()["top_p"]
    params = init_params(config, jax.random.key(2))
    x = jnp.asarray(np.random.default_rng(9).standard_normal((P * T_SHARD, D)), jnp.float32)
    y = jax.jit(lambda p, x: expert_parallel_apply(p, x, config, mesh).y)(
        shard_params(params, mesh), x)
    ref = jnp.concatenate([apply(params, x[p * T_SHARD:(p + 1) * T_SHARD], config)[0]
                           for p in range(P)])
    results["explicit/y"] = _close(y, ref)
    results["explicit/axis_types"] = str(mesh.axis_types)


def _errors(P: int, mesh: Any, results: dict[str, Any]) -> None:
    import jax
    import jax.numpy as jnp

    import moe_router as mr
    from moe_router.errors import ConfigError, InputError
    from moe_router.flax import choose_exchange, expert_parallel_apply, init_params

    def error_of(fn: Any) -> str:
        try:
            fn()
        except Exception as err:  # noqa: BLE001
            return f"{type(err).__name__}: {err}"
        return "no error"

    config = _configs()["top_k"]
    params = init_params(config, jax.random.key(0))
    x = jnp.zeros((P * T_SHARD, D), jnp.float32)
    bad = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=P + 2, k=2))
    results["errors/indivisible"] = error_of(lambda: expert_parallel_apply(
        init_params(bad, jax.random.key(0)), x, bad, mesh))
    results["errors/bad_exchange"] = error_of(lambda: choose_exchange("ragged", mesh, "expert"))
    results["errors/bad_axis"] = error_of(lambda: expert_parallel_apply(params, x, config, mesh,
                                                                        "model"))
    results["errors/bad_tokens"] = error_of(lambda: expert_parallel_apply(
        params, x[:P * T_SHARD - 1], config, mesh))
    results["errors/types"] = [ConfigError.__name__, InputError.__name__]
    results["auto"] = choose_exchange("auto", mesh, "expert")
    results["platform"] = jax.default_backend()
    if results["platform"] == "cpu":
        results["errors/ragged_on_cpu"] = error_of(
            lambda: choose_exchange("ragged_all_to_all", mesh, "expert"))


def worker(P: int) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh

    from moe_router.flax import choose_exchange, init_params

    mesh = Mesh(np.array(jax.devices()[:P]), ("expert",))
    results: dict[str, Any] = {"devices": len(jax.devices())}
    rng = np.random.default_rng(P)
    x = jnp.asarray(rng.standard_normal((P * T_SHARD, D)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((P * T_SHARD, D)), jnp.float32)
    exchanges = ["all_gather", "ragged_emulated"]
    if choose_exchange("auto", mesh, "expert") == "ragged_all_to_all":
        exchanges.append("ragged_all_to_all")
    for name, config in _configs().items():
        params = init_params(config, jax.random.key(1))
        for exchange in exchanges:
            _compare(name, config, P, mesh, exchange, x, g, params, None, results)
    # a shard with only padding (mask 0), and experts no token of a shard routes to
    mask = jnp.ones((P * T_SHARD,), jnp.float32).at[:T_SHARD].set(0.0)
    config = _configs()["top_k"]
    params = init_params(config, jax.random.key(1))
    # feature 0 is a constant 1 whose router weight pushes half of the experts 30 logits down
    x1 = x.at[:, 0].set(1.0)
    params["router.weight"] = params["router.weight"].at[0, E // 2:].add(-30.0)
    for exchange in exchanges:
        _compare("masked", config, P, mesh, exchange, x1, g, params, mask, results)
    _state_case(P, mesh, results)
    _flax_case(P, mesh, results)
    _explicit_mesh(P, results)
    _errors(P, mesh, results)
    return results


# ----- the tests -----------------------------------------------------------------------------
@functools.cache
def _run(P: int) -> dict[str, Any]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={P}",
           "JAX_PLATFORMS": "cpu"}
    try:
        proc = subprocess.run([sys.executable, __file__, str(P)], capture_output=True, text=True,
                              timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {P}-device worker took over {TIMEOUT_S} s")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode or not lines:
        pytest.fail(f"the {P}-device worker failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1])  # type: ignore[no-any-return]


DEVICES = pytest.mark.parametrize("P", [4, 8])
CASES = pytest.mark.parametrize("case", ["top_k", "top_p", "capacity", "masked"])
EXCHANGES = pytest.mark.parametrize("exchange", ["all_gather", "ragged_emulated"])


@DEVICES
@CASES
@EXCHANGES
def test_matches_per_shard_reference(P: int, case: str, exchange: str) -> None:
    r = _run(P)
    key = f"{case}/{exchange}"
    assert r[f"{key}/y"] < TOL, r[f"{key}/y"]
    assert r[f"{key}/losses"] < TOL
    assert r[f"{key}/mean_losses"] < TOL
    bad = {n: d for n, d in r[f"{key}/grads"].items() if not d < TOL}
    assert not bad, f"gradients differ: {bad}"
    assert r[f"{key}/y_sharding"] in ("PartitionSpec('expert',)", "P('expert',)")
    if case == "masked":
        assert r[f"{key}/unused_experts"] == E // 2, "half of the experts should get no token"
    if case == "capacity":
        assert r[f"{key}/dropped"] > 0, "the capacity case should drop slots"


@DEVICES
def test_state_synced_across_devices(P: int) -> None:
    r = _run(P)
    assert r["state/counts_total"] > 0
    assert r["state/counts"] < TOL
    assert r["state/router"] < TOL
    assert r["state/replicated"]


@DEVICES
def test_flax_shard_layer_and_ep_call(P: int) -> None:
    r = _run(P)
    assert r["flax/w_up_spec"] in ("PartitionSpec('expert',)", "P('expert',)")
    assert r["flax/partition_spec"] == "('expert', None, None)"
    assert r["flax/y"] < TOL
    assert r["flax/grads"] < TOL


@DEVICES
def test_mesh_from_make_mesh(P: int) -> None:
    r = _run(P)
    assert r["explicit/y"] < TOL, r["explicit/axis_types"]


@DEVICES
def test_typed_errors_and_auto(P: int) -> None:
    r = _run(P)
    assert r["errors/indivisible"].startswith("ConfigError: num_experts=")
    assert r["errors/bad_exchange"].startswith("ConfigError: exchange='ragged'")
    assert r["errors/bad_axis"].startswith("InputError: axis:")
    assert r["errors/bad_tokens"].startswith("InputError: x:")
    if r["platform"] == "cpu":  # XLA:CPU has no ragged-all-to-all (jax 0.10)
        assert r["auto"] == "all_gather"
        assert r["errors/ragged_on_cpu"].startswith("ConfigError: exchange='ragged_all_to_all'")


if __name__ == "__main__":
    print(json.dumps(worker(int(sys.argv[1]))))
