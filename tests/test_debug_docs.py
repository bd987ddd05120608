"""The debugging guides run: every ```python block of each page, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
#: page -> modules it needs (skipped when one is missing)
PAGES = {"debugging.md": (), "debugging-torch.md": ("torch", "transformers"),
         "debugging-flax.md": ("jax", "flax", "optax"), "debugging-keras.md": ("tensorflow",)}


@pytest.mark.parametrize("page", sorted(PAGES))
def test_debugging_guide_examples_run(page: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    for module in PAGES[page]:
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.DOTALL)
    assert len(blocks) >= 2, f"docs/{page} lost its examples"
    namespace: dict = {}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page}[block {i}]", "exec"), namespace)  # noqa: S102
