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
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from common import queries as q
from common.k6config import duration_seconds, peak_arrival_rate, plateau_window
from common.stackconfig import ProfileConfig, ThresholdsConfig
from service.metrics import HTTP_BUCKETS, SLOW_BUCKETS

# Every outputs.json key a consumer may rely on (tests check all of them).

MEASURED = q.MEASURED_PHASE  # k6 tags requests after the warm-up phase="measured" (loadtest/k6/task.js)
# Prometheus's default lookback: an instant selector sees a sample at most this old. Counter totals
# look this far before the window for each series' last value before it.
LOOKBACK_S = 300
# The scrape jobs (component names, locally and in the cluster) whose processes the report counts.
SERVICE_JOBS = ("orchestrator", "workers")
# Labels of one scraped process: a container restart keeps them (same pod, same address); a new pod does not.
TARGET_LABELS = ("job", "instance", "pod")
PROCESS_START = "process_start_time_seconds"  # absent in prometheus-client's multiprocess mode


class MeasureError(RuntimeError):
    """Prometheus could not be queried, or the run left no k6 data to measure."""


# ---------------------------------------------------------------- Prometheus access


class Prometheus:
    """Minimal Prometheus HTTP API client (instant and range queries)."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0, client: httpx.Client | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._client = client or httpx.Client(timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        try:
            resp = self._client.get(f"{self.base_url}/api/v1/{path}", params=params)
        except httpx.HTTPError as exc:
            raise MeasureError(f"Prometheus at {self.base_url} unreachable: {exc}") from exc
        try:
            body = resp.json()
        except ValueError as exc:
            raise MeasureError(f"Prometheus answered {resp.status_code} with non-JSON: {resp.text[:200]}") from exc
        if body.get("status") != "success":
            raise MeasureError(f"query failed ({body.get('errorType')}): {body.get('error')} -- {params.get('query')}")
        return body["data"]

    def vector(self, query: str, at: float) -> list[tuple[dict[str, str], float]]:
        """Instant query at time ``at`` (epoch seconds): ``[(labels, value)]``."""
        data = self._get("query", {"query": query, "time": f"{at:.3f}"})
        if data["resultType"] == "scalar":
            return [({}, float(data["result"][1]))]
        return [(r["metric"], float(r["value"][1])) for r in data["result"]]

    def scalar(self, query: str, at: float) -> float | None:
        """Single-valued instant query; ``None`` for no data or NaN (e.g. 0/0)."""
        result = self.vector(query, at)
        if not result:
            return None
        value = result[0][1]
        return None if math.isnan(value) or math.isinf(value) else value

    def samples(
        self, selector: str, since: float, until: float
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """Every raw sample of every series matching ``selector`` in ``[since, until]``: ``[(labels, [(t, v)])]``.

        A range selector returns the samples as scraped (no staleness markers, nothing extrapolated),
        including those of series that ended before ``until``.
        """
        span_ms = max(1, math.ceil((until - since) * 1000))
        data = self._get("query", {"query": f"{selector}[{span_ms}ms]", "time": f"{until:.3f}"})
        if data["resultType"] != "matrix":
            raise MeasureError(f"expected raw samples for {selector}, got {data['resultType']}")
        return [(r["metric"], [(float(t), float(v)) for t, v in r["values"]]) for r in data["result"]]

    def series(self, query: str, start: float, end: float, step: float) -> list[tuple[float, float]]:
        """Range query summed to one series: ``[(t, value)]`` (NaN points dropped)."""
        data = self._get(
            "query_range", {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        )
        if not data["result"]:
            return []
        points = data["result"][0]["values"]
        return [(float(t), float(v)) for t, v in points if not math.isnan(float(v)) and not math.isinf(float(v))]


# ---------------------------------------------------------------- exact counter totals
# (selectors from common.queries; the arithmetic over raw samples is here)

Target = tuple[str, ...]
Reset = tuple[Target, float]  # (scraped process, time of the first sample after the reset)


def _target(labels: Mapping[str, str]) -> Target:
    return tuple(labels.get(k, "") for k in TARGET_LABELS)


@dataclass(frozen=True)
class CounterTotal:
    """What a counter counted in a window, summed over its series; ``value`` None = no series at all."""

    value: float | None
    resets: frozenset[Reset] = frozenset()


@dataclass(frozen=True)
class ProcessStarts:
    """``process_start_time_seconds`` of the service's targets: per target, its value at each scrape."""

    by_target: dict[Target, dict[float, float]]
    restarts: frozenset[Reset]

    def restarted(self, target: Target, before: float, after: float) -> bool:
        """Whether the target's process changed between two scrapes (both must have been seen)."""
        starts = self.by_target.get(target, {})
        return before in starts and after in starts and starts[before] != starts[after]


def process_starts(prom: Prometheus, start: float, end: float, jobs: tuple[str, ...] = SERVICE_JOBS) -> ProcessStarts:
    """Start times of the jobs' processes, and every change of one within ``(start, end]`` (a restart)."""
    by_target: dict[Target, dict[float, float]] = {}
    restarts: set[Reset] = set()
    selector = q.selector(PROCESS_START, regex={"job": "|".join(jobs)})
    for labels, points in prom.samples(selector, start - LOOKBACK_S, end):
        key = _target(labels)
        by_target.setdefault(key, {}).update(points)
        for (_, before), (t, after) in itertools.pairwise(points):
            if t > start and after != before:
                restarts.add((key, t))
    return ProcessStarts(by_target, frozenset(restarts))


def counter_total(prom: Prometheus, selector: str, start: float, end: float, starts: ProcessStarts) -> CounterTotal:
    """Exactly what ``selector``'s series counted in ``(start, end]``, restarts and ended series included.

    Per series: the baseline is its last sample at or before ``start`` (none: it began in the window,
    from 0); each later sample adds its increase, or its whole value after a restart (a step down, or
    a new process start time for the same target).
    """
    series = prom.samples(selector, start - LOOKBACK_S, end)
    if not series:
        return CounterTotal(None)
    total, resets = 0.0, set()
    for labels, points in series:
        key = _target(labels)
        before = [p for p in points if p[0] <= start]
        prev = before[-1] if before else None
        for t, v in (p for p in points if p[0] > start):
            if prev is None:
                total += v
            elif v < prev[1] or starts.restarted(key, prev[0], t):
                total += v
                resets.add((key, t))
            else:
                total += v - prev[1]
            prev = (t, v)
    return CounterTotal(total, frozenset(resets))


def _ratio(part: float | None, whole: float | None, scale: float = 1.0) -> float | None:
    return None if part is None or not whole else part / whole * scale


def _describe(resets: frozenset[Reset]) -> str:
    per_target: dict[str, int] = {}
    for (job, instance, pod), _ in resets:
        name = f"{job} {pod or instance}".strip()
        per_target[name] = per_target.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(per_target.items()))


# ---------------------------------------------------------------- inputs


@dataclass(frozen=True)
class RunWindow:
    """When the run happened (epoch seconds) and how much of it is warm-up."""

    started_at: float
    ended_at: float
    warmup_s: float
    drained_at: float | None = None  # end of the post-run drain (defaults to ended_at)

    @property
    def measured_start(self) -> float:
        return self.started_at + self.warmup_s

    @property
    def measured_s(self) -> float:
        return self.ended_at - self.measured_start

    @property
    def drain_end(self) -> float:
        return self.drained_at if self.drained_at is not None else self.ended_at


@dataclass(frozen=True)
class TaskRows:
    """Task rows counted in Postgres for the run, by status."""

    total: int
    by_status: dict[str, int] = field(default_factory=dict)


# The task table's status words (service/db.py: queued|running|done|failed).
DONE_STATUSES = ("done",)
FAILED_STATUSES = ("failed",)


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


# ---------------------------------------------------------------- database reconciliation


def _psycopg_url(database_url: str) -> str:
    """SQLAlchemy URL (``postgresql+psycopg://``) -> libpq URL."""
    scheme, sep, rest = database_url.partition("://")
    return f"{scheme.split('+', 1)[0]}{sep}{rest}"


def count_task_rows(database_url: str, since: float, until: float, *, table: str = "tasks") -> TaskRows:
    """Task rows accepted in ``[since, until]``, by status (psycopg 3, read-only).

    Rows stored straight from the cache (``cached``: keyed requests answered 200) were never
    accepted as work, so they are not counted against ``tasks_accepted``.
    """
    import psycopg  # local: the report Job may run without a database
    from psycopg import sql as psql

    query = psql.SQL(
        "SELECT status::text, count(*) FROM {} "
        "WHERE accepted_at >= to_timestamp(%s) AND accepted_at <= to_timestamp(%s) AND NOT cached GROUP BY 1"
    ).format(psql.Identifier(table))
    with psycopg.connect(_psycopg_url(database_url), connect_timeout=10) as conn, conn.cursor() as cur:
        cur.execute(query, (since, until))
        by_status = {str(status): int(n) for status, n in cur.fetchall()}
    return TaskRows(total=sum(by_status.values()), by_status=by_status)


def pending_rows(rows: TaskRows) -> int:
    return sum(n for s, n in rows.by_status.items() if s not in DONE_STATUSES + FAILED_STATUSES)


def wait_for_drain(
    database_url: str,
    since: float,
    timeout_s: float,
    *,
    poll_s: float = 1.0,
    on_poll: Callable[[int], None] | None = None,
) -> tuple[float, int]:
    """Wait (bounded) until no task row created since ``since`` is still queued/running.

    Returns ``(drained_at, still_pending)``; a timeout is not an error, the pending count is reported.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        pending = pending_rows(count_task_rows(database_url, since, time.time() + 60))
        if on_poll is not None:
            on_poll(pending)
        if pending == 0 or time.monotonic() >= deadline:
            return time.time(), pending
        time.sleep(poll_s)


# ---------------------------------------------------------------- the measurement


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


def k6_cross_check(summary: Mapping[str, Any] | None, prom_p95_ms: float | None, prom_requests: int) -> dict[str, Any]:
    """k6's own end-of-test numbers next to Prometheus's, so a reader can see they agree."""
    if not summary:
        return {"available": False}
    metrics = summary.get("metrics", {})
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
    ``scrape_interval_s``: the step at which the observed replicas are sampled.
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
    # Peak of the achieved rate (15 s rate windows: >= 3 pushes even at the cluster's 5 s push interval).
    peak_start = min(window.measured_start + 15, end)
    peak_points = prom.series(q.achieved_qps("15s", test_id), peak_start, end, 2)
    peak_qps = max((v for _, v in peak_points), default=None)

    # ---- server side over the measured window
    mw = q.window_range(measured_s)
    server_p95 = prom.scalar(q.server_p95_latency_ms(mw), window.ended_at)
    hit_ratio = prom.scalar(q.cache_hit_ratio(mw), window.ended_at)

    # ---- service counters over run + drain, exact (see counter_total): cost and tasks
    cost_end = max(window.drain_end, end)
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
    spend, llm_calls, llm_tokens = totals["spend"].value, totals["llm_calls"].value, totals["billed"].value
    cost_per_1k = _ratio(spend, totals["delivered"].value, 1000)  # per 1k delivered tokens (cache hits at $0)
    billed_per_1k = _ratio(spend, llm_tokens, 1000)
    cost_per_request = _ratio(spend, totals["ok_requests"].value)
    resets = starts.restarts.union(*(t.resets for t in totals.values()))
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

    if resets:
        notes.append(
            f"{len(resets)} counter reset(s) during the run ({_describe(resets)}): restarted processes; "
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
            "dropped_iterations": 0,
            "llm_cost_per_1k_tokens_usd": thresholds.cost_per_1k_tokens_usd,
            "tasks_lost": 0,
        },
        "threshold_results": checks,
        # All five must hold; a number that could not be measured fails its check.
        "thresholds_passed": all(checks.values()),
        "k6_cross_check": k6_cross_check(k6_summary, p95, requests),
        "errors_by_status": errors_by_status,  # k6 status "0" = no response (timeout, connection error)
        "counter_resets": len(resets),  # restarts seen in the service counters' processes (see notes)
        "replicas": replicas,
        "notes": notes,
        "lower_bounds": lower_bounds,  # keys whose value is only a lower bound (see notes)
        "machine": dict(machine) if machine is not None else machine_info(),
        "grafana_url": grafana_url,
    }


# ---------------------------------------------------------------- time series for the report


def timeseries(prometheus_url: str, *, test_id: str, window: RunWindow, step_s: float | None = None) -> dict[str, Any]:
    """Range series for the report's plots, from run start to end of drain (seconds since start)."""
    start, end = window.started_at, window.drain_end
    span = max(end - start, 1.0)
    step = step_s or max(1.0, round(span / 150))
    rate_w = f"{max(15, int(4 * step))}s"
    queries = {
        "p50_latency_ms": q.latency_quantile_ms(0.5, rate_w, test_id),
        "p95_latency_ms": q.p95_latency_ms(rate_w, test_id),
        "p99_latency_ms": q.latency_quantile_ms(0.99, rate_w, test_id),
        "server_p95_latency_ms": q.server_p95_latency_ms(rate_w),
        "achieved_qps": q.achieved_qps(rate_w, test_id),
        "error_rate": q.error_rate(rate_w, test_id),
        "dropped_per_s": q.dropped_iterations_per_s(rate_w, test_id),
        "cache_hit_ratio": q.cache_hit_ratio(rate_w),
        "llm_spend_usd_cumulative": f"sum({q.LLM_COST})",
        "queue_depth": q.queue_depth(),
    }
    prom = Prometheus(prometheus_url)
    out: dict[str, Any] = {
        "start": start,
        "step_s": step,
        "warmup_s": window.warmup_s,
        "end_s": window.ended_at - start,
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
