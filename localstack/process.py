"""One child process of the local stack: started in its own process group, stopped by group, never orphaned.

Everything binds to 127.0.0.1 on free ports and lives in temp dirs, so parallel runs never collide.
Each group is registered with the launcher's watchdog (:mod:`localstack.reaper`), which kills it if
the launcher dies without stopping it (SIGKILL included); a normal exit stops everything through
``atexit``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import httpx

from localstack.reaper import reaper

ROOT = Path(__file__).resolve().parent.parent
Progress = Callable[[str, float], None]  # (component name, seconds until ready)
ReadyCheck = Callable[[], bool]


class Keeper(Protocol):
    """What supervises a process from its first second (:class:`localstack.supervisor.Supervisor`)."""

    def adopt(self, process: ManagedProcess) -> None:
        """Watch ``process`` from now on: restart it whenever it dies on its own, start-up included."""

    def gave_up(self) -> BaseException | None:
        """Why supervision ended (a crash loop), or None while it goes on."""


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
        keeper: Keeper | None = None,
    ) -> None:
        """``keeper``: supervises the process from the start, so one that dies before it is ready is
        restarted under the keeper's rule (backoff, crash loop) instead of failing the start."""
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
        # Set by stop(), cleared by start(): the supervisor restarts only processes that died on their own.
        self.stopped_on_purpose = False
        self.keeper = keeper
        if keeper is not None:
            keeper.adopt(self)

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
                # Own process group (stop() reaches grandchildren too) but not its own session: with
                # autogroup scheduling every session gets an equal CPU share and nice counts only
                # within one, so a session per child made the workers' nice void (PERFORMANCE.md).
                process_group=0,
                user=as_user,
                group=as_user,
                extra_groups=[] if as_user is not None else None,
            )
        finally:
            log.close()
        reaper().watch(self._proc.pid)  # own group: pgid == pid
        self.stopped_on_purpose = False
        with _LIVE_LOCK:
            _LIVE.add(self)
        return self

    def wait_ready(self, timeout: float = 30.0) -> float:
        """Block until the readiness check passes; returns seconds waited. Raises with the log tail.

        Unsupervised, a process that exits first fails at once; with a keeper, its restarts count
        towards ``timeout`` and only the keeper giving up (a crash loop) fails early.
        """
        started = time.monotonic()
        while True:
            if not self.running:
                if self.keeper is None:
                    raise RuntimeError(f"{self.name} exited with {self.returncode}:\n{self.log_tail(40)}")
                failure = self.keeper.gave_up()
                if failure is not None:
                    raise failure
            elif self.ready is None or self.ready():
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
        """SIGKILL the whole group at once (simulates a crash; a supervisor restarts it)."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(timeout=10)
        reaper().unwatch(self._proc.pid)

    def restart(self) -> ManagedProcess:
        """What a supervisor does after a crash: clear the dead group's leftovers, start the same argv again."""
        self.kill()
        return self.start()

    def stop(self, timeout: float = 15.0) -> int | None:
        """``stop_signal`` to the process, then SIGKILL to its group after ``timeout``; returns the exit code."""
        proc = self._proc
        if proc is None:
            return None
        self.stopped_on_purpose = True
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
            reaper().unwatch(proc.pid)
        return proc.returncode

    def exit_status(self) -> str:
        """How the process ended, in words: ``exit code 1`` or ``killed by SIGKILL``."""
        rc = self.returncode
        if rc is None:
            return "running"
        if rc < 0:
            with contextlib.suppress(ValueError):
                return f"killed by {signal.Signals(-rc).name}"
        return f"exit code {rc}"

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])


class SignalsAsInterrupt:
    """While installed, SIGTERM and SIGINT raise ``KeyboardInterrupt`` in the main thread, so a stop
    unwinds through ``finally`` and ``__exit__`` in order; :meth:`restore` puts the old handlers back."""

    def __init__(self) -> None:
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._raise)

    def restore(self) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        self._old.clear()

    @staticmethod
    def _raise(signum: int, frame: types.FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
