"""Data: the standard library's ``.py`` files as bytes (split by file), and a synthetic task
whose per-token difficulty is known (copy vs modular arithmetic vs random)."""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import einops
import numpy as np

#: folders of the standard library left out: third-party packages and the test suites
SKIPPED_PARTS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test"})
#: one file in VAL_EVERY goes to validation (by a hash of its path, so the split is fixed)
VAL_EVERY = 10
SEPARATOR = b"\n\n"


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes (uint8) and where they came from."""

    train: np.ndarray
    val: np.ndarray
    files_train: int
    files_val: int
    root: str
    sha256: str

    def describe(self) -> dict[str, object]:
        """JSON-ready description (sizes, file counts, content hash)."""
        return {"source": "Python standard library .py files (tests excluded), incl. "
                          "pydoc_data/topics.py (the language docs)",
                "stdlib": self.root, "files_train": self.files_train,
                "files_val": self.files_val, "train_bytes": int(self.train.size),
                "val_bytes": int(self.val.size), "sha256": self.sha256,
                "split": f"by file: md5(relative path) mod {VAL_EVERY} == 0 -> validation"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path, tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = [p for p in root.rglob("*.py")
             if not SKIPPED_PARTS.intersection(p.relative_to(root).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def is_validation(relative: str) -> bool:
    """The fixed split: ``md5(relative path) mod VAL_EVERY == 0``."""
    return int(hashlib.md5(relative.encode()).hexdigest(), 16) % VAL_EVERY == 0


def load_corpus(max_files: int | None = None, root: Path | None = None) -> Corpus:
    """Read the files (every ``len/max_files``-th one when capped) into train / val bytes."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = stdlib_files(root)
    if max_files is not None and len(files) > max_files:
        files = files[:: max(1, len(files) // max_files)][:max_files]
    parts: dict[bool, list[bytes]] = {True: [], False: []}
    digest = hashlib.sha256()
    for path in files:
        relative = path.relative_to(root).as_posix()
        data = path.read_bytes()
        digest.update(relative.encode() + b"\0" + data)
        parts[is_validation(relative)].append(data)
    train, val = (np.frombuffer(SEPARATOR.join(parts[v]), np.uint8) for v in (False, True))
    return Corpus(train, val, len(parts[False]), len(parts[True]), str(root), digest.hexdigest())


def train_batches(data: np.ndarray, steps: int, batch: int, seq_len: int,
                  seed: int) -> Iterator[np.ndarray]:
    """``steps`` batches of ``(batch, seq_len + 1)`` int64 windows at seeded random offsets: the
    same seed gives every arm the same data order."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        starts = rng.integers(0, data.size - seq_len - 1, size=batch)
        yield np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)


def val_windows(data: np.ndarray, count: int, seq_len: int) -> np.ndarray:
    """``(count, seq_len + 1)`` windows evenly spaced over the validation bytes (no seed)."""
    starts = np.linspace(0, data.size - seq_len - 2, count).astype(np.int64)
    return np.stack([data[s:s + seq_len + 1] for s in starts]).astype(np.int64)


# ----- synthetic task -------------------------------------------------------------------------
#: token classes of the synthetic task, by the class of the token to predict
CLASSES = ("random", "copy", "arith")
COPY_OP, ADD_OP, DIGIT0 = ord("c"), ord("+"), ord("0")


def synthetic_batch(rng: np.random.Generator, batch: int, blocks: int,
                    modulus: int) -> tuple[np.ndarray, np.ndarray]:
    """Sequences of 4-token blocks ``a b op r`` of digits mod ``modulus``: ``op`` is ``c``
    (copy: r = a) or ``+`` (r = (a + b) mod modulus); ``a``, ``b`` and ``op`` are random. The
    position that predicts ``r`` holds ``op``, so the router can see which kind comes next.

    Returns tokens ``(batch, 4 * blocks)`` int64 and, for each input position t (predicting
    token t + 1), the class index of that next token ``(batch, 4 * blocks - 1)``: 0 random
    (unpredictable), 1 copy (predictable by looking back), 2 arith (needs the sum)."""
    add = rng.random((batch, blocks)) < 0.5
    a = rng.integers(0, modulus, (batch, blocks))
    b = rng.integers(0, modulus, (batch, blocks))
    r = np.where(add, (a + b) % modulus, a)
    op = np.where(add, ADD_OP, COPY_OP)
    tokens = np.stack([DIGIT0 + a, DIGIT0 + b, op, DIGIT0 + r], axis=-1)
    zero = np.zeros_like(a)
    kind = np.stack([zero, zero, zero, np.where(add, 2, 1)], axis=-1)
    return (einops.rearrange(tokens, "n k f -> n (k f)").astype(np.int64),
            einops.rearrange(kind, "n k f -> n (k f)")[:, 1:].astype(np.int64))
