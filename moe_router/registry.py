"""The plugin registry: backends, strategies and complexity estimators, loaded lazily (pluggy).

Lookup of a backend for an array follows einops: only frameworks already in ``sys.modules`` are
considered (so routing a NumPy array never imports torch), the backend class is imported on first
use, and the answer is cached per array type.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from typing import Any

import pluggy

from . import hookspecs
from .backend import Backend
from .errors import BackendNotFoundError, UnknownNameError

ENTRY_POINT_GROUP = "moe_router"


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A lazily imported backend: ``target`` is ``"module:Class"``."""

    name: str
    target: str
    framework: str


def _resolve(target: str | Callable[..., Any]) -> Any:
    if not isinstance(target, str):
        return target
    module_name, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


class Registrar:
    """What a plugin's ``moe_router_register_*`` hook receives; collects names and targets."""

    def __init__(self) -> None:
        self.backends: dict[str, BackendSpec] = {}
        self.strategies: dict[str, str | Callable[..., Any]] = {}
        self.estimators: dict[str, str | Callable[..., Any]] = {}

    def backend(self, name: str, target: str, *, framework: str) -> None:
        """Register backend ``name`` implemented by ``target`` (``"module:Class"``)."""
        self.backends[name] = BackendSpec(name, target, framework)

    def strategy(self, name: str, target: str | Callable[..., Any]) -> None:
        """Register routing strategy ``name`` (a function or ``"module:function"``)."""
        self.strategies[name] = target

    def estimator(self, name: str, target: str | Callable[..., Any]) -> None:
        """Register complexity estimator ``name`` (a function or ``"module:function"``)."""
        self.estimators[name] = target


class Registry:
    """A pluggy ``PluginManager`` plus the collected backends, strategies and estimators."""

    def __init__(self, *, load_entry_points: bool = True) -> None:
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)
        from . import _builtins

        self.plugin_manager.register(_builtins, name="moe_router.builtins")
        if load_entry_points:
            self.plugin_manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        self._collected: Registrar | None = None
        self._instances: dict[str, Backend] = {}
        self._by_type: dict[type, str] = {}
        self._functions: dict[tuple[str, str], Callable[..., Any]] = {}

    # ----- plugins -------------------------------------------------------------------------
    def register(self, plugin: Any, name: str | None = None) -> None:
        """Add a plugin object or module at run time (its hooks are collected again)."""
        self.plugin_manager.register(plugin, name=name)
        self._forget()

    def unregister(self, plugin: Any) -> None:
        self.plugin_manager.unregister(plugin)
        self._forget()

    def _forget(self) -> None:
        self._collected = None
        self._by_type.clear()
        self._instances.clear()
        self._functions.clear()

    @property
    def collected(self) -> Registrar:
        if self._collected is None:
            registrar = Registrar()
            hook = self.plugin_manager.hook
            hook.moe_router_register_backends(registrar=registrar)
            hook.moe_router_register_strategies(registrar=registrar)
            hook.moe_router_register_estimators(registrar=registrar)
            self._collected = registrar
        return self._collected

    # ----- lookups -------------------------------------------------------------------------
    def backend_names(self) -> list[str]:
        return sorted(self.collected.backends)

    def backend(self, name: str) -> Backend:
        """The backend registered as ``name`` (imports its framework)."""
        if name not in self._instances:
            spec = self.collected.backends.get(name)
            if spec is None:
                raise UnknownNameError("backend", name, list(self.collected.backends))
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

    def strategy(self, name: str) -> Callable[..., Any]:
        """The routing strategy function registered as ``name`` (resolved once, then cached)."""
        return self._function("strategy", name, self.collected.strategies)

    def estimator(self, name: str) -> Callable[..., Any]:
        """The complexity estimator registered as ``name`` (resolved once, then cached)."""
        return self._function("complexity_estimator", name, self.collected.estimators)

    def strategy_names(self) -> list[str]:
        return sorted(self.collected.strategies)

    def estimator_names(self) -> list[str]:
        return sorted(self.collected.estimators)

    def _function(self, kind: str, name: str,
                  table: dict[str, str | Callable[..., Any]]) -> Callable[..., Any]:
        key = (kind, name)
        if key not in self._functions:
            if name not in table:
                raise UnknownNameError(kind, name, list(table))
            self._functions[key] = _resolve(table[name])
        return self._functions[key]


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
