"""Frozen, validated configuration: :class:`RouterConfig` and :class:`MoEConfig`.

Configs are plain frozen data: hashable (they key caches and jit compilations), comparable, and
validated once in ``__post_init__`` with a :class:`~moe_router.errors.ConfigError` that names the
field, the value and what is allowed. Semantics of every routing field: ``ROUTING.md`` and
``docs/routing.md``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import sys
from collections.abc import Mapping
from typing import Any, Literal

from .config_io import (  # noqa: F401 - env_variables, ENV_ALIASES: public re-exports
    ENV_ALIASES,
    LEGACY_ESTIMATORS,
    _from_env_values,
    _from_mapping,
    _load_json,
    _read_env,
    _section,
    env_variables,
)
from .envvars import warn_unknown_env
from .errors import ConfigError, UnknownFieldError, UnknownNameError, closest
from .layer.observers import TraceConfig
from .registrar import StrategySpec
from .registry import default_registry

ACTIVATIONS = ("swiglu", "geglu", "gelu", "relu", "silu")
#: ``MoEConfig.dispatch`` value that lets the backend's dispatch policy choose (no kernel).
AUTO_DISPATCH = "auto"
NAN_POLICIES = ("raise", "raise_always", "ignore")

ScoreFunc = Literal["softmax", "sigmoid"]
DropPolicy = Literal["position", "probability"]
NoiseType = Literal["none", "normal", "gumbel", "jitter"]
NanPolicy = Literal["raise", "raise_always", "ignore"]
LossConvention = Literal["switch", "hf"]


def _check(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(field, value, allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _installed(framework: str) -> bool:
    """Whether ``framework`` can be imported (without importing it)."""
    if framework in sys.modules:
        return True
    try:
        return importlib.util.find_spec(framework) is not None
    except (ImportError, ValueError):
        return False



_HASH = "_cached_hash"


def _cached_hash(config: Any) -> int:
    """Hash of a frozen config's fields, computed once: configs key caches and jit compilations
    on every layer call, and hashing ~30 fields each time costs more than the decode step's
    routing. The cache is dropped when pickling (string hashes differ between processes)."""
    value = config.__dict__.get(_HASH)
    if value is None:
        value = hash(tuple(getattr(config, f.name) for f in dataclasses.fields(config)))
        config.__dict__[_HASH] = value
    return value


def _getstate(config: Any) -> dict[str, Any]:
    return {k: v for k, v in config.__dict__.items() if k != _HASH}


def _setstate(config: Any, state: dict[str, Any]) -> None:
    config.__dict__.update(state)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RouterConfig:
    """How tokens choose experts. Every field is documented in ``docs/routing.md``.

    Attributes:
        num_experts: E, the number of real experts (null experts excluded).
        strategy: a registered strategy: built in ``top_k, top_p, threshold, relu,
            expert_choice, hash, complexity``, or one a plugin registers through the
            ``moe_router_register_strategies`` hook. Checked when the config is built (an unknown
            name is an :class:`~moe_router.UnknownNameError` suggesting the closest name); its
            :class:`~moe_router.registrar.StrategySpec` metadata drives the checks below.
        k: experts per token of the strategies that read it (``top_k``, ``hash``,
            ``expert_choice``).
        top_p: cumulative probability for ``top_p`` (0 < p <= 1).
        threshold: cumulative probability bound for ``threshold`` (0 < t <= 1).
        min_experts / max_experts: clamp of dynamic strategies; ``max_experts`` (K) is also the
            static width of the routing plan. ``None`` means ``min(k, num_experts)`` for fixed-k
            strategies (``top_k``, ``hash``) and ``num_experts`` for the others.
        target_experts: desired mean experts/token for ``complexity`` and the top-p controller.
            ``None`` (the default) means ``(min_experts + max_experts) / 2`` for complexity
            routing, and no controller for ``top_p`` (the fixed ``top_p`` is used as is).
        score_func: ``softmax`` or ``sigmoid`` scores.
        normalize_weights: renormalize the selected weights; ``None`` = the strategy's default.
        capacity_factor: ``None`` = dropless; else C = ceil(cf * T * k_nominal / E) slots/expert.
        drop_policy: who keeps capacity: ``position`` (first choices first, then token order)
            or ``probability`` (batch-prioritized by weight).
        num_null_experts: N extra router outputs that cost nothing (AdaMoE).
        use_expert_bias: add the aux-loss-free balancing bias to the selection scores.
        bias_update_rate: u in ``b += u * sign(mean_load - load)``.
        num_groups / topk_groups: DeepSeek-V3 group-limited routing.
        route_scale: multiplier applied to the final weights (DeepSeek ``routed_scaling_factor``).
        complexity_estimator: a registered estimator for ``complexity``: built in
            ``router_entropy`` (default), ``hidden_norm``, ``attention_entropy``, ``external``,
            or a plugin's (checked when the config is built).
        complexity_spread: width w of the k ramp around ``target_experts`` (``None`` = widest
            symmetric ramp that fits in [min_experts, max_experts]).
        noise / noise_std: router noise, applied only when routing with ``training=True``.
        aux_loss_coef / z_loss_coef / entropy_loss_coef: loss weights in ``plan.losses.total``.
        balance_convention: ``switch`` (1.0 at balance) or ``hf`` (transformers' Mixtral).
        causal: the model is autoregressive; strategies (and estimators) registered with
            ``causal_safe=False``, which look across the tokens of the batch, are refused.
        controller_rate: step size of the top-p / complexity controllers (training only).
        hash_seed / hash_buckets: the fixed random table of ``hash`` routing.
        nan_policy: what to do with NaN/Inf router logits: ``raise`` (default) checks them
            eagerly only when the logits are in host memory (CPU), so no device-to-host sync is
            added on accelerators; ``raise_always`` checks eagerly on every device (one sync per
            call: for debugging); ``ignore`` never checks. Traced calls are never checked.
        balanced_debug: route tokens round-robin (ignore the logits) to debug balance issues.
    """

    num_experts: int
    strategy: str = "top_k"
    k: int = 2
    top_p: float = 0.4
    threshold: float = 0.9
    min_experts: int = 1
    max_experts: int | None = None
    target_experts: float | None = None
    score_func: ScoreFunc = "softmax"
    normalize_weights: bool | None = None
    capacity_factor: float | None = None
    drop_policy: DropPolicy = "position"
    num_null_experts: int = 0
    use_expert_bias: bool = False
    bias_update_rate: float = 1e-3
    num_groups: int | None = None
    topk_groups: int | None = None
    route_scale: float = 1.0
    complexity_estimator: str = "router_entropy"
    complexity_spread: float | None = None
    noise: NoiseType = "none"
    noise_std: float = 1.0
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    entropy_loss_coef: float = 0.0
    balance_convention: LossConvention = "switch"
    causal: bool = False
    controller_rate: float = 0.01
    hash_seed: int = 0
    hash_buckets: int = 65536
    nan_policy: NanPolicy = "raise"
    balanced_debug: bool = False

    __hash__ = _cached_hash
    __getstate__ = _getstate
    __setstate__ = _setstate

    def __post_init__(self) -> None:  # noqa: C901 - one flat list of checks reads best
        E = self.num_experts
        _check(_is_int(E) and E >= 1, "num_experts", E, "an int >= 1")
        registry = default_registry()
        _check(isinstance(self.strategy, str) and bool(self.strategy), "strategy", self.strategy,
               f"a registered strategy; known: {', '.join(registry.strategy_names())}")
        spec = self.strategy_spec  # UnknownNameError (a ConfigError) for an unknown name
        _check(_is_int(self.num_null_experts) and self.num_null_experts >= 0, "num_null_experts",
               self.num_null_experts, "an int >= 0")
        # k only matters to strategies that read it (the default k=2 must not stop, say,
        # RouterConfig(num_experts=1, strategy="top_p"))
        k_limit = self.num_choices if spec.reads_k else None
        _check(_is_int(self.k) and 1 <= self.k <= (k_limit or self.k), "k", self.k,
               f"an int in [1, num_experts + num_null_experts] = [1, {self.num_choices}]"
               if k_limit else "an int >= 1")
        _check(_is_number(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", self.top_p,
               "a float in (0, 1]")
        _check(_is_number(self.threshold) and 0.0 < self.threshold <= 1.0, "threshold",
               self.threshold, "a float in (0, 1]")
        _check(_is_int(self.min_experts) and 0 <= self.min_experts <= E, "min_experts",
               self.min_experts, f"an int in [0, num_experts] = [0, {E}]")
        if self.max_experts is not None:
            _check(_is_int(self.max_experts) and 1 <= self.max_experts <= E, "max_experts",
                   self.max_experts, f"an int in [1, num_experts] = [1, {E}] or None")
        _check(self.min_experts <= self.max_slots, "min_experts", self.min_experts,
               f"<= max_experts ({self.max_slots})")
        if self.target_experts is not None:
            _check(_is_number(self.target_experts)
                   and self.min_experts <= self.target_experts <= self.max_slots,
                   "target_experts", self.target_experts,
                   f"a number in [min_experts, max_experts] = "
                   f"[{self.min_experts}, {self.max_slots}]")
        _check(self.score_func in ("softmax", "sigmoid"), "score_func", self.score_func,
               "'softmax' or 'sigmoid'")
        _check(self.normalize_weights in (None, True, False), "normalize_weights",
               self.normalize_weights, "True, False or None")
        if self.capacity_factor is not None:
            _check(_is_number(self.capacity_factor) and self.capacity_factor > 0,
                   "capacity_factor", self.capacity_factor, "a number > 0 or None (dropless)")
        _check(self.drop_policy in ("position", "probability"), "drop_policy", self.drop_policy,
               "'position' or 'probability'")
        if self.num_null_experts:
            supporting = [name for name in registry.strategy_names()
                          if registry.strategy_spec(name).null_experts]
            _check(spec.null_experts, "num_null_experts", self.num_null_experts,
                   f"0 unless the strategy supports null experts "
                   f"({', '.join(supporting) or 'none registered'}; strategy={self.strategy!r} "
                   f"does not)")
        _check(_is_number(self.bias_update_rate) and self.bias_update_rate >= 0,
               "bias_update_rate", self.bias_update_rate, "a number >= 0")
        self._check_groups()
        _check(_is_number(self.route_scale) and self.route_scale > 0, "route_scale",
               self.route_scale, "a number > 0")
        _check(isinstance(self.complexity_estimator, str) and bool(self.complexity_estimator),
               "complexity_estimator", self.complexity_estimator,
               f"a registered complexity_estimator; known: "
               f"{', '.join(registry.estimator_names())}")
        if self.complexity_estimator in LEGACY_ESTIMATORS:
            real, why = LEGACY_ESTIMATORS[self.complexity_estimator]
            raise ConfigError("complexity_estimator", self.complexity_estimator,
                              f"a registered estimator: use {real!r} ({why}); the production "
                              f"router's config files and $MOE_COMPLEXITY_ESTIMATOR map the "
                              f"older name for you")
        estimator = registry.estimator_spec(self.complexity_estimator)
        if self.complexity_spread is not None:
            _check(_is_number(self.complexity_spread) and self.complexity_spread > 0,
                   "complexity_spread", self.complexity_spread, "a number > 0 or None")
        _check(self.noise in ("none", "normal", "gumbel", "jitter"), "noise", self.noise,
               "'none', 'normal', 'gumbel' or 'jitter'")
        _check(_is_number(self.noise_std) and self.noise_std >= 0, "noise_std", self.noise_std,
               "a number >= 0")
        for name in ("aux_loss_coef", "z_loss_coef", "entropy_loss_coef", "controller_rate"):
            value = getattr(self, name)
            _check(_is_number(value) and value >= 0, name, value, "a number >= 0")
        _check(self.balance_convention in ("switch", "hf"), "balance_convention",
               self.balance_convention, "'switch' or 'hf'")
        for name in ("use_expert_bias", "causal", "balanced_debug"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        if not spec.biased_selection:
            _check(not self.use_expert_bias, "use_expert_bias", self.use_expert_bias,
                   f"False for strategy={self.strategy!r}, which does not choose experts by a "
                   f"selection order the bias could shift (top_k, top_p, threshold and "
                   f"complexity do)")
            _check(self.num_groups is None, "num_groups", self.num_groups,
                   f"None for strategy={self.strategy!r}, which does not choose experts by a "
                   f"group-limited selection order (top_k, top_p, threshold and complexity do)")
        if self.causal:
            _check(spec.causal_safe, "strategy", self.strategy,
                   f"a causal-safe strategy when causal=True ({self.strategy} looks at other, "
                   f"future tokens of the batch)")
            _check(estimator.causal_safe, "complexity_estimator", self.complexity_estimator,
                   f"a causal-safe estimator when causal=True ({self.complexity_estimator} "
                   f"looks at other tokens of the batch)")
        _check(_is_int(self.hash_seed), "hash_seed", self.hash_seed, "an int")
        _check(_is_int(self.hash_buckets) and self.hash_buckets >= 1, "hash_buckets",
               self.hash_buckets, "an int >= 1")
        _check(self.nan_policy in NAN_POLICIES, "nan_policy", self.nan_policy,
               "'raise', 'raise_always' or 'ignore'")

    def _check_groups(self) -> None:
        if self.num_groups is None:
            _check(self.topk_groups is None, "topk_groups", self.topk_groups,
                   "None when num_groups is None")
            return
        E = self.num_experts
        _check(_is_int(self.num_groups) and self.num_groups >= 1 and E % self.num_groups == 0,
               "num_groups", self.num_groups, f"an int >= 1 that divides num_experts={E}")
        per_group = E // self.num_groups
        topk_groups = self.topk_groups if self.topk_groups is not None else self.num_groups
        _check(_is_int(topk_groups) and 1 <= topk_groups <= self.num_groups, "topk_groups",
               self.topk_groups, f"an int in [1, num_groups={self.num_groups}]")
        _check(topk_groups * per_group >= self.max_slots, "topk_groups", self.topk_groups,
               f"enough groups to hold max_experts={self.max_slots} experts "
               f"({per_group} experts per group)")

    # ----- derived, static quantities -------------------------------------------------------
    @property
    def strategy_spec(self) -> StrategySpec:
        """The registered metadata of ``strategy`` (:class:`~moe_router.registrar.StrategySpec`).

        Raises:
            UnknownNameError: the strategy is not registered (a :class:`ConfigError`).
        """
        return default_registry().strategy_spec(self.strategy)

    @property
    def num_choices(self) -> int:
        """Router outputs: real experts plus null experts (E + N)."""
        return self.num_experts + self.num_null_experts

    @property
    def is_dynamic(self) -> bool:
        """True when the number of experts per token varies by token."""
        return self.strategy_spec.dynamic or self.num_null_experts > 0

    @property
    def max_slots(self) -> int:
        """K, the static width of ``expert_indices`` (max experts per token)."""
        if self.max_experts is not None:
            return self.max_experts
        if self.strategy_spec.fixed_k:
            return min(self.k, self.num_experts)
        return self.num_experts

    @property
    def nominal_experts(self) -> float:
        """Experts/token used to size capacity: k for fixed-k strategies, else target_experts,
        else max_experts."""
        if self.strategy_spec.fixed_k:
            return float(min(self.k, self.num_experts))
        if self.target_experts is not None:
            return float(self.target_experts)
        return float(self.max_slots)

    def capacity(self, num_tokens: int) -> int | None:
        """Slots per expert, C = ceil(cf * T * nominal_experts / E); ``None`` when dropless."""
        if self.capacity_factor is None:
            return None
        slots = self.capacity_factor * num_tokens * self.nominal_experts / self.num_experts
        # round off float noise first: 1.1 * 25 * 2 / 5 is 11.000000000000002, C must be 11
        return max(1, math.ceil(round(slots, 9)))

    def replace(self, **changes: Any) -> RouterConfig:
        """A copy with ``changes`` applied (validated again); an unknown field raises
        :class:`~moe_router.errors.UnknownFieldError` listing the valid ones."""
        return _replace(self, changes)

    # ----- loading ---------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RouterConfig:
        """Build from a mapping; unknown keys raise a :class:`ConfigError` naming them."""
        return _from_mapping(cls, data)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> RouterConfig:
        """Build from ``MOE_*`` environment variables (see :func:`env_variables`); a ``MOE_*``
        variable moe-router does not read warns (:class:`~moe_router.envvars.
        UnknownEnvironmentWarning`), naming the closest real one."""
        env = os.environ if environ is None else environ
        warn_unknown_env(env)
        return _from_env_values(cls, _read_env(cls, env), env, overrides)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> RouterConfig:
        """Read a JSON file: top-level fields, or a ``router_config`` / ``router`` section."""
        data = _load_json(path)
        return _from_mapping(cls, _section(data, ("router_config", "router")) or data)


@dataclasses.dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """A whole MoE layer: the router plus the experts.

    Attributes:
        d_model: D, width of the tokens.
        d_ff: F, hidden width of one expert.
        router: the :class:`RouterConfig`.
        activation: ``swiglu`` / ``geglu`` (gated, three matrices) or ``gelu`` / ``relu`` /
            ``silu``.
        num_shared_experts: always-on experts; stored as one FFN of width ``shared_d_ff``.
        shared_d_ff: width of the shared FFN (``None`` = ``d_ff * num_shared_experts``).
        shared_expert_gate: scale the shared output by sigmoid(x @ w) (Qwen2-MoE).
        router_bias: give the router linear layer a bias.
        init_std: std of the normal initialisation of all weights.
        dispatch: expert-compute kernel. ``auto`` (default) lets the framework's dispatch
            policy pick the fastest exact one; a portable kernel runs on every framework
            (built in: ``sorted``, ``capacity``, ``dense``, ``gather``); a framework's own kernel
            is qualified ``"<framework>:<name>"`` (``"torch:grouped_mm"``, ``"jax:tiles"``,
            ``"tensorflow:split"``, ...) and is accepted only when that framework is installed.
            ``capacity`` needs ``router.capacity_factor`` (or a strategy that sizes its own
            capacity, such as ``expert_choice``).
        observers: names of registered observers to run on every routing plan (opt in; built
            in: ``expert_load``, ``routing_stats``). A list is stored as a tuple, so the config
            stays hashable.
        trace: a :class:`~moe_router.layer.observers.TraceConfig` (or its dict) turns on the
            per-token routing trace (observer ``routing_trace``); ``None`` (default) = off.
    """

    d_model: int
    d_ff: int
    router: RouterConfig
    activation: str = "swiglu"
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    router_bias: bool = False
    init_std: float = 0.02
    dispatch: str = AUTO_DISPATCH
    observers: tuple[str, ...] = ()
    trace: TraceConfig | None = None

    __hash__ = _cached_hash
    __getstate__ = _getstate
    __setstate__ = _setstate

    def __post_init__(self) -> None:
        _check(_is_int(self.d_model) and self.d_model >= 1, "d_model", self.d_model, "an int >= 1")
        _check(_is_int(self.d_ff) and self.d_ff >= 1, "d_ff", self.d_ff, "an int >= 1")
        _check(isinstance(self.router, RouterConfig), "router", self.router, "a RouterConfig")
        _check(self.activation in ACTIVATIONS, "activation", self.activation,
               f"one of {', '.join(ACTIVATIONS)}")
        _check(_is_int(self.num_shared_experts) and self.num_shared_experts >= 0,
               "num_shared_experts", self.num_shared_experts, "an int >= 0")
        if self.shared_d_ff is not None:
            _check(_is_int(self.shared_d_ff) and self.shared_d_ff >= 1, "shared_d_ff",
                   self.shared_d_ff, "an int >= 1 or None")
        for name in ("shared_expert_gate", "router_bias"):
            _check(isinstance(getattr(self, name), bool), name, getattr(self, name), "a bool")
        _check(not self.shared_expert_gate or self.has_shared, "shared_expert_gate",
               self.shared_expert_gate, "False when there is no shared expert")
        _check(_is_number(self.init_std) and self.init_std > 0, "init_std", self.init_std,
               "a number > 0")
        self._check_dispatch()
        self._check_observers()
        if isinstance(self.trace, Mapping):
            object.__setattr__(self, "trace", _from_mapping(TraceConfig, self.trace))
        _check(self.trace is None or isinstance(self.trace, TraceConfig), "trace", self.trace,
               "None, a TraceConfig or its dict (capacity, tokens_per_call)")

    def _check_dispatch(self) -> None:
        registry = default_registry()
        portable = [AUTO_DISPATCH, *(name for name in registry.kernel_names()
                                     if registry.kernel_spec(name).framework is None)]
        qualified = [name for name in registry.kernel_names() if name not in portable]
        allowed = (f"a registered kernel: 'auto', a portable one ({', '.join(portable)}) or a "
                   f"'<framework>:<kernel>' one of an installed framework "
                   f"({', '.join(qualified) or 'none registered'})")
        name = self.dispatch
        _check(isinstance(name, str) and bool(name), "dispatch", name, allowed)
        if name == AUTO_DISPATCH:
            return
        if name not in portable and name not in qualified:
            same_short = [q for q in qualified if q.rpartition(":")[2] == name]
            raise UnknownNameError(
                "kernel", name, [*portable, *qualified], field="dispatch",
                expected="a registered kernel: 'auto', a portable one or "
                         "'<framework>:<kernel>' of an installed framework",
                suggestions=same_short or None)
        framework = registry.kernel_spec(name).framework
        if framework is not None:
            _check(_installed(framework), "dispatch", name,
                   f"a kernel of an installed framework ({name!r} needs {framework!r}, which is "
                   f"not installed); portable: {', '.join(portable)}")
        if name == "capacity":
            _check(self.router.capacity_factor is not None or self.router.strategy_spec
                   .own_capacity, "dispatch", name,
                   f"a dropless kernel when router.capacity_factor is None ('capacity' needs a "
                   f"capacity; strategy={self.router.strategy!r} sizes none itself)")

    def _check_observers(self) -> None:
        observers = self.observers
        if isinstance(observers, list):
            observers = tuple(observers)
            object.__setattr__(self, "observers", observers)
        registry = default_registry()
        known = registry.observer_names()
        what = f"a tuple of registered observer names (known: {', '.join(known) or 'none'})"
        _check(isinstance(observers, tuple) and all(isinstance(o, str) for o in observers),
               "observers", observers, what)
        for name in observers:
            if name not in known:
                hint = closest(name, known)
                raise ConfigError("observers", observers, f"{what}; {name!r} is not registered"
                                  + (f" (did you mean {hint!r}?)" if hint else ""))
        _check(len(set(observers)) == len(observers), "observers", observers,
               f"{what}, each named once")

    @property
    def num_experts(self) -> int:
        return self.router.num_experts

    @property
    def is_gated(self) -> bool:
        """True for GLU experts (three matrices: gate, up, down)."""
        return self.activation in ("swiglu", "geglu")

    @property
    def has_shared(self) -> bool:
        return self.num_shared_experts > 0 or self.shared_d_ff is not None

    @property
    def shared_width(self) -> int:
        """Hidden width of the shared FFN (0 when there is none)."""
        if self.shared_d_ff is not None:
            return self.shared_d_ff
        return self.d_ff * self.num_shared_experts

    @property
    def expert_flops_per_token(self) -> int:
        """Multiply-add FLOPs (2 per MAC) of one routed expert for one token."""
        matrices = 3 if self.is_gated else 2
        return 2 * matrices * self.d_model * self.d_ff

    def replace(self, **changes: Any) -> MoEConfig:
        """A copy with ``changes`` applied (validated again; unknown fields are refused)."""
        return _replace(self, changes)

    def with_router(self, **changes: Any) -> MoEConfig:
        """A copy whose router has ``changes`` applied, e.g. ``strategy='top_p'``."""
        return dataclasses.replace(self, router=self.router.replace(**changes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoEConfig:
        data = dict(data)
        router = _section(data, ("router_config", "router"))
        for key in ("router_config", "router"):
            data.pop(key, None)
        if not isinstance(router, RouterConfig):
            router = RouterConfig.from_dict(router or {})
        return _from_mapping(cls, {**data, "router": router})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> MoEConfig:
        """Build from ``MOE_*`` variables: router fields and ``MOE_INPUT_DIM`` (d_model) etc."""
        env = os.environ if environ is None else environ
        warn_unknown_env(env)
        values = _read_env(cls, env)
        values.pop("router", None)
        if "router" not in overrides:
            values["router"] = _from_env_values(RouterConfig, _read_env(RouterConfig, env), env,
                                                {})
        return _from_env_values(cls, values, env, overrides)

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> MoEConfig:
        """Read JSON: fields at top level or under ``moe_config``; router in ``router_config``."""
        data = _load_json(path)
        moe = _section(data, ("moe_config", "moe")) or data
        if _section(moe, ("router_config", "router")) is None:
            moe = {**moe, "router_config": _section(data, ("router_config", "router")) or {}}
        return cls.from_dict(moe)


def _replace(config: Any, changes: Mapping[str, Any]) -> Any:
    fields = [f.name for f in dataclasses.fields(config)]
    for name in changes:
        if name not in fields:
            hint = closest(name, fields)
            raise UnknownFieldError(name, changes[name], f"a {type(config).__name__} field"
                                    + (f" (did you mean {hint!r}?)" if hint else "")
                                    + f"; valid fields: {', '.join(fields)}")
    return dataclasses.replace(config, **changes)
