"""Turn one load-test run into measured numbers: Prometheus (k6 remote write + service scrapes) and Postgres.

Reusable on purpose: ``make demo`` calls :func:`measure` on this machine, the cluster's report Job
imports the same function, so a number means the same thing everywhere. Every number is *queried*,
never estimated; what cannot be measured is ``None`` and shown as "n/a".

Definitions (also in docs/measurement.md):

* **Client latency percentiles** (p50/p95/p99): ``histogram_quantile`` over the SUM of k6's native
  histograms of ``http_req_duration`` for the run's requests tagged ``phase="measured"`` (the k6
  script tags everything after the warm-up). Several k6 runners are merged by summing their
  histograms, never by averaging percentiles. k6 histograms are cumulative per run, so the value
  at the end of the run covers exactly the measured requests; an ``increase()`` over a time window
  could not see a series' first push and would drop up to one push interval of requests.
* **Server-side numbers** (server p95, cache hit ratio) come from the service's own metrics over the
  measured time window ``[start + warm-up, end]`` via ``common.queries`` (the single PromQL source).
* **Cost numbers** cover ``[start, end of drain]``: LLM work for requests accepted during the run
  happens partly after it, and leaving it out would flatter the cost.
* **Tasks**: accepted/completed/failed come from the service counters over the run and drain;
  with a database URL they are reconciled against the task rows (``tasks_lost`` = accepted but no
  row). Tasks still queued when the bounded drain ends are reported, not hidden.
* **Service counter totals** (tasks, LLM calls, tokens and spend, successful requests) are summed
  from the raw samples of every series in the window (:func:`counter_total`), not from two instants
  and not from ``increase()``. The difference of two summed instants loses whatever a restarted
  process had counted (its counter starts again at 0) and everything a deleted pod counted (its
  series is gone at the second instant). ``increase()`` handles resets, but cannot see the first
  value of a series born in the window (a new pod) and extrapolates to the window's edges. Per
  series, the walk adds each step's increase; a step down, or a changed
  ``process_start_time_seconds`` of the same target, is a restart and adds the whole new value
  (counted from 0); a series with no sample before the window counts from 0. Each restart seen is
  reported (``counter_resets`` and a note). What no scrape-based method can see: events in a
  process's last moments between its last scrape and its exit.
* **Replicas**: the most scrape targets of the API and the workers up at once during the run
  (the HPA changes the API's count), next to the configured count.
* **Which requests**: every ``phase``-tagged k6 figure (p50/p95/p99, requests, error rate, plateau) is
  about ``POST /task`` alone. In a flow profile the polls of ``GET /task/{id}`` carry their flow's
  phase in ``poll`` instead, and are reported on their own (``polls``, ``poll_*``).
* **Time to post** (flow profiles): percentiles of k6's ``time_to_post`` Trend (just before the POST to
  the poll that saw ``done``) of the measured phase, merged from the runners' native histograms like
  the request latency. Flows that failed, timed out or were rejected have no time to post; they are
  counted in ``flow_failed_rate`` instead, which is judged against the error-rate target.
* **Backlog** (every profile): the queue's undelivered + delivered-but-unacknowledged entries, from the
  ``loadproof_queue_depth`` and ``loadproof_queue_pending`` gauges (:func:`backlog`): the queue as the
  workers see it (retries and swept entries included), the same series the dashboards show, and
  available wherever Prometheus is, with or without the task table. They are samples (the workers set
  them every few seconds, Prometheus scrapes them), so ``backlog_peak`` is the highest *sampled*
  value and ``backlog_drain_s`` is late by up to one gauge interval plus one scrape interval.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import queries as q
from common.k6config import duration_seconds, peak_arrival_rate, plateau_window
from common.stackconfig import ProfileConfig, ThresholdsConfig
from loadtest.prom import (
    SERVICE_JOBS,
    CounterTotal,
    MeasureError,
    Prometheus,
    counter_total,
    describe_resets,
    process_starts,
)
from loadtest.tasks import DONE_STATUSES, FAILED_STATUSES, TaskRows, count_task_rows, pending_rows
from service.metrics import HTTP_BUCKETS, REFUSAL_REASONS, REJECT_REASONS, SLOW_BUCKETS
from service.worker import GAUGE_INTERVAL_S

# Every outputs.json key a consumer may rely on (tests check all of them).

MEASURED = q.MEASURED_PHASE  # k6 tags requests after the warm-up phase="measured" (loadtest/k6/task.js)


def _ratio(part: float | None, whole: float | None, scale: float = 1.0) -> float | None:
    return None if part is None or not whole else part / whole * scale


@dataclass(frozen=True)
class RunWindow:
    """When the run happened (epoch seconds) and how much of it is warm-up."""

    started_at: float
    ended_at: float
    warmup_s: float
    drained_at: float | None = None  # end of the post-run drain (defaults to ended_at)
    last_arrival_at: float | None = None  # end of the arrival schedule (defaults to ended_at)

    @property
    def measured_start(self) -> float:
        return self.started_at + self.warmup_s

    @property
    def measured_s(self) -> float:
        return self.ended_at - self.measured_start

    @property
    def drain_end(self) -> float:
        return self.drained_at if self.drained_at is not None else self.ended_at

    @property
    def last_arrival(self) -> float:
        """When k6 offered its last arrival: the backlog drains from here."""
        return self.last_arrival_at if self.last_arrival_at is not None else self.ended_at


def target_rate_at(profile: ProfileConfig, t: float) -> float:
    """Configured arrival rate at ``t`` seconds into the run (linear ramps, as k6 does)."""
    rate, elapsed = float(profile.start_rate), 0.0
    for stage in profile.stages:
        d = duration_seconds(stage.duration)
        if t <= elapsed + d:
            return rate + (stage.target - rate) * ((t - elapsed) / d if d else 1.0)
        rate, elapsed = float(stage.target), elapsed + d
    return 0.0


def machine_info() -> dict[str, Any]:
    """Where the numbers were measured: cores, CPU model, memory, OS."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib: float | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cores": cores,
        "cpu_model": model,
        "memory_gib": mem_gib,
        "os": f"{platform.system()} {platform.release()}",
        "hostname": platform.node(),
        "python": platform.python_version(),
    }


CPU_STATES = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
STEAL_NOTABLE = 0.05  # a share of the machine's CPU time taken by the hypervisor worth calling out


def host_cpu_times() -> tuple[int, ...] | None:
    """The machine's cumulative CPU time per state (``/proc/stat``, all CPUs); None off Linux."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    if not first or first[0] != "cpu":
        return None
    return tuple(int(v) for v in first[1 : 1 + len(CPU_STATES)])


def host_cpu_note(before: tuple[int, ...] | None, after: tuple[int, ...] | None) -> str | None:
    """How busy the whole machine was between two readings, and what the hypervisor took (steal).

    Why: on a shared VM a run can be slowed by what is not ours at all. A figure that the next run
    does not reproduce needs evidence of that kind, so every local run states it.
    """
    if before is None or after is None:
        return None
    delta = {state: b - a for state, a, b in zip(CPU_STATES, before, after, strict=False)}
    total = sum(delta.values())
    if total <= 0:
        return None
    share = {k: v / total for k, v in delta.items()}
    text = (
        f"whole machine during the k6 run (/proc/stat): busy {100 * (1 - share['idle'] - share['iowait']):.1f} %, "
        f"iowait {100 * share['iowait']:.1f} %, steal {100 * share['steal']:.1f} %"
    )
    if share["steal"] >= STEAL_NOTABLE:
        text += " (the hypervisor took a notable share of the CPU from this run: compare it with the runs around it)"
    return text


# ---------------------------------------------------------------- database reconciliation


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _plateau(prom: Prometheus, test_id: str, profile: ProfileConfig, at: float) -> dict[str, Any]:
    """The figures of the span held at the peak rate (requests k6 tagged plateau=yes); {} without one.

    Exact like the whole-run figures: k6's counters and histogram for those requests alone, so a ramp
    that passes the peak cannot stand in for time spent at it.
    """
    span = plateau_window(profile)
    if span is None:
        return {}
    reqs = int(prom.scalar(q.run_total(q.K6_HTTP_REQS, test_id, q.PLATEAU), at) or 0)
    failed = int(
        prom.scalar(q.run_total(q.K6_HTTP_REQS, test_id, {**q.PLATEAU, "expected_response": "false"}), at) or 0
    )
    p95 = prom.scalar(q.run_latency_quantile_ms(0.95, test_id, None, q.PLATEAU), at) if reqs else None
    seconds = span[1] - span[0]
    return {
        "plateau_s": seconds,
        "plateau_qps": round(reqs / seconds, 2),
        "plateau_p95_latency_ms": _round(p95, 2),
        "plateau_error_rate": _round(failed / reqs, 6) if reqs else None,
    }


def _flow(prom: Prometheus, test_id: str, profile: ProfileConfig, at: float) -> dict[str, Any]:
    """Time to post and the flows' outcomes (measured phase), and the polls on their own; None outside flows."""
    if not profile.flow:
        return {"time_to_post_p50_ms": None, "time_to_post_p95_ms": None, "flow_failed_rate": None}
    flows_sel = q.k6_selector(q.K6_FLOWS, test_id, {q.K6_PHASE_LABEL: MEASURED})
    outcomes = prom.vector(f"sum by (outcome) ({flows_sel})", at)
    by_outcome = {labels.get("outcome", "?"): round(v) for labels, v in outcomes}
    flows = sum(by_outcome.values())
    failed = flows - by_outcome.get(q.FLOW_DONE, 0)
    p50, p95 = (prom.scalar(q.run_time_to_post_ms(x, test_id), at) if flows else None for x in (0.5, 0.95))
    poll = {q.K6_POLL_LABEL: MEASURED}
    polls = int(prom.scalar(q.run_total(q.K6_HTTP_REQS, test_id, poll), at) or 0)
    failed_polls = q.run_total(q.K6_HTTP_REQS, test_id, {**poll, "expected_response": "false"})
    polls_failed = int(prom.scalar(failed_polls, at) or 0)
    poll_p95 = prom.scalar(q.run_latency_quantile_ms(0.95, test_id, None, poll), at) if polls else None
    return {
        "time_to_post_p50_ms": _round(p50, 1),
        "time_to_post_p95_ms": _round(p95, 1),
        "flows": flows,
        "flows_by_outcome": by_outcome,
        "flow_failed_rate": _round(failed / flows, 6) if flows else None,
        "polls": polls,
        "poll_error_rate": _round(polls_failed / polls, 6) if polls else None,
        "poll_p95_latency_ms": _round(poll_p95, 2),
    }


def backlog_lag_s(scrape_interval_s: float) -> float:
    """How long after the queue empties its backlog gauges can still read non-zero in Prometheus."""
    return GAUGE_INTERVAL_S + scrape_interval_s + 1.0


@dataclass(frozen=True)
class Backlog:
    """The queue backlog over a run: its sampled peak and how long it took to empty after the last arrival."""

    peak: int | None  # None: no backlog series at all
    drain_s: float | None  # None: not back to 0 by the end of the drain (or no series)
    at_end: int | None  # the last sampled value
    note: str | None = None


def backlog(prom: Prometheus, window: RunWindow, *, scrape_interval_s: float, step_s: float = 1.0) -> Backlog:
    """Peak of the backlog from the run's start, and seconds from the last arrival to its first sample of 0.

    Evaluated every ``step_s`` (at most the scrape interval, so every scraped sample is seen) up to the
    end of the drain plus :func:`backlog_lag_s`, the time the gauges need to show an empty queue.
    """
    until = max(window.drain_end, window.ended_at) + backlog_lag_s(scrape_interval_s)
    step = min(step_s, scrape_interval_s)
    points = prom.series(q.backlog(), window.started_at, until, step)
    if not points:
        return Backlog(None, None, None, f"backlog_peak/backlog_drain_s: no {q.QUEUE_DEPTH} / {q.QUEUE_PENDING} series")
    peak = round(max(v for _, v in points))
    last = window.last_arrival
    zero = next((t for t, v in points if t >= last and v <= 0), None)
    at_end = round(points[-1][1])
    if zero is None:
        return Backlog(
            peak,
            None,
            at_end,
            f"backlog_drain_s: the backlog was not back to 0 within {until - last:.0f} s of the last arrival "
            f"({at_end} at the end of the drain)",
        )
    return Backlog(peak, round(zero - last, 1), at_end)


def k6_cross_check(
    summary: Mapping[str, Any] | None,
    prom_p95_ms: float | None,
    prom_requests: int,
    prom_time_to_post_p95_ms: float | None = None,
) -> dict[str, Any]:
    """k6's own end-of-test numbers next to Prometheus's, so a reader can see they agree."""
    if not summary:
        return {"available": False}
    metrics = summary.get("metrics", {})
    ttp = metrics.get("time_to_post{phase:measured}", {}).get("values", {}).get("p(95)")
    flow = (
        {"k6_time_to_post_p95_ms": _round(ttp, 1), "prometheus_time_to_post_p95_ms": prom_time_to_post_p95_ms}
        if ttp is not None
        else {}
    )
    dur = metrics.get("http_req_duration{phase:measured}", {}).get("values", {})
    reqs = metrics.get("http_reqs{phase:measured}", {}).get("values", {})
    k6_p95 = dur.get("p(95)")
    k6_count = reqs.get("count")
    rel = None
    if k6_p95 and prom_p95_ms is not None:
        rel = abs(prom_p95_ms - k6_p95) / k6_p95
    return {
        "available": True,
        "k6_p95_ms": _round(k6_p95, 2),
        "prometheus_p95_ms": _round(prom_p95_ms, 2),
        "p95_relative_difference": _round(rel, 4),
        "k6_requests": k6_count,
        "prometheus_requests": prom_requests,
        "requests_match": k6_count == prom_requests,
        **flow,
        "note": "Prometheus p95 is interpolated within a native-histogram bucket (~9% wide); k6's is exact.",
    }


def measure(
    prometheus: str | Prometheus,
    *,
    test_id: str,
    profile_name: str,
    profile: ProfileConfig,
    thresholds: ThresholdsConfig,
    window: RunWindow,
    database_url: str | None = None,
    tasks_pending_after_drain: int | None = None,
    k6_summary: Mapping[str, Any] | None = None,
    grafana_url: str | None = None,
    machine: Mapping[str, Any] | None = None,
    settle_s: float = 0.0,
    scrape_interval_s: float = 5.0,
    configured_replicas: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Compute every headline number of one run (see the module docstring for definitions).

    ``settle_s``: how long after the run k6's last push and the last scrape may land; client
    totals are read at ``ended_at + settle_s`` (still "the end of the run": no later samples exist).
    ``scrape_interval_s``: the step at which the observed replicas are sampled; service counters are read
    one scrape after the drain (the caller waits that long).
    ``configured_replicas``: per scrape job, the count the stack asked for (shown next to the observed).
    """
    if window.measured_s < 1:
        raise MeasureError(f"measured window is {window.measured_s:.1f}s: the run is not longer than its warm-up")
    prom = Prometheus(prometheus) if isinstance(prometheus, str) else prometheus
    try:
        return _measure(
            prom,
            test_id=test_id,
            profile_name=profile_name,
            profile=profile,
            thresholds=thresholds,
            window=window,
            database_url=database_url,
            tasks_pending_after_drain=tasks_pending_after_drain,
            k6_summary=k6_summary,
            grafana_url=grafana_url,
            machine=machine,
            settle_s=settle_s,
            scrape_interval_s=scrape_interval_s,
            configured_replicas=configured_replicas,
        )
    finally:
        if isinstance(prometheus, str):
            prom.close()


def _measure(
    prom: Prometheus,
    *,
    test_id: str,
    profile_name: str,
    profile: ProfileConfig,
    thresholds: ThresholdsConfig,
    window: RunWindow,
    database_url: str | None,
    tasks_pending_after_drain: int | None,
    k6_summary: Mapping[str, Any] | None,
    grafana_url: str | None,
    machine: Mapping[str, Any] | None,
    settle_s: float,
    scrape_interval_s: float,
    configured_replicas: Mapping[str, int] | None,
) -> dict[str, Any]:
    end = window.ended_at + settle_s
    # ---- client side (k6), exact per run
    requests_all = int(prom.scalar(q.run_total(q.K6_HTTP_REQS, test_id), end) or 0)
    if requests_all == 0:
        raise MeasureError(f"no k6 requests for testid={test_id!r} in Prometheus at {prom.base_url}")
    requests = int(prom.scalar(q.run_total(q.K6_HTTP_REQS, test_id, phase=MEASURED), end) or 0)
    failed_q = q.run_total(q.K6_HTTP_REQS, test_id, {"expected_response": "false"}, phase=MEASURED)
    failed = int(prom.scalar(failed_q, end) or 0)
    dropped = int(prom.scalar(q.run_total(q.K6_DROPPED_ITERATIONS, test_id), end) or 0)
    p50, p95, p99 = (prom.scalar(q.run_latency_quantile_ms(x, test_id, MEASURED), end) for x in (0.5, 0.95, 0.99))
    measured_s = window.measured_s
    achieved_qps = requests / measured_s
    error_rate = failed / requests if requests else None
    plateau = _plateau(prom, test_id, profile, end)
    flow = _flow(prom, test_id, profile, end)
    # Peak of the achieved rate (15 s rate windows: >= 3 pushes even at the cluster's 5 s push interval).
    peak_start = min(window.measured_start + 15, end)
    peak_points = prom.series(q.achieved_qps("15s", test_id, labels=q.K6_TASK_POST), peak_start, end, 2)
    peak_qps = max((v for _, v in peak_points), default=None)

    # ---- server side over the measured window
    mw = q.window_range(measured_s)
    server_p95 = prom.scalar(q.server_p95_latency_ms(mw), window.ended_at)
    hit_ratio = prom.scalar(q.cache_hit_ratio(mw), window.ended_at)

    # ---- service counters over run + drain, exact (see counter_total): cost and tasks. They count up
    # to one scrape after the run and its drain ended: what a process counted in its last seconds
    # reaches Prometheus only with its next scrape (callers wait that long before measuring).
    cost_end = max(window.drain_end + scrape_interval_s + 1, end)
    starts = process_starts(prom, window.started_at, cost_end)

    def total(
        metric: str, labels: Mapping[str, str] | None = None, regex: Mapping[str, str] | None = None
    ) -> CounterTotal:
        return counter_total(
            prom, q.selector(metric, dict(labels or {}), regex=dict(regex or {})), window.started_at, cost_end, starts
        )

    task_route = {"route": q.TASK_ROUTE, "method": q.TASK_METHOD}
    totals = {
        "spend": total(q.LLM_COST),
        "delivered": total(q.TOKENS_DELIVERED),
        "billed": total(q.LLM_TOKENS),
        "ok_requests": total(q.HTTP_REQUESTS, task_route, {"status": "2.."}),
        "llm_calls": total(q.LLM_REQUESTS),
        **{event: total(q.TASKS, {"event": event}) for event in ("accepted", "completed", "failed", "dead_lettered")},
    }
    rejected = {reason: total(q.HTTP_REJECTED, {"reason": reason}) for reason in REJECT_REASONS}
    spend, llm_calls, llm_tokens = totals["spend"].value, totals["llm_calls"].value, totals["billed"].value
    cost_per_1k = _ratio(spend, totals["delivered"].value, 1000)  # per 1k delivered tokens (cache hits at $0)
    billed_per_1k = _ratio(spend, llm_tokens, 1000)
    cost_per_request = _ratio(spend, totals["ok_requests"].value)
    resets = starts.restarts.union(*(t.resets for t in (*totals.values(), *rejected.values())))
    completion_p95 = prom.scalar(q.completion_p95_ms(q.window_range(cost_end - window.measured_start)), cost_end)
    # A classic histogram cannot place a quantile beyond its last finite bucket: histogram_quantile then
    # returns that bound. Say so instead of presenting the bound as the measured value.
    notes: list[str] = []
    lower_bounds: list[str] = []
    if server_p95 is not None and server_p95 >= HTTP_BUCKETS[-1] * 1000:
        lower_bounds.append("server_p95_latency_ms")
        notes.append(f"server_p95_latency_ms is at least {HTTP_BUCKETS[-1] * 1000:g} (beyond the last bucket)")
    if completion_p95 is not None and completion_p95 >= SLOW_BUCKETS[-1] * 1000:
        lower_bounds.append("completion_p95_ms")
        notes.append(f"completion_p95_ms is at least {SLOW_BUCKETS[-1] * 1000:g} (beyond the last bucket)")
    failed_sel = q.k6_selector(q.K6_HTTP_REQS, test_id, {"expected_response": "false", "phase": MEASURED})
    errors_by_status = {
        labels.get("status", "?"): round(v)
        for labels, v in prom.vector(f"sum by (status) ({failed_sel})", end)
        if v > 0
    }

    if profile.flow:
        notes.append(
            "p95_latency_ms, error_rate and requests cover POST /task only; the flows' "
            f"{flow['polls']} measured polls of GET /task/{{id}} are in polls, poll_error_rate and poll_p95_latency_ms"
        )
    queue = backlog(prom, window, scrape_interval_s=scrape_interval_s)
    if queue.note:
        notes.append(queue.note)
    if resets:
        notes.append(
            f"{len(resets)} counter reset(s) during the run ({describe_resets(resets)}): restarted processes; "
            "their counts are included from 0 after each restart (only events between a process's last "
            "scrape and its exit are unseen)"
        )

    # ---- tasks: the exact counter totals, then Postgres
    def count(event: str) -> int:
        return round(totals[event].value or 0.0)

    accepted, completed, failed_tasks = count("accepted"), count("completed"), count("failed")
    dead_lettered = count("dead_lettered")
    rows: TaskRows | None = None
    if database_url:
        rows = count_task_rows(database_url, window.started_at - 5, cost_end + 5)
        completed = sum(rows.by_status.get(s, 0) for s in DONE_STATUSES)
        failed_tasks = sum(rows.by_status.get(s, 0) for s in FAILED_STATUSES)
        pending = pending_rows(rows)
        lost = max(0, accepted - rows.total)
        if rows.total > accepted:
            # More rows than counted acceptances: some acceptances were never scraped (a process ended
            # between scrapes), so tasks_lost may hide as many lost tasks. Say so instead of clamping silently.
            notes.append(
                f"{rows.total - accepted} more task rows than counted acceptances: acceptances a process made "
                "after its last scrape are not counted, so tasks_lost is a lower bound"
            )
            lower_bounds.append("tasks_lost")
    else:
        pending = tasks_pending_after_drain
        lost = None  # unknowable without the rows; never reported as 0
    if tasks_pending_after_drain is not None and rows is None:
        pending = tasks_pending_after_drain

    # ---- replicas that really ran (the HPA changes the API's count mid-run)
    run_window = q.window_range(max(end - window.started_at, 1))
    step = f"{max(1, round(scrape_interval_s))}s"
    replicas = {}
    for job in SERVICE_JOBS:
        observed = prom.scalar(q.observed_replicas(job, run_window, step), end)
        replicas[job] = {
            "configured": (configured_replicas or {}).get(job),
            "observed_max": None if observed is None else round(observed),
        }

    target_qps = peak_arrival_rate(profile)
    checks = {
        "p95_latency_ms": p95 is not None and p95 < thresholds.p95_ms,
        "error_rate": error_rate is not None and error_rate < thresholds.error_rate,
        **(
            {
                "plateau_p95_latency_ms": plateau["plateau_p95_latency_ms"] is not None
                and plateau["plateau_p95_latency_ms"] < thresholds.p95_ms,
                "plateau_error_rate": plateau["plateau_error_rate"] is not None
                and plateau["plateau_error_rate"] < thresholds.error_rate,
            }
            if plateau
            else {}
        ),
        **(
            {
                "time_to_post_p95_ms": flow["time_to_post_p95_ms"] is not None
                and flow["time_to_post_p95_ms"] < thresholds.time_to_post_p95_ms,
                "flow_failed_rate": flow["flow_failed_rate"] is not None
                and flow["flow_failed_rate"] < thresholds.error_rate,
            }
            if profile.flow
            else {}
        ),
        "dropped_iterations": dropped == 0,
        "llm_cost_per_1k_tokens_usd": cost_per_1k is not None and cost_per_1k < thresholds.cost_per_1k_tokens_usd,
        "tasks_lost": lost == 0,
    }
    return {
        "test_id": test_id,
        "profile": profile_name,
        "started_at": datetime.fromtimestamp(window.started_at, UTC).isoformat(timespec="seconds"),
        "duration_s": round(window.ended_at - window.started_at, 1),
        "warmup_s": window.warmup_s,
        "measured_window_s": round(measured_s, 1),
        "drain_s": round(window.drain_end - window.ended_at, 1),
        "p50_latency_ms": _round(p50, 2),
        "p95_latency_ms": _round(p95, 2),
        "p99_latency_ms": _round(p99, 2),
        "server_p95_latency_ms": _round(server_p95, 2),
        "requests": requests,
        "requests_failed": failed,
        "requests_including_warmup": requests_all,
        "achieved_qps": round(achieved_qps, 2),
        "peak_achieved_qps": _round(peak_qps, 1),
        "target_qps": target_qps,
        "error_rate": _round(error_rate, 6),
        "dropped_iterations": dropped,
        **plateau,
        "flow": profile.flow,
        **flow,
        "backlog_peak": queue.peak,
        "backlog_drain_s": queue.drain_s,
        "backlog_after_drain": queue.at_end,
        "cache_hit_ratio": _round(hit_ratio, 4),
        "llm_calls": None if llm_calls is None else round(llm_calls),
        "llm_tokens": None if llm_tokens is None else round(llm_tokens),
        "llm_cost_usd": _round(spend, 6),
        "llm_cost_per_1k_tokens_usd": _round(cost_per_1k, 6),
        "billed_cost_per_1k_tokens_usd": _round(billed_per_1k, 6),
        "cost_per_request_usd": _round(cost_per_request, 8),
        "completion_p95_ms": _round(completion_p95, 1),
        "tasks_accepted": accepted,
        "tasks_completed": completed,
        "tasks_failed": failed_tasks,
        "tasks_dead_lettered": dead_lettered,
        "tasks_lost": lost,
        "tasks_pending_after_drain": pending,
        "task_rows": None if rows is None else {"total": rows.total, **rows.by_status},
        "thresholds": {
            "p95_latency_ms": thresholds.p95_ms,
            "error_rate": thresholds.error_rate,
            **(
                {"plateau_p95_latency_ms": thresholds.p95_ms, "plateau_error_rate": thresholds.error_rate}
                if plateau
                else {}
            ),
            **(
                {"time_to_post_p95_ms": thresholds.time_to_post_p95_ms, "flow_failed_rate": thresholds.error_rate}
                if profile.flow
                else {}
            ),
            "dropped_iterations": 0,
            "llm_cost_per_1k_tokens_usd": thresholds.cost_per_1k_tokens_usd,
            "tasks_lost": 0,
        },
        "threshold_results": checks,
        # All five must hold; a number that could not be measured fails its check.
        "thresholds_passed": all(checks.values()),
        "k6_cross_check": k6_cross_check(k6_summary, p95, requests, flow["time_to_post_p95_ms"]),
        "errors_by_status": errors_by_status,  # k6 status "0" = no response (timeout, connection error)
        # Why the service refused requests (run + drain, every route): which limit a 503 came from.
        "rejected_by_reason": {r: round(t.value) for r, t in rejected.items() if t.value},
        "counter_resets": len(resets),  # restarts seen in the service counters' processes (see notes)
        "replicas": replicas,
        "notes": notes,
        "lower_bounds": lower_bounds,  # keys whose value is only a lower bound (see notes)
        "machine": dict(machine) if machine is not None else machine_info(),
        "grafana_url": grafana_url,
    }


# ---------------------------------------------------------------- time series for the report


def timeseries(
    prometheus_url: str, *, test_id: str, window: RunWindow, step_s: float | None = None, tail_s: float = 0.0
) -> dict[str, Any]:
    """Range series for the report's plots, from run start to end of drain (seconds since start).

    ``tail_s``: how far past the drain to plot, e.g. :func:`backlog_lag_s` so the backlog is seen reaching 0.
    """
    start, end = window.started_at, window.drain_end + tail_s
    span = max(end - start, 1.0)
    step = step_s or max(1.0, round(span / 150))
    rate_w = f"{max(15, int(4 * step))}s"
    post = q.K6_TASK_POST  # the request figures are POST /task's; a flow's polls are plotted apart
    queries = {
        "p50_latency_ms": q.latency_quantile_ms(0.5, rate_w, test_id, labels=post),
        "p95_latency_ms": q.latency_quantile_ms(0.95, rate_w, test_id, labels=post),
        "p99_latency_ms": q.latency_quantile_ms(0.99, rate_w, test_id, labels=post),
        "server_p95_latency_ms": q.server_p95_latency_ms(rate_w),
        "achieved_qps": q.achieved_qps(rate_w, test_id, labels=post),
        "error_rate": q.error_rate(rate_w, test_id, labels=post),
        "dropped_per_s": q.dropped_iterations_per_s(rate_w, test_id),
        "cache_hit_ratio": q.cache_hit_ratio(rate_w),
        "llm_spend_usd_cumulative": f"sum({q.LLM_COST})",
        "queue_depth": q.queue_depth(),
        "backlog": q.backlog(),
        "time_to_post_p50_ms": q.time_to_post_quantile_ms(0.5, rate_w, test_id),
        "time_to_post_p95_ms": q.time_to_post_quantile_ms(0.95, rate_w, test_id),
        "llm_inflight": q.llm_inflight(),
        "llm_concurrency_limit": q.llm_concurrency_limit(),
        **{f"rejected_{reason}_per_s": q.rejected_for_per_s(reason, rate_w) for reason in REFUSAL_REASONS},
    }
    prom = Prometheus(prometheus_url)
    out: dict[str, Any] = {
        "start": start,
        "step_s": step,
        "warmup_s": window.warmup_s,
        "end_s": window.ended_at - start,
        "last_arrival_s": window.last_arrival - start,
    }
    try:
        for name, expr in queries.items():
            try:
                pts = prom.series(expr, start, end, step)
            except MeasureError:
                pts = []
            out[name] = [(round(t - start, 1), v) for t, v in pts]
    finally:
        prom.close()
    spend = out["llm_spend_usd_cumulative"]
    if spend:  # cumulative since process start: show the run's own spend
        base = spend[0][1]
        out["llm_spend_usd_cumulative"] = [(t, v - base) for t, v in spend]
    return out
