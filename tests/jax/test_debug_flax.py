"""The debugger on the Flax NNX layer: ``routing_stats`` counters and the ``routing_trace`` ring
buffer against hand counts from the returned plans (eager and under ``nnx.jit``, one trace per
graph), switching observers at run time, ``reset_observers``, nnx split / merge,
``find_moe_layers`` and ``routing_metrics``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402
from jax_cases import D, F, inputs  # noqa: E402

import moe_router as mr  # noqa: E402
from moe_router.errors import InputError, InputTypeError  # noqa: E402
from moe_router.flax import MoE, find_moe_layers, routing_metrics, total_aux_loss  # noqa: E402
from moe_router.layer.observers import TraceConfig  # noqa: E402
from moe_router.layer.state import observer_names  # noqa: E402
from moe_router_backends.jax.debug import invalidate_compiled  # noqa: E402
from moe_router_backends.jax.layers import ObserverState  # noqa: E402

pytestmark = pytest.mark.jax

E, K = 4, 2
STATS = "observers.routing_stats."
TRACE = "observers.routing_trace."
#: top-k with a tight capacity: tokens get 0, 1 or 2 experts and slots are dropped
ROUTER = mr.RouterConfig(num_experts=E, k=K, capacity_factor=0.5)
PLAIN = mr.MoEConfig(d_model=D, d_ff=F, router=ROUTER, init_std=0.5)
COUNTING = PLAIN.replace(observers=("routing_stats",))
TRACING = PLAIN.replace(trace=TraceConfig(capacity=8, tokens_per_call=4))
BOTH = COUNTING.replace(trace=TRACING.trace)
SEQ = 6  # x is (2, SEQ, D): 12 tokens a call


def _x(seed: int) -> jax.Array:
    return jnp.asarray(inputs((2, SEQ), seed=seed))


def _mask(seed: int) -> jax.Array:
    mask = np.random.default_rng(seed).integers(0, 2, (2, SEQ)).astype(np.int32)
    mask[0, 0] = 1
    return jnp.asarray(mask)


def _real(mask: jax.Array | None, T: int) -> np.ndarray:
    return np.ones(T, bool) if mask is None else np.asarray(mask).reshape(-1) > 0


def _hand_counts(calls: Sequence[tuple[mr.RoutingPlan, jax.Array | None, bool]]
                 ) -> dict[str, np.ndarray]:
    """``routing_stats`` integer counters recomputed from ``(plan, mask, training)`` per call."""
    counts = {"calls": np.zeros(2, np.int64), "tokens": np.zeros(2, np.int64),
              "expert_tokens": np.zeros((2, E), np.int64), "dropped": np.zeros(2, np.int64),
              "k_hist": np.zeros((2, K + 1), np.int64)}
    for plan, mask, training in calls:
        row = 0 if training else 1
        ids_TK = np.asarray(plan.expert_indices)
        real_T = _real(mask, ids_TK.shape[0])
        used_T = np.asarray(plan.num_experts_per_token)[real_T]
        counts["calls"][row] += 1
        counts["tokens"][row] += real_T.sum()
        counts["expert_tokens"][row] += np.bincount(ids_TK[real_T][ids_TK[real_T] >= 0],
                                                    minlength=E)
        counts["dropped"][row] += int(plan.num_dropped)
        counts["k_hist"][row] += np.bincount(used_T, minlength=K + 1)
    return counts


def _assert_counts(layer: MoE, expected: dict[str, np.ndarray]) -> None:
    state = layer.export_state()
    for field, value in expected.items():
        np.testing.assert_array_equal(state[STATS + field], value, err_msg=field)


# ----- (a) counters after eager calls --------------------------------------------------------
@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "mask"])
def test_counters_after_eager_calls_equal_a_hand_count_from_the_plans(masked):
    layer = MoE(COUNTING, rngs=nnx.Rngs(0))
    calls = []
    for seed, training in enumerate((True, False, True, False, False)):
        mask = _mask(seed) if masked else None
        _, plan = layer(_x(seed), mask=mask, training=training, return_plan=True)
        calls.append((plan, mask, training))
    expected = _hand_counts(calls)
    assert expected["dropped"].sum() > 0 and expected["k_hist"][:, 0].sum() > 0  # capacity bites
    assert (expected["k_hist"][:, 1] > 0).all() and (expected["k_hist"][:, 2] > 0).all()
    if masked:
        assert (expected["tokens"] < np.array([2, 3]) * 2 * SEQ).all()
    _assert_counts(layer, expected)
    # the slots counted per expert are the slots of the k histogram
    state = layer.export_state()
    np.testing.assert_array_equal(state[STATS + "expert_tokens"].sum(1),
                                  state[STATS + "k_hist"] @ np.arange(K + 1))


# ----- (b) the same under nnx.jit: one trace per graph ----------------------------------------
def test_jitted_counters_equal_eager_and_trace_once_per_graph():
    traces = {"train": 0, "eval": 0}

    def make(training: bool):
        def step(layer: MoE, x: jax.Array, mask: jax.Array) -> mr.RoutingPlan:
            traces["train" if training else "eval"] += 1
            return layer(x, mask=mask, training=training, return_plan=True)[1]
        return nnx.jit(step)

    train_step, eval_step = make(True), make(False)
    jitted, eager = MoE(PLAIN, rngs=nnx.Rngs(0)), MoE(PLAIN, rngs=nnx.Rngs(0))
    train_step(jitted, _x(0), _mask(0))
    train_step(jitted, _x(1), _mask(1))
    assert traces == {"train": 1, "eval": 0}

    for layer in (jitted, eager):
        layer.config = COUNTING
        invalidate_compiled(layer)  # a no-op for NNX: the graph change retraces by itself
    calls, eager_calls = [], []
    for seed, training in enumerate((True, False, True, True, False, False)):
        x, mask = _x(10 + seed), _mask(10 + seed)
        plan = (train_step if training else eval_step)(jitted, x, mask)
        calls.append((plan, mask, training))
        eager_calls.append((eager(x, mask=mask, training=training, return_plan=True)[1], mask,
                            training))
    assert traces == {"train": 2, "eval": 1}  # switching the observer on: exactly one retrace
    expected = _hand_counts(calls)
    _assert_counts(jitted, expected)
    _assert_counts(eager, _hand_counts(eager_calls))
    state, eager_state = jitted.export_state(), eager.export_state()
    for name in observer_names(COUNTING):
        np.testing.assert_allclose(state[name], eager_state[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)

    jitted.config = PLAIN  # back to the first graph: its trace is reused
    train_step(jitted, _x(3), _mask(3))
    assert traces == {"train": 2, "eval": 1}
    assert not any(name.startswith("observers.") for name in jitted.export_state())


# ----- (c) the trace ring buffer ----------------------------------------------------------------
def _expected_trace(calls: Sequence[tuple[mr.RoutingPlan, jax.Array | None, bool, jax.Array]],
                    capacity: int, per_call: int) -> dict[str, np.ndarray]:
    """The ring buffer's rows rebuilt from ``(plan, mask, training, token_ids)`` per call."""
    rows = {"experts": np.full((capacity, K), -1), "weights": np.zeros((capacity, K)),
            "index": np.full(capacity, -1), "position": np.full(capacity, -1),
            "token": np.full(capacity, -1), "call": np.full(capacity, -1),
            "mode": np.full(capacity, -1)}
    written = 0
    for call, (plan, mask, training, token_ids) in enumerate(calls):
        ids_TK = np.asarray(plan.expert_indices)
        T = ids_TK.shape[0]
        real_T = _real(mask, T)
        for t in (np.arange(per_call) * T) // per_call:
            if not real_T[t]:
                continue
            dest = written % capacity
            rows["experts"][dest] = ids_TK[t]
            rows["weights"][dest] = np.asarray(plan.expert_weights)[t]
            rows["index"][dest], rows["position"][dest] = t, t % SEQ
            rows["token"][dest] = -1 if token_ids is None else np.asarray(token_ids).ravel()[t]
            rows["call"][dest], rows["mode"][dest] = call, 0 if training else 1
            written += 1
    rows["written"], rows["calls"] = np.array([written]), np.array([len(calls)])
    return rows


def _assert_trace(layer: MoE, expected: dict[str, np.ndarray]) -> None:
    state = layer.export_state()
    capacity = layer.config.trace.capacity
    for field, value in expected.items():
        got = state[TRACE + field]
        got = got if field in ("written", "calls") else got[:capacity]  # row N: discard row
        if field == "weights":
            np.testing.assert_allclose(got, value, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got, value, err_msg=field)


@pytest.mark.parametrize("jitted", [False, True], ids=["eager", "nnx_jit"])
def test_trace_records_the_plans_routing_and_wraps(jitted):
    layer = MoE(TRACING, rngs=nnx.Rngs(0))
    traces = [0]

    def call(layer: MoE, x: jax.Array, mask: jax.Array, token_ids: jax.Array,
             training: bool) -> mr.RoutingPlan:
        traces[0] += 1
        return layer(x, mask=mask, token_ids=token_ids, training=training, return_plan=True)[1]

    run = nnx.jit(call, static_argnames="training") if jitted else call
    calls = []
    for seed, training in enumerate((True, True, False, True, False)):
        x, mask = _x(seed), _mask(seed)
        token_ids = jnp.asarray(np.arange(2 * SEQ).reshape(2, SEQ) * 7 + seed, jnp.int32)
        calls.append((run(layer, x, mask, token_ids, training), mask, training, token_ids))
    expected = _expected_trace(calls, 8, 4)
    assert expected["written"][0] > 8  # the ring has wrapped
    assert {0, 1} <= set(expected["mode"].tolist())
    _assert_trace(layer, expected)
    assert traces[0] == (2 if jitted else 5)  # one trace per mode under nnx.jit


# ----- (d) switching, reset, nnx split / merge --------------------------------------------------
def test_switching_observers_adds_and_removes_variables_only():
    layer = MoE(PLAIN.with_router(use_expert_bias=True), rngs=nnx.Rngs(0))
    before = layer.export_weights()
    layer.config = BOTH.with_router(use_expert_bias=True)
    names = set(layer.export_state())
    assert names >= set(observer_names(BOTH, "routing_stats")) | set(observer_names(BOTH,
                                                                                    "routing_trace"))
    observer_vars = {"/".join(map(str, path)) for path, _ in
                     nnx.to_flat_state(nnx.state(layer, ObserverState))}
    assert observer_vars == {n.replace(".", "/") for n in names if n.startswith("observers.")}
    for name, value in layer.export_state().items():  # fresh values
        if name.startswith(TRACE) and name[len(TRACE):] not in ("weights", "written", "calls"):
            assert (value == -1).all(), name
        elif name.startswith("observers."):
            assert not value.any(), name
    for name, value in layer.export_weights().items():  # weights and persistent state kept
        np.testing.assert_array_equal(value, before[name])

    layer.config = PLAIN.with_router(use_expert_bias=True)  # off again: expert_load stays
    assert {n for n in layer.export_state() if n.startswith("observers.")} == {
        "observers.expert_load.counts"}
    assert not hasattr(layer.observers, "routing_stats")
    assert not hasattr(layer.observers, "routing_trace")

    plain = MoE(BOTH, rngs=nnx.Rngs(0))
    plain.config = PLAIN  # no observer left: the empty group goes too
    assert not hasattr(plain, "observers")
    assert plain(_x(0)).shape == (2, SEQ, D)


def test_config_changes_beyond_observers_are_refused():
    layer = MoE(COUNTING, rngs=nnx.Rngs(0))
    layer.config = COUNTING.with_router(k=1)  # a routing field: allowed, no state change
    assert layer.config.router.k == 1
    with pytest.raises(InputError, match="config"):
        layer.config = COUNTING.replace(d_ff=2 * F)
    with pytest.raises(InputError, match="config"):
        layer.config = COUNTING.with_router(use_expert_bias=True)
    with pytest.raises(InputTypeError, match="config"):
        layer.config = {"d_model": D}
    assert layer.config == COUNTING.with_router(k=1)  # refused changes leave the layer as it was
    assert set(observer_names(COUNTING)) <= set(layer.export_state())


def test_reset_observers_one_or_all():
    layer = MoE(BOTH, rngs=nnx.Rngs(0))
    for seed in range(3):
        layer(_x(seed), training=bool(seed % 2))
    traced = layer.export_state()[TRACE + "index"].copy()
    layer.reset_observers("routing_stats")
    state = layer.export_state()
    assert not any(state[name].any() for name in observer_names(BOTH, "routing_stats"))
    np.testing.assert_array_equal(state[TRACE + "index"], traced)  # the other one untouched
    assert state[TRACE + "written"][0] == 12

    layer(_x(5))
    assert layer.export_state()[STATS + "calls"].tolist() == [0, 1]  # counting goes on
    layer.reset_observers()
    state = layer.export_state()
    assert (state[TRACE + "index"] == -1).all() and (state[TRACE + "experts"] == -1).all()
    assert not state[TRACE + "written"].any() and not state[STATS + "calls"].any()


def test_nnx_state_split_merge_round_trip_with_the_debugger_attached():
    layer = MoE(PLAIN, rngs=nnx.Rngs(0))
    layer.config = BOTH
    step = nnx.jit(lambda m, x: m(x, training=True))
    step(layer, _x(0))
    graphdef, state = nnx.split(layer)
    clone = nnx.merge(graphdef, state, copy=True)  # own variables, not the layer's
    assert clone.config == BOTH
    for name, value in layer.export_state().items():
        np.testing.assert_array_equal(clone.export_state()[name], value)
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(layer))}
    assert {"observers/routing_stats/calls", "observers/routing_trace/experts"} <= paths

    step(clone, _x(1))  # the clone keeps counting where the original stopped
    assert clone.export_state()[STATS + "calls"].tolist() == [2, 0]
    assert layer.export_state()[STATS + "calls"].tolist() == [1, 0]
    nnx.update(layer, nnx.state(clone))
    assert layer.export_state()[STATS + "calls"].tolist() == [2, 0]

    layer.config = PLAIN  # detaching: the split of the plain layer has no observer state
    _, plain_state = nnx.split(layer)
    assert not any(p[0] == "observers" for p, _ in nnx.to_flat_state(plain_state))


# ----- (e) find_moe_layers ------------------------------------------------------------------
class _Block(nnx.Module):
    def __init__(self, config: mr.MoEConfig, seed: int) -> None:
        self.norm = nnx.LayerNorm(D, rngs=nnx.Rngs(seed))
        self.moe = MoE(config, rngs=nnx.Rngs(seed))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.moe(self.norm(x))


class _Model(nnx.Module):
    def __init__(self, configs: Sequence[mr.MoEConfig]) -> None:
        self.blocks = nnx.List([_Block(c, i) for i, c in enumerate(configs)])
        self.heads = nnx.Dict({"aux": MoE(configs[0], rngs=nnx.Rngs(9))})
        self.tied = self.blocks[0].moe  # the same layer twice in the graph

    def __call__(self, x: jax.Array) -> jax.Array:
        for block in self.blocks:
            x = block(x)
        return self.heads["aux"](x)


def test_find_moe_layers_in_a_nested_model():
    model = _Model([PLAIN, COUNTING])
    found = find_moe_layers(model)
    assert [name for name, _ in found] == ["blocks.0.moe", "blocks.1.moe", "heads.aux"]
    assert [layer for _, layer in found] == [model.blocks[0].moe, model.blocks[1].moe,
                                             model.heads["aux"]]
    layers = [model.blocks[0].moe, model.blocks[1].moe]
    assert find_moe_layers(layers) == [("0", layers[0]), ("1", layers[1])]
    assert find_moe_layers({"a": layers[1]}) == [("a", layers[1])]
    assert find_moe_layers(layers[0]) == [("MoE", layers[0])]
    assert find_moe_layers(nnx.Linear(2, 2, rngs=nnx.Rngs(0))) == []
    for other in (None, 3, object(), [1, 2], {"a": np.zeros(2)}, "model"):
        assert find_moe_layers(other) is None, other
    assert invalidate_compiled(model) is None


# ----- (f) routing_metrics ------------------------------------------------------------------
def _expected_metrics(layers: Sequence[MoE], width: int) -> dict[str, np.ndarray]:
    """The metrics recomputed in NumPy from each layer's ``export_state()``."""
    out: dict[str, list] = {}
    for layer in layers:
        s = layer.export_state()
        for row, mode in enumerate(("train", "eval")):
            load = s[STATS + "expert_tokens"][row].astype(np.float64)
            tokens = s[STATS + "tokens"][row]
            k_hist = s[STATS + "k_hist"][row]
            values = {"calls": s[STATS + "calls"][row], "tokens": tokens,
                      "expert_load": np.pad(load, (0, width - load.size)),
                      "mean_experts": (k_hist * np.arange(k_hist.size)).sum() / max(tokens, 1),
                      "max_load": load.max(), "mean_load": load.mean(),
                      "dropped": s[STATS + "dropped"][row]}
            for key, value in values.items():
                out.setdefault(f"{mode}/{key}", []).append(value)
    return {key: np.stack(values) for key, values in out.items()}


def test_routing_metrics_under_nnx_jit_equal_the_exported_counters():
    wide = COUNTING.with_router(num_experts=6)
    model = _Model([COUNTING, wide])
    layers = [layer for _, layer in find_moe_layers(model)]
    assert len(layers) == 3

    @nnx.jit
    def train_step(model: _Model, x: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        y = model(x)
        return y, routing_metrics(model)

    eval_fn = nnx.jit(lambda model, x: model(x))
    model.train()
    for seed in range(3):
        _, metrics = train_step(model, _x(seed))
    model.eval()
    eval_fn(model, _x(7))
    metrics = nnx.jit(routing_metrics)(model)
    expected = _expected_metrics(layers, width=6)
    assert set(metrics) == set(expected) | {"aux_loss"}
    for key, value in expected.items():
        assert metrics[key].shape == value.shape, key
        np.testing.assert_allclose(np.asarray(metrics[key]), value, rtol=1e-6, err_msg=key)
    assert metrics["train/calls"].tolist() == [3, 3, 3]
    assert metrics["eval/calls"].tolist() == [1, 1, 1]
    assert metrics["train/expert_load"][0, 4:].tolist() == [0, 0]  # E = 4 padded to 6
    assert (metrics["train/dropped"] > 0).any()
    np.testing.assert_allclose(metrics["aux_loss"], total_aux_loss(model), rtol=1e-6)
    np.testing.assert_allclose(metrics["aux_loss"],
                               sum(float(layer.aux_loss[...]) for layer in layers), rtol=1e-6)


def test_routing_metrics_without_counters_and_with_some():
    model = _Model([PLAIN, PLAIN])
    model(_x(0))
    assert set(routing_metrics(model)) == {"aux_loss"}
    model.blocks[1].moe.config = COUNTING
    with pytest.raises(InputError, match="model"):
        routing_metrics(model)
    with pytest.raises(InputError, match="model"):
        routing_metrics(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
