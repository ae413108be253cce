"""The service image, checked without Docker.

The image's source tree is what the Dockerfile's ``COPY`` lines take from the build context that
``.dockerignore`` leaves: :func:`materialize` builds exactly that tree in a scratch directory. The
Dockerfile's ``COPY`` lines are the one list of the image's files, and two tests hold it to the code:

- it ships exactly the import closure (``modulefinder``: function-level imports included) of every
  entry point a container runs, taken from the Dockerfile's ``CMD`` and the rendered manifests: a new
  import that is not copied fails here, and so does a file copied for nothing;
- every container command the Pulumi program sets (API, worker, simulator, start barrier, report
  Job) runs from that tree alone, with the command, arguments and environment of the rendered
  manifests, against real Postgres, Redis, Prometheus and k6; only addresses are made local, and the
  Jobs' Kubernetes calls go to the file side of the seam (``LOADPROOF_KUBE_DIR``, see
  ``loadtest/report_job.py``), where the test plays the Job controller.

Also: every library that code imports is installed by requirements-service.txt (transitively, with
the extras it asks for), whose pins are requirements.txt's; the image runs as the pods' uid; infra/
type-checks.
"""

from __future__ import annotations

import json
import modulefinder
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import httpx
import pytest

from common.outputs import OUTPUT_KEYS
from common.stackconfig import REPO_ROOT, ProfileConfig, StackConfig, load
from common.tools import tool
from infra import render
from infra.report import parse_report
from loadtest.report_job import KUBE_DIR_ENV, FileKube, KubeError, kube_api
from localstack.monitoring import PrometheusServer
from localstack.process import ManagedProcess, free_port, http_check
from localstack.servers import PostgresServer, RedisServer
from tests.conftest import flush_redis, truncate_tasks

DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
APP_DIR = PurePosixPath("/app")
SERVICE_ENTRYPOINTS = {"service.orchestrator", "service.worker", "service.simulator"}
JOB_ENTRYPOINTS = {"loadtest.report_job", "loadtest.k6_start"}


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


# ------------------------------------------------------------------ the image's tree, as Docker builds it
def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go ``filepath.Match`` plus ``**``) as a regex over context-relative paths."""
    out, i = "", 0
    pattern = pattern.strip().strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents decides; ``!`` re-includes."""
    parts = rel.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            excluded = not negated
    return excluded


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for line in DOCKERIGNORE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            rules.append((line.startswith("!"), _ignore_regex(line.lstrip("!"))))
    return rules


def context_files() -> set[str]:
    """The build context's files: the repository's tracked and untracked files, minus .dockerignore.

    Git-ignored files (caches, venvs, build output) are left out; a real context would hold them
    until .dockerignore drops them, which it does for the ones in the directories the image copies.
    """
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rules = ignore_rules()
    return {f for f in listed.split("\0") if f and (REPO_ROOT / f).is_file() and not dockerignored(f, rules)}


def copy_plan() -> list[tuple[str, PurePosixPath, bool]]:
    """What the Dockerfile's ``COPY`` lines put into the final image's ``/app``: (context file, path in
    the image, whether it came with a whole directory).

    Follows ``WORKDIR``; a directory source copies its context files, a file source that the context
    lacks (missing, or excluded by .dockerignore) fails as ``docker build`` would. ``COPY --from``
    (the build stage's /app into the final stage) and copies outside /app (the requirements) are
    not the source tree.
    """
    context = context_files()
    plan: list[tuple[str, PurePosixPath, bool]] = []
    workdir = PurePosixPath("/")
    for word, rest in instructions():
        if word == "FROM":
            workdir = PurePosixPath("/")
        elif word == "WORKDIR":
            workdir = workdir / rest
        elif word == "COPY" and "--from=" not in rest:
            *srcs, dest = shlex.split(rest)
            target = workdir / dest
            if not (target == APP_DIR or APP_DIR in target.parents):
                continue
            for src in srcs:
                src = src.rstrip("/")
                if (REPO_ROOT / src).is_dir():
                    inside = sorted(f for f in context if f.startswith(src + "/"))
                    assert inside, f"COPY {src}/: nothing of it is in the build context"
                    plan += [(f, target / f[len(src) + 1 :], True) for f in inside]
                else:
                    assert src in context, f"COPY {src}: not in the build context (missing or .dockerignored)"
                    name = PurePosixPath(src).name
                    plan.append((src, target / name if dest.endswith("/") or len(srcs) > 1 else target, False))
    assert plan, "the Dockerfile copies nothing into /app"
    return plan


def materialize(dest_root: Path) -> Path:
    """Build the final image's ``/app`` in ``dest_root`` as :func:`copy_plan` says; returns its path."""
    for rel, where, _ in copy_plan():
        out = dest_root / where.relative_to("/")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(REPO_ROOT / rel, out)
    return dest_root / APP_DIR.relative_to("/")


def shipped(app: Path) -> set[str]:
    return {p.relative_to(app).as_posix() for p in app.rglob("*") if p.is_file()}


def entrypoints() -> set[str]:
    """Every module a container of the image runs: the Dockerfile's CMD and each rendered ``python -m``."""
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
    return modules


def import_closure(modules: set[str]) -> set[str]:
    """Files of this repository that ``modules`` import, transitively, at module level or inside functions."""
    finder = modulefinder.ModuleFinder(path=[str(REPO_ROOT)])  # only ours: third-party imports stay unresolved
    for module in sorted(modules):
        finder.import_hook(module)
    files = {Path(f) for m in finder.modules.values() if (f := getattr(m, "__file__", None))}
    return {f.resolve().relative_to(REPO_ROOT).as_posix() for f in files}


def test_dockerignore_rules_behave_like_dockers() -> None:
    rules = [(False, _ignore_regex("*")), (True, _ignore_regex("service/")), (False, _ignore_regex("**/*.pyc"))]
    assert dockerignored("Makefile", rules) and dockerignored("infra/kube.py", rules)
    assert not dockerignored("service/api.py", rules)
    assert dockerignored("service/__pycache__/api.cpython-311.pyc", rules)


def test_entrypoints_are_the_ones_the_program_runs() -> None:
    assert entrypoints() == SERVICE_ENTRYPOINTS | JOB_ENTRYPOINTS


def test_image_ships_the_import_closure_of_its_entrypoints(tmp_path: Path) -> None:
    """The Dockerfile's COPY lines are the one list of the image's files: every import of an entry point is
    shipped; a file named on its own is one of them. A whole directory (``service/``: the service, which
    imports none of ours) may bring modules no entry point imports, but not only such modules."""
    files = shipped(materialize(tmp_path))
    needed = import_closure(entrypoints())
    assert not needed - files, f"imported by an entry point but not in the image: {sorted(needed - files)}"
    plan = copy_plan()
    single = {str(where.relative_to(APP_DIR)) for _, where, whole in plan if not whole}
    assert not single - needed, f"copied by name but imported by no entry point: {sorted(single - needed)}"
    dirs = {str(where.relative_to(APP_DIR)).split("/")[0] for _, where, whole in plan if whole}
    for d in sorted(dirs):
        assert any(f.startswith(d + "/") for f in needed), f"COPY {d}/: no entry point imports any of it"


def third_party_imports(modules: set[str]) -> set[str]:
    """Top-level modules outside this repository and the standard library that ``modules`` import, transitively."""
    finder = modulefinder.ModuleFinder(path=[str(REPO_ROOT)])
    for module in sorted(modules):
        finder.import_hook(module)
    ours = {name.split(".")[0] for name in finder.modules}
    return {name.split(".")[0] for name in finder.badmodules} - ours - set(sys.stdlib_module_names)


def installed_distributions(requirements: Path) -> set[str]:
    """Every distribution ``pip install -r requirements`` installs: the listed ones and, transitively, what they
    require for the extras asked for (markers evaluated for this interpreter, the image's Python and OS)."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = [ln.split("#")[0].strip() for ln in requirements.read_text().splitlines()]
    todo = [Requirement(ln) for ln in lines if ln]
    seen: set[tuple[str, str]] = set()
    while todo:
        req = todo.pop()
        for extra in sorted(req.extras) or [""]:
            key = (canonicalize_name(req.name), extra)
            if key in seen:
                continue
            seen.add(key)
            for line in metadata.requires(req.name) or []:
                dep = Requirement(line)
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append(dep)
    return {name for name, _ in seen}


def test_image_installs_every_library_its_code_imports() -> None:
    """Each third-party import of an entry point comes from a distribution requirements-service.txt installs."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    installed = installed_distributions(REPO_ROOT / "requirements-service.txt")
    providers = metadata.packages_distributions()
    imports = third_party_imports(entrypoints())
    assert {"fastapi", "psycopg", "redis", "httpx"} <= imports
    missing = {m for m in imports if not {canonicalize_name(d) for d in providers.get(m, [])} & installed}
    assert not missing, f"imported by the image's code, not installed by requirements-service.txt: {sorted(missing)}"


def test_file_kube_merges_like_the_api_and_is_chosen_only_by_its_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The seam's local side: data and labels merge into what is there (a merge patch), missing reads
    None, a Job's status is what the file says."""
    sink = FileKube(tmp_path)
    assert sink.get_configmap("ns", "cm") is None and sink.get_job("ns", "job") is None
    sink.put_configmap("ns", "cm", {"a": "1"}, {"x": "1"})
    sink.put_configmap("ns", "cm", {"b": "2"}, {"y": "2"})
    assert sink.get_configmap("ns", "cm") == {"a": "1", "b": "2"}
    assert json.loads(sink.path("ns", "configmaps", "cm").read_text())["metadata"]["labels"] == {"x": "1", "y": "2"}
    sink.path("ns", "jobs", "job").parent.mkdir(parents=True)
    sink.path("ns", "jobs", "job").write_text(json.dumps({"status": {"active": 1}}))
    assert sink.get_job("ns", "job") == {"active": 1}
    monkeypatch.setenv(KUBE_DIR_ENV, str(tmp_path))
    assert kube_api() == sink
    monkeypatch.delenv(KUBE_DIR_ENV)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(KubeError, match="not running in a pod"):
        kube_api()  # without the variable: the in-cluster API client, nothing else


def _job_done(sink: FileKube, namespace: str, name: str, completed: bool) -> None:
    """What the Job controller would write once the Job's pods ended."""
    path = sink.path(namespace, "jobs", name)
    path.parent.mkdir(parents=True, exist_ok=True)
    condition = {"type": "Complete" if completed else "Failed", "status": "True"}
    path.write_text(json.dumps({"status": {"conditions": [condition]}}))


# ------------------------------------------------------------------ every container command, from the tree alone
def _container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return render.find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def _plain_env(container: dict[str, Any], **local: str) -> dict[str, str]:
    """The container's environment as rendered; Secret references and in-cluster addresses replaced by ``local``."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            assert e["name"] in local, f"{container['name']}: {e['name']} comes from a Secret; no local value given"
    env.update(local)
    return env


def image_env(extra: dict[str, str]) -> dict[str, str]:
    """What a container of the image sees: the Dockerfile's ENV, no PYTHONPATH, none of our settings, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOADPROOF_", "PYTHON", "K6_"))}
    env.update({"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
    env.update(extra)
    return env


def python_argv(container: dict[str, Any]) -> list[str]:
    """The container's ``python -m ...`` command and args, with this venv's interpreter as the image's ``python``."""
    argv = [*container["command"], *container.get("args", [])]
    assert argv[:2] == ["python", "-m"], argv
    return [sys.executable, *argv[1:]]


def tiny_run(cfg: StackConfig) -> StackConfig:
    """The dev stack with one runner, a 2 s scrape and a ten-second profile: short, but a real measured run."""
    profile = ProfileConfig.model_validate(
        {
            "startRate": 5,
            "warmupS": 2,
            "stages": [{"duration": "4s", "target": 10}, {"duration": "6s", "target": 10}],
            "preAllocatedVus": 10,
            "maxVus": 50,
            "newTopics": 0.5,
        }
    )
    lt = cfg.loadtest.model_copy(
        update={
            "profile": "image",
            "profiles": {**cfg.loadtest.profiles, "image": profile},
            "runners": 1,
            "drain_s": 30,
        }
    )
    prom = cfg.monitoring.prometheus.model_copy(update={"scrape_interval_s": 2})
    monitoring = cfg.monitoring.model_copy(update={"prometheus": prom})
    return cfg.model_copy(update={"loadtest": lt, "monitoring": monitoring})


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """The image's /app, with a check that nothing else of the repository is importable from there."""
    app = materialize(tmp_path / "image")
    probe = "import importlib.util as u; print([m for m in ('localstack', 'infra', 'tests') if u.find_spec(m)])"
    proc = subprocess.run(
        [sys.executable, "-c", probe], cwd=app, env=image_env({}), capture_output=True, text=True, check=True
    )
    assert proc.stdout.strip() == "[]", f"the repository is importable from the image tree: {proc.stdout}"
    return app


def _started(name: str, argv: list[str], env: dict[str, str], cwd: Path, logs: Path, ready_url: str) -> ManagedProcess:
    proc = ManagedProcess(name, argv, env=env, cwd=cwd, log_path=logs / f"{name}.log", ready=http_check(ready_url))
    proc.start()
    proc.wait_ready(90)
    return proc


@pytest.fixture
def processes() -> Iterator[list[ManagedProcess]]:
    """Processes a test starts; each stopped by its PID (process group) at the end, last first."""
    procs: list[ManagedProcess] = []
    yield procs
    for proc in reversed(procs):
        proc.stop(timeout=20)


def run_job(
    name: str, argv: list[str], env: dict[str, str], cwd: Path, logs: Path, timeout_s: float
) -> tuple[int | None, str]:
    """Run a Job's command to its end (killed by PID after ``timeout_s``); returns exit code and log tail."""
    proc = ManagedProcess(name, argv, env=env, cwd=cwd, log_path=logs / f"{name}.log")
    proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while proc.running and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if proc.running:
            proc.stop(timeout=5)
    return proc.returncode, proc.log_tail(60)


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_every_container_command_does_its_job_from_the_image_tree(
    image_tree: Path,
    tmp_path: Path,
    postgres: PostgresServer,
    redis_server: RedisServer,
    processes: list[ManagedProcess],
) -> None:
    """API answers a task, a worker completes it, the barrier releases the runner, the report measures the run."""
    truncate_tasks(postgres)
    flush_redis(redis_server)
    cfg = tiny_run(load("dev"))
    objects = render.evaluate(cfg).manifests()
    hex_ = render.MOCK_RUN_HEX
    logs = tmp_path / "logs"
    logs.mkdir()

    # --- the service: simulator, API, one worker
    sim = _container(objects, "Deployment", "simulator")
    sim_port, api_port, metrics_port = free_port(), free_port(), free_port()
    sim_env = _plain_env(sim, LOADPROOF_SIM_HOST="127.0.0.1", LOADPROOF_SIM_PORT=str(sim_port))
    processes.append(
        _started(
            "simulator",
            python_argv(sim),
            image_env(sim_env),
            image_tree,
            logs,
            f"http://127.0.0.1:{sim_port}/healthz",
        )
    )
    connections = {"LOADPROOF_DATABASE_URL": postgres.url, "LOADPROOF_REDIS_URL": redis_server.url}
    api = _container(objects, "Deployment", "orchestrator")
    api_env = _plain_env(api, **connections, LOADPROOF_HOST="127.0.0.1", LOADPROOF_PORT=str(api_port))
    api_url = f"http://127.0.0.1:{api_port}"
    processes.append(
        _started("orchestrator", python_argv(api), image_env(api_env), image_tree, logs, f"{api_url}/readyz")
    )
    worker = _container(objects, "Deployment", "workers")
    worker_env = _plain_env(
        worker,
        **connections,
        LOADPROOF_LLM_BASE_URL=f"http://127.0.0.1:{sim_port}/v1",
        LOADPROOF_LLM_API_KEY="image-test",
        LOADPROOF_WORKER_METRICS_PORT=str(metrics_port),
    )
    processes.append(
        _started(
            "worker",
            python_argv(worker),
            image_env(worker_env),
            image_tree,
            logs,
            f"http://127.0.0.1:{metrics_port}/readyz",
        )
    )
    # The API answers a task and a worker completes it.
    resp = httpx.post(f"{api_url}/task", json={"persona_id": "tech-optimist", "topic": "the image test"}, timeout=10)
    assert resp.status_code == 202, resp.text
    task_id = resp.json()["task_id"]
    deadline = time.monotonic() + 60
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = httpx.get(f"{api_url}/task/{task_id}", timeout=10).json()
        if doc.get("status") in ("done", "failed"):
            break
        time.sleep(0.2)
    assert doc.get("status") == "done" and doc.get("post"), doc

    # --- Prometheus scraping the service and receiving k6's remote write, as in the cluster
    prom = PrometheusServer(
        {"orchestrator": [f"127.0.0.1:{api_port}"], "workers": [f"127.0.0.1:{metrics_port}"]},
        scrape_interval_s=cfg.monitoring.prometheus.scrape_interval_s,
        workdir=tmp_path / "prometheus",
    )
    prom.start()
    assert prom.process is not None
    processes.append(prom.process)

    # --- the runner: the rendered entrypoint with real k6, paused until the barrier resumes it
    sink = FileKube(tmp_path / "kube")
    for name in (f"k6-start-{hex_}", f"report-{hex_}"):  # Pulumi creates both, empty, before the Jobs run
        cm = render.find(objects, "ConfigMap", name)
        sink.path(cfg.namespace, "configmaps", name).parent.mkdir(parents=True, exist_ok=True)
        sink.path(cfg.namespace, "configmaps", name).write_text(json.dumps(cm))
    script = tmp_path / "scripts" / "task.js"
    script.parent.mkdir()
    script.write_text(render.find(objects, "ConfigMap", "k6-script")["data"]["task.js"])
    runner = _container(objects, "Job", f"k6-{hex_}")
    k6_port = free_port()
    shell = runner["command"][2]
    for old, new in ((" 0.0.0.0:6565 ", f" 127.0.0.1:{k6_port} "), (" /scripts/task.js\n", f" {script}\n")):
        assert shell.count(old) == 1, old
        shell = shell.replace(old, new)
    k6_config = json.loads(_plain_env(runner)["LOADPROOF_K6_CONFIG"])
    runner_env = _plain_env(
        runner,
        LOADPROOF_K6_CONFIG=json.dumps({**k6_config, "baseUrl": api_url}),
        K6_PROMETHEUS_RW_SERVER_URL=prom.remote_write_url,
        JOB_COMPLETION_INDEX="0",
        PATH=f"{Path(tool('k6')).parent}:/usr/bin:/bin",
    )
    k6 = ManagedProcess("k6", [*runner["command"][:2], shell], env=image_env(runner_env), log_path=logs / "k6.log")
    k6.start()
    processes.append(k6)
    time.sleep(2)
    assert k6.running, k6.log_tail()  # paused: it waits for the barrier

    # --- the start barrier: resolves the "Service" (127.0.0.1), resumes the paused runner, records the start
    start = _container(objects, "Job", f"k6-start-{hex_}")
    argv = python_argv(start)
    for flag, value in (("--service", "127.0.0.1"), ("--port", str(k6_port)), ("--count", "1")):
        argv[argv.index(flag) + 1] = value
    sink_env = {KUBE_DIR_ENV: str(sink.root)}
    barrier = ManagedProcess("k6-start", argv, env=image_env(sink_env), cwd=image_tree, log_path=logs / "k6-start.log")
    barrier.start()
    processes.append(barrier)
    start_cm: dict[str, Any] = {}
    deadline = time.monotonic() + 120
    while not start_cm.get("started_at") and barrier.running and time.monotonic() < deadline:
        time.sleep(0.2)
        start_cm = sink.get_configmap(cfg.namespace, f"k6-start-{hex_}") or {}
    assert abs(float(start_cm["started_at"]) - time.time()) < 60, barrier.log_tail()
    stored_start = json.loads(sink.path(cfg.namespace, "configmaps", f"k6-start-{hex_}").read_text())
    assert stored_start["metadata"]["labels"]["app.kubernetes.io/component"] == "k6-start"
    deadline = time.monotonic() + 120
    while k6.running and time.monotonic() < deadline:
        time.sleep(0.5)
    assert k6.returncode == 0, k6.log_tail()
    assert barrier.running, barrier.log_tail()  # it follows the run's Jobs to their end
    _job_done(sink, cfg.namespace, f"k6-{hex_}", completed=True)

    # --- the report Job: measures the finished run, writes the report ConfigMap
    report = _container(objects, "Job", f"report-{hex_}")
    report_doc = json.loads(_plain_env(report, LOADPROOF_DATABASE_URL="-")["LOADPROOF_REPORT_CONFIG"])
    report_env = _plain_env(
        report,
        LOADPROOF_REPORT_CONFIG=json.dumps({**report_doc, "prometheusUrl": prom.url}),
        LOADPROOF_DATABASE_URL=postgres.url,
        **sink_env,
    )
    rc, tail = run_job("report", python_argv(report), image_env(report_env), image_tree, logs, 200)
    assert rc == 0, tail
    _job_done(sink, cfg.namespace, f"report-{hex_}", completed=True)
    deadline = time.monotonic() + 30
    while barrier.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert barrier.returncode == 0, barrier.log_tail()  # the whole run completed: the barrier too
    stored = json.loads(sink.path(cfg.namespace, "configmaps", f"report-{hex_}").read_text())
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "pulumi"  # merged into Pulumi's
    result = parse_report(stored["data"])
    missing = [k for k in OUTPUT_KEYS if k not in result]
    assert not missing, f"report lacks outputs.json keys `make demo` writes: {missing}"
    assert result["test_id"] == f"lp-{hex_}" and result["profile"] == "image"
    assert result["target_qps"] == 10 and result["achieved_qps"] > 0 and result["requests"] > 0
    assert result["tasks_completed"] > 0 and result["tasks_lost"] == 0


# ------------------------------------------------------------------ what it installs and who it runs as
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
