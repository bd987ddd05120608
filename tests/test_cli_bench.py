"""``moe-router bench``: rows per backend x size x strategy against a top-2 reference timed in
the same run, a JSON record, and one-line errors for bad arguments."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_router import cli, hookimpl, route
from moe_router.cli.bench import DEFAULT_STRATEGIES, REFERENCE, strategy_config
from moe_router.demo import realistic_logits
from moe_router.registry import Registrar, default_registry


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """The command calls ``quiet_frameworks``, which sets env variables and warning filters."""
    environ = dict(os.environ)
    with warnings.catch_warnings():
        yield
    os.environ.clear()
    os.environ.update(environ)


def _run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse errors
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def _bench(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str
           ) -> tuple[dict[str, Any], str]:
    """The JSON record and stdout of a run with ``--repeats 1 --warmup 0`` and ``args``."""
    path = tmp_path / "bench.json"
    code, out, err = _run_cli(["bench", "--repeats", "1", "--warmup", "0", "--json", str(path),
                               *args], capsys)
    assert code == 0, err
    assert f"wrote {path}" in out
    return json.loads(path.read_text()), out


def test_tiny_numpy_run_writes_rows_against_the_reference(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record, out = _bench(tmp_path, capsys, "--backends", "numpy", "--tokens", "16")
    rows = record["rows"]
    assert [row["strategy"] for row in rows] == list(DEFAULT_STRATEGIES)  # top_k first
    assert {(row["backend"], row["tokens"], row["experts"]) for row in rows} == {
        ("numpy", 16, 8)}
    reference = [row for row in rows if row["reference"]]
    assert len(reference) == 1 and reference[0]["strategy"] == REFERENCE
    assert reference[0]["time_vs_reference"] == 1.0
    assert reference[0]["mean_experts"] == 2.0
    logits_TE = realistic_logits("normal", 16, 8, seed=0)
    for row in rows:
        assert row["median_ms"] > 0 and len(row["times_ms"]) == 1
        assert row["reference_median_ms"] == reference[0]["median_ms"]
        assert row["time_vs_reference"] == pytest.approx(
            row["median_ms"] / row["reference_median_ms"])
        assert row["flops_vs_top2"] == pytest.approx(row["mean_experts"] / 2)
        config = strategy_config(row["strategy"], 8)[1]
        if not config.num_null_experts:  # the same decisions as route() on the same logits
            want = route(logits_TE, config).num_experts_per_token.mean()
            assert row["mean_experts"] == pytest.approx(want)
    null_row = next(row for row in rows if row["strategy"] == "null_experts")
    assert null_row["mean_experts"] < 2.0  # null slots cost nothing
    assert "--backends numpy" in record["command"] and "--tokens 16" in record["command"]
    assert record["machine"]["cpu_count"] == os.cpu_count()
    assert record["machine"]["numpy"] == np.__version__
    for row in rows:  # the table shows every row with its ratio
        assert f"{row['label'][:10]}" in out
    assert out.count("1.00x") >= 2  # the reference: time and FLOPs vs top-2


def test_sizes_and_strategies_make_one_reference_row_per_cell(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record, _ = _bench(tmp_path, capsys, "--backends", "numpy", "--tokens", "8,24",
                    "--strategies", "hash,top_p", "--experts", "4", "--repeats", "3")
    rows = record["rows"]
    assert [(row["tokens"], row["strategy"]) for row in rows] == [
        (8, "top_k"), (8, "hash"), (8, "top_p"), (24, "top_k"), (24, "hash"), (24, "top_p")]
    assert all(len(row["times_ms"]) == 3 and row["experts"] == 4 for row in rows)
    assert [row["time_vs_reference"] for row in rows if row["reference"]] == [1.0, 1.0]
    assert all(row["mean_experts"] == 1.0 for row in rows if row["strategy"] == "hash")


def test_json_without_a_path_writes_bench_json_here(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_cli(["bench", "--backends", "numpy", "--tokens", "8", "--strategies",
                               "relu", "--repeats", "1", "--warmup", "0", "--json"], capsys)
    assert code == 0, err
    assert "wrote bench.json" in out and "relu" in out
    assert len(json.loads((tmp_path / "bench.json").read_text())["rows"]) == 2


def test_without_json_nothing_is_written(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = _run_cli(["bench", "--backends", "numpy", "--tokens", "8", "--strategies",
                             "top_k", "--repeats", "1"], capsys)
    assert code == 0 and "top_k (k=2)" in out
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("args", "option", "expected"), [
    (["--backends", "mxnet"], "--backends", ["'mxnet'", "numpy", "torch"]),
    (["--strategies", "top_k,bogus"], "--strategies", ["'bogus'", "top_p", "null_experts"]),
    (["--tokens", "0"], "--tokens", ["positive integer"]),
    (["--tokens", "16,-2"], "--tokens", ["positive integer", "-2"]),
    (["--tokens", ","], "--tokens", ["positive integers"]),
    (["--experts", "1"], "--experts", [">= 2"]),
    (["--experts", "0"], "--experts", ["positive integer"]),
    (["--repeats", "0"], "--repeats", ["positive integer"]),
    (["--warmup", "-1"], "--warmup", [">= 0"]),
    (["--logits", "uniform"], "--logits", ["normal", "low_rank"]),
])
def test_bad_bench_argument_is_a_one_line_error(args: list[str], option: str,
                                                expected: list[str],
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_cli(["bench", "--backends", "numpy", "--tokens", "8", *args], capsys)
    assert code == 2
    assert "Traceback" not in err and "wrote" not in out
    error = err.strip().splitlines()[-1]
    assert error.startswith(f"moe-router bench: error: argument {option}")
    for text in expected:
        assert text in error


class _GhostBackendPlugin:
    @hookimpl
    def moe_router_register_backends(self, registrar: Registrar) -> None:
        registrar.backend("ghost", "ghost_moe_backend_missing:Ghost",
                          framework="ghost_framework_never_installed")


def test_backend_whose_framework_is_not_installed_is_an_error(
        capsys: pytest.CaptureFixture[str]) -> None:
    plugin = _GhostBackendPlugin()
    default_registry().register(plugin, name="ghost-backend")
    try:
        code, out, err = _run_cli(["bench", "--backends", "numpy,ghost", "--tokens", "8"],
                                  capsys)
    finally:
        default_registry().unregister(plugin)
    assert code == 2 and out == ""
    assert err.startswith("moe-router bench: error: argument --backends: ghost needs "
                          "ghost_framework_never_installed, which is not installed")
    assert "usable here: " in err and "numpy" in err.split("usable here: ")[1]
    assert len(err.strip().splitlines()) == 1


@pytest.mark.torch
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_tiny_torch_run_routes_like_numpy(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    record, _ = _bench(tmp_path, capsys, "--backends", "numpy,torch", "--tokens", "16",
                    "--strategies", "top_p,threshold,null_experts")
    rows = {(row["backend"], row["strategy"]): row for row in record["rows"]}
    assert set(rows) == {(b, s) for b in ("numpy", "torch")
                         for s in ("top_k", "top_p", "threshold", "null_experts")}
    assert rows["torch", "top_k"]["time_vs_reference"] == 1.0
    for strategy in ("top_p", "threshold", "null_experts"):
        assert rows["torch", strategy]["mean_experts"] == rows["numpy", strategy]["mean_experts"]
    import torch

    assert record["machine"]["torch"] == torch.__version__
