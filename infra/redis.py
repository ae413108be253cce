"""Cache and durable task queue: a Redis Deployment with a PVC for its append-only file, or external.

The URL lives in a Secret in both modes (an external one may carry a password), read by the
service through ``secretKeyRef``. Internal Redis requires a generated password (``requirepass``),
carried in that URL; the password never appears in the pod spec or in the server's command line:
the entrypoint hands it to ``redis-server`` as configuration on stdin, and the probes' ``redis-cli``
reads it from ``REDISCLI_AUTH``, an environment variable from the Secret.
"""

from __future__ import annotations

import hashlib

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from common.stackconfig import StackConfig
from infra import kube as c

URL_KEY = "redis-url"
PASSWORD_KEY = "password"
DATABASE_INDEX = 0  # the database in the internal URL; the KEDA trigger reads the same one
REDIS_UID = 999  # the redis user of the alpine image
# redis-cli reads the password from this variable (no -a on a command line); the entrypoint uses it too.
AUTH_ENV = "REDISCLI_AUTH"
# `redis-server -` reads configuration from stdin (a here-document: a pipe, no file on the read-only
# root filesystem); `exec` keeps redis-server as PID 1 so it gets SIGTERM and shuts down cleanly.
# The container args ("$@") follow as ordinary options.
ENTRYPOINT = f"""exec redis-server - "$@" <<EOF
requirepass ${AUTH_ENV}
EOF
"""
# maxmemory may use at most this share of the container limit: the rest is allocator
# fragmentation, client buffers and the AOF rewrite's copy-on-write, so eviction (not the OOM
# killer) is what happens when the cache fills.
MAXMEMORY_SHARE = 0.75
_REDIS_UNITS = {"kb": 2**10, "mb": 2**20, "gb": 2**30, "k": 10**3, "m": 10**6, "g": 10**9}


def redis_bytes(value: str) -> int:
    """A Redis memory setting (``256mb``, ``1gb``, ``100m``, bytes) in bytes, as redis.conf reads it."""
    text = value.strip().lower()
    for suffix, factor in _REDIS_UNITS.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def check_memory(cfg: StackConfig) -> None:
    """Refuse a maxmemory that the container limit cannot hold with headroom (see :data:`MAXMEMORY_SHARE`)."""
    r = cfg.redis
    limit = c.memory_bytes(r.resources.memory_limit)
    if not 0 < redis_bytes(r.maxmemory) <= MAXMEMORY_SHARE * limit:
        raise ValueError(
            f"loadproof:redis.maxmemory={r.maxmemory} must be positive and at most {MAXMEMORY_SHARE:.0%} of "
            f"redis.resources.memoryLimit={r.resources.memory_limit}, or the OOM killer strikes before eviction"
        )


def probe_command(*, live: bool) -> list[str]:
    """An authenticated ``PING`` (password from ``REDISCLI_AUTH``). redis-cli exits 0 on error replies
    (``NOAUTH``...), so the reply itself is checked. Ready: ``PONG``. Alive: also while loading the AOF
    after a restart (``LOADING``), which can take long and must not get the pod killed."""
    accept = "PONG|LOADING*" if live else "PONG"
    return ["sh", "-c", f'case "$(redis-cli -p {c.REDIS_PORT} ping)" in {accept}) exit 0 ;; *) exit 1 ;; esac']


class Redis(pulumi.ComponentResource):
    """``internal``: password, Deployment (Recreate: one writer of the AOF), PVC, Service; ``external``: a Secret.

    Args: ``name`` (also the Service's DNS name), ``cfg`` (section ``redis``), ``namespace``,
    ``external_url`` (secret config ``loadproof:redisUrl``; default None, required when
    ``redis.mode`` is ``external``), ``opts``.
    """

    secret_name: pulumi.Output[str]
    url_key: str = URL_KEY
    # Internal mode only (None for an external URL): ``host:port`` in the cluster, and the Secret key of
    # the password alone, for clients that take the two apart (KEDA's Redis scaler).
    address: str | None = None
    password_key: str | None = None
    # Changes when the generated password does (internal mode; None for an external URL): clients read
    # the URL from env at start, so their pod templates carry it and roll when it changes.
    credentials_checksum: pulumi.Output[str] | None = None

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        external_url: pulumi.Input[str] | None = None,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:Redis", name, None, opts)
        r = cfg.redis
        data: dict[str, pulumi.Input[str]]
        if r.mode == "external":
            if external_url is None:
                raise ValueError("redis.mode=external needs `pulumi config set --secret loadproof:redisUrl ...`")
            data = {URL_KEY: external_url}
        else:
            password = random.RandomPassword(
                f"{name}-password", length=32, special=False, opts=pulumi.ResourceOptions(parent=self)
            )
            self.address = f"{name}.{cfg.namespace}.svc:{c.REDIS_PORT}"
            url = pulumi.Output.concat("redis://:", password.result, f"@{self.address}/{DATABASE_INDEX}")
            data = {URL_KEY: url, PASSWORD_KEY: password.result}
            self.password_key = PASSWORD_KEY
            # A digest of 32 random characters reveals nothing useful; never of a user-chosen external URL.
            self.credentials_checksum = password.result.apply(lambda pw: hashlib.sha256(pw.encode()).hexdigest()[:16])
        secret = k8s.core.v1.Secret(
            f"{name}-url",
            metadata=c.metadata(f"{name}-url", namespace, "redis"),
            string_data=data,
            opts=pulumi.ResourceOptions(parent=self, additional_secret_outputs=["stringData", "data"]),
        )
        self.secret_name = secret.metadata.apply(lambda m: m.name or "")
        if r.mode == "external":
            self.register_outputs({"secret_name": self.secret_name})
            return

        check_memory(cfg)
        sel = c.selector("redis")
        pvc = k8s.core.v1.PersistentVolumeClaim(
            f"{name}-data",
            # WaitForFirstConsumer storage classes bind only once the pod exists, and the pod refers
            # to this claim: waiting for "Bound" here would deadlock.
            metadata=c.metadata(f"{name}-data", namespace, "redis", annotations={"pulumi.com/skipAwait": "true"}),
            spec=k8s.core.v1.PersistentVolumeClaimSpecArgs(
                access_modes=["ReadWriteOnce"],
                storage_class_name=c.storage_class(r.storage_class),
                resources=k8s.core.v1.VolumeResourceRequirementsArgs(requests={"storage": r.storage}),
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        args = [
            "--port", str(c.REDIS_PORT),
            "--dir", "/data",
            "--maxmemory", r.maxmemory,
            "--maxmemory-policy", r.maxmemory_policy,
            "--appendonly", "yes" if r.appendonly else "no",
            "--save", "",
        ]  # fmt: skip
        container = k8s.core.v1.ContainerArgs(
            name="redis",
            image=r.image,
            command=["sh", "-c", ENTRYPOINT, "redis-server"],
            args=args,
            env=[c.secret_env(AUTH_ENV, self.secret_name, PASSWORD_KEY)],
            ports=[k8s.core.v1.ContainerPortArgs(name="redis", container_port=c.REDIS_PORT)],
            resources=c.resources(r.resources),
            security_context=c.container_security(),
            liveness_probe=c.exec_probe(probe_command(live=True), period_s=15, failure_threshold=4),
            readiness_probe=c.exec_probe(probe_command(live=False), period_s=5),
            volume_mounts=[k8s.core.v1.VolumeMountArgs(name="data", mount_path="/data")],
        )
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata=c.metadata(name, namespace, "redis"),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=1,
                strategy=k8s.apps.v1.DeploymentStrategyArgs(type="Recreate"),
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=sel),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(labels=c.labels("redis")),
                    spec=k8s.core.v1.PodSpecArgs(
                        automount_service_account_token=False,
                        security_context=c.pod_security(REDIS_UID, persistent=True),
                        termination_grace_period_seconds=30,
                        containers=[container],
                        volumes=[
                            k8s.core.v1.VolumeArgs(
                                name="data",
                                persistent_volume_claim=k8s.core.v1.PersistentVolumeClaimVolumeSourceArgs(
                                    claim_name=pvc.metadata.apply(lambda m: m.name or "")
                                ),
                            )
                        ],
                    ),
                ),
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        c.cluster_service(f"{name}-service", name, namespace, "redis", "redis", c.REDIS_PORT, parent=self)
        self.register_outputs({"secret_name": self.secret_name})
