"""The service on this machine: Postgres, Redis, the LLM simulator, the API and N workers, supervised like pods."""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from localstack.process import ManagedProcess, SignalsAsInterrupt
from localstack.servers import PostgresServer, RedisServer
from localstack.services import OrchestratorServer, SimulatorServer, WorkerProcess
from localstack.supervisor import CrashLoop, RestartPolicy, Supervisor

Progress = Callable[[str, float], None]  # (component name, seconds until ready)


class LocalStack:
    """Postgres, Redis, simulator, orchestrator and N workers; stopped in reverse order, whatever happens.

    ``env`` holds ``LOADPROOF_*`` overrides for the service processes (e.g. ``StackConfig.service_env()``);
    connection URLs are filled in here. ``progress(name, seconds)`` is called as each part becomes ready.
    With ``supervise=True`` (``make serve``, ``make demo``) every process that dies on its own is
    restarted with backoff (:mod:`localstack.supervisor`); restarts are logged with ``log`` and counted
    in :meth:`restarts`. Scripts should pass ``handle_signals=True`` so SIGTERM/SIGINT unwind through
    ``__exit__`` in order; if the launcher is killed outright, the watchdog (:mod:`localstack.reaper`)
    kills every process group it left.
    """

    def __init__(
        self,
        env: Mapping[str, str] | None = None,
        *,
        workers: int = 1,
        orchestrator_port: int | None = None,
        simulator_port: int | None = None,
        simulator_env: Mapping[str, str] | None = None,
        redis_appendonly: bool = True,
        redis_maxmemory: str | None = None,
        durable_postgres: bool = False,
        progress: Progress | None = None,
        handle_signals: bool = False,
        workdir: str | Path | None = None,
        supervise: bool = False,
        restart_policy: RestartPolicy | None = None,
        log: Callable[[str], None] | None = None,
        worker_nice: int = 0,
    ) -> None:
        self.env = dict(env or {})
        self.n_workers = workers
        self.worker_nice = worker_nice
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="loadproof-stack-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        # Measured runs keep Postgres durable (fsync on): numbers taken with fsync off would flatter
        # every insert. Tests may trade durability for speed.
        self.postgres = PostgresServer(fast=not durable_postgres, workdir=self.workdir / "postgres")
        self.redis = RedisServer(appendonly=redis_appendonly, maxmemory=redis_maxmemory, workdir=self.workdir / "redis")
        self.simulator = SimulatorServer(simulator_env, port=simulator_port, logdir=self.workdir / "logs")
        self.orchestrator: OrchestratorServer | None = None
        self.workers: list[WorkerProcess] = []
        self._orchestrator_port = orchestrator_port
        self._progress = progress
        self._handle_signals = handle_signals
        self._signals = SignalsAsInterrupt()
        self._started: list[Any] = []
        self.supervisor: Supervisor | None = (
            Supervisor(restart_policy, log=log or (lambda line: print(line, file=sys.stderr, flush=True)))
            if supervise
            else None
        )
        # Supervised from their launch on; Redis only once ready, since a port another process took
        # between picking and binding it is picked again, which a restart on the same port cannot do.
        self.postgres.keeper = self.simulator.keeper = self.supervisor

    # --- URLs ---------------------------------------------------------------------------------
    @property
    def orchestrator_url(self) -> str:
        assert self.orchestrator is not None, "stack not started"
        return self.orchestrator.url

    @property
    def simulator_url(self) -> str:
        return self.simulator.url

    @property
    def worker_metrics_ports(self) -> list[int]:
        return [w.metrics_port for w in self.workers]

    def service_env(self) -> dict[str, str]:
        """What the orchestrator and workers get: overrides plus this stack's connection URLs."""
        return {
            **self.env,
            "LOADPROOF_DATABASE_URL": self.postgres.url,
            "LOADPROOF_REDIS_URL": self.redis.url,
            "LOADPROOF_LLM_BASE_URL": self.simulator.base_url,
        }

    # --- lifecycle ----------------------------------------------------------------------------
    def parts(self) -> dict[str, ManagedProcess]:
        """Every started process by name, in start order."""
        out: dict[str, ManagedProcess] = {}
        for c in self._started:
            if c.process is not None:
                out[c.process.name] = c.process
        return out

    def restarts(self) -> dict[str, int]:
        """Supervised restarts per process so far (all zero without supervision)."""
        return self.supervisor.restarts() if self.supervisor is not None else {n: 0 for n in self.parts()}

    def check_alive(self) -> None:
        """Raise :class:`CrashLoop` when the supervisor gave up on a part (or, unsupervised, when one died)."""
        if self.supervisor is not None:
            if self.supervisor.failure is not None:
                raise self.supervisor.failure
            return
        for name, proc in self.parts().items():
            if not proc.running and not proc.stopped_on_purpose:
                raise CrashLoop(name, f"{name} exited ({proc.exit_status()})", proc.log_tail(40))

    def _step(self, name: str, start: Callable[[], float | None], component: Any) -> None:
        t0 = time.monotonic()
        try:
            start()
        finally:  # a part that failed to start is stopped with the rest
            self._started.append(component)
        if self.supervisor is not None and component.process is not None and component.process.keeper is None:
            self.supervisor.watch(component.process.name, component.process)
        if self._progress is not None:
            self._progress(name, time.monotonic() - t0)

    def start(self) -> LocalStack:
        """Start every part in order; supervised, from the first one's launch (a part that dies while
        starting is restarted like any crash, and the start waits for it unless it crash-loops)."""
        if self.supervisor is not None:
            self.supervisor.start()
        try:
            self._step("postgres", self.postgres.start, self.postgres)
            self._step("redis", self.redis.start, self.redis)
            self._step("simulator", self.simulator.start, self.simulator)
            env = self.service_env()
            logs = self.workdir / "logs"
            self.orchestrator = OrchestratorServer(env, port=self._orchestrator_port, logdir=logs)
            self.orchestrator.keeper = self.supervisor
            self._step(
                "orchestrator", lambda: self.orchestrator.start(60) if self.orchestrator else None, self.orchestrator
            )
            for i in range(self.n_workers):
                worker = WorkerProcess(env, index=i, logdir=logs, nice=self.worker_nice)
                worker.keeper = self.supervisor
                self.workers.append(worker)
                self._step(worker.name, lambda w=worker: w.start(60), worker)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reverse order: workers and API first (they drain), then the simulator, Redis, Postgres."""
        if self.supervisor is not None:
            self.supervisor.stop()  # first: a deliberate stop must never look like a crash
        while self._started:
            component = self._started.pop()
            with contextlib.suppress(Exception):
                component.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalStack:
        if self._handle_signals:
            self._signals.install()
        try:
            return self.start()
        except BaseException:
            self._signals.restore()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self._signals.restore()


@contextlib.contextmanager
def local_stack(env: Mapping[str, str] | None = None, **kwargs: Any) -> Iterator[LocalStack]:
    """Functional form of :class:`LocalStack`."""
    with LocalStack(env, **kwargs) as stack:
        yield stack
