"""``docs/scaling.md`` shows measured numbers only: its tables are the committed
``bench_ep.json`` rendered, and its placement example is recomputed here."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from moe_router.parallel import contiguous_placement, placement_report, plan_placement

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "scaling.md"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ep", ROOT / "benchmarks" / "bench_ep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measured_tables_are_the_committed_json_rendered() -> None:
    bench = _bench()
    record = json.loads(bench.RESULTS.read_text())
    text = PAGE.read_text()
    block = text.split(bench.BEGIN)[1].split(bench.END)[0].strip()
    assert block == bench.render(record).strip()
    assert {r["world"] for r in record["rows"]} == {1, 2, 4}


def test_the_zipf_placement_example_on_the_page() -> None:
    load = 1.0 / np.arange(1, 17) ** 1.2
    load = load / load.sum() * 10_000
    contiguous = placement_report(load, contiguous_placement(16, 4)).max_over_mean
    planned = placement_report(load, plan_placement(load, 4)).max_over_mean
    replicated = placement_report(load, plan_placement(load, 4, num_redundant=4)).max_over_mean
    hottest = load[0] / load.sum()
    text = " ".join(PAGE.read_text().split())
    assert (f"goes from {contiguous:.2f} for contiguous to {planned:.2f} for the plan"
            in text), (contiguous, planned)
    assert f"carries {100 * hottest:.0f}% of the load" in text
    assert f"it reaches {replicated:.2f}" in text
