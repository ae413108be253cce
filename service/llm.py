"""The LLM client: one batched chat completion per call, with retries, a circuit breaker and costs.

Why it is shaped this way:

* One logical call = one prompt holding every item of a batch (``service.prompts``); the reply is
  JSON keyed by item id, validated item by item, so one bad item does not sink the others.
* The reply is streamed (``stream=True``, usage in the last chunk via ``stream_options``): the items
  of a batch are written one after another, so each is handed to the caller the moment its JSON
  object closes (:class:`ReplyScanner`) — the first post of a 5-item batch is ready after about a
  fifth of the call. Usage, and so each item's share of it, is known only when the stream ends.
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
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import httpx2
import openai
from openai import AsyncOpenAI, AsyncStream
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError

from service import metrics, prompts
from service.breaker import CircuitBreaker
from service.config import Settings
from service.cost import Price, PriceTable
from service.limiter import AdaptiveLimiter
from service.llmhttp import LeanTransport

log = logging.getLogger(__name__)

BACKOFF_BASE_S = 0.25  # first retry waits U(0, 0.25 s), then U(0, 0.5 s), ...
BACKOFF_CAP_S = 8.0
CHARS_PER_TOKEN_BOUND = 6  # generous chars/token: a post longer than max_tokens * 6 chars cannot be honest
RETRY_AFTER_SPREAD = 0.1
RETRYABLE_STATUS = frozenset({408, 409, 429})  # plus every 5xx

PostSink = Callable[[str, str], None]
"""``(item id, post)``: called as each item of a streamed reply closes; must not block."""


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


_SCAN_OUTSIDE = re.compile(r'["{}\[\]:,]')
_SCAN_STRING = re.compile(r'["\\]')


class ReplyScanner:
    """Finds the item objects of a ``{"items": [{...}, ...]}`` reply while it is still streaming in.

    Why: a batched reply's items are written one after another, so the first item is complete
    seconds before the last; the worker finishes each task as soon as its object closes. This only
    tracks nesting and strings (escapes and multi-byte text may be split anywhere across chunks),
    skips anything before the first ``{`` and after the envelope closes (a code fence), and yields
    the raw text of each object directly inside the ``items`` array. It never decides validity: a
    yielded text is parsed and checked item by item, and the whole reply is still parsed at the end.
    """

    def __init__(self, key: str = prompts.ITEMS_KEY) -> None:
        self.text = ""
        self.broken = False  # brackets did not match: nothing more is yielded (the final parse decides)
        self._key_wanted = key
        self._pos = 0
        self._stack: list[str] = []
        self._started = False
        self._ended = False
        self._in_string = False
        self._string_start = 0
        self._last_string: Any = None  # the last string at the envelope's level: a key once ':' follows
        self._key: Any = None
        self._in_items = False
        self._item_start = -1

    def feed(self, piece: str) -> list[str]:
        """Append ``piece``; the texts of the item objects that closed within it."""
        self.text += piece
        text, pos, closed = self.text, self._pos, []
        while not (self._ended or self.broken):
            if self._in_string:
                m = _SCAN_STRING.search(text, pos)
                if m is None:
                    pos = len(text)
                    break
                if m.group() == "\\":
                    if m.end() >= len(text):  # the escaped character is in the next piece
                        pos = m.start()
                        break
                    pos = m.end() + 1
                    continue
                self._in_string, pos = False, m.end()
                if len(self._stack) == 1:
                    try:
                        self._last_string = json.loads(text[self._string_start : pos])
                    except ValueError:
                        self._last_string = None
                continue
            if not self._started:
                start = text.find("{", pos)
                if start < 0:
                    pos = len(text)
                    break
                self._started, pos = True, start + 1
                self._stack.append("{")
                continue
            m = _SCAN_OUTSIDE.search(text, pos)
            if m is None:
                pos = len(text)
                break
            char, at, pos = m.group(), m.start(), m.end()
            depth = len(self._stack)
            if char == '"':
                self._in_string, self._string_start = True, at
            elif char == ":":
                if depth == 1:
                    self._key = self._last_string
            elif char == ",":
                if depth == 1:
                    self._key = self._last_string = None
            elif char in "{[":
                if char == "{" and self._in_items and depth == 2:
                    self._item_start = at
                if char == "[" and depth == 1 and self._key == self._key_wanted:
                    self._in_items = True
                self._stack.append(char)
            else:
                if self._stack[-1] != ("{" if char == "}" else "["):
                    self.broken = True
                    break
                self._stack.pop()
                depth -= 1
                if char == "}" and self._in_items and depth == 2 and self._item_start >= 0:
                    closed.append(text[self._item_start : at + 1])
                    self._item_start = -1
                elif char == "]" and self._in_items and depth == 1:
                    self._in_items = False
                    self._key_wanted = None  # only the first items array counts
                self._ended = not self._stack
        self._pos = pos
        return closed


@dataclass(slots=True)
class _Reply:
    """One streamed response, read to its end."""

    content: str
    refusal: str
    finish_reason: str | None
    saw_choice: bool
    usage: tuple[int, int] | None  # prompt and completion tokens, when the endpoint sent them


class _BadChunk(Exception):
    """A streamed chunk that is not shaped like an OpenAI chat completion chunk."""


def _usage(raw: object) -> tuple[int, int]:
    """``(prompt_tokens, completion_tokens)`` of a usage object; a malformed one is a bad chunk."""
    if isinstance(raw, dict):
        doc = cast(dict[str, Any], raw)
        prompt, completion = doc.get("prompt_tokens"), doc.get("completion_tokens")
        if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
            return prompt, completion
    raise _BadChunk(f"usage not understood: {str(raw)[:80]}")


def _prompt_tokens_estimate(messages: Sequence[Mapping[str, Any]]) -> int:
    """About four characters a token, plus the chat framing: the limiter corrects it from ``usage``."""
    return sum(len(str(m.get("content", ""))) // 4 + 4 for m in messages) + 3


class LLMClient:
    """Batched post generation against an OpenAI-compatible endpoint (see module docstring)."""

    def __init__(
        self,
        settings: Settings,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
        on_first_token: Callable[[float], None] | None = None,
        limiter: AdaptiveLimiter | None = None,
    ) -> None:
        """Fails here (at startup) on an unpriced model or an unknown prompt version.

        ``sleep``/``clock``/``rand`` exist so tests can record backoff without waiting for it.
        ``on_first_token`` (also settable later as an attribute) is called once per HTTP attempt
        that streams content, with the seconds from sending the request to the first content chunk
        (``clock`` time) — the endpoint's latency before output, e.g. for a concurrency limiter.
        ``limiter`` (also settable as an attribute) admits every HTTP attempt, retries included: it
        is told each attempt's outcome, time to first token and the provider's rate-limit headers.
        """
        self._settings = settings
        self._model = settings.llm_model
        self._price: Price = PriceTable(settings.llm_prices).price(self._model)
        prompts.system_prompt(settings.prompt_version)
        self._max_post_chars = settings.llm_max_tokens * CHARS_PER_TOKEN_BOUND
        self._sleep = sleep
        self._clock = clock
        self._rand = rand
        self.on_first_token = on_first_token
        self.limiter = limiter
        self._client = AsyncOpenAI(
            base_url=settings.llm_base_url,
            api_key=settings.llm_api_key.get_secret_value(),
            timeout=settings.llm_timeout_s,
            max_retries=0,
            http_client=httpx2.AsyncClient(transport=LeanTransport()) if settings.llm_http_client == "lean" else None,
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

    async def generate(self, items: Sequence[LLMItem], on_post: PostSink | None = None) -> list[LLMItemResult]:
        """One logical call for ``items`` (retried internally); results in input order.

        The reply is streamed: ``on_post(id, post)`` is called once for every item, the moment its
        object in the reply closes and validates (for an item the incremental scan missed, at the
        end of the reply) — before the call's usage is known, which arrives only with the last
        chunk. The results carry each item's share of that usage.

        An attempt that fails before any item closed is retried as a whole; after some items closed,
        only the others are sent again (an item is never produced twice). Raises ``LLMError`` if no
        attempt produced a response for the items still open. A response that is not the expected
        JSON is billed and returned as per-item errors (``post=None``), not raised.
        """
        if not items:
            return []
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("item ids must be unique within a call")
        with _metrics_guard():
            metrics.LLM_BATCH_SIZE.observe(len(items))
        posts: dict[str, str] = {}  # closed items (on_post called), across attempts
        tokens: dict[str, list[int]] = {it.id: [0, 0] for it in items}  # billed [input, output] per item

        def close(item_id: str, post: str) -> None:
            posts[item_id] = post
            if on_post is not None:
                on_post(item_id, post)

        open_items = list(items)
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
            result = await self._attempt(open_items, min(self._settings.llm_timeout_s, remaining), probe, close)
            if isinstance(result, _Reply):
                errors = self._settle(open_items, result, posts, tokens, close)
                return [self._result(it.id, posts.get(it.id), errors.get(it.id), tokens[it.id]) for it in items]
            failure = result
            open_items = [it for it in open_items if it.id not in posts]
            if not open_items:  # every item closed before the stream broke off: nothing to retry
                log.warning("LLM stream failed after its last item (%s); no usage, recording 0", failure.outcome)
                return [self._result(it.id, posts[it.id], None, tokens[it.id]) for it in items]
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
            log.info(
                "LLM attempt failed (%s); retry %d of %d open item(s) in %.2fs",
                failure.outcome,
                retries,
                len(open_items),
                delay,
            )
            await self._sleep(delay)

    def _result(self, item_id: str, post: str | None, error: str | None, billed: list[int]) -> LLMItemResult:
        tin, tout = billed
        if post is not None:
            error = None
        elif error is None:
            error = "item missing from response"
        return LLMItemResult(item_id, post, error, tin, tout, self._price.cost_usd(tin, tout))

    # --- one HTTP attempt ------------------------------------------------------------------------
    async def _attempt(
        self, items: Sequence[LLMItem], budget_s: float, probe: bool, close: PostSink
    ) -> _Reply | _Failure:
        """One streamed request for ``items``, read to its end within ``budget_s`` in total."""
        messages = prompts.build_messages(items, self._settings.prompt_version)
        max_tokens = self._settings.llm_max_tokens * len(items)
        # What an OpenAI-style budget charges at admission: the prompt (estimated) plus the output cap.
        permit = await self.limiter.acquire(_prompt_tokens_estimate(messages) + max_tokens) if self.limiter else None
        headers: Mapping[str, str] | None = None
        ttft: float | None = None
        wanted = {it.id for it in items}
        scanner = ReplyScanner()
        refusal: list[str] = []
        finish_reason: str | None = None
        saw_choice = False
        usage: tuple[int, int] | None = None
        first_token = True
        started = self._clock()
        with _metrics_guard():
            metrics.LLM_INFLIGHT.inc()
        failure: _Failure | None = None
        reply: _Reply | None = None
        try:
            async with asyncio.timeout(budget_s):  # the SDK's timeout bounds each read, not the stream
                # The SDK's public ``post`` with plain-dict chunks: its error mapping and SSE decoding,
                # without building a pydantic model per chunk (that was most of a worker's CPU per task).
                stream = await self._client.post(
                    "/chat/completions",
                    cast_to=object,
                    body={
                        "model": self._model,
                        "messages": messages,
                        "response_format": {"type": "json_object"},
                        "max_completion_tokens": max_tokens,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    },
                    options={"timeout": budget_s},
                    stream=True,
                    stream_cls=AsyncStream[object],
                )
                headers = stream.response.headers
                async with stream:
                    async for chunk in stream:
                        if not isinstance(chunk, dict):
                            raise _BadChunk(f"chunk is not a JSON object: {str(chunk)[:80]}")
                        doc = cast(dict[str, Any], chunk)
                        if doc.get("usage") is not None:
                            usage = _usage(doc["usage"])
                        choices = doc.get("choices")
                        if not isinstance(choices, list) or not choices:
                            continue
                        saw_choice = True
                        choice = cast(list[Any], choices)[0]
                        delta = choice.get("delta") if isinstance(choice, dict) else None
                        if not isinstance(delta, dict):
                            raise _BadChunk("chunk choice without a delta")
                        choice = cast(dict[str, Any], choice)
                        delta = cast(dict[str, Any], delta)
                        if isinstance(choice.get("finish_reason"), str):
                            finish_reason = choice["finish_reason"]
                        if isinstance(delta.get("refusal"), str):
                            refusal.append(delta["refusal"])
                        content = delta.get("content")
                        if not isinstance(content, str) or not content:
                            continue
                        if first_token:
                            first_token = False
                            ttft = self._clock() - started
                            self._first_token(ttft)
                        for text in scanner.feed(content):
                            self._close_streamed(text, wanted, close)
            reply = _Reply(scanner.text, "".join(refusal), finish_reason, saw_choice, usage)
        except (TimeoutError, openai.APITimeoutError):
            failure = _Failure("timeout", True, True, None, f"LLM call timed out after {budget_s:.1f}s")
        except openai.APIConnectionError as exc:
            failure = _Failure("server_error", True, True, None, f"LLM connection failed: {exc}")
        except openai.APIStatusError as exc:
            failure = self._classify_status(exc)
            headers = exc.response.headers
        except (openai.APIResponseValidationError, _BadChunk) as exc:
            failure = _Failure("bad_response", True, True, None, f"LLM response not understood: {exc}")
        except openai.APIError as exc:  # an error event inside the stream
            failure = _Failure("server_error", True, True, None, f"LLM stream failed: {exc.message}")
        except BaseException:
            self._release_probe(probe)  # cancelled mid-probe: re-open rather than stay half-open forever
            if permit is not None:
                permit.done("cancelled")
            raise
        finally:
            with _metrics_guard():
                metrics.LLM_INFLIGHT.dec()
                metrics.LLM_DURATION.labels(self._model).observe(self._clock() - started)
        if reply is not None:
            self.breaker.record_success()
            if permit is not None:
                counted = reply.usage[0] + max_tokens if reply.usage is not None else None
                permit.done("ok", latency_s=ttft, headers=headers, tokens=counted)
            return reply
        assert failure is not None
        if permit is not None:
            permit.done("rate_limited" if failure.outcome == "rate_limited" else "error", headers=headers)
        self._count(failure.outcome)
        if failure.counts_for_breaker:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()  # the endpoint answered; the request was the problem
        return failure

    def _first_token(self, seconds: float) -> None:
        hook = self.on_first_token
        if hook is None:
            return
        try:
            hook(seconds)
        except Exception:  # a listener's bug never fails a call
            log.warning("on_first_token hook failed", exc_info=True)

    def _close_streamed(self, text: str, wanted: set[str], close: PostSink) -> None:
        """An item object closed mid-stream: finish it now if it is one of ours and valid."""
        try:
            raw = json.loads(text)
        except ValueError:
            return  # its reason (if it is ours) comes from the parse of the whole reply
        checked = self._check_item(raw, wanted)
        if checked is not None and checked[1] is not None:
            wanted.discard(checked[0])  # first valid one wins; later duplicates are ignored
            close(checked[0], checked[1])

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
    def _settle(
        self,
        items: Sequence[LLMItem],
        reply: _Reply,
        posts: dict[str, str],
        tokens: dict[str, list[int]],
        close: PostSink,
    ) -> dict[str, str]:
        """Bill a finished reply to ``items`` (the ones it was for) and return the errors of those
        that did not close; an item the scan missed but the whole reply has is closed now."""
        usage = reply.usage
        input_tokens, output_tokens = usage if usage is not None else (0, 0)
        if usage is None:
            log.warning("LLM response without usage; recording 0 tokens and $0 for this call")
        whole, errors, envelope_error = self._parse(items, reply)
        for it in items:
            if it.id not in posts and it.id in whole:
                close(it.id, whole[it.id])
        self._count("bad_response" if envelope_error else "ok")
        with _metrics_guard():
            metrics.LLM_TOKENS.labels(self._model, "input").inc(input_tokens)
            metrics.LLM_TOKENS.labels(self._model, "output").inc(output_tokens)
            metrics.LLM_COST.labels(self._model).inc(self._price.cost_usd(input_tokens, output_tokens))
        inputs = split_evenly(input_tokens, [1] * len(items))
        outputs = split_evenly(output_tokens, [len(posts.get(it.id, "")) for it in items])
        for it, tin, tout in zip(items, inputs, outputs, strict=True):
            tokens[it.id][0] += tin
            tokens[it.id][1] += tout
        return {
            it.id: envelope_error or errors.get(it.id) or "item missing from response"
            for it in items
            if it.id not in posts
        }

    def _check_item(self, raw: Any, wanted: set[str]) -> tuple[str, str | None, str | None] | None:
        """``(id, post, None)`` for a valid item of ours, ``(id, None, reason)`` for a broken one,
        None when it is not ours (unknown, altered or missing id)."""
        raw_id = raw.get("id") if isinstance(raw, dict) else None
        try:
            entry = _ReplyItem.model_validate(raw)
        except ValidationError as exc:
            if isinstance(raw_id, str) and raw_id in wanted:
                return raw_id, None, f"malformed item: {_first_error(exc)}"
            return None
        if entry.id not in wanted:
            return None
        post = entry.post.strip()
        if not post:
            return entry.id, None, "malformed item: empty post"
        if len(post) > self._max_post_chars:
            return entry.id, None, f"malformed item: post longer than {self._max_post_chars} characters"
        return entry.id, post, None

    def _parse(self, items: Sequence[LLMItem], reply: _Reply) -> tuple[dict[str, str], dict[str, str], str | None]:
        """The whole reply: valid posts by id, per-item errors by id, and an error for the reply as a whole."""
        if not reply.saw_choice:
            return {}, {}, "response has no choices"
        if reply.refusal:
            return {}, {}, f"model refused: {reply.refusal[:200]}"
        truncated = " (truncated at max_tokens)" if reply.finish_reason == "length" else ""
        try:
            doc = json.loads(strip_code_fence(reply.content))
        except ValueError:
            return {}, {}, f"response is not valid JSON{truncated}"
        entries = doc.get(prompts.ITEMS_KEY) if isinstance(doc, dict) else None
        if not isinstance(entries, list):
            return {}, {}, f"response JSON has no '{prompts.ITEMS_KEY}' array{truncated}"
        wanted = {it.id for it in items}
        posts: dict[str, str] = {}
        errors: dict[str, str] = {}
        for raw in cast(list[Any], entries):
            checked = self._check_item(raw, wanted)
            if checked is None or checked[0] in posts:
                continue  # not ours (hallucinated or altered id) or a duplicate: the first valid one wins
            item_id, post, error = checked
            if post is not None:
                posts[item_id] = post
            elif error is not None:
                errors.setdefault(item_id, error)
        if truncated:
            for it in items:
                if it.id not in posts:
                    errors.setdefault(it.id, f"item missing from response{truncated}")
        return posts, errors, None
