"""The task store: a Postgres StatefulSet with its own generated password, or an external database.

Either way the result is one Secret key holding the SQLAlchemy URL, which is what the service,
workers and report Job read (``LOADPROOF_DATABASE_URL`` via ``secretKeyRef``); the URL never appears
in a pod spec or ConfigMap.
"""

from __future__ import annotations

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from common.stackconfig import StackConfig
from infra import kube as c

URL_KEY = "database-url"
DB_NAME = "loadproof"
DB_USER = "loadproof"
POSTGRES_UID = 70  # the postgres user of the alpine image
SUPERUSER_RESERVED = 3  # Postgres' superuser_reserved_connections default: not usable by the app
REPORT_CONNECTIONS = 1  # the report Job's one psycopg connection
SHM_SIZE = "256Mi"  # parallel query workers share memory through /dev/shm (the runtime's default is 64Mi)


def connection_demand(cfg: StackConfig) -> int | None:
    """Connections the service can hold at full scale; None when unbounded (``dbPoolMode: null``).

    Every pool is per process and may grow to ``dbPoolSize + dbMaxOverflow``: API pods at the HPA
    ceiling plus one rolling-update surge pod, worker pods at their peak (KEDA's ``maxReplicas`` when
    ``workers.autoscaling`` is on, else ``workers.replicas``) plus one surge pod (one process each),
    the report Job, and the superuser slots Postgres keeps back.
    """
    o, w = cfg.orchestrator, cfg.workers
    if o.db_pool_mode == "null":
        return None  # the baseline opens one connection per statement: bounded only by load
    per_process = o.db_pool_size + o.db_max_overflow
    api = (o.autoscale.max_replicas + 1) * o.processes * per_process
    workers = (w.peak_replicas + 1) * per_process
    return api + workers + REPORT_CONNECTIONS + SUPERUSER_RESERVED


def check_connections(cfg: StackConfig) -> None:
    """Refuse a stack whose pools could exhaust ``max_connections`` (errors under exactly the load we test)."""
    demand = connection_demand(cfg)
    if demand is not None and demand > cfg.postgres.max_connections:
        raise ValueError(
            f"loadproof:postgres.maxConnections={cfg.postgres.max_connections} is below the {demand} connections "
            "the pools can open at full scale (orchestrator.autoscale.maxReplicas+1 API pods x processes x "
            "(dbPoolSize+dbMaxOverflow), workers.replicas (or, with workers.autoscaling on, its maxReplicas)+1 "
            "worker pods x the same, the report Job, "
            f"{SUPERUSER_RESERVED} superuser slots): raise it or shrink the pools"
        )


class Postgres(pulumi.ComponentResource):
    """``internal``: StatefulSet + PVC template + headless and ClusterIP Services; ``external``: a Secret only.

    Args: ``name`` (also the Service's DNS name), ``cfg`` (section ``postgres``; the pools for the
    connection check), ``namespace``, ``external_url`` (secret config ``loadproof:databaseUrl``;
    default None, required when ``postgres.mode`` is ``external``), ``opts``.
    """

    secret_name: pulumi.Output[str]
    url_key: str = URL_KEY
    host: str

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        external_url: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:Postgres", name, None, opts)
        p = cfg.postgres
        self.host = f"{name}.{cfg.namespace}.svc"
        if p.mode == "external":
            if external_url is None:
                raise ValueError("postgres.mode=external needs `pulumi config set --secret loadproof:databaseUrl ...`")
            secret = k8s.core.v1.Secret(
                f"{name}-url",
                metadata=c.metadata(f"{name}-url", namespace, "postgres"),
                string_data={URL_KEY: external_url},
                opts=pulumi.ResourceOptions(parent=self),
            )
            self.secret_name = secret.metadata.apply(lambda m: m.name or "")
            self.register_outputs({"secret_name": self.secret_name})
            return

        check_connections(cfg)
        password = random.RandomPassword(
            f"{name}-password", length=32, special=False, opts=pulumi.ResourceOptions(parent=self)
        )
        url = pulumi.Output.concat(
            f"postgresql+psycopg://{DB_USER}:", password.result, f"@{self.host}:{c.POSTGRES_PORT}/{DB_NAME}"
        )
        secret = k8s.core.v1.Secret(
            f"{name}-credentials",
            metadata=c.metadata(f"{name}-credentials", namespace, "postgres"),
            string_data={"password": password.result, URL_KEY: url},
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["stringData", "data"]),
        )
        self.secret_name = secret.metadata.apply(lambda m: m.name or "")
        sel = c.selector("postgres")
        headless = k8s.core.v1.Service(
            f"{name}-headless",
            metadata=c.metadata(f"{name}-headless", namespace, "postgres"),
            spec=k8s.core.v1.ServiceSpecArgs(
                cluster_ip="None",
                selector=sel,
                ports=[k8s.core.v1.ServicePortArgs(name="postgres", port=c.POSTGRES_PORT, target_port=c.POSTGRES_PORT)],
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        c.cluster_service(f"{name}-service", name, namespace, "postgres", "postgres", c.POSTGRES_PORT, parent=self)
        ready = ["pg_isready", "-U", DB_USER, "-d", DB_NAME, "-h", "127.0.0.1"]
        container = k8s.core.v1.ContainerArgs(
            name="postgres",
            image=p.image,
            args=["-c", f"max_connections={p.max_connections}"],
            env=[
                *c.env_list(
                    {"POSTGRES_USER": DB_USER, "POSTGRES_DB": DB_NAME, "PGDATA": "/var/lib/postgresql/data/pgdata"}
                ),
                c.secret_env("POSTGRES_PASSWORD", self.secret_name, "password"),
            ],
            ports=[k8s.core.v1.ContainerPortArgs(name="postgres", container_port=c.POSTGRES_PORT)],
            resources=c.resources(p.resources),
            security_context=c.container_security(),
            # initdb on first start and crash recovery after a kill can take minutes: liveness only
            # begins once the server has answered once.
            startup_probe=c.exec_probe(ready, period_s=5, failure_threshold=60),
            liveness_probe=c.exec_probe(ready, period_s=15, failure_threshold=4),
            readiness_probe=c.exec_probe(ready, period_s=5),
            volume_mounts=[
                # PGDATA is a subdirectory: initdb refuses a non-empty directory (lost+found on many volumes).
                k8s.core.v1.VolumeMountArgs(name="data", mount_path="/var/lib/postgresql/data"),
                k8s.core.v1.VolumeMountArgs(name="run", mount_path="/var/run/postgresql"),
                k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp"),
                k8s.core.v1.VolumeMountArgs(name="shm", mount_path="/dev/shm"),
            ],
        )
        k8s.apps.v1.StatefulSet(
            f"{name}-statefulset",
            metadata=c.metadata(name, namespace, "postgres"),
            spec=k8s.apps.v1.StatefulSetSpecArgs(
                service_name=headless.metadata.apply(lambda m: m.name or ""),
                replicas=1,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=sel),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=c.labels("postgres")),
                    spec=k8s.core.v1.PodSpecArgs(
                        automount_service_account_token=False,
                        security_context=c.pod_security(POSTGRES_UID, persistent=True),
                        termination_grace_period_seconds=60,
                        containers=[container],
                        volumes=[
                            c.empty_dir("run", "16Mi"),
                            c.empty_dir("tmp"),
                            k8s.core.v1.VolumeArgs(
                                name="shm",
                                empty_dir=k8s.core.v1.EmptyDirVolumeSourceArgs(medium="Memory", size_limit=SHM_SIZE),
                            ),
                        ],
                    ),
                ),
                volume_claim_templates=[
                    k8s.core.v1.PersistentVolumeClaimArgs(
                        metadata=k8s.meta.v1.ObjectMetaArgs(name="data", labels=c.labels("postgres")),
                        spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                            access_modes=["ReadWriteOnce"],
                            storage_class_name=c.storage_class(p.storage_class),
                            resources=k8s.core.v1.VolumeResourceRequirementsArgs(requests={"storage": p.storage}),
                        ),
                    )
                ],
            ),
            # volumeClaimTemplates are immutable: a size change replaces the set (data is test data).
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        self.register_outputs({"secret_name": self.secret_name})
