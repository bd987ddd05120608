"""Measured dispatch choice: time the registered expert kernels for a layer shape and keep the
fastest per token bucket, dtype, device and thread count in a JSON cache that ``auto`` reads.

Without a cache entry ``dispatch="auto"`` keeps the framework policy's size thresholds (e.g.
``PADDED_MAX_SLOTS`` on torch). With one, :func:`~moe_router.layer.experts.resolve_kernel` takes
the tuned kernel when eager (traced calls keep the policy: they need static shapes). Tuning only
changes speed: every candidate is checked against the portable kernel on the tuning data and
dropped if it disagrees, and every registered kernel is exact by contract.

- The cache: ``$MOE_TUNE_CACHE`` (a file path) or ``kernel-tuning.json`` in
  ``platformdirs.user_cache_dir("moe-router")``. Entries are keyed by framework, d_model, d_ff,
  experts, K, activation, token bucket (T rounded up to a power of two), dtype, device, thread
  count (torch's intra-op threads) and the moe-router and framework versions; an entry of another
  version, thread count or dtype is simply not found. Read once per registry; :func:`forget`
  (called after every write) makes the next resolution read it again.
- ``moe-router tune`` (:func:`tune`) measures and writes entries. ``MOE_AUTOTUNE=1`` tunes on
  first use instead: the first eager ``auto`` resolution of a case without an entry measures that
  case (a few seconds at large T), writes it and uses it.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..backend import Array, Backend
from ..config import MoEConfig
from ..errors import ConfigError

if TYPE_CHECKING:
    from .experts import DispatchInfo

ENV_AUTOTUNE = "MOE_AUTOTUNE"
ENV_CACHE = "MOE_TUNE_CACHE"
CACHE_FILE = "kernel-tuning.json"
CACHE_FORMAT = 1
#: the timing cycles through copies of the weights until they exceed this (they then come from
#: memory, as in a model whose other layers ran in between), at most ``MAX_COPIES``
STREAM_BYTES = 96 << 20
MAX_COPIES = 4
#: after the first timed round, kernels slower than this factor of the best are dropped
PRUNE_FACTOR = 3.0
#: timed rounds continue until every kernel ran this long (at most MAX_ROUNDS_FACTOR * repeats)
MIN_TIME_S = 0.25
MAX_ROUNDS_FACTOR = 40
#: portable kernels whose temporaries would exceed this are not tried
MAX_TEMP_BYTES = 1 << 30
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


class TuneKey(NamedTuple):
    """What a tuned choice depends on; :meth:`text` is its cache key."""

    framework: str
    d_model: int
    d_ff: int
    num_experts: int
    num_slots: int
    activation: str
    tokens: int  # the token bucket: T rounded up to a power of two
    dtype: str
    device: str
    threads: int | None
    versions: tuple[tuple[str, str], ...]

    def text(self) -> str:
        versions = " ".join(f"{name}={version}" for name, version in self.versions)
        return (f"{self.framework} d_model={self.d_model} d_ff={self.d_ff} "
                f"experts={self.num_experts} k={self.num_slots} {self.activation} "
                f"T<={self.tokens} {self.dtype} {self.device or 'host'} "
                f"threads={self.threads if self.threads is not None else 'default'} {versions}")


@dataclass
class TuneResult:
    """One tuned case: ms per kernel (lower quartile), the choice and the thresholds' choice."""

    key: TuneKey
    times_ms: dict[str, float]
    kernel: str
    policy_kernel: str
    measured_tokens: int

    def entry(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "times_ms": self.times_ms,
                "policy_kernel": self.policy_kernel, "measured_tokens": self.measured_tokens,
                "key": {**self.key._asdict(), "versions": dict(self.key.versions)},
                "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def dtype_name(x: Array) -> str:
    """``x``'s dtype as a plain name (``"float32"``, ``"bfloat16"``)."""
    dtype = getattr(x, "dtype", None)
    name = getattr(dtype, "name", None)
    return name if isinstance(name, str) else str(dtype).removeprefix("torch.")


def device_name(x: Array) -> str:
    """``x``'s device as text (``"cpu"``, ``"cuda:0"``; ``""`` for NumPy)."""
    return str(getattr(x, "device", ""))


def token_bucket(num_tokens: int | None) -> int:
    """T rounded up to a power of two (1, 2, 4, ...): the size class of tuning and fallbacks."""
    T = max(1, num_tokens or 1)
    return 1 << (T - 1).bit_length()


# ----- cache ---------------------------------------------------------------------------------
def cache_path() -> Path:
    """``$MOE_TUNE_CACHE``, else ``kernel-tuning.json`` in the user cache directory."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("moe-router")) / CACHE_FILE


def read_cache(path: Path) -> dict[str, dict[str, Any]]:
    """The entries of the cache file (empty when missing; a warning and empty when unreadable:
    a broken cache never breaks a layer, ``auto`` then keeps its thresholds)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as err:
        warnings.warn(f"ignoring the kernel-tuning cache {path}: {err}", RuntimeWarning,
                      stacklevel=2)
        return {}
    entries = data.get("entries") if isinstance(data, dict) else None
    if data.get("format") != CACHE_FORMAT or not isinstance(entries, dict):
        warnings.warn(f"ignoring the kernel-tuning cache {path}: not format {CACHE_FORMAT}",
                      RuntimeWarning, stacklevel=2)
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, dict)}


def write_cache(path: Path, entries: dict[str, dict[str, Any]], registry: Any = None) -> None:
    """Merge ``entries`` into the cache file (written atomically), then :func:`forget`."""
    merged = read_cache(path)
    merged.update(entries)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"format": CACHE_FORMAT, "entries": merged}, indent=1,
                              sort_keys=True))
    os.replace(tmp, path)
    forget(registry)


class TuneState:
    """Per-registry tuning state: loaded cache files and a generation that is part of every
    memoized ``auto`` resolution (bumped by :func:`forget`)."""

    def __init__(self) -> None:
        self.generation = 0
        self.loaded: dict[str, dict[str, dict[str, Any]]] = {}
        self.versions: dict[str, tuple[tuple[str, str], ...]] = {}

    def entries(self, path: Path) -> dict[str, dict[str, Any]]:
        key = str(path)
        if key not in self.loaded:
            self.loaded[key] = read_cache(path)
        return self.loaded[key]


def state(registry: Any = None) -> TuneState:
    """The :class:`TuneState` of ``registry`` (default: the process registry)."""
    if registry is None:
        from ..registry import default_registry

        registry = default_registry()
    return registry.memo("tuning", "state", TuneState)  # type: ignore[no-any-return]


def forget(registry: Any = None) -> None:
    """Drop the loaded cache and the memoized ``auto`` choices (after a write, or after
    ``$MOE_TUNE_CACHE`` changed)."""
    st = state(registry)
    st.loaded.clear()
    st.generation += 1


def token(framework: str, registry: Any) -> tuple[int | None, int]:
    """What an ``auto`` resolution depends on beyond its sizes: (threads, cache generation)."""
    return framework_threads(framework), state(registry).generation


def framework_threads(framework: str) -> int | None:
    """The framework's intra-op thread count where it has a run-time setting (torch)."""
    if framework == "torch":
        torch = sys.modules.get("torch")
        return int(torch.get_num_threads()) if torch is not None else None
    return None


def set_threads(framework: str, threads: int) -> None:
    """Set the framework's intra-op threads (torch only).

    Raises:
        ConfigError: another framework (their thread pools are fixed at start-up).
    """
    if framework != "torch":
        raise ConfigError("threads", threads, "no thread setting: only torch sets its intra-op "
                          "threads at run time")
    import torch

    torch.set_num_threads(int(threads))


def versions(framework: str, registry: Any = None) -> tuple[tuple[str, str], ...]:
    """(moe-router, framework) versions, part of every key (a new version re-tunes)."""
    st = state(registry)
    if framework not in st.versions:
        try:
            own = importlib.metadata.version("moe-router")
        except importlib.metadata.PackageNotFoundError:
            own = "unknown"
        module = sys.modules.get(framework)
        st.versions[framework] = (("moe-router", own),
                                  (framework, str(getattr(module, "__version__", "unknown"))))
    return st.versions[framework]


def tune_key(b: Backend, config: MoEConfig, num_slots: int, num_tokens: int, x_TD: Array,
             registry: Any = None) -> TuneKey:
    """The :class:`TuneKey` of a layer call (threads: the framework's current setting)."""
    return TuneKey(b.framework, config.d_model, config.d_ff, config.num_experts, int(num_slots),
                   config.activation, token_bucket(num_tokens), dtype_name(x_TD),
                   device_name(x_TD), framework_threads(b.framework),
                   versions(b.framework, registry))


def autotune_enabled() -> bool:
    """``$MOE_AUTOTUNE`` is 1 / true / yes / on."""
    return os.environ.get(ENV_AUTOTUNE, "").strip().lower() in ("1", "true", "yes", "on")


def tuned_kernel(b: Backend, info: DispatchInfo, x_TD: Array, registry: Any) -> str | None:
    """The cached kernel for this eager ``auto`` call, or ``None`` (no entry: thresholds). With
    ``$MOE_AUTOTUNE`` on, a missing entry is measured and written first."""
    if info.traced or info.num_tokens is None:
        return None
    key = tune_key(b, info.config, info.num_slots, info.num_tokens, x_TD, registry)
    path = cache_path()
    entry = state(registry).entries(path).get(key.text())
    if entry is None and autotune_enabled():
        result = measure(b, info.config, key.tokens, x_TD, repeats=5, registry=registry)
        write_cache(path, {key.text(): result.entry()}, registry)
        entry = result.entry()
    name = entry.get("kernel") if entry else None
    if not isinstance(name, str) or name not in registry.collected.kernels:
        return None
    if registry.kernel_spec(name).framework not in (None, b.framework):
        return None
    return None if name == "capacity" and info.capacity is None else name


# ----- measuring -----------------------------------------------------------------------------
def candidates(b: Backend, info: DispatchInfo, d_ff: int, itemsize: int,
               registry: Any) -> list[str]:
    """Registered kernels that can run this case: the framework's and the portable ones, less
    ``capacity`` without a router capacity and portable kernels whose temporaries are huge."""
    T, K, E, D = info.num_tokens or 1, info.num_slots, info.num_experts, info.config.d_model
    temp_bytes = {"gather": 3 * T * K * D * d_ff * itemsize,  # per-slot weight copies
                  "dense": E * T * (3 * d_ff + D) * itemsize}  # every expert on every token
    names = []
    for name in registry.kernel_names():
        if registry.kernel_spec(name).framework not in (None, b.framework):
            continue
        if name == "capacity" and info.capacity is None:
            continue
        if temp_bytes.get(name, 0) > MAX_TEMP_BYTES:
            continue
        names.append(name)
    return names


def sync(b: Backend, y: Array) -> None:
    """Wait for ``y`` (JAX: ``block_until_ready``; device arrays: a one-row host copy)."""
    block = getattr(y, "block_until_ready", None)
    if block is not None:
        block()
    elif not b.is_host(y):
        b.to_numpy(y[:1])


def low_quartile(values: Sequence[float]) -> float:
    """The lower quartile (the minimum below 4 samples): other processes on a shared machine
    only ever add time, in heavy-tailed stalls that a median still catches when they hit half
    the calls of one kernel; the lower quartile estimates the kernel's own cost."""
    if len(values) < 4:
        return min(values)
    return statistics.quantiles(values, n=4, method="inclusive")[0]


def _itemsize(x: Array) -> int:
    """Bytes per element of ``x`` (NumPy / JAX ``dtype.itemsize``, torch ``element_size()``,
    TensorFlow ``dtype.size``)."""
    size = getattr(x.dtype, "itemsize", None)
    if isinstance(size, int):
        return size
    if hasattr(x, "element_size"):
        return int(x.element_size())
    return int(getattr(x.dtype, "size", 4))


def _tolerance(dtype: str) -> tuple[float, float]:
    return (1e-4, 1e-5) if dtype in ("float32", "float64") else (3e-2, 3e-2)


def measure(b: Backend, config: MoEConfig, num_tokens: int, like: Array, *, repeats: int = 9,
            clock: Callable[[], float] = time.perf_counter, registry: Any = None,
            seed: int = 0, kernels: Sequence[str] | None = None,
            min_time_s: float = MIN_TIME_S) -> TuneResult:
    """Time every candidate kernel's expert compute (permute, kernel, unpermute) on T random
    tokens routed by ``config``'s router, in ``like``'s dtype and device.

    Round-robin over the kernels (a random order every round) after one warm-up call each, which
    also checks the kernel's output against the portable kernel; a failing or disagreeing
    kernel is left out. Lower quartile (:func:`low_quartile`) of at least ``repeats`` rounds,
    more (up to ``MAX_ROUNDS_FACTOR * repeats``) until every kernel ran ``min_time_s`` (small
    T: many cheap samples); kernels slower than ``PRUNE_FACTOR`` times the best after the first
    round stop.
    """
    from ..registry import default_registry
    from ..weights import init_weights
    from .experts import FALLBACK_KERNEL, dispatch_info, expert_weights, policy_kernel, run_kernel
    from .step import stages_for

    registry = registry or default_registry()
    T = int(num_tokens)
    rng = np.random.default_rng(seed)
    x_TD = b.cast_like(b.asarray(rng.standard_normal((T, config.d_model)).astype(np.float32),
                                 like=like), like)
    itemsize = _itemsize(like)
    weight_bytes = 3 * config.num_experts * config.d_model * config.d_ff * itemsize
    copies = max(1, min(MAX_COPIES, math.ceil(STREAM_BYTES / weight_bytes)))
    params = [{name: b.asarray(value, like=like)
               for name, value in init_weights(config, seed=seed + i).items()}
              for i in range(copies)]
    stages = stages_for(b)
    logits_TE = stages.router_logits(x_TD, params[0], config)
    plan = stages.route(logits_TE, config.router, hidden_TD=x_TD)
    ids_TK, gates_TK = plan.expert_indices, plan.expert_weights
    info = dispatch_info(b, config, x_TD, b.shape(ids_TK)[1])
    ws = [expert_weights(b, p, x_TD) for p in params]
    names = list(kernels) if kernels is not None else candidates(b, info, config.d_ff,
                                                                 itemsize, registry)

    def call(name: str, i: int) -> Array:
        return run_kernel(b, name, x_TD, ids_TK, gates_TK, ws[i % copies], config.activation,
                          info, fallback=False)

    reference = b.to_numpy(call(FALLBACK_KERNEL, 0)).astype(np.float64)
    rtol, atol = _tolerance(dtype_name(like))
    scale = float(np.abs(reference).max()) or 1.0
    live = []
    for name in names:
        try:
            out = b.to_numpy(call(name, 0)).astype(np.float64)
        except Exception:  # noqa: BLE001 (a kernel that cannot run this case is not a choice)
            continue
        if np.allclose(out, reference, rtol=rtol, atol=atol * scale):
            live.append(name)
    times: dict[str, list[float]] = {name: [] for name in live}
    order = random.Random(seed)
    r = 0
    while live and (r < repeats or (r < MAX_ROUNDS_FACTOR * repeats
                                    and min(sum(times[n]) for n in live) < min_time_s)):
        for name in order.sample(live, len(live)):  # a random order every round
            t0 = clock()
            sync(b, call(name, r + 1))
            times[name].append(clock() - t0)
        if r == 0:
            best = min(values[0] for values in times.values())
            live = [name for name in live if times[name][0] <= PRUNE_FACTOR * best]
        r += 1
    typical = {name: low_quartile(values) * 1e3 for name, values in times.items()}
    if not typical:
        raise ConfigError("dispatch", "auto", "a kernel that runs this case (every candidate "
                          "failed or disagreed with the portable kernel)")
    chosen = min(live, key=lambda name: typical[name])
    key = tune_key(b, config, info.num_slots, T, x_TD, registry)
    return TuneResult(key=key, times_ms=typical, kernel=chosen,
                      policy_kernel=policy_kernel(b, "auto", info, x_TD), measured_tokens=T)


def array_like(b: Backend, dtype: str, device: str | None = None) -> Array:
    """A one-element array of ``dtype`` on ``device`` (what :func:`measure` takes as ``like``).

    Raises:
        ConfigError: a dtype or device the framework does not have.
    """
    import importlib

    framework = importlib.import_module("jax.numpy" if b.framework == "jax" else b.framework)
    if b.framework == "numpy":
        if device not in (None, "cpu"):
            raise ConfigError("device", device, "cpu for numpy")
        return np.zeros(1, dtype=np.dtype(dtype))
    dt = getattr(framework, dtype, None)
    if dt is None:
        raise ConfigError("dtype", dtype, f"a {b.framework} dtype (float32, bfloat16, float16)")
    if b.framework == "torch":
        dev = framework.device(device or "cpu")
        if dev.type == "cuda" and not framework.cuda.is_available():
            raise ConfigError("device", device, "an available device (no CUDA device found)")
        return framework.zeros(1, dtype=dt, device=dev)
    if device not in (None, "cpu"):
        raise ConfigError("device", device, f"the default device for {b.framework}")
    return framework.zeros(1, dtype=dt)


def tune(config: MoEConfig, tokens: Sequence[int], *, backend: str = "torch",
         dtype: str = "float32", device: str | None = None,
         threads: Sequence[int | None] = (None,), repeats: int = 9, clock: str = "wall",
         write: bool = True, path: Path | None = None, min_time_s: float = MIN_TIME_S,
         progress: Callable[[TuneResult], None] | None = None) -> list[TuneResult]:
    """Measure the kernels for ``config`` at each token bucket (``tokens`` rounded up to powers
    of two) and thread count, and write the choices to the cache (``path``, default
    :func:`cache_path`). Returns one :class:`TuneResult` per (threads, bucket).

    Large buckets (T >= 1024) run a third of ``repeats`` rounds (at least 5).
    """
    from ..registry import default_registry

    registry = default_registry()
    b = registry.backend(backend)
    like = array_like(b, dtype, device)
    before = framework_threads(b.framework)
    buckets = sorted({token_bucket(int(t)) for t in tokens})
    results = []
    try:
        for n in threads:
            if n is not None:
                set_threads(b.framework, n)
            for T in buckets:
                reps = repeats if T < 1024 else max(5, repeats // 3)
                result = measure(b, config, T, like, repeats=reps, clock=CLOCKS[clock],
                                 registry=registry, min_time_s=min_time_s)
                results.append(result)
                if progress is not None:
                    progress(result)
    finally:
        if before is not None and framework_threads(b.framework) != before:
            set_threads(b.framework, before)
    if write:
        write_cache(path or cache_path(), {r.key.text(): r.entry() for r in results},
                    registry)
    return results
