"""The production router: hidden states of any framework in, a routing plan and honest
``routing_info`` out, with request metrics, health and an optional debugger.

``route`` is safe to call from many threads at once: routing itself is a pure function of the
inputs and the (read-only) router weights; the metrics and the debugger update under locks.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..api import route
from ..backend import Array
from ..config import RouterConfig
from ..debug.counters import plan_counts
from ..errors import ConfigError, InputError, InputTypeError, MoERouterError
from ..plan import RoutingPlan
from ..registry import backend_for, default_registry
from .metrics import RequestMetrics
from .settings import RouterSpec

log = logging.getLogger("moe_router")

#: keys tried, in order, for the router weight in ``.npz`` / ``.safetensors`` files
WEIGHT_KEYS = ("router.weight", "router", "gate.weight", "weight")


@dataclasses.dataclass(frozen=True)
class RoutedResult:
    """What :meth:`ProductionRouter.route` returns.

    Attributes:
        plan: the :class:`~moe_router.RoutingPlan` over the ``T = B * S`` tokens (arrays of the
            input's framework).
        routing_info: plain numbers: ``mean_experts``, ``k_histogram``, ``static_k``,
            ``flops_vs_static`` (expert FLOPs / static top-k's), ``flops_vs_dense`` (/ all
            experts), ``expert_utilization`` (each expert's share of the routed slots),
            ``num_dropped``, ``tokens``, ``latency_ms``.
        shape: the leading shape of the input (``(B, S)`` or ``(T,)``).
    """

    plan: RoutingPlan
    routing_info: dict[str, Any]
    shape: tuple[int, ...]

    @property
    def expert_indices(self) -> Array:
        """``(*shape, K)`` expert ids (``-1`` = unused slot)."""
        return self._unflatten(self.plan.expert_indices)

    @property
    def expert_weights(self) -> Array:
        """``(*shape, K)`` gate weights."""
        return self._unflatten(self.plan.expert_weights)

    def _unflatten(self, x_TK: Array) -> Array:
        b = backend_for(x_TK)
        return b.reshape(x_TK, (*self.shape, b.shape(x_TK)[-1]))


class ProductionRouter:
    """Routes hidden states with a fixed router weight ``(D, E + N)``; see :class:`RouterSpec`.

    Args:
        spec: config, width, settings (and the notes of how they were read; logged once).
        router_weight: ``(D, E + N)`` array; default: read from ``settings.weights_path``, or
            initialised from ``settings.seed`` with std ``1 / sqrt(D)`` (unit-scale logits for
            unit-scale hidden states).
        router_bias: optional ``(E + N,)`` logit bias.
        state: optional :class:`~moe_router.RouterState` (a trained top-p controller or
            complexity calibration); routing never updates it.
    """

    def __init__(self, spec: RouterSpec, router_weight: Any = None, router_bias: Any = None,
                 state: Any = None) -> None:
        self.spec = spec
        self.config: RouterConfig = spec.config
        self.settings = spec.settings
        self.d_model = spec.d_model
        self.weight_DE = _weight(spec, router_weight)
        self.bias_E = None if router_bias is None else _bias(spec, router_bias)
        self.state = state
        self._converted: dict[tuple[str, str, str], tuple[Array, Array | None]] = {}
        self.metrics = RequestMetrics(self.config.num_experts, self.config.max_slots,
                                      self.settings.latency_window)
        self.debugger: Any = None
        if self.settings.enable_monitoring:
            from ..debug.debugger import MoEDebugger

            self.debugger = MoEDebugger(None)
            self.debugger.start_session(f"router ({spec.source})")
        for note in spec.notes:  # once per router: mapped keys at INFO, ignored at WARNING
            level = logging.WARNING if " is ignored: " in note else logging.INFO
            log.log(level, "moe-router production config (%s): %s", spec.source, note)

    # ----- routing ---------------------------------------------------------------------------
    def route(self, hidden_states: Any, *, token_ids: Any = None, mask: Any = None,
              training: bool = False) -> RoutedResult:
        """Route ``(B, S, D)`` or ``(T, D)`` float hidden states of any registered framework
        (NumPy, torch, JAX, TensorFlow). ``token_ids`` / ``mask``: ``(B, S)`` or ``(T,)``
        (``hash`` routing; padding). ``training`` adds the configured router noise.

        Raises:
            InputTypeError: not an array of a registered framework, or not floating point.
            InputError: wrong rank or width, or beyond ``max_batch_size`` / ``max_tensor_size``.
        """
        start = time.perf_counter()
        try:
            x_TD, shape, b = self._tokens(hidden_states)
            flat = [None if a is None else b.reshape(a, (-1,)) for a in (token_ids, mask)]
            logits_TE = self._logits(b, x_TD)
            plan = route(logits_TE, self.config, hidden_TD=x_TD, token_ids_T=flat[0],
                         mask_T=flat[1], training=training, state=self.state,
                         update_state=False)
            counts = plan_counts(plan, training=training, mask_T=flat[1])
        except MoERouterError as err:
            self.metrics.record_error(rejected=isinstance(err, (InputError, InputTypeError)))
            raise
        except Exception:
            self.metrics.record_error(rejected=False)
            raise
        latency_ms = (time.perf_counter() - start) * 1e3
        self.metrics.record(latency_ms, counts)
        if self.debugger is not None:
            self.debugger.record_counts(counts, mode="train" if training else "eval",
                                        framework=b.framework)
        return RoutedResult(plan, self._info(counts, latency_ms), shape)

    def _tokens(self, hidden_states: Any) -> tuple[Array, tuple[int, ...], Any]:
        try:
            b = backend_for(hidden_states)
        except MoERouterError:
            raise InputTypeError("hidden_states", f"expected a (B, S, D) or (T, D) array of "
                                 f"NumPy, torch, JAX or TensorFlow, got "
                                 f"{type(hidden_states).__name__}") from None
        shape = tuple(b.shape(hidden_states))
        if len(shape) not in (2, 3) or shape[-1] != self.d_model:
            raise InputError("hidden_states", f"expected shape (B, S, {self.d_model}) or "
                             f"(T, {self.d_model}), got {shape}")
        if b.dtype_kind(hidden_states) != "f":
            raise InputTypeError("hidden_states", "expected a floating-point array, got dtype "
                                 f"{getattr(hidden_states, 'dtype', '?')}")
        limits = self.settings
        if limits.max_batch_size is not None and shape[0] > limits.max_batch_size:
            raise InputError("hidden_states", f"batch of {shape[0]} is over max_batch_size="
                             f"{limits.max_batch_size} (leading dimension of {shape})")
        size = math.prod(shape)
        if limits.max_tensor_size is not None and size > limits.max_tensor_size:
            raise InputError("hidden_states", f"{size} elements {shape} are over "
                             f"max_tensor_size={limits.max_tensor_size}")
        if self.config.nan_policy != "ignore" and not b.all_finite(hidden_states):
            raise InputError("hidden_states", "contains NaN or Inf (enable_validation=false / "
                             "nan_policy='ignore' skips this check)")
        lead = shape[:-1]
        return b.reshape(hidden_states, (math.prod(lead), self.d_model)), lead, b

    def _logits(self, b: Any, x_TD: Array) -> Array:
        key = (b.framework, str(getattr(x_TD, "device", "")), "float32")
        converted = self._converted.get(key)
        if converted is None:  # a benign race: two threads may convert the same weights once
            weight = b.asarray(self.weight_DE, dtype="float32", like=x_TD)
            bias = None if self.bias_E is None else b.asarray(self.bias_E, dtype="float32",
                                                              like=x_TD)
            converted = self._converted.setdefault(key, (weight, bias))
        weight, bias = converted
        logits_TE = b.cast(x_TD, "float32") @ weight
        return logits_TE if bias is None else logits_TE + bias

    def _info(self, counts: dict[str, Any], latency_ms: float) -> dict[str, Any]:
        k_hist = counts["k_hist"]
        tokens = max(int(counts["tokens"]), 1)
        mean_k = sum(k * n for k, n in enumerate(k_hist)) / tokens
        routed = sum(counts["expert_tokens"])
        static_k = self.static_k
        return {
            "mean_experts": mean_k, "k_histogram": list(k_hist), "static_k": static_k,
            "flops_vs_static": mean_k / static_k,
            "flops_vs_dense": mean_k / self.config.num_experts,
            "expert_utilization": [n / routed if routed else 0.0
                                   for n in counts["expert_tokens"]],
            "num_dropped": int(counts["dropped"]), "tokens": int(counts["tokens"]),
            "latency_ms": latency_ms,
        }

    @property
    def static_k(self) -> int:
        """The static top-k that ``routing_info`` compares FLOPs against."""
        return self.settings.static_k or self.config.k

    # ----- health and metrics ----------------------------------------------------------------
    def get_metrics(self) -> dict[str, Any]:
        """Request count, errors, latency p50/p95/p99 (ms, over the last ``latency_window``
        requests), expert usage, balancedness (Jain's index), drop rate, kernel fallbacks (of
        the layers in this process) and uptime; see :meth:`RequestMetrics.snapshot`."""
        metrics = self.metrics.snapshot()
        metrics["static_k"] = self.static_k
        metrics["fallbacks"] = _fallback_count()
        return metrics

    def health_check(self) -> dict[str, Any]:
        """``status`` (``ok``, ``degraded`` with warnings or debugger errors, ``error`` when the
        router cannot route), ``uptime_s``, ``config_valid`` and ``problems``, ``backends``
        (installed or not, found without importing), ``issues`` (the debugger's dead-expert,
        collapse, imbalance and drop findings), ``requests`` / ``errors``. Reads only: no
        routing, no change to any statistic."""
        problems = self._problems()
        issues: list[dict[str, Any]] = []
        if self.debugger is not None:
            issues = self.debugger.analyzer().detect_issues()
        metrics = self.metrics.snapshot()
        status = "error" if problems else ("degraded" if issues else "ok")
        return {"status": status, "uptime_s": self.metrics.uptime_s,
                "config_valid": not problems, "problems": problems,
                "backends": _backends(), "issues": issues,
                "monitoring": self.debugger is not None,
                "requests": metrics["requests"], "errors": metrics["errors"],
                "strategy": self.config.strategy, "num_experts": self.config.num_experts,
                "d_model": self.d_model}

    def _problems(self) -> list[str]:
        problems = []
        try:
            again = RouterConfig.from_dict(dataclasses.asdict(self.config))
            if again != self.config:
                problems.append("config does not survive a round trip through its fields")
        except MoERouterError as err:
            problems.append(f"config: {err}")
        if not np.isfinite(self.weight_DE).all():
            problems.append("router weight has NaN or Inf entries")
        return problems

    def __repr__(self) -> str:
        return (f"ProductionRouter(strategy={self.config.strategy!r}, "
                f"num_experts={self.config.num_experts}, d_model={self.d_model}, "
                f"source={self.spec.source!r})")


# ----- weights ---------------------------------------------------------------------------------
def _weight(spec: RouterSpec, weight: Any) -> np.ndarray:
    expected = (spec.d_model, spec.config.num_choices)
    if weight is None and spec.settings.weights_path is not None:
        weight = load_router_weight(spec.settings.weights_path)
    if weight is None:
        rng = np.random.default_rng(spec.settings.seed)
        return (rng.standard_normal(expected) / math.sqrt(spec.d_model)).astype(np.float32)
    array = np.asarray(_to_numpy(weight), dtype=np.float32)
    if array.shape == expected[::-1] and expected[0] != expected[1]:
        array = array.T  # (E, D), as a torch Linear stores it
    if array.shape != expected:
        raise InputError("router_weight", f"expected shape {expected} (d_model, num_experts + "
                         f"num_null_experts) or its transpose, got {array.shape}")
    return np.ascontiguousarray(array)


def _bias(spec: RouterSpec, bias: Any) -> np.ndarray:
    array = np.asarray(_to_numpy(bias), dtype=np.float32)
    if array.shape != (spec.config.num_choices,):
        raise InputError("router_bias", f"expected shape ({spec.config.num_choices},), got "
                         f"{array.shape}")
    return array


def _to_numpy(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return x
    try:
        return backend_for(x).to_numpy(x)
    except MoERouterError:
        return x


def load_router_weight(path: str | Path) -> np.ndarray:
    """The router weight in a ``.npy``, ``.npz`` or ``.safetensors`` file (first of
    :data:`WEIGHT_KEYS` present, or the file's only array).

    Raises:
        ConfigError: the file is missing, of another kind, or holds no router weight.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError("weights_path", str(path), "an existing router weight file")
    suffix = file.suffix.lower()
    if suffix == ".npy":
        return np.load(file, allow_pickle=False)
    if suffix == ".npz":
        with np.load(file, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    elif suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ModuleNotFoundError:
            raise ConfigError("weights_path", str(path), "a .npy or .npz file (reading "
                              ".safetensors needs the safetensors package)") from None
        arrays = load_file(str(file))
    else:
        raise ConfigError("weights_path", str(path), "a .npy, .npz or .safetensors file")
    for key in WEIGHT_KEYS:
        if key in arrays:
            return arrays[key]
    if len(arrays) == 1:
        return next(iter(arrays.values()))
    raise ConfigError("weights_path", str(path), f"a file with one of the keys "
                      f"{', '.join(WEIGHT_KEYS)} (found {', '.join(sorted(arrays))})")


# ----- process facts ---------------------------------------------------------------------------
def _backends() -> dict[str, dict[str, Any]]:
    """Each registered backend: its framework, whether installed and whether imported."""
    out = {}
    for name, spec in sorted(default_registry().collected.backends.items()):
        try:
            installed = spec.framework in sys.modules or \
                importlib.util.find_spec(spec.framework) is not None
        except (ImportError, ValueError):
            installed = False
        out[name] = {"framework": spec.framework, "installed": installed,
                     "imported": spec.framework in sys.modules}
    return out


def _fallback_count() -> int:
    """Calls of this process's layers that ran the portable kernel because a framework kernel
    failed (:func:`moe_router.layer.experts.fallback_counts`)."""
    from ..layer.experts import fallback_counts

    return int(sum(fallback_counts().values()))
