"""The pluggy registry: third-party backends, strategies, estimators, kernels, dispatch policies
and observers installed through hooks, with their metadata.

A toy third-party "framework" (``toy_moe_array``: NumPy arrays in a ``ToyArray`` box) and its
backend plugin (``toy_moe_backend``) are written to a temporary directory, so the tests can watch
the registry import them lazily: the backend module only on first use, and only once the user has
imported the framework.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import inspect
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import moe_router as mr
from moe_router import hookimpl, hookspecs
from moe_router.registrar import (
    EstimatorSpec,
    KernelSpec,
    ObserverSpec,
    StrategySpec,
)
from moe_router.registry import Registrar, Registry, default_registry
from moe_router.routing import RoutingContext, Selection
from moe_router.routing.select import prefix_select

ROOT = Path(__file__).resolve().parent.parent
FRAMEWORKS = ("torch", "jax", "tensorflow")
TOY_MODULES = ("toy_moe_array", "toy_moe_backend", "toy_moe_strategies")

TOY_ARRAY_SRC = '''
"""A third-party array library: a NumPy array in a box (operators and slicing via NumPy)."""
import numpy as np
from einops._backends import AbstractBackend
from numpy.lib.mixins import NDArrayOperatorsMixin


def unwrap(x):
    if isinstance(x, ToyArray):
        return x.data
    if isinstance(x, (tuple, list)):
        return type(x)(unwrap(v) for v in x)
    return x


def wrap(x):
    if isinstance(x, tuple):
        return tuple(wrap(v) for v in x)
    if isinstance(x, (np.ndarray, np.generic)):
        return ToyArray(x)
    return x


class ToyArray(NDArrayOperatorsMixin):
    __slots__ = ("data",)

    def __init__(self, data):
        self.data = np.asarray(data)

    def __array__(self, dtype=None, copy=None):
        return self.data if dtype is None else self.data.astype(dtype)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        kwargs = {k: unwrap(v) for k, v in kwargs.items()}
        return wrap(getattr(ufunc, method)(*unwrap(inputs), **kwargs))

    def __getitem__(self, key):
        return ToyArray(self.data[unwrap(key)])

    def __len__(self):
        return len(self.data)

    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    def __repr__(self):
        return f"ToyArray({self.data!r})"


class ToyEinopsBackend(AbstractBackend):
    """einops support: the core rearranges arrays with einops, so a new array type needs this.

    Recognises ToyArray by name: this module is re-imported by every test, and einops keeps the
    first instance of a framework's backend for the life of the process.
    """

    framework_name = "toy_moe_array"

    def is_appropriate_type(self, tensor):
        return type(tensor).__module__ == "toy_moe_array" and type(tensor).__name__ == "ToyArray"

    def shape(self, x):
        return x.data.shape

    def reshape(self, x, shape):
        return type(x)(x.data.reshape(shape))

    def transpose(self, x, axes):
        return type(x)(x.data.transpose(axes))

    def add_axis(self, x, new_position):
        return type(x)(np.expand_dims(x.data, new_position))

    def tile(self, x, repeats):
        return type(x)(np.tile(x.data, repeats))

    def is_float_type(self, x):
        return x.data.dtype.kind == "f"
'''

TOY_BACKEND_SRC = '''
"""The toy library's moe-router backend: NumPy math, ToyArrays in and out."""
import functools

import numpy as np

from moe_router.backend import Backend
from moe_router.reference import NumpyBackend
from toy_moe_array import ToyArray, unwrap, wrap


class ToyBackend(NumpyBackend):
    name = "toy"
    framework = "toy_moe_array"

    def is_array(self, x):
        return isinstance(x, ToyArray)

    def to_numpy(self, x):
        return np.asarray(unwrap(x))


def _boxed(method):
    @functools.wraps(method)
    def boxed(self, *args, **kwargs):
        kwargs = {k: unwrap(v) for k, v in kwargs.items()}
        return wrap(method(self, *unwrap(args), **kwargs))
    return boxed


for _name in dir(Backend):
    if not _name.startswith("_") and callable(getattr(Backend, _name)) and _name not in (
            "is_array", "to_numpy"):
        setattr(ToyBackend, _name, _boxed(getattr(NumpyBackend, _name)))
'''

TOY_STRATEGIES_SRC = '''
"""A strategy registered by import string: every token goes to its worst expert."""
from moe_router.routing import Selection
from moe_router.routing.select import prefix_select


def worst_expert(ctx):
    b, c = ctx.backend, ctx.config
    probs_TE = ctx.probs[:, : c.num_experts]
    n_T = b.full((ctx.num_tokens,), 1, "int", like=probs_TE)
    indices, weights = prefix_select(b, -probs_TE, probs_TE, n_T, c.max_slots, normalize=False)
    return Selection(indices, weights, ctx.state)
'''


@pytest.fixture(scope="module")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("toy_plugin")
    for name, src in zip(TOY_MODULES, (TOY_ARRAY_SRC, TOY_BACKEND_SRC, TOY_STRATEGIES_SRC)):
        (path / f"{name}.py").write_text(textwrap.dedent(src))
    return path


@pytest.fixture
def toy_path(toy_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The toy modules importable, none of them imported yet (and forgotten afterwards)."""
    monkeypatch.syspath_prepend(str(toy_dir))
    for name in TOY_MODULES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    yield toy_dir
    for name in TOY_MODULES:
        sys.modules.pop(name, None)


class ToyBackendPlugin:
    """What a third-party package's entry-point module would contain: strings only."""

    @hookimpl
    def moe_router_register_backends(self, registrar: Registrar) -> None:
        registrar.backend("toy", "toy_moe_backend:ToyBackend", framework="toy_moe_array")


@pytest.fixture
def toy_registered(toy_path: Path) -> Iterator[ModuleType]:
    """The toy backend registered in the default registry; yields the imported toy framework."""
    plugin = ToyBackendPlugin()
    default_registry().register(plugin, name="toy-backend")
    try:
        yield importlib.import_module("toy_moe_array")
    finally:
        default_registry().unregister(plugin)


def _logits(T: int = 12, E: int = 6, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((T, E)) * 2.0).astype(np.float32)


# ----- backends ------------------------------------------------------------------------------
def test_backend_module_imported_on_first_use_only(toy_path: Path) -> None:
    registry = Registry(load_entry_points=False)
    registry.register(ToyBackendPlugin(), name="toy-backend")
    assert registry.backend_names() == ["numpy", "toy"]
    assert not any(name in sys.modules for name in TOY_MODULES)
    # the toy framework is not imported: its backend is neither considered nor imported
    assert registry.backend_for(np.zeros(3, np.float32)).name == "numpy"
    with pytest.raises(mr.BackendNotFoundError, match="list"):
        registry.backend_for([1.0, 2.0])
    assert "toy_moe_backend" not in sys.modules
    toy = importlib.import_module("toy_moe_array")  # the user imports the framework...
    assert "toy_moe_backend" not in sys.modules
    x = toy.ToyArray(np.zeros((2, 3), np.float32))
    backend = registry.backend_for(x)  # ...and routes one of its arrays
    assert type(backend).__name__ == "ToyBackend" and "toy_moe_backend" in sys.modules
    assert registry.backend_for(x) is backend  # cached per type
    assert registry.backend_for(np.zeros(3, np.float32)).name == "numpy"


def test_framework_not_imported_is_not_considered() -> None:
    class GhostPlugin:
        @hookimpl
        def moe_router_register_backends(self, registrar: Registrar) -> None:
            registrar.backend("ghost", "ghost_moe_backend_missing:Ghost",
                              framework="ghost_framework_never_imported")

    assert "ghost_framework_never_imported" not in sys.modules
    registry = Registry(load_entry_points=False)
    registry.register(GhostPlugin(), name="ghost")
    assert "ghost" in registry.backend_names()
    # routing NumPy never touches the ghost spec (importing its target would fail)...
    plan = mr.route(_logits(), mr.RouterConfig(num_experts=6), backend=registry.backend_for(
        _logits()))
    assert plan.expert_indices.shape == (12, 2)
    with pytest.raises(mr.BackendNotFoundError) as info:
        registry.backend_for(object())
    assert "ghost" in str(info.value) and "numpy" in str(info.value)
    # ...while asking for it by name does import it, and fails: it really was never tried
    with pytest.raises(ModuleNotFoundError):
        registry.backend("ghost")


@pytest.mark.parametrize("strategy,extra", [
    ("top_k", {"k": 2}),
    ("top_k", {"k": 3, "score_func": "sigmoid", "capacity_factor": 1.0}),
    ("top_p", {"top_p": 0.6, "max_experts": 4}),
    ("threshold", {"threshold": 0.7}),
    ("top_k", {"k": 2, "score_func": "sigmoid", "num_groups": 3, "topk_groups": 2,
               "capacity_factor": 0.8, "drop_policy": "probability"}),
    ("complexity", {"target_experts": 2.0, "max_experts": 4}),
    ("expert_choice", {"capacity_factor": 2.0}),
])
def test_toy_backend_routes_like_numpy(toy_registered: ModuleType, strategy: str,
                                       extra: dict[str, Any]) -> None:
    ToyArray = toy_registered.ToyArray
    logits = _logits()
    mask = (np.arange(12) < 10).astype(np.float32)
    rc = mr.RouterConfig(num_experts=6, strategy=strategy, z_loss_coef=1e-3, **extra)
    expected = mr.route(logits, rc, mask_T=mask)
    plan = mr.route(ToyArray(logits), rc, mask_T=ToyArray(mask))  # backend found by type
    fields = {
        "expert_indices": (plan.expert_indices, expected.expert_indices),
        "expert_weights": (plan.expert_weights, expected.expert_weights),
        "num_experts_per_token": (plan.num_experts_per_token, expected.num_experts_per_token),
        "expert_counts": (plan.expert_counts, expected.expert_counts),
        "router_probs": (plan.router_probs, expected.router_probs),
        **{f"losses.{k}": (getattr(plan.losses, k), v)
           for k, v in expected.losses._asdict().items()},
        **{f"stats.{k}": (getattr(plan.stats, k), v)
           for k, v in expected.stats._asdict().items()},
    }
    for name, (got, want) in fields.items():
        assert isinstance(got, ToyArray), f"{name} is {type(got).__name__}, not a ToyArray"
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-7, err_msg=name)
    assert plan.summary() == expected.summary()
    # the losses module finds the toy backend from the array type too
    lb = mr.losses.load_balancing_loss(ToyArray(logits), plan.expert_indices, 6)
    assert isinstance(lb, ToyArray)
    np.testing.assert_allclose(
        np.asarray(lb), mr.losses.load_balancing_loss(logits, expected.expert_indices, 6),
        rtol=1e-6)


def test_unregister_forgets_the_backend(toy_path: Path) -> None:
    registry = Registry(load_entry_points=False)
    plugin = ToyBackendPlugin()
    registry.register(plugin, name="toy-backend")
    toy = importlib.import_module("toy_moe_array")
    x = toy.ToyArray(np.zeros((1, 2), np.float32))
    assert registry.backend_for(x).name == "toy"
    registry.unregister(plugin)
    assert registry.backend_names() == ["numpy"]
    with pytest.raises(mr.BackendNotFoundError):
        registry.backend_for(x)
    with pytest.raises(mr.UnknownNameError, match="backend='toy' is invalid: expected a "
                                                   "registered backend; known: numpy"):
        registry.backend("toy")


# ----- strategies and estimators ---------------------------------------------------------------
def first_expert(ctx: RoutingContext) -> Selection:
    """Every token goes to its best expert with weight 1."""
    b, c = ctx.backend, ctx.config
    probs_TE = ctx.probs[:, : c.num_experts]
    n_T = b.full((ctx.num_tokens,), 1, "int", like=probs_TE)
    indices, weights = prefix_select(b, probs_TE, probs_TE, n_T, c.max_slots, normalize=True)
    return Selection(indices, weights, ctx.state)


def neg_logit_margin(ctx: RoutingContext) -> Any:
    """A small gap between the two best logits = an unsure router = a harder token."""
    b = ctx.backend
    top2_T2, _ = b.top_k(ctx.logits[:, : ctx.config.num_experts], 2)
    return top2_T2[:, 1] - top2_T2[:, 0]


class StrategyPlugin:
    @hookimpl
    def moe_router_register_strategies(self, registrar: Registrar) -> None:
        registrar.strategy("first_expert", first_expert)
        registrar.strategy("worst_expert", "toy_moe_strategies:worst_expert")


class EstimatorPlugin:
    @hookimpl
    def moe_router_register_estimators(self, registrar: Registrar) -> None:
        registrar.estimator("neg_logit_margin", neg_logit_margin)


@pytest.fixture
def custom_plugins(toy_path: Path) -> Iterator[None]:
    plugins = [StrategyPlugin(), EstimatorPlugin()]
    for plugin in plugins:
        default_registry().register(plugin)
    try:
        yield
    finally:
        for plugin in plugins:
            default_registry().unregister(plugin)


def test_custom_strategy_used_by_name(custom_plugins: None) -> None:
    assert {"first_expert", "worst_expert"} <= set(default_registry().strategy_names())
    logits = _logits(T=16, E=5, seed=3)
    rc = mr.RouterConfig(num_experts=5, strategy="first_expert", max_experts=1)
    plan = mr.route(logits, rc)
    np.testing.assert_array_equal(plan.expert_indices[:, 0], np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(plan.expert_weights, np.ones((16, 1), np.float32))
    np.testing.assert_array_equal(plan.expert_counts,
                                  np.bincount(np.argmax(logits, axis=-1), minlength=5))


def test_custom_strategy_by_import_string_is_lazy(custom_plugins: None) -> None:
    assert "toy_moe_strategies" not in sys.modules  # registered, not yet imported
    logits = _logits(T=10, E=4, seed=4)
    plan = mr.route(logits, mr.RouterConfig(num_experts=4, strategy="worst_expert",
                                            max_experts=1))
    assert "toy_moe_strategies" in sys.modules
    np.testing.assert_array_equal(plan.expert_indices[:, 0], np.argmin(logits, axis=-1))


def test_unregistered_strategy_is_a_clear_error(custom_plugins: None) -> None:
    with pytest.raises(mr.UnknownNameError) as info:
        mr.RouterConfig(num_experts=6, strategy="first_expret")  # refused when built
    message = str(info.value)
    assert "first_expret" in message and "top_k" in message
    assert "did you mean 'first_expert'?" in message
    assert info.value.field == "strategy" and "first_expert" in info.value.known


def test_strategy_unregistered_after_the_config_was_built(toy_path: Path) -> None:
    plugin = StrategyPlugin()
    default_registry().register(plugin)
    try:
        rc = mr.RouterConfig(num_experts=6, strategy="first_expert", max_experts=1)
    finally:
        default_registry().unregister(plugin)
    with pytest.raises(mr.UnknownNameError, match="strategy='first_expert'.*known:.*top_k"):
        mr.route(_logits(), rc)


def test_custom_estimator_drives_complexity_routing(custom_plugins: None) -> None:
    logits = _logits(T=64, E=8, seed=5)
    rc = mr.RouterConfig(num_experts=8, strategy="complexity", target_experts=2.0,
                         max_experts=4, complexity_estimator="neg_logit_margin")
    plan = mr.route(logits, rc)
    # the same scores given as an external estimate must give the identical plan
    top2 = -np.sort(-logits, axis=-1)[:, :2]
    external = mr.route(logits, rc.replace(complexity_estimator="external"),
                        complexity_scores_T=(top2[:, 1] - top2[:, 0]).astype(np.float32))
    np.testing.assert_array_equal(plan.expert_indices, external.expert_indices)
    np.testing.assert_allclose(plan.expert_weights, external.expert_weights, rtol=1e-6)
    k = plan.num_experts_per_token
    assert len(np.unique(k)) >= 2 and abs(k.mean() - 2.0) <= 0.1
    # harder tokens (smaller margin) never get fewer experts than easier ones
    margin = top2[:, 0] - top2[:, 1]
    order = np.argsort(margin)
    assert np.all(np.diff(k[order]) <= 0)


def test_unknown_estimator_is_a_clear_error() -> None:
    with pytest.raises(mr.UnknownNameError, match="complexity_estimator='nope' is invalid: "
                                                   "expected a registered complexity_estimator"
                                                   ".*router_entropy"):
        mr.RouterConfig(num_experts=6, strategy="complexity", complexity_estimator="nope")
    with pytest.raises(mr.UnknownNameError) as info:
        default_registry().estimator("hidden_nrom")
    assert "did you mean 'hidden_norm'?" in str(info.value)


# ----- metadata ----------------------------------------------------------------------------------
def test_builtin_strategy_metadata() -> None:
    registry = Registry(load_entry_points=False)
    spec = {name: registry.strategy_spec(name) for name in registry.strategy_names()}
    assert set(spec) == {"top_k", "top_p", "threshold", "relu", "expert_choice", "hash",
                         "complexity"}
    assert all(isinstance(s, StrategySpec) and s.name == n for n, s in spec.items())
    assert all(s.target == f"moe_router.routing.strategies:{n}" for n, s in spec.items())
    flags = ("reads_k", "dynamic", "stateful", "causal_safe", "own_capacity", "null_experts")
    table = {name: tuple(n for n in flags if getattr(s, n)) + s.inputs
             for name, s in spec.items()}
    assert table == {
        "top_k": ("reads_k", "causal_safe", "null_experts"),
        "hash": ("reads_k", "causal_safe", "token_ids"),
        "expert_choice": ("reads_k", "dynamic", "own_capacity"),
        "top_p": ("dynamic", "stateful", "causal_safe"),
        "threshold": ("dynamic", "causal_safe"),
        "relu": ("dynamic", "causal_safe"),
        "complexity": ("dynamic", "stateful", "causal_safe"),
    }
    assert sorted(n for n, s in spec.items() if s.fixed_k) == ["hash", "top_k"]


def test_builtin_estimator_kernel_and_observer_metadata() -> None:
    registry = Registry(load_entry_points=False)
    estimators = {n: registry.estimator_spec(n) for n in registry.estimator_names()}
    assert {n: s.inputs for n, s in estimators.items()} == {
        "router_entropy": (), "hidden_norm": ("hidden",),
        "attention_entropy": ("attention_probs",), "external": ("complexity_scores",)}
    assert all(isinstance(s, EstimatorSpec) and s.causal_safe for s in estimators.values())
    kernels = {n: registry.kernel_spec(n) for n in registry.kernel_names()}
    assert {n: (s.target, s.framework, s.kind, s.static_shapes) for n, s in kernels.items()} == {
        "sorted": ("moe_router.layer.experts:sorted_padded", None, "grouped", False),
        "capacity": ("moe_router.layer.experts:capacity", None, "grouped", True),
        "dense": ("moe_router.layer.experts:dense", None, "tokens", True),
        "gather": ("moe_router.layer.experts:gather", None, "tokens", True),
    }
    assert registry.observer_names() == ["expert_load", "routing_stats", "routing_trace"]
    assert registry.observer_spec("expert_load") == ObserverSpec(
        "expert_load", "moe_router.layer.observers:ExpertLoad")
    assert registry.dispatch_policy("numpy") is None


def _module_of(target: str) -> ModuleType | None:
    module = target.partition(":")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name == module:
            return None  # being written: skipped below
        raise


def test_builtin_targets_resolve_lazily() -> None:
    registry = Registry(load_entry_points=False)
    for name in registry.kernel_names():
        if _module_of(registry.kernel_spec(name).target) is None:
            pytest.skip(f"{registry.kernel_spec(name).target} does not exist yet")
        assert callable(registry.kernel(name)) and registry.kernel(name) is registry.kernel(name)
    if _module_of(registry.observer_spec("expert_load").target) is None:
        pytest.skip("moe_router.layer.observers does not exist yet")
    assert inspect.isclass(registry.observer("expert_load"))


def _defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {node.name for node in tree.body
             if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    names |= {target.id for node in tree.body if isinstance(node, ast.Assign)
              for target in node.targets if isinstance(target, ast.Name)}
    return names


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_framework_plugin_targets_exist(framework: str) -> None:
    """Every string a framework plugin registers names something defined in its module (checked
    in the source: the framework is not imported)."""
    plugin = importlib.import_module(f"moe_router_backends.{framework}.plugin")
    registrar = Registrar()
    for name in _hookspec_names():
        impl = getattr(plugin, name, None)
        if impl is not None:
            impl(registrar=registrar)
    kernels = [k for k in registrar.kernels.values()]
    assert kernels and all(k.framework == framework and k.name.startswith(f"{framework}:")
                           for k in kernels)
    assert set(registrar.dispatch_policies) == {framework}
    targets = [s.target for s in (*registrar.backends.values(), *kernels,
                                  *registrar.dispatch_policies.values())]
    missing = []
    for target in targets:
        module, _, attr = target.partition(":")
        assert module.startswith(f"moe_router_backends.{framework}.")
        path = ROOT / "backends" / Path(*module.split(".")[1:]).with_suffix(".py")
        if not path.exists() or attr not in _defined_names(path):
            missing.append(target)
    assert not missing, f"registered targets not defined (yet): {missing}"


def test_registrar_refuses_bad_kernel_names() -> None:
    registrar = Registrar()
    registrar.kernel("torch:fast", "pkg.mod:fast", framework="torch")
    registrar.kernel("fast", "pkg.mod:fast")
    assert registrar.kernels["torch:fast"] == KernelSpec("torch:fast", "pkg.mod:fast", "torch")
    assert registrar.kernels["torch:fast"].short_name == "fast"
    for name, framework in [("fast", "torch"), ("jax:fast", "torch"), ("torch:fast", None),
                            ("torch:", "torch"), ("auto", None), ("", None)]:
        with pytest.raises(ValueError):
            registrar.kernel(name, "pkg.mod:fast", framework=framework)
    with pytest.raises(ValueError, match="kind"):
        registrar.kernel("slow", "pkg.mod:slow", kind="rows")  # type: ignore[arg-type]


def test_registrar_refuses_bad_metadata() -> None:
    registrar = Registrar()
    with pytest.raises(ValueError, match="inputs.*hidden_states"):
        registrar.strategy("s", "pkg:s", inputs=("hidden_states",))
    with pytest.raises(TypeError):
        registrar.strategy("s", "pkg:s", dynamic="no")
    with pytest.raises(TypeError):
        registrar.strategy("s", "pkg:s", sorted_output=True)
    with pytest.raises(ValueError, match="inputs"):
        registrar.estimator("e", "pkg:e", inputs=("tokens",))
    registrar.strategy("s", "pkg:s", inputs=["token_ids"])
    assert registrar.strategies["s"].inputs == ("token_ids",)  # stored as a tuple


# ----- plugin metadata drives the config ---------------------------------------------------------
class MetadataPlugin:
    """first_expert registered three times under different metadata."""

    @hookimpl
    def moe_router_register_strategies(self, registrar: Registrar) -> None:
        registrar.strategy("first_fixed", first_expert, reads_k=True, dynamic=False)
        registrar.strategy("first_plain", first_expert)
        registrar.strategy("first_lookahead", first_expert, causal_safe=False,
                           own_capacity=True, null_experts=True)

    @hookimpl
    def moe_router_register_estimators(self, registrar: Registrar) -> None:
        registrar.estimator("batch_rank", neg_logit_margin, causal_safe=False)


@pytest.fixture
def metadata_plugin() -> Iterator[None]:
    plugin = MetadataPlugin()
    default_registry().register(plugin)
    try:
        yield
    finally:
        default_registry().unregister(plugin)


def test_plugin_strategy_metadata_changes_derived_quantities(metadata_plugin: None) -> None:
    E = 8
    fixed = mr.RouterConfig(num_experts=E, strategy="first_fixed", k=3)
    assert (fixed.max_slots, fixed.nominal_experts, fixed.is_dynamic) == (3, 3.0, False)
    assert fixed.strategy_spec.fixed_k
    plain = mr.RouterConfig(num_experts=E, strategy="first_plain", k=3)
    assert (plain.max_slots, plain.nominal_experts, plain.is_dynamic) == (E, E, True)
    assert mr.RouterConfig(num_experts=E, strategy="first_plain", k=20).k == 20  # k not read
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(num_experts=E, strategy="first_fixed", k=20)
    assert info.value.field == "k"
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(num_experts=E, strategy="first_plain", num_null_experts=2)
    assert info.value.field == "num_null_experts" and "first_lookahead" in str(info.value)
    look = mr.RouterConfig(num_experts=E, strategy="first_lookahead", num_null_experts=2)
    assert look.is_dynamic and look.num_choices == E + 2
    with pytest.raises(mr.ConfigError) as info:
        look.replace(causal=True)
    assert info.value.field == "strategy" and "causal" in str(info.value)
    with pytest.raises(mr.ConfigError) as info:
        mr.RouterConfig(num_experts=E, causal=True, complexity_estimator="batch_rank")
    assert info.value.field == "complexity_estimator"
    # own_capacity: the capacity kernel is accepted without capacity_factor
    mc = mr.MoEConfig(d_model=4, d_ff=8, router=look.replace(num_null_experts=0),
                      dispatch="capacity")
    assert mc.dispatch == "capacity"
    with pytest.raises(mr.ConfigError):
        mc.with_router(strategy="first_plain")


def test_plugin_strategy_routes_with_its_metadata(metadata_plugin: None) -> None:
    logits = _logits(T=9, E=5, seed=7)
    plan = mr.route(logits, mr.RouterConfig(num_experts=5, strategy="first_fixed", k=1))
    assert plan.expert_indices.shape == (9, 1)
    np.testing.assert_array_equal(plan.expert_indices[:, 0], np.argmax(logits, axis=-1))


# ----- kernels, dispatch policies and observers ----------------------------------------------
def toy_kernel(*args: Any, **kwargs: Any) -> str:
    return "toy"


def toy_policy(request: str, *args: Any) -> str:
    return "toy_moe_array:fast" if request == "auto" else request


class ToyObserver:
    name = "toy_observer"


class KernelPlugin:
    @hookimpl
    def moe_router_register_kernels(self, registrar: Registrar) -> None:
        registrar.kernel("toy_portable", toy_kernel, kind="tokens", description="a toy")
        registrar.kernel("toy_moe_array:fast", toy_kernel, framework="toy_moe_array")
        registrar.kernel("ghost_framework_never_installed:fast", "ghost_fw_mod:fast",
                         framework="ghost_framework_never_installed")
        registrar.dispatch_policy("toy_moe_array", toy_policy)
        registrar.dispatch_policy("ghost_framework_never_installed", "ghost_fw_mod:policy")

    @hookimpl
    def moe_router_register_observers(self, registrar: Registrar) -> None:
        registrar.observer("toy_observer", ToyObserver)
        registrar.observer("lazy_observer", "toy_moe_strategies:worst_expert")


@pytest.fixture
def kernel_plugin(toy_path: Path) -> Iterator[None]:
    plugin = KernelPlugin()
    default_registry().register(plugin)
    try:
        yield
    finally:
        default_registry().unregister(plugin)


def test_kernels_policies_and_observers_are_found(kernel_plugin: None) -> None:
    registry = default_registry()
    assert {"sorted", "toy_portable", "toy_moe_array:fast"} <= set(registry.kernel_names())
    assert registry.kernel("toy_portable") is toy_kernel
    assert registry.kernel_spec("toy_portable").kind == "tokens"
    assert registry.kernel_spec("toy_moe_array:fast").framework == "toy_moe_array"
    assert registry.dispatch_policy("toy_moe_array") is toy_policy
    assert registry.dispatch_policy("toy_moe_array")("auto") == "toy_moe_array:fast"
    assert {"expert_load", "toy_observer", "lazy_observer"} <= set(registry.observer_names())
    assert registry.observer("toy_observer") is ToyObserver
    assert "toy_moe_strategies" not in sys.modules  # registered by string: imported on use
    assert callable(registry.observer("lazy_observer")) and "toy_moe_strategies" in sys.modules
    with pytest.raises(mr.UnknownNameError, match="kernel='toy_portabel'.*did you mean "
                                                   "'toy_portable'"):
        registry.kernel("toy_portabel")
    with pytest.raises(mr.UnknownNameError, match="observer='toy_obsever'"):
        registry.observer("toy_obsever")


def test_config_accepts_plugin_kernels_and_observers(kernel_plugin: None) -> None:
    rc = mr.RouterConfig(num_experts=4)
    for dispatch in ("auto", "sorted", "dense", "gather", "toy_portable", "toy_moe_array:fast"):
        assert mr.MoEConfig(d_model=4, d_ff=8, router=rc, dispatch=dispatch).dispatch == dispatch
    mc = mr.MoEConfig(d_model=4, d_ff=8, router=rc, observers=["toy_observer", "expert_load"])
    assert mc.observers == ("toy_observer", "expert_load") and hash(mc)
    with pytest.raises(mr.ConfigError) as info:  # an unqualified framework kernel name
        mr.MoEConfig(d_model=4, d_ff=8, router=rc, dispatch="fast")
    assert info.value.field == "dispatch"
    assert "did you mean 'ghost_framework_never_installed:fast' or 'toy_moe_array:fast'?" in \
        str(info.value)


def test_kernel_of_a_missing_framework_is_refused(kernel_plugin: None) -> None:
    assert "ghost_framework_never_installed" not in sys.modules
    rc = mr.RouterConfig(num_experts=4)
    with pytest.raises(mr.ConfigError) as info:
        mr.MoEConfig(d_model=4, d_ff=8, router=rc, dispatch="ghost_framework_never_installed:fast")
    assert info.value.field == "dispatch"
    assert "'ghost_framework_never_installed', which is not installed" in str(info.value)
    assert "sorted" in str(info.value)  # lists the portable kernels
    assert "ghost_framework_never_installed" not in sys.modules


def test_dispatch_policy_of_an_unregistered_framework_is_none() -> None:
    assert Registry(load_entry_points=False).dispatch_policy("torch") is None


# ----- hookspecs: each documented and exercised ---------------------------------------------------
def _hookspec_names() -> list[str]:
    marker = f"{hookspecs.PROJECT}_spec"
    return [name for name, obj in vars(hookspecs).items()
            if inspect.isfunction(obj) and hasattr(obj, marker)]


def test_hookspecs_are_documented_and_tested() -> None:
    """datasette-style: every hook has a docstring, a docs entry and a test in this module."""
    names = _hookspec_names()
    assert names, "no hookspecs found"
    source = Path(__file__).read_text()
    plugins_doc = (ROOT / "docs" / "plugins.md").read_text()
    for name in names:
        doc = inspect.getdoc(getattr(hookspecs, name)) or ""
        assert len(doc) > 40 and "registrar" in doc, f"{name} is not documented"
        assert f"def {name}(" in source.replace(f"def {name}(self", f"def {name}("), (
            f"hook {name} has no implementation exercised in {Path(__file__).name}")
        assert name in plugins_doc, f"hook {name} missing from docs/plugins.md"


def test_every_hook_is_called_by_the_registry() -> None:
    calls: list[str] = []

    class Spy:
        pass

    for name in _hookspec_names():
        def impl(registrar: Registrar, _name: str = name) -> None:
            assert isinstance(registrar, Registrar)
            calls.append(_name)
        impl.__name__ = name
        setattr(Spy, name, staticmethod(hookimpl(impl)))
    registry = Registry(load_entry_points=False)
    registry.register(Spy(), name="spy")
    assert calls == []  # nothing happens until something is looked up
    registry.backend_names()
    assert sorted(calls) == sorted(_hookspec_names())
    registry.strategy_names()
    assert len(calls) == len(_hookspec_names())  # collected once, then cached


# ----- entry points ---------------------------------------------------------------------------
def test_entry_points_register_the_framework_backends() -> None:
    try:
        importlib.metadata.distribution("moe-router")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("moe-router is not installed: run `pip install -e . --no-deps` to see its "
                    "entry points")
    entry_points = {ep.name: ep for ep in importlib.metadata.entry_points(group="moe_router")}
    assert set(FRAMEWORKS) <= set(entry_points)
    for name in FRAMEWORKS:
        registrar = Registrar()
        module = entry_points[name].load()
        module.moe_router_register_backends(registrar=registrar)
        module.moe_router_register_kernels(registrar=registrar)
        spec = registrar.backends[name]
        assert spec.framework == name
        assert spec.target.startswith(f"moe_router_backends.{name}.backend:")
        assert all(k.framework == name for k in registrar.kernels.values())
    registry = Registry()
    assert {"numpy", *FRAMEWORKS} <= set(registry.backend_names())
    assert {"torch:grouped_mm", "torch:padded", "torch:loop", "torch:gather", "jax:tiles",
            "jax:ragged_dot", "tensorflow:split", "tensorflow:tiles"} <= set(
                registry.kernel_names())
    assert registry.kernel_spec("torch:grouped_mm").static_shapes
    assert not registry.kernel_spec("torch:padded").static_shapes
    assert registry.kernel_spec("torch:gather").kind == "tokens"
    assert not registry.kernel_spec("tensorflow:split").static_shapes
    assert set(registry.collected.dispatch_policies) == set(FRAMEWORKS)
    bare = Registry(load_entry_points=False)
    assert bare.backend_names() == ["numpy"]
    assert bare.kernel_names() == ["capacity", "dense", "gather", "sorted"]
