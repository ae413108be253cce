"""The start barrier of the distributed k6 run (the cluster's ``k6-start`` Job).

Every runner pod starts ``k6 run --paused`` and turns Ready once k6 has initialised; the headless
Service of the run resolves to exactly the Ready runner pods. This waits until it resolves to
``--count`` addresses whose k6 reports ``paused``, then resumes all of them concurrently (within
milliseconds) via k6's REST API and records the start time in a ConfigMap for the report Job
(through :func:`loadtest.report_job.kube_api`: the API in a cluster, files locally).
Without it, runners whose image pull or VU allocation took longer would start late and the
combined arrival schedule would not be the profile's.

With ``--follow-job NAME`` (repeatable) it then stays up and follows those Jobs in order (the run's
runner Job, then its report Job), and fails when one fails or ``--follow-timeout-s`` passes first:
the barrier then ends unready whenever any part of the run did, which is what lets the Pulumi
program replace the run as one unit (``infra/loadtest.py``). A Job not created yet is waited for.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import httpx

from loadtest.report_job import START_KEY, kube_api, result_labels

RESUME_BODY = {"data": {"type": "status", "id": "default", "attributes": {"paused": False}}}
# k6's ExecutionStatus "PausedBeforeRun": VUs initialised, executors ready, waiting to be resumed.
# (The REST API answers earlier, while VUs are still initialising; resuming then would not be "together".)
K6_PAUSED_BEFORE_RUN = 4
FOLLOW_POLL_S = 5.0  # how often --follow-job reads a Job's status


def resolve(service: str, port: int) -> list[str]:
    """``host:port`` of every address the (headless) Service name resolves to, sorted."""
    try:
        infos = socket.getaddrinfo(service, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    hosts = sorted({str(info[4][0]) for info in infos})
    return [f"[{h}]:{port}" if ":" in h else f"{h}:{port}" for h in hosts]


async def paused(client: httpx.AsyncClient, target: str) -> bool:
    try:
        resp = await client.get(f"http://{target}/v1/status")
        attributes = resp.json()["data"]["attributes"]
        return resp.status_code == 200 and attributes.get("status") == K6_PAUSED_BEFORE_RUN and attributes["paused"]
    except (httpx.HTTPError, KeyError, ValueError):
        return False


async def wait_until_paused(
    targets_fn: Callable[[], list[str]], count: int, timeout_s: float, poll_s: float = 1.0
) -> list[str]:
    """Poll until ``count`` targets exist and every one is an initialised, paused k6."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            targets = targets_fn()
            if len(targets) == count and all(await asyncio.gather(*(paused(client, t) for t in targets))):
                return targets
            if len(targets) > count:
                raise RuntimeError(f"{len(targets)} runners answer, expected {count}: {targets}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"only {len(targets)} of {count} runners ready after {timeout_s:.0f}s: {targets}")
            await asyncio.sleep(poll_s)


async def resume(targets: list[str]) -> float:
    """Resume every runner at once; returns the wall-clock start time (just before the first resume)."""
    async with httpx.AsyncClient(timeout=10.0) as client:
        started_at = time.time()
        responses = await asyncio.gather(*(client.patch(f"http://{t}/v1/status", json=RESUME_BODY) for t in targets))
    failed = [
        f"{t}: HTTP {r.status_code} {r.text[:200]}"
        for t, r in zip(targets, responses, strict=True)
        if r.status_code != 200
    ]
    if failed:
        raise RuntimeError("resume failed: " + "; ".join(failed))
    return started_at


def job_outcome(status: Mapping[str, Any] | None) -> bool | None:
    """True once the Job completed, False once it failed, None while it runs (or does not exist yet)."""
    for condition in (status or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"] == "Complete"
    return None


def follow_jobs(
    get_status: Callable[[str], Mapping[str, Any] | None],
    names: list[str],
    timeout_s: float,
    poll_s: float | None = None,
) -> None:
    """Wait for each Job in ``names`` in turn to finish, reading every ``poll_s`` (default
    :data:`FOLLOW_POLL_S`); raises when one failed or ``timeout_s`` (for all of them) ran out."""
    poll_s = FOLLOW_POLL_S if poll_s is None else poll_s
    deadline = time.monotonic() + timeout_s
    for name in names:
        while (outcome := job_outcome(get_status(name))) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"Job {name} did not finish within {timeout_s:.0f}s")
            time.sleep(poll_s)
        if not outcome:
            raise RuntimeError(f"Job {name} failed: the run is unready and is replaced as a whole by the next up")
        print(f"Job {name} completed", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.k6_start", description=__doc__.splitlines()[0] if __doc__ else None
    )
    parser.add_argument("--service", required=True, help="headless Service of the runners (DNS name)")
    parser.add_argument("--port", type=int, default=6565, help="k6 REST API port")
    parser.add_argument("--count", type=int, required=True, help="number of runners")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--configmap", required=True, help="where to record the start time")
    parser.add_argument(
        "--follow-job", action="append", default=[], help="after the start, wait for this Job; fail if it fails"
    )
    parser.add_argument("--follow-timeout-s", type=float, default=3600.0, help="for all --follow-job together")
    args = parser.parse_args(argv)
    targets = asyncio.run(wait_until_paused(lambda: resolve(args.service, args.port), args.count, args.timeout_s))
    started_at = asyncio.run(resume(targets))
    print(f"resumed {len(targets)} runners at {started_at:.3f}: {', '.join(targets)}", flush=True)
    kube = kube_api()
    kube.put_configmap(args.namespace, args.configmap, {START_KEY: f"{started_at:.3f}"}, result_labels("k6-start"))
    try:
        follow_jobs(lambda name: kube.get_job(args.namespace, name), args.follow_job, args.follow_timeout_s)
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
