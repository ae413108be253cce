"""The adaptive LLM limiter: its algorithm on a virtual clock, then against the real simulator.

The unit tests drive :class:`AdaptiveLimiter` with an injected clock and synthetic latencies, so the
Gradient2 arithmetic, AIMD on 429, the budgets and the header parsing are checked exactly. The
integration tests run a real simulator process and a driver that fires streamed calls as fast as the
limiter permits (time to first token = time to the response headers): the limit must grow while the
latency stays at its floor, shrink when the simulator's knee makes latency rise with load, and keep
429s under 1 % against the simulator's RPM/TPM limits with every logical call succeeding.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from service import metrics
from service.config import Settings
from service.limiter import (
    FLOOR_CAP,
    FLOOR_FORGET,
    TOLERANCE,
    AdaptiveLimiter,
    Permit,
    TokenBucket,
    parse_reset,
    retry_after_s,
)
from service.simtext import prompt_tokens
from service.simwire import format_reset
from tests.conftest import sample
from tests.simproc import SimProc, running_simulator

MODEL = "gpt-4o-mini"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settings(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"worker_concurrency": 64, "llm_concurrency_initial": 4, "llm_rpm": 0, "llm_tpm": 0}
    return Settings(**{**base, **overrides})


async def _fill(limiter: AdaptiveLimiter, tokens: int = 0) -> list[Permit]:
    """Admit calls up to the limit (none waits)."""
    permits = []
    while limiter.blocker(tokens) is None:
        permits.append(await limiter.acquire(tokens))
    return permits


async def _round(limiter: AdaptiveLimiter, clock: Clock, latency_s: float) -> None:
    """One round trip at full load: admit up to the limit, let time pass, complete them all."""
    permits = await _fill(limiter)
    clock.now += latency_s
    for p in permits:
        p.done("ok", latency_s=latency_s)


# --- header formats ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1m30.5s", 90.5),
        ("8.64s", 8.64),
        ("1h0m0s", 3600.0),
        ("0s", 0.0),
        ("2.5", 2.5),
        ("750us", 0.00075),
    ],
)
def test_parse_reset_reads_openai_durations(text: str, seconds: float) -> None:
    assert parse_reset(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", [None, "", "abc", "1x", "s", "-1s", "1s2", "1m 2s", "inf"])
def test_parse_reset_rejects_what_it_cannot_read(text: str | None) -> None:
    assert parse_reset(text) is None


@pytest.mark.parametrize("seconds", [0.0, 0.0004, 0.02, 0.999, 1.0, 1.5, 59.999, 60.0, 90.5, 360.0, 3725.25])
def test_simulator_reset_format_round_trips(seconds: float) -> None:
    parsed = parse_reset(format_reset(seconds))
    assert parsed is not None and seconds <= parsed < seconds + 0.001 + 1e-9  # rounded up to the ms


def test_retry_after_prefers_ms_then_seconds_then_date() -> None:
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({"retry-after": "3"}) == 3.0
    assert retry_after_s({"retry-after": "Wed, 21 Oct 2015 07:28:05 GMT"}, now=1445412480.0) == 5.0
    assert retry_after_s({"retry-after": "soon"}) is None
    assert retry_after_s({}) is None


def test_token_bucket_refills_continuously_up_to_capacity() -> None:
    b = TokenBucket.per_minute(600, now=0.0)
    b.take(600, 0.0)
    assert b.wait_s(1, 0.0) == pytest.approx(0.1)  # 600/min = 10/s
    assert b.wait_s(10, 0.5) == pytest.approx(0.5)
    assert b.wait_s(5000, 0.5) == pytest.approx(59.5)  # more than a bucket: waits for a full one only
    b.refill(1000.0)
    assert b.level == 600


# --- the algorithm on a virtual clock ------------------------------------------------------------


async def test_limit_grows_while_latency_stays_at_its_floor() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(), clock=clock)
    assert limiter.limit == 4 and limiter.inflight == 0
    seen = [limiter.limit]
    for _ in range(120):
        await _round(limiter, clock, 0.35)
        seen.append(limiter.limit)
    assert seen == sorted(seen), "growth at the floor must be monotonic"
    assert seen[-1] == 64  # up to the bound (worker_concurrency), not beyond
    assert limiter.inflight == 0


async def test_slow_start_multiplies_until_the_first_congestion_signal() -> None:
    """Calls last seconds, so a window takes seconds: growth must be multiplicative until congestion
    is seen, additive (Gradient2) after it."""
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=16, worker_concurrency=256), clock=clock)
    rounds = 0
    while limiter.limit < 256:
        await _round(limiter, clock, 0.35)
        rounds += 1
    assert rounds <= 15  # 16 -> 256 at x1.5 per window (a window is ~1 round at full load here)
    slow = AdaptiveLimiter(_settings(llm_concurrency_initial=16, worker_concurrency=256), clock=clock)
    (await slow.acquire(0)).done("rate_limited", headers={"retry-after-ms": "1"})
    clock.now += 0.01
    for _ in range(15):
        await _round(slow, clock, 0.35)
    assert slow.limit < 64  # after a 429: no more slow start


async def test_limit_backs_off_when_latency_rises_with_load() -> None:
    """Latency grows with in-flight calls past a knee of 8 (as the simulator models it): the limit
    settles near the knee instead of running up to the bound."""
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=16), clock=clock)
    for _ in range(60):  # at the floor first
        await _round(limiter, clock, 0.35)
    grown = limiter.limit
    assert grown >= 48
    knee = 8
    for _ in range(100):
        await _round(limiter, clock, 0.35 * max(1.0, limiter.limit / knee))
    # Equilibrium: latency at most TOLERANCE x the long-term level, itself at most FLOOR_CAP x the
    # floor, plus the queue allowance (sqrt(limit) ~ 5).
    bound = TOLERANCE * FLOOR_CAP * knee + 6
    assert limiter.limit < grown / 2
    assert limiter.limit <= bound
    for _ in range(3000):  # sustained overload: anchored to the floor, Gradient2's drift is bounded
        await _round(limiter, clock, 0.35 * max(1.0, limiter.limit / knee))
    assert limiter.limit <= bound * (1 + FLOOR_FORGET) ** 3000
    assert limiter.limit < 32  # unanchored, the long-term average would follow latency up to the bound


async def test_limit_does_not_grow_while_app_limited() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=16), clock=clock)
    for _ in range(200):
        p = await limiter.acquire(0)
        clock.now += 0.3
        p.done("ok", latency_s=0.3)
    assert limiter.limit == 16


async def test_429_halves_the_limit_once_per_round_and_pauses_admission() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=32), clock=clock)
    permits = [await limiter.acquire(0) for _ in range(10)]
    permits[0].done("rate_limited", headers={"Retry-After-Ms": "1500"})
    assert limiter.limit == 16
    for p in permits[1:]:  # the same round: admitted before the cut, they do not cut again
        p.done("rate_limited", headers={"retry-after": "1"})
    assert limiter.limit == 16 and limiter.inflight == 0
    assert limiter.blocker(0) == ("rate_limited", pytest.approx(1.5))
    clock.now += 1.5
    assert limiter.blocker(0) is None
    later = await limiter.acquire(0)
    later.done("rate_limited", headers={})  # a new round: cut again; no Retry-After: a default pause
    assert limiter.limit == 8
    assert limiter.blocker(0) == ("rate_limited", pytest.approx(1.0))


async def test_429_without_retry_after_waits_for_the_exhausted_budgets_reset() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(), clock=clock)
    p = await limiter.acquire(500)
    p.done(
        "rate_limited",
        headers={
            "x-ratelimit-remaining-requests": "3",
            "x-ratelimit-reset-requests": "20ms",
            "x-ratelimit-remaining-tokens": "120",
            "x-ratelimit-reset-tokens": "6m0s",
        },
    )
    assert limiter.blocker(0) == ("rate_limited", pytest.approx(360.0))


async def test_configured_rpm_and_tpm_are_token_buckets() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_rpm=60, llm_tpm=6000, llm_concurrency_initial=64), clock=clock)
    permits = [await limiter.acquire(50) for _ in range(60)]  # a full minute's burst of requests
    assert limiter.remaining("requests") == 0 and limiter.remaining("tokens") == 3000
    assert limiter.blocker(50) == ("requests", pytest.approx(1.0))  # 60/min = 1/s
    clock.now += 1.0
    assert limiter.blocker(50) is None
    permits[0].done("ok", tokens=2050)  # billed more than its 50-token estimate: charged
    assert limiter.remaining("tokens") == pytest.approx(3000 + 100 - 2000)
    permits[1].done("ok", tokens=10)  # billed less: not refunded (charged at admission, like OpenAI)
    assert limiter.remaining("tokens") == pytest.approx(1100)
    assert limiter.blocker(2000)[0] == "tokens"  # type: ignore[index]
    assert AdaptiveLimiter(_settings(), clock=clock).remaining("requests") is None  # 0 = unlimited


async def test_provider_headers_set_the_budget_minus_calls_it_had_not_counted() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=64), clock=clock)
    first = await limiter.acquire(100)
    others = [await limiter.acquire(100) for _ in range(4)]  # sent after `first`: not in its headers
    first.done(
        "ok",
        headers={
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "10",
            "x-ratelimit-reset-requests": "59s",
            "x-ratelimit-limit-tokens": "30000",
            "x-ratelimit-remaining-tokens": "900",
            "x-ratelimit-reset-tokens": "58.2s",
        },
    )
    assert limiter.remaining("requests") == 10 - 4
    assert limiter.remaining("tokens") == 900 - 400
    for p in others:
        p.done("ok")
    for _ in range(5):
        await limiter.acquire(100)
    assert limiter.remaining("requests") == 1 and limiter.remaining("tokens") == 0
    assert limiter.blocker(0) is None
    assert limiter.blocker(1) == ("tokens", pytest.approx(1 / 500))  # 30000/min = 500/s
    clock.now += 60
    assert limiter.remaining("requests") == 600  # refills at the provider's limit per minute


async def test_remaining_without_limit_header_waits_for_the_reset() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(), clock=clock)
    p = await limiter.acquire(0)
    p.done("ok", headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s"})
    assert limiter.blocker(0) == ("requests", pytest.approx(2.0))
    clock.now += 2.0
    assert limiter.blocker(0) is None


async def test_done_is_idempotent_and_checks_the_outcome() -> None:
    limiter = AdaptiveLimiter(_settings())
    p = await limiter.acquire(0)
    with pytest.raises(ValueError, match="outcome"):
        p.done("fine")
    assert limiter.inflight == 1 and not p.released
    p.done("error")
    p.done("error")
    p.done("ok", latency_s=1.0)
    assert limiter.inflight == 0 and p.released


async def test_fixed_mode_keeps_the_limit_but_honours_budgets_and_429() -> None:
    clock = Clock()
    limiter = AdaptiveLimiter(_settings(llm_limiter="fixed", worker_concurrency=12, llm_rpm=600), clock=clock)
    assert limiter.limit == 12
    for _ in range(30):
        await _round(limiter, clock, 0.2)
    p = await limiter.acquire(0)
    p.done("rate_limited", headers={"retry-after": "2"})
    assert limiter.limit == 12 and limiter.blocker(0) == ("rate_limited", pytest.approx(2.0))


async def test_waiters_are_served_in_order_and_a_cancelled_waiter_leaves_no_trace() -> None:
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=1))
    first = await limiter.acquire(0)
    order: list[str] = []

    async def take(name: str) -> Permit:
        permit = await limiter.acquire(0)
        order.append(name)
        return permit

    a = asyncio.create_task(take("a"))
    b = asyncio.create_task(take("b"))
    c = asyncio.create_task(take("c"))
    await asyncio.sleep(0.01)
    assert limiter.waiting == 3 and not order
    a.cancel()
    await asyncio.sleep(0.01)
    assert limiter.waiting == 2
    first.done("ok")
    (await b).done("ok")
    (await c).done("ok")
    assert order == ["b", "c"] and limiter.inflight == 0 and limiter.waiting == 0
    with pytest.raises(asyncio.CancelledError):
        await a


async def test_budget_wait_ends_when_the_bucket_refills() -> None:
    limiter = AdaptiveLimiter(_settings(llm_rpm=600))  # real clock: a full bucket, then 10 per second
    for _ in range(600):
        (await limiter.acquire(0)).done("ok")
    started = time.monotonic()
    for _ in range(3):
        (await limiter.acquire(0)).done("ok")
    assert 0.2 <= time.monotonic() - started < 1.0


async def test_slot_context_releases_on_every_exit() -> None:
    limiter = AdaptiveLimiter(_settings())
    async with limiter.slot(10) as permit:
        assert limiter.inflight == 1
    assert permit.released and limiter.inflight == 0
    with pytest.raises(RuntimeError):
        async with limiter.slot(10):
            raise RuntimeError("boom")
    assert limiter.inflight == 0


async def test_metrics_show_limit_budget_and_waits() -> None:
    clock = Clock()
    waits = sample("loadproof_llm_concurrency_waits_total", {"reason": "concurrency"})
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=2, llm_rpm=100), clock=clock)
    assert sample("loadproof_llm_concurrency_limit") == 2
    p1, _p2 = await limiter.acquire(0), await limiter.acquire(0)
    assert sample("loadproof_llm_budget_remaining", {"kind": "requests"}) == 98
    blocked = asyncio.create_task(limiter.acquire(0))
    await asyncio.sleep(0.01)
    assert sample("loadproof_llm_concurrency_waits_total", {"reason": "concurrency"}) == waits + 1
    p1.done("ok")
    (await blocked).done("ok")


async def test_metrics_failure_never_fails_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    class Broken:
        def __getattr__(self, name: str) -> Any:
            raise RuntimeError("metrics down")

    monkeypatch.setattr(metrics, "LLM_CONCURRENCY_LIMIT", Broken())
    monkeypatch.setattr(metrics, "LLM_BUDGET_REMAINING", Broken())
    monkeypatch.setattr(metrics, "LLM_CONCURRENCY_WAITS", Broken())
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=1, llm_rpm=60))
    p = await limiter.acquire(5)
    waiter = asyncio.create_task(limiter.acquire(5))
    await asyncio.sleep(0.01)
    p.done("ok", latency_s=0.1)
    (await waiter).done("ok")
    assert limiter.inflight == 0


# --- against the real simulator -------------------------------------------------------------------

# A 100 ms time to first token: on a busy 2-core machine the driver's own scheduling adds tens of
# milliseconds under load, so the simulated latency must dominate it. 8-token replies keep calls cheap.
LIMITER_SIM_ENV = {
    "LOADPROOF_SIM_TTFT_MS": "100",
    "LOADPROOF_SIM_ITL_MS": "0.1",
    "LOADPROOF_SIM_JITTER": "0.1",
    "LOADPROOF_SIM_OUTPUT_TOKENS": "8",
    "LOADPROOF_SIM_CONCURRENCY_KNEE": "100000",
}
MAX_TOKENS = 32
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a post about limits"}]
# A caller's estimate as the worker would make it without a tokenizer (chars/4 + the cap); it is a
# little short of what the simulator charges (per-message framing), which the limiter must absorb.
ESTIMATE = sum(len(m["content"]) for m in MESSAGES) // 4 + MAX_TOKENS


@pytest.fixture(scope="module")
def lsim() -> Iterator[SimProc]:
    with running_simulator(LIMITER_SIM_ENV) as proc:
        yield proc


@pytest.fixture
def fresh(lsim: SimProc) -> Iterator[SimProc]:
    lsim.reset()
    lsim.control(rpm=0, tpm=0, concurrency_knee=100000)
    yield lsim
    lsim.control(rpm=0, tpm=0, concurrency_knee=100000)


class Driver:
    """Logical calls as fast as the limiter admits them; each is retried on 429 until it succeeds
    (a worker's call must never be lost), every HTTP attempt going through the limiter.

    Streamed calls report the time to first token (to the response headers); plain calls report
    what the provider counted (``usage.prompt_tokens + max_tokens``)."""

    def __init__(self, sim: SimProc, limiter: AdaptiveLimiter, *, stream: bool, use_headers: bool = True) -> None:
        self.sim, self.limiter, self.stream, self.use_headers = sim, limiter, stream, use_headers
        self.attempts: Counter[int] = Counter()
        self.completed = 0
        self.failed = 0
        self.limits: list[int] = []

    async def _attempt(self, http: httpx.AsyncClient) -> int:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": self.stream}
        permit = await self.limiter.acquire(ESTIMATE)
        started = time.monotonic()
        try:
            async with http.stream("POST", "/chat/completions", json=body) as r:
                ttft = time.monotonic() - started
                raw = await r.aread()
        except BaseException:
            permit.done("error")
            raise
        headers = dict(r.headers) if self.use_headers else None
        if r.status_code == 200:
            charged = None if self.stream else json.loads(raw)["usage"]["prompt_tokens"] + MAX_TOKENS
            permit.done("ok", latency_s=ttft if self.stream else None, headers=headers, tokens=charged)
        elif r.status_code == 429:
            retry = {k: v for k, v in r.headers.items() if k.startswith("retry-after")}
            permit.done("rate_limited", headers=headers if self.use_headers else retry)
        else:
            permit.done("error", headers=headers)
        return r.status_code

    async def _call(self, http: httpx.AsyncClient) -> None:
        for _ in range(20):
            status = await self._attempt(http)
            self.attempts[status] += 1
            if status == 200:
                self.completed += 1
                return
            if status != 429:
                break
        self.failed += 1

    async def run(self, *, concurrency: int, calls: int) -> None:
        """``calls`` logical calls from ``concurrency`` callers (more than the limit can reach, so the
        limiter binds); the limit is sampled after each call."""
        left = [calls]
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=self.sim.base_url, timeout=60, limits=limits) as http:

            async def caller() -> None:
                while left[0] > 0:
                    left[0] -= 1
                    await self._call(http)
                    self.limits.append(self.limiter.limit)

            await asyncio.gather(*(caller() for _ in range(concurrency)))

    @property
    def total_attempts(self) -> int:
        return sum(self.attempts.values())


async def test_sim_limit_grows_while_latency_stays_at_the_floor(fresh: SimProc) -> None:
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=4, worker_concurrency=24))
    driver = Driver(fresh, limiter, stream=True)
    await driver.run(concurrency=32, calls=600)
    assert driver.completed == 600 and driver.failed == 0
    assert max(driver.limits) >= 16, driver.limits[::25]  # 4x the start, the simulator's latency unchanged
    stats = fresh.stats()
    assert stats["max_inflight"] >= 12 and stats["completed"] == 600


async def test_sim_limit_backs_off_when_latency_rises(fresh: SimProc) -> None:
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=16, worker_concurrency=16))
    driver = Driver(fresh, limiter, stream=True)
    await driver.run(concurrency=20, calls=250)  # learns the floor at full load
    assert limiter.limit == 16
    knee = 2  # now latency = floor * inflight / 2: every call past the 2nd slows all of them
    fresh.control(concurrency_knee=knee)
    await driver.run(concurrency=20, calls=300)
    assert driver.failed == 0
    # Down by over 30 % (toward ~7: tolerance x knee + queue allowance) within 300 calls of 0.2-0.8 s.
    assert limiter.limit <= 11, driver.limits[250::10]
    short, long, _floor = limiter.latency_s
    assert short is not None and long is not None and short > long  # it saw the rise


@pytest.mark.parametrize("use_headers", [True, False], ids=["provider-headers", "configured-rpm"])
async def test_sim_600_rpm_keeps_429s_under_one_percent(fresh: SimProc, use_headers: bool) -> None:
    """600 RPM: a burst of 600, then 10 calls/s. Learnt from the x-ratelimit headers alone, or from the
    configured llm_rpm without headers (only Retry-After): fewer than 1 % of attempts get a 429."""
    fresh.control(rpm=600, reset_stats=True)
    limiter = AdaptiveLimiter(
        _settings(llm_concurrency_initial=16, worker_concurrency=32, llm_rpm=0 if use_headers else 600)
    )
    driver = Driver(fresh, limiter, stream=False, use_headers=use_headers)
    started = time.monotonic()
    await driver.run(concurrency=40, calls=680)  # the burst, then 8 s bound by the refill
    elapsed = time.monotonic() - started
    stats = fresh.stats()
    assert driver.failed == 0 and driver.completed == stats["completed"] == 680
    assert driver.attempts[429] == stats["rate_limited"]["requests"]
    assert driver.attempts[429] < 0.01 * driver.total_attempts, driver.attempts
    assert elapsed >= (680 - 600) / 10 * 0.9  # the budget held it back (600/min = 10/s after the burst)


async def test_sim_tpm_learnt_from_headers_keeps_429s_under_one_percent(fresh: SimProc) -> None:
    charged = prompt_tokens(MESSAGES) + MAX_TOKENS  # what the simulator counts (more than ESTIMATE)
    fresh.control(tpm=300 * charged, reset_stats=True)  # a burst of 300 calls, then 5 per second
    limiter = AdaptiveLimiter(_settings(llm_concurrency_initial=16, worker_concurrency=32))
    driver = Driver(fresh, limiter, stream=False)
    await driver.run(concurrency=40, calls=340)
    stats = fresh.stats()
    assert driver.failed == 0 and driver.completed == 340
    assert driver.attempts[429] == stats["rate_limited"]["tokens"]
    assert driver.attempts[429] < 0.01 * driver.total_attempts, driver.attempts
    assert limiter.token_scale == pytest.approx(charged / ESTIMATE, rel=0.05)
