"""``moe-router demo``: bad arguments are one-line errors, and the framework demos run without
TensorFlow's native log lines or its "tf.function retracing" warning."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from moe_router import cli
from moe_router.demo import FRAMEWORKS, KINDS, native_logs_dropped

ROOT = Path(__file__).resolve().parents[1]
#: an absl/glog line as TensorFlow's C++ runtime writes them (``I0000 00:00:17962.. port.cc:153]``)
NATIVE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d+\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)
ABSL_LINE = "I0000 00:00:1796245561.901085   11860 port.cc:153] oneDNN custom operations are on.\n"


@pytest.fixture(autouse=True)
def _restore_process_state() -> Iterator[None]:
    """``main`` calls ``quiet_frameworks``, which sets env variables and warning filters."""
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


@pytest.mark.parametrize(("args", "option", "expected"), [
    (["--kinds", "bogus"], "--kinds", ["'bogus'", *KINDS]),
    (["--kinds", "normal,bogus"], "--kinds", ["'bogus'", *KINDS]),
    (["--kinds", ""], "--kinds", list(KINDS)),
    (["--tokens", "-3"], "--tokens", ["positive integer", "-3"]),
    (["--tokens", "0"], "--tokens", ["positive integer"]),
    (["--tokens", "many"], "--tokens", ["positive integer", "'many'"]),
    (["--frameworks", "mxnet"], "--frameworks", ["'mxnet'", *FRAMEWORKS]),
    (["--seed", "-1"], "--seed", [">= 0"]),
])
def test_bad_demo_argument_is_a_one_line_error(args: list[str], option: str,
                                               expected: list[str],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_cli(["demo", *args], capsys)
    assert code == 2
    assert out == ""
    error = err.strip().splitlines()[-1]
    assert error.startswith("moe-router demo: error: argument " + option)
    for text in expected:
        assert text in error
    assert "Traceback" not in err


def test_empty_framework_list_runs_only_the_numpy_tables(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run_cli(["demo", "--tokens", "32", "--kinds", "peaked,normal",
                               "--frameworks", ""], capsys)
    assert code == 0, err
    assert out.index("peaked logits") < out.index("normal logits")  # the order given
    assert "skewed logits" not in out and "low_rank logits" not in out
    assert "layer" not in out


def test_native_log_lines_are_dropped_and_other_output_kept(
        capfd: pytest.CaptureFixture[str]) -> None:
    with native_logs_dropped():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are "
                    b"written to STDERR\n" + ABSL_LINE.encode() + b"a real problem\n")
    err = capfd.readouterr().err
    assert err == "a real problem\n"


def test_native_log_lines_are_kept_when_the_block_fails(
        capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ImportError), native_logs_dropped():
        os.write(2, ABSL_LINE.encode())
        raise ImportError("framework broken")
    assert capfd.readouterr().err == ABSL_LINE


def test_native_log_lines_are_left_alone_when_disabled(
        capfd: pytest.CaptureFixture[str]) -> None:
    with native_logs_dropped(enabled=False):
        os.write(2, ABSL_LINE.encode())
    assert capfd.readouterr().err == ABSL_LINE


def _demo_subprocess(*extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "GRPC_VERBOSITY")}
    return subprocess.run(
        [sys.executable, "-m", "moe_router", "demo", "--tokens", "32", "--kinds", "normal",
         "--frameworks", "tensorflow", *extra],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False)


needs_tensorflow = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None,
                                      reason="tensorflow is not installed")


@pytest.mark.tensorflow
@needs_tensorflow
def test_tensorflow_demo_prints_no_native_logs_or_retracing_warning() -> None:
    proc = _demo_subprocess()
    assert proc.returncode == 0, proc.stderr
    assert "Keras MoE layer" in proc.stdout and "T=32" in proc.stdout
    both = proc.stdout + proc.stderr
    assert not NATIVE_LINE.search(both), proc.stderr
    assert "oneDNN custom operations" not in both
    assert "absl::InitializeLog" not in both
    assert "retracing" not in both


@pytest.mark.tensorflow
@needs_tensorflow
def test_tensorflow_demo_does_not_retrace_even_verbose() -> None:
    """With ``--verbose`` TensorFlow's Python logger keeps its WARNING level, so its retracing
    warning would show: the demo must not cause it (one ``tf.function``, traced once)."""
    proc = _demo_subprocess("--verbose")
    assert proc.returncode == 0, proc.stderr
    assert "Keras MoE layer" in proc.stdout
    assert "retracing" not in proc.stdout + proc.stderr, proc.stderr
