"""What a first `pulumi up` on a given cluster needs from the program: storage classes, one explicit
Kubernetes provider, no wait for an Ingress address nobody publishes, KEDA present before its objects,
and requests that fit the cluster the docs offer the stack on (kind on a 4-CPU Docker VM).

All offline: the real program under Pulumi's mocks (``infra/render.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common import stackfile
from common.stackconfig import StackConfigError, load, parse
from infra import autoscaling, baseline, kube, monitoring, program, render
from tests.test_infra_manifests import STACKS, WORKLOAD_KINDS, with_changes

PVCS = {  # storage-class key -> how its claim is found among the rendered objects
    "postgres.storageClass": ("StatefulSet", "postgres"),
    "redis.storageClass": ("PersistentVolumeClaim", "redis-data"),
    "monitoring.prometheus.storageClass": ("PersistentVolumeClaim", "prometheus-data"),
}


def claim_spec(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    obj = render.find(objects, kind, name)
    if kind == "StatefulSet":
        (template,) = obj["spec"]["volumeClaimTemplates"]
        return template["spec"]
    return obj["spec"]


# ------------------------------------------------------------------------------------------ storage


def test_each_pvc_takes_its_own_storage_class() -> None:
    classes = {key: f"class-{i}" for i, key in enumerate(PVCS)}
    objects = render.evaluate(with_changes(load("dev"), classes)).manifests()
    for key, (kind, name) in PVCS.items():
        assert claim_spec(objects, kind, name)["storageClassName"] == classes[key], key
    assert render.validate(objects) == []


@pytest.mark.parametrize("stack", ["dev", "kind", "k3d"])
def test_empty_storage_class_leaves_the_cluster_default(stack: str) -> None:
    """Empty = no ``storageClassName`` at all; an explicit "" would mean "no class" to Kubernetes."""
    objects = render.evaluate(load(stack), stack=stack).manifests()
    for kind, name in PVCS.values():
        assert "storageClassName" not in claim_spec(objects, kind, name), name


def test_eks_stack_uses_gp3_and_says_what_the_ebs_add_on_needs() -> None:
    cfg = load("eks")
    objects = render.evaluate(cfg, stack="eks").manifests()
    for kind, name in PVCS.values():
        assert claim_spec(objects, kind, name)["storageClassName"] == "gp3", name
    header = "\n".join(stackfile.HEADERS["eks"])
    for needed in ("aws-ebs-csi-driver", "AmazonEBSCSIDriverPolicy", "ebs.csi.aws.com", "WaitForFirstConsumer"):
        assert needed in header
    assert cfg.image.count("/") >= 1, "EKS nodes pull from a registry, not from images loaded into kind"


# ------------------------------------------------------------------------------------------ provider


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_resource_uses_the_stack_provider(stack: str) -> None:
    cfg = load(stack)
    ev = render.evaluate(cfg, stack=stack)
    assert ev.default_provider_users() == []
    assert render.check_provider(ev) == []
    assert ev.provider_inputs().get("context", "") == cfg.kube_context
    assert ev.outputs["kube_context"] == cfg.kube_context
    # Reads (the API server's EndpointSlice, the report ConfigMap) and Helm releases included.
    bound = {name for name, ref in ev.monitor.providers.items() if ref}
    assert "baseline-api-server-endpoints" in bound and "report-result" in bound
    if cfg.baseline.ingress_controller:
        assert "baseline-ingress-nginx" in bound


def test_the_provider_check_catches_a_resource_on_the_default_provider() -> None:
    ev = render.evaluate(load("kind"), stack="kind")
    ev.monitor.providers["monitoring-prometheus-data"] = ""  # as if registered without the provider
    assert render.check_provider(ev) == [f"monitoring-prometheus-data: not bound to provider {program.PROVIDER_NAME!r}"]


def test_render_cli_writes_the_provider_next_to_the_manifests(tmp_path: Path) -> None:
    assert render.main(["--stack", "eks", "--out", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "eks" / render.PROVIDER_FILE).read_text())
    assert doc["type"] == "pulumi:providers:kubernetes" and doc["inputs"]["context"] == "loadproof-eks"
    assert {"postgres-statefulset", "monitoring-grafana-ingress", "baseline-api-server-endpoints"} <= set(
        doc["resources"]
    )


def test_laptop_and_eks_stacks_pin_their_context() -> None:
    assert {s: load(s).kube_context for s in ("kind", "k3d", "eks")} == {
        "kind": "kind-loadproof",  # `kind create cluster --name loadproof`
        "k3d": "k3d-loadproof",  # `k3d cluster create loadproof`
        "eks": "loadproof-eks",  # `aws eks update-kubeconfig --alias loadproof-eks`
    }
    assert load("dev").kube_context == ""  # any cluster: the current context, with a warning


# ------------------------------------------------------------------------------------------ ingress


@pytest.mark.parametrize("stack", STACKS)
def test_the_ingress_is_awaited_only_behind_the_controller_this_stack_installs(stack: str) -> None:
    cfg = load(stack)
    ev = render.evaluate(cfg, stack=stack)
    annotations = render.find(ev.manifests(), "Ingress", "grafana")["metadata"].get("annotations", {})
    note = ev.outputs["grafana_ingress"]
    if cfg.baseline.ingress_controller:
        assert monitoring.SKIP_AWAIT not in annotations
        assert note.startswith("awaited")
        assert ev.waits_for("monitoring-grafana-ingress", "baseline-ingress-nginx")
    else:
        assert annotations[monitoring.SKIP_AWAIT] == "true"
        assert note.startswith("not awaited") and "baseline.ingressController" in note


def test_dev_stack_does_not_wait_for_an_ingress_address() -> None:
    """The stack docs/cluster.md used to offer on kind: no controller installed, so no 10-minute wait."""
    assert load("dev").baseline.ingress_controller is False
    on = render.evaluate(with_changes(load("dev"), {"baseline.ingressController": True})).manifests()
    assert monitoring.SKIP_AWAIT not in render.find(on, "Ingress", "grafana")["metadata"].get("annotations", {})


# ------------------------------------------------------------------------------------------ KEDA


def test_autoscaling_without_keda_fails_naming_the_keys() -> None:
    with pytest.raises(StackConfigError, match=r"baseline\.kedaInstall.*baseline\.kedaPreinstalled"):
        parse({"workers": {"autoscaling": {"enabled": True}}})
    with pytest.raises(StackConfigError, match="choose one"):
        parse({"baseline": {"kedaInstall": True, "kedaPreinstalled": True}})
    parse({"workers": {"autoscaling": {"enabled": True}}, "baseline": {"kedaPreinstalled": True}})
    parse({"baseline": {"kedaPreinstalled": True}})  # autoscaling off: nothing to check


CRD_TYPE = "kubernetes:apiextensions.k8s.io/v1:CustomResourceDefinition"


def test_preinstalled_keda_is_read_at_preview() -> None:
    """The cluster's ScaledObject CRD is read (reads run at preview too) before KEDA objects are created."""
    on = {"workers.autoscaling.enabled": True, "postgres.maxConnections": 5000}
    ev = render.evaluate(with_changes(load("dev"), {**on, "baseline.kedaPreinstalled": True}))
    assert (CRD_TYPE, baseline.KEDA_SCALED_OBJECT_CRD) in ev.mocks.reads
    for name in ("autoscaling-scaled-object", "autoscaling-trigger-auth"):
        assert ev.waits_for(name, "baseline-keda-crd"), name
    assert ev.default_provider_users() == []
    assert render.find(ev.manifests(), "ScaledObject", autoscaling.SCALED_OBJECT_NAME)
    # Installed by the stack: the release brings the CRD, nothing is read.
    installed = render.evaluate(with_changes(load("dev"), {**on, "baseline.kedaInstall": True}))
    assert not [r for r in installed.mocks.reads if r[0] == CRD_TYPE]
    # Off: nothing is read even where the cluster is said to run KEDA.
    off = render.evaluate(with_changes(load("dev"), {"baseline.kedaPreinstalled": True}))
    assert not [r for r in off.mocks.reads if r[0] == CRD_TYPE]


# ------------------------------------------------------------------------------------------ kind's size

# CPU requests kind's own pods make on its one node (kind >= v0.28 with Kubernetes 1.33): the kubeadm static
# pods, CoreDNS (2 replicas), kindnet; kube-proxy and local-path-provisioner request none.
KIND_SYSTEM_CPU = {
    "kube-apiserver": 0.25,
    "kube-controller-manager": 0.2,
    "kube-scheduler": 0.1,
    "etcd": 0.1,
    "coredns": 2 * 0.1,
    "kindnet": 0.1,
}
INGRESS_NGINX_CPU = 0.1  # the chart's default controller request
DOCKER_VM_CPUS = 4.0


def peak_cpu_requests(stack: str) -> float:
    """The stack's pods at full scale: HPA ceiling, one surge pod per rolling Deployment, every Job at once."""
    cfg = load(stack)
    total = 0.0
    for o in render.evaluate(cfg, stack=stack).manifests():
        if o["kind"] not in (*WORKLOAD_KINDS, "Job"):
            continue
        spec, name = o["spec"], o["metadata"]["name"]
        if o["kind"] == "Job":
            n = spec.get("parallelism", 1)
        elif o["kind"] == "StatefulSet":
            n = spec.get("replicas", 1)
        else:
            n = cfg.orchestrator.autoscale.max_replicas if name == "orchestrator" else spec["replicas"]
            n += 0 if spec.get("strategy", {}).get("type") == "Recreate" else 1
        containers = spec["template"]["spec"]["containers"]
        total += n * sum(kube.cpu_cores(c["resources"]["requests"]["cpu"]) for c in containers)
    if cfg.baseline.ingress_controller:
        total += INGRESS_NGINX_CPU
    return total


def test_kind_stack_fits_one_kind_node_on_a_4_cpu_docker_vm() -> None:
    assert sum(KIND_SYSTEM_CPU.values()) + peak_cpu_requests("kind") <= DOCKER_VM_CPUS


def test_dev_stack_does_not_fit_there_so_the_docs_do_not_offer_it() -> None:
    """If this fails, dev fits kind again and docs/cluster.md may offer it there."""
    assert sum(KIND_SYSTEM_CPU.values()) + peak_cpu_requests("dev") > DOCKER_VM_CPUS
