"""The plugin registry (pluggy): backends, strategies, complexity estimators, expert kernels,
dispatch policies and observers, each registered with its metadata and imported lazily.

What plugins register on (:class:`Registrar` and the ``*Spec`` classes) lives in the leaf module
:mod:`moe_router.registrar`; they are re-exported here.

Lookup of a backend for an array follows einops: only frameworks already in ``sys.modules`` are
considered (so routing a NumPy array never imports torch), the backend class is imported on first
use, and the answer is cached per array type.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import pluggy

from . import _builtins, hookspecs
from .backend import Backend
from .errors import BackendNotFoundError, UnknownNameError
from .registrar import (
    BackendSpec,
    DispatchPolicySpec,
    EstimatorSpec,
    KernelSpec,
    ObserverSpec,
    Registrar,
    StrategySpec,
)

__all__ = [
    "ENTRY_POINT_GROUP", "BackendSpec", "DispatchPolicySpec", "EstimatorSpec", "KernelSpec",
    "ObserverSpec", "Registrar", "Registry", "StrategySpec", "backend_for", "default_registry",
    "get_backend",
]

ENTRY_POINT_GROUP = "moe_router"

#: The hooks, in the order the registry calls them when collecting.
_HOOKS = (
    "moe_router_register_backends",
    "moe_router_register_strategies",
    "moe_router_register_estimators",
    "moe_router_register_kernels",
    "moe_router_register_observers",
)


def _resolve(target: str | Callable[..., Any]) -> Any:
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


class Registry:
    """A pluggy ``PluginManager`` plus what its plugins registered: backends, strategies,
    estimators, kernels, dispatch policies and observers (specs with metadata; targets are
    resolved on first use and cached)."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        self.plugin_manager.register(_builtins, name="moe_router.builtins")
        if load_entry_points:
            self.plugin_manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self._collected: Registrar | None = None
        self._instances: dict[str, Backend] = {}
        self._by_type: dict[type, str] = {}
        self._resolved: dict[tuple[str, str], Any] = {}
        self._memo: dict[str, dict[Any, Any]] = {}

    def memo(self, kind: str, key: Any, compute: Callable[[], Any]) -> Any:
        """``compute()`` remembered under the hashable ``key`` in table ``kind`` until the
        plugins change (derived lookups such as a config's active observers). One table per
        kind keeps ``torch.compile`` from hashing unrelated keys when it traces a lookup."""
        table = self._memo.setdefault(kind, {})
        entry = table.get(hash(key))  # by hash, then identity: torch.compile traces no __eq__
        if entry is None or (entry[0] is not key and entry[0] != key):
            entry = table[hash(key)] = (key, compute())
        return entry[1]

    # ----- plugins -------------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> None:
        """Add a plugin object or module at run time (its hooks are collected again)."""
        self.plugin_manager.register(plugin, name=name)
        self._forget()

    def unregister(self, plugin: Any) -> None:
        """Remove a plugin added with :meth:`register` (its names are forgotten)."""
        self.plugin_manager.unregister(plugin)
        self._forget()

    def _forget(self) -> None:
        self._collected = None
        self._by_type.clear()
        self._instances.clear()
        self._resolved.clear()
        self._memo.clear()

    @property
    def collected(self) -> Registrar:
        """Everything the plugins registered (hooks called once, on first use)."""
        if self._collected is None:
            registrar = Registrar()
            hook = self.plugin_manager.hook
            for name in _HOOKS:
                getattr(hook, name)(registrar=registrar)
            self._collected = registrar
        return self._collected

    # ----- backends ------------------------------------------------------------------------
    def backend_names(self) -> list[str]:
        return sorted(self.collected.backends)

    def backend(self, name: str) -> Backend:
        """The backend registered as ``name`` (imports its framework)."""
        if name not in self._instances:
            spec = self._spec("backend", name, self.collected.backends)
            self._instances[name] = _resolve(spec.target)()
        return self._instances[name]

    def backend_for(self, x: Any) -> Backend:
        """The backend whose array type ``x`` is, among frameworks already imported."""
        cached = self._by_type.get(type(x))
        if cached is not None:
            return self.backend(cached)
        # the framework the array's type comes from first (importing TensorFlow also imports
        # JAX, so the JAX backend must not be tried, and imported, for a tf.Tensor), NumPy last
        home = type(x).__module__.partition(".")[0]
        specs = sorted(self.collected.backends.values(),
                       key=lambda s: (s.framework != home, s.framework == "numpy"))
        for spec in specs:
            if spec.framework not in sys.modules:
                continue
            candidate = self.backend(spec.name)
            if candidate.is_array(x):
                self._by_type[type(x)] = spec.name
                return candidate
        imported = [s.name for s in specs if s.framework in sys.modules]
        raise BackendNotFoundError(
            f"no backend handles arrays of type {type(x).__module__}.{type(x).__qualname__}; "
            f"backends with their framework imported: {imported or 'none'} "
            f"(all registered: {sorted(self.collected.backends)})")

    # ----- strategies and estimators -------------------------------------------------------
    def strategy_spec(self, name: str) -> StrategySpec:
        """The :class:`StrategySpec` (metadata) of strategy ``name``; imports nothing."""
        return self._spec("strategy", name, self.collected.strategies)

    def strategy(self, name: str) -> Callable[..., Any]:
        """The routing strategy function registered as ``name`` (resolved once, then cached)."""
        return self._target("strategy", self.strategy_spec(name))

    def strategy_names(self) -> list[str]:
        return sorted(self.collected.strategies)

    def estimator_spec(self, name: str) -> EstimatorSpec:
        """The :class:`EstimatorSpec` of complexity estimator ``name``; imports nothing."""
        return self._spec("complexity_estimator", name, self.collected.estimators)

    def estimator(self, name: str) -> Callable[..., Any]:
        """The complexity estimator registered as ``name`` (resolved once, then cached)."""
        return self._target("complexity_estimator", self.estimator_spec(name))

    def estimator_names(self) -> list[str]:
        return sorted(self.collected.estimators)

    # ----- kernels and dispatch policies ---------------------------------------------------
    def kernel_spec(self, name: str) -> KernelSpec:
        """The :class:`KernelSpec` of kernel ``name`` (``"sorted"``, ``"torch:grouped_mm"``)."""
        return self._spec("kernel", name, self.collected.kernels)

    def kernel(self, name: str) -> Callable[..., Any]:
        """The kernel function registered as ``name`` (resolved once, then cached)."""
        return self._target("kernel", self.kernel_spec(name))

    def kernel_names(self) -> list[str]:
        """Every registered kernel: portable names and qualified ``"<framework>:<name>"``."""
        return sorted(self.collected.kernels)

    def dispatch_policy(self, framework: str) -> Callable[..., Any] | None:
        """``framework``'s function mapping a portable dispatch name to a kernel name, or
        ``None`` when no plugin registered one (resolved once, then cached)."""
        spec: DispatchPolicySpec | None = self.collected.dispatch_policies.get(framework)
        if spec is None:
            return None
        key = ("dispatch_policy", framework)
        if key not in self._resolved:
            self._resolved[key] = _resolve(spec.target)
        return self._resolved[key]  # type: ignore[no-any-return]

    # ----- observers -----------------------------------------------------------------------
    def observer_spec(self, name: str) -> ObserverSpec:
        """The :class:`ObserverSpec` of observer ``name``; imports nothing."""
        return self._spec("observer", name, self.collected.observers)

    def observer(self, name: str) -> Any:
        """The observer class registered as ``name`` (resolved once, then cached)."""
        return self._target("observer", self.observer_spec(name))

    def observer_names(self) -> list[str]:
        return sorted(self.collected.observers)

    # ----- helpers -------------------------------------------------------------------------
    @staticmethod
    def _spec(kind: str, name: str, table: Mapping[str, Any]) -> Any:
        spec = table.get(name) if isinstance(name, str) else None
        if spec is None:
            raise UnknownNameError(kind, name, list(table))
        return spec

    def _target(self, kind: str, spec: Any) -> Any:
        key = (kind, spec.name)
        if key not in self._resolved:
            self._resolved[key] = _resolve(spec.target)
        return self._resolved[key]


class _Default:
    """Holds the process-wide registry. A plain class attribute rather than
    ``functools.cache``: ``torch.compile`` ignores cache wrappers and would re-run the
    constructor (pluggy) inside the traced graph; an attribute read is traced as a constant."""

    registry: Registry | None = None


def default_registry() -> Registry:
    """The process-wide registry, created (and entry points loaded) on first use."""
    if _Default.registry is None:
        _Default.registry = Registry()
    return _Default.registry


def backend_for(x: Any) -> Backend:
    """Shortcut: the default registry's backend for array ``x``."""
    return default_registry().backend_for(x)


def get_backend(name_or_backend: str | Backend) -> Backend:
    """A backend instance from a name or an instance."""
    if isinstance(name_or_backend, Backend):
        return name_or_backend
    return default_registry().backend(name_or_backend)
