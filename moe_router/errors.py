"""Typed errors raised by moe-router.

Every error names the offending argument or field, the value received and what is allowed, so a
user can fix the call without reading our source.
"""

from __future__ import annotations

from typing import Any


class MoERouterError(Exception):
    """Base class of every error moe-router raises on purpose."""


class ConfigError(MoERouterError, ValueError):
    """A config field has a value outside what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field, self.value, self.allowed = field, value, allowed
        super().__init__(f"{field}={value!r} is invalid: expected {allowed}")


class InputError(MoERouterError, ValueError):
    """An input array has the wrong rank, shape, dtype or values."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument, self.problem = argument, problem
        super().__init__(f"{argument}: {problem}")


class InputTypeError(MoERouterError, TypeError):
    """An input array has an unsupported dtype or type."""

    def __init__(self, argument: str, problem: str) -> None:
        self.argument, self.problem = argument, problem
        super().__init__(f"{argument}: {problem}")


class BackendNotFoundError(MoERouterError, LookupError):
    """No registered backend handles the given array type (or the named backend is unknown)."""


class UnknownNameError(MoERouterError, KeyError):
    """A strategy, estimator or backend name is not registered."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; known: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0])
