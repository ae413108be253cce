"""The distributed run: segment mapping, the runner wrapper, the start barrier against real k6
processes, the report Job's Kubernetes writes against a real HTTP server, run ids and timeouts."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import os
import socket
import stat
import subprocess
import threading
import time
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from common.k6config import execution_segments, profile_duration_s, segment_sequence
from common.stackconfig import StackConfig, load
from common.tools import tool
from infra import render
from infra.loadtest import START_TIMEOUT_S, THRESHOLDS_CROSSED, run_duration_s, runner_script, runner_timeout_s
from infra.report import parse_report, report_job_config, report_timeout_s
from loadtest import k6_start
from loadtest.report_job import Kube, KubeError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("runners", range(1, 13))
def test_segments_tile_zero_to_one_exactly_once(runners: int) -> None:
    segs = [tuple(Fraction(x) for x in s.split(":")) for s in execution_segments(runners)]
    assert segs[0][0] == 0 and segs[-1][1] == 1
    for (a0, a1), (b0, _) in itertools.pairwise(segs):
        assert a0 < a1 == b0  # adjacent, no gap, no overlap
    assert sum(b - a for a, b in segs) == 1
    seq = [Fraction(x) for x in segment_sequence(runners).split(",")]
    assert seq == [segs[0][0], *(b for _, b in segs)]


def run_wrapper(tmp_path: Path, runners: int, index: str | None, k6_exit: int = 0) -> tuple[int, str]:
    """Run the runner's shell entrypoint with a stand-in `k6` that records its arguments."""
    fake = tmp_path / "k6"
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > "{tmp_path}/args"\nexit {k6_exit}\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{tmp_path}:{os.environ['PATH']}"}
    if index is not None:
        env["JOB_COMPLETION_INDEX"] = index
    proc = subprocess.run(
        ["sh", "-c", runner_script(runners, "lp-test")], env=env, capture_output=True, text=True, check=False
    )
    args = (tmp_path / "args").read_text() if (tmp_path / "args").exists() else ""
    return proc.returncode, args


@pytest.mark.parametrize("runners", [1, 2, 3, 5])
def test_runner_wrapper_maps_each_index_to_its_segment(tmp_path: Path, runners: int) -> None:
    seen = []
    for i in range(runners):
        (tmp_path / "args").unlink(missing_ok=True)
        rc, args = run_wrapper(tmp_path, runners, str(i))
        assert rc == 0
        argv = args.splitlines()
        assert argv[0] == "run" and "--paused" in argv
        seen.append(argv[argv.index("--execution-segment") + 1])
        assert argv[argv.index("--execution-segment-sequence") + 1] == segment_sequence(runners)
        tags = [argv[j + 1] for j, a in enumerate(argv) if a == "--tag"]
        # Each runner's series must differ by a label, or Prometheus drops one runner's samples
        # as out-of-order duplicates and every client-side total is silently divided by N.
        assert tags == ["testid=lp-test", f"runner={i}"]
        assert argv[argv.index("-o") + 1] == "experimental-prometheus-rw"
        assert argv[-1] == "/scripts/task.js"
    assert seen == execution_segments(runners)


def test_runner_wrapper_rejects_unknown_index_and_maps_exit_codes(tmp_path: Path) -> None:
    assert run_wrapper(tmp_path, 2, "2")[0] == 2
    assert run_wrapper(tmp_path, 2, None)[0] == 2
    assert run_wrapper(tmp_path, 2, "0", k6_exit=THRESHOLDS_CROSSED)[0] == 0  # a result, reported
    assert run_wrapper(tmp_path, 2, "0", k6_exit=107)[0] == 107  # a real failure fails the Job


def test_runner_job_shape_and_timeouts() -> None:
    cfg = load("dev")
    objects = render.evaluate(cfg).manifests()
    job = render.runner_job(objects)["spec"]
    assert job["completionMode"] == "Indexed"
    assert job["completions"] == job["parallelism"] == cfg.loadtest.runners
    assert job["backoffLimit"] == 0
    assert job["activeDeadlineSeconds"] == runner_timeout_s(cfg) > run_duration_s(cfg)
    c = job["template"]["spec"]["containers"][0]
    assert c["command"][:2] == ["sh", "-c"] and c["command"][2] == runner_script(cfg.loadtest.runners, "lp-1a2b3c4d")
    env = {e["name"]: e["value"] for e in c["env"]}
    doc = json.loads(env["LOADPROOF_K6_CONFIG"])
    assert doc["baseUrl"] == "http://orchestrator.loadproof.svc:8080"
    assert doc["testId"] == "lp-1a2b3c4d"
    assert env["K6_PROMETHEUS_RW_SERVER_URL"] == "http://prometheus.loadproof.svc:9090/api/v1/write"
    # k6 trades memory for CPU (GOGC), softly bounded inside its pod (90 % of the 1Gi limit)
    assert env["GOGC"] == str(cfg.loadtest.gogc) == "400"
    assert env["GOMEMLIMIT"] == str(int(0.9 * 2**30)) and c["resources"]["limits"]["memory"] == "1Gi"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v1/status", "port": 6565}
    start = render.find(objects, "Job", "k6-start-1a2b3c4d")["spec"]["template"]["spec"]["containers"][0]
    assert start["args"][start["args"].index("--count") + 1] == str(cfg.loadtest.runners)
    assert start["args"][start["args"].index("--service") + 1] == "k6-1a2b3c4d.loadproof.svc"
    svc = render.find(objects, "Service", "k6-1a2b3c4d")["spec"]
    assert svc["clusterIP"] == "None" and "publishNotReadyAddresses" not in svc  # only Ready runners count
    assert report_timeout_s(cfg) > cfg.loadtest.drain_s


def test_a_profile_may_bound_its_own_drain_and_the_report_job_waits_for_it() -> None:
    """The cold profile's backlog outlasts the section's drain bound: its own bound reaches the report."""
    cfg = load("dev")
    lt = cfg.loadtest
    assert lt.profiles["demo"].drain_s is None and lt.drain_for("demo") == lt.drain_s
    assert lt.drain_for("cold") == lt.profiles["cold"].drain_s > lt.drain_s
    cold = cfg.model_copy(update={"loadtest": lt.model_copy(update={"profile": "cold"})})
    doc = report_job_config(cold, test_id="t", prometheus_url="p", start_configmap="s", report_configmap="r")
    assert doc["drainS"] == lt.drain_for("cold")
    assert report_timeout_s(cold) > lt.drain_for("cold") > report_timeout_s(cfg) - 300


@pytest.mark.parametrize("stack", ["dev", "eks", "kind"])
def test_pulumi_waits_longer_than_every_job_may_run(stack: str) -> None:
    """customTimeouts exceed each Job's activeDeadlineSeconds, which exceeds what the Job has to do."""
    cfg = load(stack)
    ev = render.evaluate(cfg, stack=stack)
    objects = ev.manifests()
    by_name = {
        "loadtest-runners-job": "k6-1a2b3c4d",
        "loadtest-start-job": "k6-start-1a2b3c4d",
        "report-job": "report-1a2b3c4d",
    }
    for logical, job_name in by_name.items():
        deadline = render.find(objects, "Job", job_name)["spec"]["activeDeadlineSeconds"]
        timeout = ev.create_timeout_s(logical)
        assert timeout is not None and timeout > deadline, logical
    runner_deadline = render.find(objects, "Job", "k6-1a2b3c4d")["spec"]["activeDeadlineSeconds"]
    assert runner_deadline > START_TIMEOUT_S + run_duration_s(cfg)


@pytest.mark.parametrize("stack", ["dev", "eks", "kind", "k3d"])
def test_a_failed_job_does_not_block_the_next_up(stack: str) -> None:
    """backoffLimit 0 leaves a failed Job unready for good: every Job asks Pulumi to replace it then."""
    jobs = [o for o in render.evaluate(load(stack), stack=stack).manifests() if o["kind"] == "Job"]
    assert len(jobs) == 3
    for job in jobs:
        assert job["spec"]["backoffLimit"] == 0
        assert job["metadata"]["annotations"]["pulumi.com/replaceUnready"] == "true", job["metadata"]["name"]


def test_jobs_change_only_with_the_run_id() -> None:
    """Job templates are immutable: a setting outside the run id's keepers must not touch any Job
    (that would replace it and measure twice under one run id)."""
    doc = load("dev").model_dump(mode="json", by_alias=True)
    grafana = {"host": "elsewhere.example.org", "tls": True, "certIssuer": "le", "anonymousViewing": True}
    doc["monitoring"]["grafana"].update(grafana)
    jobs = [
        [o for o in render.evaluate(cfg).manifests() if o["kind"] == "Job"]
        for cfg in (load("dev"), StackConfig.model_validate(doc))
    ]
    assert len(jobs[0]) == 3 and jobs[0] == jobs[1]


def test_run_id_changes_with_run_id_and_measured_config() -> None:
    def keepers(cfg: StackConfig) -> dict[str, Any]:
        ev = render.evaluate(cfg)
        (rid,) = [r for r in ev.mocks.resources if r.typ == "random:index/randomId:RandomId"]
        return render.to_plain(rid.inputs)["keepers"]

    base = keepers(load("dev"))
    assert base["runId"] == "1"
    doc = load("dev").model_dump(mode="json", by_alias=True)
    doc["loadtest"]["runId"] = "2"
    assert keepers(StackConfig.model_validate(doc))["runId"] == "2"
    doc = load("dev").model_dump(mode="json", by_alias=True)
    doc["orchestrator"]["cacheEnabled"] = False
    assert keepers(StackConfig.model_validate(doc))["config"] != base["config"]
    doc = load("dev").model_dump(mode="json", by_alias=True)
    doc["monitoring"]["grafana"]["host"] = "elsewhere.example.org"  # does not change what is measured
    assert keepers(StackConfig.model_validate(doc)) == base


SCRIPT = """
export const options = { scenarios: { a: { executor: 'constant-arrival-rate', rate: 20, timeUnit: '1s',
  duration: '1s', preAllocatedVUs: 2 } } };
export default function () {}
"""


def test_start_barrier_resumes_real_paused_k6_runners(tmp_path: Path) -> None:
    script = tmp_path / "s.js"
    script.write_text(SCRIPT)
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [tool("k6"), "run", "--paused", "--no-usage-report", "--address", f"127.0.0.1:{p}", "-q", str(script)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in ports
    ]
    try:
        targets = [f"127.0.0.1:{p}" for p in ports]
        # Until both are up, fewer targets "resolve": the barrier must keep waiting, then succeed.
        found = asyncio.run(k6_start.wait_until_paused(lambda: targets, 2, timeout_s=60, poll_s=0.2))
        assert found == targets
        time.sleep(1)
        assert all(p.poll() is None for p in procs), "paused k6 must not finish on its own"
        started_at = asyncio.run(k6_start.resume(targets))
        assert abs(started_at - time.time()) < 30
        for p in procs:
            assert p.wait(timeout=60) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_start_barrier_times_out_when_runners_are_missing() -> None:
    with pytest.raises(TimeoutError, match="only 0 of 2"):
        asyncio.run(k6_start.wait_until_paused(lambda: [], 2, timeout_s=0.3, poll_s=0.1))
    port = free_port()  # nothing listens: resolves but never answers "paused"
    with pytest.raises(TimeoutError):
        asyncio.run(k6_start.wait_until_paused(lambda: [f"127.0.0.1:{port}"], 1, timeout_s=0.3, poll_s=0.1))


def test_resolve_lists_addresses_of_a_name() -> None:
    assert k6_start.resolve("localhost", 6565)  # at least 127.0.0.1:6565 or [::1]:6565
    assert k6_start.resolve("no-such-host.invalid", 6565) == []


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = _merge_patch(out.get(k), v)
    return out


class FakeApiServer(BaseHTTPRequestHandler):
    """A minimal Kubernetes API for ConfigMaps and reading Jobs (real HTTP; one store keyed by name), with a
    bearer-token check and, when ``rules`` is set, RBAC as the API server applies it: a verb on a name is
    allowed only by a rule listing both (``create`` never matches a rule with resourceNames: the name does
    not exist yet)."""

    store: dict[str, dict[str, Any]] = {}
    token = "t0ken"
    rules: list[dict[str, Any]] | None = None

    def _auth(self, verb: str = "") -> bool:
        if self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.end_headers()
            return False
        if self.rules is not None and verb:
            parts = self.path.split("/")  # /api/v1/namespaces/ns/configmaps[/name], /apis/batch/v1/.../jobs/name
            group = parts[2] if parts[1] == "apis" else ""
            resource = parts[-1] if verb == "create" else parts[-2]
            name = "" if verb == "create" else parts[-1]
            allowed = any(
                group in r["apiGroups"]
                and resource in r["resources"]
                and verb in r["verbs"]
                and ("resourceNames" not in r or (verb != "create" and name in r["resourceNames"]))
                for r in self.rules
            )
            if not allowed:
                self._json(403, {"reason": "Forbidden", "message": f"cannot {verb} {resource} {name!r}"})
                return False
        return True

    def _json(self, code: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _body(self) -> dict[str, Any]:
        return json.loads(self.rfile.read(int(self.headers["Content-Length"])))

    def do_POST(self) -> None:
        if not self._auth("create"):
            return
        body = self._body()
        name = body["metadata"]["name"]
        if name in self.store:
            self._json(409, {"reason": "AlreadyExists"})
            return
        self.store[name] = body
        self._json(201, body)

    def do_PATCH(self) -> None:
        if not self._auth("patch"):
            return
        assert self.headers["Content-Type"] == "application/merge-patch+json"
        name = self.path.rsplit("/", 1)[1]
        if name not in self.store:
            self._json(404, {"reason": "NotFound"})
            return
        self.store[name] = _merge_patch(self.store[name], self._body())
        self._json(200, self.store[name])

    def do_GET(self) -> None:
        if not self._auth("get"):
            return
        name = self.path.rsplit("/", 1)[1]
        if name not in self.store:
            self._json(404, {"reason": "NotFound"})
            return
        self._json(200, self.store[name])

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def api_server() -> Any:
    FakeApiServer.store = {}
    FakeApiServer.rules = None
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeApiServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_report_configmap_is_created_then_replaced(api_server: str) -> None:
    kube = Kube(api_server, FakeApiServer.token, False)
    assert kube.get_configmap("loadproof", "report-x") is None
    kube.put_configmap("loadproof", "report-x", {"report.json": '{"a": 1}'})
    kube.put_configmap("loadproof", "report-x", {"report.json": '{"a": 2}'})  # a retried Job
    data = kube.get_configmap("loadproof", "report-x")
    assert parse_report(data) == {"a": 2}
    with pytest.raises(KubeError, match="HTTP 401"):
        Kube(api_server, "wrong", False).put_configmap("loadproof", "report-x", {})


def test_each_job_may_do_exactly_what_it_does_and_nothing_else(
    api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rendered Roles, enforced like the API server would, against the Jobs' real API calls: the start
    barrier patches its ConfigMap; the report reads that one and patches its own; neither creates anything."""
    import loadtest.measure
    from loadtest import report_job
    from loadtest.report_job import result_labels

    ev = render.evaluate(load("dev"))
    objects = ev.manifests()
    start_cm, report_cm = f"k6-start-{render.MOCK_RUN_HEX}", f"report-{render.MOCK_RUN_HEX}"
    for name in (start_cm, report_cm):  # Pulumi creates both, empty, before the Jobs run
        FakeApiServer.store[name] = render.find(objects, "ConfigMap", name)
    assert "data" not in FakeApiServer.store[report_cm]
    kube = Kube(api_server, FakeApiServer.token, False)

    FakeApiServer.rules = render.find(objects, "Role", "k6-start")["rules"]
    kube.put_configmap("loadproof", start_cm, {"started_at": "1000.000"}, result_labels("k6-start"))  # k6_start.main
    for forbidden in (
        lambda: kube.get_configmap("loadproof", report_cm),
        lambda: kube.put_configmap("loadproof", report_cm, {"report.json": "{}"}),
        lambda: kube.put_configmap("loadproof", "anything-else", {}),  # not there: would need create
    ):
        with pytest.raises(KubeError, match="HTTP 403"):
            forbidden()

    FakeApiServer.rules = render.find(objects, "Role", "report")["rules"]
    monkeypatch.setattr(loadtest.measure, "measure", lambda url, **kw: {"test_id": kw["test_id"]})
    job = render.find(objects, "Job", report_cm)["spec"]["template"]["spec"]["containers"][0]
    doc = json.loads(next(e["value"] for e in job["env"] if e["name"] == report_job.CONFIG_ENV))
    assert report_job.run(doc, kube, None) == {"test_id": f"lp-{render.MOCK_RUN_HEX}"}
    stored = FakeApiServer.store[report_cm]
    assert json.loads(stored["data"]["report.json"]) == {"test_id": f"lp-{render.MOCK_RUN_HEX}"}
    assert stored["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "pulumi"  # merged, not replaced
    with pytest.raises(KubeError, match="HTTP 403"):
        kube.put_configmap("loadproof", start_cm, {"started_at": "1"})
    # Each Job waits for its own grant and for the ConfigMap it patches.
    assert ev.waits_for("loadtest-start-job", "loadtest-start-rolebinding")
    assert ev.waits_for("loadtest-start-job", "loadtest-start-result")
    assert ev.waits_for("report-job", "report-rolebinding")
    assert ev.waits_for("report-job", "report-configmap")
    # The results belong to the Jobs (a refresh must not wipe them) and outlive a re-run.
    for logical in ("loadtest-start-result", "report-configmap"):
        assert ev.monitor.ignore_changes[logical] == ["data"] and logical in ev.monitor.retained
    specs = {o["metadata"]["name"]: o["spec"]["template"]["spec"] for o in objects if o["kind"] == "Job"}
    assert specs[start_cm]["serviceAccountName"] == "k6-start"
    assert specs[report_cm]["serviceAccountName"] == "report"


def test_parse_report_refuses_an_empty_report() -> None:
    with pytest.raises(ValueError, match=r"report\.json"):
        parse_report({})
    with pytest.raises(ValueError, match="not an object"):
        parse_report({"report.json": "[1]"})


def report_doc(cfg: StackConfig) -> dict[str, Any]:
    from infra.report import report_job_config

    return report_job_config(
        cfg,
        test_id="lp-x",
        prometheus_url="http://prometheus:9090",
        start_configmap="k6-start-x",
        report_configmap="report-x",
    )


def test_report_job_needs_the_recorded_start(api_server: str) -> None:
    from loadtest import report_job

    kube = Kube(api_server, FakeApiServer.token, False)
    with pytest.raises(KubeError, match="never started"):
        report_job.run(report_doc(load("dev")), kube, None)


def test_report_job_measures_the_recorded_window_and_stores_the_result(
    api_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window handed to the shared measurement: start from the barrier, end = start + schedule."""
    import loadtest.measure
    from loadtest import report_job

    seen: dict[str, Any] = {}

    def capture(prometheus_url: str, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs, prometheus_url=prometheus_url)
        return {"test_id": kwargs["test_id"], "p95_latency_ms": 1.5}

    monkeypatch.setattr(loadtest.measure, "measure", capture)
    cfg = load("dev")
    kube = Kube(api_server, FakeApiServer.token, False)
    kube.put_configmap("loadproof", "k6-start-x", {"started_at": "1000.000"})
    report = report_job.run(report_doc(cfg), kube, None)
    window = seen["window"]
    assert window.started_at == 1000.0
    assert window.ended_at == 1000.0 + profile_duration_s(cfg.loadtest.profiles["demo"])
    assert window.warmup_s == cfg.loadtest.profiles["demo"].warmup_s
    assert seen["prometheus_url"] == "http://prometheus:9090" and seen["test_id"] == "lp-x"
    assert seen["machine"]["where"] == "kubernetes"
    # The configured replicas go next to the observed ones; the scrape interval is the sampling step.
    assert seen["configured_replicas"] == {"orchestrator": cfg.orchestrator.replicas, "workers": cfg.workers.replicas}
    assert seen["scrape_interval_s"] == cfg.monitoring.prometheus.scrape_interval_s
    assert parse_report(kube.get_configmap("loadproof", "report-x")) == report
    labels = FakeApiServer.store["report-x"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "report" and labels["app.kubernetes.io/part-of"] == "loadproof"


class TaskSink(BaseHTTPRequestHandler):
    """Accepts every POST /task with 202 and counts it (stands in for the API, which is not under test)."""

    count = 0
    lock = threading.Lock()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with TaskSink.lock:
            TaskSink.count += 1
        body = b'{"task_id": "00000000-0000-0000-0000-000000000000", "status": "queued"}'
        self.send_response(202)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def k6_requests(summary: Path) -> int:
    return int(json.loads(summary.read_text())["metrics"]["http_reqs"]["values"]["count"])


def test_runners_started_by_the_barrier_offer_exactly_the_profiles_arrivals(tmp_path: Path) -> None:
    """The real runner wrapper, the real task.js and real k6: 3 segmented runners started by the barrier
    together send exactly as many requests as one unsegmented k6 running the same profile."""
    from common.k6config import SCRIPT, k6_env

    doc = load("dev").model_dump(mode="json", by_alias=True)
    doc["loadtest"]["profiles"]["tiny"] = {
        "startRate": 30,
        "warmupS": 1,
        "stages": [{"duration": "3s", "target": 30}],
        "preAllocatedVus": 10,
        "maxVus": 30,
    }
    doc["loadtest"]["profile"] = "tiny"
    cfg = StackConfig.model_validate(doc)
    TaskSink.count = 0
    sink = ThreadingHTTPServer(("127.0.0.1", 0), TaskSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    base_url = f"http://127.0.0.1:{sink.server_address[1]}"
    runners, procs = 3, []
    ports = [free_port() for _ in range(runners + 1)]
    try:
        for i in range(runners + 1):
            summary = str(tmp_path / f"summary-{i}.json")
            env = {
                **os.environ,
                **k6_env(cfg, base_url=base_url, test_id="lp-e2e", prometheus_rw_url=None, summary_path=summary),
            }
            if i < runners:  # a runner pod: the Job's wrapper with its completion index
                env["JOB_COMPLETION_INDEX"] = str(i)
                env["PATH"] = f"{Path(tool('k6')).parent}{os.pathsep}{env['PATH']}"  # as k6 is in the k6 image
                argv = [
                    "sh",
                    "-c",
                    runner_script(
                        runners, "lp-e2e", script=str(SCRIPT), address=f"127.0.0.1:{ports[i]}", remote_write=False
                    ),
                ]
            else:  # the reference: one unsegmented k6, also paused and resumed by the barrier
                argv = [
                    tool("k6"),
                    "run",
                    "--paused",
                    "--no-usage-report",
                    "--address",
                    f"127.0.0.1:{ports[i]}",
                    str(SCRIPT),
                ]
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        targets = [f"127.0.0.1:{p}" for p in ports]
        asyncio.run(k6_start.wait_until_paused(lambda: targets, runners + 1, timeout_s=120, poll_s=0.2))
        asyncio.run(k6_start.resume(targets))
        for p in procs:
            assert p.wait(timeout=120) == 0, p.stderr.read() if p.stderr else ""
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        sink.shutdown()
        sink.server_close()
    per_runner = [k6_requests(tmp_path / f"summary-{i}.json") for i in range(runners)]
    reference = k6_requests(tmp_path / f"summary-{runners}.json")
    assert reference > 50
    assert all(n > 0 for n in per_runner)
    assert sum(per_runner) == reference
    assert TaskSink.count == 2 * reference


# ---------------------------------------------------------------------------- one run, one unit


class KeeperMocks(render.RecordingMocks):
    """A RandomId whose hex follows its keepers, as the provider's does: a new id whenever any keeper changes."""

    def output_state(self, args: Any, state: dict[str, Any]) -> dict[str, Any]:
        if args.typ == "random:index/randomId:RandomId":
            keepers = json.dumps(render.to_plain(args.inputs)["keepers"], sort_keys=True)
            return {**state, "hex": hashlib.sha256(keepers.encode()).hexdigest()[:8]}
        return state


def job_names(cfg: StackConfig) -> dict[str, str]:
    """The rendered Jobs by component (k6 = runners, k6-start = barrier, report)."""
    objects = render.evaluate(cfg, mocks=KeeperMocks(profile=cfg.loadtest.profile)).manifests()
    jobs = [o for o in objects if o["kind"] == "Job"]
    return {o["metadata"]["labels"]["app.kubernetes.io/component"]: o["metadata"]["name"] for o in jobs}


def _with(cfg: StackConfig, section: str | None, key: str, value: Any) -> StackConfig:
    doc = cfg.model_dump(mode="json", by_alias=True)
    (doc[section] if section else doc)[key] = value
    return StackConfig.model_validate(doc)


# Program changes (code, not stack config) that alter exactly one Job's spec, or what a Job runs.
SPEC_CHANGES: dict[str, tuple[str, str, Any]] = {
    "runner spec": ("infra.loadtest", "GO_MEMORY_SHARE", 0.8),
    "barrier spec": ("infra.loadtest", "SMALL", load("dev").loadtest.runner_resources),
    "report spec": ("infra.report", "MEASURE_MARGIN_S", 301),
    "k6 script": ("infra.loadtest", "script_text", lambda: "export default function () {}\n"),
}


@pytest.mark.parametrize("change", sorted(SPEC_CHANGES))
def test_a_changed_job_spec_renames_all_three_jobs(change: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two evaluations of the program, the second with one Job's spec changed by code (the stack config is
    the same): every Job gets a new name, i.e. the whole run is replaced, never one Job under an old id."""
    import importlib

    cfg = load("dev")
    before = job_names(cfg)
    assert job_names(cfg) == before, "no change renames none"
    module, attr, value = SPEC_CHANGES[change]
    monkeypatch.setattr(importlib.import_module(module), attr, value)
    after = job_names(cfg)
    assert after.keys() == before.keys() == {"k6", "k6-start", "report"}
    assert set(after.values()).isdisjoint(before.values()), (change, before, after)


@pytest.mark.parametrize(
    ("section", "key", "value"), [(None, "image", "registry.example.com/loadproof:2"), ("loadtest", "image", "k6:9")]
)
def test_a_changed_image_renames_all_three_jobs(section: str | None, key: str, value: str) -> None:
    before = job_names(load("dev"))
    after = job_names(_with(load("dev"), section, key, value))
    assert set(after.values()).isdisjoint(before.values())


def test_the_run_id_hashes_the_job_specs_not_their_names() -> None:
    """The run id's keeper is computed from the specs with a placeholder id (their names derive from the id)."""
    ev = render.evaluate(load("dev"))
    (rid,) = [r for r in ev.mocks.resources if r.typ == "random:index/randomId:RandomId"]
    keepers = render.to_plain(rid.inputs)["keepers"]
    assert set(keepers) == {"runId", "config", "jobs"}
    assert render.MOCK_RUN_HEX not in json.dumps(keepers)


def test_runners_and_report_are_replaced_with_the_barrier() -> None:
    """replaceWith: whenever the barrier (root of the run) is replaced, by a change or as unready, the
    engine replaces the runner and report Jobs with it; the barrier itself follows both (below)."""
    ev = render.evaluate(load("dev"))
    assert ev.replaced_with("loadtest-runners-job", "loadtest-start-job")
    assert ev.replaced_with("report-job", "loadtest-start-job")
    assert not ev.monitor.replace_with["loadtest-start-job"]  # the root
    # The report must not wait for the barrier, which finishes after it: that would deadlock the up.
    assert not ev.waits_for("report-job", "loadtest-start-job")
    objects = ev.manifests()
    start = render.find(objects, "Job", f"k6-start-{render.MOCK_RUN_HEX}")
    args = start["spec"]["template"]["spec"]["containers"][0]["args"]
    followed = [args[i + 1] for i, a in enumerate(args) if a == "--follow-job"]
    assert followed == [f"k6-{render.MOCK_RUN_HEX}", f"report-{render.MOCK_RUN_HEX}"]  # in the order they run
    follow_s = float(args[args.index("--follow-timeout-s") + 1])
    runner_deadline = render.find(objects, "Job", f"k6-{render.MOCK_RUN_HEX}")["spec"]["activeDeadlineSeconds"]
    report_deadline = render.find(objects, "Job", f"report-{render.MOCK_RUN_HEX}")["spec"]["activeDeadlineSeconds"]
    assert runner_deadline + report_deadline < follow_s < start["spec"]["activeDeadlineSeconds"]


def _finished(ok: bool) -> dict[str, Any]:
    return {"status": {"conditions": [{"type": "Complete" if ok else "Failed", "status": "True"}]}}


def test_follow_jobs_waits_for_each_job_in_turn() -> None:
    statuses: dict[str, Any] = {"a": {}, "b": None}
    calls: list[str] = []

    def get(name: str) -> Any:
        calls.append(name)
        if len(calls) == 3:  # a finishes; b appears (Pulumi creates it once a completed) and finishes
            statuses.update(a=_finished(True)["status"], b=_finished(True)["status"])
        return statuses[name]

    k6_start.follow_jobs(get, ["a", "b"], timeout_s=5, poll_s=0.01)
    assert calls[0] == "a" and calls[-1] == "b"
    with pytest.raises(RuntimeError, match="Job b failed"):
        k6_start.follow_jobs({"a": _finished(True)["status"], "b": _finished(False)["status"]}.get, ["a", "b"], 5, 0)
    with pytest.raises(TimeoutError, match="Job a did not finish"):
        k6_start.follow_jobs(lambda _: None, ["a"], timeout_s=0.05, poll_s=0.01)
    assert k6_start.job_outcome({"conditions": [{"type": "Failed", "status": "False"}]}) is None


ABORTING_SCRIPT = """
import exec from 'k6/execution';
export const options = { scenarios: { a: { executor: 'per-vu-iterations', vus: 1, iterations: 1 } } };
export default function () { exec.test.abort('a runner failing after the start'); }
"""


@pytest.mark.parametrize(
    ("runner_fails", "report_fails"), [(False, False), (True, False), (False, True)], ids=["ok", "runners", "report"]
)
def test_the_barrier_ends_unready_whenever_the_run_does(
    runner_fails: bool, report_fails: bool, api_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The unready case, end to end: the real runner wrapper and real k6 (one runner), the barrier's
    ``main`` with the rendered Job's own arguments and Role (only the Service address and the deadline
    are local), a stand-in API server whose Job statuses follow the real processes. Runners failing
    after the barrier released them, or the report failing, must fail the barrier too: the barrier is
    then unready, and the next up replaces it and (replaceWith) the other two."""
    objects = render.evaluate(load("dev")).manifests()
    hexid = render.MOCK_RUN_HEX
    runners_job, report_job, start_cm = f"k6-{hexid}", f"report-{hexid}", f"k6-start-{hexid}"
    FakeApiServer.store[start_cm] = render.find(objects, "ConfigMap", start_cm)
    FakeApiServer.rules = render.find(objects, "Role", "k6-start")["rules"]
    monkeypatch.setattr(Kube, "in_cluster", classmethod(lambda cls: Kube(api_server, FakeApiServer.token, False)))
    monkeypatch.setattr(k6_start, "FOLLOW_POLL_S", 0.2)

    script = tmp_path / "s.js"
    script.write_text(ABORTING_SCRIPT if runner_fails else SCRIPT)
    port = free_port()
    env = {
        **os.environ,
        "JOB_COMPLETION_INDEX": "0",
        "PATH": f"{Path(tool('k6')).parent}{os.pathsep}{os.environ['PATH']}",
    }
    wrapper = runner_script(1, f"lp-{hexid}", script=str(script), address=f"127.0.0.1:{port}", remote_write=False)
    log = tmp_path / "runner.log"
    with log.open("w") as out:
        runner = subprocess.Popen(["sh", "-c", wrapper], env=env, stdout=out, stderr=subprocess.STDOUT)

    def job_controller() -> None:
        """The runner Job's status from the real process; then Pulumi creating the report Job (only after
        the runners completed) and its outcome."""
        FakeApiServer.store[runners_job] = {"status": {}}
        ok = runner.wait(timeout=120) == 0
        FakeApiServer.store[runners_job] = _finished(ok)
        if ok:
            FakeApiServer.store[report_job] = {"status": {}}
            time.sleep(0.5)
            FakeApiServer.store[report_job] = _finished(not report_fails)

    controller = threading.Thread(target=job_controller, daemon=True)
    controller.start()
    try:
        job = render.find(objects, "Job", start_cm)["spec"]["template"]["spec"]["containers"][0]
        assert job["command"] == ["python", "-m", "loadtest.k6_start"]
        args = list(job["args"])
        args[args.index("--service") + 1] = "127.0.0.1"
        args[args.index("--port") + 1] = str(port)
        args[args.index("--count") + 1] = "1"
        for flag in ("--timeout-s", "--follow-timeout-s"):  # the rendered barrier must have the second
            if flag in args:
                args[args.index(flag) + 1] = "60"
        rc = k6_start.main(args)
    finally:
        if runner.poll() is None:
            runner.kill()
        runner.wait()
        controller.join(timeout=10)
    assert (runner.returncode != 0) == runner_fails, log.read_text()
    assert float(FakeApiServer.store[start_cm]["data"]["started_at"]) > 0  # the barrier did release the runner
    assert rc == (1 if runner_fails or report_fails else 0)
