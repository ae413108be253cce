"""``make demo``: the whole proof on one machine — stack up, k6 open-model load, bounded drain, measured report.

    python -m loadtest.demo --stack dev --profile demo      # PROFILE: see `make help`; KEEP=1 keeps it up

Writes ``reports/<run-id>/`` (``outputs.json``, ``k6-summary.json``, ``k6-report.html``, ``report.html``,
``PERFORMANCE.md``) and points ``reports/latest`` at it; exits non-zero when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.k6config import REQUEST_TIMEOUT_S, profile_duration_s
from common.stackconfig import REPO_ROOT, StackConfig, StackConfigError, load
from loadtest import measure as ms
from loadtest import report, tasks
from loadtest.k6run import K6_PUSH_INTERVAL_S, run_k6
from localstack.proof import ProofStack, StackStartError

REPORTS = REPO_ROOT / "reports"


def new_run_id(profile: str, label: str | None = None) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{profile}" + (f"-{label}" if label else "")


def grafana_run_url(base: str | None, run_id: str, window: ms.RunWindow) -> str | None:
    """The overview dashboard narrowed to this run (its testid and time range), when Grafana ran."""
    if not base:
        return None
    from dashboards.build import OVERVIEW_UID

    start_ms, end_ms = int(window.started_at * 1000) - 10_000, int(window.drain_end * 1000) + 10_000
    return f"{base}/d/{OVERVIEW_UID}?var-testid={run_id}&from={start_ms}&to={end_ms}"


def git_commit() -> str | None:
    """The commit the numbers were measured at (``+dirty`` with uncommitted changes), if in a git checkout."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def reproduce_commands(stack: str, profile: str) -> list[str]:
    commit = git_commit()
    return [
        *([f"git checkout {commit.removesuffix('+dirty')}"] if commit else []),
        f"make demo STACK={stack} PROFILE={profile}",
        f"# equivalently: PYTHONPATH=. .venv/bin/python -m loadtest.demo --stack {stack} --profile {profile}",
    ]


def drain(stack: ProofStack, since: float, timeout_s: float, console: Console | None) -> tuple[float, int | None, str]:
    """Bounded wait for queued tasks to finish (Postgres rows; Prometheus queue depth as a fallback)."""
    note = ""
    try:
        with console.status("drain: waiting for queued tasks") if console else _null() as status:

            def on_poll(pending: int) -> None:
                if status is not None:
                    status.update(f"drain: {pending} task(s) still queued/running")

            drained_at, pending = tasks.wait_for_drain(stack.database_url, since, timeout_s, on_poll=on_poll)
        return drained_at, pending, note
    except Exception as exc:  # no task table (schema mismatch) -> queue gauges, and say so
        note = f"task rows unavailable ({type(exc).__name__}: {exc}); drained on queue gauges"
    prom = ms.Prometheus(stack.prometheus_url)
    deadline = time.monotonic() + timeout_s
    pending = None
    try:
        while time.monotonic() < deadline:
            depth = prom.scalar(f"({ms.q.queue_depth()}) + ({ms.q.queue_pending()})", time.time())
            pending = None if depth is None else int(depth)
            if pending == 0:
                break
            time.sleep(1)
    finally:
        prom.close()
    return time.time(), pending, note


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def run_demo(
    cfg: StackConfig,
    *,
    stack_name: str,
    profile: str,
    reports_dir: Path = REPORTS,
    run_id: str | None = None,
    keep: bool = False,
    console: Console | None = None,
    grafana: bool = True,
    label: str | None = None,
    link_latest: bool = True,
    on_ready: Callable[[ProofStack], None] | None = None,
) -> tuple[dict[str, Any], Path]:
    """Start the stack, run k6, drain, measure, write the report; returns (outputs, run dir)."""
    if profile not in cfg.loadtest.profiles:
        raise StackConfigError(
            f"loadproof:loadtest.profiles: no profile {profile!r} (have {sorted(cfg.loadtest.profiles)})"
        )
    run_id = run_id or new_run_id(profile, label)
    run_dir = reports_dir / run_id  # created by run_k6: a stack that never came up leaves no empty report
    say = console.print if console else (lambda *a, **k: None)
    prof = cfg.loadtest.profiles[profile]

    def progress(name: str, seconds: float) -> None:
        say(f"  [green]✓[/] {name:<14} ready in {seconds:5.2f}s")

    say(f"[bold]loadproof demo[/] — stack [cyan]{stack_name}[/], profile [cyan]{profile}[/], run [cyan]{run_id}[/]")
    t0 = time.monotonic()
    with ProofStack(cfg, progress=progress, grafana=grafana) as stack:
        say(f"  stack ready in {time.monotonic() - t0:.1f}s (work dir {stack.workdir})", highlight=False)
        if on_ready is not None:
            on_ready(stack)
        if stack.grafana_url:
            say(f"  Grafana: {stack.grafana_url}")
        elif stack.grafana_skipped_reason:
            say(f"  [dim]{stack.grafana_skipped_reason}[/]")
        cpu_before = ms.host_cpu_times()
        k6 = run_k6(
            cfg,
            profile=profile,
            base_url=stack.api_url,
            test_id=run_id,
            run_dir=run_dir,
            prometheus_rw_url=stack.prometheus.remote_write_url if stack.prometheus else None,
            console=console,
        )
        cpu_note = ms.host_cpu_note(cpu_before, ms.host_cpu_times())
        if k6.returncode not in (0, 99):  # 99 = thresholds crossed: still a valid, measured run
            raise RuntimeError(f"k6 failed with exit code {k6.returncode}:\n{_tail(k6.log_path)}")
        stack.check_alive()
        drained_at, pending, note = drain(stack, k6.started_at - 5, cfg.loadtest.drain_for(profile), console)
        # Let the final k6 push and one more scrape land before reading totals, and the queue gauges
        # show the drained queue.
        time.sleep(max(K6_PUSH_INTERVAL_S + stack.scrape_interval_s + 1, ms.backlog_lag_s(stack.scrape_interval_s)))
        # k6 runs on after its last arrival while requests (and a flow profile's polls) finish.
        last_arrival = min(k6.started_at + profile_duration_s(prof), k6.ended_at)
        window = ms.RunWindow(
            k6.started_at, k6.ended_at, prof.warmup_s, drained_at=drained_at, last_arrival_at=last_arrival
        )
        out = ms.measure(
            stack.prometheus_url,
            test_id=run_id,
            profile_name=profile,
            profile=prof,
            thresholds=cfg.loadtest.thresholds,
            window=window,
            database_url=None if note else stack.database_url,
            tasks_pending_after_drain=pending,
            k6_summary=k6.summary,
            grafana_url=grafana_run_url(stack.grafana_url, run_id, window),
            settle_s=K6_PUSH_INTERVAL_S + 1,
            scrape_interval_s=stack.scrape_interval_s,
            configured_replicas=stack.scrape_targets(),
        )
        out["k6_exit_code"] = k6.returncode
        out["stack"] = stack_name
        out["git_commit"] = git_commit()
        # Client latencies cannot exceed the k6 request timeout: slower requests fail (status 0) instead.
        out["request_timeout_s"] = REQUEST_TIMEOUT_S
        if note or cpu_note:
            out["notes"] = [*out.get("notes", []), *(n for n in (note, cpu_note) if n)]
        # A restarted process is part of what was measured: say so, never hide it.
        out["process_restarts"] = restarts = stack.restarts()
        if any(restarts.values()):
            crashed = ", ".join(f"{name} x{n}" for name, n in restarts.items() if n)
            out["notes"] = [*out.get("notes", []), f"supervised restarts during the run: {crashed}"]
        series = ms.timeseries(
            stack.prometheus_url, test_id=run_id, window=window, tail_s=ms.backlog_lag_s(stack.scrape_interval_s)
        )
        series["target_qps"] = [
            (float(t), ms.target_rate_at(prof, t)) for t in range(0, int(window.ended_at - window.started_at) + 1)
        ]
        write_reports(out, series, cfg=cfg, run_dir=run_dir, stack_name=stack_name, profile=profile)
        _copy_logs(stack, run_dir / "logs")
        if link_latest:
            _link_latest(reports_dir, run_dir)
        if keep:
            if console is not None:
                console.print(results_table(out))
                console.print(f"report: {run_dir / 'report.html'}")
            _keep_alive(stack, console)
    return out, run_dir


def write_reports(
    out: Mapping[str, Any], series: Mapping[str, Any], *, cfg: StackConfig, run_dir: Path, stack_name: str, profile: str
) -> None:
    commands = reproduce_commands(stack_name, profile)
    (run_dir / "outputs.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    (run_dir / "timeseries.json").write_text(json.dumps(series) + "\n")
    (run_dir / "report.html").write_text(report.render_html(out, series, commands=commands))
    (run_dir / "PERFORMANCE.md").write_text(
        report.render_markdown(
            out,
            commands=commands,
            workload=cfg.loadtest.workload.model_dump(by_alias=True),
            profile=cfg.loadtest.profiles[profile].model_dump(by_alias=True),
        )
    )


def _copy_logs(stack: ProofStack, dest: Path) -> None:
    """Every process log of the run next to its report (the temp work dir is removed on exit)."""
    dest.mkdir(parents=True, exist_ok=True)
    for log in stack.workdir.rglob("*.log"):
        if log.is_file() and log.stat().st_size < 50_000_000:
            shutil.copy2(log, dest / log.name)


def _link_latest(reports_dir: Path, run_dir: Path) -> None:
    latest = reports_dir / "latest"
    tmp = reports_dir / f".latest-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    tmp.replace(latest)  # atomic: never a moment without reports/latest


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def _keep_alive(stack: ProofStack, console: Console | None) -> None:
    say = console.print if console else print
    say("\n[bold]KEEP=1[/]: the stack stays up until Ctrl-C")
    say(f"  API         {stack.api_url}")
    say(f"  Prometheus  {stack.prometheus_url}")
    if stack.grafana_url:
        say(f"  Grafana     {stack.grafana_url}")
    say(f"  Postgres    {stack.database_url}")
    try:
        while True:
            stack.check_alive()
            time.sleep(1)
    except KeyboardInterrupt:
        say("stopping...")


def results_table(out: Mapping[str, Any]) -> Table:
    table = Table(title=f"loadproof results — {out.get('test_id')} ({out.get('profile')})")
    table.add_column("Target")
    table.add_column("Measured", justify="right")
    table.add_column("Required")
    table.add_column("Result")
    for label, measured, target, ok in report.threshold_rows(out):
        table.add_row(label, measured, target, "[green]PASS[/]" if ok else "[red]FAIL[/]")
    for key in (
        "achieved_qps",
        "peak_achieved_qps",
        "plateau_qps",
        "target_qps",
        "server_p95_latency_ms",
        "p99_latency_ms",
        "completion_p95_ms",
        *(("time_to_post_p50_ms", "time_to_post_p95_ms") if out.get("flow") else ()),
        "backlog_peak",
        "backlog_drain_s",
        "llm_calls",
        "cost_per_request_usd",
        "tasks_pending_after_drain",
    ):
        value = report.show(out, key)
        if key.endswith("latency_ms"):
            value += f" (hit ratio {report.fmt('cache_hit_ratio', out.get('cache_hit_ratio'))})"
        table.add_row(f"[dim]{key}[/]", value, "", "")
    for label, counts in report.failures(out):
        table.add_row(f"[dim]{label}[/]", counts, "", "")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    parser.add_argument("--profile", default=os.environ.get("PROFILE"))
    parser.add_argument("--keep", action="store_true", default=os.environ.get("KEEP", "") not in ("", "0"))
    parser.add_argument("--reports", type=Path, default=REPORTS)
    parser.add_argument("--no-grafana", action="store_true")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="Directory holding Pulumi.<stack>.yaml.")
    args = parser.parse_args(argv)
    console = Console()
    try:
        cfg = load(args.stack, args.root)
    except StackConfigError as exc:
        console.print(f"[red]Pulumi.{args.stack}.yaml is invalid:[/] {exc}")
        return 2
    except FileNotFoundError as exc:
        console.print(f"[red]no stack file:[/] {exc}")
        return 2
    profile = args.profile or cfg.loadtest.profile
    try:
        out, run_dir = run_demo(
            cfg,
            stack_name=args.stack,
            profile=profile,
            reports_dir=args.reports,
            keep=args.keep,
            console=console,
            grafana=not args.no_grafana,
        )
    except StackConfigError as exc:
        console.print(f"[red]config error:[/] {exc}")
        return 2
    except StackStartError as exc:
        console.print(f"✗ {exc}", style="red", markup=False, highlight=False)
        if exc.log_tail:
            console.print(f"[dim]--- last lines of the {exc.part} log ---[/]")
            console.print(exc.log_tail, markup=False, highlight=False)
        return 3
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything started was stopped[/]")
        return 130
    except (ms.MeasureError, RuntimeError, FileNotFoundError) as exc:
        console.print("[red]demo failed:[/]", str(exc), highlight=False)
        return 1
    if not args.keep:  # with KEEP=1 the table was printed before the stack was kept up
        console.print(results_table(out))
        console.print(f"report: {run_dir / 'report.html'}  (also reports/latest/)")
    return 0 if out.get("thresholds_passed") else 1


if __name__ == "__main__":
    sys.exit(main())
