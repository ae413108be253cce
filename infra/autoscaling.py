"""Queue-driven worker scaling: a KEDA ``ScaledObject`` on the task stream's consumer-group lag.

Workers are I/O-bound (they wait on the LLM), so their CPU says little about whether they keep up;
the queue does. The trigger is KEDA's ``redis-streams`` scaler in lag mode (``lagCount``, KEDA >= 2.11,
Redis >= 7): the entries of the stream not yet delivered to any worker of the group. Lag grows only
when every worker is saturated, and the HPA KEDA creates asks for ``ceil(lag / lagCount)`` pods, within
``minReplicas..maxReplicas``.

KEDA reads Redis's password from the Redis Secret through a ``TriggerAuthentication`` (never in the
ScaledObject); the address, database, stream and group are plain metadata. The stream and group come
from the workers' own settings (:attr:`infra.orchestrator.Orchestrator.queue_stream`), so the trigger
watches exactly the queue the pods consume.

Redis cannot always state the lag: the workers delete entries on acknowledgement, and ``XINFO GROUPS``
answers ``lag`` NULL while such a deletion lies between older pending entries and the group's last
delivered id (KEDA then sees 0 or -1, below any target). Such a moment asks for fewer pods, which the
HPA's scale-down stabilization window (``scaleDownStabilizationS``) rides over; it never removes a
pod below ``minReplicas`` (at least 1, so the sweeper that re-enqueues lost entries always runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import pulumi
import pulumi_kubernetes as k8s

from common.stackconfig import StackConfig
from infra import kube as c
from infra.redis import DATABASE_INDEX

KEDA_API_VERSION = "keda.sh/v1alpha1"
TRIGGER_TYPE = "redis-streams"
COMPONENT = "workers"
SCALED_OBJECT_NAME = "workers"
TRIGGER_AUTH_NAME = "workers-redis"


def trigger_metadata(cfg: StackConfig, *, address: str, stream: str, group: str) -> dict[str, str]:
    """The ``redis-streams`` trigger's metadata (KEDA takes only strings): lag mode, because ``lagCount`` is set."""
    return {
        "address": address,
        "databaseIndex": str(DATABASE_INDEX),
        "stream": stream,
        "consumerGroup": group,
        "lagCount": str(cfg.workers.autoscaling.lag_threshold),
    }


class WorkerAutoscaling(pulumi.ComponentResource):
    """``TriggerAuthentication`` (Redis password from its Secret) + ``ScaledObject`` on the workers Deployment.

    Args: ``name``, ``cfg`` (section ``workers.autoscaling``), ``namespace``, ``workers`` (the Deployment
    it scales), ``stream``/``group`` (the workers' resolved queue settings), ``redis_address``
    (``host:port``), ``redis_secret``/``redis_password_key`` (where the password is), ``after`` (default
    none: the KEDA release when this program installs it: its CRDs and admission webhook), ``opts``.
    """

    scaled_object: k8s.apiextensions.CustomResource

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        *,
        workers: k8s.apps.v1.Deployment,
        stream: str,
        group: str,
        redis_address: str,
        redis_secret: pulumi.Input[str],
        redis_password_key: str,
        after: Sequence[pulumi.Resource] = (),
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:WorkerAutoscaling", name, None, opts)
        a = cfg.workers.autoscaling
        auth = k8s.apiextensions.CustomResource(
            f"{name}-trigger-auth",
            api_version=KEDA_API_VERSION,
            kind="TriggerAuthentication",
            metadata=c.metadata(TRIGGER_AUTH_NAME, namespace, COMPONENT),
            spec={"secretTargetRef": [{"parameter": "password", "name": redis_secret, "key": redis_password_key}]},
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(after)),
        )
        self.scaled_object = k8s.apiextensions.CustomResource(
            f"{name}-scaled-object",
            api_version=KEDA_API_VERSION,
            kind="ScaledObject",
            metadata=c.metadata(SCALED_OBJECT_NAME, namespace, COMPONENT),
            spec={
                "scaleTargetRef": {
                    "apiVersion": "apps/v1",
                    "kind": "Deployment",
                    "name": workers.metadata.apply(lambda m: m.name or ""),
                },
                "minReplicaCount": a.min_replicas,
                "maxReplicaCount": a.max_replicas,
                "pollingInterval": a.polling_interval_s,
                "advanced": {
                    "horizontalPodAutoscalerConfig": {
                        "behavior": {"scaleDown": {"stabilizationWindowSeconds": a.scale_down_stabilization_s}}
                    }
                },
                "triggers": [
                    {
                        "type": TRIGGER_TYPE,
                        # lagCount is a target per pod: the HPA averages the lag over the replicas.
                        "metricType": "AverageValue",
                        "metadata": trigger_metadata(cfg, address=redis_address, stream=stream, group=group),
                        "authenticationRef": {"kind": "TriggerAuthentication", "name": TRIGGER_AUTH_NAME},
                    }
                ],
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[auth, *after]),
        )
        self.register_outputs({})
