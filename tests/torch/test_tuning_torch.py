"""Torch: kernel fallback on a failing torch kernel, tuning per thread count and dtype (a cache
entry of other threads or another dtype is not used), every torch candidate gives the same layer
output, profiler scopes of the layer step, and the scopes under ``torch.compile``."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import moe_router as mr  # noqa: E402
from moe_router import cli  # noqa: E402
from moe_router.hookspecs import hookimpl  # noqa: E402
from moe_router.layer import tuning  # noqa: E402
from moe_router.layer.experts import (  # noqa: E402
    SCOPES,
    KernelFallbackWarning,
    dispatch_info,
    expert_compute,
    expert_weights,
    fallback_counts,
    policy_kernel,
    resolve_kernel,
    run_kernel,
)
from moe_router.registrar import Registrar  # noqa: E402
from moe_router.registry import default_registry  # noqa: E402
from moe_router.torch import MoE, TorchBackend  # noqa: E402
from moe_router_backends.torch.kernels import padded_ffn  # noqa: E402

pytestmark = pytest.mark.torch
B = TorchBackend()
D, F, E, K = 32, 64, 8, 2
CONFIG = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=E, k=K))


def padded_but_not_float64(b: Any, x_SD: Any, *args: Any) -> Any:
    """``torch:padded``, except that it refuses float64 (as a kernel without that dtype)."""
    if x_SD.dtype == torch.float64:
        raise RuntimeError("\"bmm_kernel\" not implemented for 'Double'")
    return padded_ffn(b, x_SD, *args)


class Flaky:
    @hookimpl
    def moe_router_register_kernels(self, registrar: Registrar) -> None:
        registrar.kernel("torch:flaky", padded_but_not_float64, framework="torch")


@pytest.fixture
def flaky() -> Iterator[None]:
    plugin = Flaky()
    default_registry().register(plugin)
    try:
        yield
    finally:
        default_registry().unregister(plugin)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "tune.json"
    monkeypatch.setenv(tuning.ENV_CACHE, str(path))
    monkeypatch.delenv(tuning.ENV_AUTOTUNE, raising=False)
    threads = torch.get_num_threads()
    tuning.forget()
    yield path
    tuning.forget()
    torch.set_num_threads(threads)


def routed(tokens: int, dtype: Any = torch.float32, seed: int = 0) -> tuple[Any, ...]:
    layer = MoE(CONFIG, seed=seed).to(dtype=dtype).eval()
    x = torch.randn(tokens, D, generator=torch.Generator().manual_seed(seed)).to(dtype)
    with torch.no_grad():
        _, plan = layer(x, return_plan=True)
    params = {name: p.detach() for name, p in layer.named_parameters()}
    params = {n: v for n, v in params.items() if n.startswith(("experts.", "router."))}
    return layer, x, plan.expert_indices, plan.expert_weights, params


# ----- fallback ------------------------------------------------------------------------------
def test_failing_torch_kernel_falls_back_to_the_portable_result(flaky: None) -> None:
    layer, x, ids, gates, params = routed(24, torch.float64)
    config = CONFIG.replace(dispatch="torch:flaky")
    info = dispatch_info(B, config, x, K)
    expected = run_kernel(B, "sorted", x, ids, gates, expert_weights(B, params, x),
                          config.activation, info, fallback=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [expert_compute(B, x, ids, gates, params, config) for _ in range(3)]
        layer.config = config
        with torch.no_grad():
            y = layer(x)
    for out in outs:
        assert torch.equal(out, expected)
    assert [w.category for w in caught].count(KernelFallbackWarning) == 1
    assert "torch:flaky" in str(caught[0].message) and "float64" in str(caught[0].message)
    assert fallback_counts()["torch:flaky"] == 4
    with torch.no_grad():  # and the layer output is what an exact kernel gives
        torch.testing.assert_close(y, MoE.from_weights(CONFIG.replace(dispatch="torch:loop"),
                                                       layer.export_weights(),
                                                       dtype=torch.float64)(x))
    # float32 is another case: the kernel itself runs, nothing is counted
    _, x32, ids32, gates32, params32 = routed(24)
    expert_compute(B, x32, ids32, gates32, params32, config)
    assert fallback_counts()["torch:flaky"] == 4


# ----- tuning --------------------------------------------------------------------------------
def auto_kernel(tokens: int, dtype: Any = torch.float32) -> str:
    x = torch.zeros(tokens, D, dtype=dtype)
    return resolve_kernel(B, "auto", dispatch_info(B, CONFIG, x, K), x)


def thresholds(tokens: int, dtype: Any = torch.float32) -> str:
    x = torch.zeros(tokens, D, dtype=dtype)
    return policy_kernel(B, "auto", dispatch_info(B, CONFIG, x, K), x)


def test_tuned_per_thread_count_and_dtype(cache: Path) -> None:
    results = tuning.tune(CONFIG, [16], threads=[1, 2], repeats=2)
    chosen = {r.key.threads: r.kernel for r in results}
    assert set(chosen) == {1, 2}
    assert {"torch:padded", "torch:loop", "torch:gather", "sorted"} <= set(results[0].times_ms)
    assert len(json.loads(cache.read_text())["entries"]) == 2
    for threads in (1, 2):
        torch.set_num_threads(threads)
        assert auto_kernel(16) == chosen[threads]
    # pin entries to a kernel the thresholds never pick, then check every mismatch
    for r in results:
        tuning.write_cache(cache, {r.key.text(): {"kernel": "dense"}})
    torch.set_num_threads(1)
    assert auto_kernel(16) == "dense"
    assert auto_kernel(16, torch.float64) == thresholds(16, torch.float64)  # another dtype
    assert auto_kernel(64) == thresholds(64)  # another bucket
    torch.set_num_threads(3)
    assert auto_kernel(16) == thresholds(16)  # another thread count


def test_every_cached_choice_gives_the_same_layer_output(cache: Path) -> None:
    layer, x, ids, gates, params = routed(40)
    with torch.no_grad():
        before = layer(x)
    key = tuning.tune_key(B, CONFIG, K, 40, x)
    names = tuning.candidates(B, dispatch_info(B, CONFIG, x, K), F, 4, default_registry())
    assert "torch:grouped_mm" in names and "dense" in names
    for name in names:
        tuning.write_cache(cache, {key.text(): {"kernel": name}})
        assert auto_kernel(40) == name
        with torch.no_grad():
            torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-6, msg=name)


def test_tune_cli_torch(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["tune", "--d-model", "32", "--d-ff", "64", "--tokens", "1,8",
                     "--threads", "1", "--repeats", "2", "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "torch:padded" in out and "thresholds" in out
    entries = json.loads(cache.read_text())["entries"]
    assert len(entries) == 2 and all("threads=1" in key for key in entries)


# ----- profiler scopes -----------------------------------------------------------------------
def test_layer_step_phases_appear_in_the_torch_profiler() -> None:
    layer, x, *_ = routed(64)
    with torch.no_grad(), torch.profiler.profile() as prof:
        layer(x)
    keys = {event.key for event in prof.key_averages()}
    for phase in ("router_gemm", "select", "permute", "experts", "combine"):
        assert SCOPES[phase] in keys
    with torch.no_grad():  # no profiler: the scopes are not entered
        assert B.scope("moe_router/x") is B.scope("moe_router/y")


def test_scopes_do_not_break_torch_compile() -> None:
    layer, x, *_ = routed(16)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(compiled(x), expected)
        with torch.profiler.profile():
            torch.testing.assert_close(compiled(x), expected)
