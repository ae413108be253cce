"""Queue-driven worker scaling (``workers.autoscaling``): the KEDA objects render, validate and are wired
to the queue the workers consume; off, the workers keep their fixed replica count.

Like ``test_infra_manifests.py``, this evaluates the real program under Pulumi's mocks; the Redis test
at the end runs against a real redis-server.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import redis as redis_client
import yaml

from common.stackconfig import StackConfig, StackConfigError, load, parse
from infra import autoscaling, baseline, crds, kube, postgres, render
from infra import redis as redis_component
from localstack.servers import RedisServer
from service.config import Settings
from tests.test_infra_manifests import container, env_of, with_changes

# Postgres room for KEDA's maxReplicas worker pods (the dev stack's maxConnections covers fixed replicas).
KEDA_ON = {"workers.autoscaling.enabled": True, "postgres.maxConnections": 5000}
WORKERS_DEPLOYMENT = "orchestrator-workers"  # logical (Pulumi) names
SCALED_OBJECT = "autoscaling-scaled-object"
TRIGGER_AUTH = "autoscaling-trigger-auth"
KEDA_RELEASE = "baseline-keda"
RELEASE_TYPE = "kubernetes:helm.sh/v3:Release"


def keda_cfg(**more: Any) -> StackConfig:
    return with_changes(load("dev"), {**KEDA_ON, "baseline.kedaInstall": True, **more})


@pytest.fixture(scope="module")
def keda() -> render.Evaluation:
    return render.evaluate(keda_cfg())


@pytest.fixture(scope="module")
def keda_objects(keda: render.Evaluation) -> list[dict[str, Any]]:
    return keda.manifests()


def releases(evaluation: render.Evaluation) -> dict[str, dict[str, Any]]:
    return {r.name: render.to_plain(r.inputs) for r in evaluation.mocks.resources if r.typ == RELEASE_TYPE}


def test_scaled_object_renders_and_validates(keda: render.Evaluation, keda_objects: list[dict[str, Any]]) -> None:
    cfg, a = keda.cfg, keda.cfg.workers.autoscaling
    assert render.validate(keda_objects) == []
    so = render.find(keda_objects, "ScaledObject", autoscaling.SCALED_OBJECT_NAME)
    assert so["apiVersion"] == "keda.sh/v1alpha1" and so["metadata"]["namespace"] == cfg.namespace
    spec = so["spec"]
    target = render.find(keda_objects, "Deployment", spec["scaleTargetRef"]["name"])
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "workers"}
    assert target["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "service.worker"
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (a.min_replicas, a.max_replicas)
    assert spec["pollingInterval"] == a.polling_interval_s
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior == {"scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_s}}
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams" and trigger["metricType"] == "AverageValue"
    meta = trigger["metadata"]
    # lagCount set with a consumerGroup: KEDA (>= 2.11) scales on the group's lag.
    assert meta["lagCount"] == str(a.lag_threshold) and "pendingEntriesCount" not in meta
    assert all(isinstance(v, str) for v in meta.values())  # the CRD's metadata is a map of strings
    # The address is the Redis Service, on the port it serves.
    host, port = meta["address"].rsplit(":", 1)
    service = render.find(keda_objects, "Service", host.split(".")[0])
    assert host == f"redis.{cfg.namespace}.svc" and service["spec"]["ports"][0]["port"] == int(port) == kube.REDIS_PORT
    assert meta["databaseIndex"] == str(redis_component.DATABASE_INDEX)


def test_password_comes_from_the_redis_secret_never_the_scaled_object(
    keda: render.Evaluation, keda_objects: list[dict[str, Any]]
) -> None:
    (trigger,) = render.find(keda_objects, "ScaledObject", autoscaling.SCALED_OBJECT_NAME)["spec"]["triggers"]
    auth = render.find(keda_objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert trigger["authenticationRef"]["kind"] == "TriggerAuthentication"
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    secret = render.find(keda_objects, "Secret", ref["name"])
    password = render.mock_password("redis-password")
    assert secret["stringData"][ref["key"]] == password  # the generated password alone, not the URL
    for o in keda_objects:
        if o["kind"] != "Secret":
            assert password not in yaml.safe_dump(o), f"{o['kind']}/{o['metadata']['name']}"


def test_trigger_watches_the_queue_the_workers_consume(
    keda_objects: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stream and group are what the workers resolve from their own environment; change that environment
    and the trigger follows (no second literal)."""

    def queue_of(objects: list[dict[str, Any]]) -> tuple[tuple[str, str], tuple[str, str]]:
        env = {k: v for k, v in env_of(container(objects, "Deployment", "workers")).items() if isinstance(v, str)}
        resolved = Settings.model_validate({k.removeprefix("LOADPROOF_").lower(): v for k, v in env.items()})
        (trigger,) = render.find(objects, "ScaledObject", autoscaling.SCALED_OBJECT_NAME)["spec"]["triggers"]
        meta = trigger["metadata"]
        return (meta["stream"], meta["consumerGroup"]), (resolved.queue_stream, resolved.queue_group)

    trigger, workers = queue_of(keda_objects)
    assert trigger == workers == (Settings().queue_stream, Settings().queue_group)
    original = StackConfig.service_env
    renamed = {"LOADPROOF_QUEUE_STREAM": "elsewhere:tasks", "LOADPROOF_QUEUE_GROUP": "other-workers"}
    monkeypatch.setattr(StackConfig, "service_env", lambda self: {**original(self), **renamed})
    trigger, workers = queue_of(render.evaluate(keda_cfg()).manifests())
    assert trigger == workers == ("elsewhere:tasks", "other-workers")


def test_keda_owns_the_worker_count_when_on(keda: render.Evaluation, keda_objects: list[dict[str, Any]]) -> None:
    """Pulumi sets the starting count and then ignores ``spec.replicas``, so a `pulumi up` never resets what
    KEDA's HPA chose (the API's HPA is handled the same way)."""
    assert keda.monitor.ignore_changes[WORKERS_DEPLOYMENT] == ["spec.replicas"]
    a = keda.cfg.workers.autoscaling
    assert a.min_replicas <= render.find(keda_objects, "Deployment", "workers")["spec"]["replicas"] <= a.max_replicas
    assert keda.waits_for(SCALED_OBJECT, KEDA_RELEASE) and keda.waits_for(TRIGGER_AUTH, KEDA_RELEASE)
    assert keda.waits_for(SCALED_OBJECT, TRIGGER_AUTH)


@pytest.mark.parametrize("stack", ["dev", "eks", "kind", "k3d"])
def test_off_the_workers_have_a_fixed_count_and_no_keda(stack: str) -> None:
    cfg = load(stack)
    assert cfg.workers.autoscaling.enabled is False and cfg.baseline.keda_install is False
    ev = render.evaluate(cfg, stack=stack)
    objects = ev.manifests()
    assert not [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
    assert KEDA_RELEASE not in releases(ev)
    assert ev.monitor.ignore_changes[WORKERS_DEPLOYMENT] == []
    assert render.find(objects, "Deployment", "workers")["spec"]["replicas"] == cfg.workers.replicas
    rules = render.find(objects, "NetworkPolicy", "allow-redis")["spec"]["ingress"]
    assert not [p for r in rules for p in r["from"] if "namespaceSelector" in p]


def test_keda_is_installed_from_its_chart_only_when_asked(keda: render.Evaluation) -> None:
    release = releases(keda)[KEDA_RELEASE]
    assert release["chart"] == "keda" and release["version"] == baseline.KEDA_CHART_VERSION
    assert release["repositoryOpts"] == {"repo": baseline.KEDA_CHART_REPO}
    assert release["namespace"] == keda.cfg.baseline.keda_namespace and release["createNamespace"] is True
    major, minor, _ = (int(x) for x in baseline.KEDA_CHART_VERSION.split("."))
    assert (major, minor) >= (2, 11)  # lag mode of the redis-streams trigger
    # A cluster that already runs KEDA: the same objects, no release, nothing to wait for.
    existing = render.evaluate(
        with_changes(keda.cfg, {"baseline.kedaInstall": False, "baseline.kedaPreinstalled": True})
    )
    assert KEDA_RELEASE not in releases(existing)
    assert [o["kind"] for o in existing.manifests() if o["apiVersion"].startswith("keda.sh/")] == [
        "TriggerAuthentication",
        "ScaledObject",
    ]


def test_only_the_keda_operator_may_reach_redis(keda_objects: list[dict[str, Any]]) -> None:
    cfg = keda_cfg()
    b = cfg.baseline
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": b.keda_namespace}},
        "podSelector": {"matchLabels": b.keda_operator_pod_selector},
    }
    redis_in = render.find(keda_objects, "NetworkPolicy", "allow-redis")["spec"]["ingress"]
    assert {"from": [operator], "ports": [{"port": kube.REDIS_PORT, "protocol": "TCP"}]} in redis_in
    for name in ("allow-postgres", "allow-orchestrator", "allow-workers", "allow-prometheus"):
        rules = render.find(keda_objects, "NetworkPolicy", name)["spec"].get("ingress", [])
        assert not [p for r in rules for p in r["from"] if "namespaceSelector" in p], name
    # Another operator namespace or label set moves the peer with it.
    moved = with_changes(cfg, {"baseline.kedaNamespace": "autoscalers", "baseline.kedaOperatorPodSelector": {}})
    moved_in = render.find(render.evaluate(moved).manifests(), "NetworkPolicy", "allow-redis")["spec"]["ingress"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "autoscalers"}}} in [
        p for r in moved_in for p in r["from"]
    ]


def test_postgres_connections_are_checked_at_keda_max_replicas() -> None:
    cfg = keda_cfg()
    o, w = cfg.orchestrator, cfg.workers
    per_process = o.db_pool_size + o.db_max_overflow
    demand = postgres.connection_demand(cfg)
    fixed = postgres.connection_demand(with_changes(cfg, {"workers.autoscaling.enabled": False}))
    assert demand is not None and fixed is not None
    assert demand == fixed + (w.autoscaling.max_replicas - w.replicas) * per_process
    render.evaluate(with_changes(cfg, {"postgres.maxConnections": demand}))
    with pytest.raises(ValueError, match=r"postgres\.maxConnections.*autoscaling on, its maxReplicas"):
        render.evaluate(with_changes(cfg, {"postgres.maxConnections": demand - 1}))
    # One more worker pod at KEDA's ceiling is one more pool: refused at the same maxConnections.
    with pytest.raises(ValueError, match=r"postgres\.maxConnections"):
        render.evaluate(
            with_changes(
                cfg,
                {
                    "postgres.maxConnections": demand,
                    "workers.autoscaling.maxReplicas": w.autoscaling.max_replicas + 1,
                },
            )
        )
    # The dev stack's own maxConnections covers its fixed workers but not KEDA's ceiling: turning KEDA on
    # there fails loudly, naming the key, instead of exhausting Postgres under load.
    with pytest.raises(ValueError, match=r"postgres\.maxConnections"):
        render.evaluate(with_changes(load("dev"), {"workers.autoscaling.enabled": True, "baseline.kedaInstall": True}))


@pytest.mark.parametrize("stack", ["kind", "k3d"])
def test_small_stacks_can_turn_keda_on_as_they_are(stack: str) -> None:
    on = {"workers.autoscaling.enabled": True, "baseline.kedaInstall": True}
    objects = render.evaluate(with_changes(load(stack), on), stack=stack).manifests()
    assert render.validate(objects) == []
    assert render.find(objects, "ScaledObject", autoscaling.SCALED_OBJECT_NAME)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workers": {"replicas": 8, "autoscaling": {"enabled": True}}}, r"replicas \(8\) must lie within autoscaling"),
        ({"workers": {"autoscaling": {"minReplicas": 0}}}, r"1 <= minReplicas"),
        ({"workers": {"autoscaling": {"minReplicas": 4, "maxReplicas": 3}}}, r"minReplicas \(4\) <= maxReplicas"),
        ({"workers": {"autoscaling": {"lagThreshold": 0}}}, r"lagThreshold"),
        ({"workers": {"autoscaling": {"scaleDownStabilizationS": 3601}}}, r"scaleDownStabilizationS"),
        (
            {"workers": {"autoscaling": {"enabled": True}}, "redis": {"mode": "external"}},
            r"loadproof:\(stack\): .*needs redis\.mode internal",
        ),
    ],
)
def test_autoscaling_keys_are_checked(values: dict[str, Any], message: str) -> None:
    with pytest.raises(StackConfigError, match=message):
        parse(values)


def test_fixed_replicas_need_not_lie_within_unused_bounds() -> None:
    assert parse({"workers": {"replicas": 8}}).workers.peak_replicas == 8


def test_crd_validation_catches_what_the_api_server_would_refuse(keda_objects: list[dict[str, Any]]) -> None:
    so = render.find(keda_objects, "ScaledObject", autoscaling.SCALED_OBJECT_NAME)
    assert crds.validate(so) == []

    def problems(change: Any) -> list[str]:
        broken = copy.deepcopy(so)
        change(broken)
        return render.validate([broken])

    misspelt = problems(lambda o: o["spec"].update(maxReplicas=3))
    assert misspelt and all("maxReplicas" in p for p in misspelt)
    assert any("triggers" in p for p in problems(lambda o: o["spec"].pop("triggers")))
    assert any("lagCount" in p for p in problems(lambda o: o["spec"]["triggers"][0]["metadata"].update(lagCount=5)))
    window = problems(
        lambda o: o["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"].update(
            stabilizationWindowSeconds=7200
        )
    )
    assert any("stabilizationWindowSeconds" in p for p in window)
    auth = copy.deepcopy(render.find(keda_objects, "TriggerAuthentication", autoscaling.TRIGGER_AUTH_NAME))
    del auth["spec"]["secretTargetRef"][0]["key"]
    assert any("'key' is a required property" in p for p in render.validate([auth]))


def test_redis_cannot_always_state_the_lag(redis_server: RedisServer) -> None:
    """Why ``scaleDownStabilizationS`` matters: the workers delete entries on acknowledgement, and once the
    newest delivered entry is deleted while an older one is still pending, ``XINFO GROUPS`` answers lag NULL
    (KEDA then reads it as below any target) although entries are waiting. A real redis-server."""
    client = redis_client.Redis.from_url(redis_server.url)
    stream, group = "test-infra-autoscaling:lag", "g"
    client.delete(stream)
    try:
        client.xgroup_create(stream, group, id="0", mkstream=True)
        ids = [client.xadd(stream, {"t": str(i)}) for i in range(3)]
        client.xreadgroup(group, "worker-1", {stream: ">"}, count=2)  # delivers ids[0], ids[1]
        assert client.xinfo_groups(stream)[0]["lag"] == 1  # defined while nothing was deleted
        client.xack(stream, group, ids[1])
        client.xdel(stream, ids[1])  # done first, while ids[0] is still pending
        client.xadd(stream, {"t": "3"})
        info = client.xinfo_groups(stream)[0]
        waiting = client.xlen(stream) - info["pending"]
        assert waiting == 2 and info["lag"] is None
    finally:
        client.delete(stream)
        client.close()
