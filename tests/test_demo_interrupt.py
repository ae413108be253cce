"""Ctrl-C during ``make demo`` stops everything the demo started (by PID), and says so."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.stackconfig import REPO_ROOT

pytestmark = pytest.mark.e2e


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(f"{proc.name}: {cmdline[:200]}")
    return found


@pytest.mark.timeout(120)
def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "250", "TERM": "dumb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest.demo", "--profile", "smoke", "--no-grafana", "--reports", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    workdir = None
    lines = []
    deadline = time.monotonic() + 90
    try:
        for line in proc.stdout:
            lines.append(line)
            match = re.search(r"work dir (\S+)\)", line)
            if match:
                workdir = match.group(1)
                break
            if time.monotonic() > deadline:
                break
        assert workdir, "".join(lines)
        time.sleep(3)  # k6 is running now
        assert _processes_mentioning(workdir), "the stack should be running before the interrupt"
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "interrupted" in output
    run_id = re.search(r"run (\S+-smoke)", output)
    assert run_id, output
    assert _processes_mentioning(workdir) == []
    assert _processes_mentioning(f"testid={run_id.group(1)}") == []  # k6 too
    assert not Path(workdir).exists()
