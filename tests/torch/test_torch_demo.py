"""The torch layer demo runs and reports parity with the NumPy reference."""

from __future__ import annotations

import io
import re

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.torch


def test_run_demo_prints_every_strategy_with_small_error():
    from rich.console import Console

    from moe_router_backends.torch.demo import demo_configs, run_demo

    buffer = io.StringIO()
    run_demo(Console(file=buffer, width=200), num_tokens=64)
    text = buffer.getvalue()
    for name in demo_configs():
        assert name in text
    errors = [float(v) for v in re.findall(r"(\d\.\de-\d\d)\s*│\s*$", text, flags=re.M)]
    assert len(errors) == len(demo_configs())
    assert max(errors) < 1e-4
