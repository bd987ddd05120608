"""``moe-router validate``: config files, the environment and backend conformance, with exit
status 1 for a failed check and 2 for bad arguments."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import moe_router
from moe_router import cli
from moe_router.cli.validate import check_backend

LEGACY = {"router_config": {"input_dim": 16, "num_experts": 4, "min_experts": 1,
                            "max_experts": 2, "routing_strategy": "top_k",
                            "complexity_estimator": "perplexity_proxy"},
          "performance": {"enable_caching": False}}


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    code = cli.main(["validate", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("MOE_") and name != "MOE_TEST_BACKENDS":
            monkeypatch.delenv(name)


def test_valid_config_file_passes_with_its_notes(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "production.json"
    path.write_text(json.dumps(LEGACY))
    code, out = run([str(path), "--backends", "numpy"], capsys)
    assert code == 0 and out["ok"]
    notes = [row["detail"] for row in out["checks"] if row["status"] == "note"]
    assert any("perplexity_proxy" in n for n in notes)
    assert any("performance.enable_caching is ignored" in n for n in notes)


def test_bad_config_file_fails_naming_the_key(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "production.json"
    path.write_text(json.dumps({**LEGACY, "security": {"max_batch": 3}}))
    code, out = run([str(path), "--backends", "numpy"], capsys)
    assert code == 1 and not out["ok"]
    failed = [row for row in out["checks"] if row["status"] == "FAIL"]
    assert len(failed) == 1 and "security.max_batch" in failed[0]["detail"]
    code, out = run([str(tmp_path / "missing.json"), "--backends", "numpy"], capsys)
    assert code == 1 and "no such file" in out["checks"][0]["detail"]


def test_misspelled_environment_variable_fails(monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_MAX_EXPERT", "3")
    code, out = run(["--backends", "numpy"], capsys)
    assert code == 1
    detail = next(r["detail"] for r in out["checks"] if r["status"] == "FAIL")
    assert "$MOE_MAX_EXPERT" in detail and "$MOE_MAX_EXPERTS" in detail


def test_bad_environment_value_fails(monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MOE_TOP_K", "two")
    code, out = run(["--backends", "numpy"], capsys)
    assert code == 1 and "MOE_TOP_K" in out["checks"][0]["detail"]


def test_unknown_backend_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["validate", "--backends", "mxnet"])
    assert exc.value.code == 2
    assert "mxnet" in capsys.readouterr().err


def test_torch_backend_conforms_and_a_broken_one_is_caught(
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torch")
    assert check_backend("torch")["status"] == "ok"
    real = moe_router.route

    def skewed(logits: Any, config: Any, **kw: Any) -> Any:
        plan = real(logits, config, **kw)
        if not isinstance(logits, np.ndarray):  # the framework side drifts
            import dataclasses

            plan = dataclasses.replace(plan, expert_weights=plan.expert_weights * 1.01)
        return plan

    monkeypatch.setattr(moe_router, "route", skewed)
    row = check_backend("torch")
    assert row["status"] == "FAIL" and "weights differ" in row["detail"]


def test_text_output(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "--backends", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "moe-router validate" in out and "all checks passed" in out
