"""Entry point of the cluster's report Job: measure the finished run and store the result in a ConfigMap.

Runs in the service image after all k6 runners have finished (Pulumi orders it after the runner
Job). It reads the start time the start barrier recorded (``loadtest/k6_start.py``), waits (bounded)
for the run's queued tasks to drain, computes every number with the shared
:func:`loadtest.measure.measure` against the in-cluster Prometheus and Postgres, and writes the JSON
to the ConfigMap the Pulumi program reads back into stack outputs. Configuration comes from
``LOADPROOF_REPORT_CONFIG`` (JSON, no secrets) and ``LOADPROOF_DATABASE_URL`` (from a Secret).

Both Jobs reach the Kubernetes API only through :class:`KubeApi` (ConfigMaps, and the Job status
the start barrier follows), chosen by :func:`kube_api`: :class:`Kube` (the pod's ServiceAccount) in a
cluster, :class:`FileKube` when ``LOADPROOF_KUBE_DIR`` is set (local runs and the image test,
``tests/test_infra_image.py``).
The Pulumi program never sets that variable; everything else is the same code either way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx

from common.stackconfig import ProfileConfig, ThresholdsConfig

CONFIG_ENV = "LOADPROOF_REPORT_CONFIG"
KUBE_DIR_ENV = "LOADPROOF_KUBE_DIR"  # set: ConfigMaps and Job status are files there (see FileKube)
REPORT_KEY = "report.json"
START_KEY = "started_at"
SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
# k6 pushes every 5 s and Prometheus scrapes every few seconds: the last samples land within this.
SETTLE_S = 15.0
PART_OF = "loadproof"


def result_labels(component: str) -> dict[str, str]:
    """Labels of the ConfigMaps the Jobs write: ``kubectl get cm -l app.kubernetes.io/component=report`` lists runs."""
    return {
        "app.kubernetes.io/name": PART_OF,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": PART_OF,
    }


class KubeError(RuntimeError):
    """The Kubernetes API refused a request; the message carries its status and body."""


class KubeApi(Protocol):
    """The one seam between the Jobs and Kubernetes: write (merge) and read one ConfigMap's data, read
    one Job's status."""

    def put_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str] | None = None
    ) -> None: ...

    def get_configmap(self, namespace: str, name: str) -> dict[str, str] | None: ...

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...


@dataclass(frozen=True)
class FileKube:
    """Kubernetes objects as JSON files ``<root>/<namespace>/<kind>/<name>.json``, kind ``configmaps``
    (``{"metadata": ..., "data": ...}``) or ``jobs`` (``{"status": ...}``, written by whoever plays
    the Job controller).

    Same semantics as :class:`Kube`: :meth:`put_configmap` merges ``data`` keys and ``labels`` into
    what the file holds (created when missing); a missing file reads as ``None``. For running the
    Jobs' code outside a cluster, never selected in one.
    """

    root: Path

    def path(self, namespace: str, kind: str, name: str) -> Path:
        return self.root / namespace / kind / f"{name}.json"

    def _read(self, namespace: str, kind: str, name: str) -> dict[str, Any] | None:
        path = self.path(namespace, kind, name)
        return json.loads(path.read_text()) if path.exists() else None

    def put_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str] | None = None
    ) -> None:
        path = self.path(namespace, "configmaps", name)
        doc = self._read(namespace, "configmaps", name) or {"metadata": {"name": name}}
        meta = doc.setdefault("metadata", {})
        meta["labels"] = {**(meta.get("labels") or {}), **(labels or {})}
        doc["data"] = {**(doc.get("data") or {}), **data}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, sort_keys=True))
        tmp.replace(path)  # readers never see half a file

    def get_configmap(self, namespace: str, name: str) -> dict[str, str] | None:
        doc = self._read(namespace, "configmaps", name)
        return (doc.get("data") or {}) if doc is not None else None

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        doc = self._read(namespace, "jobs", name)
        return (doc.get("status") or {}) if doc is not None else None


def kube_api() -> KubeApi:
    """:class:`FileKube` under ``$LOADPROOF_KUBE_DIR`` when it is set, else the in-cluster :class:`Kube`."""
    root = os.environ.get(KUBE_DIR_ENV)
    return FileKube(Path(root)) if root else Kube.in_cluster()


@dataclass(frozen=True)
class Kube:
    """Just enough of the Kubernetes API for the Jobs (:class:`KubeApi`), as the pod's ServiceAccount."""

    base_url: str
    token: str
    verify: str | bool

    @classmethod
    def in_cluster(cls) -> Kube:
        host = os.environ.get("KUBERNETES_SERVICE_HOST")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise KubeError("not running in a pod: KUBERNETES_SERVICE_HOST is unset")
        host = f"[{host}]" if ":" in host else host
        return cls(f"https://{host}:{port}", (SA_DIR / "token").read_text().strip(), str(SA_DIR / "ca.crt"))

    def _client(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.token}"},
            verify=self.verify,
            timeout=30.0,
        )

    def put_configmap(
        self, namespace: str, name: str, data: dict[str, str], labels: dict[str, str] | None = None
    ) -> None:
        """Write ``data`` (and ``labels``) into the ConfigMap: a merge patch, or a create when it does not exist.

        In the cluster Pulumi creates the ConfigMap empty and the Job's Role allows only ``patch`` on
        that one name (RBAC cannot restrict ``create`` by name); the create is for other setups.
        """
        metadata: dict[str, Any] = {"name": name, **({"labels": labels} if labels else {})}
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        with self._client() as client:
            resp = client.patch(
                f"{path}/{name}",
                content=json.dumps({"metadata": metadata, "data": data}),
                headers={"Content-Type": "application/merge-patch+json"},
            )
            if resp.status_code == 404:
                body = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
                resp = client.post(path, json=body)
            if resp.status_code >= 300:
                raise KubeError(f"writing ConfigMap {namespace}/{name}: HTTP {resp.status_code}: {resp.text[:500]}")

    def _read(self, path: str, what: str) -> dict[str, Any] | None:
        """The object at ``path``; None when it does not exist, :class:`KubeError` for any other refusal."""
        with self._client() as client:
            resp = client.get(path)
        if resp.status_code == 404:
            return None
        if resp.status_code >= 300:
            raise KubeError(f"reading {what}: HTTP {resp.status_code}: {resp.text[:500]}")
        return resp.json()

    def get_configmap(self, namespace: str, name: str) -> dict[str, str] | None:
        doc = self._read(f"/api/v1/namespaces/{namespace}/configmaps/{name}", f"ConfigMap {namespace}/{name}")
        return (doc.get("data") or {}) if doc is not None else None

    def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The Job's ``status`` (``{}`` before the controller wrote one); None when there is no such Job."""
        doc = self._read(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}", f"Job {namespace}/{name}")
        return (doc.get("status") or {}) if doc is not None else None


def run(doc: dict[str, Any], kube: KubeApi, database_url: str | None) -> dict[str, Any]:
    """Measure the run described by ``doc`` (see ``infra/report.py:report_job_config``) and store the report."""
    from common.k6config import GRACEFUL_STOP_S, graceful_stop_s, profile_duration_s
    from loadtest.measure import RunWindow, backlog_lag_s, measure
    from loadtest.tasks import wait_for_drain

    ns = doc["namespace"]
    start = kube.get_configmap(ns, doc["startConfigmap"])
    if not start or START_KEY not in start:
        raise KubeError(f"ConfigMap {ns}/{doc['startConfigmap']} has no {START_KEY}: the runners were never started")
    started_at = float(start[START_KEY])
    profile = ProfileConfig.model_validate(doc["profile"])
    # The offered load ends with the last stage; gracefulStop only lets in-flight requests finish.
    ended_at = started_at + profile_duration_s(profile)
    drained_at, pending = (time.time(), None)
    scrape_interval_s = float(doc.get("scrapeIntervalS", 5))
    if database_url:
        drained_at, pending = wait_for_drain(database_url, started_at - 5, float(doc["drainS"]))
        # The queue gauges show the emptied queue this much later (the backlog's drain is read from them).
        time.sleep(max(0.0, drained_at + backlog_lag_s(scrape_interval_s) - time.time()))
    report = measure(
        doc["prometheusUrl"],
        test_id=doc["testId"],
        profile_name=doc["profileName"],
        profile=profile,
        thresholds=ThresholdsConfig.model_validate(doc["thresholds"]),
        window=RunWindow(
            started_at,
            ended_at,
            float(profile.warmup_s),
            drained_at=max(drained_at, ended_at),
            last_arrival_at=ended_at,
        ),
        database_url=database_url,
        tasks_pending_after_drain=pending,
        machine={"where": "kubernetes", "k6_runners": doc.get("runners")},
        # k6's totals are final once its last iteration ended and pushed: a flow polls on for up to its timeout.
        settle_s=SETTLE_S + (graceful_stop_s(profile) - GRACEFUL_STOP_S),
        scrape_interval_s=scrape_interval_s,
        # The API's count is where the HPA starts from; the report shows what really ran next to it.
        configured_replicas={"orchestrator": doc["orchestratorReplicas"], "workers": doc["workersReplicas"]},
    )
    kube.put_configmap(
        ns, doc["reportConfigmap"], {REPORT_KEY: json.dumps(report, sort_keys=True)}, result_labels("report")
    )
    return report


def main() -> int:
    raw = os.environ.get(CONFIG_ENV)
    if not raw:
        print(f"error: {CONFIG_ENV} is not set", file=sys.stderr)
        return 2
    doc = json.loads(raw)
    # Don't start measuring before the last k6 push and scrape can have landed.
    time.sleep(SETTLE_S)
    report = run(doc, kube_api(), os.environ.get("LOADPROOF_DATABASE_URL") or None)
    print(json.dumps({k: report.get(k) for k in ("test_id", "p95_latency_ms", "achieved_qps", "thresholds_passed")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
