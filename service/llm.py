"""The LLM client: one batched chat completion per call, with retries, a circuit breaker and costs.

Why it is shaped this way:

* One logical call = one prompt holding every item of a batch (``service.prompts``); the reply is
  JSON keyed by item id, validated item by item, so one bad item does not sink the others.
* Retries are ours, not the SDK's (``max_retries=0``): exponential backoff with full jitter inside a
  total deadline, ``Retry-After`` honoured on 429, 5xx / timeouts / connection errors retried, other
  4xx not (they would fail again). That keeps every HTTP attempt visible in metrics and bounded in time.
* A circuit breaker counts real failures (429, 5xx, timeouts, connection errors); while it is open,
  calls fail at once instead of piling up behind a dead endpoint.
* Tokens come only from the endpoint's ``usage`` (what is billed); cost is priced with
  ``service.cost`` and split over the items so per-task costs add up exactly to the call's.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from service import metrics, prompts
from service.breaker import CircuitBreaker
from service.config import Settings
from service.cost import Price, PriceTable

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.25  # first retry waits U(0, 0.25 s), then U(0, 0.5 s), ...
BACKOFF_CAP_S = 8.0
CHARS_PER_TOKEN_BOUND = 6  # generous chars/token: a post longer than max_tokens * 6 chars cannot be honest
RETRY_AFTER_SPREAD = 0.1
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx


@dataclass(frozen=True, slots=True)
class LLMItem:
    """One post to write; ``id`` is the task id and comes back unchanged in the reply."""

    id: str
    persona_id: str
    topic: str


@dataclass(frozen=True, slots=True)
class LLMItemResult:
    """One item's outcome and its share of the call's billed usage.

    ``post`` is None when the item was missing or malformed in the reply; ``error`` says why. The
    shares of all items of a call sum exactly to the call's ``usage`` (tokens) and cost.
    """

    id: str
    post: str | None
    error: str | None
    input_tokens: int
    output_tokens: int
    cost_usd: float


class LLMError(Exception):
    """The whole call failed: retries or deadline exhausted, breaker open, or a non-retryable 4xx.

    ``retryable`` tells the caller whether trying the same items later can succeed; ``outcome`` is
    the ``LLM_REQUESTS`` outcome of the last attempt.
    """

    def __init__(self, message: str, *, retryable: bool, outcome: str) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.outcome = outcome


class _ReplyItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: StrictStr
    post: StrictStr


class LLMBreaker(CircuitBreaker):
    """The shared circuit breaker with an ``is_open`` that callers can poll without side effects.

    A worker that pauses pulling work while ``is_open`` must see it turn False once the reset time
    has passed — otherwise nothing would ever send the half-open probe that closes it, and the worker
    would wait forever. So here ``is_open`` means "a call would be refused right now": open and not
    yet due for its probe, or the probe is in flight. (The gauge still shows the raw open state.)
    """

    @property
    def is_open(self) -> bool:
        if self._opened_at is None:
            return False
        return self._trial_in_flight or self._clock() - self._opened_at < self._reset_s

    @property
    def probing(self) -> bool:
        """True while the single half-open trial call is in flight."""
        return self._trial_in_flight


@dataclass(frozen=True, slots=True)
class _Failure:
    """A failed HTTP attempt, classified."""

    outcome: str  # rate_limited|server_error|timeout|bad_response|client_error
    retryable: bool
    counts_for_breaker: bool
    retry_after_s: float | None
    message: str


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``retry-after`` as seconds or an HTTP date."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        with contextlib.suppress(ValueError):
            value = float(ms) / 1000.0
            if value >= 0:
                return value
    raw = headers.get("retry-after")
    if raw is None:
        return None
    with contextlib.suppress(ValueError):
        value = float(raw)
        return value if value >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def split_evenly(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` proportionally to ``weights`` into integers that sum exactly to ``total``.

    Largest-remainder method; all-zero weights split evenly. Earlier items win ties.
    """
    n = len(weights)
    if n == 0:
        return []
    if total <= 0:
        return [0] * n
    if sum(weights) <= 0:
        weights = [1] * n
    denom = sum(weights)
    shares = [total * w // denom for w in weights]
    order = sorted(range(n), key=lambda i: (-(total * weights[i] % denom), i))
    for i in order[: total - sum(shares)]:
        shares[i] += 1
    return shares


def strip_code_fence(text: str) -> str:
    """Tolerate a reply wrapped in a Markdown code fence (some OpenAI-compatible servers do this)."""
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    return text.strip()


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err.get("loc", ())) or "item"
    return f"{where}: {err.get('msg', 'invalid')}"


@contextlib.contextmanager
def _metrics_guard() -> Iterator[None]:
    """A metrics failure never fails a call."""
    try:
        yield
    except Exception:  # pragma: no cover - defensive
        log.debug("metrics update failed", exc_info=True)


class LLMClient:
    """Batched post generation against an OpenAI-compatible endpoint (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        """Fails here (at startup) on an unpriced model or an unknown prompt version.

        ``sleep``/``clock``/``rand`` exist so tests can record backoff without waiting for it.
        """
        self._settings = settings
        self._model = settings.llm_model
        self._price: Price = PriceTable(settings.llm_prices).price(self._model)
        prompts.system_prompt(settings.prompt_version)
        self._max_post_chars = settings.llm_max_tokens * CHARS_PER_TOKEN_BOUND
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self._client = AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value(),
            timeout=settings.llm_timeout_s,
            max_retries=0,
        )
        self.breaker = LLMBreaker(
            settings.llm_breaker_failures, settings.llm_breaker_reset_s, metrics.LLM_BREAKER_OPEN, clock=clock
        )

    @property
    def model(self) -> str:
        return self._model

    @property
    def price(self) -> Price:
        return self._price

    async def aclose(self) -> None:
        await self._client.close()

    async def generate(self, items: Sequence[LLMItem]) -> list[LLMItemResult]:
        """One logical call for ``items`` (retried internally); results in input order.

        Raises ``LLMError`` if no attempt produced a response. A response that is not the expected
        JSON is billed and returned as per-item errors (``post=None``), not raised.
        """
        if not items:
            return []
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique within a call")
        with _metrics_guard():
            metrics.LLM_BATCH_SIZE.observe(len(items))
        messages = cast(list[ChatCompletionMessageParam], prompts.build_messages(items, self._settings.prompt_version))
        max_tokens = self._settings.llm_max_tokens * len(items)
        deadline = self._clock() + self._settings.llm_deadline_s
        retries = 0
        while True:
            if not self.breaker.allow():
                self._count("breaker_open")
                raise LLMError("LLM circuit breaker is open; failing fast", retryable=True, outcome="breaker_open")
            probe = self.breaker.probing  # allowed while open: we are the half-open trial
            remaining = deadline - self._clock()
            if remaining <= 0:
                self._release_probe(probe)
                raise LLMError("LLM deadline exhausted", retryable=True, outcome="timeout")
            result = await self._attempt(messages, max_tokens, min(self._settings.llm_timeout_s, remaining), probe)
            if isinstance(result, ChatCompletion):
                return self._results(items, result)
            failure = result
            if not failure.retryable:
                raise LLMError(failure.message, retryable=False, outcome=failure.outcome)
            if retries >= self._settings.llm_max_retries:
                raise LLMError(
                    f"{failure.message} (gave up after {retries + 1} attempts)", retryable=True, outcome=failure.outcome
                )
            retries += 1
            backoff = self._rand() * min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (retries - 1))
            # Never sooner than the server asked; up to 10 % later so callers told the same
            # Retry-After do not all come back in the same instant.
            delay = max(backoff, (failure.retry_after_s or 0.0) * (1 + RETRY_AFTER_SPREAD * self._rand()))
            if self._clock() + delay >= deadline:
                raise LLMError(
                    f"{failure.message} (next retry in {delay:.2f}s would pass the {self._settings.llm_deadline_s}s "
                    "deadline)",
                    retryable=True,
                    outcome=failure.outcome,
                )
            log.info("LLM attempt failed (%s); retry %d in %.2fs", failure.outcome, retries, delay)
            await self._sleep(delay)

    # --- one HTTP attempt ------------------------------------------------------------------------
    async def _attempt(
        self, messages: list[ChatCompletionMessageParam], max_tokens: int, budget_s: float, probe: bool
    ) -> ChatCompletion | _Failure:
        started = self._clock()
        with _metrics_guard():
            metrics.LLM_INFLIGHT.inc()
        failure: _Failure | None = None
        response: ChatCompletion | None = None
        try:
            response = await self._client.chat.completions.create(
                model=self._model,
                messages=messages,
                response_format={"type": "json_object"},
                max_completion_tokens=max_tokens,
                timeout=budget_s,
            )
        except openai.APITimeoutError:
            failure = _Failure("timeout", True, True, None, f"LLM call timed out after {budget_s:.1f}s")
        except openai.APIConnectionError as exc:
            failure = _Failure("server_error", True, True, None, f"LLM connection failed: {exc}")
        except openai.APIStatusError as exc:
            failure = self._classify_status(exc)
        except openai.APIResponseValidationError as exc:
            failure = _Failure("bad_response", True, True, None, f"LLM response not understood: {exc}")
        except BaseException:
            self._release_probe(probe)  # cancelled mid-probe: re-open rather than stay half-open forever
            raise
        finally:
            with _metrics_guard():
                metrics.LLM_INFLIGHT.dec()
                metrics.LLM_DURATION.labels(self._model).observe(self._clock() - started)
        if response is not None:
            self.breaker.record_success()
            return response
        assert failure is not None
        self._count(failure.outcome)
        if failure.counts_for_breaker:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()  # the endpoint answered; the request was the problem
        return failure

    @staticmethod
    def _classify_status(exc: openai.APIStatusError) -> _Failure:
        status = exc.status_code
        detail = f"LLM endpoint answered {status}: {exc.message}"
        if status == 429:
            return _Failure("rate_limited", True, True, parse_retry_after(exc.response.headers), detail)
        if status == 408:
            return _Failure("timeout", True, True, None, detail)
        if status >= 500 or status in RETRYABLE_STATUS:
            return _Failure("server_error", True, True, parse_retry_after(exc.response.headers), detail)
        return _Failure("client_error", False, False, None, detail)

    def _release_probe(self, probe: bool) -> None:
        if probe:
            self.breaker.record_failure()

    def _count(self, outcome: str) -> None:
        with _metrics_guard():
            metrics.LLM_REQUESTS.labels(self._model, outcome).inc()

    # --- reply parsing and usage split -----------------------------------------------------------
    def _results(self, items: Sequence[LLMItem], completion: ChatCompletion) -> list[LLMItemResult]:
        usage = completion.usage
        input_tokens = usage.prompt_tokens if usage is not None else 0
        output_tokens = usage.completion_tokens if usage is not None else 0
        if usage is None:
            log.warning("LLM response without usage; recording 0 tokens and $0 for this call")
        posts, errors, envelope_error = self._parse(items, completion)
        self._count("bad_response" if envelope_error else "ok")
        with _metrics_guard():
            metrics.LLM_TOKENS.labels(self._model, "input").inc(input_tokens)
            metrics.LLM_TOKENS.labels(self._model, "output").inc(output_tokens)
            metrics.LLM_COST.labels(self._model).inc(self._price.cost_usd(input_tokens, output_tokens))
        inputs = split_evenly(input_tokens, [1] * len(items))
        outputs = split_evenly(output_tokens, [len(posts.get(it.id, "")) for it in items])
        results: list[LLMItemResult] = []
        for it, tin, tout in zip(items, inputs, outputs, strict=True):
            post = posts.get(it.id)
            error = None if post is not None else (envelope_error or errors.get(it.id) or "item missing from response")
            results.append(LLMItemResult(it.id, post, error, tin, tout, self._price.cost_usd(tin, tout)))
        return results

    def _parse(
        self, items: Sequence[LLMItem], completion: ChatCompletion
    ) -> tuple[dict[str, str], dict[str, str], str | None]:
        """Valid posts by id, per-item errors by id, and an error for the reply as a whole."""
        if not completion.choices:
            return {}, {}, "response has no choices"
        choice = completion.choices[0]
        if choice.message.refusal:
            return {}, {}, f"model refused: {choice.message.refusal[:200]}"
        truncated = " (truncated at max_tokens)" if choice.finish_reason == "length" else ""
        try:
            doc = json.loads(strip_code_fence(choice.message.content or ""))
        except ValueError:
            return {}, {}, f"response is not valid JSON{truncated}"
        reply = doc.get(prompts.ITEMS_KEY) if isinstance(doc, dict) else None
        if not isinstance(reply, list):
            return {}, {}, f"response JSON has no '{prompts.ITEMS_KEY}' array{truncated}"
        wanted = {it.id for it in items}
        posts: dict[str, str] = {}
        errors: dict[str, str] = {}
        for raw in cast(list[Any], reply):
            raw_id = raw.get("id") if isinstance(raw, dict) else None
            try:
                entry = _ReplyItem.model_validate(raw)
            except ValidationError as exc:
                if isinstance(raw_id, str) and raw_id in wanted:
                    errors.setdefault(raw_id, f"malformed item: {_first_error(exc)}")
                continue
            if entry.id not in wanted or entry.id in posts:
                continue  # unknown id (hallucinated or altered) or a duplicate: first valid one wins
            post = entry.post.strip()
            if not post:
                errors.setdefault(entry.id, "malformed item: empty post")
            elif len(post) > self._max_post_chars:
                errors.setdefault(entry.id, f"malformed item: post longer than {self._max_post_chars} characters")
            else:
                posts[entry.id] = post
        if truncated:
            for it in items:
                if it.id not in posts:
                    errors.setdefault(it.id, f"item missing from response{truncated}")
        return posts, errors, None
