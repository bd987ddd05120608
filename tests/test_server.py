"""The live monitoring server (``moe_router.server``, ``debugger.serve``, ``moe-router serve``):
real uvicorn servers on 127.0.0.1 scraped over HTTP, a torch training loop scraped while it
trains, the CLI in a subprocess, the Grafana dashboard's metric names and a bounded load test."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from test_debug_exporters import make_session

from moe_router import cli
from moe_router.debug.analyzer import MoEAnalyzer
from moe_router.errors import InputError, InputTypeError
from moe_router.server import SessionFileSource, Snapshots, as_source, bind, serve

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "docs" / "grafana" / "moe-router-dashboard.json"
PATHS = ("/", "/metrics", "/health", "/api/session")


# ----- helpers -------------------------------------------------------------------------------
def scrape(base: str, client: httpx.Client | None = None) -> dict[str, list[tuple[dict, float]]]:
    """``/metrics`` parsed by prometheus_client's own parser: sample name -> [(labels, value)]."""
    from prometheus_client.parser import text_string_to_metric_families

    r = (client or httpx).get(base.rstrip("/") + "/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: dict[str, list[tuple[dict, float]]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def value(samples: dict[str, list[tuple[dict, float]]], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels``."""
    found = [v for lab, v in samples.get(name, []) if labels.items() <= lab.items()]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


class FakeRouter:
    """What ``moe_router.production.ProductionRouter`` offers the server (duck-typed)."""

    def __init__(self, session: dict[str, Any] | None = None, status: str = "ok") -> None:
        self.debugger = None if session is None else SimpleNamespace(to_session=lambda: session)
        self.status = status
        self.issues = MoEAnalyzer(session).detect_issues() if session else []

    def health_check(self) -> dict[str, Any]:
        return {"status": self.status, "uptime_s": 12.5, "issues": self.issues,
                "config_valid": self.status != "error", "backends": {"numpy": True}}

    def get_metrics(self) -> dict[str, Any]:
        return {"requests": 40, "errors": 2, "rejected": 1, "tokens": 1280,
                "latency_ms": {"p50": 1.5, "p95": 4.0, "p99": 9.0, "mean": 2.0, "window": 40},
                "expert_usage": [0.25, 0.5, 0.125, 0.125], "balancedness": 0.8,
                "drop_rate": 0.01, "fallbacks": 3, "uptime_s": 12.5}

    def route(self, hidden_states: Any) -> None:  # pragma: no cover - not called by the server
        raise AssertionError("the monitor must not route")


# ----- sources, snapshots, binding -----------------------------------------------------------
def test_snapshots_cache_for_ttl_and_read_the_source_once_per_window() -> None:
    calls = []

    class Counting:
        kind = "counting"

        def session(self) -> dict[str, Any]:
            calls.append(time.monotonic())
            return make_session()

        def health(self, session: Any) -> dict[str, Any]:
            return {"status": "ok", "issues": []}

        def router_metrics(self) -> None:
            return None

    snaps = Snapshots(as_source(Counting()), ttl=60)
    first = snaps.get()
    threads = [threading.Thread(target=snaps.get) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert snaps.get() is first and len(calls) == 1
    assert json.loads(first.session_json) == make_session()
    assert first.health["source"] == "counting" and first.health["session"]["tokens"] > 0
    fresh = Snapshots(as_source(Counting()), ttl=0)
    assert fresh.get() is not fresh.get() and len(calls) == 3
    for bad in (-1, "1", True, float("nan")):
        with pytest.raises(InputError, match="cache_ttl"):
            Snapshots(as_source(Counting()), ttl=bad)


def test_as_source_picks_the_adapter_or_names_the_argument(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(make_session()))
    assert as_source(FakeRouter()).kind == "router"
    assert as_source(str(path)).kind == "session-file" and as_source(path).kind == "session-file"
    assert as_source(make_session()).kind == "session"
    from moe_router.debug import MoEDebugger

    assert as_source(MoEDebugger(None)).kind == "debugger"
    with pytest.raises(InputTypeError, match="^source: expected a MoEDebugger"):
        as_source(42)
    with pytest.raises(InputError, match="format"):
        as_source({"format": "other/1"})


def test_session_file_is_reread_when_it_changes_and_a_bad_rewrite_keeps_the_last(
        tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(make_session()))
    source = SessionFileSource(path)
    assert source.session()["name"] == make_session()["name"]
    changed = {**make_session(seed=1), "name": "second"}
    path.write_text(json.dumps(changed) + " " * 7)   # a different size: changed even on coarse
    assert source.session()["name"] == "second"      # mtime clocks
    path.write_text("{broken")
    assert source.session()["name"] == "second"
    health = source.health(source.session())
    assert health["status"] == "error" and "is not a JSON file" in health["error"]


def test_bind_checks_host_and_port() -> None:
    for bad in (-1, 65536, "80", 1.5, True):
        with pytest.raises((InputError, InputTypeError), match="^port: expected an int"):
            bind("127.0.0.1", bad)  # type: ignore[arg-type]
    with pytest.raises(InputTypeError, match="^host"):
        bind("", 0)
    taken = bind("127.0.0.1", 0)
    try:
        with pytest.raises(InputError, match=rf"^port: cannot listen on 127.0.0.1:"
                                             rf"{taken.getsockname()[1]}"):
            bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()


# ----- the endpoints -------------------------------------------------------------------------
def test_endpoints_of_a_session(tmp_path: Path) -> None:
    session = make_session(tokens=(100, 160))  # judged: layer 1's expert 2 is dead
    issues = MoEAnalyzer(session).detect_issues()
    assert "dead_expert" in [i["kind"] for i in issues]
    with serve(session) as server, httpx.Client(base_url=server.url, timeout=10) as c:
        assert server.host == "127.0.0.1" and server.url == f"http://127.0.0.1:{server.port}/"
        # /metrics: the debugger's counters of the session, plus health
        m = scrape(server.url, c)
        for i in range(2):
            for mode in ("train", "eval"):
                want = session["totals"][mode][i]
                assert value(m, "moe_router_tokens_total", layer=str(i), mode=mode) \
                    == want["tokens"]
                assert value(m, "moe_router_routing_calls_total", layer=str(i), mode=mode) \
                    == want["calls"]
        assert value(m, "moe_router_dead_experts", layer="1") == 1
        assert value(m, "moe_router_health_status", status="degraded") == 1
        assert value(m, "moe_router_health_status", status="ok") == 0
        assert value(m, "moe_router_issues", severity="warning") \
            == sum(i["severity"] == "warning" for i in issues)
        assert "moe_router_requests_total" not in m   # no router, no serving metrics
        # /health: 200 while degraded, with the analyzer's findings
        r = c.get("/health")
        body = r.json()
        assert r.status_code == 200 and body["status"] == "degraded"
        assert body["issues"] == json.loads(json.dumps(issues))
        assert body["session"]["tokens"] == sum(x["tokens"] for m_ in ("train", "eval")
                                                for x in session["totals"][m_])
        # /api/session: the record, as strict JSON
        r = c.get("/api/session")
        assert r.status_code == 200 and r.headers["content-type"] == "application/json"
        assert json.loads(r.text, parse_constant=lambda x: pytest.fail(x)) == session
        # /: the page, self-contained
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<script>" in r.text and 'fetch(url' in r.text
        assert not re.search(r"(?:src|href)=[\"']?(?:https?:)?//", r.text)
        # read-only: GET and HEAD only
        for path in PATHS:
            assert c.head(path).status_code == 200
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                r = c.request(method, path)
                assert r.status_code == 405, (method, path)
                assert set(r.headers["allow"].replace(" ", "").split(",")) == {"GET", "HEAD"}
        assert c.get("/nope").status_code == 404
        # the server's own request metrics, bounded label sets
        m = scrape(server.url, c)
        assert value(m, "moe_router_monitor_requests_total", endpoint="/metrics", code="200") >= 1
        assert value(m, "moe_router_monitor_requests_total", endpoint="/", code="405") == 4
        assert value(m, "moe_router_monitor_requests_total", endpoint="other", code="404") == 1
        assert {lab["endpoint"] for lab, _ in m["moe_router_monitor_requests_total"]} \
            <= {"/", "/metrics", "/health", "/api/session", "other"}
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "health", timeout=2)   # closed: the port is free again
    bind("127.0.0.1", server.port).close()


def test_health_reports_collapse_and_dead_experts_of_a_live_debugger() -> None:
    from moe_router.debug import MoEDebugger

    debugger = MoEDebugger(None)
    fired: list[dict[str, Any]] = []
    debugger.register_callback("issue", fired.append)
    for token in range(300):   # expert 0 takes almost every token: collapse, 3 dead experts
        expert = 0 if token % 100 else 1 + token // 100
        debugger.process_routing_event({"selected_expert": expert, "confidence": 0.9})
    with debugger.serve(port=0, cache_ttl=0) as server:
        r = httpx.get(server.url + "health", timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "degraded"
        assert not fired   # polling the health does not fire the debugger's callbacks
        expected = debugger.detect_issues()
        assert body["issues"] == json.loads(json.dumps(expected))
        assert {"collapse", "dead_expert"} <= {i["kind"] for i in body["issues"]}
        collapse = next(i for i in body["issues"] if i["kind"] == "collapse")
        assert collapse["severity"] == "error" and collapse["evidence"]["top_expert"] == 0
        m = scrape(server.url)
        assert value(m, "moe_router_issues", severity="error") \
            == sum(i["severity"] == "error" for i in expected)
        assert value(m, "moe_router_tokens_total", layer="0", mode="eval") == 300
        # more events: the next read sees them (cache_ttl=0)
        debugger.process_routing_event({"selected_expert": 0, "confidence": 0.9})
        assert value(scrape(server.url), "moe_router_tokens_total", layer="0",
                     mode="eval") == 301


def test_health_is_503_when_the_source_fails() -> None:
    class Broken:
        kind = "broken"

        def session(self) -> dict[str, Any]:
            raise RuntimeError("counters unreadable")

        def health(self, session: Any) -> dict[str, Any]:
            return {"status": "ok", "issues": []}

        def router_metrics(self) -> None:
            return None

    with serve(Broken(), cache_ttl=0) as server:
        r = httpx.get(server.url + "health", timeout=10)
        assert r.status_code == 503
        assert r.json()["status"] == "error" and "counters unreadable" in r.json()["error"]
        assert httpx.get(server.url + "api/session", timeout=10).status_code == 404
        m = scrape(server.url)
        assert value(m, "moe_router_health_status", status="error") == 1


@pytest.mark.parametrize("status, code", [("ok", 200), ("degraded", 200), ("error", 503),
                                          ("weird", 503)])
def test_router_source_health_and_serving_metrics(status: str, code: int) -> None:
    router = FakeRouter(make_session(tokens=(100, 160)), status=status)
    with serve(router, cache_ttl=0) as server, httpx.Client(base_url=server.url) as c:
        r = c.get("/health")
        body = r.json()
        assert r.status_code == code and body["status"] == ("error" if status == "weird"
                                                            else status)
        assert body["issues"] == json.loads(json.dumps(router.issues)) and body["source"] \
            == "router"
        assert body["config_valid"] is (status != "error") and body["uptime_s"] == 12.5
        assert body["router_metrics"]["requests"] == 40
        m = scrape(server.url, c)
        assert value(m, "moe_router_requests_total") == 40
        assert value(m, "moe_router_request_errors_total") == 2
        assert value(m, "moe_router_request_rejections_total") == 1
        assert value(m, "moe_router_request_tokens_total") == 1280
        assert value(m, "moe_router_fallbacks_total") == 3
        assert value(m, "moe_router_request_latency_seconds", quantile="0.99") \
            == pytest.approx(0.009)
        assert value(m, "moe_router_request_latency_mean_seconds") == pytest.approx(0.002)
        assert value(m, "moe_router_request_drop_ratio") == 0.01
        assert value(m, "moe_router_balancedness") == 0.8
        assert value(m, "moe_router_expert_usage_ratio", expert="1") == 0.5
        assert value(m, "moe_router_uptime_seconds") == 12.5
        assert value(m, "moe_router_tokens_total", layer="0", mode="train") > 0  # its debugger
        assert c.get("/api/session").json()["name"] == router.debugger.to_session()["name"]


def test_router_without_a_debugger_has_no_session() -> None:
    with serve(FakeRouter(None)) as server:
        r = httpx.get(server.url + "api/session", timeout=10)
        assert r.status_code == 404 and "no session" in r.json()["error"]
        m = scrape(server.url)
        assert "moe_router_tokens_total" not in m and value(m, "moe_router_requests_total") == 40
        assert httpx.get(server.url + "health", timeout=10).json()["session"] is None


def test_production_router_is_served_if_available() -> None:
    """The real ``moe_router.production`` router (built by another part of the project)."""
    production = pytest.importorskip("moe_router.production",
                                     reason="moe_router.production is not there yet")
    np = pytest.importorskip("numpy")
    router = production.RouterFactory.create_optimized_for_inference(d_model=16)
    for _ in range(3):
        router.route(np.random.default_rng(0).standard_normal((2, 8, 16)).astype("float32"))
    assert router.debugger is not None   # monitoring is on by default
    with serve(router, cache_ttl=0) as server:
        m = scrape(server.url)
        assert value(m, "moe_router_requests_total") == 3
        assert value(m, "moe_router_request_tokens_total") == 48
        assert value(m, "moe_router_request_latency_seconds", quantile="0.5") > 0
        assert value(m, "moe_router_tokens_total", layer="0", mode="eval") == 48  # its debugger
        health = httpx.get(server.url + "health", timeout=10)
        assert health.status_code == 200 and health.json()["status"] in ("ok", "degraded")
        assert health.json()["issues"] == router.health_check()["issues"]
        assert health.json()["router_metrics"]["requests"] == 3
        record = httpx.get(server.url + "api/session", timeout=10).json()
        assert record["format"] == "moe-router-session/1"
        assert record["totals"]["eval"][0]["tokens"] == 48


# ----- a torch training loop, scraped while it trains ----------------------------------------
@pytest.mark.torch
def test_debugger_serve_scraped_while_torch_trains() -> None:
    torch = pytest.importorskip("torch")
    import moe_router as mr
    from moe_router.debug import MoEDebugger
    from moe_router.torch import MoE, total_aux_loss

    torch.manual_seed(0)
    config = mr.MoEConfig(d_model=16, d_ff=32, router=mr.RouterConfig(
        num_experts=4, strategy="top_p", top_p=0.5, min_experts=1, max_experts=2))
    model = torch.nn.Sequential(MoE(config, seed=0), MoE(config, seed=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    debugger = MoEDebugger(model, trace=64)
    debugger.start_session("live")
    seen: list[tuple[float, float, int]] = []   # (time, train tokens of layer 0, /health code)
    failures: list[BaseException] = []
    stop = threading.Event()

    with debugger.serve(port=0, cache_ttl=0) as server:
        def scraper() -> None:
            with httpx.Client(base_url=server.url, timeout=10) as c:
                while not stop.is_set():
                    try:
                        m = scrape(server.url, c)
                        tokens = value(m, "moe_router_tokens_total", layer="0", mode="train")
                        seen.append((time.monotonic(), tokens, c.get("/health").status_code))
                    except BaseException as err:  # reported in the main thread
                        failures.append(err)
                        return

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        started = time.monotonic()
        step = 0
        while step < 200 and (step < 20 or sum(t > started for t, _, _ in seen) < 4):
            x = torch.randn(4, 8, 16)
            loss = model(x).square().mean() + total_aux_loss(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            debugger.step()
            step += 1
        ended = time.monotonic()
        stop.set()
        thread.join(timeout=20)
        assert not failures, failures
        during = [(t, tokens, code) for t, tokens, code in seen if started < t < ended]
        assert len(during) >= 4, (len(seen), step)
        tokens_seen = [tokens for _, tokens, _ in seen]
        assert tokens_seen == sorted(tokens_seen)          # counters only grow
        assert len({tokens for _, tokens, _ in during}) >= 2, during   # live, not a snapshot
        assert all(code == 200 for _, _, code in seen)
        # after training: the scrape, the health and the JSON agree with the debugger
        record = debugger.to_session()
        m = scrape(server.url)
        for i in range(2):
            assert value(m, "moe_router_tokens_total", layer=str(i), mode="train") \
                == record["totals"]["train"][i]["tokens"] == step * 32
        health = httpx.get(server.url + "health", timeout=10).json()
        assert health["issues"] == json.loads(json.dumps(debugger.detect_issues()))
        assert health["session"]["running"] is True and health["session"]["steps"] == step
        live = httpx.get(server.url + "api/session", timeout=10).json()
        assert live["format"] == "moe-router-session/1" and len(live["steps"]) == step
        assert live["totals"] == json.loads(json.dumps(record["totals"]))
        debugger.end_session()
        assert httpx.get(server.url + "health", timeout=10).json()["session"]["running"] \
            is False
    assert not server.running


# ----- the CLI -------------------------------------------------------------------------------
@contextlib.contextmanager
def cli_server(tmp_path: Path, *args: str, timeout: float = 60.0,
               env: dict[str, str] | None = None) -> Iterator[tuple[Any, str]]:
    """``python -m moe_router serve ARGS --port 0`` in a subprocess (``env``: added to the
    environment); yields (process, url) once it answers; terminates it at the end and checks
    it stopped cleanly."""
    err_path = tmp_path / "serve.stderr"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "moe_router", "serve", *args,
                                 "--port", "0"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=err, text=True, env={**os.environ, **(env or {})})
    try:
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""   # type: ignore[union-attr]
        found = re.search(r" at (http://127\.0\.0\.1:\d+/) ", line)
        assert found, f"no URL printed: {line!r}; stderr: {err_path.read_text()[-2000:]}"
        url = found.group(1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                httpx.get(url + "health", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline and proc.poll() is None, \
                    err_path.read_text()[-2000:]
                time.sleep(0.05)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()   # type: ignore[union-attr]
    assert proc.returncode == 0, err_path.read_text()[-2000:]   # SIGTERM: a clean shutdown


def test_cli_serve_a_session_file(tmp_path: Path) -> None:
    path = tmp_path / "session.json"
    session = make_session(tokens=(100, 160))
    path.write_text(json.dumps(session))
    with cli_server(tmp_path, "--session", str(path), "--refresh", "0.5") as (proc, url):
        assert httpx.get(url + "api/session", timeout=10).json() == session
        health = httpx.get(url + "health", timeout=10)
        assert health.status_code == 200 and health.json()["source"] == "session-file"
        assert {i["kind"] for i in health.json()["issues"]} \
            == {i["kind"] for i in MoEAnalyzer(session).detect_issues()}
        m = scrape(url)
        assert value(m, "moe_router_tokens_total", layer="1", mode="eval") \
            == session["totals"]["eval"][1]["tokens"]
        assert "refresh_ms\": 500" in httpx.get(url, timeout=10).text
        assert httpx.post(url + "api/session", timeout=10).status_code == 405
        # a rewritten file is served after the cache window (1 s at most)
        path.write_text(json.dumps({**session, "name": "rewritten"}))
        deadline = time.monotonic() + 10
        while httpx.get(url + "api/session", timeout=10).json()["name"] != "rewritten":
            assert time.monotonic() < deadline, "the rewritten session was not picked up"
            time.sleep(0.1)


def test_cli_serve_the_router_from_the_environment(tmp_path: Path) -> None:
    pytest.importorskip("moe_router.production", reason="moe_router.production is not there yet")
    env = {"MOE_D_MODEL": "16", "MOE_NUM_EXPERTS": "4"}
    with cli_server(tmp_path, env=env) as (proc, url):
        health = httpx.get(url + "health", timeout=10)
        body = health.json()
        assert health.status_code == 200 and body["source"] == "router"
        assert body["status"] == "ok" and body["config_valid"] is True
        assert body["num_experts"] == 4 and body["d_model"] == 16
        m = scrape(url)
        assert value(m, "moe_router_requests_total") == 0
        assert value(m, "moe_router_health_status", status="ok") == 1
        assert httpx.get(url + "api/session", timeout=10).json()["format"] \
            == "moe-router-session/1"


def test_cli_serve_bad_environment(capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("moe_router.production", reason="moe_router.production is not there yet")
    monkeypatch.setenv("MOE_NUM_EXPERTS", "many")
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-router serve: error: cannot build the router from the "
                          "environment: ") and "MOE_NUM_EXPERTS" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--session", "{missing}"], "--session: cannot read '{missing}': no such file"),
    (["--session", "{bad}"], "--session: '{bad}' is not a JSON file"),
    (["--session", "{other}"], "is not supported"),
])
def test_cli_serve_rejects_bad_session_files(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             args: list[str], message: str) -> None:
    names = {"missing": str(tmp_path / "nope.json"), "bad": str(tmp_path / "bad.json"),
             "other": str(tmp_path / "other.json")}
    Path(names["bad"]).write_text("{not json")
    Path(names["other"]).write_text(json.dumps({"format": "other/1"}))
    argv = [a.format(**names) for a in args]
    assert cli.main(["serve", *argv, "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-router serve: error: ") and message.format(**names) in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("port", ["abc", "-1", "65536", "1.5"])
def test_cli_serve_rejects_bad_ports(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                     port: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(make_session()))
    with pytest.raises(SystemExit) as exited:
        cli.main(["serve", "--session", str(path), "--port", port])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --port: expected a port number in 0..65535, got {port!r}" in err \
        or f"argument --port: expected a port number in 0..65535, got {port}" in err, err


def test_cli_serve_port_in_use_and_no_router(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps(make_session()))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", "--session", str(path), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"moe-router serve: error: port: cannot listen on 127.0.0.1:{port}" in err, err
    monkeypatch.setitem(sys.modules, "moe_router.production", None)   # not importable
    assert cli.main(["serve", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "no --session given and the production router is not available" in err, err
    assert "serve" in cli.build_parser().format_help()


# ----- Grafana -------------------------------------------------------------------------------
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
            "and", "or", "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """The metric (sample) names a PromQL expression queries: identifiers left once strings,
    label matchers, ranges, Grafana variables and grouping clauses are removed, that are not
    function or aggregation calls nor keywords."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'', '""', expr)
    expr = re.sub(r"\{[^{}]*\}", " ", expr)
    expr = re.sub(r"\[[^\[\]]*\]", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if not expr[m.end():].lstrip().startswith("(") and m.group() not in KEYWORDS:
            names.add(m.group())
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)   # drop the label arg
            out.append((f"variable {var['name']}", inner.group(1) if inner else query))
    return out


def test_promql_metric_names_follow_the_suffix_rules() -> None:
    assert promql_metric_names('sum by (le, endpoint) (rate(a_bucket{x="y(z)"}[5m]))') \
        == {"a_bucket"}
    assert promql_metric_names('histogram_quantile(0.99, rate(h_bucket[$__rate_interval]))') \
        == {"h_bucket"}
    assert promql_metric_names("a / on (layer) group_left b > bool 1e3") == {"a", "b"}
    exported = {"moe_router_tokens_total", "moe_router_monitor_request_duration_seconds_bucket",
                "moe_router_request_latency_seconds"}
    assert promql_metric_names("rate(moe_router_tokens[5m])") - exported   # counter: _total
    assert promql_metric_names("moe_router_request_latency_seconds_bucket") - exported  # summary
    assert not promql_metric_names(
        "rate(moe_router_monitor_request_duration_seconds_bucket[1m])") - exported


def test_grafana_dashboard_queries_only_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"] and dash["schemaVersion"] >= 30
    for panel in dash["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}" and panel["targets"], panel
    router = FakeRouter(make_session(tokens=(100, 160)))   # every gauge defined
    with serve(router, cache_ttl=0) as server:
        httpx.get(server.url + "health", timeout=10)    # the server's own metrics get samples
        exported = set(scrape(server.url))
    queries = dashboard_queries()
    assert len(queries) >= 20
    used: set[str] = set()
    for where, expr in queries:
        names = promql_metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} not exported"
        used |= names
    # every family we export is on the dashboard (per-expert series are opt-in)
    families = {re.sub(r"_(?:total|bucket|sum|count|created|info)$", "", n) for n in exported}
    shown = {re.sub(r"_(?:total|bucket|sum|count|created|info)$", "", n) for n in used}
    assert families - shown <= {"moe_router_layer"}, sorted(families - shown)


# ----- bounded load --------------------------------------------------------------------------
def load(url: str, requests: int, clients: int) -> tuple[list[float], list[str]]:
    """``requests`` GETs over ``clients`` threads (one keep-alive client each), cycling over
    /metrics, /health, /api/session; returns (latencies s, errors)."""
    paths = ("metrics", "health", "api/session")
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(n: int, offset: int) -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            for i in range(n):
                start = time.perf_counter()
                try:
                    r = c.get(paths[(i + offset) % 3])
                    ok = r.status_code == 200 and len(r.content) > 100
                    problem = None if ok else f"HTTP {r.status_code}"
                except httpx.HTTPError as err:
                    problem = repr(err)
                with lock:
                    latencies.append(time.perf_counter() - start)
                    if problem:
                        errors.append(problem)

    threads = [threading.Thread(target=worker, args=(requests // clients + (k < requests %
                                                                             clients), k))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return latencies, errors


def test_bounded_load_no_errors_and_flat_memory(tmp_path: Path) -> None:
    psutil = pytest.importorskip("psutil")
    path = tmp_path / "session.json"
    path.write_text(json.dumps(make_session(steps=30, tokens=(100, 160))))
    with cli_server(tmp_path, "--session", str(path)) as (proc, url):
        server = psutil.Process(proc.pid)
        _, errors = load(url, 150, 3)   # warm-up: imports, caches, thread pool
        assert not errors
        before = server.memory_info().rss
        started = time.perf_counter()
        latencies, errors = load(url, 600, 3)
        elapsed = time.perf_counter() - started
        grown = server.memory_info().rss - before
    assert len(latencies) == 600 and not errors, errors[:5]
    assert elapsed < 120
    assert grown < 8 * 2**20, f"server RSS grew by {grown / 2**20:.1f} MiB over 600 requests"
    if os.environ.get("MOE_VERBOSE_BENCH"):
        print(f"600 requests in {elapsed:.2f} s, RSS +{grown / 2**20:.2f} MiB")
