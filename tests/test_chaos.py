"""The chaos campaign: its arithmetic on hand-made records, the guard's body deadline, and the short
form of every scenario against a real stack (what ``make chaos`` runs, with short windows and low rates).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import tempfile
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from loadtest import chaos
from loadtest.chaos_load import (
    LoadResult,
    Record,
    Tolerance,
    inflight_at,
    parse_records,
    percentile,
    recovery_s,
    window,
)
from service.config import Settings
from tests.conftest import run_async


def rec(t: float, ms: float = 10.0, status: int = 202, kind: str = "new", task_id: str | None = "x") -> Record:
    return Record(t=t, ms=ms, status=status, kind=kind, task_id=task_id, retry_after=None)


def test_parse_records_reads_k6_lines_and_skips_noise() -> None:
    lines = [
        "R 1000500 12.5 202 new 6b1c2f1e-0000-4000-8000-000000000001 -",
        "some k6 log line",
        "R 1000000 3.0 503 hot - 1",
        "R 1000700 0 0 get 6b1c2f1e-0000-4000-8000-000000000001 -",
        "R broken",
    ]
    records = parse_records(lines)
    assert [r.status for r in records] == [503, 202, 0]  # sorted by start
    assert records[0].retry_after == "1" and records[0].task_id is None and records[0].t == 1000.0
    assert records[1].served and records[2].error


def test_percentile_is_nearest_rank_of_exact_samples() -> None:
    assert percentile([], 95) is None
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile([5.0], 95) == 5.0


def test_window_counts_errors_by_status_and_served_rate() -> None:
    records = [rec(0.1), rec(0.2, status=200), rec(0.5, status=503), rec(0.9, status=0), rec(1.5)]
    w = window(records, 0.0, 1.0)
    assert (w.requests, w.served, w.errors_by_status) == (4, 2, {"0": 1, "503": 1})
    assert w.error_rate == 0.5 and w.served_per_s == 2.0


def test_recovery_is_the_first_run_of_buckets_back_at_the_baseline() -> None:
    baseline = window([rec(t / 10, ms=10) for t in range(100)], 0, 10)
    cleared = 10.0
    after = [rec(cleared + t / 10, ms=500 if t < 35 else 10) for t in range(100)]  # slow for 3.5 s
    tol = Tolerance(hold=3)
    assert recovery_s(after, baseline, cleared, cleared + 10, tol) == 4.0
    never = [rec(cleared + t / 10, ms=500) for t in range(100)]
    assert recovery_s(never, baseline, cleared, cleared + 10, tol) is None
    errors = [rec(cleared + t / 10, status=503 if t < 20 else 202) for t in range(100)]
    assert recovery_s(errors, baseline, cleared, cleared + 10, tol) == 2.0


def test_inflight_at_counts_requests_spanning_the_instant() -> None:
    records = [rec(0.0, ms=500), rec(0.4, ms=50), rec(0.6, ms=10)]
    assert inflight_at(records, 0.45) == 1 and inflight_at(records, 0.41) == 2


def test_markdown_names_the_commit_and_gives_a_verdict_per_row() -> None:
    doc: dict[str, Any] = {
        "passed": False,
        "profile": "short",
        "started_at": "2026-01-01T00:00:00+00:00",
        "commit": "abc123",
        "machine": {"cores": 2, "cpu_model": "cpu", "memory_gib": 1.0, "os": "Linux"},
        "steady_rate": 30,
        "mix": {
            "new_share": 0.2,
            "poll_share": 0.05,
            "personas": 5,
            "topics": 5,
            "zipf_s": 1.1,
            "poll_interval_s": 0.5,
        },
        "service_env": {"LOADPROOF_PROCESSES": "2"},
        "recovery_rule": Tolerance().describe(),
        "scenarios": [],
    }
    detail = {
        "title": "t",
        "offered": 10,
        "served": 9,
        "p95_before_ms": 1.0,
        "fault_s": 1.0,
        "statuses_during": {"202": 3, "0": 1},
        "error_rate_during": 0.25,
        "tasks_completed": 3,
        "checks": [{"name": "0 tasks lost", "ok": False, "detail": "1 accepted task(s) without a row"}],
        "failed_reasons": {},
        "notes": {},
    }
    doc["scenarios"].append(
        {
            "name": "redis_outage",
            "passed": False,
            "requests": 10,
            "error_rate": 0.1,
            "errors_by_status": {"0": 1},
            "p95_during_ms": 2.0,
            "p95_after_ms": 1.0,
            "tasks_accepted": 4,
            "tasks_lost": 1,
            "tasks_failed": 0,
            "tasks_pending": 0,
            "recovery_s": None,
            "details": detail,
        }
    )
    text = chaos.chaos_markdown(doc)
    assert "`abc123`" in text and "at least one scenario FAILED" in text
    assert "| `redis_outage` | FAIL | 10 (10 / 9) | 10.00 % | no response: 1 |" in text
    assert "not recovered" in text and "✗ **0 tasks lost**" in text


def test_guard_answers_408_to_a_body_that_never_ends() -> None:
    from service.guard import Guard

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never reached
        raise AssertionError("the app got a request whose body never arrived")

    async def fast_task(task: Any) -> Any:
        raise AssertionError("unreachable")

    guard = Guard(app, Settings(body_timeout_s=0.3, metrics_enabled=False), [], fast_task)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not sent and not getattr(receive, "first", False):
            receive.first = True  # type: ignore[attr-defined]
            return {"type": "http.request", "body": b'{"persona', "more_body": True}
        await asyncio.sleep(3600)  # a chunked body without end
        return {}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "path": "/task", "method": "POST", "headers": [(b"transfer-encoding", b"chunked")]}
    t0 = time.monotonic()
    run_async(guard(scope, receive, send))
    assert time.monotonic() - t0 < 2
    assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
    assert guard.inflight == 0, "the admission slot was not given back"


@pytest.mark.timeout(600)
def test_short_campaign_every_scenario_holds_its_invariants(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # Postgres runs as `postgres` and must traverse pytest's 0700 directories
        for d in (tmp_path, *tmp_path.parents):
            if d == Path(tempfile.gettempdir()):
                break
            d.chmod(d.stat().st_mode | 0o011)
    started = time.monotonic()
    doc = chaos.run_campaign(chaos.SHORT, tmp_path)
    print(f"short campaign: {time.monotonic() - started:.0f} s")
    names = [s["name"] for s in doc["scenarios"]]
    assert names == list(chaos.Campaign.SCENARIOS)
    failed = {
        s["name"]: [c for c in s["details"]["checks"] if not c["ok"]] for s in doc["scenarios"] if not s["passed"]
    }
    assert doc["passed"], json.dumps(failed, indent=2)
    for s in doc["scenarios"]:
        assert s["tasks_lost"] == 0 and s["tasks_pending"] == 0, s["name"]
        assert s["tasks_accepted"] > 0 and s["requests"] > 0, s["name"]
    by_name = {s["name"]: s for s in doc["scenarios"]}
    for name in ("redis_outage", "postgres_restart"):
        assert by_name[name]["recovery_s"] is not None, name
    assert not any(k.startswith("5") for k in by_name["abuse"]["errors_by_status"])
    assert (tmp_path / "chaos.json").exists() and "| `abuse` | PASS |" in (tmp_path / "CHAOS.md").read_text()


def test_a_deeply_nested_invalid_body_is_a_422_not_a_500() -> None:
    """Found by the abuse scenario: 500 levels of ``{"persona_id": ...}`` validate as a dict, and echoing
    that input in the 422 recursed past Python's limit (a 500 and a 3000-line traceback per request)."""
    from fastapi.exceptions import RequestValidationError

    from service.api import _invalid_request

    deep: Any = 1
    for _ in range(2000):
        deep = {"persona_id": deep}
    exc = RequestValidationError([{"type": "string_type", "loc": ("body", "persona_id"), "msg": "m", "input": deep}])
    response = run_async(_invalid_request(None, exc))  # type: ignore[arg-type]
    assert response.status_code == 422
    assert json.loads(bytes(response.body))["detail"][0]["loc"] == ["body", "persona_id"]


def test_the_sustainable_rate_search_ramps_and_judges_only_the_held_rate(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each trial ramps from a tenth of its rate before the judged window, as make bench's steps do; a
    slow request during the ramp does not fail the trial, one in the held window does."""
    made: list[tuple[list[chaos.Stage], float | None]] = []

    class FakeLoad:
        def __init__(self, url: str, stages: list[chaos.Stage], *_: Any, start_rate: float | None = None) -> None:
            made.append((stages, start_rate))
            self.rate = stages[-1].target

        def wait(self, timeout_s: float) -> LoadResult:
            t0 = 1000.0
            slow_at = 2.0 if self.rate <= 300 else 7.0  # in the ramp up to 300/s, then in the held window
            recs = [Record(t0 + i / 10, 9000.0 if slow_at <= i / 10 < slow_at + 1 else 5.0, 202, "new", None, None)
                    for i in range(130)]  # fmt: skip
            return LoadResult(recs, len(recs), 0, 0, t0, t0 + 13)

        def stop(self) -> None:
            pass

    monkeypatch.setattr(chaos, "LoadRun", FakeLoad)
    monkeypatch.setattr(chaos.time, "sleep", lambda _s: None)
    camp = chaos.Campaign.__new__(chaos.Campaign)
    # the full profile's windows and ramp, from a steady rate of 150/s (whatever make chaos's is)
    camp.p, camp.run_dir, camp.console = dataclasses.replace(chaos.FULL, rate=150), tmp_path, None
    monkeypatch.setattr(chaos.Campaign, "url", "http://x")
    monkeypatch.setattr(chaos.Campaign, "ready", lambda self, timeout_s=60: True)
    best, _ = camp.find_sustainable()
    assert best == 300  # 150 and 300 pass (their slow second is in the ramp), 600 and 450 fail
    assert [(s.duration_s, s.target) for s in made[0][0]] == [(5, 150), (8, 150)] and made[0][1] == 15
