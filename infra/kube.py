"""Building blocks every component shares: labels, hardened security contexts, resources, probes.

Kept in one place so that every pod the program creates meets the same bar (Pod Security
"restricted", requests and limits set, labels Prometheus and the NetworkPolicies select on) and a
test can check that bar once for all of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pydantic import ValidationError

from common.stackconfig import Resources
from service.config import Settings

PART_OF = "loadproof"
NAME_LABEL = "app.kubernetes.io/name"
COMPONENT_LABEL = "app.kubernetes.io/component"
# Ports are fixed (not config): Services give every component a stable DNS name, so nothing needs them to vary.
ORCHESTRATOR_PORT = 8080
WORKER_METRICS_PORT = 9101
SIMULATOR_PORT = 8090
POSTGRES_PORT = 5432
REDIS_PORT = 6379
GRAFANA_PORT = 3000
K6_API_PORT = 6565


# On a Job: a failed (unready) Job from an earlier `pulumi up` is replaced by the next one instead of
# failing it. Our Jobs never retry (backoffLimit 0), so without this one failed run blocks every later up.
JOB_ANNOTATIONS = {"pulumi.com/replaceUnready": "true"}


@dataclass(frozen=True)
class RunNames:
    """The names of one run's objects, all derived from its run id (``hex``), so a new id renames all."""

    hex: str

    @property
    def test_id(self) -> str:
        """The ``testid`` tag on every k6 sample of the run."""
        return f"lp-{self.hex}"

    @property
    def runners(self) -> str:
        """The runner Job and its headless Service."""
        return f"k6-{self.hex}"

    @property
    def start(self) -> str:
        """The start barrier Job and the ConfigMap it records the start time in."""
        return f"k6-start-{self.hex}"

    @property
    def report(self) -> str:
        """The report Job and the ConfigMap it writes the report into."""
        return f"report-{self.hex}"


# Stands in for the run id when a Job spec is hashed into the run id's own keepers.
PLACEHOLDER_RUN = RunNames("<run>")


def plain(value: Any) -> Any:
    """A resource's Args (``*Args`` input types, lists, dicts, scalars) as JSON-able data, keys sorted.

    Refuses an ``Output``: a spec hashed into the run id's keepers must be fully known at plan time.
    """
    if isinstance(value, pulumi.Output):
        raise TypeError("an Output cannot be hashed at plan time: build the spec from plain values")
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in sorted(value.items()) if v is not None}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if type(value).__module__.startswith("pulumi_kubernetes."):
        return plain({k: v for k, v in vars(value).items() if not k.startswith("__")})
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot hash a {type(value).__name__} in a Job spec")


def digest(doc: Any) -> str:
    """A short stable hash of plain data or Args (see :func:`plain`)."""
    return hashlib.sha256(json.dumps(plain(doc), sort_keys=True).encode()).hexdigest()[:16]


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def storage_class(name: str) -> str | None:
    """``storageClassName`` of a PVC from a stack key: empty = omitted, i.e. the cluster's default class.

    (Kubernetes reads an explicit ``""`` as "no class, bind a pre-made PV only", never what a stack means.)
    """
    return name or None


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``512Mi``, ``1G``, ``1048576``) in bytes."""
    for units in (_BINARY, _DECIMAL):
        for suffix, factor in units.items():
            if quantity.endswith(suffix):
                return int(float(quantity[: -len(suffix)]) * factor)
    return int(float(quantity))


def cpu_cores(quantity: str) -> float:
    """A Kubernetes CPU quantity (``250m``, ``2``) in cores."""
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def selector(component: str) -> dict[str, str]:
    """The labels a Service, NetworkPolicy or PDB selects one component's pods by."""
    return {NAME_LABEL: PART_OF, COMPONENT_LABEL: component}


def labels(component: str) -> dict[str, str]:
    return {**selector(component), "app.kubernetes.io/part-of": PART_OF, "app.kubernetes.io/managed-by": "pulumi"}


def metadata(
    name: str,
    namespace: pulumi.Input[str],
    component: str,
    *,
    annotations: Mapping[str, pulumi.Input[str]] | None = None,
) -> k8s.meta.v1.ObjectMetaArgs:
    """Explicit names (no Pulumi suffixes) so Services have stable DNS names and manifests are reproducible."""
    return k8s.meta.v1.ObjectMetaArgs(
        name=name, namespace=namespace, labels=labels(component), annotations=dict(annotations) if annotations else None
    )


def scrape_annotations(port: int, path: str = "/metrics") -> dict[str, str]:
    """Opt a pod into the annotation-driven Prometheus pod discovery (``common/prometheus_config.py``)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": path}


def resources(r: Resources) -> k8s.core.v1.ResourceRequirementsArgs:
    return k8s.core.v1.ResourceRequirementsArgs(
        requests={"cpu": r.cpu_request, "memory": r.memory_request},
        limits={"cpu": r.cpu_limit, "memory": r.memory_limit},
    )


def container_security() -> k8s.core.v1.SecurityContextArgs:
    """Pod Security Standard "restricted" plus a read-only root filesystem (writable paths are emptyDirs)."""
    return k8s.core.v1.SecurityContextArgs(
        allow_privilege_escalation=False,
        read_only_root_filesystem=True,
        run_as_non_root=True,
        capabilities=k8s.core.v1.CapabilitiesArgs(drop=["ALL"]),
        seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
    )


def pod_security(uid: int, *, persistent: bool = False) -> k8s.core.v1.PodSecurityContextArgs:
    """Numeric uid/gid (runAsNonRoot needs a number to verify) and fsGroup so volumes are writable.

    ``persistent``: the pod mounts a PersistentVolume. The kubelet then changes ownership only when the
    volume's root does not match (``OnRootMismatch``) instead of walking every file on every start,
    which on a large data directory can outlast the startup budget.
    """
    return k8s.core.v1.PodSecurityContextArgs(
        run_as_non_root=True,
        run_as_user=uid,
        run_as_group=uid,
        fs_group=uid,
        fs_group_change_policy="OnRootMismatch" if persistent else None,
        seccomp_profile=k8s.core.v1.SeccompProfileArgs(type="RuntimeDefault"),
    )


def spread(match_labels: pulumi.Input[Mapping[str, str]]) -> list[k8s.core.v1.TopologySpreadConstraintArgs]:
    """Prefer one pod per node for replicas of one thing (a node loss takes one, not all); never blocks scheduling."""
    return [
        k8s.core.v1.TopologySpreadConstraintArgs(
            max_skew=1,
            topology_key="kubernetes.io/hostname",
            when_unsatisfiable="ScheduleAnyway",
            label_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=match_labels),
        )
    ]


def check_settings(env: Mapping[str, str], where: str) -> Settings:
    """Validate ``LOADPROOF_*`` values with the service's own ``Settings`` now, at ``pulumi up``/render time.

    The stack schema only checks types; ``Settings`` also has the bounds (``ge``/``le``). Without this a
    bad value would surface as a crash-looping pod in the cluster instead of an error naming the variable.
    Returns the settings the pods will resolve, for objects that must agree with them (the queue's names).
    """
    prefix = "LOADPROOF_"
    values = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        problems = "; ".join(f"{prefix}{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise ValueError(f"{where}: the service would refuse its settings: {problems}") from exc


def env_list(values: Mapping[str, pulumi.Input[str]]) -> list[k8s.core.v1.EnvVarArgs]:
    """Plain (non-secret) environment variables, sorted for stable manifests."""
    return [k8s.core.v1.EnvVarArgs(name=k, value=values[k]) for k in sorted(values)]


def secret_env(name: str, secret: pulumi.Input[str], key: str) -> k8s.core.v1.EnvVarArgs:
    """An environment variable read from a Secret, never spelled out in the pod spec."""
    return k8s.core.v1.EnvVarArgs(
        name=name,
        value_from=k8s.core.v1.EnvVarSourceArgs(secret_key_ref=k8s.core.v1.SecretKeySelectorArgs(name=secret, key=key)),
    )


def empty_dir(name: str, size_limit: str = "256Mi") -> k8s.core.v1.VolumeArgs:
    return k8s.core.v1.VolumeArgs(name=name, empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(size_limit=size_limit))


def http_probe(
    path: str, port: int, *, period_s: int = 10, failure_threshold: int = 3, initial_delay_s: int = 0
) -> k8s.core.v1.ProbeArgs:
    return k8s.core.v1.ProbeArgs(
        http_get=k8s.core.v1.HTTPGetActionArgs(path=path, port=port),
        period_seconds=period_s,
        failure_threshold=failure_threshold,
        initial_delay_seconds=initial_delay_s,
        timeout_seconds=2,
    )


def exec_probe(command: list[str], *, period_s: int = 10, failure_threshold: int = 3) -> k8s.core.v1.ProbeArgs:
    return k8s.core.v1.ProbeArgs(
        exec_=k8s.core.v1.ExecActionArgs(command=command),
        period_seconds=period_s,
        failure_threshold=failure_threshold,
        timeout_seconds=3,
    )


def tcp_probe(port: int, *, period_s: int = 10, failure_threshold: int = 3) -> k8s.core.v1.ProbeArgs:
    return k8s.core.v1.ProbeArgs(
        tcp_socket=k8s.core.v1.TCPSocketActionArgs(port=port),
        period_seconds=period_s,
        failure_threshold=failure_threshold,
        timeout_seconds=2,
    )


def cluster_service(
    resource_name: str,
    name: str,
    namespace: pulumi.Input[str],
    component: str,
    port_name: str,
    port: int,
    *,
    parent: pulumi.Resource,
) -> k8s.core.v1.Service:
    """The stable in-cluster name of one component: a ClusterIP Service on one port."""
    return k8s.core.v1.Service(
        resource_name,
        metadata=metadata(name, namespace, component),
        spec=k8s.core.v1.ServiceSpecArgs(
            type="ClusterIP",
            selector=selector(component),
            ports=[k8s.core.v1.ServicePortArgs(name=port_name, port=port, target_port=port)],
        ),
        opts=pulumi.ResourceOptions(parent=parent),
    )


def bind_role(
    resource_name: str,
    name: str,
    namespace: pulumi.Input[str],
    component: str,
    role: k8s.rbac.v1.Role,
    account: k8s.core.v1.ServiceAccount,
    opts: pulumi.ResourceOptions,
) -> k8s.rbac.v1.RoleBinding:
    """Grant ``role`` to ``account`` in the namespace (namespace-scoped RBAC only)."""
    return k8s.rbac.v1.RoleBinding(
        resource_name,
        metadata=metadata(name, namespace, component),
        role_ref=k8s.rbac.v1.RoleRefArgs(
            api_group="rbac.authorization.k8s.io", kind="Role", name=role.metadata.apply(lambda m: m.name or "")
        ),
        subjects=[
            k8s.rbac.v1.SubjectArgs(
                kind="ServiceAccount", name=account.metadata.apply(lambda m: m.name or ""), namespace=namespace
            )
        ],
        opts=opts,
    )


def configmap_rule(names: pulumi.Input[Sequence[str]], verbs: Sequence[str]) -> k8s.rbac.v1.PolicyRuleArgs:
    """``verbs`` on the named ConfigMaps only."""
    return k8s.rbac.v1.PolicyRuleArgs(
        api_groups=[""], resources=["configmaps"], resource_names=names, verbs=list(verbs)
    )


def one_pod_job(
    component: str,
    container: k8s.core.v1.ContainerArgs,
    *,
    account: str,
    deadline_s: int,
    uid: int,
    tmp_size: str,
) -> k8s.batch.v1.JobSpecArgs:
    """A Job of one pod that runs ``container`` once as ``uid`` under its own ServiceAccount: never
    retried (``backoffLimit`` 0: a measurement is not silently repeated), ended at ``deadline_s``,
    with a ``tmp`` emptyDir of ``tmp_size`` (the root filesystem is read-only)."""
    return k8s.batch.v1.JobSpecArgs(
        backoff_limit=0,
        active_deadline_seconds=deadline_s,
        template=k8s.core.v1.PodTemplateSpecArgs(
            metadata=k8s.meta.v1.ObjectMetaArgs(labels=labels(component)),
            spec=k8s.core.v1.PodSpecArgs(
                restart_policy="Never",
                service_account_name=account,
                automount_service_account_token=True,
                security_context=pod_security(uid),
                containers=[container],
                volumes=[empty_dir("tmp", tmp_size)],
            ),
        ),
    )


def job_identity(
    resource_name: str,
    name: str,
    namespace: pulumi.Input[str],
    component: str,
    rules: Sequence[k8s.rbac.v1.PolicyRuleArgs],
    *,
    parent: pulumi.Resource,
) -> tuple[pulumi.Output[str], k8s.rbac.v1.RoleBinding]:
    """One Job's own ServiceAccount, Role (``rules``) and RoleBinding, all named ``name``.

    Returns the account's name and the binding: the Job must depend on the binding, or its first API
    call may be refused while the grant is still being created.
    """
    opts = pulumi.ResourceOptions(parent=parent)
    account = k8s.core.v1.ServiceAccount(
        f"{resource_name}-sa", metadata=metadata(name, namespace, component), opts=opts
    )
    role = k8s.rbac.v1.Role(
        f"{resource_name}-role", metadata=metadata(name, namespace, component), rules=rules, opts=opts
    )
    binding = bind_role(f"{resource_name}-rolebinding", name, namespace, component, role, account, opts)
    return account.metadata.apply(lambda m: m.name or ""), binding


def result_configmap(
    resource_name: str,
    name: pulumi.Input[str],
    namespace: pulumi.Input[str],
    component: str,
    *,
    parent: pulumi.Resource,
) -> k8s.core.v1.ConfigMap:
    """The empty ConfigMap a Job writes its result into.

    Created here because RBAC cannot limit ``create`` to a name (the object does not exist yet): the
    Job may then only patch this one. Its data belongs to the Job (ignored by Pulumi, so a refresh
    never wipes a result), and it is retained when a re-run replaces it: earlier results stay
    readable until the namespace is deleted.
    """
    return k8s.core.v1.ConfigMap(
        resource_name,
        metadata=k8s.meta.v1.ObjectMetaArgs(name=name, namespace=namespace, labels=labels(component)),
        opts=pulumi.ResourceOptions(parent=parent, ignore_changes=["data"], retain_on_delete=True),
    )
