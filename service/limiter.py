"""How many LLM calls a worker process may have in flight, and when it may send the next one.

Two different things bound an LLM provider, and the limiter honours both:

* **Concurrency**, adapted to latency (Netflix concurrency-limits' *Gradient2*): the limit grows while
  the time to first token stays near its long-run level and shrinks when it rises — a provider that
  queues our calls shows it in its latency before it fails them (its long-term level is anchored to
  a slowly forgetting floor, so it cannot drift up under sustained queueing). A 429 on top is an explicit "too
  much": the limit is cut multiplicatively (AIMD), once per round of calls, and no new call starts
  until the ``Retry-After`` (or ``x-ratelimit-reset-*``) time has passed. Why Gradient2 and not
  Vegas, AIMD alone or Envoy's filter is written down in docs/llm.md.
  Until the first sign of congestion (latency past the tolerance, or a 429) the limit grows like TCP's
  slow start, x1.5 per window: Gradient2 alone adds ~0.2 x sqrt(limit) per window, and with LLM calls
  lasting seconds a window takes seconds, so from 16 to 256 it would need many minutes of backlog.
* **Rate budgets**, requests and tokens per minute: token buckets refilling continuously (capacity =
  the per-minute limit, the way OpenAI enforces it), one from the configured share (``llm_rpm``,
  ``llm_tpm``) and one learnt from the provider's ``x-ratelimit-limit/remaining/reset-*`` headers.
  A call starts only when every bucket holds its cost (1 request; prompt + max_tokens tokens).

Waiters are served first come, first served, so a large call cannot be starved by small ones.
Metrics (limit, budget, waits) are best effort: a metrics failure never fails a call.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from service import metrics
from service.config import Settings

log = logging.getLogger(__name__)

Outcome = Literal["ok", "rate_limited", "error", "cancelled"]
OUTCOMES: frozenset[str] = frozenset({"ok", "rate_limited", "error", "cancelled"})
KINDS = ("requests", "tokens")

# Gradient2's published defaults (rttTolerance, smoothing, long window, warm-up), our queue allowance.
TOLERANCE = 1.5  # short-term latency may reach 1.5x the long-term level before the limit shrinks
SMOOTHING = 0.2  # weight of each new limit estimate
LONG_WINDOW = 600  # windows in the long-term exponential average
LONG_WARMUP = 10  # windows averaged plainly before the exponential average takes over
MIN_GRADIENT = 0.5  # never shrink by more than half per window on latency alone (outliers)
MIN_QUEUE = 4.0  # queue allowance: max(4, sqrt(limit)) calls over the latency-neutral estimate
FLOOR_FORGET = 1e-4  # the floor (lowest short-term latency) creeps up 0.01 % per window, so it follows a
FLOOR_CAP = 1.5  # provider that really got slower; the long-term level never exceeds 1.5x the floor
WINDOW_SAMPLES = 10  # "ok" samples per window, and a window lasts at least one short-term latency
BACKOFF = 0.5  # multiplicative decrease on 429
SLOW_START = 1.5  # growth per window until the first congestion signal
DEFAULT_PAUSE_S = 1.0  # a 429 without Retry-After or reset headers
MAX_PAUSE_S = 600.0  # a wild Retry-After must not stop the worker for an hour
EPSILON_S = 1e-4
TOKEN_SCALE_WEIGHT = 0.2  # how fast the token estimate correction follows what the provider counted


# --- header parsing ----------------------------------------------------------------------------

_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(text: str | None) -> float | None:
    """Seconds in an ``x-ratelimit-reset-*`` value: a Go duration as OpenAI sends it ("1s", "6m0s",
    "20ms", "1m30.5s") or a bare number of seconds; None when it is neither."""
    if text is None:
        return None
    raw = text.strip()
    if not raw:
        return None
    with contextlib.suppress(ValueError):
        value = float(raw)
        return value if value >= 0 and math.isfinite(value) else None
    pos, total = 0, 0.0
    for match in _DURATION.finditer(raw):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(raw) and pos > 0 else None


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``retry-after`` as seconds or an HTTP date.

    ``headers`` must have lower-case keys (see :func:`_lower`)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            value = float(ms) / 1000.0
            if value >= 0 and math.isfinite(value):
                return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        value = float(raw)
        return value if value >= 0 and math.isfinite(value) else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in headers.items()}


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


# --- token bucket ------------------------------------------------------------------------------


@dataclass(slots=True)
class TokenBucket:
    """``capacity`` units refilling continuously at ``per_s``; the level may go negative (a call
    billed more than estimated), which delays the next ones accordingly."""

    capacity: float
    per_s: float
    level: float
    updated: float

    @classmethod
    def per_minute(cls, limit: float, now: float, level: float | None = None) -> TokenBucket:
        return cls(limit, limit / 60.0, limit if level is None else min(level, limit), now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.per_s)
        self.updated = max(self.updated, now)

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until ``amount`` (at most a full bucket, so any call can pass eventually) is available."""
        self.refill(now)
        missing = min(amount, self.capacity) - self.level
        return 0.0 if missing <= 0 else missing / self.per_s

    def take(self, amount: float, now: float) -> None:
        self.refill(now)
        self.level -= amount


# --- the limiter -------------------------------------------------------------------------------


class Permit:
    """One admitted call. :meth:`done` releases its slot exactly once (later calls are ignored)."""

    __slots__ = ("_done", "_limiter", "requested", "sent_requests", "sent_tokens", "seq", "started", "tokens")

    def __init__(
        self,
        limiter: AdaptiveLimiter,
        tokens: int,
        requested: int,
        seq: int,
        sent_requests: int,
        sent_tokens: int,
        started: float,
    ) -> None:
        self._limiter = limiter
        self._done = False
        self.tokens = tokens  # charged at admission: the caller's estimate, scaled by what was learnt
        self.requested = requested  # the caller's estimate
        self.seq = seq  # admission order; a 429 cuts the limit once per round of calls
        self.sent_requests = sent_requests  # totals admitted up to and including this call, to tell
        self.sent_tokens = sent_tokens  # how many a provider's remaining-* did not count yet
        self.started = started

    @property
    def released(self) -> bool:
        return self._done

    def done(
        self,
        outcome: str,
        *,
        latency_s: float | None = None,
        headers: Mapping[str, str] | None = None,
        tokens: int | None = None,
    ) -> None:
        """Release the slot and learn from the call.

        ``outcome``: ``ok`` | ``rate_limited`` (a 429) | ``error`` | ``cancelled``. ``latency_s`` is
        the time to first token and feeds the gradient only for ``ok``. ``headers`` are the response's
        (``x-ratelimit-*``, ``retry-after``); ``tokens`` what the provider counted against its token
        budget, when known — for OpenAI ``usage.prompt_tokens + max_tokens`` (it charges the cap at
        admission), for providers that count usage ``usage.total_tokens``. More than was charged is
        charged too, less is not refunded, and the ratio to the estimate scales later estimates up
        (never down), so a caller that underestimates prompts does not run into 429s.
        """
        if self._done:
            return
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, not {outcome!r}")
        self._done = True
        self._limiter._release(self, outcome, latency_s, headers, tokens)


@dataclass(slots=True)
class _Window:
    started: float
    total: float = 0.0
    count: int = 0
    max_inflight: int = 0


@dataclass(slots=True)
class _Budget:
    """One kind (requests or tokens): the configured share and what the provider told us."""

    config: TokenBucket | None
    provider: TokenBucket | None = None
    provider_blocked_until: float = 0.0  # remaining-* hit 0 and only a reset time is known
    sent: int = 0  # admitted so far (calls or estimated tokens)

    def all(self) -> list[TokenBucket]:
        return [b for b in (self.config, self.provider) if b is not None]


class AdaptiveLimiter:
    """Concurrency limit (Gradient2 + AIMD on 429) and RPM/TPM budgets for one worker process."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._adaptive = settings.llm_limiter == "adaptive"
        self._max = settings.worker_concurrency
        initial = settings.llm_concurrency_initial if self._adaptive else settings.worker_concurrency
        self._estimate = float(max(1, min(self._max, initial)))
        self._inflight = 0
        self._seq = 0
        self._last_decrease_seq = 0
        self._paused_until = 0.0
        self._queue: deque[asyncio.Event] = deque()
        self._head_reason: str = "concurrency"
        now = clock()
        self._budgets = {
            "requests": _Budget(TokenBucket.per_minute(settings.llm_rpm, now) if settings.llm_rpm else None),
            "tokens": _Budget(TokenBucket.per_minute(settings.llm_tpm, now) if settings.llm_tpm else None),
        }
        self._window = _Window(started=now)
        self._short: float | None = None
        self._long: float | None = None
        self._long_count = 0
        self._floor: float | None = None
        self._token_scale = 1.0  # >= 1: callers' token estimates times this is what gets charged
        self._slow_start = self._adaptive  # until latency first passes the tolerance or a 429 arrives
        self._publish()

    # --- what callers and the dashboard see ---------------------------------------------------
    @property
    def limit(self) -> int:
        return max(1, int(self._estimate))

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def latency_s(self) -> tuple[float | None, float | None, float | None]:
        """(short-term, long-term, floor) time to first token: the gradient compares the first two."""
        return self._short, self._long, self._floor

    @property
    def paused_until(self) -> float:
        """Clock time before which no call starts (after a 429)."""
        return self._paused_until

    def remaining(self, kind: str) -> float | None:
        """Budget left of ``requests`` or ``tokens`` now (the tighter bucket); None when unlimited."""
        now = self._clock()
        levels = []
        for bucket in self._budgets[kind].all():
            bucket.refill(now)
            levels.append(bucket.level)
        return min(levels) if levels else None

    def blocker(self, tokens: int) -> tuple[str, float | None] | None:
        """What would hold a call estimated at ``tokens`` back right now, and for how long (None: until
        a slot frees); None when it could start at once (queued callers aside)."""
        return self._blocker(math.ceil(max(0, tokens) * self._token_scale))

    @property
    def token_scale(self) -> float:
        """Factor (>= 1) applied to callers' token estimates, learnt from what the provider counted."""
        return self._token_scale

    def _blocker(self, tokens: int) -> tuple[str, float | None] | None:
        now = self._clock()
        if now < self._paused_until:
            return "rate_limited", self._paused_until - now
        if self._inflight >= self.limit:
            return "concurrency", None
        for kind, amount in (("requests", 1), ("tokens", tokens)):
            if amount <= 0:
                continue
            budget = self._budgets[kind]
            wait = max([b.wait_s(amount, now) for b in budget.all()] + [budget.provider_blocked_until - now, 0.0])
            if wait > EPSILON_S:
                return kind, wait
        return None

    # --- admission ----------------------------------------------------------------------------
    async def acquire(self, tokens: int) -> Permit:
        """Wait until a slot is free and the budgets allow one call of about ``tokens`` tokens
        (prompt + max_tokens), then admit it. Cancelling the wait leaves no trace."""
        requested = max(0, int(tokens))
        need = math.ceil(requested * self._token_scale)
        me = asyncio.Event()
        self._queue.append(me)
        counted = False
        try:
            while True:
                delay: float | None = None
                if self._queue[0] is me:
                    blocked = self._blocker(need)
                    if blocked is None:
                        break
                    self._head_reason, delay = blocked
                if not counted:
                    counted = True
                    self._count_wait(self._head_reason)
                me.clear()
                if delay is None:
                    await me.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(me.wait(), delay)
        except BaseException:
            was_head = bool(self._queue) and self._queue[0] is me
            with contextlib.suppress(ValueError):
                self._queue.remove(me)
            if was_head:
                self._wake_head()
            raise
        self._queue.popleft()
        permit = self._admit(need, requested)
        self._wake_head()
        return permit

    @contextlib.asynccontextmanager
    async def slot(self, tokens: int) -> AsyncIterator[Permit]:
        """``async with limiter.slot(n) as permit``: released on exit if the body did not call
        ``permit.done`` (``cancelled`` on cancellation, ``error`` on an exception, else ``ok``)."""
        permit = await self.acquire(tokens)
        try:
            yield permit
        except asyncio.CancelledError:
            permit.done("cancelled")
            raise
        except BaseException:
            permit.done("error")
            raise
        else:
            permit.done("ok")

    def _admit(self, need: int, requested: int) -> Permit:
        now = self._clock()
        self._seq += 1
        self._inflight += 1
        self._window.max_inflight = max(self._window.max_inflight, self._inflight)
        for kind, amount in (("requests", 1), ("tokens", need)):
            budget = self._budgets[kind]
            budget.sent += amount
            for bucket in budget.all():
                bucket.take(amount, now)
        permit = Permit(
            self, need, requested, self._seq, self._budgets["requests"].sent, self._budgets["tokens"].sent, now
        )
        self._publish()
        return permit

    def _wake_head(self) -> None:
        if self._queue:
            self._queue[0].set()

    # --- feedback -----------------------------------------------------------------------------
    def _release(
        self,
        permit: Permit,
        outcome: str,
        latency_s: float | None,
        headers: Mapping[str, str] | None,
        tokens: int | None,
    ) -> None:
        self._inflight -= 1
        try:
            now = self._clock()
            lowered = _lower(headers) if headers else {}
            if lowered:
                self._observe_headers(permit, lowered, now)
            if tokens is not None and tokens > 0 and permit.requested > 0:
                # Learn how far callers' estimates fall short; later ones are scaled up by it.
                ratio = tokens / permit.requested
                self._token_scale = max(1.0, self._token_scale + (ratio - self._token_scale) * TOKEN_SCALE_WEIGHT)
                if tokens > permit.tokens:
                    for bucket in self._budgets["tokens"].all():
                        bucket.take(tokens - permit.tokens, now)
            if outcome == "ok" and latency_s is not None and latency_s > 0 and math.isfinite(latency_s):
                self._sample(latency_s, now)
            elif outcome == "rate_limited":
                self._rate_limited(permit, lowered, now)
        except Exception:  # pragma: no cover - learning must never fail a call or leak its slot
            log.warning("limiter feedback failed", exc_info=True)
        finally:
            self._publish()
            self._wake_head()

    def _observe_headers(self, permit: Permit, headers: Mapping[str, str], now: float) -> None:
        """Adopt the provider's view of its budget: its remaining-* minus what we sent since this call
        (those it had not counted yet). Refill between its answer and now is ignored: conservative."""
        for kind, since in (
            ("requests", self._budgets["requests"].sent - permit.sent_requests),
            ("tokens", self._budgets["tokens"].sent - permit.sent_tokens),
        ):
            remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
            if remaining is None:
                continue
            budget = self._budgets[kind]
            level = remaining - since
            limit = _number(headers.get(f"x-ratelimit-limit-{kind}"))
            if limit is not None and limit > 0:
                if budget.provider is None or budget.provider.capacity != limit:
                    budget.provider = TokenBucket.per_minute(limit, now, level)
                else:
                    budget.provider.level, budget.provider.updated = min(level, limit), now
            elif level < 1:  # no limit header: no refill rate known, wait for the stated reset
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset is not None:
                    budget.provider_blocked_until = max(budget.provider_blocked_until, now + min(reset, MAX_PAUSE_S))

    def _rate_limited(self, permit: Permit, headers: Mapping[str, str], now: float) -> None:
        """AIMD's decrease, once per round (calls admitted before the last cut do not cut again),
        and a pause of new admissions until the provider said it is worth trying again."""
        self._slow_start = False
        if self._adaptive and permit.seq > self._last_decrease_seq:
            self._estimate = max(1.0, self._estimate * BACKOFF)
            self._last_decrease_seq = self._seq
        pause = retry_after_s(headers)
        if pause is None:  # the reset time of whichever budget cannot pay for this call
            resets: list[float] = []
            for kind, cost in (("requests", 1), ("tokens", max(1, permit.tokens))):
                remaining = _number(headers.get(f"x-ratelimit-remaining-{kind}"))
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}"))
                if remaining is not None and remaining < cost and reset is not None:
                    resets.append(reset)
            pause = max(resets) if resets else DEFAULT_PAUSE_S
        self._paused_until = max(self._paused_until, now + min(pause, MAX_PAUSE_S))

    def _sample(self, latency_s: float, now: float) -> None:
        """Gradient2, one update per window of samples lasting at least one short-term latency."""
        w = self._window
        w.total += latency_s
        w.count += 1
        if w.count < WINDOW_SAMPLES or now - w.started < (self._short or 0.0):
            return
        short = w.total / w.count
        busiest = w.max_inflight
        self._window = _Window(started=now, max_inflight=self._inflight)
        self._short = short
        if self._long is None or self._long_count < LONG_WARMUP:
            self._long = ((self._long or 0.0) * self._long_count + short) / (self._long_count + 1)
            self._long_count += 1
        else:
            self._long += (short - self._long) * 2.0 / (LONG_WINDOW + 1)
        if self._long / short > 2:  # latency fell back after a long overload: forget it faster
            self._long *= 0.95
        # Gradient2's long-term average follows sustained queueing up (its known drift): anchor it
        # to a slowly forgetting floor, as Vegas and Envoy anchor to the minimum latency.
        self._floor = short if self._floor is None else min(short, self._floor * (1 + FLOOR_FORGET))
        self._long = min(self._long, FLOOR_CAP * self._floor)
        if not self._adaptive or busiest < self._estimate / 2:
            return  # app-limited: a mostly idle limit proves nothing about a higher one
        gradient = max(MIN_GRADIENT, min(1.0, TOLERANCE * self._long / short))
        if self._slow_start and gradient >= 1.0:
            self._estimate = min(float(self._max), self._estimate * SLOW_START)
            return
        self._slow_start = False
        queue = max(MIN_QUEUE, math.sqrt(self._estimate))
        target = self._estimate * gradient + queue
        self._estimate = max(1.0, min(float(self._max), self._estimate * (1 - SMOOTHING) + target * SMOOTHING))

    # --- metrics ------------------------------------------------------------------------------
    def _publish(self) -> None:
        try:
            metrics.LLM_CONCURRENCY_LIMIT.set(self.limit)
            for kind in KINDS:
                left = self.remaining(kind)
                if left is not None:
                    metrics.LLM_BUDGET_REMAINING.labels(kind).set(max(0.0, left))
        except Exception:  # pragma: no cover - defensive
            log.debug("limiter metrics update failed", exc_info=True)

    @staticmethod
    def _count_wait(reason: str) -> None:
        try:
            metrics.LLM_CONCURRENCY_WAITS.labels(reason).inc()
        except Exception:  # pragma: no cover - defensive
            log.debug("limiter metrics update failed", exc_info=True)
