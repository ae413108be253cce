"""``make demo`` end to end with PROFILE=smoke: the real stack (Postgres, Redis, simulator, orchestrator,
workers, Prometheus, k6), measured numbers that agree with k6, a report Chromium can render, nothing left running."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from common.outputs import OUTPUT_KEYS
from common.stackconfig import ProfileConfig, StackConfig, Stage, load
from common.tools import tool
from loadtest import report
from loadtest.demo import run_demo
from localstack.proof import ProofStack

pytestmark = pytest.mark.e2e

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _with_loadtest(cfg: StackConfig, **update: Any) -> StackConfig:
    return cfg.model_copy(update={"loadtest": cfg.loadtest.model_copy(update=update)})


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running; our stack reaps its children, so treat one as a leak anyway
    return True


def dump_dom(html_file: Path, tmp: Path) -> str:
    chromium = tool("chromium")
    proc = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium'}", "--dump-dom", html_file.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.timeout(180)
def test_smoke_demo(tmp_path: Path) -> None:
    cfg = _with_loadtest(load("dev"), drain_s=30)
    pids: dict[str, int] = {}

    def on_ready(stack: ProofStack) -> None:
        pids.update(stack.pids())

    out, run_dir = run_demo(
        cfg, stack_name="dev", profile="smoke", reports_dir=tmp_path / "reports", grafana=False, on_ready=on_ready
    )

    # every process the stack started is gone
    assert {"postgres", "redis", "simulator", "orchestrator", "worker-0", "prometheus"} <= set(pids)
    leftovers = {name: pid for name, pid in pids.items() if _alive(pid)}
    assert not leftovers, f"still running: {leftovers}"

    # files
    for name in ("outputs.json", "k6-summary.json", "k6-report.html", "report.html", "PERFORMANCE.md"):
        assert (run_dir / name).is_file(), name
    assert (tmp_path / "reports" / "latest").resolve() == run_dir.resolve()
    saved = json.loads((run_dir / "outputs.json").read_text())
    assert saved["test_id"] == out["test_id"]

    # every key present and sane
    for key in OUTPUT_KEYS:
        assert key in out, key
    prof = cfg.loadtest.profiles["smoke"]
    assert out["profile"] == "smoke" and out["warmup_s"] == prof.warmup_s
    assert out["target_qps"] == max(s.target for s in prof.stages)
    assert out["requests"] > 0 and out["achieved_qps"] > 0
    assert 0 < out["p50_latency_ms"] <= out["p95_latency_ms"] <= out["p99_latency_ms"]
    assert out["server_p95_latency_ms"] is not None and out["server_p95_latency_ms"] > 0
    assert 0 <= out["error_rate"] <= 1 and 0 <= out["cache_hit_ratio"] <= 1
    assert out["llm_calls"] > 0 and out["llm_cost_usd"] > 0
    assert out["llm_cost_per_1k_tokens_usd"] > 0 and out["cost_per_request_usd"] > 0
    assert out["tasks_accepted"] > 0
    assert out["tasks_completed"] + out["tasks_failed"] + out["tasks_pending_after_drain"] == out["tasks_accepted"]
    assert out["tasks_lost"] == 0
    # No process restarted, and every configured scrape target was seen up during the run.
    assert out["counter_resets"] == 0 and not any(out["process_restarts"].values())
    for job in ("orchestrator", "workers"):
        assert out["replicas"][job]["observed_max"] == out["replicas"][job]["configured"] >= 1, job
    assert out["machine"]["cores"] >= 1 and out["machine"]["cpu_model"]
    assert any(n.startswith("whole machine during the k6 run (/proc/stat): busy ") for n in out["notes"])
    assert out["grafana_url"] is None
    assert isinstance(out["thresholds_passed"], bool)

    # Prometheus agrees with k6's own summary
    summary = json.loads((run_dir / "k6-summary.json").read_text())
    metrics = summary["metrics"]
    assert out["requests"] == metrics["http_reqs{phase:measured}"]["values"]["count"]  # exact
    assert out["requests_including_warmup"] == metrics["http_reqs"]["values"]["count"]
    assert out["dropped_iterations"] == metrics["dropped_iterations"]["values"]["count"]
    k6_p95 = metrics["http_req_duration{phase:measured}"]["values"]["p(95)"]
    assert out["p95_latency_ms"] == pytest.approx(k6_p95, rel=0.05)
    k6_failed = metrics["http_req_failed{phase:measured}"]["values"]["passes"]
    assert out["requests_failed"] == k6_failed

    # the report renders in a real browser and shows the headline numbers
    dom = dump_dom(run_dir / "report.html", tmp_path)
    assert "ALL TARGETS MET" in dom or "TARGETS NOT MET" in dom
    for key in ("p95_latency_ms", "error_rate", "cache_hit_ratio", "llm_cost_per_1k_tokens_usd", "achieved_qps"):
        assert report.fmt(key, out[key]) in dom, key
    assert dom.count("<svg") >= 5
    perf = (run_dir / "PERFORMANCE.md").read_text()
    assert f"Zipf-distributed (exponent s = {cfg.loadtest.workload.zipf_s})" in perf
    assert "make demo STACK=dev PROFILE=smoke" in perf


@pytest.mark.timeout(150)
def test_missed_target_is_reported_as_failed(tmp_path: Path) -> None:
    """An unreachable p95 target and a slow LLM: k6 exits 99, the run is still measured and reported, and
    fails; the drain stays bounded and reports the unfinished tasks instead of waiting for them."""
    cfg = load("dev")
    # No call can finish inside run + drain (the client times out at 30 s first), whatever the worker
    # concurrency: pending tasks are certain, not a race.
    slow_llm = cfg.llm.model_copy(update={"simulator": cfg.llm.simulator.model_copy(update={"ttft_ms": 40000.0})})
    cfg = cfg.model_copy(update={"llm": slow_llm})
    quick = ProfileConfig(
        start_rate=20, warmup_s=2, stages=[Stage(duration="8s", target=20)], pre_allocated_vus=10, max_vus=50
    )
    cfg = _with_loadtest(
        cfg,
        drain_s=5,
        profiles={**cfg.loadtest.profiles, "quick": quick},
        thresholds=cfg.loadtest.thresholds.model_copy(update={"p95_ms": 0.001}),
    )
    out, run_dir = run_demo(cfg, stack_name="dev", profile="quick", reports_dir=tmp_path / "reports", grafana=False)
    assert out["k6_exit_code"] == 99
    assert out["threshold_results"]["p95_latency_ms"] is False
    assert out["thresholds_passed"] is False
    assert out["drain_s"] < 15  # bounded by drain_s (5 s) plus one poll
    assert out["tasks_pending_after_drain"] > 0
    assert out["tasks_completed"] + out["tasks_failed"] + out["tasks_pending_after_drain"] == out["tasks_accepted"]
    assert out["tasks_lost"] == 0
    html = (run_dir / "report.html").read_text()
    assert "TARGETS NOT MET" in html and "FAIL" in html


@pytest.mark.timeout(180)
def test_flow_demo(tmp_path: Path) -> None:
    """``make demo PROFILE=flow``, shortened: new tasks at a constant rate, each polled until its post is there;
    the time to post, the flows' outcomes and the backlog's peak and drain are measured and reported."""
    cfg = load("dev")
    flow = cfg.loadtest.profiles["flow"].model_copy(
        update={"warmup_s": 3, "start_rate": 10, "stages": [Stage(duration="12s", target=10)], "pre_allocated_vus": 40}
    )
    cfg = _with_loadtest(cfg, drain_s=30, profiles={**cfg.loadtest.profiles, "flow": flow})
    out, run_dir = run_demo(cfg, stack_name="dev", profile="flow", reports_dir=tmp_path / "reports", grafana=False)
    for key in OUTPUT_KEYS:
        assert key in out, key
    metrics = json.loads((run_dir / "k6-summary.json").read_text())["metrics"]
    assert out["flow"] is True and out["flows"] == metrics["flows{phase:measured}"]["values"]["count"] > 0
    assert out["flows_by_outcome"] == {"done": out["flows"]}  # the simulator answers every task
    assert out["flow_failed_rate"] == 0
    k6_ttp = metrics["time_to_post{phase:measured}"]["values"]
    assert 0 < out["time_to_post_p50_ms"] <= out["time_to_post_p95_ms"]
    assert out["time_to_post_p95_ms"] == pytest.approx(k6_ttp["p(95)"], rel=0.1)
    # POST /task alone in the request figures; the polls on their own.
    assert out["requests"] == metrics["http_reqs{phase:measured}"]["values"]["count"]
    assert out["polls"] == metrics["http_req_duration{poll:measured}"]["values"]["count"] > 0
    assert out["tasks_accepted"] >= out["flows"] and out["tasks_lost"] == 0
    # Every flow waited for its task, so the queue was empty when k6 ended: drained within the run's tail.
    assert out["backlog_peak"] is not None and out["backlog_peak"] >= 1
    assert out["backlog_drain_s"] is not None and 0 <= out["backlog_drain_s"] <= out["duration_s"]
    assert out["threshold_results"]["time_to_post_p95_ms"] is (out["time_to_post_p95_ms"] < 2500)
    html = (run_dir / "report.html").read_text()
    assert "Time to post (client" in html and "LLM concurrency" in html
