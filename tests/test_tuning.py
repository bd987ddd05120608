"""Measured dispatch choice (moe_router.layer.tuning) on the NumPy backend: the cache is written,
read by ``auto``, ignored on any key mismatch (thresholds then), and tuning never changes
results. Torch specifics (threads, dtypes, the torch kernels): tests/torch/test_tuning_torch.py."""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moe_router as mr
from moe_router import cli
from moe_router.layer import tuning
from moe_router.layer.experts import (
    default_policy,
    dispatch_info,
    expert_weights,
    resolve_kernel,
    run_kernel,
    token_bucket,
)
from moe_router.layer.state import initial_state
from moe_router.layer.step import layer_step
from moe_router.registry import default_registry
from moe_router.weights import init_weights

D, F, E, K = 16, 32, 8, 2
CONFIG = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=E, k=K))


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "tune.json"
    monkeypatch.setenv(tuning.ENV_CACHE, str(path))
    monkeypatch.delenv(tuning.ENV_AUTOTUNE, raising=False)
    tuning.forget()
    yield path
    tuning.forget()


def numpy_backend() -> Any:
    return default_registry().backend("numpy")


def x_of(tokens: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((tokens, D)).astype(np.float32)


def auto_kernel(tokens: int) -> str:
    b, x = numpy_backend(), x_of(tokens)
    return resolve_kernel(b, "auto", dispatch_info(b, CONFIG, x, K), x)


def layer_out(tokens: int) -> np.ndarray:
    b, x = numpy_backend(), x_of(tokens)
    params = {n: b.asarray(v) for n, v in init_weights(CONFIG, seed=1).items()}
    return layer_step(b, params, initial_state(b, CONFIG, like=x), x, CONFIG,
                      need_plan=False).y


def write_entry(path: Path, num_tokens: int, kernel: str, **changes: Any) -> str:
    """A cache entry choosing ``kernel`` for T=num_tokens (key fields changed by ``changes``)."""
    b, x = numpy_backend(), x_of(num_tokens)
    key = tuning.tune_key(b, CONFIG, K, num_tokens, x)._replace(**changes)
    tuning.write_cache(path, {key.text(): {"kernel": kernel, "times_ms": {kernel: 1.0}}})
    return key.text()


def test_token_buckets_are_powers_of_two() -> None:
    assert [token_bucket(t) for t in (0, 1, 2, 3, 16, 17, 1000, 4096)] == \
        [1, 1, 2, 4, 16, 32, 1024, 4096]


def test_cache_path_default_and_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import platformdirs

    monkeypatch.delenv(tuning.ENV_CACHE, raising=False)
    assert tuning.cache_path() == Path(platformdirs.user_cache_dir("moe-router")) / \
        tuning.CACHE_FILE
    monkeypatch.setenv(tuning.ENV_CACHE, str(tmp_path / "x.json"))
    assert tuning.cache_path() == tmp_path / "x.json"


def test_without_an_entry_auto_keeps_the_thresholds(cache: Path) -> None:
    b, x = numpy_backend(), x_of(16)
    info = dispatch_info(b, CONFIG, x, K)
    assert auto_kernel(16) == default_policy("auto", info) == "sorted"
    assert not cache.exists()


def test_tune_writes_the_cache_and_auto_reads_it(cache: Path) -> None:
    results = tuning.tune(CONFIG, [16, 3], backend="numpy", repeats=2)
    assert [r.key.tokens for r in results] == [4, 16]  # buckets, sorted
    entries = json.loads(cache.read_text())["entries"]
    assert set(entries) == {r.key.text() for r in results}
    for r in results:
        assert entries[r.key.text()]["kernel"] == r.kernel
        assert r.kernel == min(r.times_ms, key=r.times_ms.get)
        assert r.policy_kernel == default_policy("auto", dispatch_info(
            numpy_backend(), CONFIG, x_of(r.key.tokens), K))
        assert {"sorted", "dense", "gather"} <= set(r.times_ms)  # "capacity": no capacity
        assert all(ms > 0 for ms in r.times_ms.values())
    by_bucket = {r.key.tokens: r.kernel for r in results}
    assert auto_kernel(16) == by_bucket[16] and auto_kernel(9) == by_bucket[16]
    assert auto_kernel(3) == by_bucket[4]


def test_auto_takes_the_entry_and_the_output_does_not_change(cache: Path) -> None:
    before = layer_out(16)
    for kernel in ("dense", "gather", "sorted"):
        write_entry(cache, 16, kernel)
        assert auto_kernel(16) == kernel
        np.testing.assert_allclose(layer_out(16), before, rtol=2e-5, atol=2e-6)
    assert auto_kernel(32) == "sorted"  # another bucket: no entry, thresholds


@pytest.mark.parametrize("changes", [
    {"versions": (("moe-router", "0.0.0-older"), ("numpy", np.__version__))},
    {"versions": (("moe-router", "x"), ("numpy", "1.0"))},
    {"dtype": "float64"}, {"threads": 2}, {"d_ff": F * 2}, {"activation": "gelu"},
    {"num_slots": 1}, {"tokens": 32},
])
def test_an_entry_of_another_key_is_not_used(cache: Path, changes: dict[str, Any]) -> None:
    write_entry(cache, 16, "dense", **changes)
    assert auto_kernel(16) == "sorted"


def test_a_broken_or_unknown_entry_keeps_the_thresholds(cache: Path) -> None:
    write_entry(cache, 16, "no_such_kernel")
    assert auto_kernel(16) == "sorted"
    write_entry(cache, 16, "capacity")  # no router capacity: not applicable
    assert auto_kernel(16) == "sorted"
    cache.write_text("{not json")
    tuning.forget()
    with pytest.warns(RuntimeWarning, match="ignoring the kernel-tuning cache"):
        assert auto_kernel(16) == "sorted"
    cache.write_text(json.dumps({"format": 99, "entries": {}}))
    tuning.forget()
    with pytest.warns(RuntimeWarning, match="not format 1"):
        assert auto_kernel(16) == "sorted"


def test_every_candidate_gives_the_chosen_kernels_output(cache: Path) -> None:
    b, x = numpy_backend(), x_of(64)
    params = {n: b.asarray(v) for n, v in init_weights(CONFIG, seed=2).items()}
    plan = mr.route(x @ params["router.weight"], CONFIG.router)
    info = dispatch_info(b, CONFIG, x, K)
    w = expert_weights(b, params, x)
    result = tuning.measure(b, CONFIG, 64, x, repeats=2)
    outs = {name: run_kernel(b, name, x, plan.expert_indices, plan.expert_weights, w,
                             CONFIG.activation, info)
            for name in tuning.candidates(b, info, F, 4, default_registry())}
    assert set(result.times_ms) == set(outs)
    for name, out in outs.items():
        np.testing.assert_allclose(out, outs[result.kernel], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_autotune_on_first_use(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tuning.ENV_AUTOTUNE, "1")
    before = layer_out(8)
    chosen = auto_kernel(8)
    entries = json.loads(cache.read_text())["entries"]
    (key, entry), = entries.items()
    assert "T<=8" in key and entry["kernel"] == chosen and entry["measured_tokens"] == 8
    np.testing.assert_allclose(layer_out(8), before, rtol=2e-5, atol=2e-6)
    monkeypatch.setenv(tuning.ENV_AUTOTUNE, "0")
    assert auto_kernel(8) == chosen  # read back from the cache, no new measurement
    assert len(json.loads(cache.read_text())["entries"]) == 1


def test_tune_cli_numpy(cache: Path, capsys: pytest.CaptureFixture[str],
                        tmp_path: Path) -> None:
    out_json = tmp_path / "r.json"
    assert cli.main(["tune", "--backend", "numpy", "--d-model", "16", "--d-ff", "32",
                     "--tokens", "1,16", "--repeats", "2", "--json", str(out_json)]) == 0
    text = capsys.readouterr().out
    assert "T<=" in text and "tuned" in text and f"wrote {cache}" in text.replace("\n", "")
    assert len(json.loads(cache.read_text())["entries"]) == 2
    rows = json.loads(out_json.read_text())
    assert [row["key"]["tokens"] for row in rows] == [1, 16]


@pytest.mark.parametrize("argv", [
    ["--tokens", "0"], ["--tokens", "a,b"], ["--repeats", "0"], ["--dtype", "int8"],
    ["--backend", "cupy"],
])
def test_tune_cli_bad_arguments_exit_2(argv: list[str], cache: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--backend", "numpy", *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err
    assert not cache.exists()


@pytest.mark.parametrize(("argv", "message"), [
    (["--threads", "1"], "only the torch backend"),
    (["--dtype", "bfloat16"], "NumPy has no bfloat16"),
    (["--k", "9"], "k=9"),
    (["--device", "cuda"], "device='cuda'"),
])
def test_tune_cli_user_errors_exit_2(argv: list[str], message: str, cache: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.main(["tune", "--backend", "numpy", "--tokens", "1", "--repeats", "1",
                         *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-router tune: error:") and message in err
    assert not cache.exists()
