// loadproof chaos load: a steady OPEN-model mix of POST /task while faults are injected (make chaos).
//
// Driven by loadtest/chaos.py through one JSON document in LOADPROOF_CHAOS_CONFIG. Every request is
// written as one line to the console output file (k6 --console-output, --log-format raw):
//
//   R <start epoch ms> <duration ms> <status> <kind> <task id or -> <retry-after or ->
//
// kind: hot (Zipf-drawn persona/topic from a small key space: cache hits and coalescing), new (a topic
// never seen before: a new task), poll (a new task whose client then polls GET /task/{id} until it is
// done), get (one of those polls). Status 0 = no response (connection error or client timeout).
// These per-request lines are the campaign's ground truth: the task ids of every 202, and the
// timestamps that error rates, percentiles and recovery times are computed from (never k6's averages).
import http from 'k6/http';
import { sleep } from 'k6';
import exec from 'k6/execution';

const CFG = JSON.parse(__ENV.LOADPROOF_CHAOS_CONFIG || '{}');
if (!CFG.baseUrl || !CFG.stages || !CFG.mix) {
  throw new Error('LOADPROOF_CHAOS_CONFIG must hold baseUrl, stages and mix (see loadtest/chaos.py)');
}
const URL = `${CFG.baseUrl}/task`;
const TIMEOUT = `${CFG.requestTimeoutS || 10}s`;
const MIX = CFG.mix;

export const options = {
  scenarios: {
    chaos: {
      executor: 'ramping-arrival-rate',
      startRate: CFG.startRate,
      timeUnit: '1s',
      preAllocatedVUs: CFG.preAllocatedVus,
      maxVUs: CFG.maxVus,
      stages: CFG.stages.map((s) => ({ duration: `${s.durationS}s`, target: s.target })),
      gracefulStop: `${(CFG.requestTimeoutS || 10) + (MIX.pollMaxS || 0)}s`,
    },
  },
  discardResponseBodies: true,
  summaryTrendStats: ['p(95)', 'count'],
};

function fnv1a(text) {
  let h = 0x811c9dc5;
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193) >>> 0;
  }
  return h >>> 0;
}

function mulberry32(seed) {
  let a = seed >>> 0;
  return function next() {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function zipfCdf(n, s) {
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

function zipfSample(cdf, u) {
  let lo = 0;
  let hi = cdf.length - 1;
  while (lo < hi) {
    const mid = (lo + hi) >>> 1;
    if (u < cdf[mid]) hi = mid;
    else lo = mid + 1;
  }
  return lo + 1;
}

const PERSONA_CDF = zipfCdf(MIX.personas, MIX.zipfS);
const TOPIC_CDF = zipfCdf(MIX.topics, MIX.zipfS);
let vuRandom = null;
function random() {
  if (vuRandom === null) vuRandom = mulberry32((MIX.seed >>> 0) ^ Math.imul(exec.vu.idInInstance, 0x9e3779b1));
  return vuRandom();
}

const HEADERS = { 'Content-Type': 'application/json' };
const RUN_TAG = fnv1a(CFG.runTag || '').toString(36);

function record(started, res, kind, taskId) {
  const ra = res.headers['Retry-After'];
  console.log(
    `R ${started} ${res.timings.duration.toFixed(3)} ${res.status} ${kind} ${taskId || '-'} ${ra === undefined ? '-' : ra}`,
  );
}

function bodyField(res, name) {
  try {
    return res.json(name);
  } catch (e) {
    return undefined;
  }
}

export default function () {
  const u = random();
  const kind = u < MIX.pollShare ? 'poll' : u < MIX.pollShare + MIX.newShare ? 'new' : 'hot';
  const persona = zipfSample(PERSONA_CDF, random());
  const topic =
    kind === 'hot'
      ? `topic ${zipfSample(TOPIC_CDF, random())}`
      : `chaos ${RUN_TAG}-${exec.vu.idInInstance}-${exec.vu.iterationInInstance}`;
  const started = Date.now();
  const res = http.post(URL, JSON.stringify({ persona_id: `persona-${persona}`, topic }), {
    headers: HEADERS,
    timeout: TIMEOUT,
    responseType: 'text',
  });
  const taskId = res.status === 202 ? bodyField(res, 'task_id') : undefined;
  record(started, res, kind, taskId);
  if (kind !== 'poll' || !taskId) return;
  const until = Date.now() + MIX.pollMaxS * 1000;
  while (Date.now() < until) {
    sleep(MIX.pollIntervalS);
    const t = Date.now();
    const got = http.get(`${URL}/${taskId}`, { timeout: TIMEOUT, responseType: 'text' });
    record(t, got, 'get', taskId);
    const status = got.status === 200 ? bodyField(got, 'status') : undefined;
    if (status === 'done' || status === 'failed' || (got.status >= 400 && got.status < 500)) return;
  }
}

export function handleSummary(data) {
  const dropped = data.metrics.dropped_iterations ? data.metrics.dropped_iterations.values.count : 0;
  const iterations = data.metrics.iterations ? data.metrics.iterations.values.count : 0;
  const out = { stdout: `chaos k6: ${iterations} iterations, ${dropped} dropped\n` };
  if (CFG.summaryPath) out[CFG.summaryPath] = JSON.stringify({ iterations, dropped_iterations: dropped });
  return out;
}
