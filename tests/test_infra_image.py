"""The service image, checked without Docker: what it copies exists, what it runs imports, what it
installs is pinned exactly as in requirements.txt, and infra/ type-checks."""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

from common.stackconfig import REPO_ROOT, load
from common.tools import tool
from infra import render

DOCKERFILE = REPO_ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_copy_sources_exist_and_are_not_dockerignored() -> None:
    ignore = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    copies = [shlex.split(rest) for word, rest in instructions() if word == "COPY" and "--from=" not in rest]
    assert copies
    for parts in copies:
        for src in parts[:-1]:
            assert (REPO_ROOT / src).exists(), f"COPY source {src} does not exist"
            assert src.rstrip("/") in allowed, f"COPY source {src} is excluded by .dockerignore"


def test_entrypoint_modules_exist_and_import() -> None:
    """Every module a container runs: the CMD, and each `python -m` command of the rendered stack."""
    modules = set()
    for word, rest in instructions():
        if word == "CMD":
            argv = json.loads(rest)  # exec form: a JSON array
            modules.add(argv[argv.index("-m") + 1])
    for obj in render.evaluate(load("dev")).manifests():
        if obj["kind"] in ("Deployment", "Job", "StatefulSet"):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                cmd = c.get("command", [])
                if cmd[:2] == ["python", "-m"]:
                    modules.add(cmd[2])
    assert modules >= {
        "service.orchestrator",
        "service.worker",
        "service.simulator",
        "loadtest.report_job",
        "loadtest.k6_start",
    }
    for module in sorted(modules):
        assert importlib.util.find_spec(module) is not None, module
        # Import in a clean interpreter with only the image's source tree importable.
        proc = subprocess.run(
            [sys.executable, "-c", f"import {module}"], cwd=REPO_ROOT, capture_output=True, text=True, check=False
        )
        assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"


def test_image_modules_only_need_copied_sources(tmp_path: Path) -> None:
    """Copy exactly what the Dockerfile copies and import every entry point from there."""
    import shutil

    for parts in (shlex.split(r) for w, r in instructions() if w == "COPY" and "--from=" not in r):
        *srcs, dest = parts
        if dest.startswith("/build"):
            continue
        for src in srcs:
            source = REPO_ROOT / src
            target = tmp_path / dest / (source.name if dest.endswith("/") and source.is_file() else "")
            if source.is_dir():
                shutil.copytree(source, tmp_path / dest, dirs_exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, target)
    mods = ["service.orchestrator", "service.worker", "service.simulator", "loadtest.report_job", "loadtest.k6_start"]
    code = "import sys; sys.path[:0] = ['.']\n" + "\n".join(f"import {m}" for m in mods)
    proc = subprocess.run([sys.executable, "-I", "-c", code], cwd=tmp_path, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_image_requirements_are_the_pinned_ones() -> None:
    def reqs(name: str) -> list[str]:
        lines = (REPO_ROOT / name).read_text().splitlines()
        return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]

    pinned = set(reqs("requirements.txt"))
    service = reqs("requirements-service.txt")
    assert service
    for line in service:
        assert "==" in line, f"{line} is not pinned"
        assert line in pinned, f"{line} differs from requirements.txt"


def test_image_runs_as_the_uid_the_pods_expect() -> None:
    from infra.orchestrator import APP_UID

    users = [rest for word, rest in instructions() if word == "USER"]
    assert users == [f"{APP_UID}:{APP_UID}"]
    assert f"--uid {APP_UID}" in DOCKERFILE.read_text()


def test_pyright_is_clean_on_infra() -> None:
    pyright = tool("pyright")
    files = [str(p) for p in sorted((REPO_ROOT / "infra").glob("*.py"))]
    files += [str(REPO_ROOT / "loadtest" / f) for f in ("report_job.py", "k6_start.py")]
    proc = subprocess.run([str(pyright), *files], cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:]
