#!/usr/bin/env python3
"""Developer bootstrap for moe-router: one command from a fresh clone to a demo or a test run.

Standard library only; needs Python >= 3.11. Every subcommand first makes sure ``.venv`` exists and
holds an up-to-date editable install of the project (``pip install -c constraints.txt -e
".[all,dev]"``). The install is redone only when ``pyproject.toml`` or ``constraints.txt`` changed
since the last successful one (a stamp file in ``.venv`` keeps their hash).

Usage::

    python3 scripts/dev.py demo [demo args...]      # python -m moe_router demo ...
    python3 scripts/dev.py test [pytest args...]    # pytest -n 2, then mkdocs build --strict
    python3 scripts/dev.py docs [build|serve]       # build the site into site/, or serve it
    python3 scripts/dev.py bench NAME [args...]     # run benchmarks/NAME.py
    python3 scripts/dev.py setup                    # only create / update the environment

Environment variables: ``MOE_DEV_WORKERS`` (pytest-xdist workers, default 2; 0 = no xdist),
``MOE_DEV_SKIP_DOCS=1`` (test: skip the docs build), ``MOE_TEST_BACKENDS`` (read by the tests).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
EXE = ".exe" if os.name == "nt" else ""
PYTHON = BIN / f"python{EXE}"
MKDOCS = BIN / f"mkdocs{EXE}"
STAMP = VENV / ".moe-router-install"
INSTALL_INPUTS = ("pyproject.toml", "constraints.txt")
EXTRAS = "all,dev"
MIN_PYTHON = (3, 11)

# pytest options after which xdist is not added: the user chose how to run, or xdist breaks them
NO_XDIST_ARGS = ("-n", "--numprocesses", "--dist", "--pdb", "--trace", "-s", "--capture",
                 "--collect-only", "--co", "--setup-plan", "--fixtures", "--markers", "-h",
                 "--help", "--version")


def step(message: str) -> None:
    """Print one progress line (flushed, so it stays ordered with the children's output)."""
    print(f"[dev] {message}", flush=True)


def fail(message: str, code: int = 1) -> int:
    print(f"[dev] FAILED: {message}", file=sys.stderr, flush=True)
    return code


def run(cmd: Sequence[str | os.PathLike[str]]) -> int:
    """Run ``cmd`` in the repository root, echoing it; returns its exit status."""
    step("$ " + " ".join(_short(part) for part in cmd))
    return subprocess.call([str(part) for part in cmd], cwd=ROOT)


def _short(part: str | os.PathLike[str]) -> str:
    text = str(part)
    try:
        return str(Path(text).relative_to(ROOT)) if Path(text).is_absolute() else text
    except ValueError:
        return text


# ----- environment ---------------------------------------------------------------------------
def install_command() -> list[str]:
    progress = [] if sys.stdout.isatty() else ["--progress-bar", "off"]
    return [str(PYTHON), "-m", "pip", "install", *progress, "-c", "constraints.txt",
            "-e", f".[{EXTRAS}]"]


def install_hash() -> str:
    digest = hashlib.sha256()
    for name in INSTALL_INPUTS:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes() + b"\0")
    digest.update(EXTRAS.encode())
    return digest.hexdigest()


def ensure_env() -> int:
    """Create ``.venv`` if needed and (re)install the project when its inputs changed."""
    if sys.version_info < MIN_PYTHON:
        return fail(f"Python >= {'.'.join(map(str, MIN_PYTHON))} is needed to create .venv; "
                    f"this is {sys.version.split()[0]} ({sys.executable})")
    if not PYTHON.exists():
        if VENV.exists():
            step(f"{_short(VENV)} exists but has no {_short(PYTHON)}: recreating it")
            shutil.rmtree(VENV)
        step(f"creating virtual environment .venv with {sys.executable} "
             f"(Python {sys.version.split()[0]})")
        import venv

        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (subprocess.CalledProcessError, OSError) as err:
            shutil.rmtree(VENV, ignore_errors=True)
            return fail(f"could not create .venv ({err}); on Debian/Ubuntu install the venv "
                        f"module first: apt-get install python3-venv")
    wanted = install_hash()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        step("environment up to date (pyproject.toml and constraints.txt unchanged); "
             "skipping install")
        return 0
    step("installing moe-router and its extras into .venv "
         "(pyproject.toml or constraints.txt changed, or first run)")
    start = time.monotonic()
    if run([PYTHON, "-m", "pip", "install", "--quiet", "--upgrade", "pip"]) != 0:
        step("warning: could not upgrade pip; going on with the bundled one")
    if run(install_command()) != 0:
        return fail("pip install failed; see the output above (the next run retries it)")
    STAMP.write_text(wanted + "\n")
    step(f"install finished in {time.monotonic() - start:.0f} s")
    return 0


# ----- subcommands ---------------------------------------------------------------------------
def cmd_setup(args: list[str]) -> int:
    if args:
        return fail(f"setup takes no arguments, got {args}", 2)
    return 0


def cmd_demo(args: list[str]) -> int:
    step("running the demo")
    code = run([PYTHON, "-m", "moe_router", "demo", *args])
    return code if code == 0 else fail(f"demo exited with status {code}", code)


def pytest_command(args: list[str]) -> list[str]:
    """``pytest -q`` plus ``-n MOE_DEV_WORKERS`` (default 2) unless ``args`` rule xdist out."""
    cmd = [str(PYTHON), "-m", "pytest", "-q"]
    workers = os.environ.get("MOE_DEV_WORKERS", "2").strip()
    user_chose = any(a.split("=")[0] in NO_XDIST_ARGS or a.startswith("-n") or "no:xdist" in a
                     for a in args)
    if workers not in ("", "0", "1") and not user_chose:
        cmd += ["-n", workers]
    return cmd + args


def cmd_test(args: list[str]) -> int:
    skip_docs = os.environ.get("MOE_DEV_SKIP_DOCS", "") not in ("", "0")
    if "--no-docs" in args:
        args = [a for a in args if a != "--no-docs"]
        skip_docs = True
    failures: list[str] = []

    step("running the test suite")
    code = run(pytest_command(args))
    if code == 5:
        failures.append("pytest collected no tests (exit status 5): check the test paths, "
                        "the -m/-k selection and that tests/ exists")
    elif code != 0:
        failures.append(f"pytest exited with status {code}")

    if skip_docs:
        step("skipping the docs build (--no-docs or MOE_DEV_SKIP_DOCS)")
    else:
        step("building the documentation (mkdocs build --strict) into a temporary directory")
        with tempfile.TemporaryDirectory(prefix="moe-router-site-") as site:
            if run([MKDOCS, "build", "--strict", "--site-dir", site]) != 0:
                failures.append("mkdocs build --strict failed (broken nav, link or docstring)")

    if failures:
        for message in failures:
            fail(message)
        return 1
    step("all checks passed")
    return 0


def cmd_docs(args: list[str]) -> int:
    action = args[0] if args else "build"
    if action == "serve":
        step("serving the documentation (Ctrl-C to stop)")
        return run([MKDOCS, "serve", *args[1:]])
    if action == "build":
        step("building the documentation into site/")
        code = run([MKDOCS, "build", "--strict", *args[1:]])
        return code if code == 0 else fail("mkdocs build --strict failed", code)
    return fail(f"docs takes 'build' or 'serve', got {action!r}", 2)


def cmd_bench(args: list[str]) -> int:
    available = sorted(p.stem for p in (ROOT / "benchmarks").glob("*.py")
                       if not p.name.startswith("_"))
    if not args:
        return fail(f"bench needs a NAME; available: {', '.join(available) or 'none yet'}", 2)
    name, rest = args[0], args[1:]
    script = ROOT / "benchmarks" / f"{name.removesuffix('.py')}.py"
    if not script.is_file():
        return fail(f"no benchmark {name!r} (benchmarks/{script.name}); "
                    f"available: {', '.join(available) or 'none yet'}", 2)
    step(f"running benchmark {script.stem}")
    code = run([PYTHON, script, *rest])
    return code if code == 0 else fail(f"benchmark {script.stem} exited with status {code}", code)


COMMANDS = {
    "demo": cmd_demo,
    "test": cmd_test,
    "docs": cmd_docs,
    "bench": cmd_bench,
    "setup": cmd_setup,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    handler = COMMANDS.get(command)
    if handler is None:
        return fail(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}", 2)
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # mkdocs-material's banner, not a problem
    code = ensure_env()
    if code != 0:
        return code
    return handler(rest)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
