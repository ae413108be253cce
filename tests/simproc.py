"""Run the LLM simulator as a real process on a free port for tests (``python -m service.simulator``)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
# Fast latencies keep tests quick; the latency model itself is exercised, only scaled down.
FAST_ENV = {
    "LOADPROOF_SIM_TTFT_MS": "5",
    "LOADPROOF_SIM_ITL_MS": "0.1",
    "LOADPROOF_SIM_JITTER": "0.2",
    "LOADPROOF_SIM_OUTPUT_TOKENS": "60",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SimProc:
    url: str
    pid: int

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=5).raise_for_status().json()

    def control(self, **body: Any) -> dict[str, Any]:
        return httpx.post(f"{self.url}/control", json=body, timeout=5).raise_for_status().json()

    def reset(self) -> None:
        """Back to a clean, fault-free state with zeroed counters."""
        self.control(
            rate_429=0, rate_500=0, rate_timeout=0, rate_malformed=0, retry_after_s=1, script=[], reset_stats=True
        )


@contextlib.contextmanager
def running_simulator(env: dict[str, str] | None = None, args: list[str] | None = None) -> Iterator[SimProc]:
    port = free_port()
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("LOADPROOF_")}
    proc_env.update(FAST_ENV)
    proc_env.update(env or {})
    proc_env.update({"LOADPROOF_SIM_HOST": "127.0.0.1", "LOADPROOF_SIM_PORT": str(port), "PYTHONPATH": str(ROOT)})
    proc = subprocess.Popen([sys.executable, "-m", "service.simulator", *(args or [])], env=proc_env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"simulator exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("simulator did not become healthy")
            time.sleep(0.05)
        yield SimProc(url, proc.pid)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
