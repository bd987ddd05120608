"""Shared test configuration: hypothesis profiles, the ``backend`` fixture, automatic markers.

Nothing here imports a framework at import time: torch / jax / tensorflow are imported inside the
``backend`` fixture, for the tests that use it, so NumPy-only tests stay fast.

Environment variables:
    MOE_TEST_BACKENDS: comma-separated backends the ``backend`` fixture runs over
        (default ``numpy,torch,jax,tensorflow``), e.g. ``MOE_TEST_BACKENDS=numpy,torch``.
    HYPOTHESIS_PROFILE: ``default`` or ``ci`` (default: ``ci`` when ``CI`` is set).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile

import pytest
from hypothesis import HealthCheck, settings

DEFAULT_BACKENDS = ("numpy", "torch", "jax", "tensorflow")
#: The module each marker needs; a test with the marker is skipped when it is not installed.
MARKER_MODULES = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow", "hf": "transformers"}

# TensorFlow's C++ start-up logging (oneDNN, CUDA probing) buries test output; errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Tests never read or write the user's kernel-tuning cache (``moe-router tune``): a developer's
# tuned entries would change what dispatch="auto" picks, so a run here would differ from CI.
# Tests of the cache set their own path; subprocesses inherit this one.
os.environ["MOE_TUNE_CACHE"] = os.path.join(tempfile.mkdtemp(prefix="moe-tune-"),
                                            "kernel-tuning.json")
os.environ.pop("MOE_AUTOTUNE", None)

# ----- hypothesis ----------------------------------------------------------------------------
# No deadline: the first call of a framework op (tracing, kernel selection) is slow and noisy.
settings.register_profile("default", deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", deadline=None, max_examples=60, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or
                      ("ci" if os.environ.get("CI") else "default"))


# ----- backends ------------------------------------------------------------------------------
def backend_names() -> list[str]:
    """Backends selected by ``MOE_TEST_BACKENDS`` (comma list), default all four built-in ones."""
    raw = os.environ.get("MOE_TEST_BACKENDS", "")
    names = [name.strip() for name in raw.split(",") if name.strip()]
    return names or list(DEFAULT_BACKENDS)


def _framework_of(name: str) -> str:
    """The framework module a backend needs, read from its registration (imports nothing)."""
    from moe_router.registry import default_registry

    specs = default_registry().collected.backends
    if name not in specs:
        pytest.fail(f"MOE_TEST_BACKENDS names backend {name!r}, which is not registered "
                    f"(registered: {', '.join(sorted(specs))}); is moe-router installed "
                    f"(pip install -e .) so its entry points are visible?", pytrace=False)
    return specs[name].framework


@pytest.fixture(params=backend_names(), ids=str)
def backend(request: pytest.FixtureRequest):
    """The :class:`~moe_router.backend.Backend` of each selected name; skips if its framework is
    not installed."""
    name: str = request.param
    framework = _framework_of(name)
    pytest.importorskip(framework, reason=f"backend {name!r} needs {framework}, not installed")
    from moe_router.registry import default_registry

    return default_registry().backend(name)


# ----- markers -------------------------------------------------------------------------------
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each ``backend``-parametrized test with its framework, so ``-m 'not jax'`` works."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("backend") if callspec is not None else None
        if isinstance(name, str) and name in MARKER_MODULES:
            item.add_marker(getattr(pytest.mark, name))


@functools.cache
def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@functools.cache
def _cuda_available() -> bool:
    if _installed("torch"):
        import torch

        return bool(torch.cuda.is_available())
    if _installed("jax"):
        import jax

        return any(d.platform == "gpu" for d in jax.devices())
    return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip, with a reason, tests whose framework marker or ``gpu`` marker cannot be met."""
    for marker, module in MARKER_MODULES.items():
        if item.get_closest_marker(marker) and not _installed(module):
            pytest.skip(f"marked '{marker}' but {module} is not installed")
    if item.get_closest_marker("gpu") and not _cuda_available():
        pytest.skip("marked 'gpu' but no CUDA device is available")
