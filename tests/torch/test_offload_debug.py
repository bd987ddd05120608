"""Offload metrics through the debugger: a torch model offloaded with ``moe_router.offload`` and a
``MoEDebugger`` give a session record whose ``"offload"`` section is the store's metrics, and the
JSON export, Prometheus collector, TensorBoard writer, HTML report and live server carry it."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest

torch = pytest.importorskip("torch")

from offload_models import Residual  # noqa: E402

import moe_router as mr  # noqa: E402
import moe_router.offload as mo  # noqa: E402
from moe_router.debug import MoEDebugger  # noqa: E402
from moe_router.debug.files import read_json, validate_session  # noqa: E402
from moe_router.errors import InputError, InputTypeError  # noqa: E402
from moe_router.torch import MoE  # noqa: E402

pytestmark = [pytest.mark.torch]

D, F_, E, L, SLOTS = 32, 48, 8, 3, 4
#: OFFLOAD_LAYER key -> Prometheus sample name
PROM = {"hits": "moe_router_offload_hits_total", "misses": "moe_router_offload_misses_total",
        "prefetch_hits": "moe_router_offload_prefetch_hits_total",
        "prefetch_loads": "moe_router_offload_prefetch_loads_total",
        "prefetch_wasted": "moe_router_offload_prefetch_wasted_total",
        "bytes_moved": "moe_router_offload_moved_bytes_total",
        "bytes_wasted": "moe_router_offload_wasted_bytes_total",
        "stall_s": "moe_router_offload_stall_seconds_total",
        "hit_rate": "moe_router_offload_hit_ratio",
        "precision": "moe_router_offload_prefetch_precision_ratio",
        "recall": "moe_router_offload_prefetch_recall_ratio",
        "resident_bytes": "moe_router_offload_resident_bytes",
        "peak_resident_bytes": "moe_router_offload_peak_resident_bytes"}




def _offloaded(steps: int = 10):
    """(model, store, debugger) after ``steps`` single-token forwards in a running session."""
    mc = mr.MoEConfig(d_model=D, d_ff=F_, router=mr.RouterConfig(num_experts=E, k=2),
                      activation="swiglu", dispatch="torch:loop", init_std=0.02)
    model = Residual([MoE(mc, seed=i).eval() for i in range(L)])
    with torch.no_grad():
        for layer in model.layers[1:]:   # similar routers: prefetch guesses right sometimes
            layer.router.weight.copy_(model.layers[0].router.weight)
    store = mo.offload_model(model, experts_per_layer=SLOTS, prefetch=True, compute="move")
    debugger = MoEDebugger(model)
    debugger.start_session("offload")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(1, D, generator=g))
            debugger.step()
    return model, store, debugger


@pytest.fixture(scope="module")
def offloaded():
    model, store, debugger = _offloaded()
    yield model, store, debugger
    store.close()


def test_session_offload_section_is_the_store_metrics(offloaded):
    model, store, debugger = offloaded
    session = debugger.to_session()
    metrics = store.metrics()
    assert session["offload"] == metrics
    off = session["offload"]
    assert off["policy"] == "lru" and off["slots"] == SLOTS and off["num_experts"] == E
    assert off["expert_bytes"] == 3 * D * F_ * 4 and off["prefetch"] is True
    # one token per forward: each layer uses its k = 2 experts once per step, as the debugger's
    # own routing counters say
    for i, layer in enumerate(off["layers"]):
        routed = sum(session["totals"]["eval"][i]["expert_tokens"])
        assert layer["hits"] + layer["misses"] == routed == 2 * 10
        assert layer["peak_resident_bytes"] <= SLOTS * off["expert_bytes"]
    assert off["layers"][0]["recall"] is None and off["total"]["prefetch_loads"] > 0
    assert json.loads(json.dumps(session))["offload"] == metrics   # plain JSON


def test_json_export_and_old_records(offloaded, tmp_path):
    _, store, debugger = offloaded
    path = tmp_path / "session.json"
    debugger.export_session(path)
    assert read_json(path)["offload"] == store.metrics()
    old = json.loads(path.read_text())
    del old["offload"]                     # a record from before offloading existed
    assert "offload" not in validate_session(old)
    bad = json.loads(path.read_text())
    del bad["offload"]["layers"][1]["misses"]
    with pytest.raises(InputError, match=re.escape("session['offload']['layers'][1]")):
        validate_session(bad)
    bad["offload"] = {"layers": "nope"}
    with pytest.raises(InputError, match=re.escape("session['offload']")):
        validate_session(bad)


def test_watch_offload_explicit_and_errors():
    mc = mr.MoEConfig(d_model=D, d_ff=F_, router=mr.RouterConfig(num_experts=E, k=2),
                      dispatch="torch:loop")
    model = Residual([MoE(mc, seed=0), MoE(mc, seed=1)]).eval()
    debugger = MoEDebugger(model)
    assert "offload" not in debugger.to_session()        # nothing offloaded: no section
    layers = copy.deepcopy(list(model.layers))
    store = mo.offload_model(layers, experts_per_layer=2, compute="move")  # not on the model
    debugger.watch_offload(store)
    with torch.no_grad():
        torch.nn.Sequential(*layers)(torch.randn(2, D))
    assert debugger.to_session()["offload"] == store.metrics()
    assert store.metrics()["total"]["misses"] > 0
    store.close()
    with pytest.raises(InputTypeError, match="store"):
        debugger.watch_offload(object())


def _scrape(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def _check_prometheus(samples: dict, off: dict) -> None:
    for i, layer in enumerate(off["layers"]):
        key = (("layer", str(i)),)
        for field, name in PROM.items():
            if layer[field] is None:             # undefined (layer 0's recall): no sample
                assert key not in samples.get(name, {}), (name, i)
            else:
                assert samples[name][key] == layer[field], (name, i)
        for path, n in layer["paths"].items():
            assert samples["moe_router_offload_served_total"][
                (("layer", str(i)), ("path", path))] == n
    assert samples["moe_router_offload_slots"][()] == SLOTS
    assert samples["moe_router_offload_info"][(("policy", "lru"),)] == 1


def test_prometheus_collector_scrape_shows_the_offload_values(offloaded):
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from moe_router.debug.prometheus import MoERouterCollector

    _, store, debugger = offloaded
    registry = CollectorRegistry()
    registry.register(MoERouterCollector(debugger.to_session))
    samples = _scrape(generate_latest(registry).decode())
    _check_prometheus(samples, store.metrics())
    assert samples["moe_router_tokens_total"][(("layer", "0"), ("mode", "eval"))] == 10


def test_tensorboard_scalars_read_back(offloaded, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_router.debug.tensorboard import write_tensorboard

    _, store, debugger = offloaded
    session = debugger.to_session()
    write_tensorboard(session, tmp_path / "tb")
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    last = session["steps"][-1]["step"]
    for i, layer in enumerate(store.metrics()["layers"]):
        for key in ("hits", "misses", "hit_rate", "precision", "recall", "bytes_moved",
                    "bytes_wasted", "stall_s", "peak_resident_bytes"):
            tag = f"offload/{key}/layer_{i}"
            if layer[key] is None:
                assert tag not in tags
                continue
            [event] = acc.Scalars(tag)          # once, at the last step (cumulative)
            assert event.step == last and event.value == pytest.approx(layer[key], rel=1e-6)
    assert len(acc.Scalars("moe/mean_experts/layer_0")) == len(session["steps"])


def _offload_cells(html: str) -> list[list[str]]:
    table = re.search(r"<table[^>]*id=.offload-table.*?</table>", html, re.S)
    assert table, "no offload table"
    return [re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
            for row in re.findall(r"<tr[^>]*>(.*?)</tr>", table.group(0), re.S) if "<td" in row]


def test_report_renders_the_offload_section(offloaded):
    pytest.importorskip("matplotlib")
    from moe_router.debug.report import render_report

    _, store, debugger = offloaded
    html = render_report(debugger)
    assert "<h2>Expert offloading</h2>" in html
    rows = _offload_cells(html)
    metrics = store.metrics()
    assert [r[0] for r in rows] == [str(i) for i in range(L)] + ["total"]
    for row, layer in zip(rows, [*metrics["layers"], metrics["total"]]):
        assert row[1:3] == [str(layer["hits"]), str(layer["misses"])]
        assert row[3] == f"{layer['hit_rate']:.3g}"
    assert rows[0][5] == "-"                    # layer 0 has no prediction: no recall
    session = debugger.to_session()
    del session["offload"]
    assert "offload-table" not in render_report(session)   # old records: no section


def test_live_server_carries_the_offload_metrics(offloaded, tmp_path):
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    _, store, debugger = offloaded
    with debugger.serve(port=0, cache_ttl=0) as server:
        samples = _scrape(httpx.get(server.url + "metrics", timeout=10).text)
        _check_prometheus(samples, store.metrics())
        body = httpx.get(server.url + "api/session", timeout=10).json()
        assert body["offload"]["layers"][1]["hits"] == store.metrics()["layers"][1]["hits"]
        health = httpx.get(server.url + "health", timeout=10).json()
        assert health["session"]["offload_hit_rate"] == pytest.approx(
            store.metrics()["total"]["hit_rate"])
        page = httpx.get(server.url, timeout=10).text
        assert 'id="offload"' in page and "drawOffload" in page
        chromium = shutil.which("chromium") or shutil.which("chromium-browser")
        if chromium is None:
            return
        result = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=3000",
             "--dump-dom", server.url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _offload_cells(result.stdout)
    metrics = store.metrics()
    assert [r[0] for r in rows] == [str(i) for i in range(L)] + ["total"]
    assert [r[1] for r in rows] == [str(m["hits"]) for m in [*metrics["layers"],
                                                             metrics["total"]]]


@pytest.mark.hf
def test_from_pretrained_hf_model_is_found_by_the_debugger(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.MixtralConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, intermediate_size=48,
                                        num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    transformers.MixtralForCausalLM(config).eval().save_pretrained(tmp_path)
    model = mo.from_pretrained(tmp_path, experts_per_layer=2, compute="move")
    store = mo.store_of(model)
    debugger = MoEDebugger(model)
    with debugger.session("generate"):
        with torch.no_grad():
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    store.close()
    record = debugger.to_session()           # the finished record, read at end_session
    assert record["offload"] == store.metrics() and len(record["offload"]["layers"]) == 2
    assert record["digest"]["weights"] is None   # the experts are not in memory
    for i, layer in enumerate(record["offload"]["layers"]):
        assert layer["hits"] + layer["misses"] > 0
        assert sum(record["totals"]["eval"][i]["expert_tokens"]) > 0
