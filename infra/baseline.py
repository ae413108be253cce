"""Namespace guard rails: quota, default limits, default-deny networking and the exact flows allowed.

Every allowed connection is one :class:`Flow` in :func:`flows`, and both sides of it are derived
from that one line (egress on the source, ingress on the destination), so the policy cannot allow
half a connection or drift from the documentation (the flow's ``why``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import pulumi
import pulumi_kubernetes as k8s

from common.stackconfig import StackConfig
from infra import kube as c

ANYWHERE = ("0.0.0.0/0", "::/0")
KUBE_API_PORTS = (443, 6443)  # the `kubernetes` Service port and the API server's own port (after DNAT)
DNS_PORT = 53
INGRESS_NGINX_CHART_VERSION = "4.12.1"
# KEDA 2.18: tested on Kubernetes 1.31-1.33 (KEDA's compatibility matrix); the redis-streams trigger has
# scaled on consumer-group lag since 2.11. Chart and app versions are the same number.
KEDA_CHART_VERSION = "2.18.3"
KEDA_CHART_REPO = "https://kedacore.github.io/charts"
KEDA_SCALED_OBJECT_CRD = "scaledobjects.keda.sh"  # read when the cluster is said to run KEDA already
# The API server's endpoints as the API server itself publishes them (EndpointSlice, not the v1
# Endpoints that 1.33 deprecates): the addresses pods reach after the Service's DNAT.
API_SERVER_ENDPOINTS = "default/kubernetes"
CONTROL_PLANE_TAINT = "node-role.kubernetes.io/control-plane"


@dataclass(frozen=True)
class Peer:
    """One end of a flow: a component's pods in our namespace, pods of another namespace, the API server,
    or any address."""

    component: str | None = None
    namespace: str | None = None
    pod_labels: tuple[tuple[str, str], ...] = ()  # with ``namespace``: only its pods with these labels
    api_server: bool = False
    anywhere: bool = False


@dataclass(frozen=True)
class Flow:
    src: Peer
    dst: Peer
    ports: tuple[int, ...]  # empty = any port (external services whose port only the secret URL knows)
    why: str
    protocol: str = "TCP"


def pods(component: str) -> Peer:
    return Peer(component=component)


def flows(cfg: StackConfig) -> list[Flow]:
    """Every connection the system makes; everything else is denied."""
    api, workers, prom, graf = pods("orchestrator"), pods("workers"), pods("prometheus"), pods("grafana")
    k6, start, report = pods("k6"), pods("k6-start"), pods("report")
    out, kube_api = Peer(anywhere=True), Peer(api_server=True)
    b = cfg.baseline
    ingress = Peer(namespace=b.ingress_namespace, pod_labels=tuple(sorted(b.ingress_pod_selector.items())))
    f = [
        Flow(k6, api, (c.ORCHESTRATOR_PORT,), "k6 runners send the test traffic"),
        Flow(k6, prom, (cfg.monitoring.prometheus.port,), "k6 remote-writes its samples"),
        Flow(start, k6, (c.K6_API_PORT,), "the start barrier resumes the paused runners via k6's REST API"),
        Flow(prom, api, (c.ORCHESTRATOR_PORT,), "scrape the API's /metrics"),
        Flow(prom, workers, (c.WORKER_METRICS_PORT,), "scrape the workers' /metrics"),
        Flow(prom, kube_api, KUBE_API_PORTS, "pod discovery through the Kubernetes API"),
        Flow(graf, prom, (cfg.monitoring.prometheus.port,), "dashboards query Prometheus"),
        Flow(ingress, graf, (c.GRAFANA_PORT,), "the public URL"),
        Flow(report, prom, (cfg.monitoring.prometheus.port,), "the report measures the run"),
        Flow(report, kube_api, KUBE_API_PORTS, "the report reads the start time and writes its ConfigMap"),
        Flow(start, kube_api, KUBE_API_PORTS, "the start barrier records the start time"),
    ]
    internal_pg = cfg.postgres.mode == "internal"
    pg = pods("postgres") if internal_pg else out
    pg_ports = (c.POSTGRES_PORT,) if internal_pg else ()
    for src in (api, workers, report):
        f.append(Flow(src, pg, pg_ports, "the task store"))
    rd, rd_ports = (pods("redis"), (c.REDIS_PORT,)) if cfg.redis.mode == "internal" else (out, ())
    for src in (api, workers):
        f.append(Flow(src, rd, rd_ports, "cache and task queue"))
    sim = cfg.llm.mode == "simulator"
    llm, llm_ports = (pods("simulator"), (c.SIMULATOR_PORT,)) if sim else (out, (_url_port(cfg.llm.base_url),))
    f.append(Flow(workers, llm, llm_ports, "LLM calls (only the workers call the LLM; the API queues)"))
    if cfg.workers.autoscaling.enabled:  # the stack schema requires internal Redis for it
        operator = Peer(namespace=b.keda_namespace, pod_labels=tuple(sorted(b.keda_operator_pod_selector.items())))
        f.append(Flow(operator, rd, rd_ports, "KEDA's operator reads the queue's consumer-group lag"))
    return f


def _url_port(url: str) -> int:
    parsed = urlparse(url)
    return parsed.port or (80 if parsed.scheme == "http" else 443)


def _peer(p: Peer) -> list[k8s.networking.v1.NetworkPolicyPeerArgs]:
    if p.api_server:
        raise ValueError("the API server peer depends on the cluster: see Baseline._api_server_rules")
    if p.component:
        return [
            k8s.networking.v1.NetworkPolicyPeerArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector(p.component))
            )
        ]
    if p.namespace:
        # One peer with both selectors: pods matching the labels AND in that namespace.
        return [
            k8s.networking.v1.NetworkPolicyPeerArgs(
                namespace_selector=k8s.meta.v1.LabelSelectorArgs(
                    match_labels={"kubernetes.io/metadata.name": p.namespace}
                ),
                pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=dict(p.pod_labels)) if p.pod_labels else None,
            )
        ]
    return _ip_peers(ANYWHERE)


def _ip_peers(cidrs: Iterable[str]) -> list[k8s.networking.v1.NetworkPolicyPeerArgs]:
    return [k8s.networking.v1.NetworkPolicyPeerArgs(ip_block=k8s.networking.v1.IPBlockArgs(cidr=x)) for x in cidrs]


def host_cidr(address: str) -> str:
    """One address as a CIDR: ``/32`` for IPv4, ``/128`` for IPv6."""
    ip = ipaddress.ip_address(address)
    return f"{ip}/{ip.max_prefixlen}"


def _ports(flow: Flow) -> list[k8s.networking.v1.NetworkPolicyPortArgs] | None:
    if not flow.ports:
        return None
    return [k8s.networking.v1.NetworkPolicyPortArgs(port=p, protocol=flow.protocol) for p in flow.ports]


def _field(obj: Any, name: str) -> Any:
    """A field of a read resource's output: typed output objects or plain maps, depending on the engine."""
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def api_server_rules(
    endpoints: Sequence[Any] | None, ports: Sequence[Any] | None, extra_cidrs: Sequence[str]
) -> list[k8s.networking.v1.NetworkPolicyEgressRuleArgs]:
    """Egress to the API server: each address of its EndpointSlice on the slice's ports, then ``extra_cidrs``
    on :data:`KUBE_API_PORTS`. Never ``0.0.0.0/0``: on Cilium such a rule does not match an in-cluster API
    server, and everywhere else it lets the pod reach any host on 443."""
    rules = []
    addresses = sorted({a for ep in endpoints or [] for a in (_field(ep, "addresses") or [])})
    if addresses:
        slice_ports = [
            k8s.networking.v1.NetworkPolicyPortArgs(port=int(port), protocol=_field(p, "protocol") or "TCP")
            for p in ports or []
            if (port := _field(p, "port")) is not None
        ]
        rules.append(
            k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                to=_ip_peers(host_cidr(a) for a in addresses), ports=slice_ports or None
            )
        )
    if extra_cidrs:
        rules.append(
            k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                to=_ip_peers(extra_cidrs),
                ports=[k8s.networking.v1.NetworkPolicyPortArgs(port=p, protocol="TCP") for p in KUBE_API_PORTS],
            )
        )
    return rules


class Baseline(pulumi.ComponentResource):
    """Namespace + ResourceQuota + LimitRange + NetworkPolicies (+ ingress-nginx and KEDA when asked).

    Args: ``name``, ``cfg`` (sections ``namespace``, ``baseline``; the flows also read the modes of
    ``postgres``/``redis``/``llm`` and the ports), ``opts``. Outputs ``namespace``.
    """

    namespace: pulumi.Output[str]
    # The ingress-nginx release when installed: Ingresses must wait for it, or its admission
    # webhook (registered before the controller is Ready) refuses them.
    ingress_controller: k8s.helm.v3.Release | None = None
    # The KEDA release when installed: ScaledObjects need its CRDs and its admission webhook first.
    keda: pulumi.Resource | None = None

    def __init__(self, name: str, cfg: StackConfig, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("loadproof:infra:Baseline", name, None, opts)
        b = cfg.baseline
        ns = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=cfg.namespace,
                labels={
                    **c.labels("baseline"),
                    # Every pod here meets "restricted"; enforce it so nothing weaker slips in later.
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.namespace = ns.metadata.apply(lambda m: m.name or cfg.namespace)
        ns_name = self.namespace
        k8s.core.v1.ResourceQuota(
            f"{name}-quota",
            metadata=c.metadata("loadproof-quota", ns_name, "baseline"),
            spec=k8s.core.v1.ResourceQuotaSpecArgs(
                hard={
                    "requests.cpu": b.quota_cpu,
                    "requests.memory": b.quota_memory,
                    "limits.cpu": b.quota_cpu_limits,
                    "limits.memory": b.quota_memory_limits,
                    "pods": str(b.quota_pods),
                }
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        k8s.core.v1.LimitRange(
            f"{name}-limits",
            metadata=c.metadata("loadproof-limits", ns_name, "baseline"),
            spec=k8s.core.v1.LimitRangeSpecArgs(
                limits=[
                    # Only a fallback: every container this program creates sets its own.
                    k8s.core.v1.LimitRangeItemArgs(
                        type="Container",
                        default_request={"cpu": "100m", "memory": "128Mi"},
                        default={"cpu": "1", "memory": "512Mi"},
                    )
                ]
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self._policies(name, cfg, ns_name)
        if b.ingress_controller:
            self.ingress_controller = k8s.helm.v3.Release(
                f"{name}-ingress-nginx",
                k8s.helm.v3.ReleaseArgs(
                    chart="ingress-nginx",
                    version=INGRESS_NGINX_CHART_VERSION,
                    repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo="https://kubernetes.github.io/ingress-nginx"),
                    namespace=b.ingress_namespace,
                    create_namespace=True,
                    values={"controller": ingress_controller_values(cfg)},
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
        if b.keda_install:
            self.keda = k8s.helm.v3.Release(
                f"{name}-keda",
                k8s.helm.v3.ReleaseArgs(
                    chart="keda",
                    version=KEDA_CHART_VERSION,
                    repository_opts=k8s.helm.v3.RepositoryOptsArgs(repo=KEDA_CHART_REPO),
                    namespace=b.keda_namespace,
                    create_namespace=True,
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
        elif b.keda_preinstalled and cfg.workers.autoscaling.enabled:
            # Read at preview: a cluster without KEDA fails here, naming the missing CRD, instead of at the
            # update with "no matches for kind ScaledObject".
            self.keda = k8s.apiextensions.v1.CustomResourceDefinition.get(
                f"{name}-keda-crd", KEDA_SCALED_OBJECT_CRD, opts=pulumi.ResourceOptions(parent=self)
            )
        self.register_outputs({"namespace": self.namespace})

    def _api_server_rules(
        self, name: str, cfg: StackConfig
    ) -> pulumi.Output[list[k8s.networking.v1.NetworkPolicyEgressRuleArgs]]:
        """The API server's endpoints, read from the cluster at deploy time, plus ``baseline.apiServerCidrs``."""
        b = cfg.baseline
        if not b.api_server_from_endpoints:
            return pulumi.Output.from_input(api_server_rules(None, None, b.api_server_cidrs))
        endpoints = k8s.discovery.v1.EndpointSlice.get(
            f"{name}-api-server-endpoints", API_SERVER_ENDPOINTS, opts=pulumi.ResourceOptions(parent=self)
        )
        return pulumi.Output.all(endpoints.endpoints, endpoints.ports).apply(
            lambda a: api_server_rules(a[0], a[1], b.api_server_cidrs)
        )

    def _policies(self, name: str, cfg: StackConfig, ns: pulumi.Input[str]) -> None:
        opts = pulumi.ResourceOptions(parent=self)
        dns_ports = [k8s.networking.v1.NetworkPolicyPortArgs(port=DNS_PORT, protocol=p) for p in ("UDP", "TCP")]
        dns = [k8s.networking.v1.NetworkPolicyEgressRuleArgs(to=_peer(Peer(namespace="kube-system")), ports=dns_ports)]
        if cfg.baseline.node_local_dns:
            # NodeLocal DNSCache answers on a link-local address on every node, outside any namespace.
            node_local = [host_cidr(cfg.baseline.node_local_dns)]
            dns.append(k8s.networking.v1.NetworkPolicyEgressRuleArgs(to=_ip_peers(node_local), ports=dns_ports))
        k8s.networking.v1.NetworkPolicy(
            f"{name}-default-deny",
            metadata=c.metadata("default-deny", ns, "baseline"),
            spec=k8s.networking.v1.NetworkPolicySpecArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(), policy_types=["Ingress", "Egress"]
            ),
            opts=opts,
        )
        k8s.networking.v1.NetworkPolicy(
            f"{name}-allow-dns",
            metadata=c.metadata("allow-dns", ns, "baseline"),
            spec=k8s.networking.v1.NetworkPolicySpecArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(),
                policy_types=["Egress"],
                egress=dns,
            ),
            opts=opts,
        )
        all_flows = flows(cfg)
        api_rules = self._api_server_rules(name, cfg) if any(f.dst.api_server for f in all_flows) else None
        components = sorted(
            {f.src.component for f in all_flows if f.src.component}
            | {f.dst.component for f in all_flows if f.dst.component}
        )
        for comp in components:
            ingress = [
                k8s.networking.v1.NetworkPolicyIngressRuleArgs(from_=_peer(f.src), ports=_ports(f))
                for f in all_flows
                if f.dst.component == comp
            ]
            outgoing = [f for f in all_flows if f.src.component == comp]
            static = [
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(to=_peer(f.dst), ports=_ports(f))
                for f in outgoing
                if not f.dst.api_server
            ]
            egress: pulumi.Input[list[k8s.networking.v1.NetworkPolicyEgressRuleArgs]] | None = static or None
            if api_rules is not None and any(f.dst.api_server for f in outgoing):
                egress = api_rules.apply(lambda rules, s=static: [*s, *rules])
            types = [t for t, rules in (("Ingress", ingress), ("Egress", egress)) if rules]
            k8s.networking.v1.NetworkPolicy(
                f"{name}-allow-{comp}",
                metadata=c.metadata(f"allow-{comp}", ns, "baseline"),
                spec=k8s.networking.v1.NetworkPolicySpecArgs(
                    pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector(comp)),
                    policy_types=types,
                    ingress=ingress or None,
                    egress=egress,
                ),
                opts=opts,
            )


def ingress_controller_values(cfg: StackConfig) -> dict[str, Any]:
    """Helm values of the ingress-nginx controller (chart :data:`INGRESS_NGINX_CHART_VERSION`).

    hostPort 80/443 on the node: kind (extraPortMappings) reaches it on localhost. A hostPort can be
    bound by one pod per node only, so a rolling update must stop the old pod before the new one can
    schedule (maxSurge 0, maxUnavailable 1): the default surge leaves the new pod Pending forever on
    one node. ``baseline.ingressNodeSelector`` pins it to the node whose ports are mapped (on kind the
    control plane, hence the toleration).
    """
    values: dict[str, Any] = {
        "hostPort": {"enabled": True},
        "service": {"type": "NodePort"},
        # No LoadBalancer Service to publish: report the controller's node address in Ingress
        # status instead, which Pulumi's Ingress await waits for.
        "publishService": {"enabled": False},
        "ingressClassResource": {"name": cfg.monitoring.grafana.ingress_class},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}},
    }
    selector = cfg.baseline.ingress_node_selector
    if selector:
        values["nodeSelector"] = dict(selector)
        values["tolerations"] = [{"key": CONTROL_PLANE_TAINT, "operator": "Exists", "effect": "NoSchedule"}]
    return values
