"""Run the whole service on this machine as real processes: ``python -m service.devstack`` (= ``make serve``).

Shared by ``make serve``, the tests (``tests/conftest.py``) and ``make demo``. Everything binds to
127.0.0.1 on free ports, lives in a unique temp dir and is stopped by PID (whole process group,
SIGTERM then SIGKILL), also on exceptions and on SIGTERM/SIGINT, so parallel runs never collide and
nothing is left behind.

API (kept stable for other callers): :func:`free_port`, :class:`ManagedProcess`,
:class:`PostgresServer`, :class:`RedisServer`, :class:`SimulatorServer`, :class:`OrchestratorServer`,
:class:`WorkerProcess`, :class:`LocalStack`.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
Progress = Callable[[str, float], None]  # (component name, seconds until ready)
ReadyCheck = Callable[[], bool]

_LIVE: set[ManagedProcess] = set()
_LIVE_LOCK = threading.Lock()


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0 and release it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def http_check(url: str, status: int = 200) -> ReadyCheck:
    """Ready when ``GET url`` answers ``status``."""

    def check() -> bool:
        try:
            return httpx.get(url, timeout=1.0).status_code == status
        except httpx.HTTPError:
            return False

    return check


def tcp_check(port: int, host: str = "127.0.0.1") -> ReadyCheck:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def command_check(argv: Sequence[str]) -> ReadyCheck:
    def check() -> bool:
        return (
            subprocess.run(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False).returncode
            == 0
        )

    return check


def _stop_all_at_exit() -> None:
    with _LIVE_LOCK:
        procs = list(_LIVE)
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.stop(timeout=5)


atexit.register(_stop_all_at_exit)


class ManagedProcess:
    """One child process in its own process group, with a log file and a readiness check."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        ready: ReadyCheck | None = None,
        user: str | None = None,
        stop_signal: int = signal.SIGTERM,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else dict(os.environ)
        self.cwd = str(cwd) if cwd is not None else str(ROOT)
        if log_path is None:
            fd, tmp = tempfile.mkstemp(prefix=f"loadproof-{name}-", suffix=".log")
            os.close(fd)
            log_path = tmp
        self.log_path = Path(log_path)
        self.ready = ready
        self.user = user
        self.stop_signal = stop_signal
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> ManagedProcess:
        if self.running:
            return self
        log = self.log_path.open("ab")
        try:
            as_user = self.user if self.user is not None and os.geteuid() == 0 else None
            self._proc = subprocess.Popen(
                self.argv,
                env=self.env,
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() reaches grandchildren too
                user=as_user,
                group=as_user,
                extra_groups=[] if as_user is not None else None,
            )
        finally:
            log.close()
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Block until the readiness check passes; returns seconds waited. Raises with the log tail."""
        started = time.monotonic()
        while True:
            if not self.running:
                raise RuntimeError(f"{self.name} exited with {self.returncode}:\n{self.log_tail(40)}")
            if self.ready is None or self.ready():
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s:\n{self.log_tail(40)}")
            time.sleep(0.05)

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the process itself (not its group)."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole group at once (simulates a crash)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> int | None:
        """``stop_signal`` to the process, then SIGKILL to its group after ``timeout``; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, self.stop_signal)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
            # Leftover group members (e.g. uvicorn workers) must not outlive their parent.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)
        return proc.returncode

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


def _find_pg_binary(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    if candidates:
        return candidates[0]
    raise FileNotFoundError(f"{name} not found on PATH or in /usr/lib/postgresql/*/bin")


class PostgresServer:
    """A throw-away Postgres cluster on a free port (``initdb`` + ``postgres``, as user ``postgres`` when root)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        database: str = "loadproof",
        max_connections: int = 300,
        fast: bool = True,
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.port = port or free_port()
        self.database = database
        self.max_connections = max_connections
        self.fast = fast  # fsync off: a dev/test cluster, never production data
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="loadproof-pg-"))
        self.data_dir = self.dir / "data"
        self.socket_dir = self.dir / "sock"
        self.user = "postgres" if os.geteuid() == 0 else None
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq form for psycopg directly."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    def _chown(self, path: Path) -> None:
        if self.user is not None:
            shutil.chown(path, self.user, self.user)

    def start(self, timeout: float = 60.0) -> float:
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.user is not None:  # the postgres user must be able to traverse a (0700 mkdtemp) parent
            parent = self.dir.parent
            with contextlib.suppress(OSError):
                parent.chmod(parent.stat().st_mode | 0o011)
        self._chown(self.dir)
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C.UTF-8"
        if not (self.data_dir / "PG_VERSION").exists():
            initdb = ManagedProcess(
                "initdb",
                [
                    _find_pg_binary("initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--no-instructions",
                ],
                env=env,
                cwd=self.dir,
                log_path=self.dir / "initdb.log",
                user=self.user,
            )
            initdb.start()
            assert initdb._proc is not None
            if initdb._proc.wait(timeout=120) != 0:
                raise RuntimeError(f"initdb failed:\n{initdb.log_tail(40)}")
            initdb.stop()
        argv = [
            _find_pg_binary("postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self.socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"max_connections={self.max_connections}",
        ]
        if self.fast:
            argv += ["-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"]
        pg_isready = _find_pg_binary("pg_isready")
        self.process = ManagedProcess(
            "postgres",
            argv,
            env=env,
            cwd=self.dir,
            log_path=self.dir / "postgres.log",
            ready=command_check([pg_isready, "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]),
            user=self.user,
            stop_signal=signal.SIGINT,  # "fast" shutdown; SIGTERM would wait for every client to leave
        )
        self.process.start()
        self.process.wait_ready(timeout)
        self._create_database()
        return time.monotonic() - t0

    def _create_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(f"postgresql://postgres@127.0.0.1:{self.port}/postgres", autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.database)))

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=20)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


class RedisServer:
    """``redis-server`` on a free port with a temp ``--dir``; restartable on the same port and data."""

    def __init__(
        self,
        port: int | None = None,
        *,
        appendonly: bool = False,
        workdir: str | os.PathLike[str] | None = None,
        maxmemory: str | None = None,
    ) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.maxmemory = maxmemory
        self.dir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="loadproof-redis-"))
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def start(self, timeout: float = 30.0) -> float:
        t0 = time.monotonic()
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--protected-mode",
            "no",
            "--daemonize",
            "no",
            "--logfile",
            "",
        ]
        if self.maxmemory:
            argv += ["--maxmemory", self.maxmemory, "--maxmemory-policy", "volatile-lru"]
        self.process = ManagedProcess("redis", argv, cwd=self.dir, log_path=self.dir / "redis.log", ready=self._ping)
        self.process.start()
        self.process.wait_ready(timeout)
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


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
        self.process = ManagedProcess(
            self.name,
            [sys.executable, "-m", self.module],
            env=_child_env(self._env()),
            cwd=ROOT,
            log_path=self.logdir / f"{self.name}.log",
            ready=self._ready(),
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
    ) -> None:
        self.name = f"worker-{index}"
        super().__init__(env, logdir=logdir)
        self.metrics_port = metrics_port or free_port()

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def _env(self) -> dict[str, str]:
        return {**self.extra_env, "LOADPROOF_WORKER_METRICS_PORT": str(self.metrics_port)}

    def _ready(self) -> ReadyCheck:
        return http_check(self.metrics_url.replace("/metrics", "/readyz"))


class LocalStack:
    """Postgres, Redis, simulator, orchestrator and N workers; stopped in reverse order, whatever happens.

    ``env`` holds ``LOADPROOF_*`` overrides for the service processes (e.g. ``StackConfig.service_env()``);
    connection URLs are filled in here. ``progress(name, seconds)`` is called as each part becomes ready.
    Children run in their own sessions, so a script killed by SIGTERM would orphan them: scripts should
    pass ``handle_signals=True`` (SIGTERM/SIGINT then unwind through ``__exit__``); an ``atexit`` hook
    covers normal exits.
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
        workdir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.env = dict(env or {})
        self.n_workers = workers
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
        self._old_handlers: dict[int, Any] = {}
        self._started: list[Any] = []

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
    def _step(self, name: str, start: Callable[[], float | None], component: Any) -> None:
        t0 = time.monotonic()
        start()
        self._started.append(component)
        if self._progress is not None:
            self._progress(name, time.monotonic() - t0)

    def start(self) -> LocalStack:
        try:
            self._step("postgres", self.postgres.start, self.postgres)
            self._step("redis", self.redis.start, self.redis)
            self._step("simulator", self.simulator.start, self.simulator)
            env = self.service_env()
            logs = self.workdir / "logs"
            self.orchestrator = OrchestratorServer(env, port=self._orchestrator_port, logdir=logs)
            self._step(
                "orchestrator", lambda: self.orchestrator.start(60) if self.orchestrator else None, self.orchestrator
            )
            for i in range(self.n_workers):
                worker = WorkerProcess(env, index=i, logdir=logs)
                self.workers.append(worker)
                self._step(worker.name, lambda w=worker: w.start(60), worker)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Reverse order: workers and API first (they drain), then the simulator, Redis, Postgres."""
        while self._started:
            component = self._started.pop()
            with contextlib.suppress(Exception):
                component.stop()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    def __enter__(self) -> LocalStack:
        if self._handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old_handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self.start()
        except BaseException:
            self._restore_signals()
            raise

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop()
        finally:
            self._restore_signals()

    def _restore_signals(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()


@contextlib.contextmanager
def local_stack(env: Mapping[str, str] | None = None, **kwargs: Any) -> Iterator[LocalStack]:
    """Functional form of :class:`LocalStack`."""
    with LocalStack(env, **kwargs) as stack:
        yield stack


def main() -> None:
    """``make serve``: the stack in the foreground until Ctrl-C / SIGTERM."""
    from infra.stackconfig import load

    stack_name = os.environ.get("STACK", "dev")
    cfg = load(stack_name)
    env = cfg.service_env()
    port = int(os.environ.get("LOADPROOF_PORT", "8080"))
    sim_port = 8090 if port_is_free(8090) else free_port()
    if not port_is_free(port):
        sys.exit(f"port {port} is busy; set LOADPROOF_PORT to another port")

    def progress(name: str, seconds: float) -> None:
        print(f"  {name:<14} ready in {seconds:5.2f}s", flush=True)

    print(f"loadproof: starting the local stack (stack {stack_name!r})", flush=True)
    with LocalStack(
        env,
        workers=max(1, cfg.workers.processes),
        orchestrator_port=port,
        simulator_port=sim_port,
        simulator_env=cfg.simulator_env(),
        durable_postgres=True,
        progress=progress,
        handle_signals=True,
    ) as stack:
        print(f"\n  API            {stack.orchestrator_url}  (docs: {stack.orchestrator_url}/docs)")
        print(f"  metrics        {stack.orchestrator_url}/metrics")
        print(f"  LLM simulator  {stack.simulator_url}  (stats: {stack.simulator_url}/stats)")
        for w in stack.workers:
            print(f"  {w.name:<14} {w.metrics_url}")
        print(f"  postgres       {stack.postgres.url}")
        print(f"  redis          {stack.redis.url}")
        print(f"  logs           {stack.workdir / 'logs'}\n\nCtrl-C to stop.", flush=True)
        try:
            while True:
                for part in [stack.orchestrator, *stack.workers]:
                    if part is not None and part.process is not None and not part.process.running:
                        print(f"{part.name} exited unexpectedly:\n{part.log_tail(30)}", file=sys.stderr)
                        raise SystemExit(1)
                time.sleep(1.0)
        except KeyboardInterrupt:
            print("\nstopping...", flush=True)
        finally:
            stack.cleanup()  # processes already stopping in __exit__ order; removes the temp data too
    print("stopped.")


if __name__ == "__main__":
    main()
