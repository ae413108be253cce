"""The measured result: a Job that measures the finished run in-cluster, and its read-back as outputs.

The Job (``python -m loadtest.report_job``) runs the same ``loadtest.measure`` as ``make demo``
against the in-cluster Prometheus (and Postgres, to reconcile tasks), then writes the report JSON into
a ConfigMap through the Kubernetes API. Pulumi waits for the Job to complete (no
``pulumi.com/skipAwait``), and the ConfigMap read's id is built from the *Job's outputs*, so the
read cannot happen before the report exists. The program parses it and exports every number.

The report is one of the run's three Jobs (``infra/loadtest.py``, "One run, one unit"): its spec comes
from :func:`report_job_spec`, whose digest with a placeholder run id (:func:`report_spec_digest`) is
one of the run id's keepers, and the Job is replaced whenever the start barrier, the unit's root, is.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import pulumi
import pulumi_kubernetes as k8s

from common.stackconfig import Resources, StackConfig
from infra import kube as c

APP_UID = 10001
REPORT_ACCOUNT = "report"
REPORT_KEY = "report.json"
REPORT_RESOURCES = Resources(cpu_request="100m", cpu_limit="1", memory_request="128Mi", memory_limit="512Mi")
MEASURE_MARGIN_S = 300  # querying Prometheus and Postgres after the drain


def report_timeout_s(cfg: StackConfig) -> int:
    return math.ceil(cfg.loadtest.drain_for(cfg.loadtest.profile) + MEASURE_MARGIN_S)


def report_job_spec(
    cfg: StackConfig,
    run: c.RunNames,
    *,
    prometheus_url: str,
    database_secret: str,
    database_key: str,
) -> k8s.batch.v1.JobSpecArgs:
    """The report Job's spec for run ``run`` (plain values only, so it can be hashed into the run id)."""
    doc = report_job_config(
        cfg, test_id=run.test_id, prometheus_url=prometheus_url, start_configmap=run.start, report_configmap=run.report
    )
    container = k8s.core.v1.ContainerArgs(
        name="report",
        image=cfg.image,
        image_pull_policy=cfg.image_pull_policy,
        command=["python", "-m", "loadtest.report_job"],
        env=[
            k8s.core.v1.EnvVarArgs(name="LOADPROOF_REPORT_CONFIG", value=json.dumps(doc, sort_keys=True)),
            c.secret_env("LOADPROOF_DATABASE_URL", database_secret, database_key),
        ],
        resources=c.resources(REPORT_RESOURCES),
        security_context=c.container_security(),
        volume_mounts=[k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp")],
    )
    return c.one_pod_job(
        "report", container, account=REPORT_ACCOUNT, deadline_s=report_timeout_s(cfg), uid=APP_UID, tmp_size="64Mi"
    )


def report_spec_digest(
    cfg: StackConfig, *, prometheus_url: str, database_secret: pulumi.Input[str], database_key: str
) -> pulumi.Output[str]:
    """The digest of :func:`report_job_spec` with a placeholder run id: a keeper of the run id."""
    return pulumi.Output.from_input(database_secret).apply(
        lambda secret: c.digest(
            report_job_spec(
                cfg,
                c.PLACEHOLDER_RUN,
                prometheus_url=prometheus_url,
                database_secret=secret,
                database_key=database_key,
            )
        )
    )


def report_job_config(
    cfg: StackConfig,
    *,
    test_id: str,
    prometheus_url: str,
    start_configmap: str,
    report_configmap: str,
) -> dict[str, Any]:
    """Everything the report Job needs, as one JSON document (``LOADPROOF_REPORT_CONFIG``); no secrets.

    Only what the run id's keepers cover goes in (no Grafana URL): a Job's pod template is immutable,
    so any other input would force a replacement, i.e. a second measurement under the same run id.
    """
    lt = cfg.loadtest
    return {
        "testId": test_id,
        "namespace": cfg.namespace,
        "prometheusUrl": prometheus_url,
        "startConfigmap": start_configmap,
        "reportConfigmap": report_configmap,
        "profileName": lt.profile,
        "profile": lt.profiles[lt.profile].model_dump(by_alias=True),
        "thresholds": lt.thresholds.model_dump(by_alias=True),
        "drainS": lt.drain_for(lt.profile),
        "runners": lt.runners,
        "orchestratorReplicas": cfg.orchestrator.replicas,
        "workersReplicas": cfg.workers.replicas,
        "scrapeIntervalS": cfg.monitoring.prometheus.scrape_interval_s,
    }


class Report(pulumi.ComponentResource):
    """The report Job and the ConfigMap read that turns its JSON into stack outputs.

    Args: ``name``, ``cfg`` (section ``loadtest``), ``namespace``, the run's ``run_hex``,
    ``prometheus_url``, ``grafana_url`` (added to the report, not measured), the database Secret
    name/key, ``after`` (the runner Job: measure once it completed), ``unit`` (the start barrier Job,
    root of the run's unit: replacing it replaces this Job), ``opts``. The Job runs as its own
    ServiceAccount, which may read the run's start ConfigMap and patch its report ConfigMap, nothing else.
    """

    report: pulumi.Output[dict[str, Any]]
    job: k8s.batch.v1.Job

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        *,
        run_hex: pulumi.Output[str],
        prometheus_url: str,
        grafana_url: str,
        database_secret: pulumi.Input[str],
        database_key: str,
        after: list[pulumi.Resource],
        unit: pulumi.Resource,
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:Report", name, None, opts)
        names = run_hex.apply(c.RunNames)
        start_configmap = names.apply(lambda n: n.start)
        report_configmap = names.apply(lambda n: n.report)
        report_result = c.result_configmap(f"{name}-configmap", report_configmap, namespace, "report", parent=self)
        account, binding = c.job_identity(
            name,
            REPORT_ACCOUNT,
            namespace,
            "report",
            [
                c.configmap_rule(pulumi.Output.all(start_configmap), ["get"]),  # the start time
                c.configmap_rule(pulumi.Output.all(report_result.metadata.apply(lambda m: m.name or "")), ["patch"]),
            ],
            parent=self,
        )
        timeout = report_timeout_s(cfg)
        self.job = k8s.batch.v1.Job(
            f"{name}-job",
            # Same name as the ConfigMap it writes: one report per run id.
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=report_configmap, namespace=namespace, labels=c.labels("report"), annotations=c.JOB_ANNOTATIONS
            ),
            # The account's name joins the spec so the Job also waits for the account.
            spec=pulumi.Output.all(names, database_secret, account).apply(
                lambda a: report_job_spec(
                    cfg,
                    a[0],
                    prometheus_url=prometheus_url,
                    database_secret=a[1],
                    database_key=database_key,
                )
            ),
            opts=pulumi.ResourceOptions(
                parent=self,
                # Not after the barrier: it finishes only once this Job has (infra/loadtest.py).
                depends_on=[*after, binding, report_result],
                delete_before_replace=True,  # explicit name: create-before-delete cannot work
                replace_with=[unit],  # one run, one unit
                custom_timeouts=pulumi.CustomTimeouts(create=f"{timeout + 60}s", update=f"{timeout + 60}s"),
            ),
        )
        # The id comes from the completed Job's outputs: Pulumi cannot issue this read earlier.
        result = k8s.core.v1.ConfigMap.get(
            f"{name}-result",
            pulumi.Output.concat(namespace, "/", self.job.metadata.apply(lambda m: m.name or "")),
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.job]),
        )
        # Where to look at the run is deployment information, not a measurement: added here.
        self.report = result.data.apply(lambda d: {**parse_report(d), "grafana_url": grafana_url})
        self.register_outputs({"report": self.report})


def parse_report(data: Mapping[str, str] | None) -> dict[str, Any]:
    """The report document from the ConfigMap; a missing or broken one is an error, not an empty report."""
    if not data or REPORT_KEY not in data:
        raise ValueError(f"report ConfigMap has no {REPORT_KEY!r} key")
    report = json.loads(data[REPORT_KEY])
    if not isinstance(report, dict):
        raise ValueError("report JSON is not an object")
    return report
