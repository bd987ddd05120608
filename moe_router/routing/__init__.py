"""Routing strategies written once against the Backend interface.

``route()`` itself lives in :mod:`moe_router.api`; this package holds what strategies see
(:class:`RoutingContext`), what they return (:class:`Selection`) and the built-in strategies.
"""

from .context import RoutingContext, Selection

__all__ = ["RoutingContext", "Selection"]
