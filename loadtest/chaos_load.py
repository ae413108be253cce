"""The chaos campaign's load and its arithmetic: one k6 run per scenario, its per-request records, and
the figures computed from them (windows, percentiles, recovery time) — never from averaged percentiles.

k6 (``loadtest/k6/chaos.js``) writes one line per request to a file; every figure here is computed
from those lines, so error rates per window and the recovery time come from the same samples.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.tools import tool
from localstack.reaper import reaper

SCRIPT = Path(__file__).resolve().parent / "k6" / "chaos.js"
SERVED = frozenset({200, 202})
POST_KINDS = frozenset({"hot", "new", "poll"})


@dataclass(frozen=True)
class Mix:
    """What the steady load asks for: hot keys (cache hits, coalescing), new topics (new tasks) and
    clients that poll their task until it is done."""

    new_share: float = 0.2
    poll_share: float = 0.05
    personas: int = 50
    topics: int = 20
    zipf_s: float = 1.1
    seed: int = 11
    poll_interval_s: float = 0.5
    poll_max_s: float = 20.0

    def doc(self) -> dict[str, Any]:
        return {
            "newShare": self.new_share,
            "pollShare": self.poll_share,
            "personas": self.personas,
            "topics": self.topics,
            "zipfS": self.zipf_s,
            "seed": self.seed,
            "pollIntervalS": self.poll_interval_s,
            "pollMaxS": self.poll_max_s,
        }


@dataclass(frozen=True)
class Stage:
    duration_s: float
    target: float


@dataclass(frozen=True)
class Record:
    """One request as the client saw it: start (epoch s), duration (ms), status (0 = no response)."""

    t: float
    ms: float
    status: int
    kind: str
    task_id: str | None
    retry_after: str | None

    @property
    def end(self) -> float:
        return self.t + self.ms / 1000.0

    @property
    def served(self) -> bool:
        return self.status in SERVED

    @property
    def error(self) -> bool:
        return self.status not in SERVED


def parse_records(lines: Iterable[str]) -> list[Record]:
    """``R <start ms> <duration ms> <status> <kind> <task id|-> <retry-after|->`` lines; others are skipped."""
    out: list[Record] = []
    for line in lines:
        parts = line.split()
        if len(parts) < 7 or parts[0] != "R":
            continue
        try:
            out.append(
                Record(
                    t=int(parts[1]) / 1000.0,
                    ms=float(parts[2]),
                    status=int(parts[3]),
                    kind=parts[4],
                    task_id=None if parts[5] == "-" else parts[5],
                    retry_after=None if parts[6] == "-" else parts[6],
                )
            )
        except ValueError:
            continue
    out.sort(key=lambda r: r.t)
    return out


@dataclass
class LoadResult:
    records: list[Record]
    iterations: int
    dropped: int
    returncode: int
    started_at: float
    ended_at: float

    def accepted_ids(self) -> set[str]:
        """Every task id a client was given with a 202 (new or joined): the ground truth for "lost"."""
        return {r.task_id for r in self.records if r.status == 202 and r.kind in POST_KINDS and r.task_id}


class LoadRun:
    """One k6 process running ``chaos.js`` in the background (its own process group, reaped with us)."""

    def __init__(
        self,
        base_url: str,
        stages: Sequence[Stage],
        mix: Mix,
        run_dir: Path,
        name: str,
        *,
        start_rate: float | None = None,
        request_timeout_s: float = 10.0,
        max_vus: int | None = None,
    ) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.records_path = run_dir / f"{name}-requests.txt"
        self.summary_path = run_dir / f"{name}-k6.json"
        self.log_path = run_dir / f"{name}-k6.log"
        peak = max([s.target for s in stages] + [start_rate or 0.0])
        first = stages[0].target if start_rate is None else start_rate
        config = {
            "baseUrl": base_url,
            "startRate": first,
            "stages": [{"durationS": s.duration_s, "target": s.target} for s in stages],
            "mix": mix.doc(),
            "runTag": f"{name}-{time.time_ns()}",
            "requestTimeoutS": request_timeout_s,
            # VUs made mid-run come too late for their iteration (k6 drops it): enough up front that a
            # dropped iteration means the service was slow, not that k6 was still making VUs
            "preAllocatedVus": max(20, math.ceil(peak * 0.5)),
            "maxVus": max_vus or max(100, math.ceil(peak * 1.5)),
            "summaryPath": str(self.summary_path),
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("K6_", "LOADPROOF_"))}
        env.update({"LOADPROOF_CHAOS_CONFIG": json.dumps(config), "K6_NO_USAGE_REPORT": "true"})
        argv = [
            tool("k6"),
            "run",
            "--quiet",
            "--no-color",
            "--log-format",
            "raw",
            f"--console-output={self.records_path}",
            str(SCRIPT),
        ]
        self.records_path.unlink(missing_ok=True)
        self.started_at = time.time()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                argv, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, process_group=0
            )
        reaper().watch(self.proc.pid)

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout_s: float | None = None) -> LoadResult:
        """Until k6 ends (or ``timeout_s``: then it is stopped with SIGINT, as a user would)."""
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
        finally:
            reaper().unwatch(self.proc.pid)
        ended = time.time()
        try:
            records = parse_records(self.records_path.read_text(errors="replace").splitlines())
        except OSError:
            records = []
        summary: dict[str, Any] = {}
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads(self.summary_path.read_text())
        return LoadResult(
            records=records,
            iterations=int(summary.get("iterations", 0)),
            dropped=int(summary.get("dropped_iterations", 0)),
            returncode=self.proc.returncode if self.proc.returncode is not None else -1,
            started_at=self.started_at,
            ended_at=ended,
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# --------------------------------------------------------------------------- figures from records


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]) of the exact samples; None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Window:
    """Requests *started* in ``[start, end)``."""

    start: float
    end: float
    requests: int = 0
    served: int = 0
    errors_by_status: dict[str, int] = field(default_factory=dict)
    p95_ms: float | None = None
    p95_served_ms: float | None = None

    @property
    def errors(self) -> int:
        return sum(self.errors_by_status.values())

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def duration_s(self) -> float:
        return max(0.0, self.end - self.start)

    @property
    def served_per_s(self) -> float:
        return self.served / self.duration_s if self.duration_s > 0 else 0.0


def window(records: Sequence[Record], start: float, end: float) -> Window:
    inside = [r for r in records if start <= r.t < end]
    errors = Counter(str(r.status) for r in inside if r.error)
    return Window(
        start=start,
        end=end,
        requests=len(inside),
        served=sum(1 for r in inside if r.served),
        errors_by_status=dict(sorted(errors.items())),
        p95_ms=percentile([r.ms for r in inside], 95),
        p95_served_ms=percentile([r.ms for r in inside if r.served], 95),
    )


@dataclass(frozen=True)
class Tolerance:
    """What "back to the pre-fault level" means: error rate within ``error_pp`` of the baseline and p95
    within ``p95_factor`` times the baseline or ``p95_slack_ms`` above it (whichever is larger), for
    ``hold`` consecutive ``bucket_s`` buckets."""

    error_pp: float = 0.01
    p95_factor: float = 2.0
    p95_slack_ms: float = 100.0
    bucket_s: float = 1.0
    hold: int = 3

    def p95_limit(self, baseline_p95_ms: float) -> float:
        return max(baseline_p95_ms * self.p95_factor, baseline_p95_ms + self.p95_slack_ms)

    def describe(self) -> str:
        return (
            f"the first {self.bucket_s:g} s bucket after the fault is cleared that starts {self.hold} consecutive "
            f"buckets with error rate <= baseline + {self.error_pp * 100:g} pp and p95 <= "
            f"max({self.p95_factor:g} x baseline, baseline + {self.p95_slack_ms:g} ms)"
        )


def recovery_s(
    records: Sequence[Record], baseline: Window, cleared_at: float, end: float, tol: Tolerance | None = None
) -> float | None:
    """Seconds from ``cleared_at`` to the start of the first bucket of ``tol.hold`` consecutive buckets
    at the baseline level; None if the load ended first (never recovered within the window)."""
    tol = tol or Tolerance()
    if baseline.p95_ms is None:
        return None
    p95_limit = tol.p95_limit(baseline.p95_ms)
    err_limit = baseline.error_rate + tol.error_pp
    n = int((end - cleared_at) // tol.bucket_s)
    ok: list[bool] = []
    for i in range(n):
        b = window(records, cleared_at + i * tol.bucket_s, cleared_at + (i + 1) * tol.bucket_s)
        ok.append(b.requests > 0 and b.error_rate <= err_limit and (b.p95_ms or 0.0) <= p95_limit)
    for i in range(len(ok) - tol.hold + 1):
        if all(ok[i : i + tol.hold]):
            return round(i * tol.bucket_s, 3)
    return None


def inflight_at(records: Sequence[Record], at: float) -> int:
    """Requests in flight at ``at`` (started before, ended after) as the client saw them."""
    return sum(1 for r in records if r.t <= at < r.end)
