"""The rendered cluster: valid Kubernetes objects, hardened pods, secrets only in Secrets, right wiring.

Everything here evaluates the real Pulumi program (``infra/program.py``) under Pulumi's mocks and
inspects the recorded inputs as manifests (``infra/render.py``); nothing is applied to a cluster.
"""

from __future__ import annotations

import configparser
from typing import Any

import pytest
import yaml

from common import k6config, stackfile
from common.outputs import STACK_OUTPUTS
from common.stackconfig import REPO_ROOT, StackConfig, load
from infra import kube, postgres, redis, render
from infra.orchestrator import PRESTOP_SLEEP_S, grace_period_s
from loadtest import report_job
from service.config import Settings
from service.orchestrator import drain_delay_s

WORKLOAD_KINDS = ("Deployment", "StatefulSet")


def with_changes(cfg: StackConfig, changes: dict[str, Any]) -> StackConfig:
    """A copy of ``cfg`` with dotted camelCase paths set (validated by the schema again)."""
    doc = cfg.model_dump(mode="json", by_alias=True)
    for path, value in changes.items():
        node = doc
        *parents, last = path.split(".")
        for p in parents:
            node = node[p]
        node[last] = value
    return StackConfig.model_validate(doc)


@pytest.fixture(scope="module")
def dev() -> render.Evaluation:
    return render.evaluate(load("dev"))


@pytest.fixture(scope="module")
def objects(dev: render.Evaluation) -> list[dict[str, Any]]:
    return dev.manifests()


def pod_specs(objects: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for o in objects:
        if o["kind"] in (*WORKLOAD_KINDS, "Job"):
            out.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
    return out


def container(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return render.find(objects, kind, name)["spec"]["template"]["spec"]["containers"][0]


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c.get("env", [])}


STACKS = sorted(stackfile.HEADERS)  # every Pulumi.<stack>.yaml (tests/test_infra_config.py checks the set)


@pytest.mark.parametrize("stack", STACKS)
def test_every_object_is_valid_for_kubernetes_and_promtool_and_k6(stack: str) -> None:
    objects = render.evaluate(load(stack), stack=stack).manifests()
    assert len(objects) > 40
    assert render.check_all(objects) == []


def test_validation_catches_a_misspelt_field(objects: list[dict[str, Any]]) -> None:
    bad = yaml.safe_load(yaml.safe_dump(render.find(objects, "Deployment", "orchestrator")))
    bad["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {}
    problems = render.validate([bad])
    assert problems and all("livenesProbe" in p for p in problems)


def test_rendering_is_idempotent() -> None:
    first = render.evaluate(load("dev")).manifests()
    second = render.evaluate(load("dev")).manifests()
    assert yaml.safe_dump_all(first) == yaml.safe_dump_all(second)


def test_render_cli_writes_one_object_per_file(tmp_path: Any) -> None:
    assert render.main(["--stack", "kind", "--out", str(tmp_path)]) == 0
    files = sorted((tmp_path / "kind").glob("*.yaml"))
    assert files[0].name == "00-namespace-loadproof.yaml"
    assert all(len(list(yaml.safe_load_all(f.read_text()))) == 1 for f in files)
    # The files read back as exactly the rendered objects; multi-line text is a readable block.
    objects = render.evaluate(load("kind"), stack="kind").manifests()
    assert [yaml.safe_load(f.read_text()) for f in files] == objects
    script = next(f for f in files if f.name.endswith("-configmap-k6-script.yaml")).read_text()
    assert "task.js: |" in script and "\n  task.js:" in script
    assert any(f.name.startswith(f"{len(files) - 1:02d}-job-report-") for f in files)


def test_every_pod_is_hardened(objects: list[dict[str, Any]]) -> None:
    specs = pod_specs(objects)
    assert len(specs) >= 9
    for where, spec in specs:
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] > 0, where
        assert psc["seccompProfile"]["type"] == "RuntimeDefault", where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            res = c["resources"]
            assert set(res["requests"]) == {"cpu", "memory"} and set(res["limits"]) == {"cpu", "memory"}, where


def test_long_running_containers_and_k6_runners_have_probes(objects: list[dict[str, Any]]) -> None:
    for where, spec in pod_specs(objects):
        if where.startswith("Job/") and "completionMode" not in render.find(objects, "Job", where.split("/", 1)[1]).get(
            "spec", {}
        ):
            continue  # start/report Jobs: run-to-completion scripts, nothing to probe
        for c in spec["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, f"{where}/{c['name']}"


def test_only_pods_that_talk_to_the_api_get_a_token(objects: list[dict[str, Any]]) -> None:
    with_token = {w for w, spec in pod_specs(objects) if spec.get("automountServiceAccountToken") is not False}
    assert with_token == {"Deployment/prometheus", "Job/k6-start-1a2b3c4d", "Job/report-1a2b3c4d"}


def test_no_secret_outside_secrets() -> None:
    """Generated passwords and every secret config value appear only in Secret objects."""
    cfg = with_changes(
        load("dev"),
        {
            "postgres.mode": "external",
            "redis.mode": "external",
            "llm.mode": "external",
            "llm.baseUrl": "https://api.example.com/v1",
        },
    )
    for evaluation in (render.evaluate(cfg), render.evaluate(load("dev"))):
        objects = evaluation.manifests()
        needles = [*render.MOCK_SECRETS.values()] + [
            render.mock_password(r.name) for r in evaluation.mocks.resources if r.typ.endswith("RandomPassword")
        ]
        secrets_text = yaml.safe_dump_all([o for o in objects if o["kind"] == "Secret"])
        for o in objects:
            if o["kind"] == "Secret":
                continue
            text = yaml.safe_dump(o)
            for needle in needles:
                assert needle not in text, f"{o['kind']}/{o['metadata']['name']} contains a secret"
        # ...and they did reach their Secrets (so the scan looked for real values).
        used = [n for n in needles if n in secrets_text]
        assert used, "no secret value found in any Secret"
    assert all(n in yaml.safe_dump_all(render.evaluate(cfg).manifests()) for n in render.MOCK_SECRETS.values())


def test_service_env_and_secret_refs_reach_api_and_workers() -> None:
    cfg = with_changes(load("dev"), {"orchestrator.dbPoolSize": 13, "workers.batchSize": 7})
    objects = render.evaluate(cfg).manifests()
    for name in ("orchestrator", "workers"):
        env = env_of(container(objects, "Deployment", name))
        assert env["LOADPROOF_DB_POOL_SIZE"] == "13"
        assert env["LOADPROOF_BATCH_SIZE"] == "7"
        for key, value in cfg.service_env().items():
            assert env[key] == value
        assert env["LOADPROOF_HOST"] == "0.0.0.0"
        for var in ("LOADPROOF_DATABASE_URL", "LOADPROOF_REDIS_URL"):
            assert set(env[var]) == {"secretKeyRef"}, var
    workers_env = env_of(container(objects, "Deployment", "workers"))
    assert workers_env["LOADPROOF_LLM_BASE_URL"] == "http://simulator.loadproof.svc:8090/v1"
    assert set(workers_env["LOADPROOF_LLM_API_KEY"]) == {"secretKeyRef"}
    # The API only queues tasks: it never gets the LLM's key (least privilege).
    api_env = env_of(container(objects, "Deployment", "orchestrator"))
    assert "LOADPROOF_LLM_API_KEY" not in api_env and "LOADPROOF_LLM_BASE_URL" not in api_env
    sim_env = env_of(container(objects, "Deployment", "simulator"))
    for key, value in cfg.simulator_env().items():
        assert sim_env[key] == value


def test_api_rollout_drain_and_scaling(objects: list[dict[str, Any]]) -> None:
    cfg = load("dev")
    api = render.find(objects, "Deployment", "orchestrator")
    spec = api["spec"]["template"]["spec"]
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["terminationGracePeriodSeconds"] > cfg.orchestrator.shutdown_timeout_s
    assert spec["terminationGracePeriodSeconds"] == grace_period_s(cfg.orchestrator.shutdown_timeout_s)
    c = spec["containers"][0]
    assert c["command"] == ["python", "-m", "service.orchestrator"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    ann = dict(api["spec"]["template"]["metadata"]["annotations"])  # a copy: the fixture is shared
    assert ann.pop("loadproof.dev/redis-credentials")  # see test_clients_roll_when_the_redis_password_changes
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8080", "prometheus.io/path": "/metrics"}
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "loadproof" and labels["app.kubernetes.io/component"] == "orchestrator"
    workers = container(objects, "Deployment", "workers")
    assert workers["command"] == ["python", "-m", "service.worker"]
    hpa = render.find(objects, "HorizontalPodAutoscaler", "orchestrator")["spec"]
    a = cfg.orchestrator.autoscale
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (a.min_replicas, a.max_replicas)
    assert hpa["metrics"][0]["resource"]["target"]["averageUtilization"] == a.cpu_utilization
    assert hpa["scaleTargetRef"]["name"] == "orchestrator"
    for name in ("orchestrator", "workers"):
        assert render.find(objects, "PodDisruptionBudget", name)["spec"]["maxUnavailable"] == 1


def test_data_stores_are_configured_from_the_stack(objects: list[dict[str, Any]]) -> None:
    cfg = load("dev")
    pg = render.find(objects, "StatefulSet", "postgres")["spec"]
    assert pg["template"]["spec"]["containers"][0]["args"] == ["-c", f"max_connections={cfg.postgres.max_connections}"]
    assert pg["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == cfg.postgres.storage
    args = container(objects, "Deployment", "redis")["args"]
    assert args[args.index("--maxmemory") + 1] == cfg.redis.maxmemory
    assert args[args.index("--maxmemory-policy") + 1] == cfg.redis.maxmemory_policy
    assert args[args.index("--appendonly") + 1] == "yes"


def test_prometheus_is_private_and_grafana_is_the_public_entry(objects: list[dict[str, Any]]) -> None:
    assert render.find(objects, "Service", "prometheus")["spec"]["type"] == "ClusterIP"
    assert all(o["spec"].get("type", "ClusterIP") == "ClusterIP" for o in objects if o["kind"] == "Service")
    assert [o["metadata"]["name"] for o in objects if o["kind"] == "Ingress"] == ["grafana"]
    args = container(objects, "Deployment", "prometheus")["args"]
    assert "--web.enable-remote-write-receiver" in args and "--enable-feature=native-histograms" in args
    role = render.find(objects, "Role", "prometheus-discovery")
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    scrape = yaml.safe_load(render.find(objects, "ConfigMap", "prometheus-config")["data"]["prometheus.yml"])
    roles = {sd["role"] for job in scrape["scrape_configs"] for sd in job.get("kubernetes_sd_configs", [])}
    assert roles == {"pod"}  # what the Role grants is exactly what discovery uses
    (size,) = [a.split("=", 1)[1] for a in args if a.startswith("--storage.tsdb.retention.size=")]
    pvc = render.find(objects, "PersistentVolumeClaim", "prometheus-data")["spec"]["resources"]["requests"]["storage"]
    assert int(size.removesuffix("MB")) * 2**20 < kube.memory_bytes(pvc)
    assert not [o for o in objects if o["kind"] in ("ClusterRole", "ClusterRoleBinding")]


def test_grafana_ingress_host_class_and_tls() -> None:
    plain = render.evaluate(load("dev")).manifests()
    ing = render.find(plain, "Ingress", "grafana")
    assert ing["spec"]["rules"][0]["host"] == "grafana.loadproof.local"
    assert ing["spec"]["ingressClassName"] == "nginx"
    assert "tls" not in ing["spec"] and "cert-manager.io/cluster-issuer" not in ing["metadata"].get("annotations", {})
    cfg = with_changes(
        load("dev"),
        {
            "monitoring.grafana.host": "dash.example.org",
            "monitoring.grafana.ingressClass": "traefik",
            "monitoring.grafana.tls": True,
            "monitoring.grafana.certIssuer": "letsencrypt-prod",
        },
    )
    evaluation = render.evaluate(cfg)
    ing = render.find(evaluation.manifests(), "Ingress", "grafana")
    assert ing["spec"]["rules"][0]["host"] == "dash.example.org"
    assert ing["spec"]["ingressClassName"] == "traefik"
    assert ing["spec"]["tls"] == [{"hosts": ["dash.example.org"], "secretName": "grafana-tls"}]
    assert ing["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == "letsencrypt-prod"
    assert evaluation.outputs["grafana_url"] == "https://dash.example.org/"
    ini = render.find(evaluation.manifests(), "ConfigMap", "grafana-ini")["data"]["grafana.ini"]
    assert "cookie_secure = true" in ini and "strict_transport_security = true" in ini


def _grafana_ini(objects: list[dict[str, Any]]) -> configparser.ConfigParser:
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(render.find(objects, "ConfigMap", "grafana-ini")["data"]["grafana.ini"])
    return ini


def test_grafana_tls_from_a_provided_secret() -> None:
    """``tlsSecret`` alone: the Ingress serves that Secret, no cert-manager annotation, https everywhere."""
    cfg = with_changes(
        load("dev"),
        {
            "monitoring.grafana.host": "dash.example.org",
            "monitoring.grafana.tls": True,
            "monitoring.grafana.tlsSecret": "dash-example-org",
        },
    )
    evaluation = render.evaluate(cfg)
    objects = evaluation.manifests()
    ing = render.find(objects, "Ingress", "grafana")
    assert ing["spec"]["tls"] == [{"hosts": ["dash.example.org"], "secretName": "dash-example-org"}]
    assert "cert-manager.io/cluster-issuer" not in (ing["metadata"].get("annotations") or {})
    assert evaluation.outputs["grafana_url"] == "https://dash.example.org/"
    ini = _grafana_ini(objects)
    assert ini.get("server", "root_url") == "https://dash.example.org/"
    assert ini.get("security", "cookie_secure") == "true"
    assert ini.get("security", "strict_transport_security") == "true"


@pytest.mark.parametrize("stack", ["dev", "kind", "k3d"])
def test_public_grafana_needs_a_login_by_default(stack: str) -> None:
    """No anonymous session on the public URL unless ``anonymousViewing`` opts in; the admin password is
    a secret output."""
    evaluation = render.evaluate(load(stack), stack=stack)
    ini = _grafana_ini(evaluation.manifests())
    assert ini.get("auth.anonymous", "enabled") == "false"
    assert ini.get("auth", "disable_login_form", fallback="false") == "false"
    assert evaluation.outputs["grafana_url"].startswith("http://")
    assert "grafana_admin_password" in evaluation.secret_outputs
    assert "grafana_url" not in evaluation.secret_outputs


def test_grafana_is_provisioned_with_datasource_and_dashboards(objects: list[dict[str, Any]]) -> None:
    ds = yaml.safe_load(render.find(objects, "ConfigMap", "grafana-datasources")["data"]["datasources.yaml"])
    assert ds["datasources"][0]["uid"] == "loadproof-prometheus"
    assert ds["datasources"][0]["url"] == "http://prometheus.loadproof.svc:9090"
    boards = render.find(objects, "ConfigMap", "grafana-dashboards")["data"]
    assert {"overview.json", "service-internals.json"} <= set(boards)
    env = env_of(container(objects, "Deployment", "grafana"))
    assert set(env["GF_SECURITY_ADMIN_PASSWORD"]) == {"secretKeyRef"}


def test_outputs_carry_every_measured_key_and_the_secret_password(dev: render.Evaluation) -> None:
    out = dev.outputs
    assert set(STACK_OUTPUTS) <= set(out)
    assert out["report"]["mock"] is True  # the mock report, never a measured number
    assert out["test_id"] == f"lp-{render.MOCK_RUN_HEX}"
    assert out["grafana_url"] == "http://grafana.loadproof.local/"
    assert out["grafana_admin_password"] == render.mock_password("monitoring-grafana-admin-password")


class JobRenamingMocks(render.RecordingMocks):
    """A provider whose Job outputs carry a name the program could not have computed itself."""

    def output_state(self, args: Any, state: dict[str, Any]) -> dict[str, Any]:
        if args.typ == "kubernetes:batch/v1:Job" and args.name == "report-job":
            state = {**state, "metadata": {**state["metadata"], "name": "name-from-job-outputs"}}
        return state


def test_report_read_back_waits_for_the_report_job() -> None:
    mocks = JobRenamingMocks()
    render.evaluate(load("dev"), mocks=mocks)
    reports = [r for r in mocks.reads if r[0] == "kubernetes:core/v1:ConfigMap"]
    assert reports == [("kubernetes:core/v1:ConfigMap", "loadproof/name-from-job-outputs")]


def test_report_job_runs_after_the_runners_and_writes_its_configmap(objects: list[dict[str, Any]]) -> None:
    job = render.find(objects, "Job", f"report-{render.MOCK_RUN_HEX}")
    c = job["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == ["python", "-m", "loadtest.report_job"]
    assert "pulumi.com/skipAwait" not in job["metadata"].get("annotations", {})
    # One ServiceAccount and Role per Job, each limited to named objects; nothing may create or delete.
    # The barrier also reads the run's runner and report Jobs, which it follows (one run, one unit).
    start, report = f"k6-start-{render.MOCK_RUN_HEX}", f"report-{render.MOCK_RUN_HEX}"
    runners = f"k6-{render.MOCK_RUN_HEX}"
    grants = {
        name: {
            (r["resources"][0], n, verb)
            for r in render.find(objects, "Role", name)["rules"]
            for n in r["resourceNames"]
            for verb in r["verbs"]
        }
        for name in ("k6-start", "report")
    }
    assert grants == {
        "k6-start": {("configmaps", start, "patch"), ("jobs", runners, "get"), ("jobs", report, "get")},
        "report": {("configmaps", start, "get"), ("configmaps", report, "patch")},
    }
    for name in ("k6-start", "report"):
        for r in render.find(objects, "Role", name)["rules"]:
            assert (r["apiGroups"], r["resources"]) in ((["batch"], ["jobs"]), ([""], ["configmaps"]))
        binding = render.find(objects, "RoleBinding", name)
        assert binding["roleRef"]["name"] == name and binding["subjects"][0]["name"] == name
    # Pulumi creates both ConfigMaps (the Jobs cannot) and keeps them when a re-run replaces them.
    for name in (start, report):
        assert "data" not in render.find(objects, "ConfigMap", name)


def test_entry_point_runs_the_way_pulumi_runs_it(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """``runpy.run_path("infra")`` (what Pulumi's Python host does) from another directory, under mocks."""
    import runpy
    import sys

    import pulumi

    from common.stackconfig import REPO_ROOT

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [str(REPO_ROOT / "infra"), *sys.path])
    mocks = render.RecordingMocks()
    pulumi.runtime.set_mocks(mocks, project="loadproof", stack="dev", preview=False)
    pulumi.runtime.set_all_config(render.config_values(load("dev")))

    @pulumi.runtime.test
    def run() -> None:
        runpy.run_path(str(REPO_ROOT / "infra"), run_name="__main__")

    run()
    assert yaml.safe_dump_all(render.manifests(mocks.resources)) == yaml.safe_dump_all(
        render.evaluate(load("dev")).manifests()
    )


def _allowed(objects: list[dict[str, Any]], src: str, dst: str, port: int) -> bool:
    """Both halves of a connection are open: egress on the source pods and ingress on the destination."""
    policies = [o["spec"] for o in objects if o["kind"] == "NetworkPolicy"]

    def selects(spec: dict[str, Any], component: str) -> bool:
        labels = spec["podSelector"].get("matchLabels")
        return labels is not None and labels.get("app.kubernetes.io/component") == component

    def peer_is(peers: list[dict[str, Any]], component: str) -> bool:
        return any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app.kubernetes.io/component") == component
            for p in peers
        )

    def port_ok(rule: dict[str, Any]) -> bool:
        return "ports" not in rule or any(p["port"] == port for p in rule["ports"])

    egress = any(peer_is(r["to"], dst) and port_ok(r) for s in policies if selects(s, src) for r in s.get("egress", []))
    ingress = any(
        peer_is(r["from"], src) and port_ok(r) for s in policies if selects(s, dst) for r in s.get("ingress", [])
    )
    return egress and ingress


def test_network_is_default_deny_with_exact_flows(objects: list[dict[str, Any]]) -> None:
    deny = render.find(objects, "NetworkPolicy", "default-deny")["spec"]
    assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress", "Egress"]
    dns = render.find(objects, "NetworkPolicy", "allow-dns")["spec"]["egress"][0]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert {(p["port"], p["protocol"]) for p in dns["ports"]} == {(53, "UDP"), (53, "TCP")}
    expected = [
        ("k6", "orchestrator", 8080),
        ("k6", "prometheus", 9090),
        ("k6-start", "k6", 6565),
        ("prometheus", "orchestrator", 8080),
        ("prometheus", "workers", 9101),
        ("orchestrator", "postgres", 5432),
        ("workers", "postgres", 5432),
        ("report", "postgres", 5432),
        ("orchestrator", "redis", 6379),
        ("workers", "redis", 6379),
        ("workers", "simulator", 8090),
        ("grafana", "prometheus", 9090),
        ("report", "prometheus", 9090),
    ]
    for src, dst, port in expected:
        assert _allowed(objects, src, dst, port), f"{src} -> {dst}:{port} is blocked"
    for src, dst, port in [
        ("k6", "postgres", 5432),
        ("grafana", "orchestrator", 8080),
        ("orchestrator", "prometheus", 9090),
        ("orchestrator", "simulator", 8090),
        ("k6", "orchestrator", 5432),
        ("simulator", "redis", 6379),
    ]:
        assert not _allowed(objects, src, dst, port), f"{src} -> {dst}:{port} should be denied"
    grafana_in = render.find(objects, "NetworkPolicy", "allow-grafana")["spec"]["ingress"]
    assert grafana_in[0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    # Prometheus (discovery) and the report/start Jobs (ConfigMaps) reach the API server; nobody else leaves.
    leaves_cluster = {
        o["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for o in objects
        if o["kind"] == "NetworkPolicy" and any("ipBlock" in p for r in o["spec"].get("egress", []) for p in r["to"])
    }
    assert leaves_cluster == {"prometheus", "report", "k6-start"}


def test_namespace_guard_rails(objects: list[dict[str, Any]]) -> None:
    cfg = load("dev")
    ns = render.find(objects, "Namespace", "loadproof")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    quota = render.find(objects, "ResourceQuota", "loadproof-quota")["spec"]["hard"]
    assert quota == {
        "requests.cpu": cfg.baseline.quota_cpu,
        "requests.memory": cfg.baseline.quota_memory,
        "limits.cpu": cfg.baseline.quota_cpu_limits,
        "limits.memory": cfg.baseline.quota_memory_limits,
        "pods": str(cfg.baseline.quota_pods),
    }
    assert render.find(objects, "LimitRange", "loadproof-limits")["spec"]["limits"][0]["type"] == "Container"


# KEDA on and installed. The kind and k3d stacks are sized for it; dev needs more Postgres connections.
KEDA_ON = {"workers.autoscaling.enabled": True, "baseline.kedaInstall": True}
KEDA_CHANGES = {
    "dev": {**KEDA_ON, "postgres.maxConnections": 5000},
    "eks": {**KEDA_ON, "postgres.maxConnections": 5000},
    "kind": KEDA_ON,
    "k3d": KEDA_ON,
}


@pytest.mark.parametrize("keda", [False, True], ids=["fixed-workers", "keda"])
@pytest.mark.parametrize("stack", STACKS)
def test_quota_fits_the_stack_at_full_scale(stack: str, keda: bool) -> None:
    """Peak requests and limits (HPA and KEDA at max, one surge pod per rolling Deployment, all Jobs) fit the
    ResourceQuota."""
    cfg = with_changes(load(stack), KEDA_CHANGES[stack]) if keda else load(stack)
    objects = render.evaluate(cfg, stack=stack).manifests()
    peak = {"orchestrator": cfg.orchestrator.autoscale.max_replicas, "workers": cfg.workers.peak_replicas}
    totals = {"requests.cpu": 0.0, "requests.memory": 0.0, "limits.cpu": 0.0, "limits.memory": 0.0, "pods": 0.0}
    for o in objects:
        if o["kind"] not in (*WORKLOAD_KINDS, "Job"):
            continue
        spec = o["spec"]
        if o["kind"] == "Job":
            n = spec.get("parallelism", 1)
        elif o["kind"] == "StatefulSet":
            n = spec.get("replicas", 1)
        else:
            name = o["metadata"]["name"]
            base: int = peak[name] if name in peak else spec["replicas"]
            # RollingUpdate (also the default when no strategy is set) runs a surge pod; Recreate does not.
            n = base + (0 if spec.get("strategy", {}).get("type") == "Recreate" else 1)
        for c in spec["template"]["spec"]["containers"]:
            for kind in ("requests", "limits"):
                totals[f"{kind}.cpu"] += n * kube.cpu_cores(c["resources"][kind]["cpu"])
                totals[f"{kind}.memory"] += n * kube.memory_bytes(c["resources"][kind]["memory"])
        totals["pods"] += n
    hard = render.find(objects, "ResourceQuota", "loadproof-quota")["spec"]["hard"]
    assert set(hard) == set(totals)
    for key, used in totals.items():
        limit = kube.cpu_cores(hard[key]) if key.endswith("cpu") else kube.memory_bytes(hard[key])
        assert used <= limit, f"{key}: {used} needed at full scale, quota {hard[key]}"


@pytest.mark.parametrize("stack", STACKS)
def test_redis_evicts_before_the_oom_killer(stack: str) -> None:
    cfg = load(stack)
    r = cfg.redis
    assert redis.redis_bytes(r.maxmemory) <= redis.MAXMEMORY_SHARE * kube.memory_bytes(r.resources.memory_limit)
    assert redis.redis_bytes("256mb") == 256 * 2**20 and redis.redis_bytes("1g") == 10**9
    with pytest.raises(Exception, match=r"redis\.maxmemory"):
        render.evaluate(with_changes(cfg, {"redis.maxmemory": r.resources.memory_limit.replace("Mi", "mb")}))
    # Eviction only touches keys with a TTL (cached posts), never the queue stream.
    assert r.maxmemory_policy.startswith("volatile-")


def test_ordering_service_then_runners_then_report(dev: render.Evaluation) -> None:
    """Registered dependencies: runners wait for the service and Prometheus; the report for the runners
    but not for the barrier, which follows the report and so finishes after it (one run, one unit)."""
    assert dev.waits_for("report-job", "loadtest-runners-job")
    assert not dev.waits_for("report-job", "loadtest-start-job")
    for runner_dep in ("orchestrator-api", "orchestrator-workers", "monitoring-prometheus"):
        assert dev.waits_for("loadtest-runners-job", runner_dep)
        assert dev.waits_for("loadtest-start-job", runner_dep)
    assert not dev.waits_for("loadtest-runners-job", "loadtest-start-job")  # created together (barrier)
    assert not dev.waits_for("loadtest-runners-job", "monitoring-grafana-ingress")
    assert dev.waits_for("report-result", "report-job")
    assert dev.waits_for("orchestrator-api", "postgres-statefulset")
    assert dev.waits_for("orchestrator-workers", "simulator-deployment")
    assert not dev.waits_for("orchestrator-api", "simulator-deployment")


@pytest.mark.parametrize("stack", STACKS)
def test_references_resolve_within_the_stack(stack: str) -> None:
    """Every mounted volume exists; every ConfigMap, Secret (and key), PVC, ServiceAccount and Service
    a pod or object refers to is rendered too; no mount is nested inside another."""
    objects = render.evaluate(load(stack), stack=stack).manifests()
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    secret_keys = {o["metadata"]["name"]: set(o.get("stringData", {})) for o in objects if o["kind"] == "Secret"}
    for where, spec in pod_specs(objects):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claim_templates = set()
        for o in objects:
            if o["kind"] == "StatefulSet" and f"StatefulSet/{o['metadata']['name']}" == where:
                claim_templates = {t["metadata"]["name"] for t in o["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert ("ConfigMap", v["configMap"]["name"]) in names, where
            if "persistentVolumeClaim" in v:
                assert ("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]) in names, where
        if "serviceAccountName" in spec:
            assert ("ServiceAccount", spec["serviceAccountName"]) in names, where
        for c in spec["containers"]:
            paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in claim_templates, f"{where}: volume {m['name']}"
            for a in paths:
                for b in paths:
                    assert a == b or not b.startswith(a.rstrip("/") + "/"), f"{where}: {b} nested in {a}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secret_keys.get(ref["name"], set()), f"{where}: {ref}"
    for o in objects:
        if o["kind"] == "Ingress":
            for rule in o["spec"]["rules"]:
                for p in rule["http"]["paths"]:
                    assert ("Service", p["backend"]["service"]["name"]) in names
        if o["kind"] == "RoleBinding":
            assert ("Role", o["roleRef"]["name"]) in names
            assert all(("ServiceAccount", s["name"]) in names for s in o["subjects"])
        if o["kind"] == "HorizontalPodAutoscaler":
            assert ("Deployment", o["spec"]["scaleTargetRef"]["name"]) in names
            target = render.find(objects, "Deployment", o["spec"]["scaleTargetRef"]["name"])
            assert o["spec"]["minReplicas"] <= target["spec"]["replicas"] <= o["spec"]["maxReplicas"]
        if o["kind"] == "PodDisruptionBudget":
            sel = o["spec"]["selector"]["matchLabels"]
            guarded = [
                p
                for p in objects
                if p["kind"] in WORKLOAD_KINDS and sel.items() <= p["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert len(guarded) == 1, f"PodDisruptionBudget/{o['metadata']['name']} guards {len(guarded)} workloads"
            # maxUnavailable (not minAvailable): a node drain is never blocked, even at one replica.
            assert o["spec"]["maxUnavailable"] == 1 and "minAvailable" not in o["spec"]
        if o["kind"] == "Service":
            sel = o["spec"]["selector"]
            matches = [
                p
                for p in objects
                if p["kind"] in (*WORKLOAD_KINDS, "Job")
                and sel.items() <= p["spec"]["template"]["metadata"]["labels"].items()
            ]
            assert matches, f"Service/{o['metadata']['name']} selects no pods"
            # ...and only one component's pods (a Service spanning two would mix unrelated backends).
            components = {p["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] for p in matches}
            assert components == {o["metadata"]["labels"]["app.kubernetes.io/component"]}, o["metadata"]["name"]
            container_ports = {
                cp["containerPort"]
                for p in matches
                for c in p["spec"]["template"]["spec"]["containers"]
                for cp in c.get("ports", [])
            }
            for port in o["spec"]["ports"]:
                assert port["targetPort"] in container_ports, f"Service/{o['metadata']['name']} -> {port}"


def test_render_cli_fails_loudly(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert render.main(["--stack", "no-such-stack", "--out", str(tmp_path)]) == 2
    monkeypatch.setattr(render, "check_k6", lambda objects: ["k6 inspect failed: boom"])
    assert render.main(["--stack", "dev", "--out", str(tmp_path)]) == 1
    assert "k6 inspect failed: boom" in capsys.readouterr().err


def test_promtool_check_catches_a_broken_prometheus_config(objects: list[dict[str, Any]]) -> None:
    broken = yaml.safe_load(yaml.safe_dump(objects))
    cm = render.find(broken, "ConfigMap", "prometheus-config")
    cm["data"]["prometheus.yml"] = cm["data"]["prometheus.yml"].replace("scrape_interval: 5s", "scrape_interval: 5 s")
    assert render.check_prometheus(broken)


# Variables that are not Settings fields on purpose: documents read by other entry points.
NON_SETTINGS_ENV = {k6config.CONFIG_ENV: "the k6 script's config", report_job.CONFIG_ENV: "the report Job's config"}


@pytest.mark.parametrize("stack", STACKS)
def test_every_loadproof_env_var_is_a_settings_field(stack: str) -> None:
    """pydantic-settings ignores unknown variables (``extra="ignore"``): a misspelt one would silently do nothing."""
    fields = {f"LOADPROOF_{name.upper()}" for name in Settings.model_fields}
    cfg = with_changes(load(stack), {"llm.mode": "external", "llm.baseUrl": "https://api.example.com/v1"})
    seen = set()
    for objects in (render.evaluate(load(stack), stack=stack).manifests(), render.evaluate(cfg).manifests()):
        for where, spec in pod_specs(objects):
            for c in spec["containers"] + spec.get("initContainers", []):
                for e in c.get("env", []):
                    name = e["name"]
                    if name.startswith("LOADPROOF_"):
                        seen.add(name)
                        assert name in fields or name in NON_SETTINGS_ENV, f"{where}/{c['name']}: {name}"
    assert {"LOADPROOF_DB_POOL_SIZE", "LOADPROOF_SIM_TTFT_MS", "LOADPROOF_LLM_DEADLINE_S"} <= seen
    assert set(NON_SETTINGS_ENV) <= seen


def test_scrape_annotations_point_at_the_metrics_ports(objects: list[dict[str, Any]]) -> None:
    """Each scraped pod's annotated port is a container port and the port its process serves /metrics on."""
    scraped = {}
    for o in objects:
        if o["kind"] not in WORKLOAD_KINDS:
            continue
        ann = o["spec"]["template"]["metadata"].get("annotations", {})
        if ann.get("prometheus.io/scrape") != "true":
            continue
        c = o["spec"]["template"]["spec"]["containers"][0]
        port = int(ann["prometheus.io/port"])
        assert port in {p["containerPort"] for p in c["ports"]}, o["metadata"]["name"]
        assert ann["prometheus.io/path"] == "/metrics"
        scraped[o["metadata"]["name"]] = (port, env_of(c))
    assert set(scraped) == {"orchestrator", "workers"}
    api_port, api_env = scraped["orchestrator"]
    assert api_port == int(api_env["LOADPROOF_PORT"]) == kube.ORCHESTRATOR_PORT  # /metrics on the HTTP port
    workers_port, workers_env = scraped["workers"]
    assert workers_port == int(workers_env["LOADPROOF_WORKER_METRICS_PORT"]) == kube.WORKER_METRICS_PORT


@pytest.mark.parametrize("timeout_s", [1.0, 20.0, 45.5, 120.0])
def test_grace_period_covers_prestop_and_the_whole_drain(timeout_s: float) -> None:
    """preStop sleep, then the API's readiness-503 delay, then the bounded drain: all before SIGKILL."""
    cfg = with_changes(load("dev"), {"orchestrator.shutdownTimeoutS": timeout_s})
    objects = render.evaluate(cfg).manifests()
    for name in ("orchestrator", "workers"):
        spec = render.find(objects, "Deployment", name)["spec"]["template"]["spec"]
        prestop = spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
        assert prestop == ["sleep", str(PRESTOP_SLEEP_S)]
        assert spec["terminationGracePeriodSeconds"] > PRESTOP_SLEEP_S + drain_delay_s(timeout_s) + timeout_s


def test_grafana_ingress_waits_for_the_ingress_controller_it_installs() -> None:
    """ingress-nginx's admission webhook refuses Ingresses until its controller is Ready."""
    kind = render.evaluate(load("kind"), stack="kind")
    assert kind.waits_for("monitoring-grafana-ingress", "baseline-ingress-nginx")
    assert not kind.waits_for("monitoring-grafana", "baseline-ingress-nginx")  # only the Ingress waits
    dev = render.evaluate(load("dev"))
    assert "baseline-ingress-nginx" not in dev.monitor.urns


@pytest.mark.parametrize("stack", STACKS)
def test_postgres_max_connections_cover_every_pool_at_full_scale(stack: str) -> None:
    cfg = load(stack)
    demand = postgres.connection_demand(cfg)
    assert demand is not None and demand <= cfg.postgres.max_connections
    o = cfg.orchestrator
    per_process = o.db_pool_size + o.db_max_overflow
    assert (
        demand >= (o.autoscale.max_replicas + 1) * o.processes * per_process + (cfg.workers.replicas + 1) * per_process
    )
    objects = render.evaluate(cfg, stack=stack).manifests()
    args = container(objects, "StatefulSet", "postgres")["args"]
    assert args == ["-c", f"max_connections={cfg.postgres.max_connections}"]
    too_small = with_changes(cfg, {"postgres.maxConnections": demand - 1})
    with pytest.raises(Exception, match=r"postgres\.maxConnections"):
        render.evaluate(too_small, stack=stack)
    # The unpooled baseline has no bound to check; an external server's limit is not ours to know.
    render.evaluate(with_changes(too_small, {"orchestrator.dbPoolMode": "null"}), stack=stack)
    render.evaluate(with_changes(too_small, {"postgres.mode": "external"}), stack=stack)


def test_postgres_pod_suits_the_image(objects: list[dict[str, Any]]) -> None:
    """PGDATA below the mount point, a writable socket dir, /dev/shm in memory, a startup probe before liveness."""
    sts = render.find(objects, "StatefulSet", "postgres")["spec"]
    spec = sts["template"]["spec"]
    c = spec["containers"][0]
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert env_of(c)["PGDATA"].startswith(mounts["data"].rstrip("/") + "/")
    assert {mounts["run"], mounts["shm"]} == {"/var/run/postgresql", "/dev/shm"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["shm"]["emptyDir"]["medium"] == "Memory"
    assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsUser"] == postgres.POSTGRES_UID
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_replicas_and_runners_prefer_separate_nodes(objects: list[dict[str, Any]]) -> None:
    for kind, name in (("Deployment", "orchestrator"), ("Deployment", "workers"), ("Job", f"k6-{render.MOCK_RUN_HEX}")):
        template = render.find(objects, kind, name)["spec"]["template"]
        (constraint,) = template["spec"]["topologySpreadConstraints"]
        assert constraint["topologyKey"] == "kubernetes.io/hostname"
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"  # a one-node cluster still schedules them
        assert constraint["labelSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"orchestrator.maxBodyBytes": 100}, "LOADPROOF_MAX_BODY_BYTES"),
        ({"workers.claimIdleMs": 10}, "LOADPROOF_QUEUE_CLAIM_IDLE_MS"),
        ({"llm.simulator.jitter": 1.5}, "LOADPROOF_SIM_JITTER"),
        ({"llm.simulator.rateMalformed": 2.0}, "LOADPROOF_SIM_RATE_MALFORMED"),
    ],
)
def test_values_the_service_would_refuse_fail_the_program(changes: dict[str, Any], variable: str) -> None:
    """Settings' bounds are checked when the program runs, not discovered as a crash-looping pod."""
    with pytest.raises(ValueError, match=variable):
        render.evaluate(with_changes(load("dev"), changes))


# ------------------------------------------------------------------ ingress and the network to real clusters


def _release_values(evaluation: render.Evaluation) -> dict[str, Any]:
    (release,) = [r for r in evaluation.mocks.resources if r.typ == "kubernetes:helm.sh/v3:Release"]
    return render.to_plain(release.inputs)["values"]["controller"]


def test_ingress_nginx_rolls_without_surge_on_the_node_kind_maps_ports_to() -> None:
    """hostPorts fit one pod per node: the old controller must go before the new one can schedule, on the
    node labelled ingress-ready=true (infra/kind-cluster.yaml), which is kind's tainted control plane."""
    controller = _release_values(render.evaluate(load("kind"), stack="kind"))
    assert controller["hostPort"] == {"enabled": True}
    assert controller["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1},
    }
    assert controller["nodeSelector"] == {"ingress-ready": "true"}
    assert controller["tolerations"] == [
        {"key": "node-role.kubernetes.io/control-plane", "operator": "Exists", "effect": "NoSchedule"}
    ]
    kind_cluster = yaml.safe_load((REPO_ROOT / "infra" / "kind-cluster.yaml").read_text())
    (node,) = kind_cluster["nodes"]
    assert node["role"] == "control-plane" and 'node-labels: "ingress-ready=true"' in node["kubeadmConfigPatches"][0]
    # The chart pastes these values into the controller Deployment verbatim: they must be valid there.
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "ingress-nginx-controller"},
        "spec": {
            "strategy": controller["updateStrategy"],
            "selector": {"matchLabels": {"app": "x"}},
            "template": {
                "metadata": {"labels": {"app": "x"}},
                "spec": {
                    "nodeSelector": controller["nodeSelector"],
                    "tolerations": controller["tolerations"],
                    "containers": [{"name": "controller", "image": "x"}],
                },
            },
        },
    }
    assert render.validate([deployment]) == []
    # Other clusters clear the selector: scheduled anywhere, no toleration of the control plane.
    anywhere = _release_values(
        render.evaluate(with_changes(load("kind"), {"baseline.ingressNodeSelector": {}}), stack="kind")
    )
    assert "nodeSelector" not in anywhere and "tolerations" not in anywhere
    assert anywhere["updateStrategy"] == controller["updateStrategy"]


def test_k3d_stack_uses_traefik_and_admits_only_its_pods() -> None:
    cfg = load("k3d")
    assert cfg.baseline.ingress_controller is False  # ingress-nginx's hostPorts would collide with svclb-traefik
    assert cfg.monitoring.grafana.ingress_class == "traefik"
    assert cfg.monitoring.grafana.host == "grafana.127.0.0.1.nip.io"
    ev = render.evaluate(cfg, stack="k3d")
    assert not [r for r in ev.mocks.resources if r.typ == "kubernetes:helm.sh/v3:Release"]
    objects = ev.manifests()
    assert render.find(objects, "Ingress", "grafana")["spec"]["ingressClassName"] == "traefik"
    (rule,) = render.find(objects, "NetworkPolicy", "allow-grafana")["spec"]["ingress"]
    # One peer with both selectors: Traefik's pods AND in kube-system (two peers would admit either).
    assert rule["from"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "traefik"}},
        }
    ]
    assert rule["ports"] == [{"port": kube.GRAFANA_PORT, "protocol": "TCP"}]
    assert ev.outputs["grafana_url"] == "http://grafana.127.0.0.1.nip.io/"


def _api_server_rules(objects: list[dict[str, Any]], component: str) -> list[dict[str, Any]]:
    spec = render.find(objects, "NetworkPolicy", f"allow-{component}")["spec"]
    return [r for r in spec.get("egress", []) if any("ipBlock" in p for p in r["to"])]


API_CLIENTS = ("prometheus", "report", "k6-start")


def test_api_server_egress_is_its_endpoints_not_anywhere(dev: render.Evaluation, objects: list[dict[str, Any]]) -> None:
    """The `default/kubernetes` EndpointSlice is read at deploy time; each address becomes a /32 on its port."""
    assert ("kubernetes:discovery.k8s.io/v1:EndpointSlice", "default/kubernetes") in dev.mocks.reads
    expected = [
        {
            "ports": [{"port": render.MOCK_API_SERVER["port"], "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": f"{render.MOCK_API_SERVER['address']}/32"}}],
        }
    ]
    for component in API_CLIENTS:
        assert _api_server_rules(objects, component) == expected, component
    everywhere = [
        o["metadata"]["name"]
        for o in objects
        if o["kind"] == "NetworkPolicy"
        for r in o["spec"].get("egress", [])
        for p in r["to"]
        if p.get("ipBlock", {}).get("cidr") in ("0.0.0.0/0", "::/0")
    ]
    assert everywhere == []  # internal stores and the simulator: nothing leaves for "anywhere"


class DualStackApiServer(render.RecordingMocks):
    """A cluster whose API server has two IPv6 endpoints on 443."""

    def output_state(self, args: Any, state: dict[str, Any]) -> dict[str, Any]:
        if args.typ == "kubernetes:discovery.k8s.io/v1:EndpointSlice":
            return {
                **state,
                "addressType": "IPv6",
                "endpoints": [{"addresses": ["fd00::2"]}, {"addresses": ["fd00::1"]}],
                "ports": [{"name": "https", "port": 443, "protocol": "TCP"}],
            }
        return state


def test_api_server_endpoints_and_extra_cidrs() -> None:
    objects = render.evaluate(load("dev"), mocks=DualStackApiServer()).manifests()
    assert _api_server_rules(objects, "prometheus") == [
        {
            "ports": [{"port": 443, "protocol": "TCP"}],
            "to": [{"ipBlock": {"cidr": "fd00::1/128"}}, {"ipBlock": {"cidr": "fd00::2/128"}}],
        }
    ]
    # Added CIDRs (e.g. a load balancer in front of the control plane) on both API ports.
    extra = {"ports": [{"port": 443, "protocol": "TCP"}, {"port": 6443, "protocol": "TCP"}],
             "to": [{"ipBlock": {"cidr": "203.0.113.0/28"}}]}  # fmt: skip
    cfg = with_changes(load("dev"), {"baseline.apiServerCidrs": ["203.0.113.0/28"]})
    objects = render.evaluate(cfg).manifests()
    for component in API_CLIENTS:
        assert _api_server_rules(objects, component)[1:] == [extra]
    # ...or instead of the endpoints, for clusters where they are not what pods reach.
    only = with_changes(cfg, {"baseline.apiServerFromEndpoints": False})
    ev = render.evaluate(only)
    assert not [r for r in ev.mocks.reads if r[0].endswith("EndpointSlice")]
    for component in API_CLIENTS:
        assert _api_server_rules(ev.manifests(), component) == [extra]
    with pytest.raises(Exception, match="apiServerCidrs is empty"):
        with_changes(load("dev"), {"baseline.apiServerFromEndpoints": False})


def test_node_local_dns_is_allowed_when_set(objects: list[dict[str, Any]]) -> None:
    assert len(render.find(objects, "NetworkPolicy", "allow-dns")["spec"]["egress"]) == 1
    cfg = with_changes(load("dev"), {"baseline.nodeLocalDns": "169.254.20.10"})
    kube_dns, node_local = render.find(render.evaluate(cfg).manifests(), "NetworkPolicy", "allow-dns")["spec"]["egress"]
    assert kube_dns["to"][0]["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
    assert node_local == {
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
        "to": [{"ipBlock": {"cidr": "169.254.20.10/32"}}],
    }


# ------------------------------------------------------------------ pods that survive real clusters


def test_grafana_first_boot_has_a_startup_budget(objects: list[dict[str, Any]]) -> None:
    """Migrations on first boot (1 CPU) can outlast liveness: liveness begins only once Grafana answered."""
    c = container(objects, "Deployment", "grafana")
    startup, liveness = c["startupProbe"], c["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] == {"path": "/api/health", "port": kube.GRAFANA_PORT}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert startup["periodSeconds"] * startup["failureThreshold"] > liveness["periodSeconds"] * liveness[
        "failureThreshold"
    ] + liveness.get("initialDelaySeconds", 0)


@pytest.mark.parametrize("stack", STACKS)
def test_persistent_volumes_are_not_chowned_on_every_start(stack: str) -> None:
    objects = render.evaluate(load(stack), stack=stack).manifests()
    persistent = []
    for o in objects:
        if o["kind"] not in WORKLOAD_KINDS:
            continue
        spec = o["spec"]["template"]["spec"]
        if o["spec"].get("volumeClaimTemplates") or any("persistentVolumeClaim" in v for v in spec.get("volumes", [])):
            persistent.append(o["metadata"]["name"])
            assert spec["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch", o["metadata"]["name"]
    assert sorted(persistent) == ["postgres", "prometheus", "redis"]


def test_redis_requires_its_generated_password(dev: render.Evaluation, objects: list[dict[str, Any]]) -> None:
    """requirepass from a RandomPassword, carried in the URL Secret the API and workers read."""
    password = render.mock_password("redis-password")
    secret = render.find(objects, "Secret", "redis-url")["stringData"]
    assert secret == {"password": password, "redis-url": f"redis://:{password}@redis.loadproof.svc:6379/0"}
    c = container(objects, "Deployment", "redis")
    assert env_of(c) == {"REDISCLI_AUTH": {"secretKeyRef": {"name": "redis-url", "key": "password"}}}
    for name in ("orchestrator", "workers"):
        assert env_of(container(objects, "Deployment", name))["LOADPROOF_REDIS_URL"] == {
            "secretKeyRef": {"name": "redis-url", "key": "redis-url"}
        }
    # Nothing else in the cluster talks to Redis (the report measures Prometheus and Postgres).
    readers = {
        f"{o['kind']}/{o['metadata']['name']}"
        for o in objects
        if o["kind"] in (*WORKLOAD_KINDS, "Job")
        for c in o["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
        if e.get("valueFrom", {}).get("secretKeyRef", {}).get("name") == "redis-url"
    }
    assert readers == {"Deployment/orchestrator", "Deployment/workers", "Deployment/redis"}
    # External Redis: the URL as given, no generated password.
    external = render.evaluate(with_changes(load("dev"), {"redis.mode": "external"}))
    assert render.find(external.manifests(), "Secret", "redis-url")["stringData"] == {
        "redis-url": render.MOCK_SECRETS["redisUrl"]
    }
    assert "redis-password" not in {r.name for r in external.mocks.resources}


def test_redis_entrypoint_and_probes_against_a_real_redis(objects: list[dict[str, Any]], tmp_path: Any) -> None:
    """The rendered command, args and probes, run with the real redis-server: the password is required,
    the probes pass with it and fail without it, and it is on no command line."""
    import os
    import socket
    import subprocess
    import time
    from pathlib import Path

    import redis as redis_client

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = container(objects, "Deployment", "redis")
    args = list(c["args"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--dir") + 1] = str(tmp_path)
    password = "Pr0beP4ssw0rd"
    env = {**os.environ, "REDISCLI_AUTH": password}
    proc = subprocess.Popen([*c["command"], *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:

        def probe(which: str, auth: str | None) -> int:
            command = [a.replace(f"-p {kube.REDIS_PORT}", f"-p {port}") for a in c[which]["exec"]["command"]]
            probe_env = {k: v for k, v in env.items() if k != "REDISCLI_AUTH"}
            if auth is not None:
                probe_env["REDISCLI_AUTH"] = auth
            return subprocess.run(command, env=probe_env, capture_output=True, timeout=10, check=False).returncode

        deadline = time.monotonic() + 20
        while probe("readinessProbe", password) != 0:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.1)
        assert probe("livenessProbe", password) == 0
        for which in ("readinessProbe", "livenessProbe"):
            assert probe(which, None) != 0 and probe(which, "wrong") != 0, which
        url = f"redis://:{password}@127.0.0.1:{port}/0"  # the shape of the Secret's URL
        assert redis_client.Redis.from_url(url).ping() is True
        with pytest.raises(redis_client.AuthenticationError):
            redis_client.Redis.from_url(f"redis://127.0.0.1:{port}/0").ping()
        # exec: redis-server itself is the process (gets SIGTERM), and its command line has no password.
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "redis-server" in cmdline and password not in cmdline
        assert args[args.index("--appendonly") + 1] == "yes"
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0  # clean shutdown on SIGTERM


class NewRedisPassword(render.RecordingMocks):
    def output_state(self, args: Any, state: dict[str, Any]) -> dict[str, Any]:
        if args.name == "redis-password":
            return {**state, "result": "a-rotated-password"}
        return state


def test_clients_roll_when_the_redis_password_changes(objects: list[dict[str, Any]]) -> None:
    """The API and workers read the Redis URL from env at start: a new password (or the first one, on an
    existing stack) changes their pod templates, so they roll instead of keeping a URL Redis refuses."""

    def checksums(objs: list[dict[str, Any]]) -> set[str]:
        return {
            render.find(objs, "Deployment", name)["spec"]["template"]["metadata"]["annotations"][
                "loadproof.dev/redis-credentials"
            ]
            for name in ("orchestrator", "workers")
        }

    (before,) = checksums(objects)
    (after,) = checksums(render.evaluate(load("dev"), mocks=NewRedisPassword()).manifests())
    assert before != after and len(before) == 16
    external = render.evaluate(with_changes(load("dev"), {"redis.mode": "external"})).manifests()
    annotations = render.find(external, "Deployment", "orchestrator")["spec"]["template"]["metadata"]["annotations"]
    assert "loadproof.dev/redis-credentials" not in annotations  # never a digest of a user-chosen URL
