"""The launcher's dead-man switch: every child process group dies with the launcher, even on SIGKILL.

Children run in their own process groups (so a stop reaches their grandchildren: uvicorn's worker
processes, Postgres backends), which also means nothing ends them when the launcher dies. A
``PR_SET_PDEATHSIG`` on each child would kill only that one process, not its group, and fires when
the *thread* that forked it exits. So one small watchdog process per launcher holds the read end of a
pipe; the launcher writes ``+<pgid>`` / ``-<pgid>`` as groups start and stop, and ``d <path>`` for
scratch dirs. When the pipe reaches EOF (the launcher exited, however it exited) the watchdog
SIGKILLs every group still registered, removes the dirs and exits. A clean stop has already
unregistered everything, so then it does nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent.parent)


class Reaper:
    """The launcher's side: start the watchdog once, then register process groups and scratch dirs."""

    def __init__(self) -> None:
        read_fd, self._write_fd = os.pipe()  # both non-inheritable: only the watchdog gets the read end
        self._lock = threading.Lock()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "localstack.reaper", str(read_fd)],
            pass_fds=(read_fd,),
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to the launcher's group must not kill the watchdog first
            env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))},
        )
        os.close(read_fd)

    def _send(self, line: str) -> None:
        with self._lock, contextlib.suppress(OSError):
            os.write(self._write_fd, (line + "\n").encode())

    def watch(self, pgid: int) -> None:
        self._send(f"+{pgid}")

    def unwatch(self, pgid: int) -> None:
        self._send(f"-{pgid}")

    def remove_on_death(self, path: str) -> None:
        self._send(f"d {path}")


_REAPER: Reaper | None = None
_REAPER_LOCK = threading.Lock()


def reaper() -> Reaper:
    """This launcher's one watchdog, started on first use."""
    global _REAPER
    with _REAPER_LOCK:
        if _REAPER is None or _REAPER.process.poll() is not None:
            _REAPER = Reaper()
        return _REAPER


def watchdog(read_fd: int) -> None:
    """The watchdog's side: track groups and dirs until EOF, then kill and remove what is left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # only EOF (the launcher gone) ends us
    groups: set[int] = set()
    dirs: list[str] = []
    buf = b""
    while chunk := os.read(read_fd, 4096):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for raw in lines:
            line = raw.decode(errors="replace")
            if line.startswith("+"):
                groups.add(int(line[1:]))
            elif line.startswith("-"):
                groups.discard(int(line[1:]))
            elif line.startswith("d "):
                dirs.append(line[2:])
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    if dirs:
        time.sleep(0.5)  # let the killed processes' last writes land before the dirs go
    for path in dirs:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    watchdog(int(sys.argv[1]))
