"""One local k6 run of the project's script: the same script, options and outputs as the cluster's runners."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from rich.console import Console

from common.k6config import SCRIPT, k6_env, profile_duration_s
from common.stackconfig import StackConfig
from common.tools import tool
from loadtest.k6_start import paused, resume
from localstack.process import free_port
from localstack.reaper import reaper

T = TypeVar("T")

K6_PUSH_INTERVAL_S = 2  # remote-write period: finer time series than the cluster's 5 s, same numbers


@dataclass
class K6Result:
    returncode: int
    started_at: float
    ended_at: float
    summary: dict[str, Any] | None
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)


def run_k6(
    cfg: StackConfig,
    *,
    profile: str,
    base_url: str,
    test_id: str,
    run_dir: Path,
    prometheus_rw_url: str | None,
    console: Console | None = None,
    web_dashboard: bool = True,
    extra_env: Mapping[str, str] | None = None,
    script: Path = SCRIPT,
) -> K6Result:
    """One local k6 run of ``loadtest/k6/task.js``; returns its exit code, timing and JSON summary."""
    run_dir.mkdir(parents=True, exist_ok=True)
    summary_path = run_dir / "k6-summary.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("K6_", "LOADPROOF_"))}
    env.update(
        k6_env(
            cfg,
            base_url=base_url,
            test_id=test_id,
            prometheus_rw_url=prometheus_rw_url,
            profile=profile,
            summary_path=str(summary_path),
            push_interval_s=K6_PUSH_INTERVAL_S,
        )
    )
    if web_dashboard:
        # The export is written only when the run spans >= 3 dashboard periods: a short period
        # (2 s) makes even the smoke profile produce it.
        env.update(
            {
                "K6_WEB_DASHBOARD": "true",
                "K6_WEB_DASHBOARD_HOST": "127.0.0.1",
                "K6_WEB_DASHBOARD_PORT": str(free_port()),
                "K6_WEB_DASHBOARD_PERIOD": "2s",
                "K6_WEB_DASHBOARD_EXPORT": str(run_dir / "k6-report.html"),
            }
        )
    env.update(extra_env or {})
    # Started paused and resumed once initialised, as the cluster's runners are (loadtest.k6_start): the
    # run's start is then the resume, exactly, not the process launch or a figure derived from k6's exit.
    api = f"127.0.0.1:{free_port()}"
    argv = [tool("k6"), "run", "--no-color", "--paused", "--address", api, "--tag", f"testid={test_id}"]
    if prometheus_rw_url:
        argv += ["-o", "experimental-prometheus-rw"]
    argv.append(str(script))
    log_path = run_dir / "k6.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, env=env, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, process_group=0)
        reaper().watch(proc.pid)  # own group: the watchdog ends it if this launcher is killed
        try:
            started = _resume_when_ready(proc, api, log_path)
            total = profile_duration_s(cfg.loadtest.profiles[profile])
            if console is not None:
                with console.status("") as status:
                    while proc.poll() is None:
                        elapsed = time.time() - started
                        status.update(f"k6: {elapsed:5.0f}s of ~{total:.0f}s (open model, profile {profile})")
                        time.sleep(0.5)
            proc.wait()
        except BaseException:
            _stop_process_group(proc)
            raise
        finally:
            reaper().unwatch(proc.pid)
    ended = time.time()
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return K6Result(proc.returncode, started, ended, summary, log_path)


def _resume_when_ready(proc: subprocess.Popen[bytes], api: str, log_path: Path, timeout_s: float = 120.0) -> float:
    """Wait until the paused k6 has initialised its VUs, resume it; the wall-clock start of the run."""
    deadline = time.monotonic() + timeout_s
    while not _run(_paused(api)):
        if proc.poll() is not None:
            return time.time()  # it ended during init (a script error): the caller reports its exit code
        if time.monotonic() >= deadline:
            raise RuntimeError(f"k6 not initialised after {timeout_s:.0f}s:\n{log_path.read_text()[-2000:]}")
        time.sleep(0.1)
    return _run(resume([api]))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on a private loop: ``asyncio.run`` would leave the caller's thread without a current
    event loop, which breaks callers that expect one (Pulumi's runtime in the same test process)."""
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def _paused(api: str) -> bool:
    async with httpx.AsyncClient(timeout=5.0) as client:
        return await paused(client, api)


def _stop_process_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGINT)  # k6 stops gracefully and still writes its summary
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
