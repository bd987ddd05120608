"""The core imports no framework: importing, the CLI and loading the plugins stay framework-free.

Each check runs in a fresh interpreter (``sys.executable``) so modules imported by other tests in
this process cannot hide a regression.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "jax", "tensorflow")
LOADED = f"[m for m in {FRAMEWORKS!r} if m in sys.modules]"


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, (
        f"python {' '.join(args)} exited with {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
    return result


def last_line(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_import_moe_router_imports_no_framework() -> None:
    result = run_python("-c", f"import moe_router, sys; print({LOADED})")
    assert last_line(result) == "[]"


def test_python_m_moe_router_help() -> None:
    result = run_python("-m", "moe_router", "--help")
    assert "usage: moe-router" in result.stdout
    for command in ("demo", "info"):
        assert command in result.stdout


def test_entry_points_list_backends_without_importing_frameworks() -> None:
    code = ("import json, sys\n"
            "from moe_router.registry import default_registry\n"
            "names = default_registry().backend_names()\n"
            f"print(json.dumps({{'names': names, 'loaded': {LOADED}}}))")
    data = json.loads(last_line(run_python("-c", code)))
    missing = {"numpy", *FRAMEWORKS} - set(data["names"])
    assert not missing, (
        f"backends {sorted(missing)} not registered (got {data['names']}); the entry points of "
        f"group 'moe_router' are only visible once moe-router is installed (pip install -e .)")
    assert data["loaded"] == []


def test_cli_info_imports_no_framework() -> None:
    code = ("import contextlib, io, sys\n"
            "from moe_router.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    status = main(['info', '--json'])\n"
            f"print(status, {LOADED})")
    assert last_line(run_python("-c", code)) == "0 []"


def test_import_moe_router_debug_imports_nothing_heavy() -> None:
    """The debugger package, its analyzer and its exporters load their optional dependencies
    (TensorBoard, prometheus_client, matplotlib) only when a file is written, a server started or
    a plot drawn."""
    heavy = (*FRAMEWORKS, "matplotlib", "tensorboard", "prometheus_client")
    code = ("import sys\n"
            "import moe_router, moe_router.debug\n"
            "from moe_router.debug import MoEAnalyzer, MoEDebugger, TraceConfig\n"
            "import moe_router.debug.tensorboard, moe_router.debug.prometheus\n"
            "import moe_router.debug.report, moe_router.debug.files\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    assert last_line(run_python("-c", code)) == "[]"
