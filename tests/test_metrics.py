"""The service as real processes (``python -m service.orchestrator`` / ``service.worker``): exact metric
values after a known sequence of requests, multiprocess metrics, limits over real HTTP, graceful drain."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from localstack.servers import PostgresServer, RedisServer
from localstack.services import OrchestratorServer, SimulatorServer, WorkerProcess
from service.cache import cache_key
from tests.conftest import flush_redis, is_final, service_env, truncate_tasks


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` parsed by prometheus_client: {(sample name, sorted labels): value}."""
    text = httpx.get(url, timeout=5).raise_for_status().text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_final(base: str, task_id: str, timeout: float = 20.0) -> tuple[dict[str, object], int]:
    """Poll until failed or done with its usage; returns the task and the number of GETs made."""
    polls = 0
    deadline = time.monotonic() + timeout
    while True:
        polls += 1
        doc = httpx.get(f"{base}/task/{task_id}", timeout=5).json()
        if is_final(doc):
            return doc, polls
        if time.monotonic() > deadline:
            raise AssertionError(f"task not finished: {doc}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stack(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> Iterator[tuple[OrchestratorServer, WorkerProcess]]:
    truncate_tasks(postgres)
    flush_redis(redis_server)
    simulator.reset()
    env = service_env(postgres, redis_server, simulator, max_body_bytes=1024)
    api = OrchestratorServer(env)
    worker = WorkerProcess(env)
    api.start(60)
    worker.start(60)
    try:
        yield api, worker
    finally:
        worker.cleanup()
        api.cleanup()


def test_metric_values_after_a_known_sequence(
    stack: tuple[OrchestratorServer, WorkerProcess], simulator: SimulatorServer, redis_server: RedisServer
) -> None:
    api, worker = stack
    base = api.url
    r = httpx.post(f"{base}/task", json={"persona_id": "metrics", "topic": "known sequence"})
    assert r.status_code == 202
    task, polls = wait_final(base, r.json()["task_id"])
    assert task["status"] == "done"
    # The worker writes Postgres first, then the cache: wait for the post in Redis (not via the API,
    # which would add requests to the counts below).
    post_key = cache_key("metrics", "known sequence", "v1")
    with redis.Redis.from_url(redis_server.url) as rc:
        deadline = time.monotonic() + 10
        while not rc.exists(post_key) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert httpx.post(f"{base}/task", json={"persona_id": "metrics", "topic": "KNOWN sequence"}).status_code == 200
    assert httpx.post(f"{base}/task", json={"persona_id": "BAD", "topic": "x"}).status_code == 422
    assert httpx.get(f"{base}/task/00000000-0000-4000-8000-000000000000").status_code == 404
    assert httpx.get(f"{base}/no/such/route").status_code == 404

    m = scrape(f"{base}/metrics")
    req = "loadproof_http_requests_total"
    assert value(m, req, route="/task", method="POST", status="202") == 1
    assert value(m, req, route="/task", method="POST", status="200") == 1
    assert value(m, req, route="/task", method="POST", status="422") == 1
    assert value(m, req, route="/task/{task_id}", method="GET", status="200") == polls
    assert value(m, req, route="/task/{task_id}", method="GET", status="404") == 1
    assert value(m, req, route="other", method="GET", status="404") == 1
    assert not any(k[0] == req and ("route", "/no/such/route") in k[1] for k in m)  # templates only
    dur = "loadproof_http_request_duration_seconds_count"
    assert value(m, dur, route="/task", method="POST", status="202") == 1
    assert value(m, "loadproof_http_requests_inflight") == 1  # this scrape
    assert value(m, "loadproof_cache_lookups_total", result="hit") == 1
    assert value(m, "loadproof_cache_lookups_total", result="miss") == 1
    assert value(m, "loadproof_tasks_total", event="accepted") == 1
    usage = task["usage"]
    assert isinstance(usage, dict)
    assert value(m, "loadproof_tokens_delivered_total", source="cache") == usage["output_tokens"]

    w = scrape(worker.metrics_url)
    assert value(w, "loadproof_tasks_total", event="completed") == 1
    assert value(w, "loadproof_llm_batch_size_count") == 1
    assert value(w, "loadproof_task_completion_seconds_count") == 1
    assert value(w, "loadproof_tokens_delivered_total", source="llm") == usage["output_tokens"]
    model = "gpt-4o-mini"
    assert value(w, "loadproof_llm_requests_total", model=model, outcome="ok") == 1
    assert value(w, "loadproof_llm_cost_usd_total", model=model) == pytest.approx(usage["cost_usd"])
    assert value(w, "loadproof_llm_tokens_total", model=model, type="output") == simulator.stats()["completion_tokens"]
    assert value(w, "loadproof_queue_pending") == 0


def test_body_limit_over_real_http(stack: tuple[OrchestratorServer, WorkerProcess]) -> None:
    api, _ = stack
    big = b'{"persona_id": "p", "topic": "' + b"x" * 4000 + b'"}'
    r = httpx.post(f"{api.url}/task", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(big), 500):
            yield big[i : i + 500]

    r = httpx.post(f"{api.url}/task", content=chunks(), headers={"content-type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413
    assert httpx.get(f"{api.url}/healthz").status_code == 200  # the server is fine afterwards
    m = scrape(f"{api.url}/metrics")
    # Refused before routing, still labelled with the route template.
    assert value(m, "loadproof_http_requests_total", route="/task", method="POST", status="413") == 2
    assert value(m, "loadproof_http_rejected_total", reason="too_large") == 2


def test_several_processes_share_one_metrics_view(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer, tmp_path: Path
) -> None:
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    (prom_dir / "counter_999999.db").write_bytes(b"stale values of an earlier run")
    env = service_env(postgres, redis_server, simulator, processes=2)
    env["PROMETHEUS_MULTIPROC_DIR"] = str(prom_dir)
    api = OrchestratorServer(env)
    api.start(60)
    try:
        assert not (prom_dir / "counter_999999.db").exists()  # stale files are cleared at start
        n = 40
        with httpx.Client(limits=httpx.Limits(max_keepalive_connections=0)) as client:  # new connection each
            for _ in range(n):
                assert client.get(f"{api.url}/task/00000000-0000-4000-8000-000000000000").status_code == 404
        # Both API processes write their own files (the second may still be starting: /readyz was
        # answered by whichever process came up first).
        deadline = time.monotonic() + 30
        pids: set[str] = set()
        while time.monotonic() < deadline:
            pids = {p.stem.rsplit("_", 1)[-1] for p in prom_dir.glob("counter_*.db")}
            if len(pids) >= 2:
                break
            time.sleep(0.1)
        assert len(pids) >= 2, pids
        # Whichever process answers the scrape, the totals are summed over all processes.
        for _ in range(3):
            m = scrape(f"{api.url}/metrics")
            assert value(m, "loadproof_http_requests_total", route="/task/{task_id}", method="GET", status="404") == n
    finally:
        api.cleanup()
    assert api.process is not None and not api.process.running


def test_sigterm_flips_readiness_first_then_drains_and_exits(
    postgres: PostgresServer, redis_server: RedisServer, simulator: SimulatorServer
) -> None:
    env = service_env(postgres, redis_server, simulator, shutdown_timeout_s=12)  # drain delay 3 s
    api = OrchestratorServer(env)
    api.start(60)
    try:
        assert httpx.get(f"{api.url}/readyz").status_code == 200
        assert api.process is not None
        api.process.signal(signal.SIGTERM)
        r = httpx.get(f"{api.url}/readyz")
        assert r.status_code == 503 and r.json()["checks"]["draining"] == "true"
        # Still serving while the load balancer notices.
        ok = httpx.post(f"{api.url}/task", json={"persona_id": "drain", "topic": "still served"})
        assert ok.status_code == 202
        assert httpx.get(f"{api.url}/healthz").status_code == 200
        deadline = time.monotonic() + 20
        while api.process.running and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not api.process.running
        assert api.process.returncode in (0, -signal.SIGTERM)
    finally:
        api.cleanup()
