"""The framework-free offload core: traces, policies, the cache, the simulator, prefetch scoring,
synthetic traces, lazy safetensors reads and the metric exports."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import moe_router.offload as mo
from moe_router.errors import ConfigError, InputError, InputTypeError
from moe_router.offload.cache import ExpertCache
from moe_router.offload.safetensors_io import ByteReader, checkpoint_entries


# ----- the simulator's sanity checks --------------------------------------------------------
@pytest.mark.parametrize("policy", ["lru", "lfu", "layer_aware"])
def test_uniform_random_trace_hits_c_over_n(policy):
    N, c = 64, 32
    trace = mo.uniform_trace(N, num_layers=4, steps=5000, k=1, seed=0)
    result = mo.simulate(trace, slots=c, policy=policy)
    assert abs(result.hit_rate - c / N) <= 0.01, result.hit_rate
    assert all(abs(h - c / N) <= 0.03 for h in result.hit_rates)  # 5000 uses per layer


@pytest.mark.parametrize("c", [8, 16, 48])
def test_uniform_lru_hit_rate_follows_the_slots(c):
    result = mo.simulate(mo.uniform_trace(64, 2, 8000, k=1, seed=c), slots=c)
    assert abs(result.hit_rate - c / 64) <= 0.01


def test_every_expert_resident_means_only_compulsory_misses():
    trace = mo.uniform_trace(16, 3, 500, k=2, seed=1)
    result = mo.simulate(trace, slots=16)
    assert result.total["misses"] == 3 * 16  # each expert of each layer missed once


def test_lru_replays_a_hand_worked_sequence():
    # one layer, 2 slots: 0 1 0 2 1 -> miss miss hit miss(evicts 1) miss(evicts 0)
    trace = np.array([[[0]], [[1]], [[0]], [[2]], [[1]]])
    result = mo.simulate(trace, num_experts=4, slots=2, policy="lru")
    assert (result.total["hits"], result.total["misses"]) == (1, 4)
    lfu = mo.simulate(np.array([[[0]], [[0]], [[1]], [[2]], [[0]]]), num_experts=4, slots=2,
                      policy="lfu", decay=1.0)
    assert lfu.total["hits"] == 2  # 0 (frequency 2) survives 2's arrival; 1 leaves


# ----- prefetch -------------------------------------------------------------------------------
def test_router_prefetch_beats_lru_by_15_points_with_recall_80():
    N = 64
    trace = mo.zipf_markov_trace(N, num_layers=8, steps=800, k=2, seed=0)
    plain = mo.simulate(trace, slots=N // 2, policy="lru")
    ahead = mo.simulate(trace, slots=N // 2, policy="lru", prefetch=True)
    assert ahead.hit_rate - plain.hit_rate >= 0.15, (plain.hit_rate, ahead.hit_rate)
    assert ahead.recall >= 0.80
    for layer in range(1, 8):  # layer 0 has no previous layer to predict from
        assert ahead.hit_rates[layer] - plain.hit_rates[layer] >= 0.15
        assert ahead.layers[layer]["recall"] >= 0.75
    assert ahead.layers[0]["recall"] is None


def test_the_synthetic_prediction_is_not_the_answer():
    trace = mo.zipf_markov_trace(32, 4, 400, k=2, seed=2)
    used, pred = trace.experts[:, 1:], trace.predicted[:, 1:]
    same = np.mean([set(u) == set(p) for u, p in zip(used.reshape(-1, 2), pred.reshape(-1, 2))])
    assert 0.3 < same < 1.0  # informative, imperfect
    exact = mo.zipf_markov_trace(32, 4, 100, k=2, seed=2, drift=0.0)
    assert np.array_equal(exact.experts[:, 1:], exact.predicted[:, 1:])


def test_wrong_guesses_are_counted_evicted_first_and_wasted():
    cache = ExpertCache(1, 8, slots=3, expert_bytes=10)
    cache.begin_step()
    for e in (0, 1):
        assert cache.use(0, e) is None
        cache.admit(0, e)
    cache.end_layer(0, [0, 1])
    cache.begin_step()
    loads = cache.predict(0, [5, 6])  # one free slot, then evicts the LRU (0); 1 stays
    assert [e for e, _ in loads] == [5, 6]
    assert cache.lookup(0, 0) is None and cache.lookup(0, 1) is not None
    assert cache.use(0, 5) is not None
    cache.end_layer(0, [5])
    m = cache.metrics[0]
    assert (m.prefetch_loads, m.prefetch_hits, m.prefetch_wasted) == (2, 1, 1)
    assert (m.bytes_wasted, m.predicted, m.predicted_used) == (10, 2, 1)
    cache.begin_step()
    assert cache.use(0, 7) is None
    cache.admit(0, 7)  # the wrong guess (6) leaves before 1, though 1 is older
    assert cache.lookup(0, 6) is None and cache.lookup(0, 1) is not None


def test_prefetch_byte_budget_per_step():
    cache = ExpertCache(2, 8, slots=4, expert_bytes=100, prefetch_bytes=250)
    cache.begin_step()
    assert len(cache.predict(0, [1, 2, 3])) == 2
    assert len(cache.predict(1, [1])) == 0  # the step's budget is spent
    cache.begin_step()
    assert len(cache.predict(1, [1])) == 1


def test_pinning_from_a_profile_keeps_hot_experts():
    trace = mo.zipf_markov_trace(32, 2, 400, k=2, seed=3)
    pinned = mo.pinned_from_profile(trace.profile(), per_layer=4)
    assert all(len(v) == 4 for v in pinned.values())
    hot = np.argsort(-trace.profile()[0])[:4]
    assert set(pinned[0]) == set(int(e) for e in hot)
    cache = ExpertCache(2, 32, slots=6, pinned=pinned)
    for _ in range(50):
        cache.begin_step()
        for e in range(32):
            if cache.use(0, e) is None:
                cache.admit(0, e)
    assert all(cache.lookup(0, e) is not None for e in pinned[0])
    with_pins = mo.simulate(trace, slots=6, pinned=pinned)
    assert with_pins.total["peak_resident_bytes"] <= 12


def test_layer_aware_gives_skewed_layers_fewer_slots():
    rng = np.random.default_rng(0)
    steps = 3000
    flat = rng.integers(0, 16, steps)
    hot = rng.random(steps) < 0.9
    skewed = np.where(hot, rng.integers(0, 2, steps), rng.integers(0, 16, steps))
    trace = np.stack([flat, skewed], axis=1)[:, :, None]
    cache_sizes = mo.simulate(trace, num_experts=16, slots=4, policy="layer_aware")
    per_layer = mo.simulate(trace, num_experts=16, slots=4, policy="lru")
    assert cache_sizes.hit_rate > per_layer.hit_rate
    assert cache_sizes.total["peak_resident_bytes"] <= 8


# ----- bad input --------------------------------------------------------------------------------
def test_bad_input_gives_typed_errors_naming_the_argument():
    with pytest.raises(ConfigError, match="policy"):
        mo.simulate(np.zeros((2, 1, 1), int), num_experts=4, slots=2, policy="fifo")
    with pytest.raises(ConfigError, match="slots"):
        mo.simulate(np.zeros((2, 1, 1), int), num_experts=4, slots=5)
    with pytest.raises(InputError, match="num_experts"):
        mo.simulate(np.zeros((2, 1, 1), int), slots=1)
    with pytest.raises(InputError, match="experts"):
        mo.simulate(np.full((2, 1, 1), 9), num_experts=4, slots=1)
    with pytest.raises(InputTypeError, match="experts"):
        mo.RoutingTrace(np.zeros((2, 1, 1)) + 0.5, 4)
    with pytest.raises(InputError, match="prefetch"):
        mo.simulate(mo.uniform_trace(4, 1, 3), slots=1, prefetch=True)
    with pytest.raises(ConfigError, match="experts_per_layer"):
        mo.OffloadConfig()
    with pytest.raises(ConfigError, match="compute"):
        mo.OffloadConfig(experts_per_layer=2, compute="gpu")
    with pytest.raises(ConfigError, match="budget_bytes"):
        mo.OffloadConfig(budget_bytes=10).slots(4, 8, 100)
    assert mo.OffloadConfig(budget_bytes=4 * 3 * 100).slots(4, 8, 100) == 3


def test_trace_roundtrip_and_ragged_steps(tmp_path):
    trace = mo.RoutingTrace.from_steps([[[1, 2, 2], [0]], [[3], [4, 5]]], 6,
                                       predicted=[[[], [1]], [[], [4]]])
    assert trace.experts.shape == (2, 2, 2) and trace.experts[0, 0].tolist() == [1, 2]
    trace.save(tmp_path / "t.npz")
    back = mo.RoutingTrace.load(tmp_path / "t.npz")
    assert np.array_equal(back.experts, trace.experts)
    assert np.array_equal(back.predicted, trace.predicted)


# ----- lazy safetensors reads ------------------------------------------------------------------
def _write_safetensors(path, tensors):
    header, offset, blobs = {}, 0, []
    for name, arr in tensors.items():
        blob = arr.tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        offset += len(blob)
        blobs.append(blob)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def test_reader_reads_one_row_without_touching_the_rest(tmp_path):
    w = np.arange(4 * 3 * 2, dtype=np.float32).reshape(4, 3, 2)
    _write_safetensors(tmp_path / "model.safetensors", {"a": np.ones(5, np.float32), "w": w})
    entries = checkpoint_entries(tmp_path)
    start, nbytes = entries["w"].row_range(2)
    out = np.empty((3, 2), np.float32)
    reader = ByteReader()
    assert reader.read_into(entries["w"].file, start, out.view(np.uint8)) == 24
    assert np.array_equal(out, w[2])
    assert reader.stats() == {"bytes_read": 24, "reads": 1, "max_read": 24}
    reader.close()
    with pytest.raises(InputError, match="path"):
        checkpoint_entries(tmp_path / "missing")


# ----- exports ------------------------------------------------------------------------------------
def test_prometheus_and_tensorboard_exports_read_back():
    pytest.importorskip("prometheus_client")
    pytest.importorskip("tensorboard")
    from moe_router.offload.export import OffloadCollector, write_tensorboard

    result = mo.simulate(mo.zipf_markov_trace(16, 3, 100, seed=1), slots=8, prefetch=True)
    metrics = {"layers": list(result.layers)}
    samples = {(s.name, s.labels.get("layer"), s.labels.get("path")): s.value
               for fam in OffloadCollector(metrics).collect() for s in fam.samples}
    assert samples[("moe_router_offload_hits_total", "1", None)] == result.layers[1]["hits"]
    assert samples[("moe_router_offload_hit_ratio", "2", None)] == pytest.approx(
        result.hit_rates[2])
    assert ("moe_router_offload_prefetch_recall_ratio", "0", None) not in samples  # undefined
    from moe_router.debug.prometheus import OffloadCollector as DebuggerCollector

    assert OffloadCollector is DebuggerCollector   # one definition: the debugger's exporter
    with pytest.raises(InputError, match=r"source\['layers'\]\[0\]"):
        list(OffloadCollector({"layers": [{"hits": 1}]}).collect())
    import tempfile

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    with tempfile.TemporaryDirectory() as logdir:
        write_tensorboard(metrics, logdir, step=7)
        acc = EventAccumulator(logdir)
        acc.Reload()
        (event,) = acc.Scalars("offload/misses/layer_1")
        assert (event.step, event.value) == (7, result.layers[1]["misses"])


def test_import_offload_imports_no_framework():
    code = ("import sys, moe_router, moe_router.offload, moe_router.offload.export\n"
            "print(sorted(m for m in ('torch', 'jax', 'tensorflow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
