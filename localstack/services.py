"""The service's own processes (``python -m service.<module>``): LLM simulator, API and workers."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from localstack.process import ROOT, Keeper, ManagedProcess, ReadyCheck, free_port, http_check


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    """The parent's environment minus its LOADPROOF_* settings, plus ``extra``: children get exactly what we say."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOADPROOF_") and k != "PROMETHEUS_MULTIPROC_DIR"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class _PythonService:
    """A ``python -m <module>`` child with a log file in ``logdir``."""

    name = "service"
    module = ""
    # CPU priority (nice increment) of the process. On one machine everything shares the same cores; a
    # stand-in for what runs elsewhere in production yields them to the service being measured.
    nice = 0
    # Set before start() to supervise the process from its launch (a death during start-up is restarted).
    keeper: Keeper | None = None

    def __init__(self, env: Mapping[str, str] | None = None, *, logdir: str | os.PathLike[str] | None = None) -> None:
        self._own_logdir = logdir is None
        self.logdir = Path(logdir) if logdir else Path(tempfile.mkdtemp(prefix=f"loadproof-{self.name}-"))
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.extra_env = dict(env or {})
        self.process: ManagedProcess | None = None

    def _ready(self) -> ReadyCheck:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(self.extra_env)

    def start(self, timeout: float = 30.0) -> float:
        # Through nice(1), so a supervised restart keeps the priority too.
        niced = ["nice", "-n", str(self.nice)] if self.nice else []
        self.process = ManagedProcess(
            self.name,
            [*niced, sys.executable, "-m", self.module],
            env=_child_env(self._env()),
            cwd=ROOT,
            log_path=self.logdir / f"{self.name}.log",
            ready=self._ready(),
            keeper=self.keeper,
        )
        self.process.start()
        return self.process.wait_ready(timeout)

    def stop(self, timeout: float = 30.0) -> int | None:
        return self.process.stop(timeout=timeout) if self.process is not None else None

    def cleanup(self) -> None:
        """Stop, and remove the log dir if this object created it."""
        self.stop()
        if self._own_logdir:
            shutil.rmtree(self.logdir, ignore_errors=True)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def log_tail(self, n: int = 40) -> str:
        return self.process.log_tail(n) if self.process is not None else ""

    def __enter__(self) -> Any:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class _HttpService(_PythonService):
    """A service process listening on ``port`` (free by default) on 127.0.0.1."""

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        port: int | None = None,
        logdir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(env, logdir=logdir)
        self.port = port or free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class SimulatorServer(_HttpService):
    """``python -m service.simulator`` on ``port``; ``.url`` is the root, ``.base_url`` the ``/v1`` API."""

    name = "simulator"
    module = "service.simulator"
    nice = 10  # stands in for a remote provider, whose CPU is not ours to spend

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def __str__(self) -> str:
        return self.url

    def _env(self) -> dict[str, str]:
        return {**self.extra_env, "LOADPROOF_SIM_HOST": "127.0.0.1", "LOADPROOF_SIM_PORT": str(self.port)}

    def _ready(self) -> ReadyCheck:
        return http_check(f"{self.url}/healthz")

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.url}/stats", timeout=5).raise_for_status().json()

    def control(self, **body: Any) -> dict[str, Any]:
        return httpx.post(f"{self.url}/control", json=body, timeout=5).raise_for_status().json()

    def reset(self) -> None:
        """Fault-free with zeroed counters."""
        self.control(
            rate_429=0, rate_500=0, rate_timeout=0, rate_malformed=0, retry_after_s=1, script=[], reset_stats=True
        )


class OrchestratorServer(_HttpService):
    """``python -m service.orchestrator`` (the API); ready when ``/readyz`` answers 200."""

    name = "orchestrator"
    module = "service.orchestrator"

    def _env(self) -> dict[str, str]:
        return {**self.extra_env, "LOADPROOF_HOST": "127.0.0.1", "LOADPROOF_PORT": str(self.port)}

    def _ready(self) -> ReadyCheck:
        return http_check(f"{self.url}/readyz")


class WorkerProcess(_PythonService):
    """``python -m service.worker`` (the persona runtime); ready when its own ``/metrics`` answers."""

    name = "worker"
    module = "service.worker"

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        metrics_port: int | None = None,
        index: int = 0,
        logdir: str | os.PathLike[str] | None = None,
        nice: int = 0,
    ) -> None:
        self.name = f"worker-{index}"
        self.nice = nice
        super().__init__(env, logdir=logdir)
        self.metrics_port = metrics_port or free_port()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _env(self) -> dict[str, str]:
        return {**self.extra_env, "LOADPROOF_WORKER_METRICS_PORT": str(self.metrics_port)}

    def _ready(self) -> ReadyCheck:
        return http_check(self.metrics_url.replace("/metrics", "/readyz"))
