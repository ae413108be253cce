"""The one typed configuration object, read from ``Pulumi.<stack>.yaml``.

Config flows one way: stack YAML -> :class:`StackConfig` -> components (cluster) or local processes
(``make demo``). This module imports no Pulumi so the demo, the report Job and the tests can load a
stack file with pyyaml alone. Every section mirrors one component ("role"); every field's default
is documented, and an unknown key is an error naming it (``extra="forbid"``).
"""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

PROJECT = "loadproof"
REPO_ROOT = Path(__file__).resolve().parent.parent


class Section(BaseModel):
    """camelCase keys in YAML (Pulumi's convention), snake_case in Python; unknown keys rejected.

    Numbers are accepted for text fields because ``pulumi config set --path`` stores integers as
    numbers: ``loadtest.runId 2`` or ``baseline.quotaCpu 8`` must mean "2" and "8".
    """

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True, coerce_numbers_to_str=True
    )


class Resources(Section):
    """Kubernetes requests/limits for one container."""

    cpu_request: str = Field(default="100m", description="CPU request.")
    cpu_limit: str = Field(default="1", description="CPU limit.")
    memory_request: str = Field(default="128Mi", description="Memory request.")
    memory_limit: str = Field(default="512Mi", description="Memory limit.")


class BaselineConfig(Section):
    """Namespace-wide guard rails."""

    quota_cpu: str = Field(default="16", description="ResourceQuota: total CPU requests in the namespace.")
    quota_memory: str = Field(default="32Gi", description="ResourceQuota: total memory requests.")
    quota_pods: int = Field(default=60, description="ResourceQuota: pods.")
    quota_cpu_limits: str = Field(default="40", description="ResourceQuota: total CPU limits (worst-case burst).")
    quota_memory_limits: str = Field(
        default="32Gi", description="ResourceQuota: total memory limits (what the namespace can ever hold)."
    )
    ingress_controller: bool = Field(
        default=False, description="Install ingress-nginx (helm) when the cluster has no ingress controller."
    )
    ingress_namespace: str = Field(
        default="ingress-nginx", description="Namespace of the ingress controller allowed to reach Grafana."
    )
    ingress_pod_selector: dict[str, str] = Field(
        default_factory=dict,
        description="Pod labels of the ingress controller within `ingressNamespace` (both must match); "
        "empty = every pod of that namespace.",
    )
    ingress_node_selector: dict[str, str] = Field(
        default_factory=lambda: {"ingress-ready": "true"},
        description="Node labels the installed ingress-nginx is pinned to, tolerating the control-plane taint "
        "(kind maps ports 80/443 of that node); empty = any node (other clusters).",
    )
    keda_install: bool = Field(
        default=False,
        description="Install KEDA (helm, its CRDs included) for `workers.autoscaling`; false = the cluster already "
        "runs KEDA >= 2.11 (say so with `kedaPreinstalled`) or autoscaling is off.",
    )
    keda_preinstalled: bool = Field(
        default=False,
        description="The cluster already runs KEDA >= 2.11 (its CRDs installed by someone else): with "
        "`workers.autoscaling` on, one of this and `kedaInstall` must be true.",
    )
    keda_namespace: str = Field(
        default="keda", description="Namespace of the KEDA operator, allowed to reach Redis (installed there)."
    )
    keda_operator_pod_selector: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "keda-operator"},
        description="Pod labels of the KEDA operator within `kedaNamespace` (it runs the Redis scaler); "
        "empty = every pod of that namespace.",
    )
    api_server_from_endpoints: bool = Field(
        default=True,
        description="Allow egress to the addresses and ports of the `default/kubernetes` EndpointSlice, "
        "read at deploy time (the API server pods really reach).",
    )
    api_server_cidrs: list[str] = Field(
        default_factory=list,
        description="More CIDRs (ports 443, 6443) pods reach the API server at, where the endpoints are not "
        "what pods reach (e.g. a load balancer in front of the control plane).",
    )
    node_local_dns: str = Field(
        default="", description="Address of a node-local DNS cache pods query (e.g. `169.254.20.10`); empty = none."
    )

    @field_validator("ingress_pod_selector", "ingress_node_selector", "keda_operator_pod_selector", mode="before")
    @classmethod
    def _json_map(cls, value: Any) -> Any:
        """``pulumi config set --path ...NodeSelector '{}'`` stores the text ``{}``: read it as the map it spells."""
        if isinstance(value, str) and value.strip().startswith("{"):
            return json.loads(value)
        return value

    @field_validator("api_server_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr)  # ValueError names the bad one (host bits set, not an address)
        return value

    @field_validator("node_local_dns")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            ipaddress.ip_address(value)
        return value

    @model_validator(mode="after")
    def _api_server_reachable(self) -> BaselineConfig:
        if not self.api_server_from_endpoints and not self.api_server_cidrs:
            raise ValueError(
                "apiServerFromEndpoints is false and apiServerCidrs is empty: "
                "Prometheus and the Jobs could not reach the API server"
            )
        return self


class PostgresConfig(Section):
    """The task store."""

    mode: Literal["internal", "external"] = Field(
        default="internal", description="`internal`: a StatefulSet; `external`: secret `loadproof:databaseUrl`."
    )
    image: str = Field(default="postgres:15-alpine", description="Postgres image (internal mode).")
    storage: str = Field(default="2Gi", description="PVC size (internal mode).")
    storage_class: str = Field(
        default="", description="StorageClass of the PVC (internal mode); empty = the cluster's default class."
    )
    max_connections: int = Field(
        default=640,
        description="Server max_connections; must cover every pool at full scale (checked by the program).",
    )
    resources: Resources = Field(
        default_factory=lambda: Resources(
            cpu_request="250m", cpu_limit="2", memory_request="256Mi", memory_limit="1Gi"
        ),
        description="Container resources.",
    )


class RedisConfig(Section):
    """Cache and durable queue."""

    mode: Literal["internal", "external"] = Field(
        default="internal", description="`internal`: a Deployment; `external`: secret `loadproof:redisUrl`."
    )
    image: str = Field(default="redis:7-alpine", description="Redis image (internal mode).")
    maxmemory: str = Field(default="256mb", description="Redis maxmemory.")
    maxmemory_policy: str = Field(
        default="volatile-lru",
        description="Evict only keys with a TTL (cached posts), never the queue stream, which has none.",
    )
    appendonly: bool = Field(default=True, description="AOF persistence so queued tasks survive a restart.")
    storage: str = Field(default="1Gi", description="PVC size for the AOF (internal mode).")
    storage_class: str = Field(
        default="", description="StorageClass of the AOF PVC (internal mode); empty = the cluster's default class."
    )
    resources: Resources = Field(default_factory=Resources, description="Container resources.")


class SimulatorConfig(Section):
    """The built-in OpenAI-compatible simulator.

    Its latency defaults are approximations of publicly reported gpt-4o-mini speed (time to first
    token, output tokens/s), not measurements of the real API: a run against the simulator proves the
    service, not the provider.
    """

    ttft_ms: float = Field(
        default=350.0, description="Median time to first token (approximates public gpt-4o-mini reports)."
    )
    itl_ms: float = Field(
        default=16.0, description="Inter-token latency, ~60 output tokens/s (approximates public reports)."
    )
    jitter: float = Field(default=0.2, description="Bounded relative jitter.")
    output_tokens: int = Field(default=60, description="Output tokens per post.")
    stream_chunk_tokens: int = Field(
        default=16, description="Output tokens per streamed chunk (real endpoints: ~1; each costs client CPU)."
    )
    concurrency_knee: int = Field(default=256, description="Concurrent calls beyond which latency grows.")
    rpm: int = Field(default=0, ge=0, description="Requests per minute admitted before 429 (0 = unlimited).")
    tpm: int = Field(
        default=0, ge=0, description="Tokens per minute (prompt + max_tokens) admitted before 429 (0 = unlimited)."
    )
    rate429: float = Field(default=0.0, description="Injected 429 rate.")
    rate500: float = Field(default=0.0, description="Injected 500 rate.")
    rate_timeout: float = Field(default=0.0, description="Injected timeout rate.")
    rate_malformed: float = Field(
        default=0.0, description="Injected rate of malformed batch items (exercises per-item retry)."
    )
    replicas: int = Field(default=1, description="Simulator pods.")
    resources: Resources = Field(default_factory=Resources, description="Container resources.")


class LlmConfig(Section):
    """The LLM backend and its prices."""

    mode: Literal["simulator", "external"] = Field(
        default="simulator", description="`external`: `baseUrl` with secret `loadproof:llmApiKey`."
    )
    base_url: str = Field(default="", description="OpenAI-compatible base URL (external mode), e.g. .../v1.")
    model: str = Field(default="gpt-4o-mini", description="Model name, also the price-table key.")
    max_tokens: int = Field(default=400, description="Output token cap per item.")
    timeout_s: float = Field(default=30.0, description="Timeout of one call.")
    http_client: Literal["lean", "httpx"] = Field(
        default="lean", description="HTTP transport under the openai SDK: lean (asyncio + httptools) or httpx."
    )
    max_retries: int = Field(default=4, description="Retries within the deadline.")
    deadline_s: float = Field(default=90.0, description="Total time budget of one call including its retries.")
    breaker_failures: int = Field(default=10, description="Consecutive LLM failures that open the circuit breaker.")
    breaker_reset_s: float = Field(default=10.0, description="How long the open LLM breaker fails fast.")
    limiter: Literal["adaptive", "fixed"] = Field(
        default="adaptive",
        description="`adaptive`: the concurrency limit follows latency and 429s up to `workers.concurrency`; "
        "`fixed`: it stays there.",
    )
    concurrency_initial: int = Field(default=16, ge=1, description="Starting limit of the adaptive limiter.")
    rpm: int = Field(
        default=0,
        ge=0,
        description="Requests per minute per worker process (its share of the provider's budget); 0 = unlimited.",
    )
    tpm: int = Field(
        default=0,
        ge=0,
        description="Tokens per minute per worker process (prompt + max_tokens per call); 0 = unlimited.",
    )
    prices: dict[str, str] = Field(
        default_factory=dict,
        description="Price overrides: model -> `input/output` USD per 1M tokens (e.g. `0.15/0.60`).",
    )
    simulator: SimulatorConfig = Field(
        default_factory=SimulatorConfig,
        description="Simulator settings; latency defaults approximate public gpt-4o-mini reports (not measurements).",
    )


class AutoscaleConfig(Section):
    """HorizontalPodAutoscaler (autoscaling/v2) on CPU."""

    min_replicas: int = Field(default=2, description="HPA floor.")
    max_replicas: int = Field(default=6, description="HPA ceiling.")
    cpu_utilization: int = Field(default=70, description="Target average CPU utilization, percent.")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleConfig:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= minReplicas ({self.min_replicas}) <= maxReplicas ({self.max_replicas})")
        return self


class OrchestratorConfig(Section):
    """The FastAPI service: pooling, cache, coalescing, admission control."""

    replicas: int = Field(default=2, description="API pods (HPA takes over from here).")
    processes: int = Field(default=1, description="uvicorn workers per pod / local API processes.")
    max_inflight: int = Field(
        default=256, description="In-flight requests per process before 503 (sheds load before queueing seconds)."
    )
    overload_lag_ms: float = Field(
        default=10.0,
        description="Event-loop lag target per process before a growing share of requests gets 503 (0 = off).",
    )
    overload_latency_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Lag shedding refuses only while the served p95 (per process, per window) is above this share "
        "of `loadtest.thresholds.p95Ms` (0 = lag alone).",
    )
    overload_queue_ms: float = Field(
        default=100.0, description="Longest wait for a request's first event-loop turn before it gets 503 (0 = off)."
    )
    overload_interval_ms: float = Field(
        default=100.0, description="Window whose smallest loop lag decides whether the shed share grows or shrinks."
    )
    overload_slow_inflight: int = Field(
        default=0,
        description="In-flight limit per process while served requests are slow (see overloadSlowMs; 0 = off: "
        "32 made the demo answer 12.6 % 503s).",
    )
    overload_slow_ms: float = Field(
        default=30.0, description="Moving average latency of served requests above which overloadSlowInflight applies."
    )
    overload_signal_ttl_ms: float = Field(
        default=0.0,
        description="How long one POST shed for overload keeps the workers yielding (0 = never signal: with "
        "clients polling for their tasks, yielding kept an overload going after it ended).",
    )
    max_body_bytes: int = Field(default=8192, description="Largest request body before 413.")
    db_pool_mode: Literal["queue", "null"] = Field(default="queue", description="`null` = no pooling (baseline).")
    db_pool_size: int = Field(default=20, description="Pooled connections per process.")
    db_max_overflow: int = Field(default=40, description="Overflow connections per process.")
    db_pool_timeout_s: float = Field(default=5.0, description="Connection acquire timeout.")
    db_pool_recycle_s: int = Field(default=3600, description="Connection max age.")
    cache_enabled: bool = Field(default=True, description="Redis response cache (off = baseline).")
    cache_ttl_s: int = Field(default=3600, description="Cached post lifetime.")
    cache_lookup_batching: bool = Field(
        default=True, description="Concurrent lookups share MGETs, one in flight per process (off = baseline)."
    )
    cache_local_ttl_s: float = Field(
        default=5.0, description="Seconds a process keeps a post read from Redis in its own memory (0 = off)."
    )
    cache_local_max_entries: int = Field(default=10000, description="Posts kept in a process's own memory at most.")
    coalesce_enabled: bool = Field(default=True, description="Join identical in-flight requests (off = baseline).")
    accept_group_commit: bool = Field(
        default=True, description="New tasks written in groups: one INSERT + one XADD script call (off = baseline)."
    )
    accept_linger_ms: float = Field(default=2.0, description="Longest wait to gather new tasks into one commit.")
    accept_batch_max: int = Field(default=256, description="Largest group of new tasks per commit.")
    accept_max_writes: int = Field(
        default=1,
        description="Group INSERTs in flight per process; what arrives meanwhile gathers into the next group "
        "(1: groups grow with the load instead of the concurrent writes).",
    )
    prompt_version: str = Field(default="v1", description="Cache-key version.")
    shutdown_timeout_s: float = Field(default=20.0, description="Drain bound; the pod grace period exceeds it.")
    autoscale: AutoscaleConfig = Field(default_factory=AutoscaleConfig, description="HPA.")
    resources: Resources = Field(
        default_factory=lambda: Resources(
            cpu_request="500m", cpu_limit="2", memory_request="256Mi", memory_limit="1Gi"
        ),
        description="Container resources.",
    )

    @model_validator(mode="after")
    def _replicas_within_autoscale(self) -> OrchestratorConfig:
        a = self.autoscale
        if not a.min_replicas <= self.replicas <= a.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must lie within autoscale.minReplicas..maxReplicas "
                f"({a.min_replicas}..{a.max_replicas}): the HPA would override it at once"
            )
        return self


class WorkersAutoscalingConfig(Section):
    """KEDA ``ScaledObject`` on the task queue: worker pods follow the work waiting, not their CPU.

    The trigger is ``redis-streams`` with the consumer group's lag (entries not yet delivered to any
    worker; KEDA >= 2.11, Redis >= 7): CPU says nothing about an I/O-bound worker waiting on the LLM,
    while lag grows exactly when every worker is saturated.
    """

    enabled: bool = Field(default=False, description="Scale the workers with KEDA (off = `workers.replicas` pods).")
    min_replicas: int = Field(
        default=1, description="Fewest worker pods; at least 1: the workers also run the queue's sweeper."
    )
    max_replicas: int = Field(
        default=6, description="Most worker pods; Postgres `maxConnections` and the quota must cover them."
    )
    lag_threshold: int = Field(
        default=320,
        description="Target undelivered entries per worker pod (KEDA `lagCount`); default = 64 batches of 5, "
        "a quarter of what one pod may have in flight at its upper bound (concurrency 256).",
    )
    polling_interval_s: int = Field(default=15, description="How often KEDA checks the trigger (`pollingInterval`).")
    scale_down_stabilization_s: int = Field(
        default=300,
        description="Scale down only to the highest replica count recommended within this window (HPA behavior; "
        "also rides over moments when Redis cannot state the lag).",
    )

    @model_validator(mode="after")
    def _bounds(self) -> WorkersAutoscalingConfig:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"need 1 <= minReplicas ({self.min_replicas}) <= maxReplicas ({self.max_replicas})")
        if self.lag_threshold < 1 or self.polling_interval_s < 1:
            raise ValueError("lagThreshold and pollingIntervalS must be at least 1")
        if not 0 <= self.scale_down_stabilization_s <= 3600:
            raise ValueError(f"scaleDownStabilizationS ({self.scale_down_stabilization_s}) must lie within 0..3600")
        return self


class WorkersConfig(Section):
    """The persona runtime: batched LLM workers."""

    replicas: int = Field(default=2, description="Worker pods (with `autoscaling` on: the count KEDA starts from).")
    processes: int = Field(default=1, description="Local worker processes (demo).")
    nice: int = Field(
        default=10,
        ge=0,
        le=19,
        description="CPU priority (nice) of local worker processes: on one machine the request path "
        "gets the cores first and the workers catch up on the backlog (the cluster gives pods their own CPU).",
    )
    concurrency: int = Field(
        default=256, description="Upper bound of the adaptive limit of concurrent LLM calls per worker process."
    )
    pressure_batches: int = Field(
        default=1,
        description="Batches in flight per worker process while the API sheds for overload (background work yields).",
    )
    batch_size: int = Field(default=5, description="Tasks per LLM call; 1 = no batching (baseline).")
    batch_wait_ms: int = Field(
        default=100, description="Cap on the wait to fill a batch; it waits only while arrivals fill it in time."
    )
    max_attempts: int = Field(default=3, description="Deliveries before dead-lettering.")
    claim_idle_ms: int = Field(default=30000, description="Reclaim entries idle this long from dead consumers.")
    autoscaling: WorkersAutoscalingConfig = Field(
        default_factory=WorkersAutoscalingConfig, description="Queue-driven scaling (KEDA)."
    )
    resources: Resources = Field(default_factory=Resources, description="Container resources.")

    @model_validator(mode="after")
    def _replicas_within_autoscaling(self) -> WorkersConfig:
        a = self.autoscaling
        if a.enabled and not a.min_replicas <= self.replicas <= a.max_replicas:
            raise ValueError(
                f"replicas ({self.replicas}) must lie within autoscaling.minReplicas..maxReplicas "
                f"({a.min_replicas}..{a.max_replicas}): KEDA would override it at once"
            )
        return self

    @property
    def peak_replicas(self) -> int:
        """The most worker pods there can be outside a rollout: KEDA's ceiling, or the fixed count."""
        return self.autoscaling.max_replicas if self.autoscaling.enabled else self.replicas


# A Kubernetes object name (RFC 1123 subdomain).
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class GrafanaConfig(Section):
    """Grafana, its Ingress and hardening.

    ``tls`` needs a certificate: ``certIssuer`` (cert-manager issues it into ``tlsSecret``, default
    ``grafana-tls``) or ``tlsSecret`` alone (a ``kubernetes.io/tls`` Secret you create in the namespace).
    Both are ignored while ``tls`` is off.
    """

    image: str = Field(default="grafana/grafana:11.6.0", description="Grafana image.")
    host: str = Field(default="grafana.loadproof.local", description="Ingress host of the public URL.")
    ingress_class: str = Field(default="nginx", description="IngressClass name.")
    tls: bool = Field(
        default=False,
        description="Serve the public URL over https (secure cookies and HSTS on); needs certIssuer or tlsSecret.",
    )
    cert_issuer: str = Field(
        default="", description="cert-manager ClusterIssuer that issues the certificate; empty = none."
    )
    tls_secret: str = Field(
        default="",
        description="TLS Secret of the Ingress: yours (kubernetes.io/tls, in the namespace), or where certIssuer "
        "writes; empty = `grafana-tls`.",
    )
    anonymous_viewing: bool = Field(
        default=False,
        description="Anonymous Viewer on the public URL: anyone reaching it reads the dashboards and can run "
        "any PromQL (/api/ds/query); off = admin login only (docs/observability.md).",
    )
    resources: Resources = Field(default_factory=Resources, description="Container resources.")

    @field_validator("tls_secret")
    @classmethod
    def _secret_name(cls, value: str) -> str:
        if value and (len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value)):
            raise ValueError(f"tlsSecret {value!r} is not a Kubernetes object name (lowercase RFC 1123 subdomain)")
        return value

    @model_validator(mode="after")
    def _tls_has_a_certificate(self) -> GrafanaConfig:
        if self.tls and not (self.cert_issuer or self.tls_secret):
            raise ValueError(
                "tls is true but neither certIssuer nor tlsSecret is set: the Ingress would have no certificate"
            )
        return self


class PrometheusConfig(Section):
    """Prometheus: scrapes the service, receives k6 remote write."""

    image: str = Field(default="prom/prometheus:v2.53.0", description="Prometheus image.")
    retention: str = Field(default="7d", description="TSDB retention.")
    storage: str = Field(default="5Gi", description="PVC size.")
    storage_class: str = Field(default="", description="StorageClass of the PVC; empty = the cluster's default class.")
    scrape_interval_s: int = Field(default=5, description="Scrape interval, seconds.")
    port: int = Field(default=9090, description="Port (local demo binds it on 127.0.0.1).")
    resources: Resources = Field(
        default_factory=lambda: Resources(
            cpu_request="250m", cpu_limit="2", memory_request="512Mi", memory_limit="2Gi"
        ),
        description="Container resources.",
    )


class MonitoringConfig(Section):
    """Observability stack."""

    prometheus: PrometheusConfig = Field(default_factory=PrometheusConfig, description="Prometheus.")
    grafana: GrafanaConfig = Field(default_factory=GrafanaConfig, description="Grafana.")


class Stage(Section):
    """One ramping-arrival-rate stage."""

    duration: str = Field(description="k6 duration, e.g. `30s`, `2m`.")
    target: int = Field(description="Arrival rate (requests/s) reached at the end of the stage.")


class ProfileConfig(Section):
    """One load profile (open model)."""

    start_rate: int = Field(default=10, description="Arrival rate at t=0.")
    warmup_s: int = Field(default=10, description="Seconds at the start excluded from the measured window.")
    stages: list[Stage] = Field(description="Ramp stages.")
    pre_allocated_vus: int = Field(default=200, description="VUs k6 allocates up front.")
    max_vus: int = Field(default=2000, description="VU ceiling; exceeding it drops iterations (reported).")
    new_topics: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Fraction of requests with a never-seen topic (1 = cold: every request is a new task).",
    )
    flow: bool = Field(
        default=False,
        description="Client flow: each arrival POSTs /task, then polls GET /task/{id} until done/failed "
        "(time to post); false = POST only.",
    )
    poll_ms: int = Field(default=250, ge=10, description="Flow: interval between polls of GET /task/{id}.")
    flow_timeout_s: float = Field(
        default=30.0, gt=0, description="Flow: a flow not done within this many seconds counts as failed."
    )
    drain_s: int | None = Field(
        default=None,
        ge=0,
        description="Longest wait after this profile's run for queued tasks to finish (unset: loadtest.drainS).",
    )

    @model_validator(mode="after")
    def _flow_vus(self) -> ProfileConfig:
        """An open model needs a VU per flow in progress: rate x longest flow (the timeout) must fit maxVus.

        Otherwise a slow service would show up as dropped iterations instead of timed-out flows.
        """
        if self.flow:
            peak = max([self.start_rate, *(s.target for s in self.stages)])
            need = peak * self.flow_timeout_s
            if self.max_vus < need:
                raise ValueError(
                    f"flow profile: maxVus ({self.max_vus}) must cover the peak rate ({peak}/s) x flowTimeoutS "
                    f"({self.flow_timeout_s:g} s) = {need:g} flows in progress"
                )
        return self


class WorkloadConfig(Section):
    """Key distribution of the generated requests."""

    personas: int = Field(default=20, description="Distinct persona ids.")
    topics: int = Field(default=1000, description="Distinct topics.")
    zipf_s: float = Field(default=1.1, description="Zipf exponent for both draws (higher = hotter keys).")
    seed: int = Field(default=42, description="PRNG seed so runs are comparable.")


class ThresholdsConfig(Section):
    """Pass/fail targets (the seed's)."""

    p95_ms: float = Field(default=400.0, description="Client p95 latency target.")
    error_rate: float = Field(default=0.01, description="Failed request fraction target.")
    cost_per_1k_tokens_usd: float = Field(
        default=0.008, alias="costPer1kTokensUsd", description="Effective LLM cost per 1k delivered tokens."
    )
    time_to_post_p95_ms: float = Field(
        default=2500.0,
        description="Flow profiles: p95 from just before POST /task to the poll that saw the post done.",
    )


def _default_profiles() -> dict[str, ProfileConfig]:
    step = ProfileConfig(
        start_rate=100,
        warmup_s=10,
        pre_allocated_vus=1000,
        stages=[
            Stage(duration="20s", target=100),
            Stage(duration="0s", target=1000),
            Stage(duration="40s", target=1000),
        ],
    )
    return {
        "smoke": ProfileConfig(
            start_rate=10,
            warmup_s=5,
            pre_allocated_vus=20,
            max_vus=200,
            stages=[Stage(duration="10s", target=50), Stage(duration="20s", target=50)],
        ),
        "demo": ProfileConfig(
            start_rate=20,
            warmup_s=15,
            # 0.8 s of the peak's arrivals in flight allocated up front: a latency spike is absorbed by idle
            # VUs instead of dropping arrivals while k6 initialises new ones (on CPU the service needs).
            pre_allocated_vus=800,
            # A 40 s plateau at the peak: the figures "at 1000/s" are measured while 1000/s is offered.
            stages=[
                Stage(duration="20s", target=100),
                Stage(duration="20s", target=500),
                Stage(duration="20s", target=1000),
                Stage(duration="40s", target=1000),
                Stage(duration="10s", target=0),
            ],
        ),
        # Where the cache cannot help: after a short warm-up, every request is a new task.
        "cold": ProfileConfig(
            start_rate=50,
            warmup_s=10,
            new_topics=1.0,
            # A second of arrivals in flight allocated up front: with 400, k6 dropped 109-1996 iterations
            # while it initialised VUs on the saturated box; with 1000, none (PERFORMANCE.md).
            pre_allocated_vus=1000,
            stages=[Stage(duration="10s", target=1000), Stage(duration="60s", target=1000)],
            # ~65k new tasks; the simulated provider completes ~250 tasks/s (256 calls in flight of 5 posts,
            # ~5 s each), so the backlog needs ~4-5 min: a shorter bound could not show its drain time.
            drain_s=420,
        ),
        # Real traffic arrives in steps (a launch, a cron, a client's retry storm): a light load, then the
        # target rate at once (a 0 s stage), held. Admission must not refuse what it can serve in time.
        "step": step,
        # The same step where the cache cannot help: every request a new task (row, queue entry, LLM work).
        "step-cold": step.model_copy(update={"new_topics": 1.0, "drain_s": 420}, deep=True),
        # The client's view of the asynchronous work: new tasks at a constant rate, each polled until done.
        "flow": ProfileConfig(
            start_rate=20,
            warmup_s=10,
            new_topics=1.0,
            flow=True,
            # 10 s of flows at 20/s (4x the time-to-post target) allocated up front, so a slower service shows
            # as slower flows rather than as dropped arrivals while k6 adds VUs; the ceiling covers every flow
            # running to its timeout.
            pre_allocated_vus=200,
            max_vus=800,
            stages=[Stage(duration="60s", target=20)],
        ),
        "seed": ProfileConfig(
            start_rate=10,
            warmup_s=60,
            stages=[
                Stage(duration="1m", target=100),
                Stage(duration="2m", target=500),
                Stage(duration="5m", target=1000),
                Stage(duration="2m", target=0),
            ],
        ),
    }


class LoadtestConfig(Section):
    """The k6 run and its measurement."""

    image: str = Field(default="grafana/k6:1.1.0", description="k6 runner image (cluster).")
    run_id: str = Field(default="1", description="Change to re-run the test on the next `pulumi up`.")
    runners: int = Field(default=2, description="Parallel k6 pods (execution segments).")
    profile: str = Field(default="demo", description="Profile used by `pulumi up` and `make demo`.")
    profiles: dict[str, ProfileConfig] = Field(default_factory=_default_profiles, description="Profiles.")
    workload: WorkloadConfig = Field(default_factory=WorkloadConfig, description="Key distribution.")
    thresholds: ThresholdsConfig = Field(default_factory=ThresholdsConfig, description="Targets.")
    drain_s: int = Field(default=60, description="Longest wait after the run for queued tasks to finish.")
    gogc: int = Field(
        default=400,
        ge=25,
        description="Go GC target of each k6 process (GOGC; Go's default is 100): fewer collections for more "
        "memory. On the 2-core demo box k6 shares the cores with the service; at 1000 new tasks/s 400 took "
        "its CPU from ~57 % to ~49 % of a core (PERFORMANCE.md). Cluster runners also get GOMEMLIMIT at 90 % "
        "of their memory limit, so the heap stays inside the pod.",
    )
    runner_resources: Resources = Field(
        default_factory=lambda: Resources(
            cpu_request="500m", cpu_limit="2", memory_request="256Mi", memory_limit="1Gi"
        ),
        description="Each k6 pod's resources.",
    )

    @model_validator(mode="after")
    def _profile_exists(self) -> LoadtestConfig:
        if self.profile not in self.profiles:
            raise ValueError(f"loadtest.profile {self.profile!r} is not one of {sorted(self.profiles)}")
        return self

    def drain_for(self, profile: str) -> int:
        """The drain bound of ``profile``: its own ``drainS`` if set, else the section's."""
        own = self.profiles[profile].drain_s
        return self.drain_s if own is None else own


class StackConfig(Section):
    """Everything under the `loadproof:` namespace of one stack file."""

    namespace: str = Field(default="loadproof", description="Kubernetes namespace for everything.")
    kube_context: str = Field(
        default="",
        description="kubeconfig context of the one Kubernetes provider every resource uses (`pulumi up` and "
        "`destroy` go there whatever context is current); empty = the kubeconfig's current context.",
    )
    image: str = Field(default="loadproof:dev", description="Service image (orchestrator, workers, simulator, report).")
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        default="IfNotPresent", description="Pull policy; `IfNotPresent` suits images loaded into kind/k3d."
    )
    baseline: BaselineConfig = Field(default_factory=BaselineConfig, description="Cluster baseline.")
    postgres: PostgresConfig = Field(default_factory=PostgresConfig, description="Postgres.")
    redis: RedisConfig = Field(default_factory=RedisConfig, description="Redis.")
    llm: LlmConfig = Field(default_factory=LlmConfig, description="LLM backend.")
    orchestrator: OrchestratorConfig = Field(default_factory=OrchestratorConfig, description="API.")
    workers: WorkersConfig = Field(default_factory=WorkersConfig, description="Workers.")
    monitoring: MonitoringConfig = Field(default_factory=MonitoringConfig, description="Monitoring.")
    loadtest: LoadtestConfig = Field(default_factory=LoadtestConfig, description="Load test.")

    @model_validator(mode="after")
    def _autoscaling_reads_internal_redis(self) -> StackConfig:
        if self.workers.autoscaling.enabled and self.redis.mode != "internal":
            raise ValueError(
                "workers.autoscaling needs redis.mode internal: KEDA's Redis scaler takes an address and a "
                "password, which only the internal Redis publishes (an external one is a single URL secret)"
            )
        return self

    @model_validator(mode="after")
    def _autoscaling_has_keda(self) -> StackConfig:
        """KEDA's CRDs must come from somewhere: otherwise the ScaledObject fails at update ("no matches for kind")."""
        b = self.baseline
        if self.workers.autoscaling.enabled and not (b.keda_install or b.keda_preinstalled):
            raise ValueError(
                "workers.autoscaling.enabled needs KEDA: set baseline.kedaInstall true (this stack installs it) "
                "or baseline.kedaPreinstalled true (the cluster already runs KEDA >= 2.11)"
            )
        if b.keda_install and b.keda_preinstalled:
            raise ValueError("baseline.kedaInstall and baseline.kedaPreinstalled are both true: choose one")
        return self

    def service_env(self) -> dict[str, str]:
        """``LOADPROOF_*`` variables for the service processes (see ``service/config.py``).

        Connection URLs and secrets are not here: the caller knows where Postgres, Redis and the
        LLM live (local ports or cluster Services and Secrets).
        """
        o, w, llm = self.orchestrator, self.workers, self.llm
        env: dict[str, Any] = {
            "PROCESSES": o.processes,
            "MAX_INFLIGHT": o.max_inflight,
            "OVERLOAD_LAG_MS": o.overload_lag_ms,
            "OVERLOAD_LATENCY_MS": o.overload_latency_share * self.loadtest.thresholds.p95_ms,
            "OVERLOAD_QUEUE_MS": o.overload_queue_ms,
            "OVERLOAD_INTERVAL_MS": o.overload_interval_ms,
            "OVERLOAD_SLOW_INFLIGHT": o.overload_slow_inflight,
            "OVERLOAD_SLOW_MS": o.overload_slow_ms,
            "OVERLOAD_SIGNAL_TTL_MS": o.overload_signal_ttl_ms,
            "MAX_BODY_BYTES": o.max_body_bytes,
            "SHUTDOWN_TIMEOUT_S": o.shutdown_timeout_s,
            "DB_POOL_MODE": o.db_pool_mode,
            "DB_POOL_SIZE": o.db_pool_size,
            "DB_MAX_OVERFLOW": o.db_max_overflow,
            "DB_POOL_TIMEOUT_S": o.db_pool_timeout_s,
            "DB_POOL_RECYCLE_S": o.db_pool_recycle_s,
            "CACHE_ENABLED": o.cache_enabled,
            "CACHE_TTL_S": o.cache_ttl_s,
            "CACHE_LOOKUP_BATCHING": o.cache_lookup_batching,
            "CACHE_LOCAL_TTL_S": o.cache_local_ttl_s,
            "CACHE_LOCAL_MAX_ENTRIES": o.cache_local_max_entries,
            "COALESCE_ENABLED": o.coalesce_enabled,
            "ACCEPT_GROUP_COMMIT": o.accept_group_commit,
            "ACCEPT_LINGER_MS": o.accept_linger_ms,
            "ACCEPT_BATCH_MAX": o.accept_batch_max,
            "ACCEPT_MAX_WRITES": o.accept_max_writes,
            "PROMPT_VERSION": o.prompt_version,
            "WORKER_CONCURRENCY": w.concurrency,
            "WORKER_PRESSURE_BATCHES": w.pressure_batches,
            "BATCH_SIZE": w.batch_size,
            "BATCH_WAIT_MS": w.batch_wait_ms,
            "QUEUE_MAX_ATTEMPTS": w.max_attempts,
            "QUEUE_CLAIM_IDLE_MS": w.claim_idle_ms,
            "LLM_MODEL": llm.model,
            "LLM_MAX_TOKENS": llm.max_tokens,
            "LLM_TIMEOUT_S": llm.timeout_s,
            "LLM_HTTP_CLIENT": llm.http_client,
            "LLM_MAX_RETRIES": llm.max_retries,
            "LLM_DEADLINE_S": llm.deadline_s,
            "LLM_BREAKER_FAILURES": llm.breaker_failures,
            "LLM_BREAKER_RESET_S": llm.breaker_reset_s,
            "LLM_LIMITER": llm.limiter,
            "LLM_CONCURRENCY_INITIAL": llm.concurrency_initial,
            "LLM_RPM": llm.rpm,
            "LLM_TPM": llm.tpm,
            "LLM_PRICES": ",".join(f"{m}={p}" for m, p in sorted(llm.prices.items())),
        }
        return {f"LOADPROOF_{k}": _env_str(v) for k, v in env.items()}

    def simulator_env(self) -> dict[str, str]:
        """``LOADPROOF_SIM_*`` variables for the simulator process."""
        s = self.llm.simulator
        env = {
            "SIM_TTFT_MS": s.ttft_ms,
            "SIM_ITL_MS": s.itl_ms,
            "SIM_JITTER": s.jitter,
            "SIM_OUTPUT_TOKENS": s.output_tokens,
            "SIM_STREAM_CHUNK_TOKENS": s.stream_chunk_tokens,
            "SIM_CONCURRENCY_KNEE": s.concurrency_knee,
            "SIM_RPM": s.rpm,
            "SIM_TPM": s.tpm,
            "SIM_RATE_429": s.rate429,
            "SIM_RATE_500": s.rate500,
            "SIM_RATE_TIMEOUT": s.rate_timeout,
            "SIM_RATE_MALFORMED": s.rate_malformed,
        }
        return {f"LOADPROOF_{k}": _env_str(v) for k, v in env.items()}


def _env_str(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class StackConfigError(ValueError):
    """A stack file that does not match the schema; the message names the offending key."""


# Keys Pulumi itself or a secret provider owns: allowed in a stack file, not part of the schema.
SECRET_KEYS = frozenset({"databaseUrl", "redisUrl", "llmApiKey"})


def stack_file(stack: str, root: Path = REPO_ROOT) -> Path:
    return root / f"Pulumi.{stack}.yaml"


def parse(values: dict[str, Any]) -> StackConfig:
    """Validate the ``loadproof:*`` values (prefix already stripped)."""
    plain = {k: v for k, v in values.items() if k not in SECRET_KEYS}
    try:
        return StackConfig.model_validate(plain)
    except ValidationError as exc:
        problems = "; ".join(
            f"loadproof:{'.'.join(str(p) for p in err['loc']) or '(stack)'}: {err['msg']}" for err in exc.errors()
        )
        raise StackConfigError(problems) from exc


def load(stack: str = "dev", root: Path = REPO_ROOT) -> StackConfig:
    """Read ``Pulumi.<stack>.yaml`` the way Pulumi would, without Pulumi."""
    path = stack_file(stack, root)
    doc = yaml.safe_load(path.read_text()) or {}
    raw: dict[str, Any] = doc.get("config") or {}
    values: dict[str, Any] = {}
    for key, value in raw.items():
        ns, _, name = key.partition(":")
        if ns != PROJECT:
            continue  # other providers' keys, e.g. kubernetes:context
        values[name] = value
    return parse(values)
