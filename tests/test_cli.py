"""The ``moe-router`` command line: ``info`` reports the registry; argument errors are clear."""

from __future__ import annotations

import json
import sys
import types

import pytest

from moe_router import cli


def test_info_json_lists_backends_strategies_and_env(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert "numpy" in info["backend_names"]
    assert "top_k" in info["strategies"]
    assert info["frameworks"]["numpy"] is True
    assert info["env_variables"]["MOE_NUM_EXPERTS"] == "num_experts"
    assert info["env_variables"]["MOE_TOP_K"] == "k"


def test_info_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("moe-router ")
    assert "MOE_ROUTING_STRATEGY" in out


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "usage: moe-router" in capsys.readouterr().out


def test_unknown_argument_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["info", "--no-such-option"])
    assert exc.value.code == 2
    assert "--no-such-option" in capsys.readouterr().err


def test_demo_passes_its_arguments_through(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("moe_router.demo")
    fake.main = lambda argv: seen.append(list(argv)) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "moe_router.demo", fake)
    assert cli.main(["demo", "--tokens", "8", "--help"]) == 0
    assert seen == [["--tokens", "8", "--help"]]
