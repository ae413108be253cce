"""The service itself: the FastAPI API (``orchestrator``) and the batched LLM ``workers``.

Both run the one service image with the same ``LOADPROOF_*`` environment (``StackConfig.service_env``)
so a knob means the same thing as in ``make demo``; connection URLs and keys come from Secrets.
Rollouts never drop capacity (maxUnavailable 0) and every pod drains before it dies: a preStop sleep
lets endpoint removal propagate, then SIGTERM starts the service's own bounded drain, and the grace
period covers both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pulumi
import pulumi_kubernetes as k8s

from common.stackconfig import Resources, StackConfig
from infra import kube as c
from service.orchestrator import drain_delay_s

APP_UID = 10001  # the service image's user (Dockerfile)
PRESTOP_SLEEP_S = 5
API_NAME = "orchestrator"
WORKERS_NAME = "workers"


GRACE_HEADROOM_S = 10  # lifespan shutdown (closing pools) after the drain, and scheduling slack


def grace_period_s(shutdown_timeout_s: float) -> int:
    """Everything between the kubelet's "stop" and the process exiting, plus headroom, so no drain is SIGKILLed.

    preStop sleep (endpoint removal propagates) -> SIGTERM -> the API keeps serving while readiness
    is 503 (``service.orchestrator.drain_delay_s``) -> uvicorn drains in-flight requests within
    ``shutdown_timeout_s`` -> pools close. Workers finish their batches within ``shutdown_timeout_s``.
    """
    drain = drain_delay_s(shutdown_timeout_s) + shutdown_timeout_s
    return PRESTOP_SLEEP_S + math.ceil(drain) + GRACE_HEADROOM_S


class Orchestrator(pulumi.ComponentResource):
    """API Deployment + Service + PDB + HPA, and the workers Deployment + PDB (their autoscaler, when on,
    is :class:`infra.autoscaling.WorkerAutoscaling`).

    Args: ``name``, ``cfg`` (sections ``orchestrator``, ``workers``, ``llm``; ``service_env()``),
    ``namespace``, the Secret names/keys of the database and Redis URLs and the LLM key,
    ``redis_checksum`` (default none: changes with the generated Redis password, rolls the pods),
    ``llm_base_url``, ``after`` (default none: stores both Deployments wait for) and
    ``workers_after`` (default none: what only the workers wait for, the LLM), ``opts``.
    """

    base_url: str
    api: k8s.apps.v1.Deployment
    workers: k8s.apps.v1.Deployment
    # The Redis stream and consumer group the workers resolve from their own environment: whatever
    # watches the queue from outside (the KEDA trigger) reads these, never a second literal.
    queue_stream: str
    queue_group: str

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        *,
        database_secret: pulumi.Input[str],
        database_key: str,
        redis_secret: pulumi.Input[str],
        redis_key: str,
        redis_checksum: pulumi.Input[str] | None = None,
        llm_base_url: str,
        llm_secret: pulumi.Input[str],
        llm_key: str,
        after: Sequence[pulumi.Resource] = (),
        workers_after: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:Orchestrator", name, None, opts)
        # Children do not inherit a component's depends_on: the Deployments themselves wait for
        # their stores (``after``); only the workers call the LLM, so only they wait for it.
        after = list(after)
        o, w = cfg.orchestrator, cfg.workers
        self.base_url = f"http://{API_NAME}.{cfg.namespace}.svc:{c.ORCHESTRATOR_PORT}"
        plain = {
            **cfg.service_env(),
            "LOADPROOF_HOST": "0.0.0.0",
            "LOADPROOF_PORT": str(c.ORCHESTRATOR_PORT),
            "LOADPROOF_WORKER_METRICS_PORT": str(c.WORKER_METRICS_PORT),
        }
        settings = c.check_settings({**plain, "LOADPROOF_LLM_BASE_URL": llm_base_url}, "orchestrator/workers")
        self.queue_stream, self.queue_group = settings.queue_stream, settings.queue_group
        stores = [
            c.secret_env("LOADPROOF_DATABASE_URL", database_secret, database_key),
            c.secret_env("LOADPROOF_REDIS_URL", redis_secret, redis_key),
        ]
        # The API never calls the LLM (it queues tasks): only the workers get its URL and key.
        api_env = [*c.env_list(plain), *stores]
        workers_env = [
            *c.env_list({**plain, "LOADPROOF_LLM_BASE_URL": llm_base_url}),
            *stores,
            c.secret_env("LOADPROOF_LLM_API_KEY", llm_secret, llm_key),
        ]
        grace = grace_period_s(o.shutdown_timeout_s)
        # Env from a Secret is read at container start: a new Redis password must roll both Deployments.
        restart_on = {"loadproof.dev/redis-credentials": redis_checksum} if redis_checksum is not None else {}
        self.api = self._deployment(
            f"{name}-api",
            API_NAME,
            cfg,
            namespace,
            replicas=o.replicas,
            resources=o.resources,
            command=["python", "-m", "service.orchestrator"],
            env=api_env,
            port=c.ORCHESTRATOR_PORT,
            liveness=c.http_probe("/healthz", c.ORCHESTRATOR_PORT, period_s=10, failure_threshold=3),
            readiness=c.http_probe("/readyz", c.ORCHESTRATOR_PORT, period_s=5, failure_threshold=2),
            grace=grace,
            after=after,
            # The HPA owns the replica count once it exists; don't fight it on every `pulumi up`.
            ignore_replicas=True,
            annotations=restart_on,
        )
        self.workers = self._deployment(
            f"{name}-workers",
            WORKERS_NAME,
            cfg,
            namespace,
            replicas=w.replicas,
            resources=w.resources,
            command=["python", "-m", "service.worker"],
            env=workers_env,
            port=c.WORKER_METRICS_PORT,
            # Workers serve /healthz (event loop turning), /readyz (taking work) and /metrics on one port.
            liveness=c.http_probe("/healthz", c.WORKER_METRICS_PORT, period_s=15, failure_threshold=4),
            readiness=c.http_probe("/readyz", c.WORKER_METRICS_PORT, period_s=10),
            grace=grace,
            after=[*after, *workers_after],
            # With KEDA on, its HPA owns the count (``replicas`` is only where it starts); else it is fixed.
            ignore_replicas=w.autoscaling.enabled,
            annotations=restart_on,
        )
        c.cluster_service(f"{name}-service", API_NAME, namespace, API_NAME, "http", c.ORCHESTRATOR_PORT, parent=self)
        for component in (API_NAME, WORKERS_NAME):
            k8s.policy.v1.PodDisruptionBudget(
                f"{name}-{component}-pdb",
                metadata=c.metadata(component, namespace, component),
                spec=k8s.policy.v1.PodDisruptionBudgetSpecArgs(
                    # maxUnavailable (not minAvailable) so a 1-replica stack can still drain a node.
                    max_unavailable=1,
                    selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector(component)),
                ),
                opts=pulumi.ResourceOptions(parent=self),
            )
        a = o.autoscale
        k8s.autoscaling.v2.HorizontalPodAutoscaler(
            f"{name}-hpa",
            metadata=c.metadata(API_NAME, namespace, API_NAME),
            spec=k8s.autoscaling.v2.HorizontalPodAutoscalerSpecArgs(
                scale_target_ref=k8s.autoscaling.v2.CrossVersionObjectReferenceArgs(
                    api_version="apps/v1", kind="Deployment", name=self.api.metadata.apply(lambda m: m.name or "")
                ),
                min_replicas=a.min_replicas,
                max_replicas=a.max_replicas,
                metrics=[
                    k8s.autoscaling.v2.MetricSpecArgs(
                        type="Resource",
                        resource=k8s.autoscaling.v2.ResourceMetricSourceArgs(
                            name="cpu",
                            target=k8s.autoscaling.v2.MetricTargetArgs(
                                type="Utilization", average_utilization=a.cpu_utilization
                            ),
                        ),
                    )
                ],
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.register_outputs({"base_url": self.base_url})

    def _deployment(
        self,
        resource_name: str,
        component: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        *,
        replicas: int,
        resources: Resources,
        command: list[str],
        env: list[k8s.core.v1.EnvVarArgs],
        port: int,
        liveness: k8s.core.v1.ProbeArgs,
        readiness: k8s.core.v1.ProbeArgs,
        grace: int,
        after: list[pulumi.Resource],
        ignore_replicas: bool,
        annotations: Mapping[str, pulumi.Input[str]],
    ) -> k8s.apps.v1.Deployment:
        container = k8s.core.v1.ContainerArgs(
            name=component,
            image=cfg.image,
            image_pull_policy=cfg.image_pull_policy,
            command=command,
            env=env,
            ports=[k8s.core.v1.ContainerPortArgs(name="http", container_port=port)],
            resources=c.resources(resources),
            security_context=c.container_security(),
            liveness_probe=liveness,
            readiness_probe=readiness,
            lifecycle=k8s.core.v1.LifecycleArgs(
                pre_stop=k8s.core.v1.LifecycleHandlerArgs(
                    exec_=k8s.core.v1.ExecActionArgs(command=["sleep", str(PRESTOP_SLEEP_S)])
                )
            ),
            # /tmp: prometheus-client's multiprocess directory and anything else that must be writable.
            volume_mounts=[k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp")],
        )
        return k8s.apps.v1.Deployment(
            resource_name,
            metadata=c.metadata(component, namespace, component),
            spec=k8s.apps.v1.DeploymentSpecArgs(
                replicas=replicas,
                selector=k8s.meta.v1.LabelSelectorArgs(match_labels=c.selector(component)),
                strategy=k8s.apps.v1.DeploymentStrategyArgs(
                    type="RollingUpdate",
                    rolling_update=k8s.apps.v1.RollingUpdateDeploymentArgs(max_unavailable=0, max_surge=1),
                ),
                template=k8s.core.v1.PodTemplateSpecArgs(
                    metadata=k8s.meta.v1.ObjectMetaArgs(
                        labels=c.labels(component), annotations={**c.scrape_annotations(port), **annotations}
                    ),
                    spec=k8s.core.v1.PodSpecArgs(
                        automount_service_account_token=False,
                        security_context=c.pod_security(APP_UID),
                        termination_grace_period_seconds=grace,
                        topology_spread_constraints=c.spread(c.selector(component)),
                        containers=[container],
                        volumes=[c.empty_dir("tmp")],
                    ),
                ),
            ),
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=after,
                ignore_changes=["spec.replicas"] if ignore_replicas else None,
            ),
        )
