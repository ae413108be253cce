"""The cluster's security rules as Pulumi policies (pulumi-policy), checked before anything is applied.

``pulumi preview --policy-pack policy/`` (and ``pulumi up``) runs them on every ``kubernetes:*``
resource of the stack; every policy is mandatory, so one violation fails the preview or stops the
update. ``docs/policy.md`` lists the rules, their exemptions and how to run them.

This module imports nothing of ours: the pack runs in a process of its own (Pulumi puts ``policy/``
on ``sys.path`` and runs ``__main__.py``), with only ``pulumi-policy`` installed
(``policy/requirements.txt``). The tests import it as ``policy.rules`` and call each policy's
``validate`` on the objects ``infra.render`` renders.

Resource properties arrive as pulumi-policy's read-only proxies (``Mapping``/``Sequence``, not
``dict``/``list``), numbers as floats; during a preview a value that is not known yet raises
``UnknownValueError`` on access, which pulumi-policy reports as "can't run during preview" and which
is left to propagate.
"""

from __future__ import annotations

import configparser
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    Policy,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

PACK_NAME = "loadproof-security"
MANDATORY = EnforcementLevel.MANDATORY

# Exemptions are annotations on the object's own metadata, so each is explicit and reviewed with it.
# A workload lists the containers that need a writable root filesystem (comma-separated names). None of
# ours needs it (Postgres included: its socket dir, /tmp and /dev/shm are emptyDir volumes).
WRITABLE_ROOT_FS_ANNOTATION = "policy.loadproof.dev/writable-root-filesystem"
# "true" on the object (grafana.ini ConfigMap, or workload) that turns Grafana's anonymous access on: an
# anonymous Viewer may send any query to every datasource, so that is a stated decision, never a default.
GRAFANA_ANONYMOUS_ANNOTATION = "policy.loadproof.dev/grafana-anonymous-access"

# Kinds whose objects carry a pod template (or are a pod), and where that pod spec is.
_POD_TEMPLATE_PATHS: dict[str, tuple[str, ...]] = {
    "Deployment": ("spec", "template"),
    "StatefulSet": ("spec", "template"),
    "DaemonSet": ("spec", "template"),
    "ReplicaSet": ("spec", "template"),
    "ReplicationController": ("spec", "template"),
    "Job": ("spec", "template"),
    "CronJob": ("spec", "jobTemplate", "spec", "template"),
    "Pod": (),  # the object is the pod
}
WORKLOAD_KINDS = frozenset(_POD_TEMPLATE_PATHS)

# Env var names that hold secrets: any of these words as a part of the name (split at _ . -).
SENSITIVE_NAME_PARTS = frozenset(
    {"PASSWORD", "PASSWD", "PWD", "SECRET", "TOKEN", "KEY", "APIKEY", "DSN", "CREDENTIAL", "CREDENTIALS"}
)
# scheme://user:password@ (the user may be empty: redis://:password@host).
URL_WITH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s/@:]*:[^\s/@]+@")
_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})  # what Grafana's ini/env parsing takes as true
GRAFANA_ANONYMOUS_ROLE = "Viewer"


# --- reading Kubernetes objects ---------------------------------------------------------------------
def kind_of(resource_type: str) -> str | None:
    """``kubernetes:apps/v1:Deployment`` -> ``Deployment``; None for other providers and Helm releases."""
    parts = resource_type.split(":")
    if len(parts) != 3 or parts[0] != "kubernetes" or parts[1].startswith("helm.sh"):
        return None
    return parts[2]


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _seq(value: Any) -> Sequence[Any]:
    return value if isinstance(value, Sequence) and not isinstance(value, str | bytes) else ()


def _dig(obj: Any, *path: str) -> Any:
    for key in path:
        obj = _map(obj).get(key)
    return obj


def _describe(kind: str, props: Mapping[str, Any]) -> str:
    meta = _map(props.get("metadata"))
    namespace = meta.get("namespace")
    name = meta.get("name", "?")
    return f"{kind} {namespace}/{name}" if namespace else f"{kind} {name}"


@dataclass(frozen=True)
class Container:
    name: str
    spec: Mapping[str, Any]
    pod_spec: Mapping[str, Any]


def pod_template(kind: str, props: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The pod (template) of a workload: ``{"metadata": ..., "spec": ...}``; None for other kinds."""
    path = _POD_TEMPLATE_PATHS.get(kind)
    if path is None:
        return None
    return _map(_dig(props, *path)) if path else props


def containers(kind: str, props: Mapping[str, Any]) -> Iterator[Container]:
    """Every container of a workload's pod: init, regular and ephemeral ones."""
    template = pod_template(kind, props)
    if template is None:
        return
    pod_spec = _map(template.get("spec"))
    for field in ("initContainers", "containers", "ephemeralContainers"):
        for spec in _seq(pod_spec.get(field)):
            spec = _map(spec)
            yield Container(str(spec.get("name", "?")), spec, pod_spec)


WorkloadCheck = Callable[[str, Mapping[str, Any], ReportViolation], None]


def _workload_checker(check: WorkloadCheck) -> Callable[[ResourceValidationArgs, ReportViolation], None]:
    """Adapts ``check(kind, props, report)`` to a resource validation run on workloads only."""

    def validate(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        kind = kind_of(args.resource_type)
        if kind in WORKLOAD_KINDS:
            check(kind, args.props, report_violation)

    return validate


# --- 1. non-root ----------------------------------------------------------------------------------
def _effective(container: Container, key: str) -> Any:
    """A securityContext setting as the kubelet applies it: the container's, else the pod's."""
    own = _map(container.spec.get("securityContext"))
    if key in own and own[key] is not None:
        return own[key]
    return _map(container.pod_spec.get("securityContext")).get(key)


def check_non_root(kind: str, props: Mapping[str, Any], report: ReportViolation) -> None:
    for c in containers(kind, props):
        user = _effective(c, "runAsUser")
        non_root = _effective(c, "runAsNonRoot")
        if user is not None and float(user) == 0:
            report(f"{_describe(kind, props)}: container {c.name} runs as root (runAsUser: 0).", None)
        elif user is None and non_root is not True:
            report(
                f"{_describe(kind, props)}: container {c.name} may run as root: set runAsNonRoot: true or a "
                "non-zero runAsUser (pod or container securityContext).",
                None,
            )


# --- 2. read-only root filesystem ---------------------------------------------------------------------
def writable_root_fs_exemptions(props: Mapping[str, Any]) -> frozenset[str]:
    value = _map(_dig(props, "metadata", "annotations")).get(WRITABLE_ROOT_FS_ANNOTATION)
    if not isinstance(value, str):
        return frozenset()
    return frozenset(part.strip() for part in value.split(",") if part.strip())


def check_read_only_root_fs(kind: str, props: Mapping[str, Any], report: ReportViolation) -> None:
    exempt = writable_root_fs_exemptions(props)
    for c in containers(kind, props):
        if c.name in exempt:
            continue
        if _map(c.spec.get("securityContext")).get("readOnlyRootFilesystem") is not True:
            report(
                f"{_describe(kind, props)}: container {c.name} needs securityContext.readOnlyRootFilesystem: true "
                f"(mount emptyDir volumes where it writes), or an explicit exemption in the "
                f"{WRITABLE_ROOT_FS_ANNOTATION} annotation.",
                None,
            )


# --- 3. resource limits -------------------------------------------------------------------------------
def check_resource_limits(kind: str, props: Mapping[str, Any], report: ReportViolation) -> None:
    for c in containers(kind, props):
        limits = _map(_dig(c.spec, "resources", "limits"))
        missing = [r for r in ("cpu", "memory") if limits.get(r) in (None, "")]
        if missing:
            report(f"{_describe(kind, props)}: container {c.name} has no {' and no '.join(missing)} limit.", None)


# --- 4. no plaintext secrets in env -----------------------------------------------------------------
def is_sensitive_name(name: str) -> bool:
    return any(part in SENSITIVE_NAME_PARTS for part in re.split(r"[_.\-]+", name.upper()))


def check_env_secrets(kind: str, props: Mapping[str, Any], report: ReportViolation) -> None:
    for c in containers(kind, props):
        for env in _seq(c.spec.get("env")):
            env = _map(env)
            name = str(env.get("name", "?"))
            value = env.get("value")
            where = f"{_describe(kind, props)}: container {c.name} env {name}"
            if isinstance(value, str) and URL_WITH_CREDENTIALS.search(value):
                report(f"{where} holds a URL with credentials in plaintext; take it from a secretKeyRef.", None)
            elif is_sensitive_name(name) and _dig(env, "valueFrom", "secretKeyRef") is None:
                report(f"{where} looks like a secret: it must come from valueFrom.secretKeyRef, not a value.", None)


# --- 5. Prometheus never exposed --------------------------------------------------------------------
def _is_prometheus(name: Any) -> bool:
    return isinstance(name, str) and "prometheus" in name.lower()


def _ingress_backends(spec: Mapping[str, Any]) -> Iterator[str]:
    default = _dig(spec, "defaultBackend", "service", "name")
    if default is not None:
        yield str(default)
    for rule in _seq(spec.get("rules")):
        for path in _seq(_dig(rule, "http", "paths")):
            name = _dig(path, "backend", "service", "name")
            if name is not None:
                yield str(name)


def check_prometheus_not_exposed(args: ResourceValidationArgs, report: ReportViolation) -> None:
    kind = kind_of(args.resource_type)
    props = args.props
    spec = _map(props.get("spec"))
    if kind == "Ingress":
        backends = list(_ingress_backends(spec))
    elif kind in ("HTTPRoute", "GRPCRoute", "TCPRoute", "TLSRoute"):  # Gateway API
        refs = [_map(ref) for rule in _seq(spec.get("rules")) for ref in _seq(_map(rule).get("backendRefs"))]
        backends = [str(ref.get("name")) for ref in refs if ref.get("kind", "Service") == "Service"]
    elif kind == "Service":
        selector = _map(spec.get("selector"))
        prometheus = _is_prometheus(_dig(props, "metadata", "name")) or any(
            _is_prometheus(selector.get(label)) for label in ("app.kubernetes.io/component", "app.kubernetes.io/name")
        )
        exposed = spec.get("type") in ("NodePort", "LoadBalancer") or bool(_seq(spec.get("externalIPs")))
        if prometheus and exposed:
            report(f"{_describe(kind, props)} exposes Prometheus outside the cluster: use type ClusterIP.", None)
        return
    else:
        return
    for name in backends:
        if _is_prometheus(name):
            report(
                f"{_describe(kind, props)} routes to the {name} Service: Prometheus (unauthenticated, admin API) "
                "must not be behind an Ingress; dashboards go through Grafana.",
                None,
            )


# --- 6. Grafana anonymous access Viewer-only ----------------------------------------------------------
def _truthy(value: Any) -> bool:
    return str(value).strip().lower() in _TRUE


def _anonymous_section(text: str) -> configparser.SectionProxy | str | None:
    """A grafana.ini's ``[auth.anonymous]`` if it enables anonymous access; None if not; why if unreadable."""
    parser = configparser.ConfigParser(interpolation=None, strict=False, comment_prefixes=(";", "#"))
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        return f"cannot be parsed as INI ({type(exc).__name__}), so anonymous access cannot be checked"
    if not parser.has_section("auth.anonymous"):
        return None
    section = parser["auth.anonymous"]
    return section if _truthy(section.get("enabled", "false")) else None


def grafana_ini_violation(text: str) -> str | None:
    """What is wrong with a grafana.ini's ``[auth.anonymous]``; None if anonymous access is off or Viewer."""
    section = _anonymous_section(text)
    if not isinstance(section, configparser.SectionProxy):
        return section
    role = section.get("org_role", GRAFANA_ANONYMOUS_ROLE).strip()
    if role != GRAFANA_ANONYMOUS_ROLE:
        return f"enables anonymous access with org_role = {role}; anonymous users must be {GRAFANA_ANONYMOUS_ROLE}"
    return None


def check_grafana_config_map(kind: str, props: Mapping[str, Any], report: ReportViolation) -> None:
    for key, text in _map(props.get("data")).items():
        if str(key).endswith(".ini") and isinstance(text, str):
            problem = grafana_ini_violation(text)
            if problem is not None:
                report(f"{_describe(kind, props)} {key} {problem}.", None)


def check_grafana_env(kind: str, props: Mapping[str, Any], report: ReportViolation) -> None:
    """Grafana's ``GF_<SECTION>_<KEY>`` env vars override grafana.ini, so they are checked as well."""
    for c in containers(kind, props):
        env = {str(_map(e).get("name")): _map(e) for e in _seq(c.spec.get("env"))}
        enabled, role = env.get("GF_AUTH_ANONYMOUS_ENABLED"), env.get("GF_AUTH_ANONYMOUS_ORG_ROLE")
        where = f"{_describe(kind, props)}: container {c.name}"
        disabled = enabled is not None and "value" in enabled and not _truthy(enabled["value"])
        if role is not None and not disabled and role.get("value") != GRAFANA_ANONYMOUS_ROLE:
            report(
                f"{where} sets GF_AUTH_ANONYMOUS_ORG_ROLE to {role.get('value', 'a value from valueFrom')!r}; "
                f"anonymous users must be {GRAFANA_ANONYMOUS_ROLE} (a literal value).",
                None,
            )
        elif enabled is not None and not disabled and role is None:
            report(
                f"{where} enables anonymous access through GF_AUTH_ANONYMOUS_ENABLED: set "
                f"GF_AUTH_ANONYMOUS_ORG_ROLE={GRAFANA_ANONYMOUS_ROLE} next to it.",
                None,
            )


def check_grafana_anonymous(args: ResourceValidationArgs, report: ReportViolation) -> None:
    kind = kind_of(args.resource_type)
    if kind == "ConfigMap":
        check_grafana_config_map(kind, args.props, report)
    elif kind in WORKLOAD_KINDS:
        check_grafana_env(kind, args.props, report)


# --- 7. Grafana anonymous access is an explicit opt-in -------------------------------------------------
def _opted_in(props: Mapping[str, Any]) -> bool:
    return _truthy(_map(_dig(props, "metadata", "annotations")).get(GRAFANA_ANONYMOUS_ANNOTATION, "false"))


def check_grafana_anonymous_opt_in(args: ResourceValidationArgs, report: ReportViolation) -> None:
    """Anonymous access on (a grafana.ini ConfigMap key, or ``GF_AUTH_ANONYMOUS_ENABLED`` set to true or
    from elsewhere) needs :data:`GRAFANA_ANONYMOUS_ANNOTATION` ``"true"`` on the same object."""
    kind = kind_of(args.resource_type)
    props = args.props
    if kind is None or _opted_in(props):
        return
    where: list[str] = []
    if kind == "ConfigMap":
        for key, text in _map(props.get("data")).items():
            ini = str(key).endswith(".ini") and isinstance(text, str)
            if ini and isinstance(_anonymous_section(text), configparser.SectionProxy):
                where.append(f"{key} [auth.anonymous] enabled")
    elif kind in WORKLOAD_KINDS:
        for c in containers(kind, props):
            for env in _seq(c.spec.get("env")):
                env = _map(env)
                if env.get("name") == "GF_AUTH_ANONYMOUS_ENABLED" and ("value" not in env or _truthy(env["value"])):
                    where.append(f"container {c.name} env GF_AUTH_ANONYMOUS_ENABLED")
    for what in where:
        report(
            f"{_describe(kind, props)}: {what} turns on Grafana's anonymous access, and an anonymous Viewer can "
            f"run any query against every datasource (/api/ds/query); make it a stated decision with the "
            f'annotation {GRAFANA_ANONYMOUS_ANNOTATION}: "true" (the program sets it from '
            "monitoring.grafana.anonymousViewing).",
            None,
        )


# --- 8. NetworkPolicies for every workload (stack) ------------------------------------------------
def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
    """A Kubernetes LabelSelector (matchLabels + matchExpressions) against a label set."""
    for key, value in _map(selector.get("matchLabels")).items():
        if labels.get(key) != value:
            return False
    for expr in _seq(selector.get("matchExpressions")):
        expr = _map(expr)
        key, op, values = str(expr.get("key")), expr.get("operator"), list(_seq(expr.get("values")))
        present = key in labels
        if (
            (op == "In" and (not present or labels[key] not in values))
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
            or op not in ("In", "NotIn", "Exists", "DoesNotExist")
        ):
            return False
    return True


def _is_empty_selector(selector: Mapping[str, Any]) -> bool:
    return not _map(selector.get("matchLabels")) and not _seq(selector.get("matchExpressions"))


def _is_default_deny(spec: Mapping[str, Any]) -> bool:
    types = set(_seq(spec.get("policyTypes")))
    return (
        _is_empty_selector(_map(spec.get("podSelector")))
        and {"Ingress", "Egress"} <= types
        and not _seq(spec.get("ingress"))
        and not _seq(spec.get("egress"))
    )


def check_network_policies(args: StackValidationArgs, report: ReportViolation) -> None:
    """Every workload's pods are selected by a NetworkPolicy of their namespace written for them (a
    non-empty podSelector: namespace-wide ones such as default-deny or allow-dns select every pod and
    would make the rule vacuous), and every namespace with workloads has a default-deny policy."""
    selectors: dict[str, list[Mapping[str, Any]]] = {}
    default_deny: set[str] = set()
    workloads: list[tuple[str, str, Mapping[str, Any], str]] = []  # (namespace, kind, props, urn)
    for resource in args.resources:
        kind = kind_of(resource.resource_type)
        props = resource.props
        namespace = str(_dig(props, "metadata", "namespace") or "default")
        if kind == "NetworkPolicy":
            spec = _map(props.get("spec"))
            selector = _map(spec.get("podSelector"))
            if _is_default_deny(spec):
                default_deny.add(namespace)
            if not _is_empty_selector(selector):
                selectors.setdefault(namespace, []).append(selector)
        elif kind in WORKLOAD_KINDS:
            workloads.append((namespace, kind, props, resource.urn))
    for namespace, kind, props, urn in workloads:
        template = pod_template(kind, props) or {}
        labels = _map(_dig(template, "metadata", "labels"))
        if not any(selector_matches(s, labels) for s in selectors.get(namespace, [])):
            report(
                f"{_describe(kind, props)}: no NetworkPolicy in namespace {namespace} selects its pods "
                f"(labels {dict(labels)}); add one that states the traffic they need.",
                urn,
            )
    for namespace in sorted({w[0] for w in workloads} - default_deny):
        report(f"namespace {namespace} has workloads but no default-deny NetworkPolicy (Ingress and Egress).", None)


# --- the pack -------------------------------------------------------------------------------------------
def policies() -> list[Policy]:
    """The pack's policies, all mandatory (new objects each call: a policy belongs to one pack)."""
    return [
        ResourceValidationPolicy(
            name="pods-run-as-non-root",
            description="Every container runs as a non-root user (runAsNonRoot: true or runAsUser != 0).",
            validate=_workload_checker(check_non_root),
            enforcement_level=MANDATORY,
        ),
        ResourceValidationPolicy(
            name="read-only-root-filesystem",
            description=(
                "Every container has a read-only root filesystem, unless its workload lists it in the "
                f"{WRITABLE_ROOT_FS_ANNOTATION} annotation."
            ),
            validate=_workload_checker(check_read_only_root_fs),
            enforcement_level=MANDATORY,
        ),
        ResourceValidationPolicy(
            name="containers-have-resource-limits",
            description="Every container has cpu and memory limits.",
            validate=_workload_checker(check_resource_limits),
            enforcement_level=MANDATORY,
        ),
        ResourceValidationPolicy(
            name="no-plaintext-secrets-in-env",
            description=(
                "Env vars named like secrets (PASSWORD, SECRET, TOKEN, KEY, DSN, ...) come from a secretKeyRef; "
                "no env value holds a URL with credentials."
            ),
            validate=_workload_checker(check_env_secrets),
            enforcement_level=MANDATORY,
        ),
        ResourceValidationPolicy(
            name="prometheus-not-exposed",
            description="Prometheus is never behind an Ingress (or Gateway route) nor a NodePort/LoadBalancer.",
            validate=check_prometheus_not_exposed,
            enforcement_level=MANDATORY,
        ),
        ResourceValidationPolicy(
            name="grafana-anonymous-viewer-only",
            description="Grafana anonymous access, where enabled, has the Viewer role (grafana.ini and GF_* env).",
            validate=check_grafana_anonymous,
            enforcement_level=MANDATORY,
        ),
        ResourceValidationPolicy(
            name="grafana-anonymous-opt-in",
            description=(
                "Grafana anonymous access (grafana.ini or GF_AUTH_ANONYMOUS_ENABLED) is on only in an object "
                f'annotated {GRAFANA_ANONYMOUS_ANNOTATION}: "true".'
            ),
            validate=check_grafana_anonymous_opt_in,
            enforcement_level=MANDATORY,
        ),
        StackValidationPolicy(
            name="network-policy-for-every-workload",
            description=(
                "Every workload's pods are selected by a NetworkPolicy written for them, in a namespace with a "
                "default-deny policy."
            ),
            validate=check_network_policies,
            enforcement_level=MANDATORY,
        ),
    ]
