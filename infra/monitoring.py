"""Observability: Prometheus (pod discovery, k6 remote-write receiver) and Grafana (public, read-only).

All configuration text comes from ``common/prometheus_config.py`` and ``common/grafana_config.py``
(shared with ``make demo``) and the dashboards from ``dashboards.build``; this component only places
it. Prometheus is ClusterIP only; Grafana is the one public entry point, through an Ingress.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from common import grafana_config as gc
from common import prometheus_config as pc
from common.stackconfig import StackConfig
from dashboards.build import all_dashboards
from infra import kube as c

PROMETHEUS_UID = 65534  # nobody, as in the upstream image
GRAFANA_UID = 472  # the grafana image's user
CONFIG_DIR = "/etc/prometheus"
DASHBOARD_DIR = "/etc/grafana/dashboards"  # not under the data emptyDir: no nested mounts


def grafana_root_url(cfg: StackConfig) -> str:
    """The public URL (stack output ``grafana_url``): ``https://`` exactly when ``tls`` is on."""
    g = cfg.monitoring.grafana
    return f"{'https' if g.tls else 'http'}://{g.host}/"


SKIP_AWAIT = "pulumi.com/skipAwait"


def ingress_awaited(cfg: StackConfig) -> bool:
    """Whether ``pulumi up`` waits for the Grafana Ingress to get an address.

    Only when this stack installs the controller (``baseline.ingressController``), which is then known
    to publish one. Otherwise nothing the program knows of will: Pulumi would wait for the status until
    its 10-minute timeout, although nothing of the run needs the Ingress. The Ingress then gets
    ``pulumi.com/skipAwait`` and the ``grafana_ingress`` output says the URL is not verified.
    """
    return cfg.baseline.ingress_controller


def ingress_note(cfg: StackConfig) -> str:
    """The ``grafana_ingress`` stack output: whether the public URL was seen published, and what to check."""
    g = cfg.monitoring.grafana
    if ingress_awaited(cfg):
        return "awaited: the ingress-nginx this stack installs published an address for the Grafana Ingress"
    return (
        "not awaited: baseline.ingressController is false, so no controller this stack knows of publishes an "
        f"address; the URL works once the cluster's controller for class {g.ingress_class!r} serves it "
        f"(kubectl -n {cfg.namespace} get ingress grafana)"
    )


class Monitoring(pulumi.ComponentResource):
    """Prometheus (SA + Role for namespace-scoped discovery, ConfigMap, PVC, Deployment, Service) and Grafana.

    Args: ``name``, ``cfg`` (section ``monitoring``; thresholds for rules and dashboards),
    ``namespace``, ``ingress_after`` (default none: what the Ingress waits for), ``opts``.
    """

    prometheus_url: str
    remote_write_url: str
    grafana_url: str
    grafana_admin_password: pulumi.Output[str]
    prometheus: k8s.apps.v1.Deployment
    prometheus_service: k8s.core.v1.Service

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        *,
        ingress_after: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        """``ingress_after``: what the Grafana Ingress waits for (the ingress controller this stack installs)."""
        super().__init__("loadproof:infra:Monitoring", name, None, opts)
        self._ingress_after = list(ingress_after)
        port = cfg.monitoring.prometheus.port
        self.prometheus_url = f"http://prometheus.{cfg.namespace}.svc:{port}"
        self.remote_write_url = f"{self.prometheus_url}/api/v1/write"
        self.grafana_url = grafana_root_url(cfg)
        self.prometheus = self._prometheus(name, cfg, namespace)
        self.grafana_admin_password = self._grafana(name, cfg, namespace)
        self.register_outputs({"grafana_url": self.grafana_url, "prometheus_url": self.prometheus_url})

    # ------------------------------------------------------------------ Prometheus
    def _prometheus(self, name: str, cfg: StackConfig, namespace: pulumi.Input[str]) -> k8s.apps.v1.Deployment:
        p = cfg.monitoring.prometheus
        opts = pulumi.ResourceOptions(parent=self)
        sa = k8s.core.v1.ServiceAccount(
            f"{name}-prometheus-sa", metadata=c.metadata("prometheus", namespace, "prometheus"), opts=opts
        )
        role = k8s.rbac.v1.Role(
            f"{name}-prometheus-role",
            metadata=c.metadata("prometheus-discovery", namespace, "prometheus"),
            # Namespace-scoped pod discovery only (the scrape config's one role): no ClusterRole, no
            # Services or Endpoints, nothing outside this namespace is visible.
            rules=[k8s.rbac.v1.PolicyRuleArgs(api_groups=[""], resources=["pods"], verbs=["get", "list", "watch"])],
            opts=opts,
        )
        c.bind_role(f"{name}-prometheus-rolebinding", "prometheus-discovery", namespace, "prometheus", role, sa, opts)
        files = prometheus_files(cfg)
        config = k8s.core.v1.ConfigMap(
            f"{name}-prometheus-config",
            metadata=c.metadata("prometheus-config", namespace, "prometheus"),
            data=files,
            opts=opts,
        )
        pvc = k8s.core.v1.PersistentVolumeClaim(
            f"{name}-prometheus-data",
            # WaitForFirstConsumer classes bind only when the pod exists: don't await "Bound".
            metadata=c.metadata(
                "prometheus-data", namespace, "prometheus", annotations={"pulumi.com/skipAwait": "true"}
            ),
            spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                access_modes=["ReadWriteOnce"],
                storage_class_name=c.storage_class(p.storage_class),
                resources=k8s.core.v1.VolumeResourceRequirementsArgs(requests={"storage": p.storage}),
            ),
            opts=opts,
        )
        container = k8s.core.v1.ContainerArgs(
            name="prometheus",
            image=p.image,
            args=[
                f"--config.file={CONFIG_DIR}/prometheus.yml",
                "--storage.tsdb.path=/prometheus",
                f"--storage.tsdb.retention.time={p.retention}",
                # A full volume stops ingestion (and the run's samples with it): drop old blocks first.
                f"--storage.tsdb.retention.size={retention_size_mb(p.storage)}MB",
                f"--web.listen-address=:{p.port}",
                *pc.PROMETHEUS_FLAGS,
            ],
            ports=[k8s.core.v1.ContainerPortArgs(name="http", container_port=p.port)],
            resources=c.resources(cfg.monitoring.prometheus.resources),
            security_context=c.container_security(),
            liveness_probe=c.http_probe("/-/healthy", p.port, period_s=15),
            readiness_probe=c.http_probe("/-/ready", p.port, period_s=5),
            volume_mounts=[
                k8s.core.v1.VolumeMountArgs(name="config", mount_path=CONFIG_DIR, read_only=True),
                k8s.core.v1.VolumeMountArgs(name="data", mount_path="/prometheus"),
            ],
        )
        deployment = k8s.apps.v1.Deployment(
            f"{name}-prometheus",
            metadata=c.metadata("prometheus", namespace, "prometheus"),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=1,
                # One TSDB writer on a RWO volume: never two pods at once.
                strategy=k8s.apps.v1.DeploymentStrategyArgs(type="Recreate"),
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector("prometheus")),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(
                        labels=c.labels("prometheus"),
                        # Config changes roll the pod (Prometheus does not watch its file).
                        annotations={"loadproof.dev/config-hash": _hash(json.dumps(files, sort_keys=True))},
                    ),
                    spec=k8s.core.v1.PodSpecArgs(
                        service_account_name=sa.metadata.apply(lambda m: m.name or ""),
                        automount_service_account_token=True,
                        security_context=c.pod_security(PROMETHEUS_UID, persistent=True),
                        containers=[container],
                        volumes=[
                            k8s.core.v1.VolumeArgs(
                                name="config",
                                config_map=k8s.core.v1.ConfigMapVolumeSourceArgs(
                                    name=config.metadata.apply(lambda m: m.name or "")
                                ),
                            ),
                            k8s.core.v1.VolumeArgs(
                                name="data",
                                persistent_volume_claim=k8s.core.v1.PersistentVolumeClaimVolumeSourceArgs(
                                    claim_name=pvc.metadata.apply(lambda m: m.name or "")
                                ),
                            ),
                        ],
                    ),
                ),
            ),
            opts=opts,
        )
        self.prometheus_service = k8s.core.v1.Service(
            f"{name}-prometheus-service",
            metadata=c.metadata("prometheus", namespace, "prometheus"),
            spec=k8s.core.v1.ServiceSpecArgs(
                type="ClusterIP",  # never public: Grafana is the window onto the data
                selector=c.selector("prometheus"),
                ports=[k8s.core.v1.ServicePortArgs(name="http", port=p.port, target_port=p.port)],
            ),
            opts=opts,
        )
        return deployment

    # ------------------------------------------------------------------ Grafana
    def _grafana(self, name: str, cfg: StackConfig, namespace: pulumi.Input[str]) -> pulumi.Output[str]:
        g = cfg.monitoring.grafana
        opts = pulumi.ResourceOptions(parent=self)
        password = random.RandomPassword(f"{name}-grafana-admin-password", length=24, special=False, opts=opts)
        secret = k8s.core.v1.Secret(
            f"{name}-grafana-admin",
            metadata=c.metadata("grafana-admin", namespace, "grafana"),
            string_data={"password": password.result},
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["stringData", "data"]),
        )
        files = grafana_files(cfg, self.prometheus_url)
        maps: dict[str, k8s.core.v1.ConfigMap] = {}
        for key, data in files.items():
            maps[key] = k8s.core.v1.ConfigMap(
                f"{name}-grafana-{key}",
                metadata=c.metadata(
                    f"grafana-{key}",
                    namespace,
                    "grafana",
                    annotations={ANONYMOUS_ACCESS_ANNOTATION: "true"} if key == "ini" and g.anonymous_viewing else None,
                ),
                data=data,
                opts=opts,
            )

        def cm_volume(vol: str, key: str) -> k8s.core.v1.VolumeArgs:
            return k8s.core.v1.VolumeArgs(
                name=vol,
                config_map=k8s.core.v1.ConfigMapVolumeSourceArgs(name=maps[key].metadata.apply(lambda m: m.name or "")),
            )

        mount = k8s.core.v1.VolumeMountArgs
        container = k8s.core.v1.ContainerArgs(
            name="grafana",
            image=g.image,
            env=[
                *c.env_list({"GF_PATHS_CONFIG": "/etc/grafana/grafana.ini", "GF_PATHS_DATA": "/var/lib/grafana"}),
                c.secret_env(gc.ADMIN_PASSWORD_ENV, secret.metadata.apply(lambda m: m.name or ""), "password"),
            ],
            ports=[k8s.core.v1.ContainerPortArgs(name="http", container_port=c.GRAFANA_PORT)],
            resources=c.resources(g.resources),
            security_context=c.container_security(),
            # First boot runs Grafana's database migrations, which on one CPU can outlast the liveness
            # budget: liveness only starts once Grafana has answered (up to 5 minutes).
            startup_probe=c.http_probe("/api/health", c.GRAFANA_PORT, period_s=5, failure_threshold=60),
            liveness_probe=c.http_probe("/api/health", c.GRAFANA_PORT, period_s=15),
            readiness_probe=c.http_probe("/api/health", c.GRAFANA_PORT, period_s=5),
            volume_mounts=[
                mount(name="ini", mount_path="/etc/grafana/grafana.ini", sub_path="grafana.ini", read_only=True),
                mount(name="datasources", mount_path="/etc/grafana/provisioning/datasources", read_only=True),
                mount(name="providers", mount_path="/etc/grafana/provisioning/dashboards", read_only=True),
                mount(name="dashboards", mount_path=DASHBOARD_DIR, read_only=True),
                # Grafana's sqlite, plugins and sessions: ephemeral by design, everything is provisioned.
                mount(name="data", mount_path="/var/lib/grafana"),
                mount(name="tmp", mount_path="/tmp"),
            ],
        )
        k8s.apps.v1.Deployment(
            f"{name}-grafana",
            metadata=c.metadata("grafana", namespace, "grafana"),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=1,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector("grafana")),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(
                        labels=c.labels("grafana"),
                        annotations={"loadproof.dev/config-hash": _hash(json.dumps(files, sort_keys=True))},
                    ),
                    spec=k8s.core.v1.PodSpecArgs(
                        automount_service_account_token=False,
                        security_context=c.pod_security(GRAFANA_UID),
                        containers=[container],
                        volumes=[
                            cm_volume("ini", "ini"),
                            cm_volume("datasources", "datasources"),
                            cm_volume("providers", "dashboard-provider"),
                            cm_volume("dashboards", "dashboards"),
                            c.empty_dir("data", "512Mi"),
                            c.empty_dir("tmp"),
                        ],
                    ),
                ),
            ),
            opts=opts,
        )
        service = k8s.core.v1.Service(
            f"{name}-grafana-service",
            metadata=c.metadata("grafana", namespace, "grafana"),
            spec=k8s.core.v1.ServiceSpecArgs(
                type="ClusterIP",
                selector=c.selector("grafana"),
                ports=[k8s.core.v1.ServicePortArgs(name="http", port=80, target_port=c.GRAFANA_PORT)],
            ),
            opts=opts,
        )
        annotations: dict[str, str] = {}
        if g.tls and g.cert_issuer:
            annotations["cert-manager.io/cluster-issuer"] = g.cert_issuer
        if not ingress_awaited(cfg):
            annotations[SKIP_AWAIT] = "true"
        k8s.networking.v1.Ingress(
            f"{name}-grafana-ingress",
            metadata=c.metadata("grafana", namespace, "grafana", annotations=annotations or None),
            spec=k8s.networking.v1.IngressSpecArgs(
                ingress_class_name=g.ingress_class,
                tls=[k8s.networking.v1.IngressTLSArgs(hosts=[g.host], secret_name=tls_secret_name(cfg))]
                if g.tls
                else None,
                rules=[
                    k8s.networking.v1.IngressRuleArgs(
                        host=g.host,
                        http=k8s.networking.v1.HTTPIngressRuleValueArgs(
                            paths=[
                                k8s.networking.v1.HTTPIngressPathArgs(
                                    path="/",
                                    path_type="Prefix",
                                    backend=k8s.networking.v1.IngressBackendArgs(
                                        service=k8s.networking.v1.IngressServiceBackendArgs(
                                            name=service.metadata.apply(lambda m: m.name or ""),
                                            port=k8s.networking.v1.ServiceBackendPortArgs(number=80),
                                        )
                                    ),
                                )
                            ]
                        ),
                    )
                ],
            ),
            opts=pulumi.ResourceOptions(parent=self, depends_on=self._ingress_after),
        )
        return pulumi.Output.secret(password.result)


DEFAULT_TLS_SECRET = "grafana-tls"
# The policy pack's opt-in for Grafana's anonymous access (policy/rules.py GRAFANA_ANONYMOUS_ANNOTATION),
# set on the grafana.ini ConfigMap exactly when ``anonymousViewing`` is on.
ANONYMOUS_ACCESS_ANNOTATION = "policy.loadproof.dev/grafana-anonymous-access"


def tls_secret_name(cfg: StackConfig) -> str:
    """The Ingress's TLS Secret: ``tlsSecret``, else :data:`DEFAULT_TLS_SECRET` (where cert-manager writes)."""
    return cfg.monitoring.grafana.tls_secret or DEFAULT_TLS_SECRET


def grafana_files(cfg: StackConfig, prometheus_url: str) -> dict[str, dict[str, str]]:
    """ConfigMap key -> file name -> text for Grafana's ini, provisioning and dashboards."""
    g = cfg.monitoring.grafana
    dashboards = all_dashboards(cfg.loadtest.thresholds)
    return {
        "ini": {"grafana.ini": gc.grafana_ini(g, grafana_root_url(cfg))},
        "datasources": {
            "datasources.yaml": pc.render_yaml(
                gc.datasource_provisioning(
                    prometheus_url, scrape_interval_s=cfg.monitoring.prometheus.scrape_interval_s
                )
            )
        },
        "dashboard-provider": {"dashboards.yaml": pc.render_yaml(gc.dashboard_provider(DASHBOARD_DIR))},
        "dashboards": {fname: json.dumps(d, sort_keys=True, indent=1) for fname, d in sorted(dashboards.items())},
    }


def prometheus_files(cfg: StackConfig) -> dict[str, str]:
    """The Prometheus ConfigMap: scrape config (namespace pod discovery) and the recording/alert rules."""
    p = cfg.monitoring.prometheus
    rules_path = f"{CONFIG_DIR}/{pc.RULES_FILE}"
    return {
        "prometheus.yml": pc.render_yaml(
            pc.kubernetes_config(cfg.namespace, p.scrape_interval_s, rule_files=[rules_path])
        ),
        pc.RULES_FILE: pc.render_yaml(pc.rules(cfg.loadtest.thresholds)),
    }


RETENTION_SHARE = 0.8  # of the PVC: head block, WAL and compaction need the rest


def retention_size_mb(storage: str) -> int:
    """Prometheus' size-based retention for a PVC of ``storage`` (its MB are MiB)."""
    return int(c.memory_bytes(storage) * RETENTION_SHARE) // 2**20


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]
