"""Stack config: every key is documented in the stack files and consumed by the program.

"Consumed" is checked by behaviour, not by a list: each leaf of the schema is changed on its own and
the rendered manifests (or the stack outputs) must change. The few keys that only the local demo
reads are named in :data:`LOCAL_ONLY` with the reason.
"""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from common import stackfile
from common.stackconfig import REPO_ROOT, StackConfig, StackConfigError, load, parse, stack_file
from infra import render

# Keys with no cluster effect, and why (they are still consumed: by `make demo`).
LOCAL_ONLY = {
    "workers.processes": "local worker processes of `make demo`; in the cluster, replicas scale workers",
    "workers.nice": "CPU priority of `make demo`'s worker processes; in the cluster, pods have their own CPU",
}
# Keys consumed only together with a second change that the one-leaf test cannot make, and where tested.
ELSEWHERE = {
    "baseline.kedaPreinstalled": "valid only with autoscaling on and kedaInstall off, which needs it: "
    "tests/test_infra_cluster.py::test_preinstalled_keda_is_read_at_preview",
}
# KEDA on (installed), with Postgres room for its maxReplicas worker pods.
KEDA_ON: dict[str, Any] = {
    "workers.autoscaling.enabled": True,
    "baseline.kedaInstall": True,
    "postgres.maxConnections": 5000,
}
# A key that only matters together with another: set the other first.
CONTEXT: dict[str, dict[str, Any]] = {
    # TLS needs a certificate (an issuer or a Secret); the other of the two is the varied key.
    "monitoring.grafana.tls": {"monitoring.grafana.tlsSecret": "grafana-cert"},
    "monitoring.grafana.certIssuer": {"monitoring.grafana.tls": True, "monitoring.grafana.tlsSecret": "grafana-cert"},
    "monitoring.grafana.tlsSecret": {"monitoring.grafana.tls": True, "monitoring.grafana.certIssuer": "letsencrypt"},
    "llm.baseUrl": {"llm.mode": "external", "llm.baseUrl": "https://a.example.com/v1"},
    "llm.mode": {"llm.baseUrl": "https://a.example.com/v1"},
    # More pods or processes need more Postgres connections (infra/postgres.py:check_connections).
    "orchestrator.processes": {"postgres.maxConnections": 5000},
    "orchestrator.autoscale.maxReplicas": {"postgres.maxConnections": 5000},
    "workers.replicas": {"postgres.maxConnections": 5000},
    # The API's replicas must lie within the HPA's bounds.
    "orchestrator.autoscale.minReplicas": {"orchestrator.replicas": 3},
    # Only the ingress-nginx this program installs is pinned to a node.
    "baseline.ingressNodeSelector": {"baseline.ingressController": True},
    # Queue-driven scaling: its knobs only matter with it on (turning it on needs the connections too).
    "workers.autoscaling.enabled": {"postgres.maxConnections": 5000, "baseline.kedaPreinstalled": True},
    **{
        f"workers.autoscaling.{k}": KEDA_ON
        for k in ("minReplicas", "maxReplicas", "lagThreshold", "pollingIntervalS", "scaleDownStabilizationS")
    },
    "baseline.kedaNamespace": KEDA_ON,
    "baseline.kedaOperatorPodSelector": KEDA_ON,
    # Without the endpoints, the API server must be reachable some other way.
    "baseline.apiServerFromEndpoints": {"baseline.apiServerCidrs": ["203.0.113.0/28"]},
    # A flow needs a VU for as long as it may poll: at 1000/s, a 1 s timeout fits the demo's 2000 VUs.
    "loadtest.profiles.demo.flow": {"loadtest.profiles.demo.flowTimeoutS": 1.0},
}
SPECIAL: dict[str, Any] = {
    "llm.mode": "external",
    "llm.limiter": "fixed",
    "llm.httpClient": "httpx",
    "llm.baseUrl": "https://b.example.com/v1",
    "loadtest.profile": "smoke",
    "llm.prices": {"gpt-4o-mini": "0.1/0.2"},
    "monitoring.grafana.certIssuer": "letsencrypt",
    "monitoring.grafana.tlsSecret": "grafana-cert",
    "baseline.ingressPodSelector": {"app.kubernetes.io/name": "traefik"},
    "baseline.ingressNodeSelector": {"kubernetes.io/hostname": "edge-1"},
    "baseline.apiServerCidrs": ["203.0.113.0/28"],
    "baseline.nodeLocalDns": "169.254.20.10",
    "baseline.kedaOperatorPodSelector": {"app": "keda-operator"},
    "loadtest.profiles.demo.drainS": 45,  # unset by default: the section's drainS applies
}


def leaves(model: BaseModel, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted camelCase path, value) of every scalar field; only the selected profile's fields."""
    out: list[tuple[str, Any]] = []
    for name, field in type(model).model_fields.items():
        key = f"{prefix}{field.alias or name}"
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            out += leaves(value, f"{key}.")
        elif key == "loadtest.profiles":
            active = model.profile  # type: ignore[attr-defined]
            prof = value[active]
            out += [(p, v) for p, v in leaves(prof, f"{key}.{active}.") if ".stages" not in p]
            for i, stage in enumerate(prof.stages):
                out += leaves(stage, f"{key}.{active}.stages.{i}.")
        else:
            out.append((key, value))
    return out


def mutate(path: str, value: Any) -> Any:
    if path in SPECIAL:
        return SPECIAL[path]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return round(value + 0.1, 3) if value < 1 else value * 2
    if isinstance(value, str):
        if path.endswith("imagePullPolicy"):
            return "Always"
        if path.endswith("dbPoolMode"):
            return "null"
        if path.endswith(".mode"):
            return "external"
        m = re.match(r"^(\d+)(.*)$", value)
        if m:
            return f"{int(m.group(1)) + 1}{m.group(2)}"
        return f"{value}-x"
    raise AssertionError(f"no mutation for {path}={value!r}")


def set_path(doc: dict[str, Any], path: str, value: Any) -> None:
    node: Any = doc
    *parents, last = path.split(".")
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def fingerprint(cfg: StackConfig) -> str:
    """Every registered resource's inputs (Kubernetes objects, Helm releases, random ids...) and the outputs."""
    ev = render.evaluate(cfg)
    outputs = {k: v for k, v in ev.outputs.items() if k != "report"}
    recorded = []
    for r in ev.mocks.resources:
        inputs = render.to_plain(r.inputs)
        if r.typ == "random:index/randomId:RandomId":
            # The run id's config hash covers (almost) every key; it must not make a key look consumed.
            inputs["keepers"].pop("config")
        recorded.append((r.typ, r.name, yaml.safe_dump(inputs)))
    recorded.sort()
    return repr(recorded) + repr(sorted(outputs.items()))


BASE = StackConfig()
BASE_DOC = BASE.model_dump(mode="json", by_alias=True)


@pytest.fixture(scope="module")
def base_fingerprints() -> dict[str, str]:
    return {}


CLUSTER_KEYS = [(p, v) for p, v in leaves(BASE) if p not in LOCAL_ONLY and p not in ELSEWHERE]


@pytest.mark.parametrize(("path", "value"), CLUSTER_KEYS, ids=[p for p, _ in CLUSTER_KEYS])
def test_every_key_is_consumed(path: str, value: Any, base_fingerprints: dict[str, str]) -> None:
    context = CONTEXT.get(path, {})
    doc = yaml.safe_load(yaml.safe_dump(BASE_DOC))
    for k, v in context.items():
        set_path(doc, k, v)
    before_cfg = StackConfig.model_validate(doc)
    key = repr(sorted(context.items()))
    if key not in base_fingerprints:
        base_fingerprints[key] = fingerprint(before_cfg)
    set_path(doc, path, mutate(path, value))
    after = fingerprint(StackConfig.model_validate(doc))
    assert after != base_fingerprints[key], f"loadproof:{path} changes nothing in the rendered stack"


def test_local_only_keys_are_read_by_the_demo() -> None:
    import inspect

    import localstack.proof as local_stack

    assert "workers.processes" in inspect.getsource(local_stack)
    assert "workers.nice" in inspect.getsource(local_stack)


def test_every_field_has_a_description() -> None:
    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")

    walk(StackConfig, "")


def test_every_stack_file_is_generated() -> None:
    """A stack file the generator does not know would escape the drift test and every per-stack test."""
    on_disk = {p.name.removeprefix("Pulumi.").removesuffix(".yaml") for p in REPO_ROOT.glob("Pulumi.*.yaml")}
    assert on_disk == set(stackfile.HEADERS) == set(stackfile.OVERRIDES)


@pytest.mark.parametrize("stack", sorted(stackfile.HEADERS))
def test_stack_files_are_generated_from_the_schema(stack: str) -> None:
    """Each file equals the generator's output: every key present, each with its description as a comment."""
    assert stack_file(stack).read_text() == stackfile.render(stackfile.config_for(stack), stackfile.HEADERS[stack]), (
        f"Pulumi.{stack}.yaml is stale: run `python -m common.stackfile`"
    )
    assert load(stack) == stackfile.config_for(stack)


def test_dev_file_documents_every_leaf() -> None:
    text = stack_file("dev").read_text()
    for path, _ in leaves(BASE):
        key = path.split(".")[-1]
        if key.isdigit() or path.startswith("loadtest.profiles"):
            continue
        lines = [ln for ln in text.splitlines() if re.match(rf"^\s*(loadproof:)?{re.escape(key)}:", ln)]
        assert lines, f"{path} missing from Pulumi.dev.yaml"
        assert any("  # " in ln for ln in lines), f"{path} has no comment in Pulumi.dev.yaml"


def test_kind_stack_is_small_and_local() -> None:
    cfg = load("kind")
    assert cfg.loadtest.runners == 1
    assert cfg.baseline.ingress_controller is True
    assert cfg.loadtest.profile == "smoke"
    assert cfg.monitoring.grafana.host == "grafana.127.0.0.1.nip.io"
    ev = render.evaluate(cfg, stack="kind")
    assert any(r.typ == "kubernetes:helm.sh/v3:Release" for r in ev.mocks.resources)
    assert ev.outputs["grafana_url"] == "http://grafana.127.0.0.1.nip.io/"


def test_unknown_key_is_rejected_with_its_name() -> None:
    with pytest.raises(StackConfigError, match=r"loadproof:orchestrator\.dbPoolSise"):
        parse({"orchestrator": {"dbPoolSise": 3}})


def test_external_modes_need_their_secrets() -> None:
    cfg = StackConfig.model_validate({**BASE_DOC, "postgres": {**BASE_DOC["postgres"], "mode": "external"}})
    with pytest.raises(Exception, match="databaseUrl"):
        render.evaluate(cfg, secrets={})


def test_numbers_from_pulumi_config_set_path_are_accepted_for_text_fields() -> None:
    """`pulumi config set --path loadproof:loadtest.runId 2` stores the number 2, not "2"."""
    cfg = parse({"loadtest": {"runId": 2}, "baseline": {"quotaCpu": 8}, "orchestrator": {"dbPoolSize": "30"}})
    assert cfg.loadtest.run_id == "2"
    assert cfg.baseline.quota_cpu == "8"
    assert cfg.orchestrator.db_pool_size == 30


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"replicas": 1}, r"replicas \(1\) must lie within"),
        ({"replicas": 7}, r"replicas \(7\) must lie within"),
        ({"autoscale": {"minReplicas": 4, "maxReplicas": 3}, "replicas": 3}, r"minReplicas \(4\) <= maxReplicas"),
        ({"autoscale": {"minReplicas": 0}}, r"1 <= minReplicas"),
    ],
)
def test_api_replicas_and_hpa_bounds_are_consistent(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(StackConfigError, match=message):
        parse({"orchestrator": changes})


@pytest.mark.parametrize(
    ("baseline", "message"),
    [
        ({"apiServerCidrs": ["10.0.0.1/8"]}, r"apiServerCidrs"),  # host bits set: not a network
        ({"apiServerCidrs": ["kubernetes"]}, r"apiServerCidrs"),
        ({"nodeLocalDns": "169.254.20.300"}, r"nodeLocalDns"),
        ({"apiServerFromEndpoints": False}, r"apiServerCidrs is empty"),
    ],
)
def test_network_keys_are_checked(baseline: dict[str, Any], message: str) -> None:
    with pytest.raises(StackConfigError, match=message):
        parse({"baseline": baseline})


@pytest.mark.parametrize(
    ("grafana", "message"),
    [
        ({"tls": True}, r"grafana: .*neither certIssuer nor tlsSecret"),
        ({"tls": True, "tlsSecret": "Grafana_TLS"}, r"grafana\.tlsSecret: .*not a Kubernetes object name"),
        ({"tlsSecret": "-tls"}, r"grafana\.tlsSecret"),
    ],
)
def test_grafana_tls_needs_a_certificate(grafana: dict[str, Any], message: str) -> None:
    with pytest.raises(StackConfigError, match=message):
        parse({"monitoring": {"grafana": grafana}})
    ok = parse({"monitoring": {"grafana": {"tls": True, "tlsSecret": "dash-example-org"}}}).monitoring.grafana
    assert ok.tls and ok.tls_secret == "dash-example-org"


def test_anonymous_viewing_is_off_by_default_in_every_stack() -> None:
    """An anonymous Viewer may run any PromQL through /api/ds/query: it is an explicit opt-in."""
    assert StackConfig().monitoring.grafana.anonymous_viewing is False
    for stack in ("dev", "kind", "k3d"):
        assert load(stack).monitoring.grafana.anonymous_viewing is False, stack


def test_a_map_key_can_be_cleared_with_pulumi_config_set_path() -> None:
    """`pulumi config set --path loadproof:baseline.ingressNodeSelector '{}'` stores the text "{}"."""
    assert parse({"baseline": {"ingressNodeSelector": "{}"}}).baseline.ingress_node_selector == {}
    cfg = parse({"baseline": {"ingressPodSelector": '{"app.kubernetes.io/name": "traefik"}'}})
    assert cfg.baseline.ingress_pod_selector == {"app.kubernetes.io/name": "traefik"}
