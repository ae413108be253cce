"""Prometheus configs pass promtool; every PromQL expression (queries.py, rules, dashboards) is
evaluated by a real Prometheus holding real data: the service's own metric objects scraped over HTTP
and a real k6 run pushed by remote write as native histograms.

Known inputs make the numbers checkable: the service metrics are driven at fixed ratios (3 cache
hits per miss, 1 error in 20 ...), and the k6 numbers are compared with k6's own end-of-test summary.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import prometheus_config as pc
from common import queries as q
from common.stackconfig import REPO_ROOT, ThresholdsConfig
from common.tools import tool
from dashboards.build import all_dashboards
from dashboards.promql_check import (
    PromQLError,
    api,
    expand_grafana_variables,
    free_port,
    instant_query,
    instant_value,
    prometheus_process,
    series_names,
)

SCRAPE_S = 1
WINDOW = "6s"  # several scrapes of the driven service metrics

# ---------------------------------------------------------------- promtool


def test_local_config_passes_promtool() -> None:
    cfg = pc.local_config(
        {"orchestrator": ["127.0.0.1:8080", "127.0.0.1:8081"], "workers": ["127.0.0.1:9101"]},
        5,
        rule_files=["/etc/prometheus/loadproof-rules.yml"],
    )
    pc.promtool_check(pc.render_yaml(cfg), pc.render_yaml(pc.rules()))
    assert [sc["job_name"] for sc in cfg["scrape_configs"]] == ["orchestrator", "workers"]
    assert cfg["global"]["scrape_interval"] == "5s"


def test_kubernetes_config_passes_promtool() -> None:
    cfg = pc.kubernetes_config("loadproof", 5, rule_files=["/etc/prometheus/rules/loadproof-rules.yml"])
    text = pc.render_yaml(cfg)
    pc.promtool_check(text, pc.render_yaml(pc.rules()))
    pc.promtool_check(text)
    sc = cfg["scrape_configs"][0]
    assert sc["kubernetes_sd_configs"] == [{"role": "pod", "namespaces": {"names": ["loadproof"]}}]
    relabel = {(tuple(r["source_labels"]), r.get("target_label"), r["action"]) for r in sc["relabel_configs"]}
    assert (("__meta_kubernetes_pod_annotation_prometheus_io_scrape",), None, "keep") in relabel
    assert (("__meta_kubernetes_pod_annotation_prometheus_io_path",), "__metrics_path__", "replace") in relabel
    port = ("__meta_kubernetes_pod_ip", "__meta_kubernetes_pod_annotation_prometheus_io_port")
    assert (port, "__address__", "replace") in relabel
    assert (("__meta_kubernetes_pod_label_app_kubernetes_io_component",), "job", "replace") in relabel
    assert (("__meta_kubernetes_pod_name",), "pod", "replace") in relabel
    keep = next(r for r in sc["relabel_configs"] if r["action"] == "keep")
    assert keep["regex"] == "true"


def _pod(ip: str, *, component: str, name: str, port: str | None, path: str | None = None, **extra: str) -> Any:
    """A file_sd target carrying the __meta_kubernetes_* labels pod discovery would attach."""
    labels = {
        "__meta_kubernetes_namespace": "loadproof",
        "__meta_kubernetes_pod_name": name,
        "__meta_kubernetes_pod_ip": ip,
        "__meta_kubernetes_pod_phase": "Running",
        "__meta_kubernetes_pod_label_app_kubernetes_io_component": component,
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
    }
    if port is not None:
        labels["__meta_kubernetes_pod_annotation_prometheus_io_port"] = port
    if path is not None:
        labels["__meta_kubernetes_pod_annotation_prometheus_io_path"] = path
    labels.update(extra)
    address = f"[{ip}]:80" if ":" in ip else f"{ip}:80"
    return {"targets": [address], "labels": labels}


def test_kubernetes_relabelling_in_a_real_prometheus(tmp_path: Path) -> None:
    """The cluster relabelling, run by a real Prometheus: pods arrive through file_sd with the same
    __meta_kubernetes_* labels pod discovery attaches (this Prometheus build has no Kubernetes SD)."""
    cfg = pc.kubernetes_config("loadproof", 1)
    sc = cfg["scrape_configs"][0]
    sc.pop("kubernetes_sd_configs")
    sd_file = tmp_path / "pods.json"
    sd_file.write_text("[]")
    sc["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    with prometheus_process(cfg, tmp_path / "prom") as url:
        own_port = url.rsplit(":", 1)[1]
        pods = [
            _pod("127.0.0.1", component="orchestrator", name="orchestrator-a", port=own_port),
            _pod("127.0.0.1", component="workers", name="workers-a", port="9", path="/custom"),
            _pod("fd00::1", component="simulator", name="simulator-a", port="9100"),
            _pod(
                "127.0.0.1",
                component="loadtest",
                name="k6-runner-0",
                port=own_port,
                **{"__meta_kubernetes_pod_phase": "Succeeded"},
            ),
            _pod(
                "127.0.0.1",
                component="postgres",
                name="postgres-0",
                port="5432",
                **{"__meta_kubernetes_pod_annotation_prometheus_io_scrape": "false"},
            ),
        ]
        sd_file.write_text(json.dumps(pods))
        deadline = time.monotonic() + 30
        while True:
            targets = api(url, "/api/v1/targets", {"state": "any"}, method="GET")
            active = {t["labels"].get("pod"): t for t in targets["activeTargets"]}
            if len(active) == 3 and active["orchestrator-a"]["health"] == "up":
                break
            assert time.monotonic() < deadline, targets
            time.sleep(0.3)
    orch = active["orchestrator-a"]
    assert orch["scrapeUrl"] == f"http://127.0.0.1:{own_port}/metrics"
    assert orch["labels"]["job"] == "orchestrator" and orch["labels"]["namespace"] == "loadproof"
    assert active["workers-a"]["scrapeUrl"] == "http://127.0.0.1:9/custom"
    assert active["workers-a"]["labels"]["job"] == "workers"
    assert active["simulator-a"]["scrapeUrl"] == "http://[fd00::1]:9100/metrics"
    dropped = {t["discoveredLabels"]["__meta_kubernetes_pod_name"] for t in targets["droppedTargets"]}
    assert dropped == {"k6-runner-0", "postgres-0"}


def test_promtool_rejects_broken_config_and_rules() -> None:
    cfg = pc.kubernetes_config("loadproof", 5)
    cfg["scrape_configs"][0]["relabel_configs"][0]["action"] = "kep"
    with pytest.raises(pc.PromtoolError, match="kep"):
        pc.promtool_check(pc.render_yaml(cfg))
    bad_rules = pc.render_yaml({"groups": [{"name": "x", "rules": [{"record": "a:b", "expr": "sum(rate(x[1m])"}]}]})
    with pytest.raises(pc.PromtoolError, match="parse"):
        pc.promtool_check(pc.render_yaml(pc.local_config({"orchestrator": ["127.0.0.1:1"]}, 5)), bad_rules)
    bad_sd = pc.kubernetes_config("loadproof", 5)
    bad_sd["scrape_configs"][0]["kubernetes_sd_configs"][0]["role"] = "pods"
    with pytest.raises(pc.PromtoolError, match="pods"):
        pc.promtool_check(pc.render_yaml(bad_sd))


@pytest.mark.parametrize(
    ("targets", "interval"),
    [
        ({}, 5),
        ({"orchestrator": []}, 5),
        ({"orchestrator": ["localhost"]}, 5),
        ({"bad job": ["a:1"]}, 5),
        ({"a": ["a:1"]}, 0),
    ],
)
def test_local_config_rejects_bad_input(targets: dict[str, list[str]], interval: int) -> None:
    with pytest.raises(ValueError):
        pc.local_config(targets, interval)


def test_rules_use_configured_targets() -> None:
    groups = pc.rules(ThresholdsConfig.model_validate({"p95Ms": 250, "errorRate": 0.02, "costPer1kTokensUsd": 0.005}))
    alerts = {r["alert"]: r["expr"] for g in groups["groups"] for r in g["rules"] if "alert" in r}
    assert alerts["LoadproofServerP95AboveTarget"].endswith("> 250")
    assert alerts["LoadproofServerErrorRateAboveTarget"].endswith("> 0.02")
    assert alerts["LoadproofCostPer1kTokensAboveTarget"].endswith("> 0.005")


def test_flags_enable_remote_write_and_native_histograms() -> None:
    assert "--web.enable-remote-write-receiver" in pc.PROMETHEUS_FLAGS
    assert "--enable-feature=native-histograms" in pc.PROMETHEUS_FLAGS


# ---------------------------------------------------------------- live Prometheus with data


# Runs in its own Python process: it moves the real service metric objects at fixed ratios, so every
# ratio query has a known answer, without touching this test process's metrics (other tests use them).
_DRIVER = """
import sys, time
from prometheus_client import start_http_server
from service import metrics as m

start_http_server(int(sys.argv[1]), addr="127.0.0.1")
while True:
    time.sleep(0.02)
    for _ in range(18):
        m.HTTP_REQUEST_DURATION.labels("/task", "POST", "202").observe(0.1)
    for _ in range(2):
        m.HTTP_REQUEST_DURATION.labels("/task", "POST", "503").observe(0.32)
    m.HTTP_REQUESTS.labels("/task", "POST", "202").inc(19)
    m.HTTP_REQUESTS.labels("/task", "POST", "503").inc(1)
    m.HTTP_REJECTED.labels("overload").inc(1)
    m.CACHE_LOOKUPS.labels("hit").inc(3)
    m.CACHE_LOOKUPS.labels("miss").inc(1)
    m.CACHE_ERRORS.labels("get").inc(0)
    m.LLM_COST.labels("gpt-4o-mini").inc(0.0006)
    m.LLM_TOKENS.labels("gpt-4o-mini", "input").inc(200)
    m.LLM_TOKENS.labels("gpt-4o-mini", "output").inc(60)
    m.TOKENS_DELIVERED.labels("llm").inc(60)
    m.TOKENS_DELIVERED.labels("cache").inc(180)
    m.LLM_REQUESTS.labels("gpt-4o-mini", "ok").inc(4)
    m.LLM_REQUESTS.labels("gpt-4o-mini", "rate_limited").inc(1)
    m.LLM_DURATION.labels("gpt-4o-mini").observe(1.2)
    m.LLM_BATCH_SIZE.observe(4)
    m.TASK_COMPLETION.observe(1.2)
    m.TASKS.labels("accepted").inc(5)
    m.TASKS.labels("completed").inc(5)
    m.TASKS.labels("dead_lettered").inc(0)
    m.DB_POOL_WAIT.observe(0.002)
    m.QUEUE_DEPTH.set(7)
    m.QUEUE_PENDING.set(2)
    m.DB_POOL_IN_USE.set(3)
    m.DB_POOL_OVERFLOW.set(0)
    m.DB_POOL_WAITERS.set(0)
    m.HTTP_INFLIGHT.set(11)
    m.LLM_INFLIGHT.set(4)
    m.LLM_CONCURRENCY_LIMIT.set(24)
    m.LLM_BUDGET_REMAINING.labels("requests").set(120)
    m.LLM_BUDGET_REMAINING.labels("tokens").set(5000)
    m.LLM_CONCURRENCY_WAITS.labels("requests").inc(3)
    m.CACHE_BREAKER_OPEN.set(0)
    m.LLM_BREAKER_OPEN.set(1)
"""


@contextmanager
def _driven_service_metrics(port: int) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(REPO_ROOT)
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(port)], env=env, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "metrics driver exited"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "metrics driver did not start"
                time.sleep(0.1)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=10)


class _SlowHandler(BaseHTTPRequestHandler):
    """The k6 target: 10-60 ms uniform latency; ``/fail`` answers 500."""

    rng = random.Random(7)
    lock = threading.Lock()

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        if self.path.startswith("/fail"):
            status = 500
        else:
            with self.lock:
                delay = self.rng.uniform(0.01, 0.06)
            time.sleep(delay)
            status = 200
        body = b'{"ok": true}'
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = _answer
    do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        return


K6_SCRIPT = """
import http from 'k6/http';
import { sleep } from 'k6';
import exec from 'k6/execution';

export const options = {
  scenarios: {
    load: { executor: 'constant-arrival-rate', rate: 60, timeUnit: '1s', duration: '6s',
            preAllocatedVUs: 10, maxVUs: 20, exec: 'load' },
    starved: { executor: 'constant-arrival-rate', rate: 20, timeUnit: '1s', duration: '3s',
               preAllocatedVUs: 1, maxVUs: 1, exec: 'starved' },
  },
  // Keep the per-phase sub-metrics in the summary (as loadtest/k6/task.js does).
  thresholds: {
    'http_req_duration{phase:measured}': ['max>=0'],
    'http_reqs{phase:measured}': ['count>=0'],
    'http_req_failed{phase:measured}': ['rate>=0'],
  },
};

export function load() {
  const fail = Math.random() < 0.05;
  const phase = Date.now() - exec.scenario.startTime < 2000 ? 'warmup' : 'measured';
  http.post(`${__ENV.TARGET}/${fail ? 'fail' : 'task'}`, '{"x":1}',
            { headers: { 'Content-Type': 'application/json' }, tags: { name: 'POST /task', phase } });
}

export function starved() { sleep(0.5); }

export function handleSummary(data) {
  return { [__ENV.SUMMARY]: JSON.stringify(data) };
}
"""


@dataclass(frozen=True)
class Live:
    url: str
    testid: str
    summary: dict[str, Any]
    k6_end: float


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    work = tmp_path_factory.mktemp("prom-live")
    metrics_port = free_port()
    cfg = pc.local_config({"orchestrator": [f"127.0.0.1:{metrics_port}"]}, SCRAPE_S)
    with (
        _driven_service_metrics(metrics_port),
        _k6_target() as target_url,
        prometheus_process(cfg, work / "prom") as url,
    ):
        testid = f"test-{uuid.uuid4().hex[:8]}"
        script = work / "script.js"
        script.write_text(K6_SCRIPT)
        summary_path = work / "summary.json"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(work),
            "TARGET": target_url,
            "SUMMARY": str(summary_path),
            "K6_PROMETHEUS_RW_SERVER_URL": f"{url}/api/v1/write",
            "K6_PROMETHEUS_RW_TREND_AS_NATIVE_HISTOGRAM": "true",
            "K6_PROMETHEUS_RW_PUSH_INTERVAL": "1s",
            "K6_NO_USAGE_REPORT": "true",
        }
        proc = subprocess.run(
            [
                tool("k6"),
                "run",
                "--quiet",
                "-o",
                "experimental-prometheus-rw",
                "--tag",
                f"testid={testid}",
                str(script),
            ],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        k6_end = time.time()
        # The service metrics need several scrapes before rate() over WINDOW has data.
        deadline = time.monotonic() + 30
        while (instant_value(url, f"count_over_time({q.HTTP_REQUESTS}{{status='202'}}[{WINDOW}])") or 0) < 5:
            assert time.monotonic() < deadline, "service metrics were not scraped"
            time.sleep(0.5)
        yield Live(url=url, testid=testid, summary=json.loads(summary_path.read_text()), k6_end=k6_end)


@contextmanager
def _k6_target() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SlowHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _value(live: Live, expr: str) -> float:
    value = instant_value(live.url, expr)
    assert value is not None, f"no data for {expr}"
    return value


def test_k6_series_names_are_the_verified_ones(live: Live) -> None:
    names = set(series_names(live.url))
    expected = {
        q.K6_HTTP_REQ_DURATION,
        q.K6_HTTP_REQ_WAITING,
        q.K6_HTTP_REQS,
        q.K6_HTTP_REQ_FAILED,
        q.K6_ITERATIONS,
        q.K6_DROPPED_ITERATIONS,
        q.K6_ITERATION_DURATION,
        q.K6_VUS,
        q.K6_VUS_MAX,
    }
    assert expected <= names, expected - names
    # Trends arrive as native histograms: no classic _bucket series.
    assert f"{q.K6_HTTP_REQ_DURATION}_bucket" not in names
    # A range selector returns the raw samples: native ones come back as "histograms", not "values".
    sample = instant_query(live.url, f'{q.K6_HTTP_REQ_DURATION}{{testid="{live.testid}"}}[10m]')
    assert sample and all("histograms" in s and "values" not in s for s in sample)
    labels = set(sample[0]["metric"])
    assert {"testid", "scenario", "method", "status", "expected_response", "name"} <= labels


def test_service_series_names_match_queries(live: Live) -> None:
    names = set(series_names(live.url))
    for name in (q.HTTP_REQUESTS, q.CACHE_LOOKUPS, q.LLM_COST, q.TOKENS_DELIVERED, q.TASKS, q.QUEUE_DEPTH):
        assert name in names
    assert f"{q.HTTP_REQUEST_DURATION}_bucket" in names


def test_k6_p95_matches_k6_summary(live: Live) -> None:
    """The native-histogram p95 in Prometheus agrees with k6's exact p95 (bucket resolution only)."""
    k6_p95 = live.summary["metrics"]["http_req_duration"]["values"]["p(95)"]
    prom_p95 = _value(live, q.p95_latency_ms("10m", live.testid))
    print(f"k6 summary p95 {k6_p95:.2f} ms, Prometheus native-histogram p95 {prom_p95:.2f} ms")
    assert 40 < k6_p95 < 200, k6_p95  # the target sleeps 10-60 ms: a sane p95 for this run
    assert prom_p95 == pytest.approx(k6_p95, rel=0.10, abs=2.0)


def test_k6_exact_totals_match_k6_summary(live: Live) -> None:
    metrics = live.summary["metrics"]
    reqs = metrics["http_reqs"]["values"]["count"]
    failed = metrics["http_req_failed"]["values"]["passes"]
    dropped = metrics["dropped_iterations"]["values"]["count"]
    assert failed > 0 and dropped > 0, "the run must produce failures and dropped iterations"
    assert _value(live, q.requests_total("10m", live.testid)) == reqs
    assert _value(live, q.failed_requests_total("10m", live.testid)) == failed
    assert _value(live, q.dropped_iterations_total("10m", live.testid)) == dropped
    # Before the run there is no data - not a reassuring 0 - for every total, dropped ones included.
    before = live.k6_end - 3600
    for expr in (
        q.requests_total("10m", live.testid),
        q.failed_requests_total("10m", live.testid),
        q.dropped_iterations_total("10m", live.testid),
        q.run_total(q.K6_DROPPED_ITERATIONS, live.testid),
        q.dropped_iterations("10m", live.testid),
    ):
        assert instant_value(live.url, expr, at=before) is None, expr
    # A counter that never moved in a run that exists reads 0.
    assert _value(live, q.run_total(q.K6_HTTP_REQS, live.testid, {"status": "418"})) == 0


def test_k6_measured_phase_matches_k6_summary(live: Live) -> None:
    """Phase-selected whole-run numbers (what the report uses) agree with k6's own sub-metrics."""
    metrics = live.summary["metrics"]
    k6_p95 = metrics["http_req_duration{phase:measured}"]["values"]["p(95)"]
    reqs = metrics["http_reqs{phase:measured}"]["values"]["count"]
    failed = metrics["http_req_failed{phase:measured}"]["values"]["passes"]
    at = live.k6_end + 1
    assert reqs < metrics["http_reqs"]["values"]["count"], "the warm-up must be excluded"
    assert _value_at(live, q.run_p95_latency_ms(live.testid), at) == pytest.approx(k6_p95, rel=0.10, abs=2.0)
    assert _value_at(live, q.run_total(q.K6_HTTP_REQS, live.testid, phase=q.MEASURED_PHASE), at) == reqs
    assert _value_at(live, q.run_error_rate(live.testid), at) == pytest.approx(failed / reqs)
    assert _value_at(live, q.run_total(q.K6_HTTP_REQS, live.testid), at) == metrics["http_reqs"]["values"]["count"]
    assert (
        _value_at(live, q.run_total(q.K6_DROPPED_ITERATIONS, live.testid), at)
        == (metrics["dropped_iterations"]["values"]["count"])
    )


def _value_at(live: Live, expr: str, at: float) -> float:
    value = instant_value(live.url, expr, at=at)
    assert value is not None, f"no data for {expr}"
    return value


def test_k6_rate_queries_are_sane(live: Live) -> None:
    err = _value(live, q.error_rate("10m", live.testid))
    expected = live.summary["metrics"]["http_req_failed"]["values"]["rate"]
    assert 0 < err < 0.2
    assert err == pytest.approx(expected, abs=0.03)
    assert _value(live, q.achieved_qps("10m", live.testid)) > 0
    # 60 arrivals/s for 6 s: the best 30 s average lies between the run's mean and its arrival rate.
    assert 5 < _value(live, q.peak_qps("10m", live.testid, smoothing="30s", step="1s")) <= 61
    assert _value(live, q.dropped_iterations("10m", live.testid)) > 0
    # Another run's id selects nothing.
    assert instant_value(live.url, q.achieved_qps("10m", "no-such-run")) is None


def test_server_queries_give_the_driven_ratios(live: Live) -> None:
    assert _value(live, q.cache_hit_ratio(WINDOW)) == pytest.approx(0.75, abs=0.02)
    assert _value(live, q.server_error_rate(WINDOW)) == pytest.approx(0.05, abs=0.01)
    assert _value(live, q.llm_cost_per_1k_tokens_usd(WINDOW)) == pytest.approx(0.0006 / 240 * 1000, rel=0.03)
    assert _value(live, q.billed_cost_per_1k_tokens_usd(WINDOW)) == pytest.approx(0.0006 / 260 * 1000, rel=0.03)
    assert _value(live, q.cost_per_request_usd(WINDOW)) == pytest.approx(0.0006 / 19, rel=0.05)
    # 18 of 20 at 100 ms, 2 at 320 ms -> p95 interpolates inside the (300, 350] ms bucket.
    assert _value(live, q.server_p95_latency_ms(WINDOW)) == pytest.approx(325, abs=3)
    # Every completion is 1.2 s -> p95 interpolates inside the (1.0, 1.5] s bucket.
    assert _value(live, q.completion_p95_ms(WINDOW)) == pytest.approx(1475, abs=5)
    assert _value(live, q.llm_error_ratio(WINDOW)) == pytest.approx(0.2, abs=0.02)
    assert _value(live, q.llm_batch_size_mean(WINDOW)) == pytest.approx(4)
    assert _value(live, q.queue_depth()) == 7
    assert _value(live, q.db_pool_in_use()) == 3
    assert _value(live, q.llm_inflight()) == 4
    assert _value(live, q.llm_concurrency_limit()) == 24
    budget = {r["metric"]["kind"]: float(r["value"][1]) for r in instant_query(live.url, q.llm_budget_remaining())}
    assert budget == {"requests": 120.0, "tokens": 5000.0}
    breakers = {r["metric"]["breaker"]: float(r["value"][1]) for r in instant_query(live.url, q.breakers_open())}
    assert breakers == {"cache": 0.0, "llm": 1.0}


@pytest.mark.parametrize("testid", [None, "literal", q.TESTID_VARIABLE])
def test_every_query_evaluates(live: Live, testid: str | None) -> None:
    tid = live.testid if testid == "literal" else testid
    for name, expr in q.all_queries(WINDOW, tid).items():
        try:
            instant_query(live.url, expr)
        except PromQLError as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{name}: {expr}: {exc}")


def test_every_rule_expression_evaluates(live: Live) -> None:
    for group in pc.rules()["groups"]:
        for rule in group["rules"]:
            instant_query(live.url, rule["expr"])


def test_every_dashboard_expression_evaluates(live: Live) -> None:
    count = 0
    for filename, doc in all_dashboards().items():
        for panel in doc["panels"]:
            for target in panel.get("targets", []):
                expr = expand_grafana_variables(target["expr"], testid=live.testid)
                assert "$" not in expr, f"{filename}: unexpanded variable in {expr}"
                try:
                    instant_query(live.url, expr)
                except PromQLError as exc:  # pragma: no cover
                    pytest.fail(f"{filename} / {panel['title']}: {expr}: {exc}")
                count += 1
        for var in doc["templating"].get("list", []):
            if var["type"] == "query":
                assert var["query"] == f"label_values({q.K6_HTTP_REQS}, {q.K6_TESTID_LABEL})"
    assert count > 30


def test_dashboard_headline_stats_show_values(live: Live) -> None:
    """The Overview stat panels, evaluated as Grafana would for the run, all yield a number."""
    overview = all_dashboards()["overview.json"]
    for panel in overview["panels"]:
        if panel["type"] != "stat":
            continue
        expr = expand_grafana_variables(panel["targets"][0]["expr"], range_="10m", testid=live.testid)
        assert instant_value(live.url, expr) is not None, panel["title"]


def test_invalid_promql_is_reported(live: Live) -> None:
    with pytest.raises(PromQLError, match="parse"):
        instant_query(live.url, "sum(rate(x[1m])")
    with pytest.raises(PromQLError):
        instant_query(live.url, f"rate({q.QUEUE_DEPTH})")


def test_window_range() -> None:
    assert q.window_range(90.4) == "90s"
    with pytest.raises(ValueError):
        q.window_range(0.2)
    with pytest.raises(ValueError):
        q.requests_total("10s", q.TESTID_VARIABLE)


def test_rendered_yaml_round_trips() -> None:
    cfg = pc.kubernetes_config("loadproof", 5)
    assert yaml.safe_load(pc.render_yaml(cfg)) == cfg
