"""Debugger exporters: TensorBoard event files and the Prometheus collector / server, checked
against numbers computed here from a hand-made session record (``make_session``, shared with
``test_debug_report``)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_router.debug.session import FORMAT, add_counts, empty_counts

ROOT = Path(__file__).resolve().parent.parent
#: (num_experts, max_slots) of the hand-made session's layers; layer 1's expert 2 is never used
LAYERS = ((4, 2), (3, 2))
STEP_MODES = ("train", "train", "eval")
DIGEST_ID = "0123456789abcdef"


def make_session(seed: int = 0, steps: int = 3,
                 tokens: tuple[int, int] = (6, 12)) -> dict[str, Any]:
    """A small, consistent session record: 2 layers, ``steps`` steps of ``tokens`` (low, high)
    tokens per layer, totals = sum of the steps per mode, a trace of the first tokens of every
    call (token ids on layer 0 only). The default is too small to judge dead experts; with
    ``tokens=(100, 160)`` every step is judged and layer 1 has one dead expert."""
    rng = np.random.default_rng(seed)
    layers = [{"index": i, "name": f"model.layers.{i}.mlp<&>", "num_experts": E, "max_slots": K,
               "strategy": "top_p", "min_experts": 1, "max_experts": K, "config": None}
              for i, (E, K) in enumerate(LAYERS)]
    totals = {m: [empty_counts(E, K) for E, K in LAYERS] for m in ("train", "eval")}
    step_rows, trace = [], []
    for s in range(steps):
        mode = STEP_MODES[s % len(STEP_MODES)]
        per_layer = []
        for i, (E, K) in enumerate(LAYERS):
            c = empty_counts(E, K)
            usable = np.arange(E) if i == 0 else np.array([0, 1])
            probs = np.linspace(3, 1, len(usable)) / np.linspace(3, 1, len(usable)).sum()
            T = int(rng.integers(*tokens))
            for t in range(T):
                k = int(rng.integers(0, K + 1)) if t else 1   # some tokens get no expert
                experts = [int(e) for e in rng.choice(usable, size=k, replace=False, p=probs)]
                weights = sorted(rng.dirichlet(np.ones(k)).tolist(), reverse=True) if k else []
                for e in experts:
                    c["expert_tokens"][e] += 1
                c["k_hist"][k] += 1
                if t < 4:
                    trace.append({"layer": i, "call": s, "mode": mode, "index": t, "position": t,
                                  "token_id": 100 + 7 * t + s if i == 0 else None,
                                  "experts": experts, "weights": weights})
            c.update(calls=1, tokens=T, dropped=int(rng.integers(0, 3)),
                     entropy_sum=float(T * rng.uniform(0.3, 1.2)),
                     top1_sum=float(T * rng.uniform(0.4, 0.9)),
                     z_loss_sum=float(T * rng.uniform(0.0, 2.0)),
                     balance_sum=float(rng.uniform(1.0, 2.0)),
                     aux_loss_sum=float(rng.uniform(0.01, 0.1)))
            per_layer.append(c)
            totals[mode][i] = add_counts(totals[mode][i], c)
        step_rows.append({"step": 10 * (s + 1), "time": 1.5 * s, "mode": mode,
                          "layers": per_layer})
    session = {
        "format": FORMAT, "name": "run <1> & \"quotes\"", "framework": "numpy",
        "started_at": "2026-12-02T16:30:00+00:00", "ended_at": "2026-12-02T16:31:00+00:00",
        "digest": {"config": "c" * 64, "weights": "a" * 64, "inputs": None,
                   "versions": {"moe_router": "0.1.0", "python": "3.11", "numpy": "2.0"},
                   "id": DIGEST_ID},
        "layers": layers, "totals": totals, "steps": step_rows, "trace": trace, "events": [],
    }
    return json.loads(json.dumps(session))   # plain JSON, as a file would give


def expected(c: dict[str, Any]) -> dict[str, float | None]:
    """The exported metrics of one LAYER_COUNTS, computed independently of moe_router, by the
    analyzer's definitions (``None``: undefined, so not exported). Dead experts: a share below
    0.05 / E, judged only when the layer saw at least 20 slots per expert."""
    et = np.asarray(c["expert_tokens"], dtype=float)
    kh = np.asarray(c["k_hist"], dtype=float)
    slots, E, tokens = et.sum(), et.size, c["tokens"]
    return {"max_over_mean": et.max() / et.mean() if slots else None,
            "jain": slots ** 2 / (E * (et ** 2).sum()) if slots else None,
            "mean_experts": float((np.arange(len(kh)) * kh).sum() / kh.sum()),
            "mean_entropy": c["entropy_sum"] / tokens,
            "mean_top1": c["top1_sum"] / tokens,
            "mean_aux_loss": c["aux_loss_sum"] / c["calls"],
            "drop_rate": c["dropped"] / (slots + c["dropped"]),
            "dead_experts": float((et / slots < 0.05 / E).sum()) if slots / E >= 20 else None}


def combined(session: dict[str, Any], i: int) -> dict[str, Any]:
    return add_counts(session["totals"]["train"][i], session["totals"]["eval"][i])


# ----- TensorBoard ---------------------------------------------------------------------------
_READ_EVENTS = textwrap.dedent("""
    import json, sys, types
    import moe_router.debug.tensorboard as tb
    session = json.load(open(sys.argv[1]))
    tb.write_tensorboard(session, sys.argv[3])
    loaded = [m for m in ("tensorflow", "torch", "jax") if m in sys.modules]
    # read with TensorBoard's stub TF API (no 6 s TensorFlow import just to read a file)
    sys.modules["tensorboard.compat.notf"] = types.ModuleType("tensorboard.compat.notf")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(sys.argv[2], size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    out = {"loaded": loaded,
           "scalars": {t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags["scalars"]},
           "histograms": {t: [[e.step, {"num": e.histogram_value.num,
                                        "bucket": list(e.histogram_value.bucket)}]
                              for e in acc.Histograms(t)] for t in tags["histograms"]}}
    print(json.dumps(out))
""")


def read_events(session: dict[str, Any], logdir: Path, tmp_path: Path) -> dict[str, Any]:
    """Read ``logdir`` back with ``EventAccumulator`` in a fresh interpreter, which first writes
    ``session`` again (to check that writing imports no framework)."""
    path = tmp_path / "session.json"
    path.write_text(json.dumps(session))
    result = subprocess.run([sys.executable, "-c", _READ_EVENTS, str(path), str(logdir),
                             str(tmp_path / "scratch")],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("tokens", [(6, 12), (100, 160)])
def test_tensorboard_one_point_per_step(tmp_path: Path, tokens: tuple[int, int]) -> None:
    from moe_router.debug.tensorboard import write_tensorboard

    session = make_session(tokens=tokens)
    path = write_tensorboard(session, tmp_path / "tb")
    assert Path(path).parent == tmp_path / "tb" and "tfevents" in Path(path).name
    data = read_events(session, tmp_path / "tb", tmp_path)
    assert data["loaded"] == []
    scalars, hists = data["scalars"], data["histograms"]
    steps = [e["step"] for e in session["steps"]]
    for i in range(len(LAYERS)):
        for metric in ("max_over_mean", "cv", "jain", "mean_experts", "mean_entropy",
                       "normalized_entropy", "drop_rate", "mean_top1", "mean_z_loss",
                       "mean_balance_loss", "mean_aux_loss"):
            assert [s for s, _ in scalars[f"moe/{metric}/layer_{i}"]] == steps
        dead = []
        for entry, (s, _) in zip(session["steps"], scalars[f"moe/mean_experts/layer_{i}"],
                                 strict=True):
            c = entry["layers"][i]
            for metric, value in expected(c).items():
                got = dict(scalars.get(f"moe/{metric}/layer_{i}", []))
                if value is None:   # undefined: no point at this step
                    assert s not in got, (metric, i, s)
                else:
                    assert got[s] == pytest.approx(value, rel=1e-6), (metric, i, s)
            dead.append(expected(c)["dead_experts"])
            e_hist = dict(hists[f"moe/expert_tokens/layer_{i}"])[s]
            assert e_hist["bucket"] == c["expert_tokens"]
            k_hist = dict(hists[f"moe/k/layer_{i}"])[s]
            assert k_hist["bucket"] == c["k_hist"] and k_hist["num"] == c["tokens"]
        # small steps are too small to judge; large ones find layer 1's unused expert
        assert dead == [None if tokens == (6, 12) else [0.0, 1.0][i]] * len(steps)


def test_tensorboard_snapshot_of_totals_at_a_step(tmp_path: Path) -> None:
    from moe_router.debug.tensorboard import write_tensorboard

    session = make_session(seed=1, tokens=(30, 40))
    write_tensorboard(session, tmp_path / "tb", step=7)
    data = read_events(session, tmp_path / "tb", tmp_path)
    for i in range(len(LAYERS)):
        want = expected(combined(session, i))
        assert want["dead_experts"] == [0.0, 1.0][i]   # the totals are large enough to judge
        for metric, value in want.items():
            [[step, got]] = data["scalars"][f"moe/{metric}/layer_{i}"]
            assert step == 7 and got == pytest.approx(value, rel=1e-6)
        [[_, hist]] = data["histograms"][f"moe/expert_tokens/layer_{i}"]
        assert hist["bucket"] == combined(session, i)["expert_tokens"]


# ----- Prometheus ----------------------------------------------------------------------------
def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """``{sample name: {sorted labels: value}}`` of one scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def check_scrape(metrics: dict[str, Any], session: dict[str, Any]) -> None:
    for i, (E, _) in enumerate(LAYERS):
        layer = str(i)
        for mode in ("train", "eval"):
            c = session["totals"][mode][i]
            labels = (("layer", layer), ("mode", mode))
            assert metrics["moe_router_routing_calls_total"][labels] == c["calls"]
            assert metrics["moe_router_tokens_total"][labels] == c["tokens"]
            assert metrics["moe_router_routed_slots_total"][labels] == sum(c["expert_tokens"])
            assert metrics["moe_router_dropped_slots_total"][labels] == c["dropped"]
            for e in range(E):
                key = (("expert", str(e)), ("layer", layer), ("mode", mode))
                assert metrics["moe_router_expert_tokens_total"][key] == c["expert_tokens"][e]
        want = expected(combined(session, i))
        key = (("layer", layer),)
        for name, metric in (("load_max_over_mean_ratio", "max_over_mean"),
                             ("experts_per_token", "mean_experts"),
                             ("router_entropy_nats", "mean_entropy"),
                             ("dropped_slots_ratio", "drop_rate"),
                             ("dead_experts", "dead_experts")):
            if want[metric] is None:   # undefined: no sample
                assert key not in metrics.get(f"moe_router_{name}", {}), (name, i)
            else:
                assert metrics[f"moe_router_{name}"][key] == pytest.approx(want[metric],
                                                                             rel=1e-9)
        assert metrics["moe_router_experts"][key] == E
    [session_info] = metrics["moe_router_session_info"]
    assert ("digest", DIGEST_ID) in session_info


def test_serve_metrics_scrapes_the_current_session() -> None:
    from moe_router.debug.prometheus import serve_metrics

    current = {"session": make_session()}
    with serve_metrics(lambda: current["session"], per_expert=True) as server:
        assert server.port > 0 and server.url.startswith("http://127.0.0.1:")
        check_scrape(scrape(server.url), current["session"])
        assert "moe_router_dead_experts" not in scrape(server.url)   # too small to judge
        big = make_session(seed=5, tokens=(100, 160))
        current["session"] = big   # every scrape reads the source again
        metrics = scrape(server.url)
        check_scrape(metrics, big)
        assert metrics["moe_router_dead_experts"] == {(("layer", "0"),): 0.0,
                                                      (("layer", "1"),): 1.0}
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url, timeout=2)


def test_collector_without_per_expert_and_lazy_source() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from moe_router.debug.prometheus import MoERouterCollector

    def failing() -> dict[str, Any]:
        raise AssertionError("registration must not read the source")

    registry = CollectorRegistry()
    registry.register(MoERouterCollector(failing))   # describe() does not call the source
    session = make_session()
    text = generate_latest(registry_of(MoERouterCollector(lambda: session))).decode()
    assert "moe_router_tokens_total{layer=\"0\",mode=\"train\"}" in text
    assert "moe_router_expert_tokens_total" not in text
    assert "# TYPE moe_router_load_max_over_mean_ratio gauge" in text


def test_manual_event_sessions_export_no_unmeasured_means(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from moe_router.debug.events import session_from_events
    from moe_router.debug.prometheus import MoERouterCollector

    events = [{"layer": 0, "experts": [0, 1], "weights": [0.6, 0.4], "mode": "eval"},
              {"layer": 0, "experts": [1], "weights": [1.0], "mode": "eval"}]
    session = session_from_events(events)
    text = generate_latest(registry_of(MoERouterCollector(lambda: session))).decode()
    assert 'moe_router_experts_per_token{layer="0"} 1.5' in text
    assert 'moe_router_tokens_total{layer="0",mode="eval"} 2.0' in text
    assert "moe_router_router_entropy_nats{" not in text   # not measured for manual events


def registry_of(collector: Any) -> Any:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def test_sources_are_validated() -> None:
    from moe_router.debug.files import load_session
    from moe_router.debug.prometheus import MoERouterCollector

    with pytest.raises(ValueError, match="format"):
        load_session({"format": "something-else/1", "layers": [], "totals": {}})
    with pytest.raises(ValueError, match="totals"):
        load_session({**make_session(), "totals": {"train": [{}], "eval": []}})
    with pytest.raises(ValueError, match=r"\['totals'\]\['train'\]\[0\]: .*LAYER_COUNTS"):
        load_session({**make_session(), "totals": {"train": [{"calls": 1}] * 2}})
    first_layer = make_session()["layers"][0]
    with pytest.raises(ValueError, match=r"\['layers'\]\[1\]: needs the int fields"):
        load_session({**make_session(), "layers": [first_layer, {"index": 1}]})
    with pytest.raises(ValueError, match=r"\['steps'\]\[0\]"):
        load_session({**make_session(), "steps": [{"step": 0, "layers": [{}]}]})
    with pytest.raises(ValueError, match="list of dicts"):
        load_session({**make_session(), "trace": [1, 2]})
    # a manual debugger's step taken before a layer existed lists fewer layers
    short = make_session()
    short["steps"][0]["layers"] = short["steps"][0]["layers"][:1]
    assert len(load_session(short)["steps"][0]["layers"]) == 1
    collector = MoERouterCollector(lambda: {"format": FORMAT})
    with pytest.raises(ValueError, match="layers"):
        list(collector.collect())

    class Debugger:
        def to_session(self) -> dict[str, Any]:
            return make_session()

    assert load_session(Debugger())["digest"]["id"] == DIGEST_ID
    bare = {k: v for k, v in make_session().items() if k not in ("steps", "trace", "events")}
    assert {k: load_session(bare)[k] for k in ("steps", "trace", "events")} == {
        "steps": [], "trace": [], "events": []}


def test_lazy_exports_of_the_package() -> None:
    import moe_router.debug as debug
    from moe_router.debug import files, prometheus, report, tensorboard

    assert debug.write_tensorboard is tensorboard.write_tensorboard
    assert debug.serve_metrics is prometheus.serve_metrics
    assert debug.MoERouterCollector is prometheus.MoERouterCollector
    assert debug.write_report is report.write_report and debug.write_json is files.write_json
    assert set(debug.__all__) <= set(dir(debug))
    with pytest.raises(AttributeError):
        debug.as_session  # noqa: B018 - the old duplicate loader is gone


def test_debug_modules_import_nothing_heavy() -> None:
    heavy = ("torch", "jax", "tensorflow", "matplotlib", "tensorboard", "prometheus_client")
    code = ("import sys, moe_router, moe_router.cli, moe_router.debug, moe_router.debug.analyzer, "
            "moe_router.debug.suggestions, moe_router.debug.files, moe_router.debug.tensorboard, "
            "moe_router.debug.prometheus, moe_router.debug.report\n"
            f"print([m for m in {heavy!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"
