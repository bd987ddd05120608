"""Every pluggy hook of moe-router, in the order the registry calls them.

A plugin is a module or object with functions marked ``@moe_router.hookimpl``; it is found through
the entry-point group ``moe_router`` (``[project.entry-points.moe_router]`` in its pyproject) or
registered at run time with ``moe_router.registry.default_registry().register(plugin)``.
Plugins register *names and import strings* on a registrar object, so loading a plugin never
imports a framework: the backend class is imported the first time an array of its framework is
routed.

Example::

    from moe_router import hookimpl

    @hookimpl
    def moe_router_register_backends(registrar):
        registrar.backend("cupy", "my_pkg.cupy_backend:CupyBackend", framework="cupy")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from .registry import Registrar

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
    """Register routing strategies with ``registrar.strategy(name, fn_or_"module:function")``.

    A strategy is ``fn(ctx: moe_router.routing.RoutingContext) -> moe_router.routing.Selection``
    written against ``ctx.backend`` primitives only, so it runs on every framework.
    """


@hookspec
def moe_router_register_estimators(registrar: Registrar) -> None:
    """Register complexity estimators with ``registrar.estimator(name, fn_or_"module:function")``.

    An estimator is ``fn(ctx: RoutingContext) -> score_T`` (float32, higher = harder token =
    more experts) used by the ``complexity`` strategy.
    """
