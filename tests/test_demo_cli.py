"""``python -m loadtest.demo`` refuses a bad stack file with a message naming the key, before starting anything."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from common.stackconfig import REPO_ROOT


def _demo(tmp_path: Path, yaml_text: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "Pulumi.bad.yaml").write_text(yaml_text)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.demo",
            "--stack",
            "bad",
            "--root",
            str(tmp_path),
            "--profile",
            "smoke",
            "--reports",
            str(tmp_path / "reports"),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_unknown_key_names_the_key(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "config:\n  loadproof:orchestrator:\n    cacheEnabledd: true\n")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "orchestrator.cacheEnabledd" in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr


def test_bad_value_names_the_key(tmp_path: Path) -> None:
    proc = _demo(tmp_path, "config:\n  loadproof:loadtest:\n    workload:\n      zipfS: hot\n")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "loadtest.workload.zipfS" in proc.stdout


def test_unknown_profile_is_refused(tmp_path: Path) -> None:
    (tmp_path / "Pulumi.bad.yaml").write_text("config: {}\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "COLUMNS": "200"}
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.demo", "--stack", "bad", "--root", str(tmp_path), "--profile", "nope"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "nope" in proc.stdout


def test_a_part_that_cannot_start_is_named_with_its_log(tmp_path: Path) -> None:
    """An unpriced model makes the service refuse to start: the demo names the part and shows its log."""
    proc = _demo(tmp_path, "config:\n  loadproof:llm:\n    model: no-such-model\n")
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert re.search(r"✗ (orchestrator|worker)\S* failed to start", proc.stdout), proc.stdout
    assert not (tmp_path / "reports").exists()  # no half-empty report for a run that never ran
    assert "last lines of the" in proc.stdout
    assert "no-such-model" in proc.stdout  # the log tail explains why
    assert "Traceback (most recent call last)" not in proc.stderr
