"""What a plugin's ``moe_router_register_*`` hooks receive: a :class:`Registrar` and its specs.

A leaf module: it imports nothing from moe_router, so hookspecs, the built-in plugin, third-party
plugins and the registry can all use it without an import cycle. Plugins register *names and
import strings* (``"package.module:name"``) with their metadata; the registry resolves a target
the first time it is used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

#: A registered implementation: ``"module:attribute"`` (imported on first use) or the object.
Target = str | Callable[..., Any]

#: Optional ``route()`` inputs a strategy or estimator may need (``StrategySpec.inputs``).
ROUTE_INPUTS = ("token_ids", "hidden", "attention_probs", "complexity_scores")

#: How a kernel consumes tokens (``KernelSpec.kind``).
KERNEL_KINDS = ("grouped", "tokens")

KernelKind = Literal["grouped", "tokens"]


def _check_name(what: str, name: Any) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} name must be a non-empty str, got {name!r}")


def _check_target(what: str, target: Any) -> None:
    if isinstance(target, str):
        if not target or target.startswith(":"):
            raise ValueError(f"{what} target must be 'module:attribute' or a callable, got "
                             f"{target!r}")
    elif not callable(target):
        raise ValueError(f"{what} target must be 'module:attribute' or a callable, got "
                         f"{target!r}")


def _check_flags(spec: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(spec, name)
        if not isinstance(value, bool):
            raise TypeError(f"{type(spec).__name__}.{name} must be a bool, got {value!r}")


def _inputs(spec: Any) -> None:
    inputs = tuple(spec.inputs) if not isinstance(spec.inputs, str) else (spec.inputs,)
    unknown = [name for name in inputs if name not in ROUTE_INPUTS]
    if unknown:
        raise ValueError(f"{type(spec).__name__}({spec.name!r}).inputs: {unknown} are not "
                         f"route() inputs; allowed: {', '.join(ROUTE_INPUTS)}")
    object.__setattr__(spec, "inputs", inputs)


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A lazily imported backend: ``target`` is ``"module:Class"``; ``framework`` the top-level
    module of its array library (the backend is only considered once that is imported)."""

    name: str
    target: str
    framework: str


@dataclasses.dataclass(frozen=True)
class StrategySpec:
    """A routing strategy and what the core needs to know about it.

    Attributes:
        name: the ``RouterConfig.strategy`` value.
        target: ``fn(ctx: RoutingContext) -> Selection`` or ``"module:function"``.
        reads_k: ``k`` matters (validated against ``num_experts + num_null_experts``).
        dynamic: the number of experts per token varies by token. A strategy that reads ``k``
            and is not dynamic is *fixed-k*: ``max_slots = min(k, E)`` and
            ``nominal_experts = k``.
        stateful: reads / updates the ``RouterState`` controller.
        causal_safe: ``False`` when a token's routing looks at other tokens of the batch
            (refused with ``causal=True``).
        inputs: extra ``route()`` inputs it needs, among :data:`ROUTE_INPUTS`.
        own_capacity: interprets ``capacity_factor`` itself (expert choice), so ``route()`` does
            not apply the generic capacity.
        null_experts: supports ``num_null_experts``.
        normalizes: its weights are renormalized over a token's experts when
            ``normalize_weights`` is ``None`` (also the default of forced / replayed routing).
        biased_selection: its choice of experts follows the selection order (the aux-free
            balancing bias of ``use_expert_bias`` and the groups of ``num_groups``); a config
            asking either of a strategy without it is refused.
    """

    name: str
    target: Target
    reads_k: bool = False
    dynamic: bool = True
    stateful: bool = False
    causal_safe: bool = True
    inputs: tuple[str, ...] = ()
    own_capacity: bool = False
    null_experts: bool = False
    normalizes: bool = False
    biased_selection: bool = False

    def __post_init__(self) -> None:
        _check_name("strategy", self.name)
        _check_target("strategy", self.target)
        _check_flags(self, ("reads_k", "dynamic", "stateful", "causal_safe", "own_capacity",
                            "null_experts"))
        _inputs(self)

    @property
    def fixed_k(self) -> bool:
        """Every token gets exactly ``min(k, E)`` experts (before capacity)."""
        return self.reads_k and not self.dynamic


@dataclasses.dataclass(frozen=True)
class EstimatorSpec:
    """A complexity estimator (``fn(ctx) -> score_T``) and what it needs.

    Attributes:
        inputs: extra ``route()`` inputs it needs, among :data:`ROUTE_INPUTS`.
        causal_safe: ``False`` when a token's score depends on other tokens of the batch.
    """

    name: str
    target: Target
    inputs: tuple[str, ...] = ()
    causal_safe: bool = True

    def __post_init__(self) -> None:
        _check_name("estimator", self.name)
        _check_target("estimator", self.target)
        _check_flags(self, ("causal_safe",))
        _inputs(self)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """An expert-compute implementation, selected by ``MoEConfig.dispatch``.

    Attributes:
        name: a portable kernel (``framework=None``) has a plain name (``"sorted"``); a
            framework's kernel is qualified ``"<framework>:<name>"`` (``"torch:grouped_mm"``).
        target: the function or ``"module:function"``.
        framework: top-level module of the framework it needs, or ``None`` (Backend ops only).
        kind: ``"grouped"`` runs on expert-sorted rows; ``"tokens"`` runs on the tokens.
        static_shapes: every shape is known at trace time (``jit`` / XLA friendly).
        description: one line for docs and ``moe-router info``.
    """

    name: str
    target: Target
    framework: str | None = None
    kind: KernelKind = "grouped"
    static_shapes: bool = True
    description: str = ""

    def __post_init__(self) -> None:
        _check_name("kernel", self.name)
        _check_target("kernel", self.target)
        if self.kind not in KERNEL_KINDS:
            raise ValueError(f"kernel {self.name!r}: kind must be one of {KERNEL_KINDS}, got "
                             f"{self.kind!r}")
        _check_flags(self, ("static_shapes",))
        if not isinstance(self.description, str):
            raise TypeError(f"kernel {self.name!r}: description must be a str")
        if self.framework is None:
            if ":" in self.name or self.name == "auto":
                raise ValueError(f"portable kernel name {self.name!r} must not contain ':' nor "
                                 "be 'auto' (pass framework=... for a framework's kernel)")
            return
        _check_name("kernel framework", self.framework)
        prefix, sep, short = self.name.partition(":")
        if not sep or prefix != self.framework or not short or ":" in short:
            raise ValueError(f"a {self.framework} kernel must be named "
                             f"'{self.framework}:<name>', got {self.name!r}")

    @property
    def short_name(self) -> str:
        """The name without its framework prefix (``"grouped_mm"`` for ``"torch:grouped_mm"``)."""
        return self.name.rpartition(":")[2]


@dataclasses.dataclass(frozen=True)
class DispatchPolicySpec:
    """A framework's ``auto`` policy: ``target`` maps a portable dispatch name (and the shapes it
    is given) to the name of the kernel to run on that framework."""

    framework: str
    target: Target

    def __post_init__(self) -> None:
        _check_name("dispatch policy framework", self.framework)
        _check_target("dispatch policy", self.target)


@dataclasses.dataclass(frozen=True)
class ObserverSpec:
    """A routing observer (opt in with ``MoEConfig.observers``): ``target`` is its class."""

    name: str
    target: Target

    def __post_init__(self) -> None:
        _check_name("observer", self.name)
        _check_target("observer", self.target)


class Registrar:
    """What a plugin's ``moe_router_register_*`` hook receives; collects names, targets and
    metadata. A later registration of the same name replaces the earlier one (pluggy calls the
    most recently registered plugin first, so the built-ins, called last, keep their names)."""

    def __init__(self) -> None:
        self.backends: dict[str, BackendSpec] = {}
        self.strategies: dict[str, StrategySpec] = {}
        self.estimators: dict[str, EstimatorSpec] = {}
        self.kernels: dict[str, KernelSpec] = {}
        self.dispatch_policies: dict[str, DispatchPolicySpec] = {}
        self.observers: dict[str, ObserverSpec] = {}

    def backend(self, name: str, target: str, *, framework: str) -> None:
        """Register backend ``name`` implemented by ``target`` (``"module:Class"``)."""
        self.backends[name] = BackendSpec(name, target, framework)

    def strategy(self, name: str, target: Target, **metadata: Any) -> None:
        """Register routing strategy ``name`` (a function or ``"module:function"``).

        ``metadata``: the :class:`StrategySpec` fields ``reads_k``, ``dynamic``, ``stateful``,
        ``causal_safe``, ``inputs``, ``own_capacity``, ``null_experts``, ``normalizes``.
        """
        self.strategies[name] = StrategySpec(name, target, **metadata)

    def estimator(self, name: str, target: Target, **metadata: Any) -> None:
        """Register complexity estimator ``name`` (a function or ``"module:function"``).

        ``metadata``: the :class:`EstimatorSpec` fields ``inputs`` and ``causal_safe``.
        """
        self.estimators[name] = EstimatorSpec(name, target, **metadata)

    def kernel(self, name: str, target: Target, *, framework: str | None = None,
               kind: KernelKind = "grouped", static_shapes: bool = True,
               description: str = "") -> None:
        """Register expert-compute kernel ``name``; see :class:`KernelSpec`.

        Raises:
            ValueError: a framework kernel whose name is not ``"<framework>:<name>"``, or a
                portable kernel (``framework=None``) whose name is qualified.
        """
        self.kernels[name] = KernelSpec(name, target, framework, kind, static_shapes,
                                        description)

    def dispatch_policy(self, framework: str, target: Target) -> None:
        """Register ``framework``'s function mapping a portable dispatch name to a kernel name."""
        self.dispatch_policies[framework] = DispatchPolicySpec(framework, target)

    def observer(self, name: str, target: Target) -> None:
        """Register routing observer ``name`` (a class or ``"module:Class"``)."""
        self.observers[name] = ObserverSpec(name, target)
