"""Reproducibility digest stamped on every export and report: hashes of the config, the weights
and the inputs, plus the versions of the packages that produced the numbers."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import numpy as np

#: packages whose versions are recorded when imported
PACKAGES = ("moe-router", "numpy", "torch", "jax", "flax", "tensorflow", "keras", "transformers")
_MODULES = {"moe-router": "moe_router"}


def config_hash(configs: Iterable[Any]) -> str:
    """sha256 of the layers' configs (dataclasses as sorted JSON)."""
    payload = [dataclasses.asdict(c) if dataclasses.is_dataclass(c) else c for c in configs]
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def weights_hash(weights: Iterable[Mapping[str, np.ndarray]]) -> str:
    """sha256 over every layer's portable weights (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for layer in weights:
        for name in sorted(layer):
            array = np.ascontiguousarray(layer[name])
            h.update(f"{name}:{array.shape}:{array.dtype}".encode())
            h.update(array.tobytes())
    return h.hexdigest()


class InputHasher:
    """A running sha256 over the arrays the user notes as inputs (``MoEDebugger.note_inputs``)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.count = 0

    def update(self, array: Any) -> None:
        value = np.ascontiguousarray(np.asarray(array))
        self._hash.update(f"{value.shape}:{value.dtype}".encode())
        self._hash.update(value.tobytes())
        self.count += 1

    def hexdigest(self) -> str | None:
        return self._hash.hexdigest() if self.count else None


def versions() -> dict[str, str]:
    """Python, platform and the versions of the recorded packages that are imported."""
    found = {"python": platform.python_version(), "platform": platform.platform()}
    for package in PACKAGES:
        if _MODULES.get(package, package) not in sys.modules:
            continue
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def digest(config: str, weights: str | None, inputs: str | None) -> dict[str, Any]:
    """The session's ``digest`` dict, with ``id`` = first 16 hex of sha256 over the rest."""
    record: dict[str, Any] = {"config": config, "weights": weights, "inputs": inputs,
                              "versions": versions()}
    text = json.dumps(record, sort_keys=True)
    record["id"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return record
