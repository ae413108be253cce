"""``make compare`` building blocks: the baseline configuration, the ratios, the Markdown section."""

from __future__ import annotations

from common.stackconfig import load
from loadtest.compare import baseline_config, comparison, ratio, render_markdown


def test_baseline_turns_every_optimization_off_and_nothing_else() -> None:
    cfg = load("dev")
    base = baseline_config(cfg)
    assert base.orchestrator.cache_enabled is False
    assert base.orchestrator.db_pool_mode == "null"
    assert base.orchestrator.coalesce_enabled is False
    assert base.orchestrator.accept_group_commit is False
    assert base.orchestrator.cache_lookup_batching is False
    assert base.workers.batch_size == 1
    env, base_env = cfg.service_env(), base.service_env()
    changed = {k for k in env if env[k] != base_env[k]}
    assert changed <= {
        "LOADPROOF_CACHE_ENABLED",
        "LOADPROOF_DB_POOL_MODE",
        "LOADPROOF_COALESCE_ENABLED",
        "LOADPROOF_ACCEPT_GROUP_COMMIT",
        "LOADPROOF_CACHE_LOOKUP_BATCHING",
        "LOADPROOF_BATCH_SIZE",
    }
    assert base.loadtest == cfg.loadtest and base.simulator_env() == cfg.simulator_env()  # same workload


def test_ratios() -> None:
    assert ratio(50.0, 200.0) == 0.25
    assert ratio(0.0, 0.0) is None  # no ratio of nothing
    assert ratio(None, 1.0) is None
    assert ratio(True, 1.0) is None


def test_comparison_and_markdown() -> None:
    base = {"test_id": "b", "p95_latency_ms": 800.0, "error_rate": 0.02, "llm_calls": 1000, "cache_hit_ratio": 0.0,
            "llm_cost_per_1k_tokens_usd": 0.0006}  # fmt: skip
    opt = {"test_id": "o", "p95_latency_ms": 200.0, "error_rate": 0.0, "llm_calls": 150, "cache_hit_ratio": 0.6,
           "llm_cost_per_1k_tokens_usd": 0.0002}  # fmt: skip
    result = comparison(base, opt, profile="smoke")
    r = result["ratios_optimized_over_baseline"]
    assert r == {"p95_latency_ms": 0.25, "error_rate": 0.0, "llm_calls": 0.15, "llm_cost_per_1k_tokens_usd": 0.3333}
    md = render_markdown(result, ["make compare STACK=dev PROFILE=smoke"])
    assert "| `p95_latency_ms` | 800.0 ms (hit 0.00 %) | 200.0 ms (hit 60.00 %) | 0.25 |" in md
    assert "make compare STACK=dev PROFILE=smoke" in md
