"""``moe-router profile``: every phase of the layer step is reported with a non-negative time,
the phases add up to no more than the layer, for our torch layer (torch.profiler), a tiny Hugging
Face model with replaced blocks, and the NumPy backend (wall clock); bad arguments exit 2."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from moe_router import cli

FIVE = ("router_gemm", "select", "permute", "experts", "combine")
TINY = ["--d-model", "32", "--d-ff", "64", "--experts", "4", "--k", "2", "--steps", "2",
        "--warmup", "1"]


def run_profile(argv: list[str], tmp_path: Path,
                capsys: pytest.CaptureFixture[str]) -> tuple[dict[str, Any], str]:
    out = tmp_path / "profile.json"
    assert cli.main(["profile", *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def check_phases(report: dict[str, Any], total_ms: float) -> None:
    phases = report["phases"]
    for phase in FIVE:
        assert phases[phase]["ms"] >= 0.0, phase
    assert phases["experts"]["ms"] > 0.0 and phases["router_gemm"]["ms"] > 0.0
    total = sum(phases[p]["ms"] for p in (*FIVE, "shared"))
    assert total == pytest.approx(report["phase_sum_ms"])
    assert 0.0 < total <= total_ms * 1.001  # the phases are inside the layer, not overlapping
    assert all(0.0 <= p["share"] <= 1.001 for p in phases.values())


def test_profile_torch_layer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    report, text = run_profile([*TINY, "--tokens", "64", "--shared-experts", "1"], tmp_path,
                               capsys)
    check_phases(report, report["layer_ms"])
    assert report["phases"]["shared"]["ms"] > 0.0
    assert report["phases"]["permute"]["calls"] == 1.0  # once per step
    assert report["phases"]["other"]["ms"] >= 0.0
    assert sum(p["share"] for p in report["phases"].values()) == pytest.approx(1.0, abs=0.01)
    assert report["kernel"].startswith("torch:") and report["settings"]["method"] == "profiler"
    for phase in FIVE:
        assert phase in text


def test_profile_forced_tokens_kernel_has_no_permute(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("torch")
    report, _ = run_profile([*TINY, "--tokens", "1", "--dispatch", "torch:gather"], tmp_path,
                            capsys)
    assert report["kernel"] == "torch:gather"
    assert report["phases"]["permute"]["ms"] == report["phases"]["combine"]["ms"] == 0.0
    assert report["phases"]["experts"]["ms"] > 0.0


@pytest.mark.hf
def test_profile_tiny_hf_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    report, text = run_profile(["--hf-model", "mixtral", "--tokens", "16", "--steps", "2",
                                "--warmup", "1"], tmp_path, capsys)
    assert report["layers"] == 2 and report["model"] == "MixtralForCausalLM"
    assert report["phases"]["permute"]["calls"] == 2.0  # both layers, every step
    check_phases(report, report["layer_ms"])
    assert report["layer_ms"] <= report["model_ms"]
    assert "MixtralForCausalLM" in text


def test_profile_numpy_wall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report, _ = run_profile(["--backend", "numpy", *TINY, "--tokens", "32"], tmp_path, capsys)
    assert report["settings"]["method"] == "wall" and report["kernel"] == "sorted"
    check_phases(report, report["phase_sum_ms"])
    assert report["phases"]["shared"]["ms"] == 0.0 and report["layer_ms"] > 0.0


@pytest.mark.parametrize("argv", [["--steps", "0"], ["--tokens", "-3"], ["--backend", "mlx"],
                                  ["--method", "trace"], ["--dtype", "int8"]])
def test_profile_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["profile", *argv])
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["--backend", "numpy", "--method", "profiler"], "only for --backend torch"),
    (["--backend", "numpy", "--hf-model", "mixtral"], "--hf-model"),
    (["--backend", "numpy", "--threads", "2"], "--threads"),
    (["--backend", "numpy", "--device", "cuda"], "--device"),
    (["--backend", "numpy", "--k", "9"], "--k 9"),
    (["--backend", "numpy", "--strategy", "topk"], "did you mean 'top_k'"),
    (["--backend", "numpy", "--dispatch", "nope"], "dispatch='nope'"),
    (["--backend", "numpy", "--json", "/nonexistent-dir/x.json"], "--json"),
])
def test_profile_user_errors_exit_2(argv: list[str], message: str,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["profile", *TINY, "--tokens", "8", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-router profile: error:") and message in err


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs torch")
def test_profile_unknown_hf_family_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["profile", "--hf-model", "gpt2", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "--hf-model" in err and ("mixtral" in err or "transformers" in err)
