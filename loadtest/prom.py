"""Prometheus, read exactly: a minimal HTTP API client, and counter totals that survive restarts.

A counter's total over a window is summed per series from its raw samples: a drop (or a new
``process_start_time_seconds`` for the same target) is a restart whose new value counts from 0, and
a series that appears during the window counts from 0 — where two instants subtracted would
undercount, and ``increase()`` would extrapolate.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from common import queries as q

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


def describe_resets(resets: frozenset[Reset]) -> str:
    per_target: dict[str, int] = {}
    for (job, instance, pod), _ in resets:
        name = f"{job} {pod or instance}".strip()
        per_target[name] = per_target.get(name, 0) + 1
    return ", ".join(f"{name} x{n}" for name, n in sorted(per_target.items()))


# ---------------------------------------------------------------- inputs
