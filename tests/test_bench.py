"""make bench records the cache hit ratio of every step next to its latency, and searches each path against
each of its references the same way."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

import loadtest.bench as bench
from common.k6config import k6_config
from common.stackconfig import load
from loadtest import performance
from loadtest.bench import Step, cache_counts, hit_ratio, search

REGISTRY = CollectorRegistry()
LOOKUPS = Counter("loadproof_cache_lookups", "lookups", ["result"], registry=REGISTRY)


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = generate_latest(REGISTRY) if self.path == "/metrics" else b""
        self.send_response(200 if body else 404)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def metrics_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def test_hit_ratio_is_over_the_step_only(metrics_url: str) -> None:
    LOOKUPS.labels("hit").inc(10)
    LOOKUPS.labels("miss").inc(10)
    before = cache_counts(metrics_url)
    LOOKUPS.labels("hit").inc(30)
    LOOKUPS.labels("miss").inc(10)
    after = cache_counts(metrics_url)
    assert before is not None and after is not None
    assert hit_ratio(before, after) == pytest.approx(0.75)  # 30 of 40 in the step, not 40 of 60


def test_a_target_without_cache_metrics_has_no_ratio() -> None:
    assert cache_counts("http://127.0.0.1:9") is None  # nothing listens on the discard port
    assert hit_ratio(None, None) is None
    assert hit_ratio((5.0, 5.0), (5.0, 5.0)) is None  # no lookups in the step: not 0


@pytest.mark.e2e
def test_cold_reference_commits_one_row_and_one_stream_entry_per_request() -> None:
    """The cold path's floor really is durable: each 202 is a committed row plus an XADD."""
    import httpx
    import psycopg
    import redis

    from loadtest.bench import ReferenceServer
    from service.reference import REFERENCE_STREAM

    with ReferenceServer(1, mode="insert", db_pool_size=2) as ref:
        assert ref.postgres is not None and ref.redis is not None
        answers = [httpx.post(f"{ref.url}/task", json={"persona_id": "p", "topic": f"t{i}"}) for i in range(5)]
        assert [a.status_code for a in answers] == [202] * 5
        with psycopg.connect(ref.postgres.dsn) as conn:
            row = conn.execute("SELECT count(*) FROM reference_tasks").fetchone()
            assert row is not None and row[0] == 5
            fsync = conn.execute("SHOW fsync").fetchone()
            assert fsync is not None and fsync[0] == "on"  # the same durability as make demo
        client = redis.Redis.from_url(ref.redis.url)
        try:
            assert client.xlen(REFERENCE_STREAM) == 5
        finally:
            client.close()


def test_each_step_starts_after_the_backlog_settled_outside_the_budget(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A step's verdict must not depend on the steps before it: ``settle`` runs before every step, what
    it leaves is recorded on the step, and its waiting does not eat the search's time budget."""
    calls: list[str] = []

    def fake_step(cfg: object, base_url: str, rate: int, **_: object) -> Step:
        calls.append(f"step {rate}")
        return Step(rate=rate, passed=rate <= 700, p95_ms=1.0, error_rate=0.0, dropped=0, requests=rate, seconds=0.0)

    def settle() -> int:
        calls.append("settle")
        time.sleep(0.2)  # 7 steps wait 1.4 s in all: more than the budget's 0.5 s slack
        return len(calls)

    monkeypatch.setattr(bench, "run_step", fake_step)
    best, steps = search(
        load("dev"),
        "http://x",
        start_rate=100,
        budget_s=5.5,
        step_s=0,
        warmup_s=0,
        precision=0.1,
        workdir=tmp_path,
        settle=settle,
    )
    assert best == 700
    assert [s.rate for s in steps] == [100, 200, 400, 800, 600, 700, 750]
    assert calls == [x for s in steps for x in ("settle", f"step {s.rate}")]
    assert [s.backlog_at_start for s in steps] == [1, 3, 5, 7, 9, 11, 13]


def test_a_step_ramps_over_its_warm_up_and_judges_only_the_held_rate() -> None:
    """A full-rate start made k6 open every VU's connection in one second and send a burst the next,
    which the service shed: the step must reach its rate before the judged window starts, and hold it
    for the whole window."""
    cfg = bench.step_config(load("dev"), 1000, step_s=12, warmup_s=8)
    doc = k6_config(cfg, profile=bench.BENCH_PROFILE, base_url="http://x", test_id="t")["profile"]
    assert isinstance(doc, dict)
    assert doc["startRate"] == 100 and doc["warmupS"] == 8
    assert [(s["duration"], s["target"]) for s in doc["stages"]] == [("8s", 1000), ("12s", 1000)]
    assert doc["preAllocatedVus"] == 500  # half a second of arrivals
    assert bench.step_config(load("dev"), 5000, 12, 8).loadtest.profiles[bench.BENCH_PROFILE].pre_allocated_vus == 1000
    unramped = bench.step_config(load("dev"), 300, 12, 0).loadtest.profiles[bench.BENCH_PROFILE]
    assert unramped.start_rate == 300 and [s.target for s in unramped.stages] == [300]


def test_each_path_is_searched_against_each_of_its_references_alike(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Six searches with the same settings (two services, four references), each reference started in its
    mode with the service's pool and group-commit knobs; bench.json has four ratios, and each path's
    first reference is also under the keys older bench.json files had."""
    cfg = load("dev")
    rates = {"hot service": 4000, "hot get": 3000, "hot constant": 8000}
    rates |= {"cold service": 1800, "cold insert": 1500, "cold group": 2400}
    searched: list[tuple[str, dict[str, object]]] = []
    started: list[tuple[object, ...]] = []

    class Target:
        def __init__(self, _cfg: object = None, processes: int = 1, *, mode: str = "", **knobs: object) -> None:
            self.mode, self.knobs = mode, knobs
            self.api_url = self.url = f"http://{mode or 'service'}"
            self.database_url = ""

        def __enter__(self) -> Target:
            if self.mode:
                knobs = tuple(self.knobs[k] for k in ("db_pool_size", "linger_ms", "batch_max"))
                started.append((self.mode, *knobs))
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    def fake_search(cfg: object, base_url: str, **settings: object) -> tuple[int, list[Step]]:
        name = str(settings.pop("name"))
        settings.pop("settle", None)
        searched.append((name, settings))
        rate = rates[name]
        step = Step(rate=rate, passed=True, p95_ms=1.0, error_rate=0.0, dropped=0, requests=rate, seconds=1.0)
        return rate, [step]

    monkeypatch.setattr(bench, "ProofStack", lambda cfg, grafana: Target())
    monkeypatch.setattr(bench, "ReferenceServer", Target)
    monkeypatch.setattr(bench, "search", fake_search)
    monkeypatch.setattr(bench.tempfile, "mkdtemp", lambda prefix="": str(tmp_path))  # no k6 run writes there
    result = bench.run_bench(cfg, out_dir=tmp_path)
    order = ["hot service", "hot get", "hot constant", "cold service", "cold insert", "cold group"]
    assert [name for name, _ in searched] == order
    assert all(settings == searched[0][1] | {"new_topics": settings["new_topics"]} for _, settings in searched)
    o = cfg.orchestrator
    knobs = (o.db_pool_size, o.accept_linger_ms, o.accept_batch_max)
    assert started == [(m, *knobs) for m in ("get", "constant", "insert", "group")]
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written == json.loads(json.dumps(result))
    for path, first, second in (("hot", "get", "constant"), ("cold", "insert", "group")):
        section = written[path]
        refs = section["references"]
        assert [r["mode"] for r in refs] == [first, second]
        service = rates[f"{path} service"]
        assert [r["ratio_service_to_reference"] for r in refs] == [
            round(service / rates[f"{path} {first}"], 3),
            round(service / rates[f"{path} {second}"], 3),
        ]
        assert section["reference_max_rate"] == refs[0]["max_rate"] == rates[f"{path} {first}"]
        assert section["ratio_service_to_reference"] == refs[0]["ratio_service_to_reference"]
        assert section["reference"] == refs[0]["reference"] and section["reference_steps"] == refs[0]["steps"]
    assert len(performance.bench_rows(written)) == 4
