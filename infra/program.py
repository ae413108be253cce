"""The whole Pulumi program as one function, so ``pulumi up`` (``__main__.py``), the offline renderer
(``infra/render.py``) and the tests evaluate exactly the same code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from common.outputs import STACK_OUTPUTS
from common.stackconfig import PROJECT, StackConfig, parse
from infra.autoscaling import WorkerAutoscaling
from infra.baseline import Baseline
from infra.llm import Llm
from infra.loadtest import LoadTest
from infra.monitoring import Monitoring, ingress_note
from infra.orchestrator import Orchestrator
from infra.postgres import Postgres
from infra.redis import Redis
from infra.report import Report, report_spec_digest

# The measured numbers exported one by one (and all of them under `report`).


@dataclass(frozen=True)
class Secrets:
    """Secret stack config (``pulumi config set --secret``): only ever Outputs, never plain values."""

    database_url: pulumi.Output[str] | None = None
    redis_url: pulumi.Output[str] | None = None
    llm_api_key: pulumi.Output[str] | None = None


def read_config() -> tuple[StackConfig, Secrets]:
    """``loadproof:*`` from the stack, validated by the same schema ``make demo`` uses."""
    config = pulumi.Config(PROJECT)
    values: dict[str, Any] = {}
    for name, field in StackConfig.model_fields.items():
        key = field.alias or name
        raw = config.get(key)
        if raw is None:
            continue
        # Structured values (sections) arrive as JSON text; scalars as plain strings.
        values[key] = config.get_object(key) if raw.lstrip().startswith(("{", "[")) else raw
    secrets = Secrets(
        database_url=config.get_secret("databaseUrl"),
        redis_url=config.get_secret("redisUrl"),
        llm_api_key=config.get_secret("llmApiKey"),
    )
    return parse(values), secrets


PROVIDER_NAME = "kubernetes"


def kubernetes_provider(cfg: StackConfig) -> k8s.Provider:
    """The one Kubernetes provider of the stack: the kubeconfig context ``kubeContext`` names.

    Every component gets it through ``providers``, and each child inherits it from its parent, so no
    resource falls back to Pulumi's default provider (whatever context is current when someone runs
    ``up`` or ``destroy``). Empty ``kubeContext``: the kubeconfig's current context (``$KUBECONFIG`` or
    ``~/.kube/config``), with a warning.
    """
    if not cfg.kube_context:
        pulumi.log.warn(
            "loadproof:kubeContext is empty: this stack deploys to the kubeconfig's current context, "
            "whatever it is when `pulumi up` or `destroy` runs"
        )
    return k8s.Provider(PROVIDER_NAME, context=cfg.kube_context or None)


def deploy(cfg: StackConfig, secrets: Secrets) -> dict[str, Any]:
    """Build every component with the stack's own Kubernetes provider; returns the stack outputs."""
    k8s_opts = pulumi.ResourceOptions(providers=[kubernetes_provider(cfg)])
    baseline = Baseline("baseline", cfg, opts=k8s_opts)
    ns = baseline.namespace
    postgres = Postgres("postgres", cfg, ns, external_url=secrets.database_url, opts=k8s_opts)
    redis = Redis("redis", cfg, ns, external_url=secrets.redis_url, opts=k8s_opts)
    llm = Llm("simulator", cfg, ns, external_api_key=secrets.llm_api_key, opts=k8s_opts)
    controller = [baseline.ingress_controller] if baseline.ingress_controller else []
    monitoring = Monitoring("monitoring", cfg, ns, ingress_after=controller, opts=k8s_opts)
    service = Orchestrator(
        "orchestrator",
        cfg,
        ns,
        database_secret=postgres.secret_name,
        database_key=postgres.url_key,
        redis_secret=redis.secret_name,
        redis_key=redis.url_key,
        redis_checksum=redis.credentials_checksum,
        llm_base_url=llm.base_url,
        llm_secret=llm.secret_name,
        llm_key=llm.api_key_key,
        # Pulumi awaits the stores' readiness first, so the API does not crash-loop on start.
        after=[postgres, redis],
        workers_after=[llm],
        opts=k8s_opts,
    )
    if cfg.workers.autoscaling.enabled:
        if redis.address is None or redis.password_key is None:
            raise ValueError("workers.autoscaling needs redis.mode internal")  # the schema refuses it already
        WorkerAutoscaling(
            "autoscaling",
            cfg,
            ns,
            workers=service.workers,
            stream=service.queue_stream,
            group=service.queue_group,
            redis_address=redis.address,
            redis_secret=redis.secret_name,
            redis_password_key=redis.password_key,
            after=[baseline.keda] if baseline.keda else [],
            opts=k8s_opts,
        )
    loadtest = LoadTest(
        "loadtest",
        cfg,
        ns,
        target_base_url=service.base_url,
        remote_write_url=monitoring.remote_write_url,
        report_spec=report_spec_digest(
            cfg,
            prometheus_url=monitoring.prometheus_url,
            database_secret=postgres.secret_name,
            database_key=postgres.url_key,
        ),
        # The run starts only once the service and Prometheus are Ready (Pulumi awaits Deployments);
        # Grafana and its Ingress are not needed for it.
        depends_on=[service, monitoring.prometheus, monitoring.prometheus_service],
        opts=k8s_opts,
    )
    report = Report(
        "report",
        cfg,
        ns,
        run_hex=loadtest.run_hex,
        prometheus_url=monitoring.prometheus_url,
        grafana_url=monitoring.grafana_url,
        database_secret=postgres.secret_name,
        database_key=postgres.url_key,
        # Runners, barrier and report are one unit (infra/loadtest.py): measured after the runners,
        # replaced whenever the barrier is.
        after=[loadtest.runner_job],
        unit=loadtest.start_job,
        opts=k8s_opts,
    )
    outputs: dict[str, Any] = {
        "grafana_url": monitoring.grafana_url,
        "grafana_admin_password": monitoring.grafana_admin_password,
        "grafana_ingress": ingress_note(cfg),
        "kube_context": cfg.kube_context,
        "report": report.report,
    }
    for key in STACK_OUTPUTS:
        outputs[key] = report.report.apply(lambda r, k=key: r.get(k))
    return outputs
