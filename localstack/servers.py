"""The local stack's data stores: a throw-away Postgres cluster and a Redis server, each on a free port."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from common.tools import tool
from localstack.process import Keeper, ManagedProcess, command_check, free_port


class PostgresServer:
    """A throw-away Postgres cluster on a free port (``initdb`` + ``postgres``, as user ``postgres`` when root)."""

    # Set before start() to supervise the server from its launch (a death during start-up is restarted).
    keeper: Keeper | None = None

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
                    tool("initdb"),
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
            tool("postgres"),
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
        pg_isready = tool("pg_isready")
        self.process = ManagedProcess(
            "postgres",
            argv,
            env=env,
            cwd=self.dir,
            log_path=self.dir / "postgres.log",
            ready=command_check([pg_isready, "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres"]),
            user=self.user,
            stop_signal=signal.SIGINT,  # "fast" shutdown; SIGTERM would wait for every client to leave
            keeper=self.keeper,
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
        self._port_picked = port is None  # until the first start succeeds (then restarts keep it)
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
        """Start (or restart on the same port). A port picked here that another process took between
        ``free_port()`` and the bind (the check cannot reserve it) is picked again, at most twice."""
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                self._start(timeout)
                break
            except RuntimeError as exc:
                if not (self._port_picked and attempt < 2 and "Address already in use" in str(exc)):
                    raise
                self.port = free_port()
        self._port_picked = False
        return time.monotonic() - t0

    def _start(self, timeout: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [
            tool("redis-server"),
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
