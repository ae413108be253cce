"""Namespace guard rails: quota, default limits, default-deny networking and the exact flows allowed.

Every allowed connection is one :class:`Flow` in :func:`flows`, and both sides of it are derived
from that one line (egress on the source, ingress on the destination), so the policy cannot allow
half a connection or drift from the documentation (the flow's ``why``).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

import pulumi
import pulumi_kubernetes as k8s

from common.stackconfig import StackConfig
from infra import kube as c

ANYWHERE = ("0.0.0.0/0", "::/0")
KUBE_API_PORTS = (443, 6443)  # the `kubernetes` Service port and the API server's own port (after DNAT)
INGRESS_NGINX_CHART_VERSION = "4.12.1"


@dataclass(frozen=True)
class Peer:
    """One end of a flow: a component's pods in our namespace, another namespace, or addresses."""

    component: str | None = None
    namespace: str | None = None
    anywhere: bool = False

    def key(self) -> str:
        return self.component or (f"ns:{self.namespace}" if self.namespace else "anywhere")


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
    out = Peer(anywhere=True)
    f = [
        Flow(k6, api, (c.ORCHESTRATOR_PORT,), "k6 runners send the test traffic"),
        Flow(k6, prom, (cfg.monitoring.prometheus.port,), "k6 remote-writes its samples"),
        Flow(start, k6, (c.K6_API_PORT,), "the start barrier resumes the paused runners via k6's REST API"),
        Flow(prom, api, (c.ORCHESTRATOR_PORT,), "scrape the API's /metrics"),
        Flow(prom, workers, (c.WORKER_METRICS_PORT,), "scrape the workers' /metrics"),
        Flow(prom, out, KUBE_API_PORTS, "pod discovery through the Kubernetes API"),
        Flow(graf, prom, (cfg.monitoring.prometheus.port,), "dashboards query Prometheus"),
        Flow(Peer(namespace=cfg.baseline.ingress_namespace), graf, (c.GRAFANA_PORT,), "the public URL"),
        Flow(report, prom, (cfg.monitoring.prometheus.port,), "the report measures the run"),
        Flow(report, out, KUBE_API_PORTS, "the report writes its ConfigMap"),
        Flow(start, out, KUBE_API_PORTS, "the start barrier records the start time"),
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
    return f


def _url_port(url: str) -> int:
    parsed = urlparse(url)
    return parsed.port or (80 if parsed.scheme == "http" else 443)


def _peer(p: Peer) -> list[k8s.networking.v1.NetworkPolicyPeerArgs]:
    if p.component:
        return [
            k8s.networking.v1.NetworkPolicyPeerArgs(
                pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector(p.component))
            )
        ]
    if p.namespace:
        return [
            k8s.networking.v1.NetworkPolicyPeerArgs(
                namespace_selector=k8s.meta.v1.LabelSelectorArgs(
                    match_labels={"kubernetes.io/metadata.name": p.namespace}
                )
            )
        ]
    return [
        k8s.networking.v1.NetworkPolicyPeerArgs(ip_block=k8s.networking.v1.IPBlockArgs(cidr=cidr)) for cidr in ANYWHERE
    ]


def _ports(flow: Flow) -> list[k8s.networking.v1.NetworkPolicyPortArgs] | None:
    if not flow.ports:
        return None
    return [k8s.networking.v1.NetworkPolicyPortArgs(port=p, protocol=flow.protocol) for p in flow.ports]


class Baseline(pulumi.ComponentResource):
    """Namespace + ResourceQuota + LimitRange + NetworkPolicies (+ ingress-nginx when asked).

    Args: ``name``, ``cfg`` (sections ``namespace``, ``baseline``; the flows also read the modes of
    ``postgres``/``redis``/``llm`` and the ports), ``opts``. Outputs ``namespace``.
    """

    namespace: pulumi.Output[str]
    # The ingress-nginx release when installed: Ingresses must wait for it, or its admission
    # webhook (registered before the controller is Ready) refuses them.
    ingress_controller: k8s.helm.v3.Release | None = None

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
                    # hostPort 80/443 on the node: kind (with extraPortMappings) and k3d reach it on localhost.
                    values={
                        "controller": {
                            "hostPort": {"enabled": True},
                            "service": {"type": "NodePort"},
                            # No LoadBalancer Service to publish: report the controller's node address
                            # in Ingress status instead, which Pulumi's Ingress await waits for.
                            "publishService": {"enabled": False},
                            "ingressClassResource": {"name": cfg.monitoring.grafana.ingress_class},
                        }
                    },
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
        self.register_outputs({"namespace": self.namespace})

    def _policies(self, name: str, cfg: StackConfig, ns: pulumi.Input[str]) -> None:
        opts = pulumi.ResourceOptions(parent=self)
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
                egress=[
                    k8s.networking.v1.NetworkPolicyEgressRuleArgs(
                        to=_peer(Peer(namespace="kube-system")),
                        ports=[k8s.networking.v1.NetworkPolicyPortArgs(port=53, protocol=p) for p in ("UDP", "TCP")],
                    )
                ],
            ),
            opts=opts,
        )
        all_flows = flows(cfg)
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
            egress = [
                k8s.networking.v1.NetworkPolicyEgressRuleArgs(to=_peer(f.dst), ports=_ports(f))
                for f in all_flows
                if f.src.component == comp
            ]
            types = [t for t, rules in (("Ingress", ingress), ("Egress", egress)) if rules]
            k8s.networking.v1.NetworkPolicy(
                f"{name}-allow-{comp}",
                metadata=c.metadata(f"allow-{comp}", ns, "baseline"),
                spec=k8s.networking.v1.NetworkPolicySpecArgs(
                    pod_selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector(comp)),
                    policy_types=types,
                    ingress=ingress or None,
                    egress=egress or None,
                ),
                opts=opts,
            )
