"""The code of ``docs/flax.md`` runs: every ```python block, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("flax")
pytest.importorskip("optax", reason="the docs example trains with optax")

pytestmark = pytest.mark.jax

DOC = Path(__file__).resolve().parents[2] / "docs" / "flax.md"


def test_flax_docs_examples_run():
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.DOTALL)
    assert len(blocks) >= 4, "docs/flax.md lost its examples"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{DOC.name}[block {i}]", "exec"), namespace)  # noqa: S102
    assert namespace["losses"][-1] < namespace["losses"][0]  # training with the aux loss works
