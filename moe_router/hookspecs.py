"""Every pluggy hook of moe-router, in the order the registry calls them.

A plugin is a module or object with functions marked ``@moe_router.hookimpl``; it is found through
the entry-point group ``moe_router`` (``[project.entry-points.moe_router]`` in its pyproject) or
registered at run time with ``moe_router.registry.default_registry().register(plugin)``.
Plugins register *names and import strings* on a registrar object, so loading a plugin never
imports a framework: the backend class is imported the first time an array of its framework is
routed.

Every hook receives a :class:`moe_router.registrar.Registrar`. A plugin module imports only
``hookimpl`` from here (this module imports nothing else of moe_router at run time), so loading
plugins can never form an import cycle.

Example::

    from moe_router.hookspecs import hookimpl

    @hookimpl
    def moe_router_register_backends(registrar):
        registrar.backend("cupy", "my_pkg.cupy_backend:CupyBackend", framework="cupy")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registrar import Registrar

PROJECT = "moe_router"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def moe_router_register_backends(registrar: Registrar) -> None:
    """Register array backends with ``registrar.backend(name, "module:Class", framework=...)``.

    ``framework`` is the top-level module of the array library (``"torch"``); the backend is only
    considered for an array once that module is imported by the user.
    """


@hookspec
def moe_router_register_strategies(registrar: Registrar) -> None:
    """Register routing strategies with ``registrar.strategy(name, fn_or_"module:function",
    **metadata)``.

    A strategy is ``fn(ctx: moe_router.routing.RoutingContext) -> moe_router.routing.Selection``
    written against ``ctx.backend`` primitives only, so it runs on every framework. Its metadata
    (:class:`~moe_router.registrar.StrategySpec`: ``reads_k``, ``dynamic``, ``stateful``,
    ``causal_safe``, ``inputs``, ``own_capacity``, ``null_experts``) is what
    :class:`~moe_router.RouterConfig` validates against and derives ``max_slots`` from.
    """


@hookspec
def moe_router_register_estimators(registrar: Registrar) -> None:
    """Register complexity estimators with ``registrar.estimator(name, fn_or_"module:function",
    inputs=(), causal_safe=True)``.

    An estimator is ``fn(ctx: RoutingContext) -> score_T`` (float32, higher = harder token =
    more experts) used by the ``complexity`` strategy; ``inputs`` names the ``route()`` inputs
    it reads (``"hidden"``, ``"attention_probs"``, ...).
    """


@hookspec
def moe_router_register_kernels(registrar: Registrar) -> None:
    """Register expert-compute kernels with ``registrar.kernel(name, fn_or_"module:function",
    framework=None, kind="grouped", static_shapes=True, description="")`` and a framework's
    ``auto`` policy with ``registrar.dispatch_policy(framework, fn_or_"module:function")``.

    A portable kernel (``framework=None``, plain name such as ``"sorted"``) is written on Backend
    ops; a framework's kernel is named ``"<framework>:<name>"`` (``"torch:grouped_mm"``) and is
    only accepted by ``MoEConfig.dispatch`` when that framework is installed. ``kind`` is
    ``"grouped"`` (runs on expert-sorted rows) or ``"tokens"`` (runs on the tokens directly).
    """


@hookspec
def moe_router_register_observers(registrar: Registrar) -> None:
    """Register routing observers with ``registrar.observer(name, cls_or_"module:Class")``.

    An observer sees every routing plan inside the traced layer step (its counters live in the
    layer state) and is read and reset on the host; a config opts in by name with
    ``MoEConfig(observers=("expert_load", ...))``.
    """
