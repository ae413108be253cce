"""The measured outputs, defined once: what every run's ``outputs.json`` holds and which of them
``pulumi stack output`` exports.

The local demo (``loadtest.measure``) and the cluster report Job write the same keys; the Pulumi
program exports the subset marked ``stack``. One list, so the two can never drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    key: str
    stack: bool  # also a stack output of `pulumi up`


OUTPUTS = (
    Output("p50_latency_ms", False),
    Output("p95_latency_ms", True),
    Output("p99_latency_ms", True),
    Output("server_p95_latency_ms", True),
    Output("achieved_qps", True),
    Output("target_qps", True),
    Output("error_rate", True),
    Output("dropped_iterations", True),
    Output("plateau_qps", True),  # the figures of the span held at the peak rate, when the profile has one
    Output("plateau_p95_latency_ms", True),
    Output("plateau_error_rate", True),
    Output("cache_hit_ratio", True),
    Output("llm_calls", True),
    Output("llm_tokens", False),
    Output("llm_cost_usd", True),
    Output("llm_cost_per_1k_tokens_usd", True),
    Output("billed_cost_per_1k_tokens_usd", False),
    Output("cost_per_request_usd", True),
    Output("completion_p95_ms", True),
    # Flow profiles only (None otherwise): the client's time from POST to the post, and failed flows.
    Output("time_to_post_p50_ms", False),
    Output("time_to_post_p95_ms", True),
    Output("flow_failed_rate", True),
    # Every profile: the queue backlog's sampled peak and its drain from the last arrival (None: not drained).
    Output("backlog_peak", True),
    Output("backlog_drain_s", True),
    Output("tasks_accepted", True),
    Output("tasks_completed", True),
    Output("tasks_failed", True),
    Output("tasks_lost", True),
    Output("tasks_pending_after_drain", False),
    Output("thresholds_passed", True),
    Output("test_id", True),
    Output("profile", True),
    Output("started_at", False),
    Output("duration_s", False),
    Output("warmup_s", False),
    Output("measured_window_s", False),
    Output("requests", False),
    Output("machine", False),
    Output("grafana_url", False),
    Output("k6_cross_check", False),
    Output("counter_resets", True),
    Output("replicas", True),
)

OUTPUT_KEYS = tuple(o.key for o in OUTPUTS)  # every run's outputs.json
STACK_OUTPUTS = tuple(o.key for o in OUTPUTS if o.stack)  # exported by the Pulumi program
