"""The Flax layer demo runs and its parity column really is small."""

from __future__ import annotations

import re

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")

pytestmark = pytest.mark.jax


def test_flax_demo_table():
    from rich.console import Console

    from moe_router_backends.jax.demo import demo_configs, run_demo

    console = Console(record=True, width=220)
    run_demo(console)
    text = console.export_text()
    for name in demo_configs():
        assert name in text
    errors = [float(v) for v in re.findall(r"(\d\.\de[-+]\d\d)\s*│?\s*$", text, flags=re.M)]
    assert len(errors) == len(demo_configs()) and max(errors) < 1e-4, text
    assert "tiles" in text and "capacity" in text  # auto resolved per strategy
