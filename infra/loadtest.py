"""The distributed k6 run: N runner pods that start together and tile the arrival schedule exactly once.

* **Segments**: an Indexed Job (``completions = parallelism = runners``); pod *i* picks
  ``execution_segments(runners)[i]`` from ``JOB_COMPLETION_INDEX`` and all share one
  ``--execution-segment-sequence``, so the segments cover [0,1] once and every runner partitions
  VUs and arrivals identically (``common/k6config.py``).
* **Start barrier**: every runner starts k6 ``--paused`` with its REST API on :6565 (the readiness
  probe). A headless Service lists only Ready runners; the ``k6-start`` Job
  (``python -m loadtest.k6_start``) waits until all N are listed and each reports k6's
  ``PausedBeforeRun`` state (script compiled, VUs pre-allocated), then resumes them within
  milliseconds and records the start time in its ConfigMap (created empty by Pulumi: the Job's own
  ServiceAccount may patch that one name and nothing else). Image pulls, scheduling and VU allocation therefore
  never skew the schedule between runners (the approach k6-operator's starter takes). A shared
  wall-clock start time would be unsound: nobody knows at plan time how long pods take to come up.
* **One run, one unit**: runners, barrier and report are measured together, so they are created,
  failed and replaced together.

  - *Replaced by a change*: the run id is a ``random.RandomId`` whose keepers are ``loadtest.runId``,
    a hash of the measured stack config (:func:`measurement_hash`) and a hash of the three Job specs
    as they render with a placeholder run id, plus the k6 script and both image references
    (:func:`unit_digest`). The names of all three Jobs derive from the run id, so any change to any
    of them, in the stack config *or* in this program's code, renames all three: a new run on the
    next ``pulumi up``, never one Job replaced under an old run id.
  - *Replaced when unready*: Kubernetes cannot tell Pulumi at plan time that a run failed, so failure
    is made to reach one Job, the root of the unit. The start barrier is that root: after resuming the
    runners it stays up, following the runner Job and then the report Job (``--follow-job``, read
    through its Role: ``get`` on those two Job names only), and fails when either fails or does not
    finish within its deadline. Every Job carries ``pulumi.com/replaceUnready``, and the runner and
    report Jobs carry ``replaceWith: [barrier]``: whichever part failed, the barrier is unready too,
    the next ``pulumi up`` replaces it, and the engine replaces the other two with it.
    The report therefore waits (in Pulumi) for the runner Job only; waiting for the barrier as well
    would deadlock, since the barrier finishes after the report.
* **Thresholds**: k6 exits 99 when a threshold is crossed. That is a *result*, judged and reported by
  the report Job, not an infrastructure failure, so the wrapper maps it to 0; any other non-zero
  exit fails the Job (``backoffLimit: 0``: a load test is never silently retried).
"""

from __future__ import annotations

import hashlib
import json
import math
import shlex

import pulumi
import pulumi_kubernetes as k8s
import pulumi_random as random

from common.k6config import (
    execution_segments,
    graceful_stop_s,
    k6_env,
    profile_duration_s,
    script_text,
    segment_sequence,
)
from common.queries import K6_RUNNER_LABEL
from common.stackconfig import Resources, StackConfig
from infra import kube as c
from infra.report import report_timeout_s

K6_UID = 12345  # the grafana/k6 image's user
APP_UID = 10001
SCRIPT_DIR = "/scripts"
SCRIPT_FILE = "task.js"
START_TIMEOUT_S = 600  # longest wait for all runners to become Ready (image pulls on a cold node)
THRESHOLDS_CROSSED = 99  # k6's exit code for failed thresholds
PUSH_INTERVAL_S = 5
GO_MEMORY_SHARE = 0.9  # GOMEMLIMIT of a k6 runner, as a share of its memory limit (room for non-heap memory)
SMALL = Resources(cpu_request="50m", cpu_limit="500m", memory_request="64Mi", memory_limit="256Mi")
FOLLOW_MARGIN_S = 120  # Pulumi creating the report Job after the runners completed, and slack
RUN_LABEL = "loadproof.dev/run"
START_ACCOUNT = "k6-start"
SCRIPT_CONFIGMAP = "k6-script"


def run_duration_s(cfg: StackConfig) -> float:
    """The profile's schedule plus k6's gracefulStop: the longest a runner can be running after start."""
    profile = cfg.loadtest.profiles[cfg.loadtest.profile]
    return profile_duration_s(profile) + graceful_stop_s(profile)


def runner_timeout_s(cfg: StackConfig) -> int:
    """How long Pulumi waits for the runner Job: start barrier + run + last push + margin."""
    return math.ceil(START_TIMEOUT_S + run_duration_s(cfg) + 2 * PUSH_INTERVAL_S + 120)


def follow_timeout_s(cfg: StackConfig) -> int:
    """How long the barrier follows the run after the start: the runner and report Jobs' deadlines + margin."""
    return runner_timeout_s(cfg) + report_timeout_s(cfg) + FOLLOW_MARGIN_S


def start_deadline_s(cfg: StackConfig) -> int:
    """The barrier Job's ``activeDeadlineSeconds``: it outlives its own follow timeout."""
    return follow_timeout_s(cfg) + 60


def measurement_hash(cfg: StackConfig) -> str:
    """Everything that changes what a run measures; Grafana's look and the Ingress are excluded."""
    doc = cfg.model_dump(mode="json", by_alias=True, exclude={"monitoring": {"grafana"}})
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def runner_script(
    runners: int,
    test_id: str,
    *,
    script: str = f"{SCRIPT_DIR}/{SCRIPT_FILE}",
    address: str = f"0.0.0.0:{c.K6_API_PORT}",
    remote_write: bool = True,
) -> str:
    """The runner's shell entrypoint: index -> segment, paused k6, exit code 99 -> 0 (see module doc).

    ``script``/``address``/``remote_write`` exist so tests can run this very script with real k6 locally.
    """
    output = " -o experimental-prometheus-rw" if remote_write else ""
    cases = "\n".join(f'  {i}) SEGMENT="{seg}" ;;' for i, seg in enumerate(execution_segments(runners)))
    return f"""set -u
case "${{JOB_COMPLETION_INDEX:-}}" in
{cases}
  *) echo "no execution segment for JOB_COMPLETION_INDEX=${{JOB_COMPLETION_INDEX:-}}" >&2; exit 2 ;;
esac
echo "runner $JOB_COMPLETION_INDEX: segment $SEGMENT of {segment_sequence(runners)}"
k6 run --paused --address {shlex.quote(address)} --no-usage-report \\
  --execution-segment "$SEGMENT" --execution-segment-sequence {shlex.quote(segment_sequence(runners))} \\
  --tag testid={shlex.quote(test_id)} --tag {K6_RUNNER_LABEL}="$JOB_COMPLETION_INDEX"{output} {shlex.quote(script)}
rc=$?
if [ "$rc" -eq {THRESHOLDS_CROSSED} ]; then
  echo "k6 thresholds crossed: a measured result, judged by the report" >&2
  exit 0
fi
exit "$rc"
"""


def runner_selector(run: c.RunNames) -> dict[str, str]:
    """The labels the headless Service and the spread constraint select this run's runner pods by."""
    return {**c.selector("k6"), RUN_LABEL: run.hex}


def runner_job_spec(
    cfg: StackConfig, run: c.RunNames, *, target_base_url: str, remote_write_url: str
) -> k8s.batch.v1.JobSpecArgs:
    """The Indexed runner Job's spec for run ``run`` (plain values only, so it can be hashed)."""
    lt = cfg.loadtest
    # GOGC trades memory for CPU (see loadtest.gogc); the soft limit keeps the heap inside the pod.
    env = k6_env(
        cfg,
        base_url=target_base_url,
        test_id=run.test_id,
        prometheus_rw_url=remote_write_url,
        push_interval_s=PUSH_INTERVAL_S,
    ) | {"GOMEMLIMIT": str(int(c.memory_bytes(lt.runner_resources.memory_limit) * GO_MEMORY_SHARE))}
    runner = k8s.core.v1.ContainerArgs(
        name="k6",
        image=lt.image,
        command=["sh", "-c", runner_script(lt.runners, run.test_id)],
        env=[k8s.core.v1.EnvVarArgs(name=k, value=env[k]) for k in sorted(env)],
        ports=[k8s.core.v1.ContainerPortArgs(name="k6-api", container_port=c.K6_API_PORT)],
        resources=c.resources(lt.runner_resources),
        security_context=c.container_security(),
        # Ready = the REST API answers (the barrier additionally checks k6 is initialised and paused).
        readiness_probe=c.http_probe("/v1/status", c.K6_API_PORT, period_s=2, failure_threshold=1),
        liveness_probe=c.tcp_probe(c.K6_API_PORT, period_s=20, failure_threshold=6),
        volume_mounts=[
            k8s.core.v1.VolumeMountArgs(name="script", mount_path=SCRIPT_DIR, read_only=True),
            k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp"),
        ],
    )
    selector = runner_selector(run)
    return k8s.batch.v1.JobSpecArgs(
        completion_mode="Indexed",
        completions=lt.runners,
        parallelism=lt.runners,
        backoff_limit=0,
        # A runner that is never resumed must not hang forever.
        active_deadline_seconds=runner_timeout_s(cfg),
        template=k8s.core.v1.PodTemplateSpecArgs(
            metadata=k8s.meta.v1.ObjectMetaArgs(labels={**c.labels("k6"), **selector}),
            spec=k8s.core.v1.PodSpecArgs(
                restart_policy="Never",
                automount_service_account_token=False,
                # Load generators on separate nodes where possible: they compete for CPU.
                topology_spread_constraints=c.spread(selector),
                security_context=c.pod_security(K6_UID),
                containers=[runner],
                volumes=[
                    k8s.core.v1.VolumeArgs(
                        name="script", config_map=k8s.core.v1.ConfigMapVolumeSourceArgs(name=SCRIPT_CONFIGMAP)
                    ),
                    c.empty_dir("tmp"),
                ],
            ),
        ),
    )


def start_job_spec(cfg: StackConfig, run: c.RunNames) -> k8s.batch.v1.JobSpecArgs:
    """The start barrier's spec: release the runners, then follow the runner and report Jobs (module doc)."""
    starter = k8s.core.v1.ContainerArgs(
        name="k6-start",
        image=cfg.image,
        image_pull_policy=cfg.image_pull_policy,
        command=["python", "-m", "loadtest.k6_start"],
        args=[
            "--service",
            f"{run.runners}.{cfg.namespace}.svc",
            "--port",
            str(c.K6_API_PORT),
            "--count",
            str(cfg.loadtest.runners),
            "--timeout-s",
            str(START_TIMEOUT_S),
            "--namespace",
            cfg.namespace,
            "--configmap",
            run.start,
            "--follow-job",
            run.runners,
            "--follow-job",
            run.report,
            "--follow-timeout-s",
            str(follow_timeout_s(cfg)),
        ],
        resources=c.resources(SMALL),
        security_context=c.container_security(),
        volume_mounts=[k8s.core.v1.VolumeMountArgs(name="tmp", mount_path="/tmp")],
    )
    return c.one_pod_job(
        "k6-start", starter, account=START_ACCOUNT, deadline_s=start_deadline_s(cfg), uid=APP_UID, tmp_size="16Mi"
    )


def unit_digest(cfg: StackConfig, *, target_base_url: str, remote_write_url: str, report_spec: str) -> str:
    """The run id's keeper for the program's side of a run: the runner and barrier specs (rendered with a
    placeholder run id, since their names derive from it), the report spec's digest ``report_spec``,
    the k6 script and both image references. Any change renames all three Jobs."""
    run = c.PLACEHOLDER_RUN
    return c.digest(
        {
            "runner": runner_job_spec(cfg, run, target_base_url=target_base_url, remote_write_url=remote_write_url),
            "start": start_job_spec(cfg, run),
            "report": report_spec,
            "script": hashlib.sha256(script_text().encode()).hexdigest(),
            "k6Image": cfg.loadtest.image,
            "serviceImage": f"{cfg.image} ({cfg.image_pull_policy})",
        }
    )


class LoadTest(pulumi.ComponentResource):
    """RandomId run id, script ConfigMap, headless Service, the start barrier Job and the Indexed runner Job.

    Args: ``name``, ``cfg`` (section ``loadtest``; the run id's keepers hash everything measured),
    ``namespace``, ``target_base_url`` (the API Service), ``remote_write_url`` (Prometheus),
    ``report_spec`` (the report Job's spec digest, ``infra.report.report_spec_digest``: the run id
    covers it too), ``depends_on`` (what must be Ready before the run starts), ``opts``.
    ``start_job`` is the root of the run's unit: the report Job must ``replace_with`` it as the runner Job does.
    """

    run_hex: pulumi.Output[str]
    test_id: pulumi.Output[str]
    runner_job: k8s.batch.v1.Job
    start_job: k8s.batch.v1.Job
    start_configmap: pulumi.Output[str]

    def __init__(
        self,
        name: str,
        cfg: StackConfig,
        namespace: pulumi.Input[str],
        *,
        target_base_url: str,
        remote_write_url: str,
        report_spec: pulumi.Input[str],
        depends_on: list[pulumi.Resource],
        opts: pulumi.ResourceOptions | None = None,
    ) -> None:
        super().__init__("loadproof:infra:LoadTest", name, None, opts)
        lt = cfg.loadtest
        jobs = pulumi.Output.from_input(report_spec).apply(
            lambda r: unit_digest(
                cfg, target_base_url=target_base_url, remote_write_url=remote_write_url, report_spec=r
            )
        )
        run = random.RandomId(
            f"{name}-run-id",
            byte_length=4,
            keepers={"runId": lt.run_id, "config": measurement_hash(cfg), "jobs": jobs},
            opts=pulumi.ResourceOptions(parent=self),
        )
        names = run.hex.apply(c.RunNames)
        self.run_hex = run.hex
        self.test_id = names.apply(lambda n: n.test_id)
        self.start_configmap = names.apply(lambda n: n.start)
        start_result = c.result_configmap(
            f"{name}-start-result", self.start_configmap, namespace, "k6-start", parent=self
        )
        # The start barrier's own identity: it may patch this run's start ConfigMap and read this
        # run's runner and report Jobs (which it follows), nothing else.
        start_account, start_binding = c.job_identity(
            f"{name}-start",
            START_ACCOUNT,
            namespace,
            "k6-start",
            [
                c.configmap_rule(pulumi.Output.all(start_result.metadata.apply(lambda m: m.name or "")), ["patch"]),
                k8s.rbac.v1.PolicyRuleArgs(
                    api_groups=["batch"],
                    resources=["jobs"],
                    resource_names=names.apply(lambda n: [n.runners, n.report]),
                    verbs=["get"],
                ),
            ],
            parent=self,
        )
        script = k8s.core.v1.ConfigMap(
            f"{name}-script",
            metadata=c.metadata(SCRIPT_CONFIGMAP, namespace, "k6"),
            data={SCRIPT_FILE: script_text()},
            opts=pulumi.ResourceOptions(parent=self),
        )
        headless = k8s.core.v1.Service(
            f"{name}-runners",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=names.apply(lambda n: n.runners), namespace=namespace, labels=c.labels("k6")
            ),
            spec=k8s.core.v1.ServiceSpecArgs(
                cluster_ip="None",  # DNS lists the Ready runner pods themselves: the barrier counts them
                selector=names.apply(runner_selector),
                ports=[k8s.core.v1.ServicePortArgs(name="k6-api", port=c.K6_API_PORT, target_port=c.K6_API_PORT)],
            ),
            opts=pulumi.ResourceOptions(parent=self),
        )
        # The root of the run's unit (module doc), so registered first. Not a dependency of the runner
        # Job (Pulumi waits for that Job to *complete*, which needs this one to resume it): both are
        # created together. The account name joins the spec so the Job also waits for the account.
        start_deadline = start_deadline_s(cfg)
        self.start_job = k8s.batch.v1.Job(
            f"{name}-start-job",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=names.apply(lambda n: n.start),
                namespace=namespace,
                labels=c.labels("k6-start"),
                annotations=c.JOB_ANNOTATIONS,
            ),
            spec=pulumi.Output.all(names, start_account).apply(lambda a: start_job_spec(cfg, a[0])),
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[*depends_on, headless, start_binding, start_result],
                delete_before_replace=True,  # explicit name: create-before-delete cannot work
                custom_timeouts=pulumi.CustomTimeouts(
                    create=f"{start_deadline + 60}s", update=f"{start_deadline + 60}s"
                ),
            ),
        )
        timeout = runner_timeout_s(cfg)
        self.runner_job = k8s.batch.v1.Job(
            f"{name}-runners-job",
            metadata=k8s.meta.v1.ObjectMetaArgs(
                name=names.apply(lambda n: n.runners),
                namespace=namespace,
                labels=c.labels("k6"),
                annotations=c.JOB_ANNOTATIONS,
            ),
            # The script ConfigMap's name joins the spec so the Job waits for the ConfigMap.
            spec=pulumi.Output.all(names, script.metadata).apply(
                lambda a: runner_job_spec(cfg, a[0], target_base_url=target_base_url, remote_write_url=remote_write_url)
            ),
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[*depends_on, headless, script],
                delete_before_replace=True,  # explicit name: create-before-delete cannot work
                replace_with=[self.start_job],  # one run, one unit (module doc)
                # Longer than the Job's own deadline, so a stuck run fails with Kubernetes' reason
                # (DeadlineExceeded) rather than an opaque Pulumi timeout.
                custom_timeouts=pulumi.CustomTimeouts(create=f"{timeout + 60}s", update=f"{timeout + 60}s"),
            ),
        )
        self.register_outputs({"test_id": self.test_id})
