"""The single source of PromQL for loadproof: dashboards, the measured report and the tests use these.

Function names are the concerns and match the stack outputs (``p95_latency_ms``, ``achieved_qps``,
``error_rate``, ``cache_hit_ratio``, ``llm_cost_per_1k_tokens_usd`` ...), so a number in the report,
a panel title and a query share one word.

Every function takes ``window``, a PromQL range: ``"1m"`` or ``"$__rate_interval"`` for dashboards,
``window_range(seconds)`` for a whole measured window evaluated at the window's end (rate over the
window is then the window's average; a ratio of two increases is the window's ratio). Functions over
k6 series take an optional ``testid``: a literal test id (exact match), :data:`TESTID_VARIABLE` for the
Grafana template variable (regex match, so "All" works), or ``None`` for every run.

k6 names and labels below were verified empirically against k6 1.1.0's ``experimental-prometheus-rw``
output into Prometheus 2.42 with ``K6_PROMETHEUS_RW_TREND_AS_NATIVE_HISTOGRAM=true``:

* trends are *native* histograms named ``k6_<trend>_seconds`` (no ``_bucket``/``le``);
* counters get ``_total``; rates get ``_rate`` and are per-series 0..1 gauges (not aggregatable, so
  the error rate is computed from ``k6_http_reqs_total{expected_response="false"}`` instead);
* HTTP series carry ``testid, scenario, method, status, expected_response, name, url, proto`` and
  ``error_code`` on failures; ``k6_dropped_iterations_total`` / ``k6_iterations_total`` carry
  ``testid, scenario``; ``k6_vus`` / ``k6_vus_max`` only ``testid``.

Several k6 processes pushing the same ``testid`` must differ in at least one tag (e.g. ``--tag
runner=N``), or their identical series collide in Prometheus; every query here sums across such tags.
"""

from __future__ import annotations

from prometheus_client.metrics import MetricWrapperBase

from service import metrics as m

# --- k6 remote-write series (verified, see module docstring) ---
K6_HTTP_REQ_DURATION = "k6_http_req_duration_seconds"  # native histogram
K6_HTTP_REQ_WAITING = "k6_http_req_waiting_seconds"  # native histogram (time to first byte)
K6_HTTP_REQS = "k6_http_reqs_total"
K6_HTTP_REQ_FAILED = "k6_http_req_failed_rate"  # per-series 0/1 gauge; do not average it
K6_ITERATIONS = "k6_iterations_total"
K6_DROPPED_ITERATIONS = "k6_dropped_iterations_total"
K6_ITERATION_DURATION = "k6_iteration_duration_seconds"  # native histogram
K6_VUS = "k6_vus"
# Flow profiles (loadtest/k6/task.js clientFlow), verified the same way: a time Trend becomes a native
# histogram in seconds, a Counter gains `_total`. Both carry `phase`; `flows` also `outcome`.
K6_TIME_TO_POST = "k6_time_to_post_seconds"  # native histogram: POST -> the poll that saw `done`
K6_FLOWS = "k6_flows_total"  # outcome = done|failed|timeout|rejected
FLOW_DONE = "done"
# Polls carry their flow's phase in `poll` (not `phase`, so the `phase` figures stay POST /task only).
K6_POLL_LABEL = "poll"
K6_VUS_MAX = "k6_vus_max"
K6_TESTID_LABEL = "testid"
# Tag that tells parallel k6 runners of one test apart (``--tag runner=<index>``). Without it their
# identical series collide: Prometheus rejects one runner's samples as out of order (verified: two
# runners of 241 requests each summed to 241, not 482).
K6_RUNNER_LABEL = "runner"

# Grafana template variable holding the selected test id(s).
TESTID_VARIABLE = "$testid"

# The endpoint the load test drives; the server-side latency/QPS/error queries are about it.
TASK_ROUTE = "/task"
TASK_METHOD = "POST"

Labels = dict[str, str]


def _name(metric: MetricWrapperBase) -> str:
    """Exposition name of a prometheus-client metric object (counters gain ``_total`` in exposition)."""
    family = next(iter(metric.describe()))
    return f"{family.name}_total" if family.type == "counter" else family.name


# --- service series (exposition names, derived from service/metrics.py so they cannot drift) ---
HTTP_REQUEST_DURATION = _name(m.HTTP_REQUEST_DURATION)
HTTP_REQUESTS = _name(m.HTTP_REQUESTS)
HTTP_INFLIGHT = _name(m.HTTP_INFLIGHT)
HTTP_REJECTED = _name(m.HTTP_REJECTED)
HTTP_LOOP_LAG = _name(m.HTTP_LOOP_LAG)
HTTP_SHED_SHARE = _name(m.HTTP_SHED_SHARE)
CACHE_LOOKUPS = _name(m.CACHE_LOOKUPS)
CACHE_ERRORS = _name(m.CACHE_ERRORS)
CACHE_BREAKER_OPEN = _name(m.CACHE_BREAKER_OPEN)
TASKS = _name(m.TASKS)
TASK_COMPLETION = _name(m.TASK_COMPLETION)
QUEUE_DEPTH = _name(m.QUEUE_DEPTH)
QUEUE_PENDING = _name(m.QUEUE_PENDING)
DB_POOL_IN_USE = _name(m.DB_POOL_IN_USE)
DB_POOL_OVERFLOW = _name(m.DB_POOL_OVERFLOW)
DB_POOL_WAITERS = _name(m.DB_POOL_WAITERS)
DB_POOL_WAIT = _name(m.DB_POOL_WAIT)
LLM_REQUESTS = _name(m.LLM_REQUESTS)
LLM_DURATION = _name(m.LLM_DURATION)
LLM_BATCH_SIZE = _name(m.LLM_BATCH_SIZE)
LLM_TOKENS = _name(m.LLM_TOKENS)
LLM_COST = _name(m.LLM_COST)
LLM_BREAKER_OPEN = _name(m.LLM_BREAKER_OPEN)
LLM_INFLIGHT = _name(m.LLM_INFLIGHT)
LLM_CONCURRENCY_LIMIT = _name(m.LLM_CONCURRENCY_LIMIT)
LLM_BUDGET_REMAINING = _name(m.LLM_BUDGET_REMAINING)
LLM_CONCURRENCY_WAITS = _name(m.LLM_CONCURRENCY_WAITS)
TOKENS_DELIVERED = _name(m.TOKENS_DELIVERED)


def window_range(seconds: float) -> str:
    """PromQL range for a measured window of ``seconds`` (evaluate the query at the window's end)."""
    whole = round(seconds)
    if whole < 1:
        raise ValueError(f"window must be at least 1s, got {seconds!r}")
    return f"{whole}s"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def selector(metric: str, labels: Labels | None = None, *, regex: Labels | None = None) -> str:
    """``metric{a="x",b=~"y"}``: exact matchers from ``labels``, regex matchers from ``regex``."""
    parts = [f"{k}={_quote(v)}" for k, v in (labels or {}).items()]
    parts += [f"{k}=~{_quote(v)}" for k, v in (regex or {}).items()]
    return f"{metric}{{{','.join(parts)}}}" if parts else metric


def k6_selector(metric: str, testid: str | None, labels: Labels | None = None) -> str:
    """A k6 series narrowed to one run (exact), the dashboard variable (regex) or all runs (None)."""
    if testid is None:
        return selector(metric, labels)
    if testid == TESTID_VARIABLE:
        return selector(metric, labels, regex={K6_TESTID_LABEL: testid})
    return selector(metric, {**(labels or {}), K6_TESTID_LABEL: testid})


def _task(extra: Labels | None = None) -> Labels:
    return {"route": TASK_ROUTE, "method": TASK_METHOD, **(extra or {})}


def _or_zero(expr: str, witness: str) -> str:
    """``expr``, or 0 when it has no series but ``witness`` does.

    A counter series only exists once its event happened (no drop, no failure yet), so "absent"
    must read 0 - but only while the data it belongs to exists; otherwise "no data" stays "no data"
    instead of a reassuring, unmeasured 0.
    """
    return f"({expr}) or (0 * ({witness}))"


def _ratio(part: str, whole: str) -> str:
    """``part / whole`` where an absent ``part`` (no such event yet) means 0, not "no data"."""
    return f"({part} or vector(0)) / {whole}"


# loadtest/k6/task.js tags every request with phase=warmup|measured; the report and the headline
# stat panels judge the measured phase only (warm-up excluded, as stated in every report).
K6_PHASE_LABEL = "phase"
MEASURED_PHASE = "measured"
# The k6 request name of every POST /task; a flow profile's polls are named "GET /task/{id}". Selects
# the accept path over the whole run (warm-up included), e.g. for time series.
K6_TASK_POST = {"name": "POST /task"}


def _phase(phase: str | None, labels: Labels | None = None) -> Labels:
    return {**(labels or {}), **({K6_PHASE_LABEL: phase} if phase else {})}


# ===================== headline numbers (client side, from k6) =====================


def latency_quantile_ms(
    quantile: float, window: str, testid: str | None = None, phase: str | None = None, labels: Labels | None = None
) -> str:
    """Client-observed latency quantile in ms from k6's native histogram (optionally one phase, or ``labels``)."""
    sel = k6_selector(K6_HTTP_REQ_DURATION, testid, _phase(phase, labels))
    return f"histogram_quantile({quantile}, sum(rate({sel}[{window}]))) * 1000"


def p95_latency_ms(window: str, testid: str | None = None, phase: str | None = None) -> str:
    """Client p95 latency (ms) as k6 saw it: connect + send + wait + receive, queueing included."""
    return latency_quantile_ms(0.95, window, testid, phase)


def achieved_qps(window: str, testid: str | None = None, phase: str | None = None, labels: Labels | None = None) -> str:
    """Requests per second k6 actually completed (not the configured arrival rate)."""
    return f"sum(rate({k6_selector(K6_HTTP_REQS, testid, _phase(phase, labels))}[{window}]))"


def error_rate(window: str, testid: str | None = None, phase: str | None = None, labels: Labels | None = None) -> str:
    """Fraction of k6 requests that failed (unexpected status, timeout or connection error)."""
    sel = k6_selector(K6_HTTP_REQS, testid, _phase(phase, {**(labels or {}), "expected_response": "false"}))
    return _ratio(f"sum(rate({sel}[{window}]))", achieved_qps(window, testid, phase, labels))


def peak_qps(window: str, testid: str | None = None, smoothing: str = "30s", step: str = "5s") -> str:
    """Highest ``smoothing``-averaged k6 throughput inside ``window``: the sustained peak, not a spike."""
    return f"max_over_time(({achieved_qps(smoothing, testid)})[{window}:{step}])"


def dropped_iterations(window: str, testid: str | None = None) -> str:
    """Arrivals k6 could not start (VU ceiling hit): non-zero means the offered load was not offered."""
    dropped = f"sum(increase({k6_selector(K6_DROPPED_ITERATIONS, testid)}[{window}]))"
    return _or_zero(dropped, achieved_qps(window, testid))


def dropped_iterations_per_s(window: str, testid: str | None = None) -> str:
    """Rate of dropped iterations, for time series."""
    dropped = f"sum(rate({k6_selector(K6_DROPPED_ITERATIONS, testid)}[{window}]))"
    return _or_zero(dropped, achieved_qps(window, testid))


def k6_vus(testid: str | None = None) -> str:
    """Active k6 VUs (summed over runners)."""
    return f"sum({k6_selector(K6_VUS, testid)})"


# Exact per-run totals. k6 counters start at 0 with the run and never reset, but Prometheus's
# increase() cannot see a series' first pushed sample (and extrapolates), so it undercounts series
# that appear mid-window (e.g. the first 5xx). The difference of last values is exact instead.
# Requires a literal testid: without it, earlier runs' totals would be mixed in.


def k6_window_total(metric: str, window: str, testid: str, labels: Labels | None = None, lookback: str = "1d") -> str:
    """Exact count of a k6 counter within ``window`` ending at the evaluation time, for one run."""
    if testid in ("", TESTID_VARIABLE):
        raise ValueError("k6_window_total needs a literal testid")
    sel = k6_selector(metric, testid, labels)
    before = f"(sum(last_over_time({sel}[{lookback}] offset {window})) or vector(0))"
    return f"sum(last_over_time({sel}[{window}])) - {before}"


def _k6_window_witness(window: str, testid: str) -> str:
    return f"sum(last_over_time({k6_selector(K6_HTTP_REQS, testid)}[{window}]))"


def requests_total(window: str, testid: str) -> str:
    """Exact number of k6 requests completed in the window (one run)."""
    return k6_window_total(K6_HTTP_REQS, window, testid)


def failed_requests_total(window: str, testid: str) -> str:
    """Exact number of failed k6 requests in the window (one run); 0 when none failed."""
    failed = k6_window_total(K6_HTTP_REQS, window, testid, {"expected_response": "false"})
    return _or_zero(f"({failed})", _k6_window_witness(window, testid))


def dropped_iterations_total(window: str, testid: str) -> str:
    """Exact number of dropped k6 iterations in the window (one run); 0 when none."""
    dropped = k6_window_total(K6_DROPPED_ITERATIONS, window, testid)
    return _or_zero(f"({dropped})", _k6_window_witness(window, testid))


# Whole-run (or whole-phase) numbers from cumulative k6 series. k6 tags each request with
# ``phase`` = warmup|measured (loadtest/k6/task.js), so the measured phase is a label selection, not
# a time window: its series start at 0 when the phase starts, and their value at the run's end is the
# phase's exact total. Evaluate at (or within Prometheus' 5 min lookback after) the run's last push.
# No rate()/increase(): nothing is extrapolated and no first sample is lost. Native histograms are
# summed as-is (last_over_time() of native histograms is broken in Prometheus 2.42).


def run_latency_quantile_ms(
    quantile: float, testid: str, phase: str | None = MEASURED_PHASE, labels: Labels | None = None
) -> str:
    """Client latency quantile (ms) over every request of one run's phase, all runners merged."""
    sel = k6_selector(K6_HTTP_REQ_DURATION, testid, _phase(phase, labels))
    return f"histogram_quantile({quantile}, sum({sel})) * 1000"


def run_p95_latency_ms(testid: str, phase: str | None = MEASURED_PHASE) -> str:
    """Client p95 (ms) of one run's measured phase: the number the k6 threshold judges."""
    return run_latency_quantile_ms(0.95, testid, phase)


def run_trend_quantile_ms(metric: str, quantile: float, testid: str, labels: Labels | None = None) -> str:
    """Quantile (ms) of any k6 time Trend over one run (e.g. ``time_to_post`` of the measured phase),
    all runners merged by summing their native histograms, as for the request latency."""
    return f"histogram_quantile({quantile}, sum({k6_selector(metric, testid, labels)})) * 1000"


def run_time_to_post_ms(quantile: float, testid: str, phase: str | None = MEASURED_PHASE) -> str:
    """Time to post (ms): from just before ``POST /task`` to the poll that saw the task done (flow profiles)."""
    return run_trend_quantile_ms(K6_TIME_TO_POST, quantile, testid, _phase(phase))


def time_to_post_quantile_ms(quantile: float, window: str, testid: str | None = None) -> str:
    """Time to post (ms) of the flows that finished within ``window``, for time series and panels."""
    sel = k6_selector(K6_TIME_TO_POST, testid)
    return f"histogram_quantile({quantile}, sum(rate({sel}[{window}]))) * 1000"


PLATEAU = {"plateau": "yes"}  # k6 tag on requests started while the peak rate was held


def run_total(metric: str, testid: str, labels: Labels | None = None, phase: str | None = None) -> str:
    """Exact total of a k6 counter for one run (optionally one phase); 0 when the series never appeared
    but the run's requests are there; no data when the run is not (or no longer) visible."""
    total = f"sum({k6_selector(metric, testid, _phase(phase, labels))})"
    return _or_zero(total, f"sum({k6_selector(K6_HTTP_REQS, testid)})")


def run_error_rate(testid: str, phase: str | None = MEASURED_PHASE) -> str:
    """Failed / all k6 requests of one run's phase, exact."""
    failed = run_total(K6_HTTP_REQS, testid, {"expected_response": "false"}, phase)
    return f"({failed}) / ({run_total(K6_HTTP_REQS, testid, phase=phase)})"


# ===================== server side (scraped from the service) =====================


def server_latency_quantile_ms(quantile: float, window: str) -> str:
    """Server-side latency quantile (ms) of ``POST /task`` from the classic histogram."""
    sel = selector(HTTP_REQUEST_DURATION + "_bucket", _task())
    return f"histogram_quantile({quantile}, sum by (le) (rate({sel}[{window}]))) * 1000"


def server_p95_latency_ms(window: str) -> str:
    """Server p95 (ms) of ``POST /task``: excludes network and client queueing; bucket-interpolated."""
    return server_latency_quantile_ms(0.95, window)


def server_qps(window: str) -> str:
    """``POST /task`` requests per second the service answered."""
    return f"sum(rate({selector(HTTP_REQUESTS, _task())}[{window}]))"


def server_error_rate(window: str) -> str:
    """Fraction of ``POST /task`` answered with 5xx (503 overload included; 4xx are the client's)."""
    errors = f"sum(rate({selector(HTTP_REQUESTS, _task(), regex={'status': '5..'})}[{window}]))"
    return _ratio(errors, server_qps(window))


def requests_by_status(window: str) -> str:
    """Per-status request rate of every route, for the errors panel."""
    return f"sum by (route, status) (rate({HTTP_REQUESTS}[{window}]))"


def rejected_per_s(window: str) -> str:
    """Requests refused before handling (overload, queue_wait, loop_lag, too_large, body_timeout), per reason."""
    return f"sum by (reason) (rate({HTTP_REJECTED}[{window}]))"


def rejected_for_per_s(reason: str, window: str) -> str:
    """Requests refused for one ``reason`` per second, as one series (the report plots each reason)."""
    return f'sum(rate({HTTP_REJECTED}{{reason="{reason}"}}[{window}]))'


def overload_loop_lag_ms() -> str:
    """The largest per-process loop lag of the last lag-shedding window (service.guard.OverloadShedder)."""
    return f"max({HTTP_LOOP_LAG}) * 1000"


def overload_shed_share_pct() -> str:
    """The largest per-process share of new requests shed on loop lag, in percent."""
    return f"max({HTTP_SHED_SHARE}) * 100"


def http_inflight() -> str:
    """HTTP requests in flight across all API processes."""
    return f"sum({HTTP_INFLIGHT})"


# ---- cache ----


def cache_hit_ratio(window: str) -> str:
    """hits / (hits + misses) of the response cache; a Redis failure counts as a miss."""
    hits = f"sum(rate({selector(CACHE_LOOKUPS, {'result': 'hit'})}[{window}]))"
    return _ratio(hits, f"sum(rate({CACHE_LOOKUPS}[{window}]))")


def cache_errors_per_s(window: str) -> str:
    """Redis failures seen by the cache, per operation."""
    return f"sum by (op) (rate({CACHE_ERRORS}[{window}]))"


# ---- cost ----


def llm_spend_usd(window: str) -> str:
    """USD spent on LLM calls within the window."""
    return f"sum(increase({LLM_COST}[{window}]))"


def llm_cost_per_1k_tokens_usd(window: str) -> str:
    """Effective USD per 1k *delivered* tokens: LLM spend / tokens handed to clients (cache hits at $0)."""
    return f"{llm_spend_usd(window)} / sum(increase({TOKENS_DELIVERED}[{window}])) * 1000"


def billed_cost_per_1k_tokens_usd(window: str) -> str:
    """USD per 1k *billed* tokens (input + output from `usage`): the raw price, no cache benefit."""
    return f"{llm_spend_usd(window)} / sum(increase({LLM_TOKENS}[{window}])) * 1000"


def cost_per_request_usd(window: str) -> str:
    """LLM spend per successful ``POST /task`` (cache hits and coalesced requests included)."""
    ok = f"sum(increase({selector(HTTP_REQUESTS, _task(), regex={'status': '2..'})}[{window}]))"
    return f"{llm_spend_usd(window)} / {ok}"


def llm_spend_usd_per_hour(window: str) -> str:
    """Spend rate, USD/hour, for time series."""
    return f"sum(rate({LLM_COST}[{window}])) * 3600"


# ---- tasks ----


def completion_quantile_ms(quantile: float, window: str) -> str:
    """Quantile (ms) of acceptance (202) -> stored result."""
    sel = selector(TASK_COMPLETION + "_bucket")
    return f"histogram_quantile({quantile}, sum by (le) (rate({sel}[{window}]))) * 1000"


def completion_p95_ms(window: str) -> str:
    """p95 (ms) from a task's acceptance to its stored result (the asynchronous part of the work)."""
    return completion_quantile_ms(0.95, window)


def tasks_per_s(window: str) -> str:
    """Task lifecycle events per second, by event."""
    return f"sum by (event) (rate({TASKS}[{window}]))"


def tasks_total(event: str, window: str) -> str:
    """Count of one task lifecycle event within the window (e.g. ``dead_lettered``)."""
    events = f"sum(increase({selector(TASKS, {'event': event})}[{window}]))"
    return _or_zero(events, f"sum(increase({TASKS}[{window}]))")


def queue_depth() -> str:
    """Entries not yet delivered; every process reports the same stream, so max, not sum."""
    return f"max({QUEUE_DEPTH})"


def queue_pending() -> str:
    """Entries delivered but not acknowledged (being worked on or owned by a dead consumer)."""
    return f"max({QUEUE_PENDING})"


def backlog() -> str:
    """Tasks in the queue not yet finished: undelivered + delivered-but-unacknowledged entries.

    Both gauges are sampled by the workers every few seconds and scraped; with neither series there
    is no data (never a reassuring 0).
    """
    return f"({queue_depth()}) + ({queue_pending()})"


# ---- scale ----


def observed_replicas(job: str, window: str, step: str) -> str:
    """Most scrape targets of ``job`` up at once within ``window`` (sampled every ``step``): the replicas
    that really ran (the HPA changes them mid-run), not the configured count."""
    return f"max_over_time(count({selector('up', {'job': job})} == 1)[{window}:{step}])"


# ---- database pool ----


def db_pool_in_use() -> str:
    """Checked-out connections across all processes."""
    return f"sum({DB_POOL_IN_USE})"


def db_pool_overflow() -> str:
    """Connections open above pool_size across all processes."""
    return f"sum({DB_POOL_OVERFLOW})"


def db_pool_waiters() -> str:
    """Callers waiting for a connection across all processes: > 0 means the pool is the bottleneck."""
    return f"sum({DB_POOL_WAITERS})"


def db_pool_wait_p95_ms(window: str) -> str:
    """p95 (ms) of connection acquisition."""
    sel = selector(DB_POOL_WAIT + "_bucket")
    return f"histogram_quantile(0.95, sum by (le) (rate({sel}[{window}]))) * 1000"


# ---- LLM ----


def llm_calls_per_s(window: str) -> str:
    """LLM HTTP calls per second by outcome (ok, rate_limited, server_error, timeout, ...)."""
    return f"sum by (outcome) (rate({LLM_REQUESTS}[{window}]))"


def llm_error_ratio(window: str) -> str:
    """Fraction of LLM calls that did not succeed (retries make this differ from task failures)."""
    failed = f'sum(rate({LLM_REQUESTS}{{outcome!="ok"}}[{window}]))'
    return _ratio(failed, f"sum(rate({LLM_REQUESTS}[{window}]))")


def llm_p95_ms(window: str) -> str:
    """p95 (ms) of one LLM call."""
    sel = selector(LLM_DURATION + "_bucket")
    return f"histogram_quantile(0.95, sum by (le) (rate({sel}[{window}]))) * 1000"


def llm_batch_size_mean(window: str) -> str:
    """Mean items per LLM call: how well batching fills."""
    return f"sum(rate({LLM_BATCH_SIZE}_sum[{window}])) / sum(rate({LLM_BATCH_SIZE}_count[{window}]))"


def llm_batch_size_p95(window: str) -> str:
    """p95 items per LLM call."""
    return f"histogram_quantile(0.95, sum by (le) (rate({LLM_BATCH_SIZE}_bucket[{window}])))"


def llm_tokens_per_s(window: str) -> str:
    """Billed tokens per second by type (input/output)."""
    return f"sum by (type) (rate({LLM_TOKENS}[{window}]))"


def tokens_delivered_per_s(window: str) -> str:
    """Delivered tokens per second by source (llm/cache)."""
    return f"sum by (source) (rate({TOKENS_DELIVERED}[{window}]))"


def llm_inflight() -> str:
    """LLM calls in flight across all workers."""
    return f"sum({LLM_INFLIGHT})"


def llm_concurrency_limit() -> str:
    """The adaptive limiter's concurrency limit summed over worker processes (each has its own)."""
    return f"sum({LLM_CONCURRENCY_LIMIT})"


def llm_budget_remaining() -> str:
    """Rate budget left by kind (requests, tokens) in the most constrained worker process: the
    provider's figure is account-wide, so a sum would count it once per process."""
    return f"min by (kind) ({LLM_BUDGET_REMAINING})"


def llm_concurrency_waits_per_s(window: str) -> str:
    """LLM calls per second that waited for the limiter, by what held them (concurrency, requests,
    tokens, rate_limited)."""
    return f"sum by (reason) (rate({LLM_CONCURRENCY_WAITS}[{window}]))"


def breakers_open() -> str:
    """Open circuit breakers by kind (1 = open somewhere)."""
    return (
        f'label_replace(max({CACHE_BREAKER_OPEN}), "breaker", "cache", "", "")'
        f' or label_replace(max({LLM_BREAKER_OPEN}), "breaker", "llm", "", "")'
    )


# ===================== catalogues (stack outputs, tests) =====================


def headline(window: str, testid: str | None = None) -> dict[str, str]:
    """The headline numbers, keyed by their stack-output names."""
    return {
        "p95_latency_ms": p95_latency_ms(window, testid),
        "server_p95_latency_ms": server_p95_latency_ms(window),
        "achieved_qps": achieved_qps(window, testid),
        "peak_qps": peak_qps(window, testid),
        "error_rate": error_rate(window, testid),
        "server_error_rate": server_error_rate(window),
        "cache_hit_ratio": cache_hit_ratio(window),
        "llm_cost_per_1k_tokens_usd": llm_cost_per_1k_tokens_usd(window),
        "billed_cost_per_1k_tokens_usd": billed_cost_per_1k_tokens_usd(window),
        "cost_per_request_usd": cost_per_request_usd(window),
        "llm_spend_usd": llm_spend_usd(window),
        "completion_p95_ms": completion_p95_ms(window),
        "dropped_iterations": dropped_iterations(window, testid),
    }


def all_queries(window: str, testid: str | None = None) -> dict[str, str]:
    """Every expression this module builds, by name (the tests evaluate each against Prometheus)."""
    out = headline(window, testid)
    out.update(
        {
            "p95_latency_ms_measured": p95_latency_ms(window, testid, MEASURED_PHASE),
            "error_rate_measured": error_rate(window, testid, MEASURED_PHASE),
            "achieved_qps_measured": achieved_qps(window, testid, MEASURED_PHASE),
            "p50_latency_ms": latency_quantile_ms(0.5, window, testid),
            "p99_latency_ms": latency_quantile_ms(0.99, window, testid),
            "server_p99_latency_ms": server_latency_quantile_ms(0.99, window),
            "dropped_iterations_per_s": dropped_iterations_per_s(window, testid),
            "k6_vus": k6_vus(testid),
            "server_qps": server_qps(window),
            "requests_by_status": requests_by_status(window),
            "rejected_per_s": rejected_per_s(window),
            "rejected_loop_lag_per_s": rejected_for_per_s("loop_lag", window),
            "http_inflight": http_inflight(),
            "cache_errors_per_s": cache_errors_per_s(window),
            "llm_spend_usd_per_hour": llm_spend_usd_per_hour(window),
            "completion_p50_ms": completion_quantile_ms(0.5, window),
            "tasks_per_s": tasks_per_s(window),
            "dead_lettered": tasks_total("dead_lettered", window),
            "queue_depth": queue_depth(),
            "queue_pending": queue_pending(),
            "backlog": backlog(),
            "time_to_post_p95_ms": time_to_post_quantile_ms(0.95, window, testid),
            "llm_concurrency_limit": llm_concurrency_limit(),
            "observed_replicas": observed_replicas("orchestrator", window, "5s"),
            "db_pool_in_use": db_pool_in_use(),
            "db_pool_overflow": db_pool_overflow(),
            "db_pool_waiters": db_pool_waiters(),
            "db_pool_wait_p95_ms": db_pool_wait_p95_ms(window),
            "llm_calls_per_s": llm_calls_per_s(window),
            "llm_error_ratio": llm_error_ratio(window),
            "llm_p95_ms": llm_p95_ms(window),
            "llm_batch_size_mean": llm_batch_size_mean(window),
            "llm_batch_size_p95": llm_batch_size_p95(window),
            "llm_tokens_per_s": llm_tokens_per_s(window),
            "tokens_delivered_per_s": tokens_delivered_per_s(window),
            "llm_inflight": llm_inflight(),
            "llm_budget_remaining": llm_budget_remaining(),
            "llm_concurrency_waits_per_s": llm_concurrency_waits_per_s(window),
            "breakers_open": breakers_open(),
        }
    )
    if testid not in (None, TESTID_VARIABLE):
        out["run_p95_latency_ms"] = run_p95_latency_ms(testid)
        out["run_requests_total"] = run_total(K6_HTTP_REQS, testid, phase=MEASURED_PHASE)
        out["run_error_rate"] = run_error_rate(testid)
        out["run_time_to_post_p95_ms"] = run_time_to_post_ms(0.95, testid)
        out["run_flows_total"] = run_total(K6_FLOWS, testid, phase=MEASURED_PHASE)
        out["requests_total"] = requests_total(window, testid)
        out["failed_requests_total"] = failed_requests_total(window, testid)
        out["dropped_iterations_total"] = dropped_iterations_total(window, testid)
    return out
