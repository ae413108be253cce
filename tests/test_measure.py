"""loadtest/measure.py: its arithmetic on fixed Prometheus answers, its agreement with k6 on a real run,
and its Postgres reconciliation against the real task table."""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import psycopg
import pytest

from common.k6config import duration_seconds, peak_arrival_rate, plateau_window, profile_duration_s
from common.outputs import OUTPUT_KEYS
from common.stackconfig import ProfileConfig, Stage, ThresholdsConfig, load
from loadtest import measure as ms
from loadtest import tasks
from loadtest.bench import ReferenceServer
from loadtest.k6run import K6_PUSH_INTERVAL_S, run_k6
from localstack.process import free_port
from localstack.proof import PrometheusServer
from localstack.servers import PostgresServer
from service.db import SCHEMA
from tests.flowsink import flow_sink

THRESHOLDS = ThresholdsConfig.model_validate({})
PROFILE = ProfileConfig(
    start_rate=10, warmup_s=5, stages=[Stage(duration="10s", target=50), Stage(duration="20s", target=50)]
)


# ------------------------------------------------------------------ pure helpers


def test_duration_parsing() -> None:
    assert duration_seconds("20s") == 20
    assert duration_seconds("1m30s") == 90
    assert duration_seconds("2h") == 7200
    assert duration_seconds("500ms") == 0.5
    for bad in ("20", "s", "1x"):
        with pytest.raises(ValueError):
            duration_seconds(bad)


def test_profile_schedule() -> None:
    assert peak_arrival_rate(PROFILE) == 50
    assert profile_duration_s(PROFILE) == 30
    assert ms.target_rate_at(PROFILE, 0) == 10
    assert ms.target_rate_at(PROFILE, 5) == 30  # halfway up the 10 -> 50 ramp
    assert ms.target_rate_at(PROFILE, 25) == 50
    assert ms.target_rate_at(PROFILE, 31) == 0
    demo = load("dev").loadtest.profiles["demo"]
    assert peak_arrival_rate(demo) == max(s.target for s in demo.stages)


def test_plateau_is_the_longest_span_held_at_the_peak() -> None:
    assert plateau_window(PROFILE) == (10.0, 30.0)
    ramp = ProfileConfig(start_rate=10, stages=[Stage(duration="10s", target=50), Stage(duration="10s", target=0)])
    assert plateau_window(ramp) is None  # touches the peak for an instant: no plateau
    two = ProfileConfig(
        start_rate=50,
        stages=[
            Stage(duration="5s", target=50),
            Stage(duration="5s", target=10),
            Stage(duration="5s", target=50),
            Stage(duration="8s", target=50),
            Stage(duration="4s", target=50),
        ],
    )
    assert plateau_window(two) == (15.0, 27.0)  # consecutive peak stages join; the longer span wins
    constant = ProfileConfig(start_rate=80, warmup_s=2, stages=[Stage(duration="12s", target=80)])
    assert plateau_window(constant) == (2.0, 12.0)  # the warm-up is not part of it
    demo = load("dev").loadtest.profiles["demo"]
    start, end = plateau_window(demo) or (0.0, 0.0)
    assert end - start >= 30 and ms.target_rate_at(demo, start + 1) == peak_arrival_rate(demo) == 1000


def test_cross_check_flags_disagreement() -> None:
    summary = {"metrics": {"http_req_duration{phase:measured}": {"values": {"p(95)": 100.0}},
                           "http_reqs{phase:measured}": {"values": {"count": 10}}}}  # fmt: skip
    ok = ms.k6_cross_check(summary, 103.0, 10)
    assert ok["p95_relative_difference"] == 0.03 and ok["requests_match"] is True
    bad = ms.k6_cross_check(summary, 150.0, 9)
    assert bad["p95_relative_difference"] == 0.5 and bad["requests_match"] is False
    assert ms.k6_cross_check(None, 1.0, 1) == {"available": False}


# ------------------------------------------------------------------ arithmetic on fixed answers

Answer = Callable[[str], float | None]


RAW_SAMPLES = re.compile(r"\[(\d+)ms\]$")  # ms.Prometheus.samples: a bare range selector


def fake_prometheus(answer: Answer) -> ms.Prometheus:
    """A Prometheus client whose HTTP API answers every instant query with ``answer(query)``; a counter's raw
    samples are one series going from 0 (before the window) to ``answer(query)`` (at its end); a range query
    is that value at both ends of the range."""

    def handler(request: httpx.Request) -> httpx.Response:
        params = {k: v[0] for k, v in parse_qs(request.url.query.decode()).items()}
        query = params["query"]
        raw = RAW_SAMPLES.search(query)
        if raw:
            value, at = answer(query), float(params["time"])
            values = [[at - int(raw.group(1)) / 1000, "0"], [at, str(value)]]
            result = [] if value is None else [{"metric": {"job": "x", "instance": "y"}, "values": values}]
            return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})
        if request.url.path.endswith("/query_range"):
            value = answer(query)
            values = [] if value is None else [[float(params[edge]), str(value)] for edge in ("start", "end")]
            result = [{"metric": {}, "values": values}] if values else []
            return httpx.Response(200, json={"status": "success", "data": {"resultType": "matrix", "result": result}})
        value = answer(query)
        result = [] if value is None else [{"metric": {}, "value": [time.time(), str(value)]}]
        return httpx.Response(200, json={"status": "success", "data": {"resultType": "vector", "result": result}})

    return ms.Prometheus("http://prometheus.invalid", client=httpx.Client(transport=httpx.MockTransport(handler)))


def scripted(values: dict[str, float | None], default: float | None = None) -> Answer:
    """Answer by the first key (a distinctive query fragment) contained in the query."""

    def answer(query: str) -> float | None:
        for fragment, value in values.items():
            if fragment in query:
                return value
        return default

    return answer


WINDOW = ms.RunWindow(started_at=1_000_000.0, ended_at=1_000_030.0, warmup_s=5, drained_at=1_000_040.0)
BASE = {
    'expected_response="false"': 5,  # failed measured requests (more specific: first)
    "histogram_quantile(0.5, sum(k6_": 40.0,
    "histogram_quantile(0.95, sum(k6_": 120.0,
    "histogram_quantile(0.99, sum(k6_": 300.0,
    'k6_http_reqs_total{phase="measured",testid="t"}': 1000,
    "k6_http_reqs_total": 1100,
    "k6_dropped_iterations_total": 0,
    "loadproof_http_request_duration_seconds_bucket": 80.0,
    "loadproof_cache_lookups_total": 0.4,
    # counter totals over run + drain (raw samples: 0 before the window, this at its end)
    "loadproof_tokens_delivered_total": 50_000,
    "loadproof_llm_tokens_total": 100_000,
    'loadproof_http_requests_total{route="/task",method="POST",status=~"2.."}': 1000,
    "loadproof_task_completion_seconds_bucket": 1500.0,
    "loadproof_llm_requests_total": 60,
    'loadproof_tasks_total{event="accepted"}': 500,
    'loadproof_tasks_total{event="completed"}': 500,
    "loadproof_tasks_total": 0,
    "loadproof_llm_cost_usd_total": 0.25,
    'count(up{job="orchestrator"} == 1)': 3,
    'count(up{job="workers"} == 1)': 2,
    "max(loadproof_queue_depth)": 0,  # the backlog: empty throughout (a range query answers one point)
}


def run_fake(values: dict[str, float | None], **kwargs: object) -> dict[str, object]:
    prom = fake_prometheus(scripted(values))
    return ms.measure(
        prom,
        test_id="t",
        profile_name="smoke",
        profile=PROFILE,
        thresholds=THRESHOLDS,
        window=WINDOW,
        machine={"cores": 2, "cpu_model": "test"},
        **kwargs,  # type: ignore[arg-type]
    )


def test_measure_arithmetic_on_fixed_answers() -> None:
    out = run_fake(BASE)
    for key in OUTPUT_KEYS:
        assert key in out, key
    assert out["requests"] == 1000
    assert out["requests_including_warmup"] == 1100
    assert out["measured_window_s"] == 25.0
    assert out["achieved_qps"] == 40.0  # 1000 requests / 25 s measured window
    assert out["error_rate"] == 0.005  # 5 / 1000
    assert out["p50_latency_ms"] == 40.0 and out["p95_latency_ms"] == 120.0 and out["p99_latency_ms"] == 300.0
    assert out["target_qps"] == 50
    assert out["cache_hit_ratio"] == 0.4
    assert out["llm_cost_usd"] == 0.25 and out["llm_calls"] == 60 and out["llm_tokens"] == 100_000
    assert out["llm_cost_per_1k_tokens_usd"] == 0.005  # 0.25 USD / 50k delivered tokens * 1000
    assert out["billed_cost_per_1k_tokens_usd"] == 0.0025  # 0.25 USD / 100k billed tokens * 1000
    assert out["cost_per_request_usd"] == 0.00025  # 0.25 USD / 1000 successful requests
    assert out["tasks_accepted"] == 500 and out["tasks_failed"] == 0
    assert out["counter_resets"] == 0 and not out["notes"]
    assert out["replicas"] == {
        "orchestrator": {"configured": None, "observed_max": 3},
        "workers": {"configured": None, "observed_max": 2},
    }
    assert out["tasks_lost"] is None  # no database: unknowable, never reported as 0
    assert out["threshold_results"]["tasks_lost"] is False  # type: ignore[index]
    assert out["thresholds_passed"] is False


@pytest.mark.parametrize(
    ("override", "failing"),
    [
        ({"histogram_quantile(0.95, sum(k6_": 450.0}, "p95_latency_ms"),
        ({'expected_response="false"': 20}, "error_rate"),
        ({"k6_dropped_iterations_total": 3}, "dropped_iterations"),
        ({"loadproof_tokens_delivered_total": 10_000}, "llm_cost_per_1k_tokens_usd"),  # 0.025 per 1k
        ({"loadproof_tokens_delivered_total": None}, "llm_cost_per_1k_tokens_usd"),  # unmeasured fails
        ({"histogram_quantile(0.95, sum(k6_": None}, "p95_latency_ms"),
    ],
)
def test_each_threshold_can_fail(override: dict[str, float | None], failing: str) -> None:
    out = run_fake({**BASE, **override})
    results = out["threshold_results"]
    assert results[failing] is False  # type: ignore[index]
    assert out["thresholds_passed"] is False


def test_no_k6_data_is_an_error() -> None:
    with pytest.raises(ms.MeasureError, match="no k6 requests"):
        run_fake({"k6_http_reqs_total": 0})


def test_window_shorter_than_warmup_is_an_error() -> None:
    with pytest.raises(ms.MeasureError, match="warm-up"):
        ms.measure(
            fake_prometheus(scripted(BASE)),
            test_id="t",
            profile_name="x",
            profile=PROFILE,
            thresholds=THRESHOLDS,
            window=ms.RunWindow(0.0, 4.0, 5),
        )


# ------------------------------------------------------------------ Postgres reconciliation


@pytest.fixture(scope="module")
def task_db() -> Iterator[str]:
    with PostgresServer() as pg:
        with psycopg.connect(pg.dsn, autocommit=True) as conn:
            for stmt in SCHEMA:
                conn.execute(stmt)  # type: ignore[arg-type]
        yield pg.url


def _insert(url: str, rows: list[tuple[str, bool, float]]) -> None:
    import uuid

    with psycopg.connect(tasks.psycopg_url(url), autocommit=True) as conn:
        for status, cached, at in rows:
            conn.execute(
                "INSERT INTO tasks (id, persona_id, topic, cache_key, status, cached, accepted_at) "
                "VALUES (%s, 'p', 't', 'k', %s, %s, to_timestamp(%s))",
                (str(uuid.uuid4()), status, cached, at),
            )


def test_task_rows_are_counted_by_status_and_window(task_db: str) -> None:
    t0 = 2_000_000.0
    _insert(
        task_db,
        [("done", False, t0 + 1)] * 7
        + [("failed", False, t0 + 2)] * 2
        + [("queued", False, t0 + 3), ("running", False, t0 + 3)]
        + [("done", True, t0 + 4)] * 5  # served from the cache: never accepted work
        + [("done", False, t0 - 100)],  # an earlier run
    )
    rows = tasks.count_task_rows(task_db, t0, t0 + 10)
    assert rows.total == 11
    assert rows.by_status == {"done": 7, "failed": 2, "queued": 1, "running": 1}
    assert tasks.pending_rows(rows) == 2
    drained_at, pending = tasks.wait_for_drain(task_db, t0, timeout_s=0.5, poll_s=0.1)
    assert pending == 2 and drained_at > 0  # bounded: reports what is still queued instead of waiting forever


def test_lost_tasks_are_accepted_minus_rows(task_db: str) -> None:
    t0 = 3_000_000.0
    _insert(task_db, [("done", False, t0 + 1)] * 3)
    window = ms.RunWindow(started_at=t0, ended_at=t0 + 30, warmup_s=5, drained_at=t0 + 40)

    out = ms.measure(
        fake_prometheus(scripted({**BASE, 'loadproof_tasks_total{event="accepted"}': 5})),
        test_id="t",
        profile_name="smoke",
        profile=PROFILE,
        thresholds=THRESHOLDS,
        window=window,
        database_url=task_db,
        machine={},
    )
    assert out["tasks_accepted"] == 5
    assert out["tasks_completed"] == 3
    assert out["tasks_lost"] == 2  # accepted per the service's counter, but no row
    assert out["threshold_results"]["tasks_lost"] is False  # type: ignore[index]
    assert "tasks_lost" not in out["lower_bounds"]  # type: ignore[operator]


def test_more_rows_than_counted_acceptances_is_said(task_db: str) -> None:
    """A pod that ended between scrapes took uncounted acceptances with it: tasks_lost is then only a lower bound."""
    t0 = 3_500_000.0
    _insert(task_db, [("done", False, t0 + 1)] * 4)
    out = ms.measure(
        fake_prometheus(scripted({**BASE, 'loadproof_tasks_total{event="accepted"}': 3})),
        test_id="t",
        profile_name="smoke",
        profile=PROFILE,
        thresholds=THRESHOLDS,
        window=ms.RunWindow(started_at=t0, ended_at=t0 + 30, warmup_s=5, drained_at=t0 + 40),
        database_url=task_db,
        machine={},
    )
    assert out["tasks_lost"] == 0 and out["lower_bounds"] == ["tasks_lost"]
    assert any("1 more task rows than counted acceptances" in n for n in out["notes"])  # type: ignore[union-attr]


# ------------------------------------------------------------------ a real run: Prometheus agrees with k6


def test_real_run_matches_k6_summary(tmp_path: Path) -> None:
    cfg = load("dev")
    short = ProfileConfig(
        start_rate=50, warmup_s=2, stages=[Stage(duration="8s", target=100)], pre_allocated_vus=20, max_vus=200
    )
    cfg = cfg.model_copy(
        update={"loadtest": cfg.loadtest.model_copy(update={"profiles": {**cfg.loadtest.profiles, "short": short}})}
    )
    port = free_port()
    prom = PrometheusServer(
        {"prometheus": [f"127.0.0.1:{port}"]}, scrape_interval_s=1, workdir=tmp_path / "prom", port=port
    )
    with ReferenceServer(1) as ref:
        try:
            prom.start()
            result = run_k6(
                cfg,
                profile="short",
                base_url=ref.url,
                test_id="measure-real",
                run_dir=tmp_path / "run",
                prometheus_rw_url=prom.remote_write_url,
                web_dashboard=False,
            )
            assert result.returncode == 0, (tmp_path / "run" / "k6.log").read_text()
            time.sleep(1)
            out = ms.measure(
                prom.url,
                test_id="measure-real",
                profile_name="short",
                profile=short,
                thresholds=cfg.loadtest.thresholds,
                window=ms.RunWindow(result.started_at, result.ended_at, short.warmup_s),
                k6_summary=result.summary,
                settle_s=1,
            )
        finally:
            prom.stop()
    summary = json.loads((tmp_path / "run" / "k6-summary.json").read_text())
    k6_measured = summary["metrics"]["http_reqs{phase:measured}"]["values"]["count"]
    k6_all = summary["metrics"]["http_reqs"]["values"]["count"]
    assert out["requests"] == k6_measured  # exact: cumulative series, no extrapolation
    assert out["requests_including_warmup"] == k6_all
    k6_p95 = summary["metrics"]["http_req_duration{phase:measured}"]["values"]["p(95)"]
    assert out["p95_latency_ms"] == pytest.approx(k6_p95, rel=0.05)
    assert out["k6_cross_check"]["requests_match"] is True  # type: ignore[index]
    assert out["dropped_iterations"] == 0
    assert out["error_rate"] == 0
    assert out["achieved_qps"] == pytest.approx(k6_measured / out["measured_window_s"], rel=0.01)  # type: ignore[operator]


def test_quantile_beyond_last_bucket_is_flagged() -> None:
    out = run_fake({**BASE, "loadproof_task_completion_seconds_bucket": 120000.0})
    assert any("completion_p95_ms is at least" in n for n in out["notes"])  # type: ignore[union-attr]
    assert out["lower_bounds"] == ["completion_p95_ms"]
    assert not any("server_p95" in n for n in out["notes"])  # type: ignore[union-attr]


# ------------------------------------------------------------------ restarts and ended series: a real Prometheus


class Target:
    """A scrape target serving a settable text exposition on a fixed port; ``restart`` is a process restart
    (the port goes away, then answers with fresh counters), ``stop`` a deleted pod."""

    def __init__(self) -> None:
        self.port = free_port()
        self.text = ""
        self._server: ThreadingHTTPServer | None = None

    def start(self, text: str) -> None:
        self.text = text
        target = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = target.text.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def restart(self, text: str) -> None:
        self.stop()
        self.start(text)


def api(accepted: float, started: float) -> str:
    return f'loadproof_tasks_total{{event="accepted"}} {accepted}\nprocess_start_time_seconds {started}\n'


def worker(completed: float) -> str:  # multiprocess-mode style: no process_start_time_seconds
    return f'loadproof_tasks_total{{event="completed"}} {completed}\n'


def test_counter_totals_survive_restarts_and_deleted_pods(tmp_path: Path) -> None:
    """Counters that reset (a restart, seen by a step down or only by a new process start time), a pod
    that appears mid-run with counts already made, and one that disappears: the report counts exactly what
    was counted, flags the restarts and reports the replicas that really ran."""
    a, b, c, k6 = Target(), Target(), Target(), Target()
    prom = PrometheusServer(
        {
            "orchestrator": [f"127.0.0.1:{a.port}", f"127.0.0.1:{b.port}"],
            "workers": [f"127.0.0.1:{c.port}"],
            "k6": [f"127.0.0.1:{k6.port}"],
        },
        scrape_interval_s=1,
        workdir=tmp_path / "prom",
        port=free_port(),
    )
    hold = 2.5  # >= 2 scrapes of every state
    try:
        a.start(api(5, 1000))  # 5 accepted before the run: not the run's
        c.start(worker(0))
        k6.start('k6_http_reqs_total{testid="reset-run",phase="measured"} 100\n')
        prom.start()
        deadline = time.monotonic() + 30
        while (ms.Prometheus(prom.url).scalar("count(up == 1)", time.time()) or 0) < 3:
            assert time.monotonic() < deadline, "targets never came up"
            time.sleep(0.2)
        time.sleep(hold)
        started_at = time.time()
        a.text, c.text = api(15, 1000), worker(8)  # +10, +8
        time.sleep(hold)
        a.restart(api(20, 2000))  # restarted and counted 20 before its first scrape: no step down to see
        c.restart(worker(2))  # restarted: 8 -> 2, a step down (+2)
        b.start(api(4, 3000))  # a new pod, first scraped with 4 already counted
        time.sleep(hold)
        a.text, b.text, c.text = api(24, 2000), api(6, 3000), worker(5)  # +4, +2, +3
        time.sleep(hold)
        b.stop()  # the pod is deleted: its series ends
        time.sleep(hold)
        ended_at = time.time()
        time.sleep(2)
        window = ms.RunWindow(started_at, ended_at, warmup_s=1)
        naive = ms.Prometheus(prom.url)
        accepted_sum = 'sum(loadproof_tasks_total{event="accepted"})'
        # The old two-instant difference: B's series is gone at the end and A's restart is invisible.
        two_instants = (naive.scalar(accepted_sum, ended_at + 1.5) or 0) - (naive.scalar(accepted_sum, started_at) or 0)
        out = ms.measure(
            prom.url,
            test_id="reset-run",
            profile_name="smoke",
            profile=PROFILE,
            thresholds=THRESHOLDS,
            window=window,
            machine={},
            settle_s=1.5,
            scrape_interval_s=1,
            configured_replicas={"orchestrator": 1, "workers": 1},
        )
    finally:
        for t in (a, b, c, k6):
            t.stop()
        prom.stop()
    assert two_instants == 19  # 24 - 5: undercounted by more than half
    assert out["tasks_accepted"] == 10 + 20 + 4 + 6
    assert out["tasks_completed"] == 8 + 2 + 3
    assert out["counter_resets"] == 2  # A (process start time changed), C (step down); B's birth is no reset
    (note,) = [n for n in out["notes"] if "counter reset" in n]  # type: ignore[union-attr]
    assert f"orchestrator 127.0.0.1:{a.port} x1" in note and f"workers 127.0.0.1:{c.port} x1" in note
    assert out["replicas"] == {
        "orchestrator": {"configured": 1, "observed_max": 2},  # A and B up at once
        "workers": {"configured": 1, "observed_max": 1},
    }
    assert out["requests"] == 100


# ------------------------------------------------------------------ the queue backlog: a real Prometheus, known samples


def queue(depth: int, pending: int) -> str:
    return f"loadproof_queue_depth {depth}\nloadproof_queue_pending {pending}\n"


def test_backlog_peak_and_drain_from_the_queue_gauges(tmp_path: Path) -> None:
    """The backlog rises to 30 + 10, is still 5 + 20 at the last arrival, and first reads 0 some seconds later:
    the peak is the highest sampled sum, the drain runs from the last arrival to the first sample of 0."""
    w, other = Target(), Target()
    prom = PrometheusServer(
        {"workers": [f"127.0.0.1:{w.port}", f"127.0.0.1:{other.port}"]},
        scrape_interval_s=1,
        workdir=tmp_path / "prom",
        port=free_port(),
    )
    hold = 2.5  # >= 2 scrapes of every state
    try:
        w.start(queue(0, 0))
        other.start(queue(0, 0))  # a second worker process reports the same stream: max, not sum
        prom.start()
        deadline = time.monotonic() + 30
        while (ms.Prometheus(prom.url).scalar("count(up == 1)", time.time()) or 0) < 2:
            assert time.monotonic() < deadline, "targets never came up"
            time.sleep(0.2)
        started_at = time.time()
        time.sleep(hold)
        w.text = other.text = queue(30, 10)
        time.sleep(hold)
        w.text, other.text = queue(5, 20), queue(4, 20)
        time.sleep(hold)
        last_arrival = time.time()
        w.text = other.text = queue(0, 3)
        time.sleep(hold)
        emptied = time.time()
        w.text = other.text = queue(0, 0)
        time.sleep(hold)
        drained_at = time.time()
        time.sleep(ms.backlog_lag_s(1) + hold)  # the first window's search ends drained_at + lag
        w.text = queue(7, 0)  # new work after the drain: a second window that never empties
        time.sleep(hold)
        late_arrival = time.time()
        time.sleep(hold)
        now = time.time()
        client = ms.Prometheus(prom.url)
        window = ms.RunWindow(started_at, last_arrival, 1, drained_at=drained_at, last_arrival_at=last_arrival)
        drained = ms.backlog(client, window, scrape_interval_s=1)
        late = ms.backlog(
            client, ms.RunWindow(started_at, now, 1, drained_at=now, last_arrival_at=late_arrival), scrape_interval_s=1
        )
        nothing = ms.backlog(
            client, ms.RunWindow(started_at - 600, started_at - 400, 1), scrape_interval_s=1
        )  # before any series existed
    finally:
        for t in (w, other):
            t.stop()
        prom.stop()
    assert drained.peak == 40 and drained.note is None and drained.at_end == 0
    assert drained.drain_s is not None
    # The first 0 is scraped within a scrape interval of being set and seen within one evaluation step.
    assert emptied - last_arrival <= drained.drain_s <= emptied - last_arrival + 2.5
    assert late.peak == 40 and late.drain_s is None and late.at_end == 7
    assert late.note is not None and "not back to 0" in late.note and "(7 at the end" in late.note
    assert nothing.peak is None and nothing.drain_s is None and nothing.note is not None


# ------------------------------------------------------------------ a client-flow run: Prometheus agrees with k6

FLOW_PROFILE = ProfileConfig(
    start_rate=20,
    warmup_s=1,
    new_topics=1.0,
    flow=True,
    poll_ms=100,
    flow_timeout_s=1.5,
    pre_allocated_vus=40,
    max_vus=60,
    stages=[Stage(duration="4s", target=20)],
)


def test_flow_run_time_to_post_and_outcomes_match_k6(tmp_path: Path) -> None:
    cfg = load("dev")
    cfg = cfg.model_copy(
        update={"loadtest": cfg.loadtest.model_copy(update={"profiles": {**cfg.loadtest.profiles, "f": FLOW_PROFILE}})}
    )
    port = free_port()
    prom = PrometheusServer(
        {"prometheus": [f"127.0.0.1:{port}"]}, scrape_interval_s=1, workdir=tmp_path / "prom", port=port
    )
    with flow_sink() as sink:
        try:
            prom.start()
            result = run_k6(
                cfg,
                profile="f",
                base_url=sink.url,
                test_id="flow-real",
                run_dir=tmp_path / "run",
                prometheus_rw_url=prom.remote_write_url,
                web_dashboard=False,
            )
            assert result.returncode == 99, (tmp_path / "run" / "k6.log").read_text()  # 30 % of flows fail
            time.sleep(K6_PUSH_INTERVAL_S + 1)
            out = ms.measure(
                prom.url,
                test_id="flow-real",
                profile_name="f",
                profile=FLOW_PROFILE,
                thresholds=cfg.loadtest.thresholds,
                window=ms.RunWindow(
                    result.started_at,
                    result.ended_at,
                    FLOW_PROFILE.warmup_s,
                    last_arrival_at=result.started_at + profile_duration_s(FLOW_PROFILE),
                ),
                k6_summary=result.summary,
                settle_s=1,
                scrape_interval_s=1,
            )
        finally:
            prom.stop()
    metrics = json.loads((tmp_path / "run" / "k6-summary.json").read_text())["metrics"]
    for key in OUTPUT_KEYS:
        assert key in out, key
    # Outcomes and counts are exact (cumulative series); the polls are not in the request figures.
    k6_flows = metrics["flows{phase:measured}"]["values"]["count"]
    k6_failed = metrics["flow_failed{phase:measured}"]["values"]["passes"]
    assert out["flows"] == k6_flows and sum(out["flows_by_outcome"].values()) == k6_flows  # type: ignore[union-attr]
    assert out["flows_by_outcome"]["done"] == metrics["time_to_post{phase:measured}"]["values"]["count"]  # type: ignore[index]
    assert set(out["flows_by_outcome"]) == {"done", "failed", "timeout", "rejected"}  # type: ignore[arg-type]
    assert out["flow_failed_rate"] == round(k6_failed / k6_flows, 6)
    assert out["requests"] == metrics["http_reqs{phase:measured}"]["values"]["count"]
    assert out["polls"] == metrics["http_req_duration{poll:measured}"]["values"]["count"]
    assert out["requests_including_warmup"] == len(sink.posts) + len(sink.gets)  # every request k6 made
    # Percentiles from the merged native histogram agree with k6's exact ones (one bucket is ~9 % wide).
    k6_ttp = metrics["time_to_post{phase:measured}"]["values"]
    assert out["time_to_post_p95_ms"] == pytest.approx(k6_ttp["p(95)"], rel=0.1)
    assert out["time_to_post_p50_ms"] == pytest.approx(k6_ttp["med"], rel=0.1)
    assert out["k6_cross_check"]["k6_time_to_post_p95_ms"] == round(k6_ttp["p(95)"], 1)  # type: ignore[index]
    # Judged: time to post under its 2500 ms target, but 30 % of the flows failed.
    assert out["threshold_results"]["time_to_post_p95_ms"] is True  # type: ignore[index]
    assert out["threshold_results"]["flow_failed_rate"] is False  # type: ignore[index]
    assert out["thresholds"]["time_to_post_p95_ms"] == 2500  # type: ignore[index]
    assert any("cover POST /task only" in n for n in out["notes"])  # type: ignore[union-attr]
    # No service ran: no queue gauges, so no backlog figure, and a note says why.
    assert out["backlog_peak"] is None and out["backlog_drain_s"] is None
    assert any("no loadproof_queue_depth" in n for n in out["notes"])  # type: ignore[union-attr]


def test_outside_flow_profiles_the_flow_figures_are_none() -> None:
    out = run_fake(BASE)
    assert out["flow"] is False
    assert out["time_to_post_p50_ms"] is None and out["time_to_post_p95_ms"] is None and out["flow_failed_rate"] is None
    assert "time_to_post_p95_ms" not in out["threshold_results"]  # type: ignore[operator]
    assert out["backlog_peak"] == 0 and out["backlog_drain_s"] is not None  # every profile has a backlog


def test_new_outputs_are_declared() -> None:
    from common.outputs import STACK_OUTPUTS

    for key in ("time_to_post_p50_ms", "time_to_post_p95_ms", "flow_failed_rate", "backlog_peak", "backlog_drain_s"):
        assert key in OUTPUT_KEYS, key
    assert {"time_to_post_p95_ms", "backlog_drain_s", "backlog_peak"} <= set(STACK_OUTPUTS)


def test_every_local_run_states_how_busy_the_machine_was_and_what_the_hypervisor_took() -> None:
    from loadtest.measure import host_cpu_note, host_cpu_times

    now = host_cpu_times()
    assert now is not None and len(now) == 8  # user nice system idle iowait irq softirq steal
    quiet = host_cpu_note((0,) * 8, (60, 0, 20, 18, 2, 0, 0, 0))
    assert quiet == "whole machine during the k6 run (/proc/stat): busy 80.0 %, iowait 2.0 %, steal 0.0 %"
    stolen = host_cpu_note((0,) * 8, (70, 0, 20, 5, 0, 0, 0, 5))
    assert stolen is not None and "steal 5.0 %" in stolen and "notable share" in stolen
    a_little = host_cpu_note((0,) * 8, (70, 0, 20, 9, 0, 0, 0, 1))
    assert a_little is not None and a_little.endswith("steal 1.0 %")  # stated, not judged
    assert host_cpu_note(None, now) is None and host_cpu_note(now, now) is None
