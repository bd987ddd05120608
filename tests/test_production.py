"""The production router: every constructor, the older ``production.json`` layout (mapped and
refused keys), estimator names, ``MOE_*`` variables, ``route`` from every framework, metrics,
health without side effects, and thread safety against serial calls."""

from __future__ import annotations

import copy
import json
import logging
import re
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moe_router as mr
from moe_router.envvars import UnknownEnvironmentWarning, env_table, unknown_env_variables
from moe_router.production import (
    ProductionRouter,
    ProductionSettings,
    RouterFactory,
    RouterSpec,
    spec_from_mapping,
)

ROOT = Path(__file__).resolve().parent.parent

#: the older router's documented production.json, as its users have it
LEGACY: dict[str, Any] = {
    "router_config": {"input_dim": 32, "num_experts": 8, "min_experts": 1, "max_experts": 4,
                      "complexity_estimator": "gradient_norm", "routing_strategy": "top_k",
                      "load_balancing": True, "noise_factor": 0.1},
    "performance": {"enable_caching": True, "enable_monitoring": True, "cache_size": 1000,
                    "parallel_threshold": 100},
    "security": {"enable_validation": True, "max_tensor_size": 100_000, "max_batch_size": 16},
}


def hidden(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Tokens whose norms spread over a decade (so ``hidden_norm`` has something to rank)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=shape).astype(np.float32)
    scale = np.exp(rng.uniform(-1.2, 1.2, size=(*shape[:-1], 1))).astype(np.float32)
    return x * scale


def write(tmp_path: Path, data: dict[str, Any], name: str = "production.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


# ----- constructors ------------------------------------------------------------------------------
def test_inference_preset_routes_per_token_independent_of_the_batch() -> None:
    router = RouterFactory.create_optimized_for_inference(d_model=32)
    assert router.config.strategy == "top_p" and router.config.causal
    x = hidden((24, 32))
    whole = router.route(x).plan
    for i in (0, 7, 23):  # a token routed alone gets what it got inside the batch
        alone = router.route(x[i:i + 1]).plan
        np.testing.assert_array_equal(alone.expert_indices[0], whole.expert_indices[i])
    k = np.asarray(whole.num_experts_per_token)
    assert k.min() >= 1 and k.max() <= 3


def test_training_preset_targets_two_experts_and_trains_with_losses() -> None:
    router = RouterFactory.create_optimized_for_training(d_model=16)
    c = router.config
    assert (c.num_experts, c.target_experts, c.max_experts) == (16, 2.0, 4)
    assert c.aux_loss_coef > 0 and c.z_loss_coef > 0
    result = router.route(hidden((2, 8, 16)), training=True)
    assert float(result.plan.losses.total) > 0
    assert router.debugger.get_routing_stats("train")["overall"]["tokens"] == 16


def test_presets_take_changes_and_reject_bad_ones() -> None:
    router = RouterFactory.create_optimized_for_inference(d_model=8, num_experts=4, top_p=0.7)
    assert (router.config.num_experts, router.config.top_p) == (4, 0.7)
    with pytest.raises(mr.ConfigError, match="top_p"):
        RouterFactory.create_optimized_for_inference(d_model=8, top_p=1.5)
    with pytest.raises(mr.ConfigError, match="d_model"):
        RouterFactory.create_optimized_for_inference(d_model=0)


def test_create_from_environment_reads_router_production_and_legacy_variables(
        caplog: pytest.LogCaptureFixture) -> None:
    env = {"MOE_INPUT_DIM": "24", "MOE_NUM_EXPERTS": "6", "MOE_ROUTING_STRATEGY": "complexity",
           "MOE_MIN_EXPERTS": "1", "MOE_MAX_EXPERTS": "3",
           "MOE_COMPLEXITY_ESTIMATOR": "perplexity_proxy", "MOE_MAX_BATCH_SIZE": "5",
           "MOE_ENABLE_VALIDATION": "false", "MOE_ENABLE_CACHING": "true"}
    with caplog.at_level(logging.INFO, logger="moe_router"):
        router = RouterFactory.create_from_environment(env)
    assert router.d_model == 24 and router.config.num_experts == 6
    assert router.config.complexity_estimator == "router_entropy"
    assert router.config.nan_policy == "ignore" and router.settings.max_batch_size == 5
    text = caplog.text
    assert "perplexity_proxy" in text and "$MOE_ENABLE_CACHING is ignored" in text
    with pytest.raises(mr.InputError, match="max_batch_size=5"):
        router.route(hidden((6, 2, 24)))


def test_create_from_environment_defaults_and_bad_values() -> None:
    router = RouterFactory.create_from_environment({})
    assert (router.d_model, router.config.num_experts, router.config.strategy) == (768, 8,
                                                                                  "top_k")
    with pytest.raises(mr.ConfigError, match="MOE_MAX_BATCH_SIZE"):
        RouterFactory.create_from_environment({"MOE_MAX_BATCH_SIZE": "many"})
    with pytest.raises(mr.ConfigError, match="MOE_INPUT_DIM"):
        RouterFactory.create_from_environment({"MOE_INPUT_DIM": "12", "MOE_D_MODEL": "13"})


def test_create_from_layer_routes_like_the_layer() -> None:
    torch = pytest.importorskip("torch")
    from moe_router.torch import MoE

    config = mr.MoEConfig(d_model=16, d_ff=32, router=mr.RouterConfig(
        num_experts=6, strategy="top_p", top_p=0.5, max_experts=3))
    torch.manual_seed(0)
    layer = MoE(config).eval()
    x = torch.from_numpy(hidden((3, 5, 16)))
    _, plan = layer(x, return_plan=True)
    router = RouterFactory.create_from_layer(layer)
    routed = router.route(x)
    np.testing.assert_array_equal(routed.plan.expert_indices.numpy(), plan.expert_indices.numpy())
    np.testing.assert_allclose(routed.plan.expert_weights.numpy(),
                               plan.expert_weights.detach().numpy(), rtol=1e-5, atol=1e-6)
    with pytest.raises(mr.InputError, match="layer"):
        RouterFactory.create_from_layer(object())


# ----- the older production.json ----------------------------------------------------------------
def test_legacy_file_maps_every_key(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="moe_router"):
        router = RouterFactory.create_from_config_file(write(tmp_path, LEGACY))
    c, s = router.config, router.settings
    assert router.d_model == 32
    assert (c.num_experts, c.min_experts, c.max_experts) == (8, 1, 4)
    assert (c.strategy, c.complexity_estimator) == ("complexity", "hidden_norm")
    assert (c.aux_loss_coef, c.noise, c.noise_std, c.nan_policy) == (0.01, "normal", 0.1,
                                                                     "raise")
    assert (s.enable_monitoring, s.max_tensor_size, s.max_batch_size) == (True, 100_000, 16)
    ignored = [r for r in caplog.records if " is ignored: " in r.getMessage()]
    assert sorted(r.getMessage().split(": ")[1].split()[0] for r in ignored) == [
        "performance.cache_size", "performance.enable_caching", "performance.parallel_threshold"]
    assert all(r.levelno == logging.WARNING for r in ignored)
    for key in ("gradient_norm", "routing_strategy='top_k'", "load_balancing", "noise_factor"):
        assert key in caplog.text


def test_legacy_file_really_varies_k_within_min_and_max(tmp_path: Path) -> None:
    router = RouterFactory.create_from_config_file(write(tmp_path, LEGACY))
    k = np.asarray(router.route(hidden((8, 64, 32))).plan.num_experts_per_token)
    assert k.min() == 1 and k.max() == 4
    assert len(np.unique(k)) == 4  # every k in [min, max] is used
    info = router.route(hidden((4, 32, 32), seed=1)).routing_info
    assert 1 < info["mean_experts"] < 4 and info["flops_vs_static"] == info["mean_experts"] / 2


@pytest.mark.parametrize(("section", "key", "named"), [
    ("router_config", "routing_stratgy", "router_config.routing_stratgy"),
    ("performance", "enable_gpu", "performance.enable_gpu"),
    ("security", "rate_limit", "security.rate_limit"),
    (None, "logging", "logging"),
])
def test_legacy_file_refuses_undocumented_keys(tmp_path: Path, section: str | None, key: str,
                                               named: str) -> None:
    data = copy.deepcopy(LEGACY)
    (data[section] if section else data)[key] = 1
    with pytest.raises(mr.ConfigError) as err:
        RouterFactory.create_from_config_file(write(tmp_path, data))
    assert err.value.field == named
    assert "documented" in str(err.value)


def test_legacy_file_bad_values_name_their_key(tmp_path: Path) -> None:
    for section, key, value in (("router_config", "load_balancing", "yes"),
                                ("router_config", "noise_factor", 2.0),
                                ("router_config", "input_dim", 0),
                                ("security", "enable_validation", 1),
                                ("security", "max_batch_size", -1)):
        data = copy.deepcopy(LEGACY)
        data[section][key] = value
        with pytest.raises(mr.ConfigError, match=key):
            spec_from_mapping(data)
    data = copy.deepcopy(LEGACY)
    del data["router_config"]["input_dim"]
    with pytest.raises(mr.ConfigError, match="input_dim"):
        spec_from_mapping(data)
    with pytest.raises(mr.ConfigError, match="valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        RouterFactory.create_from_config_file(tmp_path / "bad.json")


def test_our_fields_stand_beside_the_older_ones(tmp_path: Path) -> None:
    data = {"d_model": 16, "router_config": {"num_experts": 4, "strategy": "top_p", "top_p": 0.6,
                                             "max_experts": 3},
            "production": {"static_k": 1, "seed": 3}}
    router = RouterFactory.create_from_config_file(write(tmp_path, data), top_p=0.5)
    assert (router.config.strategy, router.config.top_p, router.static_k) == ("top_p", 0.5, 1)


def test_old_estimator_names_refused_with_the_real_alternative() -> None:
    for old, real in (("gradient_norm", "hidden_norm"), ("perplexity_proxy", "router_entropy")):
        with pytest.raises(mr.ConfigError, match=f"use '{real}'"):
            mr.RouterConfig(num_experts=4, strategy="complexity", complexity_estimator=old,
                            max_experts=2)


# ----- the environment table ---------------------------------------------------------------------
def test_misspelled_variable_is_reported_with_the_real_name() -> None:
    env = {"MOE_NUM_EXPRTS": "4", "MOE_NUM_EXPERTS": "4"}
    assert unknown_env_variables(env) == {"MOE_NUM_EXPRTS": "MOE_NUM_EXPERTS"}
    with pytest.warns(UnknownEnvironmentWarning, match=r"did you mean \$MOE_NUM_EXPERTS"):
        mr.RouterConfig.from_env(env)
    with pytest.warns(UnknownEnvironmentWarning, match="MOE_NUM_EXPRTS"):
        RouterFactory.create_from_environment({**env, "MOE_INPUT_DIM": "8"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mr.RouterConfig.from_env({"MOE_NUM_EXPERTS": "4"})  # nothing to report


def test_every_moe_variable_the_code_reads_is_in_the_table() -> None:
    read = set()
    pattern = re.compile(r"""(?:environ(?:\.get)?\(?\[?|getenv\(|setdefault\()"""
                         r"""\s*["'](MOE_[A-Z0-9_]+)""")
    for folder in ("moe_router", "backends", "scripts", "benchmarks", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            read.update(pattern.findall(path.read_text()))
    read.update(re.findall(r"\$?(MOE_[A-Z0-9_]+)", (ROOT / ".ci" / "run").read_text()))
    assert read, "the scan found no variable: the pattern is broken"
    table = {row.name for row in env_table()}
    assert read - table == set()


def test_info_lists_the_whole_table(capsys: pytest.CaptureFixture[str]) -> None:
    from moe_router import cli

    assert cli.main(["info", "--json"]) == 0
    listed = {row["name"] for row in json.loads(capsys.readouterr().out)["environment"]}
    assert listed == {row.name for row in env_table()}
    assert {"MOE_MAX_BATCH_SIZE", "MOE_ENABLE_CACHING", "MOE_TOP_K"} <= listed


# ----- route -----------------------------------------------------------------------------------
def _numpy_router() -> ProductionRouter:
    config = mr.RouterConfig(num_experts=8, strategy="top_p", top_p=0.5, max_experts=4)
    return ProductionRouter(RouterSpec(config, 16))


def test_route_accepts_bsd_and_td_with_routing_info() -> None:
    router = _numpy_router()
    x = hidden((3, 7, 16))
    bsd = router.route(x)
    td = router.route(x.reshape(21, 16))
    np.testing.assert_array_equal(bsd.plan.expert_indices, td.plan.expert_indices)
    assert bsd.expert_indices.shape == (3, 7, 4) and td.expert_indices.shape == (21, 4)
    info = bsd.routing_info
    k = np.asarray(bsd.plan.num_experts_per_token)
    assert info["mean_experts"] == pytest.approx(k.mean())
    assert info["flops_vs_static"] == pytest.approx(k.mean() / 2)
    assert info["flops_vs_dense"] == pytest.approx(k.mean() / 8)
    assert sum(info["expert_utilization"]) == pytest.approx(1.0)
    assert info["tokens"] == 21 and info["num_dropped"] == 0


@pytest.mark.parametrize("framework", ["torch", "jax", "tensorflow"])
def test_route_from_every_framework_equals_numpy(framework: str) -> None:
    pytest.importorskip(framework)
    router = _numpy_router()
    x = hidden((2, 9, 16), seed=4)
    if framework == "torch":
        import torch

        array = torch.from_numpy(x)
    elif framework == "jax":
        import jax.numpy as jnp

        array = jnp.asarray(x)
    else:
        import tensorflow as tf

        array = tf.constant(x)
    expected = router.route(x)
    got = router.route(array)
    ids = np.asarray(mr.backend_for(got.plan.expert_indices).to_numpy(got.plan.expert_indices))
    np.testing.assert_array_equal(ids, expected.plan.expert_indices)
    assert type(got.plan.expert_indices).__module__.split(".")[0] in (framework, "jaxlib")
    assert got.routing_info["mean_experts"] == pytest.approx(expected.routing_info["mean_experts"])


def test_route_rejects_bad_inputs_by_name_and_counts_them() -> None:
    router = ProductionRouter(RouterSpec(mr.RouterConfig(num_experts=4), 8,
                                         ProductionSettings(max_batch_size=4,
                                                            max_tensor_size=200)))
    cases = [(np.zeros((2, 9), np.float32), mr.InputError, r"\(T, 8\)"),
             (np.zeros((2, 2, 2, 8), np.float32), mr.InputError, "B, S, 8"),
             (np.zeros((2, 8), np.int32), mr.InputTypeError, "floating"),
             ([[0.0] * 8], mr.InputTypeError, "list"),
             (np.zeros((5, 8), np.float32), mr.InputError, "max_batch_size=4"),
             (np.zeros((3, 9, 8), np.float32), mr.InputError, "max_tensor_size=200"),
             (np.full((2, 8), np.nan, np.float32), mr.InputError, "NaN")]
    for x, error, message in cases:
        with pytest.raises(error, match=message) as info:
            router.route(x)
        assert info.value.argument == "hidden_states"
    metrics = router.get_metrics()
    assert (metrics["requests"], metrics["errors"], metrics["rejected"]) == (7, 7, 7)


def test_router_weights_from_files(tmp_path: Path) -> None:
    config = mr.RouterConfig(num_experts=4)
    weight = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    np.save(tmp_path / "w.npy", weight)
    np.savez(tmp_path / "w.npz", **{"router.weight": weight, "other": np.zeros(3)})
    np.save(tmp_path / "wt.npy", weight.T)  # (E, D), as a torch Linear keeps it
    x = hidden((5, 8))
    expected = ProductionRouter(RouterSpec(config, 8), weight).route(x).plan.expert_indices
    for name in ("w.npy", "w.npz", "wt.npy"):
        settings = ProductionSettings(weights_path=str(tmp_path / name))
        got = ProductionRouter(RouterSpec(config, 8, settings)).route(x).plan.expert_indices
        np.testing.assert_array_equal(got, expected)
    env = {"MOE_ROUTER_WEIGHTS": str(tmp_path / "w.npz"), "MOE_INPUT_DIM": "8",
           "MOE_NUM_EXPERTS": "4"}
    from_env = RouterFactory.create_from_environment(env).route(x).plan.expert_indices
    np.testing.assert_array_equal(from_env, expected)
    with pytest.raises(mr.InputError, match="router_weight"):
        ProductionRouter(RouterSpec(config, 8), np.zeros((8, 5)))
    with pytest.raises(mr.ConfigError, match="weights_path"):
        ProductionRouter(RouterSpec(config, 8, ProductionSettings(weights_path="missing.npy")))


# ----- metrics, health, threads ----------------------------------------------------------------
def test_metrics_percentiles_and_bounded_window() -> None:
    router = ProductionRouter(RouterSpec(mr.RouterConfig(num_experts=4), 8,
                                         ProductionSettings(latency_window=10)))
    for seed in range(25):
        router.route(hidden((6, 8), seed))
    m = router.get_metrics()
    assert m["requests"] == 25 and m["tokens"] == 150 and m["errors"] == 0
    lat = m["latency_ms"]
    assert lat["window"] == 10 and 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert sum(m["expert_tokens"]) == 300 and sum(m["expert_usage"]) == pytest.approx(1)
    assert 0.25 <= m["balancedness"] <= 1 and m["drop_rate"] == 0
    assert m["fallbacks"] >= 0 and m["static_k"] == 2


def test_health_check_has_no_side_effect_and_reports_collapse() -> None:
    config = mr.RouterConfig(num_experts=4, k=1)
    weight = np.zeros((8, 4), np.float32)
    weight[:, 2] = 50.0  # expert 2 wins every token whose features sum positive...
    x = np.abs(hidden((256, 8)))  # ...and these all do
    router = ProductionRouter(RouterSpec(config, 8), weight)
    assert router.health_check()["status"] == "ok"  # nothing seen yet
    router.route(x)
    before_metrics = router.get_metrics()
    before_session = router.debugger.to_session()["totals"]
    health = router.health_check()
    assert health["status"] == "degraded"
    assert {"collapse", "dead_expert"} <= {issue["kind"] for issue in health["issues"]}
    assert health["config_valid"] and health["backends"]["numpy"]["installed"]
    after = router.get_metrics()
    for key in ("requests", "tokens", "expert_tokens", "errors"):
        assert after[key] == before_metrics[key]
    assert router.debugger.to_session()["totals"] == before_session


def test_health_check_error_when_the_router_cannot_route() -> None:
    weight = np.full((8, 4), np.nan, np.float32)
    router = ProductionRouter(RouterSpec(mr.RouterConfig(num_experts=4), 8), weight)
    health = router.health_check()
    assert health["status"] == "error" and not health["config_valid"]
    assert any("NaN" in p for p in health["problems"])


def test_monitoring_off_has_no_debugger() -> None:
    router = ProductionRouter(RouterSpec(mr.RouterConfig(num_experts=4), 8,
                                         ProductionSettings(enable_monitoring=False)))
    router.route(hidden((4, 8)))
    assert router.debugger is None and router.health_check()["issues"] == []


def test_concurrent_calls_equal_serial_calls() -> None:
    """8 threads x 200 requests give exactly the serial results, and every one is counted."""
    router = RouterFactory.create_optimized_for_inference(d_model=16, num_experts=8)
    inputs = [hidden((4, 16), seed) for seed in range(50)]
    serial = [router.route(x).plan for x in inputs]
    jobs = [i % len(inputs) for i in range(8 * 200)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        plans = list(pool.map(lambda i: (i, router.route(inputs[i]).plan), jobs))
    for i, plan in plans:
        np.testing.assert_array_equal(plan.expert_indices, serial[i].expert_indices)
        np.testing.assert_array_equal(plan.expert_weights, serial[i].expert_weights)
    m = router.get_metrics()
    assert m["requests"] == 50 + 1600 and m["errors"] == 0 and m["tokens"] == 4 * 1650
    stats = router.debugger.get_routing_stats("eval")["overall"]
    assert stats["tokens"] == 4 * 1650


def test_deployment_page_has_the_current_table() -> None:
    from moe_router.envvars import TABLE_END, TABLE_START, markdown_table

    page = (ROOT / "docs" / "deployment.md").read_text()
    table = page.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert table == markdown_table(), "regenerate: python -m moe_router.envvars docs/deployment.md"
