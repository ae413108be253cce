"""The k6 script itself: valid options (open model, thresholds), correct Zipf sampling, execution segments."""

from __future__ import annotations

import json
import math
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest

from common.k6config import (
    CONFIG_ENV,
    GRACEFUL_STOP_S,
    SCRIPT,
    duration_seconds,
    execution_segments,
    k6_config,
    peak_arrival_rate,
    segment_sequence,
)
from common.stackconfig import ProfileConfig, StackConfig, Stage, load
from common.tools import tool
from loadtest.bench import ReferenceServer
from tests.flowsink import DONE_AFTER_S, FlowSink, flow_sink

K6 = tool("k6")


@pytest.fixture(scope="module")
def reference_target() -> Iterator[str]:
    """The bare reference app (one Redis GET) on a free port: a fast, real target for k6."""
    with ReferenceServer(1) as ref:
        yield ref.url


def _config_env(profile_name: str = "smoke", **overrides: object) -> dict[str, str]:
    doc = k6_config(load("dev"), base_url="http://127.0.0.1:9", test_id="t-inspect", profile=profile_name)
    doc.update(overrides)
    return {**os.environ, CONFIG_ENV: json.dumps(doc)}


def test_inspect_shows_open_model_and_measured_thresholds() -> None:
    cfg = load("dev")
    prof = cfg.loadtest.profiles["demo"]
    env = _config_env("demo")
    proc = subprocess.run(
        [K6, "inspect", "--include-system-env-vars", "--execution-requirements", str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    opts = json.loads(proc.stdout)
    scenario = opts["scenarios"]["task"]
    assert scenario["executor"] == "ramping-arrival-rate"
    assert scenario["timeUnit"] == "1s"
    assert scenario["startRate"] == prof.start_rate
    assert scenario["preAllocatedVUs"] == prof.pre_allocated_vus
    assert scenario["maxVUs"] == prof.max_vus
    assert [s["target"] for s in scenario["stages"]] == [s.target for s in prof.stages]
    th = opts["thresholds"]
    assert th["http_req_duration{phase:measured}"] == [f"p(95)<{cfg.loadtest.thresholds.p95_ms:g}"]
    assert th["http_req_failed{phase:measured}"] == [f"rate<{cfg.loadtest.thresholds.error_rate:g}"]
    assert th["dropped_iterations"] == ["count==0"]
    # No judging threshold on the warm-up-inclusive plain metrics (see the comment in task.js).
    assert "http_req_duration" not in th and "http_req_failed" not in th


def test_missing_config_is_a_clear_error() -> None:
    env = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    proc = subprocess.run(
        [K6, "inspect", "--include-system-env-vars", str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert CONFIG_ENV in proc.stdout + proc.stderr


_SAMPLER = """
import {{ zipfCdf, zipfSample, mulberry32 }} from '{script}';
const n = {n};
const cdf = zipfCdf(n, {s});
function draw(seed, count) {{
  const rnd = mulberry32(seed);
  const counts = new Array(n).fill(0);
  const first = [];
  for (let i = 0; i < count; i++) {{
    const k = zipfSample(cdf, rnd());
    if (k < 1 || k > n) throw new Error('rank out of range: ' + k);
    counts[k - 1]++;
    if (i < 50) first.push(k);
  }}
  return {{ counts, first }};
}}
const a = draw(7, {count});
const b = draw(7, {count});
const c = draw(8, {count});
const edges = [
  zipfSample(cdf, 0), zipfSample(cdf, 0.999999999), zipfSample(cdf, cdf[0] - 1e-12), zipfSample(cdf, cdf[0]),
];
export const options = {{ iterations: 1, vus: 1 }};
export default function () {{}}
export function handleSummary() {{
  const result = {{ counts: a.counts, firstA: a.first, firstB: b.first, firstC: c.first, edges }};
  return {{ '{out}': JSON.stringify(result) }};
}}
"""


@pytest.fixture(scope="module")
def zipf_draws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    n, s, count = 50, 1.1, 200_000
    tmp = tmp_path_factory.mktemp("zipf")
    out = tmp / "draws.json"
    script = tmp / "sampler.js"
    script.write_text(_SAMPLER.format(script=SCRIPT.as_posix(), n=n, s=s, count=count, out=out.as_posix()))
    proc = subprocess.run(
        [K6, "run", "--quiet", "--no-usage-report", str(script)],
        env=_config_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    data.update({"n": n, "s": s, "count": count})
    yield data


def test_zipf_frequencies_match_the_distribution(zipf_draws: dict[str, object]) -> None:
    n, s, count = int(zipf_draws["n"]), float(zipf_draws["s"]), int(zipf_draws["count"])  # type: ignore[arg-type]
    counts: list[int] = zipf_draws["counts"]  # type: ignore[assignment]
    weights = [1 / k**s for k in range(1, n + 1)]
    total = sum(weights)
    expected = [count * w / total for w in weights]
    assert sum(counts) == count
    # Pearson chi-square with n-1 = 49 degrees of freedom: the 99.9th percentile is ~85.4.
    chi2 = sum((o - e) ** 2 / e for o, e in zip(counts, expected, strict=True))
    assert chi2 < 85.4, f"chi2={chi2:.1f}"
    # The hottest key really is hot, and every key is reachable (not one repeated key).
    assert counts[0] == max(counts)
    assert all(c > 0 for c in counts)
    assert math.isclose(counts[0] / count, weights[0] / total, rel_tol=0.03)


def test_zipf_sequences_are_seeded(zipf_draws: dict[str, object]) -> None:
    assert zipf_draws["firstA"] == zipf_draws["firstB"]  # same seed, same keys: runs are comparable
    assert zipf_draws["firstA"] != zipf_draws["firstC"]
    assert len(set(zipf_draws["firstA"])) > 5  # type: ignore[arg-type]


def test_zipf_inverse_cdf_edges(zipf_draws: dict[str, object]) -> None:
    n = int(zipf_draws["n"])  # type: ignore[arg-type]
    assert zipf_draws["edges"] == [1, n, 1, 2]


def test_execution_segments_tile_the_run() -> None:
    assert execution_segments(1) == ["0:1"]
    assert execution_segments(3) == ["0:1/3", "1/3:2/3", "2/3:1"]
    assert segment_sequence(3) == "0,1/3,2/3,1"


def test_runs_under_execution_segments(reference_target: str, tmp_path: Path) -> None:
    """Two runners, each with its own segment, together offer the whole profile (the cluster layout)."""
    totals = 0
    for i, segment in enumerate(execution_segments(2)):
        summary = tmp_path / f"summary-{i}.json"
        env = _config_env(
            "smoke",
            baseUrl=reference_target,
            summaryPath=str(summary),
            profile={
                "startRate": 20,
                "warmupS": 1,
                "stages": [{"duration": "3s", "target": 20}],
                "preAllocatedVus": 4,
                "maxVus": 20,
            },
        )
        proc = subprocess.run(
            [
                K6,
                "run",
                "--quiet",
                "--no-usage-report",
                "--execution-segment",
                segment,
                "--execution-segment-sequence",
                segment_sequence(2),
                "--tag",
                f"runner={i}",
                str(SCRIPT),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        data = json.loads(summary.read_text())
        reqs = data["metrics"]["http_reqs"]["values"]["count"]
        assert data["metrics"]["http_req_failed"]["values"]["rate"] == 0
        assert 20 <= reqs <= 40, reqs  # about half of 3 s x 20/s each
        totals += reqs
    assert 55 <= totals <= 62, totals  # 3 s x 20/s = 60 arrivals across both segments


class _TopicSink(BaseHTTPRequestHandler):
    """Answers 202 and records every POSTed topic (what the service would see)."""

    topics: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _TopicSink.topics.append(body["topic"])
        self.send_response(202)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize(("new_topics", "cold"), [(1.0, True), (0.0, False)])
def test_new_topics_are_never_repeated_across_vus_runners_and_runs(
    tmp_path: Path, new_topics: float, cold: bool
) -> None:
    """``newTopics: 1`` (the cold profile): every request a topic no earlier request used — in this
    run, on any runner, or in another run (the test id is part of it). 0 keeps the Zipf draw."""
    _TopicSink.topics = []
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _TopicSink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    profile = {"startRate": 40, "warmupS": 0, "stages": [{"duration": "2s", "target": 40}], "newTopics": new_topics}
    try:
        for run, segment in [("run-a", "0:1/2"), ("run-a", "1/2:1"), ("run-b", "0:1")]:
            doc = k6_config(load("dev"), base_url=f"http://127.0.0.1:{sink.server_address[1]}", test_id=run)
            doc["profile"] = {**doc["profile"], **profile, "preAllocatedVus": 8, "maxVus": 16}
            argv = [K6, "run", "--quiet", "--no-usage-report", "--execution-segment", segment]
            if segment != "0:1":
                argv += ["--execution-segment-sequence", "0,1/2,1"]
            proc = subprocess.run(
                [*argv, str(SCRIPT)],
                env={**os.environ, CONFIG_ENV: json.dumps(doc)},
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                cwd=tmp_path,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
    finally:
        sink.shutdown()
    topics = _TopicSink.topics
    assert len(topics) >= 100
    if cold:
        assert len(set(topics)) == len(topics) and all(t.startswith("new ") for t in topics)
    else:
        assert all(t.startswith("topic ") for t in topics) and len(set(topics)) < len(topics)


# ------------------------------------------------------------------ the client flow (flow profiles)

FLOW_TEST = ProfileConfig(
    start_rate=20,
    warmup_s=0,
    new_topics=1.0,
    flow=True,
    poll_ms=100,
    flow_timeout_s=1.5,
    pre_allocated_vus=40,
    max_vus=60,
    stages=[Stage(duration="3s", target=20)],
)


def _with_profile(name: str, profile: ProfileConfig) -> StackConfig:
    cfg = load("dev")
    profiles = {**cfg.loadtest.profiles, name: profile}
    return cfg.model_copy(update={"loadtest": cfg.loadtest.model_copy(update={"profiles": profiles})})


def test_inspect_flow_profile_judges_time_to_post_and_failed_flows() -> None:
    cfg = load("dev")
    prof = cfg.loadtest.profiles["flow"]
    assert prof.flow and prof.new_topics == 1.0 and prof.poll_ms == 250
    assert peak_arrival_rate(prof) == 20 and cfg.loadtest.thresholds.time_to_post_p95_ms == 2500
    proc = subprocess.run(
        [K6, "inspect", "--include-system-env-vars", str(SCRIPT)],
        env=_config_env("flow"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    opts = json.loads(proc.stdout)
    th = opts["thresholds"]
    assert th["time_to_post{phase:measured}"] == ["p(95)<2500"]
    assert th["flow_failed{phase:measured}"] == [f"rate<{cfg.loadtest.thresholds.error_rate:g}"]
    # The POST thresholds are as in every profile (polls carry no `phase`, so they are not in them).
    assert th["http_req_duration{phase:measured}"] == [f"p(95)<{cfg.loadtest.thresholds.p95_ms:g}"]
    assert th["dropped_iterations"] == ["count==0"]
    # The last arrivals' flows may poll for the whole timeout before k6 may interrupt them.
    assert duration_seconds(opts["scenarios"]["task"]["gracefulStop"]) == GRACEFUL_STOP_S + prof.flow_timeout_s
    assert (
        "time_to_post{phase:measured}"
        not in json.loads(
            subprocess.run(
                [K6, "inspect", "--include-system-env-vars", str(SCRIPT)],
                env=_config_env("demo"),
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        )["thresholds"]
    )


def test_a_flow_profile_needs_a_vu_per_flow_in_progress() -> None:
    with pytest.raises(ValueError, match=r"maxVus \(20\) must cover the peak rate \(20/s\) x flowTimeoutS"):
        ProfileConfig(start_rate=20, flow=True, flow_timeout_s=30, max_vus=20, stages=[Stage(duration="5s", target=20)])
    ProfileConfig(start_rate=20, flow=False, max_vus=20, stages=[Stage(duration="5s", target=20)])  # POST only: fine


def test_flow_outcome_names() -> None:
    """``flowOutcome`` of a stopped flow, run by k6 itself."""
    script = (
        f"import {{ flowOutcome }} from '{SCRIPT.as_posix()}';\n"
        "export const options = { iterations: 1, vus: 1 };\n"
        "export default function () {}\n"
        "export function handleSummary() {\n"
        "  const cases = [['done', 'x'], ['failed', 'x'], ['running', 'x'], ['queued', 'x'],\n"
        "                 [null, 'x'], [null, null]];\n"
        "  return { stdout: JSON.stringify(cases.map(([s, id]) => flowOutcome(s, id))) };\n"
        "}\n"
    )
    proc = subprocess.run(
        [K6, "run", "--quiet", "--no-usage-report", "-"],
        input=script,
        env=_config_env("flow"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    outcomes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert outcomes == ["done", "failed", "timeout", "timeout", "timeout", "rejected"]


FlowRun = tuple[FlowSink, dict[str, Any], list[dict[str, Any]]]


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FlowRun]:
    """One real k6 flow run against the scripted sink: (what the sink saw, k6's summary, k6's JSON points)."""
    tmp = tmp_path_factory.mktemp("flow")
    with flow_sink() as sink:
        doc = k6_config(
            _with_profile("t", FLOW_TEST),
            base_url=sink.url,
            test_id="t-flow",
            profile="t",
            summary_path=str(tmp / "summary.json"),
        )
        proc = subprocess.run(
            [K6, "run", "--quiet", "--no-usage-report", "--out", f"json={tmp / 'points.json'}", str(SCRIPT)],
            env={**os.environ, CONFIG_ENV: json.dumps(doc)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=tmp,
        )
    # 30 % of the flows fail (failed, timed out, rejected) and 10 % of the POSTs are 503s: thresholds crossed.
    assert proc.returncode == 99, proc.stdout + proc.stderr
    points = [json.loads(line) for line in (tmp / "points.json").read_text().splitlines()]
    yield sink, json.loads((tmp / "summary.json").read_text()), [p for p in points if p["type"] == "Point"]


def _outcomes(points: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in points:
        if p["metric"] == "flows":
            outcome = p["data"]["tags"]["outcome"]
            out[outcome] = out.get(outcome, 0) + int(p["data"]["value"])
    return out


def test_each_flow_ends_with_the_fate_of_its_task(
    flow_run: FlowRun,
) -> None:
    sink, summary, points = flow_run
    assert 55 <= len(sink.posts) <= 62  # 3 s x 20/s arrivals, one POST each
    assert _outcomes(points) == {f: sink.expected(f) for f in ("done", "failed", "timeout", "rejected")}
    metrics = summary["metrics"]
    failed = metrics["flow_failed{phase:measured}"]["values"]
    assert failed["passes"] == len(sink.posts) - sink.expected("done")  # a Rate's passes are its true values
    assert metrics["time_to_post{phase:measured}"]["values"]["count"] == sink.expected("done")
    thresholds = {k: v["thresholds"] for k, v in metrics.items() if v.get("thresholds")}
    assert thresholds["flow_failed{phase:measured}"]["rate<0.01"]["ok"] is False
    assert metrics.get("dropped_iterations", {}).get("values", {}).get("count", 0) == 0  # a VU per flow


def test_time_to_post_runs_from_the_post_to_the_poll_that_saw_done(
    flow_run: FlowRun,
) -> None:
    _, summary, _ = flow_run
    ttp = summary["metrics"]["time_to_post{phase:measured}"]["values"]
    # Done 300 ms after the POST arrived; polled every 100 ms: seen within one poll (plus the machine's noise).
    assert ttp["min"] >= 1000 * DONE_AFTER_S
    assert ttp["med"] <= 1000 * DONE_AFTER_S + FLOW_TEST.poll_ms + 200


def test_polls_are_tagged_apart_and_bounded_by_the_timeout(
    flow_run: FlowRun,
) -> None:
    sink, summary, points = flow_run
    metrics = summary["metrics"]
    # The `phase` figures are the POSTs alone; the polls are under `poll`.
    assert metrics["http_reqs{phase:measured}"]["values"]["count"] == len(sink.posts)
    assert metrics["http_req_duration{poll:measured}"]["values"]["count"] == len(sink.gets)
    assert metrics["http_reqs"]["values"]["count"] == len(sink.posts) + len(sink.gets)
    # One name and url for every poll: a task id in a tag would be a new Prometheus series per task.
    polls = [p["data"]["tags"] for p in points if p["metric"] == "http_reqs" and p["data"]["tags"]["method"] == "GET"]
    assert len(polls) == len(sink.gets)
    assert {(t["name"], t.get("phase"), t["poll"]) for t in polls} == {("GET /task/{id}", None, "measured")}
    assert len({t["url"] for t in polls}) == 1
    assert not any(task_id in value for t in polls for value in t.values() for task_id in sink.created)
    # A task that never finishes is polled every pollMs until the flow's timeout, then given up.
    never = [tid for tid, (_, what) in sink.created.items() if what == "timeout"]
    per_task = [sum(1 for g in sink.gets if g.endswith(tid)) for tid in never]
    limit = FLOW_TEST.flow_timeout_s * 1000 / FLOW_TEST.poll_ms
    assert never and all(3 <= n <= limit for n in per_task), per_task  # fewer when polls are slow (shared cores)
    # A failed task ends its flow at the first poll that sees it; a rejected POST is never polled.
    failed = [tid for tid, (_, what) in sink.created.items() if what == "failed"]
    assert all(sum(1 for g in sink.gets if g.endswith(tid)) == 1 for tid in failed)
    assert metrics["iteration_duration"]["values"]["max"] < 1000 * (FLOW_TEST.flow_timeout_s + 1.5)
