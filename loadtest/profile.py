"""``make profile``: where the API process spends its CPU per request, by library, under a constant load.

    python -m loadtest.profile [--stack dev] [--paths hot,cold] [--seconds 20]

For each path (``hot``: the demo workload on a warmed cache; ``cold``: every request a new topic) a
fresh local stack takes a constant k6 arrival rate while ``py-spy record`` samples the API process
(only while it runs on a CPU). Samples ÷ sampling rate = CPU seconds; divided by the requests k6
sent, that is CPU microseconds per request, attributed to the library of the innermost frame
(uvicorn, the framework, pydantic, redis-py, psycopg/SQLAlchemy, prometheus-client, the event
loop, our own code). Comparing two ``profile.json`` files (``loadtest.performance --profile``) shows
what a change took away and where, in the same units, whatever the absolute speed of the machine.

The request count is the API's own served-requests counter read just before py-spy starts and just
after it stops, while k6 holds the rate. CPU per request depends on the rate (batching amortizes
more at higher rates), so the rate is part of each result and comparisons are made at the same rate.
The raw py-spy samples are kept next to the summary for a flame graph (``py-spy`` raw format = collapsed stacks).
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from common.stackconfig import REPO_ROOT, StackConfig, StackConfigError, load
from common.tools import tool
from loadtest.bench import Step, run_step
from loadtest.demo import git_commit
from loadtest.measure import machine_info
from localstack.proof import ProofStack, StackStartError

PROFILE_DIR = REPO_ROOT / "reports" / "profile"
SAMPLE_RATE_HZ = 200
PATHS = {"hot": 0.0, "cold": 1.0}  # path -> fraction of never-seen topics
DEFAULT_RATES = {"hot": 1200, "cold": 800}

# Library of a frame, by the first matching fragment of its file path (order matters: ours first).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("service code", ("/service/",)),
    ("HTTP server (uvicorn, httptools)", ("/uvicorn/", "/httptools/", "/h11/")),
    ("framework (FastAPI, Starlette)", ("/fastapi/", "/starlette/")),
    ("validation (pydantic)", ("/pydantic/", "/pydantic_core/")),
    ("Redis client (redis-py)", ("/redis/",)),
    ("Postgres client (psycopg, SQLAlchemy)", ("/psycopg/", "/psycopg_pool/", "/sqlalchemy/", "/greenlet/")),
    ("metrics (prometheus-client)", ("/prometheus_client/",)),
    ("JSON", ("/json/",)),
    ("event loop (asyncio, uvloop)", ("/asyncio/", "/uvloop/")),
)
OTHER = "other"


def category(frame: str) -> str:
    """The library a py-spy frame (``func (path:line)``) belongs to."""
    _, _, where = frame.rpartition(" (")
    path = "/" + where.rsplit(":", 1)[0].lstrip("/")
    for name, fragments in CATEGORIES:
        if any(f in path for f in fragments):
            return name
    return OTHER


def summarize(
    raw_lines: Iterable[str], *, requests: int, rate_hz: int = SAMPLE_RATE_HZ, top: int = 15
) -> dict[str, Any]:
    """CPU per request by library (innermost frame) and the hottest functions, from py-spy raw output."""
    by_category: collections.Counter[str] = collections.Counter()
    by_function: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw_lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        leaf = stack.rsplit(";", 1)[-1]
        by_category[category(leaf)] += n
        by_function[leaf] += n
    cpu_s = samples / rate_hz
    per_request = 1e6 / rate_hz / requests if requests else None

    def us(n: int) -> float | None:
        return None if per_request is None else round(n * per_request, 1)

    return {
        "samples": samples,
        "sample_rate_hz": rate_hz,
        "cpu_s": round(cpu_s, 2),
        "cpu_us_per_request": us(samples),
        "by_category_us_per_request": {name: us(n) for name, n in by_category.most_common()},
        "top_functions": [
            {"function": f, "share": round(n / samples, 4), "us_per_request": us(n)}
            for f, n in by_function.most_common(top)
        ],
    }


def served_requests(base_url: str) -> float:
    """Requests the API has answered so far, from its own ``/metrics`` counter."""
    text = httpx.get(f"{base_url}/metrics", timeout=5).raise_for_status().text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "loadproof_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total")
    )


def profile_path(
    cfg: StackConfig, path: str, rate: int, seconds: int, out_dir: Path, console: Console
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"loadproof-profile-{path}-"))
    raw_path = out_dir / f"{path}.raw"
    with ProofStack(cfg, grafana=False) as stack:
        if path == "hot":  # the demo workload on a warm cache, as a hot path is meant
            run_step(cfg, stack.api_url, rate, step_s=10, warmup_s=2, workdir=work)
        api_pid = stack.pids()["orchestrator"]
        steps: list[Step] = []
        load = threading.Thread(
            target=lambda: steps.append(
                run_step(cfg, stack.api_url, rate, step_s=seconds + 6, warmup_s=0, workdir=work, new_topics=PATHS[path])
            )
        )
        load.start()
        time.sleep(3)  # k6 started and at its rate; py-spy samples inside the constant-rate window
        before = served_requests(stack.api_url)
        spy = subprocess.run(
            [str(tool("py-spy")), "record", "--pid", str(api_pid), "--subprocesses", "--rate", str(SAMPLE_RATE_HZ),
             "--duration", str(seconds), "--format", "raw", "--output", str(raw_path), "--nonblocking"],
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            check=False,
        )  # fmt: skip
        requests = round(served_requests(stack.api_url) - before)
        load.join()
        if spy.returncode != 0 or not raw_path.exists():
            raise RuntimeError(f"py-spy failed ({spy.returncode}): {spy.stderr.strip()[-500:]}")
    step = steps[0] if steps else None
    summary = summarize(raw_path.read_text().splitlines(), requests=requests)
    summary.update(
        path=path,
        rate=rate,
        seconds=seconds,
        requests=requests,
        step_passed=step.passed if step else None,
        p95_ms=step.p95_ms if step else None,
        cache_hit_ratio=step.cache_hit_ratio if step else None,
        raw=raw_path.name,
    )
    console.print(
        f"  {path} at {rate}/s: {summary['cpu_us_per_request']} µs CPU per request over {requests} requests "
        f"(step {'passed' if step and step.passed else 'FAILED'}, hit ratio {summary['cache_hit_ratio']})"
    )
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="py-spy profile of the API process, CPU per request by library.")
    parser.add_argument("--stack", default="dev")
    parser.add_argument("--paths", default="hot,cold")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--rate", action="append", default=[], help="path=rate, e.g. hot=1200 (repeatable)")
    parser.add_argument("--out", type=Path, default=PROFILE_DIR)
    args = parser.parse_args(argv)
    console = Console()
    try:
        cfg = load(args.stack)
    except StackConfigError as exc:
        console.print(f"[red]Pulumi.{args.stack}.yaml is invalid:[/] {exc}")
        return 2
    rates = dict(DEFAULT_RATES)
    for item in args.rate:
        name, _, value = item.partition("=")
        rates[name] = int(value)
    paths = [p for p in args.paths.split(",") if p]
    if unknown := set(paths) - set(PATHS):
        console.print(f"[red]unknown --paths {sorted(unknown)}; known: {', '.join(PATHS)}[/]")
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"git_commit": git_commit(), "machine": machine_info(), "paths": {}}
    try:
        for path in paths:
            console.print(f"[bold]profile {path}[/]: {rates[path]}/s for {args.seconds} s, py-spy on the API process")
            result["paths"][path] = profile_path(cfg, path, rates[path], args.seconds, args.out, console)
    except StackStartError as exc:
        console.print(f"✗ {exc}", style="red", markup=False, highlight=False)
        return 3
    (args.out / "profile.json").write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"written: {args.out / 'profile.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
