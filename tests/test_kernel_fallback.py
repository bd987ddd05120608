"""A framework expert kernel that raises at run time falls back to the portable kernel: the same
output as the portable kernel, one warning per failing case, the case remembered (the kernel is
not retried) and every fallback counted; never under tracing, never for our own errors."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import moe_router as mr
from moe_router.hookspecs import hookimpl
from moe_router.layer.experts import (
    FALLBACK_KERNEL,
    KernelFallbackWarning,
    dispatch_info,
    expert_compute,
    expert_weights,
    fallback_counts,
    kernel_fallbacks,
    run_kernel,
)
from moe_router.layer.state import initial_state
from moe_router.layer.step import layer_step
from moe_router.registrar import Registrar
from moe_router.registry import Registry, default_registry
from moe_router.weights import init_weights

D, F, E, K = 16, 24, 8, 2
calls: dict[str, int] = {}


def _broken(name: str, error: BaseException) -> Any:
    def kernel(*args: Any) -> Any:
        calls[name] = calls.get(name, 0) + 1
        raise error

    return kernel


class BrokenKernels:
    """Numpy-framework kernels that always raise (a grouped and a tokens one), one raising our
    own error and one raising MemoryError."""

    @hookimpl
    def moe_router_register_kernels(self, registrar: Registrar) -> None:
        registrar.kernel("numpy:broken", _broken("numpy:broken", RuntimeError(
            "no kernel for this dtype\nsecond line")), framework="numpy")
        registrar.kernel("numpy:broken_tokens", _broken("numpy:broken_tokens", TypeError("no")),
                         framework="numpy", kind="tokens")
        registrar.kernel("numpy:ours", _broken("numpy:ours", mr.InputError("x", "bad")),
                         framework="numpy")
        registrar.kernel("numpy:oom", _broken("numpy:oom", MemoryError()), framework="numpy")
        registrar.kernel("broken_portable", _broken("broken_portable", RuntimeError("bug")))


@pytest.fixture
def broken() -> Iterator[None]:
    plugin = BrokenKernels()
    default_registry().register(plugin)
    calls.clear()
    try:
        yield
    finally:
        default_registry().unregister(plugin)


def _setup(dispatch: str, tokens: int = 12, seed: int = 0) -> tuple[Any, ...]:
    b = default_registry().backend("numpy")
    config = mr.MoEConfig(d_model=D, d_ff=F, router=mr.RouterConfig(num_experts=E, k=K),
                          dispatch=dispatch)
    params = {n: b.asarray(v) for n, v in init_weights(config, seed=seed).items()}
    x = np.random.default_rng(seed).standard_normal((tokens, D)).astype(np.float32)
    return b, config, params, x


def _step(dispatch: str, tokens: int = 12) -> np.ndarray:
    b, config, params, x = _setup(dispatch, tokens)
    return layer_step(b, params, initial_state(b, config, like=x), x, config,
                      need_plan=False).y


@pytest.mark.parametrize("kernel", ["numpy:broken", "numpy:broken_tokens"])
def test_failing_kernel_falls_back_once_with_the_portable_result(broken: None,
                                                                 kernel: str) -> None:
    expected = _step(FALLBACK_KERNEL)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = [_step(kernel) for _ in range(4)]
    for y in outputs:
        np.testing.assert_array_equal(y, expected)  # exactly the portable kernel's result
    fallbacks = [w for w in caught if issubclass(w.category, KernelFallbackWarning)]
    assert len(fallbacks) == 1, [str(w.message) for w in caught]
    message = str(fallbacks[0].message)
    assert kernel in message and "float32" in message and "T<=16" in message
    assert "second line" not in message  # one line of the error
    assert calls[kernel] == 1  # remembered: not retried
    assert fallback_counts()[kernel] == 4  # every call that fell back is counted
    (case, error), = kernel_fallbacks().failed.items()
    assert case[0] == kernel and case[1] == "float32" and case[3][0] == 16
    assert error.split(":")[0] in ("RuntimeError", "TypeError")


def test_another_shape_bucket_is_tried_again(broken: None) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step("numpy:broken", tokens=12)
        _step("numpy:broken", tokens=16)  # same bucket (T <= 16)
        _step("numpy:broken", tokens=40)  # bucket 64: a new case
    assert sum(issubclass(w.category, KernelFallbackWarning) for w in caught) == 2
    assert calls["numpy:broken"] == 2
    assert fallback_counts()["numpy:broken"] == 3
    assert len(kernel_fallbacks().failed) == 2


def test_our_errors_memory_errors_and_portable_kernels_propagate(broken: None) -> None:
    with pytest.raises(mr.InputError, match="bad"):
        _step("numpy:ours")
    with pytest.raises(MemoryError):
        _step("numpy:oom")
    with pytest.raises(RuntimeError, match="bug"):  # a portable kernel has nothing to fall to
        _step("broken_portable")
    assert fallback_counts() == {} and kernel_fallbacks().failed == {}


def test_no_fallback_under_tracing(broken: None) -> None:
    b, config, params, x = _setup("numpy:broken")
    ids = np.tile(np.arange(K), (x.shape[0], 1))
    gates = np.full((x.shape[0], K), 0.5, np.float32)
    with pytest.raises(RuntimeError, match="no kernel"):
        expert_compute(b, x, ids, gates, params, config, traced=True)
    info = dispatch_info(b, config, x, K)
    with pytest.raises(RuntimeError, match="no kernel"):  # fallback=False: no guard either
        run_kernel(b, "numpy:broken", x, ids, gates, expert_weights(b, params, x),
                   config.activation, info, fallback=False)
    assert fallback_counts() == {}


def test_the_record_lives_in_the_registry(broken: None) -> None:
    with pytest.warns(KernelFallbackWarning):
        _step("numpy:broken")
    assert fallback_counts() == {"numpy:broken": 1}
    assert fallback_counts(Registry(load_entry_points=False)) == {}  # another registry
    plugin = object()
    default_registry().register(plugin, name="any-plugin")  # plugins changed: a fresh record
    try:
        assert fallback_counts() == {}
    finally:
        default_registry().unregister(plugin)
