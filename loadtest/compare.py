"""``make compare``: the same workload against the baseline and the optimized configuration, one invocation.

Baseline = the stack's configuration with the optimizations off (``cache_enabled=false``,
``db_pool_mode=null``, ``batch_size=1``, ``coalesce_enabled=false``); optimized = the stack as
configured. Both run sequentially on this machine, each on a fresh stack (new Postgres, Redis,
Prometheus), with the same profile and the same seeded Zipf workload. Writes
``reports/compare/compare.json`` and ``compare.md`` and appends the Markdown section to the optimized
run's ``PERFORMANCE.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from common.stackconfig import REPO_ROOT, StackConfig, StackConfigError, load
from loadtest import report
from loadtest.demo import REPORTS, new_run_id, run_demo
from localstack.proof import StackStartError

COMPARE_DIR = REPORTS / "compare"
# optimized ÷ baseline for these outputs (lower is better for all four)
RATIO_KEYS = ("p95_latency_ms", "error_rate", "llm_calls", "llm_cost_per_1k_tokens_usd")
SHOWN_KEYS = (
    "p95_latency_ms",
    "p99_latency_ms",
    "server_p95_latency_ms",
    "achieved_qps",
    "error_rate",
    "dropped_iterations",
    "cache_hit_ratio",
    "llm_calls",
    "llm_cost_usd",
    "llm_cost_per_1k_tokens_usd",
    "cost_per_request_usd",
    "completion_p95_ms",
    "tasks_accepted",
    "tasks_completed",
    "tasks_pending_after_drain",
    "tasks_lost",
    "thresholds_passed",
)


BASELINE_ORCHESTRATOR = {
    "cache_enabled": False,
    "db_pool_mode": "null",
    "coalesce_enabled": False,
    "accept_group_commit": False,
    "cache_lookup_batching": False,
}
BASELINE_WORKERS = {"batch_size": 1}


def baseline_config(cfg: StackConfig) -> StackConfig:
    """The stack with every optimization off; everything else (workload, profile, processes) unchanged."""
    orchestrator = cfg.orchestrator.model_copy(update=BASELINE_ORCHESTRATOR)
    workers = cfg.workers.model_copy(update=BASELINE_WORKERS)
    return cfg.model_copy(update={"orchestrator": orchestrator, "workers": workers})


def ratio(optimized: Any, baseline: Any) -> float | None:
    """optimized ÷ baseline; ``None`` when either is unmeasured or the baseline is 0 (no ratio exists)."""
    if optimized is None or baseline is None or isinstance(optimized, bool) or isinstance(baseline, bool):
        return None
    if float(baseline) == 0:
        return None
    return round(float(optimized) / float(baseline), 4)


def comparison(baseline: Mapping[str, Any], optimized: Mapping[str, Any], *, profile: str) -> dict[str, Any]:
    return {
        "profile": profile,
        "baseline_settings": {**BASELINE_ORCHESTRATOR, **BASELINE_WORKERS},
        "ratios_optimized_over_baseline": {k: ratio(optimized.get(k), baseline.get(k)) for k in RATIO_KEYS},
        "baseline": dict(baseline),
        "optimized": dict(optimized),
    }


def render_markdown(result: Mapping[str, Any], commands: list[str]) -> str:
    base, opt = result["baseline"], result["optimized"]
    ratios = result["ratios_optimized_over_baseline"]
    lines = [
        "## Baseline vs optimized (`make compare`)",
        "",
        f"Same profile (`{result['profile']}`), same seeded Zipf workload, same machine, fresh stacks, run one after "
        "the other. Baseline: cache off, no DB pooling (`db_pool_mode=null`), `batch_size=1`, coalescing off. "
        "Ratios are optimized ÷ baseline (lower is better); n/a when the baseline is 0 or unmeasured.",
        "",
        "| Number | Baseline | Optimized | Optimized ÷ baseline |",
        "|---|---|---|---|",
    ]
    hit_b = report.fmt("cache_hit_ratio", base.get("cache_hit_ratio"))
    hit_o = report.fmt("cache_hit_ratio", opt.get("cache_hit_ratio"))
    for key in SHOWN_KEYS:
        b, o = report.show(base, key), report.show(opt, key)
        if key in report.LATENCY_KEYS:
            b, o = f"{b} (hit {hit_b})", f"{o} (hit {hit_o})"
        r = ratios.get(key) if key in ratios else None
        lines.append(f"| `{key}` | {b} | {o} | {'' if key not in ratios else report.fmt('x', r)} |")
    lines += [
        "",
        f"Runs: baseline `{base.get('test_id')}`, optimized `{opt.get('test_id')}`. Reproduce:",
        "",
        "```bash",
        *commands,
        "```",
        "",
    ]
    return "\n".join(lines)


def run_compare(
    cfg: StackConfig,
    *,
    stack_name: str,
    profile: str,
    reports_dir: Path = REPORTS,
    console: Console | None = None,
    grafana: bool = False,
) -> tuple[dict[str, Any], Path]:
    say = console.print if console else (lambda *a, **k: None)
    say("[bold]compare 1/2: baseline[/] (cache off, no pooling, batch 1, no coalescing)")
    base, _ = run_demo(
        baseline_config(cfg),
        stack_name=stack_name,
        profile=profile,
        reports_dir=reports_dir,
        run_id=new_run_id(profile, "baseline"),
        console=console,
        grafana=grafana,
        link_latest=False,
    )
    say("[bold]compare 2/2: optimized[/] (the stack as configured)")
    opt, opt_dir = run_demo(
        cfg,
        stack_name=stack_name,
        profile=profile,
        reports_dir=reports_dir,
        run_id=new_run_id(profile, "optimized"),
        console=console,
        grafana=grafana,
    )
    result = comparison(base, opt, profile=profile)
    out_dir = reports_dir / "compare"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "compare.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    md = render_markdown(result, [f"make compare STACK={stack_name} PROFILE={profile}"])
    (out_dir / "compare.md").write_text(md)
    perf = opt_dir / "PERFORMANCE.md"
    perf.write_text(perf.read_text() + "\n" + md)
    return result, out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Baseline vs optimized, same workload, one run.")
    parser.add_argument("--stack", default=os.environ.get("STACK", "dev"))
    parser.add_argument("--profile", default=os.environ.get("PROFILE"))
    parser.add_argument("--reports", type=Path, default=REPORTS)
    parser.add_argument("--root", type=Path, default=REPO_ROOT)
    args = parser.parse_args(argv)
    console = Console()
    try:
        cfg = load(args.stack, args.root)
        profile = args.profile or cfg.loadtest.profile
        result, out_dir = run_compare(
            cfg, stack_name=args.stack, profile=profile, reports_dir=args.reports, console=console
        )
    except StackConfigError as exc:
        console.print(f"[red]Pulumi.{args.stack}.yaml is invalid:[/] {exc}")
        return 2
    except StackStartError as exc:
        console.print(f"✗ {exc}", style="red", markup=False, highlight=False)
        console.print(exc.log_tail, markup=False, highlight=False)
        return 3
    except KeyboardInterrupt:
        console.print("[yellow]interrupted; everything started was stopped[/]")
        return 130
    table = Table(title=f"make compare — profile {profile}")
    table.add_column("Number")
    table.add_column("Baseline", justify="right")
    table.add_column("Optimized", justify="right")
    table.add_column("Opt ÷ base", justify="right")
    ratios = result["ratios_optimized_over_baseline"]
    for key in SHOWN_KEYS:
        table.add_row(
            key,
            report.show(result["baseline"], key),
            report.show(result["optimized"], key),
            report.fmt("x", ratios.get(key)) if key in ratios else "",
        )
    console.print(table)
    console.print(f"written: {out_dir / 'compare.json'}, {out_dir / 'compare.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
