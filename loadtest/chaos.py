"""``make chaos``: a repeatable fault campaign against the local stack, with measured figures per fault.

    python -m loadtest.chaos [--short] [--only NAME ...]

Starts the local stack (supervised, two API processes, two workers), drives a steady open-model mix
with k6 (``loadtest/k6/chaos.js``: hot keys, new topics, clients polling until done) and runs each
scenario in turn in its own window: steady load, the fault, its clearing, more steady load, then a
bounded drain of every task a client was given a 202 for. Per scenario it records requests, errors by
status, p95 before/during/after, tasks accepted/done/failed (with reasons)/pending/lost and the
recovery time, judges the scenario's invariants and writes ``reports/chaos/<run>/chaos.json``
(and ``reports/chaos/chaos.json``) plus ``CHAOS.md``. Exits 1 when any scenario fails.
What each scenario does and how each figure is measured: docs/chaos.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from common.stackconfig import REPO_ROOT, WorkersConfig
from loadtest.chaos_abuse import AbuseOutcome, Deadlines, run_abuse
from loadtest.chaos_load import (
    LoadResult,
    LoadRun,
    Mix,
    Stage,
    Tolerance,
    Window,
    inflight_at,
    recovery_s,
    window,
)
from loadtest.measure import machine_info
from loadtest.tasks import psycopg_url
from localstack.process import http_check
from localstack.stack import LocalStack
from localstack.supervisor import RestartPolicy

REPORTS = REPO_ROOT / "reports" / "chaos"
CHAOS_MD = REPO_ROOT / "CHAOS.md"
SUSTAINABLE_P95_MS = 400.0
SUSTAINABLE_ERROR_RATE = 0.01
OVERLOAD_FACTOR = 3.0
GOODPUT_SHARE = 0.9
LLM_FAULTS = {"rate_500": 0.10, "rate_429": 0.05, "rate_timeout": 0.02, "rate_malformed": 0.05}
LLM_DONE_SHARE = 0.99
RECOVERY_LIMIT_S = 10.0
KILL_NOTICE_S = 0.1
CHAOS_WORKERS = 2  # one can be killed while the other works
NO_FAULTS = {"rate_429": 0, "rate_500": 0, "rate_timeout": 0, "rate_malformed": 0}


@dataclass(frozen=True)
class Profile:
    """Windows and rates of one campaign; ``full`` for ``make chaos``, ``short`` for ``make test``."""

    name: str
    rate: float  # steady arrival rate (requests/s, polls not included)
    warm_s: float  # start of the load excluded from the baseline
    pre_s: float  # steady load before each fault
    post_s: float  # steady load after the fault is cleared (the recovery window)
    outage_s: float  # Redis down, LLM down
    faults_s: float  # LLM fault rates in force
    overload_s: float
    overload_p95_ms: float  # the bound on the served p95 during the overload
    drain_s: float
    search_step_s: float
    search_max_rate: float
    search_ramp_s: float  # a trial ramps from a tenth of its rate over this long, not judged (0: no ramp)
    header_timeout_s: float
    body_timeout_s: float
    abuse_holders: int
    simulator_env: dict[str, str] = field(default_factory=dict)
    mix: Mix = field(default_factory=Mix)


FULL = Profile(
    name="full",
    rate=500,  # half the target rate: faults are judged under a real load
    warm_s=3,
    pre_s=15,
    post_s=25,
    outage_s=30,
    faults_s=30,
    overload_s=20,
    overload_p95_ms=SUSTAINABLE_P95_MS,
    drain_s=240,
    search_step_s=8,
    search_max_rate=6400,
    search_ramp_s=5,
    header_timeout_s=10,
    body_timeout_s=10,
    abuse_holders=30,
)
SHORT = Profile(
    name="short",
    rate=30,
    warm_s=1,
    pre_s=5,
    post_s=8,
    outage_s=4,
    faults_s=6,
    overload_s=5,
    # generous: k6 and the whole stack share 2 cores with other work. It catches requests left to
    # queue for seconds; tests/test_overload.py starves one API process under a far larger load.
    overload_p95_ms=2000,
    drain_s=90,
    search_step_s=3,
    search_max_rate=120,  # 3x of it is about what k6 and the stack can drive on 2 shared cores
    search_ramp_s=0,  # at these rates k6 starts its few VUs at once
    header_timeout_s=2,
    body_timeout_s=2,
    abuse_holders=5,
    simulator_env={"LOADPROOF_SIM_TTFT_MS": "20", "LOADPROOF_SIM_ITL_MS": "0.5"},
    mix=Mix(poll_max_s=8),
)
PROFILES = {p.name: p for p in (FULL, SHORT)}


def service_env(p: Profile) -> dict[str, str]:
    """The campaign's service settings: what is not the default is here so a fault resolves within a
    scenario's window (a killed worker's entries reclaimed after 5 s, not 30 s; a hung LLM call given
    up after 20 s, not 30 s: a batch of 5 posts takes ~5 s at the simulator's default latency, so 5 s
    would time out every batched call)."""
    return {
        "LOADPROOF_PROCESSES": "2",
        "LOADPROOF_QUEUE_CLAIM_IDLE_MS": "5000",
        "LOADPROOF_QUEUE_SWEEP_INTERVAL_S": "2",
        "LOADPROOF_QUEUE_SWEEP_GRACE_S": "5",
        "LOADPROOF_LLM_TIMEOUT_S": "20",
        "LOADPROOF_LLM_DEADLINE_S": "60",
        "LOADPROOF_SHUTDOWN_TIMEOUT_S": "5",
        "LOADPROOF_HEADER_TIMEOUT_S": str(p.header_timeout_s),
        "LOADPROOF_BODY_TIMEOUT_S": str(p.body_timeout_s),
    }


# --------------------------------------------------------------------------- results


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Tasks:
    """Ground truth for every task id a client got with a 202, after a bounded drain."""

    accepted: int = 0
    completed: int = 0
    failed: int = 0
    pending: int = 0
    lost: int = 0
    failed_reasons: dict[str, int] = field(default_factory=dict)
    drain_s: float = 0.0


@dataclass
class ScenarioResult:
    name: str
    title: str
    passed: bool
    requests: int
    offered: int
    served: int
    dropped: int
    error_rate: float
    errors_by_status: dict[str, int]
    statuses_during: dict[str, int]
    error_rate_during: float
    p95_before_ms: float | None
    p95_during_ms: float | None
    p95_after_ms: float | None
    tasks_accepted: int
    tasks_completed: int
    tasks_failed: int
    tasks_pending: int
    tasks_lost: int
    failed_reasons: dict[str, int]
    recovery_s: float | None
    fault_s: float | None
    checks: list[Check]
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Fault:
    """When the fault began and when it was cleared (epoch s), and what was seen on the way."""

    injected_at: float | None = None
    cleared_at: float | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    def inject(self) -> None:
        self.injected_at = time.time()

    def clear(self) -> None:
        self.cleared_at = time.time()


# --------------------------------------------------------------------------- helpers


def wait_until(predicate: Callable[[], Any], timeout_s: float, interval_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval_s)


def task_outcomes(database_url: str, ids: set[str], drain_s: float, poll_s: float = 1.0) -> Tasks:
    """Poll the rows of ``ids`` until none is queued/running (bounded by ``drain_s``); a missing row is lost."""
    import psycopg

    t0 = time.monotonic()
    rows: dict[str, tuple[str, str | None]] = {}
    id_list = sorted(ids)
    while True:
        rows = {}
        try:
            with psycopg.connect(psycopg_url(database_url), connect_timeout=10) as conn, conn.cursor() as cur:
                for i in range(0, len(id_list), 5000):
                    cur.execute(
                        "SELECT id::text, status::text, error FROM tasks WHERE id = ANY(%s::uuid[])",
                        (id_list[i : i + 5000],),
                    )
                    rows.update({r[0]: (r[1], r[2]) for r in cur.fetchall()})
        except psycopg.Error:
            if time.monotonic() - t0 >= drain_s:
                raise
            time.sleep(poll_s)
            continue
        unfinished = sum(1 for status, _ in rows.values() if status not in ("done", "failed"))
        if unfinished == 0 or time.monotonic() - t0 >= drain_s:
            break
        time.sleep(poll_s)
    statuses = Counter(status for status, _ in rows.values())
    reasons = Counter((error or "no reason recorded")[:160] for status, error in rows.values() if status == "failed")
    return Tasks(
        accepted=len(ids),
        completed=statuses.get("done", 0),
        failed=statuses.get("failed", 0),
        pending=sum(n for s, n in statuses.items() if s not in ("done", "failed")),
        lost=len(ids) - len(rows),
        failed_reasons=dict(reasons.most_common()),
        drain_s=round(time.monotonic() - t0, 1),
    )


def scrape(urls: Sequence[str]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples of every reachable ``/metrics`` URL, summed over the URLs (a down target is skipped)."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for url in urls:
        try:
            text = httpx.get(url, timeout=3).text
        except httpx.HTTPError:
            continue
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                out[key] = out.get(key, 0.0) + float(s.value)
    return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return sum(v for (n, lab), v in samples.items() if n == name and all((k, labels[k]) in lab for k in labels))


def api_processes(pid: int) -> set[int]:
    """Live uvicorn worker processes under the supervisor ``pid`` (its multiprocessing children, not
    the resource tracker it also starts)."""
    out: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid or fields[0] == "Z":
                continue
            if b"spawn_main" in (stat.parent / "cmdline").read_bytes():
                out.add(int(stat.parent.name))
    return out


def gone(pid: int) -> bool:
    """The process no longer runs (exited, or a zombie waiting to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def git_commit() -> str | None:
    from loadtest.demo import git_commit as commit

    return commit()


# --------------------------------------------------------------------------- the campaign


class Campaign:
    """One stack, one profile, the scenarios in turn; results accumulate in ``results``."""

    def __init__(self, stack: LocalStack, profile: Profile, run_dir: Path, console: Console | None = None) -> None:
        self.stack = stack
        self.p = profile
        self.run_dir = run_dir
        self.console = console
        self.results: list[ScenarioResult] = []
        self.sustainable: dict[str, Any] | None = None
        self.tolerance = Tolerance()

    def say(self, text: str) -> None:
        if self.console is not None:
            self.console.print(text, highlight=False)

    @property
    def url(self) -> str:
        return self.stack.orchestrator_url

    def worker_metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape([w.metrics_url for w in self.stack.workers])

    def ready(self, timeout_s: float = 60) -> bool:
        check = http_check(f"{self.url}/readyz")
        return bool(wait_until(check, timeout_s, 0.2))

    # --- the generic shape of a scenario ----------------------------------------------------
    def run(
        self,
        name: str,
        title: str,
        hold_s: float,
        act: Callable[[Fault], None],
        judge: Callable[[ScenarioMeasure], list[Check]],
        *,
        stages: list[Stage] | None = None,
        extra_ids: set[str] | None = None,
        settle_s: float = 10.0,
        recovery_limit_s: float | None = RECOVERY_LIMIT_S,
    ) -> ScenarioResult:
        """Steady load for ``pre_s``; ``act`` injects the fault and returns once it is cleared; load goes
        on for ``post_s`` (plus ``settle_s`` for restarts); then the drain and the judgement."""
        p = self.p
        self.say(f"[bold]{name}[/]: {title}")
        self.ready()
        total = p.pre_s + hold_s + settle_s + p.post_s
        stages = stages or [Stage(total, p.rate)]
        load = LoadRun(self.url, stages, p.mix, self.run_dir, name, start_rate=stages[0].target)
        fault = Fault()
        try:
            time.sleep(p.pre_s)
            act(fault)
            if fault.injected_at is None or fault.cleared_at is None:
                raise RuntimeError(f"{name}: the fault was not injected and cleared")
            self.say(f"  fault held {fault.cleared_at - fault.injected_at:.1f}s; load continues")
            result = load.wait(timeout_s=total + 120)
        finally:
            load.stop()
        measure = ScenarioMeasure(self, name, title, result, fault, extra_ids or set(), recovery_limit_s)
        scenario = measure.result(judge(measure))
        self.results.append(scenario)
        verdict = "[green]PASS[/]" if scenario.passed else "[red]FAIL[/]"
        self.say(
            f"  {verdict} requests {scenario.requests}, errors {scenario.error_rate * 100:.2f} % "
            f"{scenario.errors_by_status}, p95 {fmt_ms(scenario.p95_before_ms)} / {fmt_ms(scenario.p95_during_ms)} / "
            f"{fmt_ms(scenario.p95_after_ms)}, tasks {scenario.tasks_accepted} accepted, {scenario.tasks_failed} "
            f"failed, {scenario.tasks_pending} pending, {scenario.tasks_lost} lost, "
            f"recovery {fmt_s(scenario.recovery_s)}"
        )
        for c in scenario.checks:
            if not c.ok:
                self.say(f"    [red]✗ {c.name}[/]: {c.detail}")
        return scenario

    # --- 1 ---------------------------------------------------------------------------------
    def worker_kill(self) -> ScenarioResult:
        worker = self.stack.workers[0]

        def act(f: Fault) -> None:
            assert worker.process is not None and self.stack.supervisor is not None
            before = self.stack.restarts().get(worker.name, 0)
            # mid-batch: wait until this worker has LLM calls in flight
            inflight = wait_until(lambda: metric(scrape([worker.metrics_url]), "loadproof_llm_inflight"), 10, 0.05)
            f.notes["llm_calls_in_flight_at_kill"] = inflight
            pid = worker.process.pid
            f.inject()
            os.kill(pid or 0, signal.SIGKILL)
            proc = worker.process
            restarted = wait_until(
                lambda: self.stack.restarts().get(worker.name, 0) > before and proc.running and proc.pid != pid,
                60,
                0.05,
            )
            ready = restarted and wait_until(http_check(worker.metrics_url.replace("/metrics", "/readyz")), 60, 0.1)
            f.notes["supervised_restart"] = bool(restarted and ready)
            f.clear()

        def judge(m: ScenarioMeasure) -> list[Check]:
            inflight = m.fault.notes.get("llm_calls_in_flight_at_kill") or 0
            return [
                Check("killed mid-batch", inflight > 0, f"{inflight:g} LLM call(s) in flight in the killed worker"),
                Check(
                    "supervised restart",
                    bool(m.fault.notes.get("supervised_restart")),
                    "the supervisor restarted the worker and it became ready",
                ),
                m.no_failed_tasks(),
            ]

        return self.run("worker_kill", "SIGKILL a worker mid-batch (supervised restart)", 0, act, judge)

    # --- 2 ---------------------------------------------------------------------------------
    def api_kill(self) -> ScenarioResult:
        orch = self.stack.orchestrator
        assert orch is not None and orch.process is not None

        def act(f: Fault) -> None:
            parent = orch.process.pid if orch.process else None
            assert parent is not None
            kids = api_processes(parent)
            f.notes["api_processes"] = len(kids)
            victim = min(kids)
            f.inject()
            os.kill(victim, signal.SIGKILL)
            # the process is gone (zombie) only once the kernel tore it down: its connections close then
            wait_until(lambda: gone(victim), 10, 0.001)
            f.notes["died_at"] = time.time()
            f.notes["died_after_ms"] = round((f.notes["died_at"] - (f.injected_at or 0.0)) * 1000, 1)
            back = wait_until(lambda: len(api_processes(parent) - {victim}) >= len(kids), 60, 0.05)
            f.notes["restarted_by_uvicorn"] = bool(back)
            self.ready()
            f.clear()

        def judge(m: ScenarioMeasure) -> list[Check]:
            at = float(m.fault.notes.pop("died_at", None) or m.fault.injected_at or 0.0)
            # in flight at the kill, or written within KILL_NOTICE_S after it onto a keep-alive connection
            # of the killed process: the client learns that the connection died only asynchronously
            inflight = inflight_at(m.load.records, at) + sum(
                1 for r in m.load.records if at < r.t <= at + KILL_NOTICE_S
            )
            errors = [r for r in m.load.records if r.error]
            n_errors = len(errors)
            after_kill = [r for r in errors if r.t > at + KILL_NOTICE_S]
            return [
                Check(
                    "several API processes",
                    (m.fault.notes.get("api_processes") or 0) >= 2,
                    f"{m.fault.notes.get('api_processes')} uvicorn worker processes",
                ),
                Check(
                    "killed process replaced",
                    bool(m.fault.notes.get("restarted_by_uvicorn")),
                    "uvicorn's supervisor started a new worker process",
                ),
                Check(
                    "errors bounded to in-flight requests",
                    n_errors <= inflight and not after_kill,
                    f"{n_errors} error(s), {inflight} request(s) in flight when the process died or sent within "
                    f"{KILL_NOTICE_S * 1000:g} ms after it (all processes), {len(after_kill)} error(s) for "
                    "requests started later",
                ),
                m.no_failed_tasks(),
            ]

        return self.run("api_kill", "SIGKILL one API process of several", 0, act, judge, settle_s=5)

    # --- 3 ---------------------------------------------------------------------------------
    def redis_outage(self) -> ScenarioResult:
        redis = self.stack.redis

        def act(f: Fault) -> None:
            assert redis.process is not None
            f.inject()
            redis.process.stop(timeout=10)  # SIGTERM: Redis writes its append-only file and exits
            time.sleep(self.p.outage_s)
            redis.process.start()
            redis.process.wait_ready(30)
            f.clear()

        def judge(m: ScenarioMeasure) -> list[Check]:
            return [m.recovered(), m.no_failed_tasks()]

        return self.run(
            "redis_outage", f"Redis down {self.p.outage_s:g} s, then back with its data", self.p.outage_s, act, judge
        )

    # --- 4 ---------------------------------------------------------------------------------
    def postgres_restart(self) -> ScenarioResult:
        pg = self.stack.postgres

        def act(f: Fault) -> None:
            assert pg.process is not None
            f.inject()
            pg.process.stop(timeout=20)  # SIGINT: Postgres' fast shutdown
            pg.process.start()
            pg.process.wait_ready(60)
            f.clear()

        def judge(m: ScenarioMeasure) -> list[Check]:
            return [m.recovered(), m.no_failed_tasks()]

        return self.run("postgres_restart", "Postgres restarted (fast shutdown) under load", 2, act, judge)

    # --- 5 ---------------------------------------------------------------------------------
    def llm_faults(self) -> ScenarioResult:
        sim = self.stack.simulator
        state: dict[str, Any] = {}

        def act(f: Fault) -> None:
            f.inject()
            sim.control(**LLM_FAULTS, retry_after_s=1)
            time.sleep(self.p.faults_s)
            sim.control(**NO_FAULTS)
            f.notes["simulator_injected"] = sim.stats().get("injected", {})
            f.clear()

        def before() -> None:
            sim.control(reset_stats=True)
            state["workers"] = self.worker_metrics()

        def judge(m: ScenarioMeasure) -> list[Check]:
            stats = sim.stats()
            after = self.worker_metrics()
            calls_ok = metric(after, "loadproof_llm_requests_total", outcome="ok") - metric(
                state["workers"], "loadproof_llm_requests_total", outcome="ok"
            )
            out_tokens = metric(after, "loadproof_llm_tokens_total", type="output") - metric(
                state["workers"], "loadproof_llm_tokens_total", type="output"
            )
            in_tokens = metric(after, "loadproof_llm_tokens_total", type="input") - metric(
                state["workers"], "loadproof_llm_tokens_total", type="input"
            )
            m.notes.update(
                {
                    "simulator_completed_calls": stats["completed"],
                    "service_counted_ok_calls": calls_ok,
                    "simulator_billed_tokens": [stats["prompt_tokens"], stats["completion_tokens"]],
                    "service_counted_tokens": [in_tokens, out_tokens],
                    "simulator_injected": stats.get("injected", {}),
                }
            )
            t = m.tasks
            done_share = t.completed / t.accepted if t.accepted else 1.0
            no_reason = t.failed_reasons.get("no reason recorded", 0)
            return [
                Check(
                    f"≥ {LLM_DONE_SHARE * 100:g} % of tasks done",
                    done_share >= LLM_DONE_SHARE,
                    f"{t.completed} of {t.accepted} done ({done_share * 100:.2f} %)",
                ),
                Check("every failed task has a reason", no_reason == 0, f"{t.failed} failed, {no_reason} without one"),
                Check(
                    "each billed call counted once",
                    calls_ok == stats["completed"]
                    and (in_tokens, out_tokens) == (stats["prompt_tokens"], stats["completion_tokens"]),
                    f"simulator billed {stats['completed']} calls ({stats['prompt_tokens']} in / "
                    f"{stats['completion_tokens']} out tokens); the workers counted {calls_ok:g} calls "
                    f"({in_tokens:g} / {out_tokens:g})",
                ),
            ]

        before()
        desc = ", ".join(f"{int(v * 100)} % {k.removeprefix('rate_')}" for k, v in LLM_FAULTS.items())
        return self.run(
            "llm_faults",
            f"LLM faults for {self.p.faults_s:g} s: {desc}",
            self.p.faults_s,
            act,
            judge,
            recovery_limit_s=None,
        )

    # --- 6 ---------------------------------------------------------------------------------
    def llm_down(self) -> ScenarioResult:
        sim = self.stack.simulator

        def act(f: Fault) -> None:
            assert sim.process is not None
            f.inject()
            sim.process.stop(timeout=10)
            breaker, deliveries = 0.0, []
            end = time.monotonic() + self.p.outage_s
            while time.monotonic() < end:
                samples = self.worker_metrics()
                breaker = max(breaker, metric(samples, "loadproof_llm_breaker_open"))
                deliveries.append(metric(samples, "loadproof_queue_pending"))
                time.sleep(min(1.0, max(0.0, end - time.monotonic())))
            f.notes["breaker_opened"] = breaker >= 1
            f.notes["stream_pending_during_outage"] = [min(deliveries, default=0), max(deliveries, default=0)]
            sim.process.start()
            sim.process.wait_ready(30)
            f.clear()

        def judge(m: ScenarioMeasure) -> list[Check]:
            return [
                Check(
                    "breaker opened", bool(m.fault.notes.get("breaker_opened")), "loadproof_llm_breaker_open = 1 seen"
                ),
                m.no_failed_tasks(),
            ]

        return self.run(
            "llm_down", f"LLM down {self.p.outage_s:g} s", self.p.outage_s, act, judge, recovery_limit_s=None
        )

    # --- 7 ---------------------------------------------------------------------------------
    def find_sustainable(self) -> tuple[float, set[str]]:
        """The highest arrival rate of the same mix with p95 < 400 ms, < 1 % errors and no dropped
        iterations: doubling from the steady rate, then one step between the last pass and the first fail.

        A trial ramps up over ``search_ramp_s`` before its judged window, as ``make bench``'s steps do:
        started at full rate, k6 opens all its VUs' connections at once and sends a burst the second
        after, so a trial would judge the load generator's start (loadtest.bench.step_config)."""
        p = self.p
        steps: list[dict[str, Any]] = []
        ids: set[str] = set()

        def trial(rate: float) -> bool:
            self.ready()
            ramp = [Stage(p.search_ramp_s, rate)] if p.search_ramp_s > 0 else []
            load = LoadRun(
                self.url,
                [*ramp, Stage(p.search_step_s, rate)],
                p.mix,
                self.run_dir,
                f"search-{rate:g}",
                start_rate=rate / 10 if ramp else None,
            )
            try:
                res = load.wait(timeout_s=p.search_ramp_s + p.search_step_s + 120)
            finally:
                load.stop()
            ids.update(res.accepted_ids())
            posts = [r for r in res.records if r.kind != "get"]
            t0 = posts[0].t if posts else res.started_at
            judged = t0 + (p.search_ramp_s or 1.0)  # without a ramp, the first second is k6's start
            w = window(posts, judged, t0 + p.search_ramp_s + p.search_step_s)
            ok = (
                w.p95_ms is not None
                and w.p95_ms < SUSTAINABLE_P95_MS
                and w.error_rate < SUSTAINABLE_ERROR_RATE
                and res.dropped == 0
            )
            steps.append(
                {
                    "rate": rate,
                    "passed": ok,
                    "p95_ms": w.p95_ms,
                    "error_rate": w.error_rate,
                    "dropped": res.dropped,
                    "achieved": round(w.requests / w.duration_s, 1) if w.duration_s else 0.0,
                }
            )
            self.say(
                f"  search {rate:g}/s: {'ok' if ok else 'too much'} (p95 {fmt_ms(w.p95_ms)}, errors "
                f"{w.error_rate * 100:.2f} %, dropped {res.dropped})"
            )
            time.sleep(2)  # let the accept path settle between steps
            return ok

        best, worst = 0.0, None
        rate = p.rate
        while rate <= p.search_max_rate:
            if trial(rate):
                best, rate = rate, rate * 2
            else:
                worst = rate
                break
        if best and worst and trial((best + worst) / 2):
            best = (best + worst) / 2
        self.sustainable = {"rate": best, "steps": steps, "capped": worst is None}
        return best, ids

    def overload(self) -> ScenarioResult:
        p = self.p
        self.say("[bold]overload[/]: measuring the sustainable rate")
        sustainable, search_ids = self.find_sustainable()
        peak = sustainable * OVERLOAD_FACTOR
        stages = [
            Stage(p.pre_s, p.rate),
            Stage(1, peak),
            Stage(p.overload_s, peak),
            Stage(1, p.rate),
            Stage(p.post_s, p.rate),
        ]

        def act(f: Fault) -> None:  # the fault is k6's own schedule: 3x from pre_s on
            f.injected_at = time.time()
            time.sleep(1 + p.overload_s + 1)
            f.cleared_at = time.time()

        def judge(m: ScenarioMeasure) -> list[Check]:
            posts = [r for r in m.load.records if r.kind != "get"]
            t0 = posts[0].t if posts else m.load.started_at
            hold = window(m.load.records, t0 + p.pre_s + 1, t0 + p.pre_s + 1 + p.overload_s)
            offered_posts = window(posts, t0 + p.pre_s + 1, t0 + p.pre_s + 1 + p.overload_s)
            n503 = hold.errors_by_status.get("503", 0)
            without_ra = sum(1 for r in m.load.records if r.status == 503 and r.retry_after is None)
            other_5xx = {s: n for s, n in m.errors_by_status.items() if s.startswith("5") and s != "503"}
            goodput = hold.served_per_s
            m.notes.update(
                {
                    "sustainable_rate": sustainable,
                    "sustainable_search": self.sustainable,
                    "overload_rate": peak,
                    "achieved_post_rate": round(offered_posts.requests / offered_posts.duration_s, 1)
                    if offered_posts.duration_s
                    else 0.0,
                    "goodput_per_s": round(goodput, 1),
                    "p95_served_ms": hold.p95_served_ms,
                    "answered_503": n503,
                }
            )
            m.p95_during_override = hold.p95_ms
            bound = p.overload_p95_ms
            # no 503 passes only when there was no excess: everything offered served within the bound
            absorbed = hold.errors == 0 and goodput >= GOODPUT_SHARE * peak and (hold.p95_served_ms or 0.0) < bound
            return [
                Check(
                    "503 + Retry-After for the excess",
                    without_ra == 0 and not other_5xx and (n503 > 0 or absorbed),
                    f"{n503} x 503 during the overload, {without_ra} without Retry-After, other 5xx: {other_5xx or 0}"
                    + ("" if n503 else "; every request was served, so there was no excess"),
                ),
                Check(
                    f"goodput ≥ {GOODPUT_SHARE * 100:g} % of the sustainable rate",
                    goodput >= GOODPUT_SHARE * sustainable,
                    f"{goodput:.1f}/s served (200/202) at {peak:g}/s offered; sustainable {sustainable:g}/s",
                ),
                Check(
                    f"p95 of served requests < {bound:g} ms",
                    hold.p95_served_ms is not None and hold.p95_served_ms < bound,
                    f"p95 of served requests {fmt_ms(hold.p95_served_ms)} during the overload",
                ),
            ]

        return self.run(
            "overload",
            f"{OVERLOAD_FACTOR:g}x the measured sustainable rate for {p.overload_s:g} s",
            2 + p.overload_s,
            act,
            judge,
            stages=stages,
            extra_ids=search_ids,
            settle_s=0,
        )

    # --- 8 ---------------------------------------------------------------------------------
    def abuse(self) -> ScenarioResult:
        orch = self.stack.orchestrator
        assert orch is not None
        deadlines = Deadlines(header_s=self.p.header_timeout_s, body_s=self.p.body_timeout_s)
        outcomes: list[AbuseOutcome] = []

        def act(f: Fault) -> None:
            f.inject()
            outcomes.extend(run_abuse(orch.port, deadlines, holders=self.p.abuse_holders))
            f.clear()

        def judge(m: ScenarioMeasure) -> list[Check]:
            by_case: dict[str, list[AbuseOutcome]] = {}
            for o in outcomes:
                by_case.setdefault(o.case, []).append(o)
            checks = []
            for case, items in by_case.items():
                answers = Counter(o.answer for o in items)
                bad = [o for o in items if not o.ok]
                slowest = max(o.seconds for o in items)
                checks.append(
                    Check(
                        case,
                        not bad,
                        f"expected {items[0].expected}; got {dict(answers)} (slowest {slowest:.1f}s)",
                    )
                )
            m.notes["abuse"] = {c.name: c.detail for c in checks}
            checks.append(m.no_stall())
            return checks

        return self.run(
            "abuse",
            "abusive clients: oversized/endless/stalled bodies, invalid UTF-8, deep nesting, slow and idle connections",
            self.p.body_timeout_s + 3,
            act,
            judge,
            settle_s=0,
            recovery_limit_s=None,
        )

    SCENARIOS: tuple[str, ...] = (
        "worker_kill",
        "api_kill",
        "redis_outage",
        "postgres_restart",
        "llm_faults",
        "llm_down",
        "overload",
        "abuse",
    )


class ScenarioMeasure:
    """A scenario's figures from its records and task rows, and the checks every scenario shares."""

    def __init__(
        self,
        c: Campaign,
        name: str,
        title: str,
        load: LoadResult,
        fault: Fault,
        extra_ids: set[str],
        recovery_limit_s: float | None,
    ) -> None:
        self.c, self.name, self.title, self.load, self.fault = c, name, title, load, fault
        self.recovery_limit_s = recovery_limit_s
        self.notes: dict[str, Any] = dict(fault.notes)
        self.p95_during_override: float | None = None
        records = load.records
        first = records[0].t if records else load.started_at
        last = max((r.t for r in records), default=load.ended_at)
        injected = fault.injected_at or first
        cleared = fault.cleared_at or injected
        self.baseline: Window = window(records, first + c.p.warm_s, injected)
        self.during: Window = window(records, injected, max(cleared, injected + 0.001))
        self.after: Window = window(records, cleared, last + 1)
        self.whole: Window = window(records, first, last + 1)
        self.errors_by_status = self.whole.errors_by_status
        self.recovery: float | None = recovery_s(records, self.baseline, cleared, last, c.tolerance)
        c.say(f"  drain: waiting for {len(load.accepted_ids() | extra_ids)} accepted task(s)")
        self.tasks: Tasks = task_outcomes(c.stack.postgres.url, load.accepted_ids() | extra_ids, c.p.drain_s)

    def no_failed_tasks(self) -> Check:
        t = self.tasks
        return Check(
            "every task completed",
            t.failed == 0 and t.completed == t.accepted,
            f"{t.completed} of {t.accepted} done, {t.failed} failed {t.failed_reasons or ''}".strip(),
        )

    def recovered(self) -> Check:
        limit = self.recovery_limit_s or RECOVERY_LIMIT_S
        r = self.recovery
        return Check(
            f"recovery < {limit:g} s",
            r is not None and r < limit,
            f"{fmt_s(r)} from the fault cleared to error rate and p95 at the pre-fault level",
        )

    def no_stall(self) -> Check:
        tol = self.c.tolerance
        base = self.baseline
        limit = tol.p95_limit(base.p95_ms or 0.0)
        during = self.during
        ok = during.error_rate <= base.error_rate + tol.error_pp and (during.p95_ms or 0.0) <= limit
        return Check(
            "other clients not stalled",
            ok,
            f"steady load during the abuse: p95 {fmt_ms(during.p95_ms)} (limit {limit:.1f} ms), errors "
            f"{during.error_rate * 100:.2f} % {during.errors_by_status or ''}".strip(),
        )

    def result(self, checks: list[Check]) -> ScenarioResult:
        t = self.tasks
        checks = [
            Check("0 tasks lost", t.lost == 0, f"{t.lost} accepted task(s) without a row"),
            Check("0 tasks pending after the drain", t.pending == 0, f"{t.pending} unfinished after {t.drain_s:g}s"),
            Check("k6 ran to the end", self.load.returncode in (0, 99), f"k6 exit code {self.load.returncode}"),
            *checks,
        ]
        if self.recovery_limit_s is not None and not any(c.name.startswith("recovery") for c in checks):
            checks.append(self.recovered())
        statuses = Counter(str(r.status) for r in self.load.records if self.during.start <= r.t < self.during.end)
        self.notes["fault_window_s"] = round(self.during.duration_s, 3)
        return ScenarioResult(
            name=self.name,
            title=self.title,
            passed=all(c.ok for c in checks),
            requests=self.whole.requests,
            offered=self.load.iterations + self.load.dropped,
            served=self.whole.served,
            dropped=self.load.dropped,
            error_rate=round(self.whole.error_rate, 6),
            errors_by_status=self.errors_by_status,
            statuses_during=dict(sorted(statuses.items())),
            error_rate_during=round(self.during.error_rate, 6),
            p95_before_ms=_round(self.baseline.p95_ms),
            p95_during_ms=_round(
                self.p95_during_override if self.p95_during_override is not None else self.during.p95_ms
            ),
            p95_after_ms=_round(self.after.p95_ms),
            tasks_accepted=t.accepted,
            tasks_completed=t.completed,
            tasks_failed=t.failed,
            tasks_pending=t.pending,
            tasks_lost=t.lost,
            failed_reasons=t.failed_reasons,
            recovery_s=self.recovery,
            fault_s=round(self.during.duration_s, 3),
            checks=checks,
            notes=self.notes,
        )


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def fmt_ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f} ms"


def fmt_s(v: float | None) -> str:
    return "not recovered" if v is None else f"{v:.1f} s"


# --------------------------------------------------------------------------- outputs


def chaos_doc(c: Campaign, started: str, commit: str | None) -> dict[str, Any]:
    return {
        "scenarios": [
            {
                "name": r.name,
                "passed": r.passed,
                "requests": r.requests,
                "error_rate": r.error_rate,
                "errors_by_status": r.errors_by_status,
                "p95_during_ms": r.p95_during_ms,
                "p95_after_ms": r.p95_after_ms,
                "tasks_accepted": r.tasks_accepted,
                "tasks_lost": r.tasks_lost,
                "tasks_failed": r.tasks_failed,
                "tasks_pending": r.tasks_pending,
                "recovery_s": r.recovery_s,
                "details": {k: v for k, v in asdict(r).items() if k not in _TOP_KEYS},
            }
            for r in c.results
        ],
        "passed": bool(c.results) and all(r.passed for r in c.results),
        "profile": c.p.name,
        "started_at": started,
        "commit": commit,
        "machine": machine_info(),
        "steady_rate": c.p.rate,
        "mix": asdict(c.p.mix),
        "service_env": service_env(c.p),
        "processes": {"workers": CHAOS_WORKERS, "worker_nice": WorkersConfig().nice},
        "recovery_rule": c.tolerance.describe(),
    }


_TOP_KEYS = {
    "name",
    "passed",
    "requests",
    "error_rate",
    "errors_by_status",
    "p95_during_ms",
    "p95_after_ms",
    "tasks_accepted",
    "tasks_lost",
    "tasks_failed",
    "tasks_pending",
    "recovery_s",
}


def chaos_markdown(doc: dict[str, Any]) -> str:
    """CHAOS.md: every scenario's measured figures and its verdict, naming the commit and the machine."""
    m = doc["machine"]
    verdict = "every scenario passed" if doc["passed"] else "at least one scenario FAILED"
    lines = [
        "# Chaos campaign",
        "",
        "<!-- generated by `make chaos` (python -m loadtest.chaos); do not edit by hand -->",
        "",
        f"**Verdict: {verdict}** — profile `{doc['profile']}`, started {doc['started_at']}, commit "
        f"`{doc['commit'] or 'unknown'}`.",
        "",
        f"- Machine: {m.get('cores')} cores, {m.get('cpu_model')}, {m.get('memory_gib')} GiB, {m.get('os')}; "
        "k6 and every process of the stack share these cores.",
        f"- Steady load: {doc['steady_rate']:g} requests/s, open model (k6 `ramping-arrival-rate`), mix "
        f"{_mix(doc['mix'])}; polls come on top.",
        f"- Recovery time: {doc['recovery_rule']}; from per-request samples (1 s buckets), never averaged percentiles.",
        "- Tasks: every task id a client was given with a 202, looked up in Postgres after a bounded drain; "
        "*lost* = no row, *pending* = a row not done/failed when the drain ended.",
        "- Service settings that differ from the defaults: "
        + ", ".join(f"`{k}={v}`" for k, v in doc["service_env"].items())
        + "."
        + _processes(doc.get("processes")),
        "- What each scenario does and how each figure is measured: [docs/chaos.md](docs/chaos.md).",
        "",
        "| scenario | verdict | requests (offered / served) | error rate | errors by status "
        "| p95 before / during / after | tasks accepted / done / failed / pending / lost | recovery |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in doc["scenarios"]:
        d = s["details"]
        lines.append(
            f"| `{s['name']}` | {'PASS' if s['passed'] else 'FAIL'} | {s['requests']} ({d['offered']} / {d['served']}) "
            f"| {s['error_rate'] * 100:.2f} % | {_statuses(s['errors_by_status'])} | {fmt_ms(d['p95_before_ms'])} / "
            f"{fmt_ms(s['p95_during_ms'])} / {fmt_ms(s['p95_after_ms'])} | {s['tasks_accepted']} / "
            f"{d['tasks_completed']} / {s['tasks_failed']} / {s['tasks_pending']} / {s['tasks_lost']} | "
            f"{fmt_s(s['recovery_s']) if s['recovery_s'] is not None or s['name'] in _RECOVERY_JUDGED else 'n/a'} |"
        )
    for s in doc["scenarios"]:
        d = s["details"]
        lines += [
            "",
            f"## `{s['name']}` — {'PASS' if s['passed'] else 'FAIL'}",
            "",
            f"{d['title']}. Fault window {d['fault_s']:g} s; statuses during it: {_statuses(d['statuses_during'])} "
            f"(error rate {d['error_rate_during'] * 100:.2f} %).",
            "",
        ]
        lines += [f"- {'✓' if c['ok'] else '✗'} **{c['name']}**: {c['detail']}" for c in d["checks"]]
        if d["failed_reasons"]:
            lines.append(
                "- failed tasks by reason: " + "; ".join(f"{n} x `{r}`" for r, n in d["failed_reasons"].items())
            )
        notes = {k: v for k, v in d["notes"].items() if k not in ("abuse", "sustainable_search", "fault_window_s")}
        if notes:
            lines.append("- observed: " + ", ".join(f"{k} = {_plain(v)}" for k, v in notes.items()))
        search = d["notes"].get("sustainable_search")
        if search:
            lines.append(
                "- sustainable-rate search (same mix; p95 < 400 ms, errors < 1 %, no dropped iterations): "
                + ", ".join(
                    f"{st['rate']:g}/s {'ok' if st['passed'] else 'too much'} (p95 {fmt_ms(st['p95_ms'])}, "
                    f"{st['error_rate'] * 100:.2f} %, dropped {st['dropped']})"
                    for st in search["steps"]
                )
                + (" — capped by the profile's highest step" if search.get("capped") else "")
            )
    lines.append("")
    return "\n".join(lines)


_RECOVERY_JUDGED = {"redis_outage", "postgres_restart", "worker_kill", "api_kill", "overload"}


def _mix(mix: dict[str, Any]) -> str:
    hot = 1 - mix["new_share"] - mix["poll_share"]
    return (
        f"{hot * 100:g} % hot keys (Zipf s={mix['zipf_s']:g} over {mix['personas']} personas x {mix['topics']} "
        f"topics), {mix['new_share'] * 100:g} % new topics, {mix['poll_share'] * 100:g} % new topics whose "
        f"client polls GET /task/{{id}} every {mix['poll_interval_s']:g} s until done"
    )


def _processes(p: dict[str, Any] | None) -> str:
    if not p:
        return ""
    return f" {p['workers']} worker processes at nice {p['worker_nice']} (the local default, as in `make demo`)."


def _statuses(d: dict[str, int]) -> str:
    return ", ".join(f"{'no response' if k == '0' else k}: {v}" for k, v in d.items()) or "none"


def _plain(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, dict | list):
        return f"`{json.dumps(v, separators=(',', ':'))}`"
    return str(v)


# --------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def chaos_stack(
    p: Profile, workdir: Path | None = None, log: Callable[[str], None] | None = None
) -> Iterator[LocalStack]:
    """The stack the campaign runs against: supervised, two API processes, two workers, durable stores."""
    with LocalStack(
        service_env(p),
        workers=CHAOS_WORKERS,
        worker_nice=WorkersConfig().nice,  # as `make demo` runs them: the request path gets the cores first
        simulator_env=p.simulator_env,
        redis_appendonly=True,
        durable_postgres=True,
        supervise=True,
        restart_policy=RestartPolicy(initial_backoff_s=0.5, crash_loop_restarts=5, crash_loop_window_s=60),
        handle_signals=True,
        workdir=workdir,
        log=log,
    ) as stack:
        yield stack


def run_campaign(p: Profile, run_dir: Path, only: Sequence[str] = (), console: Console | None = None) -> dict[str, Any]:
    started = datetime.now(UTC).isoformat(timespec="seconds")
    commit = git_commit()
    names = [n for n in Campaign.SCENARIOS if not only or n in only]
    log = (lambda line: console.print(f"  [dim]{line}[/]", highlight=False)) if console else None
    with chaos_stack(p, run_dir / "stack", log=log) as stack:
        c = Campaign(stack, p, run_dir, console)
        for name in names:
            getattr(c, name)()
            stack.check_alive()
    doc = chaos_doc(c, started, commit)
    (run_dir / "chaos.json").write_text(json.dumps(doc, indent=2))
    (run_dir / "CHAOS.md").write_text(chaos_markdown(doc))
    return doc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--short", action="store_true", help="short windows and low rates (what make test runs)")
    parser.add_argument("--only", action="append", choices=Campaign.SCENARIOS, default=[], help="run only these")
    parser.add_argument("--reports", type=Path, default=REPORTS)
    parser.add_argument("--chaos-md", type=Path, default=CHAOS_MD, help="where the generated CHAOS.md goes")
    args = parser.parse_args(argv)
    p = SHORT if args.short else FULL
    console = Console()
    run_dir = args.reports / (datetime.now(UTC).strftime("%Y%m%d-%H%M%S") + f"-{p.name}")
    run_dir.mkdir(parents=True, exist_ok=True)
    console.print(f"loadproof chaos — profile {p.name}, {p.rate:g} requests/s steady, reports in {run_dir}")
    try:
        doc = run_campaign(p, run_dir, args.only, console)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything started was stopped[/]")
        return 130
    (args.reports / "chaos.json").write_text(json.dumps(doc, indent=2))
    if not args.only and not args.short:
        args.chaos_md.write_text(chaos_markdown(doc))
        console.print(f"wrote {args.chaos_md}")
    console.print(
        ("[green]all scenarios passed[/]" if doc["passed"] else "[red]a scenario failed[/]") + f" ({run_dir})"
    )
    return 0 if doc["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
