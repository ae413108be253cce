"""Every program the venv provides is found without the user's help, never by its bare name on PATH."""

from __future__ import annotations

import ast
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from common import tools
from common.stackconfig import REPO_ROOT

PACKAGES = ("common", "dashboards", "infra", "loadtest", "localstack", "service", "tests")


def python_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO_ROOT / pkg).rglob("*.py"))


def bare_tool_uses(tree: ast.AST) -> list[tuple[int, str]]:
    """argv lists that start with a venv tool's bare name, and ``which(<venv tool>)`` calls."""
    found = []
    call_args = {id(node.args[0]) for node in ast.walk(tree) if isinstance(node, ast.Call) and node.args}
    for node in ast.walk(tree):
        # argv is a list by convention; a tuple counts only as a call's argv (elsewhere it is data)
        is_argv = isinstance(node, ast.List) or (isinstance(node, ast.Tuple) and id(node) in call_args)
        if is_argv and node.elts:  # type: ignore[union-attr]
            first = node.elts[0]  # type: ignore[union-attr]
            if isinstance(first, ast.Constant) and first.value in tools.VENV_TOOLS:
                found.append((node.lineno, f"argv starting with {first.value!r}"))
        if isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            arg = node.args[0]
            if name == "which" and isinstance(arg, ast.Constant) and arg.value in tools.VENV_TOOLS:
                found.append((node.lineno, f"which({arg.value!r})"))
    return found


def test_no_subprocess_names_a_venv_tool_by_its_bare_name() -> None:
    offenders = [
        f"{path.relative_to(REPO_ROOT)}:{line}: {what}"
        for path in python_files()
        for line, what in bare_tool_uses(ast.parse(path.read_text(), str(path)))
    ]
    assert offenders == [], "resolve with common.tools.tool(...):\n" + "\n".join(offenders)


def test_the_scan_catches_a_bare_name() -> None:
    source = """
subprocess.run(["k6", "run", "x.js"])
shutil.which("pyright")
subprocess.run(["sh", "-c"])
PAIRS = [("k6", "api")]
run(("ruff", "check"))
"""
    tree = ast.parse(source)
    assert sorted(what for _, what in bare_tool_uses(tree)) == [
        "argv starting with 'k6'",
        "argv starting with 'ruff'",
        "which('pyright')",
    ]


def test_venv_tools_are_found_beside_the_interpreter_not_on_path(tmp_path: Path, monkeypatch) -> None:
    impostor = tmp_path / "k6"
    impostor.write_text("#!/bin/sh\nexit 0\n")
    impostor.chmod(impostor.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    path = tools.tool("k6")
    assert Path(path).parent in tools.venv_dirs()
    assert Path(path) != impostor


def test_a_missing_venv_tool_names_the_install_step(monkeypatch) -> None:
    monkeypatch.setattr(tools, "VENV_TOOLS", tools.VENV_TOOLS | {"no-such-tool-xyz"})
    with pytest.raises(tools.ToolNotFound, match="make deps"):
        tools.tool("no-such-tool-xyz")
    with pytest.raises(tools.ToolNotFound, match="make system-deps"):
        tools.tool("no-such-system-tool-xyz")


def test_postgres_binaries_resolve_without_path(monkeypatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    assert Path(tools.tool("initdb")).name == "initdb"


def test_trusted_dirs() -> None:
    assert tools.trusted(tools.tool("k6"))
    assert tools.trusted("/usr/bin/redis-server")
    assert not tools.trusted("/root/.pyenv/shims/k6")
    assert not tools.trusted("/usr/local/bin/k6")


def test_check_fails_loudly_on_an_untrusted_tool(tmp_path: Path) -> None:
    rogue = tmp_path / "rogue-tool"
    rogue.write_text("#!/bin/sh\nexit 0\n")
    rogue.chmod(rogue.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "common.tools", "--check", "rogue-tool", "k6"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    assert "rogue-tool resolved to" in proc.stderr
