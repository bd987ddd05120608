"""Typed errors raised by moe-router.

Every error names the offending argument or field, the value received and what is allowed, so a
user can fix the call without reading our source.

Every class can also be rebuilt from its message alone: ``type(err)(str(err))`` gives an error of
the same type and message (Keras re-raises exceptions that way, and pickling needs it). The
structured attributes (``field``, ``argument``, ...) are then parsed back from the message on a
best-effort basis.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Iterable, Sequence
from typing import Any


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()

#: ``"<field>=<value> is invalid: expected <allowed>"``; the field label may say where it came
#: from (``"strategy (from $MOE_ROUTING_STRATEGY)"``) but holds no ``=``.
_CONFIG_MESSAGE = re.compile(r"^(?P<field>[^=\s][^=]*?)=(?P<value>.*?) is invalid"
                             r"(?:: expected (?P<allowed>.*))?$", re.DOTALL)
_ARGUMENT_PREFIX = re.compile(r"^(?P<argument>[^\s:][^\s]*?): (?P<problem>.*)$", re.DOTALL)
_REGISTERED = re.compile(r"a registered (?P<kind>\w+)")
_KNOWN = re.compile(r"; known: (?P<known>.*)$", re.DOTALL)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def closest(name: Any, known: Iterable[str]) -> str | None:
    """The known name closest to ``name`` (``difflib``), or ``None`` when none is close."""
    if not isinstance(name, str):
        return None
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return matches[0] if matches else None


class MoERouterError(Exception):
    """Base class of every error moe-router raises on purpose."""


class ConfigError(MoERouterError, ValueError):
    """A config field has a value outside what is allowed.

    ``ConfigError(field, value, allowed)`` gives the message
    ``"<field>=<value!r> is invalid: expected <allowed>"``; ``ConfigError(message)`` keeps the
    message as is and parses ``field`` / ``value`` / ``allowed`` back from it when it has that
    form (else ``field`` is ``None``).
    """

    field: str | None
    value: Any
    allowed: str | None

    def __init__(self, field_or_message: str, value: Any = _MISSING,
                 allowed: str | None = None) -> None:
        if value is _MISSING:
            message = str(field_or_message)
            match = _CONFIG_MESSAGE.match(message)
            if match:
                self.field = match["field"]
                self.value = _literal(match["value"])
                self.allowed = match["allowed"]
            else:
                self.field, self.value, self.allowed = None, None, None
        else:
            self.field, self.value, self.allowed = field_or_message, value, allowed
            message = f"{field_or_message}={value!r} is invalid"
            if allowed is not None:
                message += f": expected {allowed}"
        super().__init__(message)

    def with_field(self, field: str) -> ConfigError:
        """The same error about ``field`` (a label such as ``"k (from $MOE_TOP_K)"``)."""
        return ConfigError(field, self.value, self.allowed)


class _ArgumentError(MoERouterError):
    """Shared constructor of :class:`InputError` and :class:`InputTypeError`."""

    argument: str | None
    problem: str

    def __init__(self, argument_or_message: str, problem: str | None = None) -> None:
        if problem is None:
            message = str(argument_or_message)
            match = _ARGUMENT_PREFIX.match(message)
            if match:
                self.argument, self.problem = match["argument"], match["problem"]
            else:
                self.argument, self.problem = None, message
        else:
            self.argument, self.problem = argument_or_message, problem
            message = f"{argument_or_message}: {problem}"
        super().__init__(message)


class InputError(_ArgumentError, ValueError):
    """An input array has the wrong rank, shape, dtype or values.

    ``InputError(argument, problem)`` gives ``"<argument>: <problem>"``; ``InputError(message)``
    keeps the message and parses ``argument`` from an ``"<argument>: "`` prefix.
    """


class InputTypeError(_ArgumentError, TypeError):
    """An input array has an unsupported dtype or type (constructed like :class:`InputError`)."""


class BackendNotFoundError(MoERouterError, LookupError):
    """No registered backend handles the given array type (or the named backend is unknown)."""


class UnknownNameError(ConfigError):
    """A strategy, estimator, kernel, observer or backend name is not registered.

    A :class:`ConfigError` (so a ``ValueError``) whose ``field`` is the config field (by default
    the ``kind`` of name), with ``kind``, ``name`` and ``known`` (the registered names) and a
    suggestion of the closest known name::

        strategy='topk' is invalid: expected a registered strategy (did you mean 'top_k'?);
        known: complexity, expert_choice, ...

    ``UnknownNameError(message)`` rebuilds one from its message (attributes parsed back).

    Args:
        kind_or_message: what kind of name (``"strategy"``), or a whole message.
        name: the name asked for.
        known: the registered names.
        field: the config field or argument that held the name (default: ``kind``).
        expected: what is allowed, in words (default: ``"a registered <kind>"``).
        suggestions: names to suggest (default: the closest known name, if any is close).
    """

    kind: str | None
    name: Any
    known: list[str]

    def __init__(self, kind_or_message: str, name: Any = _MISSING,
                 known: Iterable[str] | None = None, *, field: str | None = None,
                 expected: str | None = None,
                 suggestions: Sequence[str] | None = None) -> None:
        if name is _MISSING:
            super().__init__(kind_or_message)
            registered = _REGISTERED.search(self.allowed or "")
            listed = _KNOWN.search(self.allowed or "")
            self.kind = registered["kind"] if registered else self.field
            self.name = self.value
            self.known = listed["known"].split(", ") if listed and listed["known"] != "none" \
                else []
            return
        self.kind, self.name, self.known = kind_or_message, name, sorted(known or ())
        if suggestions is None:
            best = closest(name, self.known)
            suggestions = [best] if best else []
        allowed = expected or f"a registered {kind_or_message}"
        if suggestions:
            allowed += f" (did you mean {' or '.join(repr(s) for s in suggestions)}?)"
        allowed += f"; known: {', '.join(self.known) or 'none'}"
        super().__init__(field or kind_or_message, name, allowed)

    def with_field(self, field: str) -> UnknownNameError:
        err = UnknownNameError(f"{field}={self.value!r} is invalid: expected {self.allowed}")
        err.kind, err.name, err.known = self.kind, self.name, list(self.known)
        return err


class UnknownFieldError(ConfigError, TypeError):
    """A change names no field of the config: a :class:`ConfigError` naming it (with the valid
    fields and the closest one), and a ``TypeError`` like the one ``dataclasses.replace``
    raises."""
