"""Prometheus configuration for the local demo and the cluster, from one place.

Pure Python (no Pulumi): ``make demo`` writes :func:`local_config` to a file, the cluster component
puts :func:`kubernetes_config` and :func:`rules` into a ConfigMap. Remote-write receiving (k6 pushes
its samples) and native histograms (k6 trends) are command-line flags, not configuration, hence
:data:`PROMETHEUS_FLAGS` for both paths.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from common import queries as q
from common.stackconfig import ThresholdsConfig
from common.tools import tool

PROMETHEUS_FLAGS = ["--web.enable-remote-write-receiver", "--enable-feature=native-histograms"]
RULES_FILE = "loadproof-rules.yml"
LOCAL_JOBS = ("orchestrator", "workers", "simulator")
# Pod annotations the cluster scrape honours (the de-facto convention).
SCRAPE_ANNOTATION = "prometheus.io/scrape"
PORT_ANNOTATION = "prometheus.io/port"
PATH_ANNOTATION = "prometheus.io/path"
JOB_POD_LABEL = "app.kubernetes.io/component"

_JOB_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_-]*$")
_TARGET = re.compile(r"^(?:\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$")


class PromtoolError(RuntimeError):
    """promtool rejected a config or rules file; the message is promtool's own output."""


def _global(scrape_interval_s: int) -> dict[str, Any]:
    if scrape_interval_s < 1:
        raise ValueError(f"scrape_interval_s must be >= 1, got {scrape_interval_s}")
    interval = f"{scrape_interval_s}s"
    # Timeout = interval: a slow /metrics shows up as a failed scrape (`up`), not a pile-up.
    return {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval}


def local_config(
    scrape_targets: dict[str, list[str]], scrape_interval_s: int, *, rule_files: list[str] | None = None
) -> dict[str, Any]:
    """Static scrape config for processes on this machine: job name -> ``host:port`` targets.

    Job names are the component words (``orchestrator``, ``workers``, ``simulator``) so the ``job``
    label reads the same locally and in the cluster (where it comes from the component pod label).
    """
    if not scrape_targets:
        raise ValueError("no scrape targets")
    scrape_configs: list[dict[str, Any]] = []
    for job, targets in scrape_targets.items():
        if not _JOB_NAME.match(job):
            raise ValueError(f"invalid job name {job!r}")
        if not targets:
            raise ValueError(f"job {job!r} has no targets")
        for target in targets:
            if not _TARGET.match(target):
                raise ValueError(f"job {job!r}: target {target!r} is not host:port")
        scrape_configs.append(
            {"job_name": job, "metrics_path": "/metrics", "static_configs": [{"targets": list(targets)}]}
        )
    cfg: dict[str, Any] = {"global": _global(scrape_interval_s)}
    if rule_files:
        cfg["rule_files"] = list(rule_files)
    cfg["scrape_configs"] = scrape_configs
    return cfg


def _meta(annotation_or_label: str, kind: str) -> str:
    """``prometheus.io/scrape`` -> ``__meta_kubernetes_pod_annotation_prometheus_io_scrape``."""
    return f"__meta_kubernetes_pod_{kind}_" + re.sub(r"[^a-zA-Z0-9_]", "_", annotation_or_label)


def kubernetes_config(namespace: str, scrape_interval_s: int, *, rule_files: list[str] | None = None) -> dict[str, Any]:
    """Pod discovery in one namespace; scrapes only pods that opt in by annotation.

    ``job`` comes from the pod label ``app.kubernetes.io/component`` and ``pod`` from the pod name,
    so several replicas of one component are one job with distinct ``pod`` labels. Finished pods
    (k6 runners, the report Job) are dropped: their IPs may already belong to someone else.
    """
    if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", namespace):
        raise ValueError(f"invalid namespace {namespace!r}")
    port = _meta(PORT_ANNOTATION, "annotation")
    relabel: list[dict[str, Any]] = [
        {"source_labels": [_meta(SCRAPE_ANNOTATION, "annotation")], "action": "keep", "regex": "true"},
        {"source_labels": ["__meta_kubernetes_pod_phase"], "action": "drop", "regex": "Succeeded|Failed"},
        {
            "source_labels": [_meta(PATH_ANNOTATION, "annotation")],
            "action": "replace",
            "regex": "(.+)",
            "target_label": "__metrics_path__",
        },
        # Pod IP + annotated port; IPv6 addresses need brackets.
        {
            "source_labels": ["__meta_kubernetes_pod_ip", port],
            "action": "replace",
            "regex": r"([^:]+);(\d+)",
            "replacement": "$1:$2",
            "target_label": "__address__",
        },
        {
            "source_labels": ["__meta_kubernetes_pod_ip", port],
            "action": "replace",
            "regex": r"(.*:.*);(\d+)",
            "replacement": "[$1]:$2",
            "target_label": "__address__",
        },
        {
            "source_labels": [_meta(JOB_POD_LABEL, "label")],
            "action": "replace",
            "regex": "(.+)",
            "target_label": "job",
        },
        {"source_labels": ["__meta_kubernetes_pod_name"], "action": "replace", "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_namespace"], "action": "replace", "target_label": "namespace"},
    ]
    cfg: dict[str, Any] = {"global": _global(scrape_interval_s)}
    if rule_files:
        cfg["rule_files"] = list(rule_files)
    cfg["scrape_configs"] = [
        {
            "job_name": "loadproof-pods",
            "kubernetes_sd_configs": [{"role": "pod", "namespaces": {"names": [namespace]}}],
            "relabel_configs": relabel,
        }
    ]
    return cfg


def rules(thresholds: ThresholdsConfig | None = None) -> dict[str, Any]:
    """Recording rules for the server-side headline numbers and alerts at the stack's targets.

    Server-side only: k6 series exist only while a test runs and are judged per run by the report.
    Alerts are visible in Prometheus/Grafana; no Alertmanager is deployed.
    """
    t = thresholds or ThresholdsConfig.model_validate({})
    w = "1m"
    record = {
        "loadproof:server_p95_latency_ms:1m": q.server_p95_latency_ms(w),
        "loadproof:server_qps:1m": q.server_qps(w),
        "loadproof:server_error_rate:1m": q.server_error_rate(w),
        "loadproof:cache_hit_ratio:1m": q.cache_hit_ratio(w),
        "loadproof:completion_p95_ms:1m": q.completion_p95_ms(w),
    }
    cost = q.llm_cost_per_1k_tokens_usd("10m")
    alerts = [
        {
            "alert": "LoadproofServerP95AboveTarget",
            "expr": f"{q.server_p95_latency_ms('5m')} > {t.p95_ms:g}",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": f"Server p95 of POST /task above {t.p95_ms:g} ms for 5 minutes."},
        },
        {
            "alert": "LoadproofServerErrorRateAboveTarget",
            "expr": f"{q.server_error_rate('5m')} > {t.error_rate:g}",
            "for": "5m",
            "labels": {"severity": "warning"},
            "annotations": {"summary": f"More than {t.error_rate:.2%} of POST /task answered 5xx for 5 minutes."},
        },
        {
            "alert": "LoadproofCostPer1kTokensAboveTarget",
            "expr": f"{cost} > {t.cost_per_1k_tokens_usd:g}",
            "for": "10m",
            "labels": {"severity": "warning"},
            "annotations": {
                "summary": f"Effective LLM cost above ${t.cost_per_1k_tokens_usd:g} per 1k delivered tokens."
            },
        },
        {
            "alert": "LoadproofTasksDeadLettered",
            "expr": f"({q.tasks_total('dead_lettered', '5m')}) > 0",
            "labels": {"severity": "warning"},
            "annotations": {"summary": "Tasks were dead-lettered after exhausting their attempts."},
        },
    ]
    return {
        "groups": [
            {"name": "loadproof-recording", "rules": [{"record": k, "expr": v} for k, v in record.items()]},
            {"name": "loadproof-alerts", "rules": alerts},
        ]
    }


def render_yaml(cfg: dict[str, Any]) -> str:
    """YAML text of a config or rules dict (key order kept for readable ConfigMaps)."""
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False, width=1000)


# kubernetes_sd_configs keys and roles accepted by Prometheus 2.x (for builds without Kubernetes SD).
_K8S_SD_KEYS = frozenset(
    {"role", "namespaces", "selectors", "attach_metadata", "api_server", "kubeconfig_file", "follow_redirects"}
)
_K8S_ROLES = frozenset({"node", "service", "pod", "endpoints", "endpointslice", "ingress"})
_K8S_NAMESPACE_KEYS = frozenset({"names", "own_namespace"})


def promtool_supports_kubernetes_sd(promtool: str | None = None) -> bool:
    """Whether this promtool build knows ``kubernetes_sd_configs`` (Debian's package strips it)."""
    promtool = promtool or tool("promtool")
    probe = {"scrape_configs": [{"job_name": "probe", "kubernetes_sd_configs": [{"role": "pod"}]}]}
    with tempfile.TemporaryDirectory(prefix="loadproof-promtool-") as tmp:
        (Path(tmp) / "probe.yml").write_text(render_yaml(probe))
        try:
            _run([promtool, "check", "config", "probe.yml"], tmp)
        except PromtoolError as exc:
            if "kubernetes_sd_configs not found" in str(exc):
                return False
            raise
    return True


def check_kubernetes_sd(sd: Any) -> None:
    """Structural check of one ``kubernetes_sd_configs`` entry, the part a stripped promtool cannot see."""
    if not isinstance(sd, dict):
        raise PromtoolError(f"kubernetes_sd_configs entry is not a mapping: {sd!r}")
    unknown = set(sd) - _K8S_SD_KEYS
    if unknown:
        raise PromtoolError(f"kubernetes_sd_configs: unknown keys {sorted(unknown)}")
    if sd.get("role") not in _K8S_ROLES:
        raise PromtoolError(f"kubernetes_sd_configs: role {sd.get('role')!r} not one of {sorted(_K8S_ROLES)}")
    ns = sd.get("namespaces", {})
    if not isinstance(ns, dict) or set(ns) - _K8S_NAMESPACE_KEYS:
        raise PromtoolError(f"kubernetes_sd_configs: bad namespaces {ns!r}")
    names = ns.get("names", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise PromtoolError(f"kubernetes_sd_configs: namespaces.names must be a list of names, got {names!r}")


def promtool_check(config_text: str, rules_text: str | None = None, *, promtool: str | None = None) -> None:
    """Validate with the real ``promtool``; raises :class:`PromtoolError` with its output on failure.

    The config's ``rule_files`` are pointed at ``rules_text`` (written next to it) or dropped when no
    rules are given, because their deployed paths do not exist on this machine. When this promtool
    was built without Kubernetes discovery, each ``kubernetes_sd_configs`` block is checked
    structurally here and swapped for an empty static target list, so promtool still validates the
    rest (relabelling, globals, rule files) of the cluster config.
    """
    promtool = promtool or tool("promtool")
    cfg = yaml.safe_load(config_text)
    if not isinstance(cfg, dict):
        raise PromtoolError("config is not a YAML mapping")
    scrape_configs = cfg.get("scrape_configs") or []
    if any("kubernetes_sd_configs" in sc for sc in scrape_configs) and not promtool_supports_kubernetes_sd(promtool):
        for sc in scrape_configs:
            for sd in sc.pop("kubernetes_sd_configs", None) or []:
                check_kubernetes_sd(sd)
            sc.setdefault("static_configs", [{"targets": []}])
    with tempfile.TemporaryDirectory(prefix="loadproof-promtool-") as tmp:
        cfg.pop("rule_files", None)
        if rules_text is not None:
            (Path(tmp) / RULES_FILE).write_text(rules_text)
            cfg["rule_files"] = [RULES_FILE]
            _run([promtool, "check", "rules", RULES_FILE], tmp)
        (Path(tmp) / "prometheus.yml").write_text(render_yaml(cfg))
        _run([promtool, "check", "config", "prometheus.yml"], tmp)


def _run(cmd: list[str], cwd: str) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode != 0:
        raise PromtoolError(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
