"""The local stack supervises its processes like pods and never leaves one behind.

Real processes throughout: ``python -m localstack.serve`` (what ``make serve`` runs) with Postgres,
Redis, the simulator, the API and a worker; SIGKILLs as a crash or an impatient user would send them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from common.stackconfig import REPO_ROOT
from localstack.process import ManagedProcess, free_port
from localstack.servers import RedisServer
from localstack.supervisor import CrashLoop, RestartPolicy, Supervisor

FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, crash_loop_restarts=5, crash_loop_window_s=30)


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# --- the supervisor on its own --------------------------------------------------------------------


def test_crash_loop_is_restarted_with_backoff_then_given_up(tmp_path: Path) -> None:
    lines: list[str] = []
    proc = ManagedProcess("flaky", ["sh", "-c", "exit 3"], log_path=tmp_path / "flaky.log").start()
    sup = Supervisor(FAST, log=lines.append, poll_s=0.02)
    sup.watch("flaky", proc)
    sup.start()
    try:
        wait_for(lambda: sup.failure is not None, 20, "the crash loop to be detected")
    finally:
        sup.stop()
    assert sup.restarts() == {"flaky": 5}
    assert sup.failure is not None and sup.failure.part == "flaky"
    assert "5 restarts in 30s" in str(sup.failure) and "exit code 3" in str(sup.failure)
    backoffs = [line for line in lines if "restart #" in line and "exited" in line]
    assert len(backoffs) == 5 and all("exit code 3" in line for line in backoffs)
    assert sup.status()["flaky"]["state"] == "crash-loop"


def test_a_child_has_its_own_process_group_but_stays_in_the_launchers_session(tmp_path: Path) -> None:
    """With the kernel's autogroup scheduling (Debian's default), each session shares the CPU equally
    with every other, and ``nice`` weighs only within a session: children in sessions of their own
    made the workers' ``nice`` 5 count for nothing and gave the API one session's share."""
    proc = ManagedProcess("sleeper", ["sleep", "60"], log_path=tmp_path / "s.log").start()
    try:
        assert proc.pid is not None
        assert os.getpgid(proc.pid) == proc.pid  # stop() signals the whole group
        assert os.getsid(proc.pid) == os.getsid(0)
    finally:
        proc.stop(timeout=2)


def test_a_killed_process_is_restarted_and_a_stopped_one_is_not(tmp_path: Path) -> None:
    lines: list[str] = []
    proc = ManagedProcess("sleeper", ["sleep", "60"], log_path=tmp_path / "s.log").start()
    first_pid = proc.pid
    sup = Supervisor(FAST, log=lines.append, poll_s=0.02)
    sup.watch("sleeper", proc)
    sup.start()
    try:
        os.kill(first_pid or 0, signal.SIGKILL)
        wait_for(lambda: proc.running and proc.pid != first_pid, 10, "a new sleeper")
        assert sup.restarts() == {"sleeper": 1}
        assert any("killed by SIGKILL" in line for line in lines)
        proc.stop(timeout=2)
        time.sleep(0.3)
        assert not proc.running and sup.restarts() == {"sleeper": 1}, "a deliberate stop was taken for a crash"
    finally:
        sup.stop()
        proc.stop(timeout=2)


def test_a_start_waits_for_the_restart_of_a_process_that_died_before_it_was_ready(tmp_path: Path) -> None:
    """Adopted at launch, a process that exits during start-up is restarted with backoff; its start
    waits for the restart and returns once it is ready."""
    script = "if [ -f first ]; then touch ready; exec sleep 60; else touch first; exit 3; fi"
    sup = Supervisor(FAST, poll_s=0.02).start()
    proc = ManagedProcess(
        "starter",
        ["sh", "-c", script],
        cwd=tmp_path,
        log_path=tmp_path / "s.log",
        ready=lambda: (tmp_path / "ready").exists(),
        keeper=sup,
    )
    try:
        proc.start().wait_ready(10)
        assert sup.restarts() == {"starter": 1}
        assert sup.status()["starter"]["last_exit"] == "exit code 3"
    finally:
        sup.stop()
        proc.stop(timeout=2)


def test_a_start_fails_with_the_crash_loop_of_a_process_that_never_comes_up(tmp_path: Path) -> None:
    sup = Supervisor(FAST, poll_s=0.02).start()
    proc = ManagedProcess("never", ["sh", "-c", "exit 3"], log_path=tmp_path / "n.log", ready=lambda: False, keeper=sup)
    try:
        with pytest.raises(CrashLoop, match="never is crash-looping"):
            proc.start().wait_ready(20)
    finally:
        sup.stop()
        proc.stop(timeout=2)


# --- make serve -----------------------------------------------------------------------------------


class Serve:
    """``python -m localstack.serve`` on free ports, with its status file."""

    def __init__(self, tmp: Path, *, wait: bool = True) -> None:
        self.port = free_port()
        self.sim_port = free_port()
        self.status_file = tmp / "status.json"
        self.log = tmp / "serve.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "localstack.serve", "--port", str(self.port)),
                    *("--simulator-port", str(self.sim_port), "--status-file", str(self.status_file)),
                ],
                cwd=REPO_ROOT,
                env={k: v for k, v in os.environ.items() if not k.startswith("LOADPROOF_")},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            self.wait_started()

    def wait_started(self) -> None:
        wait_for(lambda: self.status().get("parts") or self.proc.poll() is not None, 120, "make serve to start", 0.5)
        assert self.proc.poll() is None, self.log.read_text()[-3000:]

    def launched(self, module: str) -> int | None:
        """The pid of a live ``python -m <module>`` in this launcher's session, if there is one yet."""
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                argv = (stat.parent / "cmdline").read_bytes().split(b"\0")
                if int(fields[3]) == self.proc.pid and fields[0] != "Z" and module.encode() in argv:
                    return int(stat.parent.name)
        return None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def status(self) -> dict[str, Any]:
        try:
            return json.loads(self.status_file.read_text())
        except (OSError, ValueError):
            return {}

    def pid(self, part: str) -> int:
        return int(self.status()["parts"][part]["pid"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    s = Serve(tmp_path)
    try:
        yield s
    finally:
        s.stop()


def group_members(pgids: set[int]) -> set[int]:
    """Every live (non-zombie) process in the given process groups."""
    members = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            state, pgrp = fields[0], int(fields[2])
            if pgrp in pgids and state != "Z":
                members.add(int(stat.parent.name))
    return members


def listening(port: int) -> bool:
    """Whether any socket on this machine listens on ``port`` (from /proc/net/tcp*, state 0A = LISTEN).

    Reading the kernel's table, not trying to bind: a freed port may at once be reused as the local
    port of some unrelated outgoing connection, which would make a bind fail without anyone listening.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def post_tasks(url: str, n: int, tag: str) -> list[str]:
    ids = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(n):
            r = client.post("/task", json={"persona_id": f"p{i % 3}", "topic": f"supervision {tag} {i}"})
            assert r.status_code == 202, r.text
            ids.append(r.json()["task_id"])
    return ids


def all_done(url: str, ids: list[str]) -> bool:
    with httpx.Client(base_url=url, timeout=10) as client:
        return all(client.get(f"/task/{i}").json().get("status") == "done" for i in ids)


@pytest.mark.e2e
def test_serve_restarts_a_killed_worker_and_api_and_no_task_is_lost(serve: Serve) -> None:
    before = post_tasks(serve.url, 12, "before")
    worker_pid = serve.pid("worker-0")
    os.kill(worker_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    def worker_back() -> bool:
        part = serve.status()["parts"]["worker-0"]
        return part["state"] == "running" and part["pid"] != worker_pid and part["restarts"] == 1

    wait_for(worker_back, 10, "a new worker process")
    metrics_port = serve.status()["ports"]["worker-0"]
    wait_for(lambda: _ready(f"http://127.0.0.1:{metrics_port}/readyz"), 10, "the new worker to take work")
    assert time.monotonic() - killed_at < 10, "a new worker was not serving within 10 s"
    after = post_tasks(serve.url, 12, "after")

    api_pid = serve.pid("orchestrator")
    os.kill(api_pid, signal.SIGKILL)
    wait_for(lambda: serve.pid("orchestrator") != api_pid and _ready(f"{serve.url}/readyz"), 30, "a new API")
    after_api = post_tasks(serve.url, 6, "after-api")

    wait_for(lambda: all_done(serve.url, before + after + after_api), 120, "every task to reach done", 1.0)
    parts = serve.status()["parts"]
    assert parts["worker-0"]["restarts"] == 1 and "SIGKILL" in parts["worker-0"]["last_exit"]
    assert parts["orchestrator"]["restarts"] == 1
    assert serve.proc.poll() is None, "the stack went down with the worker"
    assert "worker-0 exited (killed by SIGKILL); restart #1" in serve.log.read_text()


@pytest.mark.e2e
def test_serve_restarts_a_worker_killed_during_its_start_up_and_comes_up(tmp_path: Path) -> None:
    """Supervision from the first second: a worker that dies before it is ready is restarted under the
    same backoff as any crash, the start waits for it, and the stack serves."""
    serve = Serve(tmp_path, wait=False)
    try:
        pid = wait_for(lambda: serve.launched("service.worker") or serve.proc.poll() is not None, 120, "a worker")
        assert serve.proc.poll() is None, serve.log.read_text()[-3000:]
        os.kill(pid, signal.SIGKILL)
        serve.wait_started()
        log = serve.log.read_text()
        assert "worker-0 exited (killed by SIGKILL); restart #1" in log
        assert log.index("restart #1") < log.index("worker-0       ready in"), "killed after it was ready"
        part = serve.status()["parts"]["worker-0"]
        assert part["state"] == "running" and part["restarts"] == 1 and part["pid"] != pid
        ids = post_tasks(serve.url, 3, "start-up")
        wait_for(lambda: all_done(serve.url, ids), 60, "the tasks to reach done", 1.0)
    finally:
        serve.stop()


def _ready(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.e2e
def test_sigkill_of_the_launcher_leaves_no_process_and_no_port(serve: Serve) -> None:
    pids = {name: int(part["pid"]) for name, part in serve.status()["parts"].items()}
    assert {"postgres", "redis", "simulator", "orchestrator", "worker-0"} <= set(pids)
    members = group_members(set(pids.values()))
    assert set(pids.values()) <= members
    ports = [p for p in serve.status()["ports"].values() if p]
    assert len(ports) == 5
    serve.proc.kill()  # SIGKILL: no handler, no atexit, no finally
    serve.proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and group_members(set(pids.values())):
        time.sleep(0.1)
    left = group_members(set(pids.values()))
    assert not left, f"still running after the launcher's SIGKILL: {sorted(left)}"
    # The kernel's LISTEN table can trail the last process by a moment (the API's port was seen
    # listened on right after its group was empty, and free a few ms later): the same 5 s bound.
    while time.monotonic() < deadline and any(listening(p) for p in ports):
        time.sleep(0.05)
    busy = [p for p in ports if listening(p)]
    assert not busy, f"ports still listened on: {busy}"


def test_listening_sees_a_listener_and_only_a_listener() -> None:
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        port = server.getsockname()[1]
        assert not listening(port)  # bound, not listening
        server.listen()
        assert listening(port)
    assert not listening(port)


def test_redis_picks_another_port_when_the_one_it_picked_was_taken_meanwhile() -> None:
    """``free_port()`` cannot reserve a port: another process may bind it before redis-server does."""
    server = RedisServer()
    taken = server.port
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken))
        blocker.listen()
        try:
            server.start()
            assert server.port != taken and server._ping()
        finally:
            server.cleanup()
