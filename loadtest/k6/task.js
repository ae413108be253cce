// loadproof load test: POST /task under an OPEN model (arrivals do not wait for responses).
//
// One script for `make demo` (one local k6) and the cluster (N runner pods with
// --execution-segment). Everything comes from one JSON document in LOADPROOF_K6_CONFIG, built by
// common/k6config.py from the stack file, so local and cluster runs cannot drift.
//
// Why an open model: a closed model (VUs looping with sleep) slows its own arrival rate down when
// the service slows down, hiding exactly the latency we want to measure (coordinated omission).
// ramping-arrival-rate starts iterations on a schedule; when no VU is free the iteration is
// *dropped* and counted in `dropped_iterations`, which therefore must be 0 for a valid run.
//
// A flow profile (`flow: true`) is the client's view of the asynchronous work: each arrival POSTs
// /task, then polls GET /task/{id} every `pollMs` until the task is done or failed, or until
// `flowTimeoutS` (a failed flow). The time from just before the POST to the poll that saw `done` is
// the Trend `time_to_post`; every flow's outcome is counted in `flows{outcome}` (for Prometheus)
// and `flow_failed` (for the threshold). Arrivals stay open-model: a slow service holds more VUs
// in flows, it does not slow the arrivals down.
import http from 'k6/http';
import { check, sleep } from 'k6';
import exec from 'k6/execution';
import { Counter, Rate, Trend } from 'k6/metrics';

const CFG = JSON.parse(__ENV.LOADPROOF_K6_CONFIG || '{}');
if (!CFG.baseUrl || !CFG.profile || !CFG.workload || !CFG.thresholds) {
  throw new Error('LOADPROOF_K6_CONFIG must hold baseUrl, profile, workload and thresholds (see common/k6config.py)');
}
const PROFILE = CFG.profile;
const WORKLOAD = CFG.workload;
const LIMITS = CFG.thresholds;
const WARMUP_MS = PROFILE.warmupS * 1000;
const URL = `${CFG.baseUrl}/task`;
const REQUEST_TIMEOUT_S = CFG.requestTimeoutS || 10;
const REQUEST_TIMEOUT = `${REQUEST_TIMEOUT_S}s`;
const FLOW = PROFILE.flow ? { pollMs: PROFILE.pollMs, timeoutMs: PROFILE.flowTimeoutS * 1000 } : null;
// The span held at the peak rate (common/k6config.py plateau_window), if the profile has one: its
// requests are tagged plateau=yes and judged on their own, so "at 1000/s" is measured while 1000/s
// is actually offered, not averaged with the ramps.
const PLATEAU = CFG.plateau || null;
const PLATEAU_THRESHOLDS = PLATEAU
  ? {
      'http_req_duration{plateau:yes}': [`p(95)<${LIMITS.p95Ms}`],
      'http_req_failed{plateau:yes}': [`rate<${LIMITS.errorRate}`],
      'http_reqs{plateau:yes}': ['count>=0'],
    }
  : {};
// Flows are judged on the measured phase like requests: time to post against its own target, and
// flows that failed or timed out against the error-rate target. Polls are HTTP requests too, but
// they carry no `phase` tag (their flow's phase is in `poll`), so every `{phase:...}` HTTP figure
// above is about POST /task alone, in every profile.
const FLOW_THRESHOLDS = FLOW
  ? {
      'time_to_post{phase:measured}': [`p(95)<${LIMITS.timeToPostP95Ms}`],
      'flow_failed{phase:measured}': [`rate<${LIMITS.errorRate}`],
      'flows{phase:measured}': ['count>=0'],
      'http_req_duration{poll:measured}': ['max>=0'],
      'http_req_failed{poll:measured}': ['rate>=0'],
    }
  : {};

export const options = {
  scenarios: {
    task: {
      executor: 'ramping-arrival-rate',
      startRate: PROFILE.startRate,
      timeUnit: '1s',
      preAllocatedVUs: PROFILE.preAllocatedVus,
      maxVUs: PROFILE.maxVus,
      stages: PROFILE.stages.map((s) => ({ duration: s.duration, target: s.target })),
      // In-flight requests may finish after the last stage for at most this long (then they are
      // interrupted and show up as failed); bounded so a stalled service cannot stall the run.
      gracefulStop: `${CFG.gracefulStopS || 10}s`,
    },
  },
  // Thresholds judge only the MEASURED phase: warm-up (cold caches, connection set-up, JIT) is
  // excluded on purpose and stated in every report. We deliberately do NOT also put thresholds on
  // the plain `http_req_duration` / `http_req_failed`: they include the warm-up, so a threshold on
  // them would judge something other than what the report claims. The plain metrics are still in
  // the summary (and in the report) so nobody has to take the exclusion on trust. Dropped
  // iterations are judged over the WHOLE run: load that was never offered (also during warm-up)
  // makes every other number optimistic.
  thresholds: {
    'http_req_duration{phase:measured}': [`p(95)<${LIMITS.p95Ms}`],
    'http_req_failed{phase:measured}': [`rate<${LIMITS.errorRate}`],
    dropped_iterations: ['count==0'],
    // Always-true thresholds: they only make k6 keep these sub-metrics in the summary, so the
    // report can cross-check Prometheus against k6's own numbers per phase.
    'http_reqs{phase:measured}': ['count>=0'],
    'http_reqs{phase:warmup}': ['count>=0'],
    'http_req_duration{phase:warmup}': ['max>=0'],
    'http_req_failed{phase:warmup}': ['rate>=0'],
    'checks{phase:measured}': ['rate>=0'],
    ...PLATEAU_THRESHOLDS,
    ...FLOW_THRESHOLDS,
  },
  summaryTrendStats: ['avg', 'min', 'med', 'p(90)', 'p(95)', 'p(99)', 'max', 'count'],
  discardResponseBodies: true,
};

// ---------- deterministic workload ----------

// 32-bit string hash (FNV-1a), to fold config strings into the seed.
function fnv1a(text) {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

// mulberry32: small, fast, well-distributed 32-bit PRNG; returns floats in [0, 1).
export function mulberry32(seed) {
  let a = seed >>> 0;
  return function next() {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// Cumulative Zipf weights: P(rank k) ∝ 1 / k^s for k = 1..n, normalised so cdf[n-1] = 1.
export function zipfCdf(n, s) {
  if (!(n >= 1)) throw new Error(`zipf key space must be >= 1, got ${n}`);
  const cdf = new Float64Array(n);
  let total = 0;
  for (let k = 1; k <= n; k++) {
    total += 1 / Math.pow(k, s);
    cdf[k - 1] = total;
  }
  for (let i = 0; i < n; i++) cdf[i] /= total;
  cdf[n - 1] = 1;
  return cdf;
}

// Inverse-CDF sampling: the smallest rank whose cumulative weight exceeds u (binary search).
// Returns a 1-based rank; rank 1 is the hottest key.
export function zipfSample(cdf, u) {
  let lo = 0;
  let hi = cdf.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (u < cdf[mid]) hi = mid;
    else lo = mid + 1;
  }
  return lo + 1;
}

const PERSONA_CDF = zipfCdf(WORKLOAD.personas, WORKLOAD.zipfS);
const TOPIC_CDF = zipfCdf(WORKLOAD.topics, WORKLOAD.zipfS);
const SEED = (WORKLOAD.seed >>> 0) ^ fnv1a('loadproof');

// One PRNG stream per VU, seeded from (seed, VU id, execution segment), so that two runs draw the
// same sequences of keys and two runners (segments) never share a stream.
let vuRandom = null;
function random() {
  if (vuRandom === null) {
    const segment = String(exec.test.options.executionSegment || '0:1');
    vuRandom = mulberry32(SEED ^ Math.imul(exec.vu.idInInstance, 0x9e3779b1) ^ fnv1a(segment));
  }
  return vuRandom();
}

const HEADERS = { 'Content-Type': 'application/json' };

// k6 shares the cores with the service here, so the per-iteration work is kept small: measured at
// 1000 requests/s against a trivial target (k6 1.1), reading `exec.*` on every iteration, a fresh
// tags/params object per request and JSON.stringify cost ~80 us of k6's ~550 us per request. What
// is constant for a VU is read once; tag and params objects are shared per (phase, plateau).
let startMs = null; // the scenario's start: constant, but only readable once the test runs

// A never-seen topic: unique to this run (test id), runner (segment), VU and iteration, so no cache
// entry and no in-flight task can answer it — the request costs a new task, as after a cache flush.
const NEW_TOPICS = PROFILE.newTopics || 0;
let newTopicPrefix = null; // test options are readable only once the test runs, not in the init context
let newTopicCount = 0; // this VU's new topics so far: unique per VU, as exec.vu.iterationInInstance was

function newTopic() {
  if (newTopicPrefix === null) {
    const segment = exec.test.options.executionSegment || '0:1';
    const runTag = fnv1a(`${CFG.testId || ''}|${segment}`).toString(36);
    newTopicPrefix = `new ${runTag}-${exec.vu.idInInstance}-`;
  }
  return newTopicPrefix + newTopicCount++;
}

// 200: served from the cache; 202: accepted (new or coalesced task).
const ACCEPTED = { 'status is 200 or 202': (r) => r.status === 200 || r.status === 202 };

const SHARED = {}; // `${phase}|${plateau}` -> the tags, check tags and request params of such requests
function shared(phase, plateau) {
  const key = `${phase}|${plateau}`;
  let s = SHARED[key];
  if (s === undefined) {
    const tags = plateau ? { phase, name: 'POST /task', plateau } : { phase, name: 'POST /task' };
    s = { tags, checkTags: { phase }, params: { headers: HEADERS, tags, timeout: REQUEST_TIMEOUT } };
    SHARED[key] = s;
  }
  return s;
}

export default function () {
  if (startMs === null) startMs = exec.scenario.startTime;
  const persona = zipfSample(PERSONA_CDF, random());
  const fresh = NEW_TOPICS > 0 && random() < NEW_TOPICS;
  const topic = fresh ? newTopic() : `topic ${zipfSample(TOPIC_CDF, random())}`;
  const elapsed = Date.now() - startMs;
  const phase = elapsed < WARMUP_MS ? 'warmup' : 'measured';
  // Written out, not JSON.stringify'd: both values are ours and need no escaping ([a-z0-9 -]).
  const body = `{"persona_id":"persona-${persona}","topic":"${topic}"}`;
  let plateau = '';
  if (PLATEAU) plateau = elapsed >= PLATEAU.startS * 1000 && elapsed < PLATEAU.endS * 1000 ? 'yes' : 'no';
  const s = shared(phase, plateau);
  if (FLOW) {
    clientFlow(body, s.tags, phase);
    return;
  }
  const res = http.post(URL, body, s.params);
  check(res, ACCEPTED, s.checkTags);
}

// ---------- client flow: POST, then poll until the post is there ----------

const timeToPost = new Trend('time_to_post', true);
const flows = new Counter('flows');
const flowFailed = new Rate('flow_failed');
// One name for every poll: k6 then tags its `url` with the name too (verified, k6 1.1), so no tag holds
// a task id, which would make a new Prometheus series per task.
const POLL_NAME = 'GET /task/{id}';

function field(res, name) {
  try {
    const value = res.json(name);
    return typeof value === 'string' ? value : null;
  } catch (e) {
    return null; // not JSON (an error page): no status to read
  }
}

// The terminal states of a task (service/schemas.py TaskStatus); anything else keeps the flow polling.
function terminal(status) {
  return status === 'done' || status === 'failed';
}

// The outcome of a flow that stopped: done, failed (the task failed), timeout (not done within
// flowTimeoutS) or rejected (the POST itself was not accepted: no task to wait for).
export function flowOutcome(status, taskId) {
  if (status === 'done' || status === 'failed') return status;
  return taskId ? 'timeout' : 'rejected';
}

function clientFlow(body, tags, phase) {
  const t0 = Date.now(); // just before the POST: the client's clock starts when it asks
  const deadline = t0 + FLOW.timeoutMs;
  const res = http.post(URL, body, { headers: HEADERS, tags, timeout: REQUEST_TIMEOUT, responseType: 'text' });
  check(res, ACCEPTED, { phase });
  const accepted = res.status === 200 || res.status === 202;
  const taskId = accepted ? field(res, 'task_id') : null;
  let status = accepted ? field(res, 'status') : null;
  while (taskId && !terminal(status)) {
    const left = deadline - Date.now();
    if (left <= 0) break;
    sleep(Math.min(FLOW.pollMs, left) / 1000);
    const remainingS = Math.ceil((deadline - Date.now()) / 1000);
    if (remainingS <= 0) break;
    const poll = http.get(`${URL}/${taskId}`, {
      tags: { name: POLL_NAME, poll: phase },
      timeout: `${Math.min(REQUEST_TIMEOUT_S, remainingS)}s`, // a poll cannot outlast its flow by > 1 s
      responseType: 'text',
    });
    if (poll.status === 200) status = field(poll, 'status'); // a failed poll: poll again
  }
  const outcome = flowOutcome(status, taskId);
  if (outcome === 'done') timeToPost.add(Date.now() - t0, { phase });
  flows.add(1, { phase, outcome });
  flowFailed.add(outcome !== 'done', { phase });
}

// ---------- summary ----------

function fmtMs(v) {
  return v === undefined || v === null ? 'n/a' : `${v.toFixed(1)} ms`;
}

function metricLine(data, name, fields) {
  const m = data.metrics[name];
  if (!m) return `  ${name}: (no samples)`;
  return `  ${name}: ${fields(m.values)}`;
}

function textSummary(data) {
  const trend = (v) =>
    `p50=${fmtMs(v.med)} p95=${fmtMs(v['p(95)'])} p99=${fmtMs(v['p(99)'])} max=${fmtMs(v.max)} n=${v.count}`;
  const rate = (v) => `${(100 * (v.rate || 0)).toFixed(3)} % (${v.passes || 0} of ${(v.passes || 0) + (v.fails || 0)})`;
  const count = (v) => `${v.count} (${(v.rate || 0).toFixed(1)}/s)`;
  const lines = [
    `loadproof k6 summary — test ${CFG.testId || '?'}, profile ${CFG.profileName || '?'}, warm-up ${PROFILE.warmupS}s excluded`,
    metricLine(data, 'http_req_duration{phase:measured}', trend),
    metricLine(data, 'http_req_failed{phase:measured}', rate),
    metricLine(data, 'http_reqs{phase:measured}', count),
    metricLine(data, 'http_req_duration{phase:warmup}', trend),
    metricLine(data, 'http_reqs', count),
    metricLine(data, 'iterations', count),
    metricLine(data, 'dropped_iterations', count),
    ...(FLOW
      ? [
          metricLine(data, 'time_to_post{phase:measured}', trend),
          metricLine(data, 'flow_failed{phase:measured}', rate),
          metricLine(data, 'http_req_duration{poll:measured}', trend),
        ]
      : []),
    'thresholds:',
  ];
  for (const [name, m] of Object.entries(data.metrics)) {
    if (!m.thresholds) continue;
    for (const [expr, t] of Object.entries(m.thresholds)) {
      if (expr.endsWith('>=0')) continue; // bookkeeping thresholds, always true
      lines.push(`  ${t.ok ? 'PASS' : 'FAIL'} ${name}: ${expr}`);
    }
  }
  return lines.join('\n') + '\n';
}

export function handleSummary(data) {
  const out = { stdout: textSummary(data) };
  if (CFG.summaryPath) out[CFG.summaryPath] = JSON.stringify(data, null, 2);
  return out;
}
