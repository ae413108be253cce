"""``make bench``: the highest sustainable arrival rate of ``POST /task`` vs bare reference apps, same run.

A benchmark, not a test. "Sustainable" = k6's own thresholds hold for a constant arrival rate held
for one step: measured-phase p95 < the stack's p95 target (400 ms), errors < 1 %, no dropped
iterations; each step ramps up over a warm-up that is not judged (see :func:`step_config`). The
search doubles the rate until a step fails, then bisects between the last passing and the first
failing rate, within a time budget per target. Each path's references (``service/reference.py``,
same uvicorn settings, process count and database pool size) run on the same machine right after it,
each searched the same way, so each ratio service ÷ reference says how much of this machine's
capacity the real request path costs (:data:`PATHS`):

* hot: one Redis GET per request (``get``), and a constant answer with no I/O (``constant``: the
  server's own ceiling);
* cold: one INSERT with its own commit + one XADD per request (``insert``, the naive durable
  accept), and a bare group commit (``group``: the durable accept's limit).

Six searches of up to ``--budget`` seconds each (``BENCH_BUDGET_S``, default 240: at most 24 min of
searching), plus each service step's wait for the backlog and the start-ups.

Each service step starts from an empty task backlog: before it, the search waits (up to
``SETTLE_S``, outside the time budget) until the workers finished what earlier steps queued, and
records what was left. Carried over, the backlog made a step's verdict depend on the steps before
it: at d1d7d90 the cold search's 950/s step, run after ~50k tasks had been queued by five earlier
steps and with the workers at their ceiling, shed 6 % while 900/s passed just before it.

Caveats printed into ``bench.json``: k6 shares the 2 cores with the server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from common.stackconfig import REPO_ROOT, ProfileConfig, StackConfig, StackConfigError, Stage, load
from loadtest.demo import git_commit
from loadtest.k6run import run_k6
from loadtest.measure import machine_info
from loadtest.performance import bench_rows
from loadtest.tasks import wait_for_drain
from localstack.process import ROOT, ManagedProcess, free_port, http_check
from localstack.proof import ProofStack, StackStartError
from localstack.servers import PostgresServer, RedisServer
from service.reference import DURABLE_MODES, MODES, REDIS_MODES

BENCH_DIR = REPO_ROOT / "reports" / "bench"
BENCH_PROFILE = "bench-step"


@dataclass
class Step:
    rate: int
    passed: bool
    p95_ms: float | None
    error_rate: float | None
    dropped: int
    requests: int
    seconds: float
    cache_hit_ratio: float | None = None  # over this step; None where the target has no cache
    backlog_at_start: int | None = None  # unfinished tasks when the step began; None: no task queue


def cache_counts(base_url: str) -> tuple[float, float] | None:
    """(hits, misses) from the target's ``/metrics``; None when it exports no cache counters."""
    try:
        text = httpx.get(f"{base_url}/metrics", timeout=5).raise_for_status().text
    except (httpx.HTTPError, OSError):
        return None
    counts = {"hit": 0.0, "miss": 0.0}
    seen = False
    for family in text_string_to_metric_families(text):
        if family.name != "loadproof_cache_lookups":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("result") in counts:
                counts[sample.labels["result"]] += sample.value
                seen = True
    return (counts["hit"], counts["miss"]) if seen else None


def hit_ratio(before: tuple[float, float] | None, after: tuple[float, float] | None) -> float | None:
    if after is None:
        return None
    hits, misses = after[0] - (before or (0.0, 0.0))[0], after[1] - (before or (0.0, 0.0))[1]
    return hits / (hits + misses) if hits + misses > 0 else None


class ReferenceServer:
    """``python -m service.reference`` in ``mode`` with the orchestrator's uvicorn settings, on a free port.

    What the mode needs is started with it, unless given: its own Redis (``redis_url`` to use one
    already running) and, for the durable modes, its own durable Postgres (fsync on, as ``make demo``
    runs it; ``database_url`` to use one already running). ``constant`` starts neither.
    ``db_pool_size``, ``linger_ms`` and ``batch_max`` are the service's knobs of the same name.
    """

    def __init__(
        self,
        processes: int = 1,
        *,
        mode: str = "get",
        db_pool_size: int = 20,
        linger_ms: float = 2.0,
        batch_max: int = 256,
        redis_appendonly: bool = True,
        redis_url: str | None = None,
        database_url: str | None = None,
        workdir: Path | None = None,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"reference mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="loadproof-reference-"))
        self.workdir.chmod(0o755)  # Postgres runs as user `postgres` (when we are root) and must reach its dir
        self.mode = mode
        own_redis = mode in REDIS_MODES and redis_url is None
        self.redis = RedisServer(appendonly=redis_appendonly, workdir=self.workdir / "redis") if own_redis else None
        own_pg = mode in DURABLE_MODES and database_url is None
        self.postgres = PostgresServer(fast=False, workdir=self.workdir / "postgres") if own_pg else None
        self.redis_url = redis_url or (self.redis.url if self.redis is not None else "")
        self.database_url = database_url or ""
        self.db_pool_size = db_pool_size
        self.linger_ms = linger_ms
        self.batch_max = batch_max
        self.port = free_port()
        self.processes = processes
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ReferenceServer:
        if self.redis is not None:
            self.redis.start()
            self.redis_url = self.redis.url
        if self.postgres is not None:
            self.postgres.start()
            self.database_url = self.postgres.dsn
        env = {k: v for k, v in os.environ.items() if not k.startswith("LOADPROOF_")}
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "LOADPROOF_REDIS_URL": self.redis_url,
                "LOADPROOF_DATABASE_URL": self.database_url,
                "LOADPROOF_PORT": str(self.port),
                "LOADPROOF_PROCESSES": str(self.processes),
                "LOADPROOF_REFERENCE_MODE": self.mode,
                "LOADPROOF_DB_POOL_SIZE": str(self.db_pool_size),
                "LOADPROOF_ACCEPT_LINGER_MS": f"{self.linger_ms:g}",
                "LOADPROOF_ACCEPT_BATCH_MAX": str(self.batch_max),
            }
        )
        self.process = ManagedProcess(
            "reference",
            [sys.executable, "-m", "service.reference"],
            env=env,
            log_path=self.workdir / "reference.log",
            ready=http_check(f"{self.url}/healthz"),
        )
        self.process.start()
        self.process.wait_ready(30)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop(timeout=10)
        if self.redis is not None:
            self.redis.cleanup()
        if self.postgres is not None:
            self.postgres.cleanup()

    def __enter__(self) -> ReferenceServer:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


STEP_VUS = 1000
WARMUP_S = 8  # the ramp before each step's judged window (see step_config)
SETTLE_S = 150.0  # longest wait for the backlog before a step: ~17k tasks at the simulator's ~250/s


def step_config(cfg: StackConfig, rate: int, step_s: int, warmup_s: int, new_topics: float = 0.0) -> StackConfig:
    """The stack config with one extra profile: a ramp to ``rate`` over the ``warmup_s`` warm-up (not
    judged), then ``rate`` held for ``step_s`` seconds (judged).

    Why a ramp: k6 hands iterations to its VUs in turn, so at a full-rate start every pre-allocated
    VU opened its connection and ran its first iteration within about a second. That cost k6 over a
    core for a second, it sent ~150 requests in that second and the rest in a burst the next (1600
    in one second, 470-880 shed at once, 533-990 iterations dropped). Measured at 1000 new tasks/s
    on this box (scratch driver, single runs): from a full-rate start the step failed 3 times in 4
    (7.8-11.5 % errors); a 5 s ramp with 1000 VUs still burst once the ramp reached ~600/s (0.55 % and
    1.09 %); an 8 s ramp with half a second of arrivals pre-allocated had 0 errors, 0 dropped and no
    burst. The reference is stepped the same way; a step holds its rate for the whole judged window.

    VUs: half a second of arrivals is pre-allocated (up to ``STEP_VUS``); k6 initialises them before
    the step starts (paused). A rate that holds p95 < 400 ms rarely has that many in flight.
    """
    ramp = [Stage(duration=f"{warmup_s}s", target=rate)] if warmup_s > 0 else []
    profile = ProfileConfig(
        start_rate=max(1, rate // 10) if ramp else rate,
        warmup_s=warmup_s,
        new_topics=new_topics,
        stages=[*ramp, Stage(duration=f"{step_s}s", target=rate)],
        pre_allocated_vus=max(10, min(rate // 2, STEP_VUS)),
        max_vus=max(100, min(rate * 2, 4000)),
    )
    profiles = {**cfg.loadtest.profiles, BENCH_PROFILE: profile}
    return cfg.model_copy(update={"loadtest": cfg.loadtest.model_copy(update={"profiles": profiles})})


def run_step(
    cfg: StackConfig, base_url: str, rate: int, *, step_s: int, warmup_s: int, workdir: Path, new_topics: float = 0.0
) -> Step:
    t0 = time.monotonic()
    before = cache_counts(base_url)
    run_dir = workdir / f"step-{rate}-{int(time.time() * 1000)}"
    result = run_k6(
        step_config(cfg, rate, step_s, warmup_s, new_topics),
        profile=BENCH_PROFILE,
        base_url=base_url,
        test_id=run_dir.name,
        run_dir=run_dir,
        prometheus_rw_url=None,
        web_dashboard=False,
    )
    metrics = (result.summary or {}).get("metrics", {})
    dur = metrics.get("http_req_duration{phase:measured}", {}).get("values", {})
    failed = metrics.get("http_req_failed{phase:measured}", {}).get("values", {})
    dropped = int(metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0))
    reqs = int(metrics.get("http_reqs{phase:measured}", {}).get("values", {}).get("count", 0))
    if result.returncode not in (0, 99):
        raise RuntimeError(f"k6 failed ({result.returncode}) at {rate}/s: see {result.log_path}")
    return Step(
        rate=rate,
        passed=result.returncode == 0,
        p95_ms=dur.get("p(95)"),
        error_rate=failed.get("rate"),
        dropped=dropped,
        requests=reqs,
        seconds=round(time.monotonic() - t0, 1),
        cache_hit_ratio=hit_ratio(before, cache_counts(base_url)),
    )


def search(
    cfg: StackConfig,
    base_url: str,
    *,
    start_rate: int,
    budget_s: float,
    step_s: int,
    warmup_s: int,
    precision: float,
    workdir: Path,
    console: Console | None = None,
    name: str = "",
    new_topics: float = 0.0,
    settle: Callable[[], int] | None = None,
) -> tuple[int | None, list[Step]]:
    """Highest passing rate: double until a step fails, then bisect; stops at ``precision`` or the budget.

    ``settle``: called before each step, waits for the target's backlog to drain and returns what is
    left; its time does not count against the budget.
    """
    deadline = time.monotonic() + budget_s
    steps: list[Step] = []
    lo: int | None = None
    hi: int | None = None
    rate = start_rate
    while time.monotonic() + warmup_s + step_s + 5 < deadline:
        backlog: int | None = None
        if settle is not None:
            t0 = time.monotonic()
            backlog = settle()
            deadline += time.monotonic() - t0
        step = run_step(cfg, base_url, rate, step_s=step_s, warmup_s=warmup_s, workdir=workdir, new_topics=new_topics)
        step.backlog_at_start = backlog
        steps.append(step)
        if console is not None:
            verdict = "[green]pass[/]" if step.passed else "[red]fail[/]"
            p95 = "n/a" if step.p95_ms is None else f"{step.p95_ms:.1f} ms"
            err = "n/a" if step.error_rate is None else f"{100 * step.error_rate:.2f} %"
            hit = "no cache" if step.cache_hit_ratio is None else f"hit ratio {100 * step.cache_hit_ratio:.1f} %"
            left = "" if backlog is None else f", backlog at start {backlog}"
            console.print(
                f"  {name} {rate:>6}/s: {verdict} p95 {p95} ({hit}), errors {err}, dropped {step.dropped}{left}"
            )
        if step.passed:
            lo = rate
        else:
            hi = rate
        if hi is None:
            rate *= 2
        elif lo is None:
            if rate <= 1:
                break
            rate //= 2
        else:
            if hi / lo <= 1 + precision:
                break
            rate = (lo + hi) // 2
    return lo, steps


@dataclass(frozen=True)
class Reference:
    mode: str  # service/reference.py's mode
    what: str  # what it does per request, as bench.json and the tables say it


PATHS: dict[str, tuple[float, tuple[Reference, ...]]] = {
    # path: (fraction of never-seen topics, its references: the naive one first (the only one of older
    # bench.json files), then the machine's limit on that path)
    "hot": (
        0.0,
        (
            Reference("get", "one Redis GET per request"),
            Reference("constant", "a constant 202 body, no I/O: the server's own ceiling"),
        ),
    ),
    "cold": (
        1.0,
        (
            Reference("insert", "one Postgres INSERT (own commit) + one XADD per request, durable"),
            Reference("group", "group commit: one multi-row INSERT + one XADD pipeline per group, durable"),
        ),
    ),
}


def ratio(service_rate: int | None, reference_rate: int | None) -> float | None:
    """service ÷ reference, 3 decimals; None when either was not measured (or the reference found 0)."""
    return round(service_rate / reference_rate, 3) if service_rate is not None and reference_rate else None


def path_result(
    new_topics: float,
    service_rate: int | None,
    service_steps: list[Step],
    measured: list[tuple[Reference, int | None, list[Step]]],
) -> dict[str, Any]:
    """One path's section of bench.json: ``references`` lists every reference with its rate, ratio and
    steps; the first one's are also at the top level under the keys older bench.json files had (what
    :mod:`loadtest.performance` reads when a section has no ``references``)."""
    references = [
        {
            "mode": ref.mode,
            "reference": ref.what,
            "max_rate": rate,
            "ratio_service_to_reference": ratio(service_rate, rate),
            "steps": [asdict(s) for s in steps],
        }
        for ref, rate, steps in measured
    ]
    first = references[0]
    return {
        "reference": first["reference"],
        "new_topics": new_topics,
        "service_max_rate": service_rate,
        "reference_max_rate": first["max_rate"],
        "ratio_service_to_reference": first["ratio_service_to_reference"],
        "service_cache_hit_ratio_at_max": next(
            (s.cache_hit_ratio for s in service_steps if s.rate == service_rate and s.passed), None
        ),
        "service_steps": [asdict(s) for s in service_steps],
        "reference_steps": first["steps"],
        "references": references,
    }


def run_bench(
    cfg: StackConfig,
    *,
    out_dir: Path = BENCH_DIR,
    budget_s: float = 240,
    step_s: int = 12,
    warmup_s: int = WARMUP_S,
    start_rate: int = 100,
    precision: float = 0.1,
    paths: tuple[str, ...] = ("hot", "cold"),
    console: Console | None = None,
) -> dict[str, Any]:
    """Each path against each of its bare references, every target searched the same way, in one invocation.

    hot: the demo workload (mostly cache hits once warm) vs one Redis GET and vs a constant answer.
    cold: every request a never-seen topic (a new task: row + queue entry) vs the naive durable accept
    and vs a bare group commit. Each target gets a fresh stack or reference server, so one target's
    backlog never slows another's search. Six searches of up to ``budget_s`` each (at most 24 min of
    searching at the default 240 s), plus the waits for the backlog and the start-ups.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    say = console.print if console else (lambda *a, **k: None)
    work = Path(tempfile.mkdtemp(prefix="loadproof-bench-"))

    def measure(
        base_url: str, name: str, new_topics: float, settle: Callable[[], int] | None = None
    ) -> tuple[int | None, list[Step]]:
        return search(
            cfg,
            base_url,
            start_rate=start_rate,
            budget_s=budget_s,
            step_s=step_s,
            warmup_s=warmup_s,
            precision=precision,
            workdir=work,
            console=console,
            name=name,
            new_topics=new_topics,
            settle=settle,
        )

    result: dict[str, Any] = {
        "criteria": {
            "p95_latency_ms": f"< {cfg.loadtest.thresholds.p95_ms:g}",
            "error_rate": f"< {cfg.loadtest.thresholds.error_rate:g}",
            "dropped_iterations": "== 0",
            "step_s": step_s,
            "warmup_s": warmup_s,
            "precision": precision,
        },
        "git_commit": git_commit(),
        "machine": machine_info(),
        "workload": cfg.loadtest.workload.model_dump(by_alias=True),
        "processes": cfg.orchestrator.processes,
    }
    for path in paths:
        new_topics, references = PATHS[path]
        say(f"[bold]bench {path}[/]: service POST /task (full stack, new topics {new_topics:.0%})")
        with ProofStack(cfg, grafana=False) as stack:
            service_rate, service_steps = measure(
                stack.api_url,
                f"{path} service",
                new_topics,
                lambda: wait_for_drain(stack.database_url, 0.0, SETTLE_S)[1],
            )
        measured: list[tuple[Reference, int | None, list[Step]]] = []
        for ref in references:
            say(f"[bold]bench {path}[/]: reference {ref.mode} ({ref.what}, same uvicorn settings)")
            with ReferenceServer(
                cfg.orchestrator.processes,
                mode=ref.mode,
                db_pool_size=cfg.orchestrator.db_pool_size,
                linger_ms=cfg.orchestrator.accept_linger_ms,
                batch_max=cfg.orchestrator.accept_batch_max,
                redis_appendonly=cfg.redis.appendonly,
            ) as server:
                measured.append((ref, *measure(server.url, f"{path} {ref.mode}", new_topics)))
        result[path] = path_result(new_topics, service_rate, service_steps, measured)
    result["caveats"] = [
        "k6 runs on the same machine and competes for the same cores as the server.",
        f"Each service step starts after the workers finished the tasks earlier steps queued (waited up to "
        f"{SETTLE_S:g} s, outside the time budget; what was left is the step's backlog_at_start). During "
        "a step the workers run as usual, competing for the same cores.",
        "hot: the cache warms across steps (same seeded workload), so later steps see a higher hit ratio: "
        "each step's cache_hit_ratio is recorded next to its p95.",
        "cold: every request is a new task (hit ratio 0); the insert reference commits each request on its "
        f"own, the group reference groups them like the service (linger {cfg.orchestrator.accept_linger_ms:g} ms, "
        f"at most {cfg.orchestrator.accept_batch_max} per group, one write in flight per process).",
        "The top-level reference keys of each path are its first reference's (as in earlier bench.json files); "
        "references lists them all.",
        f"Each step ramps from a tenth of its rate to the rate over a {warmup_s} s warm-up that is not judged, "
        "then holds the rate for the judged window (step_s); service and references are stepped alike.",
        "A rate is 'max' within the search precision and time budget, not an exact capacity.",
    ]
    (out_dir / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Highest sustainable arrival rate: service vs its bare references.")
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    parser.add_argument("--profile", default=None, help="ignored (the bench uses constant-rate steps)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("BENCH_BUDGET_S", "240")))
    parser.add_argument("--step", type=int, default=12)
    parser.add_argument("--out", type=Path, default=BENCH_DIR)
    parser.add_argument("--paths", default="hot,cold", help="comma separated: hot, cold")
    args = parser.parse_args(argv)
    console = Console()
    try:
        cfg = load(args.stack)
    except StackConfigError as exc:
        console.print(f"[red]Pulumi.{args.stack}.yaml is invalid:[/] {exc}")
        return 2
    try:
        paths = tuple(p for p in args.paths.split(",") if p)
        unknown = set(paths) - set(PATHS)
        if unknown:
            console.print(f"[red]unknown --paths {sorted(unknown)}; known: {', '.join(PATHS)}[/]")
            return 2
        result = run_bench(cfg, out_dir=args.out, budget_s=args.budget, step_s=args.step, paths=paths, console=console)
    except StackStartError as exc:
        console.print(f"✗ {exc}", style="red", markup=False, highlight=False)
        console.print(exc.log_tail, markup=False, highlight=False)
        return 3
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything started was stopped[/]")
        return 130
    table = Table(title=f"make bench — highest sustainable arrival rate (commit {result['git_commit']})")
    table.add_column("Path")
    table.add_column("Service (req/s)", justify="right")
    table.add_column("Hit ratio at max", justify="right")
    table.add_column("Reference")
    table.add_column("Reference (req/s)", justify="right")
    table.add_column("Service ÷ reference", justify="right")
    for path, cells in bench_rows(result):
        table.add_row(path, *cells)
    console.print(table)
    console.print(f"written: {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
