"""Restart crashed processes the way a pod's ``restartPolicy: Always`` does, and give up only on a crash loop.

A process that dies on its own (not through :meth:`ManagedProcess.stop`) is restarted on the same
port and data after an exponential backoff (1 s, 2 s, 4 s ... capped at 30 s; back to 1 s once it
has run for a minute, as the kubelet does). Every restart is logged with the exit status and
counted. Five restarts within 60 s is a crash loop: the supervisor stops restarting that process and
records why, and the launcher (``make serve``, ``make demo``) fails with that message. The rule holds
from a process's first second: one adopted when it is launched (:meth:`Supervisor.adopt`) that dies
before it is ready is restarted the same way, and its start waits for the restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from localstack.process import ManagedProcess

Log = Callable[[str], None]


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    reset_after_s: float = 60.0  # a process that ran this long starts over at the initial backoff
    crash_loop_restarts: int = 5
    crash_loop_window_s: float = 60.0


@dataclass
class _Watched:
    name: str
    process: ManagedProcess
    started_at: float
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)
    backoff_s: float = 0.0
    restart_at: float | None = None  # scheduled restart (monotonic), None while running
    last_exit: str | None = None


class CrashLoop(RuntimeError):
    """A process kept dying; ``part`` names it, the message says how often and how it last ended."""

    def __init__(self, part: str, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.part = part
        self.log_tail = log_tail


class Supervisor:
    """Watches a set of :class:`ManagedProcess` on one thread; restarts, logs, counts, gives up on a loop."""

    def __init__(self, policy: RestartPolicy | None = None, *, log: Log | None = None, poll_s: float = 0.2) -> None:
        self.policy = policy or RestartPolicy()
        self.log = log or (lambda line: None)
        self.poll_s = poll_s
        self.failure: CrashLoop | None = None
        self._watched: dict[str, _Watched] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(self, name: str, process: ManagedProcess) -> None:
        with self._lock:
            self._watched[name] = _Watched(name, process, started_at=time.monotonic())

    def adopt(self, process: ManagedProcess) -> None:
        """Watch ``process`` under its own name from its launch on (the :class:`~localstack.process.Keeper` side)."""
        self.watch(process.name, process)

    def gave_up(self) -> CrashLoop | None:
        """The crash loop that ended supervision, if any: a start waiting for a restart fails with it."""
        return self.failure

    def start(self) -> Supervisor:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="localstack-supervisor", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising (call before stopping the processes, so a stop is never taken for a crash)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def restarts(self) -> dict[str, int]:
        with self._lock:
            return {w.name: w.restarts for w in self._watched.values()}

    def status(self) -> dict[str, dict[str, object]]:
        """Per process: pid, state, restarts and the last exit status (for ``make serve``'s status file)."""
        with self._lock:
            watched = list(self._watched.values())
        out: dict[str, dict[str, object]] = {}
        for w in watched:
            if w.restart_at is not None:
                state = "crash-loop" if self.failure is not None and self.failure.part == w.name else "restarting"
            else:
                state = "running" if w.process.running else "stopped"
            out[w.name] = {"pid": w.process.pid, "state": state, "restarts": w.restarts, "last_exit": w.last_exit}
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            with self._lock:
                watched = list(self._watched.values())
            for w in watched:
                if self._stop.is_set():
                    return
                self._check(w)

    def _check(self, w: _Watched) -> None:
        now = time.monotonic()
        proc = w.process
        if w.restart_at is None:
            if proc.running or proc.stopped_on_purpose or proc.returncode is None:
                return
            self._schedule(w, now)
        elif now >= w.restart_at and self.failure is None:
            w.restart_at = None
            w.started_at = now
            try:
                proc.restart()
            except Exception as exc:  # e.g. the binary vanished: counts as another crash
                w.last_exit = f"failed to start: {exc}"
                self.log(f"supervisor: {w.name} failed to restart: {exc}")
                self._schedule(w, time.monotonic(), exited=False)
                return
            self.log(f"supervisor: {w.name} restarted (pid {proc.pid}, restart #{w.restarts})")

    def _schedule(self, w: _Watched, now: float, *, exited: bool = True) -> None:
        p = self.policy
        if exited:
            w.last_exit = w.process.exit_status()
        ran_s = now - w.started_at
        w.backoff_s = p.initial_backoff_s if ran_s >= p.reset_after_s or w.backoff_s == 0 else w.backoff_s * 2
        w.backoff_s = min(w.backoff_s, p.max_backoff_s)
        w.restart_times = [t for t in w.restart_times if now - t < p.crash_loop_window_s]
        if len(w.restart_times) >= p.crash_loop_restarts:
            message = (
                f"{w.name} is crash-looping: {len(w.restart_times)} restarts in {p.crash_loop_window_s:.0f}s, "
                f"last {w.last_exit}; not restarting it again"
            )
            w.restart_at = float("inf")
            self.failure = CrashLoop(w.name, message, w.process.log_tail(40))
            self.log(f"supervisor: {message}")
            return
        w.restarts += 1
        w.restart_times.append(now)
        w.restart_at = now + w.backoff_s
        self.log(f"supervisor: {w.name} exited ({w.last_exit}); restart #{w.restarts} in {w.backoff_s:.0f}s")
