"""The policy pack (``policy/``): it passes on what the program renders for the kind, dev and eks stacks, and
each policy fails on a deliberately broken object.

The objects are the program's own, evaluated offline with Pulumi mocks (``infra.render.evaluate``), and
each policy's ``validate`` gets what the Pulumi engine would give it: ``ResourceValidationArgs`` /
``StackValidationArgs`` whose properties are wrapped in pulumi-policy's unknown-checking proxies
(``Mapping``/``Sequence``, not ``dict``/``list``). One test runs the pack the way the Pulumi CLI does
(``python -m pulumi.policy <engine> policy/``, a gRPC analyzer) and talks to it over gRPC.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import empty_pb2, json_format, struct_pb2
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc
from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import unknown_checking_proxy

from common.stackconfig import REPO_ROOT, load
from infra.render import evaluate, to_plain
from policy.rules import (
    GRAFANA_ANONYMOUS_ANNOTATION,
    PACK_NAME,
    WRITABLE_ROOT_FS_ANNOTATION,
    policies,
    selector_matches,
)

STACKS = ("kind", "dev", "eks")
POLICY_DIR = REPO_ROOT / "policy"
EXPECTED = {
    "pods-run-as-non-root",
    "read-only-root-filesystem",
    "containers-have-resource-limits",
    "no-plaintext-secrets-in-env",
    "prometheus-not-exposed",
    "grafana-anonymous-viewer-only",
    "grafana-anonymous-opt-in",
    "network-policy-for-every-workload",
}


# --- the stacks' objects, as the engine hands them to a policy ------------------------------------------
Resource = tuple[str, str, dict[str, Any]]  # (type, logical name, plain properties)


@pytest.fixture(scope="module", params=STACKS)
def stack(request: pytest.FixtureRequest) -> list[Resource]:
    evaluation = evaluate(load(request.param), stack=request.param)
    return [(r.typ, r.name, to_plain(r.inputs)) for r in evaluation.mocks.resources]


def _urn(typ: str, name: str) -> str:
    return f"urn:pulumi:test::loadproof::{typ}::{name}"


def _options() -> PolicyResourceOptions:
    return PolicyResourceOptions(False, [], None, [], PolicyCustomTimeouts(0, 0, 0), [])


def _props(props: dict[str, Any]) -> Any:
    return unknown_checking_proxy(copy.deepcopy(props))


def _policy(name: str) -> Any:
    (found,) = [p for p in policies() if p.name == name]
    return found


def violations(policy_name: str, typ: str, props: dict[str, Any], name: str = "broken") -> list[str]:
    policy = _policy(policy_name)
    assert isinstance(policy, ResourceValidationPolicy)
    found: list[str] = []
    args = ResourceValidationArgs(typ, _props(props), _urn(typ, name), name, _options(), None)
    policy.validate(args, lambda message, urn=None: found.append(message))
    return found


def stack_violations(policy_name: str, resources: list[Resource]) -> list[tuple[str, str | None]]:
    policy = _policy(policy_name)
    assert isinstance(policy, StackValidationPolicy)
    found: list[tuple[str, str | None]] = []
    args = StackValidationArgs(
        [
            PolicyResource(typ, _props(props), _urn(typ, name), name, _options(), None, None, [], {})
            for typ, name, props in resources
        ]
    )
    policy.validate(args, lambda message, urn=None: found.append((message, urn)))
    return found


def obj(resources: list[Resource], kind: str, name: str) -> tuple[str, dict[str, Any]]:
    """(type, a private copy of the properties) of the object ``kind``/``name``."""
    for typ, _, props in resources:
        if typ.endswith(f":{kind}") and props.get("metadata", {}).get("name") == name:
            return typ, copy.deepcopy(props)
    raise KeyError(f"{kind}/{name}")


def pod_spec(props: dict[str, Any]) -> dict[str, Any]:
    return props["spec"]["template"]["spec"]


# --- the pack passes on ours ---------------------------------------------------------------------------
def test_the_pack_has_the_policies_all_mandatory() -> None:
    pack = policies()
    assert {p.name for p in pack} == EXPECTED
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in pack)
    assert [p.name for p in pack if isinstance(p, StackValidationPolicy)] == ["network-policy-for-every-workload"]


def pack_violations(resources: list[Resource]) -> dict[str, list[Any]]:
    """Every policy's findings on ``resources`` (empty lists = the pack passes)."""
    out: dict[str, list[Any]] = {}
    for policy in policies():
        if isinstance(policy, ResourceValidationPolicy):
            out[policy.name] = [
                (name, v) for typ, name, props in resources for v in violations(policy.name, typ, props, name)
            ]
        else:
            out[policy.name] = stack_violations(policy.name, resources)
    return out


def test_every_policy_passes_on_the_rendered_stack(stack: list[Resource]) -> None:
    kinds = {typ.rsplit(":", 1)[-1] for typ, _, _ in stack}
    assert {"Deployment", "StatefulSet", "Job", "Ingress", "ConfigMap", "NetworkPolicy"} <= kinds
    for name, found in pack_violations(stack).items():
        assert found == [], f"{name}: {found}"


def test_every_policy_passes_with_keda_scaling_the_workers() -> None:
    """The ScaledObject and TriggerAuthentication are no workloads: the pack looks past them (the pods they
    scale are the workers Deployment's, checked as ever); the KEDA chart is a Helm release, not checked."""
    cfg = load("kind")
    doc = cfg.model_dump(mode="json", by_alias=True)
    doc["workers"]["autoscaling"]["enabled"] = True
    doc["baseline"]["kedaInstall"] = True
    evaluation = evaluate(type(cfg).model_validate(doc), stack="kind")
    resources = [(r.typ, r.name, to_plain(r.inputs)) for r in evaluation.mocks.resources]
    kinds = {typ.rsplit(":", 1)[-1] for typ, _, _ in resources}
    assert {"ScaledObject", "TriggerAuthentication", "Release"} <= kinds
    for name, found in pack_violations(resources).items():
        assert found == [], f"{name}: {found}"


# --- and fails on a broken object, one per policy ---------------------------------------------------------
def test_root_container_is_refused(stack: list[Resource]) -> None:
    typ, deployment = obj(stack, "Deployment", "orchestrator")
    pod_spec(deployment)["containers"][0]["securityContext"]["runAsUser"] = 0
    (message,) = violations("pods-run-as-non-root", typ, deployment)
    assert "orchestrator" in message and "runAsUser: 0" in message

    typ, deployment = obj(stack, "Deployment", "orchestrator")
    spec = pod_spec(deployment)
    for context in (spec["securityContext"], spec["containers"][0]["securityContext"]):
        context.pop("runAsUser", None)
        context.pop("runAsNonRoot", None)
    (message,) = violations("pods-run-as-non-root", typ, deployment)
    assert "may run as root" in message

    # The container's setting wins over the pod's, as in the kubelet.
    typ, deployment = obj(stack, "Deployment", "orchestrator")
    spec = pod_spec(deployment)
    spec["securityContext"]["runAsUser"] = 0
    spec["containers"][0]["securityContext"]["runAsUser"] = 10001
    assert violations("pods-run-as-non-root", typ, deployment) == []
    spec["initContainers"] = [{"name": "setup", "image": "busybox", "securityContext": {"runAsUser": 0}}]
    assert any("setup" in v for v in violations("pods-run-as-non-root", typ, deployment))


def test_writable_root_filesystem_is_refused_unless_annotated(stack: list[Resource]) -> None:
    typ, postgres = obj(stack, "StatefulSet", "postgres")
    pod_spec(postgres)["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False
    (message,) = violations("read-only-root-filesystem", typ, postgres)
    assert "container postgres" in message and WRITABLE_ROOT_FS_ANNOTATION in message
    postgres["metadata"].setdefault("annotations", {})[WRITABLE_ROOT_FS_ANNOTATION] = "other, postgres"
    assert violations("read-only-root-filesystem", typ, postgres) == []


def test_missing_limits_are_refused(stack: list[Resource]) -> None:
    typ, job = obj(stack, "Job", f"report-{_run_hex(stack)}")
    del pod_spec(job)["containers"][0]["resources"]["limits"]["memory"]
    (message,) = violations("containers-have-resource-limits", typ, job)
    assert "no memory limit" in message
    del pod_spec(job)["containers"][0]["resources"]
    (message,) = violations("containers-have-resource-limits", typ, job)
    assert "no cpu and no memory limit" in message


def test_plaintext_secrets_in_env_are_refused(stack: list[Resource]) -> None:
    typ, postgres = obj(stack, "StatefulSet", "postgres")
    env = pod_spec(postgres)["containers"][0]["env"]
    (password,) = [e for e in env if e["name"] == "POSTGRES_PASSWORD"]
    password.pop("valueFrom")
    password["value"] = "hunter2"
    (message,) = violations("no-plaintext-secrets-in-env", typ, postgres)
    assert "POSTGRES_PASSWORD" in message and "secretKeyRef" in message

    typ, workers = obj(stack, "Deployment", "workers")
    env = pod_spec(workers)["containers"][0]["env"]
    env.append({"name": "LOADPROOF_DATABASE_URL", "value": "postgresql+psycopg://app:pw@db:5432/loadproof"})
    env.append({"name": "LOADPROOF_LLM_API_KEY", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "k"}}})
    env.append({"name": "SESSION_TOKEN", "value": ""})
    env.append({"name": "LOADPROOF_REDIS_URL", "value": "redis://:secret@redis:6379/0"})
    found = violations("no-plaintext-secrets-in-env", typ, workers)
    assert len(found) == 4, found
    assert any("URL with credentials" in v and "LOADPROOF_DATABASE_URL" in v for v in found)
    assert any("URL with credentials" in v and "LOADPROOF_REDIS_URL" in v for v in found)
    # A URL without credentials, and names that only look alike, are fine.
    env[:] = [
        {"name": "LOADPROOF_LLM_BASE_URL", "value": "http://simulator.loadproof.svc:8090/v1"},
        {"name": "MONKEY_BUSINESS", "value": "x"},
        {"name": "GF_SECURITY_ADMIN_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "g", "key": "password"}}},
    ]
    assert violations("no-plaintext-secrets-in-env", typ, workers) == []


def test_ingress_to_prometheus_is_refused(stack: list[Resource]) -> None:
    typ, ingress = obj(stack, "Ingress", "grafana")
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]
    backend["service"] = {"name": "prometheus", "port": {"number": 9090}}
    (message,) = violations("prometheus-not-exposed", typ, ingress)
    assert "prometheus Service" in message

    typ, ingress = obj(stack, "Ingress", "grafana")
    ingress["spec"]["defaultBackend"] = {"service": {"name": "prometheus", "port": {"number": 9090}}}
    assert len(violations("prometheus-not-exposed", typ, ingress)) == 1

    route = {"metadata": {"name": "r"}, "spec": {"rules": [{"backendRefs": [{"name": "prometheus", "port": 9090}]}]}}
    assert len(violations("prometheus-not-exposed", "kubernetes:gateway.networking.k8s.io/v1:HTTPRoute", route)) == 1

    typ, service = obj(stack, "Service", "prometheus")
    service["spec"]["type"] = "NodePort"
    assert len(violations("prometheus-not-exposed", typ, service)) == 1
    typ, grafana = obj(stack, "Service", "grafana")
    grafana["spec"]["type"] = "LoadBalancer"  # the rule is about Prometheus only
    assert violations("prometheus-not-exposed", typ, grafana) == []


ANONYMOUS_OFF, ANONYMOUS_ON = "[auth.anonymous]\nenabled = false", "[auth.anonymous]\nenabled = true"


def test_grafana_anonymous_admin_is_refused(stack: list[Resource]) -> None:
    typ, config = obj(stack, "ConfigMap", "grafana-ini")
    assert ANONYMOUS_OFF in config["data"]["grafana.ini"]  # the stacks' default
    ini = config["data"]["grafana.ini"].replace(ANONYMOUS_OFF, ANONYMOUS_ON)
    assert "org_role = Viewer" in ini
    config["data"]["grafana.ini"] = ini.replace("org_role = Viewer", "org_role = Admin")
    (message,) = violations("grafana-anonymous-viewer-only", typ, config)
    assert "org_role = Admin" in message
    # Disabled, the role does not matter; enabled without a role, Grafana's default is Viewer.
    disabled = ini.replace("org_role = Viewer", "org_role = Admin").replace(ANONYMOUS_ON, ANONYMOUS_OFF)
    config["data"]["grafana.ini"] = disabled
    assert violations("grafana-anonymous-viewer-only", typ, config) == []
    config["data"]["grafana.ini"] = ini.replace("org_role = Viewer\n", "")
    assert violations("grafana-anonymous-viewer-only", typ, config) == []

    # GF_* env vars override grafana.ini.
    typ, grafana = obj(stack, "Deployment", "grafana")
    env = pod_spec(grafana)["containers"][0]["env"]
    env.append({"name": "GF_AUTH_ANONYMOUS_ORG_ROLE", "value": "Admin"})
    (message,) = violations("grafana-anonymous-viewer-only", typ, grafana)
    assert "'Admin'" in message
    env[-1] = {"name": "GF_AUTH_ANONYMOUS_ENABLED", "value": "true"}
    (message,) = violations("grafana-anonymous-viewer-only", typ, grafana)
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE=Viewer" in message
    env.append({"name": "GF_AUTH_ANONYMOUS_ORG_ROLE", "value": "Viewer"})
    assert violations("grafana-anonymous-viewer-only", typ, grafana) == []


def test_grafana_anonymous_access_needs_the_opt_in(stack: list[Resource]) -> None:
    typ, config = obj(stack, "ConfigMap", "grafana-ini")
    assert violations("grafana-anonymous-opt-in", typ, config) == []  # off: nothing to opt into
    config["data"]["grafana.ini"] = config["data"]["grafana.ini"].replace(ANONYMOUS_OFF, ANONYMOUS_ON)
    (message,) = violations("grafana-anonymous-opt-in", typ, config)
    assert "ConfigMap loadproof/grafana-ini: grafana.ini [auth.anonymous] enabled" in message
    assert GRAFANA_ANONYMOUS_ANNOTATION in message and "/api/ds/query" in message
    config["metadata"]["annotations"] = {GRAFANA_ANONYMOUS_ANNOTATION: "false"}
    assert len(violations("grafana-anonymous-opt-in", typ, config)) == 1
    config["metadata"]["annotations"] = {GRAFANA_ANONYMOUS_ANNOTATION: "true"}
    assert violations("grafana-anonymous-opt-in", typ, config) == []

    # Through Grafana's env override: a literal true, or a value from elsewhere, needs the opt-in too.
    typ, grafana = obj(stack, "Deployment", "grafana")
    env = pod_spec(grafana)["containers"][0]["env"]
    env.append({"name": "GF_AUTH_ANONYMOUS_ENABLED", "value": "false"})
    assert violations("grafana-anonymous-opt-in", typ, grafana) == []
    env[-1] = {"name": "GF_AUTH_ANONYMOUS_ENABLED", "value": "true"}
    (message,) = violations("grafana-anonymous-opt-in", typ, grafana)
    assert "container grafana env GF_AUTH_ANONYMOUS_ENABLED" in message
    env[-1] = {"name": "GF_AUTH_ANONYMOUS_ENABLED", "valueFrom": {"configMapKeyRef": {"name": "x", "key": "y"}}}
    assert len(violations("grafana-anonymous-opt-in", typ, grafana)) == 1
    grafana["metadata"]["annotations"] = {GRAFANA_ANONYMOUS_ANNOTATION: "true"}
    assert violations("grafana-anonymous-opt-in", typ, grafana) == []


def test_anonymous_viewing_key_is_the_opt_in() -> None:
    """``anonymousViewing: true`` renders the annotation next to the enabled ini, and the pack passes."""
    cfg = load("kind")
    doc = cfg.model_dump(mode="json", by_alias=True)
    doc["monitoring"]["grafana"]["anonymousViewing"] = True
    evaluation = evaluate(type(cfg).model_validate(doc), stack="kind")
    resources = [(r.typ, r.name, to_plain(r.inputs)) for r in evaluation.mocks.resources]
    _, config = obj(resources, "ConfigMap", "grafana-ini")
    assert ANONYMOUS_ON in config["data"]["grafana.ini"]
    assert config["metadata"]["annotations"] == {GRAFANA_ANONYMOUS_ANNOTATION: "true"}
    for name, found in pack_violations(resources).items():
        assert found == [], f"{name}: {found}"


def test_workload_without_network_policy_is_refused(stack: list[Resource]) -> None:
    without = [
        r for r in stack if not (r[0].endswith(":NetworkPolicy") and r[2]["metadata"]["name"] == "allow-simulator")
    ]
    ((message, urn),) = stack_violations("network-policy-for-every-workload", without)
    assert "Deployment loadproof/simulator" in message
    assert urn == _urn("kubernetes:apps/v1:Deployment", "simulator-deployment")

    typ, extra = obj(stack, "Deployment", "simulator")
    extra["metadata"]["name"] = "debug"
    extra["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] = "debug"
    found = stack_violations("network-policy-for-every-workload", [*stack, (typ, "debug", extra)])
    assert [m for m, _ in found if "debug" in m], found

    no_deny = [r for r in stack if not (r[0].endswith(":NetworkPolicy") and r[2]["metadata"]["name"] == "default-deny")]
    ((message, _),) = stack_violations("network-policy-for-every-workload", no_deny)
    assert "no default-deny" in message


def test_label_selectors_match_as_in_kubernetes() -> None:
    labels = {"app": "api", "tier": "web"}
    assert selector_matches({}, labels)
    assert selector_matches({"matchLabels": {"app": "api"}}, labels)
    assert not selector_matches({"matchLabels": {"app": "db"}}, labels)
    expressions: list[tuple[dict[str, Any], bool]] = [
        ({"key": "tier", "operator": "In", "values": ["web", "edge"]}, True),
        ({"key": "tier", "operator": "NotIn", "values": ["web"]}, False),
        ({"key": "zone", "operator": "NotIn", "values": ["a"]}, True),
        ({"key": "app", "operator": "Exists"}, True),
        ({"key": "zone", "operator": "DoesNotExist"}, True),
        ({"key": "app", "operator": "DoesNotExist"}, False),
        ({"key": "app", "operator": "Bogus"}, False),
    ]
    for expression, expected in expressions:
        assert selector_matches({"matchExpressions": [expression]}, labels) is expected, expression


def _run_hex(stack: list[Resource]) -> str:
    (name,) = [
        p["metadata"]["name"] for t, _, p in stack if t.endswith(":Job") and p["metadata"]["name"].startswith("report-")
    ]
    return name.removeprefix("report-")


# --- the pack as the Pulumi CLI runs it ------------------------------------------------------------------
def test_requirements_of_the_pack_are_the_repository_pins() -> None:
    pins = {line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if "==" in line}
    own = [line for line in (POLICY_DIR / "requirements.txt").read_text().splitlines() if "==" in line]
    assert own and set(own) <= pins


@pytest.fixture(scope="module")
def analyzer() -> Iterator[analyzer_pb2_grpc.AnalyzerStub]:
    """``python -m pulumi.policy <engine> policy/``, as the CLI starts a Python pack: it prints its gRPC
    port. Run from an unrelated directory without PYTHONPATH, so the pack can import nothing of ours."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PULUMI_")}
    with tempfile.TemporaryDirectory(prefix="loadproof-policy-") as cwd:
        proc = subprocess.Popen(
            [sys.executable, "-u", "-m", "pulumi.policy", "127.0.0.1:1", str(POLICY_DIR)],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            port = proc.stdout.readline().strip()
            assert port.isdigit(), f"no port from the pack: {port!r} {proc.stderr.read() if proc.stderr else ''}"
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
                grpc.channel_ready_future(channel).result(timeout=30)
                yield analyzer_pb2_grpc.AnalyzerStub(channel)
        finally:
            proc.kill()
            proc.wait(timeout=30)


def _struct(props: dict[str, Any]) -> struct_pb2.Struct:
    return json_format.ParseDict(json.loads(json.dumps(props)), struct_pb2.Struct())


def test_the_pack_runs_under_the_pulumi_analyzer_protocol(
    analyzer: analyzer_pb2_grpc.AnalyzerStub, stack: list[Resource]
) -> None:
    info = analyzer.GetAnalyzerInfo(empty_pb2.Empty(), timeout=30)
    assert info.name == PACK_NAME
    assert {p.name for p in info.policies} == EXPECTED
    assert {p.enforcementLevel for p in info.policies} == {analyzer_pb2.MANDATORY}

    def analyze(typ: str, name: str, props: dict[str, Any]) -> list[Any]:
        request = analyzer_pb2.AnalyzeRequest(type=typ, properties=_struct(props), urn=_urn(typ, name), name=name)
        return list(analyzer.Analyze(request, timeout=30).diagnostics)

    assert [d for typ, name, props in stack for d in analyze(typ, name, props)] == []
    typ, deployment = obj(stack, "Deployment", "orchestrator")
    pod_spec(deployment)["containers"][0]["securityContext"]["runAsUser"] = 0
    (diagnostic,) = analyze(typ, "orchestrator-api", deployment)
    assert diagnostic.policyName == "pods-run-as-non-root" and diagnostic.enforcementLevel == analyzer_pb2.MANDATORY

    def analyze_stack(resources: list[Resource]) -> list[Any]:
        request = analyzer_pb2.AnalyzeStackRequest(
            resources=[
                analyzer_pb2.AnalyzerResource(type=typ, properties=_struct(props), urn=_urn(typ, name), name=name)
                for typ, name, props in resources
            ]
        )
        return list(analyzer.AnalyzeStack(request, timeout=30).diagnostics)

    assert analyze_stack(stack) == []
    (diagnostic,) = analyze_stack([r for r in stack if r[2].get("metadata", {}).get("name") != "allow-workers"])
    assert diagnostic.policyName == "network-policy-for-every-workload" and "workers" in diagnostic.message


def test_policy_dir_is_a_pack() -> None:
    files = {p.name for p in POLICY_DIR.iterdir()}
    assert {"PulumiPolicy.yaml", "__main__.py", "__init__.py", "rules.py", "requirements.txt"} <= files
    assert Path(POLICY_DIR / "PulumiPolicy.yaml").read_text().count("name: python") == 1
