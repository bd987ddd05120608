"""The Keras page's example (docs/keras.md) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("tensorflow")
pytest.importorskip("keras")

pytestmark = pytest.mark.tensorflow

DOC = Path(__file__).resolve().parents[2] / "docs" / "keras.md"


def test_keras_docs_example_trains_saves_and_loads(tmp_path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert blocks, "docs/keras.md has no python example"
    code = blocks[0].replace("/tmp/moe_model.keras", str(tmp_path / "moe_model.keras"))
    import keras

    keras.utils.set_random_seed(0)
    namespace: dict[str, object] = {}
    exec(compile(code, str(DOC), "exec"), namespace)  # noqa: S102 - our own docs
    mean_k = namespace["history"].history["moe_mean_experts"]  # MoEMetrics, training batches
    assert len(mean_k) == 4  # one value per epoch
    assert all(1.0 <= k <= 4.0 for k in mean_k)  # top_p clamped to [1, max_experts=4]


def test_demo_table_has_every_strategy_and_parity_with_numpy() -> None:
    from rich.console import Console

    from moe_router.demo import demo_configs
    from moe_router_backends.tensorflow.demo import run_demo

    console = Console(record=True, width=200)
    run_demo(console, num_tokens=64)
    text = console.export_text()
    rows = [line for line in text.splitlines() if line.startswith("│")]
    assert len(rows) == len(demo_configs())
    for name in demo_configs():
        assert name in text
    errors = [float(row.strip("│ ").split("│")[-1]) for row in rows]
    assert max(errors) < 1e-5
