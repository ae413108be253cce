"""``make profile``: CPU per request by library from py-spy samples, and its section in PERFORMANCE.md."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from common.stackconfig import load
from loadtest import performance
from loadtest.profile import OTHER, category, profile_path, summarize

RAW = [
    "process 1;main (service/orchestrator.py:95);run (uvicorn/server.py:86);data_received "
    "(uvicorn/protocols/http/httptools_impl.py:174) 30",
    "process 1;main (service/orchestrator.py:95);lookup (service/cache.py:152);execute_command "
    "(redis/asyncio/client.py:924) 50",
    "process 1;main (service/orchestrator.py:95);fast_task (service/api.py:174) 15",
    "process 1;main (service/orchestrator.py:95);inc (prometheus_client/values.py:28) 5",
    "garbage line without a count",
]


def test_frames_are_attributed_to_their_library() -> None:
    assert category("execute_command (redis/asyncio/client.py:924)") == "Redis client (redis-py)"
    assert category("fast_task (/work/x/service/api.py:174)") == "service code"
    assert category("_execute_send (psycopg/_cursor_base.py:449)").startswith("Postgres client")
    assert category("run (<frozen runpy>:88)") == OTHER


def test_cpu_per_request_by_library() -> None:
    out = summarize(RAW, requests=100, rate_hz=100)
    # 100 samples at 100 Hz = 1 CPU second over 100 requests = 10 000 µs each
    assert out["samples"] == 100 and out["cpu_s"] == 1.0 and out["cpu_us_per_request"] == 10_000.0
    by = out["by_category_us_per_request"]
    assert by["Redis client (redis-py)"] == 5_000.0 and by["HTTP server (uvicorn, httptools)"] == 3_000.0
    assert by["service code"] == 1_500.0 and by["metrics (prometheus-client)"] == 500.0
    assert sum(by.values()) == out["cpu_us_per_request"]
    assert out["top_functions"][0]["function"].startswith("execute_command") and out["top_functions"][0]["share"] == 0.5
    assert summarize(RAW, requests=0)["cpu_us_per_request"] is None  # nothing served: no per-request figure


def test_performance_page_shows_profiles_side_by_side() -> None:
    before = {"git_commit": "aaa", "paths": {"hot": {**summarize(RAW, requests=100, rate_hz=100), "rate": 1200}}}
    after = {"git_commit": "bbb", "paths": {"hot": {**summarize(RAW[:1], requests=100, rate_hz=100), "rate": 1200}}}
    text = "\n".join(performance.profile_lines([before, after]))
    assert "| | `aaa` | `bbb` |" in text
    assert "| **CPU µs per request** | **10000.0** | **3000.0** |" in text
    assert "| Redis client (redis-py) | 5000.0 | 0 |" in text


def test_a_real_profile_of_the_api(tmp_path: Path) -> None:
    """py-spy (from the venv) attaches to the local stack's API under a k6 load and sees our code."""
    out = profile_path(load("dev"), "cold", 50, 3, tmp_path, Console(quiet=True))
    assert out["requests"] > 50 and out["samples"] > 0 and out["cpu_us_per_request"] > 0
    assert out["by_category_us_per_request"].get("service code", 0) > 0
    assert (tmp_path / "cold.raw").stat().st_size > 0
