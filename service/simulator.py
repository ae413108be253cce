"""An OpenAI-compatible LLM simulator: ``python -m service.simulator``.

Why it exists: load tests of the service must not spend money or depend on a vendor, yet they must
see what a real endpoint does — seconds of latency that grow under load, honest ``usage``, rate
limits, server errors, hung calls and malformed JSON. The official ``openai`` client works against it
unchanged (``base_url=http://host:port/v1``).

Endpoints: ``POST /v1/chat/completions`` (plain and ``stream: true`` SSE with an optional usage
chunk), ``GET /v1/models``, ``GET /healthz``, ``GET /stats`` (counters that tests and reports read),
``POST /stats/reset`` and ``POST /control`` (change fault rates, rate limits and the knee at run time
or script the outcome of the next calls, so tests are deterministic).

Rate limits (``sim_rpm``, ``sim_tpm``; 0 = unlimited) work like OpenAI's: per-minute token buckets
refilling continuously, a call charged at admission (1 request; prompt + max_tokens tokens), the
``x-ratelimit-limit/remaining/reset-{requests,tokens}`` headers on every chat response, and past a
limit 429 with ``Retry-After`` and ``retry-after-ms`` (counted in ``/stats`` as ``rate_limited``,
apart from injected 429s).

Latency model (all knobs are ``LOADPROOF_SIM_*`` settings)::

    latency = (ttft * U(1-j, 1+j) + itl * U(1-j, 1+j) * completion_tokens) * max(1, inflight / knee)

The defaults (ttft 350 ms, 16 ms/token ~ 60 tokens/s) approximate publicly reported gpt-4o-mini
speeds; they are assumptions, not measurements of ours.

Token counts are an approximation (:mod:`service.simtext`) computed from the text actually received
and returned, so ``usage`` is consistent with the content: the service bills exactly what this reports.

It is a bare ASGI app (no framework) on one uvicorn process: latency is ``asyncio`` sleeping, so
hundreds of concurrent calls cost almost no CPU; a client that disconnects ends its call at once.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from service.config import Settings, get_settings
from service.cost import DEFAULT_PRICES
from service.simtext import (
    CHARS_PER_TOKEN,
    approx_tokens,
    batch_items,
    generate_post,
    prompt_tokens,
)
from service.simwire import (
    BadRequest,
    Receive,
    Scope,
    Send,
    completion,
    delta,
    format_reset,
    load_header,
    read_json,
    send_error,
    send_json,
    sleep_or_disconnect,
    validate_chat,
)

OUTCOMES = ("ok", "429", "500", "timeout", "malformed", "bad_json")
MALFORMED_KINDS = ("missing", "empty", "not_a_string", "wrong_id")


@dataclass(slots=True)
class Faults:
    """Fault injection state; ``script`` outcomes are used first, then the random rates."""

    rate_429: float
    rate_500: float
    rate_timeout: float
    rate_malformed: float
    retry_after_s: float
    hang_s: float
    script: deque[str] = field(default_factory=deque)

    def describe(self) -> dict[str, Any]:
        return {
            "rate_429": self.rate_429,
            "rate_500": self.rate_500,
            "rate_timeout": self.rate_timeout,
            "rate_malformed": self.rate_malformed,
            "retry_after_s": self.retry_after_s,
            "hang_s": self.hang_s,
            "script": list(self.script),
        }


@dataclass(slots=True)
class _Bucket:
    """A per-minute limit as OpenAI enforces it: ``limit`` units refilling continuously."""

    limit: int
    level: float
    updated: float

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.updated) * self.limit / 60.0)
        self.updated = now

    def wait_s(self, amount: float) -> float:
        """Seconds until ``amount`` (at most a full bucket) is available; call after :meth:`refill`."""
        missing = min(amount, self.limit) - self.level
        return max(0.0, missing * 60.0 / self.limit)


@dataclass(slots=True)
class RateLimits:
    """Requests and tokens per minute (0 = unlimited); a call is charged at admission, tokens as OpenAI
    counts them (prompt + max_tokens). A refused call is not charged."""

    requests: _Bucket | None = None
    tokens: _Bucket | None = None

    def configure(self, rpm: int, tpm: int, now: float) -> None:
        """New limits start with a full bucket, like a fresh minute."""
        self.requests = _Bucket(rpm, float(rpm), now) if rpm else None
        self.tokens = _Bucket(tpm, float(tpm), now) if tpm else None

    def describe(self) -> dict[str, int]:
        return {"rpm": self.requests.limit if self.requests else 0, "tpm": self.tokens.limit if self.tokens else 0}

    def admit(self, tokens: int, now: float) -> tuple[str, float] | None:
        """None and charged if the call fits, else the exhausted kind and seconds until it would fit."""
        waits: list[tuple[float, str]] = []
        for kind, bucket, amount in (("requests", self.requests, 1), ("tokens", self.tokens, tokens)):
            if bucket is not None:
                bucket.refill(now)
                if (wait := bucket.wait_s(amount)) > 0:
                    waits.append((wait, kind))
        if waits:
            wait, kind = max(waits)
            return kind, wait
        for bucket, amount in ((self.requests, 1), (self.tokens, tokens)):
            if bucket is not None:
                bucket.level -= amount
        return None

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``x-ratelimit-*`` as OpenAI sends them; reset = time until the bucket is full again."""
        out: list[tuple[bytes, bytes]] = []
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            remaining = max(0, math.floor(bucket.level))
            reset = (bucket.limit - bucket.level) * 60.0 / bucket.limit
            out += [
                (f"x-ratelimit-limit-{kind}".encode(), str(bucket.limit).encode()),
                (f"x-ratelimit-remaining-{kind}".encode(), str(remaining).encode()),
                (f"x-ratelimit-reset-{kind}".encode(), format_reset(reset).encode()),
            ]
        return out


@dataclass(slots=True)
class Stats:
    """Counters since start (or the last reset); ``GET /stats`` returns them."""

    calls: int = 0  # chat completion requests received (valid ones)
    completed: int = 0  # 200 responses fully sent
    streams: int = 0
    items: int = 0  # items over all calls (a non-batched call is one item)
    batch_calls: int = 0  # calls whose prompt was a batch (even of one item)
    items_per_call: Counter[int] = field(default_factory=Counter)
    injected: Counter[str] = field(default_factory=Counter)  # 429|500|timeout|malformed_items|bad_json
    rate_limited: Counter[str] = field(default_factory=Counter)  # requests|tokens: 429s past sim_rpm/sim_tpm
    prompt_tokens: int = 0
    completion_tokens: int = 0
    bad_requests: int = 0
    disconnects: int = 0
    max_inflight: int = 0

    def snapshot(self, inflight: int) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "completed": self.completed,
            "streams": self.streams,
            "items": self.items,
            "batch_calls": self.batch_calls,
            "items_per_call": {str(k): v for k, v in sorted(self.items_per_call.items())},
            "injected": dict(sorted(self.injected.items())),
            "rate_limited": {"requests": self.rate_limited["requests"], "tokens": self.rate_limited["tokens"]},
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "bad_requests": self.bad_requests,
            "disconnects": self.disconnects,
            "inflight": inflight,
            "max_inflight": self.max_inflight,
        }


class Simulator:
    """The ASGI application."""

    def __init__(self, settings: Settings, *, seed: int = 0, retry_after_s: float = 1.0, hang_s: float = 60.0) -> None:
        self.settings = settings
        self.rng = random.Random(seed)
        self.faults = Faults(
            rate_429=settings.sim_rate_429,
            rate_500=settings.sim_rate_500,
            rate_timeout=settings.sim_rate_timeout,
            rate_malformed=settings.sim_rate_malformed,
            retry_after_s=retry_after_s,
            hang_s=hang_s,
        )
        self.stats = Stats()
        self.inflight = 0  # not a Stats counter: a reset must not forget calls still in flight
        self.knee = settings.sim_concurrency_knee  # settable at run time (POST /control)
        self.limits = RateLimits()
        self.limits.configure(settings.sim_rpm, settings.sim_tpm, time.monotonic())

    # --- ASGI plumbing -------------------------------------------------------------------------
    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        try:
            if path == "/v1/chat/completions" and method == "POST":
                await self._chat(scope, receive, send)
            elif path == "/healthz" and method == "GET":
                await send_json(send, 200, {"status": "ok"})
            elif path == "/stats" and method == "GET":
                await send_json(send, 200, {**self.stats.snapshot(self.inflight), "config": self._config()})
            elif path == "/stats/reset" and method == "POST":
                self._reset_stats()
                await send_json(send, 200, self.stats.snapshot(self.inflight))
            elif path == "/control" and method == "POST":
                await self._control(receive, send)
            elif path == "/v1/models" and method == "GET":
                await send_json(send, 200, self._models())
            else:
                await send_error(send, 404, f"no route {method} {path}", "not_found_error")
        except BadRequest as exc:
            self.stats.bad_requests += 1
            await send_error(send, exc.status, str(exc), "invalid_request_error")

    @staticmethod
    async def _lifespan(receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- control and introspection --------------------------------------------------------------
    def _reset_stats(self) -> None:
        self.stats = Stats(max_inflight=self.inflight)

    def _config(self) -> dict[str, Any]:
        """The latency model and faults in effect, so a report can say what was simulated."""
        st = self.settings
        return {
            "ttft_ms": st.sim_ttft_ms,
            "itl_ms": st.sim_itl_ms,
            "jitter": st.sim_jitter,
            "output_tokens": st.sim_output_tokens,
            "concurrency_knee": self.knee,
            "chars_per_token": CHARS_PER_TOKEN,
            "rate_limits": self.limits.describe(),
            "faults": self.faults.describe(),
        }

    def _models(self) -> dict[str, Any]:
        names = sorted({self.settings.llm_model, *DEFAULT_PRICES})
        return {
            "object": "list",
            "data": [{"id": n, "object": "model", "created": 0, "owned_by": "loadproof-simulator"} for n in names],
        }

    async def _control(self, receive: Receive, send: Send) -> None:
        body = await read_json(receive)
        if not isinstance(body, dict):
            raise BadRequest("control body must be a JSON object")
        f = self.faults
        for key in ("rate_429", "rate_500", "rate_timeout", "rate_malformed"):
            if key in body:
                value = body[key]
                if not isinstance(value, int | float) or not 0 <= value <= 1:
                    raise BadRequest(f"{key} must be a number in [0, 1]")
                setattr(f, key, float(value))
        for key in ("retry_after_s", "hang_s"):
            if key in body:
                value = body[key]
                if not isinstance(value, int | float) or not 0 <= value <= 3600:
                    raise BadRequest(f"{key} must be a number of seconds in [0, 3600]")
                setattr(f, key, float(value))
        if "concurrency_knee" in body:
            knee = body["concurrency_knee"]
            if not isinstance(knee, int) or isinstance(knee, bool) or not 1 <= knee <= 1_000_000:
                raise BadRequest("concurrency_knee must be an integer in [1, 1000000]")
            self.knee = knee
        if "rpm" in body or "tpm" in body:
            current = self.limits.describe()
            for key in ("rpm", "tpm"):
                value = body.get(key, current[key])
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 1_000_000_000:
                    raise BadRequest(f"{key} must be an integer in [0, 1000000000] (0 = unlimited)")
                current[key] = value
            self.limits.configure(current["rpm"], current["tpm"], time.monotonic())
        if "script" in body:
            script = body["script"]
            if not isinstance(script, list) or any(s not in OUTCOMES for s in script):
                raise BadRequest(f"script must be a list of outcomes from {list(OUTCOMES)}")
            f.script = deque(script)
        if "seed" in body:
            if not isinstance(body["seed"], int):
                raise BadRequest("seed must be an integer")
            self.rng.seed(body["seed"])
        if body.get("reset_stats"):
            self._reset_stats()
        await send_json(send, 200, {**f.describe(), "concurrency_knee": self.knee, **self.limits.describe()})

    # --- chat completions -----------------------------------------------------------------------
    def _decide(self) -> str:
        """Outcome of this call: the next scripted one, else independent draws (rate 1.0 = always)."""
        f = self.faults
        if f.script:
            return f.script.popleft()
        if self.rng.random() < f.rate_429:
            return "429"
        if self.rng.random() < f.rate_500:
            return "500"
        if self.rng.random() < f.rate_timeout:
            return "timeout"
        return "ok"

    def _jittered(self, value_ms: float) -> float:
        j = self.settings.sim_jitter
        return value_ms / 1000.0 * self.rng.uniform(1 - j, 1 + j)

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_json(receive)
        request = validate_chat(body)
        messages: list[dict[str, Any]] = request["messages"]
        stats = self.stats
        stats.calls += 1
        items = batch_items(messages)
        n_items = len(items) if items is not None else 1
        stats.items += n_items
        stats.items_per_call[n_items] += 1
        if items is not None:
            stats.batch_calls += 1

        cap = request.get("max_completion_tokens") or request.get("max_tokens")
        charge = prompt_tokens(messages) + (cap if isinstance(cap, int) else self.settings.sim_output_tokens * n_items)
        refused = self.limits.admit(charge, time.monotonic())
        limit_headers = self.limits.headers()
        if refused is not None:
            kind, wait = refused
            stats.rate_limited[kind] += 1
            message = f"Rate limit reached for {kind} per minute (simulated: rpm/tpm)."
            await send_error(send, 429, message, kind, "rate_limit_exceeded", _retry_after(wait) + limit_headers)
            return

        outcome = self._decide()
        self.inflight += 1
        stats.max_inflight = max(stats.max_inflight, self.inflight)
        try:
            load = max(1.0, self.inflight / self.knee)
            if outcome == "429":
                stats.injected["429"] += 1
                headers = _retry_after(self.faults.retry_after_s) + limit_headers
                await send_error(
                    send, 429, "Rate limit reached (simulated).", "requests", "rate_limit_exceeded", headers
                )
                return
            if outcome == "500":
                stats.injected["500"] += 1
                if await sleep_or_disconnect(receive, self._jittered(self.settings.sim_ttft_ms) * load):
                    await send_error(
                        send, 500, "The server had an error (simulated).", "server_error", headers=limit_headers
                    )
                else:
                    self.stats.disconnects += 1
                return
            if outcome == "timeout":
                stats.injected["timeout"] += 1
                if await sleep_or_disconnect(receive, self.faults.hang_s):
                    await send_error(
                        send, 504, "Upstream timed out (simulated hang).", "server_error", headers=limit_headers
                    )
                else:
                    self.stats.disconnects += 1
                return

            content = self._content(request, items, outcome)
            finish_reason = "stop"
            if isinstance(cap, int) and approx_tokens(content) > cap:
                content, finish_reason = content[: cap * CHARS_PER_TOKEN], "length"
            usage = {
                "prompt_tokens": prompt_tokens(messages),
                "completion_tokens": approx_tokens(content),
            }
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            model = str(request.get("model"))
            if request.get("stream"):
                stats.streams += 1
                include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                sent = await self._stream(
                    receive, send, model, content, finish_reason, usage, include_usage, load, limit_headers
                )
            else:
                latency = self._jittered(self.settings.sim_ttft_ms)
                latency += self._jittered(self.settings.sim_itl_ms) * usage["completion_tokens"]
                latency *= load
                sent = await sleep_or_disconnect(receive, latency)
                if sent:
                    # The planned latency and load factor, so tests can check the model without timing it.
                    headers = [(b"x-sim-latency-ms", f"{latency * 1000:.3f}".encode()), load_header(load)]
                    headers += limit_headers
                    await send_json(send, 200, completion(model, content, finish_reason, usage), headers)
            stats = self.stats  # counters may have been reset while this call was in flight
            if sent:
                stats.completed += 1
                stats.prompt_tokens += usage["prompt_tokens"]
                stats.completion_tokens += usage["completion_tokens"]
            else:
                stats.disconnects += 1
        finally:
            self.inflight -= 1

    def _content(self, request: dict[str, Any], items: list[dict[str, Any]] | None, outcome: str) -> str:
        tokens = self.settings.sim_output_tokens
        if outcome == "bad_json":
            self.stats.injected["bad_json"] += 1
            return "Sure! Here are your posts: {items: [oops"
        if items is None:
            text = generate_post(json.dumps(request["messages"], sort_keys=True), tokens)
            response_format = request.get("response_format") or {}
            if response_format.get("type") == "json_object":
                return json.dumps({"post": text}, ensure_ascii=False)
            return text
        out: list[dict[str, Any]] = []
        for item in items:
            persona, topic = str(item.get("persona", "")), str(item.get("topic", ""))
            seed = json.dumps({k: v for k, v in item.items() if k != "id"}, sort_keys=True)
            entry: dict[str, Any] = {"id": item["id"], "post": generate_post(seed, tokens, persona, topic)}
            if outcome == "malformed" or self.rng.random() < self.faults.rate_malformed:
                self.stats.injected["malformed_items"] += 1
                kind = self.rng.choice(MALFORMED_KINDS)
                if kind == "missing":
                    continue
                if kind == "empty":
                    entry["post"] = ""
                elif kind == "not_a_string":
                    entry["post"] = 42
                else:
                    entry["id"] = f"{item['id']}-x"
            out.append(entry)
        return json.dumps({"items": out}, ensure_ascii=False)

    async def _stream(
        self,
        receive: Receive,
        send: Send,
        model: str,
        content: str,
        finish_reason: str,
        usage: dict[str, int],
        include_usage: bool,
        load: float,
        limit_headers: list[tuple[bytes, bytes]],
    ) -> bool:
        """Server-sent events like the real API; False if the client went away."""
        chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
            doc = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model}
            doc.update(choices=choices, system_fingerprint="loadproof-sim", **(extra or {}))
            return b"data: " + json.dumps(doc, ensure_ascii=False).encode() + b"\n\n"

        if not await sleep_or_disconnect(receive, self._jittered(self.settings.sim_ttft_ms) * load):
            return False
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream"),
                    (b"cache-control", b"no-cache"),
                    load_header(load),
                    *limit_headers,
                ],
            }
        )
        step = self.settings.sim_stream_chunk_tokens * CHARS_PER_TOKEN
        try:
            await send(
                {
                    "type": "http.response.body",
                    "body": chunk([delta({"role": "assistant", "content": ""})]),
                    "more_body": True,
                }
            )
            for start in range(0, len(content), step):
                piece = content[start : start + step]
                delay = self._jittered(self.settings.sim_itl_ms) * approx_tokens(piece) * load
                if not await sleep_or_disconnect(receive, delay):
                    return False
                await send(
                    {"type": "http.response.body", "body": chunk([delta({"content": piece})]), "more_body": True}
                )
            await send({"type": "http.response.body", "body": chunk([delta({}, finish_reason)]), "more_body": True})
            if include_usage:
                await send({"type": "http.response.body", "body": chunk([], {"usage": usage}), "more_body": True})
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
        except OSError:  # client disconnected mid-stream
            return False
        return True


def _retry_after(seconds: float) -> list[tuple[bytes, bytes]]:
    return [
        (b"retry-after", str(math.ceil(seconds)).encode()),
        (b"retry-after-ms", str(math.ceil(seconds * 1000)).encode()),
    ]


def main(argv: list[str] | None = None) -> None:
    """Serve the simulator with uvicorn until SIGINT/SIGTERM."""
    import uvicorn

    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m service.simulator", description="OpenAI-compatible LLM simulator.")
    parser.add_argument("--host", default=settings.sim_host)
    parser.add_argument("--port", type=int, default=settings.sim_port)
    parser.add_argument("--seed", type=int, default=0, help="seed of latency jitter and fault draws")
    parser.add_argument("--retry-after-s", type=float, default=1.0, help="Retry-After of injected 429s")
    parser.add_argument(
        "--hang-s",
        type=float,
        default=min(600.0, max(10.0, 2 * settings.llm_timeout_s)),
        help="how long an injected timeout hangs (default: 2x the client's timeout, 10..600 s)",
    )
    args = parser.parse_args(argv)
    app = Simulator(settings, seed=args.seed, retry_after_s=args.retry_after_s, hang_s=args.hang_s)
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        backlog=4096,
        timeout_keep_alive=75,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
