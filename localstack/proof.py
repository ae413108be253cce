"""The whole local proof stack: the service (:class:`LocalStack`), Prometheus and, if present, Grafana.

``make demo``, ``make compare`` and the end-to-end test start it from one :class:`StackConfig`
(``Pulumi.<stack>.yaml``): service processes get ``service_env()``, the simulator ``simulator_env()``,
Prometheus scrapes every service process and receives k6's remote write. Every process is started
with a log file and stopped by PID (process group) in reverse order, also on Ctrl-C / SIGTERM. The
service's processes are supervised: a crash is restarted and counted (:meth:`ProofStack.restarts`),
and only a crash loop ends the run.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.stackconfig import StackConfig
from localstack.monitoring import GrafanaServer, PrometheusServer
from localstack.process import ManagedProcess, SignalsAsInterrupt
from localstack.stack import LocalStack
from localstack.supervisor import CrashLoop

Progress = Callable[[str, float], None]


class StackStartError(RuntimeError):
    """One part of the stack did not come up (or died later); ``part`` names it, ``log_tail`` shows why."""

    def __init__(self, part: str, reason: str, log_tail: str = "", *, started: bool = False) -> None:
        super().__init__(f"{part} {'died' if started else 'failed to start'}: {reason}")
        self.part = part
        self.reason = reason
        self.log_tail = log_tail


class ProofStack:
    """Service + Prometheus (+ Grafana): one context manager, stopped in reverse order whatever happens."""

    def __init__(
        self,
        cfg: StackConfig,
        *,
        progress: Progress | None = None,
        workdir: Path | None = None,
        grafana: bool = True,
        scrape_interval_s: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.progress = progress
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="loadproof-demo-"))
        self.workdir.chmod(0o755)  # Postgres runs as user `postgres` (when we are root) and must reach its dir
        self.want_grafana = grafana
        self.scrape_interval_s = scrape_interval_s or cfg.monitoring.prometheus.scrape_interval_s
        self.service: LocalStack | None = None
        self.prometheus: PrometheusServer | None = None
        self.grafana: GrafanaServer | None = None
        self.grafana_skipped_reason: str | None = None
        self._current = "service"
        self._signals = SignalsAsInterrupt()
        self._targets: dict[str, list[str]] = {}

    # ---- URLs
    @property
    def api_url(self) -> str:
        assert self.service is not None
        return self.service.orchestrator_url

    @property
    def database_url(self) -> str:
        assert self.service is not None
        return self.service.postgres.url

    @property
    def prometheus_url(self) -> str:
        assert self.prometheus is not None
        return self.prometheus.url

    @property
    def grafana_url(self) -> str | None:
        return self.grafana.url if self.grafana is not None else None

    def pids(self) -> dict[str, int]:
        """PID of every process this stack started (for the no-leftovers check)."""
        out: dict[str, int] = {}
        procs: list[tuple[str, ManagedProcess | None]] = []
        if self.service is not None:
            s = self.service
            procs += [("postgres", s.postgres.process), ("redis", s.redis.process), ("simulator", s.simulator.process)]
            if s.orchestrator is not None:
                procs.append(("orchestrator", s.orchestrator.process))
            procs += [(w.name, w.process) for w in s.workers]
        if self.prometheus is not None:
            procs.append(("prometheus", self.prometheus.process))
        if self.grafana is not None:
            procs.append(("grafana", self.grafana.process))
        for name, proc in procs:
            if proc is not None and proc.pid is not None:
                out[name] = proc.pid
        return out

    def check_alive(self) -> None:
        """Raise :class:`StackStartError` naming the process the supervisor gave up on (a crash loop)."""
        if self.service is None:
            return
        try:
            self.service.check_alive()
        except CrashLoop as exc:
            raise StackStartError(exc.part, str(exc), exc.log_tail, started=True) from exc

    def scrape_targets(self) -> dict[str, int]:
        """Scrape targets per job (the local "replicas": one API server however many processes, one per worker)."""
        return {job: len(targets) for job, targets in self._targets.items()}

    def restarts(self) -> dict[str, int]:
        """Supervised restarts per service process during this run (reported, never hidden)."""
        return self.service.restarts() if self.service is not None else {}

    # ---- lifecycle
    def _report(self, name: str, seconds: float) -> None:
        if self.progress is not None:
            self.progress(name, seconds)

    def _service_progress(self, name: str, seconds: float) -> None:
        order = ["postgres", "redis", "simulator", "orchestrator"]
        self._report(name, seconds)
        # the next part LocalStack will start (for "which part failed")
        if name in order[:-1]:
            self._current = order[order.index(name) + 1]
        else:
            self._current = "worker"

    def start(self) -> ProofStack:
        cfg = self.cfg
        self._current = "postgres"
        try:
            self.service = LocalStack(
                cfg.service_env(),
                workers=max(1, cfg.workers.processes),
                worker_nice=cfg.workers.nice,
                simulator_env=cfg.simulator_env(),
                redis_appendonly=cfg.redis.appendonly,
                redis_maxmemory=cfg.redis.maxmemory,
                durable_postgres=True,
                supervise=True,
                progress=self._service_progress,
                workdir=self.workdir / "service",
            )
            self.service.start()
            self._current = "prometheus"
            targets = {"orchestrator": [f"127.0.0.1:{self.service.orchestrator.port}"]}  # type: ignore[union-attr]
            targets["workers"] = [f"127.0.0.1:{p}" for p in self.service.worker_metrics_ports]
            self._targets = targets
            self.prometheus = PrometheusServer(
                targets,
                scrape_interval_s=self.scrape_interval_s,
                workdir=self.workdir / "prometheus",
                preferred_port=cfg.monitoring.prometheus.port,
            )
            self._report("prometheus", self.prometheus.start())
            if self.want_grafana and GrafanaServer.available():
                self._current = "grafana"
                self.grafana = GrafanaServer(cfg, self.prometheus.url, workdir=self.workdir / "grafana")
                self._report("grafana", self.grafana.start())
            elif self.want_grafana:
                self.grafana_skipped_reason = (
                    "grafana-server is not installed: no Grafana (the HTML report has the plots)"
                )
        except BaseException as exc:
            tail = self._tail_of(self._current)
            self.stop()
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise StackStartError(self._current, str(exc).splitlines()[0] if str(exc) else repr(exc), tail) from exc
        return self

    def _tail_of(self, part: str) -> str:
        proc: ManagedProcess | None = None
        s = self.service
        if part == "prometheus" and self.prometheus is not None:
            proc = self.prometheus.process
        elif part == "grafana" and self.grafana is not None:
            proc = self.grafana.process
        elif s is not None:
            if part == "postgres":
                proc = s.postgres.process
                if proc is None:  # initdb failed
                    with contextlib.suppress(OSError):
                        return "\n".join((s.postgres.dir / "initdb.log").read_text().splitlines()[-30:])
            elif part == "redis":
                proc = s.redis.process
            elif part == "simulator":
                proc = s.simulator.process
            elif part == "orchestrator" and s.orchestrator is not None:
                proc = s.orchestrator.process
            elif part == "worker" and s.workers:
                proc = s.workers[-1].process
        return proc.log_tail(40) if proc is not None else ""

    def stop(self) -> None:
        """Grafana, Prometheus, then the service (LocalStack stops its parts in reverse order)."""
        for part in (self.grafana, self.prometheus, self.service):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> ProofStack:
        self._signals.install()
        try:
            return self.start()
        except BaseException:
            self._signals.restore()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.cleanup()
        finally:
            self._signals.restore()
