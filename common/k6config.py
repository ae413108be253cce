"""How the one k6 script (`loadtest/k6/task.js`) is parameterised, for the demo and the cluster alike.

The script reads a single JSON document from ``LOADPROOF_K6_CONFIG`` so that local runs and the
Kubernetes runner Jobs cannot drift: both build it here from the same :class:`StackConfig`.
"""

from __future__ import annotations

import itertools
import json
from fractions import Fraction
from pathlib import Path

from common.stackconfig import REPO_ROOT, ProfileConfig, StackConfig

SCRIPT = REPO_ROOT / "loadtest" / "k6" / "task.js"
CONFIG_ENV = "LOADPROOF_K6_CONFIG"


# Per-request timeout and the scenario's gracefulStop: bounded so a stalled service ends the run
# (timed-out requests count as failed) instead of hanging it.
REQUEST_TIMEOUT_S = 10
GRACEFUL_STOP_S = 10


def graceful_stop_s(profile: ProfileConfig) -> float:
    """How long iterations may run on after the last arrival before k6 interrupts them.

    A flow polls for up to ``flowTimeoutS`` after its POST, so a flow profile's last arrivals need
    that much longer: interrupted flows would never record their outcome.
    """
    return GRACEFUL_STOP_S + (profile.flow_timeout_s if profile.flow else 0.0)


def peak_arrival_rate(profile: ProfileConfig) -> int:
    """The profile's highest configured arrival rate (requests/s): the QPS the run claims to offer."""
    return max([profile.start_rate, *(s.target for s in profile.stages)])


def duration_seconds(text: str) -> float:
    """k6 duration (``1m30s``, ``20s``, ``500ms``, ``2h``) in seconds."""
    total, number = 0.0, ""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isdigit() or ch == ".":
            number += ch
            i += 1
            continue
        unit = "ms" if text.startswith("ms", i) else ch
        if unit not in units or not number:
            raise ValueError(f"bad k6 duration {text!r}")
        total += float(number) * units[unit]
        number = ""
        i += len(unit)
    if number:
        raise ValueError(f"k6 duration {text!r} lacks a unit")
    return total


def profile_duration_s(profile: ProfileConfig) -> float:
    return sum(duration_seconds(s.duration) for s in profile.stages)


def plateau_window(profile: ProfileConfig) -> tuple[float, float] | None:
    """(start, end) seconds from the run's start of the longest span held at the peak rate, or None.

    "At 1000 QPS" has to mean a time when 1000/s was actually offered: a ramp that touches the peak
    and turns back offers it for an instant. A span counts when a stage starts and ends at the peak;
    the part of it inside the warm-up is excluded, like everywhere else.
    """
    peak = peak_arrival_rate(profile)
    best: tuple[float, float] | None = None
    t, rate, span_start = 0.0, profile.start_rate, None
    for stage in profile.stages:
        length = duration_seconds(stage.duration)
        if rate == peak and stage.target == peak:
            span_start = t if span_start is None else span_start
            if best is None or t + length - span_start > best[1] - best[0]:
                best = (span_start, t + length)
        else:
            span_start = None
        t, rate = t + length, stage.target
    if best is None or best[1] <= profile.warmup_s:
        return None
    return (max(best[0], float(profile.warmup_s)), best[1])  # the warm-up is excluded here too


def k6_config(
    cfg: StackConfig,
    *,
    base_url: str,
    test_id: str,
    profile: str | None = None,
    summary_path: str | None = None,
    request_timeout_s: int = REQUEST_TIMEOUT_S,
    graceful_stop: float | None = None,
) -> dict[str, object]:
    """The JSON document the script reads (camelCase, as in the stack file).

    ``summary_path``: where ``handleSummary`` writes k6's end-of-test JSON (omitted: stdout only).
    ``graceful_stop``: seconds (default :func:`graceful_stop_s` of the profile).
    """
    name = profile or cfg.loadtest.profile
    prof = cfg.loadtest.profiles[name]
    doc: dict[str, object] = {
        "baseUrl": base_url.rstrip("/"),
        "testId": test_id,
        "profileName": name,
        "profile": prof.model_dump(by_alias=True),
        "workload": cfg.loadtest.workload.model_dump(by_alias=True),
        "thresholds": cfg.loadtest.thresholds.model_dump(by_alias=True),
        "requestTimeoutS": request_timeout_s,
        "gracefulStopS": graceful_stop_s(prof) if graceful_stop is None else graceful_stop,
    }
    plateau = plateau_window(prof)
    if plateau is not None:  # requests started in it are tagged plateau=yes and judged on their own
        doc["plateau"] = {"startS": plateau[0], "endS": plateau[1]}
    if summary_path:
        doc["summaryPath"] = summary_path
    return doc


def k6_env(
    cfg: StackConfig,
    *,
    base_url: str,
    test_id: str,
    prometheus_rw_url: str | None,
    profile: str | None = None,
    summary_path: str | None = None,
    push_interval_s: int = 5,
) -> dict[str, str]:
    """Environment for one k6 process: script config plus Prometheus remote-write as native histograms."""
    doc = k6_config(cfg, base_url=base_url, test_id=test_id, profile=profile, summary_path=summary_path)
    env = {CONFIG_ENV: json.dumps(doc), "GOGC": str(cfg.loadtest.gogc)}
    if prometheus_rw_url:
        env.update(
            {
                "K6_PROMETHEUS_RW_SERVER_URL": prometheus_rw_url,
                "K6_PROMETHEUS_RW_TREND_AS_NATIVE_HISTOGRAM": "true",
                "K6_PROMETHEUS_RW_PUSH_INTERVAL": f"{push_interval_s}s",
            }
        )
    return env


def execution_segments(runners: int) -> list[str]:
    """``--execution-segment`` values that tile [0,1] exactly once across ``runners`` pods.

    Fractions, not floats, so the boundaries are exact and adjacent segments share endpoints.
    """
    if runners < 1:
        raise ValueError("runners must be >= 1")
    cuts = [Fraction(i, runners) for i in range(runners + 1)]
    return [f"{_frac(a)}:{_frac(b)}" for a, b in itertools.pairwise(cuts)]


def segment_sequence(runners: int) -> str:
    """``--execution-segment-sequence`` so every runner partitions VUs/iterations identically."""
    return ",".join(_frac(Fraction(i, runners)) for i in range(runners + 1))


def _frac(value: Fraction) -> str:
    if value == 0:
        return "0"
    if value == 1:
        return "1"
    return f"{value.numerator}/{value.denominator}"


def script_text(path: Path = SCRIPT) -> str:
    return path.read_text()
